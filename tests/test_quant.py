"""Weight-only int8 / fp8 storage (hunyuan_i2v.memory.quant): the math on worked values, which layers are replaced,
the output error of a tiny transformer, the safetensors layout and round trip, and the user errors."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors import safe_open
from torch import nn

from hunyuan_i2v.config import HUNYUAN_I2V_720P, TINY_TEST
from hunyuan_i2v.errors import CheckpointError
from hunyuan_i2v.memory.quant import (
    QuantizedLinear,
    dequantize_model,
    dequantize_weight,
    fp8_scaled_linear,
    load_quantized,
    quantization_error,
    quantize_model,
    quantize_weight,
    quantized_layer_dtypes,
    quantized_layers,
    quantized_state_dict,
    save_quantized,
    weight_bytes,
)
from hunyuan_i2v.model.transformer import HunyuanVideoTransformer

F8 = torch.float8_e4m3fn

# Output error bounds of the tiny transformer (relative L2 over the whole output; weights ~ N(0, 0.1)).
# Measured when written: int8 1.2e-2 (fp32 compute) / 1.5e-2 (bf16), fp8 4.4e-2 / 4.6e-2; a bf16 copy of the fp32
# model is itself 1.1e-2 away from it, so int8 costs about as much as bf16 rounding does.
INT8_REL_TOL = 2e-2
FP8_REL_TOL = 6e-2


def _tiny_model(dtype=torch.float32) -> HunyuanVideoTransformer:
    model = HunyuanVideoTransformer(TINY_TEST.transformer).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model.to(dtype)


def _inputs():
    """The same inputs on every call."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, 3, 8, 6, generator=g)  # 3 latent frames of 4x3 patches
    t = torch.tensor([700.0, 250.0])
    text = torch.randn(2, 12, 32, generator=g)
    mask = torch.ones(2, 12)
    mask[0, 7:] = 0  # one padded prompt
    pooled = torch.randn(2, 16, generator=g)
    return x, t, text, mask, pooled, torch.tensor([6016.0, 3008.0])


# ---------------------------------------------------------------------------------------------
# The math


def test_int8_worked_values_per_channel_rounding_and_zero_rows():
    w = torch.tensor([
        [127.0, -63.5, 31.75, 0.5, 1.5, -2.5],  # max 127 -> scale 1; halves round to even
        [0.0, 0.0, 0.0, 0.0, 0.0, 0.0],  # zero row
        [-254.0, 1.0, 3.0, 0.98, 100.0, 7.0],  # max 254 -> scale 2
    ])
    q, scale = quantize_weight(w, "int8")
    assert q.dtype == torch.int8 and scale.dtype == torch.float32
    assert scale.tolist() == [1.0, 0.0, 2.0]
    assert q.tolist() == [
        [127, -64, 32, 0, 2, -2],
        [0, 0, 0, 0, 0, 0],
        [-127, 0, 2, 0, 50, 4],  # 0.5 -> 0, 1.5 -> 2, 0.49 -> 0, 50, 3.5 -> 4
    ]
    deq = dequantize_weight(q, scale, torch.float32)
    assert deq.tolist() == [[127, -64, 32, 0, 2, -2], [0] * 6, [-254, 0, 4, 0, 100, 8]]
    assert dequantize_weight(q, scale, torch.bfloat16).dtype == torch.bfloat16


def test_fp8_worked_values_round_to_nearest_even_and_subnormals():
    w = torch.tensor([
        [448.0, 17.0, 19.0, -1.0625, 1.1875, 0.00146484375],  # max 448 -> scale 1
        [896.0, 34.0, -3.0, 0.0, 2.0 ** -9, 1.0],  # max 896 -> scale 2
    ])
    q, scale = quantize_weight(w, "fp8")
    assert q.dtype == F8 and scale.tolist() == [1.0, 2.0]
    # e4m3 has 3 mantissa bits: 17 (between 16 and 18) -> 16, 19 -> 20, 1.0625 -> 1.0, 1.1875 -> 1.25;
    # the smallest subnormal is 2^-9, and 0.75 * 2^-9 rounds up to it
    assert q.float().tolist() == [[448.0, 16.0, 20.0, -1.0, 1.25, 2.0 ** -9], [448.0, 16.0, -1.5, 0.0, 0.0, 0.5]]
    assert dequantize_weight(q, scale).tolist() == [[448.0, 16.0, 20.0, -1.0, 1.25, 2.0 ** -9],
                                                    [896.0, 32.0, -3.0, 0.0, 0.0, 1.0]]


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_codes_stay_in_range_and_error_is_within_half_a_step(dtype):
    w = torch.distributions.StudentT(2.0).sample((64, 96)) * 0.02  # heavy tails, like real checkpoints
    w[5] = 0.0
    q, scale = quantize_weight(w, dtype)
    qf = q.float()
    qmax = 127.0 if dtype == "int8" else 448.0
    live = torch.arange(64) != 5
    assert qf.abs().amax(dim=1)[live].eq(qmax).all()  # every row uses the full range, never -128
    assert qf.abs().max() <= qmax and qf[5].eq(0).all() and scale[5] == 0
    assert torch.isfinite(qf).all()
    err = (dequantize_weight(q, scale) - w).abs()
    if dtype == "int8":
        bound = scale[:, None] / 2
    else:  # half an ulp of 3 mantissa bits (1/16 relative), or half the smallest subnormal step
        bound = torch.maximum(w.abs() / 16, scale[:, None] * 2.0 ** -10)
    assert (err <= bound * (1 + 1e-5) + 1e-12).all()


def test_quantize_weight_rejects_bad_inputs():
    with pytest.raises(ValueError) as e:
        quantize_weight(torch.randn(4, 4), "int4")
    assert str(e.value) == "unknown weight storage dtype 'int4'; choose one of: int8, fp8"
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        quantize_weight(torch.randn(4), "int8")
    with pytest.raises(ValueError, match=r"\[out, in\]"):
        quantize_weight(torch.ones(4, 4, dtype=torch.int32), "int8")
    w = torch.randn(4, 4)
    w[1, 2] = float("nan")
    with pytest.raises(ValueError, match="finite"):
        quantize_weight(w, "fp8")


# ---------------------------------------------------------------------------------------------
# Which modules are replaced


def test_default_quantizes_exactly_the_block_linears():
    model = _tiny_model()
    linears = {n for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    expected = {n for n in linears if n.startswith(("double_blocks.", "single_blocks."))}
    # per double block: (mod, qkv, proj, fc1, fc2) x (img, txt); per single block: linear1, linear2, modulation
    assert len(expected) == 2 * 10 + 2 * 3
    quantize_model(model, "int8")
    assert set(quantized_layers(model)) == expected
    assert set(quantized_layers(model).values()) == {"int8"}
    for name in linears - expected:  # embedders, token refiner, final layer: untouched
        assert type(model.get_submodule(name)) is nn.Linear, name
    assert type(model.double_blocks[0].img_mlp.fc1) is QuantizedLinear
    assert type(model.single_blocks[1].modulation.linear) is QuantizedLinear


def test_include_and_exclude_patterns():
    model = quantize_model(_tiny_model(), "fp8", exclude=("*_mod.linear", "*.modulation.linear"))
    names = set(quantized_layers(model))
    assert len(names) == 2 * 8 + 2 * 2 and not any("mod" in n for n in names)
    model = quantize_model(_tiny_model(), "int8", include="final_layer.linear")
    assert quantized_layers(model) == {"final_layer.linear": "int8"}


def test_nothing_to_quantize_errors_clearly():
    with pytest.raises(ValueError, match="nothing to quantize: no nn.Linear in Sequential"):
        quantize_model(nn.Sequential(nn.Conv1d(2, 2, 1), nn.LayerNorm(2)))
    with pytest.raises(ValueError, match="no nn.Linear in HunyuanVideoTransformer matches"):
        quantize_model(_tiny_model(), include="no_such_blocks.*")
    model = quantize_model(_tiny_model())
    with pytest.raises(ValueError, match="already quantized"):
        quantize_model(model)
    with pytest.raises(ValueError, match="choose one of: int8, fp8"):
        quantize_model(_tiny_model(), "float8")


# ---------------------------------------------------------------------------------------------
# Output error of a tiny transformer


@pytest.fixture(scope="module")
def errors():
    """quantization_error of the tiny transformer for each (storage, compute dtype), against the unquantized model
    in the same compute dtype and against the fp32 one; computed once for the tests below."""
    torch.manual_seed(0)
    out = {}
    with torch.no_grad():
        ref32 = _tiny_model()
        refs = {torch.float32: ref32, torch.bfloat16: copy.deepcopy(ref32).to(torch.bfloat16)}
        for compute, ref in refs.items():
            for dtype in ("int8", "fp8"):
                quant = quantize_model(copy.deepcopy(ref), dtype)
                out[dtype, compute] = quantization_error(ref, quant, *_inputs())
                out[dtype, compute, "vs fp32"] = (out[dtype, compute] if ref is ref32
                                                  else quantization_error(ref32, quant, *_inputs()))
    return out


@pytest.mark.parametrize("compute", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dtype,tol", [("int8", INT8_REL_TOL), ("fp8", FP8_REL_TOL)])
def test_tiny_transformer_error_against_full_precision(errors, dtype, tol, compute):
    for err in (errors[dtype, compute], errors[dtype, compute, "vs fp32"]):
        assert err["ref_max_abs"] > 1.0  # a real output, not a near-zero one
        assert 1e-4 < err["rel_l2"] < tol, err  # the quantized path really ran, and stayed close
        assert err["rel_max"] < 2 * tol, err
        assert err["max_abs"] >= err["mean_abs"] > 0


def test_int8_is_more_exact_than_fp8_on_the_same_weights(errors):
    for compute in (torch.float32, torch.bfloat16):
        assert errors["int8", compute]["rel_l2"] < errors["fp8", compute]["rel_l2"]


def test_quantized_layer_matches_its_dequantized_linear():
    lin = nn.Linear(48, 32)
    q = QuantizedLinear.from_linear(lin, "fp8")
    x = torch.randn(5, 7, 48)
    w = dequantize_weight(q.weight, q.weight_scale)
    assert torch.equal(q(x), torch.nn.functional.linear(x, w, lin.bias))
    assert q.bias is lin.bias  # shared, not copied


# ---------------------------------------------------------------------------------------------
# Storage: bytes, dtype casts, safetensors


def test_weight_bytes_of_13b_halve_on_the_meta_device():
    with torch.device("meta"):
        model = HunyuanVideoTransformer(HUNYUAN_I2V_720P.transformer, dtype=torch.bfloat16)
    bf16 = weight_bytes(model)
    assert bf16 == 2 * 12_821_012_544
    quantize_model(model, "int8")
    ratio = weight_bytes(model) / bf16
    assert 0.5 < ratio < 0.53, ratio  # blocks halve (+4 bytes of scale per row); ~3% stays bf16
    assert model.double_blocks[0].img_attn_qkv.weight.is_meta


def test_to_dtype_casts_only_the_bias():
    model = quantize_model(_tiny_model(), "fp8")
    model.to(torch.bfloat16)
    layer = model.single_blocks[0].linear1
    assert layer.weight.dtype == F8 and layer.weight_scale.dtype == torch.float32
    assert layer.bias.dtype == torch.bfloat16
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    expected = torch.nn.functional.linear(x, dequantize_weight(layer.weight, layer.weight_scale, torch.bfloat16),
                                          layer.bias)
    assert torch.equal(layer(x), expected)
    model.float()
    assert layer.weight.dtype == F8 and layer.bias.dtype == torch.float32


@pytest.mark.parametrize("dtype", ["int8", "fp8"])
def test_safetensors_round_trip_is_bit_identical(dtype, tmp_path):
    model = quantize_model(_tiny_model(), dtype)
    path = save_quantized(model, tmp_path / "q.safetensors", metadata={"config": "{}"})
    with safe_open(str(path), framework="pt") as f:
        keys = set(f.keys())
        meta = f.metadata()
        layer = "double_blocks.1.img_attn_qkv"
        assert f.get_tensor(f"{layer}.weight").dtype == (torch.int8 if dtype == "int8" else F8)
        assert f.get_tensor(f"{layer}.weight").shape == (192, 64)
        assert f.get_tensor(f"{layer}.weight_scale").dtype == torch.float32
        assert f.get_tensor(f"{layer}.weight_scale").shape == (192,)
        assert f.get_tensor(f"{layer}.bias").dtype == torch.float32
        assert f.get_tensor("final_layer.linear.weight").dtype == torch.float32  # full precision stays
    assert keys == set(quantized_state_dict(model))
    assert sum(k.endswith(".weight_scale") for k in keys) == 26
    assert meta["config"] == "{}" and json.loads(meta["quantization"])["dtypes"] == [dtype]

    with torch.device("meta"):
        fresh = HunyuanVideoTransformer(TINY_TEST.transformer).eval()
    load_quantized(fresh, path)
    assert quantized_layers(fresh) == quantized_layers(model)
    assert not any(t.is_meta for t in list(fresh.parameters()) + list(fresh.buffers()))
    with torch.no_grad():
        assert torch.equal(fresh(*_inputs()), model(*_inputs()))


def test_dequantize_model_gives_the_same_outputs():
    quant = quantize_model(_tiny_model(), "int8")
    with torch.no_grad():
        expected = quant(*_inputs())
    plain = dequantize_model(copy.deepcopy(quant))
    assert not quantized_layers(plain)
    assert type(plain.double_blocks[0].img_attn_qkv) is nn.Linear
    assert plain.double_blocks[0].img_attn_qkv.weight.dtype == torch.float32
    with torch.no_grad():
        assert torch.equal(plain(*_inputs()), expected)
    with pytest.raises(ValueError, match="no quantized layers"):
        dequantize_model(plain)


def test_loading_mismatched_checkpoints_errors_clearly(tmp_path):
    model = quantize_model(_tiny_model(), "int8")
    with pytest.raises(CheckpointError, match="load full-precision weights before quantize_model"):
        model.load_state_dict(_tiny_model().state_dict())
    with pytest.raises(ValueError, match="run quantize_model"):
        quantized_state_dict(_tiny_model())
    with pytest.raises(CheckpointError, match="must be"):
        quantized_layer_dtypes({"a.weight": torch.float32, "a.weight_scale": torch.float32})
    with pytest.raises(CheckpointError, match="no such quantized weights file"):
        load_quantized(_tiny_model(), tmp_path / "missing.safetensors")
    other = quantize_model(nn.Sequential(nn.Linear(8, 8)), "int8", include="*")
    path = save_quantized(other, tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match="does not have"):
        load_quantized(_tiny_model(), path)


# ---------------------------------------------------------------------------------------------
# The fp8 GEMM option


def test_use_scaled_mm_needs_fp8_and_falls_back_off_gpu():
    with pytest.raises(ValueError, match="needs fp8"):
        QuantizedLinear(32, 32, weights_dtype="int8", use_scaled_mm=True)
    lin = nn.Linear(64, 32).to(torch.bfloat16)
    fast, plain = (QuantizedLinear.from_linear(lin, "fp8", use_scaled_mm=s) for s in (True, False))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert torch.equal(fast(x), plain(x))  # CPU: the dequantized matmul, bit for bit


def test_fp8_scaled_linear_math():
    """The _scaled_mm path's math (per-token activation scales), where this torch build runs it (CPU here)."""
    lin = nn.Linear(64, 48)
    q = QuantizedLinear.from_linear(lin, "fp8")
    x = torch.randn(2, 5, 64)
    x[0, 1] = 0.0  # an all-zero token must not divide by zero
    try:
        out = fp8_scaled_linear(x.bfloat16(), q.weight, q.weight_scale, lin.bias)
    except (RuntimeError, NotImplementedError) as e:
        pytest.skip(f"torch._scaled_mm is not available on this device: {e}")
    ref = torch.nn.functional.linear(x, dequantize_weight(q.weight, q.weight_scale), lin.bias)
    assert out.shape == ref.shape and out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    assert torch.allclose(out[0, 1].float(), lin.bias.detach(), atol=1e-2)
    rel = ((out.float() - ref).norm() / ref.norm()).item()
    assert rel < 0.06, rel  # the activations' own e4m3 rounding (1/16 relative at most) on top of the weights'
