"""Writing and reading video files (PyAV, which bundles ffmpeg and libx264), frame dumps and previews.

The canonical frame form is a uint8 numpy array ``[T, H, W, 3]`` (RGB). :func:`to_uint8_frames` converts the
other accepted forms: float arrays or tensors in [0, 1] laid out ``[T, 3, H, W]``, ``[3, T, H, W]`` (what the
VAE decoder returns, also with a leading batch of one) or ``[T, H, W, 3]``.

Every file is written atomically (design.md): into a temporary file in the destination folder, then renamed
over the destination, so an error or an interrupt never leaves a half-written video behind.
"""

from __future__ import annotations

import json
import logging
import os
import re
import unicodedata
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime
from fractions import Fraction
from pathlib import Path
from typing import Any, Literal, Optional, Union

import av
import numpy as np
import torch
from av.video.reformatter import ColorRange, Colorspace
from PIL import Image

from .errors import InputError

logger = logging.getLogger(__name__)

FrameLayout = Literal["THWC", "TCHW", "CTHW"]
Frames = Union[np.ndarray, torch.Tensor]

# Container formats by file extension; MP4/MOV get "+faststart" (index first, so playback starts before the
# whole file has downloaded).
_CONTAINERS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska"}
_FASTSTART = {"mp4", "mov"}
_PREVIEW_FORMATS = {".webp": "WEBP", ".gif": "GIF"}

# ITU-T H.273 code points for BT.709 colour primaries and transfer characteristics.
_BT709 = 1


def to_uint8_frames(frames: Frames, layout: Optional[FrameLayout] = None) -> np.ndarray:
    """Convert frames to the canonical uint8 ``[T, H, W, 3]`` numpy array.

    uint8 input (numpy or torch) is taken as ``THWC`` unless ``layout`` says otherwise. Float input must be
    in [0, 1] (values outside are clipped, with a warning when far outside); its layout is found from
    which axis has size 3: axis 1 -> ``TCHW``, axis 0 -> ``CTHW``, axis 3 -> ``THWC``. When several do (in
    practice: a 3-frame clip) the layout is ambiguous and must be given. A leading batch axis of size 1
    is dropped. Floats are rounded to the nearest level (the official code truncates, which darkens by
    half a level on average).
    """
    if isinstance(frames, torch.Tensor):
        frames = frames.detach().cpu()
        if frames.is_floating_point():
            frames = frames.to(torch.float32)
        frames = frames.numpy()
    if not isinstance(frames, np.ndarray):
        raise InputError(f"frames must be a numpy array or a torch tensor, got {type(frames).__name__}")
    if frames.ndim == 5:
        if frames.shape[0] != 1:
            raise InputError(f"frames have a batch of {frames.shape[0]} videos; write them one at a time")
        frames = frames[0]
    if frames.ndim != 4:
        raise InputError(f"frames must be 4-D (e.g. [T, H, W, 3]), got shape {tuple(frames.shape)}")

    is_float = np.issubdtype(frames.dtype, np.floating)
    if not is_float and frames.dtype != np.uint8:
        raise InputError(f"frames must be uint8 (0..255) or float (0..1), got dtype {frames.dtype}")
    layout = layout or _infer_layout(frames.shape, is_float)
    axes = {"THWC": (0, 1, 2, 3), "TCHW": (0, 2, 3, 1), "CTHW": (1, 2, 3, 0)}
    if layout not in axes:
        raise InputError(f"unknown layout {layout!r}: use one of {', '.join(axes)}")
    frames = frames.transpose(axes[layout])
    if frames.shape[-1] != 3:
        raise InputError(f"frames must have 3 (RGB) channels in layout {layout}, got shape {frames.shape}")
    if min(frames.shape[:3]) < 1:
        raise InputError(f"frames are empty: [T, H, W, 3] = {list(frames.shape)}")

    if is_float:
        if not np.isfinite(frames).all():
            raise InputError(
                "frames contain NaN or infinity: a numerical failure upstream (e.g. fp16 overflow in the VAE "
                "decoder); decode in float32 or bfloat16"
            )
        low, high = float(frames.min()), float(frames.max())
        if low < -0.02 or high > 1.02:
            logger.warning("frames span [%.3f, %.3f], outside [0, 1]: clipping (map [-1, 1] with x/2+0.5)", low, high)
        frames = np.rint(np.clip(frames, 0.0, 1.0) * 255.0).astype(np.uint8)
    return np.ascontiguousarray(frames)


def _infer_layout(shape: tuple[int, ...], is_float: bool) -> FrameLayout:
    if not is_float:
        if shape[3] == 3:
            return "THWC"
        raise InputError(f"uint8 frames must be [T, H, W, 3], got shape {tuple(shape)}; or pass layout=")
    candidates: list[FrameLayout] = [name for name, axis in (("TCHW", 1), ("CTHW", 0), ("THWC", 3)) if shape[axis] == 3]
    if len(candidates) == 1:
        return candidates[0]
    if not candidates:
        raise InputError(f"cannot find the RGB axis in frames of shape {tuple(shape)}; pass layout=")
    raise InputError(f"frames of shape {tuple(shape)} are ambiguous: pass layout= one of {', '.join(candidates)}")


@contextmanager
def _atomic_path(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; rename it over ``path`` on success, delete it on any error."""
    if not path.parent.is_dir():
        raise InputError(f"output folder does not exist: {path.parent}; create it first")
    if path.is_dir():
        raise InputError(f"output path is a folder: {path}")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.part")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


class VideoWriter:
    """Incremental H.264 (yuv420p, BT.709) writer for MP4/MOV/MKV: frames are encoded as they arrive, so a
    long video never has to be in memory at once (feed it :meth:`CausalVAE.decode_stream`'s chunks).

    ::

        with VideoWriter(path, fps=24, size=(width, height), crf=18, metadata=meta) as writer:
            for chunk in chunks:
                writer.write(chunk)

    Atomic like :func:`write_video`: the frames go to a temporary file beside ``path`` that replaces
    ``path`` when the ``with`` block (or :meth:`close`) ends normally; on an exception (or :meth:`abort`)
    the temporary file is removed and an existing ``path`` is left untouched. ``size`` is (width, height);
    ``None`` takes it from the first frames. ``write`` accepts every frame form :func:`to_uint8_frames`
    does; give ``layout`` when a chunk's form is ambiguous (e.g. ``"CTHW"`` for a [1, 3, t, H, W] decoder
    chunk, which is ambiguous when t is 3).
    """

    def __init__(
        self,
        path: Union[str, os.PathLike],
        fps: float = 24,
        size: Optional[tuple[int, int]] = None,
        crf: int = 18,
        metadata: Optional[dict[str, Any]] = None,
        preset: str = "medium",
    ) -> None:
        self.path = Path(path)
        self._format = _CONTAINERS.get(self.path.suffix.lower())
        if self._format is None:
            raise InputError(
                f"unsupported video extension {self.path.suffix!r}: use one of {', '.join(_CONTAINERS)}"
            )
        self.rate = _frame_rate(fps)
        if not 0 <= crf <= 51:
            raise InputError(f"crf must be within 0..51 (lower is better quality), got {crf}")
        if size is not None:
            _check_even(*size)
        tags = _metadata_tags(metadata)
        self.crf, self.preset, self.size = crf, preset, size
        self.frames_written = 0
        self._stream: Optional[Any] = None
        # Everything is validated; now the temporary file (see _atomic_path for the same rules).
        if not self.path.parent.is_dir():
            raise InputError(f"output folder does not exist: {self.path.parent}; create it first")
        if self.path.is_dir():
            raise InputError(f"output path is a folder: {self.path}")
        self._tmp: Optional[Path] = self.path.with_name(f".{self.path.name}.{uuid.uuid4().hex[:8]}.part")
        options = {"movflags": "+faststart"} if self._format in _FASTSTART else {}
        try:
            self._container = av.open(str(self._tmp), mode="w", format=self._format, options=options)
            self._container.metadata.update(tags)
        except BaseException:
            self._tmp.unlink(missing_ok=True)
            raise

    def __enter__(self) -> "VideoWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self.abort()

    def write(self, frames: Frames, layout: Optional[FrameLayout] = None) -> None:
        """Encode frames (any form :func:`to_uint8_frames` accepts) after those already written."""
        if self._tmp is None:
            raise InputError(f"{self.path} is already closed; open a new VideoWriter")
        try:
            rgb = to_uint8_frames(frames, layout)
            height, width = rgb.shape[1:3]
            if self._stream is None:
                if self.size is None:
                    _check_even(width, height)
                    self.size = (width, height)
                self._open_stream()
            if (width, height) != self.size:
                raise InputError(f"frames are {width}x{height}, but the video is {self.size[0]}x{self.size[1]}")
            for frame in rgb:
                self._container.mux(self._stream.encode(_to_yuv420p(frame)))
            self.frames_written += len(rgb)
        except BaseException:
            self.abort()
            raise

    def close(self) -> Path:
        """Flush the encoder and move the finished file into place; returns the path."""
        if self._tmp is None:
            return self.path
        try:
            if self._stream is None:
                raise InputError(f"no frames were written to {self.path}")
            self._container.mux(self._stream.encode())
            self._container.close()
            os.replace(self._tmp, self.path)
        except BaseException:
            self.abort()
            raise
        self._tmp = None
        logger.info("wrote %s (%d frames, %dx%d, %s fps)", self.path, self.frames_written, *self.size, self.rate)
        return self.path

    def abort(self) -> None:
        """Stop without a file: close the encoder and delete the temporary file (idempotent)."""
        if self._tmp is None:
            return
        try:
            self._container.close()
        except Exception:  # the container may be in any state; the file is going anyway
            logger.debug("closing an aborted video container failed", exc_info=True)
        finally:
            self._tmp.unlink(missing_ok=True)
            self._tmp = None

    def _open_stream(self) -> None:
        width, height = self.size
        stream = self._container.add_stream("libx264", rate=self.rate)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"crf": str(self.crf), "preset": self.preset}
        # Tag the colour description the pixels are converted with, so players do not have to guess.
        codec = stream.codec_context
        codec.colorspace, codec.color_range = Colorspace.ITU709, ColorRange.MPEG
        codec.color_primaries, codec.color_trc = _BT709, _BT709
        self._stream = stream


def _check_even(width: int, height: int) -> None:
    if height % 2 or width % 2:
        raise InputError(f"H.264 (yuv420p) needs an even height and width, got {height}x{width}; crop or pad by 1")


def write_video(
    path: Union[str, os.PathLike],
    frames: Frames,
    fps: float = 24,
    crf: int = 18,
    metadata: Optional[dict[str, Any]] = None,
    layout: Optional[FrameLayout] = None,
    preset: str = "medium",
) -> Path:
    """Encode frames as H.264 (yuv420p, BT.709) into an MP4/MOV/MKV file, atomically; returns the path.

    ``metadata`` (prompt, seed, settings...) is stored as JSON in the container's ``comment`` tag, and its
    ``prompt`` (if any) as the ``title``; :func:`read_video` gives the dict back. yuv420p halves chroma
    resolution, so height and width must be even (bucket sizes always are). The official code writes at
    24 fps with imageio (spec section 4.4); ``crf`` 18 is visually near-lossless. For frames that arrive
    in pieces use :class:`VideoWriter`, which this wraps.
    """
    if Path(path).suffix.lower() not in _CONTAINERS:
        raise InputError(f"unsupported video extension {Path(path).suffix!r}: use one of {', '.join(_CONTAINERS)}")
    frames = to_uint8_frames(frames, layout)
    height, width = frames.shape[1:3]
    with VideoWriter(path, fps=fps, size=(width, height), crf=crf, metadata=metadata, preset=preset) as writer:
        writer.write(frames)
    return writer.path


def _to_yuv420p(rgb: np.ndarray) -> av.VideoFrame:
    """One RGB frame to limited-range BT.709 yuv420p, matching the tags write_video puts on the stream."""
    frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
    return frame.reformat(format="yuv420p", dst_colorspace=Colorspace.ITU709, dst_color_range=ColorRange.MPEG)


def _frame_rate(fps: float) -> Fraction:
    try:
        rate = Fraction(fps).limit_denominator(1001)  # exact for 24, 25, 30 and NTSC 24000/1001
    except (TypeError, ValueError):
        raise InputError(f"fps must be a positive number, got {fps!r}") from None
    if rate <= 0:
        raise InputError(f"fps must be positive, got {fps!r}")
    return rate


def _metadata_tags(metadata: Optional[dict[str, Any]]) -> dict[str, str]:
    if metadata is None:
        return {}
    if not isinstance(metadata, dict):
        raise InputError(f"metadata must be a dict, got {type(metadata).__name__}")
    tags = {"comment": json.dumps(metadata, ensure_ascii=False, default=str)}
    if isinstance(metadata.get("prompt"), str):
        tags["title"] = metadata["prompt"]
    return tags


def read_video(path: Union[str, os.PathLike], max_frames: Optional[int] = None) -> tuple[np.ndarray, float, dict]:
    """Decode a video file to ``(frames uint8 [T, H, W, 3], fps, metadata)``.

    ``metadata`` is the dict :func:`write_video` stored (the JSON ``comment`` tag); for other files it is
    the container's raw string tags.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(f"video not found: {path}")
    try:
        with av.open(str(path)) as container:
            if not container.streams.video:
                raise InputError(f"{path} has no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = []
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))  # uses the stream's own colour tags
                if max_frames is not None and len(frames) >= max_frames:
                    break
            tags = dict(container.metadata)
    except av.error.FFmpegError as err:
        raise InputError(f"cannot read video {path}: {err}") from err
    if not frames:
        raise InputError(f"{path} contains no decodable frames")
    return np.stack(frames), float(rate) if rate else 0.0, _parse_tags(tags)


def _parse_tags(tags: dict[str, str]) -> dict:
    try:
        parsed = json.loads(tags.get("comment", ""))
    except json.JSONDecodeError:
        return tags
    return parsed if isinstance(parsed, dict) else tags


def write_frames_png(
    folder: Union[str, os.PathLike], frames: Frames, layout: Optional[FrameLayout] = None
) -> list[Path]:
    """Write each frame as a lossless PNG ``frame_00000.png``... into ``folder`` (created if needed)."""
    frames = to_uint8_frames(frames, layout)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    digits = max(5, len(str(len(frames) - 1)))
    paths = []
    for index, rgb in enumerate(frames):
        path = folder / f"frame_{index:0{digits}d}.png"
        with _atomic_path(path) as tmp:
            Image.fromarray(rgb, mode="RGB").save(tmp, format="PNG")
        paths.append(path)
    return paths


def write_preview(
    path: Union[str, os.PathLike],
    frames: Frames,
    fps: float = 24,
    layout: Optional[FrameLayout] = None,
    max_side: Optional[int] = None,
    quality: int = 80,
) -> Path:
    """Write a looping animated WebP or GIF (chosen by the extension), atomically; returns the path.

    ``max_side`` downscales so the longer side is at most that many pixels (previews need not be full size).
    GIF keeps 256 colours per frame and 10 ms timing steps, and merges identical consecutive frames.
    """
    path = Path(path)
    image_format = _PREVIEW_FORMATS.get(path.suffix.lower())
    if image_format is None:
        raise InputError(f"unsupported preview extension {path.suffix!r}: use .webp or .gif")
    frames = to_uint8_frames(frames, layout)
    if fps <= 0:
        raise InputError(f"fps must be positive, got {fps}")
    images = [Image.fromarray(rgb, mode="RGB") for rgb in frames]
    if max_side is not None and max(images[0].size) > max_side:
        scale = max_side / max(images[0].size)
        size = (max(1, round(images[0].width * scale)), max(1, round(images[0].height * scale)))
        images = [im.resize(size, Image.Resampling.LANCZOS) for im in images]
    extra: dict[str, Any] = {"quality": quality, "method": 4} if image_format == "WEBP" else {}
    with _atomic_path(path) as tmp:
        images[0].save(
            tmp,
            format=image_format,
            save_all=True,
            append_images=images[1:],
            duration=round(1000 / fps),
            loop=0,
            **extra,
        )
    return path


def slugify(text: str) -> str:
    """Lower-case words of ``text`` joined by '-', safe in a file name (letters of any script are kept)."""
    text = unicodedata.normalize("NFKC", text).lower()
    return re.sub(r"[\W_]+", "-", text).strip("-")


def unique_output_path(
    folder: Union[str, os.PathLike],
    prompt: str,
    seed: int,
    ext: str = ".mp4",
    now: Optional[datetime] = None,
) -> Path:
    """A new file path ``{folder}/{YYYYmmdd-HHMMSS}_seed{seed}_{slug of prompt, 60 chars}{ext}``.

    Like the official name (spec section 4.4) but without characters that are invalid on Windows. An
    existing file is never reused: ``-1``, ``-2``... is appended. The folder is created. The name is not
    reserved, so two processes racing on the same prompt, seed and second could still pick the same one.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not ext.startswith("."):
        ext = "." + ext
    stamp = (now or datetime.now()).strftime("%Y%m%d-%H%M%S")
    slug = slugify(prompt)[:60].strip("-") or "video"
    stem = f"{stamp}_seed{int(seed)}_{slug}"
    candidate = folder / f"{stem}{ext}"
    counter = 0
    while candidate.exists():
        counter += 1
        candidate = folder / f"{stem}-{counter}{ext}"
    return candidate
