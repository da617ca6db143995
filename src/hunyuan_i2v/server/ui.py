"""The web UI (``hunyuan-i2v ui``, or ``serve --ui``): a Gradio app at ``/ui`` over the same job queue as the API.

The UI does no generation itself. Generate puts a job into the :class:`~.jobs.JobStore` exactly as
``POST /v1/jobs`` does, and the worker processes started by the API's lifespan run it, so the UI, the API and
every browser tab share one queue, one set of limits and the same error messages. A timer polls the job about
once a second for its stage, step, ETA and the latent preview the worker writes.

Nothing is fetched from the internet: Gradio's analytics are off, the default theme's fonts are served by the
app itself, and server-side rendering (which would need Node) is off. With a token configured the UI asks for
a login: user name ``hunyuan``, the token as the password (the API under ``/v1`` keeps its bearer token).
"""

from __future__ import annotations

import html
import io
import logging
import os
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

from fastapi import FastAPI
from fastapi.responses import RedirectResponse

from ..config import SamplerDefaults
from ..errors import HunyuanI2VError, InputError
from ..memory import ATTENTION_CHOICES, OFFLOAD_MODES, WEIGHTS_DTYPES
from .jobs import FINISHED, Job, JobNotFound, JobStore
from .loras import LoraCatalog
from .settings import REWRITE_MODES, ServerSettings

log = logging.getLogger(__name__)

UI_PATH = "/ui"
UI_USER = "hunyuan"  # the login name when the server has a token (the token is the password)
POLL_SECONDS = 1.0
QUEUE_ROWS = 20
GALLERY_ROWS = 50
DEFAULT = "default"  # the choice that leaves a parameter to the model / the pipeline
QUEUE_HEADERS = ["job", "status", "stage", "progress", "prompt", "submitted", "run time"]
_UPLOAD_FORMATS = ("PNG", "JPEG", "WEBP")  # sent as uploaded; anything else PIL reads is re-encoded as PNG


@dataclass(frozen=True)
class ModelDefaults:
    """What the form starts with: the model's sampler defaults, clipped to the server's limits."""

    name: str
    sampler: SamplerDefaults
    guidance_embed: bool  # only guidance-distilled models (the 13B one) read the embedded guidance


def model_defaults(settings: ServerSettings) -> ModelDefaults:
    """Read the served model's config (cheap: model.json or a safetensors header); library defaults if unreadable."""
    from ..cli import bundled_model_dir

    model = settings.model or bundled_model_dir()
    if model is not None:
        try:
            from ..layout import resolve_model_files
            from ..pipeline import model_config_for

            config = model_config_for(resolve_model_files(model))
            return ModelDefaults(config.name, config.sampler, bool(config.transformer.guidance_embed))
        except (HunyuanI2VError, OSError, ValueError) as exc:
            log.warning("cannot read the model config of %s (%s); the form starts from the library defaults",
                        model, exc)
    return ModelDefaults("unknown model", SamplerDefaults(), True)


def _largest_4k1(n: int) -> int:
    return max(1, (n - 1) // 4 * 4 + 1)


def job_params(defaults: ModelDefaults, *, prompt: str, negative_prompt: str = "", resolution: str = DEFAULT,
               frames: Optional[float] = None, steps: Optional[float] = None, seed: Optional[float] = None,
               guidance: Optional[float] = None, cfg_scale: Optional[float] = None, stability: bool = False,
               flow_shift: Optional[float] = None, fps: Optional[float] = None, offload: str = "none",
               weights_dtype: str = "auto", attention: str = DEFAULT, loras: Sequence[str] = (),
               lora_scale: float = 1.0) -> dict:
    """The job parameters (as ``POST /v1/jobs`` takes them) for the form's values.

    Sampling settings are always sent, so a job records what it was made with; the model-default resolution, an
    empty negative prompt or flow shift, a guidance the model does not read and the default memory settings are
    left out (the worker then uses the model's and the pipeline's defaults). The chosen LoRAs all get the one
    ``lora_scale``; with none chosen the job has no ``loras``.
    """
    params: dict[str, Any] = {"prompt": prompt}
    if negative_prompt and negative_prompt.strip():
        params["negative_prompt"] = negative_prompt
    if resolution and resolution != DEFAULT:
        params["resolution"] = resolution
    for name, value in (("frames", frames), ("steps", steps), ("seed", seed)):
        if value is not None:
            params[name] = int(value)
    if guidance is not None and defaults.guidance_embed:
        params["guidance"] = float(guidance)
    if cfg_scale is not None:
        params["cfg_scale"] = float(cfg_scale)
    params["stability"] = bool(stability)
    for name, value in (("flow_shift", flow_shift), ("fps", fps)):
        if value is not None:
            params[name] = float(value)
    for name, value, default in (("offload", offload, "none"), ("weights_dtype", weights_dtype, "auto"),
                                 ("attention", attention, DEFAULT)):
        if value and value != default:
            params[name] = value
    if loras:
        params["loras"] = [{"name": name, "scale": float(lora_scale)} for name in loras]
    return params


def lora_choices(catalog: LoraCatalog) -> list[tuple[str, str]]:
    """(label, name) of every LoRA of the catalog that fits the served model."""
    out = []
    for entry in catalog.entries():
        if entry.error is None:
            n = entry.size_bytes
            size = f"{n / 1e6:.1f} MB" if n >= 1e6 else f"{round(n / 1e3)} kB"
            out.append((f"{entry.name} ({', '.join(x for x in (entry.format, size) if x)})", entry.name))
    return out


def upload_bytes(path: str) -> bytes:
    """The uploaded file's bytes as the queue stores them: PNG, JPEG and WebP as they are, others as PNG."""
    from PIL import Image

    data = Path(path).read_bytes()
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format in _UPLOAD_FORMATS:
                return data
            buf = io.BytesIO()
            img.convert("RGB").save(buf, format="PNG")
            return buf.getvalue()
    except Exception:  # not an image PIL can read: the store refuses it with its own message
        return data


# -- what the page shows ---------------------------------------------------------------------------

def _seconds(s: Optional[float]) -> str:
    if s is None:
        return "-"
    s = max(0, round(s))
    return f"{s // 60} min {s % 60:02d} s" if s >= 60 else f"{s} s"


def status_html(job: Optional[Job], position: Optional[int] = None) -> str:
    """The current job's status line and progress bar (every client-given text escaped)."""
    if job is None:
        return "<div class='hy-status'>No job yet: upload a photo, describe the motion and press Generate.</div>"
    d = job.public()
    e = html.escape
    short = job.id[:8]
    if job.status == "queued":
        where = "next in the queue" if position == 0 else f"{position} job(s) ahead" if position else "waiting"
        text = f"<b>Queued</b> (job {short}): {where}"
    elif job.status == "running":
        parts = [f"<b>Running</b> (job {short})", e(job.stage or "")]
        if job.step is not None and job.steps:
            parts.append(f"step {job.step + 1}/{job.steps}")
        parts.append(f"{job.progress:.0%}")
        if d["eta_seconds"] is not None:
            parts.append(f"ETA {_seconds(d['eta_seconds'])}")
        if job.cancel_requested:
            parts.append("cancelling at the next step")
        text = " · ".join(p for p in parts if p)
    elif job.status == "succeeded":
        r = job.result or {}
        facts = [f"{r['width']}x{r['height']}" if "width" in r else "",
                 f"{r['frames']} frames" if "frames" in r else "", f"seed {r['seed']}" if "seed" in r else ""]
        facts += [f"LoRA {e(str(lora['name']))} x{lora['scale']:g}" for lora in r.get("loras", [])]
        text = f"<b>Done</b> (job {short}) in {_seconds(d['run_seconds'])}: " + ", ".join(f for f in facts if f)
    elif job.status == "failed":
        text = f"<b>Failed</b> (job {short}): {e(job.error or 'unknown error')}"
    else:
        text = f"<b>Cancelled</b> (job {short})"
    bar = f"<progress max='1' value='{job.progress:.3f}' style='width:100%'></progress>"
    return f"<div class='hy-status' data-status='{job.status}'>{text}{bar}</div>"


def queue_rows(jobs: list[Job]) -> list[list[str]]:
    rows = []
    for job in jobs:
        d = job.public()
        if job.status == "running" and job.step is not None and job.steps:
            progress = f"{job.progress:.0%} (step {job.step + 1}/{job.steps})"
        else:
            progress = f"{job.progress:.0%}"
        prompt = job.prompt if len(job.prompt) <= 60 else job.prompt[:57] + "..."
        rows.append([job.id[:8], job.status, job.stage or "", progress, prompt,
                     time.strftime("%H:%M:%S", time.localtime(job.created)), _seconds(d["run_seconds"])])
    return rows


def gallery_choices(jobs: list[Job]) -> list[tuple[str, str]]:
    out = []
    for job in jobs:
        prompt = job.prompt if len(job.prompt) <= 48 else job.prompt[:45] + "..."
        when = time.strftime("%m-%d %H:%M", time.localtime(job.finished or job.created))
        out.append((f"{when} · {prompt} · {job.id[:8]}", job.id))
    return out


def job_details(job: Job) -> dict:
    d = job.public()
    return {k: d[k] for k in ("id", "prompt", "params", "result", "queued_seconds", "run_seconds", "attempts")}


def _one_line(exc: BaseException) -> str:
    return (str(exc).strip().splitlines() or [type(exc).__name__])[0]


def poll_view(s: JobStore, job_id: Optional[str], state: Optional[dict], queue_rows_limit: int,
              gallery_rows_limit: int) -> tuple[dict, dict[str, Any]]:
    """One UI poll: (the new bookkeeping state, what changed on the page).

    ``state`` is what this page was last sent for ``job_id``; state for another job (or none), as a tick that
    started before the page's latest Generate writes back, starts over, so the current job is always followed.
    The changes: ``table`` (queue rows), ``status`` (HTML), ``preview`` (latent preview path), ``video`` and
    ``file`` (the MP4 once the job succeeded, sent once), ``pick`` (new gallery choices with it) and ``warning``
    (the error once the job failed); what did not change is left out.
    """
    state = dict(state or {})
    if state.get("job") != job_id:
        state = {"job": job_id, "rows": state.get("rows")}
    changed: dict[str, Any] = {}
    rows = queue_rows(s.list(limit=queue_rows_limit))
    if rows != state.get("rows"):
        changed["table"] = state["rows"] = rows
    if not job_id or state.get("gone"):
        return state, changed
    try:
        job: Optional[Job] = s.get(job_id)
    except JobNotFound:
        job, state["gone"] = None, True
    text = status_html(job, s.position(job.id) if job is not None else None)
    if text != state.get("status"):
        changed["status"] = state["status"] = text
    if job is None:
        return state, changed
    preview = s.preview_path(job.id)
    try:
        stamp = preview.stat().st_mtime_ns
    except OSError:
        stamp = None
    if stamp is not None and stamp != state.get("preview"):
        changed["preview"], state["preview"] = str(preview), stamp
    if job.status in FINISHED and not state.get("done"):
        state["done"] = True
        output = s.output_path(job.id)
        if job.status == "succeeded" and output.exists():
            changed["video"] = changed["file"] = str(output)
            changed["pick"] = gallery_choices(s.list("succeeded", gallery_rows_limit))
        elif job.status == "failed":
            changed["warning"] = f"The job failed: {job.error}"
    return state, changed


# -- the app ------------------------------------------------------------------------------------------

class _Stores(threading.local):
    store: Optional[JobStore] = None


def build_blocks(settings: ServerSettings):
    """The Gradio Blocks of the UI (not mounted); its handlers talk to the queue in ``settings.data_dir``."""
    import gradio as gr

    defaults = model_defaults(settings)
    sampler, limits = defaults.sampler, settings.limits
    stores = _Stores()
    backend_lock = threading.Lock()
    backend_cache: dict[str, Any] = {}
    catalog = LoraCatalog.for_settings(settings)

    def store() -> JobStore:  # one SQLite connection per handler thread
        if stores.store is None:
            stores.store = JobStore(settings.data_dir, limits, settings.max_attempts, loras=catalog)
        return stores.store

    def rewrite_backend():
        """The server's rewrite model, built once (a local model then stays loaded in this process)."""
        from ..rewrite import backend_from_options

        with backend_lock:
            if "backend" not in backend_cache:
                backend_cache["backend"] = backend_from_options(**settings.rewrite)
            return backend_cache["backend"]

    if sampler.height is not None:
        default_size = f"model default ({sampler.height}x{sampler.width})"
    else:
        default_size = f"model default ({sampler.resolution} buckets)"
    max_frames = _largest_4k1(limits.max_frames)
    shift_note = (f"{sampler.flow_shift:g}, {sampler.stability_flow_shift:g} with stability"
                  if sampler.flow_shift != sampler.stability_flow_shift else f"{sampler.flow_shift:g}")
    devices = ", ".join(settings.devices) or "none"

    with gr.Blocks(title="HunyuanVideo-I2V", analytics_enabled=False,
                   delete_cache=(3600, 86400)) as demo:  # Gradio's copies of videos live a day
        # The page's job is written by Generate only; the poll's own bookkeeping (what the page already shows) is a
        # second state, keyed by that job, so a tick that started before a Generate and returns after it cannot
        # take the new job away from the page (each event writes back the state it read when it started).
        current_job = gr.State(None)
        view = gr.State({})
        gr.Markdown(f"## HunyuanVideo-I2V: animate a photo\nModel **{html.escape(defaults.name)}** · workers: "
                    f"{html.escape(devices)} · jobs share the queue of the HTTP API (`/v1`, docs at `/docs`)")
        with gr.Tab("Generate"):
            with gr.Row():
                with gr.Column(scale=1):
                    image = gr.Image(label="Photo", type="filepath", image_mode=None,
                                     sources=["upload", "clipboard"], elem_id="hy-image")
                    prompt = gr.Textbox(label="Prompt", lines=3, elem_id="hy-prompt",
                                        placeholder="what should happen, e.g. the camera slowly zooms in")
                    with gr.Row():
                        rewrite_mode = gr.Dropdown(list(REWRITE_MODES), value="i2v", label="Rewrite mode",
                                                   info="lint only checks the prompt", scale=2)
                        rewrite_button = gr.Button("Rewrite", scale=1, elem_id="hy-rewrite")
                    notes = gr.Markdown("", elem_id="hy-notes")
                    with gr.Accordion("Settings", open=True):
                        resolution = gr.Dropdown([(default_size, DEFAULT)] + [(r, r) for r in limits.resolutions],
                                                 value=DEFAULT, label="Resolution")
                        frames = gr.Slider(1, max_frames, value=min(sampler.num_frames, max_frames), step=4,
                                           label="Frames (4k+1)")
                        steps = gr.Slider(1, limits.max_steps, value=min(sampler.steps, limits.max_steps), step=1,
                                          label="Steps", elem_id="hy-steps")
                        with gr.Row():
                            seed = gr.Number(value=random.randrange(2**32), precision=0, minimum=0,
                                             maximum=2**32 - 1, label="Seed", elem_id="hy-seed")
                            randomise = gr.Checkbox(value=True, label="New random seed for each video")
                        guidance = gr.Slider(0, 30, value=sampler.embedded_guidance, step=0.5,
                                             label="Embedded guidance", visible=defaults.guidance_embed)
                        cfg_scale = gr.Slider(1, 30, value=sampler.cfg_scale, step=0.5,
                                              label="CFG scale (1 = off)")
                        stability = gr.Checkbox(value=False,
                                                label="Stability (start from noise blended with the photo)")
                    with gr.Accordion("LoRAs", open=False, visible=limits.max_loras > 0, elem_id="hy-lora-box"):
                        loras = gr.Dropdown(lora_choices(catalog) if limits.max_loras > 0 else [], value=[],
                                            multiselect=True, max_choices=max(1, limits.max_loras),
                                            label="LoRA files",
                                            info="applied to this video only; put a LoRA's trigger word in the "
                                                 "prompt", elem_id="hy-loras")
                        bound = limits.max_lora_scale
                        lora_scale = gr.Slider(-bound, bound, value=1.0, step=0.05,
                                               label="LoRA scale (each chosen LoRA; negative subtracts it)",
                                               elem_id="hy-lora-scale")
                    with gr.Accordion("More settings", open=False):
                        negative = gr.Textbox(label="Negative prompt (with CFG scale > 1; empty: the model's)", lines=2)
                        flow_shift = gr.Number(value=None, label=f"Flow shift (empty: the model's, {shift_note})")
                        fps = gr.Slider(1, 60, value=sampler.fps, step=1, label="Frames per second of the MP4")
                    with gr.Accordion("Memory", open=False):
                        offload = gr.Dropdown(list(OFFLOAD_MODES), value="none", label="Offload")
                        weights_dtype = gr.Dropdown(list(WEIGHTS_DTYPES), value="auto", label="Weights dtype")
                        attention = gr.Dropdown([("default (SDPA)", DEFAULT)] + [(a, a) for a in ATTENTION_CHOICES],
                                                value=DEFAULT, label="Attention")
                    generate_button = gr.Button("Generate", variant="primary", elem_id="hy-generate")
                with gr.Column(scale=1):
                    status = gr.HTML(status_html(None), elem_id="hy-status")
                    cancel_button = gr.Button("Cancel this job", variant="stop", size="sm", elem_id="hy-cancel")
                    preview = gr.Image(label="Preview of the latents (while it runs)", interactive=False,
                                       elem_id="hy-preview")
                    video = gr.Video(label="Video", interactive=False, loop=True, buttons=["download"], height=384,
                                     elem_id="hy-video")
                    download = gr.File(label="Download the MP4", interactive=False, elem_id="hy-download")
            queue = gr.Dataframe(headers=QUEUE_HEADERS, value=[], interactive=False, label="Queue (recent jobs)",
                                 elem_id="hy-queue")
        with gr.Tab("Videos"):
            with gr.Row():
                pick = gr.Dropdown([], value=None, label="Finished videos", scale=4, elem_id="hy-pick")
                refresh_button = gr.Button("Refresh", scale=1)
            with gr.Row():
                gallery_video = gr.Video(label="Video", interactive=False, loop=True, buttons=["download"], height=384,
                                         elem_id="hy-gallery-video")
                with gr.Column():
                    gallery_file = gr.File(label="Download the MP4", interactive=False)
                    details = gr.JSON(label="Settings and result")
        timer = gr.Timer(POLL_SECONDS)

        # -- handlers --------------------------------------------------------------------------------

        def rewrite(text: str, mode: str):
            from ..rewrite import rewrite_prompt

            try:
                backend = None if mode == "lint" else rewrite_backend()
                if mode != "lint" and backend is None:
                    message = (f"Rewriting in {mode} mode needs a language model and this server has none: start "
                               "it with --rewrite-model DIR (a local chat model) or --rewrite-url URL (an "
                               "OpenAI-compatible server). The lint mode checks the prompt without one.")
                    gr.Warning(message)
                    return gr.skip(), f"**No rewrite backend.** {message}"
                result = rewrite_prompt(text or "", mode, backend)
            except InputError as exc:
                raise gr.Error(_one_line(exc), print_exception=False) from None
            lines = []
            if mode != "lint":
                lines.append(f"Rewritten ({mode}, {result.backend}). Original: {result.original}")
            lines += [f"- {w}" for w in result.warnings] or ["The prompt looks fine."]
            return result.prompt, "\n".join(lines)

        def generate(image_path, text, negative_text, resolution_value, frames_value, steps_value, seed_value,
                     new_seed, guidance_value, cfg_value, stability_value, shift_value, fps_value, offload_value,
                     dtype_value, attention_value, lora_names, lora_scale_value):
            if not image_path:
                raise gr.Error("Upload a photo first.", print_exception=False)
            if new_seed or seed_value is None:
                seed_value = random.randrange(2**32)
            lora_scale_value = 1.0 if lora_scale_value is None else lora_scale_value
            params = job_params(defaults, prompt=text or "", negative_prompt=negative_text or "",
                                resolution=resolution_value, frames=frames_value, steps=steps_value,
                                seed=seed_value, guidance=guidance_value, cfg_scale=cfg_value,
                                stability=stability_value, flow_shift=shift_value, fps=fps_value,
                                offload=offload_value, weights_dtype=dtype_value, attention=attention_value,
                                loras=lora_names or (), lora_scale=lora_scale_value)
            s = store()
            try:
                job = s.submit(upload_bytes(image_path), params)
            except (InputError, OSError) as exc:
                raise gr.Error(_one_line(exc), print_exception=False) from None
            return job.id, int(seed_value), status_html(job, s.position(job.id)), None, None, None

        def poll(job_id, state):
            state, changed = poll_view(store(), job_id, state, QUEUE_ROWS, GALLERY_ROWS)
            if "warning" in changed:
                gr.Warning(changed["warning"])
            if "pick" in changed:
                changed["pick"] = gr.update(choices=changed["pick"])
            return (state, *(changed.get(k, gr.skip()) for k in ("status", "preview", "video", "file", "table",
                                                                  "pick")))

        def cancel(job_id):
            if not job_id:
                raise gr.Error("No job to cancel: this page has not submitted one.", print_exception=False)
            try:
                store().cancel(job_id)
            except InputError as exc:
                gr.Warning(_one_line(exc))
            else:
                gr.Info("Cancel requested: a queued job is dropped, a running one stops at its next step.")

        def refresh_gallery():
            return gr.update(choices=gallery_choices(store().list("succeeded", GALLERY_ROWS)))

        def refresh_loras(chosen):  # files added to the LoRA folder show up on the next page load
            choices = lora_choices(catalog) if limits.max_loras > 0 else []
            names = {name for _, name in choices}
            return gr.update(choices=choices, value=[n for n in chosen or [] if n in names])

        def show_video(job_id):
            if not job_id:
                return None, None, None
            s = store()
            try:
                job = s.get(job_id)
            except InputError as exc:
                raise gr.Error(_one_line(exc), print_exception=False) from None
            path = s.output_path(job.id)
            if job.status != "succeeded" or not path.exists():
                raise gr.Error(f"job {job.id[:8]} has no video (it is {job.status})", print_exception=False)
            return str(path), str(path), job_details(job)

        rewrite_button.click(rewrite, [prompt, rewrite_mode], [prompt, notes])
        generate_button.click(
            generate,
            [image, prompt, negative, resolution, frames, steps, seed, randomise, guidance, cfg_scale,
             stability, flow_shift, fps, offload, weights_dtype, attention, loras, lora_scale],
            [current_job, seed, status, preview, video, download], concurrency_limit=None)
        timer.tick(poll, [current_job, view], [view, status, preview, video, download, queue, pick],
                   show_progress="hidden", concurrency_limit=None)
        cancel_button.click(cancel, [current_job], None)
        refresh_button.click(refresh_gallery, None, pick)
        pick.change(show_video, pick, [gallery_video, gallery_file, details])
        demo.load(refresh_gallery, None, pick)
        demo.load(refresh_loras, loras, loras)
    return demo


def mount_ui(app: FastAPI, settings: ServerSettings) -> FastAPI:
    """Mount the UI at ``/ui`` on the API's app (and redirect ``/`` to it); returns the app to serve."""
    # Before Gradio is imported: a few of its modules read these once, at import.
    os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
    os.environ.setdefault("GRADIO_TEMP_DIR", str(Path(settings.data_dir) / "ui-cache"))
    import gradio as gr

    demo = build_blocks(settings)
    root = Path(settings.data_dir)

    @app.get("/", include_in_schema=False)
    def to_ui() -> RedirectResponse:
        return RedirectResponse(f"{UI_PATH}/")

    return gr.mount_gradio_app(
        app, demo, path=UI_PATH,
        auth=(UI_USER, settings.token) if settings.token else None,
        auth_message=f"Log in as {UI_USER!r} with this server's token." if settings.token else None,
        allowed_paths=[str(root / "outputs"), str(root / "previews")],
        blocked_paths=[str(root / "jobs.sqlite3"), str(root / "uploads"), str(root / "tmp")],
        max_file_size=settings.limits.max_upload_bytes, ssr_mode=False, footer_links=[],
    )
