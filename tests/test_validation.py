"""Every bad setting is refused in one line naming the option and its source, exit 2, before any model or data loads."""
import dataclasses
import json
import typing
from types import SimpleNamespace

import pytest
import yaml

import imagine_flash.generate
import imagine_flash.pretrain
import imagine_flash.train
from imagine_flash import validation
from imagine_flash.cli import _honoured_steps, main
from imagine_flash.config import DistillConfig, PretrainConfig

# An out-of-range value for every field that has a range or choices (the rest are booleans).
BAD_DISTILL = {
    "out": "", "teacher": "", "teacher_dtype": "fp8", "dataset": "", "method": "flashy", "variant": "no-such",
    "student_steps": 0, "student_timesteps": [500, 999], "reconstruction": "eq9", "recon_weight": "min-snr", "k": 0,
    "student_prediction": "x0", "target_solver": "heun",
    "gamma_table": [[900, 1000]], "recon_step_weights": [1.0, -1.0, 1.0], "guidance_scale": -1.0, "embedded_guidance": -1.0,
    "rollout_weights": "best", "batch_size": 0, "grad_accum": 0, "lr": 0.0, "adam_betas": [0.9, 1.0],
    "adv_weight": -0.1, "disc_lr": -1e-4, "disc_betas": [0.0], "disc_t_max": 1000, "disc_r1": -1.0,
    "disc_r1_sigma": 0.0, "disc_mismatch": -1.0, "adv_step_weights": [1.0, -1.0, 1.0], "disc_warmup": -1,
    "disc_type": "stylegan", "disc_features": "", "max_steps": 0, "max_minutes": -1.0, "ema_decay": 1.0,
    "grad_clip": -1.0,
    "mixed_precision": "fp8", "lora_rank": -1, "lora_alpha": 0.0, "lora_targets": [], "optimizer": "sgd",
    "seed": -1, "ckpt_every": 0, "sample_every": 0, "log_every": -5, "eval_samples": 1, "eval_teacher_steps": 0,
    "fid_reference": 0, "eval_batch": 0, "threads": -1, "resolution": 0, "lcm_ddim_timesteps": 0,
    "lcm_loss": "l1", "progressive_stages": 0, "dataset_format": "csv", "image_column": "", "caption_column": "",
    "dataset_split": "",
}
BAD_PRETRAIN = {
    "out": "", "variant": "huge", "init": "", "resolution": 0, "data_dir": "", "seed": -1, "batch_size": 0,
    "lr": 0.0, "warmup_steps": -1, "weight_decay": -0.1, "max_steps": 0, "ema_decay": 1.5, "loss_weight": "snr",
    "autocast": "fp16", "cond_drop": 1.5, "guidance_scale": -2.0, "objective": "score", "flow_shift": 0.0, "beta_schedule": "cosine", "beta_start": -0.1,
    "beta_end": 1.0, "num_train_timesteps": 1, "ckpt_every": 0, "sample_every": 0, "log_every": 0, "threads": -2,
}
WRONG = {int: 1.5, float: True, str: [1], bool: 3, tuple: 7}  # a YAML value of another type than the annotation's


def wrong_type(cls, name):
    kinds, _ = validation._kinds(typing.get_type_hints(cls)[name])
    return WRONG[kinds[0]]


def test_tables_cover_every_field():
    for cls, bad in ((DistillConfig, BAD_DISTILL), (PretrainConfig, BAD_PRETRAIN)):
        rules = validation.RULES[cls](1000)
        assert set(rules) == {f.name for f in dataclasses.fields(cls)}
        assert set(bad) == {n for n, r in rules.items() if r is not validation.ANY}


def test_defaults_are_valid():
    validation.validate(DistillConfig())
    validation.validate(PretrainConfig())


@pytest.fixture
def no_work(monkeypatch):
    """Training, pretraining and model loading fail the test: validation must refuse first."""
    def boom(*a, **k):
        raise AssertionError("validation let a bad setting through to the work")
    for mod, name in ((imagine_flash.train, "distill"), (imagine_flash.pretrain, "pretrain"),
                      (imagine_flash.generate, "ModelRunner")):
        monkeypatch.setattr(mod, name, boom)


def refused(capsys, argv, *words, code=2):
    """main(argv) exits `code` with one stderr line that names every word, and no traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert rc == code, err
    assert len(lines) == 1 and "Traceback" not in err, err
    assert all(w in lines[0] for w in words), (lines[0], words)
    return lines[0]


def _cases(cls, bad):
    for f in dataclasses.fields(cls):
        yield pytest.param(f.name, wrong_type(cls, f.name), id=f"{f.name}-type")
        if f.name in bad:
            yield pytest.param(f.name, bad[f.name], id=f"{f.name}-range")


@pytest.mark.parametrize("name,value", list(_cases(DistillConfig, BAD_DISTILL)))
def test_distill_refuses_every_bad_field(tmp_path, capsys, no_work, name, value):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({name: value}))
    out = tmp_path / "run"
    argv = ["distill", "--config", str(cfg), "--max-steps", "2", "--eval-samples", "0"]
    argv += [] if name in ("out", "max_steps", "eval_samples") else ["--out", str(out)]
    if name in ("max_steps", "eval_samples"):
        argv = ["distill", "--config", str(cfg), "--out", str(out)]
    refused(capsys, argv, f"{name}=", str(cfg))
    assert not out.exists()


@pytest.mark.parametrize("name,value", list(_cases(PretrainConfig, BAD_PRETRAIN)))
def test_pretrain_refuses_every_bad_field(tmp_path, capsys, no_work, name, value):
    cfg = tmp_path / "cfg.yaml"
    cfg.write_text(yaml.safe_dump({name: value}))
    out = tmp_path / "run"
    refused(capsys, ["pretrain", "--config", str(cfg)] + ([] if name == "out" else ["--out", str(out)]),
            f"{name}=", str(cfg))
    assert not out.exists()


@pytest.mark.parametrize("argv,words", [
    (["--max-steps", "0"], ["max_steps=0", "from --max-steps"]),  # no "untrained student" with exit 0
    (["--max-steps", "-3"], ["max_steps=-3", "from --max-steps"]),
    (["--lora-rank", "-1"], ["lora_rank=-1", "from --lora-rank"]),
    (["--set", "lr=-1e-4"], ["lr=-0.0001", "from --set"]),
    (["--set", "ema_decay=1"], ["ema_decay=1.0", "[0, 1)"]),
    (["--set", "lr=abc"], ["lr='abc'", "from --set"]),
    (["--set", "guidance_scale=inf"], ["guidance_scale=inf", "finite"]),
    (["--set", "k=0"], ["k=0", ">= 1"]),
    (["--set", "noise_correction=maybe"], ["noise_correction", "from --set"]),
    (["--set", "batch_size=6", "--set", "grad_accum=4"], ["batch_size=6", "grad_accum=4"]),
    (["--set", "batch_size=2", "--set", "grad_accum=2"], ["disc_mismatch=1.0 (default)", "2+ samples per micro-batch"]),
    (["--set", "recon_step_weights=[1,1]"], ["recon_step_weights", "(3)"]),
    (["--set", "adv_step_weights=[0,3]"], ["adv_step_weights", "(3)"]),
    (["--method", "lcm", "--set", "lcm_ddim_timesteps=2"], ["student_steps=3", "lcm_ddim_timesteps=2"]),
    (["--method", "progressive", "--lora-rank", "4"], ["lora_rank=4", "progressive"]),
    (["--method", "lcm", "--set", "student_prediction=sample"], ["student_prediction='sample'", "flash"]),
    (["--method", "add", "--set", "target_solver=dpmpp"], ["target_solver='dpmpp'", "flash"]),
    (["--teacher", "flow", "--set", "student_prediction=v_prediction"], ["student_prediction", "velocity"]),
    (["--set", "disc_type=projected", "--set", "disc_features=/no/such/dino"], ["disc_features", "/no/such/dino"]),
])
def test_distill_flags_and_sets_name_their_source(tmp_path, capsys, no_work, argv, words):
    out = tmp_path / "run"
    refused(capsys, ["distill", "--out", str(out), *argv], *words)
    assert not out.exists()


def test_distill_refuses_a_resolution_the_teachers_vae_cannot_take(tmp_path, capsys, no_work):
    teacher = tmp_path / "sd"
    (teacher / "vae").mkdir(parents=True)
    (teacher / "vae" / "config.json").write_text(json.dumps({"block_out_channels": [128, 256, 512, 512]}))
    refused(capsys, ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "r"), "--set", "resolution=100"],
            "resolution=100", "multiples of 8")


def test_timesteps_are_checked_against_the_teachers_T(tmp_path, capsys, no_work):
    teacher = tmp_path / "t"
    (teacher / "scheduler").mkdir(parents=True)
    (teacher / "scheduler" / "scheduler_config.json").write_text(json.dumps({"num_train_timesteps": 500}))
    argv = ["distill", "--teacher", str(teacher), "--out", str(tmp_path / "r")]
    refused(capsys, argv, "gamma_table=", "(default)", "[0, 500)")  # the default SRL table is for T = 1000
    refused(capsys, [*argv, "--set", "gamma_table=[[-1,200]]", "--set", "disc_t_max=600"], "disc_t_max=600", "[0, 500)")


def test_projected_backbone_offline_is_refused_before_loading(tmp_path, capsys, no_work):
    refused(capsys, ["distill", "--out", str(tmp_path / "r"), "--set", "disc_type=projected",
                     "--set", "disc_features=no/such-dino"], "disc_features", "no/such-dino")


# ----------------------------------------------------------------------------------------------- sample, evaluate

@pytest.mark.parametrize("argv,words", [
    (["--num-images", "0"], ["num_images=0", "--num-images"]),
    (["--num-images", "-2"], ["num_images=-2"]),
    (["--steps", "0"], ["steps=0", "--steps"]),
    (["--steps", "-1"], ["steps=-1"]),
    (["--guidance-scale", "nan"], ["guidance_scale=nan", "finite"]),
    (["--guidance-scale", "inf"], ["guidance_scale=inf", "finite"]),
    (["--guidance-scale", "-3"], ["guidance_scale=-3.0"]),
    (["--seed", "-1"], ["seed=-1"]),
    (["--scale", "0"], ["scale=0"]),
])
def test_sample_refuses_bad_numbers(tmp_path, capsys, no_work, argv, words):
    out = tmp_path / "g.png"
    refused(capsys, ["sample", "--prompt", "a red sneaker", "--out", str(out), *argv], *words)
    assert not out.exists()


@pytest.mark.parametrize("command,extra", [("sample", ["--prompt", "x"]), ("evaluate", [])])
def test_output_paths_that_are_folders_or_have_the_wrong_extension(tmp_path, capsys, no_work, command, extra):
    good = ".png" if command == "sample" else ".json"
    refused(capsys, [command, *extra, "--out", str(tmp_path)], "is a folder")
    refused(capsys, [command, *extra, "--out", str(tmp_path / "x.jpg")], f"expected a {good} file")
    (tmp_path / "f").write_text("")
    refused(capsys, [command, *extra, "--out", str(tmp_path / "f" / f"x{good}")], "is a file, not a folder")


@pytest.mark.parametrize("argv,words", [
    (["--num-samples", "0"], ["num_samples=0"]),
    (["--num-samples", "1"], ["num_samples=1", ">= 2"]),
    (["--fid-reference", "-5"], ["fid_reference=-5"]),
    (["--batch", "0"], ["batch=0"]),
    (["--threads", "-1"], ["threads=-1"]),
    (["--steps", "0"], ["steps=0"]),
    (["--guidance-scale=-inf"], ["guidance_scale=-inf", "finite"]),
    (["--clip-model", "/no/such/clip"], ["--clip-model", "no such folder"]),
    (["--clip-model", "no/such-clip"], ["--clip-model", "no/such-clip"]),  # HF_HUB_OFFLINE=1 (conftest)
])
def test_evaluate_refuses_bad_input_before_generating(tmp_path, capsys, no_work, argv, words):
    out = tmp_path / "m.json"
    refused(capsys, ["evaluate", "--out", str(out), *argv], *words)
    assert not out.exists()


def test_evaluate_missing_fid_package_is_refused_up_front(tmp_path, capsys, no_work, monkeypatch):
    import importlib.util
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda m, *a: None if m == "cleanfid" else real(m, *a))
    refused(capsys, ["evaluate", "--out", str(tmp_path / "m.json"), "--standard-fid", "clean-fid"],
            "--standard-fid clean-fid", "cleanfid")


def test_evaluate_writes_its_metrics_before_an_optional_one_fails(tmp_path, capsys, monkeypatch):
    import torch

    import imagine_flash.eval.metrics
    from imagine_flash.eval import extras

    runner = SimpleNamespace(is_student=False, sampler="dpmpp", meta={}, default_steps=lambda: 25, resolution=16)
    monkeypatch.setattr(imagine_flash.generate, "ModelRunner", lambda *a, **k: runner)
    monkeypatch.setattr(imagine_flash.eval.metrics, "evaluate_model",
                        lambda *a, **k: ({"fid": 12.5}, torch.zeros(2, 3, 16, 16)))
    monkeypatch.setattr(validation, "check_pretrained", lambda *a: None)  # resolvable up front, fails when loaded

    def no_clip(*a, **k):
        raise extras.ExtraUnavailable("CLIP model 'c' is not available")
    monkeypatch.setattr(extras, "clip_score", no_clip)
    out = tmp_path / "m.json"
    refused(capsys, ["evaluate", "--num-samples", "2", "--clip-model", "c", "--out", str(out)], "not available",
            str(out))
    assert json.loads(out.read_text())["fid"] == 12.5


def _runner(sampler, n=3):
    return SimpleNamespace(is_student=True, sampler=sampler, meta={"timesteps": [999, 750, 500][:n]},
                           default_steps=lambda: n)


def test_ignored_options_say_so(capsys):
    args = SimpleNamespace(command="sample", steps=5, no_noise_correction=False)
    assert _honoured_steps(args, _runner("flash"), None) is None
    assert "--steps 5 is ignored" in capsys.readouterr().err
    assert _honoured_steps(args, _runner("lcm"), None) == 5  # LCM samples at any step count
    assert _honoured_steps(args, _runner("flash"), "dpmpp") == 5  # another solver on the student honours it
    args = SimpleNamespace(command="evaluate", steps=3, no_noise_correction=True)
    assert _honoured_steps(args, _runner("flash"), None) == 3 and capsys.readouterr().err == ""
    assert _honoured_steps(args, _runner("lcm"), None) == 3
    assert "--no-noise-correction is ignored" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------- abbreviations

@pytest.mark.parametrize("argv", [
    ["distill", "--max-step", "3", "--dry-run"],
    ["distill", "--eval", "0", "--dry-run"],
    ["pretrain", "--max", "3", "--dry-run"],
    ["sample", "--prompt", "x", "--out", "x.png", "--num", "2"],
    ["evaluate", "--out", "m.json", "--num-sample", "2"],
    ["benchmark", "--out", "b", "--quic"],
])
def test_long_options_are_not_abbreviated(capsys, no_work, argv):
    with pytest.raises(SystemExit) as e:
        main(argv)
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.count("\n") == 1 and "unrecognized arguments" in err


def test_validate_messages_name_the_default_source():
    cfg = DistillConfig(k=0)
    with pytest.raises(Exception, match=r"k=0 \(default\)"):
        validation.validate(cfg)
    assert validation.teacher_facts(None) == (1000, 1, False)  # the shipped pixel teacher
