"""The VAE decode engine: the streamed decode (temporal tile by temporal tile) against the tiled decode, the
lean chunked decoder against the plain forward, and the incremental video writer fed by the stream."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

from hunyuan_i2v.config import TINY_VAE
from hunyuan_i2v.errors import InputError
from hunyuan_i2v.model.vae import (
    CausalConv3d,
    CausalVAE,
    causal_conv_chunks,
    group_norm_affine,
    tile_plan,
    upsample_causal_nearest,
)
from hunyuan_i2v.video import VideoWriter, read_video, to_uint8_frames, write_video

# Small tiles (32 px, 16 frames) so that short, small latents need several spatial and temporal tiles:
# temporal windows of 5 latent frames every 3, each keeping 12 video frames (13 for the first).
TILED = dataclasses.replace(TINY_VAE, tile_sample_size=32, tile_sample_frames=16)
CONFIGS = {
    "tiny": TINY_VAE,  # decoder channels 32, 32, 16, 8: the last two up blocks halve the channels
    "two-layers-lat16": dataclasses.replace(TINY_VAE, layers_per_block=2, latent_channels=16),
    "no-attention-widening": dataclasses.replace(
        TINY_VAE, block_out_channels=(8, 16, 16, 24), mid_block_add_attention=False
    ),
}


def random_vae(cfg, seed=0, dtype=torch.float32) -> CausalVAE:
    """A VAE whose weights (norm affines included) are perturbed away from their initialisation."""
    torch.manual_seed(seed)
    vae = CausalVAE(cfg).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae.to(dtype)


def to_video(x: torch.Tensor) -> torch.Tensor:
    return (x.float() / 2 + 0.5).clamp(0, 1)


# ---------------------------------------------------------------------------------------------
# Streaming


@pytest.mark.parametrize("lean", [False, True])
@pytest.mark.parametrize("shape", [(1, 4, 9, 6, 5), (2, 4, 7, 3, 3), (1, 4, 2, 5, 4)])
def test_stream_concatenates_to_the_tiled_decode(shape, lean):
    vae = random_vae(TILED)
    latents = torch.randn(shape)
    with torch.no_grad():
        chunks = list(vae.decode_stream(latents, tiled=True, lean=lean))
        tiled = vae.decode(latents, tiled=True, lean=lean)
    assert torch.equal(torch.cat(chunks, dim=2), tiled)
    assert tiled.shape == (shape[0], 3, 1 + 4 * (shape[2] - 1), 8 * shape[3], 8 * shape[4])
    if shape[2] > 5:  # more than one temporal window
        assert len(chunks) > 1


def test_stream_without_tiling_is_the_untiled_decode():
    vae = random_vae(TINY_VAE)
    latents = torch.randn(1, 4, 3, 2, 3)
    with torch.no_grad():
        chunks = list(vae.decode_stream(latents, tiled=False))
        assert len(chunks) == 1
        assert torch.equal(chunks[0], vae.decode(latents, tiled=False))


def test_stream_is_lazy_and_its_chunks_do_not_grow_with_length():
    vae = random_vae(TILED)
    tiles = []
    vae.post_quant_conv.register_forward_hook(lambda module, args, out: tiles.append(args[0].shape[2]))
    plan = tile_plan(TILED, "decode_time")
    largest, counts = [], []
    with torch.no_grad():
        for latent_frames in (6, 12, 24):
            tiles.clear()
            stream = vae.decode_stream(torch.randn(1, 4, latent_frames, 2, 2), lean=True)
            assert tiles == []  # nothing decoded before the first chunk is asked for
            first = next(stream)
            assert len(tiles) == 1 and first.shape[2] == plan.keep + 1
            sizes = [first.shape[2]] + [chunk.shape[2] for chunk in stream]
            assert sum(sizes) == 1 + 4 * (latent_frames - 1)
            assert max(tiles) <= plan.window  # each tile decodes a bounded window of latents
            largest.append(max(sizes))
            counts.append(len(sizes))
    assert largest == [plan.keep + 1] * 3  # chunk size is set by the tile, not by the video length
    assert counts[0] < counts[1] < counts[2]


def test_stream_validates_eagerly():
    vae = random_vae(TINY_VAE)
    with pytest.raises(InputError, match="latents"):
        vae.decode_stream(torch.zeros(1, 3, 2, 2, 2))  # raises at the call, not at the first next()


# ---------------------------------------------------------------------------------------------
# Lean decoder


@pytest.mark.parametrize("name", list(CONFIGS))
def test_lean_decode_equals_plain_decode(name):
    cfg = CONFIGS[name]
    vae = random_vae(cfg, seed=1)
    latents = torch.randn(2, cfg.latent_channels, 4, 3, 4)
    with torch.no_grad():
        plain = vae.decode(latents, tiled=False)
        lean = {n: vae.decode(latents, tiled=False, lean=True, chunk_frames=n) for n in (None, 1, 2, 3)}
    assert lean[None].shape == plain.shape and lean[None].is_contiguous()
    # Float rounding only (statistics and channels-last sums are ordered differently); the random
    # decoder amplifies it to a few 1e-6 of the output scale.
    scale = plain.abs().max()
    assert (lean[None] - plain).abs().max() <= 1e-5 * scale
    # The chunking itself is exact: every chunk size gives the same bits.
    for n in (1, 2, 3):
        assert torch.equal(lean[n], lean[None])


def test_lean_decode_in_float64_matches_plain_closely():
    # In float64 the rounding vanishes, so any structural slip (a wrong context frame, a wrong norm
    # statistic, a skipped shortcut) would show far above this bound.
    vae = random_vae(TINY_VAE, seed=2, dtype=torch.float64)
    latents = torch.randn(1, 4, 5, 3, 3, dtype=torch.float64)
    with torch.no_grad():
        plain = vae.decode(latents, tiled=False)
        lean = vae.decode(latents, tiled=False, lean=True, chunk_frames=2)
    torch.testing.assert_close(lean, plain, rtol=1e-12, atol=1e-12)


def test_lean_decode_in_bfloat16_stays_near_float32():
    vae = random_vae(TINY_VAE, seed=3)
    latents = torch.randn(1, 4, 3, 3, 3)
    with torch.no_grad():
        reference = vae.decode(latents, tiled=False)
        vae.to(torch.bfloat16)
        plain = vae.decode(latents, tiled=False).float()
        lean = vae.decode(latents, tiled=False, lean=True).float()
    scale = reference.abs().max()
    # bf16 keeps 8 bits of mantissa: both paths land at a few percent of the output scale, equally far.
    assert (plain - reference).abs().max() < 0.1 * scale
    assert (lean - reference).abs().max() < 0.1 * scale


def test_lean_flag_falls_back_to_autograd_when_training():
    vae = random_vae(TINY_VAE, seed=4)
    latents = torch.randn(1, 4, 2, 2, 2)
    out = vae.decode(latents, tiled=False, lean=True)  # grad enabled, parameters require grad
    out.square().mean().backward()
    assert vae.decoder.conv_out.conv.weight.grad is not None


def test_group_norm_affine_equals_group_norm_for_any_layout():
    torch.manual_seed(5)
    norm = torch.nn.GroupNorm(4, 16, eps=1e-6, dtype=torch.float64)
    with torch.no_grad():
        norm.weight.normal_()
        norm.bias.normal_()
    x = torch.randn(2, 32, 7, 5, 6, dtype=torch.float64) * 3 + 1
    half = x.contiguous(memory_format=torch.channels_last_3d)[:, 16:]  # strided, like the lean path's halves
    for view in (x[:, :16], half):
        scale, shift = group_norm_affine(norm, view, chunk_frames=3)
        assert scale.dtype == shift.dtype == torch.float64
        torch.testing.assert_close(view * scale + shift, norm(view), rtol=1e-12, atol=1e-12)
    scale, shift = group_norm_affine(norm.float(), x[:, :16].float())
    assert scale.dtype == torch.float32  # fp32 statistics for fp32 (and half-precision) activations
    torch.testing.assert_close(x[:, :16].float() * scale + shift, norm(x[:, :16].float()), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("kernel", [1, 3])
def test_causal_conv_chunks_equal_the_whole_convolution(kernel):
    torch.manual_seed(6)
    conv = CausalConv3d(5, 7, kernel, dtype=torch.float64)
    x = torch.randn(2, 5, 6, 4, 5, dtype=torch.float64)
    whole = conv(x)

    def fill(dst, start, stop):
        dst.copy_(x[:, :, start:stop])

    for chunk in (1, 2, 4, 6):
        parts = list(causal_conv_chunks(conv, fill, tuple(x.shape), dtype=x.dtype, device=x.device,
                                        chunk_frames=chunk))
        assert [start for start, _ in parts] == list(range(0, 6, chunk))
        torch.testing.assert_close(torch.cat([y for _, y in parts], dim=2), whole, rtol=1e-12, atol=1e-12)


def test_lean_upsampling_equals_upsample_causal_nearest():
    # Exercised through an up block: conv(pad(upsample(x))) by the lean fill vs the plain module.
    torch.manual_seed(7)
    vae = CausalVAE(TINY_VAE, dtype=torch.float64).eval()
    up = vae.decoder.up_blocks[1].upsamplers[0]
    assert up.factor == (2, 2, 2)
    x = torch.randn(1, up.conv.conv.in_channels, 4, 3, 3, dtype=torch.float64)
    from hunyuan_i2v.model.vae import _upsampled  # the fill is private; the property is the point here

    shape = tuple(upsample_causal_nearest(x, up.factor).shape)
    with torch.no_grad():
        parts = causal_conv_chunks(up.conv, _upsampled(x, up.factor), shape, dtype=x.dtype, device=x.device,
                                   chunk_frames=2)
        lean = torch.cat([y for _, y in parts], dim=2)
        torch.testing.assert_close(lean, up(x), rtol=1e-12, atol=1e-12)


# ---------------------------------------------------------------------------------------------
# Incremental video writer


METADATA = {"prompt": "a tiny decoded clip", "seed": 7}


def test_writer_fed_by_the_stream_makes_a_readable_mp4(tmp_path):
    vae = random_vae(TILED, seed=8)
    latents = torch.randn(1, 4, 9, 4, 6, generator=torch.Generator().manual_seed(9))  # 33 frames, several tiles
    path = tmp_path / "clip.mp4"
    with torch.no_grad():
        whole = to_uint8_frames(to_video(vae.decode(latents, tiled=True, lean=True)))
        with VideoWriter(path, fps=12, size=(48, 32), crf=0, metadata=METADATA) as writer:
            for chunk in vae.decode_stream(latents, tiled=True, lean=True):
                assert list(tmp_path.iterdir()) != [path]  # nothing at the destination before the end
                writer.write(to_video(chunk), layout="CTHW")
    assert writer.frames_written == 33
    assert [p.name for p in tmp_path.iterdir()] == ["clip.mp4"]
    frames, fps, metadata = read_video(path)
    assert frames.shape == (33, 32, 48, 3) and fps == 12.0 and metadata == METADATA
    # The streamed file holds the same video as the whole decode written in one go (same encoder settings);
    # crf 0 is lossless in YUV, so only the 4:2:0 colour conversion separates either from the decoded frames.
    reference = write_video(tmp_path / "whole.mp4", whole, fps=12, crf=0)
    expected, _, _ = read_video(reference)
    np.testing.assert_array_equal(frames, expected)
    luma = lambda f: f.astype(np.float64) @ np.array([0.2126, 0.7152, 0.0722])  # noqa: E731
    assert np.abs(luma(frames) - luma(whole)).mean() < 3


def test_writer_takes_its_size_from_the_first_frames_and_refuses_other_sizes(tmp_path):
    frames = np.zeros((3, 16, 24, 3), dtype=np.uint8)
    with pytest.raises(InputError, match="24x16"):
        with VideoWriter(tmp_path / "a.mkv", fps=8) as writer:
            writer.write(frames)
            writer.write(np.zeros((2, 16, 16, 3), dtype=np.uint8))
    assert list(tmp_path.iterdir()) == []
    with VideoWriter(tmp_path / "a.mkv", fps=8) as writer:
        writer.write(frames)
        writer.write(frames[:1])
    assert writer.size == (24, 16) and read_video(tmp_path / "a.mkv")[0].shape == (4, 16, 24, 3)


def test_writer_leaves_nothing_on_an_exception_and_keeps_the_old_file(tmp_path):
    target = tmp_path / "out.mp4"
    frames = np.full((4, 16, 16, 3), 128, dtype=np.uint8)
    with pytest.raises(RuntimeError, match="interrupted"):
        with VideoWriter(target, fps=24) as writer:
            writer.write(frames)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []

    with VideoWriter(target, fps=24) as writer:
        writer.write(frames)
    before = target.read_bytes()
    with pytest.raises(KeyboardInterrupt):
        with VideoWriter(target, fps=24) as writer:
            writer.write(frames[:2])
            raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == [target] and target.read_bytes() == before
    with pytest.raises(InputError, match="already closed"):
        writer.write(frames)


def test_writer_rejects_bad_settings_before_creating_anything(tmp_path):
    for kwargs in ({"size": (15, 16)}, {"fps": 0}, {"crf": 52}, {"metadata": ["x"]}):
        with pytest.raises(InputError):
            VideoWriter(tmp_path / "x.mp4", **kwargs)
    with pytest.raises(InputError, match="extension"):
        VideoWriter(tmp_path / "x.avi")
    with pytest.raises(InputError, match="does not exist"):
        VideoWriter(tmp_path / "missing" / "x.mp4")
    with pytest.raises(InputError, match="no frames"):
        with VideoWriter(tmp_path / "x.mp4"):
            pass
    assert list(tmp_path.iterdir()) == []
