"""Summarise A/B runs of `imagine-flash distill`: OUT/summary.json and OUT/summary.md from every OUT/<run>/ with a
metrics.json. Runs named <config>-seed<k> are grouped by <config>: per seed, then the mean and the spread
(max - min) of each metric over the seeds.

Usage: python scripts/ab_summary.py OUT"""
import json
import re
import sys
from pathlib import Path

KEYS = ("fid", "kid", "fid_indomain", "color_acc", "class_acc", "mean_shift", "std_ratio")
HEAD = ("train min", "FID", "KID", "in-domain FID", "colour acc", "class acc", "mean shift", "std ratio")


def collect(out: Path) -> dict:
    rows = {}
    for run in sorted(p for p in out.iterdir() if (p / "metrics.json").is_file()):
        m, t = json.loads((run / "metrics.json").read_text()), json.loads((run / "train.json").read_text())
        rows[run.name] = {"train_minutes": t["train_minutes"], "teacher_dtype": t.get("teacher_dtype"),
                          **{k: m["student"][k] for k in KEYS if k in m["student"]},
                          "teacher": {k: m["teacher"][k] for k in KEYS if k in m["teacher"]}}
    return rows


def fmt(key: str, v: float) -> str:
    if key in ("color_acc", "class_acc"):
        return f"{100 * v:.1f}%"
    return f"{v:.4f}" if key in ("kid", "mean_shift") else f"{v:.3f}" if key == "std_ratio" else f"{v:.1f}"


def markdown(rows: dict) -> str:
    keys = ("train_minutes",) + KEYS
    lines = ["| run | " + " | ".join(HEAD) + " |", "|---" * (len(HEAD) + 1) + "|"]
    groups: dict[str, list[str]] = {}
    for name in rows:
        groups.setdefault(re.sub(r"-seed\d+$", "", name), []).append(name)
    for group, names in groups.items():
        for n in names:
            lines.append(f"| {n} | " + " | ".join(fmt(k, rows[n][k]) if k in rows[n] else "" for k in keys) + " |")
        if len(names) > 1:
            vals = {k: [rows[n][k] for n in names if k in rows[n]] for k in keys}
            lines.append(f"| **{group}, mean (spread)** | " + " | ".join(
                f"{fmt(k, sum(v) / len(v))} ({fmt(k, max(v) - min(v))})" if v else "" for k, v in vals.items())
                + " |")
    teacher = next(iter(rows.values()))["teacher"] if rows else {}
    if teacher:
        lines.append("| teacher (25 steps) | | " + " | ".join(fmt(k, teacher[k]) if k in teacher else "" for k in KEYS)
                     + " |")
    return "\n".join(lines) + "\n"


def main(out: Path) -> dict:
    rows = collect(out)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    (out / "summary.md").write_text(markdown(rows))
    return rows


if __name__ == "__main__":
    rows = main(Path(sys.argv[1]))
    print((Path(sys.argv[1]) / "summary.md").read_text())
