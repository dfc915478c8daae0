"""Flow-matching teachers (SD3, FLUX): the rectified-flow math against hand computation, noise correction as a
proven no-op, the rollout and SRL on sigmas, and tiny SD3 and FLUX pipelines (built here from configs, tokenizers
written locally) distilled, exported, reloaded with plain diffusers calls and sampled bit for bit as in training."""
import json
import string

import pytest
import torch
from safetensors.torch import load_file

from imagine_flash.cli import main
from imagine_flash.denoisers import Cond, Denoiser, pack_latents, unpack_latents
from imagine_flash.sampling import ddim_sample, flash_sample, rollout
from imagine_flash.schedule import (FlowSchedule, ddim_step, eps_from_flow, euler_step, flow_shift,
                                    noise_corrected_step, q_sample, x0_from_flow)

from conftest import assert_same_checkpoints, needs_data
from test_pipelines import PROMPTS, TinyData, _text_encoder, _tokenizer
from test_pipelines import _cfg as pipeline_cfg


# ------------------------------------------------------------------------------------------ tiny pipelines

def _t5_tokenizer():
    """A T5 (Unigram) tokenizer over single letters, built in memory (no hub)."""
    from transformers import T5Tokenizer

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in string.ascii_lowercase]
    return T5Tokenizer(vocab=vocab + [("\u2581", -1.0)], extra_ids=0, model_max_length=16)


def _t5():
    from transformers import T5Config, T5EncoderModel

    return T5EncoderModel(T5Config(vocab_size=32, d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
                                   relative_attention_num_buckets=8, decoder_start_token_id=0)).eval()


def _vae():
    from diffusers import AutoencoderKL

    return AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                         up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                         sample_size=16, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609,
                         scaling_factor=1.5035)  # downscale 2: 16 px images, 8 x 8 latents; SD3-like factors


@pytest.fixture(scope="module")
def sd3_teacher(tmp_path_factory):
    """SD3-like: one joint block (hidden 32), CLIP-L/G-like and T5 encoders, shift 3 (SD3's)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sd3")
    net = SD3Transformer2DModel(sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8,
                                num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=32,
                                pooled_projection_dim=32, out_channels=4)
    tok = _tokenizer(root / "tok")
    pipe = StableDiffusion3Pipeline(
        transformer=net, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=_vae(),
        text_encoder=_text_encoder(CLIPTextModelWithProjection, 16, projection_dim=16), tokenizer=tok,
        text_encoder_2=_text_encoder(CLIPTextModelWithProjection, 16, projection_dim=16), tokenizer_2=tok,
        text_encoder_3=_t5(), tokenizer_3=_t5_tokenizer())
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    return root / "pipe"


@pytest.fixture(scope="module")
def flux_teacher(tmp_path_factory):
    """FLUX-dev-like: one double and one single block, a guidance embedding, dynamic (resolution) shifting."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("flux")
    net = FluxTransformer2DModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1,
                                 attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                                 pooled_projection_dim=16, axes_dims_rope=[4, 4, 8], guidance_embeds=True)
    sched = FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                            base_image_seq_len=4, max_image_seq_len=64)
    pipe = FluxPipeline(transformer=net, scheduler=sched, vae=_vae(), text_encoder=_text_encoder(CLIPTextModel, 16),
                        tokenizer=_tokenizer(root / "tok"), text_encoder_2=_t5(), tokenizer_2=_t5_tokenizer())
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    return root / "pipe"


def _cfg(out, teacher, **kw):
    return pipeline_cfg(out, teacher, **{"resolution": 16, "teacher_dtype": "fp32", **kw})


def _image_folder(path):
    from PIL import Image

    path.mkdir()
    g = torch.Generator().manual_seed(1)
    with open(path / "metadata.jsonl", "w") as f:
        for i in range(4):
            px = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(path / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": PROMPTS[i]}) + "\n")
    return path


def _check_stock_pipeline_parity(student_dir, flux: bool):
    """The exported folder loads with plain diffusers, and its pipeline called with imagine_flash.json's
    `pipeline_call` (stock FlowMatchEulerDiscreteScheduler, custom sigmas) gives the training-time sampler's latents
    bit for bit, from the same noise and prompt embeddings."""
    from diffusers import DiffusionPipeline, FlowMatchEulerDiscreteScheduler

    from imagine_flash.generate import ModelRunner
    from imagine_flash.sampling import scheduler_sample

    meta = json.loads((student_dir / "imagine_flash.json").read_text())
    pipe = DiffusionPipeline.from_pretrained(student_dir)
    assert isinstance(pipe.scheduler, FlowMatchEulerDiscreteScheduler)
    runner = ModelRunner(student_dir)
    x_T = runner.noise([7, 8])
    cond = runner.text(PROMPTS[:2])
    ours = scheduler_sample(Denoiser(runner.unet, runner.schedule), None, x_T, cond, timesteps=meta["timesteps"])
    theirs = pipe(prompt_embeds=cond.hidden, pooled_prompt_embeds=cond.extra["pooled_projections"],
                  latents=pack_latents(x_T) if flux else x_T.clone(), output_type="latent",
                  **meta["pipeline_call"]).images
    theirs = unpack_latents(theirs, 8, 8) if flux else theirs
    assert torch.equal(ours, theirs)
    assert pipe.scheduler.sigmas[:-1].tolist() == meta["timesteps"]  # the pipeline visited the trained sigmas
    images, _ = runner.sample(PROMPTS[:2], [7, 8])  # the runner (sample / evaluate) decodes the same student
    assert images.shape == (2, 3, 16, 16)
    return meta


# ------------------------------------------------------------------------------------------------- the math

def test_velocity_conversions_against_hand_computation():
    """x_t = (1 - s) x0 + s eps and v = eps - x0: the conversions recover x0 and eps; the Euler step is Eq. 4."""
    g = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(3, 2, 4, 4, generator=g), torch.randn(3, 2, 4, 4, generator=g)
    s = torch.tensor([1.0, 0.6, 0.25])
    sched = FlowSchedule({"num_train_timesteps": 1000})
    x_t = q_sample(x0, eps, sched.alpha(s), sched.sigma(s))
    torch.testing.assert_close(x_t, (1 - s.view(-1, 1, 1, 1)) * x0 + s.view(-1, 1, 1, 1) * eps)
    v = eps - x0
    torch.testing.assert_close(x0_from_flow(x_t, v, s), x0, atol=1e-6, rtol=0)
    torch.testing.assert_close(eps_from_flow(x_t, v, s), eps, atol=1e-6, rtol=0)
    s_next = torch.tensor([0.8, 0.3, -1.0])  # -1: the clean end
    by_hand = x_t + (sched.sigma(s_next) - s).view(-1, 1, 1, 1) * v
    torch.testing.assert_close(euler_step(x_t, v, s, sched.sigma(s_next)), by_hand)
    ddim = ddim_step(x0, eps, sched.alpha(s_next), sched.sigma(s_next))  # Eq. 4 written with x0 and eps
    torch.testing.assert_close(ddim, by_hand, atol=1e-6, rtol=0)
    torch.testing.assert_close(by_hand[2], x0[2], atol=1e-6, rtol=0)  # to sigma = 0: the data


def test_shift_and_gamma_on_shifted_sigmas():
    """SD3's shift by hand (shift 3: 0.75 -> 0.9, 0.5 -> 0.75) equals what diffusers' scheduler visits; FLUX's
    dynamic shift uses the pipeline's mu; gamma acts on the shifted sigma with the table in sigma * T units."""
    sched = FlowSchedule({"num_train_timesteps": 1000, "shift": 3.0})
    assert sched.shifted([1.0, 0.75, 0.5]) == pytest.approx([1.0, 0.9, 0.75], abs=1e-6)
    assert sched.shifted([0.5]) == pytest.approx([flow_shift(0.5, 3.0)], abs=1e-7)
    import math
    dyn = FlowSchedule({"use_dynamic_shifting": True}, mu=0.8)
    by_hand = math.exp(0.8) / (math.exp(0.8) + (1 / 0.5 - 1))  # diffusers' exponential time_shift at t = 0.5
    assert dyn.shifted([0.5]) == pytest.approx([by_hand], abs=1e-6)
    g = sched.gamma(torch.tensor([1.0, 0.9, 0.75, 0.5, 0.2]), ((900, 990), (500, 950), (-1, 200)))
    assert g.tolist() == pytest.approx([0.99, 0.95, 0.95, 0.2, 0.2])


def _velocity_net(record=None):
    """A plain net returning a fixed function of (x, sigma, cond) as the velocity; it is given sigma * T (the
    network's timestep input, schedule.net_t) and records it."""
    def net(x, t, cond):
        if record is not None:
            record.append(t.clone())
        s = t.view(-1, 1, 1, 1) / 1000
        return 0.3 * x - s * cond.hidden.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.1
    return net


def test_noise_correction_is_a_no_op_on_the_flow_path():
    """At sigma = 1 the flow model's eps_hat = x_T + 0 v is exactly x_T, so Eq. 9 (x_T in place of eps_hat) changes
    nothing: the noise-corrected step equals Eq. 4 and sampling with or without it is identical, bit for bit."""
    sched = FlowSchedule({"num_train_timesteps": 1000})
    den = Denoiser(_velocity_net(), sched)
    cond = Cond(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)))
    x_T = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    pred = den.predict(x_T, 1.0, cond)
    assert torch.equal(pred.eps, x_T)
    a, s = sched.alpha(torch.tensor(0.7)), sched.sigma(torch.tensor(0.7))
    assert torch.equal(noise_corrected_step(pred.x0, pred.eps, x_T, a, s, True), ddim_step(pred.x0, pred.eps, a, s))
    ts = [1.0, 0.8, 0.5]
    with_nc = flash_sample(den, x_T, cond, ts, sched, noise_correction=True)
    assert torch.equal(with_nc, flash_sample(den, x_T, cond, ts, sched, noise_correction=False))


def test_flow_rollout_and_srl_steps():
    """The rollout's states come only from x_T and the student's Euler steps; SRL starts at gamma(sigma) and takes k
    sigma-uniform teacher steps with CFG on the velocity."""
    from imagine_flash.losses.flash import srl_target
    from imagine_flash.rng import Shard

    sched = FlowSchedule({"num_train_timesteps": 1000})
    cond = Cond(torch.randn(3, 3, 4, generator=torch.Generator().manual_seed(1)))
    x_T = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    ts = [1.0, 0.8, 0.5]
    student = Denoiser(_velocity_net(), sched)
    out = rollout(student, x_T, cond, ts, sched, torch.tensor([0, 1, 2]))
    x = x_T
    for j, (a, b) in enumerate(zip(ts, ts[1:])):  # by hand: x + (s' - s) v
        x = x + (b - a) * (0.3 * x - a * cond.hidden.mean(dim=(1, 2)).view(-1, 1, 1, 1) + 0.1)
        assert torch.allclose(out[j + 1], x[j + 1], atol=1e-6)  # sample i keeps its state after i steps
    assert torch.equal(out[0], x_T[0])
    seen = []
    null = Cond(torch.zeros(1, 3, 4))
    teacher = Denoiser(_velocity_net(seen), sched, guidance_scale=2.0, null_cond=null)
    x0 = torch.randn(3, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    gen = Shard(torch.Generator().manual_seed(0), 0, 1)
    target, steps = srl_target(teacher, x0, torch.tensor(ts), cond, sched, 4, gen, ((900, 990), (500, 950), (-1, 200)))
    assert len(seen) == 4 and all(len(t) == 6 for t in seen)  # k calls, cond and null in one batch
    assert seen[0][:3].tolist() == pytest.approx([990, 950, 200])  # gamma(sigma) * T
    assert steps[0].tolist() == pytest.approx([0.99, 0.7425, 0.495, 0.2475])
    assert target.shape == x0.shape and torch.isfinite(target).all()
    # CFG on the velocity, by hand: v_u + w (v_c - v_u), and x0 from it.
    net, s = _velocity_net(), torch.tensor([0.5, 0.5, 0.5])
    v_c, v_u = net(x0, s * 1000, cond), net(x0, s * 1000, null)
    pred = teacher.predict(x0, s, cond)
    torch.testing.assert_close(pred.v, v_u + 2.0 * (v_c - v_u))
    torch.testing.assert_close(pred.x0, x0 - 0.5 * pred.v)


def test_dpmpp_targets_on_the_flow_path():
    """target_solver='dpmpp' on a flow teacher. From sigma = 1 (alpha = 0, lambda = -inf) its first step is first
    order, which on the flow path is the Euler step, and its second has no finite r, so through 3 steps it equals
    ddim_sample; from sigma = 0.99 its later steps are second order: finite, and not the Euler result."""
    from imagine_flash.sampling import dpmpp_sample

    sched = FlowSchedule({"num_train_timesteps": 1000})
    den = Denoiser(_velocity_net(), sched)
    cond = Cond(torch.randn(2, 3, 4, generator=torch.Generator().manual_seed(1)))
    x = torch.randn(2, 2, 4, 4, generator=torch.Generator().manual_seed(2))
    from_one = sched.uniform(torch.tensor([1.0, 1.0]), 3)
    torch.testing.assert_close(dpmpp_sample(den, x, cond, from_one, sched), ddim_sample(den, x, cond, from_one, sched))
    later = sched.uniform(torch.tensor([0.99, 0.99]), 4)
    second = dpmpp_sample(den, x, cond, later, sched)
    assert torch.isfinite(second).all()
    assert (second - ddim_sample(den, x, cond, later, sched)).abs().max() > 1e-4


# --------------------------------------------------------------------------------------- the real pipelines

@pytest.mark.slow
def test_sd3_distil_export_reload_through_the_cli(tmp_path, sd3_teacher):
    """An SD3-like pipeline distils through the CLI (imagefolder data, transformer discriminator), exports a
    StableDiffusion3Pipeline, reloads with plain diffusers and samples the trained sigmas bit for bit."""
    from diffusers import StableDiffusion3Pipeline

    out = tmp_path / "run"
    data = _image_folder(tmp_path / "data")
    assert main(["distill", "--teacher", str(sd3_teacher), "--dataset", str(data), "--out", str(out),
                 "--max-steps", "2", "--student-steps", "3", "--eval-samples", "0", "--set", "batch_size=2",
                 "--set", "k=2", "--set", "sample_every=2", "--set", "resolution=16"]) == 0
    assert (out / "samples" / "step000002.png").is_file()
    assert isinstance(StableDiffusion3Pipeline.from_pretrained(out / "student"), StableDiffusion3Pipeline)
    meta = _check_stock_pipeline_parity(out / "student", flux=False)
    assert meta["sigmas"] == [1.0, 0.75, 0.5] and meta["timesteps"] == pytest.approx([1.0, 0.9, 0.75], abs=1e-6)
    assert meta["pipeline_call"]["guidance_scale"] == 1.0  # CFG is distilled in
    t = load_file(sd3_teacher / "transformer" / "diffusion_pytorch_model.safetensors")
    s = load_file(out / "student" / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(t[k], s[k]) for k in t)  # the student trained


@pytest.mark.slow
def test_flux_lora_student_exports_and_loads_onto_the_teacher(tmp_path, flux_teacher):
    """A LoRA student of a FLUX-dev-like teacher (guidance embedding at a chosen value, dynamic shift): the merged
    pipeline samples bit for bit as trained, and its LoRA weights load onto the teacher's FluxPipeline with the same
    result."""
    from diffusers import DiffusionPipeline

    from imagine_flash.train import distill

    out = tmp_path / "run"
    distill(_cfg(out, flux_teacher, lora_rank=4, lr=1e-3, student_steps=2, embedded_guidance=2.0),
            dataset=TinyData())
    ckpt = load_file(sorted(out.glob("ckpt-*"))[-1] / "student.safetensors")
    assert ckpt and all("lora" in k for k in ckpt)
    meta = _check_stock_pipeline_parity(out / "student", flux=True)
    assert meta["embedded_guidance"] == 2.0 and meta["pipeline_call"]["guidance_scale"] == 2.0  # not FLUX's 3.5
    assert meta["sigmas"] == pytest.approx([1.0, 2 / 3])
    merged = DiffusionPipeline.from_pretrained(out / "student")
    teacher = DiffusionPipeline.from_pretrained(flux_teacher)
    x_T = pack_latents(torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0)))
    call = dict(prompt="a red shoe", output_type="latent", **meta["pipeline_call"])
    plain = teacher(latents=x_T.clone(), **call).images
    teacher.load_lora_weights(out / "student_lora")
    with_lora = teacher(latents=x_T.clone(), **call).images
    assert (with_lora - plain).abs().max() > 1e-5
    torch.testing.assert_close(with_lora, merged(latents=x_T.clone(), **call).images, atol=2e-6, rtol=0)


@pytest.mark.slow
def test_flow_resume_equals_uninterrupted_run(tmp_path, sd3_teacher):
    """An SD3 full student with its transformer discriminator, stopped at a checkpoint and resumed, equals an
    uninterrupted run bit for bit."""
    from imagine_flash.train import distill

    kw = dict(ckpt_every=2, max_steps=4, student_steps=2)
    distill(_cfg(tmp_path / "a", sd3_teacher, **kw), dataset=TinyData())
    distill(_cfg(tmp_path / "b", sd3_teacher, **{**kw, "max_steps": 2}), dataset=TinyData())
    distill(_cfg(tmp_path / "b", sd3_teacher, **kw), resume=True, dataset=TinyData())
    assert_same_checkpoints(tmp_path / "a", tmp_path / "b")


def test_transformer_discriminator_trains_heads_and_passes_gradients(sd3_teacher, flux_teacher):
    """The trunk is frozen, the heads train, and the generator's gradient reaches the input through the trunk."""
    from imagine_flash.losses.discriminator import TransformerDiscriminator
    from imagine_flash.pipelines import load_bundle

    for teacher in (sd3_teacher, flux_teacher):
        bundle = load_bundle(teacher, resolution=16)
        disc = TransformerDiscriminator(bundle.unet, n_blocks=1)
        assert all(not p.requires_grad for p in disc.trunk.parameters())
        assert all(p.requires_grad for p in disc.heads.parameters())
        x = torch.randn(2, *bundle.x0_shape, requires_grad=True)
        logit = disc(x, torch.tensor([0.3, 0.7]), bundle.text(PROMPTS[:2]))
        assert logit.shape == (2,)
        logit.sum().backward()
        assert x.grad.abs().sum() > 0 and all(p.grad is not None for p in disc.heads.parameters())


def test_flow_teacher_refusals_are_one_line(tmp_path, sd3_teacher, capsys):
    """Methods other than flash, and VP-style integer timesteps, are refused before any model loads."""
    for extra in (["--method", "lcm"], ["--set", "student_timesteps=[999,500]"]):
        code = main(["distill", "--teacher", str(sd3_teacher), "--out", str(tmp_path / "r"), *extra])
        err = capsys.readouterr().err.strip()
        assert code == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert not (tmp_path / "r").exists()


@pytest.mark.slow
def test_flow_two_processes_equal_one(tmp_path, sd3_teacher):
    """`accelerate launch --multi_gpu --num_processes 2` (gloo) of the CLI on the SD3-like teacher: the replicas are
    identical and equal a one-process run with the same global batch."""
    import os
    import shutil
    import sys

    from test_distributed import WORKER, _output, _spawn

    launcher = shutil.which("accelerate", path=os.path.dirname(sys.executable))
    if launcher is None:
        pytest.skip("accelerate's launcher is not on PATH")
    data = _image_folder(tmp_path / "data")
    worker = WORKER.replace('"--eval-samples", eval_samples,', '"--eval-samples", eval_samples, "--dataset", '
                            f'{str(data)!r}, "--set", "resolution=16",')
    (tmp_path / "worker.py").write_text(worker)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    jobs = [_spawn(cmd + [str(tmp_path / "worker.py"), str(tmp_path / name), str(sd3_teacher), "0"], env,
                   tmp_path / f"{name}.log")
            for name, cmd in (("two", [launcher, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
                                       "1", "--mixed_precision", "no", "--dynamo_backend", "no",
                                       "--main_process_port", "29537"]), ("one", [sys.executable]))]
    for job in jobs:
        _output(*job)
    r0, r1, one = (load_file(tmp_path / n / f) for n, f in (("two", "rank0of2.safetensors"),
                                                            ("two", "rank1of2.safetensors"),
                                                            ("one", "rank0of1.safetensors")))
    init = load_file(sd3_teacher / "transformer" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(one[k], init[k].float()) for k in one)
    for k in one:
        assert torch.equal(r0[k], r1[k]), k
        torch.testing.assert_close(r0[k], one[k], rtol=1e-4, atol=2e-5)


@pytest.mark.slow
def test_flow_fsdp2_full_student_equals_one_process(tmp_path, sd3_teacher):
    """configs/accelerate/fsdp2_sd3.yaml on 2 CPU processes: accelerate's FSDP2 shards the SD3 student's joint
    blocks, and the gathered weights equal a one-process run's."""
    import sys

    from test_distributed import DS_WORKER, ROOT, _output, _spawn

    data = _image_folder(tmp_path / "data")
    worker = DS_WORKER.replace('teacher_dtype="fp32")', f'teacher_dtype="fp32", dataset={str(data)!r}, resolution=16)')
    assert worker != DS_WORKER
    fsdp = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
            str(ROOT / "configs" / "accelerate" / "fsdp2_sd3.yaml"), "--num_processes", "2", "--mixed_precision",
            "no", "--main_process_port", "29538"]
    (tmp_path / "worker.py").write_text(worker)
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    jobs = [_spawn(cmd + [str(tmp_path / "worker.py"), str(tmp_path / name), str(sd3_teacher), "2", *extra], env,
                   tmp_path / f"{name}.log") for name, cmd, extra in (("fsdp", fsdp, ["--fsdp-cpu"]),
                                                                      ("plain", [sys.executable], []))]
    for job in jobs:  # side by side, one thread each
        _output(*job)
    for rank in (0, 1):
        assert json.loads((tmp_path / "fsdp" / f"sharded{rank}.json").read_text()) is True
    plain = load_file(tmp_path / "plain" / "final0.safetensors")
    f0 = load_file(tmp_path / "fsdp" / "final0.safetensors")
    for k in plain:
        torch.testing.assert_close(f0[k], plain[k], rtol=1e-4, atol=2e-5)


@needs_data
def test_pixel_flow_teacher_pretrains_and_distils_end_to_end(tmp_path):
    """`pretrain --set objective=flow` trains a rectified-flow pixel teacher (velocity loss; a FlowMatchEuler
    scheduler in its folder), and `distill --teacher <it>` runs the whole method on it and evaluates."""
    teacher = tmp_path / "t"
    assert main(["pretrain", "--out", str(teacher), "--max-steps", "2", "--set", "variant=micro", "--set",
                 "batch_size=8", "--set", "objective=flow", "--set", "sample_every=2"]) == 0
    sched = json.loads((teacher / "model" / "scheduler" / "scheduler_config.json").read_text())
    assert sched["_class_name"] == "FlowMatchEulerDiscreteScheduler"
    out = tmp_path / "d"
    assert main(["distill", "--teacher", str(teacher / "model"), "--out", str(out), "--max-steps", "2",
                 "--eval-samples", "4", "--set", "batch_size=2", "--set", "k=2", "--set", "fid_reference=8",
                 "--set", "threads=1"]) == 0
    meta = json.loads((out / "student" / "imagine_flash.json").read_text())
    assert meta["timesteps"] == [1.0, 0.75, 0.5] and "pipeline_call" not in meta  # shift 1: the sigmas as given
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["teacher"]["sampler"] == "euler" and metrics["student"]["fid"] > 0


def test_pretrain_flow_refuses_an_eps_loss_weight(tmp_path, capsys):
    code = main(["pretrain", "--out", str(tmp_path / "t"), "--set", "objective=flow", "--set", "loss_weight=trunc-snr"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and "loss_weight" in err and not (tmp_path / "t").exists()
