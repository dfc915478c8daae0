#!/usr/bin/env bash
# Issue 11's ablations with two seeds: the default job (`imagine-flash distill`, metrics.json at N = 500) as the
# full method and as each of its ablations (--set variant=no-srl, no-disc, no-backward, no-nc), seeds 0 and 1.
# The two seeds run side by side, one thread each (the 2-core machine's best throughput); nothing else should run.
# Usage: bash scripts/ab_ablations.sh [OUT=runs/ab_ablations]
# Resumable: a finished run (metrics.json) is skipped, a started one resumed. Summary: OUT/summary.json.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-runs/ab_ablations}
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
lane() {  # every variant for one seed, one after the other
  local seed=$1
  for variant in full no-srl no-disc no-backward no-nc; do
    local run="$OUT/$variant-seed$seed"
    [ -f "$run/metrics.json" ] && continue
    local resume=()  # a checkpoint: go on from it; a run folder without one: nothing to keep
    if [ -f "$run/ckpt.json" ]; then resume=(--resume); elif [ -d "$run" ]; then resume=(--overwrite); fi
    "$PY" -m imagine_flash distill --out "$run" --set seed=$seed --set variant=$variant --set threads=1 \
      "${resume[@]}" > "$OUT/$variant-seed$seed.log" 2>&1
  done
}
lane 0 & lane 1 & wait
"$PY" scripts/ab_summary.py "$OUT"
