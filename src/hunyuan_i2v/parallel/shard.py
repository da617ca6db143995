"""Block weights sharded across processes (FSDP-style, for inference).

Each double/single block's tensors are laid end to end per dtype in one flat vector, padded to a multiple of the
world size; process r keeps slice r of it (a non-persistent buffer of the block, so moving the model moves it).
Just before a block runs, one all-gather rebuilds its flat vector and the block's parameters become views of it;
after the block ran they are meta placeholders again and the vector is freed. While block i runs, block i + 1's
gather is already in flight. The gathered values are the original bits, so the output equals that of replicated
weights exactly. The embedders, the token refiner and the final layer (~3% of the 13B weights) stay replicated.

A sharded model is not moved with ``.to()`` (its placeholders are meta; use ``memory.offload.move_module``) and
is not saved; every process must run the same blocks in the same order (the gathers are collective).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

logger = logging.getLogger(__name__)

BLOCK_LISTS = ("double_blocks", "single_blocks")
SHARD_BUFFER = "weight_shard_"  # + dtype group index: the buffers holding this process's slices


@dataclass
class _Tensor:
    """One tensor of a block in the flat layout."""

    module: nn.Module
    attr: str
    is_param: bool
    requires_grad: bool  # kept as the model had it: matmul takes another code path (other rounding) without it
    placeholder: Tensor  # meta, the block's dtype and shape
    group: int  # index of its dtype group
    offset: int  # first element in the group's flat vector


@dataclass
class _Layout:
    """A block's flat layout: its tensors and, per dtype group, the flat length and the slice length."""

    tensors: dict[str, _Tensor]
    dtypes: list[torch.dtype]
    lengths: list[int]
    shard: list[int]  # elements per process = ceil(length / world)


def _block_layout(block: nn.Module, world: int) -> _Layout:
    tensors: dict[str, _Tensor] = {}
    dtypes: list[torch.dtype] = []
    lengths: list[int] = []
    for name, t in block.state_dict(keep_vars=True).items():
        path, _, attr = name.rpartition(".")
        module = block.get_submodule(path) if path else block
        if t.dtype not in dtypes:
            dtypes.append(t.dtype)
            lengths.append(0)
        g = dtypes.index(t.dtype)
        is_param = attr in module._parameters
        tensors[name] = _Tensor(module, attr, is_param, is_param and t.requires_grad,
                                torch.empty(t.shape, dtype=t.dtype, device="meta"), g, lengths[g])
        lengths[g] += t.numel()
    return _Layout(tensors, dtypes, lengths, [-(-n // world) for n in lengths])


def _set(entry: _Tensor, t: Tensor) -> None:
    if entry.is_param:
        entry.module._parameters[entry.attr] = nn.Parameter(t, requires_grad=entry.requires_grad)
    else:
        entry.module._buffers[entry.attr] = t


def _gather_fn():
    return getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # renamed in torch 2.10+


class ShardedBlocks:
    """Shards the double/single block weights of a transformer over ``group`` (None: every process).

    Built from a model whose blocks hold their weights (each process keeps its slices, on ``device``, default
    where the blocks are), or with ``shards`` already read (see :func:`load_sharded_transformer`).
    :meth:`remove` ends it (the blocks get their full weights back).
    """

    def __init__(self, model: nn.Module, group=None, device: Optional[torch.device] = None, *,
                 shards: Optional[list[list[Tensor]]] = None, prefetch: bool = True):
        self.model, self.group, self.prefetch = model, group, prefetch
        self.world = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.blocks: list[nn.Module] = [b for name in BLOCK_LISTS for b in getattr(model, name)]
        self.layouts = [_block_layout(b, self.world) for b in self.blocks]
        self._pending: dict[int, tuple[list[Tensor], list]] = {}
        self._hooks: list = []
        self.gathers = 0  # blocks gathered so far (for tests and logs)
        for i, (block, layout) in enumerate(zip(self.blocks, self.layouts)):
            mine = shards[i] if shards is not None else self._slices_of(block, layout, device)
            for g, t in enumerate(mine):
                if t.numel() != layout.shard[g] or t.dtype != layout.dtypes[g]:
                    raise ValueError(f"block {i}: shard {g} has {t.numel()} {t.dtype} values, the layout needs "
                                     f"{layout.shard[g]} {layout.dtypes[g]}")
                block.register_buffer(f"{SHARD_BUFFER}{g}", t, persistent=False)
            for entry in layout.tensors.values():
                _set(entry, entry.placeholder)
            self._hooks.append(block.register_forward_pre_hook(lambda m, args, i=i: self._before(i)))
            self._hooks.append(block.register_forward_hook(lambda m, args, out, i=i: self._after(i)))
        logger.info("block weights sharded over %d processes: %.1f MB of %.1f MB on this one", self.world,
                    self.local_bytes() / 1e6, self.full_bytes() / 1e6)

    def _slices_of(self, block: nn.Module, layout: _Layout, device: Optional[torch.device]) -> list[Tensor]:
        """This process's slices of a block whose tensors are all there."""
        state = block.state_dict()
        out = []
        for g, dtype in enumerate(layout.dtypes):
            parts = [state[name].detach().reshape(-1) for name, e in layout.tensors.items() if e.group == g]
            flat = torch.cat(parts) if len(parts) > 1 else parts[0]
            dev = device if device is not None else flat.device
            lo, n = self.rank * layout.shard[g], layout.shard[g]
            piece = torch.zeros(n, dtype=dtype, device=dev)
            have = max(0, min(lo + n, flat.numel()) - lo)
            if have:
                piece[:have].copy_(flat[lo:lo + have])
            out.append(piece)
        return out

    # -- sizes -------------------------------------------------------------------------------------

    def local_bytes(self) -> int:
        """Bytes of block weights this process holds between uses."""
        return sum(n * torch.empty((), dtype=d).element_size()
                   for lay in self.layouts for n, d in zip(lay.shard, lay.dtypes))

    def full_bytes(self) -> int:
        """Bytes of all block weights (what each process holds without sharding)."""
        return sum(n * torch.empty((), dtype=d).element_size()
                   for lay in self.layouts for n, d in zip(lay.lengths, lay.dtypes))

    # -- gathering -----------------------------------------------------------------------------------

    def _start(self, i: int) -> tuple[list[Tensor], list]:
        block, layout = self.blocks[i], self.layouts[i]
        fulls, works = [], []
        for g in range(len(layout.dtypes)):
            shard = getattr(block, f"{SHARD_BUFFER}{g}")
            full = shard.new_empty(layout.shard[g] * self.world)
            works.append(_gather_fn()(full, shard, group=self.group, async_op=True))
            fulls.append(full)
        return fulls, works

    def _before(self, i: int) -> None:
        fulls, works = self._pending.pop(i, None) or self._start(i)
        if self.prefetch and i + 1 < len(self.blocks) and i + 1 not in self._pending:
            self._pending[i + 1] = self._start(i + 1)  # in flight while block i computes
        for work in works:
            work.wait()
        for name, entry in self.layouts[i].tensors.items():
            n = entry.placeholder.numel()
            _set(entry, fulls[entry.group][entry.offset:entry.offset + n].view(entry.placeholder.shape))
        self.gathers += 1

    def _after(self, i: int) -> None:
        for entry in self.layouts[i].tensors.values():
            _set(entry, entry.placeholder)

    def remove(self) -> None:
        """Stop sharding: every process gathers every block (collective) and the blocks keep full weights."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        for i in sorted(self._pending):
            for work in self._pending.pop(i)[1]:
                work.wait()
        for i, (block, layout) in enumerate(zip(self.blocks, self.layouts)):
            fulls, works = self._start(i)
            for work in works:
                work.wait()
            for entry in layout.tensors.values():
                n = entry.placeholder.numel()
                _set(entry, fulls[entry.group][entry.offset:entry.offset + n].view(entry.placeholder.shape).clone())
            for g in range(len(layout.dtypes)):
                delattr(block, f"{SHARD_BUFFER}{g}")


def is_sharded(model: nn.Module) -> bool:
    """Whether a ShardedBlocks holds this transformer's block weights."""
    return any(name.startswith(SHARD_BUFFER) for b in model.double_blocks for name, _ in b.named_buffers(recurse=False))


def shard_transformer(model: nn.Module, group=None, device: Optional[torch.device] = None) -> ShardedBlocks:
    """Shard the block weights of a loaded transformer over ``group`` (every process calls it)."""
    return ShardedBlocks(model, group, device)


def load_sharded_transformer(path: Union[str, Path], device: torch.device, dtype: Optional[torch.dtype] = None, *,
                             config=None, group=None) -> ShardedBlocks:
    """Build a transformer on ``device`` with its block weights sharded over ``group``; returns the
    :class:`ShardedBlocks` (``.model`` is the transformer).

    A safetensors checkpoint (one file, shards or a diffusers folder) is memory-mapped by every process and each
    reads only its slices of the blocks plus the replicated rest; another format is loaded whole on the CPU
    first (convert it to safetensors to avoid that). dtype: the compute dtype (default: the file's).
    """
    from ..memory.offload import _cast, _FileSource, check_fit, move_module
    from ..memory.runtime import STREAMABLE_KINDS
    from ..model.transformer import HunyuanVideoTransformer
    from ..weights import detect_checkpoint, load_transformer, read_transformer_config

    device = torch.device(device)
    if detect_checkpoint(path).kind not in STREAMABLE_KINDS:
        logger.warning("%s is not safetensors: every process loads the whole transformer on the CPU before "
                       "sharding it (hunyuan-i2v convert ... --to safetensors avoids that)", path)
        model = load_transformer(path, dtype=dtype, device="cpu", config=config)
        sharded = ShardedBlocks(model, group, device)
        move_module(model, device)
        return sharded

    file = _FileSource(path)
    try:
        config = config or read_transformer_config(path)
        if dtype is None:  # the dtype most of the weights are stored in
            totals: dict[torch.dtype, int] = {}
            for shape, t in file.shapes.values():
                if t.is_floating_point:
                    totals[t] = totals.get(t, 0) + math.prod(shape)
            dtype = max(totals, key=totals.get) if totals else torch.float32
        model = HunyuanVideoTransformer(config, device="meta", dtype=dtype).eval()
        expected = model.state_dict(keep_vars=True)
        check_fit(expected, file.shapes, file.name)
        prefixes = tuple(f"{name}." for name in BLOCK_LISTS)
        resident = [k for k in expected if not k.startswith(prefixes)]
        for key, t in file.read(resident).items():
            t = _cast(t, expected[key].dtype, key, file.name)
            t = t.to(device, copy=True) if t.device == device else t.to(device)
            module_path, _, attr = key.rpartition(".")
            module = model.get_submodule(module_path)
            if attr in module._parameters:  # as load_transformer leaves it (requires_grad changes matmul's path)
                module._parameters[attr] = nn.Parameter(t, requires_grad=expected[key].requires_grad)
            else:
                module._buffers[attr] = t
        file.release(resident)

        world, rank = dist.get_world_size(group), dist.get_rank(group)
        shards = []
        for name in BLOCK_LISTS:
            for i, block in enumerate(getattr(model, name)):
                prefix = f"{name}.{i}."
                layout = _block_layout(block, world)
                keys = [prefix + k for k in layout.tensors]
                tensors = file.read(keys)
                mine = []
                for g, gdtype in enumerate(layout.dtypes):
                    lo, n = rank * layout.shard[g], layout.shard[g]
                    piece = torch.zeros(n, dtype=gdtype, device=device)
                    for k, entry in layout.tensors.items():
                        if entry.group != g:
                            continue
                        size = math.prod(entry.placeholder.shape)
                        a, b = max(lo, entry.offset), min(lo + n, entry.offset + size)
                        if a < b:  # this process's part of the tensor: only these pages are read
                            src = tensors[prefix + k].reshape(-1)[a - entry.offset:b - entry.offset]
                            piece[a - lo:b - lo].copy_(_cast(src, gdtype, prefix + k, file.name))
                    mine.append(piece)
                del tensors
                file.release(keys)
                shards.append(mine)
        return ShardedBlocks(model, group, device, shards=shards)
    finally:
        file.close()
