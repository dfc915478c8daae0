"""Parameters, FLOPs per forward and activation memory of SD 1.5, SDXL, SD3.5-medium and FLUX.1-dev, for the cost
tables of docs/costs.md and docs/flow.md.

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


def checkpointed_and_lora(net, fwd, name: str) -> dict:
    """Activations with gradient checkpointing; then a rank-64 LoRA's trainable parameters and activations."""
    from peft import LoraConfig

    net.enable_gradient_checkpointing()
    net.train()
    out = {f"{name}_act_gb_ckpt": saved_gb(fwd, net)}
    net.disable_gradient_checkpointing()
    net.requires_grad_(False)
    net.add_adapter(LoraConfig(r=64, lora_alpha=64, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    return {**out, "params_lora64_B": n_params(net, trainable_only=True), "lora_act_gb": saved_gb(fwd, net)}


SD35M = dict(sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64,
             num_attention_heads=24, joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048,
             out_channels=16, pos_embed_max_size=384, dual_attention_layers=tuple(range(13)), qk_norm="rms_norm")
FLUX_DEV = dict(patch_size=1, in_channels=64, num_layers=19, num_single_layers=38, attention_head_dim=128,
                num_attention_heads=24, joint_attention_dim=4096, pooled_projection_dim=768, guidance_embeds=True,
                axes_dims_rope=(16, 56, 56))
VAE16 = {**VAE, "latent_channels": 16}  # SD3's and FLUX's VAE


def flow_costs(kind: str, resolution: int = 1024) -> dict:
    """The transformer, the transformer-block discriminator (2 blocks + heads) and a rank-64 LoRA of an SD3.5-medium
    ('sd3', 77 CLIP + 256 T5 tokens) or FLUX.1-dev ('flux', 512 T5 tokens) teacher, at `resolution`."""
    from diffusers import FluxTransformer2DModel, SD3Transformer2DModel

    from imagine_flash.denoisers import _call_net
    from imagine_flash.losses.discriminator import TransformerDiscriminator

    lat = resolution // 8
    with torch.device("meta"):
        net = SD3Transformer2DModel(**SD35M) if kind == "sd3" else FluxTransformer2DModel(**FLUX_DEV)
        vae = AutoencoderKL(**VAE16)
        disc = TransformerDiscriminator(net, n_blocks=2)
        x, t = torch.randn(1, 16, lat, lat), torch.tensor([0.5])
        extra = {"pooled_projections": torch.randn(1, 2048 if kind == "sd3" else 768)}
        if kind == "flux":
            extra["guidance"] = torch.tensor([3.5])
        cond = Cond(torch.randn(1, 333 if kind == "sd3" else 512, 4096), None, extra)
        img = torch.randn(1, 3, resolution, resolution)

    def fwd():
        return _call_net(net, x, t, cond)

    def disc_fwd():  # the generator term: gradients reach the input through the frozen trunk
        return disc(x.requires_grad_(True), t, cond)

    out = {"params_net_B": n_params(net), "params_disc_B": n_params(disc),
           "params_disc_heads_M": n_params(disc, trainable_only=True) * 1e3,
           "net_gflops": gflops(fwd), "disc_gflops": gflops(disc_fwd),
           "vae_encode_gflops": gflops(lambda: vae.encode(img).latent_dist.mean),
           "net_act_gb": saved_gb(fwd, net), "disc_act_gb": saved_gb(disc_fwd, disc)}
    out.update(checkpointed_and_lora(net, fwd, "net"))
    return {k: round(v, 3) for k, v in out.items()}


def costs(unet_cfg: dict, resolution: int, text_cfgs: list) -> dict:
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
    out.update(checkpointed_and_lora(unet, unet_fwd, "unet"))
    return {k: round(v, 3) for k, v in out.items()}


if __name__ == "__main__":
    import sys
    if "--flow" in sys.argv:  # the flow teachers only
        print("sd3.5-medium @1024", json.dumps(flow_costs("sd3")))
        print("flux.1-dev @1024", json.dumps(flow_costs("flux")))
        sys.exit()
    print("float32, batch 1, activations saved for backward (GB):")
    print("sd15 @512", json.dumps(costs(SD15, 512, [(CLIPTextModel, CLIP_L)])))
    print("sdxl @1024", json.dumps(costs(SDXL, 1024, [(CLIPTextModel, CLIP_L),
                                                               (CLIPTextModelWithProjection, CLIP_G)])))
    print("sd3.5-medium @1024", json.dumps(flow_costs("sd3")))
    print("flux.1-dev @1024", json.dumps(flow_costs("flux")))
