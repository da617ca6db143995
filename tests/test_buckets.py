"""Resolution buckets, preprocessing geometry and size/length arithmetic (spec sections 4.3, 4.4)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from hunyuan_i2v.buckets import (
    RESOLUTION_BASE_SIZE,
    bucket_for,
    center_crop_box,
    check_num_frames,
    check_size,
    closest_bucket,
    generate_crop_size_list,
    latent_shape,
    resize_and_center_crop,
    resize_size,
    token_counts,
)
from hunyuan_i2v.errors import InputError


@pytest.mark.parametrize("base, count", [(960, 91), (720, 67), (480, 43)])
def test_bucket_counts_and_invariants(base, count):
    buckets = generate_crop_size_list(base, 32)
    assert len(buckets) == count
    assert len(set(buckets)) == count
    for h, w in buckets:
        assert h % 32 == 0 and w % 32 == 0
        assert h * w <= base * base
        assert max(h, w) / min(h, w) <= 4.0
    # Both orientations of every shape, and the square.
    assert set(buckets) == {(w, h) for h, w in buckets}
    side = math.isqrt(round((base / 32) ** 2)) * 32  # the largest square within the area: 960, 704, 480
    assert (side, side) in buckets


@pytest.mark.parametrize("base", [960, 720, 480, 512])
def test_bucket_set_matches_closed_form_staircase(base):
    # Independent description of the walk: for each first side a (in patches), the second side takes every
    # value from where the previous column stopped, floor(n/(a+1)), up to the largest fitting, floor(n/a).
    n = round((base / 32) ** 2)
    expected = {
        (a * 32, b * 32)
        for a in range(1, n + 1)
        for b in range(max(1, n // (a + 1)), n // a + 1)
        if max(a, b) / min(a, b) <= 4.0
    }
    assert set(generate_crop_size_list(base, 32)) == expected


def test_bucket_order_is_official_tall_to_wide():
    buckets = generate_crop_size_list(960, 32)
    assert buckets[0] == (1920, 480)
    assert buckets[-1] == (480, 1920)
    ratios = [h / w for h, w in buckets]
    assert ratios == sorted(ratios, reverse=True)


def test_max_ratio_restricts_buckets():
    buckets = generate_crop_size_list(960, 32, max_ratio=2.0)
    assert all(max(h, w) / min(h, w) <= 2.0 for h, w in buckets)
    assert len(buckets) < 91


# (W, H) in -> (h, w) out at 720p / 540p / 360p (spec section 4.3).
EXAMPLES = [
    ((1280, 720), [(704, 1248), (544, 928), (352, 608)]),
    ((1920, 1080), [(704, 1248), (544, 928), (352, 608)]),
    ((1024, 1024), [(960, 960), (704, 704), (480, 480)]),
    ((800, 600), [(832, 1088), (608, 800), (416, 544)]),
    ((720, 1280), [(1248, 704), (928, 544), (608, 352)]),
]


@pytest.mark.parametrize("size, expected", EXAMPLES)
def test_worked_examples(size, expected):
    width, height = size
    got = [bucket_for(width, height, res) for res in ("720p", "540p", "360p")]
    assert got == expected


def test_orientation_follows_the_image():
    for width, height in [(1000, 999), (3000, 1000), (640, 480), (10, 1)]:
        h, w = bucket_for(width, height, "540p")
        assert h <= w, (width, height)
        h, w = bucket_for(height, width, "540p")  # the portrait twin
        assert h >= w, (height, width)


def test_closest_bucket_is_asymmetric():
    buckets = generate_crop_size_list(960, 32)
    # Landscape: strictly taller ratio than the image (so the crop fits after resizing the short side).
    h, w = closest_bucket(720, 1280, buckets)
    assert h / w > 720 / 1280
    # Portrait/square: ratio at most the image's.
    h, w = closest_bucket(1280, 720, buckets)
    assert h / w <= 1280 / 720
    # Extreme aspect ratios clamp to the 4:1 buckets.
    assert closest_bucket(100, 10_000, buckets) == (480, 1920)
    assert closest_bucket(10_000, 100, buckets) == (1920, 480)


def test_rounded_bucket_ratio_quirk_is_kept():
    # A 1248x704 (W x H) image: bucket 704x1248's ratio rounds to 0.5641 < 0.564102..., which fails the strict
    # "> image ratio" test for landscape images, so the official rule picks the next taller bucket.
    h, w = bucket_for(1248, 704, "720p")
    assert (h, w) != (704, 1248)
    assert h / w > 704 / 1248


def test_bucket_for_rejects_unknown_resolution():
    with pytest.raises(InputError, match="720p"):
        bucket_for(1280, 720, "1080p")
    assert RESOLUTION_BASE_SIZE == {"720p": 960, "540p": 720, "360p": 480}


def test_center_crop_box_rounds_like_torchvision():
    # torchvision: int(round(margin / 2.0)), Python's round-half-to-even.
    assert center_crop_box(704, 1251, 704, 1248) == (2, 0, 1250, 704)  # 1.5 -> 2
    assert center_crop_box(704, 1253, 704, 1248) == (2, 0, 1250, 704)  # 2.5 -> 2
    assert center_crop_box(704, 1250, 704, 1248) == (1, 0, 1249, 704)
    assert center_crop_box(11, 20, 8, 20) == (0, 2, 20, 10)  # 1.5 -> 2 vertically
    with pytest.raises(InputError):
        center_crop_box(100, 100, 101, 50)


def test_resize_size_official_rule_and_fallback():
    assert resize_size(720, 1280, 704, 1248) == (704, 1251)  # long side truncated: 704*1280/720 = 1251.6
    assert resize_size(1280, 720, 1248, 704) == (1251, 704)
    assert resize_size(1024, 1024, 960, 960) == (960, 960)
    # A target the official resize cannot cover (torchvision would pad with black): scale to cover instead.
    h, w = resize_size(100, 100, 64, 128)
    assert (h, w) == (128, 128)
    assert resize_size(100, 300, 64, 128) == (64, 192)  # the official rule fits: unchanged
    # The one real-world gap: bucket ratios rounded to 5 decimals. A 4554x1841 image at 720p gets bucket
    # 608x1504, but Resize(608) makes it 608x1503 (torchvision would pad a black column); we cover instead.
    assert bucket_for(4554, 1841, "720p") == (608, 1504)
    assert int(608 * 4554 / 1841) == 1503
    assert resize_size(1841, 4554, 608, 1504) == (609, 1504)
    out = resize_and_center_crop(Image.new("RGB", (4554, 1841), (200, 100, 50)), 608, 1504)
    assert out.size == (1504, 608)
    assert np.all(np.asarray(out) == (200, 100, 50))  # no padding anywhere


def test_resize_and_center_crop_matches_official_pipeline_steps():
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(720, 1280, 3), dtype=np.uint8)
    image = Image.fromarray(pixels)
    out = resize_and_center_crop(image, 704, 1248)
    assert out.size == (1248, 704)
    # Official: Resize(704) -> 704x1251 (bilinear, antialiased), CenterCrop -> left 2 (round(1.5)), top 0.
    expected = image.resize((1251, 704), Image.Resampling.BILINEAR).crop((2, 0, 1250, 704))
    assert np.array_equal(np.asarray(out), np.asarray(expected))


def test_pil_bilinear_is_torch_antialiased_bilinear():
    # torchvision's Resize on tensors is F.interpolate(bilinear, antialias=True); on PIL images it is PIL
    # BILINEAR. Check the two agree, i.e. our PIL path reproduces the reference resampling.
    yy, xx = np.mgrid[0:360, 0:640].astype(np.float64)
    channels = [np.sin(xx / 7.0) * np.cos(yy / 5.0), np.sin((xx + yy) / 3.0), np.cos(xx * yy / 900.0)]
    image = Image.fromarray(np.stack([np.rint(127.5 + 127 * c) for c in channels], -1).astype(np.uint8))
    out = np.asarray(resize_and_center_crop(image, 160, 288)).astype(np.float64)  # 360x640 -> 162x288 -> crop
    tensor = torch.from_numpy(np.asarray(image).copy()).permute(2, 0, 1)[None].double()
    ref = F.interpolate(tensor, size=(162, 288), mode="bilinear", antialias=True, align_corners=False)
    ref = ref[0].permute(1, 2, 0).numpy()[1:161]
    # Within PIL's 8-bit rounding (other filters or no antialiasing are off by 4-10 levels on average).
    assert np.abs(out - ref).mean() < 0.5
    assert np.abs(out - ref).max() < 1.5


@pytest.mark.parametrize("width, height", [(1280, 720), (300, 451), (1000, 1000), (4000, 900), (333, 1999)])
@pytest.mark.parametrize("resolution", ["720p", "360p"])
def test_preprocessed_image_has_bucket_size(width, height, resolution):
    h, w = bucket_for(width, height, resolution)
    out = resize_and_center_crop(Image.new("RGB", (width, height), (10, 20, 30)), h, w)
    assert out.size == (w, h)
    assert out.getpixel((w // 2, h // 2)) == (10, 20, 30)


def test_check_num_frames():
    assert check_num_frames(129) == 129
    assert check_num_frames(1) == 1
    assert check_num_frames(np.int64(33)) == 33
    with pytest.raises(InputError, match="try 125 or 129"):
        check_num_frames(127)
    with pytest.raises(InputError, match="try 129 or 133"):
        check_num_frames(130)
    with pytest.raises(InputError, match="try 1$"):
        check_num_frames(0)
    for bad in (129.0, "129", True):
        with pytest.raises(InputError):
            check_num_frames(bad)


def test_check_size():
    assert check_size(704, 1248) == (704, 1248)
    assert check_size(720, 1280) == (720, 1280)
    with pytest.raises(InputError, match="height 688 or 704, width 1280"):
        check_size(700, 1280)
    with pytest.raises(InputError, match="width 16"):
        check_size(32, 8)
    with pytest.raises(InputError):
        check_size(0, 16)
    with pytest.raises(ValueError):  # InputError is a ValueError
        check_size(17, 16)


def test_latent_shape():
    assert latent_shape(129, 704, 1248) == (1, 16, 33, 88, 156)
    assert latent_shape(1, 64, 64, latent_channels=4, batch_size=2) == (2, 4, 1, 8, 8)
    with pytest.raises(InputError):
        latent_shape(128, 704, 1248)
    with pytest.raises(InputError):
        latent_shape(129, 700, 1248)


@pytest.mark.parametrize(
    "height, width, per_frame, total",
    [(704, 1248, 3432, 113_256), (544, 928, 1972, 65_076), (352, 608, 836, 27_588), (960, 960, 3600, 118_800)],
)
def test_token_counts_match_spec(height, width, per_frame, total):
    assert token_counts(129, height, width) == (per_frame, total)


def test_token_counts_need_multiples_of_16():
    with pytest.raises(InputError, match="16"):
        token_counts(129, 712, 1248)
