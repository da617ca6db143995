"""LoRA preparation and training for models in every layout generate opens: a tiny random model (the TINY_TEST
transformer, a 4-channel 8x VAE, a tiny LLaVA + CLIP prompt encoder that reads the image) saved in the official
ckpts/, diffusers and flat layouts, and two real MP4 clips. The cache must follow the model's own VAE and prompt
encoder (not the MiniLM default), and lora train must find the base in that layout."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from hunyuan_i2v.errors import InputError
from hunyuan_i2v.train import common as C
from hunyuan_i2v.train.latents import load_latent_cache
from hunyuan_i2v.train.lora import LoraTask, LoraTrainSettings, first_frame, prepare_lora_data
from hunyuan_i2v.video import write_video
from tiny_components import build_tiny_model

CAPTIONS = ["the camera pans left", "a red square drifts up"]
HEIGHT, WIDTH, FRAMES = 32, 48, 5  # the tiny VAE: 4 latent channels, 8x spatial, 4x temporal -> [4, 2, 4, 6]


def _clip(i: int, frames: int = 6, height: int = 40, width: int = 56) -> np.ndarray:
    """A moving coloured pattern, larger than the clip size so the crop is exercised; uint8 [T, H, W, 3]."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack([np.stack([(x * 5 + t * (4 + i)) % 256, (y * 7 + 90 * i) % 256, ((x + y) * 3 + 11 * t) % 256],
                              -1).astype(np.uint8) for t in range(frames)])


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora-layouts")
    tiny = build_tiny_model(root / "src")
    models = {layout: tiny.save(root / layout, layout) for layout in ("official", "diffusers", "flat")}
    videos = root / "videos"
    videos.mkdir()
    for i, caption in enumerate(CAPTIONS):
        write_video(videos / f"clip{i}.mp4", _clip(i), fps=8)
        (videos / f"clip{i}.txt").write_text(caption + "\n")
    cache = root / "official-cache"
    # the official folder carries no config for this non-standard model (as for from_pretrained): pass it
    prepare_lora_data(videos, cache, models["official"], trigger="tinyfx", height=HEIGHT, width=WIDTH,
                      frames=FRAMES, progress=False, config=tiny.config)
    return {"root": root, "tiny": tiny, "models": models, "videos": videos, "cache": cache}


def test_prepare_for_an_official_layout_model_uses_its_vae_and_image_reading_encoder(env):
    from safetensors.torch import load_file

    from hunyuan_i2v.model.text import black_image_like, load_prompt_encoder

    tiny, cache = env["tiny"], load_latent_cache(env["cache"])
    meta = cache.meta
    assert meta["latent_shape"] == [4, 2, HEIGHT // 8, WIDTH // 8]  # the model's VAE, not the bundled one's
    assert tuple(cache.splits["train"].first.shape) == (2, 4, 1, HEIGHT // 8, WIDTH // 8)
    assert cache.text_states.shape[-1] == tiny.config.transformer.text_states_dim == 32  # LLaVA's width, not 384
    assert cache.text_states_2.shape[-1] == tiny.config.transformer.text_states_dim_2 == 16  # CLIP's pooled
    assert meta["base_model"] == str(env["models"]["official"].resolve()) and meta["base_layout"] == "official"
    assert cache.config == tiny.config
    saved = load_file(str(env["cache"] / "vae.safetensors"))  # the official VAE folder's weights, re-saved
    assert all(torch.equal(saved[k], v) for k, v in tiny.vae.state_dict().items())

    # semantic-image variants: the real encoder's rows for (caption, frame 0), (caption, black), ("", frame 0)
    assert cache.semantic_images
    encoder = load_prompt_encoder(env["models"]["official"], dtype=torch.float32, device="cpu",
                                  config=tiny.config.text)
    train = cache.splits["train"]
    for row in range(len(train)):
        frame = first_frame(Path(meta["splits"]["train"]["source"][row]), HEIGHT, WIDTH)
        caption = train.captions[row]
        assert caption == f"tinyfx, {CAPTIONS[row]}"
        for ids, prompt, image in ((train.caption_ids, caption, frame),
                                   (train.black_ids, caption, black_image_like(frame)),
                                   (train.empty_ids, "", frame)):
            with torch.no_grad():
                expected = encoder.encode([prompt], [image])
            i = int(ids[row])
            torch.testing.assert_close(cache.text_states[i].float(), expected.text_states[0], atol=2e-3, rtol=2e-3)
            torch.testing.assert_close(cache.text_states_2[i].float(), expected.text_states_2[0], atol=2e-3,
                                       rtol=2e-3)
            assert torch.equal(cache.text_mask[i], expected.text_mask[0])
        real, black = cache.text(train.caption_ids[row : row + 1]), cache.text(train.black_ids[row : row + 1])
        assert float((real[0] - black[0]).abs().max()) > 1e-2  # the image changes LLaVA's states


def test_lora_train_finds_the_base_in_the_official_and_diffusers_layouts(env):
    settings = LoraTrainSettings(rank=2, alpha=2.0, batch=2, lr=3e-3, eval_videos=1, eval_steps=1, val_clips=2)
    official = LoraTask(env["cache"], None, settings)  # the base the cache records: the official .pt
    assert official.base_file.name == "mp_rank_00_model_states.pt"
    diffusers = LoraTask(env["cache"], env["models"]["diffusers"], settings)
    assert diffusers.base_file.name == "transformer"
    for _ in range(2):
        a, b = official.train_step(1.0), diffusers.train_step(1.0)
        assert math.isfinite(a["loss"]) and a["loss"] > 0
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-6, abs=1e-7)  # the same weights in both layouts
    metrics = official.evaluate(2)  # decodes a video with the VAE saved into the cache
    assert math.isfinite(metrics["val_loss"]) and math.isfinite(metrics["saturation_ratio"])

    empty = env["root"] / "not-a-model"
    empty.mkdir(exist_ok=True)
    with pytest.raises(InputError, match="lora train takes the official ckpts/ folder, a diffusers folder"):
        LoraTask(env["cache"], empty, settings)


def test_cli_prepares_and_trains_with_a_flat_model_that_has_an_llava_encoder(env, capsys):
    """Before, a flat folder's captions went through MiniLM whatever its model.json said; now its LLaVA + CLIP."""
    from hunyuan_i2v.cli import main

    cache, run = env["root"] / "flat-cache", env["root"] / "flat-run"
    assert main(["lora", "prepare", str(env["videos"]), "--out", str(cache), "--model", str(env["models"]["flat"]),
                 "--height", str(HEIGHT), "--width", str(WIDTH), "--frames", str(FRAMES), "--heldout", "1",
                 "--dtype", "fp32", "--quiet"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert summary["latent_shape"] == [4, 2, HEIGHT // 8, WIDTH // 8] and summary["semantic_images"] is True
    assert summary["rows"] == {"train": 1, "heldout": 1}
    loaded = load_latent_cache(cache)
    assert loaded.text_states.shape[-1] == 32 and loaded.meta["base_layout"] == "flat"
    official = load_latent_cache(env["cache"])  # same weights, same clip (alone here, batched there): the latents
    torch.testing.assert_close(loaded.splits["train"].latents[0].float(), official.splits["train"].latents[0].float(),
                               atol=1e-4, rtol=1e-3)

    assert main(["lora", "train", "--data", str(cache), "--out", str(run), "--rank", "2", "--steps", "2",
                 "--batch", "1", "--eval-videos", "0", "--log-every", "1", "--quiet"]) == 0
    losses = [r["loss"] for r in C.read_jsonl(run / C.LOG_NAME) if "loss" in r and "event" not in r]
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)
    assert (run / "lora.safetensors").is_file()


def test_resuming_a_cache_with_another_model_is_refused(env):
    import dataclasses

    from hunyuan_i2v.config import model_config_to_dict

    out = env["root"] / "other-model-cache"
    out.mkdir()
    other = dataclasses.replace(env["tiny"].config, name="another-model")
    (out / "model.json").write_text(json.dumps(model_config_to_dict(other)))
    with pytest.raises(InputError, match="was started with another model"):
        prepare_lora_data(env["videos"], out, env["models"]["flat"], height=HEIGHT, width=WIDTH, frames=FRAMES,
                          resume=True, progress=False)
