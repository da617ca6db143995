"""HYVideo-T/2: the dual-stream -> single-stream diffusion transformer of HunyuanVideo-I2V (spec section 1).

Data flow: latent video [B, C, T, H, W] -> patch tokens; MLLM states -> token refiner; timestep, guidance and the
CLIP pooled vector -> ``vec``, which drives every adaLN modulation. 20 double-stream blocks keep separate weights
for image and text tokens and attend jointly; 40 single-stream blocks run on the concatenation [image; text].

token_replace (the released I2V weights): the tokens of latent frame 0 hold the clean image latent and are
modulated with ``tr_vec = time_in(0) + vector_in(pooled)`` (no guidance term) instead of ``vec``.

Inference (autograd off) takes a leaner path through the blocks than training, with the same numbers: the
residual streams and the modulated activations are updated in place, q/k/v live in one buffer freed as soon as
attention returns, RoPE rotates in place, the feed-forward and the single blocks' MLP run ``ff_chunk_tokens``
tokens at a time, and the last single block computes the image tokens' outputs only (the text outputs are
discarded). Trailing text padding is dropped before the model runs: padded keys are masked and padded queries'
outputs never reach an image token, so this is exact (the official varlen attention skips them too, spec 1.7).
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
from dataclasses import dataclass
from typing import Iterator, NamedTuple, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode
from torch.utils.checkpoint import checkpoint

from ..config import TransformerConfig
from .layers import (
    MLP,
    MLPEmbedder,
    Modulation,
    PatchEmbed,
    RMSNorm,
    SingleTokenRefiner,
    TimestepEmbedder,
    apply_rope,
    attention,
    gelu_tanh,
    key_padding_mask,
    merge_heads,
    modulate,
    resolve_attention_backend,
    rope_frequencies,
    split_heads,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunOptions:
    """Settings of a forward pass that the blocks need (not weights)."""

    attention_backend: Optional[str] = None  # a name for layers.attention (or an AttentionFn); None = its default
    ff_chunk_tokens: Optional[int] = None  # feed-forward rows per chunk at inference; None = all at once


class RopeTables(NamedTuple):
    """RoPE for the image tokens: layers.rope_frequencies' cos/sin and the same rotation as complex numbers."""

    cos: Tensor  # [N_img, D] fp32, each value repeated for the two members of a pair
    sin: Tensor
    rotation: Tensor  # [N_img, D / 2] complex64: cos + i sin per pair


def rope_tables(grid: tuple[int, int, int], axes_dim: Sequence[int], theta: float, device) -> RopeTables:
    cos, sin = rope_frequencies(grid, tuple(axes_dim), theta, device)
    return RopeTables(cos, sin, torch.complex(cos[:, ::2].contiguous(), sin[:, ::2].contiguous()))


# ---------------------------------------------------------------------------------------------
# In-place pieces of the inference path. Each one gives bit for bit what its out-of-place twin in layers.py
# gives (same kernels, same order), so the two paths agree.


def rotate_(x: Tensor, rotation: Tensor) -> Tensor:
    """apply_rope in place: interleaved pairs of x [..., N, D] rotated as complex numbers, in fp32."""
    xf = x.float()  # x itself when x is fp32
    torch.view_as_complex(xf.unflatten(-1, (-1, 2))).mul_(rotation)
    if xf is not x:
        x.copy_(xf)
    return x


def rms_norm_(x: Tensor, norm: RMSNorm) -> Tensor:
    """RMSNorm in place, in the official order: normalise in fp32, cast back, then the weight."""
    xf = x.float()
    scale = torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + norm.eps)
    if xf is x:
        x.mul_(scale)
    else:
        x.copy_(xf.mul_(scale))
    return x.mul_(norm.weight)


def gelu_tanh_(x: Tensor) -> Tensor:
    return torch.ops.aten.gelu_(x, approximate="tanh")


def linear_rows(layer: nn.Module, x: Tensor, start: int, stop: Optional[int] = None) -> Tensor:
    """Output features [start, stop) of a linear layer, computing only those.

    For an ``nn.Linear`` this slices the weight; another layer type (a quantized linear) may offer
    ``forward_rows(x, start, stop)``, else the whole output is computed and sliced.
    """
    if isinstance(layer, nn.Linear):
        bias = layer.bias[start:stop] if layer.bias is not None else None
        return F.linear(x, layer.weight[start:stop], bias)
    rows = getattr(layer, "forward_rows", None)
    if rows is not None:
        return rows(x, start, stop)
    return layer(x)[..., start:stop]


# Chunks are at least this many tokens: BLAS multiplies fewer rows on another code path whose rounding differs
# (MKL: below 12 rows), and the chunked result should equal the unchunked one bit for bit.
MIN_CHUNK_TOKENS = 16


def token_chunks(n: int, size: Optional[int]) -> Iterator[tuple[int, int]]:
    """(start, stop) ranges covering [0, n) in steps of ``size`` (one range when size is None); a short tail joins
    the chunk before it, and no chunk is shorter than MIN_CHUNK_TOKENS unless n is."""
    step = max(size, MIN_CHUNK_TOKENS) if size else max(n, 1)
    starts = list(range(0, n, step))
    if len(starts) > 1 and n - starts[-1] < MIN_CHUNK_TOKENS:
        starts.pop()
    for start, stop in zip(starts, starts[1:] + [n]):
        yield start, stop


def trim_text_padding(text_states: Tensor, text_mask: Optional[Tensor]) -> tuple[Tensor, Optional[Tensor]]:
    """Drop the trailing text positions that are padding in every row (exact, see the module docstring)."""
    if text_mask is None:
        return text_states, text_mask
    valid = text_mask.bool().any(dim=0)
    n = int(valid.nonzero().max()) + 1 if bool(valid.any()) else 1
    if n == text_mask.shape[1]:
        return text_states, text_mask
    return text_states[:, :n], text_mask[:, :n]


class Modulations:
    """A block's adaLN chunks; with token_replace, tokens [0, n_first) of the image stream use ``tr_chunks``.

    Under autograd the updates return new tensors. With autograd off they write into ``x`` (the residual
    stream, or a freshly normalised activation), so no second copy of the stream is made. ``start`` is the
    position of ``x``'s first token when ``x`` is a chunk of the stream.
    """

    def __init__(self, chunks: Sequence[Tensor], tr_chunks: Optional[Sequence[Tensor]] = None, n_first: int = 0):
        self.chunks, self.tr_chunks, self.n_first = chunks, tr_chunks, n_first

    def _spans(self, start: int, stop: int) -> list[tuple[int, int, Sequence[Tensor]]]:
        """(lo, hi, chunks) over the tokens [start, stop), lo and hi relative to start."""
        if self.tr_chunks is None or start >= self.n_first:
            return [(0, stop - start, self.chunks)]
        cut = min(self.n_first, stop) - start
        spans = [(0, cut, self.tr_chunks)]
        if stop > self.n_first:
            spans.append((cut, stop - start, self.chunks))
        return spans

    def modulate(self, x: Tensor, i_shift: int, i_scale: int, start: int = 0) -> Tensor:
        spans = self._spans(start, start + x.shape[1])
        if torch.is_grad_enabled():
            parts = [modulate(x[:, lo:hi], c[i_shift], c[i_scale]) for lo, hi, c in spans]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        for lo, hi, c in spans:
            seg = x[:, lo:hi]
            torch.addcmul(c[i_shift], seg, 1 + c[i_scale], out=seg)
        return x

    def gated_add(self, x: Tensor, y: Tensor, i_gate: int, start: int = 0) -> Tensor:
        """x + gate * y."""
        spans = self._spans(start, start + x.shape[1])
        if torch.is_grad_enabled():
            parts = [torch.addcmul(x[:, lo:hi], y[:, lo:hi], c[i_gate]) for lo, hi, c in spans]
            return parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        for lo, hi, c in spans:
            x[:, lo:hi].addcmul_(y[:, lo:hi], c[i_gate])
        return x


def _modulations(mod: Modulation, vec: Tensor, tr_vec: Optional[Tensor], n_first: int) -> Modulations:
    return Modulations(mod(vec), mod(tr_vec) if tr_vec is not None else None, n_first)


def _mlp(mlp: MLP, x: Tensor) -> Tensor:
    h = mlp.fc1(x)
    return mlp.fc2(gelu_tanh_(h) if mlp.act is gelu_tanh else mlp.act(h))


def _feed_forward(x: Tensor, norm: nn.Module, mlp: MLP, m: Modulations, chunk: Optional[int]) -> Tensor:
    """x + gate * MLP(adaLN(norm(x))); at inference in place, ``chunk`` tokens at a time."""
    if torch.is_grad_enabled():
        return m.gated_add(x, mlp(m.modulate(norm(x), 3, 4)), 5)
    for start, stop in token_chunks(x.shape[1], chunk):
        seg = x[:, start:stop]
        m.gated_add(seg, _mlp(mlp, m.modulate(norm(seg), 3, 4, start)), 5, start)
    return x


class DoubleStreamBlock(nn.Module):
    """MMDoubleStreamBlock (spec 1.4): per-stream weights, joint attention over [image; text]."""

    def __init__(self, cfg: TransformerConfig, device=None, dtype=None):
        super().__init__()
        h, kw = cfg.hidden_size, dict(device=device, dtype=dtype)
        self.num_heads = cfg.num_heads
        for s in ("img", "txt"):
            setattr(self, f"{s}_mod", Modulation(h, 6, **kw))
            setattr(self, f"{s}_norm1", nn.LayerNorm(h, elementwise_affine=False, eps=1e-6, **kw))
            setattr(self, f"{s}_attn_qkv", nn.Linear(h, 3 * h, **kw))
            setattr(self, f"{s}_attn_q_norm", RMSNorm(cfg.head_dim, **kw))
            setattr(self, f"{s}_attn_k_norm", RMSNorm(cfg.head_dim, **kw))
            setattr(self, f"{s}_attn_proj", nn.Linear(h, h, **kw))
            setattr(self, f"{s}_norm2", nn.LayerNorm(h, elementwise_affine=False, eps=1e-6, **kw))
            setattr(self, f"{s}_mlp", MLP(h, cfg.mlp_hidden, gelu_tanh, **kw))

    def forward(self, img: Tensor, txt: Tensor, vec: Tensor, tr_vec: Optional[Tensor], n_first: int,
                rope: RopeTables, mask: Optional[Tensor], opts: RunOptions = RunOptions()) -> tuple[Tensor, Tensor]:
        """With autograd off, ``img`` and ``txt`` are updated in place and returned."""
        img_m = _modulations(self.img_mod, vec, tr_vec, n_first)
        txt_m = _modulations(self.txt_mod, vec, None, 0)
        if torch.is_grad_enabled():
            return self._forward_autograd(img, txt, img_m, txt_m, rope, mask, opts)

        n_img = img.shape[1]
        qkv = torch.cat([self.img_attn_qkv(img_m.modulate(self.img_norm1(img), 0, 1)),
                         self.txt_attn_qkv(txt_m.modulate(self.txt_norm1(txt), 0, 1))], dim=1)
        q, k, v = split_heads(qkv, self.num_heads)
        for x, img_norm, txt_norm in ((q, self.img_attn_q_norm, self.txt_attn_q_norm),
                                      (k, self.img_attn_k_norm, self.txt_attn_k_norm)):
            rotate_(rms_norm_(x[:, :, :n_img], img_norm), rope.rotation)
            rms_norm_(x[:, :, n_img:], txt_norm)
        attn = merge_heads(attention(q, k, v, mask, backend=opts.attention_backend))
        del qkv, q, k, v  # q, k, v are views of qkv: freed here, before the projections allocate

        img = img_m.gated_add(img, self.img_attn_proj(attn[:, :n_img]), 2)
        txt = txt_m.gated_add(txt, self.txt_attn_proj(attn[:, n_img:]), 2)
        del attn
        img = _feed_forward(img, self.img_norm2, self.img_mlp, img_m, opts.ff_chunk_tokens)
        txt = _feed_forward(txt, self.txt_norm2, self.txt_mlp, txt_m, opts.ff_chunk_tokens)
        return img, txt

    def _forward_autograd(self, img: Tensor, txt: Tensor, img_m: Modulations, txt_m: Modulations,
                          rope: RopeTables, mask: Optional[Tensor], opts: RunOptions) -> tuple[Tensor, Tensor]:
        iq, ik, iv = split_heads(self.img_attn_qkv(img_m.modulate(self.img_norm1(img), 0, 1)), self.num_heads)
        iq = apply_rope(self.img_attn_q_norm(iq), rope.cos, rope.sin)
        ik = apply_rope(self.img_attn_k_norm(ik), rope.cos, rope.sin)
        tq, tk, tv = split_heads(self.txt_attn_qkv(txt_m.modulate(self.txt_norm1(txt), 0, 1)), self.num_heads)
        tq, tk = self.txt_attn_q_norm(tq), self.txt_attn_k_norm(tk)

        out = attention(torch.cat([iq, tq], 2), torch.cat([ik, tk], 2), torch.cat([iv, tv], 2), mask,
                        backend=opts.attention_backend)
        del iq, ik, iv, tq, tk, tv
        n_img = img.shape[1]
        img_attn, txt_attn = merge_heads(out[:, :, :n_img]), merge_heads(out[:, :, n_img:])
        del out

        img = img_m.gated_add(img, self.img_attn_proj(img_attn), 2)
        img = _feed_forward(img, self.img_norm2, self.img_mlp, img_m, None)
        txt = txt_m.gated_add(txt, self.txt_attn_proj(txt_attn), 2)
        txt = _feed_forward(txt, self.txt_norm2, self.txt_mlp, txt_m, None)
        return img, txt


class SingleStreamBlock(nn.Module):
    """MMSingleStreamBlock (spec 1.5): one fused linear for qkv and the MLP, parallel attention + MLP."""

    def __init__(self, cfg: TransformerConfig, device=None, dtype=None):
        super().__init__()
        h, kw = cfg.hidden_size, dict(device=device, dtype=dtype)
        self.num_heads = cfg.num_heads
        self.hidden_size, self.mlp_hidden = h, cfg.mlp_hidden
        self.linear1 = nn.Linear(h, 3 * h + cfg.mlp_hidden, **kw)
        self.linear2 = nn.Linear(h + cfg.mlp_hidden, h, **kw)
        self.q_norm = RMSNorm(cfg.head_dim, **kw)
        self.k_norm = RMSNorm(cfg.head_dim, **kw)
        self.pre_norm = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6, **kw)
        self.modulation = Modulation(h, 3, **kw)

    def forward(self, x: Tensor, n_img: int, vec: Tensor, tr_vec: Optional[Tensor], n_first: int,
                rope: RopeTables, mask: Optional[Tensor], opts: RunOptions = RunOptions(),
                n_out: Optional[int] = None) -> Tensor:
        """With autograd off, ``x`` is updated in place; ``n_out`` limits that to its first n_out tokens (the
        others keep stale values), which the last block uses since only image tokens reach the output."""
        m = _modulations(self.modulation, vec, tr_vec, n_first)
        if torch.is_grad_enabled():
            return self._forward_autograd(x, n_img, m, rope, mask, opts)

        h3 = 3 * self.hidden_size
        xm = m.modulate(self.pre_norm(x), 0, 1)
        qkv = linear_rows(self.linear1, xm, 0, h3)  # the MLP rows of linear1 are computed per chunk below
        q, k, v = split_heads(qkv, self.num_heads)
        rotate_(rms_norm_(q, self.q_norm)[:, :, :n_img], rope.rotation)
        rotate_(rms_norm_(k, self.k_norm)[:, :, :n_img], rope.rotation)
        n_out = x.shape[1] if n_out is None else n_out
        attn = merge_heads(attention(q[:, :, :n_out], k, v, mask, backend=opts.attention_backend))
        del qkv, q, k, v

        for start, stop in token_chunks(n_out, opts.ff_chunk_tokens):
            mlp = gelu_tanh_(linear_rows(self.linear1, xm[:, start:stop], h3))
            out = self.linear2(torch.cat([attn[:, start:stop], mlp], dim=-1))
            m.gated_add(x[:, start:stop], out, 2, start)
        return x

    def _forward_autograd(self, x: Tensor, n_img: int, m: Modulations, rope: RopeTables, mask: Optional[Tensor],
                          opts: RunOptions) -> Tensor:
        qkv, mlp = self.linear1(m.modulate(self.pre_norm(x), 0, 1)).split([3 * self.hidden_size, self.mlp_hidden], -1)
        q, k, v = split_heads(qkv, self.num_heads)
        del qkv
        q, k = self.q_norm(q), self.k_norm(k)
        q = torch.cat([apply_rope(q[:, :, :n_img], rope.cos, rope.sin), q[:, :, n_img:]], dim=2)
        k = torch.cat([apply_rope(k[:, :, :n_img], rope.cos, rope.sin), k[:, :, n_img:]], dim=2)
        attn = merge_heads(attention(q, k, v, mask, backend=opts.attention_backend))
        del q, k, v
        return m.gated_add(x, self.linear2(torch.cat([attn, gelu_tanh(mlp)], dim=-1)), 2)


class FinalLayer(nn.Module):
    """LayerNorm -> adaLN (shift, scale) from ``vec`` -> Linear to patch values (spec 1.6)."""

    def __init__(self, cfg: TransformerConfig, device=None, dtype=None):
        super().__init__()
        h, kw = cfg.hidden_size, dict(device=device, dtype=dtype)
        self.norm_final = nn.LayerNorm(h, elementwise_affine=False, eps=1e-6, **kw)
        pt, ph, pw = cfg.patch_size
        self.linear = nn.Linear(h, pt * ph * pw * cfg.out_channels, **kw)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(h, 2 * h, **kw))

    def forward(self, x: Tensor, vec: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(vec)[:, None, :].chunk(2, dim=-1)
        x = modulate(self.norm_final(x), shift, scale)
        return self.linear(x.to(self.linear.weight.dtype))


# ---------------------------------------------------------------------------------------------
# Half precision on CPUs without half-precision matmul instructions


_UPCAST_FUNCTIONS = frozenset({F.linear, F.conv3d, F.scaled_dot_product_attention})


class Fp32Matmul(TorchFunctionMode):
    """Runs linear, conv3d and SDPA on bf16/fp16 CPU tensors in fp32 and rounds the result to the input dtype.

    Without AVX512-BF16/AMX a CPU runs bf16 matmuls about 10x slower than fp32. Half-precision kernels accumulate
    in fp32 anyway, so upcasting (one weight at a time, a transient fp32 copy) gives the same result up to the
    fp32 accumulation order, with the activations still rounded to the model's dtype between operations.
    """

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _UPCAST_FUNCTIONS and args:
            x = args[0]
            if isinstance(x, Tensor) and x.device.type == "cpu" and x.dtype in (torch.bfloat16, torch.float16):
                args = tuple(_fp32(a) for a in args)
                kwargs = {k: _fp32(v) for k, v in kwargs.items()}
                return func(*args, **kwargs).to(x.dtype)
        return func(*args, **kwargs)


def _fp32(a):
    return a.float() if isinstance(a, Tensor) and a.is_floating_point() else a


def cpu_has_half_matmul(dtype: torch.dtype) -> bool:
    """Whether this CPU has native bf16/fp16 matmul instructions (oneDNN's own check)."""
    try:
        if dtype == torch.bfloat16:
            return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
        if dtype == torch.float16:
            return bool(torch.ops.mkldnn._is_mkldnn_fp16_supported())
    except (AttributeError, RuntimeError):
        pass
    return False


# ---------------------------------------------------------------------------------------------
# The model


@dataclass
class BlockStackInputs:
    """One forward pass between the embeddings and the block stack (:meth:`HunyuanVideoTransformer.embed`).

    ``img`` / ``txt`` are the two token streams; :meth:`HunyuanVideoTransformer.block_stack` takes them out (sets
    them to None), so nothing else keeps them alive once they are concatenated. The rest is read-only.
    """

    img: Optional[Tensor]  # [B, N_img, hidden]
    txt: Optional[Tensor]  # [B, L, hidden]
    vec: Tensor  # [B, hidden]: drives every modulation
    tr_vec: Optional[Tensor]  # [B, hidden]: token_replace's modulation of the clean frame-0 tokens
    n_first: int  # image tokens of latent frame 0 (token_replace), else 0
    rope: RopeTables
    mask: Optional[Tensor]  # [B, 1, 1, N_img + L] key padding mask, or None
    grid: tuple[int, int, int]
    opts: RunOptions

    def rows(self, start: int, stop: int) -> "BlockStackInputs":
        """The batch rows [start, stop), with copies of the token streams (the stack updates them in place)."""
        def cut(x):
            return None if x is None else x[start:stop]

        return dataclasses.replace(self, img=cut(self.img).clone(), txt=cut(self.txt).clone(), vec=cut(self.vec),
                                   tr_vec=cut(self.tr_vec), mask=cut(self.mask))


class HunyuanVideoTransformer(nn.Module):
    """The HunyuanVideo(-I2V) diffusion transformer; state dict keys are the official ones.

    Runtime settings (plain attributes, no effect on the weights or the result): ``attention_backend``
    (:meth:`set_attention_backend`), ``ff_chunk_tokens`` (:meth:`set_ff_chunk_tokens`) and ``cpu_fp32_matmul``
    (None: half-precision matmuls on a CPU run in fp32 when it lacks native support, see :class:`Fp32Matmul`).
    """

    def __init__(self, config: TransformerConfig, device=None, dtype=None):
        super().__init__()
        self.config = cfg = config
        kw = dict(device=device, dtype=dtype)
        h = cfg.hidden_size
        self.img_in = PatchEmbed(cfg.patch_size, cfg.in_channels, h, **kw)
        self.txt_in = SingleTokenRefiner(cfg.text_states_dim, h, cfg.num_heads, cfg.refiner_depth, cfg.mlp_ratio, **kw)
        self.time_in = TimestepEmbedder(h, **kw)
        self.vector_in = MLPEmbedder(cfg.text_states_dim_2, h, **kw)
        self.guidance_in = TimestepEmbedder(h, **kw) if cfg.guidance_embed else None
        self.double_blocks = nn.ModuleList(DoubleStreamBlock(cfg, **kw) for _ in range(cfg.depth_double))
        self.single_blocks = nn.ModuleList(SingleStreamBlock(cfg, **kw) for _ in range(cfg.depth_single))
        self.final_layer = FinalLayer(cfg, **kw)
        self.gradient_checkpointing = False
        self.attention_backend: Optional[str] = None
        self.ff_chunk_tokens: Optional[int] = None
        self.cpu_fp32_matmul: Optional[bool] = None
        self.sequence_parallel = None  # a hunyuan_i2v.parallel.SequenceParallel splits the block stack's tokens
        self._rope_cache: dict[tuple, RopeTables] = {}

    # -- helpers ---------------------------------------------------------------------------------

    @property
    def dtype(self) -> torch.dtype:
        return self.img_in.proj.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.img_in.proj.weight.device

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        self.gradient_checkpointing = enabled

    def set_attention_backend(self, name: Optional[str]) -> None:
        """Attention backend of the double/single blocks: "auto", "sdpa", "flash", "sage", "chunked[:MiB]";
        None = the default. Raises ValueError when it cannot run on this model's device and dtype."""
        self.attention_backend = None if name is None else resolve_attention_backend(name, self.device, self.dtype)

    def set_ff_chunk_tokens(self, tokens: Optional[int]) -> None:
        """Run the feed-forward layers (and the single blocks' MLP) ``tokens`` tokens at a time at inference,
        which bounds their activations to ``tokens x 5 x hidden``; None = all tokens at once. Same output."""
        if tokens is not None and (isinstance(tokens, bool) or not isinstance(tokens, int) or tokens < 1):
            raise ValueError(f"ff_chunk_tokens must be a positive number of tokens or None, got {tokens!r}")
        self.ff_chunk_tokens = tokens

    def rope(self, grid: tuple[int, int, int], device: torch.device) -> RopeTables:
        key = (grid, str(device))
        if key not in self._rope_cache:
            self._rope_cache.clear()
            self._rope_cache[key] = rope_tables(grid, self.config.rope_axes_dim, self.config.rope_theta, device)
        return self._rope_cache[key]

    def unpatchify(self, x: Tensor, grid: tuple[int, int, int]) -> Tensor:
        """[B, N, C*pt*ph*pw] (channel slowest) -> [B, C, T, H, W]."""
        (t, h, w), (pt, ph, pw) = grid, self.config.patch_size
        c = self.config.out_channels
        x = x.reshape(x.shape[0], t, h, w, c, pt, ph, pw)
        return x.permute(0, 4, 1, 5, 2, 6, 3, 7).reshape(x.shape[0], c, t * pt, h * ph, w * pw)

    def _run(self, block: nn.Module, *args):
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _compute_mode(self):
        """Fp32Matmul for a half-precision model on a CPU without half-precision matmul (inference only)."""
        dtype = self.dtype
        if torch.is_grad_enabled() or self.device.type != "cpu" or dtype not in (torch.bfloat16, torch.float16):
            return contextlib.nullcontext()
        upcast = self.cpu_fp32_matmul if self.cpu_fp32_matmul is not None else not cpu_has_half_matmul(dtype)
        return Fp32Matmul() if upcast else contextlib.nullcontext()

    # -- forward ---------------------------------------------------------------------------------

    def forward(
        self,
        x: Tensor,
        t: Tensor,
        text_states: Tensor,
        text_mask: Optional[Tensor],
        text_states_2: Tensor,
        guidance: Optional[Tensor] = None,
    ) -> Tensor:
        """Predict the flow velocity.

        x: [B, C_in, T, H, W] latents (for latent_concat, already the 33-channel input); t: [B] in 0..1000;
        text_states: [B, L, text_states_dim]; text_mask: [B, L] (1 = valid, right padded); text_states_2: [B, 768];
        guidance: [B] = embedded guidance scale x 1000 (required when the model has guidance_in).

        The same as ``final(block_stack(inputs), inputs)`` with ``inputs = embed(...)``: the three pieces are
        public so a step cache (:mod:`hunyuan_i2v.cache`) can skip the block stack.
        """
        inputs = self.embed(x, t, text_states, text_mask, text_states_2, guidance)
        return self.final(self.block_stack(inputs), inputs)

    def embed(
        self,
        x: Tensor,
        t: Tensor,
        text_states: Tensor,
        text_mask: Optional[Tensor],
        text_states_2: Tensor,
        guidance: Optional[Tensor] = None,
    ) -> BlockStackInputs:
        """The checks and embeddings of :meth:`forward` (same arguments): patch and text tokens, ``vec``, RoPE."""
        cfg = self.config
        if x.ndim != 5 or x.shape[1] != cfg.in_channels:
            raise ValueError(f"expected latents [B, {cfg.in_channels}, T, H, W], got {tuple(x.shape)}")
        pt, ph, pw = cfg.patch_size
        _, _, T, H, W = x.shape
        if T % pt or H % ph or W % pw:
            raise ValueError(f"latent size {(T, H, W)} is not divisible by the patch size {cfg.patch_size}")
        if self.guidance_in is not None and guidance is None:
            raise ValueError("this model embeds guidance: pass guidance = scale x 1000 (e.g. 6000.0)")
        grid = (T // pt, H // ph, W // pw)
        b = x.shape[0]
        t = t.expand(b) if t.numel() == 1 else t
        text_states, text_mask = trim_text_padding(text_states, text_mask)
        opts = RunOptions(self.attention_backend, self.ff_chunk_tokens)

        with self._compute_mode():
            vec = self.time_in(t) + self.vector_in(text_states_2.to(self.dtype))
            tr_vec, n_first = None, 0
            if cfg.condition_type == "token_replace":
                tr_vec = self.time_in(torch.zeros_like(t)) + self.vector_in(text_states_2.to(self.dtype))
                n_first = grid[1] * grid[2]
            if self.guidance_in is not None:
                guidance = guidance.expand(b) if guidance.numel() == 1 else guidance
                vec = vec + self.guidance_in(guidance)

            img = self.img_in(x.to(self.dtype))
            txt = self.txt_in(text_states.to(self.dtype), t, text_mask)
            rope = self.rope(grid, x.device)
            mask = key_padding_mask(img.shape[1], text_mask) if text_mask is not None else None
        return BlockStackInputs(img, txt, vec, tr_vec, n_first, rope, mask, grid, opts)

    def block_stack(self, inputs: BlockStackInputs) -> Tensor:
        """The double and single blocks; returns the image tokens [B, N_img, hidden].

        Takes the token streams out of ``inputs``; with autograd off they are updated in place. With
        ``sequence_parallel`` set, the blocks run on this process's chunk of the image tokens and the chunks are
        gathered at the end (:mod:`hunyuan_i2v.parallel`).
        """
        sp = self.sequence_parallel
        if sp is not None:
            inputs = sp.split(inputs)
        img, txt = inputs.img, inputs.txt
        inputs.img = inputs.txt = None
        vec, tr_vec, n_first, rope, mask, opts = (inputs.vec, inputs.tr_vec, inputs.n_first, inputs.rope,
                                                  inputs.mask, inputs.opts)
        n_img = img.shape[1]
        inference = not torch.is_grad_enabled()
        with self._compute_mode():
            for block in self.double_blocks:
                img, txt = self._run(block, img, txt, vec, tr_vec, n_first, rope, mask, opts)
            x_joint = torch.cat([img, txt], dim=1)
            del img, txt
            last = len(self.single_blocks) - 1
            for i, block in enumerate(self.single_blocks):
                n_out = n_img if inference and i == last else None
                x_joint = self._run(block, x_joint, n_img, vec, tr_vec, n_first, rope, mask, opts, n_out)
        return x_joint[:, :n_img] if sp is None else sp.gather(x_joint[:, :n_img], inputs)

    def final(self, img: Tensor, inputs: BlockStackInputs) -> Tensor:
        """The final layer on the block stack's image tokens -> velocity [B, C_out, T, H, W]."""
        with self._compute_mode():
            out = self.final_layer(img, inputs.vec)
        return self.unpatchify(out, inputs.grid)

    def first_block_modulated_input(self, inputs: BlockStackInputs, start: int = 0) -> Tensor:
        """What the first double block's image attention reads: img_mod's shift/scale on img_norm1(img), for the
        image tokens [start:] (TeaCache's indicator). Leaves ``inputs.img`` unchanged."""
        block = self.double_blocks[0]
        with self._compute_mode():
            m = _modulations(block.img_mod, inputs.vec, inputs.tr_vec, inputs.n_first)
            return m.modulate(block.img_norm1(inputs.img[:, start:]), 0, 1, start)


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
