"""Image + prompt -> video: buckets, prompt encoding, VAE encoding, denoising, decoding (spec sections 2, 4, 8).

Memory order follows the official sampler: the prompt encoders are loaded, run and released before the
transformer needs the memory; the VAE decodes last, one video at a time.
"""

from __future__ import annotations

import gc
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Protocol, Sequence, Union

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .buckets import bucket_for, check_num_frames, check_size, resize_and_center_crop
from .config import DEFAULT_NEGATIVE_PROMPT, ModelConfig
from .errors import InputError
from .images import ImageSource, image_to_tensor, load_image
from .model.text import black_image_like
from .sampling import TextConditioning, denoise, get_sigmas, guidance_tensor

logger = logging.getLogger(__name__)

RESOLUTIONS = ("360p", "540p", "720p")
MAX_SEED = 2**32 - 1


class PromptEncoderLike(Protocol):
    """What the pipeline needs from a prompt encoder (LLaVA + CLIP, or a small one)."""

    def encode(self, prompts: list[str], images: list[Image.Image]) -> Any:  # -> object with the three fields
        ...


def _as_conditioning(embeds: Any) -> TextConditioning:
    if isinstance(embeds, TextConditioning):
        return embeds
    return TextConditioning(embeds.text_states, embeds.text_mask, embeds.text_states_2)


def _repeat(c: TextConditioning, n: int) -> TextConditioning:
    return TextConditioning(*(t.repeat_interleave(n, dim=0) for t in (c.text_states, c.text_mask, c.text_states_2)))


@dataclass
class GenerationSettings:
    """The resolved settings of one call; stored in the video metadata."""

    prompts: list[str]
    negative_prompt: Optional[str]
    height: int
    width: int
    num_frames: int
    steps: int
    flow_shift: float
    stability: bool
    guidance: Optional[float]
    cfg_scale: float
    seeds: list[int]
    condition_type: Optional[str]
    model: str

    def for_video(self, index: int) -> dict:
        d = asdict(self)
        d["prompt"] = self.prompts[index // max(1, len(self.seeds) // len(self.prompts))]
        d["seed"] = self.seeds[index]
        del d["prompts"], d["seeds"]
        return d


@dataclass
class I2VOutput:
    """frames: uint8 [N, T, H, W, 3] numpy ("np") or float [N, 3, T, H, W] in [0, 1] ("pt"); None for "latent"."""

    frames: Any
    latents: Optional[Tensor]
    settings: GenerationSettings
    extras: dict = field(default_factory=dict)


class I2VPipeline:
    """HunyuanVideo-I2V image-to-video generation.

    Components may be given directly or as zero-argument loaders, which are called when first needed; a prompt
    encoder given as a loader is released after every encoding so the transformer has the memory.
    """

    def __init__(
        self,
        config: ModelConfig,
        transformer: Any,
        vae: Any,
        prompt_encoder: Union[PromptEncoderLike, Callable[[], PromptEncoderLike]],
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        vae_dtype: Optional[torch.dtype] = None,
        name: Optional[str] = None,
    ):
        self.config = config
        self.device = torch.device(device) if device is not None else _default_device()
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.vae_dtype = vae_dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.name = name or config.name
        self._transformer, self._vae, self._prompt_encoder = transformer, vae, prompt_encoder

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, Path],
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        vae_dtype: Optional[torch.dtype] = None,
        config: Optional[ModelConfig] = None,
    ) -> "I2VPipeline":
        """Open a model folder in the official ``ckpts/``, diffusers or flat layout (see :mod:`layout`).

        Files are checked now; weights load when first needed. ``config`` overrides the detected ModelConfig
        (needed only for non-standard models stored without one, e.g. a small model in the official layout).
        """
        from .layout import resolve_model_files
        from .model.text import load_prompt_encoder
        from .weights import load_transformer, load_vae

        files = resolve_model_files(path).require_complete()
        device = torch.device(device) if device is not None else _default_device()
        dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
        vae_dtype = vae_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        config = config or model_config_for(files)

        def transformer():
            return load_transformer(files.transformer, dtype=dtype, device=device, config=config.transformer)

        def vae():
            return load_vae(files.vae, dtype=vae_dtype, device=device)

        def prompt_encoder():
            return load_prompt_encoder(files.text_root, dtype=_encoder_dtype(device), device=device, config=config.text)

        return cls(config, transformer, vae, prompt_encoder, device=device, dtype=dtype, vae_dtype=vae_dtype,
                   name=str(files.root))

    # -- lazily loaded components ----------------------------------------------------------------

    @property
    def transformer(self):
        if callable(self._transformer) and not isinstance(self._transformer, torch.nn.Module):
            logger.info("loading the transformer")
            self._transformer = self._transformer()
        return self._transformer

    @property
    def vae(self):
        if callable(self._vae) and not isinstance(self._vae, torch.nn.Module):
            logger.info("loading the VAE")
            self._vae = self._vae()
        return self._vae

    def encode_prompts(self, prompts: list[str], images: list[Image.Image]) -> TextConditioning:
        """Run the prompt encoder; when it was given as a loader, load it for this call only."""
        lazy = callable(self._prompt_encoder) and not hasattr(self._prompt_encoder, "encode")
        encoder = self._prompt_encoder() if lazy else self._prompt_encoder
        try:
            with torch.no_grad():
                return _as_conditioning(encoder.encode(prompts, images))
        finally:
            if lazy:
                del encoder
                _free_memory(self.device)

    # -- generation ------------------------------------------------------------------------------

    def target_size(self, image: Image.Image, resolution: str = "720p", height: Optional[int] = None,
                    width: Optional[int] = None) -> tuple[int, int]:
        """The official aspect-ratio bucket, or an explicit size (multiples of 16)."""
        if (height is None) != (width is None):
            raise InputError("give both --height and --width, or neither (then the resolution bucket decides)")
        if height is not None:
            return check_size(height, width)
        if resolution not in RESOLUTIONS:
            raise InputError(f"resolution must be one of {', '.join(RESOLUTIONS)}, got {resolution!r}")
        return bucket_for(image.width, image.height, resolution)

    @torch.no_grad()
    def __call__(
        self,
        image: Union[ImageSource, Sequence[ImageSource]],
        prompt: Union[str, Sequence[str]],
        *,
        negative_prompt: Optional[str] = None,
        resolution: Optional[str] = None,
        height: Optional[int] = None,
        width: Optional[int] = None,
        num_frames: Optional[int] = None,
        steps: Optional[int] = None,
        seed: Optional[int] = None,
        flow_shift: Optional[float] = None,
        stability: bool = False,
        guidance: Optional[float] = None,
        cfg_scale: Optional[float] = None,
        num_videos: int = 1,
        latents: Optional[Tensor] = None,
        output_type: str = "np",
        progress: bool = True,
        callback: Optional[Callable[[int, int, Tensor], None]] = None,
        vae_tiling: Optional[bool] = None,
    ) -> I2VOutput:
        """Generate ``num_videos`` videos for each (image, prompt) pair.

        ``latents`` replaces the initial noise ([N, C, T', H/8, W/8], before the stability blend).
        Seeds: video i uses ``seed + i`` (a random seed when None), so any single video can be re-made.
        """
        defaults = self.config.sampler
        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        if not prompts or any(not isinstance(p, str) or not p.strip() for p in prompts):
            raise InputError("the prompt is empty: describe the motion, e.g. \"the camera slowly zooms in\"")
        sources = [image] if isinstance(image, (str, Path, Image.Image)) else list(image)
        if len(sources) == 1 and len(prompts) > 1:
            sources = sources * len(prompts)
        if len(sources) != len(prompts):
            raise InputError(f"got {len(sources)} images for {len(prompts)} prompts: give one image, or one per prompt")
        if num_videos < 1:
            raise InputError(f"num_videos must be at least 1, got {num_videos}")
        if output_type not in ("np", "pt", "latent"):
            raise InputError(f"output_type must be 'np', 'pt' or 'latent', got {output_type!r}")
        if resolution is None and height is None and width is None and defaults.height is not None:
            height, width = defaults.height, defaults.width  # the model's own size (the demo model)
        resolution = resolution or defaults.resolution
        cfg_scale = defaults.cfg_scale if cfg_scale is None else float(cfg_scale)
        num_frames = check_num_frames(defaults.num_frames if num_frames is None else num_frames)
        steps = defaults.steps if steps is None else int(steps)
        if steps < 1:
            raise InputError(f"steps must be at least 1, got {steps}")
        if cfg_scale < 1.0:
            raise InputError(f"cfg_scale must be >= 1 (1 turns real CFG off), got {cfg_scale}")

        images = [load_image(s) for s in sources]
        sizes = {self.target_size(img, resolution, height, width) for img in images}
        if len(sizes) > 1:
            raise InputError(f"the images fall into different size buckets {sorted(sizes)}: pass --height/--width")
        (h, w), = sizes
        tcfg, vcfg = self.config.transformer, self.config.vae
        condition_type = tcfg.condition_type
        use_guidance = tcfg.guidance_embed
        guidance = (defaults.embedded_guidance if guidance is None else guidance) if use_guidance else None
        shift = flow_shift if flow_shift is not None else (defaults.stability_flow_shift if stability else defaults.flow_shift)
        use_cfg = cfg_scale > 1.0
        if negative_prompt is None:
            negative_prompt = DEFAULT_NEGATIVE_PROMPT if defaults.negative_prompt is None else defaults.negative_prompt
        negative = negative_prompt if use_cfg else None
        n_total = len(prompts) * num_videos
        base_seed = random.randint(0, 10**6) if seed is None else int(seed)
        seeds = [(base_seed + i) % (MAX_SEED + 1) for i in range(n_total)]
        settings = GenerationSettings(prompts, negative, h, w, num_frames, steps, shift, stability, guidance,
                                      cfg_scale, seeds, condition_type, self.name)
        lat_t, lat_h, lat_w = vcfg.latent_frames(num_frames), h // vcfg.spatial_compression, w // vcfg.spatial_compression
        shape = (n_total, vcfg.latent_channels, lat_t, lat_h, lat_w)
        if latents is not None and tuple(latents.shape) != shape:
            raise InputError(f"latents must have shape {shape}, got {tuple(latents.shape)}")

        # 1. prompts (the semantic image is the original picture; the negative pass sees a black one)
        bar = tqdm(total=2 if use_cfg else 1, desc="encoding prompts", disable=not progress)
        cond = self.encode_prompts(prompts, images)
        bar.update()
        uncond = None
        if use_cfg:
            uncond = self.encode_prompts([negative] * len(prompts), [black_image_like(i) for i in images])
            bar.update()
        bar.close()
        cond = _to(_repeat(cond, num_videos), self.device)
        uncond = _to(_repeat(uncond, num_videos), self.device) if uncond is not None else None

        # 2. the conditioning frame through the VAE (posterior mode, scaled)
        vae = self.vae
        pixels = torch.cat([image_to_tensor(resize_and_center_crop(img, h, w)) for img in images])
        # the official sampler encodes the reference frame before it turns tiling on (spec 3.4)
        image_latents = vae.encode(pixels.to(self.device, self.vae_dtype), tiled=False).float() * vcfg.scaling_factor
        image_latents = image_latents.repeat_interleave(num_videos, dim=0)

        # 3. noise, one generator per video so each seed reproduces its own video
        if latents is None:
            latents = torch.cat([
                torch.randn(shape[1:], generator=torch.Generator().manual_seed(s), dtype=torch.float32)[None]
                for s in seeds
            ])
        latents = latents.to(self.device, torch.float32)
        if stability:
            latents = 0.999 * latents + 0.001 * image_latents

        # 4. denoise
        sigmas = get_sigmas(steps, shift)
        g = guidance_tensor(guidance, n_total, device=self.device) if guidance is not None else None
        step_bar = tqdm(total=steps, desc="denoising", disable=not progress)

        def on_step(i: int, total: int, x: Tensor) -> None:
            step_bar.update()
            if callback is not None:
                callback(i, total, x)

        transformer = self.transformer
        try:
            latents = denoise(transformer, latents, image_latents, cond, sigmas, condition_type=condition_type,
                              guidance=g, uncond=uncond, cfg_scale=cfg_scale, callback=on_step)
        finally:
            step_bar.close()
        if output_type == "latent":
            return I2VOutput(None, latents, settings)

        # 5. decode, one video at a time
        videos = []
        for i in tqdm(range(n_total), desc="decoding", disable=not progress):
            x = vae.decode((latents[i:i + 1] / vcfg.scaling_factor).to(self.vae_dtype), tiled=vae_tiling)
            x = (x.float() / 2 + 0.5).clamp(0, 1).cpu()
            if condition_type == "latent_concat":
                x = x[:, :, 4:]  # the legacy model's first 4 frames are dropped (spec 1.2)
            videos.append(x)
        frames = torch.cat(videos)
        if output_type == "np":
            frames = (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
        return I2VOutput(frames, latents, settings)


def _to(c: TextConditioning, device: torch.device) -> TextConditioning:
    return TextConditioning(c.text_states.to(device), c.text_mask.to(device), c.text_states_2.to(device))


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _encoder_dtype(device: torch.device) -> torch.dtype:
    return torch.float16 if device.type == "cuda" else torch.float32


def _free_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def model_config_for(files) -> ModelConfig:
    """The ModelConfig of a model folder: the flat layout's model.json, else the preset matching the weights."""
    import dataclasses

    from .config import HUNYUAN_I2V_33CH, HUNYUAN_I2V_720P, model_config_from_dict
    from .weights import read_transformer_config

    if files.model_json is not None:
        return model_config_from_dict(files.model_json)
    transformer_config = read_transformer_config(files.transformer)
    base = HUNYUAN_I2V_33CH if transformer_config.condition_type == "latent_concat" else HUNYUAN_I2V_720P
    return dataclasses.replace(base, transformer=transformer_config)
