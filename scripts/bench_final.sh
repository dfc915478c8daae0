#!/usr/bin/env bash
# The final benchmark (issue 11, item 6): every method at equal updates and the equal-minutes rows, at the protocol's
# full size (N = 2,000 samples per row against all 10,000 real test images), one process at 2 threads.
#   CLOCK_FROM=runs/bench_k8 bash scripts/bench_final.sh runs/bench_final
# CLOCK_FROM: a folder whose students/{flash-3,lcm}-clock were trained against the clock by scripts/bench_minutes.sh
# (side by side, one thread each, the fair way on 2 cores); they are copied and only measured again here. Without it
# the clock students are trained here, one after the other. Resumable: rerun the same command (finished students and
# rows are kept; an unfinished student resumes from its last checkpoint).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/bench_final}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT/students"
if [ -n "${CLOCK_FROM:-}" ]; then
  for s in flash-3-clock lcm-clock; do
    [ -d "$OUT/students/$s" ] || cp -r "$CLOCK_FROM/students/$s" "$OUT/students/$s"
  done
fi
"$PY" -m imagine_flash benchmark --out "$OUT" --clock-students flash-3,lcm --threads "${THREADS:-2}" \
  >> "$OUT/benchmark.log" 2>&1
