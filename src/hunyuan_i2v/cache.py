"""Adaptive step caching: skip the transformer's block stack on steps where its output barely changes (issue 8).

A computed step runs embed -> block stack (the double and single blocks) -> final layer and keeps the stack's
*residual*: its output minus its input, on the image tokens. A skipped step runs only the cheap ends: the
embeddings, input + cached residual, the final layer. Two policies decide which steps to skip (docs/step-cache.md):

- :class:`TeaCache` (Liu et al., CVPR 2025): the relative L1 change, step to step, of the first double block's
  modulated image input, mapped through a polynomial fitted for the model, is summed; the stack is skipped while
  the sum stays under the threshold, and the sum restarts after each computed step.
- :class:`MagCache` (Ma et al. 2025): a calibration run records how the residual's magnitude changes from step to
  step (mean per-token norm ratio); the product of those ratios since the last computed step estimates the drift of
  the cached residual, and its summed error ``|1 - product|`` must stay under the threshold, with at most
  ``max_skips`` skips in a row and none in the first ``retention`` fraction of the steps.

The first and the last step always run. Decisions:

- **Real CFG.** The sampler runs cond and uncond as one batch of 2B rows. Each half keeps its own policy state,
  its own cached residual and its own decisions (their inputs and residuals drift at different rates); when only one
  half computes, the block stack runs on that half's rows alone, so a skipped half saves its share of the work.
  ``joint_cfg`` makes the halves compute together whenever either asks (residuals are still kept per half).
- **token_replace.** The tokens of latent frame 0 hold the clean image at every step and their output is thrown
  away, so every measurement (input change, residual change and magnitude) is taken on the noisy tokens only.

A pass is one half's run of the block stack at one step: ``steps x halves`` passes in a full run.
"""

from __future__ import annotations

import json
import logging
import math
import os
import tempfile
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor

from .errors import InputError

logger = logging.getLogger(__name__)

METHODS = ("none", "teacache", "magcache")
CALIBRATION_FILE = "step_cache.json"  # next to the weights
FORMAT_VERSION = 1
HALF_NAMES = ("cond", "uncond")
DEFAULT_THRESHOLDS = {"teacache": 0.15, "magcache": 0.12}  # the published defaults (TeaCache 0.15, MagCache E012)
DEFAULT_MAX_SKIPS = 4  # MagCache K (the published HunyuanVideo setting E012K04R02)
DEFAULT_RETENTION = {"teacache": 0.0, "magcache": 0.2}  # steps never skipped at the start (MagCache R = 0.2)
POLY_DEGREE = 4

# TeaCache's rescale polynomial for HunyuanVideo T2V (TeaCache4HunyuanVideo), highest power first. There are no
# published I2V coefficients; these are the starting point until `hunyuan-i2v calibrate-cache` fits the model's own.
TEACACHE_HUNYUAN_T2V = (7.33226126e02, -4.01131952e02, 6.75869174e01, -3.14987800e00, 9.61237896e-02)


# ---------------------------------------------------------------------------------------------
# Measurements


def relative_l1(a: Tensor, b: Tensor) -> float:
    """mean |a - b| / mean |b|, accumulated in fp32."""
    den = float(torch.mean(b.abs(), dtype=torch.float32))
    return float(torch.mean((a - b).abs(), dtype=torch.float32)) / max(den, 1e-12)


def magnitude_ratio(a: Tensor, b: Tensor) -> tuple[float, float]:
    """Mean and std over tokens of ||a_token|| / ||b_token|| (norms over the hidden dimension)."""
    ratio = (torch.linalg.vector_norm(a, dim=-1, dtype=torch.float32)
             / torch.linalg.vector_norm(b, dim=-1, dtype=torch.float32).clamp_min(1e-12))
    return float(ratio.mean()), float(ratio.std()) if ratio.numel() > 1 else 0.0


# ---------------------------------------------------------------------------------------------
# Policies


class CachePolicy:
    """Decides, for each step and each CFG half, whether the block stack runs. This base class never skips.

    The sampler (through :class:`CachedForward`) calls :meth:`start` once, then per step and half :meth:`wants`
    and :meth:`record`. ``computed`` holds the decisions of the last run. Subclasses override ``_want`` (the
    tentative decision, which may stage state) and ``_commit`` (keep or drop what ``_want`` staged).
    """

    name = "full"
    needs_indicator = False  # wants the first block's modulated input change (TeaCache)
    records_residuals = False  # wants the residual measurements (calibration)

    def __init__(self, joint_cfg: bool = False):
        self.joint_cfg = joint_cfg
        self.steps, self.halves = 0, 1
        self.computed: list[list[bool]] = []

    def start(self, steps: int, halves: int) -> None:
        self.steps, self.halves = steps, halves
        self.computed = [[] for _ in range(halves)]
        self._reset()

    def wants(self, half: int, i: int, input_change: Optional[float]) -> bool:
        """Whether this half's block stack runs at step i; the first and last step always run.
        ``input_change``: the relative L1 change of the modulated input since step i - 1 (None at step 0)."""
        want = self._want(half, i, input_change)
        return want or i == 0 or i == self.steps - 1

    def record(self, half: int, i: int, computed: bool) -> None:
        self.computed[half].append(computed)
        self._commit(half, computed)

    def observe(self, half: int, i: int, **measures: float) -> None:
        """Measurements of a computed step, for policies with ``records_residuals``."""

    # overridden by the policies
    def _reset(self) -> None:
        pass

    def _want(self, half: int, i: int, input_change: Optional[float]) -> bool:
        return True

    def _commit(self, half: int, computed: bool) -> None:
        pass

    # -- statistics of the last run ---------------------------------------------------------------

    @property
    def passes(self) -> int:
        return sum(len(c) for c in self.computed)

    @property
    def computed_passes(self) -> int:
        return sum(sum(c) for c in self.computed)

    @property
    def skip_fraction(self) -> float:
        return 1.0 - self.computed_passes / self.passes if self.passes else 0.0

    @property
    def speedup(self) -> float:
        """Passes of a full run / passes computed."""
        return self.passes / self.computed_passes if self.computed_passes else 1.0

    def describe(self) -> str:
        return self.name

    def summary(self) -> dict:
        return {"method": self.name, "setting": self.describe(), "passes": self.passes,
                "computed_passes": self.computed_passes, "skip_fraction": self.skip_fraction,
                "speedup": self.speedup,
                "computed_steps": {HALF_NAMES[h] if self.halves == 2 else "cond": [i for i, c in enumerate(cs) if c]
                                   for h, cs in enumerate(self.computed)}}


class TeaCache(CachePolicy):
    """Skip while the summed, polynomial-rescaled relative L1 change of the modulated input stays < threshold.
    ``retention``: no skipping in that first fraction of the steps (0 as published for HunyuanVideo; TeaCache's
    Wan2.1 variant retains the first steps, ``ret_steps``)."""

    name = "teacache"
    needs_indicator = True

    def __init__(self, threshold: float, coefficients: Sequence[float] = TEACACHE_HUNYUAN_T2V,
                 retention: float = 0.0, joint_cfg: bool = False):
        super().__init__(joint_cfg)
        if threshold < 0:
            raise InputError(f"the TeaCache threshold must be >= 0, got {threshold}")
        if not 0.0 <= retention < 1.0:
            raise InputError(f"retention must be within [0, 1), got {retention}")
        self.threshold, self.retention = float(threshold), float(retention)
        self.coefficients = tuple(float(c) for c in coefficients)
        self._poly = np.poly1d(self.coefficients)

    def rescale(self, change: float) -> float:
        """The estimated relative change of the residual; a fit that dips below 0 off its data counts as 0."""
        return max(float(self._poly(change)), 0.0)

    def _reset(self) -> None:
        self._sum = [0.0] * self.halves
        self._staged = [0.0] * self.halves

    def _want(self, half: int, i: int, input_change: Optional[float]) -> bool:
        if input_change is None or i < int(self.steps * self.retention):
            self._staged[half] = 0.0
            return True
        self._staged[half] = self._sum[half] + self.rescale(input_change)
        return self._staged[half] >= self.threshold

    def _commit(self, half: int, computed: bool) -> None:
        self._sum[half] = 0.0 if computed else self._staged[half]

    def describe(self) -> str:
        return f"teacache threshold {self.threshold:.4g}" + (f" R {self.retention:g}" if self.retention else "")


class MagCache(CachePolicy):
    """Skip while the summed |1 - product of magnitude ratios| stays < threshold, at most ``max_skips`` in a row,
    never in the first ``retention`` fraction of the steps. ``mag_ratios``: per half, one ratio per step (entry 0
    unused), calibrated for this step count (:func:`resample_ratios` adapts another)."""

    name = "magcache"

    def __init__(self, threshold: float, mag_ratios: Sequence[Sequence[float]], max_skips: int = DEFAULT_MAX_SKIPS,
                 retention: float = DEFAULT_RETENTION["magcache"], joint_cfg: bool = False):
        super().__init__(joint_cfg)
        if threshold < 0:
            raise InputError(f"the MagCache threshold must be >= 0, got {threshold}")
        if max_skips < 1:
            raise InputError(f"max_skips must be at least 1, got {max_skips}")
        if not 0.0 <= retention < 1.0:
            raise InputError(f"retention must be within [0, 1), got {retention}")
        if not mag_ratios:
            raise InputError("MagCache needs a magnitude-ratio curve: run `hunyuan-i2v calibrate-cache`")
        self.threshold, self.max_skips, self.retention = float(threshold), int(max_skips), float(retention)
        self.mag_ratios = [list(map(float, r)) for r in mag_ratios]

    def start(self, steps: int, halves: int) -> None:
        if any(len(r) != steps for r in self.mag_ratios):
            raise ValueError(f"the magnitude-ratio curve has {len(self.mag_ratios[0])} steps, the run {steps}")
        super().start(steps, halves)

    def _reset(self) -> None:
        self._state = [(1.0, 0.0, 0)] * self.halves  # (ratio product, summed error, skips in a row)
        self._staged = list(self._state)

    def _want(self, half: int, i: int, input_change: Optional[float]) -> bool:
        if i < int(self.steps * self.retention) or i == 0:
            return True
        ratios = self.mag_ratios[min(half, len(self.mag_ratios) - 1)]
        product, error, skips = self._state[half]
        product *= ratios[i]
        error += abs(1.0 - product)
        self._staged[half] = (product, error, skips + 1)
        return not (error < self.threshold and skips + 1 <= self.max_skips)

    def _commit(self, half: int, computed: bool) -> None:
        self._state[half] = (1.0, 0.0, 0) if computed else self._staged[half]

    def describe(self) -> str:
        return f"magcache threshold {self.threshold:.4g} K {self.max_skips} R {self.retention:g}"


class CalibrationRecorder(CachePolicy):
    """Computes every step and records, per half and step, the modulated-input change and the residual's change
    and magnitude ratio against the step before (what :func:`fit_calibration` fits)."""

    name = "calibration"
    needs_indicator = True
    records_residuals = True

    def start(self, steps: int, halves: int) -> None:
        super().start(steps, halves)
        nan = [[math.nan] * steps for _ in range(halves)]
        self.input_change = [list(r) for r in nan]
        self.residual_change = [list(r) for r in nan]
        self.mag_ratio = [list(r) for r in nan]
        self.mag_std = [list(r) for r in nan]

    def observe(self, half: int, i: int, **measures: float) -> None:
        for key, value in measures.items():
            getattr(self, key)[half][i] = value


# ---------------------------------------------------------------------------------------------
# The transformer with a policy in front of its block stack


class CachedForward:
    """The transformer as :func:`hunyuan_i2v.sampling.denoise` calls it, with ``policy`` deciding for each step and
    CFG half whether the block stack runs. Call it once per step, in order (it counts the steps)."""

    def __init__(self, model, policy: CachePolicy, steps: int, halves: int = 1):
        missing = [n for n in ("embed", "block_stack", "final", "first_block_modulated_input")
                   if not hasattr(model, n)]
        if missing:
            raise TypeError(f"step caching needs a HunyuanVideoTransformer (embed / block_stack / final), got "
                            f"{type(model).__name__}")
        self.model, self.policy, self.steps, self.halves = model, policy, steps, halves
        self.step = 0
        self._residual: list[Optional[Tensor]] = [None] * halves
        self._indicator: list[Optional[Tensor]] = [None] * halves
        policy.start(steps, halves)

    def __call__(self, x: Tensor, t: Tensor, text_states: Tensor, text_mask: Optional[Tensor], text_states_2: Tensor,
                 guidance: Optional[Tensor] = None) -> Tensor:
        i = self.step
        if i >= self.steps:
            raise RuntimeError(f"CachedForward was set up for {self.steps} steps and called once more")
        self.step += 1
        model, policy, halves = self.model, self.policy, self.halves
        inputs = model.embed(x, t, text_states, text_mask, text_states_2, guidance)
        rows = x.shape[0] // halves
        span = [(h * rows, (h + 1) * rows) for h in range(halves)]
        noisy = inputs.n_first  # token_replace: measure on the noisy tokens only

        changes: list[Optional[float]] = [None] * halves
        if policy.needs_indicator:
            indicator = model.first_block_modulated_input(inputs, noisy)
            for h, (lo, hi) in enumerate(span):
                if self._indicator[h] is not None:
                    changes[h] = relative_l1(indicator[lo:hi], self._indicator[h])
                self._indicator[h] = indicator[lo:hi]
        compute = [policy.wants(h, i, changes[h]) or self._residual[h] is None for h in range(halves)]
        if policy.joint_cfg and any(compute):
            compute = [True] * halves

        if all(compute):
            img_in = inputs.img.clone()  # the stack updates its input in place
            img = model.block_stack(inputs)
            outs = [img[lo:hi] for lo, hi in span]
        else:
            img_in = inputs.img  # rows() below copies, so this stays the input
            outs = [model.block_stack(inputs.rows(lo, hi)) if compute[h] else None for h, (lo, hi) in enumerate(span)]
            img = None
        parts = []
        for h, (lo, hi) in enumerate(span):
            if compute[h]:
                residual = outs[h] - img_in[lo:hi]
                if policy.records_residuals:
                    self._observe(h, i, residual, noisy, changes[h])
                self._residual[h] = residual
                parts.append(outs[h])
            else:
                parts.append(img_in[lo:hi] + self._residual[h])
            policy.record(h, i, compute[h])
        if img is None:
            img = parts[0] if halves == 1 else torch.cat(parts)
        del parts, outs, img_in
        return model.final(img, inputs)

    def _observe(self, h: int, i: int, residual: Tensor, noisy: int, input_change: Optional[float]) -> None:
        prev = self._residual[h]
        if prev is None:
            return
        residual, prev = residual[:, noisy:], prev[:, noisy:]
        ratio, std = magnitude_ratio(residual, prev)
        self.policy.observe(h, i, input_change=math.nan if input_change is None else input_change,
                            residual_change=relative_l1(residual, prev), mag_ratio=ratio, mag_std=std)


# ---------------------------------------------------------------------------------------------
# Simulated schedules and the speed target


def simulate(policy: CachePolicy, steps: int, halves: int = 1,
             input_change: Optional[Sequence[Sequence[float]]] = None) -> CachePolicy:
    """Run ``policy``'s decisions without a model: ``input_change`` per half and step (TeaCache's indicator, e.g.
    the calibration's mean curve; MagCache needs none). Returns the policy with ``computed`` filled in."""
    policy.start(steps, halves)
    if policy.needs_indicator and input_change is None:
        raise ValueError(f"simulating {policy.name} needs the input-change curve")
    done = [False] * halves
    for i in range(steps):
        compute = []
        for h in range(halves):
            change = None
            if input_change is not None and i > 0:
                change = float(input_change[min(h, len(input_change) - 1)][i])
            compute.append(policy.wants(h, i, change) or not done[h])
        if policy.joint_cfg and any(compute):
            compute = [True] * halves
        for h in range(halves):
            policy.record(h, i, compute[h])
            done[h] = done[h] or compute[h]
    return policy


def speed_to_skip_fraction(speed: float) -> float:
    """A speed-up in transformer passes (full / computed) as the fraction of passes skipped."""
    if speed < 1.0:
        raise InputError(f"the cache speed target must be >= 1 (passes of a full run / passes computed), got {speed}")
    return 1.0 - 1.0 / speed


def solve_threshold(make_policy: Callable[[float], CachePolicy], steps: int, halves: int = 1,
                    input_change: Optional[Sequence[Sequence[float]]] = None, *, skip_fraction: float,
                    low: float = 1e-5, high: float = 1e3) -> float:
    """The smallest threshold (to about 0.1 %) whose simulated schedule skips at least ``skip_fraction`` of the
    passes. Raises InputError naming the most the schedule reaches when no threshold gets there."""
    def skipped(th: float) -> float:
        return simulate(make_policy(th), steps, halves, input_change).skip_fraction

    goal = skip_fraction - 1e-9
    grid = np.geomspace(low, high, 241)
    prev = 0.0
    for th in grid:
        if skipped(th) >= goal:
            lo, hi = prev, float(th)
            while hi - lo > 1e-3 * hi:  # skipping grows with the threshold: bisect between the two grid points
                mid = 0.5 * (lo + hi)
                lo, hi = (lo, mid) if skipped(mid) >= goal else (mid, hi)
            return hi
        prev = float(th)
    best = skipped(high)
    raise InputError(f"no threshold skips {skip_fraction:.0%} of the passes with this schedule (the most is "
                     f"{best:.0%}, {1 / (1 - best):.2f}x): ask for less speed, or for MagCache allow more skips in a "
                     f"row (--cache-max-skips) or fewer retained steps (--cache-retention)")


# ---------------------------------------------------------------------------------------------
# Calibration


def resolution_class(height: int, width: int) -> str:
    """The nearest of 360p / 540p / 720p by pixel count (smaller sizes count as 360p)."""
    area = height * width
    return min((("360p", 640 * 360), ("540p", 960 * 544), ("720p", 1280 * 720)),
               key=lambda c: abs(math.log(max(area, 1) / c[1])))[0]


@dataclass
class CalibrationEntry:
    """The step-cache calibration of a model for one size, frame count, step count and CFG setting.

    Curves are per half (cond, then uncond with real CFG) and per step; entry 0 belongs to no step pair (0 for
    the changes, 1 for the ratios). ``teacache_coefficients``: numpy.polyfit of residual change against
    modulated-input change, highest power first.
    """

    height: int
    width: int
    num_frames: int
    steps: int
    cfg: bool
    flow_shift: float
    teacache_coefficients: list[float]
    input_change: list[list[float]]
    residual_change: list[list[float]]
    mag_ratio: list[list[float]]
    mag_std: list[list[float]]
    fit_rmse: float = math.nan
    runs: int = 0
    resolution: str = ""
    notes: dict = field(default_factory=dict)

    def __post_init__(self):
        self.resolution = self.resolution or resolution_class(self.height, self.width)

    @property
    def key(self) -> tuple:
        return (self.height, self.width, self.num_frames, self.steps, self.cfg)

    def for_steps(self, steps: int) -> "CalibrationEntry":
        """This entry with its curves resampled to ``steps`` (the same entry when the count matches)."""
        if steps == self.steps:
            return self
        return CalibrationEntry(
            self.height, self.width, self.num_frames, steps, self.cfg, self.flow_shift,
            list(self.teacache_coefficients),
            [resample_increments(c, steps) for c in self.input_change],
            [resample_increments(c, steps) for c in self.residual_change],
            [resample_ratios(c, steps) for c in self.mag_ratio],
            [resample_increments(c, steps) for c in self.mag_std],
            self.fit_rmse, self.runs, self.resolution, dict(self.notes, resampled_from=self.steps))


def resample_increments(values: Sequence[float], steps: int) -> list[float]:
    """Per-step increments (entry 0 = none) moved to another step count: their running sum is interpolated over
    the fraction of the schedule done, and differenced again."""
    v = np.nan_to_num(np.asarray(values, dtype=np.float64))
    if steps <= 1 or len(v) <= 1:
        return [0.0] * steps
    total = np.cumsum(np.concatenate([[0.0], v[1:]]))
    src = np.linspace(0.0, 1.0, len(v))
    dst = np.interp(np.linspace(0.0, 1.0, steps), src, total)
    return [0.0] + np.diff(dst).tolist()


def resample_ratios(ratios: Sequence[float], steps: int) -> list[float]:
    """Per-step ratios (entry 0 = none) moved to another step count, through their logs' running sum."""
    logs = np.log(np.clip(np.nan_to_num(np.asarray(ratios, dtype=np.float64), nan=1.0), 1e-6, None))
    return [1.0] + np.exp(resample_increments(logs, steps)[1:]).tolist() if steps > 1 else [1.0] * steps


def fit_calibration(runs: Sequence[CalibrationRecorder], *, height: int, width: int, num_frames: int,
                    flow_shift: float, notes: Optional[dict] = None) -> CalibrationEntry:
    """Fit one entry from recorded full-step runs (same steps and CFG setting): TeaCache's polynomial over every
    (input change, residual change) pair, and the mean curves."""
    if not runs:
        raise InputError("calibration needs at least one recorded run")
    steps, halves = runs[0].steps, runs[0].halves
    if any(r.steps != steps or r.halves != halves for r in runs):
        raise ValueError("calibration runs must share the step count and the CFG setting")

    def mean_curve(name: str, fill: float) -> list[list[float]]:
        a = np.array([getattr(r, name) for r in runs], dtype=np.float64)  # [runs, halves, steps]
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # a step no run measured: mean of nothing
            m = np.nanmean(a, axis=0)
        m[:, 0] = fill
        return np.nan_to_num(m, nan=fill).tolist()

    x = np.array([r.input_change for r in runs], dtype=np.float64)[..., 1:].ravel()
    y = np.array([r.residual_change for r in runs], dtype=np.float64)[..., 1:].ravel()
    ok = np.isfinite(x) & np.isfinite(y)
    x, y = x[ok], y[ok]
    if len(x) > POLY_DEGREE:
        coefficients = np.polyfit(x, y, POLY_DEGREE)
        rmse = float(np.sqrt(np.mean((np.polyval(coefficients, x) - y) ** 2)))
    else:  # too few pairs for degree 4: the identity map, which still sums relative changes
        coefficients, rmse = np.array([0.0, 0.0, 0.0, 1.0, 0.0]), math.nan
    return CalibrationEntry(height, width, num_frames, steps, halves == 2, float(flow_shift),
                            [float(c) for c in coefficients], mean_curve("input_change", 0.0),
                            mean_curve("residual_change", 0.0), mean_curve("mag_ratio", 1.0),
                            mean_curve("mag_std", 0.0), rmse, len(runs), notes=dict(notes or {}))


def load_calibration(path: Union[str, os.PathLike]) -> list[CalibrationEntry]:
    """The entries of a calibration file (see :func:`save_calibration`)."""
    path = Path(path)
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise InputError(f"no step-cache calibration at {path}: run `hunyuan-i2v calibrate-cache`") from None
    except (OSError, ValueError) as exc:
        raise InputError(f"cannot read the step-cache calibration {path}: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT_VERSION:
        raise InputError(f"{path} is not a step-cache calibration (format {FORMAT_VERSION}): run "
                         f"`hunyuan-i2v calibrate-cache` again")
    try:
        return [CalibrationEntry(**e) for e in data.get("entries", [])]
    except TypeError as exc:
        raise InputError(f"{path} has a malformed calibration entry ({exc})") from None


def save_calibration(path: Union[str, os.PathLike], entries: Sequence[CalibrationEntry], model: str = "") -> Path:
    """Write ``entries`` into ``path`` (atomically), keeping the entries already there for other settings."""
    path = Path(path)
    kept = []
    if path.exists():
        new_keys = {e.key for e in entries}
        kept = [e for e in load_calibration(path) if e.key not in new_keys]
    all_entries = sorted(kept + list(entries), key=lambda e: e.key)
    data = {"format": FORMAT_VERSION, "model": model, "entries": [asdict(e) for e in all_entries]}
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1)
            f.write("\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def select_entry(entries: Sequence[CalibrationEntry], *, height: int, width: int, steps: int,
                 cfg: bool) -> Optional[CalibrationEntry]:
    """The entry for a generation: the same size (else the same resolution class, else any), the same CFG setting
    if there is one, the nearest step count; its curves resampled to ``steps``. None when there are no entries."""
    if not entries:
        return None
    pool = ([e for e in entries if (e.height, e.width) == (height, width)]
            or [e for e in entries if e.resolution == resolution_class(height, width)] or list(entries))
    pool = [e for e in pool if e.cfg == cfg] or pool
    best = min(pool, key=lambda e: (abs(e.steps - steps), abs(e.height * e.width - height * width)))
    if (best.height, best.width) != (height, width) or best.steps != steps or best.cfg != cfg:
        logger.info("step-cache calibration for %dx%d, %d steps%s used for %dx%d, %d steps%s", best.width,
                    best.height, best.steps, " with CFG" if best.cfg else "", width, height, steps,
                    " with CFG" if cfg else "")
    return best.for_steps(steps)


def calibrate(pipe, images: Sequence, prompts: Sequence[str], *, steps: Optional[int] = None, seed: int = 0,
              progress: bool = True, **generate) -> CalibrationEntry:
    """Full-step generations of every (image, prompt) pair (seeds seed, seed + 1, ...; latents only, no decode),
    recorded and fitted into one entry. ``generate``: more keyword arguments for the pipeline call (height,
    width, resolution, num_frames, cfg_scale, flow_shift...)."""
    from tqdm.auto import tqdm

    pairs = [(im, p) for im in images for p in prompts]
    if not pairs:
        raise InputError("calibration needs at least one image and one prompt")
    runs, out = [], None
    for k, (image, prompt) in enumerate(tqdm(pairs, desc="calibrating", disable=not progress)):
        recorder = CalibrationRecorder()
        out = pipe(image, prompt, steps=steps, seed=seed + k, output_type="latent", progress=False, cache=recorder,
                   **generate)
        runs.append(recorder)
    s = out.settings
    entry = fit_calibration(runs, height=s.height, width=s.width, num_frames=s.num_frames, flow_shift=s.flow_shift,
                            notes={"prompts": list(prompts), "images": len(images), "seed": seed,
                                   "cfg_scale": s.cfg_scale})
    logger.info("calibrated %d runs: TeaCache fit RMSE %.4f", len(runs), entry.fit_rmse)
    return entry


# ---------------------------------------------------------------------------------------------
# From user settings to a policy


@dataclass(frozen=True)
class CacheSettings:
    """What a user asks for. ``threshold`` None: ``speed`` solves it from the calibration, else the method's
    default. ``speed``: passes of a full run / passes computed (2.0 skips half). ``calibration``: a calibration
    file (default: step_cache.json next to the weights)."""

    method: str = "none"
    threshold: Optional[float] = None
    speed: Optional[float] = None
    max_skips: int = DEFAULT_MAX_SKIPS
    retention: Optional[float] = None  # None: the method's default (DEFAULT_RETENTION)
    joint_cfg: bool = False
    calibration: Optional[Path] = None

    def check(self) -> None:
        if self.method not in METHODS:
            raise InputError(f"unknown cache method {self.method!r}: use one of {', '.join(METHODS)}")
        if self.threshold is not None and self.speed is not None:
            raise InputError("give a cache threshold or a cache speed target, not both")
        if self.threshold is not None and self.threshold < 0:
            raise InputError(f"the cache threshold must be >= 0, got {self.threshold}")
        if self.speed is not None:
            speed_to_skip_fraction(self.speed)
        if self.max_skips < 1:
            raise InputError(f"--cache-max-skips must be at least 1, got {self.max_skips}")
        if self.retention is not None and not 0.0 <= self.retention < 1.0:
            raise InputError(f"--cache-retention must be within [0, 1), got {self.retention}")
        if self.method == "none" and (self.threshold is not None or self.speed is not None):
            raise InputError("a cache threshold or speed needs a cache method: --cache teacache or magcache")


def policy_for(cache: Union[None, str, CacheSettings, CachePolicy], model_dir: Optional[Path], *, steps: int,
               height: int, width: int, cfg: bool) -> Optional[CachePolicy]:
    """The policy for one generation (None: no caching). A ready :class:`CachePolicy` is used as it is."""
    if cache is None or isinstance(cache, CachePolicy):
        return cache
    settings = CacheSettings(cache) if isinstance(cache, str) else cache
    if not isinstance(settings, CacheSettings):
        raise InputError(f"cache must be a method name, CacheSettings or a CachePolicy, got {type(cache).__name__}")
    settings.check()
    if settings.method == "none":
        return None
    path = settings.calibration or (Path(model_dir) / CALIBRATION_FILE if model_dir is not None else None)
    entries = load_calibration(path) if path is not None and (settings.calibration or path.is_file()) else []
    entry = select_entry(entries, height=height, width=width, steps=steps, cfg=cfg)
    halves = 2 if cfg else 1
    retention = DEFAULT_RETENTION[settings.method] if settings.retention is None else settings.retention

    if settings.method == "teacache":
        if entry is not None:
            coefficients = entry.teacache_coefficients
        else:
            coefficients = TEACACHE_HUNYUAN_T2V
            logger.warning("TeaCache: no calibration for this model (%s), so the published HunyuanVideo T2V "
                           "coefficients are used; `hunyuan-i2v calibrate-cache` fits the model's own",
                           path or "no model folder")

        def make(th: float) -> CachePolicy:
            return TeaCache(th, coefficients, retention, joint_cfg=settings.joint_cfg)

        curve = entry.input_change if entry is not None else None
    else:
        if entry is None:
            raise InputError(f"MagCache needs a magnitude-ratio calibration of this model ({path or 'no model folder'}"
                             f" has none): run `hunyuan-i2v calibrate-cache --model ...`, or use --cache teacache")

        def make(th: float) -> CachePolicy:
            return MagCache(th, entry.mag_ratio, settings.max_skips, retention, joint_cfg=settings.joint_cfg)

        curve = None

    if settings.threshold is not None:
        threshold = settings.threshold
    elif settings.speed is not None:
        if settings.method == "teacache" and curve is None:
            raise InputError("--cache-speed with TeaCache needs a calibration of this model (its input-change curve):"
                             " run `hunyuan-i2v calibrate-cache`, or give --cache-threshold")
        threshold = solve_threshold(make, steps, halves, curve, skip_fraction=speed_to_skip_fraction(settings.speed))
        logger.info("%s: threshold %.4g for %.2fx fewer transformer passes (simulated on the calibration)",
                    settings.method, threshold, settings.speed)
    else:
        threshold = DEFAULT_THRESHOLDS[settings.method]
    return make(threshold)
