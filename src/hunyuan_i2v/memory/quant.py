"""Weight-only quantized storage for linear layers: int8 and fp8 (e4m3) with one scale per output channel.

The scheme is symmetric and per output row (issue 5, item 2)::

    int8: scale = max|w_row| / 127,  q = clamp(round_half_even(w / scale), -127, 127)
    fp8:  scale = max|w_row| / 448,  q = float8_e4m3fn(clamp(w / scale, -448, 448))   (448: largest e4m3fn value)
    w  ~= q * scale

A :class:`QuantizedLinear` keeps ``q`` and the fp32 scales and dequantizes into the input's dtype on every call,
so a weight exists in full precision only while its own matmul runs. With ``use_scaled_mm=True``, fp8 storage and
a GPU of compute capability >= 8.9, the matmul runs in fp8 instead (``torch._scaled_mm``, activations scaled per
token); anywhere else that option falls back to the dequantized matmul.

Under autograd (training LoRAs on a quantized base) the layer saves its codes and scales, not the dequantized
weight, and dequantizes again for the input gradient (:class:`_DequantizedLinear`): the saved state of a layer is
its int8/fp8 storage, which it holds anyway. The codes never get gradients.

Saved layout (one safetensors file; every tensor of a layer that is not quantized is saved unchanged)::

    <layer>.weight        int8 or float8_e4m3fn   [out, in]   the codes q
    <layer>.weight_scale  float32                 [out]       the per-row scales
    <layer>.bias          the compute dtype       [out]       when the layer has a bias

A key ending in ``.weight_scale`` marks its layer as quantized and the dtype of ``<layer>.weight`` names the
storage, so a reader needs nothing else; the metadata entry ``quantization`` (JSON) describes the scheme for humans.
Load such a file into a model built on the meta device with :func:`load_quantized`: the tensors are assigned, not
copied, so they stay memory-mapped from the file until a layer first touches them.
"""

from __future__ import annotations

import fnmatch
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping, Optional, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..errors import CheckpointError

logger = logging.getLogger(__name__)

# storage name -> (torch dtype, the largest code magnitude a row's maximum is mapped to)
WEIGHT_DTYPES: dict[str, tuple[torch.dtype, float]] = {
    "int8": (torch.int8, 127.0),  # symmetric: -128 is never used, so q and -q are both representable
    "fp8": (torch.float8_e4m3fn, 448.0),
}
DEFAULT_INCLUDE = ("double_blocks.*", "single_blocks.*")  # the blocks hold ~97% of the 13B weights (spec 1.4, 1.5)
SCALE_SUFFIX = ".weight_scale"
METADATA_KEY = "quantization"
FORMAT_VERSION = 1
SCALED_MM_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with fp8 tensor cores

PathLike = Union[str, os.PathLike]


def check_weights_dtype(name: str) -> str:
    """Validate a storage dtype name ("int8" or "fp8")."""
    if name not in WEIGHT_DTYPES:
        raise ValueError(f"unknown weight storage dtype {name!r}; choose one of: {', '.join(WEIGHT_DTYPES)}")
    return name


def _storage_name(dtype: torch.dtype) -> Optional[str]:
    return next((name for name, (dt, _) in WEIGHT_DTYPES.items() if dt == dtype), None)


# ---------------------------------------------------------------------------------------------
# The math


@torch.no_grad()
def quantize_weight(weight: Tensor, dtype: str = "int8") -> tuple[Tensor, Tensor]:
    """Quantize a [out, in] weight per output row -> (codes [out, in] int8/fp8, scales [out] float32).

    The row maximum maps to the largest code (127 / 448). An all-zero row gets scale 0 and codes 0, so it
    dequantizes to exact zeros. Works on the meta device (shapes only), which is how the planner counts bytes.
    """
    storage, qmax = WEIGHT_DTYPES[check_weights_dtype(dtype)]
    if weight.ndim != 2 or not weight.is_floating_point():
        raise ValueError(f"quantize_weight expects a floating [out, in] weight, got {weight.dtype} "
                         f"{tuple(weight.shape)}")
    if weight.is_meta:  # shapes only; skips torch's slow Python meta kernels
        return (torch.empty(weight.shape, dtype=storage, device="meta"),
                torch.empty(weight.shape[0], dtype=torch.float32, device="meta"))
    scale = weight.detach().abs().amax(dim=1).float() / qmax
    if not bool(torch.isfinite(scale).all()):
        raise ValueError("the weight holds inf or NaN values; quantization needs finite weights")
    divisor = torch.where(scale > 0, scale, torch.ones_like(scale))  # zero rows: 0 / 1 = 0, not 0 / 0
    x = weight.detach().float() / divisor[:, None]
    if storage == torch.int8:
        q = x.round_().clamp_(-qmax, qmax).to(storage)
    else:
        # w / scale can land a rounding step above 448; out-of-range values become NaN on some backends
        q = x.clamp_(-qmax, qmax).to(storage)
    return q, scale


def dequantize_weight(codes: Tensor, scale: Tensor, dtype: torch.dtype = torch.float32) -> Tensor:
    """codes * scale per row, in ``dtype``. int8 and e4m3 codes are exact in fp32/bf16/fp16, so the product is the
    only rounding (plus the scale's own rounding to ``dtype``). In place on the fresh copy: one weight-sized
    allocation, which is the transient cost of a quantized layer's call."""
    return codes.to(dtype, copy=True).mul_(scale.to(dtype)[:, None])


def scaled_mm_supported(device: torch.device) -> bool:
    """Whether ``device`` is a GPU with fp8 tensor cores (compute capability >= 8.9)."""
    return device.type == "cuda" and torch.cuda.get_device_capability(device) >= SCALED_MM_MIN_CAPABILITY


def fp8_scaled_linear(x: Tensor, codes: Tensor, scale: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    """x @ (codes * scale).T + bias as one fp8 GEMM (``torch._scaled_mm``, row-wise scales).

    The activations are quantized to e4m3 per token on the fly (scale = max|x_row| / 448), which adds its own
    error on top of the weight's. ``codes`` must be float8_e4m3fn [out, in]; in/out multiples of 16 on CUDA.
    Raises whatever ``torch._scaled_mm`` raises where it is unsupported.
    """
    qmax = WEIGHT_DTYPES["fp8"][1]
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    x_scale = x2.abs().amax(dim=1, keepdim=True).float().clamp_(min=1e-12) / qmax
    xq = (x2.float() / x_scale).clamp_(-qmax, qmax).to(torch.float8_e4m3fn)
    # row-wise scaling produces bf16; fp16 callers get a cast
    out = torch._scaled_mm(
        xq, codes.t(), scale_a=x_scale, scale_b=scale.float().view(1, -1),
        bias=None if bias is None else bias.to(torch.bfloat16), out_dtype=torch.bfloat16,
    )
    return out.to(x.dtype).reshape(*shape[:-1], codes.shape[0])


class _DequantizedLinear(torch.autograd.Function):
    """``F.linear(x, codes * scale, bias)`` whose backward dequantizes the weight again instead of saving it.

    The forward is the inference computation exactly (the same call, under the caller's autocast, if any). The
    backward multiplies by the weight as the forward used it: dequantized in x's dtype, then rounded to the
    dtype the matmul ran in (autocast's), which is what autograd of the plain call computes.
    """

    @staticmethod
    def forward(ctx, x: Tensor, codes: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
        out = F.linear(x, dequantize_weight(codes, scale, x.dtype), None if bias is None else bias.to(x.dtype))
        ctx.save_for_backward(codes, scale)
        ctx.x_dtype = x.dtype
        return out

    @staticmethod
    def backward(ctx, grad: Tensor):
        codes, scale = ctx.saved_tensors
        grad_x = grad_bias = None
        if ctx.needs_input_grad[0]:
            weight = dequantize_weight(codes, scale, ctx.x_dtype).to(grad.dtype)
            grad_x = grad.matmul(weight)
        if ctx.needs_input_grad[3]:
            grad_bias = grad.reshape(-1, grad.shape[-1]).sum(0)
        return grad_x, None, None, grad_bias


def _linear(x: Tensor, codes: Tensor, scale: Tensor, bias: Optional[Tensor]) -> Tensor:
    """x @ (codes * scale).T + bias in x's dtype; through :class:`_DequantizedLinear` when gradients flow."""
    if torch.is_grad_enabled() and (x.requires_grad or (bias is not None and bias.requires_grad)):
        return _DequantizedLinear.apply(x, codes, scale, bias)
    return F.linear(x, dequantize_weight(codes, scale, x.dtype), None if bias is None else bias.to(x.dtype))


# ---------------------------------------------------------------------------------------------
# The layer


class QuantizedLinear(nn.Module):
    """An ``nn.Linear`` whose weight is stored as int8 / fp8 codes with one float32 scale per output channel.

    ``weight`` (the codes) and ``weight_scale`` are buffers: they are not trainable, follow ``.to(device)`` and
    appear in the state dict under the documented keys. ``.to(dtype)`` / ``.half()`` cast only the bias; the codes
    and scales keep their dtypes (float8 counts as floating point, so a plain cast would turn codes into numbers).
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, weights_dtype: str = "int8", *,
                 use_scaled_mm: bool = False, device=None, dtype=None):
        super().__init__()
        storage, _ = WEIGHT_DTYPES[check_weights_dtype(weights_dtype)]
        if use_scaled_mm and weights_dtype != "fp8":
            raise ValueError("use_scaled_mm needs fp8 weight storage (torch._scaled_mm multiplies fp8 matrices); "
                             "use weights_dtype='fp8' or use_scaled_mm=False")
        self.in_features, self.out_features = in_features, out_features
        self.weights_dtype = weights_dtype
        self.use_scaled_mm = use_scaled_mm
        self.register_buffer("weight", torch.empty(out_features, in_features, dtype=storage, device=device))
        self.register_buffer("weight_scale", torch.empty(out_features, dtype=torch.float32, device=device))
        if bias:
            self.bias = nn.Parameter(torch.empty(out_features, device=device, dtype=dtype))
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weights_dtype: str = "int8", *, use_scaled_mm: bool = False
                    ) -> "QuantizedLinear":
        """Quantize ``linear``'s current weight; the bias Parameter is shared, not copied."""
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, weights_dtype,
                    use_scaled_mm=use_scaled_mm, device="meta")
        layer.weight, layer.weight_scale = quantize_weight(linear.weight, weights_dtype)
        if linear.bias is not None:
            layer.bias = linear.bias
        return layer

    def dequantized_weight(self, dtype: torch.dtype) -> Tensor:
        return dequantize_weight(self.weight, self.weight_scale, dtype)

    def forward_rows(self, x: Tensor, start: int, stop: Optional[int] = None) -> Tensor:
        """Output features [start, stop) only, dequantizing only those rows (the transformer's single blocks
        use this for the qkv and MLP parts of their fused linear1, see ``transformer.linear_rows``)."""
        rows = slice(start, stop)
        return _linear(x, self.weight[rows], self.weight_scale[rows], None if self.bias is None else self.bias[rows])

    def _scaled_mm_applies(self, x: Tensor) -> bool:
        return (
            self.use_scaled_mm
            and not (torch.is_grad_enabled() and x.requires_grad)  # torch._scaled_mm has no backward
            and x.dtype in (torch.bfloat16, torch.float16)
            and self.in_features % 16 == 0 and self.out_features % 16 == 0
            and scaled_mm_supported(x.device)
        )

    def forward(self, x: Tensor) -> Tensor:
        if self._scaled_mm_applies(x):
            try:
                return fp8_scaled_linear(x, self.weight, self.weight_scale, self.bias)
            except (RuntimeError, NotImplementedError) as e:
                # warnings (not logging) so the hundreds of layers that hit this report it once
                warnings.warn(f"torch._scaled_mm is unusable here ({str(e).splitlines()[0]}); fp8 layers fall back "
                              "to dequantized matmuls", RuntimeWarning, stacklevel=2)
                self.use_scaled_mm = False
        return _linear(x, self.weight, self.weight_scale, self.bias)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"weights_dtype={self.weights_dtype}" + (", use_scaled_mm=True" if self.use_scaled_mm else ""))

    def _apply(self, fn: Callable[[Tensor], Tensor], recurse: bool = True):
        codes, scale = self._buffers.pop("weight"), self._buffers.pop("weight_scale")
        try:
            super()._apply(fn, recurse)  # the bias, like any parameter
        finally:
            self._buffers["weight"] = _apply_keeping_dtype(fn, codes)
            self._buffers["weight_scale"] = _apply_keeping_dtype(fn, scale)
        return self

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        key = prefix + "weight"
        if key in state_dict and state_dict[key].dtype != self.weight.dtype:
            raise CheckpointError(
                f"{key}: the checkpoint holds {state_dict[key].dtype} weights but this layer stores "
                f"{self.weight.dtype} codes; load full-precision weights before quantize_model(), or a quantized "
                "file with load_quantized()")
        scale_key = prefix + "weight_scale"
        if scale_key in state_dict and state_dict[scale_key].dtype != torch.float32:
            state_dict[scale_key] = state_dict[scale_key].float()  # load_state_dict passes its own shallow copy
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)


def _apply_keeping_dtype(fn: Callable[[Tensor], Tensor], t: Tensor) -> Tensor:
    """Apply a Module._apply function (a device move, pinning, a cast) to ``t``, undoing only a dtype change."""
    out = fn(t)
    return out if out.dtype == t.dtype else t.to(out.device)


# ---------------------------------------------------------------------------------------------
# Whole models


def _patterns(patterns: Union[str, Iterable[str]], what: str) -> tuple[str, ...]:
    out = (patterns,) if isinstance(patterns, str) else tuple(patterns)
    if not all(isinstance(p, str) for p in out):
        raise ValueError(f"{what} must be module-name patterns (strings like 'double_blocks.*'), got {patterns!r}")
    return out


def _matches(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def _replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, new)


def quantized_layers(model: nn.Module) -> dict[str, str]:
    """Qualified name -> storage dtype name of every QuantizedLinear in ``model``."""
    return {n: m.weights_dtype for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}


def quantize_model(
    model: nn.Module,
    dtype: str = "int8",
    *,
    include: Union[str, Iterable[str]] = DEFAULT_INCLUDE,
    exclude: Union[str, Iterable[str]] = (),
    use_scaled_mm: bool = False,
) -> nn.Module:
    """Replace, in place, every ``nn.Linear`` whose qualified name matches ``include`` and not ``exclude``
    (fnmatch patterns) by a :class:`QuantizedLinear` quantized from its current weight. Returns ``model``.

    The default quantizes every linear layer of the transformer's double and single blocks (attention, MLP and
    modulation); embedders, the token refiner and the final layer stay in full precision. One layer is converted
    at a time, so the extra memory is one layer's fp32 copy.
    """
    check_weights_dtype(dtype)
    inc, exc = _patterns(include, "include"), _patterns(exclude, "exclude")
    targets = [(n, m) for n, m in model.named_modules()
               if isinstance(m, nn.Linear) and _matches(n, inc) and not _matches(n, exc)]
    if not targets:
        already = quantized_layers(model)
        hint = (f" ({len(already)} layers are already quantized; dequantize_model() first to requantize)"
                if already else "; check the patterns against model.named_modules()")
        raise ValueError(f"nothing to quantize: no nn.Linear in {type(model).__name__} matches include={list(inc)} "
                         f"exclude={list(exc)}{hint}")
    before = weight_bytes(model)
    for name, linear in targets:
        _replace_module(model, name, QuantizedLinear.from_linear(linear, dtype, use_scaled_mm=use_scaled_mm))
    logger.info("quantized %d linear layers to %s: weights %.1f MB -> %.1f MB", len(targets), dtype,
                before / 1e6, weight_bytes(model) / 1e6)
    return model


def dequantize_model(model: nn.Module, dtype: Optional[torch.dtype] = None) -> nn.Module:
    """Replace every QuantizedLinear by an ``nn.Linear`` holding the dequantized weight, in place.

    ``dtype``: of the restored weights; default each layer's bias dtype (float32 for layers without a bias).
    """
    layers = quantized_layers(model)
    if not layers:
        raise ValueError(f"{type(model).__name__} has no quantized layers to dequantize")
    for name in layers:
        q = model.get_submodule(name)
        dt = dtype or (q.bias.dtype if q.bias is not None else torch.float32)
        linear = nn.Linear(q.in_features, q.out_features, bias=q.bias is not None, device="meta", dtype=dt)
        linear.weight = nn.Parameter(q.dequantized_weight(dt))
        if q.bias is not None:
            linear.bias = nn.Parameter(q.bias.detach().to(dt))
        _replace_module(model, name, linear)
    return model


def weight_bytes(module: nn.Module) -> int:
    """Bytes held by the parameters and buffers of ``module`` (meta tensors count their would-be size)."""
    tensors = [t for _, t in module.named_parameters()] + [t for _, t in module.named_buffers()]
    return sum(t.numel() * t.element_size() for t in tensors)


# ---------------------------------------------------------------------------------------------
# Saving and loading


def quantized_state_dict(model: nn.Module) -> dict[str, Tensor]:
    """The model's state dict in the documented layout (see the module docstring), ready for safetensors."""
    if not quantized_layers(model):
        raise ValueError(f"{type(model).__name__} has no quantized layers; run quantize_model() first")
    return {k: v.detach().contiguous() for k, v in model.state_dict().items()}


def quantization_metadata(model: nn.Module) -> dict[str, str]:
    layers = quantized_layers(model)
    info = {
        "format": FORMAT_VERSION,
        "scheme": "weight-only, symmetric, per output channel: weight ~= codes * weight_scale[:, None]",
        "dtypes": sorted(set(layers.values())),
        "layers": len(layers),
    }
    return {METADATA_KEY: json.dumps(info)}


def save_quantized(model: nn.Module, path: PathLike, metadata: Optional[Mapping[str, str]] = None) -> Path:
    """Write the quantized model to one safetensors file, atomically (temporary file, then rename).

    ``metadata``: extra string entries (e.g. the model config) stored beside the ``quantization`` entry.
    """
    from safetensors.torch import save_file

    path = Path(path)
    tensors = {k: v.cpu().contiguous() for k, v in quantized_state_dict(model).items()}
    meta = {**dict(metadata or {}), **quantization_metadata(model)}
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise ValueError("safetensors metadata must map strings to strings")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(tmp), metadata=meta)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def quantized_layer_dtypes(key_dtypes: Mapping[str, torch.dtype]) -> dict[str, str]:
    """From a checkpoint's key -> dtype map, the quantized layers and their storage ("int8" / "fp8").

    A layer is quantized when ``<layer>.weight_scale`` exists; its ``<layer>.weight`` must be int8 or fp8 e4m3.
    Returns an empty dict for an ordinary checkpoint.
    """
    layers: dict[str, str] = {}
    for key in key_dtypes:
        if not key.endswith(SCALE_SUFFIX):
            continue
        layer = key[: -len(SCALE_SUFFIX)]
        weight_dtype = key_dtypes.get(layer + ".weight")
        name = _storage_name(weight_dtype) if weight_dtype is not None else None
        if name is None:
            found = "is missing" if weight_dtype is None else f"is {weight_dtype}"
            raise CheckpointError(f"{key!r} marks {layer!r} as quantized but {layer + '.weight'!r} {found}; "
                                  f"quantized weights must be {' or '.join(str(d) for d, _ in WEIGHT_DTYPES.values())}")
        layers[layer] = name
    return layers


def prepare_quantized_layers(model: nn.Module, layers: Mapping[str, str], *, use_scaled_mm: bool = False
                             ) -> nn.Module:
    """Swap the named ``nn.Linear`` modules for empty QuantizedLinear ones (on the same device, meta included),
    ready for ``load_state_dict(..., assign=True)`` of a quantized state dict. Returns ``model``."""
    for name, dtype in layers.items():
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise CheckpointError(f"the checkpoint quantizes layer {name!r}, which this "
                                  f"{type(model).__name__} does not have; check that the config matches") from None
        if isinstance(module, QuantizedLinear) and module.weights_dtype == dtype:
            continue
        if not isinstance(module, nn.Linear):
            raise CheckpointError(f"the checkpoint quantizes {name!r}, but in {type(model).__name__} that is a "
                                  f"{type(module).__name__}, not a linear layer")
        bias = module.bias
        _replace_module(model, name, QuantizedLinear(
            module.in_features, module.out_features, bias is not None, dtype, use_scaled_mm=use_scaled_mm and
            dtype == "fp8", device=module.weight.device, dtype=bias.dtype if bias is not None else None))
    return model


def load_quantized(model: nn.Module, path: PathLike, *, strict: bool = True, use_scaled_mm: bool = False
                   ) -> nn.Module:
    """Load a file written by :func:`save_quantized` into ``model`` (best built on the meta device), in place.

    The file's tensors are assigned to the model, not copied: on CPU they stay memory-mapped from the file.
    """
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{path}: no such quantized weights file; write one with save_quantized()")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            state_dict = {k: f.get_tensor(k) for k in f.keys()}
    except SafetensorError as e:
        raise CheckpointError(f"{path}: unreadable safetensors file ({e}); write it again") from None
    layers = quantized_layer_dtypes({k: v.dtype for k, v in state_dict.items()})
    if not layers:
        raise CheckpointError(f"{path}: holds no quantized layers (no '*{SCALE_SUFFIX}' keys); load it as an "
                              "ordinary checkpoint")
    prepare_quantized_layers(model, layers, use_scaled_mm=use_scaled_mm)
    model.load_state_dict(state_dict, strict=strict, assign=True)
    return model


# ---------------------------------------------------------------------------------------------
# Measuring


def _output_tensor(out: Any) -> Tensor:
    if isinstance(out, Tensor):
        return out
    if isinstance(out, (tuple, list)) and out and isinstance(out[0], Tensor):
        return out[0]
    raise TypeError(f"cannot compare outputs of type {type(out).__name__}; the modules must return a tensor")


@torch.no_grad()
def quantization_error(reference: nn.Module, quantized: nn.Module, *inputs, **kwargs) -> dict[str, float]:
    """Run both modules on the same inputs and compare the outputs in float64.

    Returns ``max_abs``, ``mean_abs``, ``rel_l2`` (||out - ref|| / ||ref||), ``rel_max`` (max_abs / max|ref|)
    and ``ref_max_abs`` (max|ref|, for scale).
    """
    ref = _output_tensor(reference(*inputs, **kwargs)).double()
    out = _output_tensor(quantized(*inputs, **kwargs)).double()
    if ref.shape != out.shape:
        raise ValueError(f"output shapes differ: reference {tuple(ref.shape)} vs quantized {tuple(out.shape)}")
    diff = (out - ref).abs()
    ref_norm, ref_max = ref.norm().item(), ref.abs().max().item()
    max_abs = diff.max().item()
    return {
        "max_abs": max_abs,
        "mean_abs": diff.mean().item(),
        "rel_l2": diff.norm().item() / ref_norm if ref_norm > 0 else float("inf"),
        "rel_max": max_abs / ref_max if ref_max > 0 else float("inf"),
        "ref_max_abs": ref_max,
    }
