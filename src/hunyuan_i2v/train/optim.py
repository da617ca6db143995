"""Optimisers for the trainers: ``torch.optim.AdamW`` and :class:`AdamW8bit`, an AdamW whose two moments are
stored as 8-bit codes (pure PyTorch, CPU and CUDA; no bitsandbytes).

AdamW keeps two fp32 moments per parameter: 8 bytes. :class:`AdamW8bit` keeps, per parameter tensor, split into
blocks of ``block_size`` (256) elements:

* the first moment m as int8 codes with one fp32 absmax per block (signed);
* the second moment v as uint8 codes of sqrt(v) with one fp32 max per block (unsigned). Quantizing sqrt(v), the
  quantity the update divides by, halves the dynamic range the code must span;

that is 2 bytes + 8 / 256 bytes per parameter, about a quarter of AdamW's. The code map is a power law (cube root):
a block-normalised value u in [-1, 1] gets the code round(Q sign(u) |u|^(1/3)), Q = 127 for m and 255 for
sqrt(v), and decodes as sign(k) (|k| / Q)^3. Small values keep precision (the smallest non-zero level is
(1/Q)^3 of the block's maximum, 5e-7 for m, 6e-8 for sqrt(v); a linear code would stop at 1/Q), and the step
between levels is 3/|k| of the value (2.4% at the top of m's range). Rounding is to the nearest code: deterministic,
so a resumed run repeats the same steps. The block scales are exact fp32, so a decay shared by a whole block (the
moments' usual motion) is held exactly, whatever the codes.

Each step decodes a tensor's moments to fp32, applies the AdamW update (decoupled weight decay, bias correction,
as ``torch.optim.AdamW``), takes the step with the fp32 moments, and encodes them again. Parameters and gradients
keep their dtype (the update is computed in fp32 and written back). ``state_dict`` / ``load_state_dict`` restore
the codes and scales bit for bit (``torch.optim.Optimizer.load_state_dict`` would cast them to the parameter's
dtype).
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Optional

import torch
from torch import Tensor

from ..errors import InputError

OPTIMIZERS = ("adamw", "adamw8bit")
BLOCK_SIZE = 256
POWER = 3.0  # the code map's exponent: value = (code / Q) ** POWER
FP32_STATE_BYTES = 8  # AdamW: exp_avg + exp_avg_sq in fp32


def _blocks(x: Tensor, block: int) -> Tensor:
    """``x`` flattened as fp32, zero-padded to whole blocks: [n_blocks, block]."""
    flat = x.reshape(-1).float()
    pad = -flat.numel() % block
    if pad:
        flat = torch.cat([flat, flat.new_zeros(pad)])
    return flat.view(-1, block)


def quantize_signed(x: Tensor, block: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """(int8 codes [numel], fp32 absmax [n_blocks]) of ``x`` with the cube-root code map (module docstring)."""
    b = _blocks(x, block)
    absmax = b.abs().amax(dim=1)
    u = b / torch.where(absmax > 0, absmax, torch.ones_like(absmax))[:, None]
    codes = torch.round(127.0 * u.sign() * u.abs().pow(1.0 / POWER)).to(torch.int8)
    return codes.view(-1)[: x.numel()].clone(), absmax


def dequantize_signed(codes: Tensor, absmax: Tensor, block: int = BLOCK_SIZE) -> Tensor:
    """fp32 [numel] values of :func:`quantize_signed`'s codes."""
    k = _blocks(codes, block)
    return (k.sign() * (k.abs() / 127.0).pow(POWER) * absmax[:, None]).view(-1)[: codes.numel()]


def quantize_unsigned(x: Tensor, block: int = BLOCK_SIZE) -> tuple[Tensor, Tensor]:
    """(uint8 codes [numel], fp32 max [n_blocks]) of a non-negative ``x`` with the cube-root code map."""
    b = _blocks(x, block)
    high = b.amax(dim=1)
    u = b / torch.where(high > 0, high, torch.ones_like(high))[:, None]
    codes = torch.round(255.0 * u.clamp(0.0, 1.0).pow(1.0 / POWER)).to(torch.uint8)
    return codes.view(-1)[: x.numel()].clone(), high


def dequantize_unsigned(codes: Tensor, high: Tensor, block: int = BLOCK_SIZE) -> Tensor:
    """fp32 [numel] values of :func:`quantize_unsigned`'s codes."""
    k = _blocks(codes, block)
    return ((k / 255.0).pow(POWER) * high[:, None]).view(-1)[: codes.numel()]


def adamw8bit_state_bytes(numel: int, block: int = BLOCK_SIZE) -> int:
    """Bytes of :class:`AdamW8bit`'s state for one tensor of ``numel`` elements: two 1-byte codes per element and
    two fp32 scales per block (the step count is a Python int)."""
    return 2 * numel + 2 * 4 * math.ceil(numel / block)


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of the tensors an optimiser holds in its state (moments, codes, scales, step tensors)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for v in state.values()
               if isinstance(v, Tensor))


class AdamW8bit(torch.optim.Optimizer):
    """AdamW with 8-bit block-quantized moments (see the module docstring); the arguments of
    ``torch.optim.AdamW`` plus ``block_size``."""

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, block_size: int = BLOCK_SIZE):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0.0 <= b < 1.0 for b in betas):
            raise InputError(f"AdamW8bit needs lr, eps, weight_decay >= 0 and betas in [0, 1), got lr {lr}, "
                             f"betas {betas}, eps {eps}, weight_decay {weight_decay}")
        if block_size < 1:
            raise InputError(f"block_size must be at least 1, got {block_size}")
        super().__init__(params, dict(lr=lr, betas=tuple(betas), eps=eps, weight_decay=weight_decay,
                                      block_size=block_size))

    @torch.no_grad()
    def step(self, closure: Optional[Callable[[], float]] = None) -> Optional[float]:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr, (beta1, beta2), eps = group["lr"], group["betas"], group["eps"]
            wd, block = group["weight_decay"], group["block_size"]
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise InputError("AdamW8bit does not take sparse gradients")
                state = self.state[p]
                if not state:
                    n, blocks = p.numel(), math.ceil(p.numel() / block)
                    state["step"] = 0
                    state["exp_avg_codes"] = torch.zeros(n, dtype=torch.int8, device=p.device)
                    state["exp_avg_absmax"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                    state["exp_avg_sq_sqrt_codes"] = torch.zeros(n, dtype=torch.uint8, device=p.device)
                    state["exp_avg_sq_sqrt_max"] = torch.zeros(blocks, dtype=torch.float32, device=p.device)
                state["step"] += 1
                t = state["step"]
                g = p.grad.reshape(-1).float()
                m = dequantize_signed(state["exp_avg_codes"], state["exp_avg_absmax"], block)
                v = dequantize_unsigned(state["exp_avg_sq_sqrt_codes"], state["exp_avg_sq_sqrt_max"], block).square()
                m.mul_(beta1).add_(g, alpha=1.0 - beta1)
                v.mul_(beta2).addcmul_(g, g, value=1.0 - beta2)
                root = v.sqrt()
                denom = (root / math.sqrt(1.0 - beta2**t)).add_(eps)
                w = p.reshape(-1).float()
                if wd:
                    w.mul_(1.0 - lr * wd)  # decoupled weight decay, before the moment step as torch's AdamW
                w.addcdiv_(m, denom, value=-lr / (1.0 - beta1**t))
                p.copy_(w.view_as(p))
                state["exp_avg_codes"], state["exp_avg_absmax"] = quantize_signed(m, block)
                state["exp_avg_sq_sqrt_codes"], state["exp_avg_sq_sqrt_max"] = quantize_unsigned(root, block)
        return loss

    def load_state_dict(self, state_dict: dict) -> None:
        """As ``Optimizer.load_state_dict``, but the codes and scales keep their saved dtypes (exact resume)."""
        super().load_state_dict(state_dict)
        params = [p for group in self.param_groups for p in group["params"]]
        saved_ids = [i for group in state_dict["param_groups"] for i in group["params"]]
        for p, i in zip(params, saved_ids):
            if i in state_dict["state"]:
                self.state[p] = {k: (v.to(p.device, copy=True) if isinstance(v, Tensor) else v)
                                 for k, v in state_dict["state"][i].items()}


def make_optimizer(name: str, params: Iterable, lr: float, betas: tuple[float, float], eps: float,
                   weight_decay: float) -> torch.optim.Optimizer:
    """``adamw`` (torch.optim.AdamW) or ``adamw8bit`` (:class:`AdamW8bit`) with the given settings."""
    if name == "adamw":
        return torch.optim.AdamW(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    if name == "adamw8bit":
        return AdamW8bit(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
    raise InputError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {name!r}")


__all__ = ["AdamW8bit", "BLOCK_SIZE", "OPTIMIZERS", "adamw8bit_state_bytes", "dequantize_signed",
           "dequantize_unsigned", "make_optimizer", "optimizer_state_bytes", "quantize_signed",
           "quantize_unsigned"]
