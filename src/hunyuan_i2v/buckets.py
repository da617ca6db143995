"""Resolution buckets, image preprocessing for the VAE, and the size/length arithmetic of a generation.

In I2V mode the output size is not chosen by the user: the input image's aspect ratio picks one of a fixed set
of "buckets" (spec section 4.3), the image is resized and center-cropped to it, and the video has that size.
All sizes here are ``(height, width)`` unless a name says otherwise (``bucket_for`` takes ``width, height``
in the order PIL reports an image's size).
"""

from __future__ import annotations

import math
import operator
from typing import Literal

from PIL import Image

from .errors import InputError

Resolution = Literal["360p", "540p", "720p"]

# Spec section 4.3: the bucket base size behind each --i2v-resolution choice.
RESOLUTION_BASE_SIZE: dict[str, int] = {"720p": 960, "540p": 720, "360p": 480}


def generate_crop_size_list(base_size: int, patch: int = 32, max_ratio: float = 4.0) -> list[tuple[int, int]]:
    """All buckets for a base size, as ``(h, w)`` pairs in the official order (spec section 4.3).

    A greedy staircase walk in units of ``patch``: start at the widest pair (n, 1) where n = (base/patch)^2
    patches, then keep the area at or below n by either growing the second side or, when that would overflow
    the area, shrinking the first side. Pairs more elongated than ``max_ratio`` are skipped. The result holds
    both orientations of every shape, from (4:1) tall to (1:4) wide; the order matters only to break ties in
    :func:`closest_bucket` the way the official code does.
    """
    if base_size <= 0 or patch <= 0:
        raise InputError(f"base_size and patch must be positive, got {base_size} and {patch}")
    if max_ratio < 1.0:
        raise InputError(f"max_ratio must be >= 1, got {max_ratio}")
    num_patches = round((base_size / patch) ** 2)
    first, second = num_patches, 1
    buckets = []
    while first > 0:
        if max(first, second) / min(first, second) <= max_ratio:
            buckets.append((first * patch, second * patch))
        if (second + 1) * first <= num_patches:
            second += 1
        else:
            first -= 1
    return buckets


def closest_bucket(height: int, width: int, buckets: list[tuple[int, int]]) -> tuple[int, int]:
    """The bucket the official ``get_closest_ratio`` picks for an image of this size (spec section 4.3).

    The rule is asymmetric: a portrait or square image (h/w >= 1) only considers buckets at most as tall
    (ratio <= the image's), a landscape one only buckets strictly taller (ratio > the image's), so that after
    resizing the short side the bucket fits inside the image. Bucket ratios are rounded to 5 decimals, the
    image ratio is not; ties go to the earliest bucket in the list.
    """
    if height <= 0 or width <= 0:
        raise InputError(f"image size must be positive, got {height}x{width} (h x w)")
    if not buckets:
        raise InputError("the bucket list is empty")
    aspect = height / width
    best: tuple[int, int] | None = None
    best_diff = math.inf
    for bucket_h, bucket_w in buckets:
        diff = round(bucket_h / bucket_w, 5) - aspect
        allowed = diff <= 0 if aspect >= 1 else diff > 0
        if allowed and abs(diff) < best_diff:
            best, best_diff = (bucket_h, bucket_w), abs(diff)
    if best is None:
        # Cannot happen with generate_crop_size_list output (it holds the square and both 1:4 extremes).
        raise InputError(f"no bucket in the list can hold a {height}x{width} image; the list lacks a square bucket")
    return best


def bucket_for(width: int, height: int, resolution: Resolution = "720p") -> tuple[int, int]:
    """The ``(h, w)`` output size for an input image of ``width x height`` pixels at a named resolution."""
    if resolution not in RESOLUTION_BASE_SIZE:
        choices = ", ".join(sorted(RESOLUTION_BASE_SIZE))
        raise InputError(f"unknown resolution {resolution!r}: choose one of {choices}")
    return closest_bucket(height, width, generate_crop_size_list(RESOLUTION_BASE_SIZE[resolution], 32))


def center_crop_box(image_height: int, image_width: int, height: int, width: int) -> tuple[int, int, int, int]:
    """The ``(left, top, right, bottom)`` box of a centered ``height x width`` crop, rounded as torchvision's
    CenterCrop does (Python's round-half-to-even of the half margin), so crops land on the same pixels as the
    official preprocessing."""
    if height > image_height or width > image_width:
        raise InputError(f"a {height}x{width} crop does not fit in a {image_height}x{image_width} image")
    top = int(round((image_height - height) / 2.0))
    left = int(round((image_width - width) / 2.0))
    return left, top, left + width, top + height


def resize_size(image_height: int, image_width: int, height: int, width: int) -> tuple[int, int]:
    """The ``(h, w)`` to resize an image to before center-cropping it to ``height x width``.

    Official rule (torchvision ``Resize(min(h, w))``): the shorter image side becomes min(height, width) and
    the longer one scales with it, truncated to an integer. The asymmetric bucket rule almost always makes the
    crop fit then, but the 5-decimal rounding of bucket ratios can leave the long side a pixel short (e.g. a
    4554x1841 image at 720p: bucket 608x1504, resized to 608x1503), and a caller may pass any target.
    torchvision would pad the crop with black there; instead we scale just enough for both sides to cover
    the target (identical to the official size whenever that one fits).
    """
    if min(image_height, image_width, height, width) <= 0:
        raise InputError(f"sizes must be positive, got image {image_height}x{image_width}, target {height}x{width}")
    short = min(height, width)
    if image_width <= image_height:
        new_h, new_w = int(short * image_height / image_width), short
    else:
        new_h, new_w = short, int(short * image_width / image_height)
    if new_h >= height and new_w >= width:
        return new_h, new_w
    # Integer ceilings, so a side that should come out exact is not bumped by a float round-off.
    if width * image_height >= height * image_width:  # the width is the binding side
        return max(height, -(-image_height * width // image_width)), width
    return height, max(width, -(-image_width * height // image_height))


def resize_and_center_crop(image: Image.Image, height: int, width: int) -> Image.Image:
    """Resize then center-crop a PIL image to ``height x width`` as the official VAE preprocessing does
    (spec section 4.3). Bilinear resampling with PIL's built-in antialiasing is what torchvision's ``Resize``
    does for PIL images, so the pixels match the official pipeline."""
    new_h, new_w = resize_size(image.height, image.width, height, width)
    if (new_h, new_w) != (image.height, image.width):
        image = image.resize((new_w, new_h), Image.Resampling.BILINEAR)
    return image.crop(center_crop_box(new_h, new_w, height, width))


def _as_int(name: str, value: object) -> int:
    """Accept Python and numpy integers, reject floats, bools and strings."""
    if isinstance(value, bool):
        raise InputError(f"{name} must be an integer, got {value!r}")
    try:
        return operator.index(value)  # type: ignore[arg-type]
    except TypeError:
        raise InputError(f"{name} must be an integer, got {value!r}") from None


def _nearest_valid_frames(num_frames: int) -> list[int]:
    """The valid (4k+1) frame counts just below and above an invalid one."""
    lower = num_frames - (num_frames - 1) % 4
    return [n for n in (lower, lower + 4) if n >= 1]


def check_num_frames(num_frames: int) -> int:
    """Validate a frame count: the causal VAE needs 4k+1 frames (spec section 4.4). Returns it unchanged."""
    num_frames = _as_int("num_frames", num_frames)
    if num_frames < 1 or (num_frames - 1) % 4:
        hint = "try " + " or ".join(str(n) for n in _nearest_valid_frames(num_frames))
        raise InputError(f"num_frames must be 4k+1 (1, 5, 9, ..., 129): got {num_frames}; {hint}")
    return num_frames


def check_size(height: int, width: int, multiple: int = 16) -> tuple[int, int]:
    """Validate an output size: 8x VAE downsampling then 2x2 patches need multiples of 16. Returns it."""
    height, width = _as_int("height", height), _as_int("width", width)
    if height <= 0 or width <= 0:
        raise InputError(f"height and width must be positive, got {height}x{width}")
    if height % multiple or width % multiple:

        def near(value: int) -> str:
            lower = value // multiple * multiple
            if value == lower:
                return str(value)
            return f"{lower} or {lower + multiple}" if lower else str(multiple)

        raise InputError(
            f"height and width must be multiples of {multiple}: got {height}x{width}; "
            f"try height {near(height)}, width {near(width)}"
        )
    return height, width


def latent_shape(
    num_frames: int,
    height: int,
    width: int,
    latent_channels: int = 16,
    spatial: int = 8,
    temporal: int = 4,
    batch_size: int = 1,
) -> tuple[int, int, int, int, int]:
    """``(B, C, T', H/8, W/8)`` of the latents for a video, with T' = (T - 1)/4 + 1 (spec section 4.4)."""
    if num_frames < 1 or (num_frames - 1) % temporal:
        raise InputError(f"num_frames must be {temporal}k+1, got {num_frames}")
    if height % spatial or width % spatial:
        raise InputError(f"height and width must be multiples of {spatial}, got {height}x{width}")
    return (batch_size, latent_channels, (num_frames - 1) // temporal + 1, height // spatial, width // spatial)


def token_counts(
    num_frames: int, height: int, width: int, patch: int = 2, spatial: int = 8, temporal: int = 4
) -> tuple[int, int]:
    """``(tokens per latent frame, total video tokens)`` the transformer sees (text tokens not included).

    E.g. 129 frames of 704x1248 -> 33 latent frames of 88x156 -> 44x78 = 3432 tokens each, 113,256 in all.
    """
    _, _, latent_t, latent_h, latent_w = latent_shape(num_frames, height, width, spatial=spatial, temporal=temporal)
    if latent_h % patch or latent_w % patch:
        raise InputError(f"height and width must be multiples of {spatial * patch}, got {height}x{width}")
    per_frame = (latent_h // patch) * (latent_w // patch)
    return per_frame, per_frame * latent_t
