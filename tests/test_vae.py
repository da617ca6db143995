"""The causal 3D VAE against diffusers' AutoencoderKLHunyuanVideo (an independent implementation) on tiny
random configs, plus unit tests of its pieces: frame mask, causality, shapes, tiling, config parsing."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from hunyuan_i2v.config import TINY_VAE, VAEConfig
from hunyuan_i2v.errors import InputError
from hunyuan_i2v.model.vae import (
    _TapWeightGradConv3d,
    CausalConv3d,
    CausalVAE,
    DiagonalGaussian,
    blend_,
    causal_frame_mask,
    frame_causal_attention,
    resample_plan,
    tile_plan,
    upsample_causal_nearest,
    vae_config_from_dict,
)

diffusers = pytest.importorskip("diffusers")
AutoencoderKLHunyuanVideo = diffusers.AutoencoderKLHunyuanVideo

CONFIGS = {
    "tiny-l1": TINY_VAE,  # (8, 16, 32, 32), 1 layer, 4 groups, latent 4
    "tiny-l2-lat16": dataclasses.replace(TINY_VAE, layers_per_block=2, latent_channels=16),
}


def diffusers_vae(cfg: VAEConfig) -> AutoencoderKLHunyuanVideo:
    return AutoencoderKLHunyuanVideo(
        in_channels=cfg.in_channels,
        out_channels=cfg.out_channels,
        latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels,
        layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups,
        scaling_factor=cfg.scaling_factor,
        spatial_compression_ratio=cfg.spatial_compression,
        temporal_compression_ratio=cfg.temporal_compression,
        mid_block_add_attention=cfg.mid_block_add_attention,
    )


def pair(cfg: VAEConfig) -> tuple[CausalVAE, AutoencoderKLHunyuanVideo]:
    """Our VAE and diffusers' with the same random weights (norm affines perturbed too)."""
    ref = diffusers_vae(cfg).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))
    ref.use_framewise_encoding = ref.use_framewise_decoding = False  # on by default in diffusers
    ours = CausalVAE(cfg).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ours, ref


@pytest.fixture(scope="module", params=list(CONFIGS))
def vaes(request):
    torch.manual_seed(1)
    return pair(CONFIGS[request.param])


# ---------------------------------------------------------------------------------------------
# Weights and structure


@pytest.mark.parametrize("name", list(CONFIGS) + ["no-attention"])
def test_state_dict_matches_diffusers_both_ways(name):
    cfg = CONFIGS.get(name) or dataclasses.replace(TINY_VAE, mid_block_add_attention=False)
    ours, ref = CausalVAE(cfg), diffusers_vae(cfg)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert {k: v.shape for k, v in ours_sd.items()} == {k: v.shape for k, v in ref_sd.items()}
    ours.load_state_dict(ref_sd, strict=True)
    ref.load_state_dict(ours_sd, strict=True)
    # Representative spec 3.3 names.
    for key in (
        "encoder.conv_in.conv.weight",
        "encoder.down_blocks.1.resnets.0.conv_shortcut.conv.weight",
        "encoder.down_blocks.2.downsamplers.0.conv.conv.weight",
        "quant_conv.weight",
        "post_quant_conv.weight",
        "decoder.up_blocks.2.upsamplers.0.conv.conv.weight",
        "decoder.conv_out.conv.bias",
    ):
        assert key in ours_sd
    has_attention = "encoder.mid_block.attentions.0.to_out.0.weight" in ours_sd
    assert has_attention == cfg.mid_block_add_attention


def test_13b_parameter_count_matches_diffusers_on_meta():
    cfg = VAEConfig()
    ours = CausalVAE(cfg, device="meta")
    with torch.device("meta"):
        ref = AutoencoderKLHunyuanVideo()

    def count(module):
        return sum(p.numel() for p in module.parameters())

    assert count(ours) == count(ref)
    assert count(ours.encoder) == count(ref.encoder)
    assert count(ours.decoder) == count(ref.decoder)
    # Spec section 3.1: about 246.5 M (encoder 100.3 M, decoder 146.1 M).
    assert round(count(ours) / 1e6, 1) == 246.5
    assert round(count(ours.encoder) / 1e6, 1) == 100.3
    assert round(count(ours.decoder) / 1e6, 1) == 146.1
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}


def test_resample_plan_of_13b_config():
    # Spec 3.2: down0 (1,2,2), down1 (2,2,2), down2 (2,2,2), down3 none; the decoder uses the same rule.
    assert resample_plan(VAEConfig()) == [(False, True), (True, True), (True, True), (False, False)]
    vae = CausalVAE(TINY_VAE)
    strides = [b.downsamplers[0].conv.conv.stride if b.downsamplers else None for b in vae.encoder.down_blocks]
    assert strides == [(1, 2, 2), (2, 2, 2), (2, 2, 2), None]
    factors = [b.upsamplers[0].factor if b.upsamplers else None for b in vae.decoder.up_blocks]
    assert factors == [(1, 2, 2), (2, 2, 2), (2, 2, 2), None]
    with pytest.raises(ValueError, match="power of two"):
        resample_plan(dataclasses.replace(TINY_VAE, temporal_compression=3))


# ---------------------------------------------------------------------------------------------
# Parity with diffusers (untiled)


@pytest.mark.parametrize("shape", [(2, 3, 1, 32, 32), (1, 3, 9, 32, 40)])
def test_encode_decode_parity_with_diffusers(vaes, shape):
    ours, ref = vaes
    video = torch.rand(shape) * 2 - 1
    with torch.no_grad():
        posterior = ours.encode_posterior(video, tiled=False)
        ref_posterior = ref.encode(video).latent_dist
        mean = ours.encode(video, tiled=False)
        assert mean.shape == ref_posterior.mean.shape
        assert (mean - ref_posterior.mean).abs().max() <= 1e-5
        assert (posterior.logvar - ref_posterior.logvar).abs().max() <= 1e-5

        gen = torch.Generator().manual_seed(3)
        sample = posterior.sample(gen)
        ref_sample = ref_posterior.sample(torch.Generator().manual_seed(3))
        torch.testing.assert_close(sample, ref_sample, rtol=1e-5, atol=1e-5)  # values up to ~5: relative

        decoded = ours.decode(mean, tiled=False)
        ref_decoded = ref.decode(mean).sample
        assert decoded.shape == ref_decoded.shape == video.shape
        # fp32 tolerance: the frame-causal attention runs one unmasked SDPA per frame instead of one masked one
        torch.testing.assert_close(decoded, ref_decoded, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("stride", [1, (1, 2, 2), (2, 2, 2)])
def test_a_single_frame_runs_one_folded_tap_with_the_padded_conv_s_output_and_gradients(stride):
    torch.manual_seed(0)
    conv = CausalConv3d(4, 6, 3, stride=stride)
    x = torch.randn(2, 4, 1, 10, 12, requires_grad=True)
    folded = conv(x)
    assert conv.pad(x).shape[2] == 1  # no copies of the frame are made
    reference = conv.conv(F.pad(x, conv.padding, mode="replicate"))  # the causal padding: 2 copies of frame 0
    torch.testing.assert_close(folded, reference, rtol=1e-6, atol=1e-6)
    grads = torch.autograd.grad(folded.square().sum(), (x, conv.conv.weight, conv.conv.bias))
    ref_grads = torch.autograd.grad(reference.square().sum(), (x, conv.conv.weight, conv.conv.bias))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-5)
    clip = torch.randn(1, 4, 5, 8, 8)  # more frames: the plain padded conv
    torch.testing.assert_close(conv(clip), conv.conv(F.pad(clip, conv.padding, mode="replicate")), rtol=0, atol=0)


@pytest.mark.parametrize("stride,kernel", [(1, 3), ((1, 2, 2), 3), ((2, 2, 2), 3), (1, 1), ((1, 4, 4), (1, 4, 4))])
def test_the_per_tap_weight_gradient_equals_conv3d_s(stride, kernel):
    torch.manual_seed(0)
    x = torch.randn(2, 3, 7, 12, 12, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(5, 3, *((kernel,) * 3 if isinstance(kernel, int) else kernel), dtype=torch.float64,
                         requires_grad=True)
    bias = torch.randn(5, dtype=torch.float64, requires_grad=True)
    out = _TapWeightGradConv3d.apply(x, weight, bias, (stride,) * 3 if isinstance(stride, int) else stride)
    ref = F.conv3d(x, weight, bias, stride)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    probe = torch.randn_like(ref)
    grads = torch.autograd.grad((out * probe).sum(), (x, weight, bias))
    ref_grads = torch.autograd.grad((ref * probe).sum(), (x, weight, bias))
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-12, atol=1e-12)


# 32 -> 32 channels at 64x64 and 5 frames: oneDNN's own bf16 conv3d weight gradient came out NaN here (torch 2.13)
@pytest.mark.parametrize("channels,size,frames,stride", [(32, 64, 5, 1), (32, 64, 2, 1), (16, 32, 9, (2, 2, 2)),
                                                         (8, 32, 5, (1, 2, 2))])
def test_bf16_autocast_gradients_of_a_causal_conv_are_finite_and_close_to_fp32(channels, size, frames, stride):
    torch.manual_seed(0)
    conv = CausalConv3d(channels, channels, 3, stride=stride)
    x = torch.randn(3, channels, frames, size, size, requires_grad=True)
    results = []
    for bf16 in (False, True):
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            y = conv(x)
        probe = torch.linspace(-1, 1, y.numel()).reshape(y.shape)
        grads = torch.autograd.grad((y.float() * probe).sum(), (x, conv.conv.weight, conv.conv.bias))
        results.append((y.float(), *grads))
    assert results[1][0].dtype == torch.float32 and results[1][2].dtype == conv.conv.weight.dtype
    for name, low, ref in zip(("output", "input grad", "weight grad", "bias grad"), results[1], results[0]):
        assert torch.isfinite(low).all(), name
        assert float((low - ref).norm() / ref.norm()) < 2e-2, name


# ---------------------------------------------------------------------------------------------
# Attention mask and causality


def test_causal_frame_mask_matches_loop_and_diffusers():
    frames, per_frame = 5, 7
    mask = causal_frame_mask(frames, per_frame)
    n = frames * per_frame
    expected = torch.zeros(n, n, dtype=torch.bool)
    for i in range(n):
        for j in range(n):
            expected[i, j] = j // per_frame <= i // per_frame
    assert torch.equal(mask, expected)

    from diffusers.models.autoencoders.autoencoder_kl_hunyuan_video import prepare_causal_attention_mask

    additive = prepare_causal_attention_mask(frames, per_frame, torch.float32, torch.device("cpu"))
    assert torch.equal(mask, additive == 0)


def test_frame_causal_attention_equals_masked_softmax():
    frames, per_frame, dim = 4, 6, 16
    q, k, v = (torch.randn(2, 1, frames * per_frame, dim, dtype=torch.float64) for _ in range(3))
    out = frame_causal_attention(q, k, v, per_frame)
    mask = causal_frame_mask(frames, per_frame)
    scores = (q @ k.transpose(-1, -2)) / dim**0.5
    expected = scores.masked_fill(~mask, float("-inf")).softmax(-1) @ v
    torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
    # One frame: plain attention.
    q1, k1, v1 = q[:, :, :per_frame], k[:, :, :per_frame], v[:, :, :per_frame]
    torch.testing.assert_close(frame_causal_attention(q1, k1, v1, per_frame), expected[:, :, :per_frame])


class PerFrameGroupNorm(torch.nn.Module):
    """The same GroupNorm applied to each frame on its own."""

    def __init__(self, norm: torch.nn.GroupNorm) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x):
        b, c, t, h, w = x.shape
        y = self.norm(x.transpose(1, 2).reshape(b * t, c, h, w))
        return y.reshape(b, t, c, h, w).transpose(1, 2)


def with_per_frame_norms(vae: CausalVAE) -> CausalVAE:
    """GroupNorm pools statistics over all frames of the clip, so it is the one layer that lets later
    frames influence earlier ones; with it made per-frame, everything else (convs, resampling, attention
    mask) must be causal."""
    for module in list(vae.modules()):
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.GroupNorm):
                setattr(module, name, PerFrameGroupNorm(child))
    return vae


def test_encoder_is_causal_apart_from_group_norm():
    torch.manual_seed(2)
    vae = with_per_frame_norms(CausalVAE(TINY_VAE)).eval()
    video = torch.rand(1, 3, 13, 16, 16) * 2 - 1
    changed = video.clone()
    changed[:, :, 5] += 1.0  # frame 5 belongs to latent frame 2 (frames 5..8)
    with torch.no_grad():
        a, b = vae.encode(video), vae.encode(changed)
        torch.testing.assert_close(a[:, :, :2], b[:, :, :2], rtol=1e-5, atol=1e-5)
        assert (a[:, :, 2] - b[:, :, 2]).abs().max() > 1e-3
        # Frame 0 alone encodes like the video's first latent frame.
        torch.testing.assert_close(vae.encode(video[:, :, :1]), a[:, :, :1], rtol=1e-5, atol=1e-5)


def test_decoder_is_causal_apart_from_group_norm():
    torch.manual_seed(3)
    vae = with_per_frame_norms(CausalVAE(TINY_VAE)).eval()
    latents = torch.randn(1, TINY_VAE.latent_channels, 4, 2, 2)
    changed = latents.clone()
    changed[:, :, 2] += 1.0  # latent frame 2 decodes to frames 5..8
    with torch.no_grad():
        a, b = vae.decode(latents), vae.decode(changed)
    torch.testing.assert_close(a[:, :, :5], b[:, :, :5], rtol=1e-5, atol=1e-5)
    assert (a[:, :, 5] - b[:, :, 5]).abs().max() > 1e-3


def test_group_norm_couples_frames():
    # The real model (like the official one and diffusers') normalises over the whole clip, so a video's
    # first latent frame is not exactly the latent of that frame encoded as an image.
    torch.manual_seed(4)
    vae = CausalVAE(TINY_VAE).eval()
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1
    with torch.no_grad():
        assert (vae.encode(video)[:, :, :1] - vae.encode(video[:, :, :1])).abs().max() > 1e-4


def test_frame_causal_attention_ignores_later_frames():
    q, k, v = (torch.randn(1, 1, 3 * 4, 8) for _ in range(3))
    out = frame_causal_attention(q, k, v, 4)
    k2, v2 = k.clone(), v.clone()
    k2[:, :, 8:] += 1.0
    v2[:, :, 8:] += 1.0
    out2 = frame_causal_attention(q, k2, v2, 4)
    assert torch.equal(out[:, :, :8], out2[:, :, :8])
    assert not torch.equal(out[:, :, 8:], out2[:, :, 8:])


# ---------------------------------------------------------------------------------------------
# Shapes, inputs


@pytest.mark.parametrize("frames", [1, 5, 9, 13])
def test_shapes(frames):
    vae = CausalVAE(TINY_VAE).eval()
    video = torch.zeros(2, 3, frames, 24, 40)
    with torch.no_grad():
        latents = vae.encode(video)
        assert latents.shape == (2, TINY_VAE.latent_channels, 1 + (frames - 1) // 4, 3, 5)
        assert vae.decode(latents).shape == video.shape


def test_bad_inputs_raise_with_remedy():
    vae = CausalVAE(TINY_VAE)
    with pytest.raises(InputError, match="try 9 or 13"):
        vae.encode(torch.zeros(1, 3, 10, 16, 16))
    with pytest.raises(InputError, match="multiples of 8"):
        vae.encode(torch.zeros(1, 3, 1, 20, 16))
    with pytest.raises(InputError, match="unsqueeze"):
        vae.encode(torch.zeros(1, 3, 16, 16))
    with pytest.raises(InputError, match="latents"):
        vae.decode(torch.zeros(1, 3, 1, 2, 2))


def test_upsample_causal_nearest_equals_interpolate():
    x = torch.randn(2, 3, 4, 5, 6)
    for dtype in (torch.float32, torch.bfloat16):
        xd = x.to(dtype)
        for factor in [(2, 2, 2), (1, 2, 2)]:
            out = upsample_causal_nearest(xd, factor)
            first = F.interpolate(xd[:, :, :1].float(), scale_factor=(1, 2, 2), mode="nearest")
            rest = F.interpolate(xd[:, :, 1:].float(), scale_factor=factor, mode="nearest")
            assert out.dtype == dtype
            assert torch.equal(out.float(), torch.cat([first, rest], dim=2))
    assert upsample_causal_nearest(x[:, :, :1], (2, 2, 2)).shape == (2, 3, 1, 10, 12)


def test_diagonal_gaussian():
    moments = torch.randn(2, 8, 3, 4, 4)
    moments[:, 4:, 0] = 100.0  # logvar above the clamp
    post = DiagonalGaussian(moments)
    assert torch.equal(post.mode(), moments[:, :4])
    assert post.logvar.max() == 20.0
    torch.testing.assert_close(post.std, torch.exp(0.5 * post.logvar))
    samples = torch.stack([post.sample(torch.Generator().manual_seed(s)) for s in range(2)])
    assert not torch.equal(samples[0], samples[1])
    kl = post.kl()
    assert kl.shape == (2,)
    expected = 0.5 * (post.mean**2 + post.var - 1 - post.logvar).flatten(1).sum(1)
    torch.testing.assert_close(kl, expected)


# ---------------------------------------------------------------------------------------------
# Tiling


def test_tile_plan_is_the_official_table():
    cfg = VAEConfig()  # spec section 3.4
    assert tuple(dataclasses.astuple(tile_plan(cfg, "encode_space"))) == (256, 192, 8, 24)
    assert tuple(dataclasses.astuple(tile_plan(cfg, "decode_space"))) == (32, 24, 64, 192)
    assert tuple(dataclasses.astuple(tile_plan(cfg, "encode_time"))) == (65, 48, 4, 12)
    assert tuple(dataclasses.astuple(tile_plan(cfg, "decode_time"))) == (17, 12, 16, 48)
    with pytest.raises(ValueError, match="multiples"):
        tile_plan(dataclasses.replace(cfg, tile_sample_size=48), "encode_space")


def test_blend_is_linear_crossfade():
    a = torch.full((1, 1, 1, 2, 6), 1.0)
    b = torch.full((1, 1, 1, 2, 5), 5.0)
    blend_(a, b, 4, dim=-1)
    assert b[0, 0, 0, 0].tolist() == [1.0, 2.0, 3.0, 4.0, 5.0]


TILED_CFG = dataclasses.replace(TINY_VAE, tile_sample_size=32, tile_sample_frames=16)


@pytest.mark.parametrize(
    "shape",
    [
        (1, 3, 5, 40, 48),  # spatial only: 2 x 2 tiles when encoding and decoding
        (1, 3, 29, 16, 16),  # temporal only: 3 windows when encoding and decoding
        (1, 3, 17, 40, 16),  # both, nested
    ],
)
def test_tiled_parity_with_diffusers(shape):
    """Small tiles (32 px, 16 frames, overlap 0.25) and tiled=None: the official triggers fire. diffusers
    with the same tiles (its enable_tiling + framewise windows) must agree."""
    torch.manual_seed(5)
    ours, ref = pair(TILED_CFG)
    ref.enable_tiling(32, 32, 16, 24, 24, 12)
    ref.use_framewise_encoding = ref.use_framewise_decoding = True
    video = torch.rand(shape) * 2 - 1
    with torch.no_grad():
        mean = ours.encode(video)
        ref_mean = ref.encode(video).latent_dist.mean
        b, _, t, h, w = shape
        assert mean.shape == ref_mean.shape == (b, TILED_CFG.latent_channels, 1 + (t - 1) // 4, h // 8, w // 8)
        assert (mean - ref_mean).abs().max() <= 1e-5

        decoded = ours.decode(mean)
        ref_decoded = ref.decode(mean).sample
        assert decoded.shape == ref_decoded.shape == video.shape
        # Random decoders amplify float rounding of the tiny edge tiles; 1e-5 of the output scale.
        assert (decoded - ref_decoded).abs().max() <= 1e-5 * ref_decoded.abs().max() + 1e-6


def test_tiled_equals_untiled_when_tiles_cover_the_input():
    torch.manual_seed(6)
    vae = CausalVAE(TINY_VAE).eval()  # default tiles: 256 px, 64 frames
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        untiled = vae.encode(video, tiled=False)
        assert torch.equal(vae.encode(video, tiled=True), untiled)
        assert torch.equal(vae.encode(video), untiled)
        assert torch.equal(vae.decode(untiled, tiled=True), vae.decode(untiled, tiled=False))


def test_forced_temporal_tiling_keeps_frame_count():
    # 7 latent frames in windows of 5 with stride 3 (starts 0, 3; a lone frame at 6 would only restart).
    torch.manual_seed(7)
    cfg = dataclasses.replace(TINY_VAE, tile_sample_size=64, tile_sample_frames=16)
    vae = CausalVAE(cfg).eval()
    latents = torch.randn(1, cfg.latent_channels, 7, 2, 2)
    video = torch.rand(1, 3, 25, 16, 16) * 2 - 1
    with torch.no_grad():
        decoded = vae.decode(latents, tiled=True)
        assert decoded.shape == (1, 3, 25, 16, 16)
        # Tile 0 covers latent frames 0..4 (output frames 0..16) and keeps frames 0..12 untouched.
        torch.testing.assert_close(decoded[:, :, :13], vae.decode(latents[:, :, :5], tiled=False)[:, :, :13])
        assert vae.encode(video, tiled=True).shape == (1, cfg.latent_channels, 7, 2, 2)


# ---------------------------------------------------------------------------------------------
# Training support


def test_gradient_checkpointing_gives_same_gradients():
    torch.manual_seed(8)
    vae = CausalVAE(TINY_VAE)
    video = torch.rand(1, 3, 5, 16, 16) * 2 - 1

    def grads():
        vae.zero_grad()
        recon, posterior = vae(video, generator=torch.Generator().manual_seed(0))
        loss = (recon - video).pow(2).mean() + 1e-6 * posterior.kl().mean()
        loss.backward()
        return loss.detach(), [p.grad.clone() for p in vae.parameters()]

    loss_a, grads_a = grads()
    vae.enable_gradient_checkpointing()
    assert vae.encoder.gradient_checkpointing and vae.decoder.gradient_checkpointing
    loss_b, grads_b = grads()
    torch.testing.assert_close(loss_a, loss_b)
    for ga, gb in zip(grads_a, grads_b):
        torch.testing.assert_close(ga, gb, rtol=1e-4, atol=1e-6)
    assert all(g.abs().sum() > 0 for g in grads_a[:3])


def test_properties():
    vae = CausalVAE(TINY_VAE, dtype=torch.float64)
    assert vae.dtype == torch.float64 and vae.device.type == "cpu"
    assert vae.scaling_factor == TINY_VAE.scaling_factor
    assert vae.config is TINY_VAE
    with torch.no_grad():
        assert vae.encode(torch.zeros(1, 3, 1, 8, 8)).dtype == torch.float64  # input cast to the model dtype


# ---------------------------------------------------------------------------------------------
# Config files


OFFICIAL_CONFIG = {  # ckpts/hunyuan-video-i2v-720p/vae/config.json (AutoencoderKLCausal3D)
    "_class_name": "AutoencoderKLCausal3D",
    "_diffusers_version": "0.4.2",
    "act_fn": "silu",
    "block_out_channels": [128, 256, 512, 512],
    "down_block_types": ["DownEncoderBlockCausal3D"] * 4,
    "in_channels": 3,
    "latent_channels": 16,
    "layers_per_block": 2,
    "norm_num_groups": 32,
    "out_channels": 3,
    "sample_size": 256,
    "sample_tsize": 64,
    "up_block_types": ["UpDecoderBlockCausal3D"] * 4,
    "scaling_factor": 0.476986,
    "time_compression_ratio": 4,
    "mid_block_add_attention": True,
}


def test_vae_config_from_official_and_diffusers_dicts():
    assert vae_config_from_dict(OFFICIAL_CONFIG) == VAEConfig()
    diffusers_config = dict(diffusers_vae(TINY_VAE).config)
    diffusers_13b = {**diffusers_config, "block_out_channels": [128, 256, 512, 512], "layers_per_block": 2,
                     "norm_num_groups": 32, "latent_channels": 16}
    assert "temporal_compression_ratio" in diffusers_13b and "time_compression_ratio" not in diffusers_13b
    assert vae_config_from_dict(diffusers_13b) == VAEConfig()
    assert vae_config_from_dict(diffusers_config) == TINY_VAE
    extra = {**OFFICIAL_CONFIG, "unknown_key": 1, "sample_size": [128, 128]}
    assert vae_config_from_dict(extra).tile_sample_size == 128
    with pytest.raises(ValueError, match="down_block_types"):
        vae_config_from_dict({**OFFICIAL_CONFIG, "down_block_types": ["DownBlock2D"] * 4})
