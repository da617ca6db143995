"""Video files, frame dumps and previews, written from a real photo and read back."""

from __future__ import annotations

import os
from datetime import datetime

import av
import numpy as np
import pytest
import torch
from PIL import Image
from skimage import data

from hunyuan_i2v import video as video_module
from hunyuan_i2v.errors import InputError
from hunyuan_i2v.video import (
    read_video,
    slugify,
    to_uint8_frames,
    unique_output_path,
    write_frames_png,
    write_preview,
    write_video,
)

METADATA = {"prompt": "An astronaut waves, 宇航员", "seed": 42, "steps": 50, "resolution": "360p", "cfg": 1.0}


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255.0**2 / mse))


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """9 frames of the 512x512 astronaut photo panning by 4 px a frame: uint8 [T, H, W, 3]."""
    photo = data.astronaut()
    return np.stack([np.roll(photo, 4 * i, axis=1) for i in range(9)])


@pytest.fixture(scope="module")
def written(tmp_path_factory, clip):
    path = tmp_path_factory.mktemp("video") / "clip.mp4"
    assert write_video(path, clip, fps=24, metadata=METADATA) == path
    return path


def test_round_trip(written, clip):
    frames, fps, metadata = read_video(written)
    assert frames.dtype == np.uint8 and frames.shape == clip.shape
    assert fps == 24.0
    assert metadata == METADATA
    # 4:2:0 chroma alone caps this detailed photo near 38 dB; decoding with the wrong matrix (BT.601 for
    # BT.709) would give about 32 dB, so this also checks the colour tagging.
    assert _psnr(frames, clip) > 35.0
    assert min(_psnr(f, c) for f, c in zip(frames, clip)) > 34.0
    assert list(written.parent.iterdir()) == [written]  # no temporary file left


def test_container_details(written):
    blob = written.read_bytes()
    assert blob.find(b"moov") < blob.find(b"mdat")  # +faststart: the index comes first
    with av.open(str(written)) as container:
        assert container.metadata["title"] == METADATA["prompt"]
        stream = container.streams.video[0]
        assert stream.codec_context.name == "h264"
        assert stream.codec_context.pix_fmt == "yuv420p"
        assert int(stream.codec_context.colorspace) == 1  # BT.709
    frames, _, _ = read_video(written, max_frames=3)
    assert frames.shape[0] == 3


def test_float_layouts_convert_to_canonical(clip):
    canonical = clip[:3, :32, :48]
    unit = torch.from_numpy(canonical.astype(np.float32) / 255.0)
    tchw = unit.permute(0, 3, 1, 2)
    cthw = unit.permute(3, 0, 1, 2)
    assert np.array_equal(to_uint8_frames(tchw[:2]), canonical[:2])  # [2, 3, H, W]
    assert np.array_equal(to_uint8_frames(cthw[:, :2]), canonical[:2])  # [3, 2, H, W]
    bf16 = to_uint8_frames(cthw[:, :2].to(torch.bfloat16))  # bf16 keeps 8 bits of mantissa: off by <= 1 level
    assert np.abs(bf16.astype(int) - canonical[:2]).max() <= 1
    assert np.array_equal(to_uint8_frames(cthw[None, :, :2]), canonical[:2])  # the decoder's [1, 3, T, H, W]
    assert np.array_equal(to_uint8_frames(unit[:2].numpy()), canonical[:2])  # float THWC
    # 3 frames of 3 channels is ambiguous unless the layout is given.
    for frames in (tchw, cthw, unit):
        with pytest.raises(InputError, match="ambiguous"):
            to_uint8_frames(frames)
    assert np.array_equal(to_uint8_frames(unit, layout="THWC"), canonical)
    assert np.array_equal(to_uint8_frames(tchw, layout="TCHW"), canonical)
    assert np.array_equal(to_uint8_frames(cthw, layout="CTHW"), canonical)


def test_float_conversion_rounds_and_clips(caplog):
    values = torch.tensor([0.0, 0.999, 0.5, 1.0 / 255 * 0.49, 1.0]).reshape(1, 1, 5, 1).expand(1, 3, 5, 1)
    out = to_uint8_frames(values.permute(0, 2, 3, 1), layout="THWC")  # [1, 5, 1, 3]
    assert out[0, :, 0, 0].tolist() == [0, 255, 128, 0, 255]  # rounded: truncation would give 254 and 127
    wide = torch.linspace(-1, 1, 12).reshape(1, 3, 2, 2)
    with caplog.at_level("WARNING", logger="hunyuan_i2v.video"):
        out = to_uint8_frames(wide)
    assert out.min() == 0 and out.max() == 255 and "outside [0, 1]" in caplog.text


def test_bad_frames_are_rejected():
    with pytest.raises(InputError, match="NaN"):
        to_uint8_frames(torch.full((2, 3, 4, 4), float("nan")))
    with pytest.raises(InputError, match="uint8"):
        to_uint8_frames(np.zeros((2, 4, 4, 3), np.int16))
    with pytest.raises(InputError, match="4-D"):
        to_uint8_frames(np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(InputError, match="batch"):
        to_uint8_frames(torch.zeros(2, 3, 5, 4, 4))
    with pytest.raises(InputError):
        to_uint8_frames(np.zeros((2, 4, 4, 4), np.uint8))
    with pytest.raises(InputError):
        to_uint8_frames([[1, 2, 3]])


def test_failed_writes_leave_nothing(tmp_path, clip, monkeypatch):
    target = tmp_path / "out.mp4"
    with pytest.raises(InputError, match="even"):
        write_video(target, clip[:, :31, :32])
    with pytest.raises(InputError):
        write_video(target, clip[..., :2])  # two channels
    with pytest.raises(InputError, match="extension"):
        write_video(tmp_path / "out.avi", clip)
    with pytest.raises(InputError, match="does not exist"):
        write_video(tmp_path / "missing" / "out.mp4", clip)
    assert list(tmp_path.iterdir()) == []
    # Failures once encoding has started keep the old file and remove the temporary one.
    write_video(target, clip[:2, :64, :64])
    before = target.read_bytes()
    with pytest.raises(Exception):
        write_video(target, clip[:3, :64, :64], preset="no-such-preset")  # x264 refuses to open
    assert list(tmp_path.iterdir()) == [target]

    # A failure mid-stream (disk full, Ctrl-C...) cannot be produced cheaply, so make frame 56 of 60 fail,
    # after x264's lookahead has filled and the temporary file has been written to.
    convert = video_module._to_yuv420p
    calls = []

    def failing(rgb):
        calls.append(sorted(p.name for p in tmp_path.iterdir()))
        if len(calls) == 56:
            raise KeyboardInterrupt
        return convert(rgb)

    monkeypatch.setattr(video_module, "_to_yuv420p", failing)
    with pytest.raises(KeyboardInterrupt):
        write_video(target, np.concatenate([clip[:, :32, :32]] * 7)[:60])
    assert any(name.endswith(".part") for name in calls[-1])  # the temporary file existed
    assert list(tmp_path.iterdir()) == [target]
    assert target.read_bytes() == before


def test_fps_crf_and_formats(tmp_path, clip):
    small = clip[:5, :64, :96]
    path = write_video(tmp_path / "ntsc.mov", small, fps=24000 / 1001, crf=0, metadata={"seed": 1})
    frames, fps, metadata = read_video(path)
    assert fps == pytest.approx(23.976, abs=1e-3) and metadata == {"seed": 1}
    assert _psnr(frames, small) > 38.0  # crf 0 is lossless in YUV; only colour conversion remains
    mkv = write_video(tmp_path / "c.mkv", torch.from_numpy(small).permute(3, 0, 1, 2) / 255.0, fps=8)
    frames, fps, _ = read_video(mkv)
    assert frames.shape == small.shape and fps == 8.0
    for bad in ({"fps": 0}, {"fps": "fast"}, {"crf": 60}, {"metadata": ["x"]}):
        with pytest.raises(InputError):
            write_video(tmp_path / "bad.mp4", small, **bad)


def test_read_video_errors(tmp_path):
    with pytest.raises(InputError, match="not found"):
        read_video(tmp_path / "none.mp4")
    (tmp_path / "fake.mp4").write_bytes(b"not a video" * 100)
    with pytest.raises(InputError):
        read_video(tmp_path / "fake.mp4")


def test_write_frames_png(tmp_path, clip):
    paths = write_frames_png(tmp_path / "frames", clip[:3, :40, :50])
    assert [p.name for p in paths] == ["frame_00000.png", "frame_00001.png", "frame_00002.png"]
    for path, frame in zip(paths, clip[:3, :40, :50]):
        assert np.array_equal(np.asarray(Image.open(path)), frame)
    assert sorted(os.listdir(tmp_path / "frames")) == [p.name for p in paths]


@pytest.mark.parametrize("ext", [".webp", ".gif"])
def test_previews(tmp_path, clip, ext):
    frames = clip[:6, :96, :128]
    path = write_preview(tmp_path / f"p{ext}", frames, fps=10)
    with Image.open(path) as img:
        assert img.n_frames == 6 and img.size == (128, 96)
        assert img.info.get("loop") == 0
        img.seek(3)
        img.load()
        assert img.info["duration"] == 100
        fourth = np.asarray(img.convert("RGB"), dtype=np.float64)
    assert np.abs(fourth - frames[3]).mean() < 12.0
    small = write_preview(tmp_path / f"s{ext}", frames, fps=10, max_side=64)
    with Image.open(small) as img:
        assert img.size == (64, 48) and img.n_frames == 6
    with pytest.raises(InputError, match="preview"):
        write_preview(tmp_path / "p.png", frames)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([f"p{ext}", f"s{ext}"])


def test_unique_output_path(tmp_path):
    now = datetime(2025, 3, 7, 14, 5, 9)
    prompt = "An astronaut, waving at the camera!  (slow motion) " * 3
    first = unique_output_path(tmp_path / "results", prompt, 42, now=now)
    assert first.parent.is_dir()
    assert first.name.startswith("20250307-140509_seed42_an-astronaut-waving-at-the-camera-slow-motion")
    assert first.suffix == ".mp4"
    slug = first.stem.split("_", 2)[2]
    assert len(slug) <= 60 and not slug.endswith("-")
    first.write_bytes(b"x")
    second = unique_output_path(tmp_path / "results", prompt, 42, now=now)
    assert second.name == first.stem + "-1.mp4"
    second.write_bytes(b"y")
    third = unique_output_path(tmp_path / "results", prompt, 42, ext="webp", now=now)
    assert third.name == first.stem + ".webp"
    assert unique_output_path(tmp_path / "results", prompt, 42, now=now).name == first.stem + "-2.mp4"
    assert first.read_bytes() == b"x" and second.read_bytes() == b"y"
    assert unique_output_path(tmp_path, "", 0, now=now).name == "20250307-140509_seed0_video.mp4"


def test_slugify():
    assert slugify("A cat, playing piano!") == "a-cat-playing-piano"
    assert slugify("../../etc/passwd") == "etc-passwd"
    assert slugify("一只猫 在弹钢琴") == "一只猫-在弹钢琴"
    assert slugify("snake_case__and--dashes") == "snake-case-and-dashes"
