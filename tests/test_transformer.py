"""The transformer against diffusers' independent implementation, on tiny random configs (fp32)."""

import dataclasses

import pytest
import torch

from hunyuan_i2v.config import HUNYUAN_I2V_720P, TINY_TEST
from hunyuan_i2v.keymap import diffusers_to_official, official_to_diffusers
from hunyuan_i2v.model.layers import apply_rope, rope_frequencies, timestep_embedding
from hunyuan_i2v.model.transformer import HunyuanVideoTransformer, count_parameters

diffusers = pytest.importorskip("diffusers")


def _pair(condition_type: str):
    """A random diffusers model and ours holding the same (converted) weights."""
    lat = 4
    cin = 2 * lat + 1 if condition_type == "latent_concat" else lat
    guidance = condition_type == "token_replace"
    peer = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=cin, out_channels=lat, num_attention_heads=2, attention_head_dim=32, num_layers=2,
        num_single_layers=2, num_refiner_layers=2, text_embed_dim=32, pooled_projection_dim=16,
        rope_axes_dim=(8, 12, 12), image_condition_type=condition_type, guidance_embeds=guidance,
    ).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0.0, 0.1)
    cfg = dataclasses.replace(TINY_TEST.transformer, in_channels=cin, out_channels=lat,
                              guidance_embed=guidance, condition_type=condition_type)
    ours = HunyuanVideoTransformer(cfg).eval()
    ours.load_state_dict(diffusers_to_official(peer.state_dict()), strict=True)
    return peer, ours


def _inputs(cin: int, padded: bool, guidance: bool):
    x = torch.randn(2, cin, 3, 8, 6)  # 3 latent frames, 4x3 patches each (non-square)
    t = torch.tensor([700.0, 250.0])
    text = torch.randn(2, 12, 32)
    mask = torch.ones(2, 12)
    if padded:
        mask[0, 7:] = 0
        mask[1, 10:] = 0
    pooled = torch.randn(2, 16)
    g = torch.tensor([6016.0, 3008.0]) if guidance else None
    return x, t, text, mask, pooled, g


@pytest.mark.parametrize("condition_type", ["token_replace", "latent_concat"])
@pytest.mark.parametrize("padded", [False, True])
def test_forward_matches_diffusers(condition_type, padded):
    peer, ours = _pair(condition_type)
    x, t, text, mask, pooled, g = _inputs(ours.config.in_channels, padded, ours.config.guidance_embed)
    with torch.no_grad():
        expected = peer(x, t, text, mask.long(), pooled, guidance=g, return_dict=False)[0]
        got = ours(x, t, text, mask, pooled, guidance=g)
    assert got.shape == expected.shape == (2, 4, 3, 8, 6)
    assert expected.abs().max() > 0.5  # the comparison is not between near-zero tensors
    assert (got - expected).abs().max().item() <= 1e-5


def test_padding_changes_output_and_padded_tokens_are_ignored():
    _, ours = _pair("token_replace")
    x, t, text, mask, pooled, g = _inputs(4, True, True)
    with torch.no_grad():
        base = ours(x, t, text, mask, pooled, guidance=g)
        noisy = text.clone()
        noisy[0, 7:] += 100.0  # only padded positions of row 0 change
        same = ours(x, t, noisy, mask, pooled, guidance=g)
        unmasked = ours(x, t, text, torch.ones_like(mask), pooled, guidance=g)
    assert torch.allclose(base, same, atol=1e-5)
    assert (base - unmasked).abs().max() > 1e-3


def test_final_layer_order_is_checked_by_parity():
    """Swapping the final (shift, scale) halves must break parity, so the parity test is sensitive to it."""
    peer, ours = _pair("token_replace")
    sd = official_to_diffusers(ours.state_dict())
    w = sd["norm_out.linear.weight"]
    sd["norm_out.linear.weight"] = torch.cat(w.chunk(2)[::-1])
    peer.load_state_dict(sd)
    x, t, text, mask, pooled, g = _inputs(4, False, True)
    with torch.no_grad():
        diff = (peer(x, t, text, mask.long(), pooled, guidance=g, return_dict=False)[0] - ours(x, t, text, mask, pooled, guidance=g))
    assert diff.abs().max() > 1e-2


def test_13b_preset_on_meta_has_official_shapes():
    with torch.device("meta"):
        model = HunyuanVideoTransformer(HUNYUAN_I2V_720P.transformer)
    assert count_parameters(model) == 12_821_012_544
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    expected = {
        "img_in.proj.weight": (3072, 16, 1, 2, 2),
        "txt_in.input_embedder.weight": (3072, 4096),
        "txt_in.c_embedder.linear_1.weight": (3072, 4096),
        "txt_in.individual_token_refiner.blocks.1.adaLN_modulation.1.weight": (6144, 3072),
        "txt_in.individual_token_refiner.blocks.0.mlp.fc1.weight": (12288, 3072),
        "time_in.mlp.0.weight": (3072, 256),
        "guidance_in.mlp.2.weight": (3072, 3072),
        "vector_in.in_layer.weight": (3072, 768),
        "double_blocks.19.img_mod.linear.weight": (18432, 3072),
        "double_blocks.0.txt_attn_qkv.weight": (9216, 3072),
        "double_blocks.0.img_attn_q_norm.weight": (128,),
        "double_blocks.0.img_mlp.fc2.weight": (3072, 12288),
        "single_blocks.39.linear1.weight": (21504, 3072),
        "single_blocks.0.linear2.weight": (3072, 15360),
        "single_blocks.0.modulation.linear.weight": (9216, 3072),
        "final_layer.linear.weight": (64, 3072),
        "final_layer.adaLN_modulation.1.weight": (6144, 3072),
    }
    for key, shape in expected.items():
        assert shapes[key] == shape, key
    assert sum(k.startswith("double_blocks.") for k in shapes) == 20 * 24  # per stream: mod, qkv, proj, fc1, fc2 (w+b) + q/k norm weights
    assert sum(k.startswith("single_blocks.") for k in shapes) == 40 * 8


def test_legacy_preset_has_33_input_channels_and_no_guidance():
    cfg = dataclasses.replace(HUNYUAN_I2V_720P.transformer, in_channels=33, guidance_embed=False,
                              condition_type="latent_concat")
    with torch.device("meta"):
        model = HunyuanVideoTransformer(cfg)
    sd = model.state_dict()
    assert tuple(sd["img_in.proj.weight"].shape) == (3072, 33, 1, 2, 2)
    assert not any(k.startswith("guidance_in") for k in sd)


def test_guidance_required_when_embedded():
    _, ours = _pair("token_replace")
    x, t, text, mask, pooled, _ = _inputs(4, False, True)
    with pytest.raises(ValueError, match="guidance"):
        ours(x, t, text, mask, pooled)


def test_gradient_checkpointing_gives_same_gradients():
    _, ours = _pair("token_replace")
    x, t, text, mask, pooled, g = _inputs(4, True, True)
    grads = []
    for ckpt in (False, True):
        ours.zero_grad()
        ours.enable_gradient_checkpointing(ckpt)
        ours(x, t, text, mask, pooled, guidance=g).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in ours.parameters() if p.grad is not None]))
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_timestep_embedding_is_cos_first():
    t = torch.tensor([0.0, 500.0])
    emb = timestep_embedding(t, 8)
    freqs = torch.exp(-torch.log(torch.tensor(10000.0)) * torch.arange(4) / 4)
    assert torch.allclose(emb[1, :4], torch.cos(500.0 * freqs))
    assert torch.allclose(emb[1, 4:], torch.sin(500.0 * freqs))
    assert torch.equal(emb[0], torch.tensor([1.0, 1, 1, 1, 0, 0, 0, 0]))


def test_rope_tables_and_rotation_worked_values():
    cos, sin = rope_frequencies((2, 3, 4), (4, 4, 4), theta=256.0)
    assert cos.shape == sin.shape == (24, 12)
    # token index for (t=1, h=2, w=3) in t-major order
    n = 1 * 12 + 2 * 4 + 3
    f = [1.0, 1.0 / 256 ** 0.5]  # per-axis freqs for dim 4: theta^(-0/4), theta^(-2/4)
    expected_cos = [torch.cos(torch.tensor(p * fi)) for p in (1, 2, 3) for fi in f for _ in range(2)]
    assert torch.allclose(cos[n], torch.stack(expected_cos), atol=1e-6)
    # rotating the pair (1, 0) by angle a gives (cos a, sin a)
    x = torch.zeros(1, 1, 24, 12)
    x[..., 0] = 1.0
    out = apply_rope(x, cos, sin)
    assert torch.allclose(out[0, 0, n, :2], torch.stack([cos[n, 0], sin[n, 0]]), atol=1e-6)
    assert torch.allclose(out.norm(dim=-1), x.norm(dim=-1), atol=1e-6)
