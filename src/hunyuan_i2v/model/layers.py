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
#
# Every backend takes q, k, v as [B, H, L, D] and an optional mask broadcastable to [B, H, Lq, Lk]: boolean
# (True = may attend) or additive float. Text padding reaches the DiT blocks as a boolean key-padding mask
# [B, 1, 1, Lk] (see ``key_padding_mask``), which flash-attn and SageAttention express by dropping the padded
# keys; other masks (the token refiner's [B, 1, L, L]) go to SDPA. Spec 1.7 describes the official varlen call.

AttentionFn = Callable[[Tensor, Tensor, Tensor, Optional[Tensor]], Tensor]

# Keys of the messages already logged by ``_log_once`` (a per-call fallback should not log on every block).
_LOGGED_ONCE: set[str] = set()

# Bytes one query chunk's fp32 score matrix may take in the chunked backend ("chunked:<MiB>" overrides it).
DEFAULT_CHUNK_SCORE_BYTES = 256 * 2**20

_HALF = (torch.float16, torch.bfloat16)


def _log_once(level: int, key: str, msg: str, *args) -> None:
    if key not in _LOGGED_ONCE:
        _LOGGED_ONCE.add(key)
        logger.log(level, msg, *args)


def _sdpa(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def key_padding_keys(mask: Optional[Tensor], batch: int) -> Optional[Tensor]:
    """The [B, Lk] boolean 'key is valid' table if ``mask`` is a boolean key-padding mask [B or 1, 1, 1, Lk].

    Returns None for any other mask (per-query masks, float masks), which kernels without mask support hand to SDPA.
    """
    if mask is None or mask.dtype != torch.bool or mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[2] != 1:
        return None
    return mask[:, 0, 0, :].expand(batch, -1)


def attention_chunk_size(batch_heads: int, kv_len: int, max_score_bytes: int = DEFAULT_CHUNK_SCORE_BYTES) -> int:
    """Queries per chunk so that one chunk's fp32 scores [batch_heads, chunk, kv_len] fit in ``max_score_bytes``."""
    return max(1, max_score_bytes // (4 * batch_heads * kv_len))


def chunked_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    mask: Optional[Tensor] = None,
    *,
    chunk_size: Optional[int] = None,
    max_score_bytes: int = DEFAULT_CHUNK_SCORE_BYTES,
) -> Tensor:
    """Exact softmax attention computed a chunk of queries at a time; never holds an Lq x Lk score matrix.

    For devices where SDPA has no memory-efficient kernel. Scores, softmax and the value sum are computed in fp32
    whatever the input dtype (fp16/bf16 inputs cost an fp32 copy of k and v, O(L), not O(L^2)); the result has
    q's dtype. ``chunk_size`` defaults to the largest chunk whose scores fit in ``max_score_bytes``. Rows with no
    allowed key give zeros, as SDPA does.
    """
    b, h, lq, d = q.shape
    lk = k.shape[-2]
    if chunk_size is None:
        chunk_size = attention_chunk_size(b * h, lk, max_score_bytes)
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive number of queries, got {chunk_size}")
    scale = 1.0 / math.sqrt(d)
    kt = k.float().transpose(-1, -2)
    vf = v.float()
    if mask is not None and mask.dim() < 4:
        mask = mask.view((1,) * (4 - mask.dim()) + tuple(mask.shape))
    per_query_mask = mask is not None and mask.shape[-2] != 1
    out = q.new_empty(b, h, lq, v.shape[-1])
    for start in range(0, lq, chunk_size):
        stop = min(start + chunk_size, lq)
        scores = torch.matmul(q[:, :, start:stop].float() * scale, kt)  # [B, H, chunk, Lk], the only big buffer
        if mask is not None:
            m = mask[:, :, start:stop] if per_query_mask else mask
            if m.dtype == torch.bool:
                scores.masked_fill_(~m, float("-inf"))
            else:
                scores.add_(m)
        # In-place softmax: subtract the row max, exponentiate, normalise after the value sum (c x D, not c x Lk).
        row_max = scores.amax(dim=-1, keepdim=True).nan_to_num_(neginf=0.0)
        weights = scores.sub_(row_max).exp_()
        denom = weights.sum(dim=-1, keepdim=True).clamp_(min=torch.finfo(torch.float32).tiny)
        out[:, :, start:stop] = torch.matmul(weights, vf).div_(denom)
        del scores, weights
    return out


def _chunked(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    return chunked_attention(q, k, v, mask)


# --- optional kernels: found at call time, so importing this module never needs them ---------------------------


def _cuda_half_problem(device: torch.device, dtype: Optional[torch.dtype]) -> Optional[str]:
    if device.type != "cuda" or (dtype is not None and dtype not in _HALF):
        got = f"{device.type}" + (f", {dtype}" if dtype is not None else "")
        return f"needs a CUDA device with fp16/bf16 (got {got}); use --attention sdpa or chunked elsewhere"
    return None


def _flash_functions(device: Optional[torch.device] = None) -> tuple[Optional[tuple[Callable, Callable]], str]:
    """((flash_attn_func, flash_attn_varlen_func), "") from flash-attn 3 (Hopper) or 2, else (None, why not)."""
    import importlib
    problems = []
    hopper = device is not None and device.type == "cuda" and torch.cuda.get_device_capability(device)[0] == 9
    candidates = (["flash_attn_interface"] if hopper else []) + ["flash_attn"]
    for module_name in candidates:
        try:
            mod = importlib.import_module(module_name)
            return (mod.flash_attn_func, mod.flash_attn_varlen_func), ""
        except ModuleNotFoundError as e:
            if e.name == module_name:  # not installed; a missing dependency of it is reported below
                continue
            problems.append(f"{module_name} failed to import ({e})")
        except Exception as e:  # a wheel built for another torch/CUDA fails here, with undefined symbols
            problems.append(f"{module_name} failed to import ({type(e).__name__}: {e})")
    if problems:
        return None, "; ".join(problems) + "; reinstall flash-attn built for this torch: pip install flash-attn"
    return None, "flash-attn is not installed: pip install flash-attn --no-build-isolation (needs CUDA torch)"


def _sage_function() -> tuple[Optional[Callable], str]:
    try:
        from sageattention import sageattn
    except ModuleNotFoundError as e:
        if e.name != "sageattention":
            return None, f"sageattention failed to import ({e}); install what it needs or: pip install sageattention"
        return None, "SageAttention is not installed: pip install sageattention (needs CUDA torch and triton)"
    except Exception as e:
        return None, f"sageattention failed to import ({type(e).__name__}: {e}); pip install sageattention"
    return sageattn, ""


def _check_inputs(name: str, q: Tensor) -> None:
    problem = _cuda_half_problem(q.device, q.dtype)
    if problem:
        raise ValueError(f"attention backend {name!r} {problem}")


def flash_varlen_attention(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, varlen_fn: Callable) -> Tensor:
    """Key-padded attention through a flash-attn style varlen kernel: padded keys are dropped, not masked.

    ``keys`` is the [B, Lk] valid-key table. Every query is kept (one segment of Lq per sample), so each position
    gets what SDPA with the key-padding mask gives; the official code instead puts padded text queries in a segment
    of their own whose output is discarded (spec 1.7) - the same result for every output that is used.
    """
    b, h, lq, d = q.shape
    lens_k = keys.sum(dim=1, dtype=torch.int32)
    cu_k = F.pad(lens_k.cumsum(0, dtype=torch.int32), (1, 0))
    cu_q = torch.arange(0, (b + 1) * lq, lq, dtype=torch.int32, device=q.device)
    packed_q = q.transpose(1, 2).reshape(b * lq, h, d)
    packed_k = k.transpose(1, 2)[keys]  # [sum(lens_k), H, D]: the padded keys are gone
    packed_v = v.transpose(1, 2)[keys]
    out = varlen_fn(packed_q, packed_k, packed_v, cu_q, cu_k, lq, int(lens_k.max()), causal=False)
    if isinstance(out, tuple):  # flash-attn 3 returns (out, softmax_lse)
        out = out[0]
    return out.view(b, lq, h, -1).transpose(1, 2)


def _flash(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    _check_inputs("flash", q)
    fns, why = _flash_functions(q.device)
    if fns is None:
        raise ValueError(f"attention backend 'flash' is unavailable: {why}")
    dense_fn, varlen_fn = fns
    if mask is None:
        out = dense_fn(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=False)
        return (out[0] if isinstance(out, tuple) else out).transpose(1, 2)
    keys = key_padding_keys(mask, q.shape[0])
    if keys is None:
        _log_once(logging.DEBUG, "flash-mask", "flash attention: a per-query mask is not a varlen shape; using SDPA")
        return _sdpa(q, k, v, mask)
    return flash_varlen_attention(q, k, v, keys, varlen_fn)


def per_sample_key_attention(q: Tensor, k: Tensor, v: Tensor, keys: Tensor, dense_fn: AttentionFn) -> Tensor:
    """Key-padded attention for kernels without masks: each sample attends to its valid keys only.

    Exact (a masked key has zero weight); trailing padding is a slice, anything else a gather. A sample with no
    valid key gets zeros, as SDPA gives.
    """
    out = q.new_zeros(q.shape[:-1] + (v.shape[-1],))
    for i in range(q.shape[0]):
        idx = keys[i].nonzero().squeeze(1)
        n = idx.numel()
        if n == 0:
            continue
        if int(idx[-1]) + 1 == n:  # valid keys are a prefix: a view, no copy
            ki, vi = k[i : i + 1, :, :n], v[i : i + 1, :, :n]
        else:
            ki, vi = k[i : i + 1].index_select(2, idx), v[i : i + 1].index_select(2, idx)
        out[i : i + 1] = dense_fn(q[i : i + 1], ki, vi, None)
    return out


def _sage(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor]) -> Tensor:
    _check_inputs("sage", q)
    sageattn, why = _sage_function()
    if sageattn is None:
        raise ValueError(f"attention backend 'sage' is unavailable: {why}")

    def dense(q_: Tensor, k_: Tensor, v_: Tensor, _mask: Optional[Tensor]) -> Tensor:
        return sageattn(q_, k_, v_, tensor_layout="HND", is_causal=False)

    if mask is None:
        return dense(q, k, v, None)
    keys = key_padding_keys(mask, q.shape[0])
    if keys is None:
        _log_once(logging.DEBUG, "sage-mask", "SageAttention takes no mask; using SDPA for a per-query mask")
        return _sdpa(q, k, v, mask)
    return per_sample_key_attention(q, k, v, keys, dense)


ATTENTION_BACKENDS: dict[str, AttentionFn] = {"sdpa": _sdpa, "flash": _flash, "sage": _sage, "chunked": _chunked}
_DEFAULT_BACKEND = "sdpa"


def _parse_backend(name: str) -> tuple[str, Optional[int]]:
    """'chunked:512' -> ('chunked', 512 MiB in bytes); other names carry no option."""
    base, sep, option = name.partition(":")
    choices = "auto, " + ", ".join(ATTENTION_BACKENDS) + " (or chunked:<MiB of scores per chunk>)"
    if base not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; choose one of: {choices}")
    if not sep:
        return base, None
    if base != "chunked" or not option.isdigit() or int(option) < 1:
        raise ValueError(f"bad attention backend {name!r}: only chunked takes an option, a whole number of MiB "
                         f"(e.g. chunked:512); choose one of: {choices}")
    return base, int(option) * 2**20


def attention(q: Tensor, k: Tensor, v: Tensor, mask: Optional[Tensor] = None,
              backend: Optional[str | AttentionFn] = None) -> Tensor:
    """Scaled dot-product attention over [B, H, L, D] tensors.

    ``mask`` is boolean (True = may attend), broadcastable to [B, H, Lq, Lk]; a key-padding mask is [B, 1, 1, Lk].
    ``backend`` names an entry of ATTENTION_BACKENDS (default "sdpa"); choose it once with
    ``resolve_attention_backend``, which checks that it can run. It may also be an AttentionFn itself, which
    then replaces this function (the sequence-parallel attention of :mod:`hunyuan_i2v.parallel`).
    """
    if callable(backend):
        return backend(q, k, v, mask)
    name, score_bytes = _parse_backend(backend or _DEFAULT_BACKEND)
    if score_bytes is not None:
        return chunked_attention(q, k, v, mask, max_score_bytes=score_bytes)
    return ATTENTION_BACKENDS[name](q, k, v, mask)


def _unavailable_reason(name: str, device: Optional[torch.device], dtype: Optional[torch.dtype]) -> Optional[str]:
    """Why ``name`` cannot run on device/dtype (every problem, each with its remedy), or None if it can."""
    if name in ("sdpa", "chunked"):
        return None
    assert name in ("flash", "sage"), name
    problems = []
    device_problem = _cuda_half_problem(device, dtype) if device is not None else None
    if device_problem:
        problems.append(device_problem)
    elif name == "flash" and device is not None and torch.cuda.get_device_capability(device)[0] < 8:
        problems.append("flash-attn 2 needs an Ampere or newer GPU (compute capability 8.0+); use --attention sdpa")
    problems.append(_flash_functions(device)[1] if name == "flash" else _sage_function()[1])
    return "; ".join(p for p in problems if p) or None


def available_attention_backends(
    device: torch.device | str | None = None, dtype: Optional[torch.dtype] = None
) -> dict[str, Optional[str]]:
    """Backend name -> None if it can run, else the reason and remedy. Without a device only installation counts."""
    dev = torch.device(device) if device is not None else None
    return {name: _unavailable_reason(name, dev, dtype) for name in ATTENTION_BACKENDS}


def resolve_attention_backend(requested: Optional[str], device: torch.device | str, dtype: torch.dtype) -> str:
    """The backend name to pass to ``attention``; logs one INFO line saying what was chosen and why.

    "auto" or None: flash > sage > sdpa on CUDA, sdpa elsewhere. A named backend that cannot run on this
    device/dtype raises ValueError with the remedy; an unknown name raises listing the choices.
    """
    dev = torch.device(device)
    if requested is None or requested == "auto":
        if dev.type == "cuda":
            reasons = {name: _unavailable_reason(name, dev, dtype) for name in ("flash", "sage")}
            for name, reason in reasons.items():
                if reason is None:
                    logger.info("attention backend: %s (auto: the fastest one installed for %s %s)", name, dev, dtype)
                    return name
            logger.info("attention backend: sdpa (auto: %s)",
                        "; ".join(f"{n} unavailable: {r}" for n, r in reasons.items()))
        else:
            logger.info("attention backend: sdpa (auto: PyTorch SDPA on %s; flash-attn and SageAttention need CUDA)",
                        dev.type)
        return "sdpa"
    name, _ = _parse_backend(requested)
    reason = _unavailable_reason(name, dev, dtype)
    if reason is not None:
        raise ValueError(f"attention backend {name!r} cannot run here: {reason}")
    logger.info("attention backend: %s (requested)", requested)
    return requested


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
