"""The memory planner (issue 5): predicted peak device memory of each stage of a generation for every way of
holding the weights, and the fastest plan that fits a budget.

Stages, in the order the pipeline runs them: text encoding (the prompt encoders), image encoding (the reference
frame through the VAE encoder), denoising (the transformer, once per step) and decoding (the VAE decoder, one
video at a time). A stage's prediction is the weights on the device plus the largest set of tensors alive at once,
walked operation by operation along the inference code (``model/transformer.py``, ``model/vae.py``); the tests
check the walks against the live tensor bytes of real runs. Kernel workspaces and the allocator's slack are left
to a margin: a plan fits when its largest stage is at most ``(1 - MARGIN) x budget``.

What a plan chooses: where the weights live (``offload``: none / model / blocks), the storage of the transformer
block weights (the compute dtype, int8 or fp8), the feed-forward chunk, the attention chunk (only on devices whose
SDPA has no memory-efficient kernel), the VAE decode tiles and the lean decoder, and whether the prompt encoders
run on the CPU. Plans are ranked first by how much they change the output, then by an estimated time:

1. plans that give exactly the default output (any residency, any feed-forward chunk);
2. float-rounding changes: the lean VAE decoder, chunked attention, prompt encoders on the CPU (fp32);
3. smaller VAE tiles (other seams);
4. quantized block weights, int8 before fp8 (int8 is the more exact, see ``tests/test_quant.py``).

The time estimate (:class:`DeviceSpeed`: FLOPs, copies and kernel launches) only orders plans of the same rank.
Sizes are in GB of 2**30 bytes, as PyTorch prints them.

LoRA training (``train/lora.py``) has its own estimate, :func:`plan_lora_training` (``hunyuan-i2v lora plan``):
the base's weights on the device, the fp32 adapters with their gradients and AdamW moments, the block inputs that
gradient checkpointing keeps (on the device or in host memory), one block's recompute and backward, and the rest;
the prompt encoders and the VAE stay off the device because ``lora prepare`` caches their outputs.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

import torch

from ..buckets import token_counts
from ..config import ModelConfig, TextEncoderConfig, TransformerConfig, VAEConfig
from ..errors import InputError
from . import FLOAT_WEIGHT_NAMES, OFFLOAD_MODES, QUANTIZED_WEIGHTS, WEIGHTS_DTYPES

GB = 1024**3
MARGIN = 0.1  # of the budget, kept free for kernel workspaces, the CUDA context and allocator fragmentation

FLOAT_WEIGHTS = dict(zip(FLOAT_WEIGHT_NAMES, (torch.bfloat16, torch.float16, torch.float32)))
STAGES = ("text encoding", "image encoding", "denoising", "decoding")

FF_CHUNKS = (None, 65536, 16384, 4096, 1024)  # feed-forward tokens per chunk; None = all at once
ATTENTION_CHUNKS_MIB = (1024, 256, 64)  # "chunked:<MiB>" score budgets, for devices without memory-efficient SDPA
EFFICIENT_SDPA_DEVICES = ("cuda", "cpu")  # SDPA never holds the Lq x Lk scores there (flash / memory-efficient)
# Streamed blocks that count against the budget. CUDA: running + prefetched + one whose memory the caching
# allocator may not reuse yet (record_stream). CPU: blocks compute straight from their memory-mapped pages and
# the prefetch only asks the kernel to read the next block into the page cache (madvise WILLNEED), which the
# process's RSS does not count until a page is touched, so only the running block's pages do (measured on the
# 13B model: docs/benchmarks.md). Elsewhere running + prefetched.
BLOCKS_IN_FLIGHT = {"cuda": 3, "cpu": 1}
PREFETCH = 1

# Parameters of prompt encoders when their files are not at hand (published model sizes): llava-llama-3-8b
# without its lm_head (Llama-3-8B body 7.50 B + CLIP ViT-L/14-336 tower 0.30 B + projector 0.02 B) and the
# CLIP-L text model (0.12 B); all-MiniLM-L6-v2 (22.7 M). Hidden layers set the size of the MLLM's activations.
DEFAULT_TEXT_ENCODER_PARAMS = {"llava-clip": 7_950_000_000, "minilm": 22_700_000}
TEXT_ENCODER_LAYERS = {"llava-clip": 32, "minilm": 6}
# what CLIPTextModel leaves out of the official text_encoder_2 (a full CLIPModel); LLaVA's tower is "vision_tower."
CLIP_MODEL_EXTRAS = ("vision_model.", "visual_projection.", "text_projection.", "logit_scale")


def format_size(nbytes: float) -> str:
    return f"{nbytes / GB:.2f} GB" if nbytes >= 0.1 * GB else f"{nbytes / 1024**2:.1f} MB"


def _itemsize(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


# ---------------------------------------------------------------------------------------------
# What a call computes, on what


@dataclass(frozen=True)
class Workload:
    """The sizes of one generate call."""

    height: int
    width: int
    num_frames: int
    videos: int = 1  # decoded one at a time
    cfg: bool = False  # real CFG: the transformer runs a batch of 2 x videos
    prompts: int = 1  # rows the prompt and image encoders see
    steps: int = 50
    encode_prompts: bool = True  # False when every prompt embedding is cached


@dataclass(frozen=True)
class Target:
    """The device and the dtypes of the three components (the pipeline's defaults per device type)."""

    device_type: str = "cuda"
    dtype: torch.dtype = torch.bfloat16  # transformer compute
    vae_dtype: torch.dtype = torch.float16
    encoder_dtype: torch.dtype = torch.float16

    @classmethod
    def for_device(cls, device_type: str, dtype: Optional[torch.dtype] = None,
                   vae_dtype: Optional[torch.dtype] = None) -> "Target":
        gpu = device_type == "cuda"
        return cls(device_type, dtype or (torch.bfloat16 if gpu else torch.float32),
                   vae_dtype or (torch.float16 if gpu else torch.float32), torch.float16 if gpu else torch.float32)

    @property
    def native_weights(self) -> str:
        return next((n for n, d in FLOAT_WEIGHTS.items() if d == self.dtype), str(self.dtype))


@dataclass(frozen=True)
class DeviceSpeed:
    """Rough throughputs, used only to order plans of the same rank, never to promise a time."""

    flops: float  # dense matmul FLOP/s in the compute dtype
    host_to_device: float  # bytes/s of copies from host memory (or the page cache, on a CPU)
    memory: float  # bytes/s of device memory traffic
    launch: float  # seconds of fixed overhead per kernel
    cpu_flops: float = 1e12  # FLOP/s of the host, for prompt encoders placed there
    chunked_attention: float = 0.25  # the PyTorch chunked attention's share of ``flops``


SPEEDS = {
    "cuda": DeviceSpeed(flops=3e14, host_to_device=2e10, memory=2e12, launch=1e-5),
    "cpu": DeviceSpeed(flops=1e12, host_to_device=1e10, memory=5e10, launch=1e-6, chunked_attention=1.0),
}
OTHER_SPEED = DeviceSpeed(flops=1e13, host_to_device=1e10, memory=2e11, launch=1e-5)


# ---------------------------------------------------------------------------------------------
# Plans


@dataclass(frozen=True)
class MemoryPlan:
    """How a generation holds its weights and activations, with the predicted peak of each stage (bytes)."""

    offload: str = "none"
    weights_dtype: str = "bf16"  # storage of the transformer block weights
    attention: Optional[str] = None  # None: the pipeline's default (SDPA)
    ff_chunk_tokens: Optional[int] = None
    vae_tile: Optional[tuple[int, int]] = None  # (pixels, frames) replacing the VAE config's tiles
    vae_lean: bool = False
    text_on_cpu: bool = False  # the prompt encoders run on the CPU (when the pipeline loads them)
    peaks: tuple[tuple[str, int], ...] = ()
    seconds: float = 0.0  # the ranking estimate

    @property
    def peak(self) -> int:
        return max((b for _, b in self.peaks), default=0)

    @property
    def rank(self) -> tuple[int, int, int]:
        """(quantization, VAE tiles changed, float-rounding changes): 0 everywhere = the default output."""
        quant = QUANTIZED_WEIGHTS.index(self.weights_dtype) + 1 if self.weights_dtype in QUANTIZED_WEIGHTS else 0
        rounding = int(self.vae_lean) + int(self.text_on_cpu) + int(bool(self.attention) and
                                                                    self.attention.startswith("chunked"))
        return quant, int(self.vae_tile is not None), rounding

    def budget_needed(self) -> float:
        """The smallest budget (GB) this plan fits in, rounded up to 0.1 GB."""
        return math.ceil(self.peak / (1 - MARGIN) / GB * 10) / 10

    def describe(self) -> str:
        parts = [{"none": "all weights resident", "model": "model offload (one component on the device at a time)",
                  "blocks": "transformer blocks streamed from host memory"}[self.offload],
                 f"{self.weights_dtype} block weights"]
        if self.attention:
            parts.append(f"attention {self.attention}")
        if self.ff_chunk_tokens:
            parts.append(f"feed-forward in chunks of {self.ff_chunk_tokens} tokens")
        if self.vae_tile:
            parts.append(f"VAE tiles {self.vae_tile[0]} px x {self.vae_tile[1]} frames")
        if self.vae_lean:
            parts.append("lean VAE decoder")
        if self.text_on_cpu:
            parts.append("prompt encoders on the CPU")
        return ", ".join(parts)

    def flags(self) -> str:
        """The CLI flags for the choices that have one (the planner's other choices come with --memory-budget)."""
        out = [f"--offload {self.offload}", f"--weights-dtype {self.weights_dtype}"]
        if self.attention:
            out.append(f"--attention {self.attention.partition(':')[0]}")
        return " ".join(out)

    def peak_lines(self, indent: str = "    ") -> list[str]:
        return [f"{indent}{stage:<15} {format_size(b)}" for stage, b in self.peaks]


@dataclass(frozen=True)
class Fixed:
    """Choices the user made; None lets the planner decide."""

    offload: Optional[str] = None
    weights_dtype: Optional[str] = None  # None or "auto": the planner decides
    attention: Optional[str] = None  # a backend name; fixed whenever given

    def check(self, target: Target) -> None:
        """The user errors among the choices (unknown names, a float storage unlike the compute dtype)."""
        if self.offload is not None and self.offload not in OFFLOAD_MODES:
            raise InputError(f"--offload must be one of {', '.join(OFFLOAD_MODES)}, got {self.offload!r}")
        wd = self.weights_dtype
        if wd is not None and wd not in WEIGHTS_DTYPES:
            raise InputError(f"--weights-dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {wd!r}")
        if wd in FLOAT_WEIGHTS and FLOAT_WEIGHTS[wd] != target.dtype:
            raise InputError(f"--weights-dtype {wd} differs from the transformer dtype {target.native_weights}: "
                             f"float weights are stored in the compute dtype; pass --dtype {wd} instead")


class PlanError(InputError):
    """No plan fits the budget; the message names the smallest budget that would."""


# ---------------------------------------------------------------------------------------------
# Weights


@dataclass(frozen=True)
class TransformerWeights:
    resident: int  # bytes outside the double/single blocks (embedders, refiner, final layer)
    blocks: tuple[int, ...]  # bytes per block, double blocks first
    block_params: tuple[int, ...]  # parameters per block (for FLOPs)


@functools.lru_cache(maxsize=16)
def transformer_weights(config: TransformerConfig, storage: str, dtype: torch.dtype) -> TransformerWeights:
    """Byte counts of a transformer whose block linears are stored as ``storage`` ("int8", "fp8" or a float
    name), from a model built on the meta device (quantize_model works there too)."""
    from ..model.transformer import HunyuanVideoTransformer
    from .quant import quantize_model, weight_bytes

    model = HunyuanVideoTransformer(config, device="meta", dtype=dtype)
    blocks = [*model.double_blocks, *model.single_blocks]
    params = tuple(sum(p.numel() for p in b.parameters()) for b in blocks)
    if storage in QUANTIZED_WEIGHTS:
        quantize_model(model, storage)
    block_bytes = tuple(weight_bytes(b) for b in blocks)
    return TransformerWeights(weight_bytes(model) - sum(block_bytes), block_bytes, params)


@functools.lru_cache(maxsize=8)
def vae_params(config: VAEConfig) -> int:
    from ..model.vae import CausalVAE

    return sum(p.numel() for p in CausalVAE(config, device="meta").parameters())


def text_encoder_params(folders: Iterable[Path]) -> Optional[int]:
    """Parameters the prompt encoders load from these folders, read from the safetensors headers (the MLLM's
    lm_head and the CLIP vision tower are not loaded, so not counted); None when no header is readable."""
    from safetensors import safe_open

    total, found = 0, False
    for folder in folders:
        for path in sorted(Path(folder).rglob("*.safetensors")):
            try:
                with safe_open(str(path), framework="pt") as f:
                    for key in f.keys():
                        if "lm_head" in key or key.startswith(CLIP_MODEL_EXTRAS):
                            continue
                        total += math.prod(f.get_slice(key).get_shape())
                found = True
            except Exception:  # noqa: BLE001 - an unreadable file is the loader's error to report, not the plan's
                continue
    return total if found else None


# ---------------------------------------------------------------------------------------------
# Activations of the transformer (the inference path of model/transformer.py)


def denoise_activation_bytes(config: TransformerConfig, video_tokens: int, text_tokens: int, batch: int,
                             dtype: torch.dtype, ff_chunk: Optional[int], attention: Optional[str],
                             device_type: str, quantized: bool = False) -> int:
    """The most bytes alive inside one transformer forward at inference, beyond the weights.

    Walks the phases of a double and a single block (autograd off, residual streams updated in place):
    building q/k/v, the in-place RMSNorm and RoPE (fp32 temporaries of half-precision q and k), attention
    (output + the merged copy + the backend's workspace) and the feed-forward (``ff_chunk`` tokens at a time),
    plus the RoPE tables the model caches and, for quantized layers, the dequantized copy of the largest weight.
    """
    e, h, m = _itemsize(dtype), config.hidden_size, config.mlp_hidden
    n, total = video_tokens, video_tokens + text_tokens
    stream, img = batch * total * h * e, batch * n * h * e  # the joint stream; its image part
    f32 = 4 if e < 4 else 0  # x.float() copies a half-precision tensor; it is x itself in fp32
    norm_tmp = (f32 + 4) / e  # bytes per element of the RMSNorm temporaries (the copy, then x.pow(2))
    ws = _attention_workspace(batch, total, config, e, attention, device_type)

    def rows(tokens: int) -> int:
        return batch * min(tokens, ff_chunk or tokens)

    double = max(7 * stream,  # the img and txt q/k/v parts and their concatenation
                 4 * stream + img * norm_tmp,
                 6 * stream + ws,  # q/k/v, attention output, merged heads
                 stream + rows(n) * (2 * h + m) * e)
    single = max(5 * stream + stream * norm_tmp,  # x, modulated x, q/k/v
                 7 * stream + ws,
                 3 * stream + rows(total) * (2 * m + 2 * h) * e)
    rope = 12 * n * config.head_dim  # cos, sin (fp32) and the complex rotation
    dequant = _largest_block_linear(config) * e if quantized else 0
    return int(max(double, single) + rope + dequant)


def _largest_block_linear(config: TransformerConfig) -> int:
    """Elements of the largest weight a quantized block dequantizes at once while its activations are large:
    linear2 of a single block (linear1 goes in its qkv and MLP parts, see QuantizedLinear.forward_rows) or a
    double block's MLP. (A double block's 6h x h modulation is larger, but runs at the block's start.)"""
    h, m = config.hidden_size, config.mlp_hidden
    return max((h + m) * h, m * h, 3 * h * h)


def _attention_workspace(batch: int, tokens: int, config: TransformerConfig, e: int, attention: Optional[str],
                         device_type: str) -> float:
    """Beyond q/k/v and the output: chunked attention's fp32 copies of k and v (half precision), one chunk's
    scores, the copy matmul makes of the strided k or v, and one chunk of queries or outputs in fp32."""
    heads, h = config.num_heads, config.hidden_size
    name, _, mib = (attention or "sdpa").partition(":")
    if name == "chunked":
        from ..model.layers import DEFAULT_CHUNK_SCORE_BYTES, attention_chunk_size

        rows = min(tokens, attention_chunk_size(batch * heads, tokens,
                                                int(mib) * 2**20 if mib else DEFAULT_CHUNK_SCORE_BYTES))
        f32 = 4 if e < 4 else 0
        return (2 * batch * tokens * h * f32 + batch * heads * rows * tokens * 4 + batch * tokens * h * 4
                + batch * rows * h * 4)
    if device_type in EFFICIENT_SDPA_DEVICES or name in ("flash", "sage"):
        return 0
    return 2 * batch * heads * tokens * tokens * e  # the score matrix and its softmax


def text_tokens(text: TextEncoderConfig) -> int:
    """Tokens of the transformer's text stream: sub-sampled image tokens + the cropped prompt (spec 2.1)."""
    if text.kind == "minilm":
        return text.text_len
    return -(-text.template.image_emb_len // text.image_embed_interleave) + text.text_len - 4


def _text_encoder_activation_bytes(config: ModelConfig, rows: int, dtype: torch.dtype) -> int:
    """Hidden states of every layer (the encoder returns them all) and a few layer-sized temporaries; coarse."""
    text = config.text
    seq = text.text_len
    if text.kind != "minilm":
        seq += text.template.crop_start + text.template.image_emb_len - 1
    layers = TEXT_ENCODER_LAYERS.get(text.kind, 32)
    return (layers + 6) * rows * seq * config.transformer.text_states_dim * _itemsize(dtype)


# ---------------------------------------------------------------------------------------------
# Activations of the VAE (the plain forward and lean_decode of model/vae.py)


class _Walk:
    """Live bytes along a forward pass: ``live`` between operations, ``peak`` the most at any point; ``flops``
    counts the convolutions (for the ranking time)."""

    def __init__(self, live: float = 0.0, itemsize: int = 4):
        self.live = self.peak = live
        self.flops = 0.0
        self.itemsize = itemsize  # of the weights

    def conv_output(self, old: float, new: float, cin: int, cout: int, shape_in) -> None:
        """A 3x3x3 causal conv's output replacing its padded input; on a single frame CausalConv3d.run first
        makes the folded (cout, cin, 3, 3) weight, which lives until the output is made."""
        if shape_in[0] == 1:
            self.inside(new + cout * cin * 9 * self.itemsize)
        self.becomes(old, new)

    def inside(self, extra: float) -> None:
        """A temporary of ``extra`` bytes exists beside what is live."""
        self.peak = max(self.peak, self.live + extra)

    def becomes(self, old: float, new: float) -> None:
        """An operation makes ``new`` bytes while its ``old`` input is alive, then the input is dropped."""
        self.inside(new)
        self.live += new - old

    def conv(self, cin: int, cout: int, positions: int, kernel: int = 3) -> None:
        self.flops += 2 * cin * cout * kernel**3 * positions


def _voxels(shape: tuple[int, int, int]) -> int:
    return shape[0] * shape[1] * shape[2]


def _padded(shape: tuple[int, int, int]) -> int:
    t, h, w = shape
    # a 3x3x3 causal conv: two frames in front, one pixel around; a single frame is padded in space only (its
    # temporal taps are folded, CausalConv3d.run)
    return (t + 2 if t > 1 else 1) * (h + 2) * (w + 2)


def _resampled(shape, factor, up: bool) -> tuple[int, int, int]:
    (t, h, w), (ft, fh, fw) = shape, factor
    if up:
        return 1 + ft * (t - 1), h * fh, w * fw
    return 1 + (t - 1) // ft, h // fh, w // fw


def _padded_conv(walk: _Walk, cin: int, cout: int, shape_in, shape_out, e: int) -> None:
    """CausalConv3d.forward on a live input: the padded copy, then the output beside it."""
    walk.becomes(0, cin * _padded(shape_in) * e)
    walk.conv_output(cin * _padded(shape_in) * e, cout * _voxels(shape_out) * e, cin, cout, shape_in)
    walk.conv(cin, cout, _voxels(shape_out))


def _resnet(walk: _Walk, cin: int, cout: int, shape, e: int, drop_input: bool = True) -> None:
    """ResnetBlock.forward: norm1, padded copy, conv1, norm2, padded copy, conv2, the shortcut, the sum.
    ``drop_input=False`` for a block's first layer: the Encoder/Decoder forward still holds the block's input."""
    p, pp = _voxels(shape) * e, _padded(shape) * e
    walk.becomes(0, cin * p)  # norm1 beside x (SiLU in place)
    walk.becomes(cin * p, cin * pp)
    walk.conv_output(cin * pp, cout * p, cin, cout, shape)  # conv1
    walk.becomes(cout * p, cout * p)  # norm2
    walk.becomes(cout * p, cout * pp)
    walk.conv_output(cout * pp, cout * p, cout, cout, shape)  # conv2
    walk.conv(cin, cout, _voxels(shape))
    walk.conv(cout, cout, _voxels(shape))
    if cin != cout:
        walk.inside(cout * p)  # the 1x1x1 shortcut
        walk.conv(cin, cout, _voxels(shape), kernel=1)
    if drop_input:
        walk.live -= cin * p


def _frame_attention(walk: _Walk, c: int, shape, e: int) -> None:
    """FrameCausalAttention: normalised tokens and their copy, q/k/v, attention, projection and the sum."""
    walk.inside(6 * c * _voxels(shape) * e)


def _final(walk: _Walk, c: int, cout: int, shape, e: int) -> None:
    """conv_norm_out -> SiLU -> conv_out, one statement each (Encoder and Decoder end alike)."""
    p, pp = _voxels(shape) * e, _padded(shape) * e
    walk.becomes(c * p, c * p)  # the norm beside x
    walk.becomes(c * p, c * pp)  # the padded copy beside the norm
    walk.conv_output(c * pp, cout * p, c, cout, shape)
    walk.conv(c, cout, _voxels(shape))


@functools.lru_cache(maxsize=256)
def decoder_walk(config: VAEConfig, latent_shape: tuple[int, int, int], dtype: torch.dtype, lean: bool) -> _Walk:
    """Live bytes of ``CausalVAE._decode_tile`` on one latent tile (batch 1), beyond the weights (cached: read
    ``peak`` and ``flops`` only)."""
    from ..model.vae import _resample_factor, resample_plan

    e = _itemsize(dtype)
    channels = tuple(reversed(config.block_out_channels))
    z = config.latent_channels * _voxels(latent_shape) * e
    walk = _Walk(2 * z, itemsize=e)  # the tile's latents and post_quant_conv's output, alive until it is done
    if lean:
        _lean_decoder(walk, config, channels, latent_shape, e)
        return walk
    shape, c = latent_shape, channels[0]
    _padded_conv(walk, config.latent_channels, c, shape, shape, e)  # conv_in
    _mid_block(walk, config, c, shape, e)
    for out_channels, (time, space) in zip(channels, resample_plan(config)):
        held = c * _voxels(shape) * e  # the block's input, which Decoder.forward holds until the block returns
        for i in range(config.layers_per_block + 1):
            _resnet(walk, c if i == 0 else out_channels, out_channels, shape, e, drop_input=i > 0)
            c = out_channels
        factor = _resample_factor(time, space)
        if factor is not None:  # Upsample: the nearest-upsampled copy, then its padded conv
            high = _resampled(shape, factor, up=True)
            walk.becomes(0, c * _voxels(high) * e)
            walk.becomes(c * _voxels(high) * e, c * _padded(high) * e)
            walk.becomes(c * _padded(high) * e, c * _voxels(high) * e)
            walk.conv(c, c, _voxels(high))
            walk.live -= c * _voxels(shape) * e
            shape = high
        walk.live -= held
    _final(walk, c, config.out_channels, shape, e)
    return walk


def _mid_block(walk: _Walk, config: VAEConfig, c: int, shape, e: int) -> None:
    _resnet(walk, c, c, shape, e, drop_input=False)  # MidBlock's input is held by the caller
    if config.mid_block_add_attention:
        _frame_attention(walk, c, shape, e)
    _resnet(walk, c, c, shape, e)
    walk.live -= c * _voxels(shape) * e


def _lean_decoder(walk: _Walk, config: VAEConfig, channels: Sequence[int], shape, e: int) -> None:
    """lean_decode: each layer's input and output, one padded chunk buffer and the chunk's conv output; the
    channel-halving resnets work inside their input's memory, same-channel ones hand their inner activation on."""
    from ..model.vae import _CHUNK_BYTES, _resample_factor, resample_plan

    def chunk(cin: int, cout: int, shortcut: bool = False, source: float = 0.0) -> float:
        """The padded input buffer of causal_conv_chunks, a chunk's conv output (and a shortcut's), the clone of
        the carried frames when a chunk is shorter than them, and ``source`` x the chunk (an upsample's input)."""
        t, h, w = shape
        frame = cin * (h + 2) * (w + 2) * e
        step = min(t, max(1, _CHUNK_BYTES // frame - 2))
        carried = 2 * frame if step < 2 < t else 0
        return (step + 2) * frame + carried + (1 + shortcut + source) * cout * step * h * w * e

    def to_new(cin: int, cout: int, out_shape, source: float = 0.0) -> float:
        """_conv_to_new: a new output beside the input."""
        nbytes = cout * _voxels(out_shape) * e
        walk.inside(nbytes + chunk(cin, cout, source=source))
        walk.live += nbytes
        walk.conv(cin, cout, _voxels(out_shape))
        return nbytes

    x = to_new(config.latent_channels, channels[0], shape)  # bytes of the storage x lives in
    spare, spare_channels = 0.0, None  # the spare's own storage (0 when it shares x's) and its channels

    def resnet(cin: int, cout: int) -> None:
        nonlocal x, spare, spare_channels
        p = _voxels(shape) * e
        walk.conv(cin, cout, _voxels(shape))
        walk.conv(cout, cout, _voxels(shape))
        if cin != cout and cin >= 2 * cout:  # h and the output are halves of x
            walk.inside(chunk(cin, cout, shortcut=True))
            walk.live -= spare
            spare, spare_channels = 0.0, cout
            return
        inner = 0.0 if spare_channels == cout else cout * p
        walk.inside(inner + chunk(cin, cout, shortcut=cin != cout))
        walk.live += inner
        if cin == cout:  # the residual goes into x, the inner activation becomes the spare
            if inner:
                walk.live -= spare
                spare = inner
            spare_channels = cout
        else:  # the output takes the inner activation's place; x and the spare are dropped
            walk.live -= x + spare
            x, spare, spare_channels = inner, 0.0, None

    c = channels[0]
    resnet(c, c)
    if config.mid_block_add_attention:
        walk.inside(5 * c * _voxels(shape) * e)  # tokens, q/k/v, attention, projection; the sum is in place
    resnet(c, c)
    for out_channels, (time, space) in zip(channels, resample_plan(config)):
        for i in range(config.layers_per_block + 1):
            resnet(c if i == 0 else out_channels, out_channels)
            c = out_channels
        factor = _resample_factor(time, space)
        if factor is not None:
            walk.live -= spare
            spare, spare_channels = 0.0, None
            if x > c * _voxels(shape) * e:  # a half of a shared buffer is copied out first
                walk.becomes(x, c * _voxels(shape) * e)
                x = c * _voxels(shape) * e
            shape = _resampled(shape, factor, up=True)
            high = to_new(c, c, shape, source=1 / (factor[1] * factor[2]))  # index_select of the source frames
            walk.live -= x
            x = high
    to_new(c, config.out_channels, shape)


@functools.lru_cache(maxsize=64)
def encoder_peak_bytes(config: VAEConfig, rows: int, height: int, width: int, dtype: torch.dtype) -> int:
    """Live bytes of the untiled VAE encoder on ``rows`` single frames (the reference images), pixels included."""
    from ..model.vae import _resample_factor, resample_plan

    e = _itemsize(dtype) * rows
    shape = (1, height, width)
    walk = _Walk(config.in_channels * _voxels(shape) * e, itemsize=_itemsize(dtype))
    c = config.block_out_channels[0]
    _padded_conv(walk, config.in_channels, c, shape, shape, e)
    for out_channels, (time, space) in zip(config.block_out_channels, resample_plan(config)):
        held = c * _voxels(shape) * e  # the block's input, which Encoder.forward holds until the block returns
        for i in range(config.layers_per_block):
            _resnet(walk, c if i == 0 else out_channels, out_channels, shape, e, drop_input=i > 0)
            c = out_channels
        factor = _resample_factor(time, space)
        if factor is not None:  # Downsample: a strided padded conv
            low = _resampled(shape, factor, up=False)
            _padded_conv(walk, c, c, shape, low, e)
            walk.live -= c * _voxels(shape) * e
            shape = low
        walk.live -= held
    _mid_block(walk, config, c, shape, e)
    _final(walk, c, 2 * config.latent_channels, shape, e)
    return int(walk.peak)


@dataclass(frozen=True)
class _Tiling:
    tiles: int  # decoder calls per video
    tile_latents: tuple[int, int, int]  # the largest tile, in latent frames / rows / columns
    chunk_frames: int  # frames of the largest chunk the decode yields
    overlap: float  # decoded voxels per output voxel


def _decode_tiling(config: VAEConfig, latents: tuple[int, int, int], tile: Optional[tuple[int, int]],
                   tiled: Optional[bool]) -> _Tiling:
    """The tiles ``CausalVAE.decode_stream`` runs, mirroring its triggers and ``tile_plan``."""
    from ..model.vae import tile_plan

    if tile is not None:
        config = dataclasses.replace(config, tile_sample_size=tile[0], tile_sample_frames=tile[1])
    t, h, w = latents
    size = config.tile_sample_size // config.spatial_compression
    space = tiled is True or (tiled is None and (h > size or w > size))
    time = tiled is True or (tiled is None and t > config.tile_sample_frames // config.temporal_compression)
    n_rows = n_cols = n_t = 1
    tile_h, tile_w, tile_t = h, w, t
    if space:
        sp = tile_plan(config, "decode_space")
        n_rows, n_cols = len(range(0, h, sp.stride)), len(range(0, w, sp.stride))
        tile_h, tile_w = min(h, sp.window), min(w, sp.window)
    out_frames = 1 + config.temporal_compression * (t - 1)
    chunk = out_frames
    if time:
        tp = tile_plan(config, "decode_time")
        n_t = max(1, len([s for k, s in enumerate(range(0, t, tp.stride)) if k == 0 or t - s > 1]))
        tile_t = min(t, tp.window)
        chunk = min(out_frames, tp.keep + 1)
    decoded = n_t * (1 + config.temporal_compression * (tile_t - 1)) * n_rows * n_cols * tile_h * tile_w
    overlap = decoded / (out_frames * h * w)
    return _Tiling(n_t * n_rows * n_cols, (tile_t, tile_h, tile_w), chunk, overlap)


def decode_activation_bytes(config: VAEConfig, latents: tuple[int, int, int], dtype: torch.dtype,
                            tile: Optional[tuple[int, int]], lean: bool, tiled: Optional[bool] = None) -> int:
    """Live bytes of decoding one video the way the pipeline does (``decode_stream``, each chunk converted to
    float frames and sent to the host), beyond the weights."""
    e = _itemsize(dtype)
    tiling = _decode_tiling(config, latents, tile, tiled)
    sc = config.spatial_compression
    height, width = latents[1] * sc, latents[2] * sc
    assembled = config.out_channels * tiling.chunk_frames * height * width * e  # a chunk, spatially assembled
    post = assembled + 2 * config.out_channels * tiling.chunk_frames * height * width * 4  # x.float(), the next op
    tile_walk = decoder_walk(config, tiling.tile_latents, dtype, lean)
    return int(max(assembled + tile_walk.peak, post))


# ---------------------------------------------------------------------------------------------
# Stages of one plan


@dataclass(frozen=True)
class _Sizes:
    """Everything about a call the stage predictions need, derived once."""

    config: ModelConfig
    work: Workload
    target: Target
    video_tokens: int
    text_tokens: int
    latents: tuple[int, int, int]  # latent frames, rows, columns
    text_encoder_bytes: int
    text_encoder_params: int
    vae_bytes: int
    tiled: Optional[bool]

    @property
    def batch(self) -> int:
        return self.work.videos * (2 if self.work.cfg else 1)

    @property
    def latent_bytes(self) -> int:
        """One video's fp32 latents (as the transformer takes them)."""
        return self.config.transformer.in_channels * math.prod(self.latents) * 4


def _sizes(config: ModelConfig, work: Workload, target: Target, encoder_params: Optional[int],
           tiled: Optional[bool]) -> _Sizes:
    vcfg, tcfg = config.vae, config.transformer
    _, video = token_counts(work.num_frames, work.height, work.width, tcfg.patch_size[1], vcfg.spatial_compression,
                            vcfg.temporal_compression)
    sc = vcfg.spatial_compression
    latents = (vcfg.latent_frames(work.num_frames), work.height // sc, work.width // sc)
    params = encoder_params or DEFAULT_TEXT_ENCODER_PARAMS.get(config.text.kind, 0)
    return _Sizes(config, work, target, video, text_tokens(config.text), latents,
                  params * _itemsize(target.encoder_dtype), params, vae_params(vcfg) * _itemsize(target.vae_dtype),
                  tiled)


@functools.lru_cache(maxsize=4096)
def _denoising(s: _Sizes, offload: str, weights_dtype: str, attention: Optional[str], ff_chunk: Optional[int],
               speed: DeviceSpeed) -> tuple[int, float]:
    """(peak bytes of the denoising stage, estimated seconds of one step)."""
    tcfg, target, work = s.config.transformer, s.target, s.work
    weights = transformer_weights(tcfg, weights_dtype, target.dtype)
    quantized = weights_dtype in QUANTIZED_WEIGHTS
    if offload == "blocks":
        on_device = weights.resident + BLOCKS_IN_FLIGHT.get(target.device_type, 1 + PREFETCH) * max(weights.blocks)
    else:
        on_device = weights.resident + sum(weights.blocks) + (s.vae_bytes if offload == "none" else 0)
    text_states = 2 * s.batch * s.text_tokens * tcfg.text_states_dim * _itemsize(target.encoder_dtype)
    latents = (8 + 4 * work.cfg) * work.videos * s.latent_bytes  # noise, latents, model input and output
    peak = on_device + text_states + latents + denoise_activation_bytes(
        tcfg, s.video_tokens, s.text_tokens, s.batch, target.dtype, ff_chunk, attention, target.device_type, quantized)
    if quantized and target.device_type == "cpu":
        # Outside the tensors: the CPU matmul takes a second weight-sized copy of the dequantized weight (the 13B
        # int8 step peaks 0.28 GB above every between-layer RSS sample, where the bf16 one peaks at a sample;
        # docs/benchmarks.md)
        peak += _largest_block_linear(tcfg) * _itemsize(target.dtype)

    tokens = s.video_tokens + s.text_tokens
    chunked = (attention or "").startswith("chunked")
    attention_seconds = 4 * s.batch * tokens**2 * tcfg.hidden_size / (
        speed.flops * (speed.chunked_attention if chunked else 1.0))
    launches = 4 * (math.ceil(tokens / ff_chunk) if ff_chunk else 1) * speed.launch
    step = 0.0
    for params, nbytes in zip(weights.block_params, weights.blocks):
        compute = 2 * params * s.batch * tokens / speed.flops + attention_seconds + launches
        if quantized:  # codes read, dequantized copy written and read by the matmul
            compute += params * (1 + 2 * _itemsize(target.dtype)) / speed.memory
        step += max(compute, nbytes / speed.host_to_device) if offload == "blocks" else compute
    return int(peak), step


@functools.lru_cache(maxsize=256)
def _decoding(s: _Sizes, tile: Optional[tuple[int, int]], lean: bool) -> tuple[int, float]:
    """(activation bytes of decoding one video, decoder FLOPs of one video)."""
    vcfg, dtype = s.config.vae, s.target.vae_dtype
    tiling = _decode_tiling(vcfg, s.latents, tile, s.tiled)
    return (decode_activation_bytes(vcfg, s.latents, dtype, tile, lean, s.tiled),
            tiling.tiles * decoder_walk(vcfg, tiling.tile_latents, dtype, lean).flops)


def _evaluate(s: _Sizes, plan: MemoryPlan, speed: DeviceSpeed) -> MemoryPlan:
    """The plan with its stage peaks and ranking time filled in."""
    cfg, work, target = s.config, s.work, s.target
    weights = transformer_weights(cfg.transformer, plan.weights_dtype, target.dtype)
    full = weights.resident + sum(weights.blocks)
    rope = 12 * s.video_tokens * cfg.transformer.head_dim  # the RoPE cache is no module tensor: it stays put
    resident = full + s.vae_bytes if plan.offload == "none" else 0  # what stays on the device between stages

    text = resident + rope
    if work.encode_prompts and not plan.text_on_cpu:
        text += s.text_encoder_bytes + _text_encoder_activation_bytes(cfg, work.prompts, target.encoder_dtype)
    image = (resident or s.vae_bytes) + rope + encoder_peak_bytes(cfg.vae, work.prompts, work.height, work.width,
                                                                  target.vae_dtype)
    denoise, step_seconds = _denoising(s, plan.offload, plan.weights_dtype, plan.attention, plan.ff_chunk_tokens,
                                       speed)
    decode_bytes, decode_flops = _decoding(s, plan.vae_tile, plan.vae_lean)
    decode = (resident or s.vae_bytes) + rope + work.videos * s.latent_bytes + decode_bytes
    peaks = tuple(zip(STAGES, (int(text), int(image), denoise, int(decode))))

    seconds = work.steps * step_seconds + work.videos * decode_flops / speed.flops
    if plan.offload != "none":  # each call moves the transformer and the VAE on and off the device
        seconds += 2 * (full + s.vae_bytes) / speed.host_to_device
    if work.encode_prompts:
        prompt_flops = 2 * s.text_encoder_params * work.prompts * (2 if work.cfg else 1) * s.text_tokens
        seconds += prompt_flops / (speed.cpu_flops if plan.text_on_cpu else speed.flops)
    return dataclasses.replace(plan, peaks=peaks, seconds=seconds)


# ---------------------------------------------------------------------------------------------
# Choosing


def _vae_tiles(config: VAEConfig) -> list[Optional[tuple[int, int]]]:
    """The config's tiles, then halved and quartered sizes that tile_plan accepts (multiples of 4 x compression)."""
    px_step, t_step = 4 * config.spatial_compression, 4 * config.temporal_compression
    out: list[Optional[tuple[int, int]]] = [None]
    for px_div, t_div in ((1, 2), (2, 1), (2, 2), (2, 4), (4, 2), (4, 4)):
        px, frames = config.tile_sample_size // px_div, config.tile_sample_frames // t_div
        if px >= px_step and frames >= t_step and px % px_step == 0 and frames % t_step == 0:
            out.append((px, frames))
    return list(dict.fromkeys(out))


def candidate_plans(config: ModelConfig, work: Workload, target: Target, fixed: Fixed = Fixed(), *,
                    text_encoder_params: Optional[int] = None, movable_encoder: bool = True,
                    vae_tiling: Optional[bool] = None, speed: Optional[DeviceSpeed] = None) -> list[MemoryPlan]:
    """Every plan the choices allow, each with its predicted stage peaks and ranking time."""
    fixed.check(target)
    s = _sizes(config, work, target, text_encoder_params, vae_tiling)
    speed = speed or SPEEDS.get(target.device_type, OTHER_SPEED)
    offloads = (fixed.offload,) if fixed.offload else OFFLOAD_MODES
    wd = fixed.weights_dtype
    weights = (wd,) if wd and wd != "auto" else (target.native_weights, *QUANTIZED_WEIGHTS)
    if fixed.attention:
        attentions: tuple[Optional[str], ...] = (fixed.attention,)
    elif target.device_type in EFFICIENT_SDPA_DEVICES:
        attentions = (None,)
    else:
        attentions = (None, *(f"chunked:{m}" for m in ATTENTION_CHUNKS_MIB))
    text_places = (False, True) if movable_encoder and work.encode_prompts and target.device_type != "cpu" else (False,)
    vae = [(None, False), (None, True)] + [(t, lean) for t in _vae_tiles(config.vae)[1:] for lean in (False, True)]
    plans = []
    for offload in offloads:
        for w in weights:
            for attention in attentions:
                for ff in FF_CHUNKS:
                    for tile, lean in vae:
                        for text_on_cpu in text_places:
                            plan = MemoryPlan(offload, w, attention, ff, tile, lean, text_on_cpu)
                            plans.append(_evaluate(s, plan, speed))
    return plans


def plan_memory(config: ModelConfig, work: Workload, target: Target, budget_gb: float, fixed: Fixed = Fixed(),
                **kw) -> MemoryPlan:
    """The plan of the best rank (see the module docstring) whose stages fit ``budget_gb``, the fastest of that
    rank. Raises :class:`PlanError` naming the smallest budget that would fit."""
    if not budget_gb > 0:
        raise InputError(f"--memory-budget must be a positive number of GB, got {budget_gb}")
    plans = candidate_plans(config, work, target, fixed, **kw)
    usable = budget_gb * GB * (1 - MARGIN)
    fitting = [p for p in plans if p.peak <= usable]
    if fitting:
        return min(fitting, key=lambda p: (p.rank, p.seconds))
    leanest = min(plans, key=lambda p: (p.peak, p.rank, p.seconds))
    chosen = [f"--{k.replace('_', '-')} {v}" for k, v in dataclasses.asdict(fixed).items() if v]
    raise PlanError(
        f"no plan fits in {budget_gb:g} GB{' with ' + ' '.join(chosen) if chosen else ''}: the leanest "
        f"({leanest.describe()}) needs {leanest.budget_needed():.1f} GB at {work.height}x{work.width}, "
        f"{work.num_frames} frames; give --memory-budget {leanest.budget_needed():.1f} or more, or fewer frames "
        "or a lower resolution")


def evaluate(config: ModelConfig, work: Workload, target: Target, plan: MemoryPlan, *,
             text_encoder_params: Optional[int] = None, movable_encoder: bool = True,
             vae_tiling: Optional[bool] = None, speed: Optional[DeviceSpeed] = None) -> MemoryPlan:
    """``plan`` with its predicted stage peaks and ranking time (``movable_encoder`` is accepted for symmetry
    with :func:`candidate_plans`)."""
    s = _sizes(config, work, target, text_encoder_params, vae_tiling)
    return _evaluate(s, plan, speed or SPEEDS.get(target.device_type, OTHER_SPEED))


def plan_for(config: ModelConfig, work: Workload, target: Target, fixed: Fixed = Fixed(), **kw) -> MemoryPlan:
    """The plan that the explicit choices give without a budget (the defaults: nothing offloaded, the compute
    dtype, no chunking, the VAE config's tiles), with its predictions."""
    fixed.check(target)
    wd = fixed.weights_dtype if fixed.weights_dtype not in (None, "auto") else target.native_weights
    return evaluate(config, work, target, MemoryPlan(fixed.offload or "none", wd, fixed.attention), **kw)


def plan_after_oom(config: ModelConfig, work: Workload, target: Target, failed: MemoryPlan,
                   available: Optional[int], fixed: Fixed = Fixed(), **kw) -> Optional[MemoryPlan]:
    """After ``failed`` ran out of memory: the best plan predicted to need less than it did (and, when known,
    at most ``available`` bytes with the margin); None when no plan is leaner. Choices in ``fixed`` are
    dropped when keeping them leaves nothing."""
    for choices in (fixed, Fixed()):
        plans = candidate_plans(config, work, target, choices, **kw)
        limit = failed.peak if available is None else min(failed.peak, available * (1 - MARGIN))
        leaner = [p for p in plans if p.peak < limit]
        if leaner:
            return min(leaner, key=lambda p: (p.rank, p.seconds))
    return None


def workload_for(config: ModelConfig, height: int, width: int, num_frames: Optional[int] = None, *,
                 videos: int = 1, cfg: Optional[bool] = None, prompts: int = 1, steps: Optional[int] = None,
                 encode_prompts: bool = True) -> Workload:
    """A Workload with the model's sampler defaults for what is not given."""
    sampler = config.sampler
    return Workload(height, width, num_frames or sampler.num_frames, videos,
                    sampler.cfg_scale > 1 if cfg is None else cfg, prompts, steps or sampler.steps, encode_prompts)


def plan_table(plans: Sequence[MemoryPlan], budget_gb: Optional[float] = None) -> list[str]:
    """One line per residency and weights dtype: the best plan of that pair (fitting the budget when given)."""
    usable = None if budget_gb is None else budget_gb * GB * (1 - MARGIN)
    lines = []
    for offload in OFFLOAD_MODES:
        for wd in dict.fromkeys(p.weights_dtype for p in plans):
            pair = [p for p in plans if p.offload == offload and p.weights_dtype == wd]
            if not pair:
                continue
            fit = [p for p in pair if usable is None or p.peak <= usable]
            best = (min(fit, key=lambda p: (p.rank, p.seconds)) if fit
                    else min(pair, key=lambda p: (p.peak, p.rank, p.seconds)))  # the leanest, when none fits
            mark = "fits" if fit and usable is not None else ("too big" if usable is not None else "")
            lines.append(f"    {offload:<7} {wd:<5} peak {format_size(best.peak):>9}  {mark:<8} {best.describe()}")
    return lines


# ---------------------------------------------------------------------------------------------
# LoRA training (train/lora.py): one optimiser step on a frozen, possibly quantized and streamed base


# parameter-sized temporaries of AdamW's foreach step (sqrt of exp_avg_sq, the update), which PyTorch takes on a GPU;
# on the CPU it steps one tensor at a time
ADAMW_STEP_TEMPORARIES = {"cuda": 2}
# train/optim.AdamW8bit steps one tensor at a time through fp32 copies of its parameter, gradient, two moments, the
# denominator and the padded blocks of the requantization: about 8 fp32 copies of the largest adapter tensor
ADAMW8BIT_STEP_TEMPORARIES = 8


@dataclass(frozen=True)
class LoraTrainingPlan:
    """Predicted device bytes of one LoRA training step (:func:`plan_lora_training`), by what holds them.

    The prompt encoders and the VAE are not on the device: ``lora prepare`` caches the latents and embeddings.
    """

    offload: str  # none | blocks
    weights_dtype: str  # storage of the base's block linears
    grad_checkpointing: bool
    offload_activations: bool  # the checkpointed block inputs wait in host memory
    rank: int
    video_tokens: int
    text_tokens: int
    weights: int  # the base on the device: resident part + streamed blocks in flight, or all of it
    adapters: int  # the LoRA factors (fp32)
    gradients: int  # their gradients (fp32)
    optimizer: int  # the optimiser's state: AdamW's two fp32 moments, or AdamW8bit's codes and block scales
    checkpoints: int  # what the forward keeps for backward: each block's input (checkpointing) or its activations
    block: int  # the largest block's recomputed activations plus its backward temporaries and input gradient
    other: int  # latents, RoPE tables, the token refiner's activations, a dequantized weight
    step_temporaries: int  # the optimiser step's temporaries (the activations are gone by then)
    optimizer_name: str = "adamw"  # adamw | adamw8bit

    @property
    def backward_peak(self) -> int:
        return (self.weights + self.adapters + self.gradients + self.optimizer + self.checkpoints + self.block
                + self.other)

    @property
    def step_peak(self) -> int:
        return self.weights + self.adapters + self.gradients + self.optimizer + self.step_temporaries

    @property
    def peak(self) -> int:
        return max(self.backward_peak, self.step_peak)

    @property
    def activations(self) -> int:
        """What a step allocates beyond weights, factors and optimiser state: the live-tensor measure of a
        forward + backward (``tests/test_planner.py``)."""
        return self.checkpoints + self.block + self.other

    def budget_needed(self) -> float:
        return math.ceil(self.peak / (1 - MARGIN) / GB * 10) / 10

    def describe(self) -> str:
        where = "blocks streamed" if self.offload == "blocks" else "all weights resident"
        ckpt = "gradient checkpointing" if self.grad_checkpointing else "no checkpointing"
        if self.offload_activations:
            ckpt += " (block inputs in host memory)"
        opt = ", 8-bit AdamW" if self.optimizer_name == "adamw8bit" else ""
        return f"{where}, {self.weights_dtype} block weights, {ckpt}, rank {self.rank}{opt}"

    def flags(self) -> str:
        out = [f"--offload {self.offload}", f"--weights-dtype {self.weights_dtype}"]
        out += ["--grad-checkpointing"] if self.grad_checkpointing else []
        out += ["--offload-activations"] if self.offload_activations else []
        return " ".join(out + ([f"--optimizer {self.optimizer_name}"] if self.optimizer_name != "adamw" else []))

    def lines(self, indent: str = "    ") -> list[str]:
        parts = [("base weights on the device", self.weights), ("LoRA factors (fp32)", self.adapters),
                 ("their gradients", self.gradients),
                 ("AdamW moments" + (" (8-bit)" if self.optimizer_name == "adamw8bit" else ""), self.optimizer),
                 ("block inputs kept for backward" if self.grad_checkpointing else "activations kept for backward",
                  self.checkpoints),
                 ("one block's recompute + backward", self.block), ("latents, RoPE, refiner, other", self.other)]
        out = [f"{indent}{name:<34} {format_size(b):>9}" for name, b in parts]
        out.append(f"{indent}{'peak (backward / optimiser step)':<34} {format_size(self.peak):>9}"
                   f"  ({format_size(self.backward_peak)} / {format_size(self.step_peak)})")
        return out


@functools.lru_cache(maxsize=16)
def _lora_tensor_sizes(config: TransformerConfig, rank: int) -> tuple[int, ...]:
    """Elements of every trainable tensor of rank-``rank`` adapters on the official targets: down r x in and
    up out x r per layer (cached: building the 13B model on the meta device takes ~0.4 s, and a table plans many
    residencies)."""
    from ..model.transformer import HunyuanVideoTransformer
    from ..train.lora import lora_target_modules

    model = HunyuanVideoTransformer(config, device="meta")
    return tuple(n for m in (model.get_submodule(name) for name in lora_target_modules(model))
                 for n in (rank * m.in_features, m.out_features * rank))


def lora_optimizer_bytes(config: TransformerConfig, rank: int, optimizer: str = "adamw") -> int:
    """Bytes of the optimiser state of rank-``rank`` adapters: AdamW's two fp32 moments (8 bytes per parameter),
    or AdamW8bit's two 1-byte codes per parameter plus two fp32 scales per block of each tensor."""
    from ..train.optim import FP32_STATE_BYTES, OPTIMIZERS, adamw8bit_state_bytes

    sizes = _lora_tensor_sizes(config, rank)
    if optimizer == "adamw":
        return FP32_STATE_BYTES * sum(sizes)
    if optimizer == "adamw8bit":
        return sum(adamw8bit_state_bytes(n) for n in sizes)
    raise InputError(f"--optimizer is one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")


def _block_training_bytes(config: TransformerConfig, n: int, text: int, batch: int, e: int, rank: int
                          ) -> tuple[int, int, int, int]:
    """(saved, peak beyond saved) of a double block and of a single block under autograd, per
    ``_forward_autograd`` of model/transformer.py with every official target wrapped by a LoRA.

    Saved (what backward reads), per stream of s tokens, in s x hidden elements: the LayerNorm output and its
    modulated copy, the qkv output (fp32; in half precision RMSNorm keeps fp32 copies of q and k instead), the
    merged attention, the projection, the attention residual, the second LayerNorm and modulation, fc1's and
    GELU's outputs (mlp each), fc2's output; the joint attention keeps q, k, v and its output. A single block
    keeps its norm, modulation, linear1's output (3h + mlp), the roped q and k, the attention output, the
    [attention, GELU] concatenation (h + mlp) and linear2's output. The backward peak adds, to the saved tensors
    and the incoming gradient, the two input gradients (base + adapter) of the widest-input LoRA layer: fc2 of the
    image stream, linear2. The recompute's forward peaks lower (at linear1: three outputs of 3h + mlp beside two
    streams), and is taken as the maximum with it.
    """
    h, m, heads = config.hidden_size, config.mlp_hidden, config.num_heads
    total = n + text
    f32 = 4
    half = e < 4

    def unit(tokens: int) -> int:  # one [batch, tokens, hidden] tensor
        return batch * tokens * h * e

    small = lambda tokens, loras: batch * tokens * (loras * rank * e + 4 * f32 + 2 * heads * f32)  # noqa: E731
    per_stream = (8 + (0 if half else 3)) * h * e + 2 * m * e + (2 * h * f32 if half else 0)
    double_saved = (batch * total * per_stream + 4 * unit(total) + batch * heads * total * f32
                    + small(n, 4) + small(text, 4))
    double_extra = unit(total) + 2 * batch * n * m * e  # incoming gradient + fc2's two input gradients
    # at the image stream's fc1, before its output, GELU and fc2 are saved: base output, adapter update, sum
    double_forward = unit(total) + double_saved - batch * n * (2 * m + h) * e + 3 * batch * n * m * e
    single_saved = (unit(total) * 6 + batch * total * ((3 * h + m) + (h + m)) * e
                    + (2 * batch * total * h * f32 if half else 0) + batch * heads * total * f32 + small(total, 2))
    single_extra = unit(total) + 2 * batch * total * (h + m) * e
    single_forward = 2 * unit(total) + 3 * batch * total * (3 * h + m) * e + unit(total)
    return (double_saved, max(double_extra, double_forward - double_saved),
            single_saved, max(single_extra, single_forward - single_saved))


def plan_lora_training(config: ModelConfig, height: int, width: int, num_frames: int, target: Target,
                       weights_dtype: Optional[str] = None, offload: str = "none", grad_checkpointing: bool = True,
                       rank: int = 64, batch: int = 1, text_len: Optional[int] = None,
                       offload_activations: bool = False, optimizer: str = "adamw") -> LoraTrainingPlan:
    """Predicted device memory of one LoRA training step of ``train/lora.py`` on ``target`` (its ``dtype`` is the
    base's compute dtype; bf16 autocast of an fp32 base is not modelled: plan it as a bf16 base).

    weights_dtype: the block linears' storage (default the compute dtype; int8 / fp8 quantized). offload: none,
    or blocks (streamed: the resident part plus the blocks in flight, :data:`BLOCKS_IN_FLIGHT`). With gradient
    checkpointing the forward keeps each block's input and the backward recomputes one block at a time (its
    activations + backward temporaries: :func:`_block_training_bytes`), the peak being at the last single block
    (every input still alive) or the last double block (the larger block); without it every block's activations
    stay. LoRA factors, gradients and AdamW moments are fp32, 16 bytes per parameter in all; with ``optimizer=
    "adamw8bit"`` the moments are 8-bit codes with block scales (:func:`lora_optimizer_bytes`), about 10 bytes per
    parameter in all. text_len: the text stream's tokens (default the model's, see :func:`text_tokens`).
    offload_activations: the block inputs wait in host memory (``save_on_cpu``): on the device only the one being
    recomputed and the one the forward is making.
    """
    if offload not in ("none", "blocks"):
        raise InputError(f"--offload for training is none or blocks, got {offload!r}")
    if offload == "blocks" and not grad_checkpointing:
        raise InputError("--offload blocks needs --grad-checkpointing (the backward recomputes each streamed block)")
    if offload_activations and not grad_checkpointing:
        raise InputError("--offload-activations needs --grad-checkpointing (it moves the checkpointed block inputs)")
    tcfg, vcfg = config.transformer, config.vae
    weights_dtype = weights_dtype or target.native_weights
    Fixed(weights_dtype=weights_dtype).check(target)
    _, n = token_counts(num_frames, height, width, tcfg.patch_size[1], vcfg.spatial_compression,
                        vcfg.temporal_compression)
    text = text_tokens(config.text) if text_len is None else text_len
    e = _itemsize(target.dtype)
    w = transformer_weights(tcfg, weights_dtype, target.dtype)
    quantized = weights_dtype in QUANTIZED_WEIGHTS
    if offload == "blocks":
        weights = w.resident + BLOCKS_IN_FLIGHT.get(target.device_type, 1 + PREFETCH) * max(w.blocks)
    else:
        weights = w.resident + sum(w.blocks)
    sizes = _lora_tensor_sizes(tcfg, rank)
    params = sum(sizes)
    optimizer_bytes = lora_optimizer_bytes(tcfg, rank, optimizer)
    if optimizer == "adamw8bit":
        step_temporaries = ADAMW8BIT_STEP_TEMPORARIES * max(sizes) * 4
    else:
        step_temporaries = ADAMW_STEP_TEMPORARIES.get(target.device_type, 0) * params * 4

    total = n + text
    stream = batch * total * tcfg.hidden_size * e
    d_saved, d_extra, s_saved, s_extra = _block_training_bytes(tcfg, n, text, batch, e, rank)
    depth_d, depth_s = tcfg.depth_double, tcfg.depth_single
    if grad_checkpointing and offload_activations:
        checkpoints = 2 * stream
        block = max(s_saved + s_extra if depth_s else 0, d_saved + d_extra if depth_d else 0)
    elif grad_checkpointing:
        checkpoints = (depth_d + depth_s) * stream  # double: image + text tokens; single: the joint stream
        # the last single block runs backward first, with every input still alive; the last double block after the
        # single blocks' inputs are freed, but it is the larger block
        block = max(s_saved + s_extra if depth_s else 0, d_saved + d_extra - depth_s * stream if depth_d else 0)
    else:
        checkpoints = depth_d * d_saved + depth_s * s_saved + (depth_d + depth_s) * stream
        block = max(s_extra if depth_s else 0, d_extra if depth_d else 0)
    latents = 8 * batch * tcfg.in_channels * vcfg.latent_frames(num_frames) * (height // vcfg.spatial_compression) * (
        width // vcfg.spatial_compression) * 4  # x0, noise, first, x_t, target, model input and output, loss copies
    rope = 12 * n * tcfg.head_dim
    refiner = tcfg.refiner_depth * batch * text * (20 * tcfg.hidden_size * e)  # ~ a double block's text stream
    if offload_activations:
        refiner = 0
    dequant = _largest_block_linear(tcfg) * e * (2 if target.device_type == "cpu" else 1) if quantized else 0
    return LoraTrainingPlan(offload, weights_dtype, grad_checkpointing, offload_activations, rank, n, text,
                            int(weights), params * 4,
                            params * 4, optimizer_bytes, int(checkpoints), int(block),
                            int(latents + rope + refiner + dequant), step_temporaries, optimizer)


def lora_training_table(config: ModelConfig, height: int, width: int, num_frames: int, target: Target,
                        budget_gb: Optional[float] = None, rank: int = 64, batch: int = 1,
                        text_len: Optional[int] = None, optimizer: str = "adamw"
                        ) -> list[tuple[LoraTrainingPlan, Optional[bool]]]:
    """Every residency x storage with gradient checkpointing (block inputs on the device, and on a GPU also in
    host memory) and all resident without it, each with whether it fits ``budget_gb`` (None without a budget), the
    ones that fit first, the leanest first within each group."""
    rows = []
    moved = (False, True) if target.device_type != "cpu" else (False,)
    for offload in ("none", "blocks"):
        for wd in (target.native_weights, *QUANTIZED_WEIGHTS):
            choices = [(True, m) for m in moved] + ([(False, False)] if offload == "none" else [])
            for ckpt, to_host in choices:
                rows.append(plan_lora_training(config, height, width, num_frames, target, wd, offload, ckpt, rank,
                                               batch, text_len, to_host, optimizer))
    usable = None if budget_gb is None else budget_gb * GB * (1 - MARGIN)
    marked = [(p, None if usable is None else p.peak <= usable) for p in rows]
    return sorted(marked, key=lambda r: (not r[1], r[0].peak))
