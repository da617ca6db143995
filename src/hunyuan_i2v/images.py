"""Loading the conditioning image: any common file or PIL image in, a plain 8-bit RGB image out.

Every problem with the user's file becomes an :class:`~hunyuan_i2v.errors.InputError` with a remedy, raised
before any model work. The official code does ``Image.open(path).convert("RGB")``; this module adds what that
misses: EXIF rotation, a pixel cap against decompression bombs, proper scaling of 16-bit images, alpha
compositing and a clear message for truncated or non-image files.
"""

from __future__ import annotations

import logging
import os
import struct
import zlib
from pathlib import Path
from typing import Union

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from .errors import InputError

logger = logging.getLogger(__name__)

ImageSource = Union[str, os.PathLike, Image.Image]

DEFAULT_MAX_PIXELS = 64_000_000  # 64 MP: ~8000x8000, far above any bucket (the largest is 960x960)
WHITE = (255, 255, 255)

# Errors PIL's decoders raise on damaged data (truncated streams, bad chunks, bad zlib data, short reads).
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error, zlib.error)


def load_image(
    source: ImageSource,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    background: tuple[int, int, int] = WHITE,
) -> Image.Image:
    """Load an image file (or take a PIL image) and return a new, fully loaded RGB image.

    - EXIF orientation is applied, so the pixels are upright as a photo viewer shows them.
    - Animated images (GIF, APNG, WebP) give their first frame; a note is logged.
    - Greyscale, palette, CMYK and other modes convert to RGB; 16-bit and 32-bit greyscale are scaled to
      8 bits (not clipped, which is what a plain ``convert("RGB")`` would do).
    - Transparency is composited onto ``background``, white by default: transparent cut-outs (products,
      logos, stickers) are conventionally shown on white, and a plain ``convert("RGB")`` would instead
      expose whatever colour hides under the transparent pixels (often black, sometimes garbage).
    - Images above ``max_pixels`` are refused from their header, before any pixel is decoded.

    A PIL image passed in is not modified (an animated one is returned to the frame it was on).
    """
    if isinstance(source, Image.Image):
        _check_pixel_count(source.size, max_pixels, "the image")
        position = source.tell()
        try:
            return _to_upright_rgb(source, background, "the image")
        finally:
            source.seek(position)

    if not isinstance(source, (str, os.PathLike)):
        raise InputError(f"expected an image path or a PIL image, got {type(source).__name__}")
    path = Path(source)
    if not path.exists():
        raise InputError(f"image not found: {path}")
    if path.is_dir():
        raise InputError(f"expected an image file, got a folder: {path}")
    try:
        with Image.open(path) as img:
            _check_pixel_count(img.size, max_pixels, str(path))
            return _to_upright_rgb(img, background, str(path))
    except InputError:
        raise
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL's own guard (its warning is an error only under -W error) fires above ~89/179 MP.
        raise InputError(f"{path}: refused as a possible decompression bomb ({err}); use a smaller image") from err
    except UnidentifiedImageError as err:
        raise InputError(f"{path}: not an image or an unsupported format; use a PNG, JPEG or WebP file") from err
    except _DECODE_ERRORS as err:
        raise InputError(f"{path}: cannot decode the image ({err}); the file is truncated or corrupt") from err


def _check_pixel_count(size: tuple[int, int], max_pixels: int, name: str) -> None:
    width, height = size
    if width * height > max_pixels:
        raise InputError(
            f"{name} is {width}x{height} = {width * height / 1e6:.1f} MP, above the {max_pixels / 1e6:.1f} MP limit "
            "(a guard against decompression bombs); downscale it, or raise max_pixels if you trust the file"
        )
    if width < 1 or height < 1:
        raise InputError(f"{name} has an empty size {width}x{height}")


def _to_upright_rgb(img: Image.Image, background: tuple[int, int, int], name: str) -> Image.Image:
    frames = getattr(img, "n_frames", 1)
    if frames > 1:
        logger.info("%s is animated (%d frames): using its first frame", name, frames)
        img.seek(0)
    img.load()  # decode now, so damaged data fails here with the file named
    try:
        upright = ImageOps.exif_transpose(img)
    except _DECODE_ERRORS as err:  # a broken EXIF block should not make a good image unusable
        logger.warning("%s: ignoring unreadable EXIF orientation (%s)", name, err)
        upright = img.copy()
    return to_rgb(upright, background)


def to_rgb(img: Image.Image, background: tuple[int, int, int] = WHITE) -> Image.Image:
    """Convert any PIL mode to 8-bit RGB (see :func:`load_image` for the rules). Always returns a new image."""
    mode = img.mode
    if mode == "RGB":
        return img.copy()
    if mode.startswith("I") or mode == "F":
        return Image.fromarray(_grey_to_uint8(np.asarray(img), mode), mode="L").convert("RGB")
    has_alpha = mode in ("RGBA", "RGBa", "LA", "La", "PA") or "transparency" in img.info
    if not has_alpha:
        return img.convert("RGB")
    rgba = img.convert("RGBA")
    canvas = Image.new("RGBA", rgba.size, (*background, 255))
    return Image.alpha_composite(canvas, rgba).convert("RGB")


def _grey_to_uint8(values: np.ndarray, mode: str) -> np.ndarray:
    """Scale high-bit-depth greyscale to 0..255: 16-bit (``I;16*``, and ``I``, which PIL uses for 16-bit PNGs)
    divides by 257 (65535 -> 255); float (``F``) is taken as 0..1 when it stays within that, else as 0..255."""
    values = values.astype(np.float64)
    if mode == "F":
        finite = values[np.isfinite(values)]
        if finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
            values = values * 255.0
        values = np.nan_to_num(values, nan=0.0)
    else:
        values = values / 257.0
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def image_to_tensor(
    img: Image.Image, dtype: torch.dtype = torch.float32, device: torch.device | str | None = None
) -> torch.Tensor:
    """An RGB image as a ``[1, 3, 1, H, W]`` tensor in [-1, 1], the VAE's input for the conditioning frame
    (spec section 4.3: ToTensor then Normalize(0.5, 0.5), computed in float32 then cast)."""
    if img.mode != "RGB":
        raise InputError(f"expected an RGB image, got mode {img.mode!r}; load it with load_image()")
    pixels = torch.from_numpy(np.array(img, dtype=np.uint8)).to(device)
    unit = pixels.permute(2, 0, 1).to(torch.float32) / 255.0
    return ((unit - 0.5) / 0.5).to(dtype)[None, :, None]
