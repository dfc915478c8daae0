"""Parameters, FLOPs per forward and activation memory of SD 1.5 and SDXL, for README's cost table.

Nothing is downloaded or run on real weights: the diffusers architectures are built on the meta device, FLOPs come
from torch's FlopCounterMode and activation memory from the tensors autograd saves for backward (float32, batch 1,
each saved tensor counted once, parameters excluded). Usage: python scripts/estimate_costs.py
"""
import json

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from torch.utils.flop_counter import FlopCounterMode
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from imagine_flash.denoisers import Cond
from imagine_flash.losses.discriminator import UNetEncoderDiscriminator

SD15 = dict(sample_size=64, cross_attention_dim=768, attention_head_dim=8)  # the rest are diffusers' defaults
SDXL = dict(sample_size=128, block_out_channels=(320, 640, 1280), transformer_layers_per_block=(1, 2, 10),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(5, 10, 20),
            cross_attention_dim=2048, addition_embed_type="text_time", addition_time_embed_dim=256,
            projection_class_embeddings_input_dim=2816, use_linear_projection=True)
VAE = dict(block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
           up_block_types=("UpDecoderBlock2D",) * 4, layers_per_block=2, latent_channels=4)
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12)
CLIP_G = dict(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=20,
              projection_dim=1280)


def n_params(m, trainable_only=False) -> float:
    return sum(p.numel() for p in m.parameters() if p.requires_grad or not trainable_only) / 1e9


def gflops(fn) -> float:
    fc = FlopCounterMode(display=False)
    with torch.no_grad(), fc:
        fn()
    return fc.get_total_flops() / 1e9


def saved_gb(fn, module) -> float:
    """GB of tensors autograd keeps for backward in one forward (parameters excluded, each tensor once)."""
    params = {id(p) for p in module.parameters()}
    seen, keep, total = set(), [], [0]

    def pack(t):
        base = t._base if t._base is not None else t
        if id(t) not in params and id(base) not in params and id(base) not in seen:
            seen.add(id(base))
            keep.append(base)
            total[0] += base.numel() * base.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return total[0] / 1e9


def costs(unet_cfg: dict, resolution: int, text_cfgs: list) -> dict:
    from peft import LoraConfig

    with torch.device("meta"):
        unet, vae = UNet2DConditionModel(**unet_cfg), AutoencoderKL(**VAE)
        disc = UNetEncoderDiscriminator(unet)
        texts = [cls(CLIPTextConfig(**c)) for cls, c in text_cfgs]
        lat = resolution // 8
        x, t = torch.randn(1, 4, lat, lat), torch.tensor([500])
        ehs, img = torch.randn(1, 77, unet_cfg["cross_attention_dim"]), torch.randn(1, 3, resolution, resolution)
        extra = {"text_embeds": torch.randn(1, 1280), "time_ids": torch.randn(1, 6)} if "addition_embed_type" in \
            unet_cfg else {}

    def unet_fwd():
        return unet(x, t, ehs, added_cond_kwargs=extra).sample

    def disc_fwd():
        return disc(x, t, Cond(ehs, None, extra))

    out = {"params_unet_B": n_params(unet), "params_disc_B": n_params(disc), "params_vae_B": n_params(vae),
           "params_text_B": sum(n_params(m) for m in texts),
           "unet_gflops": gflops(unet_fwd), "disc_gflops": gflops(disc_fwd),
           "vae_encode_gflops": gflops(lambda: vae.encode(img).latent_dist.mean),
           "unet_act_gb": saved_gb(unet_fwd, unet), "disc_act_gb": saved_gb(disc_fwd, disc)}
    disc.enc.enable_gradient_checkpointing()
    disc.train()
    out["disc_act_gb_ckpt"] = saved_gb(disc_fwd, disc)
    unet.enable_gradient_checkpointing()
    unet.train()
    out["unet_act_gb_ckpt"] = saved_gb(unet_fwd, unet)
    unet.disable_gradient_checkpointing()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    out["params_lora64_B"] = n_params(unet, trainable_only=True)
    out["lora_act_gb"] = saved_gb(unet_fwd, unet)
    return {k: round(v, 3) for k, v in out.items()}


if __name__ == "__main__":
    print("float32, batch 1, activations saved for backward (GB):")
    print("sd15 @512", json.dumps(costs(SD15, 512, [(CLIPTextModel, CLIP_L)])))
    print("sdxl @1024", json.dumps(costs(SDXL, 1024, [(CLIPTextModel, CLIP_L),
                                                               (CLIPTextModelWithProjection, CLIP_G)])))
