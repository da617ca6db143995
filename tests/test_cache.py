"""Step caching (TeaCache / MagCache): exactness when nothing is skipped, the forced steps, per-half CFG state,
calibration files and the speed-target solver. Tiny random transformers; the bundled model only for the CLI."""

from __future__ import annotations

import json
import logging
import math

import numpy as np
import pytest
import torch

from hunyuan_i2v.cache import (
    TEACACHE_HUNYUAN_T2V,
    CachePolicy,
    CacheSettings,
    CalibrationEntry,
    CalibrationRecorder,
    MagCache,
    TeaCache,
    fit_calibration,
    load_calibration,
    policy_for,
    resample_ratios,
    save_calibration,
    select_entry,
    simulate,
    solve_threshold,
    speed_to_skip_fraction,
)
from hunyuan_i2v.cli import bundled_model_dir, main
from hunyuan_i2v.errors import InputError
from hunyuan_i2v.sampling import TextConditioning, denoise, get_sigmas, guidance_tensor
from tiny_components import random_transformer

STEPS = 8


def _text(b=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    return TextConditioning(torch.randn(b, 6, 32, generator=g), torch.ones(b, 6), torch.randn(b, 16, generator=g))


def _inputs(condition_type="token_replace", b=1):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 4, 3, 8, 8, generator=g), torch.randn(b, 4, 1, 8, 8, generator=g)


def _run(model, cache=None, cfg=True, condition_type="token_replace", steps=STEPS, b=1):
    noise, image = _inputs(condition_type, b)
    g = guidance_tensor(6.0, b) if condition_type == "token_replace" else None
    with torch.no_grad():
        return denoise(model, noise, image, _text(b, 0), get_sigmas(steps, 7.0), condition_type=condition_type,
                       guidance=g, uncond=_text(b, 5) if cfg else None, cfg_scale=3.0 if cfg else 1.0, cache=cache)


class CountingStack:
    """Wraps a transformer's block stack to record the batch size of every call."""

    def __init__(self, model):
        self.rows: list[int] = []
        stack = model.block_stack

        def counted(inputs):
            self.rows.append(inputs.img.shape[0])
            return stack(inputs)

        model.block_stack = counted


@pytest.mark.parametrize("condition_type,cfg", [("token_replace", True), ("token_replace", False),
                                                ("latent_concat", True)])
def test_a_policy_that_never_skips_is_bit_identical_to_the_plain_loop(condition_type, cfg):
    model = random_transformer(condition_type)
    plain = _run(model, None, cfg, condition_type)
    for policy in (CachePolicy(), TeaCache(0.0), CalibrationRecorder()):
        assert torch.equal(_run(model, policy, cfg, condition_type), plain), policy.name
        assert policy.computed_passes == policy.passes == STEPS * (2 if cfg else 1)


def test_the_split_forward_is_the_forward():
    model = random_transformer()
    x, _ = _inputs()
    text, t, g = _text(2), torch.tensor([900.0, 300.0]), guidance_tensor(6.0, 2)
    args = (x.repeat(2, 1, 1, 1, 1), t, text.text_states, text.text_mask, text.text_states_2)
    with torch.no_grad():
        inputs = model.embed(*args, guidance=g)
        split = model.final(model.block_stack(inputs), inputs)
        assert inputs.img is None and inputs.txt is None  # the stack took the streams
        assert torch.equal(split, model(*args, guidance=g))


def test_the_indicator_covers_the_noisy_tokens_only_and_leaves_the_input_alone():
    model = random_transformer()
    x, _ = _inputs()
    text = _text()
    with torch.no_grad():
        inputs = model.embed(x, torch.tensor([500.0]), text.text_states, text.text_mask, text.text_states_2,
                             guidance=guidance_tensor(6.0, 1))
        before = inputs.img.clone()
        full = model.first_block_modulated_input(inputs)
        noisy = model.first_block_modulated_input(inputs, inputs.n_first)
    assert inputs.n_first == 4 * 4  # one latent frame of 8x8 in 2x2 patches
    assert torch.equal(inputs.img, before)
    assert noisy.shape[1] == full.shape[1] - inputs.n_first
    assert torch.allclose(noisy, full[:, inputs.n_first:], atol=1e-6)


@pytest.mark.parametrize("policy", [TeaCache(1e9), MagCache(1e9, [[1.0] * STEPS], max_skips=100, retention=0.0)],
                         ids=["teacache", "magcache"])
def test_first_and_last_steps_always_run(policy):
    model = random_transformer()
    stack = CountingStack(model)
    out = _run(model, policy, cfg=False)
    assert policy.computed == [[True] + [False] * (STEPS - 2) + [True]]  # everything else skipped
    assert len(stack.rows) == policy.computed_passes == 2
    assert torch.isfinite(out).all() and not torch.equal(out, _run(random_transformer(), None, cfg=False))


def test_skipping_a_step_reuses_the_residual_of_the_last_computed_one():
    """A skipped step's velocity = final(input + residual of the last computed step), half by half."""
    model = random_transformer()
    policy = MagCache(1e9, [[1.0] * 3], max_skips=1, retention=0.0)  # steps 0 and 2 forced, 1 skipped
    seen = []
    final = model.final

    def spy(img, inputs):
        seen.append(img.clone())
        return final(img, inputs)

    model.final = spy
    stack = model.block_stack
    stack_io = []

    def spy_stack(inputs):
        img_in = inputs.img.clone()
        out = stack(inputs)
        stack_io.append((img_in, out.clone()))
        return out

    model.block_stack = spy_stack
    embeds = []
    embed = model.embed

    def spy_embed(*a, **k):
        inputs = embed(*a, **k)
        embeds.append(inputs.img.clone())
        return inputs

    model.embed = spy_embed
    _run(model, policy, cfg=False, steps=3)
    assert policy.computed == [[True, False, True]]
    residual = stack_io[0][1] - stack_io[0][0]
    assert torch.equal(seen[1], embeds[1] + residual)


def test_cfg_halves_keep_separate_state_and_a_lone_half_runs_alone():
    model = random_transformer()
    stack = CountingStack(model)
    # cond: ratios of 1 (no drift) -> skips; uncond: ratio 2 (large drift) -> computes every step
    policy = MagCache(0.5, [[1.0] * STEPS, [2.0] * STEPS], max_skips=2, retention=0.0)
    out = _run(model, policy, cfg=True)
    cond, uncond = policy.computed
    assert uncond == [True] * STEPS
    assert cond == [True, False, False, True, False, False, True, True]  # K = 2 skips in a row, last step forced
    assert policy.computed_passes == sum(cond) + STEPS
    # both halves in one batch where both ran (2 rows), the uncond half alone (1 row) where cond skipped
    assert stack.rows == [2 if c else 1 for c in cond]
    assert torch.isfinite(out).all()


def test_teacache_halves_accumulate_independently():
    policy = TeaCache(0.25, coefficients=(1.0, 0.0))  # identity rescale: sum the raw changes
    policy.start(6, 2)
    changes = {0: [None, 0.1, 0.1, 0.1, 0.1, 0.1], 1: [None, 0.3, 0.3, 0.3, 0.3, 0.3]}
    for i in range(6):
        for h in (0, 1):
            policy.record(h, i, policy.wants(h, i, changes[h][i]))
    assert policy.computed[0] == [True, False, False, True, False, True]  # 0.1, 0.2 < 0.25; 0.3 >= 0.25
    assert policy.computed[1] == [True] * 6
    joint = simulate(TeaCache(0.25, (1.0, 0.0), joint_cfg=True), 6, 2,
                     [[0.0] + [0.1] * 5, [0.0] + [0.3] * 5])
    assert joint.computed == [[True] * 6, [True] * 6]  # joint: cond computes whenever uncond does


def test_teacache_uses_the_modulated_input_change():
    """On a real model the decisions follow the measured change: a tiny threshold computes every step, a huge
    one only the forced steps, and one in between skips some."""
    model = random_transformer()
    rec = CalibrationRecorder()
    _run(model, rec, cfg=False)
    changes = [c for c in rec.input_change[0][1:]]
    assert all(c > 0 for c in changes)
    middle = TeaCache(float(np.median(changes)) * 1.5, coefficients=(1.0, 0.0))
    _run(model, middle, cfg=False)
    assert 2 < middle.computed_passes < STEPS


def _synthetic_entry(steps=20, cfg=True, height=64, width=64):
    halves = 2 if cfg else 1
    ramp = [0.0] + [0.05 + 0.01 * i for i in range(1, steps)]
    return CalibrationEntry(height, width, 33, steps, cfg, 3.0, [0.0, 0.0, 0.0, 1.0, 0.0], [ramp] * halves,
                            [ramp] * halves, [[1.0] + [0.97 - 0.002 * i for i in range(1, steps)]] * halves,
                            [[0.0] * steps] * halves, 0.01, 3)


def test_calibration_fit_recovers_a_known_polynomial_and_round_trips(tmp_path):
    rng = np.random.default_rng(0)
    runs = []
    for _ in range(3):
        r = CalibrationRecorder()
        r.start(10, 2)
        for h in range(2):
            for i in range(1, 10):
                x = float(rng.uniform(0.01, 0.3))
                r.observe(h, i, input_change=x, residual_change=2 * x * x + 0.5 * x + 0.01, mag_ratio=0.95,
                          mag_std=0.01)
        runs.append(r)
    entry = fit_calibration(runs, height=64, width=64, num_frames=33, flow_shift=3.0)
    assert np.allclose(entry.teacache_coefficients, [0, 0, 2, 0.5, 0.01], atol=1e-6)
    assert entry.fit_rmse < 1e-8 and entry.runs == 3 and entry.cfg and entry.resolution == "360p"
    assert entry.mag_ratio[1][0] == 1.0 and entry.mag_ratio[1][5] == pytest.approx(0.95)

    path = save_calibration(tmp_path / "step_cache.json", [entry], model="tiny")
    assert load_calibration(path) == [entry]
    other = _synthetic_entry(steps=12)
    save_calibration(path, [other])  # another step count joins the file
    assert sorted(e.steps for e in load_calibration(path)) == [10, 12]
    assert select_entry(load_calibration(path), height=64, width=64, steps=12, cfg=True) == other
    assert json.loads(path.read_text())["format"] == 1
    assert not list(tmp_path.glob(".*tmp"))  # the atomic write left no temporary file


def test_a_real_recording_fits(tmp_path):
    model = random_transformer()
    runs = []
    for seed in range(2):
        rec = CalibrationRecorder()
        torch.manual_seed(seed)
        _run(model, rec, cfg=True)
        runs.append(rec)
    entry = fit_calibration(runs, height=8, width=8, num_frames=9, flow_shift=7.0)
    assert len(entry.teacache_coefficients) == 5 and math.isfinite(entry.fit_rmse)
    assert all(len(c) == STEPS for c in entry.mag_ratio) and len(entry.mag_ratio) == 2
    assert all(math.isfinite(v) and v > 0 for c in entry.mag_ratio for v in c)
    save_calibration(tmp_path / "c.json", [entry])
    assert load_calibration(tmp_path / "c.json")[0].key == entry.key


def test_bad_calibration_files_are_user_errors(tmp_path):
    with pytest.raises(InputError, match="calibrate-cache"):
        load_calibration(tmp_path / "missing.json")
    (tmp_path / "bad.json").write_text('{"format": 99}')
    with pytest.raises(InputError, match="not a step-cache calibration"):
        load_calibration(tmp_path / "bad.json")


def test_resampled_curves_keep_the_total_drift():
    ratios = [1.0] + [0.95] * 19
    same = resample_ratios(ratios, 20)
    assert np.allclose(same, ratios)
    for steps in (10, 50):
        r = resample_ratios(ratios, steps)
        assert len(r) == steps and r[0] == 1.0
        assert np.prod(r) == pytest.approx(np.prod(ratios), rel=1e-9)
    entry = _synthetic_entry(steps=20).for_steps(30)
    assert entry.steps == 30 and len(entry.mag_ratio[0]) == 30 and entry.notes["resampled_from"] == 20


@pytest.mark.parametrize("speed", [1.5, 2.0, 2.5])
def test_speed_target_solver_gives_the_requested_skip_fraction(speed):
    entry = _synthetic_entry()
    want = speed_to_skip_fraction(speed)

    def mag(th):
        return MagCache(th, entry.mag_ratio, max_skips=4, retention=0.1)

    th = solve_threshold(mag, 20, 2, skip_fraction=want)
    assert simulate(mag(th), 20, 2).skip_fraction >= want - 1e-9
    assert simulate(mag(th * 0.99), 20, 2).skip_fraction < want  # and it is the smallest such threshold

    def tea(th):
        return TeaCache(th, (1.0, 0.0))

    th = solve_threshold(tea, 20, 2, entry.input_change, skip_fraction=want)
    assert simulate(tea(th), 20, 2, entry.input_change).skip_fraction >= want - 1e-9
    assert simulate(tea(th * 0.99), 20, 2, entry.input_change).skip_fraction < want


def test_an_unreachable_speed_names_the_most_it_can_do():
    entry = _synthetic_entry()
    with pytest.raises(InputError, match=r"the most is \d+%"):
        solve_threshold(lambda th: MagCache(th, entry.mag_ratio, max_skips=1, retention=0.2), 20, 2,
                        skip_fraction=speed_to_skip_fraction(3.0))
    with pytest.raises(InputError):
        speed_to_skip_fraction(0.5)


def test_policy_for_reads_the_calibration_next_to_the_weights(tmp_path, caplog):
    save_calibration(tmp_path / "step_cache.json", [_synthetic_entry()])
    kw = dict(steps=20, height=64, width=64, cfg=True)
    assert policy_for(None, tmp_path, **kw) is None and policy_for("none", tmp_path, **kw) is None
    tea = policy_for("teacache", tmp_path, **kw)
    assert tea.coefficients == (0.0, 0.0, 0.0, 1.0, 0.0) and tea.threshold == 0.15
    mag = policy_for(CacheSettings("magcache", speed=2.0), tmp_path, **kw)
    assert simulate(mag, 20, 2).speedup >= 2.0
    # no calibration: TeaCache falls back to the published T2V polynomial with a note; MagCache cannot run
    with caplog.at_level(logging.WARNING, logger="hunyuan_i2v.cache"):
        fallback = policy_for("teacache", tmp_path / "empty", **kw)
    assert fallback.coefficients == TEACACHE_HUNYUAN_T2V and "published HunyuanVideo T2V" in caplog.text
    with pytest.raises(InputError, match="calibrate-cache"):
        policy_for("magcache", tmp_path / "empty", **kw)
    with pytest.raises(InputError, match="not both"):
        policy_for(CacheSettings("teacache", threshold=0.1, speed=2.0), tmp_path, **kw)


def test_the_bundled_model_carries_its_calibration():
    root = bundled_model_dir()
    if root is None:
        pytest.skip("no bundled model in this install")
    entries = load_calibration(root / "step_cache.json")
    entry = select_entry(entries, height=64, width=64, steps=20, cfg=True)
    assert entry is not None and entry.steps == 20 and entry.cfg and entry.runs >= 3
    assert len(entry.teacache_coefficients) == 5 and all(len(c) == 20 for c in entry.mag_ratio)


def test_cli_calibrates_then_generates_with_a_speed_target(tmp_path, capsys):
    skimage_data = pytest.importorskip("skimage.data")
    from PIL import Image

    if bundled_model_dir() is None:
        pytest.skip("no bundled model in this install")
    photo = tmp_path / "cat.png"
    Image.fromarray(skimage_data.chelsea()).save(photo)
    calib = tmp_path / "calib.json"
    small = ["--steps", "4", "--frames", "5"]
    assert main(["calibrate-cache", "--images", str(photo), "--prompts", "the camera pans left", "--out", str(calib),
                 "--no-progress", *small]) == 0
    assert "wrote" in capsys.readouterr().out
    (entry,) = load_calibration(calib)
    assert entry.steps == 4 and entry.num_frames == 5 and entry.cfg
    out = tmp_path / "v.mp4"
    assert main(["generate", str(photo), "the camera pans left", "-o", str(out), "--no-progress", "--seed", "0",
                 "--cache", "magcache", "--cache-speed", "1.5", "--cache-retention", "0", "--cache-calibration",
                 str(calib), *small]) == 0
    printed = capsys.readouterr().out
    assert out.is_file() and "transformer passes computed" in printed
    assert main(["generate", str(photo), "x", "--cache", "teacache", "--cache-threshold", "0.1",
                 "--cache-speed", "2", "-o", str(tmp_path / "w.mp4")]) == 2
    assert "not both" in capsys.readouterr().err


@pytest.mark.parametrize("method", ["teacache", "magcache"])
def test_retention_keeps_the_first_steps(method):
    curve = [[0.0] + [1e-3] * 9]
    policy = (TeaCache(1e9, (1.0, 0.0), retention=0.3) if method == "teacache"
              else MagCache(1e9, [[1.0] * 10], max_skips=100, retention=0.3))
    simulate(policy, 10, 1, curve if method == "teacache" else None)
    assert policy.computed == [[True] * 3 + [False] * 6 + [True]]
