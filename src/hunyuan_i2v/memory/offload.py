"""Weight residency (issue 5, item 1): model-level offload and block streaming of the transformer.

Model-level offload moves whole modules between the compute device and host memory, so the text encoders, the
transformer and the VAE take turns on the device (:func:`on_device`, :class:`ModelOffloader`).

Block streaming keeps the weights of the double and single blocks off the device and brings each block in just
before it runs, while the next one is prefetched (:func:`stream_transformer`). The embedders, the token refiner
and the final layer (~3% of the 13B weights) stay resident. The blocks' weights come from

- a safetensors checkpoint (official or diffusers key naming, one file, shards or a diffusers folder), memory-
  mapped: a block's pages are read when it is needed and unmapped after it ran, so RAM holds a few blocks, not
  the model. On CPU a block computes straight from the mapped pages (no copy when the file already has the
  model's dtype); for a GPU each block goes through pinned host memory and a side CUDA stream.
- the model's own tensors (``source=None``), kept in host memory (pinned when the device is CUDA) and copied to
  the device block by block on a side stream.

A block may hold quantized layers (:class:`hunyuan_i2v.memory.quant.QuantizedLinear`): their codes and scales
stream like any other tensor, from a quantized file or the model's own state, and ``transform`` can quantize
full-precision tensors as they are read. Between uses a streamed block holds meta placeholders, so a streamed model
is not moved with ``.to()`` (use :func:`move_module`) or saved; :meth:`BlockStreamer.remove` ends the streaming.

Streaming also serves training with gradient checkpointing per block (LoRA training, ``train/lora.py``): the
backward pass recomputes each block, and the recompute calls the block again, so the same hooks bring its weights
in a second time. In the backward pass (autograd's graph task is running) the prefetch runs down the blocks
instead of up, a recomputed block stays until the next one is brought in (its backward runs after the recompute
and reads the weights), and after a forward with autograd on the last block stays for the recompute that starts
the backward. Tensors added to a block after streaming started (LoRA adapters) are not streamed: they stay where
they are.
"""

from __future__ import annotations

import contextlib
import json
import logging
import mmap
import os
import struct
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterator, Mapping, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ..config import TransformerConfig
from ..errors import CheckpointError
from ..keymap import diffusers_to_official
from ..model.transformer import HunyuanVideoTransformer
from ..weights import _SAFETENSORS_DTYPES, _group_keys, detect_checkpoint, fit_problems, read_transformer_config

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]
DeviceLike = Union[str, torch.device]
# (block prefix such as "double_blocks.3.", {block-local name: tensor}) -> the tensors the block should hold
Transform = Callable[[str, dict[str, Tensor]], dict[str, Tensor]]

BLOCK_LISTS = ("double_blocks", "single_blocks")  # the streamed part, in the order forward runs it
_ORDINARY_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)  # cast freely between these
GB = 1e9


# ---------------------------------------------------------------------------------------------
# Model-level offload


def _first_device(module: nn.Module) -> Optional[torch.device]:
    for t in list(module.parameters()) + list(module.buffers()):
        if not t.is_meta:
            return t.device
    return None


def move_module(module: nn.Module, device: DeviceLike, *, non_blocking: bool = False) -> nn.Module:
    """``module.to(device)`` for every tensor that is not a meta placeholder (so a streamed transformer moves its
    resident part); quantized codes keep their dtype. Returns ``module``."""
    device = torch.device(device)
    return module._apply(lambda t: t if t.is_meta or t.device == device else t.to(device, non_blocking=non_blocking))


@contextlib.contextmanager
def on_device(module: nn.Module, device: DeviceLike, *, offload_device: Optional[DeviceLike] = None
              ) -> Iterator[nn.Module]:
    """Hold ``module`` on ``device`` for the ``with`` block, then move it to ``offload_device`` (default: where it
    was before), also when the block raises."""
    back = torch.device(offload_device) if offload_device is not None else (_first_device(module) or torch.device("cpu"))
    move_module(module, device)
    try:
        yield module
    finally:
        move_module(module, back)


class ModelOffloader:
    """Keeps at most one module on the compute device: activating one moves the previous one to the host.

    The pipeline's stages use it so that the text encoders, the transformer and the VAE take turns::

        offload = ModelOffloader("cuda")
        text_encoder = offload.activate(text_encoder)   # ... encode
        transformer = offload.activate(transformer)     # the encoders go back to the CPU first
    """

    def __init__(self, device: DeviceLike, offload_device: DeviceLike = "cpu"):
        self.device, self.offload_device = torch.device(device), torch.device(offload_device)
        self.active: Optional[nn.Module] = None

    def activate(self, module: nn.Module) -> nn.Module:
        if self.active is not module:
            self.offload()
            logger.info("moving %s to %s", type(module).__name__, self.device)
            move_module(module, self.device)
            self.active = module
        return module

    def offload(self) -> None:
        """Move the active module (if any) to the offload device."""
        if self.active is not None:
            logger.info("moving %s to %s", type(self.active).__name__, self.offload_device)
            move_module(self.active, self.offload_device)
            self.active = None

    @contextlib.contextmanager
    def use(self, module: nn.Module) -> Iterator[nn.Module]:
        """The module on the device for the ``with`` block (it stays there until another one is activated)."""
        yield self.activate(module)


# ---------------------------------------------------------------------------------------------
# Safetensors through memory maps


@dataclass(frozen=True)
class _Entry:
    file: int
    begin: int  # absolute byte offsets in the file
    end: int
    dtype: torch.dtype
    shape: tuple[int, ...]


def _read_header(path: Path) -> tuple[dict[str, tuple[int, int, torch.dtype, tuple[int, ...]]], int]:
    """{key: (begin, end, dtype, shape)} with absolute offsets, and the file size."""
    size = path.stat().st_size
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise ValueError(f"header length {n} exceeds the file")
            header = json.loads(f.read(n))
        header.pop("__metadata__", None)
        out = {}
        for key, info in header.items():
            code = info["dtype"]
            if code not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {code}")
            begin, end = info["data_offsets"]
            if 8 + n + end > size:
                raise ValueError(f"tensor {key!r} ends past the end of the file")
            out[key] = (8 + n + begin, 8 + n + end, _SAFETENSORS_DTYPES[code], tuple(info["shape"]))
        return out, size
    except (OSError, ValueError, KeyError, TypeError, struct.error) as e:
        raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt, "
                              "download it again") from None


class MappedSafetensors:
    """The tensors of safetensors files as views of private memory maps: reading costs no copy, and
    :meth:`release` unmaps a tensor's pages so resident memory holds only what is in use."""

    def __init__(self, files: Sequence[PathLike]):
        self.files = [Path(f) for f in files]
        self.entries: dict[str, _Entry] = {}
        self._maps: list[mmap.mmap] = []
        for i, path in enumerate(self.files):
            header, size = _read_header(path)
            with open(path, "rb") as f:
                # ACCESS_COPY (MAP_PRIVATE): writable for torch.frombuffer, and pages stay shared with the cache
                self._maps.append(mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) if size else None)
            for key, (begin, end, dtype, shape) in header.items():
                if key in self.entries:
                    raise CheckpointError(f"{path}: tensor {key!r} is also in {self.files[self.entries[key].file]}; "
                                          "remove the stray shard")
                self.entries[key] = _Entry(i, begin, end, dtype, shape)

    def tensor(self, key: str) -> Tensor:
        e = self.entries[key]
        if e.end == e.begin:
            return torch.empty(e.shape, dtype=e.dtype)
        raw = torch.frombuffer(self._maps[e.file], dtype=torch.uint8, count=e.end - e.begin, offset=e.begin)
        return raw.view(e.dtype).view(e.shape)

    def meta(self, key: str) -> Tensor:
        e = self.entries[key]
        return torch.empty(e.shape, dtype=e.dtype, device="meta")

    def nbytes(self, keys: Sequence[str]) -> int:
        return sum(self.entries[k].end - self.entries[k].begin for k in keys)

    def _advise(self, keys: Sequence[str], advice: int) -> None:
        if not hasattr(mmap.mmap, "madvise"):
            return
        page = mmap.PAGESIZE
        for key in keys:
            e = self.entries[key]
            if e.end > e.begin:
                start = e.begin - e.begin % page
                self._maps[e.file].madvise(advice, start, e.end - start)

    def prefetch(self, keys: Sequence[str]) -> None:
        """Ask the kernel to read these tensors into the page cache in the background (not into this process)."""
        self._advise(keys, mmap.MADV_WILLNEED)

    def release(self, keys: Sequence[str]) -> None:
        """Unmap these tensors' pages from this process (a later read maps them again from the page cache)."""
        self._advise(keys, mmap.MADV_DONTNEED)

    def close(self) -> None:
        for m in self._maps:
            if m is not None:
                try:
                    m.close()
                except BufferError:  # a tensor still views the map; it closes when that tensor is collected
                    pass


# ---------------------------------------------------------------------------------------------
# Where streamed blocks come from


def _cast(t: Tensor, want: torch.dtype, key: str, where: str) -> Tensor:
    if t.dtype == want:
        return t
    if t.dtype in _ORDINARY_FLOATS and want in _ORDINARY_FLOATS:
        return t.to(want)
    raise CheckpointError(f"{where}: {key!r} is {t.dtype} but the model holds {want} there; quantize the model the "
                          "way the file was written (or pass a transform that converts the tensors)")


class _FileSource:
    """A transformer checkpoint read through memory maps, in the official naming whatever the file's."""

    def __init__(self, path: PathLike):
        info = detect_checkpoint(path)
        if info.kind not in ("safetensors", "safetensors-sharded", "diffusers-folder"):
            raise ValueError(f"{info.name}: block streaming reads safetensors; convert this {info.kind} checkpoint "
                             "first (hunyuan-i2v convert ... --format safetensors)")
        self.name, self.naming = info.name, info.naming
        self.files = MappedSafetensors(info.files)
        # official key -> the file keys it is made from (a diffusers group holds a whole block: fused qkv meets)
        self._group_of: dict[str, tuple[str, ...]] = {}
        self.shapes: dict[str, tuple[torch.Size, torch.dtype]] = {}
        keys = list(self.files.entries)
        groups = _group_keys(keys) if self.naming == "diffusers" else [[k] for k in keys]
        for group in groups:
            official = self._convert({k: self.files.meta(k) for k in group})
            for k, t in official.items():
                self._group_of[k] = tuple(group)
                self.shapes[k] = (t.shape, t.dtype)

    def _convert(self, tensors: dict[str, Tensor]) -> dict[str, Tensor]:
        return diffusers_to_official(tensors) if self.naming == "diffusers" else tensors

    def file_keys(self, keys: Sequence[str]) -> list[str]:
        return list(dict.fromkeys(fk for k in keys for fk in self._group_of[k]))

    def read(self, keys: Sequence[str]) -> dict[str, Tensor]:
        """{official key: tensor} for ``keys``: views of the mapped file, or copies where naming fuses tensors."""
        out: dict[str, Tensor] = {}
        for group in dict.fromkeys(self._group_of[k] for k in keys):
            out.update(self._convert({k: self.files.tensor(k) for k in group}))
        return {k: out[k] for k in keys}

    def prefetch(self, keys: Sequence[str]) -> None:
        self.files.prefetch(self.file_keys(keys))

    def release(self, keys: Sequence[str]) -> None:
        self.files.release(self.file_keys(keys))

    def close(self) -> None:
        self.files.close()


def check_fit(expected: Mapping[str, Tensor], found: Mapping[str, tuple[torch.Size, torch.dtype]], where: str
              ) -> None:
    """Keys and shapes of the model (``expected``) against a checkpoint's; one error naming the first problems."""
    problems, _ = fit_problems(expected, list(found), lambda k: found[k][0])
    if not problems:
        return
    raise CheckpointError(f"{where}: does not fit the transformer: " + "; ".join(problems) +
                          "; check that the config matches the file (and that a quantized file meets a model with "
                          "the same layers quantized)")


# ---------------------------------------------------------------------------------------------
# Block streaming


@dataclass
class _Slot:
    """One streamed tensor of a block: where it lives in the module tree and its placeholder."""

    module: nn.Module
    attr: str
    is_param: bool
    placeholder: Tensor  # meta, with the dtype and shape the block computes with


@dataclass
class _Loaded:
    tensors: dict[str, Tensor]  # on the compute device
    event: Optional[object] = None  # torch.cuda.Event: the copy to the device is done
    keep: list = field(default_factory=list)  # host buffers that must outlive an asynchronous copy


class BlockStreamer:
    """Streams the double/single blocks of a transformer; made by :func:`stream_transformer`.

    Forward hooks on each block bring its weights in before it runs (waiting for the prefetch) and put meta
    placeholders back after it ran; the ``prefetch`` blocks that run next (wrapping around to the first block
    for the next denoising step; in a backward pass's recompute, the blocks below) are read by a background thread
    meanwhile. ``loads`` counts the blocks brought in, ``backward_loads`` those brought in for a recompute.
    """

    def __init__(self, model: HunyuanVideoTransformer, source: Optional[PathLike], device: DeviceLike,
                 prefetch: int = 1, transform: Optional[Transform] = None):
        if prefetch < 0:
            raise ValueError(f"prefetch must be 0 or more blocks, got {prefetch}")
        self.model = model
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.prefetch = prefetch
        self.transform = transform
        self.blocks: list[tuple[str, nn.Module]] = [
            (f"{name}.{i}.", block) for name in BLOCK_LISTS for i, block in enumerate(getattr(model, name))]
        self._cuda = self.device.type == "cuda"
        self._side_stream = torch.cuda.Stream(self.device) if self._cuda else None
        self._lock = threading.Lock()
        self._held: dict[int, _Loaded] = {}
        self._pending: dict[int, Future] = {}
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="block-stream")
        self._hooks: list = []
        self.loads = 0  # blocks brought in so far (for tests and logs)
        self.backward_loads = 0  # of which for the recompute of gradient checkpointing

        self._slots: list[dict[str, _Slot]] = [self._make_slots(block) for _, block in self.blocks]
        self._file: Optional[_FileSource] = None
        self._host: Optional[list[dict[str, Tensor]]] = None
        self._file_keys: list[list[str]] = []  # per block: its official keys in the file
        if source is not None:
            self._file = _FileSource(source)
            self._file_keys = [[k for k in self._file.shapes if k.startswith(p)] for p, _ in self.blocks]
            self._load_resident_from_file()
        else:
            self._host = [self._keep_on_host(i) for i in range(len(self.blocks))]
        for i in range(len(self.blocks)):
            self._unassign(i)  # placeholders first, so the move below carries only the resident part
        move_module(model, self.device)
        for i, (_, block) in enumerate(self.blocks):
            self._hooks.append(block.register_forward_pre_hook(lambda m, args, i=i: self._before(i)))
            # always_call: a recompute that autograd stops early (once it has what backward needs) raises inside
            # the block, and the block must still be accounted for
            self._hooks.append(block.register_forward_hook(lambda m, args, out, i=i: self._after(i),
                                                           always_call=True))
        streamed = sum(p.numel() * p.element_size() for s in self._slots for p in (x.placeholder for x in s.values()))
        logger.info("streaming %d transformer blocks (%.2f GB) from %s to %s, prefetching %d", len(self.blocks),
                    streamed / GB, self._file.name if self._file else "host memory", self.device, prefetch)

    # -- setup -------------------------------------------------------------------------------------

    def _make_slots(self, block: nn.Module) -> dict[str, _Slot]:
        """The tensors a block streams: its state dict entries (parameters and persistent buffers)."""
        slots = {}
        for name, t in block.state_dict(keep_vars=True).items():
            path, _, attr = name.rpartition(".")
            module = block.get_submodule(path) if path else block
            slots[name] = _Slot(module, attr, attr in module._parameters, torch.empty_like(t, device="meta"))
        return slots

    def _keep_on_host(self, i: int) -> dict[str, Tensor]:
        """source=None: the block's current tensors become its host copy (pinned for an async copy to CUDA)."""
        host = {}
        for name, slot in self._slots[i].items():
            t = getattr(slot.module, slot.attr).detach()
            if t.is_meta:
                raise ValueError(f"{self.blocks[i][0]}{name} has no weights (meta device); pass the checkpoint path "
                                 "as the source to stream the blocks from the file")
            if t.device.type != "cpu":
                t = t.cpu()
            host[name] = t.pin_memory() if self._cuda and not t.is_pinned() else t
        return host

    def _load_resident_from_file(self) -> None:
        """Check the file against the model, then read the non-block tensors that the model lacks (meta)."""
        file = self._file
        expected = self.model.state_dict(keep_vars=True)
        prefixes = tuple(p for p, _ in self.blocks)
        if self.transform is None:
            check_fit(expected, file.shapes, file.name)
        else:  # the transform decides what the blocks hold; the resident part must still match
            check_fit({k: v for k, v in expected.items() if not k.startswith(prefixes)},
                      {k: v for k, v in file.shapes.items() if not k.startswith(prefixes)}, file.name)
        wanted = [k for k, t in expected.items() if not k.startswith(prefixes) and t.is_meta]
        for key, t in file.read(wanted).items():
            t = _cast(t, expected[key].dtype, key, file.name)
            # an own copy on the device: the map's pages are released below and the file may close
            t = t.to(self.device, copy=True) if t.device == self.device else t.to(self.device)
            path, _, attr = key.rpartition(".")
            module = self.model.get_submodule(path)
            if attr in module._parameters:
                module._parameters[attr] = nn.Parameter(t, requires_grad=False)
            else:
                module._buffers[attr] = t
        file.release(wanted)

    # -- moving blocks -----------------------------------------------------------------------------

    def _read(self, i: int) -> dict[str, Tensor]:
        """Block i's tensors in host memory, with the placeholders' names, dtypes and shapes."""
        prefix, _ = self.blocks[i]
        slots = self._slots[i]
        if self._host is not None:
            tensors = dict(self._host[i])
        else:
            tensors = {k[len(prefix):]: t for k, t in self._file.read(self._file_keys[i]).items()}
        if self.transform is not None:
            tensors = self.transform(prefix, tensors)
        where = self._file.name if self._file else "host copy"
        if set(tensors) != set(slots):
            missing, extra = sorted(set(slots) - set(tensors)), sorted(set(tensors) - set(slots))
            raise CheckpointError(f"{where}: block {prefix} has {len(missing)} missing tensor(s) {missing[:3]} and "
                                  f"{len(extra)} unexpected {extra[:3]}; the transform or the file does not fit")
        out = {}
        for name, t in tensors.items():
            ph = slots[name].placeholder
            if t.shape != ph.shape:
                raise CheckpointError(f"{where}: {prefix}{name} has shape {list(t.shape)}, the model "
                                      f"{list(ph.shape)}")
            out[name] = _cast(t, ph.dtype, prefix + name, where)
        return out

    def _fetch(self, i: int) -> _Loaded:
        """Runs on the worker thread: read block i and start its copy to the device."""
        if self._file is not None:
            self._file.prefetch(self._file_keys[i])
        host = self._read(i)
        if self.device.type == "cpu":
            return _Loaded(host)
        if not self._cuda:
            return _Loaded({k: t.to(self.device) for k, t in host.items()})
        if self._file is not None:  # pageable mapped pages -> pinned, so the copy below is asynchronous
            host = {k: torch.empty_like(t, pin_memory=True).copy_(t) for k, t in host.items()}
            self._release_file(i)
        with torch.cuda.device(self.device), torch.cuda.stream(self._side_stream):
            tensors = {k: t.to(self.device, non_blocking=True) for k, t in host.items()}
            event = torch.cuda.Event()
            event.record(self._side_stream)
        return _Loaded(tensors, event, list(host.values()))

    def _release_file(self, i: int) -> None:
        if self._file is not None:
            self._file.release(self._file_keys[i])

    def _assign(self, i: int, loaded: _Loaded) -> None:
        if loaded.event is not None:
            compute = torch.cuda.current_stream(self.device)
            compute.wait_event(loaded.event)
            for t in loaded.tensors.values():
                t.record_stream(compute)  # made on the side stream: not reused before the compute stream is done
        for name, slot in self._slots[i].items():
            _set(slot, loaded.tensors[name])
        self._held[i] = loaded
        self.loads += 1
        self.backward_loads += _in_backward()

    def _unassign(self, i: int) -> None:
        for slot in self._slots[i].values():
            _set(slot, slot.placeholder)

    def _release(self, i: int) -> None:
        self._unassign(i)
        if self._held.pop(i, None) is not None and self.device.type == "cpu":
            self._release_file(i)

    def _window(self, i: int) -> list[int]:
        """The blocks to read ahead while block i runs. Inference: the next ones, wrapping around to the first
        for the next step. A forward with autograd: the next ones up to the last (the backward recomputes the last
        block first, which stays). A backward's recompute: the ones below, down to the first."""
        n, ahead = len(self.blocks), min(self.prefetch, len(self.blocks) - 1)
        if _in_backward():
            return [i - d for d in range(1, ahead + 1) if i - d >= 0]
        if torch.is_grad_enabled():
            return [i + d for d in range(1, ahead + 1) if i + d < n]
        return [(i + d) % n for d in range(1, ahead + 1)]

    # -- hooks ---------------------------------------------------------------------------------------

    def _before(self, i: int) -> None:
        with self._lock:
            for j in [j for j in self._held if j != i]:  # only after a forward that raised half way
                self._release(j)
            window = self._window(i)
            for j in [j for j in self._pending if j != i and j not in window]:
                self._drop_pending(j)
            if i not in self._held:
                future = self._pending.pop(i, None)
                self._assign(i, future.result() if future is not None else self._fetch(i))
            for j in window:
                if j not in self._pending and j not in self._held:
                    self._pending[j] = self._executor.submit(self._fetch, j)

    def _after(self, i: int) -> None:
        if _in_backward():
            return  # the recomputed graph's backward runs next and reads the weights; the next block releases it
        if torch.is_grad_enabled() and i == len(self.blocks) - 1:
            return  # kept for the recompute that starts the backward pass
        with self._lock:
            self._release(i)

    def _drop_pending(self, j: int) -> None:
        future = self._pending.pop(j)
        if not future.cancel():
            try:
                future.result()
            except Exception:  # noqa: BLE001 - a prefetch nobody waits for; the next read raises it again
                pass
            if self.device.type == "cpu":
                self._release_file(j)

    # -- inspection and teardown ---------------------------------------------------------------------

    def held(self) -> list[int]:
        """Blocks whose weights are materialised now: the one running and those prefetched (by index in
        double_blocks + single_blocks order)."""
        with self._lock:
            return sorted(set(self._held) | set(self._pending))

    def remove(self) -> None:
        """Stop streaming: remove the hooks and drop every block copy. With ``source=None`` the blocks get their
        host tensors back (on the CPU); streamed from a file they keep meta placeholders."""
        for h in self._hooks:
            h.remove()
        self._hooks.clear()
        with self._lock:
            for j in list(self._pending):
                self._drop_pending(j)
            for j in list(self._held):
                self._release(j)
        self._executor.shutdown(wait=True)
        if self._host is not None:
            for i, host in enumerate(self._host):
                for name, slot in self._slots[i].items():
                    _set(slot, host[name])
            self._host = None
        if self._file is not None:
            self._file.close()

    def __enter__(self) -> "BlockStreamer":
        return self

    def __exit__(self, *exc) -> None:
        self.remove()


def _in_backward() -> bool:
    """Whether autograd is running a backward pass in this thread (a checkpointed block being recomputed)."""
    return torch._C._current_graph_task_id() != -1


def _set(slot: _Slot, t: Tensor) -> None:
    if slot.is_param:
        slot.module._parameters[slot.attr] = nn.Parameter(t, requires_grad=False)
    else:
        slot.module._buffers[slot.attr] = t


def stream_transformer(model: HunyuanVideoTransformer, source: Optional[PathLike] = None,
                       device: Optional[DeviceLike] = None, prefetch: int = 1, *,
                       transform: Optional[Transform] = None) -> BlockStreamer:
    """Stream the double/single blocks of ``model`` to ``device`` and keep the rest resident there.

    source: a safetensors checkpoint of this model (a file, an index json of shards, a diffusers folder; either
    key naming), read through memory maps; the model may be built on the meta device, and its non-block tensors
    that are still meta are read from the file. None: the blocks' own tensors, kept in host memory.
    device: the compute device (default: where the model's resident part is, else the CPU).
    prefetch: how many blocks to read ahead of the running one. transform: see :data:`Transform`, applied to
    each block's tensors as read (e.g. quantization). Returns the :class:`BlockStreamer`; ``.remove()`` ends it.
    """
    if device is None:
        device = _first_device(model) or torch.device("cpu")
    return BlockStreamer(model, source, device, prefetch, transform)


def load_streamed_transformer(path: PathLike, device: DeviceLike = "cpu", dtype: Optional[torch.dtype] = None, *,
                              prefetch: int = 1, transform: Optional[Transform] = None,
                              config: Optional[TransformerConfig] = None) -> BlockStreamer:
    """Build the transformer of a safetensors checkpoint with its blocks streamed from the file: only the resident
    part (~3% of the 13B weights) is read now. dtype: the compute dtype (default: the file's floating dtype).
    config: the model config (default: the file's). A file written by ``memory.quant.save_quantized`` gets
    quantized layers where it has them."""
    from .quant import prepare_quantized_layers, quantized_layer_dtypes

    config = config or read_transformer_config(path)
    files = MappedSafetensors(detect_checkpoint(path).files)
    try:
        key_dtypes = {k: e.dtype for k, e in files.entries.items()}
        if dtype is None:
            totals: dict[torch.dtype, int] = {}
            for e in files.entries.values():
                if e.dtype in _ORDINARY_FLOATS:
                    totals[e.dtype] = totals.get(e.dtype, 0) + (e.end - e.begin)
            dtype = max(totals, key=totals.get) if totals else torch.float32
    finally:
        files.close()
    model = HunyuanVideoTransformer(config, device="meta", dtype=dtype).eval()
    layers = quantized_layer_dtypes(key_dtypes)
    if layers:
        prepare_quantized_layers(model, layers)
    return stream_transformer(model, path, device, prefetch, transform=transform)
