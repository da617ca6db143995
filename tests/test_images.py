"""Loading the conditioning image from real files of many kinds, and converting it to the VAE's tensor."""

from __future__ import annotations

import logging
import struct
import zlib

import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from hunyuan_i2v.errors import HunyuanI2VError, InputError
from hunyuan_i2v.images import image_to_tensor, load_image


def _png_bytes(width: int, height: int, bit_depth: int, color_type: int, raw: bytes | None) -> bytes:
    """A minimal PNG written by hand (PIL cannot write 16-bit RGB, nor a header-only file)."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    idat = chunk(b"IDAT", zlib.compress(raw)) if raw is not None else b""
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + idat + chunk(b"IEND", b"")


@pytest.fixture(scope="module")
def astronaut() -> np.ndarray:
    return data.astronaut()[::2, ::2].copy()  # 256x256 RGB photo


def test_png_round_trip_is_exact(tmp_path, astronaut):
    path = tmp_path / "a.png"
    Image.fromarray(astronaut).save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (256, 256)
    assert np.array_equal(np.asarray(img), astronaut)
    assert np.array_equal(np.asarray(load_image(str(path))), astronaut)  # str paths too


def test_jpeg_loads_close_to_source(tmp_path, astronaut):
    path = tmp_path / "a.jpg"
    Image.fromarray(astronaut).save(path, quality=95)
    img = load_image(path)
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img, dtype=np.float64) - astronaut).mean() < 3.0


def test_exif_orientation_is_applied(tmp_path):
    pixels = np.zeros((20, 40, 3), np.uint8)  # 40 wide, 20 tall
    pixels[:, :20] = (255, 0, 0)  # left half red
    pixels[:, 20:] = (0, 0, 255)  # right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    path = tmp_path / "rotated.png"
    Image.fromarray(pixels).save(path, exif=exif)
    img = load_image(path)
    assert img.size == (20, 40)  # now 20 wide, 40 tall
    assert np.array_equal(np.asarray(img), np.rot90(pixels, k=-1))
    assert img.getpixel((10, 2)) == (255, 0, 0)  # clockwise: the left half is now on top


def test_animated_gif_gives_first_frame(tmp_path, caplog):
    colors = [(255, 0, 0), (0, 255, 0), (0, 0, 255)]
    frames = [Image.new("RGB", (32, 24), c) for c in colors]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=100, loop=0)
    with Image.open(path) as check:
        assert check.n_frames == 3
    with caplog.at_level(logging.INFO, logger="hunyuan_i2v.images"):
        img = load_image(path)
    assert img.mode == "RGB" and img.size == (32, 24)
    assert np.all(np.asarray(img) == (255, 0, 0))
    assert "first frame" in caplog.text and "3 frames" in caplog.text


def test_cmyk_jpeg_converts_to_rgb(tmp_path, astronaut):
    path = tmp_path / "cmyk.jpg"
    Image.fromarray(astronaut).convert("CMYK").save(path, quality=95)
    with Image.open(path) as check:
        assert check.mode == "CMYK"
    img = load_image(path)
    assert img.mode == "RGB"
    assert np.abs(np.asarray(img, dtype=np.float64) - astronaut).mean() < 4.0


def test_rgba_is_composited_on_white_by_default(tmp_path):
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255  # red everywhere, hidden where transparent
    rgba[:, :4, 3] = 0  # left: fully transparent
    rgba[:, 4:6, 3] = 128  # middle: half transparent
    rgba[:, 6:, 3] = 255  # right: opaque
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)
    out = np.asarray(load_image(path)).astype(int)
    assert np.all(out[:, :4] == 255)  # white, not the hidden red
    assert np.all(np.abs(out[:, 4:6] - (255, 127, 127)) <= 1)  # half red over white
    assert np.all(out[:, 6:] == (255, 0, 0))
    black = np.asarray(load_image(path, background=(0, 0, 0))).astype(int)
    assert np.all(black[:, :4] == 0)
    assert np.all(np.abs(black[:, 4:6] - (128, 0, 0)) <= 1)


def test_greyscale_alpha_and_palette_transparency(tmp_path):
    la = Image.merge("LA", [Image.new("L", (4, 4), 50), Image.new("L", (4, 4), 0)])
    la.save(tmp_path / "la.png")
    assert np.all(np.asarray(load_image(tmp_path / "la.png")) == 255)
    # A GIF whose palette index 0 is transparent.
    pal = Image.new("P", (4, 4), 0)
    pal.putpalette([10, 20, 30, 200, 100, 50] + [0] * (256 * 3 - 6))
    pal.putpixel((0, 0), 1)
    pal.save(tmp_path / "t.gif", transparency=0)
    out = np.asarray(load_image(tmp_path / "t.gif"))
    assert tuple(out[0, 0]) == (200, 100, 50)
    assert tuple(out[1, 1]) == (255, 255, 255)


def test_greyscale_and_bilevel(tmp_path):
    grey = np.arange(256, dtype=np.uint8).reshape(16, 16)
    Image.fromarray(grey, "L").save(tmp_path / "g.png")
    out = np.asarray(load_image(tmp_path / "g.png"))
    assert out.shape == (16, 16, 3) and np.array_equal(out[..., 1], grey)
    Image.fromarray(grey > 127).save(tmp_path / "b.png")
    out = np.asarray(load_image(tmp_path / "b.png"))
    assert set(np.unique(out)) == {0, 255}


def test_16bit_greyscale_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257 * 64, 257 * 128, 65535]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "g16.png")
    with Image.open(tmp_path / "g16.png") as check:
        assert check.mode.startswith("I")
    out = np.asarray(load_image(tmp_path / "g16.png"))
    assert out.dtype == np.uint8
    assert out[0, :, 0].tolist() == [0, 64, 128, 255]  # a plain convert("RGB") would clip 3 of these to 255


def test_16bit_rgb_png(tmp_path):
    rgb16 = np.array([[[65535, 0, 257 * 100], [257 * 10, 257 * 200, 0]]], dtype=">u2")  # 2x1, big-endian
    raw = b"".join(b"\x00" + row.tobytes() for row in rgb16)  # filter byte 0 per scanline
    (tmp_path / "rgb16.png").write_bytes(_png_bytes(2, 1, 16, 2, raw))
    out = np.asarray(load_image(tmp_path / "rgb16.png")).astype(int)
    assert np.all(np.abs(out - np.rint(rgb16.astype(np.float64) / 257)) <= 1)


def test_truncated_and_corrupt_files(tmp_path, astronaut):
    for name in ("t.jpg", "t.png"):
        full = tmp_path / ("full_" + name)
        Image.fromarray(astronaut).save(full)
        blob = full.read_bytes()
        (tmp_path / name).write_bytes(blob[: len(blob) // 2])
        with pytest.raises(InputError, match="truncated or corrupt"):
            load_image(tmp_path / name)
    (tmp_path / "notes.png").write_text("not an image at all")
    with pytest.raises(InputError, match="not an image"):
        load_image(tmp_path / "notes.png")


def test_missing_file_folder_and_bad_type(tmp_path):
    with pytest.raises(InputError, match="not found"):
        load_image(tmp_path / "nope.png")
    with pytest.raises(InputError, match="folder"):
        load_image(tmp_path)
    with pytest.raises(InputError):
        load_image(np.zeros((4, 4, 3), np.uint8))


def test_pixel_cap_refuses_before_decoding(tmp_path, astronaut):
    path = tmp_path / "a.png"
    Image.fromarray(astronaut).save(path)
    with pytest.raises(InputError, match="limit"):
        load_image(path, max_pixels=256 * 255)
    assert load_image(path, max_pixels=256 * 256).size == (256, 256)
    # An 81 MP header with no pixel data at all: refused from the header alone (decoding would fail).
    (tmp_path / "big.png").write_bytes(_png_bytes(9000, 9000, 8, 2, None))
    with pytest.raises(InputError, match="81.0 MP, above the 64.0 MP limit"):
        load_image(tmp_path / "big.png")


def test_pil_decompression_bomb_error_is_wrapped(tmp_path):
    # 400 MP: above PIL's own hard limit (2 x 89.5 MP), which fires inside Image.open whatever our cap.
    (tmp_path / "bomb.png").write_bytes(_png_bytes(20000, 20000, 8, 2, None))
    with pytest.raises(InputError, match="decompression bomb"):
        load_image(tmp_path / "bomb.png", max_pixels=10**9)


def test_pil_input_is_not_modified():
    rgba = Image.new("RGBA", (6, 4), (0, 255, 0, 0))
    out = load_image(rgba)
    assert out is not rgba and rgba.mode == "RGBA"
    assert out.mode == "RGB" and out.getpixel((0, 0)) == (255, 255, 255)
    rgb = Image.new("RGB", (6, 4), (1, 2, 3))
    out = load_image(rgb)
    assert out is not rgb and out.getpixel((5, 3)) == (1, 2, 3)
    with pytest.raises(InputError, match="limit"):
        load_image(rgb, max_pixels=23)


def test_image_to_tensor(astronaut):
    img = Image.fromarray(astronaut)
    x = image_to_tensor(img)
    assert x.shape == (1, 3, 1, 256, 256) and x.dtype == torch.float32
    expected = torch.from_numpy(astronaut.astype(np.float64)).permute(2, 0, 1) / 127.5 - 1.0
    torch.testing.assert_close(x[0, :, 0].double(), expected, atol=1e-6, rtol=0)
    ends = image_to_tensor(Image.fromarray(np.array([[[0, 255, 128]]], np.uint8)), dtype=torch.float64)
    assert ends.dtype == torch.float64
    assert ends.flatten().tolist() == pytest.approx([-1.0, 1.0, 128 / 127.5 - 1.0], abs=1e-7)
    with pytest.raises(InputError, match="load_image"):
        image_to_tensor(img.convert("L"))


def test_error_classes():
    assert issubclass(InputError, ValueError) and issubclass(InputError, HunyuanI2VError)
