"""Summarise A/B runs of `imagine-flash distill`: OUT/summary.json from every OUT/<run>/ with a metrics.json.

Usage: python scripts/ab_summary.py OUT"""
import json
import sys
from pathlib import Path

KEYS = ("fid", "kid", "fid_indomain", "color_acc", "class_acc", "mean_shift", "std_ratio")


def main(out: Path) -> dict:
    rows = {}
    for run in sorted(p for p in out.iterdir() if (p / "metrics.json").is_file()):
        m, t = json.loads((run / "metrics.json").read_text()), json.loads((run / "train.json").read_text())
        rows[run.name] = {"train_minutes": t["train_minutes"], "teacher_dtype": t.get("teacher_dtype"),
                          **{k: m["student"][k] for k in KEYS if k in m["student"]},
                          "teacher_fid": m["teacher"]["fid"]}
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    return rows


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1])), indent=2))
