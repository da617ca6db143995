"""A queue worker: one process per device that takes jobs from the store and generates their videos.

Started by :class:`WorkerPool` (inside ``hunyuan-i2v serve`` / ``ui``) as ``python -m hunyuan_i2v.server.worker``.
It keeps one pipeline loaded between jobs, reports progress, an ETA and a latent preview at every step, stops
at the next step when a job is cancelled, and dies with its server (``PR_SET_PDEATHSIG`` on Linux, a parent
check elsewhere), so that after a ``kill -9`` of the server the job it ran is re-queued by the next start.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import traceback
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import numpy as np

from ..errors import HunyuanI2VError
from .jobs import Job, JobStore, new_worker_id
from .loras import LoraCatalog, LoraRemovalError, job_loras
from .settings import Limits, ServerSettings

log = logging.getLogger("hunyuan_i2v.server.worker")  # not __name__: run with -m, that would be __main__

PREVIEW_FRAMES = 6  # latent frames shown side by side in the preview strip
PREVIEW_HEIGHT = 96


class JobCancelled(Exception):
    pass


class JobInterrupted(Exception):
    """The worker is shutting down (SIGTERM): give the job back to the queue without using an attempt."""


class JobLost(Exception):
    """The job was taken from this worker (re-queued after a missed heartbeat); drop it silently."""


# -- settings travel to the worker process as JSON -----------------------------------------------

def settings_to_json(settings: ServerSettings) -> str:
    d = dataclasses.asdict(settings)
    d["data_dir"] = str(settings.data_dir)
    d["model"] = str(settings.model) if settings.model else None
    d["lora_dir"] = str(settings.lora_dir) if settings.lora_dir is not None else None
    return json.dumps(d)


def settings_from_json(text: str) -> ServerSettings:
    d = json.loads(text)
    d["data_dir"] = Path(d["data_dir"])
    d["model"] = Path(d["model"]) if d["model"] else None
    d["lora_dir"] = Path(d["lora_dir"]) if d.get("lora_dir") is not None else None
    d["devices"] = tuple(d["devices"])
    limits = d.pop("limits")
    limits["resolutions"] = tuple(limits["resolutions"])
    return ServerSettings(limits=Limits(**limits), **d)


# -- latent preview -------------------------------------------------------------------------------

def fit_latent_to_rgb(latent: Any, rgb: np.ndarray) -> np.ndarray:
    """Least-squares linear map [C + 1, 3] from a latent frame [C, h, w] to the image [h, w, 3] in 0..1.

    Fitted per job on the clean first-frame latent and the input photo at latent resolution: a cheap,
    model-agnostic latent -> colour preview (the idea of the "latent2rgb" previews of ComfyUI).
    """
    c = latent.shape[0]
    a = np.concatenate([latent.reshape(c, -1).T, np.ones((latent[0].size, 1), np.float32)], axis=1)
    b = rgb.reshape(-1, 3)
    m, *_ = np.linalg.lstsq(a.astype(np.float64), b.astype(np.float64), rcond=None)
    return m.astype(np.float32)


def preview_strip(latents: np.ndarray, mapping: Optional[np.ndarray]) -> np.ndarray:
    """uint8 RGB strip of up to PREVIEW_FRAMES latent frames of latents [C, T, h, w]."""
    c, t, h, w = latents.shape
    picks = sorted({round(i * (t - 1) / max(1, PREVIEW_FRAMES - 1)) for i in range(min(t, PREVIEW_FRAMES))})
    tiles = []
    for i in picks:
        x = latents[:, i].reshape(c, -1).T
        if mapping is not None:
            rgb = np.concatenate([x, np.ones((x.shape[0], 1), np.float32)], axis=1) @ mapping
        else:  # no clean frame to fit on: the first three channels, normalised
            rgb = x[:, :3] if c >= 3 else np.repeat(x[:, :1], 3, axis=1)
            rgb = (rgb - rgb.min(0)) / (np.ptp(rgb, 0) + 1e-6)
        tiles.append(rgb.reshape(h, w, 3))
    strip = np.concatenate(tiles, axis=1)
    return (np.clip(strip, 0, 1) * 255).round().astype(np.uint8)


def _write_png_atomic(path: Path, rgb: np.ndarray) -> None:
    from PIL import Image

    img = Image.fromarray(rgb)
    scale = max(1, PREVIEW_HEIGHT // img.height)
    if scale > 1:
        img = img.resize((img.width * scale, img.height * scale), Image.NEAREST)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    img.save(tmp, format="PNG")
    os.replace(tmp, path)


# -- the worker -------------------------------------------------------------------------------------

class Worker:
    def __init__(self, settings: ServerSettings, device: str):
        self.settings = settings
        self.device = device
        self.id = new_worker_id(device)
        self.store = JobStore(settings.data_dir, settings.limits, settings.max_attempts)
        self.loras = LoraCatalog.for_settings(settings)
        self._pipe = None
        self._pipe_key: Optional[tuple] = None
        self._stop = threading.Event()
        self._decode_seconds: Optional[float] = None  # last decode + write time, for the ETA

    def stop(self) -> None:
        self._stop.set()

    def serve(self, poll: float = 0.25, parent: Optional[int] = None) -> None:
        log.info("worker %s ready", self.id)
        while not self._stop.is_set():
            if parent is not None and os.getppid() != parent:
                log.warning("worker %s: the server has gone; exiting", self.id)
                return
            job = self.store.claim(self.id)
            if job is None:
                self._stop.wait(poll)
                continue
            self.run(job)

    def pipeline(self, job: Job):
        """The loaded pipeline for the job's memory options (reloaded only when they change)."""
        opts = {k: job.params[k] for k in ("offload", "weights_dtype", "attention") if k in job.params}
        key = tuple(sorted(opts.items()))
        if self._pipe is None or key != self._pipe_key:
            from ..cli import bundled_model_dir
            from ..pipeline import I2VPipeline

            self._pipe = None
            model = self.settings.model or bundled_model_dir()
            self._pipe = I2VPipeline.from_pretrained(model, device=self.device, **opts)
            self._pipe_key = key
        return self._pipe

    def run(self, job: Job) -> None:
        store, wid = self.store, self.id
        beat_stop = threading.Event()
        beat = threading.Thread(target=self._heartbeat, args=(job.id, beat_stop), daemon=True)
        beat.start()
        t0 = time.time()
        try:
            self._check(job)
            store.update(job.id, wid, stage="loading the model", progress=0.01)
            pipe = self.pipeline(job)
            t_load = time.time()
            with self._job_loras(job, pipe):
                result = self._generate(job, pipe, t0, t_load)
        except JobCancelled:
            store.finish(job.id, wid, "cancelled", error="cancelled by request")
        except JobInterrupted:
            store.release(job.id, wid, "the server shut down; re-queued")
        except JobLost:
            log.warning("job %s was re-queued elsewhere; dropped", job.id)
        except HunyuanI2VError as exc:
            store.finish(job.id, wid, "failed", error=str(exc).splitlines()[0])
        except Exception as exc:  # a bug or a device failure: record it, keep serving
            log.error("job %s failed:\n%s", job.id, traceback.format_exc())
            store.finish(job.id, wid, "failed", error=f"internal error: {type(exc).__name__}: {exc}".splitlines()[0])
        else:
            store.finish(job.id, wid, "succeeded", result=result, output=store.output_path(job.id).name)
        finally:
            beat_stop.set()
            beat.join()

    @contextmanager
    def _job_loras(self, job: Job, pipe) -> Iterator[None]:
        """The job's LoRAs as adapters on the kept pipeline, for this job only."""
        try:
            with job_loras(pipe, job.params.get("loras", []), self.loras):
                yield
        except LoraRemovalError:
            self._pipe = None  # reloaded by the next job: none may run with this job's LoRAs
            raise

    def _heartbeat(self, job_id: str, stop: threading.Event) -> None:
        store = JobStore(self.settings.data_dir, self.settings.limits, self.settings.max_attempts)
        try:
            interval = max(0.5, min(5.0, self.settings.stale_after / 6))
            while not stop.wait(interval):
                if not store.update(job_id, self.id):
                    return
        finally:
            store.close()

    def _check(self, job: Job) -> None:
        if self._stop.is_set():
            raise JobInterrupted()
        if self.store.cancel_requested(job.id, self.id):
            if self.store.get(job.id).worker != self.id:
                raise JobLost()
            raise JobCancelled()

    def _generate(self, job: Job, pipe, t0: float, t_load: float) -> dict:
        from ..buckets import resize_and_center_crop
        from ..images import load_image
        from ..video import write_video

        store, wid, p = self.store, self.id, dict(job.params)
        prompt, rewrite_info = p["prompt"], {}
        if p.get("rewrite"):
            store.update(job.id, wid, stage="rewriting the prompt")
            rewritten = rewrite(prompt, p["rewrite"], self.settings.rewrite)
            prompt = rewritten.prompt
            rewrite_info = {"original_prompt": rewritten.original, "rewrite_mode": rewritten.mode,
                            "rewrite_backend": rewritten.backend, "prompt_warnings": list(rewritten.warnings)}
        image = load_image(store.image_path(job), max_pixels=self.settings.limits.max_image_pixels)
        kwargs = dict(negative_prompt=p.get("negative_prompt"), resolution=p.get("resolution"),
                      height=p.get("height"), width=p.get("width"), num_frames=p.get("frames"),
                      steps=p.get("steps"), seed=p.get("seed"), flow_shift=p.get("flow_shift"),
                      stability=p.get("stability", False), guidance=p.get("guidance"), cfg_scale=p.get("cfg_scale"))
        h, w = output_size(pipe, image, p)
        s = pipe.config.vae.spatial_compression
        small = np.asarray(resize_and_center_crop(image, h, w).resize((w // s, h // s)), np.float32) / 255.0
        token_replace = pipe.config.transformer.condition_type == "token_replace"
        state: dict[str, Any] = {"mapping": None, "times": [], "last_preview": 0.0}
        store.update(job.id, wid, stage="encoding the prompt and image", progress=0.03)
        preview = store.preview_path(job.id)
        t_gen = time.time()

        def on_step(i: int, total: int, x) -> None:
            now = time.time()
            times = state["times"]
            times.append(now)
            # seconds per step: from the steps seen so far (the first one also paid for the encoders)
            rate = (now - times[0]) / (len(times) - 1) if len(times) > 1 else now - t_gen
            remaining = (total - i - 1) * rate + (self._decode_seconds or rate * 2)
            stage = "decoding" if i + 1 == total else "denoising"
            if not store.update(job.id, wid, stage=stage, progress=0.05 + 0.85 * (i + 1) / total, step=i,
                                steps=total, eta=remaining):
                raise JobLost()
            if now - state["last_preview"] > 1.0 or i + 1 == total:
                lat = x[0].detach().float().cpu().numpy()
                if token_replace and state["mapping"] is None and lat.shape[2:] == small.shape[:2]:
                    state["mapping"] = fit_latent_to_rgb(lat[:, 0], small)
                _write_png_atomic(preview, preview_strip(lat, state["mapping"]))
                state["last_preview"] = time.time()
            self._check(job)

        out = pipe(image, prompt, **kwargs, progress=False, callback=on_step)
        t_denoised = state["times"][-1] if state["times"] else t_gen
        t_decoded = time.time()
        store.update(job.id, wid, stage="writing the video", progress=0.95)
        meta = out.settings.for_video(0)
        meta.update(rewrite_info)
        lora_info = {"loras": pipe.loras, "lora_mode": pipe.lora_mode} if pipe.loras else {}
        meta.update(lora_info)
        fps = p.get("fps") or pipe.config.sampler.fps
        write_video(store.output_path(job.id), out.frames[0], fps=fps, metadata=meta)
        t_end = time.time()
        self._decode_seconds = t_end - t_denoised
        frames = out.frames[0]
        return {
            "seed": meta["seed"], "prompt": prompt, **rewrite_info, **lora_info,
            "width": int(frames.shape[2]), "height": int(frames.shape[1]), "frames": int(frames.shape[0]),
            "fps": fps, "model": pipe.name, "device": self.device,
            "timings": {"load": round(t_load - t0, 3), "denoise": round(t_denoised - t_gen, 3),
                        "decode": round(t_decoded - t_denoised, 3), "write": round(t_end - t_decoded, 3),
                        "total": round(t_end - t0, 3)},
        }


def output_size(pipe, image, params: dict) -> tuple[int, int]:
    """The (height, width) the pipeline will make for this image and these parameters (as I2VPipeline does)."""
    defaults = pipe.config.sampler
    if not (params.get("resolution") or params.get("height")) and defaults.height is not None:
        return defaults.height, defaults.width
    return pipe.target_size(image, params.get("resolution") or defaults.resolution, params.get("height"),
                            params.get("width"))


def rewrite(prompt: str, mode: str, options: dict):
    from ..rewrite import backend_from_options, rewrite_prompt

    backend = None if mode == "lint" else backend_from_options(**options)
    return rewrite_prompt(prompt, mode, backend)


# -- process management -----------------------------------------------------------------------------

def _die_with_parent() -> None:
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            libc = ctypes.CDLL("libc.so.6", use_errno=True)
            libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        except OSError:
            pass


class WorkerPool:
    """One worker process per device; restarts a worker that dies and re-queues the job it held."""

    def __init__(self, settings: ServerSettings):
        self.settings = settings
        self.procs: dict[str, subprocess.Popen] = {}
        self.restarts: dict[str, int] = {d: 0 for d in settings.devices}
        self._payload = settings_to_json(settings)

    def start(self) -> None:
        for device in self.settings.devices:
            self._spawn(device)

    def _spawn(self, device: str) -> None:
        from .parallel_worker import group_command

        cmd = [sys.executable, "-m", "hunyuan_i2v.server.worker", "--device", device, "--parent", str(os.getpid())]
        env = dict(os.environ, HUNYUAN_I2V_WORKER_SETTINGS=self._payload)
        cmd, env = group_command(device, os.getpid(), env) or (cmd, env)  # "cuda:0-3": one torchrun group
        self.procs[device] = subprocess.Popen(cmd, env=env)

    def check(self) -> None:
        """Reap dead workers, re-queue their jobs and start replacements (call every few seconds)."""
        store = JobStore(self.settings.data_dir, self.settings.limits, self.settings.max_attempts)
        try:
            died = False
            for device, proc in list(self.procs.items()):
                if proc.poll() is not None:
                    log.warning("worker on %s exited with %s; restarting", device, proc.returncode)
                    died = True
                    self.restarts[device] += 1
                    self._spawn(device)
            store.recover(self.settings.stale_after)
            if died:
                log.info("re-queued the jobs of the dead workers")
        finally:
            store.close()

    def status(self) -> list[dict]:
        return [{"device": d, "pid": p.pid, "alive": p.poll() is None, "restarts": self.restarts[d]}
                for d, p in self.procs.items()]

    def stop(self, timeout: float = 10.0) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.time() + timeout
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.time()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hunyuan_i2v.server.worker",
                                     description="a hunyuan-i2v queue worker (started by `hunyuan-i2v serve`)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--parent", type=int, default=None, help="exit when this process is no longer the parent")
    parser.add_argument("--settings", default=None, help="ServerSettings as JSON (default: $HUNYUAN_I2V_WORKER_SETTINGS)")
    args = parser.parse_args(argv)
    # A service's log: every line says when (the worker's claims, steps and failures are read next to the server's).
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    _die_with_parent()
    text = args.settings or os.environ.get("HUNYUAN_I2V_WORKER_SETTINGS")
    if not text:
        parser.error("no settings: give --settings or set HUNYUAN_I2V_WORKER_SETTINGS")
    worker = Worker(settings_from_json(text), args.device)
    signal.signal(signal.SIGTERM, lambda *_: worker.stop())
    if args.parent is not None and os.getppid() != args.parent:
        return 1  # the server died before this worker started
    worker.serve(parent=args.parent)
    return 0


if __name__ == "__main__":
    sys.exit(main())
