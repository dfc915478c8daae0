#!/usr/bin/env bash
# Issue 14's before/after: the default job (`imagine-flash distill`, 600 updates, metrics.json at N = 500) with the
# frozen teacher in fp32 and in bf16, two seeds each, one after the other on the same machine and threads.
# Usage: bash scripts/ab_teacher_dtype.sh [OUT=runs/ab_teacher_dtype] [THREADS=2]
# Resumable: a finished run (metrics.json) is skipped, a started one resumed. Summary: OUT/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ab_teacher_dtype}
THREADS=${2:-2}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
for seed in 0 1; do
  for dtype in fp32 bf16; do
    run="$OUT/$dtype-seed$seed"
    [ -f "$run/metrics.json" ] && continue
    resume=()  # a checkpoint: go on from it; a run folder without one: nothing to keep
    if [ -f "$run/ckpt.json" ]; then resume=(--resume); elif [ -d "$run" ]; then resume=(--overwrite); fi
    "$PY" -m imagine_flash distill --out "$run" --set seed=$seed --set teacher_dtype=$dtype --set threads=$THREADS \
      "${resume[@]}" > "$OUT/$dtype-seed$seed.log" 2>&1
  done
done
"$PY" scripts/ab_summary.py "$OUT"
