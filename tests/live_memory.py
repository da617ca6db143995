"""Peak bytes of live tensors while a function runs, counted from the tensors the ops return.

The planner predicts tensor bytes, not what an allocator reserves, so this is what its predictions are checked
against: every storage an op creates inside the ``with`` block is counted until the last tensor viewing it dies.
Parameters and tensors created before the block are not counted, and neither are a kernel's internal buffers.
"""

from __future__ import annotations

import weakref

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class LiveTensorBytes(TorchDispatchMode):
    """``with LiveTensorBytes() as live: ...`` then ``live.peak``: the most bytes of new storages alive at once."""

    def __init__(self):
        super().__init__()
        self.current = self.peak = 0
        self._refs: dict[int, list[int]] = {}  # storage pointer -> [bytes, live tensors viewing it]

    def __enter__(self):
        self.current = self.peak = 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        inputs = {t.untyped_storage().data_ptr() for t in _tensors((args, kwargs))}
        out = func(*args, **kwargs)
        for t in _tensors(out):
            ptr = t.untyped_storage().data_ptr()
            if ptr in self._refs:
                self._refs[ptr][1] += 1
            elif ptr in inputs or t.device.type == "meta":
                continue  # a view of, or an in-place result on, a tensor made outside
            else:
                nbytes = t.untyped_storage().nbytes()
                self._refs[ptr] = [nbytes, 1]
                self.current += nbytes
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, ptr)
        return out

    def _release(self, ptr: int) -> None:
        entry = self._refs[ptr]
        entry[1] -= 1
        if entry[1] == 0:
            self.current -= entry[0]
            del self._refs[ptr]


def _tensors(tree) -> list[torch.Tensor]:
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, (list, tuple)):
        return [t for x in tree for t in _tensors(x)]
    if isinstance(tree, dict):
        return [t for x in tree.values() for t in _tensors(x)]
    return []
