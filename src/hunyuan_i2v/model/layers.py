"""Building blocks of the HunyuanVideo transformer: attention, RoPE, embedders, norms, the token refiner.

Parameter names follow the official checkpoint (spec section 1.9) so its state dict loads unchanged.
Tensors inside attention are laid out [batch, heads, tokens, head_dim].
"""

from __future__ import annotations

import logging
import math
from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import Tensor, nn

logger = logging.getLogger(__name__)

# ---------------------------------------------------------------------------------------------
# Attention: one entry point, backends behind it.

AttentionFn = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {"sdpa": _sdpa}
_DEFAULT_BACKEND = "sdpa"


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None, backend: Optional[str] = None) -> Tensor:
    """Scaled dot-product attention over [B, H, L, D] tensors.

    ``mask`` is boolean (True = may attend), broadcastable to [B, H, Lq, Lk]; a key-padding mask is [B, 1, 1, Lk].
    """
    name = backend or _DEFAULT_BACKEND
    try:
        fn = ATTENTION_BACKENDS[name]
    except KeyError:
        raise ValueError(f"unknown attention backend {name!r}; available: {', '.join(ATTENTION_BACKENDS)}") from None
    return fn(q, k, v, mask)


def key_padding_mask(img_len: int, text_mask: Tensor) -> Optional[Tensor]:
    """Boolean [B, 1, 1, img_len + L_text] mask letting every query see image tokens and valid text tokens.

    Equivalent to the official flash-attn varlen segments (spec 1.7) for all queries whose output is used.
    Returns None when nothing is padded, so SDPA can take its fastest kernel.
    """
    valid = text_mask.bool()
    if bool(valid.all()):
        return None
    b = valid.shape[0]
    img = torch.ones(b, img_len, dtype=torch.bool, device=valid.device)
    return torch.cat([img, valid], dim=1)[:, None, None, :]


# ---------------------------------------------------------------------------------------------
# Rotary position embedding (spec 1.8): 3D, per-axis dims, interleaved pairs, image tokens only.


def rope_frequencies(
    grid: tuple[int, int, int],
    axes_dim: tuple[int, ...],
    theta: float = 256.0,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor]:
    """cos and sin tables [N, sum(axes_dim)] for a t-major flattened (t, h, w) token grid, in fp32."""
    coords = torch.meshgrid(*[torch.arange(n, device=device, dtype=torch.float32) for n in grid], indexing="ij")
    cos_parts, sin_parts = [], []
    for pos, dim in zip(coords, axes_dim):
        freqs = 1.0 / (theta ** (torch.arange(0, dim, 2, device=device, dtype=torch.float32)[: dim // 2] / dim))
        angles = torch.outer(pos.reshape(-1), freqs)  # [N, dim/2]
        cos_parts.append(angles.cos().repeat_interleave(2, dim=1))
        sin_parts.append(angles.sin().repeat_interleave(2, dim=1))
    return torch.cat(cos_parts, dim=1), torch.cat(sin_parts, dim=1)


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """Rotate interleaved pairs (x0, x1) -> (x0 cos - x1 sin, x1 cos + x0 sin); x is [..., N, D]; fp32 math."""
    xf = x.float()
    pairs = xf.unflatten(-1, (-1, 2))
    rotated = torch.stack([-pairs[..., 1], pairs[..., 0]], dim=-1).flatten(-2)
    return (xf * cos + rotated * sin).to(x.dtype)


# ---------------------------------------------------------------------------------------------
# Embedders


def timestep_embedding(t: Tensor, dim: int = 256, max_period: float = 10000.0) -> Tensor:
    """Sinusoidal embedding in fp32 with the official [cos, sin] order (spec 1.3)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoid(256) -> Linear -> SiLU -> Linear. Used for time_in, guidance_in and the refiner's t_embedder."""

    def __init__(self, hidden_size: int, freq_dim: int = 256, device=None, dtype=None):
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(
            nn.Linear(freq_dim, hidden_size, device=device, dtype=dtype),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size, device=device, dtype=dtype),
        )

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_embedding(t, self.freq_dim).to(self.mlp[0].weight.dtype))


class MLPEmbedder(nn.Module):
    """vector_in: the CLIP pooled vector -> hidden."""

    def __init__(self, in_dim: int, hidden_size: int, device=None, dtype=None):
        super().__init__()
        self.in_layer = nn.Linear(in_dim, hidden_size, device=device, dtype=dtype)
        self.out_layer = nn.Linear(hidden_size, hidden_size, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.out_layer(F.silu(self.in_layer(x)))


class PatchEmbed(nn.Module):
    """img_in: Conv3d with kernel = stride = patch size, tokens flattened t-major."""

    def __init__(self, patch_size: tuple[int, int, int], in_channels: int, hidden_size: int, device=None, dtype=None):
        super().__init__()
        self.proj = nn.Conv3d(in_channels, hidden_size, patch_size, stride=patch_size, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


# ---------------------------------------------------------------------------------------------
# Norms, modulation, MLP


class RMSNorm(nn.Module):
    """RMSNorm over the last dim, normalised in fp32 then cast back before the weight (official order)."""

    def __init__(self, dim: int, eps: float = 1e-6, device=None, dtype=None):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, device=device, dtype=dtype))

    def forward(self, x: Tensor) -> Tensor:
        xf = x.float()
        normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return normed.to(x.dtype) * self.weight


class Modulation(nn.Module):
    """SiLU -> Linear(hidden, factor * hidden): the adaLN parameters of a block (``*_mod.linear``)."""

    def __init__(self, hidden_size: int, factor: int, device=None, dtype=None):
        super().__init__()
        self.factor = factor
        self.linear = nn.Linear(hidden_size, factor * hidden_size, device=device, dtype=dtype)

    def forward(self, vec: Tensor) -> list[Tensor]:
        """Chunks, each [B, 1, hidden] so they broadcast over tokens."""
        return self.linear(F.silu(vec))[:, None, :].chunk(self.factor, dim=-1)


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    return torch.addcmul(shift, x, 1 + scale)


class MLP(nn.Module):
    def __init__(self, hidden_size: int, mlp_hidden: int, act: Callable[[Tensor], Tensor], device=None, dtype=None):
        super().__init__()
        self.fc1 = nn.Linear(hidden_size, mlp_hidden, device=device, dtype=dtype)
        self.fc2 = nn.Linear(mlp_hidden, hidden_size, device=device, dtype=dtype)
        self.act = act

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


def gelu_tanh(x: Tensor) -> Tensor:
    return F.gelu(x, approximate="tanh")


def split_heads(qkv: Tensor, num_heads: int) -> tuple[Tensor, Tensor, Tensor]:
    """[B, L, 3*H*D] with rows ordered [q | k | v], heads contiguous -> three [B, H, L, D] tensors."""
    b, n, _ = qkv.shape
    q, k, v = qkv.view(b, n, 3, num_heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
    return q, k, v


def merge_heads(x: Tensor) -> Tensor:
    """[B, H, L, D] -> [B, L, H*D]."""
    return x.transpose(1, 2).flatten(2)


# ---------------------------------------------------------------------------------------------
# Token refiner (txt_in, spec 1.3)


class TextProjection(nn.Module):
    """c_embedder: Linear -> SiLU -> Linear on the masked mean of the raw text states."""

    def __init__(self, in_dim: int, hidden_size: int, device=None, dtype=None):
        super().__init__()
        self.linear_1 = nn.Linear(in_dim, hidden_size, device=device, dtype=dtype)
        self.linear_2 = nn.Linear(hidden_size, hidden_size, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class RefinerBlock(nn.Module):
    """IndividualTokenRefinerBlock: self-attention and SiLU MLP, each behind a gate from the conditioning."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float, device=None, dtype=None):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = nn.LayerNorm(hidden_size, eps=1e-6, device=device, dtype=dtype)
        self.self_attn_qkv = nn.Linear(hidden_size, 3 * hidden_size, device=device, dtype=dtype)
        self.self_attn_proj = nn.Linear(hidden_size, hidden_size, device=device, dtype=dtype)
        self.norm2 = nn.LayerNorm(hidden_size, eps=1e-6, device=device, dtype=dtype)
        self.mlp = MLP(hidden_size, int(hidden_size * mlp_ratio), F.silu, device=device, dtype=dtype)
        self.adaLN_modulation = nn.Sequential(
            nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, device=device, dtype=dtype)
        )

    def forward(self, x: Tensor, c: Tensor, mask: Optional[Tensor]) -> Tensor:
        gate_msa, gate_mlp = self.adaLN_modulation(c)[:, None, :].chunk(2, dim=-1)
        q, k, v = split_heads(self.self_attn_qkv(self.norm1(x)), self.num_heads)
        x = x + gate_msa * self.self_attn_proj(merge_heads(attention(q, k, v, mask)))
        return x + gate_mlp * self.mlp(self.norm2(x))


class IndividualTokenRefiner(nn.Module):
    def __init__(self, hidden_size: int, num_heads: int, depth: int, mlp_ratio: float, device=None, dtype=None):
        super().__init__()
        self.blocks = nn.ModuleList(
            RefinerBlock(hidden_size, num_heads, mlp_ratio, device=device, dtype=dtype) for _ in range(depth)
        )

    def forward(self, x: Tensor, c: Tensor, text_mask: Optional[Tensor]) -> Tensor:
        mask = None
        if text_mask is not None:
            m = text_mask.bool()
            mask = (m[:, None, :, None] & m[:, None, None, :]).clone()
            mask[..., 0] = True  # every row attends to token 0, so padding rows never become NaN
        for block in self.blocks:
            x = block(x, c, mask)
        return x


class SingleTokenRefiner(nn.Module):
    """txt_in: projects MLLM states to the hidden size and refines them, conditioned on t and the pooled text."""

    def __init__(self, in_dim: int, hidden_size: int, num_heads: int, depth: int, mlp_ratio: float = 4.0,
                 device=None, dtype=None):
        super().__init__()
        self.input_embedder = nn.Linear(in_dim, hidden_size, device=device, dtype=dtype)
        self.t_embedder = TimestepEmbedder(hidden_size, device=device, dtype=dtype)
        self.c_embedder = TextProjection(in_dim, hidden_size, device=device, dtype=dtype)
        self.individual_token_refiner = IndividualTokenRefiner(
            hidden_size, num_heads, depth, mlp_ratio, device=device, dtype=dtype
        )

    def forward(self, x: Tensor, t: Tensor, text_mask: Optional[Tensor]) -> Tensor:
        if text_mask is None:
            pooled = x.mean(dim=1)
        else:
            w = text_mask.float().unsqueeze(-1)
            pooled = ((x.float() * w).sum(dim=1) / w.sum(dim=1)).to(x.dtype)
        c = self.t_embedder(t) + self.c_embedder(pooled)
        return self.individual_token_refiner(self.input_embedder(x), c, text_mask)
