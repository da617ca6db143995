"""The attention entry point and its backends: query-chunked attention against SDPA, the key-padding paths of the
flash-attn / SageAttention backends (their packing, run through PyTorch kernels), and backend resolution."""

import importlib.util
import logging

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from hunyuan_i2v.model.layers import (
    ATTENTION_BACKENDS,
    attention,
    attention_chunk_size,
    available_attention_backends,
    chunked_attention,
    flash_varlen_attention,
    key_padding_keys,
    key_padding_mask,
    per_sample_key_attention,
    resolve_attention_backend,
)

B, H, N_IMG, N_TXT, D = 2, 3, 30, 7, 16
L = N_IMG + N_TXT  # 37: prime, so no chunk size but 1 and 37 divides it


def _qkv(dtype=torch.float32, lq=L, lk=L):
    return (torch.randn(B, H, lq, D, dtype=dtype), torch.randn(B, H, lk, D, dtype=dtype),
            torch.randn(B, H, lk, D, dtype=dtype))


def _text_mask(first_row_valid: int = 3) -> torch.Tensor:
    m = torch.ones(B, N_TXT)
    m[0, first_row_valid:] = 0
    return m


def _mask(kind: str) -> torch.Tensor | None:
    if kind == "none":
        return None
    if kind == "key_padding":
        return key_padding_mask(N_IMG, _text_mask())
    if kind == "fully_padded_row":  # row 0 has no valid text token but still sees the image keys
        return key_padding_mask(N_IMG, _text_mask(first_row_valid=0))
    if kind == "full":  # a per-query mask like the token refiner's, column 0 kept so no row is empty
        m = torch.rand(B, 1, L, L) > 0.4
        m[..., 0] = True
        return m
    if kind == "per_head":
        m = torch.rand(B, H, L, L) > 0.5
        m[..., 3] = True
        return m
    raise AssertionError(kind)


MASKS = ["none", "key_padding", "fully_padded_row", "full", "per_head"]


@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("chunk_size", [1, 5, 16, 37, 64])
def test_chunked_matches_sdpa(mask_kind, chunk_size):
    q, k, v = _qkv()
    mask = _mask(mask_kind)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = chunked_attention(q, k, v, mask, chunk_size=chunk_size)
    assert got.shape == expected.shape and got.dtype == expected.dtype
    assert expected.abs().max() > 0.3
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_masks_change_the_result():
    """The mask variants above really mask something, so the parity test would see a backend that ignores them."""
    q, k, v = _qkv()
    plain = chunked_attention(q, k, v, None, chunk_size=5)
    for kind in MASKS[1:]:
        assert (chunked_attention(q, k, v, _mask(kind), chunk_size=5) - plain).abs().max() > 1e-2, kind


def test_chunked_cross_attention_float_mask_and_empty_rows():
    q, k, v = _qkv(lq=11, lk=23)
    additive = torch.randn(B, 1, 11, 23)
    torch.testing.assert_close(chunked_attention(q, k, v, additive, chunk_size=4),
                               F.scaled_dot_product_attention(q, k, v, attn_mask=additive), atol=1e-6, rtol=0)
    mask = torch.rand(B, 1, 11, 23) > 0.5
    mask[0, 0, 2] = False  # a query that may attend to nothing: SDPA gives zeros, and so must we
    mask[1, 0, 7] = False
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = chunked_attention(q, k, v, mask, chunk_size=3)
    assert got[0, :, 2].abs().max() == 0 and got[1, :, 7].abs().max() == 0
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_entry_point_dispatches_chunked_with_a_budget():
    q, k, v = _qkv()
    mask = _mask("key_padding")
    expected = attention(q, k, v, mask)  # default: sdpa
    torch.testing.assert_close(expected, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=0, rtol=0)
    for name in ("chunked", "chunked:1"):
        torch.testing.assert_close(attention(q, k, v, mask, backend=name), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_chunked_half_computes_in_fp32(dtype):
    """Half inputs: the math is done in fp32 and rounded once at the end, so the result is the fp32 result of the
    same (rounded) inputs, rounded - not an accumulation of half-precision softmax errors."""
    q, k, v = (t * 3 for t in _qkv(dtype))  # large scores: where half-precision softmax would lose accuracy
    mask = _mask("key_padding")
    got = chunked_attention(q, k, v, mask, chunk_size=8)
    assert got.dtype == dtype
    fp32 = chunked_attention(q.float(), k.float(), v.float(), mask, chunk_size=8)
    assert torch.equal(got, fp32.to(dtype))
    reference = F.scaled_dot_product_attention(q.double(), k.double(), v.double(), attn_mask=mask)
    ulp = torch.finfo(dtype).eps * reference.abs().max()
    assert (got.double() - reference).abs().max() <= ulp


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any operator produces (a real run, nothing replaced)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_chunked_never_holds_the_full_score_matrix():
    b, h, n, d = 1, 2, 300, 8
    q, k, v = (torch.randn(b, h, n, d) for _ in range(3))
    budget = 4 * b * h * n * 10 + 7  # room for 10 query rows of fp32 scores (and a few spare bytes)
    chunk = attention_chunk_size(b * h, n, budget)
    assert chunk == 10
    assert attention_chunk_size(b * h, n, 1) == 1  # never less than one query
    assert attention_chunk_size(1, 1000, 256 * 2**20) == 256 * 2**20 // 4000

    with _LargestTensor() as naive:  # the recorder does see an N x N matrix when one is made
        torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
    assert naive.largest == b * h * n * n

    mask = key_padding_mask(n - 20, torch.cat([torch.ones(b, 12), torch.zeros(b, 8)], dim=1))
    with _LargestTensor() as chunked:
        out = chunked_attention(q, k, v, mask, max_score_bytes=budget)
    assert chunked.largest == max(b * h * chunk * n, b * h * n * d)  # one chunk of scores, or q/k/v/out themselves
    assert chunked.largest < b * h * n * n / 20
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k, v, attn_mask=mask), atol=1e-6, rtol=0)


def test_chunked_rejects_a_bad_chunk_size():
    q, k, v = _qkv()
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_attention(q, k, v, chunk_size=0)


# --- the key-padding paths of the CUDA kernels, run through PyTorch stand-ins for the kernels --------------------


def _reference_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal):
    """flash_attn_varlen_func's contract in plain PyTorch: packed [total, H, D] rows, one segment per sample."""
    assert cu_q.dtype == cu_k.dtype == torch.int32 and not causal
    assert max_q == int((cu_q[1:] - cu_q[:-1]).max()) and max_k == int((cu_k[1:] - cu_k[:-1]).max())
    assert q.shape[0] == int(cu_q[-1]) and k.shape[0] == v.shape[0] == int(cu_k[-1])
    out = torch.empty_like(q)
    for i in range(len(cu_q) - 1):
        qs, ks = slice(int(cu_q[i]), int(cu_q[i + 1])), slice(int(cu_k[i]), int(cu_k[i + 1]))
        seg = F.scaled_dot_product_attention(q[qs].transpose(0, 1), k[ks].transpose(0, 1), v[ks].transpose(0, 1))
        out[qs] = seg.transpose(0, 1)
    return out


def _sdpa_no_mask(q, k, v, mask):
    assert mask is None
    return F.scaled_dot_product_attention(q, k, v)


def _key_tables():
    trailing = key_padding_mask(N_IMG, _text_mask())
    scattered = torch.rand(B, 1, 1, L) > 0.3
    scattered[..., 0] = True
    one_row = key_padding_mask(N_IMG, _text_mask()[:1])  # [1, 1, 1, L]: broadcast over the batch
    return {"trailing": trailing, "scattered": scattered, "broadcast": one_row,
            "fully_padded_row": _mask("fully_padded_row")}


@pytest.mark.parametrize("case", ["trailing", "scattered", "broadcast", "fully_padded_row"])
def test_flash_varlen_packing_matches_masked_sdpa(case):
    q, k, v = _qkv()
    mask = _key_tables()[case]
    keys = key_padding_keys(mask, B)
    assert keys.shape == (B, L)
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = flash_varlen_attention(q, k, v, keys, _reference_varlen)
    assert got.shape == expected.shape
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("case", ["trailing", "scattered", "broadcast", "fully_padded_row"])
def test_per_sample_key_attention_matches_masked_sdpa(case):
    q, k, v = _qkv()
    mask = _key_tables()[case]
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    got = per_sample_key_attention(q, k, v, key_padding_keys(mask, B), _sdpa_no_mask)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_per_sample_key_attention_sample_without_keys_is_zero():
    q, k, v = _qkv()
    keys = torch.ones(B, L, dtype=torch.bool)
    keys[1] = False
    out = per_sample_key_attention(q, k, v, keys, _sdpa_no_mask)
    assert out[1].abs().max() == 0
    torch.testing.assert_close(out[:1], F.scaled_dot_product_attention(q[:1], k[:1], v[:1]), atol=1e-6, rtol=0)


def test_key_padding_keys_only_accepts_key_padding_masks():
    assert key_padding_keys(None, B) is None
    assert key_padding_keys(_mask("full"), B) is None
    assert key_padding_keys(torch.zeros(B, 1, 1, L), B) is None  # additive float mask: not a key table
    table = key_padding_keys(_mask("key_padding"), B)
    assert table.dtype == torch.bool and table.sum(1).tolist() == [N_IMG + 3, L]


# --- choosing a backend -----------------------------------------------------------------------------------------


def test_auto_resolves_to_sdpa_on_cpu_with_one_info_line(caplog):
    for requested in (None, "auto"):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="hunyuan_i2v.model.layers"):
            assert resolve_attention_backend(requested, "cpu", torch.float32) == "sdpa"
        infos = [r for r in caplog.records if r.levelno == logging.INFO]
        assert len(infos) == 1 and "sdpa" in infos[0].getMessage() and "cpu" in infos[0].getMessage()


def test_available_backends_on_cpu():
    here = available_attention_backends("cpu", torch.bfloat16)
    assert set(here) == set(ATTENTION_BACKENDS) == {"sdpa", "flash", "sage", "chunked"}
    assert here["sdpa"] is None and here["chunked"] is None
    for name in ("flash", "sage"):
        assert "CUDA" in here[name]
    installed = available_attention_backends()
    if importlib.util.find_spec("flash_attn") is None:
        assert "pip install flash-attn" in installed["flash"]
    if importlib.util.find_spec("sageattention") is None:
        assert "pip install sageattention" in installed["sage"]


@pytest.mark.parametrize("name", ["flash", "sage"])
def test_forcing_a_cuda_backend_on_cpu_raises_with_the_remedy(name):
    with pytest.raises(ValueError, match=rf"'{name}'.*needs a CUDA device with fp16/bf16"):
        resolve_attention_backend(name, "cpu", torch.bfloat16)
    q, k, v = _qkv(torch.bfloat16)
    with pytest.raises(ValueError, match="CUDA"):  # the entry point refuses too, instead of failing in a kernel
        attention(q, k, v, backend=name)


@pytest.mark.skipif(importlib.util.find_spec("flash_attn") is not None, reason="flash-attn is installed here")
def test_forcing_flash_when_not_installed_names_the_install_command():
    with pytest.raises(ValueError, match="pip install flash-attn"):
        resolve_attention_backend("flash", "cpu", torch.float16)


def test_unknown_or_malformed_backends_list_the_choices():
    for bad in ("xformers", "sdpa:3", "chunked:0", "chunked:lots"):
        with pytest.raises(ValueError, match="auto, sdpa, flash, sage, chunked"):
            resolve_attention_backend(bad, "cpu", torch.float32)
    with pytest.raises(ValueError, match="xformers"):
        attention(*_qkv(), backend="xformers")


def test_cpu_backends_resolve_as_requested():
    for name in ("sdpa", "chunked", "chunked:64"):
        assert resolve_attention_backend(name, torch.device("cpu"), torch.float32) == name
