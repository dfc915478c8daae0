#!/usr/bin/env bash
# Longer budgets of the default job: every NAME=SETTINGS is one run, OUT/NAME, trained to each budget in BUDGETS in
# turn (comma-separated updates, e.g. 600,1200,1800) by resuming the same run (bitwise equal to one run to that
# budget), with metrics.json (N = 500) at each, kept as OUT/NAME/metrics_stepB.json (and train_stepB.json,
# comparison_stepB.png). The runs go side by side, one thread each: give at most two on this 2-core machine.
#   bash scripts/ab_budgets.sh runs/ab_budgets 600,1200,1800 full="--set seed=0" no-backward="--set variant=no-backward"
# Resumable: rerun the same command. Summary: OUT/summary.md and OUT/summary.json (scripts/ab_summary.py).
set -euo pipefail -f  # -f: SETTINGS such as gamma_table=[[900,990],...] are not globs
cd "$(dirname "$0")/.."
OUT=$1 BUDGETS=$2; shift 2
PY=${PY:-.venv/bin/python}
mkdir -p "$OUT"
lane() {  # one run, to each budget in turn
  local name=${1%%=*} settings=${1#*=} run="$OUT/${1%%=*}" b
  for b in ${BUDGETS//,/ }; do
    [ -f "$run/metrics_step$b.json" ] && continue
    local resume=()  # a checkpoint: go on from it (to the next budget); a folder without one: nothing to keep
    if [ -f "$run/ckpt.json" ]; then resume=(--resume); elif [ -d "$run" ]; then resume=(--overwrite); fi
    # shellcheck disable=SC2086  # SETTINGS is a list of flags
    "$PY" -m imagine_flash distill --out "$run" --max-steps "$b" --set threads=1 $settings "${resume[@]}" \
      >> "$OUT/$name.log" 2>&1 || { echo "$name failed at budget $b: see $OUT/$name.log" >&2; return; }
    cp "$run/metrics.json" "$run/metrics_step$b.json"
    cp "$run/train.json" "$run/train_step$b.json"
    cp "$run/comparison.png" "$run/comparison_step$b.png" 2>/dev/null || true
  done
}
for spec in "$@"; do lane "$spec" & done
wait
"$PY" scripts/ab_summary.py "$OUT"
