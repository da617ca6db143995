"""Transformer weights read from disk by one process and broadcast to the others.

The default multi-process load has every process read the checkpoint itself (memory-mapped: on one host the page
cache holds the file once, but each process still reads it, and on a network file system each one fetches it).
Here only the source process (rank 0) opens the file: it announces the config and the storage dtype, then sends
the tensors in buckets of at most ``bucket_bytes`` (consecutive tensors of one dtype laid end to end), so no
process ever holds more than its model plus one bucket; with ``shard=True`` each block is cut into the sharded
layout of :mod:`.shard` on the source and every process receives only its slice (a scatter), the replicated rest
by broadcast. The other processes never touch the file system: they may pass ``path=None``.

The received tensors are the stored bits (cast to the compute dtype on the source, exactly as the local loaders
cast), so a broadcast load equals a local load of the same file bit for bit. An error on the source (a missing or
unreadable file) is raised on every process.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Optional, Union

import torch
import torch.distributed as dist
from torch import Tensor, nn

from .mesh import _portable_error

logger = logging.getLogger(__name__)

BUCKET_BYTES = 256 * 2**20  # the most a broadcast carries (a bigger tensor goes alone)


class _Source:
    """The checkpoint on the source process, in the official naming: memory-mapped safetensors, or (another
    format) the whole state dict loaded on the CPU."""

    def __init__(self, path: Union[str, Path], config, dtype: Optional[torch.dtype]):
        from ..memory.offload import _FileSource
        from ..memory.runtime import STREAMABLE_KINDS
        from ..weights import detect_checkpoint, load_transformer, read_transformer_config

        self.file = None
        if detect_checkpoint(path).kind in STREAMABLE_KINDS:
            self.file = _FileSource(path)
            self.name = self.file.name
            self.config = config or read_transformer_config(path)
            self.shapes = self.file.shapes
            self.dtype = dtype or _majority_dtype(self.shapes)
        else:
            logger.warning("%s is not safetensors: rank 0 loads the whole transformer on the CPU before sending it "
                           "(hunyuan-i2v convert ... --to safetensors avoids that)", path)
            model = load_transformer(path, dtype=dtype, device="cpu", config=config)
            self.state = model.state_dict()
            self.name, self.config = str(path), model.config
            self.shapes = {k: (t.shape, t.dtype) for k, t in self.state.items()}
            self.dtype = dtype or next(t.dtype for t in self.state.values() if t.is_floating_point())

    def read(self, keys: list[str]) -> dict[str, Tensor]:
        return self.file.read(keys) if self.file is not None else {k: self.state[k] for k in keys}

    def release(self, keys: list[str]) -> None:
        if self.file is not None:
            self.file.release(keys)

    def close(self) -> None:
        if self.file is not None:
            self.file.close()
        self.state = None


def _majority_dtype(shapes: dict) -> torch.dtype:
    totals: dict[torch.dtype, int] = {}
    for shape, t in shapes.values():
        if t.is_floating_point:
            totals[t] = totals.get(t, 0) + math.prod(shape)
    return max(totals, key=totals.get) if totals else torch.float32


def _buckets(keys: list[str], expected: dict[str, Tensor], limit: int) -> list[list[str]]:
    """Consecutive keys of one dtype, at most ``limit`` bytes together (a bigger tensor alone)."""
    out: list[list[str]] = []
    size, dtype = 0, None
    for k in keys:
        t = expected[k]
        n = t.numel() * t.element_size()
        if not out or t.dtype != dtype or size + n > limit:
            out.append([])
            size, dtype = 0, t.dtype
        out[-1].append(k)
        size += n
    return out


def _set(model: nn.Module, key: str, t: Tensor, like: Tensor) -> None:
    path, _, attr = key.rpartition(".")
    module = model.get_submodule(path) if path else model
    if attr in module._parameters:  # as load_transformer leaves it (requires_grad changes matmul's code path)
        module._parameters[attr] = nn.Parameter(t, requires_grad=like.requires_grad)
    else:
        module._buffers[attr] = t


class _Sender:
    """The collectives of one broadcast load; ``source`` is None except on the source process."""

    def __init__(self, source: Optional[_Source], src: int, group, comm_device: torch.device):
        self.source, self.src, self.group, self.comm_device = source, src, group, comm_device
        self.flag = torch.zeros(1, dtype=torch.int32, device=comm_device)
        self.sent = 0  # collectives carrying weights (for tests and logs)

    def check(self, fill) -> None:
        """Run ``fill()`` on the source; if it fails, every process raises its error (one flag broadcast first)."""
        error = None
        if self.source is not None:
            try:
                fill()
                self.flag.zero_()
            except Exception as exc:  # noqa: BLE001 - re-raised on every process below
                error = exc
                self.flag.fill_(1)
        dist.broadcast(self.flag, self.src, group=self.group)
        if int(self.flag.item()):
            box = [_portable_error(error) if error is not None else None]
            dist.broadcast_object_list(box, src=self.src, group=self.group)
            if error is not None:
                raise error
            raise box[0]

    def broadcast(self, keys: list[str], expected: dict[str, Tensor], device: torch.device) -> dict[str, Tensor]:
        """These tensors (one dtype) in one broadcast; every process returns them on ``device``."""
        dtype = expected[keys[0]].dtype
        sizes = [expected[k].numel() for k in keys]
        flat = torch.empty(sum(sizes), dtype=dtype, device=self.comm_device)

        def fill() -> None:
            tensors = self.source.read(keys)
            offset = 0
            for k, n in zip(keys, sizes):
                flat[offset:offset + n].copy_(_cast(tensors[k], dtype, k, self.source.name).reshape(-1))
                offset += n
            del tensors
            self.source.release(keys)

        self.check(fill)
        dist.broadcast(flat, self.src, group=self.group)
        self.sent += 1
        out, offset = {}, 0
        for k, n in zip(keys, sizes):
            out[k] = flat[offset:offset + n].view(expected[k].shape).to(device, copy=True)
            offset += n
        return out

    def scatter(self, block: nn.Module, prefix: str, world: int, device: torch.device) -> list[Tensor]:
        """This process's slices of one block in the sharded layout (one scatter per dtype group)."""
        from .shard import _block_layout

        layout = _block_layout(block, world)
        mine = []
        for g, dtype in enumerate(layout.dtypes):
            n = layout.shard[g]
            piece = torch.empty(n, dtype=dtype, device=self.comm_device)
            full = torch.zeros(n * world, dtype=dtype, device=self.comm_device) if self.source is not None else None
            names = [name for name, e in layout.tensors.items() if e.group == g]

            def fill() -> None:
                keys = [prefix + name for name in names]
                tensors = self.source.read(keys)
                for name, key in zip(names, keys):
                    e = layout.tensors[name]
                    size = e.placeholder.numel()
                    full[e.offset:e.offset + size].copy_(_cast(tensors[key], dtype, key, self.source.name).reshape(-1))
                del tensors
                self.source.release(keys)

            self.check(fill)
            dist.scatter(piece, list(full.chunk(world)) if full is not None else None, src=self.src,
                         group=self.group)
            self.sent += 1
            mine.append(piece.to(device))
            full = None  # freed before the next group's vector is made
        return mine


def _cast(t: Tensor, dtype: torch.dtype, key: str, where: str) -> Tensor:
    from ..memory.offload import _cast as cast

    return cast(t, dtype, key, where)


def broadcast_transformer(path: Optional[Union[str, Path]], device: Union[str, torch.device],
                          dtype: Optional[torch.dtype] = None, *, config=None, shard: bool = False, group=None,
                          src: int = 0, bucket_bytes: int = BUCKET_BYTES):
    """Load a transformer checkpoint that only process ``src`` (a global rank, in ``group``) reads; every process
    of ``group`` (default: all) calls this and gets the model on ``device``.

    ``path`` is read on ``src`` only (the others may pass None: they never open it). ``dtype``: the compute dtype
    (default: the file's storage dtype); ``config``: the TransformerConfig (default: the checkpoint's, read on
    ``src``). ``shard``: the block weights sharded over ``group`` as :func:`.shard.load_sharded_transformer`
    leaves them; returns the :class:`.shard.ShardedBlocks` then (``.model`` is the transformer), else the model.
    """
    from ..memory.offload import check_fit
    from ..model.transformer import HunyuanVideoTransformer
    from .shard import BLOCK_LISTS, ShardedBlocks

    device = torch.device(device)
    rank = dist.get_rank()
    ranks = dist.get_process_group_ranks(group) if group is not None else list(range(dist.get_world_size()))
    if src not in ranks:
        raise ValueError(f"the source rank {src} is not in the group {ranks}")
    nccl = dist.get_backend(group) == "nccl"
    comm_device = torch.device("cuda", torch.cuda.current_device()) if nccl else torch.device("cpu")

    source, head = None, [None]
    if rank == src:
        try:
            if path is None:
                raise ValueError("the source process needs the checkpoint path")
            source = _Source(path, config, dtype)
            head[0] = ("ok", (source.config, source.dtype))
        except BaseException as exc:  # noqa: BLE001 - re-raised here, after the others are told
            head[0] = ("error", _portable_error(exc))
            dist.broadcast_object_list(head, src=src, group=group)
            raise
    dist.broadcast_object_list(head, src=src, group=group)
    status, value = head[0]
    if status == "error":
        raise value
    config, dtype = value
    try:
        model = HunyuanVideoTransformer(config, device="meta", dtype=dtype).eval()
        expected = model.state_dict(keep_vars=True)
        sender = _Sender(source, src, group, comm_device)
        sender.check(lambda: check_fit(expected, source.shapes, source.name))  # runs on the source only
        prefixes = tuple(f"{name}." for name in BLOCK_LISTS)
        resident = [k for k in expected if not (shard and k.startswith(prefixes))]
        for keys in _buckets(resident, expected, bucket_bytes):
            for k, t in sender.broadcast(keys, expected, device).items():
                _set(model, k, t, expected[k])
        if not shard:
            logger.info("transformer received from rank %d in %d broadcasts", src, sender.sent)
            return model
        world = len(ranks)
        shards = [sender.scatter(block, f"{name}.{i}.", world, device)
                  for name in BLOCK_LISTS for i, block in enumerate(getattr(model, name))]
        logger.info("transformer received from rank %d, its blocks sharded (%d collectives)", src, sender.sent)
        return ShardedBlocks(model, group, device, shards=shards)
    finally:
        if source is not None:
            source.close()
