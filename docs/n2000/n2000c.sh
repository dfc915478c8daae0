#!/usr/bin/env bash
set -u
cd /work/main
E=".venv/bin/imagine-flash evaluate --num-samples 2000 --fid-reference 10000 --batch 250 --threads 2"
[ -f runs/n2000/mm1-w1.5-seed1-300.json ] || $E --model runs/ab_mm_w15/mm1-w1.5-seed1/student --out runs/n2000/mm1-w1.5-seed1-300.json > runs/n2000/mm1-w1.5-seed1-300.log 2>&1
bash scripts/ab_budgets.sh runs/ab_mm_w2 200,300,600 mm1-w2-seed0="--set disc_mismatch=1 --set guidance_scale=2 --set seed=0" mm1-w2-seed1="--set disc_mismatch=1 --set guidance_scale=2 --set seed=1" > runs/ab_mm_w2_600.out 2>&1
