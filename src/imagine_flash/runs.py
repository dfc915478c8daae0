"""What a command may do to a run folder: start a run (refused on an existing one without --overwrite), resume one
(its saved config.json is the config), and keep log.csv in step with the checkpoint. See docs/runs.md."""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import typing
from pathlib import Path

from .checkpoint import LEGACY, POINTER, has_checkpoint
from .config import ConfigError

# Settings that cannot change what a resumed run computes: they may differ from the run's config.json.
RESUMABLE = {"out", "max_steps", "max_minutes", "threads", "log_every", "sample_every", "ckpt_every", "eval_samples",
             "eval_batch", "fid_reference", "eval_teacher_steps"}

# The files and folders a run writes (--overwrite deletes these, and nothing else of the folder).
RUN_FILES = ("config.json", "log.csv", "train.json", "metrics.json", "comparison.png", "done.json", POINTER,
             f"{POINTER}.tmp", LEGACY, f"{LEGACY}.tmp", f"{LEGACY}.old", "student", "model", "samples")


def holds_run(run: Path) -> bool:
    """A checkpoint, config.json or an exported student/model: a run another command must not silently replace."""
    run = Path(run)
    return run.is_dir() and (has_checkpoint(run) or any((run / n).exists() for n in ("config.json", "student",
                                                                                    "model")))


def check_fresh(run: Path, overwrite: bool) -> None:
    """Starting a run in `run`: refused where a run is already there, unless the user asked to overwrite it."""
    if holds_run(run) and not overwrite:
        raise ConfigError(f"{run} already holds a run: pass --resume to continue it, a new --out, or --overwrite to "
                          "start it afresh (deleting its checkpoints)")


def clear_run(run: Path) -> None:
    """--overwrite: delete the run's own files (never anything else the folder holds)."""
    import shutil

    run = Path(run)
    for p in [run / n for n in RUN_FILES] + sorted(run.glob("ckpt-*")):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        elif p.exists() or p.is_symlink():
            p.unlink()


def check_resumable(run: Path) -> None:
    """--resume needs a run folder with a checkpoint and its config.json."""
    run = Path(run)
    if not run.is_dir():
        raise ConfigError(f"--resume: there is no run folder {run} (check --out)")
    if not has_checkpoint(run):
        raise ConfigError(f"--resume: {run} holds no checkpoint to resume from (drop --resume to start afresh, "
                          "with --overwrite if it holds a run)")
    if not (run / "config.json").is_file():
        raise ConfigError(f"--resume: {run / 'config.json'} is missing: a run resumes with its own config")


def saved_config(cls, run: Path):
    """The config a run saved (config.json), as a `cls` instance: lists back to the tuples of its fields."""
    path = Path(run) / "config.json"
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path} cannot be read ({e})") from None
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"{path}: unknown option(s) {', '.join(unknown)} (a run of another version?)")
    return cls(**{k: _tuples(v) if "tuple" in str(hints[k]) else v for k, v in data.items()})


def _tuples(v):
    return tuple(_tuples(x) for x in v) if isinstance(v, list) else v


def _same(a, b) -> bool:
    """Equal as config.json would store them (tuples and lists alike)."""
    return json.loads(json.dumps(a, default=str)) == json.loads(json.dumps(b, default=str))


def changed_settings(saved, cfg, names) -> list[str]:
    """Those of `names` (settings that change training) where `cfg` differs from the run's saved config."""
    return [n for n in sorted(names) if n not in RESUMABLE and not _same(getattr(saved, n), getattr(cfg, n))]


def refuse_changes(saved, cfg, names, sources: dict | None = None) -> None:
    """One line naming every setting of `names` that differs from the run's config.json (sources: where each came
    from)."""
    diff = changed_settings(saved, cfg, names)
    if diff:
        parts = [f"{n}={getattr(cfg, n)!r}" + (f" (from {sources[n]})" if sources and n in sources else "")
                 + f" but the run has {getattr(saved, n)!r}" for n in diff]
        raise ConfigError(f"--resume continues {Path(saved.out)} with its own config.json: " + "; ".join(parts)
                          + f" (only {', '.join(sorted(RESUMABLE - {'out'}))} may change; use a new --out to "
                          "train with other settings)")


def resume_config(cls, cfg, explicit: set, sources: dict | None = None):
    """--resume: the run's config.json with the user's explicit settings that cannot change the result (RESUMABLE);
    an explicit setting that would change training and differs is refused."""
    run = Path(cfg.out)
    check_resumable(run)
    saved = saved_config(cls, run)
    refuse_changes(saved, cfg, explicit, sources)
    return dataclasses.replace(saved, out=cfg.out, **{k: getattr(cfg, k) for k in (explicit & RESUMABLE) - {"out"}})


def truncate_log(path: Path, step: int) -> None:
    """log.csv on resume: its rows of steps <= the checkpoint's step and one header (later rows were written by an
    invocation killed after that checkpoint, and the resumed run writes them again)."""
    path = Path(path)
    if not path.is_file():
        return
    keep, header = [], None
    for row in csv.reader(io.StringIO(path.read_text(), newline="")):
        if not row:
            continue
        try:
            s = int(row[0])
        except ValueError:  # a header row (a fresh run's, or one a resume of an earlier version appended)
            header = header or row
            continue
        if s <= step:
            keep.append(row)
    out = io.StringIO()
    csv.writer(out).writerows(([header] if header else []) + keep)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(out.getvalue(), newline="")
    os.replace(tmp, path)
