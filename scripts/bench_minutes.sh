#!/usr/bin/env bash
# The equal-minutes curve of flash-3 and LCM: `imagine-flash benchmark --part minutes` for each, side by side, one
# thread each (the 2-core machine's best throughput; nothing else should run), then once more for the combined
# tables and fid_vs_minutes.png. Resumable: rerun it; with more marks (M=5,10,20,40,80) the clock runs go on from
# their last checkpoint and only the new rows are measured.
#   M=5,10,20,40 bash scripts/bench_minutes.sh runs/bench_k8
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=$1 M=${M:-5,10,20,40,80}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
bench() { "$PY" -m imagine_flash benchmark --out "$OUT" --part minutes --minutes "$M" --clock-students "$1" \
  --num-samples 500 --fid-reference 2000 --threads 1; }
bench flash-3 > "$OUT/flash.log" 2>&1 &
bench lcm > "$OUT/lcm.log" 2>&1 &
wait
bench flash-3,lcm > "$OUT/combined.log" 2>&1
