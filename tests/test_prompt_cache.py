"""Prompt embeddings cached on disk: a repeated prompt skips the (real, tiny) encoder and gives the same video; the
key covers prompt, image, encoder and text length; corrupt entries are ignored and rewritten; the cache can be
moved or turned off."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from hunyuan_i2v.cli import main
from hunyuan_i2v.model.text import CLIPTextEncoder, MLLMEncoder, PromptEncoder
from hunyuan_i2v.pipeline import I2VPipeline
from hunyuan_i2v.prompt_cache import (
    ENV_VAR,
    PromptCache,
    default_cache_dir,
    modules_fingerprint,
    torch_modules,
)
from hunyuan_i2v.video import read_video
from tiny_components import build_tiny_model, clip_text_model

skimage_data = pytest.importorskip("skimage.data")

PROMPT = "the camera slowly zooms in"
KW = dict(height=32, width=32, num_frames=5, steps=2, seed=4, progress=False)


class CountingEncoder(PromptEncoder):
    """The real tiny LLaVA + CLIP prompt encoder, counting its encode calls."""

    def __init__(self, mllm, clip):
        super().__init__(mllm, clip)
        self.calls = 0

    def encode(self, prompts, images):
        self.calls += 1
        return super().encode(prompts, images)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("cache_tiny"))


def _encoder(tiny) -> CountingEncoder:
    text = tiny.config.text
    mllm = MLLMEncoder(tiny.llava, tiny.llama_tok, tiny.processor, template=text.template, text_len=text.text_len,
                       image_embed_interleave=text.image_embed_interleave)
    return CountingEncoder(mllm, CLIPTextEncoder(clip_text_model(tiny.clip_full), tiny.clip_tok))


def _pipe(tiny, encoder, cache) -> I2VPipeline:
    return I2VPipeline(tiny.config, tiny.transformer, tiny.vae, encoder, device="cpu", prompt_cache=cache)


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(skimage_data.astronaut())


def _entries(folder):
    return sorted(folder.rglob("*.safetensors")) if folder.exists() else []


def test_a_repeated_prompt_skips_the_encoder_and_gives_the_same_video(tiny, astronaut, tmp_path):
    encoder = _encoder(tiny)
    pipe = _pipe(tiny, encoder, tmp_path / "cache")
    first = pipe(astronaut, PROMPT, **KW)
    assert encoder.calls == 1 and len(_entries(tmp_path / "cache")) == 1
    second = pipe(astronaut, PROMPT, **KW)
    assert encoder.calls == 1  # the embeddings came from the file
    assert np.array_equal(first.frames, second.frames) and torch.equal(first.latents, second.latents)
    # a new pipeline (a new process, in effect) with the same encoder reads the same entry
    again = _pipe(tiny, encoder, tmp_path / "cache")(astronaut, PROMPT, **KW)
    assert encoder.calls == 1 and np.array_equal(again.frames, first.frames)
    # another prompt, or the same prompt on another image, is encoded
    pipe(astronaut, "a static shot", **KW)
    pipe(astronaut.rotate(90), PROMPT, **KW)
    assert encoder.calls == 3 and len(_entries(tmp_path / "cache")) == 3


def test_the_negative_prompt_of_real_cfg_is_cached_too(tiny, astronaut, tmp_path):
    encoder = _encoder(tiny)
    pipe = _pipe(tiny, encoder, tmp_path / "cache")
    first = pipe(astronaut, PROMPT, cfg_scale=3.0, **KW)
    assert encoder.calls == 2 and len(_entries(tmp_path / "cache")) == 2
    second = pipe(astronaut, PROMPT, cfg_scale=3.0, **KW)
    assert encoder.calls == 2 and np.array_equal(first.frames, second.frames)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "another entry"])
def test_a_corrupt_entry_is_ignored_and_rewritten(tiny, astronaut, tmp_path, caplog, damage):
    encoder = _encoder(tiny)
    pipe = _pipe(tiny, encoder, tmp_path / "cache")
    first = pipe(astronaut, PROMPT, **KW)
    other = pipe(astronaut, "a static shot", **KW)
    assert encoder.calls == 2
    cache = pipe.prompt_cache()
    path = cache.path(cache.key(PROMPT, astronaut))
    good = path.read_bytes()
    if damage == "garbage":
        path.write_bytes(b"not a safetensors file at all")
    elif damage == "truncated":
        path.write_bytes(good[: len(good) // 2])
    else:  # a readable file that holds the other prompt's row
        path.write_bytes(cache.path(cache.key("a static shot", astronaut)).read_bytes())
    with caplog.at_level(logging.WARNING, logger="hunyuan_i2v.prompt_cache"):
        again = pipe(astronaut, PROMPT, **KW)
    assert encoder.calls == 3  # encoded again...
    assert np.array_equal(again.frames, first.frames) and not np.array_equal(again.frames, other.frames)
    assert "ignoring the unreadable prompt cache file" in caplog.text
    assert cache.load(cache.key(PROMPT, astronaut)) is not None  # ...and rewritten
    assert not list((tmp_path / "cache").rglob("*.tmp"))  # atomic writes leave no temporary behind
    pipe(astronaut, PROMPT, **KW)
    assert encoder.calls == 3


def test_the_key_covers_prompt_image_encoder_and_text_len(tiny, astronaut, tmp_path):
    cache = PromptCache(tmp_path, "encoder-a", 64)
    key = cache.key(PROMPT, astronaut)
    assert key == PromptCache(tmp_path / "elsewhere", "encoder-a", 64).key(PROMPT, astronaut)
    pixels = np.array(astronaut)
    pixels[0, 0, 0] ^= 1
    assert len({key, cache.key(PROMPT + ".", astronaut), cache.key(PROMPT, Image.fromarray(pixels)),
                PromptCache(tmp_path, "encoder-b", 64).key(PROMPT, astronaut),
                PromptCache(tmp_path, "encoder-a", 65).key(PROMPT, astronaut)}) == 5
    # the identity of an encoder object is its weights: a changed parameter is another encoder
    encoder = _encoder(tiny)
    modules = torch_modules(encoder)
    assert len(modules) == 2  # the LLaVA model and the CLIP text model
    before = modules_fingerprint(modules)
    with torch.no_grad():
        next(modules[1].parameters()).view(-1)[0] += 1.0
    assert modules_fingerprint(modules) != before


def test_cache_location_and_switching_it_off(tiny, astronaut, tmp_path, monkeypatch):
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "from-env"))
    assert default_cache_dir() == tmp_path / "from-env"
    encoder = _encoder(tiny)
    _pipe(tiny, encoder, None)(astronaut, PROMPT, **KW)
    assert len(_entries(tmp_path / "from-env")) == 1
    off = _pipe(tiny, encoder, False)
    assert off.prompt_cache() is None
    off(astronaut, PROMPT, **KW)
    off(astronaut, PROMPT, **KW)
    assert encoder.calls == 3 and len(_entries(tmp_path / "from-env")) == 1


def test_an_unwritable_cache_does_not_stop_a_generation(tiny, astronaut, tmp_path, caplog):
    blocker = tmp_path / "a-file"
    blocker.write_text("x")
    with caplog.at_level(logging.WARNING, logger="hunyuan_i2v.prompt_cache"):
        out = _pipe(tiny, _encoder(tiny), blocker / "cache")(astronaut, PROMPT, **KW)
    assert out.frames.shape == (1, 5, 32, 32, 3) and "could not write the prompt cache file" in caplog.text


def test_a_loader_without_an_id_is_not_cached_but_one_with_an_id_is(tiny, astronaut, tmp_path):
    made = []

    def loader():
        made.append(_encoder(tiny))
        return made[-1]

    anonymous = _pipe(tiny, loader, tmp_path / "cache")
    assert anonymous.prompt_cache() is None
    named = I2VPipeline(tiny.config, tiny.transformer, tiny.vae, loader, device="cpu",
                        prompt_cache=tmp_path / "cache", prompt_cache_id="tiny-llava-clip-v1")
    named(astronaut, PROMPT, **KW)
    named(astronaut, PROMPT, **KW)
    assert len(made) == 1  # the second call did not even load the encoder


def test_the_cli_reuses_embeddings_across_runs(tiny, astronaut, tmp_path, monkeypatch, capsys):
    model = tiny.save(tmp_path / "flat", "flat")
    photo = tmp_path / "photo.png"
    astronaut.save(photo)
    monkeypatch.setenv(ENV_VAR, str(tmp_path / "cache"))
    calls = []
    original = PromptEncoder.encode

    def counting(self, prompts, images):
        calls.append(list(prompts))
        return original(self, prompts, images)

    monkeypatch.setattr(PromptEncoder, "encode", counting)
    args = ["generate", str(photo), PROMPT, "--model", str(model), "--height", "32", "--width", "32",
            "--frames", "5", "--steps", "2", "--seed", "1", "--no-progress"]
    assert main(args + ["-o", str(tmp_path / "a.mp4")]) == 0
    assert main(args + ["-o", str(tmp_path / "b.mp4")]) == 0
    assert len(calls) == 1 and len(_entries(tmp_path / "cache")) == 1
    assert np.array_equal(read_video(tmp_path / "a.mp4")[0], read_video(tmp_path / "b.mp4")[0])
    assert main(args + ["-o", str(tmp_path / "c.mp4"), "--no-prompt-cache"]) == 0
    assert len(calls) == 2


def _row(n: int) -> dict:
    return {"text_states": torch.full((n, 8), 1.0), "text_mask": torch.ones(n, dtype=torch.bool),
            "text_states_2": torch.zeros(8)}


def test_the_cache_evicts_the_least_recently_used_entries(tmp_path):
    import os

    cache = PromptCache(tmp_path, "enc", 16, max_bytes=10**9)
    keys = [f"{i:02d}" + "ab" * 31 for i in range(5)]
    for i, key in enumerate(keys):
        cache.store(key, _row(16))
        os.utime(cache.path(key), ns=(10**18 + i * 10**9, 10**18 + i * 10**9))  # written one second apart
    size = cache.path(keys[0]).stat().st_size
    assert cache.load(keys[0]) is not None  # a read makes entry 0 the most recently used
    cache.max_bytes = 3 * size + size // 2  # room for three entries
    cache.store("ff" * 32, _row(16))
    left = {k for k in keys + ["ff" * 32] if cache.contains(k)}
    assert left == {keys[0], keys[4], "ff" * 32}  # 1, 2 and 3 were the least recently used
    assert sum(p.stat().st_size for p in tmp_path.glob("*/*.safetensors")) <= cache.max_bytes


def test_an_entry_over_the_whole_limit_is_still_kept_once_written(tmp_path):
    cache = PromptCache(tmp_path, "enc", 16, max_bytes=10)
    cache.store("aa" * 32, _row(4))
    assert cache.contains("aa" * 32)
    cache.store("bb" * 32, _row(4))
    assert cache.contains("bb" * 32) and not cache.contains("aa" * 32)


def test_the_size_limit_comes_from_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("HUNYUAN_I2V_PROMPT_CACHE_MAX_MB", "1.5")
    assert PromptCache(tmp_path, "enc", 16).max_bytes == int(1.5 * 1024**2)
    monkeypatch.delenv("HUNYUAN_I2V_PROMPT_CACHE_MAX_MB")
    assert PromptCache(tmp_path, "enc", 16).max_bytes == 2 * 1024**3
