"""Activation savings of the transformer's inference path (issue 5, item 3): token-chunked feed-forward, in-place
updates, trimmed text padding and the half-precision CPU matmul mode all give the plain path's output."""


import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from tiny_components import random_transformer
from hunyuan_i2v.model.transformer import (
    MIN_CHUNK_TOKENS,
    Fp32Matmul,
    HunyuanVideoTransformer,
    Modulations,
    token_chunks,
    trim_text_padding,
)




def _inputs(model: HunyuanVideoTransformer, padded: bool, text_len: int = 12):
    cfg = model.config
    x = torch.randn(2, cfg.in_channels, 3, 8, 6)  # 3 latent frames of 4x3 patches: 36 image tokens
    t = torch.tensor([700.0, 250.0])
    text = torch.randn(2, text_len, cfg.text_states_dim)
    mask = torch.ones(2, text_len)
    if padded:
        mask[0, 5:] = 0
        mask[1, 9:] = 0
    pooled = torch.randn(2, cfg.text_states_dim_2)
    g = torch.tensor([6016.0, 3008.0]) if cfg.guidance_embed else None
    return (x, t, text, mask, pooled), g


def _run(model, inputs, g, grad: bool = False):
    with torch.set_grad_enabled(grad):
        return model(*inputs, guidance=g).detach()


@pytest.mark.parametrize("condition_type", ["token_replace", "latent_concat"])
@pytest.mark.parametrize("padded", [False, True])
def test_chunked_feed_forward_is_bit_identical(condition_type, padded):
    model = random_transformer(condition_type)
    inputs, g = _inputs(model, padded)
    plain = _run(model, inputs, g)
    assert plain.abs().max() > 0.1
    # 16 and 20 split the 36 image tokens unevenly (a 4-token tail joins the chunk before it), 1 is raised to the
    # minimum chunk, 1000 is one chunk; token_replace's first-frame boundary (12 tokens) falls inside a chunk.
    for chunk in (1, 16, 17, 20, 1000):
        model.set_ff_chunk_tokens(chunk)
        assert torch.equal(_run(model, inputs, g), plain), chunk
    model.set_ff_chunk_tokens(None)
    assert torch.equal(_run(model, inputs, g), plain)


@pytest.mark.parametrize("condition_type", ["token_replace", "latent_concat"])
def test_inference_path_equals_the_autograd_path(condition_type):
    """The in-place inference path and the training path (autograd on) compute the same numbers bit for bit."""
    model = random_transformer(condition_type)
    inputs, g = _inputs(model, padded=True)
    assert torch.equal(_run(model, inputs, g, grad=True), _run(model, inputs, g, grad=False))


def test_training_path_still_trains_with_checkpointing():
    model = random_transformer().train()
    model.set_ff_chunk_tokens(16)  # an inference setting: it must not change training
    inputs, g = _inputs(model, padded=True)
    grads = []
    for ckpt in (False, True):
        model.zero_grad()
        model.enable_gradient_checkpointing(ckpt)
        model(*inputs, guidance=g).square().mean().backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    assert grads[0].abs().max() > 0
    assert torch.allclose(grads[0], grads[1], atol=1e-6)


def test_trailing_text_padding_is_dropped_without_changing_the_output():
    model = random_transformer()
    (x, t, text, mask, pooled), g = _inputs(model, padded=True)
    base = _run(model, (x, t, text, mask, pooled), g)
    # 20 more padded positions with garbage in them: trimmed away, so the output cannot move
    longer_text = torch.cat([text, 1e3 * torch.randn(2, 20, text.shape[-1])], dim=1)
    longer_mask = torch.cat([mask, torch.zeros(2, 20)], dim=1)
    assert torch.allclose(_run(model, (x, t, longer_text, longer_mask, pooled), g), base, atol=1e-6)


def test_trim_text_padding_keeps_every_valid_column():
    states = torch.randn(2, 6, 3)
    mask = torch.tensor([[1, 1, 0, 0, 0, 0], [1, 0, 1, 1, 0, 0]])  # row 1 has a hole: kept, it is not trailing
    s, m = trim_text_padding(states, mask)
    assert torch.equal(m, mask[:, :4]) and torch.equal(s, states[:, :4])
    s, m = trim_text_padding(states, torch.ones(2, 6))
    assert s is states
    s, m = trim_text_padding(states, torch.zeros(2, 6))  # nothing valid: one column survives, the refiner runs
    assert m.shape == (2, 1)


def test_token_chunks_cover_the_range_without_short_chunks():
    for n in (0, 5, 16, 36, 37, 100):
        for size in (None, 1, 16, 20, 33, 200):
            chunks = list(token_chunks(n, size))
            assert [i for a, b in chunks for i in range(a, b)] == list(range(n))
            if len(chunks) > 1:
                assert min(b - a for a, b in chunks) >= MIN_CHUNK_TOKENS


def test_modulations_in_place_match_out_of_place_across_the_first_frame_boundary():
    torch.manual_seed(0)
    chunks = [torch.randn(2, 1, 8) for _ in range(6)]
    tr_chunks = [torch.randn(2, 1, 8) for _ in range(6)]
    m = Modulations(chunks, tr_chunks, n_first=5)
    x, y = torch.randn(2, 12, 8), torch.randn(2, 12, 8)
    with torch.enable_grad():
        expected_mod = m.modulate(x, 0, 1)
        expected_add = m.gated_add(x, y, 2)
    # by hand: the first 5 tokens use the token_replace chunks
    assert torch.allclose(expected_mod[:, :5], x[:, :5] * (1 + tr_chunks[1]) + tr_chunks[0])
    assert torch.allclose(expected_mod[:, 5:], x[:, 5:] * (1 + chunks[1]) + chunks[0])
    with torch.no_grad():
        for start, stop in ((0, 12), (0, 3), (3, 9), (7, 12)):
            seg = x[:, start:stop].clone()
            assert m.modulate(seg, 0, 1, start) is seg
            assert torch.equal(seg, expected_mod[:, start:stop])
            seg = x[:, start:stop].clone()
            m.gated_add(seg, y[:, start:stop], 2, start)
            assert torch.equal(seg, expected_add[:, start:stop])


class _LargestOutputs(TorchDispatchMode):
    """Records the shapes of every tensor an op returns while ``active``."""

    def __init__(self):
        super().__init__()
        self.active, self.shapes = False, []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if self.active:
            for o in out if isinstance(out, (tuple, list)) else (out,):
                if isinstance(o, torch.Tensor):
                    self.shapes.append(tuple(o.shape))
        return out


def _mlp_rows(model, inputs, g, chunk):
    """The most tokens any MLP-wide activation (last dim 4h or 5h) holds inside the blocks."""
    model.set_ff_chunk_tokens(chunk)
    rec = _LargestOutputs()
    first, last = model.double_blocks[0], model.single_blocks[-1]
    hooks = [first.register_forward_pre_hook(lambda *_: setattr(rec, "active", True)),
             last.register_forward_hook(lambda *_: setattr(rec, "active", False))]
    try:
        with torch.no_grad(), rec:
            model(*inputs, guidance=g)
    finally:
        for h in hooks:
            h.remove()
    h, mlp = model.config.hidden_size, model.config.mlp_hidden
    rows = [s[0] * s[1] for s in rec.shapes if len(s) == 3 and s[-1] in (mlp, h + mlp)]
    assert rows, "no MLP activations seen: the recorder is not watching the blocks"
    return max(rows)


def test_chunking_bounds_the_mlp_activations():
    model = random_transformer()
    inputs, g = _inputs(model, padded=False)
    n_joint = 36 + 12
    assert _mlp_rows(model, inputs, g, None) == 2 * n_joint  # batch 2: the single blocks' joint stream at once
    assert _mlp_rows(model, inputs, g, 16) <= 2 * (2 * MIN_CHUNK_TOKENS - 1)


def test_ff_chunk_tokens_rejects_nonsense():
    model = random_transformer()
    for bad in (0, -4, 2.5, True):
        with pytest.raises(ValueError, match="ff_chunk_tokens"):
            model.set_ff_chunk_tokens(bad)


def test_fp32_matmul_mode_rounds_like_a_half_precision_matmul():
    torch.manual_seed(0)
    x, w, b = torch.randn(7, 64).bfloat16(), torch.randn(32, 64).bfloat16(), torch.randn(32).bfloat16()
    with Fp32Matmul():
        got = F.linear(x, w, b)
        kept = F.layer_norm(x, (64,))  # not a matmul: untouched
    assert got.dtype == torch.bfloat16 and kept.dtype == torch.bfloat16
    assert torch.equal(got, F.linear(x.float(), w.float(), b.float()).bfloat16())
    ref = x.float() @ w.float().T + b.float()
    assert (got.float() - ref).abs().max() <= 2 ** -7 * ref.abs().max()  # bf16 rounding of the result only


def test_bf16_model_on_cpu_gives_the_native_result_up_to_rounding():
    model = random_transformer().to(torch.bfloat16)
    inputs, g = _inputs(model, padded=True)
    model.cpu_fp32_matmul = True
    upcast = _run(model, inputs, g).float()
    model.cpu_fp32_matmul = False
    native = _run(model, inputs, g).float()
    reference = _run(random_transformer(), inputs, g)  # the fp32 model with the same (un-rounded) weights
    assert (upcast - native).abs().max() <= 0.05 * reference.abs().max()
    # fp32 accumulation of bf16 products is at least as close to the fp32 model as the native bf16 kernels
    assert (upcast - reference).abs().max() <= 1.5 * (native - reference).abs().max() + 1e-3
