"""One queue worker made of several processes (a torchrun group) that generate each video together.

Rank 0 is an ordinary :class:`~hunyuan_i2v.server.worker.Worker`: it claims jobs from the queue, beats the
heartbeat, reports progress and previews, writes the video and finishes the job. When it calls the pipeline it
first broadcasts the call (the job, the loaded image, the prompt after rewriting, the keyword arguments) to the
other ranks, which make the same call on their own pipeline; ``hunyuan_i2v.parallel`` keeps the ranks in step
inside it (seed, prompt embeddings and image latents come from rank 0). After every denoising step rank 0
broadcasts whether to go on, so a cancelled job, a job taken away or a shutdown stops every rank at the same step;
after the call the ranks exchange how it ended, so a failure on another rank fails the job on rank 0 with its
message. While the queue is empty rank 0 sends a keep-alive every few seconds (NCCL aborts collectives that wait
for ten minutes); a final "stop" ends the other ranks.

Launch (docs/multi-gpu.md)::

    hunyuan-i2v worker --data-dir DIR --nproc 4                     # starts the 4 processes itself
    torchrun --standalone --nproc_per_node 4 -m hunyuan_i2v.server.parallel_worker --data-dir DIR
    hunyuan-i2v serve --devices cuda:0-3                            # the server starts the group

A failure on one rank outside the collective steps (for example that rank alone running out of memory) cannot be
announced to the others: rank 0 then waits in a collective until torch.distributed's timeout, and the group exits
with an error, so that the server restarts it and re-queues the job.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from contextlib import nullcontext
from typing import Any, Optional

from ..errors import HunyuanI2VError, InputError
from .jobs import Job
from .worker import Worker, _die_with_parent

log = logging.getLogger(__name__)

KEEPALIVE_SECONDS = 30.0
_GROUP = re.compile(r"^(?:(cuda):(\d+)-(\d+)|(cpu|cuda)\*(\d+))$")


class _Stopped(Exception):
    """Rank 0 stopped the job at this step (cancelled, taken away or shutting down)."""


# -- device groups ----------------------------------------------------------------------------------

def parse_group(device: str) -> Optional[tuple[str, list[int]]]:
    """A device group of ``hunyuan-i2v serve --devices``: "cuda:A-B" (GPUs A..B) or "cuda*N" / "cpu*N" (N
    processes); (kind, device indices) or None for a single device."""
    m = _GROUP.match(device.strip())
    if m is None:
        return None
    if m.group(1):
        first, last = int(m.group(2)), int(m.group(3))
        if last <= first:
            raise InputError(f"device group {device!r}: the last GPU must come after the first, e.g. cuda:0-3")
        return "cuda", list(range(first, last + 1))
    n = int(m.group(5))
    if n < 2:
        raise InputError(f"device group {device!r} needs at least 2 processes, e.g. {m.group(4)}*2")
    return m.group(4), list(range(n))


def group_command(device: str, parent: int, env: dict) -> Optional[tuple[list[str], dict]]:
    """How :class:`~hunyuan_i2v.server.worker.WorkerPool` starts a device group: (command, environment), or None
    when ``device`` is a single device."""
    group = parse_group(device)
    if group is None:
        return None
    kind, indices = group
    env = dict(env)
    if kind == "cuda" and device.startswith("cuda:"):
        env["CUDA_VISIBLE_DEVICES"] = ",".join(str(i) for i in indices)
    cmd = [sys.executable, "-m", "hunyuan_i2v.server.parallel_worker", "--nproc", str(len(indices)),
           "--device", kind, "--parent", str(parent)]
    return cmd, env


# -- the group --------------------------------------------------------------------------------------

class _Group:
    """The collectives between rank 0 and the other ranks: messages, the per-step flag, the end of a call."""

    def __init__(self, par):
        import torch

        self.par = par
        self.flag = torch.zeros(1, dtype=torch.int32, device=par.device)

    def send(self, message: tuple) -> None:
        import torch.distributed as dist

        dist.broadcast_object_list([message], src=0)

    def receive(self) -> tuple:
        import torch.distributed as dist

        box: list = [None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def step(self, go: bool) -> bool:
        """Rank 0's decision for this step, on every rank."""
        import torch.distributed as dist

        self.flag.fill_(1 if go else 0)
        dist.broadcast(self.flag, src=0)
        return bool(self.flag.item())

    def outcomes(self, error: Optional[BaseException]) -> list[Optional[str]]:
        """How the call ended on each rank: None (it returned) or "Type: message"."""
        import torch.distributed as dist

        mine = None if error is None else f"{type(error).__name__}: {error}".splitlines()[0]
        every: list = [None] * self.par.world_size
        dist.all_gather_object(every, mine)
        return every


class _GroupPipeline:
    """Rank 0's pipeline for one job: calling it runs the call on every rank (everything else is the pipeline's)."""

    def __init__(self, worker: "GroupWorker", pipe, job: Job):
        self._worker, self._pipe, self._job = worker, pipe, job

    def __getattr__(self, name: str) -> Any:
        return getattr(self._pipe, name)

    def __call__(self, image, prompt, *, callback=None, **kwargs):
        group = self._worker.group
        group.send(("job", self._job, image, prompt, kwargs))

        def on_step(i: int, total: int, x) -> None:
            error = None
            try:
                if callback is not None:
                    callback(i, total, x)
            except BaseException as exc:  # noqa: BLE001 - raised again once the others know
                error = exc
            group.step(go=error is None)
            if error is not None:
                raise error

        try:
            out = self._pipe(image, prompt, callback=on_step, **kwargs)
        except BaseException as exc:
            self._worker.ended(exc)
            raise
        failed = [(r, o) for r, o in enumerate(self._worker.ended(None)) if o is not None]
        if failed:
            rank, outcome = failed[0]
            raise _OtherRankFailed(f"rank {rank} failed: {outcome}")
        return out


class _OtherRankFailed(HunyuanI2VError, RuntimeError):
    """Another rank of the group failed while rank 0 did not (the job fails with its message)."""


class GroupWorker(Worker):
    """A queue worker on every rank of a torchrun group: rank 0 serves the queue, the others follow it."""

    def __init__(self, settings, par):
        label = f"{par.device.type}*{par.world_size}"
        super().__init__(settings, label)
        self.par = par
        self.group = _Group(par)
        self.broken = False  # a collective failed: the group is no longer in step and must exit

    # -- shared by every rank -------------------------------------------------------------------

    def pipeline(self, job: Job):
        """The pipeline for the job's memory options, this rank's part of the group (reloaded when they change);
        rank 0 gets it wrapped so that its call runs on every rank."""
        opts = {k: job.params[k] for k in ("offload", "weights_dtype", "attention") if k in job.params}
        key = tuple(sorted(opts.items()))
        if self._pipe is None or key != self._pipe_key:
            from ..cli import bundled_model_dir
            from ..pipeline import I2VPipeline

            self._pipe = None
            model = self.settings.model or bundled_model_dir()
            self._pipe = I2VPipeline.from_pretrained(model, device=self.par.device, parallel=self.par, **opts)
            self._pipe_key = key
        return _GroupPipeline(self, self._pipe, job) if self.par.is_main else self._pipe

    def ended(self, error: Optional[BaseException]) -> list[Optional[str]]:
        try:
            return self.group.outcomes(error)
        except Exception:  # the group is out of step: give up on it
            self.broken = True
            raise

    def _loras_for(self, job: Job, pipe):
        job_loras = getattr(self, "_job_loras", None)  # the job's LoRAs, where the worker supports them
        return job_loras(job, pipe) if job_loras is not None else nullcontext()

    # -- rank 0 -------------------------------------------------------------------------------------

    def serve(self, poll: float = 0.25, parent: Optional[int] = None) -> None:
        if not self.par.is_main:
            return self.follow()
        log.info("worker %s ready (%s)", self.id, self.par.describe())
        last = time.monotonic()
        try:
            while not self._stop.is_set() and not self.broken:
                if parent is not None and os.getppid() != parent:
                    log.warning("worker %s: the server has gone; exiting", self.id)
                    return
                job = self.store.claim(self.id)
                if job is None:
                    if time.monotonic() - last > KEEPALIVE_SECONDS:
                        self.group.send(("idle",))
                        last = time.monotonic()
                    self._stop.wait(poll)
                    continue
                self.run(job)
                last = time.monotonic()
        finally:
            if not self.broken:
                self.group.send(("stop",))
        if self.broken:
            raise SystemExit("the processes of the group are out of step; exiting so that the group restarts")

    # -- ranks 1..N-1 -------------------------------------------------------------------------------

    def follow(self) -> None:
        """Make rank 0's pipeline calls until it says stop."""
        log.info("rank %d follows rank 0", self.par.rank)
        while True:
            message = self.group.receive()
            if message[0] == "stop":
                return
            if message[0] != "job":
                continue  # keep-alive
            _, job, image, prompt, kwargs = message
            error = None
            try:
                pipe = self.pipeline(job)
                with self._loras_for(job, pipe):
                    pipe(image, prompt, callback=self._follow_step, **kwargs)
            except _Stopped:
                pass
            except Exception as exc:  # noqa: BLE001 - reported to rank 0, which fails the job with it
                if not isinstance(exc, HunyuanI2VError):
                    log.exception("rank %d: job %s failed", self.par.rank, job.id)
                error = exc
            self.ended(error)

    def _follow_step(self, i: int, total: int, x) -> None:
        if not self.group.step(go=True):
            raise _Stopped()


# -- launching --------------------------------------------------------------------------------------

def fit_degrees(world: int, num_heads: int) -> tuple[int, int]:
    """(ulysses, ring) for ``world`` processes when none is given: as much Ulysses as the head count allows."""
    ulysses = math.gcd(world, num_heads)
    return ulysses, world // ulysses


def _settings(args: argparse.Namespace):
    """The ServerSettings: the server's (as JSON), else from the command line."""
    from pathlib import Path

    from .settings import ServerSettings
    from .worker import settings_from_json

    text = args.settings or os.environ.get("HUNYUAN_I2V_WORKER_SETTINGS")
    if text:
        return settings_from_json(text)
    data_dir = Path(args.data_dir or os.environ.get("HUNYUAN_I2V_DATA") or Path.home() / ".cache/hunyuan-i2v/server")
    return ServerSettings(data_dir=data_dir, model=Path(args.model) if args.model else None, devices=())


def _rank_argv(args: argparse.Namespace) -> list[str]:
    """The command line of each process of the group (the launcher's, less --nproc and --parent)."""
    argv = []
    for flag, value in (("--data-dir", args.data_dir), ("--model", args.model), ("--device", args.device),
                        ("--ulysses", args.ulysses), ("--ring", args.ring)):
        if value is not None:
            argv += [flag, str(value)]
    for flag, on in (("--cfg-parallel", args.cfg_parallel), ("--shard-weights", args.shard_weights),
                     ("--broadcast-weights", args.broadcast_weights), ("--no-parallel-vae", not args.parallel_vae)):
        if on:
            argv.append(flag)
    return argv


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _launch(args: argparse.Namespace) -> int:
    """Not under torchrun: start the ``--nproc`` processes on this host the way ``torchrun --standalone`` would
    (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) and watch them: a signal goes to every process
    (rank 0 then stops the group cleanly), and when one fails the others are stopped. Returns the group's exit
    code (0 after a clean stop)."""
    if args.parent is not None:
        _die_with_parent()
        if os.getppid() != args.parent:
            return 1  # the server died before this worker started
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), WORLD_SIZE=str(args.nproc))
    if args.settings:
        env["HUNYUAN_I2V_WORKER_SETTINGS"] = args.settings
    cmd = [sys.executable, "-m", "hunyuan_i2v.server.parallel_worker", *_rank_argv(args)]
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r), LOCAL_RANK=str(r))) for r in range(args.nproc)]

    stopping = []

    def forward(sig, _frame) -> None:
        stopping.append(sig)
        for p in procs:
            if p.poll() is None:
                p.send_signal(sig)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    while True:
        codes = [p.poll() for p in procs]
        if all(c is not None for c in codes) or (not stopping and any(c not in (None, 0) for c in codes)):
            break
        time.sleep(0.5)
    failed = [c for c in codes if c not in (None, 0)]
    if failed and not stopping:  # one process failed: the others cannot go on without it
        log.error("a process of the group exited with %s; stopping the others", failed[0])
        for p in procs:
            if p.poll() is None:
                p.kill()
    for p in procs:
        p.wait()
    return 0 if not failed else (failed[0] if failed[0] > 0 else 1)


def run(args: argparse.Namespace) -> int:
    """``hunyuan-i2v worker``: launch the group, or (under torchrun) be one of its processes."""
    from ..parallel.mesh import Parallel, ParallelConfig, init_distributed, launched_world

    launched = launched_world()
    if launched is None:
        if not args.nproc or args.nproc < 2:
            raise InputError("a multi-process worker needs at least 2 processes: give --nproc N, or start it "
                             "with torchrun --nproc_per_node N -m hunyuan_i2v.server.parallel_worker ...")
        return _launch(args)
    _die_with_parent()  # the processes end with the launcher (or torchrun) that started them
    settings = _settings(args)
    from ..cli import bundled_model_dir
    from ..layout import resolve_model_files
    from ..pipeline import model_config_for

    model = settings.model or bundled_model_dir()
    heads = model_config_for(resolve_model_files(model).require_complete()).transformer.num_heads
    ulysses, ring = args.ulysses, args.ring
    if ulysses is None and ring is None and not args.cfg_parallel:
        ulysses, ring = fit_degrees(launched[1], heads)
    config = ParallelConfig.for_world(launched[1], ulysses, ring, args.cfg_parallel, args.shard_weights,
                                      parallel_vae=args.parallel_vae, broadcast_weights=args.broadcast_weights)
    par = Parallel(config, init_distributed(args.device))
    worker = GroupWorker(settings, par)
    if par.is_main:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: worker.stop())
    else:  # rank 0 ends the group: the others wait for its "stop"
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: log.info("rank %d: waiting for rank 0 to stop the group", par.rank))
    try:
        worker.serve()
    finally:
        if not worker.broken:
            par.close()
    # A clean stop: every result is written and the group is closed. Leave without the interpreter's teardown,
    # where C++ destructors racing a collective's background thread can abort the process ("terminate called
    # without an active exception") and turn the clean stop into a failed exit code.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def main(argv: Optional[list[str]] = None) -> int:
    """``python -m hunyuan_i2v.server.parallel_worker ...``: the same as ``hunyuan-i2v worker ...``."""
    from ..cli import main as cli_main

    return cli_main(["worker", *(sys.argv[1:] if argv is None else argv)])


if __name__ == "__main__":
    sys.exit(main())
