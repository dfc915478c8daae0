#!/usr/bin/env bash
# More rows at N = 2,000 against 10,000 real, 2 threads: the FID choice (CFG 1.5) and the default at 300 updates.
set -u
cd /work/main
E=".venv/bin/imagine-flash evaluate --num-samples 2000 --fid-reference 10000 --batch 250 --threads 2"
[ -f runs/n2000/mm1-w1.5-seed0-300.json ] || $E --model runs/ab_mm_w15/mm1-w1.5-seed0/student --out runs/n2000/mm1-w1.5-seed0-300.json > runs/n2000/mm1-w1.5-seed0-300.log 2>&1
[ -f runs/n2000/mm1-w2-seed0-300.json ] || $E --model runs/ab_mm_w2/mm1-w2-seed0/student --out runs/n2000/mm1-w2-seed0-300.json > runs/n2000/mm1-w2-seed0-300.log 2>&1
echo done
