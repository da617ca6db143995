"""Frames streamed from the VAE into the MP4 writer: identical to the collected output, nothing kept in memory."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hunyuan_i2v.cli import bundled_model_dir, main
from hunyuan_i2v.pipeline import I2VPipeline, _stream_frames
from hunyuan_i2v.video import read_video

skimage = pytest.importorskip("skimage")


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photo") / "cat.png"
    Image.fromarray(skimage.data.chelsea()).save(path)
    return path


def test_the_frame_sink_gets_exactly_the_returned_frames(photo):
    pipe = I2VPipeline.from_pretrained(bundled_model_dir(), device="cpu", prompt_cache=False)
    kw = dict(num_frames=9, steps=2, seed=3, progress=False, num_videos=2)
    plain = pipe(photo, "the camera pans left", **kw)
    got: dict[int, list[np.ndarray]] = {}
    streamed = pipe(photo, "the camera pans left", **kw,
                    frame_sink=lambda i, frames, settings: got.setdefault(i, []).append(frames))
    assert streamed.frames is None and streamed.settings.seeds == plain.settings.seeds
    assert sorted(got) == [0, 1]
    for i in (0, 1):
        assert got[i][0].dtype == np.uint8
        np.testing.assert_array_equal(np.concatenate(got[i]), plain.frames[i])


def test_streaming_drops_the_legacy_models_first_frames_across_chunks():
    chunks = [torch.zeros(1, 3, 3, 2, 2), torch.ones(1, 3, 4, 2, 2)]  # 7 frames in two chunks, -1 then +1
    out: list[np.ndarray] = []
    _stream_frames(0, iter(chunks), 4, lambda i, f, s: out.append(f), None)
    frames = np.concatenate(out)
    assert frames.shape == (3, 2, 2, 3)  # 7 - 4 frames, [t, H, W, 3]
    assert (frames == 255).all()  # all from the second chunk: (1 / 2 + 0.5) * 255


def test_cli_streams_the_same_video_as_the_collected_path(photo, tmp_path):
    streamed, collected = tmp_path / "streamed.mp4", tmp_path / "collected.mp4"
    # lossless x264 (--crf 0): lossy multi-threaded encodes of the same frames are not byte-reproducible
    common = [str(photo), "the camera tilts up", "--frames", "9", "--steps", "2", "--seed", "5", "--no-progress",
              "--no-prompt-cache", "--crf", "0"]
    assert main(["generate", *common, "-o", str(streamed)]) == 0
    assert main(["generate", *common, "-o", str(collected), "--frames-dir", str(tmp_path / "png")]) == 0
    a, fps_a, meta_a = read_video(streamed)
    b, fps_b, meta_b = read_video(collected)
    assert a.shape == b.shape == (9, 64, 64, 3) and fps_a == fps_b
    np.testing.assert_array_equal(a, b)
    assert meta_a == meta_b and meta_a["seed"] == 5
    assert sorted(p.name for p in tmp_path.iterdir()) == ["collected.mp4", "png", "streamed.mp4"]  # no temp files
