"""LoRAs for the transformer (issue 7; spec 6.4): read the official, diffusers/PEFT and ComfyUI files, then merge them
into the weights or run them as adapters beside the layers.

A LoRA updates the weight ``W [out, in]`` of a linear layer by ``scale * (alpha / r) * up @ down`` with
``up [out, r]`` and ``down [r, in]``. The format is told from each key; any mix is read:

- official (kohya style, what the official trainer saves): ``Hunyuan_video_I2V_lora_double_blocks_0_img_attn_qkv``
  + ``.lora_down.weight`` / ``.lora_up.weight`` / ``.alpha``; ``lora_unet_`` and ``lora_transformer_`` prefixes too;
- diffusers / PEFT: ``transformer.transformer_blocks.0.attn.to_q`` + ``.lora_A.weight`` / ``.lora_B.weight``
  (``base_model.model.`` prefixes, ``.lora_A.default.weight``, and alpha from diffusers' ``lora_adapter_metadata``);
- ComfyUI: ``diffusion_model.double_blocks.0.img_attn_qkv`` + ``.lora_A.weight`` / ``.lora_B.weight`` (or
  ``lora_down`` / ``lora_up``).

Our modules have the official names. Where diffusers splits a fused official layer (``img_attn_qkv`` into
``to_q/to_k/to_v``, single blocks' ``linear1`` into q, k, v and ``proj_mlp``; names and row ranges come from
:mod:`hunyuan_i2v.keymap`), the fused update is the row-wise concatenation of every part's ``up_i @ down_i``: a
LoRA of rank ``sum r_i`` (``up`` block-structured, ``down = cat(down_i)``), exact, and just ``[cat(up_i), down]``
when the parts share one ``down`` (what diffusers makes of an official file).

``alpha / r`` uses the file's alpha where it stores one, else 1. The official files have alpha = r; the official
merge ignores alpha (spec 6.4), which gives the same weights for them.
"""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import TransformerConfig
from .errors import CheckpointError, InputError, ModelFilesError
from .keymap import official_to_diffusers
from .memory.quant import QuantizedLinear, _replace_module, dequantize_weight, quantize_weight
from .model.transformer import HunyuanVideoTransformer, linear_rows

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
MODES = ("merge", "adapter")

OFFICIAL_PREFIX = "Hunyuan_video_I2V_lora_"
# Key prefixes and the format each names; longer prefixes first where one starts another.
_PREFIXES = (
    (OFFICIAL_PREFIX, "official"),
    ("lora_unet_", "kohya"),
    ("lora_transformer_", "kohya"),
    ("base_model.model.", "peft"),
    ("model.diffusion_model.", "comfyui"),
    ("diffusion_model.", "comfyui"),
    ("transformer.", "diffusers"),
)
_SUFFIXES = (
    (".lora_down.weight", "down"), (".lora_up.weight", "up"),
    (".lora_A.weight", "down"), (".lora_B.weight", "up"),
    (".lora_A.default.weight", "down"), (".lora_B.default.weight", "up"),
    (".alpha", "alpha"),
)
EXPECTED_KEYS = (
    f"'{OFFICIAL_PREFIX}double_blocks_0_img_attn_qkv.lora_down.weight' (official), "
    "'transformer.transformer_blocks.0.attn.to_q.lora_A.weight' (diffusers) or "
    "'diffusion_model.double_blocks.0.img_attn_qkv.lora_A.weight' (ComfyUI), each with its lora_up / lora_B"
)
_SHOWN = 5  # keys named in an error


# ---------------------------------------------------------------------------------------------
# What a file holds


@dataclass
class LoraDelta:
    """The update of one linear layer: ``scale * up @ down``."""

    module: str  # our (official) module name, e.g. "double_blocks.0.img_attn_qkv"
    up: Tensor  # [out, r]
    down: Tensor  # [r, in]
    scale: float = 1.0  # alpha / r (1 where parts with their own alphas were folded into up)

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    def delta(self, device=None, scale: float = 1.0) -> Tensor:
        """``scale * self.scale * up @ down``, [out, in] in fp32 (one rounding for the product of the scales)."""
        return (self.up.to(device, torch.float32) @ self.down.to(device, torch.float32)).mul_(scale * self.scale)


@dataclass
class LoraFile:
    """A LoRA read for a given transformer: one :class:`LoraDelta` per layer it updates."""

    name: str  # the file name (or "lora<i>" for a state dict)
    format: str  # official | kohya | diffusers | peft | comfyui | "official names" | "diffusers names"
    deltas: dict[str, LoraDelta]

    @property
    def rank(self) -> int:
        return max((d.rank for d in self.deltas.values()), default=0)


LoraSource = Union[PathLike, Mapping[str, Tensor], LoraFile]
LoraSpec = Union[LoraSource, tuple[LoraSource, float]]


# ---------------------------------------------------------------------------------------------
# The layers a LoRA can update, by every name a file may give them


def lora_target_shapes(model: nn.Module) -> dict[str, tuple[int, int]]:
    """Module name -> (out, in) of every linear layer of ``model`` (plain, quantized or already adapted)."""
    wrappers = {name for name, m in model.named_modules() if isinstance(m, LoraLinear)}
    out: dict[str, tuple[int, int]] = {}
    for name, m in model.named_modules():
        if name.endswith(".base") and name[: -len(".base")] in wrappers:
            continue  # the layer inside an adapter wrapper is listed under the wrapper's name
        if isinstance(m, (nn.Linear, QuantizedLinear, LoraLinear)):
            out[name] = (m.out_features, m.in_features)
    return out


class _Targets:
    """Our layers by official name, diffusers name (with the rows of the official weight each part holds) and
    their underscore-joined kohya forms."""

    def __init__(self, shapes: Mapping[str, tuple[int, int]], hidden: int):
        self.shapes = dict(shapes)
        self.diffusers: dict[str, tuple[str, Optional[Tensor]]] = {}
        probe = torch.empty(hidden, 0)  # official_to_diffusers reads the hidden size from img_in's weight
        for name, (n_out, _) in self.shapes.items():
            try:
                # the weight's row indices, renamed (and split, or half-swapped) like the weight itself
                renamed = official_to_diffusers({"img_in.proj.weight": probe, f"{name}.weight": torch.arange(n_out)})
            except KeyError:
                continue  # no diffusers name for this layer
            for key, rows in renamed.items():
                if not key.startswith("x_embedder."):
                    whole = rows.shape[0] == n_out and torch.equal(rows, torch.arange(n_out))
                    self.diffusers[key[: -len(".weight")]] = (name, None if whole else rows)
        self.flat = {n.replace(".", "_"): n for n in self.shapes}
        self.flat_diffusers = {n.replace(".", "_"): n for n in self.diffusers}

    @classmethod
    def of(cls, model: nn.Module) -> "_Targets":
        hidden = getattr(getattr(model, "config", None), "hidden_size", None)
        if hidden is None:
            raise TypeError(f"LoRAs apply to a HunyuanVideoTransformer (with a .config), not a {type(model).__name__}")
        return cls(lora_target_shapes(model), hidden)

    @classmethod
    def for_config(cls, config: TransformerConfig) -> "_Targets":
        return cls.of(HunyuanVideoTransformer(config, device="meta"))

    def resolve(self, stem: str) -> Optional[tuple[str, Optional[Tensor], str, str]]:
        """(our module, rows or None for all, the file's naming, its format) for a module name as a file spells
        it, or None."""
        candidates = [(stem[len(p):], fmt) for p, fmt in _PREFIXES if stem.startswith(p)] + [(stem, None)]
        for name, fmt in candidates:
            if name in self.shapes:
                return name, None, "official", fmt or "official names"
            if name in self.diffusers:
                return (*self.diffusers[name], "diffusers", fmt or "diffusers names")
            if name in self.flat:
                return self.flat[name], None, "official", fmt or "kohya"
            if name in self.flat_diffusers:
                return (*self.diffusers[self.flat_diffusers[name]], "diffusers", fmt or "kohya")
        return None


# ---------------------------------------------------------------------------------------------
# Reading


@dataclass(frozen=True)
class _Part:
    """One module of a file: the keys of its factors and the rows of our layer's weight it updates."""

    stem: str
    rows: Optional[Tensor]  # None: every row, in order
    down: str
    up: str
    alpha: Optional[str]


def _matrix_shape(shape: Sequence[int]) -> Optional[tuple[int, int]]:
    """[a, b] (also [a, b, 1, 1], as 1x1 convolution LoRAs store it), else None."""
    shape = tuple(shape)
    if len(shape) >= 2 and all(s == 1 for s in shape[2:]):
        return shape[0], shape[1]
    return None


def _plan(shapes: Mapping[str, Sequence[int]], targets: _Targets, name: str, strict: bool
          ) -> tuple[dict[str, list[_Part]], str]:
    """Place every key of a file on our layers, checking shapes: ({our module: parts}, the file's format)."""
    stems: dict[str, dict[str, str]] = {}
    unplaced: list[str] = []
    for key in shapes:
        for suffix, role in _SUFFIXES:
            if key.endswith(suffix):
                roles = stems.setdefault(key[: -len(suffix)], {})
                if role in roles:
                    raise CheckpointError(f"{name}: {roles[role]!r} and {key!r} are both the {role} factor of one "
                                          "module; the file mixes two namings, keep one")
                roles[role] = key
                break
        else:
            unplaced.append(key)
    plan: dict[str, list[_Part]] = {}
    formats: Counter = Counter()
    for stem, roles in stems.items():
        hit = targets.resolve(stem)
        if hit is None:
            unplaced.extend(roles.values())
            continue
        module, rows, _, fmt = hit
        if "down" not in roles or "up" not in roles:
            have = ", ".join(sorted(roles))
            raise CheckpointError(f"{name}: {stem!r} has only its {have} tensor(s); a LoRA module needs both "
                                  "lora_down (lora_A) and lora_up (lora_B)")
        down, up = _matrix_shape(shapes[roles["down"]]), _matrix_shape(shapes[roles["up"]])
        n_out, n_in = targets.shapes[module]
        want_out = n_out if rows is None else rows.shape[0]
        if down is None or up is None or down[0] != up[1] or down[1] != n_in or up[0] != want_out:
            part = "" if rows is None else f" (its rows {int(rows.min())}..{int(rows.max())})"
            raise CheckpointError(
                f"{name}: {stem!r} does not fit layer {module}{part}: the file holds lora_up "
                f"{list(shapes[roles['up']])} and lora_down {list(shapes[roles['down']])}, the layer's weight is "
                f"[{n_out}, {n_in}], so it needs lora_up [{want_out}, r] and lora_down [r, {n_in}]; "
                "is this LoRA for a model of another size?")
        plan.setdefault(module, []).append(_Part(stem, rows, roles["down"], roles["up"], roles.get("alpha")))
        formats[fmt] += 1
    for module, parts in plan.items():
        covered = torch.zeros(targets.shapes[module][0], dtype=torch.int64)
        for p in parts:
            covered[p.rows if p.rows is not None else slice(None)] += 1
        if int(covered.max()) > 1:
            raise CheckpointError(f"{name}: {' and '.join(repr(p.stem) for p in parts)} update the same rows of "
                                  f"{module}; the file mixes the fused and the split naming, keep one")
    if not plan:
        first = ", ".join(repr(k) for k in list(shapes)[:_SHOWN])
        raise CheckpointError(f"{name}: none of its {len(shapes)} tensors fits a layer of this transformer (first: "
                              f"{first}); expected LoRA keys like {EXPECTED_KEYS}. Is it a LoRA for another model "
                              "(a text encoder, HunyuanVideo T2V, another architecture)?")
    if unplaced:
        message = (f"{len(unplaced)} of its {len(shapes)} tensors fit no layer of this transformer: "
                   + ", ".join(repr(k) for k in unplaced[:_SHOWN]) + (", ..." if len(unplaced) > _SHOWN else ""))
        if strict:
            raise CheckpointError(f"{name}: {message}; expected LoRA keys like {EXPECTED_KEYS} (pass strict=False "
                                  "to apply the rest)")
        logger.warning("%s: skipping %s", name, message)
    return plan, formats.most_common(1)[0][0]


class _Scaling:
    """alpha / r for a module: the file's alpha tensor, else the diffusers metadata's lora_alpha, else 1."""

    def __init__(self, metadata: Mapping[str, str]):
        self.alpha: Optional[float] = None
        self.patterns: dict[str, float] = {}
        self.rslora = False
        raw = metadata.get("lora_adapter_metadata")
        if not raw:
            return
        try:
            info = json.loads(raw)
        except ValueError:
            logger.warning("unreadable lora_adapter_metadata in the LoRA file; using alpha = r")
            return
        # diffusers prefixes each entry with the component ("transformer.lora_alpha")
        info = {k.removeprefix("transformer."): v for k, v in info.items()}
        if isinstance(info.get("lora_alpha"), (int, float)):
            self.alpha = float(info["lora_alpha"])
        if isinstance(info.get("alpha_pattern"), dict):
            self.patterns = {str(k): float(v) for k, v in info["alpha_pattern"].items()}
        self.rslora = bool(info.get("use_rslora", False))

    def __call__(self, stem: str, rank: int, alpha: Optional[Tensor]) -> float:
        if alpha is not None:
            value = float(alpha.float().reshape(-1)[0])
        else:
            value = self.alpha if self.alpha is not None else float(rank)
            module = stem.removeprefix("transformer.").removeprefix("base_model.model.")
            for pattern, a in self.patterns.items():  # PEFT's rule: the pattern matches the end of the name
                if re.match(rf"(.*\.)?({pattern})$", module):
                    value = a
                    break
        return value / (math.sqrt(rank) if self.rslora else rank)


def _matrix(t: Tensor) -> Tensor:
    return t.reshape(t.shape[0], t.shape[1]) if t.ndim > 2 else t


def _join(module: str, n_out: int, factors: list[tuple[Optional[Tensor], Tensor, Tensor, float]]) -> LoraDelta:
    """One LoraDelta from the parts (rows, up, down, scale) of a layer (see the module docstring)."""
    if len(factors) == 1 and factors[0][0] is None:
        _, up, down, scale = factors[0]
        return LoraDelta(module, up, down, scale)
    _, up0, down0, scale0 = factors[0]
    if all(d.shape == down0.shape and torch.equal(d, down0) and s == scale0 for _, _, d, s in factors[1:]):
        up = up0.new_zeros(n_out, down0.shape[0])  # one shared down: the ups stack (exact, in the file's dtype)
        for rows, u, _, _ in factors:
            up[rows] = u
        return LoraDelta(module, up, down0, scale0)
    up = torch.zeros(n_out, sum(d.shape[0] for _, _, d, _ in factors))
    col = 0
    for rows, u, d, s in factors:  # block structure: part i's rows see only its own down_i
        r = d.shape[0]
        up[rows if rows is not None else slice(None), col:col + r] = u.float() * s
        col += r
    return LoraDelta(module, up, torch.cat([d.float() for _, _, d, _ in factors]), 1.0)


def _build(plan: dict[str, list[_Part]], targets: _Targets, tensor: Callable[[str], Tensor],
           scaling: _Scaling) -> dict[str, LoraDelta]:
    deltas = {}
    for module, parts in plan.items():
        factors = []
        for p in parts:
            down, up = _matrix(tensor(p.down)), _matrix(tensor(p.up))
            factors.append((p.rows, up, down, scaling(p.stem, down.shape[0],
                                                      tensor(p.alpha) if p.alpha else None)))
        deltas[module] = _join(module, targets.shapes[module][0], factors)
    return deltas


def load_lora_state_dict(path: PathLike) -> tuple[dict[str, Tensor], dict[str, str]]:
    """(tensors, safetensors metadata) of a LoRA file: safetensors, or a torch file read with weights_only=True."""
    from .weights import _torch_load, _unwrap_state_dict

    path = _existing(path)
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download it again") from None
    return _unwrap_state_dict(_torch_load(path), path), {}


def _existing(path: PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ModelFilesError(f"LoRA file {path} does not exist" + (" (it is a folder: name the file in it)"
                                                                   if path.is_dir() else ""))
    return path


def _file_shapes(path: Path) -> dict[str, tuple[int, ...]]:
    """Key -> shape of a LoRA file; for safetensors from the header alone."""
    if path.suffix.lower() == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
        except SafetensorError as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); download it again") from None
    return {k: tuple(t.shape) for k, t in load_lora_state_dict(path)[0].items()}


def read_lora(source: LoraSource, model: nn.Module, *, name: Optional[str] = None, strict: bool = True) -> LoraFile:
    """Read a LoRA (a file path, or a state dict) for ``model``: every key placed on a layer, shapes checked.

    ``strict=False`` skips keys that fit no layer (with a warning) instead of raising :class:`CheckpointError`.
    """
    if isinstance(source, LoraFile):
        return source
    return _read(source, _Targets.of(model), name, strict)


def _read(source: LoraSource, targets: _Targets, name: Optional[str], strict: bool) -> LoraFile:
    if isinstance(source, Mapping):
        tensors, metadata, name = dict(source), {}, name or "lora"
    else:
        tensors, metadata = load_lora_state_dict(source)
        name = name or Path(source).name
    plan, fmt = _plan({k: tuple(t.shape) for k, t in tensors.items()}, targets, name, strict)
    return LoraFile(name, fmt, _build(plan, targets, tensors.__getitem__, _Scaling(metadata)))


def check_lora_file(path: PathLike, config: TransformerConfig, *, strict: bool = True) -> str:
    """Check that a LoRA file fits a transformer of ``config`` without reading its weights (safetensors: the header
    only; the model is built on the meta device). Returns the file's format; raises like :func:`read_lora`."""
    path = _existing(path)
    _, fmt = _plan(_file_shapes(path), _Targets.for_config(config), path.name, strict)
    return fmt


def check_specs(loras: Sequence[LoraSpec], mode: str, config: TransformerConfig
                ) -> tuple[list[tuple[LoraSource, float]], str]:
    """Normalized (source, scale) pairs and the mode, every file checked to fit ``config`` (headers only)."""
    specs = normalize_specs(loras)
    mode = check_mode(mode)
    files = [src for src, _ in specs if isinstance(src, (str, os.PathLike))]
    if files:
        targets = _Targets.for_config(config)
        for path in files:
            path = _existing(path)
            _plan(_file_shapes(path), targets, path.name, strict=True)
    return specs, mode


def check_mode(mode: str) -> str:
    if mode not in MODES:
        raise InputError(f"LoRA mode must be one of {', '.join(MODES)}, got {mode!r}")
    return mode


def normalize_specs(loras: Sequence[LoraSpec]) -> list[tuple[LoraSource, float]]:
    """[(source, scale), ...] from a list of sources or (source, scale) pairs (scale 1.0 when not given)."""
    if isinstance(loras, (str, os.PathLike, Mapping, LoraFile)):
        raise InputError("loras must be a list of LoRAs, e.g. [('style.safetensors', 0.8)], not a single one")
    specs = []
    for item in loras:
        source, scale = item if isinstance(item, tuple) and len(item) == 2 else (item, 1.0)
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
            raise InputError(f"LoRA scale must be a finite number, got {scale!r} for {_describe(source)}")
        if not isinstance(source, (str, os.PathLike, Mapping, LoraFile)):
            raise InputError(f"a LoRA is a file path, a state dict or a LoraFile, got {type(source).__name__}")
        specs.append((source, float(scale)))
    return specs


def _describe(source: LoraSource) -> str:
    if isinstance(source, LoraFile):
        return source.name
    return "a state dict" if isinstance(source, Mapping) else str(source)


def lora_name(source: LoraSource, index: int = 0) -> str:
    if isinstance(source, LoraFile):
        return source.name
    return f"lora{index}" if isinstance(source, Mapping) else Path(source).name


# ---------------------------------------------------------------------------------------------
# Adapters


class LoraAdapter(nn.Module):
    """One LoRA's factors beside a layer. Buffers, not parameters: they follow ``.to()`` and stay out of the state
    dict, so a model with adapters still saves and streams its own weights only."""

    def __init__(self, up: Tensor, down: Tensor, alpha_scale: float, scale: float):
        super().__init__()
        self.register_buffer("up", up, persistent=False)
        self.register_buffer("down", down, persistent=False)
        self.alpha_scale = alpha_scale  # alpha / r
        self.scale = scale  # the user's
        self.active = True

    def factors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """(down, up) on x's device (moved there for good: a streamed block may run elsewhere) and dtype."""
        if self.up.device != x.device:
            self.up, self.down = self.up.to(x.device), self.down.to(x.device)
        if self.up.dtype != x.dtype:
            return self.down.to(x.dtype), self.up.to(x.dtype)
        return self.down, self.up


class LoraLinear(nn.Module):
    """A linear layer (``nn.Linear`` or a quantized one) with LoRA adapters beside it:
    ``y = base(x) + sum_i scale_i * (alpha_i / r_i) * up_i @ (down_i @ x)``.

    The base layer is left as it is, so with every adapter off the output is the base's, bit for bit. ``weight``,
    ``bias`` and ``forward_rows`` are the base's (plus the adapters), so code that reads them keeps working.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.adapters = nn.ModuleDict()

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Optional[Tensor]:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        return self._add_adapters(self.base(x), x, 0, None)

    def forward_rows(self, x: Tensor, start: int, stop: Optional[int] = None) -> Tensor:
        """Output features [start, stop) only (see ``transformer.linear_rows``)."""
        return self._add_adapters(linear_rows(self.base, x, start, stop), x, start, stop)

    def _add_adapters(self, y: Tensor, x: Tensor, start: int, stop: Optional[int]) -> Tensor:
        for adapter in self.adapters.values():
            coefficient = adapter.scale * adapter.alpha_scale
            if not adapter.active or coefficient == 0:
                continue
            down, up = adapter.factors(x)
            update = F.linear(F.linear(x, down), up[start:stop])
            if torch.is_grad_enabled():
                y = torch.add(y, update, alpha=coefficient)  # as in place below: no scaled copy of the update
            else:
                y.add_(update, alpha=coefficient)  # y is this call's own fresh output
        return y

    def extra_repr(self) -> str:
        return f"adapters={list(self.adapters)}"


def _base_layer(layer: nn.Module) -> nn.Module:
    return layer.base if isinstance(layer, LoraLinear) else layer


def _first_device(module: nn.Module) -> Optional[torch.device]:
    for t in itertools.chain(module.parameters(), module.buffers()):
        if not t.is_meta:
            return t.device
    return None


def _compute_dtype(layer: nn.Module) -> torch.dtype:
    """The dtype a layer computes in: its float weight's, else (quantized) its bias's, else fp32."""
    if layer.weight.is_floating_point() and not isinstance(layer, QuantizedLinear):
        return layer.weight.dtype
    return layer.bias.dtype if layer.bias is not None else torch.float32


# ---------------------------------------------------------------------------------------------
# Applying


_KEYS = itertools.count()  # adapter names, unique in a process so several apply_loras calls can stack


class AppliedLoras:
    """LoRAs applied to a model by :func:`apply_loras`: change their scales, turn them off and on, remove them.

    Merged LoRAs change the weights; with ``keep_originals`` (the default) the touched weights are first copied to
    the host, which makes :meth:`remove`, :meth:`set_scales` and :meth:`set_enabled` exact. Adapters change
    nothing of the base layers, so all three are exact and immediate.
    """

    def __init__(self, model: nn.Module, files: list[LoraFile], scales: list[float], mode: str,
                 keep_originals: bool, device, dtype):
        self.model, self.files, self.mode = model, files, mode
        self._scales = list(scales)
        self._enabled = True
        self._removed = False
        self._originals: Optional[dict[str, dict[str, Tensor]]] = {} if keep_originals else None
        self._adapters: list[tuple[str, str, int]] = []  # (module, adapter key, file index)
        for f in files:
            for module, d in f.deltas.items():
                _check_layer(model, module, d, f.name)
        if mode == "merge":
            self._merge()
        else:
            self._attach(device, dtype)
        logger.info("applied %d LoRA(s) (%s): %s", len(files), mode,
                    ", ".join(f"{f.name} x{s:g}" for f, s in zip(files, scales)))

    # -- state -----------------------------------------------------------------------------------

    @property
    def names(self) -> list[str]:
        return [f.name for f in self.files]

    @property
    def scales(self) -> list[float]:
        return list(self._scales)

    @property
    def enabled(self) -> bool:
        return self._enabled

    @property
    def exact(self) -> bool:
        """Whether scales can change and the LoRAs can be removed exactly (adapters, or merged with originals)."""
        return self.mode == "adapter" or self._originals is not None

    def set_scales(self, scales: Sequence[float]) -> None:
        """New user scales, one per LoRA in the order given to apply_loras."""
        self._check_live()
        scales = [float(s) for s in scales]
        if len(scales) != len(self.files):
            raise InputError(f"{len(scales)} scale(s) for {len(self.files)} LoRA(s): give one per LoRA")
        if self.mode == "merge":
            self._need_originals("change the scales of")
            self._scales = scales
            if self._enabled:
                self._merge()
            return
        self._scales = scales
        for module, key, i in self._adapters:
            self.model.get_submodule(module).adapters[key].scale = scales[i]

    def set_enabled(self, enabled: bool) -> None:
        """Turn the LoRAs off (the base model's output, exactly) or back on."""
        self._check_live()
        if enabled == self._enabled:
            return
        if self.mode == "merge":
            self._need_originals("disable")
            self._enabled = enabled
            self._merge()
            return
        self._enabled = enabled
        for module, key, _ in self._adapters:
            self.model.get_submodule(module).adapters[key].active = enabled

    def remove(self) -> None:
        """Take the LoRAs out: merged ones are unmerged (the original weights restored), adapters detached."""
        self._check_live()
        if self.mode == "merge":
            self._need_originals("remove")
            self._enabled = False
            self._merge()
            self._originals = {}
        else:
            for module, key, _ in self._adapters:
                wrapper = self.model.get_submodule(module)
                del wrapper.adapters[key]
                if not len(wrapper.adapters):
                    _replace_module(self.model, module, wrapper.base)
            self._adapters.clear()
        self._removed = True

    def _check_live(self) -> None:
        if self._removed:
            raise InputError("these LoRAs were removed; apply them again with apply_loras()")

    def _need_originals(self, what: str) -> None:
        if self._originals is None:
            raise InputError(f"cannot {what} merged LoRAs: they were merged with keep_originals=False, so the "
                             "original weights are gone; reload the model (or merge with keep_originals=True, or "
                             "use mode='adapter')")

    # -- merge -----------------------------------------------------------------------------------

    def _merge(self) -> None:
        """Write every touched weight as original + sum_i scale_i * delta_i (just the original when disabled)."""
        modules = list(dict.fromkeys(m for f in self.files for m in f.deltas))
        layers = [_base_layer(self.model.get_submodule(m)) for m in modules]
        for module, layer in zip(modules, layers):  # all checked before any weight changes
            if layer.weight.is_meta:
                raise InputError(f"cannot merge a LoRA into {module}: its weights are not in memory (a streamed "
                                 "block); apply the LoRAs with mode='adapter'")
        for module, layer in zip(modules, layers):
            total = None
            if self._enabled:
                for f, s in zip(self.files, self._scales):
                    d = f.deltas.get(module)
                    if d is not None and s != 0:
                        part = d.delta(layer.weight.device, s)
                        total = part if total is None else total.add_(part)
            originals = self._originals
            if originals is not None and module not in originals:
                originals[module] = {k: t.detach().to("cpu", copy=True) for k, t in _stored(layer).items()}
            base = originals[module] if originals is not None else _stored(layer)
            _write(layer, base, total)

    # -- adapters --------------------------------------------------------------------------------

    def _attach(self, device, dtype) -> None:
        model_device = _first_device(self.model) or torch.device("cpu")
        for i, (f, s) in enumerate(zip(self.files, self._scales)):
            key = f"lora{next(_KEYS)}"
            for module, d in f.deltas.items():
                layer = self.model.get_submodule(module)
                if not isinstance(layer, LoraLinear):
                    layer = LoraLinear(layer)
                    _replace_module(self.model, module, layer)
                dev = torch.device(device) if device is not None else (_first_device(layer.base) or model_device)
                dt = dtype or _compute_dtype(layer.base)
                layer.adapters[key] = LoraAdapter(d.up.to(dev, dt), d.down.to(dev, dt), d.scale, s)
                self._adapters.append((module, key, i))


def _stored(layer: nn.Module) -> dict[str, Tensor]:
    """The tensors a merge rewrites: the weight (and a quantized layer's scales)."""
    if isinstance(layer, QuantizedLinear):
        return {"weight": layer.weight, "weight_scale": layer.weight_scale}
    return {"weight": layer.weight}


@torch.no_grad()
def _write(layer: nn.Module, base: Mapping[str, Tensor], total: Optional[Tensor]) -> None:
    """layer's weight := base + total, computed in fp32 and rounded once to the layer's storage."""
    weight = layer.weight
    if isinstance(layer, QuantizedLinear):
        codes, scales = base["weight"].to(weight.device), base["weight_scale"].to(weight.device)
        if total is not None:  # requantized per row from the merged weight
            codes, scales = quantize_weight(dequantize_weight(codes, scales, torch.float32).add_(total),
                                            layer.weights_dtype)
        layer.weight, layer.weight_scale = codes, scales
        return
    original = base["weight"]
    if total is None:
        if original is not weight:
            weight.copy_(original)
        return
    weight.copy_(original.to(weight.device, torch.float32).add(total).to(weight.dtype))


def _check_layer(model: nn.Module, module: str, d: LoraDelta, name: str) -> None:
    try:
        layer = model.get_submodule(module)
    except AttributeError:
        raise CheckpointError(f"{name}: updates {module}, which this {type(model).__name__} does not have; "
                              "read the LoRA for this model (read_lora)") from None
    if not isinstance(layer, (nn.Linear, QuantizedLinear, LoraLinear)):
        raise CheckpointError(f"{name}: {module} is a {type(layer).__name__}, not a linear layer; LoRAs update "
                              "linear layers only")
    if d.up.shape[0] != layer.out_features or d.down.shape[1] != layer.in_features:
        raise CheckpointError(f"{name}: the update of {module} is [{d.up.shape[0]}, {d.down.shape[1]}] (lora_up "
                              f"{list(d.up.shape)}, lora_down {list(d.down.shape)}) but the layer's weight is "
                              f"[{layer.out_features}, {layer.in_features}]; is this LoRA for another model size?")


def apply_loras(
    model: nn.Module,
    loras: Sequence[LoraSpec],
    mode: str = "merge",
    *,
    strict: bool = True,
    keep_originals: bool = True,
    device=None,
    dtype: Optional[torch.dtype] = None,
) -> AppliedLoras:
    """Apply several LoRAs to a transformer, each with its own scale: ``[(path or state dict, scale), ...]``
    (a bare source means scale 1.0). Returns the :class:`AppliedLoras` that changes or removes them.

    mode "merge": ``W += sum_i scale_i * (alpha_i / r_i) * up_i @ down_i``, summed in fp32 and rounded once to the
    weight's dtype (a quantized layer is requantized from its dequantized weight plus the update); no cost per step.
    ``keep_originals`` copies the touched weights to the host first, so removing the LoRAs is exact.
    mode "adapter": wraps each updated layer in a :class:`LoraLinear`; the factors live on ``device`` (default:
    where the layer's weights are, else the model's) in ``dtype`` (default: the layer's compute dtype). Works with
    quantized layers and with streamed blocks (apply after streaming starts: the streamer keeps placing the base
    weights, the adapters stay resident). strict: see :func:`read_lora`.
    """
    check_mode(mode)
    specs = normalize_specs(loras)
    targets = _Targets.of(model) if any(not isinstance(s, LoraFile) for s, _ in specs) else None
    files = [src if isinstance(src, LoraFile) else _read(src, targets, lora_name(src, i), strict)
             for i, (src, _) in enumerate(specs)]
    return AppliedLoras(model, files, [s for _, s in specs], mode, keep_originals, device, dtype)
