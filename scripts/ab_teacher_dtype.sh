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
    resume=(); [ -f "$run/ckpt.json" ] && resume=(--resume)
    "$PY" -m imagine_flash distill --out "$run" --set seed=$seed --set teacher_dtype=$dtype --set threads=$THREADS \
      "${resume[@]}" > "$OUT/$dtype-seed$seed.log" 2>&1
  done
done
"$PY" - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1]); rows = {}
for run in sorted(p for p in out.iterdir() if p.is_dir()):
    m, t = json.loads((run / "metrics.json").read_text()), json.loads((run / "train.json").read_text())
    rows[run.name] = {"train_minutes": t["train_minutes"], "teacher_dtype": t["teacher_dtype"],
                      **{k: m["student"][k] for k in ("fid", "kid", "fid_indomain", "color_acc", "class_acc")},
                      "teacher_fid": m["teacher"]["fid"]}
(out / "summary.json").write_text(json.dumps(rows, indent=2))
print(json.dumps(rows, indent=2))
PY
