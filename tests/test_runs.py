"""Run folders: refusals (one line, exit 2, nothing on disk changed), the checkpoint swap's kill window, torn
checkpoint files, log.csv after kills and resumes (docs/runs.md)."""
import dataclasses
import hashlib
import json
import os
import shutil
from pathlib import Path

import pytest
import torch

from imagine_flash import checkpoint
from imagine_flash.checkpoint import CheckpointError, latest, read_checkpoint, save_checkpoint
from imagine_flash.cli import main
from imagine_flash.config import DistillConfig, save_config
from imagine_flash.runs import truncate_log

from conftest import assert_same_checkpoints, needs_data


def _hashes(folder: Path) -> dict:
    """Every file under `folder` (its path and the sha256 of its bytes): equal before and after means untouched."""
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def _net(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(seed)
    net = torch.nn.Linear(3, 2)
    return net, torch.optim.Adam(net.parameters())


def _save(run: Path, step: int) -> dict:
    """A checkpoint of a Linear whose weights are seeded by `step`; returns its state dict."""
    net, opt = _net(step)
    save_checkpoint(run, step, {"student": net}, {"g": (net, opt)}, {"seconds": float(step)})
    return {k: v.clone() for k, v in net.state_dict().items()}


def _resume(run: Path) -> tuple[int, dict]:
    net, opt = _net(99)
    step = checkpoint.load_checkpoint(run, {"student": net}, {"g": (net, opt)})
    return step, net.state_dict()


def _equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------------------------ the swap, state by state

def test_layout_step_folders_and_pointer(tmp_path):
    _save(tmp_path, 1)
    w2 = _save(tmp_path, 2)
    assert json.loads((tmp_path / "ckpt.json").read_text()) == {"dir": "ckpt-000002", "step": 2}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000002", "ckpt.json"]  # the older one went
    assert latest(tmp_path) == tmp_path / "ckpt-000002"
    step, w = _resume(tmp_path)
    assert step == 2 and _equal(w, w2)


def test_kill_window_states_built_by_hand(tmp_path):
    """Each in-between state of a swap from step 1 to step 2 resumes from a complete checkpoint at a known step."""
    other = tmp_path / "other"  # where a complete step-2 checkpoint is made, to copy its pieces from
    w2 = _save(other, 2)

    def base(name):
        run = tmp_path / name
        return run, _save(run, 1)

    # 1. The new folder half-written (ckpt-000002.tmp with a torn file): ignored, step 1.
    run, w1 = base("half")
    shutil.copytree(other / "ckpt-000002", run / "ckpt-000002.tmp")
    data = (run / "ckpt-000002.tmp" / "student.safetensors").read_bytes()
    (run / "ckpt-000002.tmp" / "student.safetensors").write_bytes(data[: len(data) // 2])
    step, w = _resume(run)
    assert step == 1 and _equal(w, w1)
    # 2. The new folder complete, the pointer still naming the old one: the pointer decides, step 1; both whole.
    run, w1 = base("renamed")
    shutil.copytree(other / "ckpt-000002", run / "ckpt-000002")
    (run / "ckpt.json.tmp").write_text(json.dumps({"dir": "ckpt-000002", "step": 2})[:7])  # a torn pointer write
    step, w = _resume(run)
    assert step == 1 and _equal(w, w1)
    assert (run / "ckpt-000002" / "state.pt").is_file()
    # 3. The pointer replaced, the old folder not yet deleted: step 2, and the old one is still there.
    run, w1 = base("pointed")
    shutil.copytree(other / "ckpt-000002", run / "ckpt-000002")
    shutil.copy(other / "ckpt.json", run / "ckpt.json")
    step, w = _resume(run)
    assert step == 2 and _equal(w, w2) and (run / "ckpt-000001" / "state.pt").is_file()
    # From each state the next save completes the swap and leaves one checkpoint.
    for name in ("half", "renamed", "pointed"):
        w3 = _save(tmp_path / name, 3)
        assert sorted(p.name for p in (tmp_path / name).iterdir()) == ["ckpt-000003", "ckpt.json"]
        assert _equal(_resume(tmp_path / name)[1], w3)


def test_a_kill_at_any_file_operation_of_the_swap_keeps_a_complete_checkpoint(tmp_path, monkeypatch):
    """Die before the n-th file-system change of a save, for every n: a resume always gets step 1 or step 2, whole."""
    from safetensors import torch as st

    class Killed(BaseException):
        pass

    ops = {"n": 0, "die_at": None}

    def counted(fn):
        def wrapper(*a, **kw):
            ops["n"] += 1
            if ops["n"] == ops["die_at"]:
                raise Killed
            return fn(*a, **kw)
        return wrapper

    for mod, name in ((os, "replace"), (Path, "rename"), (Path, "write_text"), (Path, "mkdir"), (checkpoint, "_remove"),
                      (checkpoint, "_fsync"), (st, "save_file"), (torch, "save")):
        monkeypatch.setattr(mod, name, counted(getattr(mod, name)))
    w1 = _save(tmp_path / "count", 1)
    ops["n"] = 0
    _save(tmp_path / "count", 2)
    n_ops = ops["n"]
    assert n_ops > 8
    for die_at in range(1, n_ops + 1):
        run = tmp_path / f"kill{die_at}"
        ops["die_at"], ops["n"] = None, 0
        _save(run, 1)
        ops["die_at"], ops["n"] = die_at, 0
        with pytest.raises(Killed):
            _save(run, 2)
        ops["die_at"] = None
        step, w = _resume(run)
        assert step in (1, 2), die_at
        if step == 1:
            assert _equal(w, w1), die_at


def test_legacy_ckpt_folder_resumes_and_is_replaced(tmp_path):
    w1 = _save(tmp_path, 1)
    (tmp_path / "ckpt-000001").rename(tmp_path / "ckpt")
    (tmp_path / "ckpt.json").unlink()
    step, w = _resume(tmp_path)
    assert step == 1 and _equal(w, w1)
    _save(tmp_path, 2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-000002", "ckpt.json"]


def test_torn_checkpoint_file_falls_back_in_one_line(tmp_path):
    other = tmp_path / "other"
    _save(other, 2)
    run = tmp_path / "run"
    w1 = _save(run, 1)
    shutil.copytree(other / "ckpt-000002", run / "ckpt-000002")
    shutil.copy(other / "ckpt.json", run / "ckpt.json")  # state 3 of the swap, then the new file torn
    torn = run / "ckpt-000002" / "student.safetensors"
    torn.write_bytes(torn.read_bytes()[:40])
    said = []
    ck = read_checkpoint(run, said.append)
    assert ck.step == 1 and _equal(ck.weights["student"], w1)
    assert len(said) == 1 and "\n" not in said[0] and str(torn) in said[0] and "ckpt-000001" in said[0]
    # With no earlier complete checkpoint: an error naming the file.
    shutil.rmtree(run / "ckpt-000001")
    (run / "ckpt-000002" / "state.pt").write_bytes(b"not a torch file")
    torn.unlink()
    with pytest.raises(CheckpointError, match="student.safetensors is missing"):
        read_checkpoint(run)
    shutil.copy(other / "ckpt-000002" / "student.safetensors", torn)
    with pytest.raises(CheckpointError, match="state.pt is truncated or corrupt"):
        read_checkpoint(run)


def test_truncate_log_keeps_one_header_and_steps_up_to_the_checkpoint(tmp_path):
    log = tmp_path / "log.csv"
    log.write_bytes(b"step,loss\r\n1,0.5\r\n2,0.4\r\n3,0.3\r\nstep,loss\r\n3,0.3\r\n4,0.2\r\n")  # killed at 3, resumed
    truncate_log(log, 2)
    assert log.read_bytes() == b"step,loss\r\n1,0.5\r\n2,0.4\r\n"
    log.write_bytes(b"1,0.5\r\n2,0.4\r\n")  # pretrain's log has no header
    truncate_log(log, 1)
    assert log.read_bytes() == b"1,0.5\r\n"


# ------------------------------------------------------------------------------------ the CLI's refusals

def _run_folder(tmp_path, teacher, **kw) -> Path:
    """A run folder as distill leaves it (config.json, a checkpoint, log.csv), made without training."""
    run = tmp_path / "run"
    run.mkdir()
    cfg = DistillConfig(out=str(run), teacher=str(teacher), batch_size=4, lr=3e-4, eval_samples=0,
                        guidance_scale=2.0, **kw)
    save_config(cfg, run / "config.json")
    _save(run, 2)
    (run / "log.csv").write_text("step,loss,recon,adv_g,disc,seconds\r\n1,0.5,0.5,,,0.1\r\n")
    return run


def _refused(capsys, args, run: Path, *words) -> str:
    before = _hashes(run) if run.exists() else None
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0, err
    for w in words:
        assert w in err, (w, err)
    assert (_hashes(run) if run.exists() else None) == before
    return err


def test_distill_on_a_run_folder_is_refused_without_resume(tmp_path, tiny_teacher, capsys):
    run = _run_folder(tmp_path, tiny_teacher)
    base = ["distill", "--teacher", str(tiny_teacher), "--out", str(run), "--eval-samples", "0"]
    _refused(capsys, base, run, "already holds a run", "--resume", "--out", "--overwrite")
    _refused(capsys, base + ["--dry-run"], run, "already holds a run")
    # Only config.json, or only an exported student, is a run too.
    for keep in ("config.json", "student"):
        other = tmp_path / f"only-{keep}"
        other.mkdir()
        (other / keep).mkdir() if keep == "student" else (other / keep).write_text("{}")
        _refused(capsys, base[:-4] + ["--out", str(other), "--eval-samples", "0"], other, "already holds a run")
    _refused(capsys, base + ["--resume", "--overwrite"], run, "--resume", "--overwrite")
    # --overwrite with --dry-run checks and prints, and deletes nothing.
    before = _hashes(run)
    assert main(base + ["--overwrite", "--dry-run"]) == 0
    assert _hashes(run) == before


def test_pretrain_on_a_run_folder_is_refused_without_resume(tmp_path, capsys):
    run = tmp_path / "teacher"
    run.mkdir()
    (run / "config.json").write_text("{}")
    _refused(capsys, ["pretrain", "--out", str(run)], run, "already holds a run", "--overwrite")


def test_resume_takes_the_saved_config_and_refuses_changes(tmp_path, tiny_teacher, capsys):
    run = _run_folder(tmp_path, tiny_teacher)
    base = ["distill", "--teacher", str(tiny_teacher), "--out", str(run), "--resume"]
    err = _refused(capsys, base + ["--set", "lr=0.5", "--set", "batch_size=4", "--max-steps", "900"], run,
                   "lr=0.5", "from --set", "the run has 0.0003")
    assert "batch_size" not in err.split("only")[0] and "max_steps" not in err.split("only")[0]
    _refused(capsys, base + ["--seed", "1"], run, "seed=1", "from --seed")
    _refused(capsys, base + ["--variant", "no-disc"], run, "variant=")
    # Options that cannot change the result may differ; options left out come from config.json, not the defaults.
    assert main(base + ["--max-steps", "900", "--set", "log_every=3", "--set", "eval_batch=7", "--dry-run"]) == 0
    shown = json.loads(capsys.readouterr().out)
    assert shown["max_steps"] == 900 and shown["log_every"] == 3 and shown["lr"] == 3e-4 and shown["batch_size"] == 4
    assert shown["guidance_scale"] == 2.0


def test_resume_without_a_checkpoint_or_a_folder_is_refused(tmp_path, tiny_teacher, capsys):
    base = ["distill", "--teacher", str(tiny_teacher), "--resume", "--eval-samples", "0", "--out"]
    missing = tmp_path / "nowhere"
    _refused(capsys, base + [str(missing)], missing, "no run folder", str(missing))
    assert not missing.exists()
    run = _run_folder(tmp_path, tiny_teacher)
    shutil.rmtree(latest(run))
    (run / "ckpt.json").unlink()
    _refused(capsys, base + [str(run)], run, "holds no checkpoint")


def test_resume_from_a_torn_only_checkpoint_changes_nothing(tmp_path, tiny_teacher, capsys):
    """The checkpoint is read before config.json or log.csv could change: a torn one is one line, exit 2."""
    run = _run_folder(tmp_path, tiny_teacher, max_steps=4)
    torn = latest(run) / "state.pt"
    torn.write_bytes(torn.read_bytes()[:100])
    _refused(capsys, ["distill", "--teacher", str(tiny_teacher), "--out", str(run), "--resume", "--max-steps", "6"],
             run, str(torn), "truncated or corrupt")


# ------------------------------------------------------------------------------------ kills and resumes, end to end

@needs_data
def test_overwrite_starts_afresh(tmp_path, tiny_teacher, capsys):
    run = _run_folder(tmp_path, tiny_teacher)
    (run / "notes.txt").write_text("mine")  # not a run file: --overwrite leaves it
    assert main(["distill", "--teacher", str(tiny_teacher), "--out", str(run), "--overwrite", "--max-steps", "1",
                 "--eval-samples", "0", "--set", "batch_size=2", "--set", "k=1", "--set", "sample_every=100"]) == 0
    assert json.loads((run / "ckpt.json").read_text())["step"] == 1 and not (run / "ckpt-000002").exists()
    assert json.loads((run / "config.json").read_text())["lr"] == DistillConfig().lr
    assert (run / "notes.txt").read_text() == "mine"
    assert (run / "log.csv").read_text().count("step") == 1


@needs_data
def test_resume_after_a_torn_checkpoint_and_a_killed_log_equals_uninterrupted(tmp_path, tiny_teacher, monkeypatch):
    """A run killed after its step-4 checkpoint was pointed at but with a torn file, and with log rows written after
    the step-2 checkpoint: resume warns, restarts from step 2, truncates the log, and ends equal to an uninterrupted
    run (weights bitwise, log rows)."""
    from imagine_flash.data.fashion import ColoredFashion
    from imagine_flash.train import distill

    data = ColoredFashion("train", 16, limit=64)
    cfg = DistillConfig(out=str(tmp_path / "a"), teacher=str(tiny_teacher), batch_size=4, k=2, max_steps=4,
                        ckpt_every=2, sample_every=100, log_every=1, eval_samples=0, adv_weight=0.1)
    distill(cfg, dataset=data)
    b = tmp_path / "b"
    distill(dataclasses.replace(cfg, out=str(b), max_steps=2), dataset=data)
    with open(b / "log.csv", "a", newline="") as f:  # rows of a killed attempt, and an old resume's second header
        f.write("3,9,9,9,9,1.0\r\nstep,loss,recon,adv_g,disc,seconds\r\n3,9,9,9,9,1.0\r\n")
    shutil.copytree(tmp_path / "a" / "ckpt-000004", b / "ckpt-000004")
    shutil.copy(tmp_path / "a" / "ckpt.json", b / "ckpt.json")
    torn = b / "ckpt-000004" / "student.safetensors"
    torn.write_bytes(torn.read_bytes()[:1000])
    config_before = json.loads((b / "config.json").read_text())
    said = []
    from imagine_flash import train

    real_read = train.read_checkpoint
    monkeypatch.setattr(train, "read_checkpoint", lambda r, warn=None: real_read(r, said.append))
    distill(dataclasses.replace(cfg, out=str(b)), resume=True, dataset=data)
    assert len(said) == 1 and str(torn) in said[0] and "step 2" in said[0]
    assert_same_checkpoints(tmp_path / "a", b)
    assert json.loads((b / "config.json").read_text()) == {**config_before, "max_steps": 4}  # only max_steps changed

    def rows(folder):
        lines = (folder / "log.csv").read_text().splitlines()
        return [line.rsplit(",", 1)[0] for line in lines]  # without the seconds

    assert rows(b) == rows(tmp_path / "a") and rows(b)[0].startswith("step") and len(rows(b)) == 5


def test_max_minutes_stops_with_a_checkpoint_and_a_resume_goes_on(tmp_path, tiny_teacher):
    """A time budget (max_minutes) ends training after the update that crosses it, with a checkpoint, the student
    and train.json at that step; a resume with a larger budget continues from there (minutes add up)."""
    from imagine_flash.data.fashion import ColoredFashion
    from imagine_flash.train import distill

    data = ColoredFashion("train", 16, limit=64)
    cfg = DistillConfig(out=str(tmp_path / "a"), teacher=str(tiny_teacher), batch_size=4, k=2, max_steps=50,
                        max_minutes=1e-9, ckpt_every=100, sample_every=100, log_every=1, eval_samples=0)
    distill(cfg, dataset=data)
    first = json.loads((tmp_path / "a" / "train.json").read_text())
    assert first["steps"] == 1 and latest(tmp_path / "a").name == "ckpt-000001"
    assert (tmp_path / "a" / "student").is_dir()
    distill(dataclasses.replace(cfg, max_steps=3, max_minutes=0.0), resume=True, dataset=data)
    second = json.loads((tmp_path / "a" / "train.json").read_text())
    assert second["steps"] == 3 and latest(tmp_path / "a").name == "ckpt-000003"
    assert second["train_minutes"] > first["train_minutes"]
