"""Multi-process generation on torch.distributed (docs/multi-gpu.md).

- :mod:`.mesh`: the launch (torchrun's RANK / WORLD_SIZE / LOCAL_RANK; NCCL on CUDA, gloo on the CPU), the
  ``[cfg] x ring x ulysses`` process groups, rank-0-computes-and-broadcasts, CFG halves on separate ranks.
- :mod:`.sequence`: sequence parallelism over the video tokens (Ulysses all-to-all, ring attention, both as a
  2-D mesh), hooked into the transformer's block stack and its attention entry point.
- :mod:`.shard`: the block weights sharded over the processes, gathered block by block.
- :mod:`.vae`: the tiles of a tiled VAE decode shared among the processes, blended on one.
- :mod:`.broadcast`: the transformer checkpoint read by rank 0 alone and broadcast to the others.

Typical use (every process runs the same code)::

    device = init_distributed("cuda")                       # under torchrun
    par = Parallel(ParallelConfig.for_world(world_size, ring=2), device)
    pipe = I2VPipeline.from_pretrained(model_dir, device=device, parallel=par)
    out = pipe(image, prompt)                               # frames on rank 0; None elsewhere
    par.close()

The submodules import torch.distributed; this package's names load on first use.
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "ParallelConfig": "mesh",
    "Parallel": "mesh",
    "CfgParallel": "mesh",
    "ParallelError": "mesh",
    "init_distributed": "mesh",
    "launched_world": "mesh",
    "is_main_process": "mesh",
    "SequenceParallel": "sequence",
    "SequenceAttention": "sequence",
    "attention_with_lse": "sequence",
    "merge_partials": "sequence",
    "chunk_layout": "sequence",
    "ShardedBlocks": "shard",
    "shard_transformer": "shard",
    "load_sharded_transformer": "shard",
    "ParallelDecode": "vae",
    "decode_parallel": "vae",
    "decode_stream_parallel": "vae",
    "broadcast_transformer": "broadcast",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hunyuan_i2v.parallel' has no attribute {name!r}")
