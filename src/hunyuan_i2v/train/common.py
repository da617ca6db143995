"""Shared training machinery: a budgeted loop with exact resume, the LR schedule, EMA, checkpoints and logs.

A stage (VAE, DiT, later LoRA) implements :class:`TrainTask`: one optimiser step, an evaluation, its state and
a finishing step that writes its outputs. :func:`run_training` drives it under a time and/or step budget:

* LR multiplier (:func:`lr_scale`): linear warm-up over the first steps, constant, then a linear cooldown to
  ``lr_floor`` over the last ``cooldown`` fraction of the budget (docs/tiny-vae-probe: +1.9 dB for the VAE).
* Checkpoints (``RUN_DIR/checkpoint.pt``) hold the task state (model, EMA, optimiser, data sampler, its
  generators), the step, the elapsed time and the global torch/numpy/python RNG states, and are written
  atomically; a run killed at any moment resumes from the last one and replays the same steps bit for bit
  (with a step budget; with a time budget the schedule follows the clock, which no rerun repeats).
* The budget counts the time spent inside the loop (steps, evaluations, checkpoints) across resumes; loading
  data and models before the loop and the finishing step after it are not counted.
* ``RUN_DIR/log.jsonl``: one JSON record per line; on resume the records after the checkpoint are dropped, so
  the log reads as if the run had never stopped.
* Rerunning a finished run only repeats its finishing step; rerunning it with a larger budget trains on, and
  the LR climbs back from the cooldown to the constant part of the new schedule.
"""

from __future__ import annotations

import copy
import json
import logging
import math
import os
import random
import signal
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Optional, Protocol, Union

import numpy as np
import torch
from torch import nn

from ..errors import HunyuanI2VError, InputError

logger = logging.getLogger(__name__)


class TrainingDiverged(HunyuanI2VError):
    """The loss or the gradient norm became NaN or infinite: the run stops before saving the broken weights."""


CHECKPOINT_NAME = "checkpoint.pt"
LOG_NAME = "log.jsonl"
CHECKPOINT_FORMAT = 1
PathLike = Union[str, os.PathLike]


# ---------------------------------------------------------------------------------------------
# Schedule and budget


def lr_scale(step: int, progress: float, warmup_steps: int, cooldown: float = 0.15, floor: float = 0.1) -> float:
    """LR multiplier for optimiser step ``step`` (0-based) at ``progress`` (0..1) through the budget.

    Linear warm-up from 1/warmup_steps to 1 over the first ``warmup_steps`` steps; constant; then linear decay
    to ``floor`` over the final ``cooldown`` fraction of the budget.
    """
    warm = min(1.0, (step + 1) / warmup_steps) if warmup_steps > 0 else 1.0
    start = 1.0 - cooldown
    if cooldown > 0 and progress > start:
        done = min(1.0, (progress - start) / cooldown)
        return warm * (1.0 - (1.0 - floor) * done)
    return warm


@dataclass(frozen=True)
class Budget:
    """When training stops: after ``minutes`` of loop time or ``steps`` optimiser steps, whichever comes first."""

    minutes: Optional[float] = None
    steps: Optional[int] = None

    def __post_init__(self) -> None:
        if self.minutes is None and self.steps is None:
            raise InputError("give a training budget: --minutes M, --steps N, or both")
        if (self.minutes is not None and self.minutes <= 0) or (self.steps is not None and self.steps < 1):
            raise InputError(f"the budget must be positive, got minutes={self.minutes}, steps={self.steps}")

    def progress(self, step: int, elapsed: float) -> float:
        """Fraction of the budget used (0..1)."""
        parts = []
        if self.steps is not None:
            parts.append(step / self.steps)
        if self.minutes is not None:
            parts.append(elapsed / (60.0 * self.minutes))
        return min(1.0, max(parts))

    def done(self, step: int, elapsed: float) -> bool:
        return self.progress(step, elapsed) >= 1.0


# ---------------------------------------------------------------------------------------------
# EMA


class EMA:
    """Exponential moving average of a model's parameters, kept in a frozen copy of the model (:attr:`model`).

    With ``warmup`` the decay ramps as min(decay, (1 + n) / (10 + n)) over the first updates, so early weights
    are not averaged with the random initialisation for thousands of steps.
    """

    def __init__(self, model: nn.Module, decay: float = 0.999, warmup: bool = True):
        if not 0.0 <= decay < 1.0:
            raise InputError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay, self.warmup, self.updates = float(decay), bool(warmup), 0
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    def current_decay(self) -> float:
        n = self.updates
        return min(self.decay, (1.0 + n) / (10.0 + n)) if self.warmup else self.decay

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        weight = 1.0 - self.current_decay()
        self.updates += 1
        for ema_p, p in zip(self.model.parameters(), model.parameters()):
            ema_p.lerp_(p.detach(), weight)
        for ema_b, b in zip(self.model.buffers(), model.buffers()):
            ema_b.copy_(b)

    def state_dict(self) -> dict:
        return {"decay": self.decay, "warmup": self.warmup, "updates": self.updates, "model": self.model.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.decay, self.warmup, self.updates = float(state["decay"]), bool(state["warmup"]), int(state["updates"])
        self.model.load_state_dict(state["model"])


# ---------------------------------------------------------------------------------------------
# RNG states (as plain ints/lists/tensors, so checkpoints load with torch.load(weights_only=True))


def numpy_generator_state(rng: np.random.Generator) -> dict:
    return _plain(rng.bit_generator.state)


def set_numpy_generator_state(rng: np.random.Generator, state: dict) -> None:
    rng.bit_generator.state = state


def capture_global_rng() -> dict:
    np_state = np.random.get_state(legacy=False)
    return {
        "torch": torch.get_rng_state(),
        "numpy": _plain(np_state),
        "python": _plain(random.getstate()),
    }


def restore_global_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np_state = dict(state["numpy"])
    np_state["state"] = dict(np_state["state"])
    np_state["state"]["key"] = np.asarray(np_state["state"]["key"], dtype=np.uint32)
    np.random.set_state(np_state)
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))


def _plain(obj: Any) -> Any:
    """numpy arrays and scalars -> lists and Python numbers; tuples -> lists (weights_only-loadable)."""
    if isinstance(obj, dict):
        return {k: _plain(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_plain(v) for v in obj]
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, np.generic):
        return obj.item()
    return obj


class EpochSampler:
    """Indices 0..n-1 in a fresh random order every epoch, drawn ``batch`` at a time; state is checkpointable."""

    def __init__(self, n: int, seed: int = 0):
        if n < 1:
            raise InputError("cannot sample batches from an empty dataset")
        self.n = n
        self.rng = np.random.default_rng(seed)
        self.order = self.rng.permutation(n)
        self.position = 0
        self.epoch = 0

    def next(self, batch: int) -> np.ndarray:
        out = []
        while len(out) < batch:
            if self.position >= self.n:
                self.order, self.position, self.epoch = self.rng.permutation(self.n), 0, self.epoch + 1
            take = min(batch - len(out), self.n - self.position)
            out.extend(self.order[self.position : self.position + take].tolist())
            self.position += take
        return np.asarray(out, dtype=np.int64)

    def state_dict(self) -> dict:
        return {"rng": numpy_generator_state(self.rng), "order": self.order.tolist(), "position": self.position,
                "epoch": self.epoch, "n": self.n}

    def load_state_dict(self, state: dict) -> None:
        if int(state["n"]) != self.n:
            raise InputError(f"the checkpoint sampled from {state['n']} items but the data now has {self.n}: "
                             "resume with the same data, or start a new run folder")
        set_numpy_generator_state(self.rng, state["rng"])
        self.order = np.asarray(state["order"], dtype=np.int64)
        self.position, self.epoch = int(state["position"]), int(state["epoch"])


# ---------------------------------------------------------------------------------------------
# Files: checkpoints and logs


def atomic_write(path: PathLike, write) -> None:
    """Call ``write(tmp_path)``, fsync, then rename onto ``path``: a crash leaves the old file or the new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        write(tmp)
        with open(tmp, "rb+") as handle:
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_json(path: PathLike, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=1) + "\n"))


def save_checkpoint(path: PathLike, state: dict) -> None:
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(path: PathLike) -> dict:
    return torch.load(path, map_location="cpu", weights_only=True)


class JsonlLog:
    """Append-only JSON-lines log; each record is flushed at once so a killed run keeps what it logged."""

    def __init__(self, path: PathLike):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, record: dict) -> None:
        with open(self.path, "a", encoding="utf-8") as handle:
            handle.write(json.dumps(record) + "\n")

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after ``step`` (written after the checkpoint we resume from) and torn lines."""
        if not self.path.exists():
            return
        kept = [r for r in read_jsonl(self.path) if int(r.get("step", 0)) <= step]
        atomic_write(self.path, lambda tmp: Path(tmp).write_text("".join(json.dumps(r) + "\n" for r in kept)))


def read_jsonl(path: PathLike) -> list[dict]:
    """The records of a JSON-lines file; a torn last line (a kill mid-write) is skipped."""
    records = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


# ---------------------------------------------------------------------------------------------
# Progress bar and stop requests


class BudgetBar:
    """tqdm bar over the budget's progress (whichever of time and steps runs out first), so its ETA is the time
    left in the budget; the step, loss and LR multiplier are shown after it."""

    TOTAL = 1000

    def __init__(self, budget: Budget, step: int, elapsed: float, desc: str, enabled: bool = True):
        from tqdm.auto import tqdm

        self.budget = budget
        self.bar = tqdm(total=self.TOTAL, initial=self._n(step, elapsed), desc=desc, disable=not enabled,
                        dynamic_ncols=True,
                        bar_format="{desc}: {percentage:3.0f}%|{bar}| {elapsed}<{remaining}{postfix}")

    def _n(self, step: int, elapsed: float) -> int:
        return int(self.budget.progress(step, elapsed) * self.TOTAL)

    def update(self, step: int, elapsed: float, **postfix) -> None:
        n = self._n(step, elapsed)
        if n > self.bar.n:
            self.bar.update(n - self.bar.n)
        self.bar.set_postfix({"step": step, **postfix}, refresh=False)

    def close(self) -> None:
        self.bar.close()


class StopRequest:
    """Turns SIGINT / SIGTERM into a flag the loop checks between steps, so the run stops at a clean step and
    saves a checkpoint; a second Ctrl-C interrupts at once."""

    def __init__(self) -> None:
        self.requested = False
        self._previous: dict[int, Any] = {}

    def __enter__(self) -> "StopRequest":
        try:
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        except ValueError:  # not the main thread: no handlers, no graceful stop
            self._previous.clear()
        return self

    def _handle(self, signum, frame) -> None:
        if self.requested and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self.requested = True
        logger.warning("stop requested: finishing this step and saving a checkpoint (Ctrl-C again to abort)")

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------------------------------------
# The loop


@dataclass
class LoopSettings:
    """How :func:`run_training` schedules a run. ``eval_every_min`` None (and no ``eval_every_steps``): evaluate
    only at the end."""

    budget: Budget
    warmup_steps: int = 30
    cooldown: float = 0.15
    lr_floor: float = 0.1
    ckpt_every_min: float = 5.0
    eval_every_min: Optional[float] = 5.0
    eval_every_steps: Optional[int] = None  # also evaluate every N steps (None: by time only)
    log_every: int = 10
    resume: bool = False
    progress: bool = True


class TrainTask(Protocol):
    """A training stage as :func:`run_training` sees it."""

    name: str

    def identity(self) -> dict:
        """What must match for a checkpoint to be resumed (model config, data); JSON-serialisable."""

    def prepare(self, run_dir: Path) -> None:
        """Write run files that later stages read (called before training starts or resumes)."""

    def train_step(self, lr_scale: float) -> dict[str, float]:
        """One optimiser step at base LR x ``lr_scale``; returns metrics (at least ``loss``)."""

    def evaluate(self, step: int) -> dict[str, Any]:
        """Periodic evaluation; must not consume the training random streams."""

    def state_dict(self) -> dict:
        """Everything needed to continue exactly: model, EMA, optimiser, sampler and generator states."""

    def load_state_dict(self, state: dict) -> None: ...

    def finish(self, run_dir: Path, step: int) -> dict[str, Any]:
        """Write the stage's outputs (idempotent: a rerun after a finished run calls it again)."""


def run_training(task: TrainTask, run_dir: PathLike, settings: LoopSettings) -> dict[str, Any]:
    """Train ``task`` under ``settings.budget``, checkpointing into ``run_dir``; returns the finish() summary."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    ckpt_path, log = run_dir / CHECKPOINT_NAME, JsonlLog(run_dir / LOG_NAME)
    budget = settings.budget
    step, elapsed, last_ckpt, last_eval, window = 0, 0.0, 0.0, 0.0, []

    if ckpt_path.exists():
        if not settings.resume:
            raise InputError(f"{run_dir} already holds a checkpoint: pass --resume to continue it, "
                             "or choose another --out folder")
        state = load_checkpoint(ckpt_path)
        if state.get("format") != CHECKPOINT_FORMAT or state.get("stage") != task.name:
            raise InputError(f"{ckpt_path} is not a {task.name} checkpoint of this version; use another --out folder")
        if state["identity"] != _json_roundtrip(task.identity()):
            raise InputError(f"{ckpt_path} was made with another model config or data ({state['identity']}); "
                             "resume with the same settings, or use another --out folder")
        task.load_state_dict(state["task"])
        loop = state["loop"]
        step, elapsed, window = int(loop["step"]), float(loop["elapsed"]), list(loop["window"])
        last_ckpt, last_eval = float(loop["last_ckpt"]), float(loop["last_eval"])
        restore_global_rng(state["rng"])
        log.truncate_after(step)
        log.write({"event": "resume", "step": step, "elapsed": round(elapsed, 2)})
        logger.info("resumed %s at step %d (%.1f min elapsed)", run_dir, step, elapsed / 60)
    else:
        log.truncate_after(-1)  # a log without a checkpoint belongs to a run that never saved: start clean
        log.write({"event": "start", "step": 0, "stage": task.name, "identity": _json_roundtrip(task.identity()),
                   "budget": {"minutes": budget.minutes, "steps": budget.steps}})
    task.prepare(run_dir)

    def save() -> None:
        save_checkpoint(ckpt_path, {
            "format": CHECKPOINT_FORMAT, "stage": task.name, "identity": _json_roundtrip(task.identity()),
            "task": task.state_dict(), "rng": capture_global_rng(),
            "loop": {"step": step, "elapsed": elapsed, "window": window, "last_ckpt": last_ckpt,
                     "last_eval": last_eval},
        })

    def run_eval() -> None:
        nonlocal elapsed
        started = time.perf_counter()
        rng = capture_global_rng()
        metrics = task.evaluate(step)
        restore_global_rng(rng)  # evaluation never shifts the training streams
        seconds = time.perf_counter() - started
        elapsed += seconds
        log.write({"event": "eval", "step": step, "elapsed": round(elapsed, 2), "seconds": round(seconds, 2),
                   **metrics})
        logger.info("step %d eval: %s", step, _short(metrics))

    bar = BudgetBar(budget, step, elapsed, task.name, settings.progress)
    every_ckpt = 60.0 * settings.ckpt_every_min
    every_eval = 60.0 * settings.eval_every_min if settings.eval_every_min else math.inf
    last_loss = float("nan")
    try:
        with StopRequest() as stop:
            while not budget.done(step, elapsed) and not stop.requested:
                started = time.perf_counter()
                scale = lr_scale(step, budget.progress(step, elapsed), settings.warmup_steps, settings.cooldown,
                                 settings.lr_floor)
                metrics = task.train_step(scale)
                bad = [k for k in ("loss", "grad_norm") if k in metrics and not math.isfinite(float(metrics[k]))]
                if bad:  # the weights are already (or about to be) NaN: keep the last checkpoint, do not save
                    log.write({"event": "diverged", "step": step + 1, "elapsed": round(elapsed, 2),
                               **{k: float(metrics[k]) for k in bad}})
                    raise TrainingDiverged(
                        f"{task.name} training diverged at step {step + 1} ({' and '.join(bad)} not finite); the "
                        f"last checkpoint in {run_dir} is kept: rerun with a lower --lr (or without --bf16)")
                step += 1
                window.append({k: float(v) for k, v in metrics.items()})
                elapsed += time.perf_counter() - started
                last_loss = float(metrics["loss"])
                if len(window) >= settings.log_every:
                    log.write({"step": step, "elapsed": round(elapsed, 2), "lr_scale": scale, **_mean(window)})
                    window = []
                due = elapsed - last_eval >= every_eval or (
                    settings.eval_every_steps is not None and step % settings.eval_every_steps == 0)
                if due and not budget.done(step, elapsed):  # finish() evaluates
                    run_eval()
                    last_eval = elapsed
                if elapsed - last_ckpt >= every_ckpt:
                    started = time.perf_counter()
                    last_ckpt = elapsed
                    save()
                    elapsed += time.perf_counter() - started
                bar.update(step, elapsed, loss=f"{last_loss:.4f}", lr=f"{scale:.2f}")
            if window and budget.done(step, elapsed):
                log.write({"step": step, "elapsed": round(elapsed, 2), **_mean(window)})
                window = []
            save()
            if stop.requested and not budget.done(step, elapsed):
                log.write({"event": "stopped", "step": step, "elapsed": round(elapsed, 2)})
                logger.warning("stopped at step %d; rerun the same command with --resume to continue", step)
                return {"stopped": True, "step": step}
    finally:
        bar.close()

    summary = task.finish(run_dir, step)
    log.write({"event": "finish", "step": step, "elapsed": round(elapsed, 2), **summary})
    return summary


def _mean(records: Iterable[dict[str, float]]) -> dict[str, float]:
    records = list(records)
    keys = records[0].keys()
    return {k: sum(r[k] for r in records) / len(records) for k in keys}


def _short(metrics: dict) -> str:
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
                     if not isinstance(v, (list, dict)))


def _json_roundtrip(data: Any) -> Any:
    return json.loads(json.dumps(data))


def set_threads(threads: int) -> None:
    """Intra-op threads for this process (the CLI default is 2: the whole demo machine)."""
    if threads < 1:
        raise InputError(f"--threads must be at least 1, got {threads}")
    torch.set_num_threads(threads)


def uint8_video(x: torch.Tensor) -> np.ndarray:
    """[B, 3, T, H, W] in [-1, 1] -> uint8 [B, T, H, W, 3] (rounded, like a saved video)."""
    x = ((x.float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return x.permute(0, 2, 3, 4, 1).cpu().numpy()


def video_tensor(videos: np.ndarray) -> torch.Tensor:
    """uint8 [B, T, H, W, 3] -> float [B, 3, T, H, W] in [-1, 1]."""
    x = torch.from_numpy(np.ascontiguousarray(videos)).float()
    return (x / 127.5 - 1.0).permute(0, 4, 1, 2, 3).contiguous()


def psnr_uint8(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB (0-255 scale) of each pair of uint8 arrays along the first axis; inf for identical ones."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    mse = ((a - b) ** 2).reshape(len(a), -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / mse)
