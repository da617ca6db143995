"""The demo model shipped inside the package: it loads, stays within its size budget, and generates a video of the
documented size with the plain `hunyuan-i2v generate PHOTO PROMPT` command."""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from hunyuan_i2v.cli import bundled_model_dir, main
from hunyuan_i2v.config import TINY_DEMO, model_config_from_dict
from hunyuan_i2v.video import read_video

skimage_data = pytest.importorskip("skimage.data")


@pytest.fixture(scope="module")
def bundled():
    path = bundled_model_dir()
    assert path is not None, "the demo model must ship in hunyuan_i2v/assets/tiny (docs/training.md, export stage)"
    return path


def test_files_and_size_budget(bundled):
    sizes = {p.name: p.stat().st_size for p in bundled.iterdir()}
    assert {"model.json", "transformer.safetensors", "vae.safetensors"} <= set(sizes)
    assert sizes["transformer.safetensors"] + sizes["vae.safetensors"] <= 25_000_000
    config = model_config_from_dict(json.loads((bundled / "model.json").read_text()))
    # the demo preset's architecture, with the VAE scaling factor measured after training
    assert config.transformer == TINY_DEMO.transformer and config.text == TINY_DEMO.text
    assert config.vae.block_out_channels == TINY_DEMO.vae.block_out_channels and 0 < config.vae.scaling_factor < 10


def test_plain_generate_command_writes_the_documented_video(bundled, tmp_path, capsys, monkeypatch):
    photo = tmp_path / "cat.jpg"
    Image.fromarray(skimage_data.chelsea()).save(photo)
    monkeypatch.chdir(tmp_path)
    assert main(["generate", str(photo), "the camera slowly zooms in", "--no-progress", "--seed", "0"]) == 0
    videos = list((tmp_path / "outputs").glob("*.mp4"))
    assert len(videos) == 1
    frames, fps, meta = read_video(videos[0])
    assert frames.shape == (33, 64, 64, 3) and fps == pytest.approx(8)
    assert meta["prompt"] == "the camera slowly zooms in" and meta["model"].endswith("tiny")
    # a real picture, not noise: neighbouring frames are close and the video is not flat
    diffs = np.abs(np.diff(frames.astype(np.int16), axis=0)).mean()
    assert diffs < 20 and frames.std() > 10
