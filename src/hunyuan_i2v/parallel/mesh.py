"""Where this process sits in a multi-process run: the launch (torchrun's environment variables), the process
groups of the ``[cfg] x ring x ulysses`` mesh, and the results that rank 0 computes for everyone.

Rank layout (world = (2 if cfg_parallel else 1) x ring x ulysses)::

    rank = cfg_half * (ring * ulysses) + ring_index * ulysses + ulysses_index

so a CFG half is a block of consecutive ranks (its sequence group), a Ulysses group is ``ulysses`` consecutive
ranks, and video token chunk ``s`` lives on sequence rank ``s = ring_index * ulysses + ulysses_index``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pickle
from dataclasses import dataclass
from typing import Any, Callable, Optional

import torch
import torch.distributed as dist
from torch import Tensor

from ..errors import HunyuanI2VError, InputError

logger = logging.getLogger(__name__)


class ParallelError(HunyuanI2VError, RuntimeError):
    """A multi-process run that cannot go on (a rank failed, or the launch does not fit the settings)."""


@dataclass(frozen=True)
class ParallelConfig:
    """How the processes of one generation share the work.

    ulysses x ring processes split the video tokens of each transformer pass (``ulysses`` must divide the head
    count); ``cfg_parallel`` runs the conditional and unconditional passes of real CFG on two such groups;
    ``shard_weights`` keeps 1/world of every block's weights on each process (gathered per block when it runs);
    ``parallel_vae`` shares the tiles of a tiled VAE decode among all processes (:mod:`.vae`; else rank 0 decodes
    alone and the others never load the VAE); ``broadcast_weights`` has rank 0 alone read the transformer
    checkpoint and send it to the others (:mod:`.broadcast`; else every process reads the file).
    """

    ulysses: int = 1
    ring: int = 1
    cfg_parallel: bool = False
    shard_weights: bool = False
    parallel_vae: bool = True
    broadcast_weights: bool = False

    def __post_init__(self) -> None:
        for name in ("ulysses", "ring"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise InputError(f"--{name} must be a whole number of processes, at least 1; got {value!r}")

    @property
    def sequence_degree(self) -> int:
        return self.ulysses * self.ring

    @property
    def world_size(self) -> int:
        return self.sequence_degree * (2 if self.cfg_parallel else 1)

    @classmethod
    def for_world(cls, world_size: int, ulysses: Optional[int] = None, ring: Optional[int] = None,
                  cfg_parallel: bool = False, shard_weights: bool = False, *,
                  parallel_vae: bool = True, broadcast_weights: bool = False) -> "ParallelConfig":
        """The settings for ``world_size`` processes; a degree left None takes what the others leave (Ulysses
        first: it is the faster of the two wherever the head count allows it)."""
        halves = 2 if cfg_parallel else 1
        launch = f"torchrun --nproc_per_node {world_size}"
        if world_size % halves:
            raise InputError(f"--cfg-parallel needs an even number of processes, {launch} has {world_size}")
        per_half = world_size // halves
        for name, value in (("ulysses", ulysses), ("ring", ring)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise InputError(f"--{name} must be a whole number of processes, at least 1; got {value!r}")
        if ulysses is None and ring is None:
            ulysses, ring = per_half, 1
        elif ulysses is None or ring is None:
            given, name = (ring, "ring") if ulysses is None else (ulysses, "ulysses")
            if per_half % given:
                raise InputError(f"--{name} {given} does not divide the {per_half} processes of a "
                                 f"{'CFG half' if cfg_parallel else 'run'} ({launch})")
            ulysses, ring = (per_half // given, given) if ulysses is None else (given, per_half // given)
        config = cls(ulysses, ring, cfg_parallel, shard_weights, parallel_vae, broadcast_weights)
        if config.world_size != world_size:
            raise InputError(f"--ulysses {ulysses} x --ring {ring}{' x 2 (--cfg-parallel)' if cfg_parallel else ''}"
                             f" = {config.world_size} processes, but {launch} started {world_size}")
        return config

    def check_model(self, num_heads: int) -> None:
        """Ulysses hands each process num_heads / ulysses heads."""
        if num_heads % self.ulysses:
            fits = [d for d in range(1, num_heads + 1) if num_heads % d == 0 and self.sequence_degree % d == 0]
            u = max(fits)
            raise InputError(f"--ulysses {self.ulysses} does not divide the model's {num_heads} attention heads: "
                             f"use --ulysses {u} --ring {self.sequence_degree // u}")


# ---------------------------------------------------------------------------------------------
# Launch


def launched_world() -> Optional[tuple[int, int, int]]:
    """(rank, world size, local rank) from torchrun's environment, or None for a single process."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1 or "RANK" not in os.environ:
        return None
    rank = int(os.environ["RANK"])
    return rank, world, int(os.environ.get("LOCAL_RANK", rank))


def is_main_process() -> bool:
    """False on every process but rank 0 of a torchrun launch (those stay quiet and write nothing)."""
    launched = launched_world()
    return launched is None or launched[0] == 0


def init_distributed(device: Optional[str] = None) -> Optional[torch.device]:
    """Join the process group of a torchrun launch: NCCL on CUDA (one GPU per process, ``cuda:LOCAL_RANK``), gloo
    on the CPU. ``device``: "cpu", "cuda" (or None: CUDA when available). Returns this process's device, or None
    when not launched by torchrun. A group that is already initialised is kept."""
    launched = launched_world()
    if launched is None:
        return None
    rank, world, local_rank = launched
    kind = torch.device(device).type if device else ("cuda" if torch.cuda.is_available() else "cpu")
    if kind == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ParallelError(f"process {rank} has local rank {local_rank} but this machine shows "
                                f"{torch.cuda.device_count()} CUDA device(s): one process per GPU")
        dev = torch.device("cuda", local_rank)
        torch.cuda.set_device(dev)
    elif kind == "cpu":
        dev = torch.device("cpu")
    else:
        raise InputError(f"multi-process runs use CUDA (NCCL) or the CPU (gloo), not {device!r}")
    if not dist.is_initialized():
        backend = "nccl" if kind == "cuda" else "gloo"
        dist.init_process_group(backend, rank=rank, world_size=world,
                                **({"device_id": dev} if kind == "cuda" else {}))
        logger.info("process %d of %d joined the %s group on %s", rank, world, backend, dev)
    return dev


# ---------------------------------------------------------------------------------------------
# The mesh


def _to_host(obj: Any) -> Any:
    """Tensors (also inside dataclasses, tuples, lists, dicts) moved to the CPU, so they can be pickled for ranks
    whose devices differ."""
    return _map_tensors(obj, lambda t: t.cpu())


def _map_tensors(obj: Any, fn: Callable[[Tensor], Tensor]) -> Any:
    if isinstance(obj, Tensor):
        return fn(obj)
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.replace(obj, **{f.name: _map_tensors(getattr(obj, f.name), fn)
                                           for f in dataclasses.fields(obj) if f.init})
    if isinstance(obj, (list, tuple)):
        return type(obj)(_map_tensors(x, fn) for x in obj)
    if isinstance(obj, dict):
        return {k: _map_tensors(v, fn) for k, v in obj.items()}
    return obj


def _portable_error(exc: BaseException) -> BaseException:
    """What the other ranks raise when rank 0 failed: the same error if it is one of ours and pickles, else a
    ParallelError naming it."""
    if isinstance(exc, HunyuanI2VError):
        try:
            pickle.loads(pickle.dumps(exc))
            return exc
        except Exception:  # noqa: BLE001 - an attribute that does not pickle: send the message instead
            pass
    return ParallelError(f"rank 0 failed: {type(exc).__name__}: {exc}")


class Parallel:
    """This process's place in the mesh and its process groups; needs the default process group (see
    :func:`init_distributed`) and must be made by every process, in the same order (groups are collective).

    ``attach(model)`` makes a transformer sequence parallel (and shards its block weights when the config asks);
    ``cfg`` is what :func:`hunyuan_i2v.sampling.denoise` takes to run the CFG halves on different ranks;
    ``from_main(fn)`` runs ``fn`` on rank 0 only and hands its result to every rank.
    """

    def __init__(self, config: ParallelConfig, device: Optional[torch.device] = None):
        if not dist.is_initialized():
            raise ParallelError("no process group: launch with torchrun (or call init_distributed first)")
        self.config = config
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.device = torch.device(device) if device is not None else (
            torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu"))
        if config.world_size != self.world_size:
            raise InputError(f"the parallel settings need {config.world_size} processes "
                             f"(ulysses {config.ulysses} x ring {config.ring}"
                             f"{' x 2 CFG halves' if config.cfg_parallel else ''}), but {self.world_size} run")
        u, r = config.ulysses, config.ring
        s = u * r
        halves = 2 if config.cfg_parallel else 1
        self.cfg_half, self.sp_index = divmod(self.rank, s)
        self.ring_index, self.ulysses_index = divmod(self.sp_index, u)
        self.sp_group = self._group([[h * s + i for i in range(s)] for h in range(halves)]) if s > 1 else None
        self.ulysses_group = self._group([[h * s + ri * u + ui for ui in range(u)]
                                          for h in range(halves) for ri in range(r)]) if u > 1 else None
        self.ring_ranks = [self.cfg_half * s + ri * u + self.ulysses_index for ri in range(r)]
        self.ring_group = self._group([[h * s + ri * u + ui for ri in range(r)]
                                       for h in range(halves) for ui in range(u)]) if r > 1 else None
        self.cfg_group = self._group([[i, i + s] for i in range(s)]) if config.cfg_parallel else None
        self._sharded: list = []

    def _group(self, rank_lists: list[list[int]]):
        """Create every group of ``rank_lists`` (all processes take part in each creation); return the one holding
        this process."""
        mine = None
        for ranks in rank_lists:
            group = dist.new_group(ranks)
            if self.rank in ranks:
                mine = group
        return mine

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        c = self.config
        parts = [f"{self.world_size} processes"]
        if c.sequence_degree > 1:
            parts.append(f"sequence parallel ulysses {c.ulysses} x ring {c.ring}")
        if c.cfg_parallel:
            parts.append("CFG halves on separate ranks")
        if c.shard_weights:
            parts.append("block weights sharded")
        if c.broadcast_weights:
            parts.append("weights read by rank 0 and broadcast")
        if c.parallel_vae:
            parts.append("VAE tiles shared")
        return ", ".join(parts)

    # -- the transformer -------------------------------------------------------------------------

    def attach(self, model, inner_backend: Optional[str] = None):
        """Make ``model`` (a HunyuanVideoTransformer) run its block stack sequence parallel over this process's
        sequence group, and shard its block weights if the config asks and they are not sharded yet. Returns it."""
        from .sequence import SequenceParallel
        from .shard import ShardedBlocks, is_sharded

        self.config.check_model(model.config.num_heads)
        if self.config.sequence_degree > 1:
            model.sequence_parallel = SequenceParallel(self, inner_backend)
        if self.config.shard_weights and not is_sharded(model):
            self._sharded.append(ShardedBlocks(model, None))
        return model

    def load_transformer(self, path, config=None, dtype: Optional[torch.dtype] = None,
                         device: Optional[torch.device] = None):
        """Load a transformer checkpoint onto ``device`` (default this process's), its block weights sharded when
        the config asks (from a safetensors file each process reads only its share), and attach it. With
        ``broadcast_weights`` only rank 0 reads ``path`` (the others ignore it) and sends the weights."""
        if self.config.broadcast_weights:
            from .broadcast import broadcast_transformer

            loaded = broadcast_transformer(path if self.is_main else None, device or self.device, dtype,
                                           config=config, shard=self.config.shard_weights)
            if self.config.shard_weights:
                self._sharded.append(loaded)
                loaded = loaded.model
            return self.attach(loaded)
        if self.config.shard_weights:
            from .shard import load_sharded_transformer

            sharded = load_sharded_transformer(path, device or self.device, dtype, config=config)
            self._sharded.append(sharded)
            model = sharded.model
        else:
            from ..weights import load_transformer

            model = load_transformer(path, dtype=dtype, device=device or self.device, config=config)
        return self.attach(model)

    def check_run(self, use_cfg: bool, step_cache: Any = None, plan: Any = None) -> None:
        """What a generation with these settings cannot do, raised before any heavy work (the same on every rank).
        ``step_cache``: the call's hunyuan_i2v.cache policy; ``plan``: its memory plan."""
        c = self.config
        if c.cfg_parallel and not use_cfg:
            raise InputError("--cfg-parallel splits the two passes of real CFG, but CFG is off: pass --cfg-scale > 1 "
                             "or drop --cfg-parallel")
        if c.cfg_parallel and step_cache is not None:
            raise InputError("--cache skips steps per CFG half, which --cfg-parallel runs on separate processes: "
                             "drop one of the two")
        if not c.shard_weights:
            return
        if plan is not None and plan.offload == "blocks":
            raise InputError("--shard-weights and --offload blocks both keep the block weights off the device: "
                             "choose one")
        if plan is not None and plan.weights_dtype in ("int8", "fp8"):
            raise InputError(f"--shard-weights shards float weights, not {plan.weights_dtype}: drop --weights-dtype "
                             "or --shard-weights")
        if step_cache is not None and getattr(step_cache, "needs_indicator", False):
            raise InputError(f"{step_cache.name} reads the first block's weights outside the block stack, which "
                             "--shard-weights keeps sharded: use --cache magcache")

    @property
    def cfg(self) -> Optional["CfgParallel"]:
        return CfgParallel(self.cfg_half, self.cfg_group) if self.config.cfg_parallel else None

    # -- rank 0 computes, everyone receives --------------------------------------------------------

    def from_main(self, fn: Callable[[], Any], device: Optional[torch.device] = None) -> Any:
        """``fn()`` run on rank 0 only; every rank returns its result (tensors moved to ``device``, default this
        process's). An exception on rank 0 is raised on every rank, so none waits forever."""
        payload: list = [None]
        result = None
        if self.is_main:
            try:
                result = fn()
                payload[0] = ("ok", _to_host(result))
            except BaseException as exc:  # noqa: BLE001 - re-raised here, after the others are told
                payload[0] = ("error", _portable_error(exc))
                dist.broadcast_object_list(payload, src=0)
                raise
        dist.broadcast_object_list(payload, src=0)
        status, value = payload[0]
        if status == "error":
            raise value
        if self.is_main:
            return result
        target = device if device is not None else self.device
        return _map_tensors(value, lambda t: t.to(target))

    def barrier(self) -> None:
        dist.barrier()

    def close(self) -> None:
        """Leave the process group (at the end of a run; sharded models are unusable after it)."""
        self._sharded.clear()
        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass(frozen=True)
class CfgParallel:
    """Real CFG with its two halves on different ranks: ``half`` 0 runs the conditional pass, 1 the unconditional
    one; :meth:`gather` gives every rank both velocities."""

    half: int
    group: Any

    def gather(self, v: Tensor) -> Tensor:
        """[v_cond; v_uncond] along the batch, identical on both ranks of the pair."""
        from .sequence import all_gather_cat

        return all_gather_cat(v, self.group, dim=0)
