"""§5.1 adversarial loss: a U-Net-encoder discriminator built from the teacher (UFOGen, SDXL-Lightning), hinge loss."""
from __future__ import annotations

import copy

import torch
from torch import nn

from ..denoisers import Cond
from ..rng import randn
from ..schedule import Schedule, q_sample


class UNetEncoderDiscriminator(nn.Module):
    """The teacher UNet's encoder (conv_in, time embedding, down blocks, mid block; weights copied, trainable) with a
    light conv head on every down-block output and on the mid block. Timestep- and text-conditioned.

    Returns a per-sample logit: the mean of each head's patch logits, summed over heads. frozen_trunk: the encoder
    stays the teacher's and only the heads train (the teacher's features as a projected discriminator, as LADD).
    """

    def __init__(self, unet: nn.Module, head_channels: int = 64, frozen_trunk: bool = False):
        super().__init__()
        enc = copy.deepcopy(getattr(unet, "module", unet)).float().requires_grad_(not frozen_trunk)
        enc.up_blocks = nn.ModuleList()  # the decoder half is not used
        enc.conv_norm_out = enc.conv_act = enc.conv_out = None
        self.enc = enc
        chans = [blk.resnets[-1].out_channels for blk in enc.down_blocks] + [enc.mid_block.resnets[-1].out_channels]
        self.heads = nn.ModuleList(
            nn.Sequential(nn.GroupNorm(min(8, c), c), nn.SiLU(), nn.Conv2d(c, head_channels, 3, padding=1), nn.SiLU(),
                          nn.Conv2d(head_channels, 1, 1)) for c in chans)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        e = self.enc
        ehs, mask = cond.hidden, cond.mask
        if mask is not None:  # the same bias the UNet builds from encoder_attention_mask
            mask = ((1 - mask.to(x_t.dtype)) * -10000.0).unsqueeze(1)
        # Time (and SDXL's added) embedding, through the UNet's own helpers.
        emb = e.time_embedding(e.get_time_embed(sample=x_t, timestep=t))
        aug = e.get_aug_embed(emb=emb, encoder_hidden_states=ehs, added_cond_kwargs=cond.extra or {})
        emb = emb + aug if aug is not None else emb
        if e.time_embed_act is not None:
            emb = e.time_embed_act(emb)
        ehs = e.process_encoder_hidden_states(encoder_hidden_states=ehs, added_cond_kwargs=cond.extra or {})
        h = e.conv_in(x_t)
        feats = []
        for blk in e.down_blocks:
            if getattr(blk, "has_cross_attention", False):
                h, _ = blk(hidden_states=h, temb=emb, encoder_hidden_states=ehs, encoder_attention_mask=mask)
            else:
                h, _ = blk(hidden_states=h, temb=emb)
            feats.append(h)
        if getattr(e.mid_block, "has_cross_attention", False):
            h = e.mid_block(h, emb, encoder_hidden_states=ehs, encoder_attention_mask=mask)
        else:
            h = e.mid_block(h, emb)
        feats.append(h)
        return sum(head(f).mean(dim=(1, 2, 3)) for head, f in zip(self.heads, feats))  # (B,)


class TransformerDiscriminator(nn.Module):
    """For an SD3 or FLUX teacher (as LADD and SANA-Sprint do): the teacher transformer's embeddings and first
    `n_blocks` joint blocks as a frozen trunk (float32 copy), with a trainable head on the image tokens after each.
    Conditioned on the timestep (sigma), the prompt and its pooled embedding (and FLUX's guidance) through the
    trunk's own embeddings. Gradients reach the input (the student's x0) through the frozen trunk.

    Returns a per-sample logit: the mean of each head's token logits, summed over heads.
    """

    def __init__(self, transformer: nn.Module, n_blocks: int = 2, head_dim: int = 64):
        super().__init__()
        from ..denoisers import net_kind

        base = getattr(transformer, "module", transformer)
        self.kind = net_kind(base)
        trunk = copy.deepcopy(base).float().requires_grad_(False).eval()
        trunk.transformer_blocks = trunk.transformer_blocks[:n_blocks]
        if hasattr(trunk, "single_transformer_blocks"):  # FLUX: only its first joint blocks are kept
            trunk.single_transformer_blocks = nn.ModuleList()
        trunk.norm_out = trunk.proj_out = None  # the output half is not used
        self.trunk = trunk
        dim = trunk.config.num_attention_heads * trunk.config.attention_head_dim
        self.heads = nn.ModuleList(nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, head_dim), nn.SiLU(),
                                                 nn.Linear(head_dim, 1)) for _ in trunk.transformer_blocks)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, cond: Cond) -> torch.Tensor:
        """t: the network's timestep input, sigma * T (HingeAdversarial passes schedule.net_t)."""
        from ..denoisers import flux_image_ids, pack_latents

        tr, pooled, ehs = self.trunk, cond.extra["pooled_projections"], cond.hidden
        t = torch.as_tensor(t, device=x_t.device, dtype=torch.float32).expand(x_t.shape[0])  # sigma * T
        kw = {}
        if self.kind == "flux":
            H, W = x_t.shape[-2:]
            h = tr.x_embedder(pack_latents(x_t))
            g = cond.extra.get("guidance")
            temb = tr.time_text_embed(t, pooled) if g is None else tr.time_text_embed(t, g.float() * 1000, pooled)
            ids = torch.cat([torch.zeros(ehs.shape[1], 3, device=x_t.device), flux_image_ids(H, W, x_t.device,
                                                                                          torch.float32)])
            kw["image_rotary_emb"] = tr.pos_embed(ids)
        else:
            h = tr.pos_embed(x_t).contiguous()
            temb = tr.time_text_embed(t, pooled)
        ehs = tr.context_embedder(ehs)
        logit = 0.0
        for block, head in zip(tr.transformer_blocks, self.heads):
            ehs, h = block(hidden_states=h, encoder_hidden_states=ehs, temb=temb, **kw)
            logit = logit + head(h).mean(dim=(1, 2))
        return logit  # (B,)


def approx_r1(d_real: torch.Tensor, d_perturbed: torch.Tensor) -> torch.Tensor:
    """Approximated R1 (APT, Lin et al. 2025, Eq. 4): (D(x) - D(x + sigma n))^2 on real x, per sample (B,)."""
    return (d_real - d_perturbed).square()


class HingeAdversarial:
    """Hinge GAN loss on samples re-noised to a random t_d in [0, t_max] (the same t_d and noise for real and fake).

    r1 > 0 adds r1 * approx_r1 on the real inputs, perturbed by r1_sigma * n: a finite-difference stand-in for the
    R1 gradient penalty (Mescheder et al. 2018) that needs no double backward through the discriminator.
    mismatch > 0 adds mismatch * relu(1 + D(real, another sample's prompt)): the matching-aware discriminator of
    GAN-INT-CLS (Reed et al. 2016), which must then judge the image *and* its prompt, and so pushes the generator
    towards its prompt too. The other prompt is the batch's rolled by one (no random draw).
    """

    def __init__(self, schedule: Schedule, t_max: int = 500, r1: float = 0.0, r1_sigma: float = 0.01,
                 mismatch: float = 0.0):
        self.schedule, self.t_max, self.r1, self.r1_sigma = schedule, t_max, r1, r1_sigma
        self.mismatch = mismatch

    def _noised(self, x0: torch.Tensor, gen: torch.Generator):
        B = x0.shape[0]
        t_d = self.schedule.random_t(self.t_max, B, gen, x0.device)  # a flow path: sigma in [0, t_max / T]
        eps = randn(x0.shape, gen).to(x0)
        return t_d, eps

    def generator(self, disc, x0_fake: torch.Tensor, cond: Cond, gen: torch.Generator) -> torch.Tensor:
        """Generator hinge term: -D(q(x0_fake, eps, t_d)). Per sample (B,)."""
        t_d, eps = self._noised(x0_fake, gen)
        x = q_sample(x0_fake, eps, self.schedule.alpha(t_d), self.schedule.sigma(t_d))
        return -disc(x, self.schedule.net_t(t_d), cond)

    def discriminator(self, disc, x0_real: torch.Tensor, x0_fake: torch.Tensor, cond_real: Cond, cond_fake: Cond,
                      gen: torch.Generator, fake_weight: torch.Tensor | None = None) -> torch.Tensor:
        """Discriminator hinge loss: relu(1 - D(real)) + w relu(1 + D(fake)) (+ r1 * approx_r1, + mismatch *
        relu(1 + D(real, rolled prompts))). Per sample (B,)."""
        t_d, eps = self._noised(x0_real, gen)
        a, s = self.schedule.alpha(t_d), self.schedule.sigma(t_d)
        t_net = self.schedule.net_t(t_d)  # the network's timestep input (sigma * T on a flow path)
        x_real = q_sample(x0_real, eps, a, s)
        d_real = disc(x_real, t_net, cond_real)
        d_fake = disc(q_sample(x0_fake.detach(), eps, a, s), t_net, cond_fake)
        loss_fake = torch.relu(1 + d_fake)
        loss = torch.relu(1 - d_real) + (loss_fake if fake_weight is None else fake_weight * loss_fake)
        if self.r1 > 0:  # drawn only then: runs without it keep their random stream
            n = randn(x0_real.shape, gen).to(x0_real)
            loss = loss + self.r1 * approx_r1(d_real, disc(x_real + self.r1_sigma * n, t_net, cond_real))
        if self.mismatch > 0:
            if x0_real.shape[0] < 2:
                raise ValueError("disc_mismatch needs at least 2 samples per micro-batch (it pairs each real image "
                                 "with another sample's prompt)")
            wrong = cond_real[torch.roll(torch.arange(x0_real.shape[0], device=x0_real.device), 1)]
            loss = loss + self.mismatch * torch.relu(1 + disc(x_real, t_net, wrong))
        return loss
