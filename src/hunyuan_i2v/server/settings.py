"""What a server accepts: limits, paths, authentication; and the parameters of one job.

``ServerSettings`` is frozen data built by the CLI (``hunyuan-i2v serve`` / ``ui``) or by a test; the job
store, the HTTP API and the web UI all read their limits from the same instance, so a request the UI refuses
is refused by the API with the same message.
"""

from __future__ import annotations

import dataclasses
import ipaddress
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from ..errors import InputError
from ..memory import ATTENTION_CHOICES, OFFLOAD_MODES, WEIGHTS_DTYPES

if TYPE_CHECKING:
    from .loras import LoraCatalog

RESOLUTIONS = ("360p", "540p", "720p")
REWRITE_MODES = ("normal", "master", "i2v", "lint")
JOB_FIELDS = {  # name: (type, help) of every job parameter a client may send
    "prompt": (str, "what should happen in the video (required)"),
    "negative_prompt": (str, "what to avoid (with cfg_scale > 1)"),
    "resolution": (str, "360p, 540p or 720p (default: the model's)"),
    "height": (int, "exact output height, multiple of 16 (with width)"),
    "width": (int, "exact output width, multiple of 16 (with height)"),
    "frames": (int, "number of frames, 4k+1"),
    "steps": (int, "denoising steps"),
    "seed": (int, "random seed (default: random, reported back)"),
    "flow_shift": (float, "sampling schedule shift"),
    "stability": (bool, "start from noise blended with the image"),
    "guidance": (float, "embedded guidance scale (13B model)"),
    "cfg_scale": (float, "real classifier-free guidance, >= 1"),
    "fps": (float, "frame rate of the MP4"),
    "rewrite": (str, "prompt rewriting: normal, master, i2v or lint"),
    "offload": (str, "memory: none, model or blocks"),
    "weights_dtype": (str, "memory: auto, bf16, fp16, fp32, int8 or fp8"),
    "attention": (str, "memory: auto, sdpa, chunked, flash or sage"),
    "loras": (list, "LoRAs by their name in GET /v1/loras, each with a scale (default 1), e.g. "
                    "[{\"name\": \"grayfade.safetensors\", \"scale\": 0.8}]"),
}
LORA_EXAMPLE = '{"name": "grayfade.safetensors", "scale": 1.0}'


class LimitError(InputError):
    """A request over one of the server's configured limits (HTTP 413 / 422 / 429)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Limits:
    max_upload_bytes: int = 20 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_frames: int = 129
    max_steps: int = 100
    max_side: int = 1280  # longest side of an explicit height/width
    resolutions: tuple[str, ...] = RESOLUTIONS
    max_queue: int = 100  # queued + running jobs
    max_prompt_chars: int = 2000
    max_loras: int = 4  # LoRAs per job (0: this server takes none)
    max_lora_scale: float = 4.0  # |scale| of each; far beyond it a LoRA only breaks the model


@dataclass(frozen=True)
class ServerSettings:
    data_dir: Path
    model: Optional[Path] = None  # None: the bundled demo model
    devices: tuple[str, ...] = ("cpu",)  # one worker process each; () serves the queue without consuming it
    host: str = "127.0.0.1"
    port: int = 8000
    token: Optional[str] = None
    limits: Limits = field(default_factory=Limits)
    max_attempts: int = 3  # a job whose worker dies this many times is failed with the reason
    stale_after: float = 60.0  # seconds without a heartbeat before a running job counts as orphaned
    ui: bool = False  # mount the web UI at /ui
    rewrite: dict = field(default_factory=dict)  # backend options for hunyuan_i2v.rewrite.backend_from_options
    lora_dir: Optional[Path] = None  # the LoRAs jobs may name (server/loras.py); None: the bundled ones

    def replace(self, **changes: Any) -> "ServerSettings":
        return dataclasses.replace(self, **changes)

    def check(self) -> None:
        """Refuse a configuration that would be unsafe or cannot work, before the server starts."""
        if not is_loopback(self.host) and not self.token:
            raise InputError(f"binding to {self.host} exposes the server beyond this machine: give --token "
                             "(or set HUNYUAN_I2V_TOKEN); clients then send 'Authorization: Bearer <token>'")
        if self.max_attempts < 1:
            raise InputError(f"max_attempts must be at least 1, got {self.max_attempts}")
        if self.lora_dir is not None and not Path(self.lora_dir).is_dir():
            raise InputError(f"--lora-dir {self.lora_dir} is not a folder: give the folder that holds the LoRA files")


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def token_from_env() -> Optional[str]:
    return os.environ.get("HUNYUAN_I2V_TOKEN") or None


def clean_params(raw: Any, limits: Limits, loras: Optional["LoraCatalog"] = None) -> dict:
    """Validate a client's job parameters (a JSON object) against the known fields and the limits.

    Returns a new dict of typed values with the unset ones left out. Every problem is a :class:`LimitError`
    with a one-line message naming the field. ``loras`` is the catalog the names in ``loras`` must come from
    (None: the job may use no LoRA).
    """
    from ..buckets import check_num_frames, check_size

    if not isinstance(raw, dict):
        raise LimitError("parameters must be a JSON object, e.g. {\"prompt\": \"the camera pans left\"}")
    unknown = sorted(set(raw) - set(JOB_FIELDS))
    if unknown:
        raise LimitError(f"unknown parameter {unknown[0]!r}: known are {', '.join(JOB_FIELDS)}")
    out: dict[str, Any] = {}
    for name, value in raw.items():
        if value is None:
            continue
        kind = JOB_FIELDS[name][0]
        if kind is bool:
            if not isinstance(value, bool):
                raise LimitError(f"{name} must be true or false, got {value!r}")
        elif kind is int:
            if isinstance(value, bool) or not isinstance(value, int):
                raise LimitError(f"{name} must be an integer, got {value!r}")
        elif kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or value != value or abs(value) > 1e6:
                raise LimitError(f"{name} must be a finite number, got {value!r}")
            value = float(value)
        elif kind is list:
            if not isinstance(value, list):
                raise LimitError(f"{name} must be a list, e.g. [{LORA_EXAMPLE}], got {_short(value)}")
        elif not isinstance(value, str):
            raise LimitError(f"{name} must be a string, got {value!r}")
        out[name] = value

    prompt = out.get("prompt", "")
    if not prompt.strip():
        raise LimitError("prompt is required: describe the motion, e.g. \"the camera slowly zooms in\"")
    for name in ("prompt", "negative_prompt"):
        if len(out.get(name, "")) > limits.max_prompt_chars:
            raise LimitError(f"{name} is longer than this server's limit of {limits.max_prompt_chars} characters")
        if "\x00" in out.get(name, ""):
            raise LimitError(f"{name} contains a NUL character")
    if "resolution" in out and out["resolution"] not in limits.resolutions:
        raise LimitError(f"resolution must be one of {', '.join(limits.resolutions)}, got {out['resolution']!r}")
    if ("height" in out) != ("width" in out):
        raise LimitError("give both height and width, or neither")
    if "height" in out:
        h, w = out["height"], out["width"]
        if max(h, w) > limits.max_side or min(h, w) < 16:
            raise LimitError(f"height and width must be within 16..{limits.max_side} on this server, got {h}x{w}")
        check_size(h, w)
    if "frames" in out:
        if not 1 <= out["frames"] <= limits.max_frames:
            raise LimitError(f"frames must be within 1..{limits.max_frames} on this server, got {out['frames']}")
        check_num_frames(out["frames"])
    if "steps" in out and not 1 <= out["steps"] <= limits.max_steps:
        raise LimitError(f"steps must be within 1..{limits.max_steps} on this server, got {out['steps']}")
    if "seed" in out and not 0 <= out["seed"] < 2**32:
        raise LimitError(f"seed must be within 0..{2**32 - 1}, got {out['seed']}")
    if "cfg_scale" in out and not 1.0 <= out["cfg_scale"] <= 30.0:
        raise LimitError(f"cfg_scale must be within 1..30 (1 turns it off), got {out['cfg_scale']}")
    if "guidance" in out and not 0.0 <= out["guidance"] <= 30.0:
        raise LimitError(f"guidance must be within 0..30, got {out['guidance']}")
    if "flow_shift" in out and not 0.0 < out["flow_shift"] <= 100.0:
        raise LimitError(f"flow_shift must be within (0, 100], got {out['flow_shift']}")
    if "fps" in out and not 1.0 <= out["fps"] <= 120.0:
        raise LimitError(f"fps must be within 1..120, got {out['fps']}")
    if "rewrite" in out and out["rewrite"] not in REWRITE_MODES:
        raise LimitError(f"rewrite must be one of {', '.join(REWRITE_MODES)}, got {out['rewrite']!r}")
    for name, choices in (("offload", OFFLOAD_MODES), ("weights_dtype", WEIGHTS_DTYPES),
                          ("attention", ATTENTION_CHOICES)):
        if name in out and out[name] not in choices:
            raise LimitError(f"{name} must be one of {', '.join(choices)}, got {out[name]!r}")
    if "loras" in out:
        out["loras"] = clean_loras(out["loras"], limits, loras)
        if not out["loras"]:
            del out["loras"]  # the same job as one that names none
    return out


def clean_loras(items: list, limits: Limits, catalog: Optional["LoraCatalog"]) -> list[dict]:
    """``[{"name": ..., "scale": float}, ...]`` for a job's ``loras``; every name must be one the catalog lists
    (a name is looked up there, never used as a path) and fit the served model."""
    if len(items) > limits.max_loras:
        if limits.max_loras == 0:
            raise LimitError("this server takes no LoRAs (it was started with --max-loras 0): leave out loras")
        raise LimitError(f"{len(items)} LoRAs is over this server's limit of {limits.max_loras} per job")
    out: list[dict] = []
    for i, item in enumerate(items):
        where = f"loras[{i}]"
        if not isinstance(item, dict):
            raise LimitError(f"{where} must be an object like {LORA_EXAMPLE}, got {_short(item)}")
        unknown = sorted(set(item) - {"name", "scale"})
        if unknown:
            raise LimitError(f"{where} has an unknown field {_short(unknown[0])}: give name and scale, "
                             f"e.g. {LORA_EXAMPLE}")
        name, scale = item.get("name"), item.get("scale", 1.0)
        if not isinstance(name, str) or not name:
            raise LimitError(f"{where}.name must be the name of a LoRA that GET /v1/loras lists, got {_short(name)}")
        if isinstance(scale, bool) or not isinstance(scale, (int, float)) or (isinstance(scale, float)
                                                                              and not math.isfinite(scale)):
            raise LimitError(f"{where}.scale must be a finite number, got {_short(scale)}")
        bound = limits.max_lora_scale
        if abs(scale) > bound:  # also a huge JSON integer, which float() would overflow on
            raise LimitError(f"{where}.scale must be within -{bound:g}..{bound:g} on this server, got {_short(scale)}")
        if any(o["name"] == name for o in out):
            raise LimitError(f"LoRA {_short(name)} is given twice: give it once, with the sum of the scales")
        if catalog is None:
            raise LimitError("this server has no LoRAs: leave out loras")
        catalog.get(name)  # unknown, or does not fit the model: a LimitError
        out.append({"name": name, "scale": float(scale)})
    return out


def _short(value: Any, n: int = 80) -> str:
    """repr() of a client's value, cut to n characters (a message stays one short line)."""
    text = repr(value)
    return text if len(text) <= n else text[: n - 3] + "..."
