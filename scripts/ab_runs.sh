#!/usr/bin/env bash
# A/B runs of the default job (`imagine-flash distill`: 200 updates for flash since 2026-12-05, 600 before; add
# --max-steps 600 to reproduce the older results; metrics.json at N = 500), two seeds each: every
# NAME=SETTINGS argument is run as OUT/NAME-seed0 and OUT/NAME-seed1 with those extra flags. The two seeds run side
# by side, one thread each (the 2-core machine's best throughput); nothing else should run.
#   bash scripts/ab_runs.sh runs/ab_ablations full= no-srl="--set variant=no-srl" no-disc="--set variant=no-disc"
# Resumable: a finished run (metrics.json) is skipped, a started one resumed, a folder without a checkpoint started
# again. Summary (per seed, seed means and spreads): OUT/summary.md and OUT/summary.json.
set -euo pipefail -f  # -f: SETTINGS such as gamma_table=[[900,990],...] are not globs
cd "$(dirname "$0")/.."
OUT=$1; shift
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
lane() {  # every NAME=SETTINGS for one seed, one after the other
  local seed=$1; shift
  for spec in "$@"; do
    local name=${spec%%=*} settings=${spec#*=}
    local run="$OUT/$name-seed$seed"
    [ -f "$run/metrics.json" ] && continue
    local resume=()  # a checkpoint: go on from it; a run folder without one: nothing to keep
    if [ -f "$run/ckpt.json" ]; then resume=(--resume); elif [ -d "$run" ]; then resume=(--overwrite); fi
    # shellcheck disable=SC2086  # SETTINGS is a list of flags
    "$PY" -m imagine_flash distill --out "$run" --set seed=$seed --set threads=1 $settings "${resume[@]}" \
      > "$OUT/$name-seed$seed.log" 2>&1 || echo "$name-seed$seed failed: see $OUT/$name-seed$seed.log" >&2
  done
}
lane 0 "$@" & lane 1 "$@" & wait
"$PY" scripts/ab_summary.py "$OUT"
