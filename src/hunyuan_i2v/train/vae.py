"""Training the causal VAE of the demo model from scratch on on-the-fly samples of the train split.

Recipe (measured on a 2-core CPU in the tiny-VAE probe of the project notes): L1 + L2 reconstruction of the decoded
posterior sample plus 1e-6 x KL; AdamW lr 1e-3, betas (0.9, 0.99), wd 0.01, 30 warm-up steps, gradient
clipping 1.0, a linear LR cooldown over the last 15% of the budget. Each step draws a *step kind*: a frame count
and a batch size (batch >= 2: conv3d is slow at batch 1 on CPU), mostly single frames and short clips, with some
17-frame clips so the decoder also sees longer clips.

Samples come from the samplers of :mod:`.data`: camera moves over the *training* photos and windows of the
*training* segments of the real clips, never the held-out ones. Held-out PSNR decodes the posterior mean of a
fixed subset of the built dataset's ``heldout`` split. At the end the std of the posterior mean over training
clips is measured and ``scaling_factor = 1 / std`` is recorded (model.json), so the DiT sees unit-scale latents.

Outputs in the run folder: ``vae.safetensors`` (fp32, config with the measured scaling factor in its metadata),
``model.json`` (the ModelConfig with that scaling factor), ``vae_result.json``, ``checkpoint.pt``, ``log.jsonl``.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from ..config import ModelConfig, VAEConfig, model_config_to_dict
from ..errors import InputError
from ..model.vae import CausalVAE
from . import data as D
from .common import (
    EMA,
    PathLike,
    numpy_generator_state,
    psnr_uint8,
    set_numpy_generator_state,
    uint8_video,
    video_tensor,
    write_json,
)

logger = logging.getLogger(__name__)

VAE_FILE = "vae.safetensors"
MODEL_JSON = "model.json"
RESULT_FILE = "vae_result.json"
# --bf16 steps whose gradient is not finite are skipped; this many in a row stop the run as diverged
MAX_SKIPS_IN_A_ROW = 20


@dataclass(frozen=True)
class StepKind:
    """A training step shape: ``batch`` clips of ``frames`` frames, drawn with relative ``weight``."""

    frames: int
    batch: int
    weight: float


# Mostly single frames and 5/9-frame clips (the probe's mix, the best PSNR per minute), plus a few 17-frame
# clips so the GroupNorm statistics also see longer clips; about 11% of the step time goes to 17 frames.
DEFAULT_STEP_KINDS: tuple[StepKind, ...] = (
    StepKind(1, 8, 0.40),
    StepKind(5, 3, 0.30),
    StepKind(9, 2, 0.25),
    StepKind(17, 2, 0.05),
)


@dataclass
class VAETrainSettings:
    lr: float = 1e-3
    betas: tuple[float, float] = (0.9, 0.99)
    weight_decay: float = 0.01
    kl_weight: float = 1e-6
    grad_clip: float = 1.0
    step_kinds: tuple[StepKind, ...] = DEFAULT_STEP_KINDS
    batch: Optional[int] = None  # single-frame batch; clip batches scale with it (never below 2)
    real_prob: float = 0.5  # share of samples from real clips where the sources have some
    augment: bool = False  # views of 30-100% of a photo, the 8 flips/rotations, shuffled colour channels
    ema_decay: float = 0.0  # 0: no EMA (the cooldown does the averaging, probe section "Recommendation")
    grad_checkpointing: bool = False
    bf16: bool = False  # autocast the forward to bf16 (weights, optimiser and the loss stay fp32)
    eval_images: int = 32
    eval_clips: int = 16
    eval_frames: int = 9
    final_eval_clips: int = 24  # full-length held-out clips scored once at the end
    scale_clips: int = 64  # training clips whose latent std sets the scaling factor
    seed: int = 0
    init_from: Optional[str] = None  # start from these VAE weights (a run folder, a model folder or a file)
    freeze_encoder: bool = False  # train the decoder only: the latents, and so a DiT trained on them, stay valid


def parse_step_kinds(text: str) -> tuple[StepKind, ...]:
    """Step kinds from ``"FRAMESxBATCH:WEIGHT,..."``, e.g. ``"1x8:0.4,9x2:0.6"`` (the ``--step-kinds`` option)."""
    kinds = []
    for item in text.split(","):
        m = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*:\s*([0-9]*\.?[0-9]+)\s*", item)
        if m is None:
            raise InputError(f"--step-kinds: {item.strip()!r} is not FRAMESxBATCH:WEIGHT (e.g. 9x2:0.25)")
        frames, batch, weight = int(m[1]), int(m[2]), float(m[3])
        if frames < 1 or batch < 1 or weight <= 0:
            raise InputError(f"--step-kinds: {item.strip()!r} needs frames >= 1, batch >= 1 and a weight > 0")
        kinds.append(StepKind(frames, batch, weight))
    return tuple(kinds)


def format_step_kinds(kinds: Sequence[StepKind]) -> str:
    return ",".join(f"{k.frames}x{k.batch}:{k.weight:g}" for k in kinds)


ENCODER_PREFIXES = ("encoder.", "quant_conv.")  # what makes the latents: frozen by --freeze-encoder


def encoder_state(vae: CausalVAE) -> dict[str, torch.Tensor]:
    return {k: v for k, v in vae.state_dict().items() if k.startswith(ENCODER_PREFIXES)}


def load_vae_option(path: PathLike, option: str) -> CausalVAE:
    """The fp32 VAE at ``path`` (a run folder, a model folder or a file) named by ``option``; bad ones: InputError."""
    from ..weights import load_vae

    try:
        return load_vae(path, dtype=torch.float32)
    except (OSError, ValueError) as err:  # CheckpointError is a ValueError
        raise InputError(f"{option} {path}: {err}") from None


def scaled_step_kinds(kinds: Sequence[StepKind], batch: Optional[int]) -> tuple[StepKind, ...]:
    """Step kinds with the single-frame batch set to ``batch`` and the clip batches scaled alike (>= 2)."""
    if batch is None:
        return tuple(kinds)
    if batch < 2:
        raise InputError(f"--batch must be at least 2 for the VAE (conv3d is slow at batch 1), got {batch}")
    base = next((k.batch for k in kinds if k.frames == 1), max(k.batch for k in kinds))
    return tuple(dataclasses.replace(k, batch=max(2, round(k.batch * batch / base))) for k in kinds)


def vae_loss(recon: torch.Tensor, target: torch.Tensor, posterior, kl_weight: float) -> dict[str, torch.Tensor]:
    """L1 + L2 per-pixel means plus ``kl_weight`` x the per-latent-element mean KL (probe recipe)."""
    l1 = (recon - target).abs().mean()
    l2 = F.mse_loss(recon, target)
    kl = posterior.kl().mean() / posterior.mean[0].numel()
    return {"loss": l1 + l2 + kl_weight * kl, "l1": l1, "l2": l2, "kl": kl}


@torch.no_grad()
def reconstruct(vae: CausalVAE, videos: np.ndarray, batch: int = 8) -> np.ndarray:
    """uint8 [N, T, H, W, 3] -> its reconstruction through the posterior mean, uint8, same shape."""
    out = []
    for i in range(0, len(videos), batch):
        x = video_tensor(videos[i : i + batch]).to(vae.device, vae.dtype)
        out.append(uint8_video(vae.decode(vae.encode(x, tiled=False), tiled=False)))
    return np.concatenate(out)


@torch.no_grad()
def latent_statistics(vae: CausalVAE, videos: np.ndarray, batch: int = 2) -> tuple[float, float]:
    """(mean, std) of the posterior mean over all elements of the latents of ``videos`` (uint8 [N, T, H, W, 3])."""
    total = total_sq = 0.0
    count = 0
    for i in range(0, len(videos), batch):
        z = vae.encode(video_tensor(videos[i : i + batch]).to(vae.device, vae.dtype), tiled=False).double()
        total += float(z.sum())
        total_sq += float((z * z).sum())
        count += z.numel()
    mean = total / count
    return mean, float(np.sqrt(max(total_sq / count - mean * mean, 0.0)))


def dataset_manifest(data_dir: PathLike) -> dict:
    path = Path(data_dir) / "manifest.json"
    if not path.is_file():
        raise InputError(f"{data_dir} is not a built dataset (no manifest.json): build one with "
                         "`python -m hunyuan_i2v.train.data build --out DIR`")
    return json.loads(path.read_text())


# Camera-move views for the VAE with --augment: 30-100% of the largest view a move allows (the DiT's data and the
# held-out clips use 75-100%), so a photo is also seen in parts, at up to 3x its full-view scale.
AUGMENT_FILL = (0.3, 1.0)


def augment_clip(video: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """One of the 8 flips/rotations of the square frames and, half the time, a shuffle of the colour channels
    (uint8 [T, H, W, 3], the same for every frame). More distinct content per photo for the VAE, which otherwise
    learns its 20 training photos far better than unseen ones (benchmarks/vae_photo_psnr.py)."""
    turns, flip = int(rng.integers(4)), bool(rng.integers(2))
    out = np.rot90(video, turns, axes=(1, 2))
    if flip:
        out = out[:, :, ::-1]
    if rng.random() < 0.5:
        out = out[..., rng.permutation(3)]
    return np.ascontiguousarray(out)


class TrainSamples:
    """Batches of training-split samples for a step kind: camera moves over training photos and real clips."""

    def __init__(self, size: int, fps: float, frame_counts: Sequence[int], sources: Sequence[str],
                 rng: np.random.Generator, real_prob: float = 0.5, augment: bool = False):
        found = D.resolve_sources(list(sources), fetch=False)
        photos = [D.load_photo(spec, path) for spec, path in found.photos if not spec.heldout]
        if not photos:
            raise InputError("no training photo is available: install scikit-image (pip install scikit-image)")
        clips = [D.load_clip(spec, path, 2 * size) for spec, path in found.clips]
        self.rng, self.real_prob, self.augment = rng, real_prob, augment
        self.moves, self.real = {}, {}
        views = {"fill": AUGMENT_FILL} if augment else {}  # else CameraMoveSampler's default views
        for frames in sorted(set(frame_counts)):
            n = max(frames, 2)  # the samplers need 2+ frames; single frames are picked from 2-frame samples
            self.moves[frames] = D.CameraMoveSampler(photos, size, n, rng, fps=fps, **views)
            if clips:
                try:
                    self.real[frames] = D.RealClipSampler(clips, size, n, rng, fps=fps, split="train")
                except InputError as err:
                    logger.warning("no real clips for %d-frame steps: %s", frames, err)
        # what the steps draw from: a clip whose shots are all held out (cup) adds nothing
        self.sources = sorted({p.source for p in photos} | {s for r in self.real.values() for s in r.sources})

    def batch(self, frames: int, batch: int) -> np.ndarray:
        """uint8 [batch, frames, size, size, 3]."""
        out = []
        for _ in range(batch):
            real = frames in self.real and self.rng.random() < self.real_prob
            video = (self.real if real else self.moves)[frames].sample()[0]
            if frames == 1:
                start = int(self.rng.integers(len(video)))
                video = video[start : start + 1]
            video = video[:frames]
            out.append(augment_clip(video, self.rng) if self.augment else video)
        return np.stack(out)


def _spread(n: int, k: int) -> np.ndarray:
    return np.unique(np.linspace(0, n - 1, min(n, k)).round().astype(int))


class VAETask:
    """The VAE stage for :func:`~.common.run_training`."""

    name = "vae"

    def __init__(self, config: ModelConfig, data_dir: PathLike, settings: VAETrainSettings = VAETrainSettings(),
                 device: str = "cpu"):
        self.config, self.settings, self.data_dir = config, settings, Path(data_dir)
        if settings.freeze_encoder and not settings.init_from:
            raise InputError("--freeze-encoder needs --init-from: a fresh encoder would stay random")
        if settings.init_from and not Path(settings.init_from).exists():
            raise InputError(f"--init-from {settings.init_from}: no such file or folder")
        vcfg = config.vae
        manifest = dataset_manifest(data_dir)
        params = manifest["parameters"]
        self.size, self.frames, self.fps = int(params["size"]), int(params["frames"]), float(params["fps"])
        self.data_params = {k: params[k] for k in ("size", "frames", "fps", "sources", "seed")}
        if self.size % vcfg.spatial_compression:
            raise InputError(f"the dataset's size {self.size} is not a multiple of the VAE's spatial compression "
                             f"{vcfg.spatial_compression}")
        tc = vcfg.temporal_compression
        kinds = [k for k in scaled_step_kinds(settings.step_kinds, settings.batch)
                 if k.frames <= self.frames and (k.frames - 1) % tc == 0]
        if not kinds:
            raise InputError(f"no step kind fits {self.frames}-frame clips with temporal compression {tc}")
        self.kinds = tuple(kinds)
        weights = np.array([k.weight for k in kinds], dtype=np.float64)
        self.kind_p = weights / weights.sum()

        self.rng = np.random.default_rng(settings.seed)
        self.samples = TrainSamples(self.size, self.fps, [k.frames for k in kinds], params["sources"], self.rng,
                                    settings.real_prob, settings.augment)
        self.generator = torch.Generator().manual_seed(settings.seed)

        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global stream alone
            torch.manual_seed(settings.seed)
            self.vae = CausalVAE(vcfg, device=device).train()
        self.source_scaling = None
        if settings.init_from:
            self.source_scaling = self._load_init(settings.init_from)
        self.vae.enable_gradient_checkpointing(settings.grad_checkpointing)
        for name, param in self.vae.named_parameters():
            param.requires_grad_(not (settings.freeze_encoder and name.startswith(ENCODER_PREFIXES)))
        self.optimizer = torch.optim.AdamW([p for p in self.vae.parameters() if p.requires_grad], lr=settings.lr,
                                           betas=settings.betas, weight_decay=settings.weight_decay)
        self.ema = EMA(self.vae, settings.ema_decay) if settings.ema_decay > 0 else None
        self._skips_in_a_row = 0

        heldout, _ = D.load_split(self.data_dir, "heldout")
        self.heldout = heldout
        eval_frames = min(settings.eval_frames, self.frames)
        eval_frames -= (eval_frames - 1) % tc
        image_idx = _spread(len(heldout), settings.eval_images)
        # Alternate frame 0 and the middle frame, so moved views are scored too.
        picks = [(i, 0 if n % 2 == 0 else self.frames // 2) for n, i in enumerate(image_idx)]
        self.eval_images = np.stack([heldout[i, t : t + 1] for i, t in picks])
        self.eval_clips = heldout[_spread(len(heldout), settings.eval_clips), :eval_frames]
        logger.info("VAE training: %s; step kinds %s; sources %s", vcfg, [(k.frames, k.batch) for k in kinds],
                    ", ".join(self.samples.sources))

    def _load_init(self, path: str) -> float:
        """Copy the weights of the VAE at ``path`` (same architecture) into the fresh one; its scaling factor."""
        source = load_vae_option(path, "--init-from")
        mine = dataclasses.replace(self.config.vae, scaling_factor=1.0)
        theirs = dataclasses.replace(source.config, scaling_factor=1.0)
        if mine != theirs:
            raise InputError(f"--init-from {path}: its VAE config {theirs} differs from this run's {mine}")
        self.vae.load_state_dict(source.state_dict())
        logger.info("VAE weights from %s (scaling factor %.4g)", path, source.config.scaling_factor)
        return float(source.config.scaling_factor)

    # -- TrainTask -----------------------------------------------------------------------------

    def identity(self) -> dict:
        ident = {"vae": dataclasses.asdict(self.config.vae), "data": self.data_params}
        if self.settings.augment:  # only when on, so runs from before the option still resume
            ident["augment"] = True
        if tuple(self.settings.step_kinds) != DEFAULT_STEP_KINDS:  # likewise
            ident["step_kinds"] = format_step_kinds(self.settings.step_kinds)
        if self.settings.init_from:
            ident["init_from"] = str(self.settings.init_from)
        if self.settings.freeze_encoder:
            ident["freeze_encoder"] = True
        return ident

    def prepare(self, run_dir: Path) -> None:
        pass

    @property
    def eval_model(self) -> CausalVAE:
        return self.ema.model if self.ema is not None else self.vae

    def train_step(self, lr_scale: float) -> dict[str, float]:
        kind = self.kinds[int(self.rng.choice(len(self.kinds), p=self.kind_p))]
        x = video_tensor(self.samples.batch(kind.frames, kind.batch)).to(self.vae.device, self.vae.dtype)
        for group in self.optimizer.param_groups:
            group["lr"] = self.settings.lr * lr_scale
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=self.settings.bf16):
            recon, posterior = self.vae(x, sample_posterior=True, generator=self.generator)
        losses = vae_loss(recon.float(), x, posterior, self.settings.kl_weight)
        losses["loss"].backward()
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.vae.parameters(), self.settings.grad_clip))
        finite = math.isfinite(grad_norm)
        if finite:  # a non-finite update is never applied, skipped or about to stop the run
            self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        if self.ema is not None and finite:
            self.ema.update(self.vae)
        out = {k: float(v.detach()) for k, v in losses.items()}
        # A second guard behind the per-tap conv3d weight gradient (docs/training.md): under --bf16 a non-finite
        # gradient from a finite loss skips the step, as mixed-precision loss scalers do with overflowing steps.
        skipped = self.settings.bf16 and not finite and math.isfinite(out["loss"])
        self._skips_in_a_row = self._skips_in_a_row + 1 if skipped else 0
        if self._skips_in_a_row > MAX_SKIPS_IN_A_ROW:
            skipped = False  # report the non-finite norm: the loop stops the run as diverged
        out.update(grad_norm=0.0 if skipped else grad_norm, frames=float(kind.frames), skipped=float(skipped))
        return out

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        vae = self.eval_model.eval()
        try:
            img = psnr_uint8(reconstruct(vae, self.eval_images, 16), self.eval_images)
            clip = psnr_uint8(reconstruct(vae, self.eval_clips, 4), self.eval_clips)
        finally:
            self.vae.train()
        return {"psnr_img": float(np.mean(img)), "psnr_clip": float(np.mean(clip)),
                "clip_frames": int(self.eval_clips.shape[1])}

    def state_dict(self) -> dict:
        return {
            "model": self.vae.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "data_rng": numpy_generator_state(self.rng),
            "generator": self.generator.get_state(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.vae.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.ema is not None:
            if state["ema"] is None:
                raise InputError("the checkpoint has no EMA weights: resume without --ema, or start a new run folder")
            self.ema.load_state_dict(state["ema"])
        set_numpy_generator_state(self.rng, state["data_rng"])
        self.generator.set_state(state["generator"])

    def finish(self, run_dir: Path, step: int) -> dict[str, Any]:
        """Final held-out scores, the latent scale over training clips, and the weights with that scale."""
        vae = self.eval_model.eval()
        metrics = self.evaluate(step)
        full = self.heldout[_spread(len(self.heldout), self.settings.final_eval_clips)]
        metrics["psnr_full"] = float(np.mean(psnr_uint8(reconstruct(vae, full, 2), full)))
        train, _ = D.load_split(self.data_dir, "train")
        clips = train[_spread(len(train), self.settings.scale_clips)]
        del train
        mean, std = latent_statistics(vae, clips)
        if not np.isfinite(std) or std <= 0:
            raise InputError(f"the trained VAE's latents have std {std}: training diverged; retrain with a lower --lr")
        # A frozen encoder gives the source's latents: keep its scale, so a DiT trained on them sees the same input.
        scaling = self.source_scaling if self.settings.freeze_encoder else 1.0 / std
        config = self.config.replace(vae=dataclasses.replace(self.config.vae, scaling_factor=scaling))
        save_trained_vae(vae, config.vae, run_dir / VAE_FILE)
        write_json(run_dir / MODEL_JSON, model_config_to_dict(config))
        result = {"scaling_factor": scaling, "latent_std": std, "latent_mean": mean, "steps": step,
                  "scale_clips": len(clips), "full_clip_frames": int(full.shape[1]), **metrics}
        write_json(run_dir / RESULT_FILE, result)
        logger.info("VAE done: PSNR img %.2f / clip %.2f / full %.2f dB; latent std %.4g -> scaling_factor %.4g",
                    metrics["psnr_img"], metrics["psnr_clip"], metrics["psnr_full"], std, scaling)
        return result


def save_trained_vae(vae: CausalVAE, config: VAEConfig, path: Path, dtype: torch.dtype = torch.float32) -> None:
    """Save the weights as one safetensors file whose metadata carries ``config`` (incl. the scaling factor)."""
    from ..weights import save_vae

    state = {k: v.detach().to(dtype) for k, v in vae.state_dict().items()}
    save_vae(state, path, format="safetensors", config=config)


def load_model_json(path: PathLike) -> ModelConfig:
    from ..config import model_config_from_dict

    path = Path(path)
    if not path.is_file():
        raise InputError(f"{path} not found: pass a model.json (a ModelConfig), e.g. one written by the VAE stage")
    try:
        return model_config_from_dict(json.loads(path.read_text()))
    except (ValueError, TypeError) as err:
        raise InputError(f"{path} is not a valid model.json: {err}") from None


__all__ = [
    "DEFAULT_STEP_KINDS",
    "ENCODER_PREFIXES",
    "StepKind",
    "TrainSamples",
    "VAETask",
    "VAETrainSettings",
    "encoder_state",
    "format_step_kinds",
    "latent_statistics",
    "load_vae_option",
    "parse_step_kinds",
    "reconstruct",
    "save_trained_vae",
    "scaled_step_kinds",
    "vae_loss",
]
