"""Training the diffusion transformer from scratch on a latent cache (:mod:`.latents`), per the official recipe.

The training step of the official LoRA trainer (spec section 6.3), adapted to a from-scratch demo model:

* flow matching on the linear path x_t = (1 - t) data + t noise with the velocity target noise - data; the
  model's time input is t x 1000;
* t = sigmoid(u), u ~ N(0, 1) ("lognorm"), then shifted t <- s t / (1 + (s - 1) t). The official trainer uses
  s = 7 at 360p; a 9x16x16 latent has far fewer tokens, so the default is 3, matching the demo sampler's shift;
* token_replace: latent frame 0 of x_t is the clean first-frame latent (frame 0 encoded alone, as the pipeline
  encodes the input image) and the MSE is taken on frames 1: only;
* the prompt is dropped to "" with p = 0.1 (the unconditional branch of real CFG at inference);
* AdamW, linear warm-up, gradient clipping 1.0, plus (not in the official LoRA recipe) a final LR cooldown and
  an EMA of the weights, which is what gets evaluated and exported. fp32 on the CPU.

Weights start from the DiT initialisation (:func:`init_transformer_weights`): Xavier linears and zero-initialised
adaLN modulations and output layer, so every block starts as the identity and the model predicts 0.

Periodic evaluation, with the EMA weights: the flow-matching loss on held-out latents at fixed (noise, t) pairs,
and a few held-out videos sampled at few steps with real CFG, decoded by the cache's VAE and classified by
:func:`.data.classify_motion`; ``motion_acc`` is the share whose measured camera motion matches the prompt.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..config import ModelConfig, model_config_to_dict
from ..errors import InputError
from ..model.transformer import DoubleStreamBlock, FinalLayer, HunyuanVideoTransformer, SingleStreamBlock
from ..sampling import TextConditioning, denoise, get_sigmas, shift_sigmas
from . import data as D
from .common import CHECKPOINT_NAME, EMA, EpochSampler, PathLike, uint8_video, write_json
from .latents import VAE_FILE, LatentCache, load_latent_cache
from .vae import MODEL_JSON

logger = logging.getLogger(__name__)

RUN_JSON = "run.json"
RESULT_FILE = "dit_result.json"


@dataclass
class DiTTrainSettings:
    lr: float = 3e-4
    betas: tuple[float, float] = (0.9, 0.999)
    weight_decay: float = 0.0
    batch: int = 8
    shift: float = 3.0
    prompt_dropout: float = 0.1
    ema_decay: float = 0.999
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    bf16: bool = False  # autocast the forward to bf16 (weights, EMA, optimiser and the loss stay fp32)
    guidance: float = 1.0  # embedded guidance (x 1000) fed to models that have guidance_in; the demo has none
    eval_videos: int = 7  # held-out camera moves sampled per evaluation, cycling over the motion kinds
    eval_steps: int = 10
    eval_cfg: Optional[float] = None  # None: the model's default cfg_scale
    val_clips: int = 32  # held-out clips for the validation loss
    seed: int = 0
    frames: Optional[int] = None  # train on the first 4k+1 frames of the cached clips (None: all of them)
    init_from: Optional[str] = None  # start from another DiT run's EMA weights (progressive training)


# ---------------------------------------------------------------------------------------------
# The math of a training step


def sample_timesteps(batch: int, shift: float, generator: Optional[torch.Generator] = None) -> Tensor:
    """t in (0, 1): sigmoid of a standard normal, then shifted towards 1 by ``shift`` (spec 6.3)."""
    u = torch.randn(batch, generator=generator)
    return shift_sigmas(torch.sigmoid(u), shift)


def flow_matching_pair(x0: Tensor, noise: Tensor, t: Tensor, first: Optional[Tensor]) -> tuple[Tensor, Tensor]:
    """(x_t, velocity target) for clean latents ``x0`` [B, C, T, H, W]; ``first`` [B, C, 1, H, W] replaces frame 0."""
    tt = t.view(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    x_t = (1.0 - tt) * x0 + tt * noise
    if first is not None:
        x_t[:, :, :1] = first
    return x_t, noise - x0


def flow_matching_loss(pred: Tensor, target: Tensor, skip_first: bool = True) -> Tensor:
    """MSE over all elements, of frames 1: only when frame 0 is the given image (token_replace)."""
    if skip_first:
        pred, target = pred[:, :, 1:], target[:, :, 1:]
    return F.mse_loss(pred.float(), target.float())


@torch.no_grad()
def init_transformer_weights(model: HunyuanVideoTransformer) -> None:
    """DiT-style initialisation (from the global torch RNG): Xavier-uniform linears and patch embedding, zero
    biases, N(0, 0.02) timestep MLPs, and zero adaLN modulations and output layer."""
    for module in model.modules():
        if isinstance(module, nn.Linear):
            nn.init.xavier_uniform_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
    proj = model.img_in.proj
    nn.init.xavier_uniform_(proj.weight.view(proj.weight.shape[0], -1))
    nn.init.zeros_(proj.bias)
    embedders = [model.time_in, model.txt_in.t_embedder] + ([model.guidance_in] if model.guidance_in else [])
    for embedder in embedders:
        for layer in (embedder.mlp[0], embedder.mlp[2]):
            nn.init.normal_(layer.weight, std=0.02)
    zero = []
    for block in model.double_blocks:
        assert isinstance(block, DoubleStreamBlock)
        zero += [block.img_mod.linear, block.txt_mod.linear]
    for block in model.single_blocks:
        assert isinstance(block, SingleStreamBlock)
        zero.append(block.modulation.linear)
    assert isinstance(model.final_layer, FinalLayer)
    zero += [model.final_layer.adaLN_modulation[-1], model.final_layer.linear]
    zero += [b.adaLN_modulation[-1] for b in model.txt_in.individual_token_refiner.blocks]
    for layer in zero:
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)


def check_compatible(config: ModelConfig, cache: LatentCache) -> None:
    """Raise InputError unless the transformer config fits the cache's latents and prompt embeddings."""
    t = config.transformer
    channels = cache.splits["train"].latents.shape[1]
    if t.in_channels != channels or t.out_channels != channels:
        raise InputError(f"the transformer takes {t.in_channels} channels but the cache's latents have {channels}: "
                         "use the model.json the cache was built with")
    if t.condition_type != "token_replace":
        raise InputError(f"DiT training supports token_replace models only, got condition_type {t.condition_type!r}")
    if cache.text_states.shape[-1] != t.text_states_dim or cache.text_states_2.shape[-1] != t.text_states_dim_2:
        dims = (cache.text_states.shape[-1], cache.text_states_2.shape[-1])
        raise InputError(f"the cache's prompt embeddings {dims} "
                         f"do not fit text_states_dim {t.text_states_dim} / text_states_dim_2 {t.text_states_dim_2}")
    _, _, h, w = cache.splits["train"].latents.shape[1:]
    _, ph, pw = t.patch_size
    if h % ph or w % pw:
        raise InputError(f"latent size {h}x{w} is not divisible by the patch size {t.patch_size}")


def pick_eval_rows(cache: LatentCache, count: int) -> list[int]:
    """Held-out camera-move rows, cycling over the motion kinds; fast moves first (clearest to measure)."""
    held = cache.splits["heldout"]
    rank = {"fast": 0, "medium": 1, "slow": 2}
    by_kind = {kind: sorted((i for i, k in enumerate(held.kinds) if k == kind),
                            key=lambda i: (rank.get(held.speed_names[i], 3), i)) for kind in D.MOTION_KINDS}
    by_kind = {k: v for k, v in by_kind.items() if v}
    rows, depth = [], 0
    while len(rows) < count and any(depth < len(v) for v in by_kind.values()):
        rows += [v[depth] for v in by_kind.values() if depth < len(v)][: count - len(rows)]
        depth += 1
    return rows


@torch.no_grad()
def sample_cached(model: nn.Module, cache: LatentCache, split, idx: Tensor, noise: Tensor, steps: int, cfg: float,
                  flow_shift: float, guidance: Optional[Tensor], vae) -> np.ndarray:
    """Videos of cache rows ``idx`` of ``split``, generated from their cached first-frame latents and captions
    (token_replace, real CFG with the empty prompt when ``cfg`` > 1) from ``noise``, decoded one by one by
    ``vae``; uint8 [N, T, H, W, 3]. The evaluation sampler of the DiT and LoRA trainers."""
    cond = TextConditioning(*cache.text(split.caption_ids[idx]))
    uncond = TextConditioning(*cache.text(torch.zeros_like(idx))) if cfg > 1.0 else None
    latents = denoise(model, noise, split.first[idx].float(), cond, get_sigmas(steps, flow_shift),
                      condition_type="token_replace", guidance=guidance, uncond=uncond, cfg_scale=cfg)
    return np.concatenate([uint8_video(vae.decode(latents[i : i + 1] / cache.scaling_factor, tiled=False))
                           for i in range(len(idx))])


def load_init_weights(run: PathLike, model: nn.Module) -> dict[str, Tensor]:
    """The EMA transformer weights of a DiT run folder (or of its ``checkpoint.pt`` given directly), checked
    against ``model``'s parameter names and shapes: the start of a progressive stage (for example 17 frames,
    then 33 from the same cache). Optimiser, schedule and data order start fresh."""
    path = Path(run).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise InputError(f"--init-from: no DiT checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=False)
    if state.get("stage") != "dit":
        raise InputError(f"--init-from: {path} is a {state.get('stage')!r} checkpoint, not a DiT one")
    task_state = state["task"]
    weights = task_state["ema"]["model"] if task_state.get("ema") else task_state["model"]
    own = model.state_dict()
    bad = sorted(k for k in own if k not in weights or weights[k].shape != own[k].shape)
    if bad or len(weights) != len(own):
        raise InputError(f"--init-from: {path} holds another transformer config (mismatched: {bad[:3]}...)")
    return weights


class DiTTask:
    """The DiT stage for :func:`~.common.run_training`."""

    name = "dit"

    def __init__(self, cache_dir: PathLike, settings: DiTTrainSettings = DiTTrainSettings(),
                 config: Optional[ModelConfig] = None, device: str = "cpu"):
        """``config``: overrides the transformer, text and sampler parts of the cache's model.json."""
        if settings.batch < 1:
            raise InputError(f"--batch must be at least 1, got {settings.batch}")
        self.settings = settings
        self.cache = load_latent_cache(cache_dir)
        # The VAE (and its scaling factor) is always the cache's: the latents were made with it.
        self.config = (config or self.cache.config).replace(vae=self.cache.config.vae)
        check_compatible(self.config, self.cache)
        if settings.frames is not None:
            self._truncate_clips(settings.frames)
        tcfg = self.config.transformer
        with torch.random.fork_rng(devices=[]):  # a seeded init that leaves the global stream alone
            torch.manual_seed(settings.seed)
            self.model = HunyuanVideoTransformer(tcfg, device=device)
            init_transformer_weights(self.model)
        if settings.init_from is not None:
            self.model.load_state_dict(load_init_weights(settings.init_from, self.model))
        self.model.train().enable_gradient_checkpointing(settings.grad_checkpointing)
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=settings.lr, betas=settings.betas,
                                           weight_decay=settings.weight_decay)
        self.ema = EMA(self.model, settings.ema_decay)
        self.sampler = EpochSampler(len(self.cache.splits["train"]), settings.seed)
        self.generator = torch.Generator().manual_seed(settings.seed)
        self.eval_rows = pick_eval_rows(self.cache, settings.eval_videos)
        held = self.cache.splits["heldout"]
        self.val_rows = np.unique(np.linspace(0, len(held) - 1, min(len(held), settings.val_clips)).round()).astype(int)
        self.samples_dir: Optional[Path] = None
        self._vae = None
        logger.info("DiT training: %.2fM parameters, %d training latents %s, batch %d",
                    sum(p.numel() for p in self.model.parameters()) / 1e6, len(self.cache.splits["train"]),
                    tuple(self.cache.splits["train"].latents.shape[1:]), settings.batch)

    def _truncate_clips(self, frames: int) -> None:
        """Keep the first ``frames`` frames of every cached clip. With a causal VAE the first 1 + (frames-1)/4
        latent frames of a longer clip are exactly the encoding of its first ``frames`` frames, so this trains
        a shorter-video model (cheaper steps) from the same cache; the exported sampler defaults follow."""
        cached = self.cache.splits["train"].latents.shape[2]
        ratio = self.config.vae.temporal_compression
        cached_frames = (cached - 1) * ratio + 1
        if frames < 1 or (frames - 1) % ratio or frames > cached_frames:
            raise InputError(f"--frames must be {ratio}k+1 and at most the cached {cached_frames}, got {frames}")
        keep = (frames - 1) // ratio + 1
        for name, split in self.cache.splits.items():
            self.cache.splits[name] = dataclasses.replace(split, latents=split.latents[:, :, :keep])
        self.config = self.config.replace(sampler=dataclasses.replace(self.config.sampler, num_frames=frames))

    # -- TrainTask -----------------------------------------------------------------------------

    def identity(self) -> dict:
        identity = {"transformer": dataclasses.asdict(self.config.transformer),
                    "scaling_factor": self.cache.scaling_factor, "cache_rows": len(self.cache.splits["train"])}
        if self.settings.frames is not None:
            identity["frames"] = self.settings.frames
        if self.settings.init_from is not None:
            identity["init_from"] = str(Path(self.settings.init_from).expanduser().resolve())
        return identity

    def prepare(self, run_dir: Path) -> None:
        """Record what export needs: the model config and where the cache (and its VAE) lives."""
        write_json(run_dir / MODEL_JSON, model_config_to_dict(self.config))
        write_json(run_dir / RUN_JSON, {"cache": str(self.cache.root.resolve()),
                                        "settings": _jsonable(dataclasses.asdict(self.settings))})
        self.samples_dir = run_dir / "eval"

    def _guidance(self, batch: int) -> Optional[Tensor]:
        if not self.config.transformer.guidance_embed:
            return None
        return torch.full((batch,), self.settings.guidance * 1000.0)

    def train_step(self, lr_scale: float) -> dict[str, float]:
        s, g = self.settings, self.generator
        train = self.cache.splits["train"]
        idx = torch.from_numpy(self.sampler.next(s.batch))
        x0, first = train.latents[idx].float(), train.first[idx].float()
        noise = torch.randn(x0.shape, generator=g)
        t = sample_timesteps(s.batch, s.shift, g)
        drop = torch.rand(s.batch, generator=g) < s.prompt_dropout
        text_ids = torch.where(drop, torch.zeros_like(idx), train.caption_ids[idx])  # row 0 is ""
        x_t, target = flow_matching_pair(x0, noise, t, first)
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr * lr_scale
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=s.bf16):
            pred = self.model(x_t, t * 1000.0, *self.cache.text(text_ids), guidance=self._guidance(s.batch))
        loss = flow_matching_loss(pred.float(), target)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), s.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.ema.update(self.model)
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "t": float(t.mean())}

    @torch.no_grad()
    def validation_loss(self, model: nn.Module, batch: int = 8) -> float:
        """Flow-matching loss on held-out latents at fixed (noise, t) pairs: comparable across evaluations."""
        held = self.cache.splits["heldout"]
        g = torch.Generator().manual_seed(1234)
        total, count = 0.0, 0
        for i in range(0, len(self.val_rows), batch):
            rows = torch.from_numpy(self.val_rows[i : i + batch])
            x0, first = held.latents[rows].float(), held.first[rows].float()
            noise = torch.randn(x0.shape, generator=g)
            t = sample_timesteps(len(rows), self.settings.shift, g)
            x_t, target = flow_matching_pair(x0, noise, t, first)
            pred = model(x_t, t * 1000.0, *self.cache.text(held.caption_ids[rows]), guidance=self._guidance(len(rows)))
            total += float(flow_matching_loss(pred, target)) * len(rows)
            count += len(rows)
        return total / count

    @property
    def vae(self):
        if self._vae is None:
            from ..weights import load_vae

            self._vae = load_vae(self.cache.root / VAE_FILE, dtype=torch.float32, device="cpu")
        return self._vae

    @torch.no_grad()
    def sample_videos(self, model: nn.Module, rows: list[int], steps: int, cfg: float, seed: int = 4321) -> np.ndarray:
        """Generate held-out ``rows`` from their first frame and caption; uint8 [N, T, H, W, 3]."""
        held = self.cache.splits["heldout"]
        idx = torch.tensor(rows, dtype=torch.int64)
        noise = torch.randn((len(rows), *held.latents.shape[1:]), generator=torch.Generator().manual_seed(seed))
        return sample_cached(model, self.cache, held, idx, noise, steps, cfg, self.config.sampler.flow_shift,
                             self._guidance(len(rows)), self.vae)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        s = self.settings
        self.model.eval()
        try:
            metrics: dict[str, Any] = {"val_loss": self.validation_loss(self.model),
                                       "val_loss_ema": self.validation_loss(self.ema.model)}
        finally:
            self.model.train()
        if self.eval_rows and s.eval_steps > 0:
            cfg = self.config.sampler.cfg_scale if s.eval_cfg is None else s.eval_cfg
            videos = self.sample_videos(self.ema.model, self.eval_rows, s.eval_steps, cfg)
            held = self.cache.splits["heldout"]
            expected = [held.kinds[i] for i in self.eval_rows]
            measured = [D.classify_motion(v, band=D.GENERATED_VIDEO_BAND) for v in videos]
            metrics["motion_acc"] = float(np.mean([m == e for m, e in zip(measured, expected)]))
            metrics["motion"] = [f"{e}->{m}" for e, m in zip(expected, measured)]
            if self.samples_dir is not None:
                save_eval_videos(self.samples_dir / f"step{step:07d}", videos,
                                 [held.captions[i] for i in self.eval_rows], expected, measured)
        return metrics

    def state_dict(self) -> dict:
        return {"model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "ema": self.ema.state_dict(), "sampler": self.sampler.state_dict(),
                "generator": self.generator.get_state()}

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.ema.load_state_dict(state["ema"])
        self.sampler.load_state_dict(state["sampler"])
        self.generator.set_state(state["generator"])

    def finish(self, run_dir: Path, step: int) -> dict[str, Any]:
        metrics = self.evaluate(step)
        result = {"steps": step, "scaling_factor": self.cache.scaling_factor, "cache": str(self.cache.root.resolve()),
                  **metrics}
        write_json(run_dir / RESULT_FILE, result)
        return result


def save_eval_videos(stem: Path, videos: np.ndarray, captions: list[str], expected: list[str],
                     measured: list[str]) -> None:
    """``stem.npz`` (videos and labels) and ``stem.png``: frames 0, middle and last of each video, one row each."""
    from PIL import Image

    stem.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(f"{stem}.npz", videos=videos, captions=np.array(captions), expected=np.array(expected),
                        measured=np.array(measured))
    t = videos.shape[1]
    rows = [np.concatenate([v[0], v[t // 2], v[-1]], axis=1) for v in videos]
    Image.fromarray(np.concatenate(rows, axis=0)).save(f"{stem}.png")


def _jsonable(data: Any) -> Any:
    return json.loads(json.dumps(data, default=str))


__all__ = [
    "DiTTask",
    "DiTTrainSettings",
    "check_compatible",
    "flow_matching_loss",
    "flow_matching_pair",
    "init_transformer_weights",
    "pick_eval_rows",
    "sample_timesteps",
]
