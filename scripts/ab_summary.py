"""Summarise A/B runs of `imagine-flash distill`: OUT/summary.json and OUT/summary.md from every OUT/<run>/ with a
metrics.json, and one row <run>@<B> per OUT/<run>/metrics_step<B>.json (scripts/ab_budgets.sh: the run at B updates).
Runs named <config>-seed<k>[@B] are grouped by <config>[@B]: per seed, then the mean and the spread (max - min) of
each metric over the seeds. With a run at two budgets or more, also OUT/fid_vs_updates.png.

Usage: python scripts/ab_summary.py OUT"""
import json
import re
import sys
from pathlib import Path

KEYS = ("fid", "kid", "fid_indomain", "color_acc", "class_acc", "mean_shift", "std_ratio", "hf_ratio", "precision",
        "recall")
HEAD = ("train min", "FID", "KID", "in-domain FID", "colour acc", "class acc", "mean shift", "std ratio", "HF ratio",
        "precision", "recall")


def collect(out: Path) -> dict:
    rows = {}
    for run in sorted(p for p in out.iterdir() if p.is_dir()):
        budgets = sorted(int(f.stem.split("_step")[1]) for f in run.glob("metrics_step*.json"))
        files = [(f"{run.name}@{b}", run / f"metrics_step{b}.json", run / f"train_step{b}.json") for b in budgets]
        if not budgets and (run / "metrics.json").is_file():
            files = [(run.name, run / "metrics.json", run / "train.json")]
        for name, mf, tf in files:
            rows[name] = row(json.loads(mf.read_text()), json.loads(tf.read_text()))
    return rows


def row(m: dict, t: dict) -> dict:
    return {"train_minutes": t["train_minutes"], "steps": t.get("steps"), "teacher_dtype": t.get("teacher_dtype"),
            **{k: m["student"][k] for k in KEYS if k in m["student"]},
            "teacher": {k: m["teacher"][k] for k in KEYS if k in m["teacher"]}}


def fmt(key: str, v: float) -> str:
    if key in ("color_acc", "class_acc", "precision", "recall"):
        return f"{100 * v:.1f}%"
    if key in ("kid", "mean_shift"):
        return f"{v:.4f}"
    return f"{v:.3f}" if key in ("std_ratio", "hf_ratio") else f"{v:.1f}"


def markdown(rows: dict) -> str:
    keys = ("train_minutes",) + KEYS
    lines = ["| run | " + " | ".join(HEAD) + " |", "|---" * (len(HEAD) + 1) + "|"]
    groups: dict[str, list[str]] = {}
    for name in rows:
        groups.setdefault(re.sub(r"-seed\d+(?=@|$)", "", name), []).append(name)
    for group, names in groups.items():
        for n in names:
            lines.append(f"| {n} | " + " | ".join(fmt(k, rows[n][k]) if k in rows[n] else "" for k in keys) + " |")
        if len(names) > 1:
            vals = {k: [rows[n][k] for n in names if k in rows[n]] for k in keys}
            lines.append(f"| **{group}, mean (spread)** | " + " | ".join(
                f"{fmt(k, sum(v) / len(v))} ({fmt(k, max(v) - min(v))})" if v else "" for k, v in vals.items())
                + " |")
    teacher = max((r["teacher"] for r in rows.values()), key=len, default={})  # the one with every metric
    if teacher:
        lines.append("| teacher (25 steps) | | " + " | ".join(fmt(k, teacher[k]) if k in teacher else "" for k in KEYS)
                     + " |")
    return "\n".join(lines) + "\n"


def plot(rows: dict, path: Path) -> None:
    """FID and in-domain FID against updates, one line per run with budget rows (<run>@<B>), the teacher dashed."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs: dict[str, list[tuple[int, dict]]] = {}
    for name, r in rows.items():
        if "@" in name:
            runs.setdefault(name.split("@")[0], []).append((int(name.split("@")[1]), r))
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, label in zip(axes, ("fid", "fid_indomain"), ("FID (Inception)", "in-domain FID")):
        for run, points in runs.items():
            points.sort(key=lambda p: p[0])
            ax.plot([b for b, _ in points], [r[key] for _, r in points], marker="o", label=run)
        teacher = max((r["teacher"] for r in rows.values()), key=len)
        ax.axhline(teacher[key], color="grey", linestyle="--", label="teacher, 25 steps")
        ax.set_xlabel("updates")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(out: Path) -> dict:
    rows = collect(out)
    (out / "summary.json").write_text(json.dumps(rows, indent=2))
    (out / "summary.md").write_text(markdown(rows))
    runs = [name.split("@")[0] for name in rows if "@" in name]
    if len(runs) > len(set(runs)):  # some run at two budgets or more
        plot(rows, out / "fid_vs_updates.png")
    return rows


if __name__ == "__main__":
    rows = main(Path(sys.argv[1]))
    print((Path(sys.argv[1]) / "summary.md").read_text())
