"""The baselines as losses of the one loop (LCM, ADD, progressive): their math against hand computation and
diffusers, and tiny end-to-end runs (train, export, sample with the method's own sampler, resume)."""
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from imagine_flash.checkpoint import latest
from imagine_flash.config import DistillConfig, apply_method_defaults
from imagine_flash.denoisers import Cond, Denoiser
from imagine_flash.losses.add import ADDLoss
from imagine_flash.losses.lcm import LCMLoss, consistency_output, lcm_timesteps
from imagine_flash.losses.progressive import ProgressiveLoss, two_step_target
from imagine_flash.rng import Shard, randn
from imagine_flash.schedule import consistency_scalings, ddim_step, make_schedule, trailing_timesteps
from imagine_flash.losses import Models

from conftest import assert_same_checkpoints, needs_data

S = make_schedule()
abar = S.alphas_cumprod


def cond_of(B):
    return Cond(torch.zeros(B, 2, 4), torch.ones(B, 2, dtype=torch.bool))


def models(student, teacher, ema=None):
    return Models(student=student, rollout=student, teacher=teacher, ema=ema, schedule=S, disc=None)


def test_trailing_timesteps_match_diffusers():
    from diffusers import DDIMScheduler

    for n in (1, 2, 3, 4, 8):
        d = DDIMScheduler(timestep_spacing="trailing")
        d.set_timesteps(n)
        assert trailing_timesteps(n) == d.timesteps.tolist()
    assert trailing_timesteps(4) == [999, 749, 499, 249]


def test_consistency_scalings_match_lcm_scheduler():
    from diffusers import LCMScheduler

    sched = LCMScheduler()
    for t in (0, 1, 19, 259, 999):
        c_skip, c_out = sched.get_scalings_for_boundary_condition_discrete(t)
        cs, co = consistency_scalings(torch.tensor([t]))
        assert float(cs) == pytest.approx(c_skip, rel=1e-6) and float(co) == pytest.approx(c_out, rel=1e-6)
    assert lcm_timesteps(1) == [999] and lcm_timesteps(2) == [999, 499]


def test_lcm_loss_against_hand_computation():
    """Linear nets eps = c x: the whole LCM target can be written out by hand."""
    B, cs, ct, ce = 16, 0.3, 0.6, 0.1
    x0 = torch.randn(B, 3, 2, 2, generator=torch.Generator().manual_seed(3))
    loss = LCMLoss(S, num_ddim_timesteps=50)
    out = loss(models(Denoiser(lambda x, t, c: cs * x, S), Denoiser(lambda x, t, c: ct * x, S),
                      Denoiser(lambda x, t, c: ce * x, S)), x0, cond_of(B), torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    idx = torch.randint(0, 50, (B,), generator=g)
    eps = torch.randn(x0.shape, generator=g)
    for b in range(B):
        t = 20 * int(idx[b]) + 19
        tp = max(t - 20, 0)
        a, s = math.sqrt(abar[t]), math.sqrt(1 - abar[t])
        ap, sp = math.sqrt(abar[tp]), math.sqrt(1 - abar[tp])
        x = a * x0[b].double() + s * eps[b].double()
        f = lambda x, t, c: _f(x, t, c)  # noqa: E731
        student = f(x, t, cs)
        x0_t = (x - s * ct * x) / a
        x_prev = ap * x0_t + sp * ct * x
        target = f(x_prev, tp, ce)
        want = (student - target).square().mean()
        assert float(out["recon"][b]) == pytest.approx(float(want), rel=1e-4)


def _f(x, t, c):
    """LCM's f(x, t) = c_skip x + c_out x0_hat for a net eps = c x, in float64."""
    st = 10.0 * t
    c_skip, c_out = 0.25 / (st ** 2 + 0.25), st / math.sqrt(st ** 2 + 0.25)
    a, s = math.sqrt(abar[t]), math.sqrt(1 - abar[t])
    return c_skip * x + c_out * (x - s * c * x) / a


def test_consistency_output_is_lcm_scheduler_denoised():
    """Our f(x, t) equals what LCMScheduler.step computes as `denoised` for the same eps prediction."""
    from diffusers import LCMScheduler

    sched = LCMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False)
    sched.set_timesteps(timesteps=[999, 499])
    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    eps = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(1))
    out = sched.step(eps, 999, x)
    torch.testing.assert_close(consistency_output(x, eps, torch.tensor([999, 999]), S), out.denoised,
                               rtol=1e-4, atol=1e-5)


def test_add_loss_weighting_and_forward_noised_input():
    B, cs, ce = 8, 0.2, 0.5
    x0 = torch.randn(B, 3, 2, 2, generator=torch.Generator().manual_seed(5))
    loss = ADDLoss(S, [999, 749, 499, 249])
    out = loss(models(Denoiser(lambda x, t, c: cs * x, S), Denoiser(lambda x, t, c: ce * x, S)), x0, cond_of(B),
               torch.Generator().manual_seed(0))
    g = torch.Generator().manual_seed(0)
    i = torch.randint(0, 4, (B,), generator=g)
    e1 = torch.randn(x0.shape, generator=g)
    t = torch.randint(0, 1000, (B,), generator=g)
    e2 = torch.randn(x0.shape, generator=g)
    for b in range(B):
        ts = [999, 749, 499, 249][int(i[b])]
        a, s = math.sqrt(abar[ts]), math.sqrt(1 - abar[ts])
        x = a * x0[b].double() + s * e1[b].double()  # forward-noised real data: ADD's student input
        x0_hat = (x - s * cs * x) / a
        tt = int(t[b])
        at, st = math.sqrt(abar[tt]), math.sqrt(1 - abar[tt])
        xt = at * x0_hat + st * e2[b].double()
        target = (xt - st * ce * xt) / at
        want = abar[tt] * (x0_hat - target).square().mean()
        assert float(out["recon"][b]) == pytest.approx(float(want), rel=1e-4, abs=1e-7)


def test_two_step_target_makes_one_ddim_step_land_on_the_teacher():
    z_t = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    z_t2 = torch.randn(4, 3, 2, 2, dtype=torch.float64)
    t, t2 = torch.tensor([999, 749, 499, 249]), torch.tensor([749, 499, 249, -1])
    x = two_step_target(z_t, t, z_t2, t2, S)
    a, s = S.alpha(t).view(-1, 1, 1, 1), S.sigma(t).view(-1, 1, 1, 1)
    eps = (z_t - a * x) / s  # the eps that goes with x0 = x at t
    torch.testing.assert_close(ddim_step(x, eps, S.alpha(t2), S.sigma(t2)), z_t2)
    torch.testing.assert_close(x[3], z_t2[3])  # to the clean end, the target is the teacher's result itself


def test_progressive_stages_halve_and_freeze_the_ema():
    net = torch.nn.Conv2d(3, 3, 1)
    loss = ProgressiveLoss(S, [999, 749, 499, 249], stages=3, max_steps=30, teacher_net=net)
    assert [len(loss.grid(s)) for s in range(3)] == [16, 8, 4]
    ema_net = torch.nn.Conv2d(3, 3, 1)
    m = models(None, Denoiser(net, S), Denoiser(ema_net, S))
    loss.begin_step(0, m)
    assert loss.stage == 0 and int(loss.state.stage) == 0
    loss.begin_step(10, m)
    assert loss.stage == 1
    torch.testing.assert_close(loss.state.net.weight, ema_net.weight)
    with torch.no_grad():
        ema_net.weight.add_(1)
    loss.begin_step(11, m)  # same stage: the frozen teacher does not follow the EMA
    assert not torch.equal(loss.state.net.weight, ema_net.weight)


def test_shard_draws_do_not_depend_on_the_process_count():
    full = randn((8, 3), Shard(torch.Generator().manual_seed(1), 0, 1))
    parts = [randn((4, 3), Shard(torch.Generator().manual_seed(1), r, 2)) for r in range(2)]
    torch.testing.assert_close(full[0::2], parts[0])
    torch.testing.assert_close(full[1::2], parts[1])


def test_method_defaults_do_not_override_the_user():
    cfg = apply_method_defaults(DistillConfig(method="add"))
    assert cfg.student_steps == 4 and cfg.adv_weight == 0.4
    cfg = apply_method_defaults(DistillConfig(method="add", adv_weight=0.1), {"adv_weight"})
    assert cfg.adv_weight == 0.1


def test_flash_trains_200_updates_by_default_and_the_user_and_presets_win():
    """flash's METHODS budget (its best measured, 200 updates) applies unless set; the other methods keep 600, and the
    presets of older results keep the 600 they were measured at."""
    from imagine_flash.config import load_yaml

    assert apply_method_defaults(DistillConfig()).max_steps == 200
    assert all(apply_method_defaults(DistillConfig(method=m)).max_steps == 600 for m in ("lcm", "add", "progressive"))
    assert apply_method_defaults(DistillConfig(max_steps=50), {"max_steps"}).max_steps == 50
    root = Path(__file__).resolve().parents[1]
    for preset in ("paper.yaml", "flash_16px.yaml", "flash_1step.yaml"):
        assert load_yaml(root / "configs" / preset)["max_steps"] == 600


def test_flash_defaults_to_a_matching_aware_discriminator_and_the_cards_target_cfg():
    """flash's METHODS default disc_mismatch = 1 (the others keep 0, the user wins); the targets' CFG is the teacher
    card's distill_guidance_scale for the method (the shipped card: flash 2.0), else the teacher's own; the presets of
    older results and the paper's keep 0 and CFG 3."""
    from imagine_flash.config import load_yaml
    from imagine_flash.models import read_meta
    from imagine_flash.train import target_guidance_scale

    assert apply_method_defaults(DistillConfig()).disc_mismatch == 1.0
    assert all(apply_method_defaults(DistillConfig(method=m)).disc_mismatch == 0 for m in ("lcm", "add", "progressive"))
    assert apply_method_defaults(DistillConfig(disc_mismatch=0.0), {"disc_mismatch"}).disc_mismatch == 0.0
    card = {"guidance_scale": 7.5, "distill_guidance_scale": {"flash": 4.0}}
    assert target_guidance_scale(card, "flash") == 4.0 and target_guidance_scale(card, "lcm") == 7.5
    assert target_guidance_scale({"guidance_scale": 5.0}, "flash") == 5.0
    shipped = read_meta(Path(__file__).resolve().parents[1] / "src" / "imagine_flash" / "assets" / "teacher")
    assert shipped["guidance_scale"] == 3.0 and target_guidance_scale(shipped, "flash") == 2.0
    assert target_guidance_scale(shipped, "lcm") == 3.0
    root = Path(__file__).resolve().parents[1]
    for preset in ("paper.yaml", "flash_16px.yaml", "flash_1step.yaml"):
        assert (load_yaml(root / "configs" / preset)["disc_mismatch"], load_yaml(root / "configs" / preset)[
            "guidance_scale"]) == (0.0, 3.0)


def test_the_benchmarks_one_step_flash_student_is_the_one_step_preset():
    """flash-1 in the benchmark trains configs/flash_1step.yaml's v-predicting student (at the protocol's budget); the
    other students take their method's defaults."""
    from imagine_flash.benchmark import STUDENTS, BenchmarkConfig, _student_config
    from imagine_flash.config import load_yaml

    preset = load_yaml(Path(__file__).resolve().parents[1] / "configs" / "flash_1step.yaml")
    spec = {key: rest for key, *rest in STUDENTS}
    cfg = BenchmarkConfig()
    one = _student_config(cfg, *spec["flash-1"], Path("unused"))
    assert (one.student_steps, one.student_prediction, one.max_steps) == (1, preset["student_prediction"], 600)
    three = _student_config(cfg, *spec["flash-3"], Path("unused"))
    assert (three.student_steps, three.student_prediction, three.max_steps) == (3, "teacher", 600)


@pytest.fixture(scope="module")
def small_data():
    from imagine_flash.data.fashion import ColoredFashion
    return ColoredFashion("train", 16, limit=64)


def _cfg(out, teacher, method, **kw):
    cfg = DistillConfig(method=method, out=str(out), teacher=str(teacher), batch_size=4, k=2, max_steps=6,
                        ckpt_every=2, sample_every=100, log_every=1, eval_samples=0, progressive_stages=3)
    cfg = apply_method_defaults(cfg)
    for k, v in kw.items():
        setattr(cfg, k, v)
    return cfg


@needs_data
@pytest.mark.parametrize("method", ["lcm", "add", "progressive"])
@pytest.mark.slow
def test_method_trains_exports_and_samples(tmp_path, tiny_teacher, small_data, method):
    from imagine_flash.generate import ModelRunner
    from imagine_flash.train import distill

    student = distill(_cfg(tmp_path / method, tiny_teacher, method), dataset=small_data)
    runner = ModelRunner(student)
    assert runner.sampler == {"lcm": "lcm", "add": "lcm", "progressive": "ddim"}[method]
    steps = {"lcm": 3, "add": 4, "progressive": 4}[method]
    assert len(runner.meta["timesteps"]) == steps
    a, _ = runner.sample(["a red sneaker"] * 2, [0, 1])
    b, _ = runner.sample(["a red sneaker"], [1])
    assert a.shape == (2, 3, 16, 16) and torch.isfinite(a).all()
    torch.testing.assert_close(a[1:], b, rtol=1e-4, atol=1e-4)  # sample i depends on seed i only, even with LCM noise
    if method == "lcm":  # LCM samples at any step count
        c, _ = runner.sample(["a red sneaker"], [0], steps=1)
        assert c.shape == (1, 3, 16, 16)


class _Killed(Exception):
    pass


@needs_data
@pytest.mark.slow
def test_progressive_resume_across_a_stage_boundary(tmp_path, tiny_teacher, small_data, monkeypatch):
    """Killed after step 2 (a checkpoint), resumed: the stage teacher frozen at step 2 is restored exactly."""
    from imagine_flash import train

    train.distill(_cfg(tmp_path / "a", tiny_teacher, "progressive"), dataset=small_data)
    real_save = train.save_checkpoint

    def save_then_die(run, step, *a, **k):
        real_save(run, step, *a, **k)
        if step == 2:
            raise _Killed

    monkeypatch.setattr(train, "save_checkpoint", save_then_die)
    with pytest.raises(_Killed):
        train.distill(_cfg(tmp_path / "b", tiny_teacher, "progressive"), dataset=small_data)
    monkeypatch.setattr(train, "save_checkpoint", real_save)
    train.distill(_cfg(tmp_path / "b", tiny_teacher, "progressive"), resume=True, dataset=small_data)
    assert_same_checkpoints(tmp_path / "a", tmp_path / "b", ("student", "ema", "stage_teacher"))
    assert int(load_file(latest(tmp_path / "a") / "stage_teacher.safetensors")["stage"]) == 2


@pytest.mark.parametrize("method", ["flash", "lcm", "add", "progressive"])
@pytest.mark.slow
def test_runner_samples_with_the_exported_scheduler_as_in_training(tmp_path, tiny_teacher, method):
    """ModelRunner on an exported student (scheduler/ as the run wrote it) samples exactly what the training-time
    sampler (Method.scheduler, the sample grids') does, for every method, with per-sample noise for LCM/ADD."""
    from imagine_flash.generate import ModelRunner
    from imagine_flash.losses import build_method, registry
    from imagine_flash.models import load_model_folder, save_student
    from imagine_flash.sampling import sample_generators, scheduler_sample, seeded_noise

    assert set(registry()) == {"flash", "lcm", "add", "progressive"}
    unet, sched_cfg, _ = load_model_folder(tiny_teacher)
    cfg = apply_method_defaults(DistillConfig(method=method))
    ts = type(build_method(cfg, make_schedule(**sched_cfg), [999], unet)).timesteps(cfg)
    m = build_method(cfg, make_schedule(**sched_cfg), ts, unet)
    save_student(tmp_path / "student", unet, sched_cfg, ts, m.scheduler(sched_cfg, ts),
                 {"kind": "imagine-flash student", **m.meta()})
    runner = ModelRunner(tmp_path / "student")
    prompts, seeds = ["a red sneaker", "a blue bag"], [3, 4]
    got, _ = runner.sample(prompts, seeds)
    x = scheduler_sample(Denoiser(runner.unet, make_schedule(**sched_cfg)), m.scheduler(sched_cfg, ts),
                         seeded_noise(seeds, (3, 16, 16)), runner.text(prompts), timesteps=ts,
                         generator=sample_generators(seeds))
    assert torch.equal(got, runner.encoder.decode(x))
    assert runner.sampler == m.sampler and len(runner.meta["timesteps"]) == len(ts)
