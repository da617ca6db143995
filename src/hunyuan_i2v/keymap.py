"""The one place where official <-> diffusers transformer key names live (diffusers-peer.md section 6).

Our modules use the official names, so an official state dict loads as is. Diffusers splits the fused
projections (qkv, single-block linear1) and stores the final adaLN halves as (scale, shift) instead of the
official (shift, scale). The VAE keys are identical in both namings.
"""

from __future__ import annotations

import re
from typing import Mapping, Union

import torch
from torch import Tensor

Target = Union[str, tuple[str, ...]]

# Block-local module renames: official -> diffusers (a tuple means the official tensor is split along dim 0).
_DOUBLE: dict[str, Target] = {
    "img_mod.linear": "norm1.linear",
    "txt_mod.linear": "norm1_context.linear",
    "img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
    "img_attn_q_norm": "attn.norm_q",
    "img_attn_k_norm": "attn.norm_k",
    "txt_attn_q_norm": "attn.norm_added_q",
    "txt_attn_k_norm": "attn.norm_added_k",
    "img_attn_proj": "attn.to_out.0",
    "txt_attn_proj": "attn.to_add_out",
    "img_mlp.fc1": "ff.net.0.proj",
    "img_mlp.fc2": "ff.net.2",
    "txt_mlp.fc1": "ff_context.net.0.proj",
    "txt_mlp.fc2": "ff_context.net.2",
}
_SINGLE: dict[str, Target] = {
    "linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"),
    "linear2": "proj_out",
    "q_norm": "attn.norm_q",
    "k_norm": "attn.norm_k",
    "modulation.linear": "norm.linear",
}
_REFINER: dict[str, Target] = {
    "norm1": "norm1",
    "norm2": "norm2",
    "self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
    "self_attn_proj": "attn.to_out.0",
    "mlp.fc1": "ff.net.0.proj",
    "mlp.fc2": "ff.net.2",
    "adaLN_modulation.1": "norm_out.linear",
}
_TOP: dict[str, Target] = {
    "img_in.proj": "x_embedder.proj",
    "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1",
    "time_in.mlp.2": "time_text_embed.timestep_embedder.linear_2",
    "guidance_in.mlp.0": "time_text_embed.guidance_embedder.linear_1",
    "guidance_in.mlp.2": "time_text_embed.guidance_embedder.linear_2",
    "vector_in.in_layer": "time_text_embed.text_embedder.linear_1",
    "vector_in.out_layer": "time_text_embed.text_embedder.linear_2",
    "txt_in.input_embedder": "context_embedder.proj_in",
    "txt_in.t_embedder.mlp.0": "context_embedder.time_text_embed.timestep_embedder.linear_1",
    "txt_in.t_embedder.mlp.2": "context_embedder.time_text_embed.timestep_embedder.linear_2",
    "txt_in.c_embedder.linear_1": "context_embedder.time_text_embed.text_embedder.linear_1",
    "txt_in.c_embedder.linear_2": "context_embedder.time_text_embed.text_embedder.linear_2",
    "final_layer.linear": "proj_out",
    "final_layer.adaLN_modulation.1": "norm_out.linear",
}
_SWAPPED = {"final_layer.adaLN_modulation.1"}  # (shift, scale) official vs (scale, shift) diffusers

# (official scope regex, diffusers scope format, local table)
_SCOPES = [
    (r"double_blocks\.(\d+)\.", "transformer_blocks.{}.", _DOUBLE),
    (r"single_blocks\.(\d+)\.", "single_transformer_blocks.{}.", _SINGLE),
    (r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.", "context_embedder.token_refiner.refiner_blocks.{}.", _REFINER),
]
_DIFFUSERS_SCOPES = [
    (r"transformer_blocks\.(\d+)\.", "double_blocks.{}.", _DOUBLE),
    (r"single_transformer_blocks\.(\d+)\.", "single_blocks.{}.", _SINGLE),
    (r"context_embedder\.token_refiner\.refiner_blocks\.(\d+)\.", "txt_in.individual_token_refiner.blocks.{}.", _REFINER),
]

# Recognise each naming by a key only it has.
OFFICIAL_MARKER = "txt_in.individual_token_refiner.blocks.0.adaLN_modulation.1.bias"
DIFFUSERS_MARKER = "context_embedder.token_refiner.refiner_blocks.0.norm_out.linear.bias"


def _split_module_param(local: str) -> tuple[str, str]:
    module, _, param = local.rpartition(".")
    return module, param


def _split_sizes(official_module: str, tensor: Tensor, hidden: int, n_parts: int) -> list[int]:
    if official_module == "linear1":  # [q | k | v | mlp]
        return [hidden, hidden, hidden, tensor.shape[0] - 3 * hidden]
    return [tensor.shape[0] // n_parts] * n_parts


def _swap_halves(t: Tensor) -> Tensor:
    a, b = t.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def official_to_diffusers(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename (and split) an official HunyuanVideo transformer state dict into diffusers naming."""
    hidden = sd["img_in.proj.weight"].shape[0]
    out: dict[str, Tensor] = {}
    for key, tensor in sd.items():
        prefix, table, local = "", _TOP, key
        for pattern, fmt, tbl in _SCOPES:
            m = re.match(pattern, key)
            if m:
                prefix, table, local = fmt.format(m.group(1)), tbl, key[m.end():]
                break
        module, param = _split_module_param(local)
        if module not in table:
            raise KeyError(f"no diffusers name for official key {key!r}")
        target = table[module]
        if isinstance(target, tuple):
            sizes = _split_sizes(module, tensor, hidden, len(target))
            for name, part in zip(target, torch.split(tensor, sizes, dim=0)):
                out[f"{prefix}{name}.{param}"] = part
        else:
            out[f"{prefix}{target}.{param}"] = _swap_halves(tensor) if module in _SWAPPED else tensor
    return out


def diffusers_to_official(sd: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The inverse of :func:`official_to_diffusers`: rename and re-fuse a diffusers state dict."""
    inverse_top = {v: k for k, v in _TOP.items()}
    out: dict[str, Tensor] = {}
    pending: dict[str, dict[str, Tensor]] = {}  # official key -> {diffusers part name: tensor}
    fused_parts: dict[str, tuple[str, ...]] = {}
    for key, tensor in sd.items():
        prefix, table, local = "", None, key
        for pattern, fmt, tbl in _DIFFUSERS_SCOPES:
            m = re.match(pattern, key)
            if m:
                prefix, table, local = fmt.format(m.group(1)), tbl, key[m.end():]
                break
        module, param = _split_module_param(local)
        if table is None:
            if module not in inverse_top:
                raise KeyError(f"no official name for diffusers key {key!r}")
            name = inverse_top[module]
            out[f"{name}.{param}"] = _swap_halves(tensor) if name in _SWAPPED else tensor
            continue
        for official, target in table.items():
            if target == module:
                out[f"{prefix}{official}.{param}"] = tensor
                break
            if isinstance(target, tuple) and module in target:
                okey = f"{prefix}{official}.{param}"
                pending.setdefault(okey, {})[module] = tensor
                fused_parts[okey] = target
                break
        else:
            raise KeyError(f"no official name for diffusers key {key!r}")
    for okey, parts in pending.items():
        names = fused_parts[okey]
        missing = [n for n in names if n not in parts]
        if missing:
            raise KeyError(f"cannot rebuild {okey!r}: diffusers parts {missing} are missing")
        out[okey] = torch.cat([parts[n] for n in names], dim=0)
    return out


def detect_naming(keys) -> str:
    """'official' or 'diffusers' for a transformer state dict's keys (raises ValueError otherwise)."""
    keys = set(keys)
    if OFFICIAL_MARKER in keys or any(k.startswith(("double_blocks.", "single_blocks.", "img_in.")) for k in keys):
        return "official"
    if DIFFUSERS_MARKER in keys or any(k.startswith(("transformer_blocks.", "x_embedder.")) for k in keys):
        return "diffusers"
    raise ValueError("not a HunyuanVideo transformer state dict (neither official nor diffusers key names)")
