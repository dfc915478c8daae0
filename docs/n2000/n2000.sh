#!/usr/bin/env bash
# N = 2,000 against 10,000 real, 2 threads, one at a time: the new default (seeds 0, 1), the old default's 5-minute
# benchmark student (a protocol check against its committed 24.7), the teacher at CFG 2.
set -u
cd /work/main
E=".venv/bin/imagine-flash evaluate --num-samples 2000 --fid-reference 10000 --batch 250 --threads 2"
mkdir -p runs/n2000
for s in 0 1; do
  [ -f runs/n2000/newdef-seed$s.json ] || $E --model runs/ab_newdef/default-seed$s/student --out runs/n2000/newdef-seed$s.json > runs/n2000/newdef-seed$s.log 2>&1
done
[ -f runs/n2000/olddef-5min.json ] || $E --model runs/bench_k8/students/flash-3-clock/at-5min/student --out runs/n2000/olddef-5min.json > runs/n2000/olddef-5min.log 2>&1
[ -f runs/n2000/teacher-cfg2.json ] || $E --guidance-scale 2 --out runs/n2000/teacher-cfg2.json > runs/n2000/teacher-cfg2.log 2>&1
echo done
