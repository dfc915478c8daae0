"""Diffusers pipeline teachers: tiny random SD- and SDXL-like pipelines distilled in latent space, exported as
pipelines and LoRA weights, reloaded with diffusers, and sampled in parity with our own sampler."""
import json
import shutil
import string

import pytest
import torch
from safetensors.torch import load_file

from imagine_flash.checkpoint import latest
from imagine_flash.cli import main
from imagine_flash.config import ConfigError, DistillConfig
from imagine_flash.scheduler import FlashScheduler

from conftest import assert_same_checkpoints

PROMPTS = ["a red shoe", "a blue bag", "a green hat", "a pink coat"]


def _tokenizer(folder):
    """A CLIP BPE tokenizer over single letters, written locally (no hub)."""
    from transformers import CLIPTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    letters = list(string.ascii_lowercase)
    vocab = ["<|startoftext|>", "<|endoftext|>", "!"] + letters + [c + "</w>" for c in letters]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"), model_max_length=16)


def _text_encoder(cls, hidden: int, **kw):
    from transformers import CLIPTextConfig

    return cls(CLIPTextConfig(vocab_size=64, hidden_size=hidden, intermediate_size=32, num_attention_heads=2,
                              num_hidden_layers=2, max_position_embeddings=16, bos_token_id=0, eos_token_id=1,
                              pad_token_id=1, **kw)).eval()


def _parts(sdxl: bool):
    from diffusers import AutoencoderKL, PNDMScheduler, UNet2DConditionModel

    vae = AutoencoderKL(block_out_channels=(8, 16), down_block_types=("DownEncoderBlock2D",) * 2,
                        up_block_types=("UpDecoderBlock2D",) * 2, latent_channels=4, norm_num_groups=8,
                        sample_size=16)  # downscale 2: 16 px images, 8 x 8 latents
    added = dict(addition_embed_type="text_time", addition_time_embed_dim=8,
                 projection_class_embeddings_input_dim=6 * 8 + 16) if sdxl else {}  # 6 time ids + pooled (16)
    unet = UNet2DConditionModel(block_out_channels=(32, 64), layers_per_block=1, sample_size=8, in_channels=4,
                                out_channels=4, cross_attention_dim=32, attention_head_dim=8, norm_num_groups=8,
                                down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), **added)
    sched = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                          steps_offset=1)  # SD 1.5's scheduler
    return vae, unet, sched


@pytest.fixture(scope="module")
def sd_teacher(tmp_path_factory):
    from diffusers import StableDiffusionPipeline
    from transformers import CLIPTextModel

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sd")
    vae, unet, sched = _parts(sdxl=False)
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=_text_encoder(CLIPTextModel, 32), tokenizer=_tokenizer(
        root / "tok"), unet=unet, scheduler=sched, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    return root / "pipe"


@pytest.fixture(scope="module")
def sdxl_teacher(tmp_path_factory):
    from diffusers import StableDiffusionXLPipeline
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(0)
    root = tmp_path_factory.mktemp("sdxl")
    vae, unet, sched = _parts(sdxl=True)
    tok = _tokenizer(root / "tok")
    pipe = StableDiffusionXLPipeline(vae=vae, text_encoder=_text_encoder(CLIPTextModel, 16),
                                     text_encoder_2=_text_encoder(CLIPTextModelWithProjection, 16, projection_dim=16),
                                     tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=sched)  # concat: 16 + 16
    pipe.save_pretrained(root / "pipe", safe_serialization=True)
    return root / "pipe"


class TinyData:
    """8 random 16 x 16 images with 4 captions."""

    def __init__(self):
        g = torch.Generator().manual_seed(0)
        self.images = torch.rand(8, 3, 16, 16, generator=g) * 2 - 1
        self.captions = PROMPTS * 2

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": self.images[i], "caption": self.captions[i]}


def _cfg(out, teacher, **kw):
    base = dict(out=str(out), teacher=str(teacher), batch_size=2, k=2, max_steps=2, ckpt_every=1, sample_every=1000,
                log_every=1, eval_samples=0, adv_weight=0.1)
    base.update(kw)
    return DistillConfig(**base)


def _load(path):
    from diffusers import DiffusionPipeline

    import imagine_flash  # noqa: F401  diffusers resolves FlashScheduler from the imported module, never imports it

    return DiffusionPipeline.from_pretrained(path)


def _pipe_images(pipe, prompt, x_T, **kw):
    """The pipeline's images in [-1, 1] from given initial latents."""
    out = pipe(prompt, latents=x_T.clone(), output_type="pt", **kw).images
    return out * 2 - 1


def _check_parity_with_runner(student_dir, pipe):
    """Our ModelRunner (bundle text encoder, Denoiser, FlashScheduler, VAE decode) equals the diffusers pipeline."""
    from imagine_flash.generate import ModelRunner

    runner = ModelRunner(student_dir)
    assert runner.is_student and runner.encoder.downscale == 2
    ours, _ = runner.sample(["a red shoe"], [7])
    theirs = _pipe_images(pipe, "a red shoe", runner.noise([7]), guidance_scale=1.0)
    torch.testing.assert_close(ours, theirs.clamp(-1, 1), atol=1e-4, rtol=0)


@pytest.mark.slow
def test_sd_pipeline_distil_export_reload(tmp_path, sd_teacher):
    """(a) Distil an SD-like pipeline through the CLI (imagefolder data), export, reload, sample 3 steps."""
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(1)
    with open(data / "metadata.jsonl", "w") as f:
        for i in range(4):
            px = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
            Image.fromarray(px).save(data / f"{i}.png")
            f.write(json.dumps({"file_name": f"{i}.png", "text": PROMPTS[i]}) + "\n")
    out = tmp_path / "run"
    assert main(["distill", "--teacher", str(sd_teacher), "--dataset", str(data), "--out", str(out), "--max-steps",
                 "2", "--student-steps", "3", "--eval-samples", "0", "--set", "batch_size=2", "--set", "k=2",
                 "--set", "sample_every=2"]) == 0
    assert (out / "samples" / "step000002.png").is_file()
    pipe = _load(out / "student")
    assert isinstance(pipe, StableDiffusionPipeline) and isinstance(pipe.scheduler, FlashScheduler)
    assert pipe.scheduler.config.timesteps == [999, 666, 333] and pipe.scheduler.config.noise_correction
    # The pipeline's defaults (50 steps, guidance 7.5) sample the student as trained: 3 steps, no CFG on top.
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    default = _pipe_images(pipe, "a red shoe", x_T)
    assert default.shape == (1, 3, 16, 16) and pipe.scheduler.timesteps.tolist() == [999, 666, 333]
    assert torch.equal(default, _pipe_images(pipe, "a red shoe", x_T, guidance_scale=1.0, num_inference_steps=3))
    assert pipe.unet.config.time_cond_proj_dim is not None and not pipe.unet.time_embedding.cond_proj.weight.any()
    _check_parity_with_runner(out / "student", pipe)
    # The student trained: its UNet differs from the teacher's.
    t = load_file(sd_teacher / "unet" / "diffusion_pytorch_model.safetensors")
    s = load_file(out / "student" / "unet" / "diffusion_pytorch_model.safetensors")
    assert any(not torch.equal(t[k], s[k]) for k in t)


@pytest.mark.slow
def test_sd_lora_student_loads_onto_the_teacher_pipeline(tmp_path, sd_teacher):
    """(b) A LoRA student: pytorch_lora_weights.safetensors loads onto the teacher pipeline and changes its output
    to that of the exported (merged) student pipeline, lora_alpha != rank included."""
    from diffusers import DiffusionPipeline

    from imagine_flash.train import distill

    out = tmp_path / "run"
    distill(_cfg(out, sd_teacher, lora_rank=4, lora_alpha=8, lr=1e-3, student_steps=2, rollout_weights="ema"),
            dataset=TinyData())
    ckpt = load_file(latest(out) / "student.safetensors")
    assert ckpt and all("lora" in k for k in ckpt)  # only the trainable (adapter) weights are checkpointed
    merged = _load(out / "student")
    teacher = DiffusionPipeline.from_pretrained(sd_teacher)
    teacher.scheduler = FlashScheduler.from_pretrained(out / "student_lora", subfolder="scheduler")
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    plain = _pipe_images(teacher, "a red shoe", x_T, guidance_scale=1.0)
    teacher.load_lora_weights(out / "student_lora")
    with_lora = _pipe_images(teacher, "a red shoe", x_T, guidance_scale=1.0)
    assert teacher.scheduler.timesteps.tolist() == [999, 666]
    assert (with_lora - plain).abs().max() > 1e-5
    torch.testing.assert_close(with_lora, _pipe_images(merged, "a red shoe", x_T), atol=2e-6, rtol=0)


@pytest.mark.slow
def test_resume_equals_uninterrupted_run_in_latent_space(tmp_path, sd_teacher):
    """(c) A LoRA student (EMA rollout, discriminator) killed after a checkpoint and resumed equals an uninterrupted
    run: the adapters, their EMA, the discriminator."""
    from imagine_flash.train import distill

    kw = dict(lora_rank=4, rollout_weights="ema", ckpt_every=2, max_steps=4)
    distill(_cfg(tmp_path / "a", sd_teacher, **kw), dataset=TinyData())
    distill(_cfg(tmp_path / "b", sd_teacher, **{**kw, "max_steps": 2}), dataset=TinyData())
    distill(_cfg(tmp_path / "b", sd_teacher, **kw), resume=True, dataset=TinyData())
    assert_same_checkpoints(tmp_path / "a", tmp_path / "b")
    trained = load_file(latest(tmp_path / "a") / "student.safetensors")
    assert any(v.any() for k, v in trained.items() if "lora_B" in k)  # the adapters trained (lora_B starts at 0)


@pytest.mark.slow
def test_sdxl_pipeline_distil_export_reload(tmp_path, sdxl_teacher):
    """(d) An SDXL-like teacher (two text encoders, pooled text_embeds and time_ids) distils and exports."""
    from diffusers import StableDiffusionXLPipeline

    from imagine_flash.train import distill

    out = tmp_path / "run"
    distill(_cfg(out, sdxl_teacher, student_steps=1), dataset=TinyData())
    pipe = _load(out / "student")
    assert isinstance(pipe, StableDiffusionXLPipeline) and isinstance(pipe.scheduler, FlashScheduler)
    x_T = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    assert _pipe_images(pipe, "a red shoe", x_T).shape == (1, 3, 16, 16)
    assert pipe.scheduler.timesteps.tolist() == [999]
    _check_parity_with_runner(out / "student", pipe)


@pytest.mark.slow
def test_sdxl_null_cond_is_the_pipelines_negative(sdxl_teacher):
    """SDXL's pipeline zeros the unconditional branch (force_zeros_for_empty_prompt); the teacher's CFG must too."""
    from imagine_flash.pipelines import load_bundle

    b = load_bundle(sdxl_teacher)
    null, cond = b.text.null_cond(), b.text(["a red shoe", ""])
    assert not null.hidden.any() and not null.extra["text_embeds"].any()
    assert cond.hidden.shape == (2, 16, 32) and cond.extra["text_embeds"].shape == (2, 16)
    assert cond.extra["time_ids"].tolist() == [[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2
    assert b.meta["guidance_scale"] == 5.0  # the SDXL pipeline's own default
    b.text._cache.clear()  # a prompt's embedding does not depend on the prompts encoded with it
    alone = b.text(["a red shoe"])
    assert torch.equal(alone.hidden[0], cond.hidden[0]) and torch.equal(alone.extra["text_embeds"][0],
                                                                        cond.extra["text_embeds"][0])


def test_lora_teacher_runs_without_adapters():
    """One UNet: the teacher view disables the adapters for its call (and re-enables them); the EMA view swaps in
    the EMA adapter weights and puts the live ones back."""
    from imagine_flash.student import build_student

    _, unet, _ = _parts(sdxl=False)
    x, t, ehs = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 5, 32)
    with torch.no_grad():
        ref = unet(x, t, ehs).sample
        st = build_student(DistillConfig(lora_rank=2), unet, torch.float32)
        for n, p in unet.named_parameters():
            if "lora_B" in n:
                p.normal_()  # a trained adapter
        live = {n: p.clone() for n, p in st.state.named.items()}
        assert torch.equal(st.teacher_net(x, t, ehs).sample, ref)
        assert not torch.allclose(st.net(x, t, ehs).sample, ref)
        assert torch.equal(st.ema(x, t, encoder_hidden_states=ehs).sample, ref)  # EMA adapters: still lora_B = 0
    assert all(p.requires_grad for p in st.state.named.values())
    assert all(torch.equal(p, live[n]) for n, p in st.state.named.items())


def test_guidance_input_leaves_outputs_unchanged():
    """The exported UNet's guidance-scale input has a zero projection: outputs are identical for any w."""
    from imagine_flash.pipelines import with_guidance_input

    _, unet, _ = _parts(sdxl=False)
    x, t, ehs = torch.randn(2, 4, 8, 8), torch.tensor([999, 10]), torch.randn(2, 5, 32)
    g = with_guidance_input(unet)
    with torch.no_grad():
        assert torch.equal(g(x, t, ehs, timestep_cond=torch.randn(2, 256)).sample, unet(x, t, ehs).sample)


@pytest.mark.slow
def test_bad_pipeline_teachers_are_one_line_errors(tmp_path, sd_teacher, capsys):
    index = json.loads((sd_teacher / "model_index.json").read_text())
    kinds = {}
    for name, cls in (("kandinsky", "KandinskyPipeline"), ("flux", "FluxPipeline")):  # FLUX without its scheduler
        kinds[name] = tmp_path / name
        shutil.copytree(sd_teacher, kinds[name])
        (kinds[name] / "model_index.json").write_text(json.dumps({**index, "_class_name": cls}))
    vpred = tmp_path / "vpred"
    shutil.copytree(sd_teacher, vpred)
    sched_f = vpred / "scheduler" / "scheduler_config.json"
    sched_f.write_text(json.dumps({**json.loads(sched_f.read_text()), "prediction_type": "v_prediction"}))
    for folder, words in ((kinds["kandinsky"], "KandinskyPipeline is not supported"),
                          (kinds["flux"], "needs its FlowMatchEulerDiscreteScheduler"), (vpred, "epsilon")):
        assert main(["distill", "--teacher", str(folder), "--eval-samples", "0", "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err.strip()
        assert err.count("\n") == 0 and words in err and str(folder) in err


def test_adam8bit_without_bitsandbytes_is_a_one_line_error(monkeypatch):
    import sys

    from imagine_flash.student import optimizer_class

    monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # import bitsandbytes now fails, installed or not
    with pytest.raises(ConfigError, match="bitsandbytes") as e:
        optimizer_class("adam8bit")
    assert "\n" not in str(e.value)


@pytest.mark.slow
def test_hub_id_teacher_from_the_hub_cache(tmp_path, sd_teacher):
    """`--teacher org/name` resolves a hub id through huggingface_hub (here from a pre-filled cache, offline), distils,
    and exports a pipeline re-read from the same id. Only the download itself is not exercised (no hub access)."""
    import os
    import subprocess
    import sys

    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--tiny-org--tiny-sd"
    shutil.copytree(sd_teacher, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    (tmp_path / "prompts.txt").write_text("\n".join(PROMPTS) + "\n")
    env = {**os.environ, "HF_HUB_CACHE": str(tmp_path / "hub"), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    args = ["distill", "--teacher", "tiny-org/tiny-sd", "--dataset", str(tmp_path / "prompts.txt"), "--out",
            str(tmp_path / "run"), "--max-steps", "1", "--eval-samples", "0", "--set", "batch_size=2", "--set", "k=2",
            "--set", "adv_weight=0", "--set", "sample_every=100"]
    r = subprocess.run([sys.executable, "-m", "imagine_flash", *args], env=env, capture_output=True, text=True,
                       timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    pipe = _load(tmp_path / "run" / "student")
    assert isinstance(pipe.scheduler, FlashScheduler) and pipe.scheduler.config.timesteps == [999, 666, 333]
    # An id that is in neither the cache nor reachable: one line naming it.
    other = [str(tmp_path / "run2") if a == str(tmp_path / "run") else a for a in args[3:]]  # not a run folder
    r = subprocess.run([sys.executable, "-m", "imagine_flash", *args[:2], "tiny-org/missing", *other], env=env,
                       capture_output=True, text=True, timeout=600)
    ours = [line for line in r.stderr.splitlines() if line.startswith("imagine-flash distill: error:")]
    assert r.returncode == 2 and len(ours) == 1, r.stderr  # (huggingface_hub may add its own deprecation warning)
    assert "tiny-org/missing" in ours[0] and "HF_HUB_OFFLINE" in ours[0]
    assert "bitsandbytes" not in r.stderr and "gemm_4bit" not in r.stderr


def test_cpu_native_bf16_is_read_from_cpuinfo_flags():
    from imagine_flash.pipelines import cpu_has_native_bf16, resolve_dtype
    assert cpu_has_native_bf16("processor: 0\nflags\t\t: fpu avx2 avx512f avx512_bf16 amx_tile\n")
    assert cpu_has_native_bf16("flags : sse amx_bf16\n")
    assert not cpu_has_native_bf16("flags\t: fpu avx2 fma avx512f avx512bw\n")  # AVX512 without bf16: emulated
    assert not cpu_has_native_bf16("")
    assert resolve_dtype("auto", "cpu") == (torch.bfloat16 if cpu_has_native_bf16() else torch.float32)
    assert resolve_dtype("fp32", "cpu") == torch.float32
