"""Tiny end-to-end runs of the training loop and the CLI: resume equality, bad input, NaN stop, metrics."""
import dataclasses
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from imagine_flash.checkpoint import latest
from imagine_flash.cli import main
from imagine_flash.config import DistillConfig
from imagine_flash.data.fashion import ColoredFashion

from conftest import assert_same_checkpoints, needs_data, needs_inception


@pytest.fixture(scope="module")
def small_data():
    return ColoredFashion("train", 16, limit=256)


def _cfg(out, teacher, **kw):
    base = dict(out=str(out), teacher=str(teacher), batch_size=4, k=2, max_steps=4, ckpt_every=2, sample_every=100,
                log_every=1, eval_samples=0, adv_weight=0.1)
    base.update(kw)
    return DistillConfig(**base)


@needs_data
@pytest.mark.parametrize("optimizer", ["adam", "adam8bit"])
@pytest.mark.slow
def test_resume_equals_uninterrupted_run(tmp_path, tiny_teacher, small_data, optimizer):
    from imagine_flash.train import distill

    if optimizer == "adam8bit":
        pytest.importorskip("bitsandbytes")
    distill(_cfg(tmp_path / "a", tiny_teacher, optimizer=optimizer), dataset=small_data)
    # Interrupted after 2 steps (the checkpoint at step 2), then resumed to 4.
    distill(_cfg(tmp_path / "b", tiny_teacher, max_steps=2, optimizer=optimizer), dataset=small_data)
    distill(_cfg(tmp_path / "b", tiny_teacher, optimizer=optimizer), resume=True, dataset=small_data)
    assert_same_checkpoints(tmp_path / "a", tmp_path / "b")
    st = torch.load(latest(tmp_path / "a") / "state.pt", weights_only=True)["opts"]["g"]["state"]
    if optimizer == "adam8bit":  # bitsandbytes keeps 8-bit moments for tensors of >= 4096 entries
        quant = [v["__bnb_optimizer_quant_state__"] for v in st.values()]
        assert any(q["state1"].dtype == torch.uint8 for q in quant)
    else:
        assert all("exp_avg" in v for v in st.values())
    # And training changed the student away from the teacher.
    t = load_file(next((tiny_teacher / "unet").glob("*.safetensors")))
    s = load_file(latest(tmp_path / "a") / "student.safetensors")
    assert any(not torch.equal(t[k].float(), s[k]) for k in t)


@needs_data
@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, tiny_teacher, small_data, monkeypatch):
    from imagine_flash import train
    from imagine_flash.train import NonFiniteLoss, distill

    distill(_cfg(tmp_path / "r", tiny_teacher, max_steps=2), dataset=small_data)
    good = load_file(latest(tmp_path / "r") / "student.safetensors")
    real_step = train.generator_step

    def nan_step(*a, **kw):  # a loss that turns NaN, as a diverging run's would
        total, parts, x0, w = real_step(*a, **kw)
        return total * float("nan"), parts, x0, w

    monkeypatch.setattr(train, "generator_step", nan_step)
    with pytest.raises(NonFiniteLoss, match="last good checkpoint"):
        distill(_cfg(tmp_path / "r", tiny_teacher, log_every=5), resume=True, dataset=small_data)
    after = load_file(latest(tmp_path / "r") / "student.safetensors")
    assert all(torch.equal(good[k], after[k]) for k in good)
    assert json.loads((latest(tmp_path / "r") / "step.json").read_text())["step"] == 2


def test_cli_bad_input_is_one_line(tmp_path, capsys):
    assert main(["distill", "--teacher", str(tmp_path), "--eval-samples", "0"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "not a model folder" in err
    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: [1\n")
    assert main(["distill", "--config", str(bad), "--dry-run"]) == 2
    assert "malformed YAML" in capsys.readouterr().err
    assert main(["distill", "--set", "no_such_key=1", "--dry-run"]) == 2
    assert "unknown option 'no_such_key'" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:  # argparse exits (in-process: the same parser `python -m` runs)
        main(["distill", "--bogus"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.strip().count("\n") == 0 and "--bogus" in err


def test_cli_rejects_non_eps_teacher(tmp_path, tiny_teacher, capsys):
    import shutil

    t = tmp_path / "vteacher"
    shutil.copytree(tiny_teacher, t)
    cfg_f = t / "scheduler" / "scheduler_config.json"
    cfg = json.loads(cfg_f.read_text())
    cfg["prediction_type"] = "v_prediction"
    cfg_f.write_text(json.dumps(cfg))
    assert main(["distill", "--teacher", str(t), "--eval-samples", "0", "--out", str(tmp_path / "o")]) == 2
    assert "epsilon" in capsys.readouterr().err


@needs_data
@needs_inception
@pytest.mark.slow
def test_cli_distill_end_to_end(tmp_path, tiny_teacher, monkeypatch):
    """Two student updates through the CLI, then metrics.json, the comparison grid and a sample from the student."""
    monkeypatch.setenv("IMAGINE_FLASH_CACHE", str(tmp_path / "cache"))
    teacher = tmp_path / "teacher"  # a card that gives flash's targets their own CFG scale (as the shipped one does)
    shutil.copytree(tiny_teacher, teacher)
    card = json.loads((teacher / "imagine_flash.json").read_text())
    (teacher / "imagine_flash.json").write_text(json.dumps({**card, "distill_guidance_scale": {"flash": 2.5}}))
    assert card.get("guidance_scale", 3.0) != 2.5
    out = tmp_path / "run"
    rc = main(["distill", "--teacher", str(teacher), "--out", str(out), "--max-steps", "2", "--eval-samples", "8",
               "--student-steps", "2", "--set", "batch_size=4", "--set", "k=2", "--set", "fid_reference=16",
               "--set", "eval_batch=8", "--set", "sample_every=2"])
    assert rc == 0
    m = json.loads((out / "metrics.json").read_text())
    for row in ("student", "teacher"):
        for key in ("fid", "kid", "fid_indomain", "color_acc", "class_acc", "mean_shift", "std_ratio", "hf_ratio",
                    "precision", "recall", "ms_per_image", "nfe"):
            assert isinstance(m[row][key], (int, float)), (row, key)
    assert m["student"]["steps"] == 2 and m["student"]["nfe"] == 2
    assert m["teacher"]["steps"] == 25 and m["teacher"]["nfe"] == 50
    assert (out / "comparison.png").is_file() and (out / "samples" / "step000002.png").is_file()
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["student_steps"] == 2 and cfg["max_steps"] == 2
    assert cfg["guidance_scale"] == m["teacher"]["guidance_scale"] == 2.5  # the card's; the teacher row at it
    from imagine_flash.pipelines import resolve_dtype  # train.json records what teacher_dtype=auto became here
    assert json.loads((out / "train.json").read_text())["teacher_dtype"] == str(resolve_dtype("auto", "cpu"))[6:]
    # The student loads with the sample command, and the same seed gives identical PNG bytes.
    for name in ("a.png", "b.png"):
        assert main(["sample", "--model", str(out / "student"), "--prompt", "a red sneaker", "--num-images", "2",
                     "--seed", "3", "--out", str(tmp_path / name)]) == 0
    assert (tmp_path / "a.png").read_bytes() == (tmp_path / "b.png").read_bytes()
    sched = json.loads((out / "student" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlashScheduler" and sched["timesteps"] == [999, 666]
    # The teacher row is cached: a second evaluation of the same protocol reads it (timing it anew, on one batch),
    # with the same numbers and grid; another protocol (the teacher at 5 steps) measures it again.
    from imagine_flash.eval.metrics import evaluate_run
    from imagine_flash.runs import saved_config
    assert "cached" not in m["teacher"]
    again = evaluate_run(saved_config(DistillConfig, out), out / "student")
    assert again["teacher"]["cached"] and again["teacher"]["ms_per_image"] > 0
    assert {k: v for k, v in again["teacher"].items() if k not in ("cached", "ms_per_image")} == \
        {k: v for k, v in m["teacher"].items() if k != "ms_per_image"}
    assert again["student"]["fid"] == m["student"]["fid"]
    other = evaluate_run(dataclasses.replace(saved_config(DistillConfig, out), eval_teacher_steps=5), out / "student")
    assert "cached" not in other["teacher"] and other["teacher"]["steps"] == 5


@needs_data
@pytest.mark.slow
def test_cli_pretrain_tiny_run_and_resume(tmp_path):
    out = tmp_path / "t"
    args = ["pretrain", "--out", str(out), "--max-steps", "2", "--set", "variant=micro", "--set", "batch_size=8",
            "--set", "ckpt_every=1", "--set", "sample_every=4"]  # one grid, at the end
    assert main(args) == 0
    assert main(args[:4] + ["4"] + args[5:] + ["--resume"]) == 0
    assert json.loads((latest(out) / "step.json").read_text())["step"] == 4
    assert (out / "model" / "unet" / "config.json").is_file() and (out / "samples" / "step0000004.png").is_file()


def test_failed_checkpoint_write_keeps_previous(tmp_path, monkeypatch):
    """A write that dies half-way (a full disk, a kill) leaves the previous 'ckpt' complete and loadable."""
    import safetensors.torch

    from imagine_flash import checkpoint

    net, opt = torch.nn.Linear(2, 2), None
    opt = torch.optim.Adam(net.parameters())
    checkpoint.save_checkpoint(tmp_path, 1, {"student": net}, {"g": (net, opt)}, {})
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with torch.no_grad():
        net.weight.add_(1.0)
    calls = {"n": 0}
    real = safetensors.torch.save_file

    def dying_save(*a, **kw):
        calls["n"] += 1
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(safetensors.torch, "save_file", dying_save)
    with pytest.raises(OSError):
        checkpoint.save_checkpoint(tmp_path, 2, {"student": net}, {"g": (net, opt)}, {})
    monkeypatch.setattr(safetensors.torch, "save_file", real)
    fresh = torch.nn.Linear(2, 2)
    step = checkpoint.load_checkpoint(tmp_path, {"student": fresh}, {"g": (fresh, torch.optim.Adam(fresh.parameters()))})
    assert step == 1 and calls["n"] == 1
    assert all(torch.equal(fresh.state_dict()[k], before[k]) for k in before)


@needs_data
@pytest.mark.slow
def test_grad_accumulation_equals_the_full_batch(tmp_path, tiny_teacher, small_data):
    """batch 4 in 2 micro-batches of 2 gives the update of batch 4 at once: same rows, same draws per sample."""
    from imagine_flash.train import distill

    # The teacher in fp32: a bf16 teacher (`auto` on CPUs with native bf16) rounds differently at batch 2 and 4, and
    # Eq. 7's target (the default's last step) carries that into the update (1.4e-4 here against 1.4e-5 in fp32).
    distill(_cfg(tmp_path / "full", tiny_teacher, max_steps=2, teacher_dtype="fp32"), dataset=small_data)
    distill(_cfg(tmp_path / "accum", tiny_teacher, max_steps=2, grad_accum=2, teacher_dtype="fp32"),
            dataset=small_data)
    for name in ("student", "disc"):
        a = load_file(latest(tmp_path / "full") / f"{name}.safetensors")
        b = load_file(latest(tmp_path / "accum") / f"{name}.safetensors")
        moved = 0
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=1e-4, atol=2e-5)
        init = load_file(latest(tmp_path / "full") / "ema.safetensors") if name == "student" else None
        if init is not None:
            moved = sum(int(not torch.equal(a[k], init[k])) for k in a)
            assert moved > 0  # the student did change, so equality is not trivial


def test_generator_step_leaves_the_discriminator_gradients_alone():
    """The adversarial generator term trains the student only: the discriminator gets no gradient from it."""
    from imagine_flash.denoisers import Denoiser
    from imagine_flash.losses.discriminator import HingeAdversarial
    from imagine_flash.schedule import make_schedule
    from imagine_flash.losses import Models
    from imagine_flash.train import generator_step

    S = make_schedule()
    disc = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 1))
    disc_fn = lambda x, t, c: disc(x).squeeze(1)  # noqa: E731
    w = torch.nn.Parameter(torch.tensor(0.5))
    student = Denoiser(lambda x, t, c: w * x, S)

    class Method:
        def __call__(self, models, x0, cond, gen):
            x0_hat = models.student(x0, torch.full((x0.shape[0],), 500), cond)
            return {"x0_student": x0_hat}

    class DiscModule(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.d = disc

        def forward(self, x, t, c):
            return disc_fn(x, t, c)

    m = Models(student=student, rollout=student, teacher=student, ema=None, schedule=S, disc=DiscModule())
    loss, _, _, _ = generator_step(Method(), m, torch.randn(2, 3, 2, 2), None, torch.Generator().manual_seed(0),
                                HingeAdversarial(S), 1.0)
    loss.backward()
    assert w.grad is not None and w.grad != 0
    assert all(p.grad is None for p in disc.parameters())
    assert all(p.requires_grad for p in disc.parameters())  # restored afterwards


@needs_data
@pytest.mark.slow
def test_projected_discriminator_trains_heads_on_a_frozen_backbone(tmp_path, tiny_teacher, small_data):
    """disc_type=projected with a tiny local DINOv2: the heads learn, the feature network never changes."""
    from transformers import Dinov2Config, Dinov2Model

    from imagine_flash.train import distill

    torch.manual_seed(0)
    Dinov2Model(Dinov2Config(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                             image_size=32, patch_size=8)).save_pretrained(tmp_path / "dino", safe_serialization=True)
    distill(_cfg(tmp_path / "run", tiny_teacher, max_steps=2, disc_type="projected",
                 disc_features=str(tmp_path / "dino")), dataset=small_data)
    disc = load_file(latest(tmp_path / "run") / "disc.safetensors")
    dino = Dinov2Model.from_pretrained(tmp_path / "dino").state_dict()
    for k, v in dino.items():
        assert torch.equal(disc[f"features.{k}"], v), k
    torch.manual_seed(0)
    fresh = __import__("imagine_flash.losses.projected", fromlist=["x"]).ProjectedDiscriminator(
        Dinov2Model.from_pretrained(tmp_path / "dino"), 384)
    changed = [k for k, v in fresh.state_dict().items() if k.startswith("heads.") and k.endswith("weight.original")
               and not torch.equal(v, disc[k])]
    assert changed  # the heads trained


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("adv_step_weights", [None, (0.0, 0.0, 3.0)])
def test_frozen_unet_discriminator_trains_only_its_heads(tmp_path, tiny_teacher, small_data, adv_step_weights):
    """disc_type=unet-frozen: after two updates the encoder is still the teacher's, the heads have learned (also
    when the discriminator sees the last student step's samples only)."""
    from imagine_flash.train import distill

    distill(_cfg(tmp_path / "run", tiny_teacher, max_steps=2, disc_type="unet-frozen",
                 adv_step_weights=adv_step_weights, batch_size=8), dataset=small_data)
    disc = load_file(latest(tmp_path / "run") / "disc.safetensors")
    teacher = load_file(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    enc = {k[4:]: v for k, v in disc.items() if k.startswith("enc.")}
    assert enc and all(torch.equal(v, teacher[k].float()) for k, v in enc.items())
    torch.manual_seed(0)  # the heads' init: the run's seed
    from imagine_flash.losses.discriminator import UNetEncoderDiscriminator
    from imagine_flash.models import build_unet
    fresh = UNetEncoderDiscriminator(build_unet("micro", 16), frozen_trunk=True).heads.state_dict()
    assert any(not torch.equal(v, disc[f"heads.{k}"]) for k, v in fresh.items())  # the heads trained


def test_projected_discriminator_missing_backbone_is_one_line(tmp_path, tiny_teacher, capsys):
    rc = main(["distill", "--teacher", str(tiny_teacher), "--max-steps", "1", "--eval-samples", "0",
               "--out", str(tmp_path / "r"), "--set", "disc_type=projected", "--set", "disc_features=no/such-dino",
               "--set", "batch_size=2", "--set", "k=1"])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.startswith("imagine-flash")]
    assert rc == 2 and len(err) == 1 and "no/such-dino" in err[0]


@needs_data
@pytest.mark.slow
def test_bf16_mixed_precision_runs_on_cpu(tmp_path, tiny_teacher, small_data):
    """--set mixed_precision=bf16: autocast through accelerate; the student stays float32 and finite."""
    from accelerate.state import AcceleratorState

    from imagine_flash.train import distill

    AcceleratorState._reset_state()  # earlier tests in this process set up accelerate without mixed precision
    try:
        distill(_cfg(tmp_path / "bf16", tiny_teacher, max_steps=2, mixed_precision="bf16"), dataset=small_data)
    finally:
        AcceleratorState._reset_state()
    student = load_file(latest(tmp_path / "bf16") / "student.safetensors")
    init = load_file(latest(tmp_path / "bf16") / "ema.safetensors")
    assert all(v.dtype == torch.float32 and torch.isfinite(v).all() for v in student.values())
    assert any(not torch.equal(student[k], init[k]) for k in student)


def test_index_keyed_optimizer_state_still_resumes(tmp_path):
    """A checkpoint whose optimiser state is keyed by index (earlier versions) loads into the by-name format."""
    from imagine_flash import checkpoint

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    net[0].requires_grad_(False)  # index i is the i-th *trainable* parameter
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    net(torch.randn(5, 3)).square().mean().backward()
    opt.step()
    checkpoint.save_checkpoint(tmp_path, 1, {"student": net}, {}, {})
    st = torch.load(latest(tmp_path) / "state.pt", weights_only=True)
    st["opts"] = {"g": opt.state_dict()}  # the old format
    torch.save(st, latest(tmp_path) / "state.pt")
    fresh = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    fresh[0].requires_grad_(False)
    opt2 = torch.optim.Adam([p for p in fresh.parameters() if p.requires_grad], lr=1e-2)
    assert checkpoint.load_checkpoint(tmp_path, {"student": fresh}, {"g": (fresh, opt2)}) == 1
    for a, b in zip(opt.state_dict()["state"].values(), opt2.state_dict()["state"].values(), strict=True):
        assert torch.equal(a["exp_avg"], b["exp_avg"]) and torch.equal(a["exp_avg_sq"], b["exp_avg_sq"])


def test_shipped_config_presets_resolve(capsys):
    """Every YAML preset in configs/ (not accelerate's own files) is a valid distill config."""
    from pathlib import Path

    from imagine_flash.cli import main

    presets = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))
    assert presets
    for p in presets:
        assert main(["distill", "--config", str(p), "--dry-run"]) == 0, p
    assert '"student_timesteps": [\n    999,\n    666,\n    333\n  ]' in capsys.readouterr().out


def test_a_variant_never_overrides_an_explicit_setting(capsys):
    """Presets: user > variant > method defaults > defaults; an explicit setting the variant contradicts is an
    error in one line (it used to be overwritten silently), one that agrees is fine."""
    from imagine_flash.config import ConfigError, apply_method_defaults, resolve_variant

    assert main(["distill", "--variant", "no-disc", "--set", "adv_weight=0.1", "--dry-run"]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "no-disc" in err and "adv_weight=0.1" in err
    assert main(["distill", "--variant", "no-disc", "--set", "adv_weight=0", "--dry-run"]) == 0
    capsys.readouterr()
    assert main(["distill", "--method", "add", "--variant", "no-disc", "--dry-run"]) == 0  # over a method default
    assert json.loads(capsys.readouterr().out)["adv_weight"] == 0.0
    with pytest.raises(ConfigError, match="no-disc"):  # Python: a field off its method default counts as set
        resolve_variant(DistillConfig(variant="no-disc", adv_weight=0.1))
    assert resolve_variant(apply_method_defaults(DistillConfig(method="add", variant="no-disc"))).adv_weight == 0.0
    cfg = DistillConfig(variant="no-backward")
    assert resolve_variant(cfg).backward is False and cfg.backward is True  # a copy: the input is not changed


@needs_data
@pytest.mark.slow
def test_one_flash_step_golden_numbers(tmp_path, tiny_teacher, small_data):
    """One update of flash with the paper's timesteps and gamma table (configs/paper.yaml; adversarial term on) from the
    seeded micro teacher: its losses and the student's weight change equal numbers recorded once (diffusers'
    scheduler test_full_loop style).

    Recorded on 2026-12-01 at commit 3e62333 (torch CPU, 1 and 2 threads agree to 1e-7) by running this very config
    and printing log.csv and the sums of (student after - teacher) over all tensors. A change here means the
    training step itself changed (targets, weighting, RNG use, optimiser): if intended, record the numbers again.
    The teacher runs in fp32: `auto` is bf16 on CPUs with native bf16, which rounds differently."""
    import csv

    from imagine_flash.train import distill

    paper = {"student_timesteps": (999, 750, 500), "gamma_table": ((900, 990), (500, 950), (-1, 200)),
             "reconstruction": "srl"}
    distill(_cfg(tmp_path / "r", tiny_teacher, max_steps=1, ckpt_every=1, teacher_dtype="fp32", **paper),
            dataset=small_data)
    row = next(csv.DictReader(open(tmp_path / "r" / "log.csv")))
    got = {k: float(row[k]) for k in ("loss", "recon", "adv_g", "disc")}
    want = {"loss": 51.858822, "recon": 51.883713, "adv_g": -0.248922, "disc": 2.023017}
    for k, v in want.items():
        assert got[k] == pytest.approx(v, rel=1e-5), (k, got[k])
    after = load_file(latest(tmp_path / "r") / "student.safetensors")
    init = load_file(tiny_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    delta = [after[k].double() - init[k].double() for k in init]
    assert sum(d.abs().sum().item() for d in delta) == pytest.approx(34.170146, rel=1e-4)
    # Signed: a sign flip of one tiny gradient moves it by about 2 lr, hence the absolute tolerance.
    assert sum(d.sum().item() for d in delta) == pytest.approx(-0.0244643, abs=1e-3)


@needs_data
@pytest.mark.slow
def test_x0_student_trains_exports_and_samples_as_trained(tmp_path, tiny_teacher, capsys):
    """student_prediction=sample: the student's network outputs x0_hat. Its folder says so (FlashScheduler's
    prediction_type and imagine_flash.json), `sample` loads it, the runner samples exactly the flash sampler over an
    x0 Denoiser, and it is refused as a teacher (its network predicts x0, not eps)."""
    from imagine_flash.denoisers import Denoiser
    from imagine_flash.generate import ModelRunner
    from imagine_flash.sampling import flash_sample

    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(tiny_teacher), "--out", str(out), "--max-steps", "2",
                 "--eval-samples", "0", "--student-steps", "1", "--set", "student_prediction=sample",
                 "--set", "batch_size=4", "--set", "k=2"]) == 0
    student = out / "student"
    sched = json.loads((student / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlashScheduler" and sched["prediction_type"] == "sample"
    assert json.loads((student / "imagine_flash.json").read_text())["prediction_type"] == "sample"
    runner = ModelRunner(student)
    images, _ = runner.sample(["a red sneaker", "a blue bag"], [3, 4])
    x_T = runner.noise([3, 4])
    x0 = flash_sample(Denoiser(runner.unet, runner.schedule, "sample"), x_T, runner.text(["a red sneaker",
                      "a blue bag"]), [999], runner.schedule)
    torch.testing.assert_close(images, runner.encoder.decode(x0))
    # one step at t = 999: the image is the network's own output there, not (x_T - sigma eps) / alpha
    from imagine_flash.denoisers import _call_net
    with torch.no_grad():
        raw = _call_net(runner.unet, x_T, torch.tensor([999, 999]), runner.text(["a red sneaker", "a blue bag"]))
    torch.testing.assert_close(x0, raw)
    assert main(["sample", "--model", str(student), "--prompt", "a red sneaker", "--out", str(tmp_path / "a.png")]) == 0
    capsys.readouterr()
    assert main(["distill", "--teacher", str(student), "--out", str(tmp_path / "o"), "--eval-samples", "0"]) == 2
    err = capsys.readouterr().err
    assert "predicts sample" in err and "epsilon" in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()  # refused before the run folder or any model
