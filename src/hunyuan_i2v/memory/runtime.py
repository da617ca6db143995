"""The memory options of a pipeline and what applies them: loading the transformer the way they ask (quantized,
streamed, resident), the attention backend, torch.compile, model-level offload, and the answer to an
out-of-memory error. ``pipeline.py`` holds the order of the stages; this module holds where the weights are.
"""

from __future__ import annotations

import gc
import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
from torch import nn

from ..config import TransformerConfig
from ..errors import InputError
from .planner import (
    FLOAT_WEIGHTS,
    GB,
    MARGIN,
    QUANTIZED_WEIGHTS,
    Fixed,
    MemoryPlan,
    Target,
    format_size,
)

logger = logging.getLogger(__name__)

STREAMABLE_KINDS = ("safetensors", "safetensors-sharded", "diffusers-folder")


@dataclass(frozen=True)
class MemoryOptions:
    """The memory and speed settings of a pipeline (the CLI's --offload, --weights-dtype, --attention, --compile
    and --memory-budget). The defaults reproduce the plain pipeline exactly."""

    offload: Optional[str] = None  # none | model (one component on the device at a time) | blocks (stream the
    # blocks); None: none, unless the planner chooses otherwise for a budget
    weights_dtype: str = "auto"  # storage of the transformer block weights; auto = the compute dtype
    attention: Optional[str] = None  # None: SDPA, as always; "auto" picks the fastest installed backend
    compile: Union[bool, str] = False  # torch.compile the blocks; a string names the torch.compile backend
    memory_budget: Optional[float] = None  # device GB: the planner chooses what the other options leave open

    def check(self, device: torch.device, dtype: torch.dtype) -> None:
        """Every user error, before anything is loaded."""
        from ..model.layers import _parse_backend, available_attention_backends

        self.fixed().check(Target(device.type, dtype))
        if self.attention not in (None, "auto"):
            try:
                name, _ = _parse_backend(self.attention)
            except ValueError as exc:
                raise InputError(str(exc)) from None
            reason = available_attention_backends(device, dtype)[name]
            if reason is not None:
                raise InputError(f"attention backend {name!r} cannot run here: {reason}")
        if self.compile and not torch._dynamo.is_dynamo_supported():
            raise InputError("torch.compile is not supported by this Python/PyTorch build; drop --compile")
        if self.memory_budget is not None and not self.memory_budget > 0:
            raise InputError(f"the memory budget must be a positive number of GB, got {self.memory_budget}")

    def fixed(self) -> Fixed:
        """The choices the planner must keep: those given."""
        return Fixed(self.offload, self.weights_dtype if self.weights_dtype != "auto" else None, self.attention)


def compute_dtype(weights_dtype: str, dtype: Optional[torch.dtype]) -> Optional[torch.dtype]:
    """The transformer dtype a float --weights-dtype implies (None: leave the default)."""
    return FLOAT_WEIGHTS.get(weights_dtype) if dtype is None else dtype


def explicit_plan(options: MemoryOptions, native: str) -> MemoryPlan:
    """The plan of the explicit options alone (no predictions): what runs without a budget."""
    storage = native if options.weights_dtype == "auto" else options.weights_dtype
    return MemoryPlan(options.offload or "none", storage, options.attention)


# ---------------------------------------------------------------------------------------------
# The transformer


def load_planned_transformer(path: Path, config: Optional[TransformerConfig], device: torch.device,
                             dtype: torch.dtype, plan: MemoryPlan):
    """Load a transformer checkpoint as ``plan`` holds it; returns (model, BlockStreamer or None).

    Resident full-precision weights load straight onto the device (as the plain pipeline does); quantized ones are
    quantized on the host first; streamed blocks are read from the file through memory maps when it is
    safetensors in full precision, else from a host copy.
    """
    from ..weights import detect_checkpoint, load_transformer
    from .offload import load_streamed_transformer

    quantized = plan.weights_dtype in QUANTIZED_WEIGHTS
    if plan.offload == "blocks" and not quantized and detect_checkpoint(path).kind in STREAMABLE_KINDS:
        streamer = load_streamed_transformer(path, device, dtype, config=config)
        return streamer.model, streamer
    on_host = plan.offload != "none" or quantized
    model = load_transformer(path, dtype=dtype, device="cpu" if on_host else device, config=config)
    return place_transformer(model, device, plan)


def place_transformer(model: nn.Module, device: torch.device, plan: MemoryPlan):
    """Quantize (when the plan stores int8/fp8 and the model is not yet) and stream or place a loaded transformer;
    returns (model, BlockStreamer or None)."""
    from .offload import move_module, stream_transformer
    from .quant import quantize_model, quantized_layers

    if plan.weights_dtype in QUANTIZED_WEIGHTS and not quantized_layers(model):
        quantize_model(model, plan.weights_dtype)
    if plan.offload == "blocks":
        return model, stream_transformer(model, None, device)
    if plan.offload == "none" and plan.weights_dtype in QUANTIZED_WEIGHTS:
        move_module(model, device)
    return model, None


def set_attention(model: nn.Module, attention: Optional[str]) -> None:
    """Resolve and set the blocks' attention backend (one log line says which and why)."""
    try:
        model.set_attention_backend(attention)
    except ValueError as exc:  # checked in MemoryOptions.check; a given model can still sit on another device
        raise InputError(str(exc)) from None


def compile_blocks(model: nn.Module, compile: Union[bool, str]) -> None:
    """torch.compile each block's forward. The hooks of block streaming stay outside the compiled code."""
    backend = compile if isinstance(compile, str) else "inductor"
    for block in [*model.double_blocks, *model.single_blocks]:
        block.forward = torch.compile(block.forward, backend=backend, dynamic=False)
    logger.info("compiling the transformer blocks with torch.compile (backend %s) on their first call", backend)


# ---------------------------------------------------------------------------------------------
# Out of memory


def available_bytes(device: torch.device) -> Optional[int]:
    """What this process could use on ``device`` now: the free memory plus what PyTorch holds (CUDA only)."""
    gc.collect()
    if device.type != "cuda":
        return None
    torch.cuda.empty_cache()
    free, _ = torch.cuda.mem_get_info(device)
    return free + torch.cuda.memory_reserved(device)


def out_of_memory_message(device: torch.device, stage: str, failed: MemoryPlan, better: Optional[MemoryPlan],
                          available: Optional[int]) -> str:
    """One line: what ran out, the plan that did, and the plan predicted to fit (or that none is leaner)."""
    head = (f"out of memory on {device} while {stage} with {failed.describe()} (predicted peak "
            f"{format_size(failed.peak)}" + (f", {format_size(available)} usable" if available else "") + ")")
    if better is None:
        return head + "; no plan needs less: lower the resolution or the number of frames"
    # a budget the planner fills with a plan leaner than the failed one, and within what is there
    limit = min(available or float("inf"), failed.peak / (1 - MARGIN))
    budget = max(math.floor(limit / GB * 10) / 10, better.budget_needed())
    return (f"{head}; this would fit ({format_size(better.peak)} predicted): {better.describe()}; run with "
            f"--memory-budget {budget:g}, or {better.flags()}")
