#!/usr/bin/env bash
# Issue 11's ablations with two seeds: the default job as the full method and as each of its ablations, seeds 0 and
# 1 side by side (scripts/ab_runs.sh). Resumable. Usage: bash scripts/ab_ablations.sh [OUT=runs/ab_ablations]
set -euo pipefail
cd "$(dirname "$0")/.."
exec bash scripts/ab_runs.sh "${1:-runs/ab_ablations}" full= no-srl="--set variant=no-srl" \
  no-disc="--set variant=no-disc" no-backward="--set variant=no-backward" no-nc="--set variant=no-nc"
