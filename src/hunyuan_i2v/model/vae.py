"""The 3D causal VAE of HunyuanVideo ("884-16c-hy"): 8x spatial, 4x temporal compression, 16 latent channels.

Structure (spec section 3.2; the 13B channels are (128, 256, 512, 512))::

    video [B, 3, 1+4k, H, W] in [-1, 1]
      Encoder: conv_in -> down_blocks (ResnetBlock x layers_per_block, then a strided CausalConv3d) ->
               mid_block (resnet, frame-causal attention, resnet) -> GroupNorm -> SiLU -> conv_out
      quant_conv (1x1x1) -> moments [B, 2*16, 1+k, H/8, W/8] -> DiagonalGaussian (mean, logvar)
      post_quant_conv (1x1x1) on a latent [B, 16, 1+k, H/8, W/8]
      Decoder: conv_in -> mid_block -> up_blocks (ResnetBlock x (layers_per_block + 1), then nearest
               upsampling + CausalConv3d) -> GroupNorm -> SiLU -> conv_out -> video [B, 3, 1+4k, H, W]

Every convolution is causal in time: its input is padded with k-1 copies of the first frame in front and
none behind (space is padded by replication), so 1+4k frames map to 1+k latent frames and frame 0 gets a
latent frame of its own. The down/up blocks that resample follow from the config (:func:`resample_plan`):
with four blocks, blocks 0-2 halve space and blocks 1-2 halve time, and the decoder's up blocks use the same
rule. The mid-block attention has one head over all (frame, row, column) tokens, masked so that a token
sees the tokens of its own and earlier frames (:func:`causal_frame_mask`). GroupNorm, however, pools its
statistics over all frames of the clip, so the network as a whole is causal only up to normalisation: a
video's first latent frame is close to, not equal to, the latent of that frame encoded as an image.

Parameter names are those of the official checkpoint, which are also diffusers' (spec section 3.3), so
either state dict loads with ``strict=True``. Long or large inputs go through the official tiling (spec
section 3.4, :func:`tile_plan`): overlapping tiles cross-faded linearly; a later temporal tile drops its
first output frame, which only restarts the causal context.
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass
from collections.abc import Iterator
from typing import Any, Callable, Mapping, Optional, Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from hunyuan_i2v.config import VAEConfig
from hunyuan_i2v.errors import InputError

logger = logging.getLogger(__name__)

_NORM_EPS = 1e-6
_LOGVAR_RANGE = (-30.0, 20.0)

# ---------------------------------------------------------------------------------------------
# Math


def resample_plan(config: VAEConfig) -> list[tuple[bool, bool]]:
    """For each encoder down block i (and decoder up block i): (resamples time, resamples space).

    Space is halved by the first log2(spatial_compression) blocks; time by the log2(temporal_compression)
    blocks just before the last one, which never resamples (the official/diffusers rule for 4x time).
    """
    n = len(config.block_out_channels)
    n_space = _log2(config.spatial_compression, "spatial_compression")
    n_time = _log2(config.temporal_compression, "temporal_compression")
    if max(n_space, n_time) > n - 1:
        raise ValueError(
            f"{n} blocks give at most {n - 1} resampling steps, but spatial_compression "
            f"{config.spatial_compression} / temporal_compression {config.temporal_compression} need "
            f"{n_space} / {n_time}; add blocks to block_out_channels or lower the compression"
        )
    return [(n - 1 - n_time <= i < n - 1, i < n_space) for i in range(n)]


def _log2(value: int, name: str) -> int:
    if value < 1 or value & (value - 1):
        raise ValueError(f"{name} must be a power of two, got {value}")
    return value.bit_length() - 1


def causal_frame_mask(num_frames: int, tokens_per_frame: int, device: Optional[torch.device] = None) -> Tensor:
    """Boolean [N, N] mask (True = may attend) over tokens flattened as (frame, row, column).

    A token attends to every token of its own frame and of earlier frames. This is the mask of the mid-block
    attention; :func:`frame_causal_attention` computes the same attention without materialising it.
    """
    frame = torch.arange(num_frames, device=device).repeat_interleave(tokens_per_frame)
    return frame[None, :] <= frame[:, None]


def frame_causal_attention(q: Tensor, k: Tensor, v: Tensor, tokens_per_frame: int) -> Tensor:
    """Softmax attention of q, k, v [B, heads, N, D] under :func:`causal_frame_mask`.

    The queries of frame f only see the first (f+1) frames of keys, so each frame is one unmasked attention
    call over a key prefix (a view): no N x N mask in memory, and the fused kernels stay usable.
    """
    n = q.shape[-2]
    num_frames = n // tokens_per_frame
    assert num_frames * tokens_per_frame == n, "token count is not a whole number of frames"
    if num_frames == 1:
        return F.scaled_dot_product_attention(q, k, v)
    out = q.new_empty(*q.shape[:-1], v.shape[-1])
    for f in range(num_frames):
        rows = slice(f * tokens_per_frame, (f + 1) * tokens_per_frame)
        seen = (f + 1) * tokens_per_frame
        out[..., rows, :] = F.scaled_dot_product_attention(q[..., rows, :], k[..., :seen, :], v[..., :seen, :])
    return out


def upsample_causal_nearest(x: Tensor, factor: tuple[int, int, int]) -> Tensor:
    """Nearest upsampling of [B, C, T, H, W] by integer (t, h, w) factors, frame 0 in space only.

    T frames become 1 + factor_t * (T - 1): the first frame stays a single frame so that a 1+4k-frame
    video keeps that form (spec section 3.2). Nearest upsampling by an integer factor is a pure copy, so
    it is written with broadcasting into the output: exact in every dtype (the official code upcasts bf16
    only because its interpolation kernel lacked bf16) and with no intermediate tensors.
    """
    ft, fh, fw = factor
    b, c, t, h, w = x.shape
    out = x.new_empty(b, c, 1 + ft * (t - 1), h * fh, w * fw)
    first = out[:, :, :1].view(b, c, 1, h, fh, w, fw)
    first.copy_(x[:, :, :1, :, None, :, None].expand(b, c, 1, h, fh, w, fw))
    if t > 1:
        rest = out[:, :, 1:].view(b, c, t - 1, ft, h, fh, w, fw)
        rest.copy_(x[:, :, 1:, None, :, None, :, None].expand(b, c, t - 1, ft, h, fh, w, fw))
    return out


def blend_(previous_tail: Tensor, tile: Tensor, extent: int, dim: int) -> None:
    """Linear cross-fade, in place, of the first `extent` entries of `tile` along `dim` with the last
    entries of `previous_tail` (the overlapping end of the neighbouring tile): weight i/extent on the tile.

    Same arithmetic as the official ``blend_v/h/t``; the sum is formed in fp32.
    """
    n = min(previous_tail.shape[dim], tile.shape[dim], extent)
    if n <= 0:
        return
    # The weights are i/n in float64 rounded once, like the official Python-float scalars.
    ramp = torch.arange(n, dtype=torch.float64, device=tile.device) / n
    shape = [1] * tile.ndim
    shape[dim] = n
    w_new = ramp.to(torch.float32).view(shape)
    w_old = (1 - ramp).to(torch.float32).view(shape)
    head = tile.narrow(dim, 0, n)
    tail = previous_tail.narrow(dim, previous_tail.shape[dim] - n, n)
    head.copy_(tail.float() * w_old + head.float() * w_new)


@dataclass(frozen=True)
class TileAxis:
    """Tiling along one axis (spec section 3.4): input windows of `window` starting every `stride`; each
    output tile cross-fades its first `blend` entries with its predecessor and keeps its first `keep`."""

    window: int
    stride: int
    blend: int
    keep: int


def tile_plan(config: VAEConfig, kind: str) -> TileAxis:
    """The official tiling of one of "encode_space", "decode_space", "encode_time", "decode_time".

    With the 13B values (256 px, 64 frames, overlap 0.25) this gives spatial encode 256 px / stride 192 /
    blend 8 / keep 24 latent px, spatial decode 32 / 24 / 64 / 192, temporal encode 65 frames / 48 / 4 / 12
    (+1 on the first tile), temporal decode 17 latent frames / 12 / 16 / 48 (+1).
    """
    sc, tc, ov = config.spatial_compression, config.temporal_compression, config.tile_overlap
    sample_px, sample_t = config.tile_sample_size, config.tile_sample_frames
    latent_px, latent_t = sample_px // sc, sample_t // tc
    if kind == "encode_space":
        blend = int(latent_px * ov)
        axis = TileAxis(sample_px, int(sample_px * (1 - ov)), blend, latent_px - blend)
        consistent = axis.keep * sc == axis.stride
    elif kind == "decode_space":
        blend = int(sample_px * ov)
        axis = TileAxis(latent_px, int(latent_px * (1 - ov)), blend, sample_px - blend)
        consistent = axis.stride * sc == axis.keep
    elif kind == "encode_time":
        blend = int(latent_t * ov)
        axis = TileAxis(sample_t + 1, int(sample_t * (1 - ov)), blend, latent_t - blend)
        consistent = axis.keep * tc == axis.stride
    elif kind == "decode_time":
        blend = int(sample_t * ov)
        axis = TileAxis(latent_t + 1, int(latent_t * (1 - ov)), blend, sample_t - blend)
        consistent = axis.stride * tc == axis.keep
    else:
        raise ValueError(f"unknown tiling kind {kind!r}")
    if axis.stride < 1 or not consistent:
        raise ValueError(
            f"tile_sample_size={sample_px}, tile_sample_frames={sample_t} and tile_overlap={ov} give tiles "
            f"whose strides do not line up with the compression ({kind}: {axis}); use sizes that are multiples "
            f"of {sc * 4} px and {tc * 4} frames with overlap 0.25"
        )
    return axis


# ---------------------------------------------------------------------------------------------
# Layers


def _silu(x: Tensor) -> Tensor:
    # In place saves a full activation copy; only safe when autograd does not need the input.
    return F.silu(x, inplace=not (torch.is_grad_enabled() and x.requires_grad))


def _cpu_bf16_training(x: Tensor, weight: Tensor) -> bool:
    """Whether a conv3d of ``x`` runs under CPU bf16 autocast with a weight gradient to compute."""
    return (x.device.type == "cpu" and torch.is_grad_enabled() and weight.requires_grad
            and torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16)


class _TapWeightGradConv3d(torch.autograd.Function):
    """conv3d (no padding) whose weight gradient is the stack of one conv2d weight gradient per temporal tap.

    On the development CPU (torch 2.13.0, oneDNN, AVX-512 bf16) conv3d's own bf16 weight gradient is wrong for some
    shapes: with 32 input and output channels at 64x64 and 1-5 frames (the tiny VAE's last upsampling conv) half of
    it came out NaN and the rest off by 90%, on random inputs too, while the input gradient and every conv2d weight
    gradient tested were right (``tests/test_vae.py``). Tap ``kt`` of the kernel sees frames ``kt, kt + st, ...``, so
    its gradient is a conv2d weight gradient over those frames folded into the batch. Forward and input gradient
    stay conv3d. About 2x the time of conv3d's bf16 weight gradient, still no slower than fp32's."""

    @staticmethod
    def forward(ctx, x: Tensor, weight: Tensor, bias: Optional[Tensor], stride: tuple[int, int, int]) -> Tensor:
        ctx.save_for_backward(x, weight)
        ctx.stride = tuple(stride)
        return F.conv3d(x, weight, bias, stride)

    @staticmethod
    def backward(ctx, grad_out: Tensor):
        x, weight = ctx.saved_tensors
        st, sh, sw = ctx.stride
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.nn.grad.conv3d_input(x.shape, weight, grad_out, ctx.stride)
        if ctx.needs_input_grad[1]:
            b, cin, _, h, w = x.shape
            frames = grad_out.shape[2]
            g = grad_out.transpose(1, 2).reshape(b * frames, grad_out.shape[1], *grad_out.shape[3:])
            taps = []
            for kt in range(weight.shape[2]):
                xs = x[:, :, kt : kt + st * (frames - 1) + 1 : st].transpose(1, 2).reshape(b * frames, cin, h, w)
                taps.append(torch.nn.grad.conv2d_weight(xs, weight[:, :, kt].shape, g, (sh, sw)))
            grad_w = torch.stack(taps, 2)
        if ctx.needs_input_grad[2]:  # False without a bias
            acc = torch.promote_types(grad_out.dtype, torch.float32)  # bf16 sums in fp32
            grad_b = grad_out.sum((0, 2, 3, 4), dtype=acc).to(grad_out.dtype)
        return grad_x, grad_w, grad_b, None


class CausalConv3d(nn.Module):
    """Conv3d after replicate padding: k//2 on both sides of H and W, k-1 frames in front of T only."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int = 3,
        stride: int | tuple[int, int, int] = 1,
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kt = kh = kw = kernel_size
        # F.pad order: (W left, W right, H top, H bottom, T front, T back).
        self.padding = (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)
        self.conv = nn.Conv3d(in_channels, out_channels, kernel_size, stride=stride, device=device, dtype=dtype)

    def pad(self, x: Tensor) -> Tensor:
        """The causal padding; a single frame is padded in space only (see :meth:`run`)."""
        if x.shape[2] == 1 and self.conv.kernel_size[0] > 1:
            return F.pad(x, (*self.padding[:4], 0, 0), mode="replicate")
        return F.pad(x, self.padding, mode="replicate") if any(self.padding) else x

    def run(self, h: Tensor) -> Tensor:
        """The convolution of a :meth:`pad`-ded input. A single frame's causal padding would be kt-1 copies of
        itself, so its kt temporal taps all see the same frame: one kt=1 convolution with the taps summed gives
        the same output (to rounding) at 1/kt of the cost, which is what image encodes and image training steps
        run on."""
        conv = self.conv
        if h.shape[2] == 1 and conv.kernel_size[0] > 1:
            # As a 2D convolution (a temporal stride leaves a single frame a single frame): oneDNN's bf16 conv3d
            # weight gradient of a 1-frame, channels-last input came out NaN on this CPU (torch 2.13); conv2d's not.
            weight = conv.weight.sum(2, dtype=torch.float32).to(conv.weight.dtype)
            return F.conv2d(h.squeeze(2), weight, conv.bias, stride=conv.stride[1:]).unsqueeze(2)
        if _cpu_bf16_training(h, conv.weight):
            dtype = torch.bfloat16
            bias = None if conv.bias is None else conv.bias.to(dtype)
            with torch.autocast("cpu", enabled=False):
                return _TapWeightGradConv3d.apply(h.to(dtype), conv.weight.to(dtype), bias, conv.stride)
        return conv(h)

    def forward(self, x: Tensor) -> Tensor:
        return self.run(self.pad(x))


class ResnetBlock(nn.Module):
    """GroupNorm -> SiLU -> conv -> GroupNorm -> SiLU -> conv, plus a (1x1x1-projected) shortcut."""

    def __init__(self, in_channels: int, out_channels: int, groups: int, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.norm1 = nn.GroupNorm(groups, in_channels, eps=_NORM_EPS, **kw)
        self.conv1 = CausalConv3d(in_channels, out_channels, 3, **kw)
        self.norm2 = nn.GroupNorm(groups, out_channels, eps=_NORM_EPS, **kw)
        self.conv2 = CausalConv3d(out_channels, out_channels, 3, **kw)
        self.conv_shortcut = (
            CausalConv3d(in_channels, out_channels, 1, **kw) if in_channels != out_channels else None
        )

    def forward(self, x: Tensor) -> Tensor:
        # Pad, then convolve in a separate statement: the unpadded activation is released before the
        # convolution allocates its output (one full-size tensor less at the peak).
        h = self.conv1.pad(_silu(self.norm1(x)))
        h = self.conv1.run(h)
        h = self.norm2(h)
        h = self.conv2.pad(_silu(h))
        h = self.conv2.run(h)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h.add_(shortcut)  # h is a fresh conv output that autograd does not keep


class Downsample(nn.Module):
    """A strided causal conv: stride (1, 2, 2) halves space, (2, 2, 2) also halves 1+2k frames to 1+k."""

    def __init__(self, channels: int, stride: tuple[int, int, int], *, device=None, dtype=None) -> None:
        super().__init__()
        self.conv = CausalConv3d(channels, channels, 3, stride=stride, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling (frame 0 in space only, see :func:`upsample_causal_nearest`), then a causal conv."""

    def __init__(self, channels: int, factor: tuple[int, int, int], *, device=None, dtype=None) -> None:
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(channels, channels, 3, device=device, dtype=dtype)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv.pad(upsample_causal_nearest(x, self.factor))  # see ResnetBlock.forward
        return self.conv.run(h)


class FrameCausalAttention(nn.Module):
    """Single-head self-attention over all (frame, row, column) tokens with the causal frame mask,
    pre-GroupNorm and a residual connection. Names follow diffusers' ``Attention`` (spec section 3.3)."""

    def __init__(self, channels: int, groups: int, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.group_norm = nn.GroupNorm(groups, channels, eps=_NORM_EPS, **kw)
        self.to_q = nn.Linear(channels, channels, **kw)
        self.to_k = nn.Linear(channels, channels, **kw)
        self.to_v = nn.Linear(channels, channels, **kw)
        self.to_out = nn.ModuleList([nn.Linear(channels, channels, **kw)])

    def forward(self, x: Tensor) -> Tensor:
        b, c, t, h, w = x.shape
        tokens = self.group_norm(x).permute(0, 2, 3, 4, 1).reshape(b, 1, t * h * w, c)  # one head
        q, k, v = self.to_q(tokens), self.to_k(tokens), self.to_v(tokens)
        del tokens
        out = self.to_out[0](frame_causal_attention(q, k, v, h * w))
        out = out.view(b, t, h, w, c).permute(0, 4, 1, 2, 3)
        return (x + out).contiguous()


class MidBlock(nn.Module):
    """resnet -> attention -> resnet at the lowest resolution (attention optional by config)."""

    def __init__(self, channels: int, groups: int, add_attention: bool, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        attentions = [FrameCausalAttention(channels, groups, **kw)] if add_attention else []
        self.attentions = nn.ModuleList(attentions)
        self.resnets = nn.ModuleList([ResnetBlock(channels, channels, groups, **kw) for _ in range(2)])

    def forward(self, x: Tensor) -> Tensor:
        x = self.resnets[0](x)
        for attention in self.attentions:
            x = attention(x)
        return self.resnets[1](x)


class DownBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        stride: Optional[tuple[int, int, int]],
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, **kw)
            for i in range(num_layers)
        )
        self.downsamplers = nn.ModuleList([Downsample(out_channels, stride, **kw)]) if stride else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        num_layers: int,
        groups: int,
        factor: Optional[tuple[int, int, int]],
        *,
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        self.resnets = nn.ModuleList(
            ResnetBlock(in_channels if i == 0 else out_channels, out_channels, groups, **kw)
            for i in range(num_layers)
        )
        self.upsamplers = nn.ModuleList([Upsample(out_channels, factor, **kw)]) if factor else None

    def forward(self, x: Tensor) -> Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


def _resample_factor(time: bool, space: bool) -> Optional[tuple[int, int, int]]:
    if not (time or space):
        return None
    return (2 if time else 1, 2 if space else 1, 2 if space else 1)


class _Checkpointed(nn.Module):
    """Optional activation checkpointing of the blocks of the Encoder and Decoder (training)."""

    gradient_checkpointing: bool = False

    def _run(self, block: nn.Module, x: Tensor) -> Tensor:
        if self.gradient_checkpointing and torch.is_grad_enabled():
            return checkpoint(block, x, use_reentrant=False)
        return block(x)



class Encoder(_Checkpointed):
    """video [B, C_in, T, H, W] -> moments before quant_conv [B, 2 * latent, 1 + (T-1)/tc, H/sc, W/sc]."""

    def __init__(self, config: VAEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        channels, groups = config.block_out_channels, config.norm_num_groups
        self.conv_in = CausalConv3d(config.in_channels, channels[0], 3, **kw)
        self.down_blocks = nn.ModuleList()
        previous = channels[0]
        for out_channels, (time, space) in zip(channels, resample_plan(config)):
            stride = _resample_factor(time, space)
            block = DownBlock(previous, out_channels, config.layers_per_block, groups, stride, **kw)
            self.down_blocks.append(block)
            previous = out_channels
        self.mid_block = MidBlock(channels[-1], groups, config.mid_block_add_attention, **kw)
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_NORM_EPS, **kw)
        self.conv_out = CausalConv3d(channels[-1], 2 * config.latent_channels, 3, **kw)
        self.gradient_checkpointing = False

    def forward(self, x: Tensor) -> Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = self._run(block, x)
        x = self._run(self.mid_block, x)
        # GroupNorm -> SiLU -> conv_out, one step per statement to release each activation early.
        x = self.conv_norm_out(x)
        x = self.conv_out.pad(_silu(x))
        return self.conv_out.run(x)


class Decoder(_Checkpointed):
    """latent [B, latent, T', h, w] -> video [B, C_out, 1 + tc (T'-1), h * sc, w * sc]."""

    def __init__(self, config: VAEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        channels, groups = tuple(reversed(config.block_out_channels)), config.norm_num_groups
        self.conv_in = CausalConv3d(config.latent_channels, channels[0], 3, **kw)
        self.mid_block = MidBlock(channels[0], groups, config.mid_block_add_attention, **kw)
        self.up_blocks = nn.ModuleList()
        previous = channels[0]
        for out_channels, (time, space) in zip(channels, resample_plan(config)):
            factor = _resample_factor(time, space)
            block = UpBlock(previous, out_channels, config.layers_per_block + 1, groups, factor, **kw)
            self.up_blocks.append(block)
            previous = out_channels
        self.conv_norm_out = nn.GroupNorm(groups, channels[-1], eps=_NORM_EPS, **kw)
        self.conv_out = CausalConv3d(channels[-1], config.out_channels, 3, **kw)
        self.gradient_checkpointing = False

    def forward(self, z: Tensor) -> Tensor:
        x = self.conv_in(z)
        x = self._run(self.mid_block, x)
        for block in self.up_blocks:
            x = self._run(block, x)
        # GroupNorm -> SiLU -> conv_out, one step per statement to release each activation early.
        x = self.conv_norm_out(x)
        x = self.conv_out.pad(_silu(x))
        return self.conv_out.run(x)


# ---------------------------------------------------------------------------------------------
# Lean inference execution of the decoder
#
# The plain forward holds several full-size activations at once (input, normalised copy, padded copy, conv
# output, the shortcut). For inference the decoder is run layer by layer instead, each convolution in chunks
# of frames, with these properties:
#   * exact: the convolutions are causal in time, so a chunk of output frames needs only the previous
#     kt-1 input frames, which are kept from the previous chunk (not recomputed); GroupNorm still uses the
#     statistics of the whole activation, gathered in a separate pass. The result equals the plain forward
#     up to float rounding (the reductions are ordered differently).
#   * lean: per layer only the layer's input and output are full-size; normalisation + SiLU + padding are
#     written straight into one small per-chunk buffer, residual sums are done in place.
#   * fast on CPU: activations are channels-last (NDHWC), the layout oneDNN convolves without reordering
#     (a reorder costs a copy of the input per convolution in NCDHW).

_CHANNELS_LAST = torch.channels_last_3d
# Size of the per-chunk padded input buffer a convolution is fed (the largest temporary of the lean path).
_CHUNK_BYTES = 192 * 2**20


def _chunk_frames(frame_bytes: int, context: int, chunk_frames: Optional[int]) -> int:
    if chunk_frames is not None:
        return chunk_frames
    return max(1, _CHUNK_BYTES // max(1, frame_bytes) - context)


def group_norm_affine(norm: nn.GroupNorm, x: Tensor, chunk_frames: Optional[int] = None) -> tuple[Tensor, Tensor]:
    """Per-(sample, channel) ``scale, shift`` [B, C, 1, 1, 1] with ``norm(x) == x * scale + shift``.

    The statistics pool each group over all frames and pixels, like ``nn.GroupNorm``; they are gathered
    chunk by chunk of frames (moments per chunk, combined in float64 with Chan's update) so that no copy of
    x is made, whatever its memory layout. Computed in fp32 (float64 for a float64 x), like GroupNorm.
    """
    b, c, t, h, w = x.shape
    g = norm.num_groups
    compute = torch.promote_types(x.dtype, torch.float32)
    step = _chunk_frames(c * h * w * compute.itemsize, 0, chunk_frames)
    kw = dict(dtype=torch.float64, device=x.device)
    count, mean, m2 = torch.zeros((), **kw), torch.zeros(b, g, **kw), torch.zeros(b, g, **kw)
    for start in range(0, t, step):
        chunk = x[:, :, start : start + step].to(compute).unflatten(1, (g, c // g))
        var_c, mean_c = torch.var_mean(chunk, dim=(2, 3, 4, 5), correction=0)
        n_c = chunk[0, 0].numel()
        delta = mean_c.double() - mean
        total = count + n_c
        mean = mean + delta * (n_c / total)
        m2 = m2 + var_c.double() * n_c + delta.square() * (count * n_c / total)
        count = total
    rstd = torch.rsqrt(m2 / count + norm.eps).repeat_interleave(c // g, dim=1).to(compute)
    weight = norm.weight.to(compute) if norm.weight is not None else torch.ones(c, dtype=compute, device=x.device)
    bias = norm.bias.to(compute) if norm.bias is not None else torch.zeros(c, dtype=compute, device=x.device)
    scale = rstd * weight
    shift = bias - mean.repeat_interleave(c // g, dim=1).to(compute) * scale
    return scale.view(b, c, 1, 1, 1), shift.view(b, c, 1, 1, 1)


def _replicate_border_(padded: Tensor, ph: int, pw: int) -> None:
    """Fill the ph/pw-wide border of padded [..., H + 2ph, W + 2pw] by replicating its interior edge."""
    height, width = padded.shape[-2:]
    if ph:
        cols = slice(pw, width - pw)
        padded[..., :ph, cols] = padded[..., ph : ph + 1, cols]
        padded[..., height - ph :, cols] = padded[..., height - ph - 1 : height - ph, cols]
    if pw:  # over the full height, which also fills the corners
        padded[..., :pw] = padded[..., pw : pw + 1]
        padded[..., width - pw :] = padded[..., width - pw - 1 : width - pw]


Fill = Callable[[Tensor, int, int], None]


def causal_conv_chunks(
    conv: CausalConv3d,
    fill: Fill,
    shape: tuple[int, int, int, int, int],
    *,
    dtype: torch.dtype,
    device: torch.device,
    chunk_frames: Optional[int] = None,
):
    """Yield ``(start, output)`` for consecutive chunks of output frames of ``conv`` (stride 1) applied to
    an input of ``shape`` [B, C, T, H, W] that is never materialised: ``fill(dst, start, stop)`` writes input
    frames [start, stop) into ``dst`` (a [B, C, stop - start, H, W] view into the chunk buffer).

    One channels-last buffer holds a chunk's input with its padding: replicated borders in space and, in
    front, the kt-1 frames that precede it, carried over from the previous chunk (copies of frame 0 for the
    first chunk, the causal padding). Each input frame is filled once. A caller may overwrite the source
    frames of a chunk as soon as it receives that chunk's output.
    """
    b, c, t, h, w = shape
    kt, kh, kw = conv.conv.kernel_size
    assert conv.conv.stride == (1, 1, 1) and conv.padding == (kw // 2, kw // 2, kh // 2, kh // 2, kt - 1, 0)
    ctx, ph, pw = kt - 1, kh // 2, kw // 2
    step = _chunk_frames(c * (h + 2 * ph) * (w + 2 * pw) * dtype.itemsize, ctx, chunk_frames)
    step = min(step, t)
    buf = torch.empty(b, c, ctx + step, h + 2 * ph, w + 2 * pw, dtype=dtype, device=device,
                      memory_format=_CHANNELS_LAST)
    for start in range(0, t, step):
        n = min(step, t - start)
        if start > 0 and ctx:
            # The last ctx input frames of the previous (full) chunk become this chunk's context.
            buf[:, :, :ctx] = buf[:, :, step : step + ctx].clone() if step < ctx else buf[:, :, step : step + ctx]
        frames = buf[:, :, ctx : ctx + n]
        fill(frames[..., ph : ph + h, pw : pw + w], start, start + n)
        _replicate_border_(frames, ph, pw)
        if start == 0 and ctx:
            buf[:, :, :ctx] = buf[:, :, ctx : ctx + 1]
        yield start, conv.conv(buf[:, :, : ctx + n])


def _normalized_silu(x: Tensor, affine: tuple[Tensor, Tensor]) -> Fill:
    """A fill writing silu(GroupNorm(x)) frames, the affine from :func:`group_norm_affine` (one fused
    multiply-add pass written into the chunk buffer, then SiLU in place)."""
    scale, shift = affine

    def fill(dst: Tensor, start: int, stop: int) -> None:
        torch.addcmul(shift, x[:, :, start:stop], scale, out=dst)
        F.silu(dst, inplace=True)

    return fill


def _copied(x: Tensor) -> Fill:
    def fill(dst: Tensor, start: int, stop: int) -> None:
        dst.copy_(x[:, :, start:stop])

    return fill


def _upsampled(x: Tensor, factor: tuple[int, int, int]) -> Fill:
    """A fill writing frames of :func:`upsample_causal_nearest` (x) without forming it: output frame 0 comes
    from input frame 0, output frame j > 0 from input frame 1 + (j - 1) // factor_t."""
    ft, fh, fw = factor

    def fill(dst: Tensor, start: int, stop: int) -> None:
        index = torch.tensor([0 if j == 0 else 1 + (j - 1) // ft for j in range(start, stop)], device=x.device)
        src = x.index_select(2, index)
        b, c, n, h, w = src.shape
        dst.view(b, c, n, h, fh, w, fw).copy_(src[:, :, :, :, None, :, None].expand(b, c, n, h, fh, w, fw))

    return fill


def _empty_like_frames(x: Tensor, channels: int, frames: int, height: int, width: int) -> Tensor:
    return torch.empty(x.shape[0], channels, frames, height, width, dtype=x.dtype, device=x.device,
                       memory_format=_CHANNELS_LAST)


def _conv_to_new(conv: CausalConv3d, fill: Fill, shape, like: Tensor, chunk_frames: Optional[int],
                 memory_format=_CHANNELS_LAST) -> Tensor:
    b, _, t, h, w = shape
    out = torch.empty(b, conv.conv.out_channels, t, h, w, dtype=like.dtype, device=like.device,
                      memory_format=memory_format)
    for start, y in causal_conv_chunks(conv, fill, shape, dtype=like.dtype, device=like.device,
                                       chunk_frames=chunk_frames):
        out[:, :, start : start + y.shape[2]] = y
    return out


def _lean_resnet(
    block: ResnetBlock, x: Tensor, spare: Optional[Tensor], chunk_frames: Optional[int]
) -> tuple[Tensor, Optional[Tensor]]:
    """:class:`ResnetBlock` on x (channels-last), which is consumed. Returns ``(out, spare)``: ``spare`` is
    free memory of out's shape that the next block may use for its inner activation (pass it back in).

    The inner activation h (conv1's output) and the output share memory with x where they can:
      * same channels: h goes into ``spare`` (or a new tensor) and the residual is added into x;
      * C_in >= 2 C_out (the channel-halving blocks): h and the shortcut are written into the first and
        second C_out channels of x, frame by frame as x's frames are used up, and the output is summed into
        the shortcut's half, so the block needs no memory beyond x;
      * otherwise h is new and the output is written into it.
    """
    b, cin, t, height, width = x.shape
    cout = block.conv1.conv.out_channels
    out_shape = (b, cout, t, height, width)
    halves = block.conv_shortcut is not None and cin >= 2 * cout
    conv1 = causal_conv_chunks(block.conv1, _normalized_silu(x, group_norm_affine(block.norm1, x)), tuple(x.shape),
                               dtype=x.dtype, device=x.device, chunk_frames=chunk_frames)
    if halves:
        h, out = x[:, :cout], x[:, cout : 2 * cout]
        for start, y in conv1:
            stop = start + y.shape[2]
            shortcut = block.conv_shortcut.conv(x[:, :, start:stop])  # before these frames of x are overwritten
            h[:, :, start:stop] = y
            out[:, :, start:stop] = shortcut
            del y, shortcut
    else:
        h = spare if spare is not None and tuple(spare.shape) == out_shape else _empty_like_frames(x, *out_shape[1:])
        for start, y in conv1:
            h[:, :, start : start + y.shape[2]] = y
            del y
        out = x if block.conv_shortcut is None else h
    conv2 = causal_conv_chunks(block.conv2, _normalized_silu(h, group_norm_affine(block.norm2, h)), out_shape,
                               dtype=h.dtype, device=h.device, chunk_frames=chunk_frames)
    for start, y in conv2:
        stop = start + y.shape[2]
        if halves or block.conv_shortcut is None:
            out[:, :, start:stop] += y  # shortcut + conv2(...), the plain path's sum
        else:  # h's frames [start, stop) have been read: the output may take their place
            y += block.conv_shortcut.conv(x[:, :, start:stop])
            out[:, :, start:stop] = y
        del y
    return out, (h if out is not h else None)


def _lean_attention(attention: FrameCausalAttention, x: Tensor) -> Tensor:
    """:class:`FrameCausalAttention` with the residual added into x (channels-last) in place."""
    b, c, t, h, w = x.shape
    x = x.contiguous(memory_format=_CHANNELS_LAST)  # (a no-op for a whole activation) so that the views below work
    scale, shift = group_norm_affine(attention.group_norm, x)
    tokens = torch.empty_like(x)  # keeps channels-last: (frame, row, column) tokens of c features
    torch.addcmul(shift, x, scale, out=tokens)
    tokens = tokens.permute(0, 2, 3, 4, 1).view(b, 1, t * h * w, c)
    q, k, v = attention.to_q(tokens), attention.to_k(tokens), attention.to_v(tokens)
    del tokens
    out = attention.to_out[0](frame_causal_attention(q, k, v, h * w))
    del q, k, v
    x.permute(0, 2, 3, 4, 1).view(b, 1, t * h * w, c).add_(out)
    return x


def lean_decode(decoder: Decoder, z: Tensor, *, chunk_frames: Optional[int] = None) -> Tensor:
    """``decoder(z)`` for inference (no autograd), layer by layer in chunks of frames: see the section
    comment above. ``chunk_frames`` forces the frames per convolution chunk (default: from a byte budget)."""
    x = _conv_to_new(decoder.conv_in, _copied(z), tuple(z.shape), z, chunk_frames)
    x, spare = _lean_resnet(decoder.mid_block.resnets[0], x, None, chunk_frames)
    for attention in decoder.mid_block.attentions:
        x = _lean_attention(attention, x)
    x, spare = _lean_resnet(decoder.mid_block.resnets[1], x, spare, chunk_frames)
    for block in decoder.up_blocks:
        for resnet in block.resnets:
            x, spare = _lean_resnet(resnet, x, spare, chunk_frames)
        if block.upsamplers is not None:
            # The upsampled activation is the largest of all: first let go of everything else (a half of a
            # shared buffer is copied out so the buffer can be freed).
            spare = None
            x = x.contiguous(memory_format=_CHANNELS_LAST)
            up = block.upsamplers[0]
            (ft, fh, fw), (b, c, t, h, w) = up.factor, x.shape
            x = _conv_to_new(up.conv, _upsampled(x, up.factor), (b, c, 1 + ft * (t - 1), h * fh, w * fw), x,
                             chunk_frames)
    del spare
    fill = _normalized_silu(x, group_norm_affine(decoder.conv_norm_out, x))
    # The video comes back in the ordinary (contiguous) layout, like the plain forward's.
    return _conv_to_new(decoder.conv_out, fill, tuple(x.shape), x, chunk_frames, torch.contiguous_format)


# ---------------------------------------------------------------------------------------------
# Posterior


class DiagonalGaussian:
    """The encoder posterior N(mean, exp(logvar)) from moments [B, 2C, ...] (mean first, then logvar).

    logvar is clamped to [-30, 20] as in the official code; inference uses :meth:`mode` (the mean).
    """

    def __init__(self, moments: Tensor) -> None:
        self.moments = moments
        self.mean, logvar = moments.chunk(2, dim=1)
        self.logvar = logvar.clamp(*_LOGVAR_RANGE)

    @property
    def std(self) -> Tensor:
        return torch.exp(0.5 * self.logvar)

    @property
    def var(self) -> Tensor:
        return torch.exp(self.logvar)

    def mode(self) -> Tensor:
        return self.mean

    def sample(self, generator: Optional[torch.Generator] = None) -> Tensor:
        # Noise is drawn on the generator's device (like diffusers' randn_tensor), so a CPU generator
        # gives the same latents whatever device the model runs on.
        noise_device = generator.device if generator is not None else self.mean.device
        noise = torch.randn(self.mean.shape, generator=generator, device=noise_device, dtype=self.mean.dtype)
        return self.mean + self.std * noise.to(self.mean.device)

    def kl(self) -> Tensor:
        """KL(N(mean, var) || N(0, 1)) summed over all but the batch dimension."""
        dims = list(range(1, self.mean.ndim))
        return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)


# ---------------------------------------------------------------------------------------------
# The VAE


class CausalVAE(nn.Module):
    """The HunyuanVideo causal 3D VAE. State-dict keys are the official (= diffusers) ones.

    ``encode`` / ``decode`` take and return *unscaled* latents; multiply by :attr:`scaling_factor` before
    the transformer and divide after. ``tiled``: ``None`` tiles exactly when the official triggers fire
    (input larger than one tile, spec section 3.4), ``True`` always runs the tiled path, ``False`` never tiles.
    """

    def __init__(self, config: VAEConfig, *, device=None, dtype=None) -> None:
        super().__init__()
        kw = dict(device=device, dtype=dtype)
        resample_plan(config)  # validates the compression settings before anything is allocated
        self.config = config
        self.encoder = Encoder(config, **kw)
        self.decoder = Decoder(config, **kw)
        latent = config.latent_channels
        self.quant_conv = nn.Conv3d(2 * latent, 2 * latent, 1, **kw)
        self.post_quant_conv = nn.Conv3d(latent, latent, 1, **kw)

    # -- properties

    @property
    def scaling_factor(self) -> float:
        return self.config.scaling_factor

    @property
    def dtype(self) -> torch.dtype:
        return self.quant_conv.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.quant_conv.weight.device

    @property
    def gradient_checkpointing(self) -> bool:
        return self.encoder.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.encoder.gradient_checkpointing = self.decoder.gradient_checkpointing = bool(enabled)

    def enable_gradient_checkpointing(self, enabled: bool = True) -> None:
        """Recompute encoder/decoder block activations in backward (training only; no effect under no_grad)."""
        self.gradient_checkpointing = enabled

    # -- encode

    def encode(self, video: Tensor, *, tiled: Optional[bool] = None) -> Tensor:
        """video [B, C, 1+4k, H, W] in [-1, 1] -> posterior mean [B, latent, 1+k, H/8, W/8], unscaled."""
        return self.encode_posterior(video, tiled=tiled).mode().contiguous()

    def encode_posterior(self, video: Tensor, *, tiled: Optional[bool] = None) -> DiagonalGaussian:
        """The posterior (mean and clamped logvar); ``.sample(generator)`` for training latents."""
        self._check_video(video)
        video = video.to(self.dtype)
        _, _, t, h, w = video.shape
        size = self.config.tile_sample_size
        space = tiled is True or (tiled is None and (h > size or w > size))
        time = tiled is True or (tiled is None and t > self.config.tile_sample_frames)
        encode = self._encode_tile
        if space:
            plan = tile_plan(self.config, "encode_space")
            encode = self._with_spatial_tiles(encode, plan, 1 / self.config.spatial_compression)
        if space or time:
            logger.debug("tiled encode of %s (spatial %s, temporal %s)", tuple(video.shape), space, time)
        if time:
            plan = tile_plan(self.config, "encode_time")
            moments = _temporally_tiled(video, encode, plan, self.config.latent_frames(t))
        else:
            moments = encode(video)
        return DiagonalGaussian(moments)

    def _encode_tile(self, video: Tensor) -> Tensor:
        return self.quant_conv(self.encoder(video))

    # -- decode

    def decode(
        self,
        latents: Tensor,
        *,
        tiled: Optional[bool] = None,
        lean: bool = False,
        chunk_frames: Optional[int] = None,
        tile_sample_size: Optional[int] = None,
        tile_sample_frames: Optional[int] = None,
    ) -> Tensor:
        """latents [B, latent, T', h, w] (unscaled) -> video [B, C, 1+4(T'-1), 8h, 8w], roughly in [-1, 1].

        ``lean=True`` runs each tile through :func:`lean_decode` when autograd is off: a fraction of the
        memory and faster on CPU, equal to the plain forward up to float rounding (a few 1e-6 relative; the
        plain forward is the one that matches diffusers bit for bit, hence the default). Autograd always
        gets the plain forward. ``chunk_frames`` forces lean_decode's frames per convolution chunk. The result is the concatenation of
        :meth:`decode_stream`'s chunks, assembled into one preallocated tensor.
        """
        chunks = self.decode_stream(latents, tiled=tiled, lean=lean, chunk_frames=chunk_frames,
                                    tile_sample_size=tile_sample_size, tile_sample_frames=tile_sample_frames)
        first = next(chunks)
        out_frames = 1 + self.config.temporal_compression * (latents.shape[2] - 1)
        if first.shape[2] == out_frames:
            return first
        out = first.new_empty(*first.shape[:2], out_frames, *first.shape[3:])
        out[:, :, : first.shape[2]] = first
        written = first.shape[2]
        del first
        for chunk in chunks:
            out[:, :, written : written + chunk.shape[2]] = chunk
            written += chunk.shape[2]
        assert written == out_frames, (written, out_frames)
        return out

    def decode_stream(
        self,
        latents: Tensor,
        *,
        tiled: Optional[bool] = None,
        lean: bool = False,
        chunk_frames: Optional[int] = None,
        tile_sample_size: Optional[int] = None,
        tile_sample_frames: Optional[int] = None,
        tiles: Optional[Iterator[Tensor]] = None,
    ) -> Iterator[Tensor]:
        """Decode as :meth:`decode` does, yielding the video [B, C, t, H, W] a temporal tile at a time, in
        order, as soon as each tile's frames are final; concatenated along dim 2 they are exactly
        ``decode(latents, tiled=tiled)``.

        Only one temporal tile (at most ``tile_sample_frames + 1`` frames, spec section 3.4) and the blend
        tail of the previous one are in memory, so memory does not grow with the video's length; feed the
        chunks to :class:`hunyuan_i2v.video.VideoWriter`. Without temporal tiling there is a single chunk.
        ``tile_sample_size`` / ``tile_sample_frames`` replace the config's tile size (pixels, multiples of
        32 for the 13B VAE) and tile length (frames, multiples of 16) for this call: smaller tiles need less
        memory and blend more seams (the memory planner picks them).

        ``tiles``: the decoded tiles of :meth:`decode_windows` (same arguments), in that order, to assemble
        instead of running the decoder (how :mod:`hunyuan_i2v.parallel.vae` hands in tiles decoded by several
        processes).
        """
        self._check_latents(latents)
        latents = latents.to(self.dtype)
        cfg, space, time = _decode_layout(self.config, latents.shape, tiled, tile_sample_size, tile_sample_frames)

        if tiles is None:
            def decode(x: Tensor) -> Tensor:
                return self._decode_tile(x, lean=lean, chunk_frames=chunk_frames)
        else:
            def decode(x: Tensor) -> Tensor:
                tile = next(tiles)
                assert tile.shape == self.decoded_shape(x.shape), (tuple(tile.shape), tuple(x.shape))
                return tile

        if space:
            plan = tile_plan(cfg, "decode_space")
            decode = self._with_spatial_tiles(decode, plan, cfg.spatial_compression)
        if space or time:
            logger.debug("tiled decode of %s (spatial %s, temporal %s)", tuple(latents.shape), space, time)
        if time:
            plan = tile_plan(cfg, "decode_time")
            return _temporal_tiles(latents, decode, plan, 1 + cfg.temporal_compression * (latents.shape[2] - 1))
        return (decode(x) for x in (latents,))  # lazy, like the tiled stream

    def decode_windows(
        self,
        shape: Sequence[int],
        *,
        tiled: Optional[bool] = None,
        tile_sample_size: Optional[int] = None,
        tile_sample_frames: Optional[int] = None,
    ) -> list[tuple[slice, slice, slice]]:
        """The latent windows (frames, rows, columns) that :meth:`decode_stream` runs the decoder on for latents
        of ``shape``, in the order it runs them; each decodes independently of the others (only the blending
        that follows joins them). One window when the decode is not tiled."""
        return decode_windows(self.config, shape, tiled, tile_sample_size, tile_sample_frames)

    def decoded_shape(self, shape: Sequence[int]) -> tuple[int, ...]:
        """The decoder's output shape for a latent (window) of ``shape`` [B, latent, T', h, w]."""
        b, _, t, h, w = shape
        cfg = self.config
        return (b, cfg.out_channels, 1 + cfg.temporal_compression * (t - 1), h * cfg.spatial_compression,
                w * cfg.spatial_compression)

    def _decode_tile(self, latents: Tensor, *, lean: bool = False, chunk_frames: Optional[int] = None) -> Tensor:
        z = self.post_quant_conv(latents)
        if lean and not _needs_autograd(self.decoder, z):
            return lean_decode(self.decoder, z, chunk_frames=chunk_frames)
        return self.decoder(z)

    def forward(
        self, video: Tensor, *, sample_posterior: bool = True, generator: Optional[torch.Generator] = None
    ) -> tuple[Tensor, DiagonalGaussian]:
        """Reconstruction for training: (decoded video, posterior). Untiled."""
        posterior = self.encode_posterior(video, tiled=False)
        latents = posterior.sample(generator) if sample_posterior else posterior.mode()
        return self.decode(latents, tiled=False), posterior

    # -- helpers

    @staticmethod
    def _with_spatial_tiles(
        run: Callable[[Tensor], Tensor], plan: TileAxis, scale: float
    ) -> Callable[[Tensor], Tensor]:
        return lambda x: _spatially_tiled(x, run, plan, (round(x.shape[-2] * scale), round(x.shape[-1] * scale)))

    def _check_video(self, video: Tensor) -> None:
        cfg = self.config
        if video.ndim != 5 or video.shape[1] != cfg.in_channels:
            raise InputError(
                f"expected a video [batch, {cfg.in_channels}, frames, height, width], got shape "
                f"{tuple(video.shape)}; add a frame axis for an image (x.unsqueeze(2))"
            )
        t, h, w = video.shape[2:]
        tc, sc = cfg.temporal_compression, cfg.spatial_compression
        if t < 1 or (t - 1) % tc:
            lower = max(1, t - (t - 1) % tc)
            raise InputError(f"frames must be {tc}k+1, got {t}: try {lower} or {lower + tc}")
        if h % sc or w % sc:
            raise InputError(
                f"height and width must be multiples of {sc}, got {h}x{w}: try {h // sc * sc}x{w // sc * sc}"
            )

    def _check_latents(self, latents: Tensor) -> None:
        latent = self.config.latent_channels
        if latents.ndim != 5 or latents.shape[1] != latent:
            raise InputError(
                f"expected latents [batch, {latent}, frames, height, width], got shape {tuple(latents.shape)}"
            )


def _decode_layout(
    config: VAEConfig, shape: Sequence[int], tiled: Optional[bool], tile_sample_size: Optional[int],
    tile_sample_frames: Optional[int],
) -> tuple[VAEConfig, bool, bool]:
    """(the config with this call's tile sizes, tiles in space, tiles in time) of a decode of latents ``shape``."""
    _, _, t, h, w = shape
    cfg = config
    if tile_sample_size is not None or tile_sample_frames is not None:
        cfg = dataclasses.replace(cfg, tile_sample_size=tile_sample_size or cfg.tile_sample_size,
                                  tile_sample_frames=tile_sample_frames or cfg.tile_sample_frames)
    size = cfg.tile_sample_size // cfg.spatial_compression
    space = tiled is True or (tiled is None and (h > size or w > size))
    frames = cfg.tile_sample_frames // cfg.temporal_compression
    time = tiled is True or (tiled is None and t > frames)
    return cfg, space, time


def decode_windows(
    config: VAEConfig, shape: Sequence[int], tiled: Optional[bool] = None, tile_sample_size: Optional[int] = None,
    tile_sample_frames: Optional[int] = None,
) -> list[tuple[slice, slice, slice]]:
    """:meth:`CausalVAE.decode_windows` from the config alone (no weights needed)."""
    cfg, space, time = _decode_layout(config, shape, tiled, tile_sample_size, tile_sample_frames)
    _, _, t, h, w = shape
    everything = slice(0, None)
    frames = [everything]
    if time:
        plan = tile_plan(cfg, "decode_time")
        frames = [slice(s, s + plan.window) for s in _temporal_starts(t, plan)]
    areas = [(everything, everything)]
    if space:
        plan = tile_plan(cfg, "decode_space")
        areas = [(slice(top, top + plan.window), slice(left, left + plan.window))
                 for top in range(0, h, plan.stride) for left in range(0, w, plan.stride)]
    return [(f, rows, cols) for f in frames for rows, cols in areas]


def _temporal_starts(num_frames: int, plan: TileAxis) -> list[int]:
    """First frames of the temporal windows; a lone last frame would only give the dropped restart frame."""
    return [s for k, s in enumerate(range(0, num_frames, plan.stride)) if k == 0 or num_frames - s > 1]


def _spatially_tiled(
    x: Tensor, run: Callable[[Tensor], Tensor], plan: TileAxis, out_hw: tuple[int, int]
) -> Tensor:
    """Run `run` on overlapping square tiles of x [..., H, W] and assemble its outputs (spec section 3.4).

    Tiles are visited row by row; each is cross-faded with the already-blended tile above, then the one to
    its left, and its top-left `keep` x `keep` block is final, exactly as in the official code. Only the
    overlapping edge strips of finished tiles are kept, not the tiles themselves.
    """
    height, width = x.shape[-2:]
    out: Optional[Tensor] = None
    above: list[Optional[Tensor]] = []  # bottom strips of the previous tile row
    for r, top in enumerate(range(0, height, plan.stride)):
        row: list[Optional[Tensor]] = []
        left: Optional[Tensor] = None  # right strip of the previous tile in this row
        for c, start in enumerate(range(0, width, plan.stride)):
            tile = run(x[..., top : top + plan.window, start : start + plan.window])
            if out is None:
                out = tile.new_empty(*tile.shape[:-2], *out_hw)
            if r > 0 and above[c] is not None:
                blend_(above[c], tile, plan.blend, dim=-2)
            if left is not None:
                blend_(left, tile, plan.blend, dim=-1)
            y, x0 = r * plan.keep, c * plan.keep
            kh = min(plan.keep, tile.shape[-2], out_hw[0] - y)
            kw = min(plan.keep, tile.shape[-1], out_hw[1] - x0)
            out[..., y : y + kh, x0 : x0 + kw] = tile[..., :kh, :kw]
            if plan.blend > 0:
                row.append(tile[..., -plan.blend :, :].clone())
                left = tile[..., -plan.blend :].clone()
            else:
                row.append(None)
            del tile
        above = row
    assert out is not None
    return out


def _temporally_tiled(x: Tensor, run: Callable[[Tensor], Tensor], plan: TileAxis, out_frames: int) -> Tensor:
    """:func:`_temporal_tiles` assembled into one tensor [B, C, out_frames, ...]."""
    out: Optional[Tensor] = None
    written = 0
    for chunk in _temporal_tiles(x, run, plan, out_frames):
        if out is None:
            out = chunk.new_empty(*chunk.shape[:2], out_frames, *chunk.shape[3:])
        out[:, :, written : written + chunk.shape[2]] = chunk
        written += chunk.shape[2]
    assert out is not None
    return out


def _temporal_tiles(
    x: Tensor, run: Callable[[Tensor], Tensor], plan: TileAxis, out_frames: int
) -> Iterator[Tensor]:
    """Run `run` on overlapping frame windows of x [B, C, T, ...] and yield each window's final frames, in
    order (spec section 3.4).

    A later window starts on the last frame covered by its predecessor's stride; its first output frame is
    the causal restart and is dropped. The next `blend` frames are cross-faded with the predecessor's tail.
    The first tile keeps keep+1 frames, later ones keep `keep`. Only the tail outlives its tile.
    """
    num_frames = x.shape[2]
    tail: Optional[Tensor] = None
    written = 0
    for k, start in enumerate(_temporal_starts(num_frames, plan)):
        tile = run(x[:, :, start : start + plan.window])
        if k > 0:
            tile = tile[:, :, 1:]
        if tail is not None:
            blend_(tail, tile, plan.blend, dim=2)
        n = min(plan.keep + (1 if k == 0 else 0), tile.shape[2], out_frames - written)
        tail = tile[:, :, -plan.blend :].clone() if plan.blend > 0 else None
        written += n
        yield tile[:, :, :n]
        del tile
    assert written == out_frames, (written, out_frames)


def _needs_autograd(module: nn.Module, x: Tensor) -> bool:
    return torch.is_grad_enabled() and (x.requires_grad or any(p.requires_grad for p in module.parameters()))


# ---------------------------------------------------------------------------------------------
# Configs from checkpoint files


_KNOWN_DOWN_BLOCKS = {"DownEncoderBlockCausal3D", "HunyuanVideoDownBlock3D"}
_KNOWN_UP_BLOCKS = {"UpDecoderBlockCausal3D", "HunyuanVideoUpBlock3D"}


def vae_config_from_dict(d: Mapping[str, Any]) -> VAEConfig:
    """A :class:`VAEConfig` from a vae ``config.json``: the official ``AutoencoderKLCausal3D`` one
    (``time_compression_ratio``, ``sample_size``, ``sample_tsize``) or diffusers' ``AutoencoderKLHunyuanVideo``
    one (``spatial_compression_ratio``, ``temporal_compression_ratio``). Unknown keys are ignored; missing
    ones take the 13B defaults."""
    defaults = VAEConfig()

    def pick(*names: str, default: Any) -> Any:
        for name in names:
            if d.get(name) is not None:
                return d[name]
        return default

    channels = tuple(int(c) for c in pick("block_out_channels", default=defaults.block_out_channels))
    for key, known in (("down_block_types", _KNOWN_DOWN_BLOCKS), ("up_block_types", _KNOWN_UP_BLOCKS)):
        types = d.get(key)
        if types is None:
            continue
        if len(types) != len(channels) or not set(types) <= known:
            raise ValueError(
                f"{key} {list(types)} does not describe this VAE: "
                f"expected {len(channels)} entries from {sorted(known)}"
            )
    act = pick("act_fn", default="silu")
    if act not in ("silu", "swish"):
        raise ValueError(f"act_fn {act!r} is not supported; the HunyuanVideo VAE uses 'silu'")
    sample_size = pick("sample_size", default=defaults.tile_sample_size)
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]  # the official code tiles with the first entry
    return VAEConfig(
        in_channels=int(pick("in_channels", default=defaults.in_channels)),
        out_channels=int(pick("out_channels", default=defaults.out_channels)),
        latent_channels=int(pick("latent_channels", default=defaults.latent_channels)),
        block_out_channels=channels,
        layers_per_block=int(pick("layers_per_block", default=defaults.layers_per_block)),
        norm_num_groups=int(pick("norm_num_groups", default=defaults.norm_num_groups)),
        spatial_compression=int(pick("spatial_compression_ratio", default=defaults.spatial_compression)),
        temporal_compression=int(
            pick("temporal_compression_ratio", "time_compression_ratio", default=defaults.temporal_compression)
        ),
        scaling_factor=float(pick("scaling_factor", default=defaults.scaling_factor)),
        mid_block_add_attention=bool(pick("mid_block_add_attention", default=defaults.mid_block_add_attention)),
        tile_sample_size=int(sample_size),
        tile_sample_frames=int(pick("sample_tsize", default=defaults.tile_sample_frames)),
        tile_overlap=defaults.tile_overlap,
    )
