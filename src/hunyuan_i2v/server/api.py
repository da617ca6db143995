"""The HTTP service (``hunyuan-i2v serve``): FastAPI over the job queue, workers in their own processes.

Endpoints (OpenAPI documentation at ``/docs`` and ``/openapi.json``)::

    POST /v1/jobs                 multipart: image (file) + params (JSON object)  -> 202 {"id": ..., ...}
    GET  /v1/jobs                 list (?status=queued|running|succeeded|failed|cancelled&limit=&offset=)
    GET  /v1/jobs/{id}            status, progress, ETA, timings, error
    GET  /v1/jobs/{id}/video      the MP4 once the job succeeded (409 before)
    GET  /v1/jobs/{id}/preview    PNG strip of the current latents while it runs
    POST /v1/jobs/{id}/cancel     cancel a queued job, or stop a running one at its next step
    GET  /v1/loras                the LoRAs a job may name in its "loras" parameter
    GET  /v1/limits               this server's limits
    GET  /health                  liveness, workers, queue length (no authentication)

With a token configured every ``/v1`` request needs ``Authorization: Bearer <token>``; the server refuses to
bind to a non-loopback address without one (:meth:`ServerSettings.check`).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hmac
import json
import logging
import threading
from contextlib import asynccontextmanager
from typing import Any, Optional

from fastapi import Depends, FastAPI, File, Form, HTTPException, Query, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from pydantic import BaseModel, Field

from .. import __version__
from ..errors import InputError
from .jobs import STATUSES, JobNotFound, JobStateError, JobStore
from .loras import LoraCatalog
from .settings import JOB_FIELDS, LimitError, ServerSettings
from .worker import WorkerPool

log = logging.getLogger(__name__)


class JobView(BaseModel):
    id: str
    status: str = Field(description="queued, running, succeeded, failed or cancelled")
    prompt: str
    params: dict[str, Any]
    created: float
    started: Optional[float] = None
    finished: Optional[float] = None
    queued_seconds: float
    run_seconds: Optional[float] = None
    stage: Optional[str] = None
    progress: float = Field(description="0..1")
    step: Optional[int] = None
    steps: Optional[int] = None
    eta_seconds: Optional[float] = None
    queue_position: Optional[int] = Field(None, description="0 = next, for queued jobs")
    attempts: int
    max_attempts: int
    cancel_requested: bool
    error: Optional[str] = None
    history: list[dict[str, Any]]
    result: Optional[dict[str, Any]] = Field(None, description="seed, size, timings, the prompt used")
    video: bool = Field(description="whether GET /v1/jobs/{id}/video has the MP4")
    links: dict[str, str]


class JobList(BaseModel):
    jobs: list[JobView]
    total: int


class Problem(BaseModel):
    detail: str


class LoraView(BaseModel):
    name: str = Field(description="what a job gives as loras[i].name")
    size_bytes: int
    format: Optional[str] = Field(None, description="official, kohya, diffusers, peft or comfyui (null: not checked)")
    usable: bool = Field(description="whether it fits this server's model")
    error: Optional[str] = Field(None, description="why it does not fit")


class LoraList(BaseModel):
    loras: list[LoraView]
    max_loras: int = Field(description="LoRAs per job")
    max_scale: float = Field(description="largest |scale| of each")


PARAMS_HELP = "JSON object of job parameters: " + "; ".join(f"{k} ({t.__name__}): {h}" for k, (t, h) in JOB_FIELDS.items())
ERRORS = {401: {"model": Problem}, 404: {"model": Problem}, 409: {"model": Problem}, 413: {"model": Problem},
          422: {"model": Problem}, 429: {"model": Problem}}


class _Stores(threading.local):
    store: Optional[JobStore] = None


def create_app(settings: ServerSettings, *, workers: bool = True) -> FastAPI:
    """The FastAPI application; ``workers=False`` serves the queue without consuming it (tests, API-only hosts)."""
    stores = _Stores()
    pool = WorkerPool(settings) if workers else None
    catalog = LoraCatalog.for_settings(settings)

    def store() -> JobStore:  # one SQLite connection per server thread
        if stores.store is None:
            stores.store = JobStore(settings.data_dir, settings.limits, settings.max_attempts, loras=catalog)
        return stores.store

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        s = JobStore(settings.data_dir, settings.limits, settings.max_attempts)
        touched = s.recover(settings.stale_after)  # jobs of a server that was killed go back to the queue
        s.close()
        if touched:
            log.info("recovered %d job(s) left running by a previous server", len(touched))
        task = None
        if pool is not None:
            pool.start()

            async def supervise() -> None:
                while True:
                    await asyncio.sleep(2.0)
                    pool.check()

            task = asyncio.create_task(supervise())
        try:
            yield
        finally:
            if task is not None:
                task.cancel()
            if pool is not None:
                await asyncio.to_thread(pool.stop)

    app = FastAPI(title="hunyuan-i2v", version=__version__, lifespan=lifespan,
                  description="Image-to-video generation with HunyuanVideo-I2V: submit a photo and a prompt, "
                              "poll the job, download the MP4.")
    app.state.settings = settings
    app.state.pool = pool
    app.state.store = store

    def authorised(request: Request) -> None:
        if not settings.token:
            return
        header = request.headers.get("authorization", "")
        scheme, _, given = header.partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(), settings.token.encode()):
            raise HTTPException(401, "missing or wrong bearer token: send 'Authorization: Bearer <token>'",
                                headers={"WWW-Authenticate": "Bearer"})

    @app.exception_handler(InputError)
    async def input_error(request: Request, exc: InputError) -> JSONResponse:
        status = getattr(exc, "status", 422)
        if isinstance(exc, JobNotFound):
            status = 404
        elif isinstance(exc, JobStateError):
            status = 409
        return JSONResponse({"detail": str(exc)}, status_code=status)

    def view(job, s: JobStore) -> dict:
        d = job.public()
        d["queue_position"] = s.position(job.id) if job.status == "queued" else None
        base = f"/v1/jobs/{job.id}"
        d["links"] = {"self": base, "video": f"{base}/video", "preview": f"{base}/preview", "cancel": f"{base}/cancel"}
        return d

    auth = [Depends(authorised)]

    @app.post("/v1/jobs", status_code=202, response_model=JobView, dependencies=auth, responses=ERRORS,
              summary="Queue a video")
    async def create_job(image: UploadFile = File(..., description="the input photo (PNG, JPEG, WebP)"),
                         params: str = Form(..., description=PARAMS_HELP)) -> JSONResponse:
        limit = settings.limits.max_upload_bytes
        data = await image.read(limit + 1)
        if len(data) > limit:
            raise LimitError(f"the image is over this server's limit of {limit} bytes", status=413)
        try:
            parsed = json.loads(params)
        except (json.JSONDecodeError, RecursionError):
            raise LimitError("params must be a JSON object, e.g. {\"prompt\": \"the camera pans left\"}") from None

        def submit() -> dict:
            s = store()
            return view(s.submit(data, parsed), s)

        body = await asyncio.to_thread(submit)
        return JSONResponse(body, status_code=202, headers={"Location": body["links"]["self"]})

    @app.get("/v1/jobs", response_model=JobList, dependencies=auth, responses=ERRORS, summary="List jobs")
    def list_jobs(status: Optional[str] = Query(None, description="|".join(STATUSES)),
                  limit: int = Query(50, ge=1, le=500), offset: int = Query(0, ge=0, le=10**9)) -> dict:
        s = store()
        jobs = s.list(status, limit, offset)
        total = s.count(status) if status else s.count(*STATUSES)
        return {"jobs": [view(j, s) for j in jobs], "total": total}

    @app.get("/v1/jobs/{job_id}", response_model=JobView, dependencies=auth, responses=ERRORS,
             summary="A job's status, progress and result")
    def get_job(job_id: str) -> dict:
        s = store()
        return view(s.get(job_id), s)

    @app.get("/v1/jobs/{job_id}/video", dependencies=auth, responses={**ERRORS, 200: {"content": {"video/mp4": {}}}},
             response_class=FileResponse, summary="Download the MP4")
    def get_video(job_id: str) -> FileResponse:
        s = store()
        job = s.get(job_id)
        path = s.output_path(job.id)
        if job.status != "succeeded" or not path.exists():
            raise JobStateError(f"job {job.id} is {job.status}: the video exists once it has succeeded")
        return FileResponse(path, media_type="video/mp4", filename=f"{job.id}.mp4")

    @app.get("/v1/jobs/{job_id}/preview", dependencies=auth, responses={**ERRORS, 200: {"content": {"image/png": {}}}},
             response_class=FileResponse, summary="A preview of the current latents")
    def get_preview(job_id: str) -> FileResponse:
        s = store()
        job = s.get(job_id)
        path = s.preview_path(job.id)
        if not path.exists():
            raise JobStateError(f"job {job.id} has no preview yet (it is {job.status})")
        return FileResponse(path, media_type="image/png")

    @app.post("/v1/jobs/{job_id}/cancel", response_model=JobView, dependencies=auth, responses=ERRORS,
              summary="Cancel a job")
    def cancel_job(job_id: str) -> dict:
        s = store()
        return view(s.cancel(job_id), s)

    @app.get("/v1/loras", response_model=LoraList, dependencies=auth, responses=ERRORS,
             summary="The LoRAs a job may use")
    def loras() -> dict:
        limits = settings.limits
        entries = catalog.entries() if limits.max_loras > 0 else []
        return {"loras": [e.public() for e in entries], "max_loras": limits.max_loras,
                "max_scale": limits.max_lora_scale}

    @app.get("/v1/limits", dependencies=auth, responses=ERRORS, summary="This server's limits")
    def limits() -> dict:
        return dataclasses.asdict(settings.limits)

    @app.get("/health", summary="Liveness")
    def health() -> dict:
        s = store()
        return {"status": "ok", "version": __version__, "queued": s.count("queued"), "running": s.count("running"),
                "workers": pool.status() if pool is not None else []}

    if settings.ui:
        from .ui import mount_ui

        app = mount_ui(app, settings)
    return app


def serve(settings: ServerSettings, log_level: str = "info") -> None:
    """Run the service until interrupted (the CLI's ``serve`` and ``ui``)."""
    import uvicorn

    settings.check()
    app = create_app(settings)
    uvicorn.run(app, host=settings.host, port=settings.port, log_level=log_level)
