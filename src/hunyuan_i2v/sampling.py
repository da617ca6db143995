"""Flow-matching sampling as plain functions (spec section 4).

The model predicts the velocity v = noise - data along x_t = (1 - sigma) * data + sigma * noise; sampling walks
sigma from 1 to 0 with Euler steps in fp32. Image conditioning:
- token_replace: latent frame 0 is the clean image latent at every step and is never integrated;
- latent_concat: the model input is [latents | image latent in frame 0, zeros elsewhere | frame-0 mask].
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Optional

import torch
from torch import Tensor

if TYPE_CHECKING:
    from .cache import CachePolicy
    from .parallel import CfgParallel


def shift_sigmas(sigmas: Tensor, shift: float) -> Tensor:
    """sigma' = s * sigma / (1 + (s - 1) * sigma): more steps near sigma = 1 for s > 1."""
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def get_sigmas(steps: int, shift: float) -> Tensor:
    """steps + 1 shifted sigmas from 1 to 0 in fp32 (the official schedule with --flow-reverse)."""
    if steps < 1:
        raise ValueError(f"steps must be at least 1, got {steps}")
    return shift_sigmas(torch.linspace(1.0, 0.0, steps + 1, dtype=torch.float32), shift)


def timesteps_from_sigmas(sigmas: Tensor) -> Tensor:
    """The model's t input: sigma x 1000 for every step (the final sigma = 0 is not a step)."""
    return sigmas[:-1] * 1000.0


def euler_step(x: Tensor, velocity: Tensor, sigma: float | Tensor, sigma_next: float | Tensor) -> Tensor:
    """One Euler update in fp32: x + v * (sigma_next - sigma)."""
    return (x.float() + velocity.float() * (sigma_next - sigma)).to(x.dtype)


def guidance_tensor(scale: float, batch: int, device=None, bf16_round: bool = True) -> Tensor:
    """Embedded guidance input = scale x 1000, rounded through bf16 as the official pipeline (and training) did.

    6.0 x 1000 becomes 6016 this way (spec 1.3); pass bf16_round=False for the exact value.
    """
    g = torch.full((batch,), scale * 1000.0, dtype=torch.float32, device=device)
    return g.to(torch.bfloat16).float() if bf16_round else g


@dataclass
class TextConditioning:
    """What the transformer reads from the prompt (one row per video)."""

    text_states: Tensor  # [B, L, D]
    text_mask: Tensor  # [B, L]
    text_states_2: Tensor  # [B, D2] (CLIP pooled)

    def cat(self, other: "TextConditioning") -> "TextConditioning":
        return TextConditioning(
            torch.cat([self.text_states, other.text_states]),
            torch.cat([self.text_mask, other.text_mask]),
            torch.cat([self.text_states_2, other.text_states_2]),
        )


StepCallback = Callable[[int, int, Tensor], None]  # (step index, total steps, current latents)


def latent_concat_input(latents: Tensor, image_latents: Tensor) -> Tensor:
    """33-channel input of the legacy model: [noisy | image latent on frame 0 | frame-0 mask]."""
    cond = torch.zeros_like(latents)
    cond[:, :, :1] = image_latents[:, :, :1].to(latents.dtype)
    mask = torch.zeros_like(latents[:, :1])
    mask[:, :, :1] = 1.0
    return torch.cat([latents, cond, mask], dim=1)


def denoise(
    model: Callable[..., Tensor],
    latents: Tensor,
    image_latents: Tensor,
    cond: TextConditioning,
    sigmas: Tensor,
    *,
    condition_type: Optional[str] = "token_replace",
    guidance: Optional[Tensor] = None,
    uncond: Optional[TextConditioning] = None,
    cfg_scale: float = 1.0,
    callback: Optional[StepCallback] = None,
    cache: Optional[CachePolicy] = None,
    cfg_parallel: Optional[CfgParallel] = None,
) -> Tensor:
    """Run the Euler sampler and return the final latents [B, C, T, H, W] (fp32).

    latents: initial noise (or the stability mix), fp32; image_latents: [B, C, 1, H, W] scaled image latents.
    With ``uncond`` and cfg_scale > 1, real classifier-free guidance pred = u + s * (c - u) runs as one batch of 2B.
    ``cache``: a step-caching policy (:mod:`hunyuan_i2v.cache`) that may skip the block stack on some steps, per
    half of the CFG batch; None runs every step in full.
    ``cfg_parallel`` (:mod:`hunyuan_i2v.parallel`): with real CFG, this process runs only its half (conditional or
    unconditional) and the two velocities are exchanged; every process of the pair gets the same latents.
    """
    use_cfg = uncond is not None and cfg_scale > 1.0
    split_cfg = use_cfg and cfg_parallel is not None
    if split_cfg and cache is not None:
        raise ValueError("step caching decides per CFG half: it cannot run with the halves on separate processes")
    batched_cfg = use_cfg and not split_cfg  # the two halves in one batch of 2B
    if split_cfg:
        text = cond if cfg_parallel.half == 0 else uncond
    else:
        text = cond.cat(uncond) if use_cfg else cond
    latents = latents.float().clone()
    image_latents = image_latents.float()
    if condition_type == "token_replace":
        latents[:, :, :1] = image_latents
    steps = len(sigmas) - 1
    if cache is not None:
        from .cache import CachedForward

        model = CachedForward(model, cache, steps, halves=2 if use_cfg else 1)
    for i in range(steps):
        sigma, sigma_next = sigmas[i], sigmas[i + 1]
        x_in = latent_concat_input(latents, image_latents) if condition_type == "latent_concat" else latents
        if batched_cfg:
            x_in = torch.cat([x_in, x_in])
        t = torch.full((x_in.shape[0],), float(sigma) * 1000.0, device=latents.device)
        g = None if guidance is None else guidance.to(latents.device).repeat(2 if batched_cfg else 1)
        v = model(x_in, t, text.text_states, text.text_mask, text.text_states_2, guidance=g).float()
        if split_cfg:
            v = cfg_parallel.gather(v)  # [v_cond; v_uncond], the same on both processes
        if use_cfg:
            v_cond, v_uncond = v.chunk(2)
            v = v_uncond + cfg_scale * (v_cond - v_uncond)
        if condition_type == "token_replace":
            latents[:, :, 1:] = euler_step(latents[:, :, 1:], v[:, :, 1:], sigma, sigma_next)
        else:
            latents = euler_step(latents, v, sigma, sigma_next)
        if callback is not None:
            callback(i, steps, latents)
    return latents
