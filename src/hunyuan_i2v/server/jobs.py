"""The durable job queue shared by the HTTP API, the web UI and the workers: SQLite in WAL mode.

One folder holds everything (``data_dir``)::

    jobs.sqlite3            the queue: one row per job (inputs, parameters with the LoRAs, status, progress,
                            timings, error)
    uploads/<sha256>.<ext>  uploaded images, stored once by the hash of their bytes
    outputs/<job id>.mp4    finished videos, written atomically (temporary file, then rename)
    previews/<job id>.png   a cheap look at the current latents while a job runs

Nothing a client sends becomes a path: job ids are generated here (32 hex digits) and checked by
:func:`check_job_id`, images are named by their hash and the format PIL detects, and a job's LoRAs are names
looked up in the server's LoRA listing (:mod:`.loras`). They are kept in the ``params`` JSON with the other job
parameters, so databases written before LoRAs existed open unchanged (their jobs have none).

A job goes ``queued -> running -> succeeded | failed | cancelled``. A worker claims a job atomically
(``BEGIN IMMEDIATE``), stamps it with its worker id and beats a heartbeat while it runs; every later update
is conditional on that stamp, so a worker that lost its job (it was re-queued) cannot overwrite it.
:meth:`JobStore.recover` re-queues running jobs whose worker is gone (its process has died, or its heartbeat
is older than ``stale_after``) and fails a job, with the reason, once it has used ``max_attempts``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import socket
import sqlite3
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from PIL import Image

from ..errors import InputError
from .settings import Limits, LimitError

if TYPE_CHECKING:
    from .loras import LoraCatalog

STATUSES = ("queued", "running", "succeeded", "failed", "cancelled")
FINISHED = ("succeeded", "failed", "cancelled")
_ID = re.compile(r"^[0-9a-f]{32}$")
_FORMATS = {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "BMP": "bmp", "GIF": "gif", "TIFF": "tif"}

_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    status TEXT NOT NULL CHECK (status IN ('queued', 'running', 'succeeded', 'failed', 'cancelled')),
    created REAL NOT NULL,
    started REAL,
    finished REAL,
    prompt TEXT NOT NULL,
    image TEXT NOT NULL,
    params TEXT NOT NULL,
    stage TEXT,
    progress REAL NOT NULL DEFAULT 0,
    step INTEGER,
    steps INTEGER,
    eta REAL,
    attempts INTEGER NOT NULL DEFAULT 0,
    max_attempts INTEGER NOT NULL,
    worker TEXT,
    heartbeat REAL,
    cancel_requested INTEGER NOT NULL DEFAULT 0,
    error TEXT,
    history TEXT NOT NULL DEFAULT '[]',
    result TEXT,
    output TEXT
);
CREATE INDEX IF NOT EXISTS jobs_status_created ON jobs (status, created);
"""


class JobNotFound(InputError):
    def __init__(self, job_id: str):
        super().__init__(f"no job {job_id!r}")


class JobStateError(InputError):
    """An action that the job's state does not allow (download before it finished, cancel after)."""


def check_job_id(job_id: str) -> str:
    if not isinstance(job_id, str) or not _ID.match(job_id):
        raise JobNotFound(str(job_id)[:64])
    return job_id


@dataclass(frozen=True)
class Job:
    id: str
    status: str
    created: float
    started: Optional[float]
    finished: Optional[float]
    prompt: str
    image: str  # file name under uploads/
    params: dict
    stage: Optional[str]
    progress: float
    step: Optional[int]
    steps: Optional[int]
    eta: Optional[float]
    attempts: int
    max_attempts: int
    worker: Optional[str]
    heartbeat: Optional[float]
    cancel_requested: bool
    error: Optional[str]
    history: list
    result: Optional[dict]  # what the worker reports: seed, size, timings, rewritten prompt
    output: Optional[str]  # file name under outputs/

    @property
    def finished_ok(self) -> bool:
        return self.status == "succeeded"

    def public(self) -> dict:
        """The job as a client sees it (no worker ids, no file-system names)."""
        now = time.time()
        end = self.finished or now
        return {
            "id": self.id,
            "status": self.status,
            "prompt": self.prompt,
            "params": self.params,
            "created": self.created,
            "started": self.started,
            "finished": self.finished,
            "queued_seconds": round((self.started or end) - self.created, 3),
            "run_seconds": round(end - self.started, 3) if self.started else None,
            "stage": self.stage,
            "progress": round(self.progress, 4),
            "step": self.step,
            "steps": self.steps,
            "eta_seconds": None if self.eta is None or self.status != "running" else round(self.eta, 1),
            "attempts": self.attempts,
            "max_attempts": self.max_attempts,
            "cancel_requested": self.cancel_requested,
            "error": self.error,
            "history": self.history,
            "result": self.result,
            "video": self.status == "succeeded",
        }


def _row_to_job(row: sqlite3.Row) -> Job:
    d = dict(row)
    d["params"] = json.loads(d["params"])
    d["history"] = json.loads(d["history"])
    d["result"] = json.loads(d["result"]) if d["result"] else None
    d["cancel_requested"] = bool(d["cancel_requested"])
    return Job(**d)


def new_worker_id(device: str) -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{device}:{uuid.uuid4().hex[:8]}"


def worker_alive(worker: Optional[str]) -> bool:
    """Whether the process behind a worker id still runs (only decidable on this host; True elsewhere)."""
    if not worker:
        return False
    host, _, rest = worker.partition(":")
    if host != socket.gethostname():
        return True
    try:
        pid = int(rest.split(":", 1)[0])
        os.kill(pid, 0)
    except (ValueError, ProcessLookupError):
        return False
    except PermissionError:
        return True
    try:  # a zombie (exited, not yet reaped) is not running
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return True


class JobStore:
    """The queue in ``data_dir``; each instance has its own SQLite connection (one per thread or process)."""

    def __init__(self, data_dir: os.PathLike | str, limits: Optional[Limits] = None, max_attempts: int = 3,
                 loras: Optional["LoraCatalog"] = None):
        self.root = Path(data_dir)
        self.limits = limits or Limits()
        self.max_attempts = max_attempts
        self.loras = loras  # the LoRAs a submitted job may name (None: none)
        for sub in ("uploads", "outputs", "previews", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)
        self.db_path = self.root / "jobs.sqlite3"
        self._db = sqlite3.connect(self.db_path, timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.row_factory = sqlite3.Row
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: durable at each checkpoint, never corrupt
        self._db.execute("PRAGMA busy_timeout=30000")
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def _transaction(self) -> Iterator[sqlite3.Connection]:
        self._db.execute("BEGIN IMMEDIATE")
        try:
            yield self._db
        except BaseException:
            self._db.execute("ROLLBACK")
            raise
        self._db.execute("COMMIT")

    # -- files -------------------------------------------------------------------------------------

    def store_image(self, data: bytes) -> str:
        """Check an uploaded image (size, format, pixel count from its header) and store it by content hash."""
        limits = self.limits
        if len(data) > limits.max_upload_bytes:
            raise LimitError(f"the image is {len(data)} bytes, over this server's limit of "
                             f"{limits.max_upload_bytes} bytes", status=413)
        if not data:
            raise LimitError("the image is empty")
        try:
            with Image.open(io.BytesIO(data)) as img:
                fmt, (w, h) = img.format, img.size
        except Exception:  # PIL raises several kinds for bytes that are not an image
            raise LimitError("the upload is not an image PIL can read (PNG, JPEG, WebP, BMP, GIF, TIFF)") from None
        if fmt not in _FORMATS:
            raise LimitError(f"unsupported image format {fmt}: use PNG, JPEG or WebP")
        if w * h > limits.max_image_pixels:
            raise LimitError(f"the image is {w}x{h} = {w * h} pixels, over this server's limit of "
                             f"{limits.max_image_pixels}", status=413)
        try:  # decode it fully now, so a truncated file is refused here and not in the worker
            from ..images import load_image

            with Image.open(io.BytesIO(data)) as img:
                load_image(img, max_pixels=limits.max_image_pixels)
        except InputError as exc:
            raise LimitError(str(exc)) from None
        except Exception:
            raise LimitError("the image is damaged or truncated and cannot be decoded") from None
        name = f"{hashlib.sha256(data).hexdigest()}.{_FORMATS[fmt]}"
        path = self.root / "uploads" / name
        if not path.exists():
            tmp = self.root / "tmp" / f"{name}.{uuid.uuid4().hex}.part"
            tmp.write_bytes(data)
            os.replace(tmp, path)
        return name

    def image_path(self, job: Job) -> Path:
        return self.root / "uploads" / job.image

    def output_path(self, job_id: str) -> Path:
        return self.root / "outputs" / f"{check_job_id(job_id)}.mp4"

    def preview_path(self, job_id: str) -> Path:
        return self.root / "previews" / f"{check_job_id(job_id)}.png"

    # -- clients -----------------------------------------------------------------------------------

    def submit(self, image: bytes, params: Any) -> Job:
        """Validate and queue a job; raises :class:`LimitError` (nothing stored) when over a limit."""
        from .settings import clean_params

        params = clean_params(params, self.limits, self.loras)
        if self.count("queued", "running") >= self.limits.max_queue:
            raise LimitError(f"the queue is full ({self.limits.max_queue} jobs): try again later", status=429)
        name = self.store_image(image)
        job_id = uuid.uuid4().hex
        with self._transaction() as db:
            db.execute("INSERT INTO jobs (id, status, created, prompt, image, params, stage, max_attempts) "
                       "VALUES (?, 'queued', ?, ?, ?, ?, 'queued', ?)",
                       (job_id, time.time(), params["prompt"], name, json.dumps(params), self.max_attempts))
        return self.get(job_id)

    def get(self, job_id: str) -> Job:
        row = self._db.execute("SELECT * FROM jobs WHERE id = ?", (check_job_id(job_id),)).fetchone()
        if row is None:
            raise JobNotFound(job_id)
        return _row_to_job(row)

    def list(self, status: Optional[str] = None, limit: int = 50, offset: int = 0) -> list[Job]:
        if status is not None and status not in STATUSES:
            raise InputError(f"status must be one of {', '.join(STATUSES)}, got {status!r}")
        limit, offset = max(1, min(int(limit), 500)), max(0, int(offset))
        where, args = ("WHERE status = ?", (status,)) if status else ("", ())
        rows = self._db.execute(f"SELECT * FROM jobs {where} ORDER BY created DESC LIMIT ? OFFSET ?",
                                (*args, limit, offset)).fetchall()
        return [_row_to_job(r) for r in rows]

    def count(self, *statuses: str) -> int:
        marks = ",".join("?" * len(statuses))
        return self._db.execute(f"SELECT COUNT(*) FROM jobs WHERE status IN ({marks})", statuses).fetchone()[0]

    def position(self, job_id: str) -> Optional[int]:
        """Place in the queue (0 = next) of a queued job, else None."""
        job = self.get(job_id)
        if job.status != "queued":
            return None
        return self._db.execute("SELECT COUNT(*) FROM jobs WHERE status = 'queued' AND created < ?",
                                (job.created,)).fetchone()[0]

    def cancel(self, job_id: str) -> Job:
        """Cancel a queued job now; ask the worker of a running one to stop at its next step."""
        with self._transaction() as db:
            row = db.execute("SELECT status FROM jobs WHERE id = ?", (check_job_id(job_id),)).fetchone()
            if row is None:
                raise JobNotFound(job_id)
            if row["status"] == "queued":
                db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, stage = 'cancelled', "
                           "cancel_requested = 1 WHERE id = ?", (time.time(), job_id))
            elif row["status"] == "running":
                db.execute("UPDATE jobs SET cancel_requested = 1 WHERE id = ?", (job_id,))
            else:
                raise JobStateError(f"job {job_id} has already {row['status']}; nothing to cancel")
        return self.get(job_id)

    # -- workers -----------------------------------------------------------------------------------

    def claim(self, worker: str) -> Optional[Job]:
        """Take the oldest queued job for ``worker`` (atomically), or None when the queue is empty."""
        now = time.time()
        with self._transaction() as db:
            row = db.execute("SELECT id FROM jobs WHERE status = 'queued' ORDER BY created LIMIT 1").fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET status = 'running', worker = ?, attempts = attempts + 1, started = ?, "
                       "heartbeat = ?, stage = 'starting', progress = 0, step = NULL, eta = NULL WHERE id = ?",
                       (worker, now, now, row["id"]))
        return self.get(row["id"])

    def update(self, job_id: str, worker: str, **fields: Any) -> bool:
        """Progress from the job's worker (stage, progress, step, steps, eta); also beats the heartbeat.

        Returns False when the job is no longer this worker's (re-queued elsewhere, or gone): stop working on it.
        """
        allowed = {"stage", "progress", "step", "steps", "eta"}
        if set(fields) - allowed:
            raise ValueError(f"cannot update {sorted(set(fields) - allowed)}")
        sets = ", ".join(f"{k} = ?" for k in fields)
        sets = f"{sets}, heartbeat = ?" if sets else "heartbeat = ?"
        cur = self._db.execute(f"UPDATE jobs SET {sets} WHERE id = ? AND worker = ? AND status = 'running'",
                               (*fields.values(), time.time(), job_id, worker))
        return cur.rowcount == 1

    def cancel_requested(self, job_id: str, worker: str) -> bool:
        row = self._db.execute("SELECT cancel_requested, worker, status FROM jobs WHERE id = ?", (job_id,)).fetchone()
        return row is None or bool(row["cancel_requested"]) or row["worker"] != worker or row["status"] != "running"

    def finish(self, job_id: str, worker: str, status: str, *, error: Optional[str] = None,
               result: Optional[dict] = None, output: Optional[str] = None) -> bool:
        if status not in FINISHED:
            raise ValueError(f"not a final status: {status}")
        now = time.time()
        cur = self._db.execute(
            "UPDATE jobs SET status = ?, finished = ?, error = ?, result = ?, output = ?, stage = ?, "
            "progress = CASE WHEN ? = 'succeeded' THEN 1.0 ELSE progress END, eta = NULL, heartbeat = ? "
            "WHERE id = ? AND worker = ? AND status = 'running'",
            (status, now, error, json.dumps(result) if result is not None else None, output, status, status, now,
             job_id, worker))
        return cur.rowcount == 1

    def release(self, job_id: str, worker: str, reason: str) -> bool:
        """Give a running job back to the queue without using up an attempt (a clean worker shutdown)."""
        with self._transaction() as db:
            row = db.execute("SELECT history FROM jobs WHERE id = ? AND worker = ? AND status = 'running'",
                             (job_id, worker)).fetchone()
            if row is None:
                return False
            history = json.loads(row["history"]) + [{"time": time.time(), "event": reason}]
            db.execute("UPDATE jobs SET status = 'queued', stage = 'queued (retry)', worker = NULL, heartbeat = NULL, "
                       "attempts = MAX(0, attempts - 1), progress = 0, step = NULL, eta = NULL, history = ? "
                       "WHERE id = ?", (json.dumps(history), job_id))
        return True

    def recover(self, stale_after: float = 60.0, *, dead: Optional[set[str]] = None) -> list[str]:
        """Re-queue running jobs whose worker is gone; fail those out of attempts. Returns the ids touched.

        A worker is gone when its process is not alive on this host, when it is in ``dead`` (the supervisor
        saw it exit), or when its heartbeat is older than ``stale_after`` seconds.
        """
        now = time.time()
        touched = []
        with self._transaction() as db:
            rows = db.execute("SELECT id, worker, heartbeat, attempts, max_attempts, history, step, steps, "
                              "cancel_requested FROM jobs WHERE status = 'running'").fetchall()
            for r in rows:
                stale = r["heartbeat"] is None or now - r["heartbeat"] > stale_after
                if not (stale or (dead and r["worker"] in dead) or not worker_alive(r["worker"])):
                    continue
                where = f" at step {r['step'] + 1}/{r['steps']}" if r["step"] is not None and r["steps"] else ""
                reason = f"the worker stopped while running it{where} (crash, kill or lost heartbeat)"
                history = json.loads(r["history"]) + [{"time": now, "attempt": r["attempts"], "event": reason}]
                if r["cancel_requested"]:
                    db.execute("UPDATE jobs SET status = 'cancelled', finished = ?, stage = 'cancelled', worker = NULL, "
                               "history = ? WHERE id = ?", (now, json.dumps(history), r["id"]))
                elif r["attempts"] >= r["max_attempts"]:
                    error = f"gave up after {r['attempts']} attempts: {reason}"
                    db.execute("UPDATE jobs SET status = 'failed', finished = ?, stage = 'failed', error = ?, "
                               "worker = NULL, history = ? WHERE id = ?", (now, error, json.dumps(history), r["id"]))
                else:
                    db.execute("UPDATE jobs SET status = 'queued', stage = 'queued (retry)', worker = NULL, "
                               "heartbeat = NULL, progress = 0, step = NULL, eta = NULL, history = ? WHERE id = ?",
                               (json.dumps(history), r["id"]))
                touched.append(r["id"])
        return touched
