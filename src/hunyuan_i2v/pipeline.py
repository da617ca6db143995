"""Image + prompt -> video: buckets, prompt encoding, VAE encoding, denoising, decoding (spec sections 2, 4, 8).

Memory order follows the official sampler: the prompt encoders are loaded, run and released before the
transformer needs the memory; the VAE decodes last, one video at a time, each chunk of frames going to the host as
soon as it is decoded. The memory options (``offload``, ``weights_dtype``, ``attention``, ``compile``,
``memory_budget``; see :mod:`hunyuan_i2v.memory.runtime` and docs/memory.md) change where the weights live, not
the order; with their defaults the pipeline computes exactly what it always did. Prompt embeddings are cached on
disk (:mod:`hunyuan_i2v.prompt_cache`).
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Optional, Protocol, Sequence, Union

import torch
from PIL import Image
from torch import Tensor
from tqdm.auto import tqdm

from .buckets import bucket_for, check_num_frames, check_size, resize_and_center_crop
from .cache import CachePolicy, CacheSettings, policy_for
from .config import DEFAULT_NEGATIVE_PROMPT, ModelConfig, TextEncoderConfig, TransformerConfig
from .errors import DeviceMemoryError, InputError
from .images import ImageSource, image_to_tensor, load_image
from .memory import planner
from .memory.runtime import MemoryOptions
from .model.text import black_image_like
from .prompt_cache import PromptCache, conditioning_rows, stack_rows
from .sampling import TextConditioning, denoise, get_sigmas, guidance_tensor

logger = logging.getLogger(__name__)

RESOLUTIONS = ("360p", "540p", "720p")
MAX_SEED = 2**32 - 1


class PromptEncoderLike(Protocol):
    """What the pipeline needs from a prompt encoder (LLaVA + CLIP, or a small one). An optional class attribute
    ``reads_images`` says whether the output depends on the images (True for LLaVA + CLIP, False for MiniLM);
    LoRA preparation reads it (``train.latents.reads_images``)."""

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
    cache: Optional[str] = None  # the step cache (hunyuan_i2v.cache), when one skipped steps

    def for_video(self, index: int) -> dict:
        d = asdict(self)
        d["prompt"] = self.prompts[index // max(1, len(self.seeds) // len(self.prompts))]
        d["seed"] = self.seeds[index]
        del d["prompts"], d["seeds"]
        return d


@dataclass(frozen=True)
class TransformerCheckpoint:
    """A transformer checkpoint for the pipeline to load when first needed, the way its memory options hold it."""

    path: Path
    config: Optional[TransformerConfig] = None


@dataclass(frozen=True)
class PromptEncoderFiles:
    """Prompt encoder folders for the pipeline to load for each encoding (on the device, or on the CPU when the
    memory plan says so) and release after it."""

    root: Path
    config: TextEncoderConfig
    dtype: Optional[torch.dtype] = None  # None: fp16 on CUDA, fp32 elsewhere

    def dtype_on(self, device: torch.device) -> torch.dtype:
        return self.dtype or _encoder_dtype(device)

    def load(self, device: torch.device) -> PromptEncoderLike:
        from .model.text import load_prompt_encoder

        return load_prompt_encoder(self.root, dtype=self.dtype_on(device), device=device, config=self.config)

    def folders(self) -> list[Path]:
        if self.config.kind == "minilm":
            from .model.minilm import minilm_dir

            return [minilm_dir(self.root)]
        from .model.text import find_text_encoder_dirs

        return sorted(set(find_text_encoder_dirs(self.root).values()))


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
    ``from_pretrained`` gives a :class:`TransformerCheckpoint` and :class:`PromptEncoderFiles` instead.

    Memory options (all off by default): ``offload`` "none" keeps every component on the device (the default,
    unless a budget's plan offloads), "model" one component at a time, "blocks" also streams the transformer's
    blocks; ``weights_dtype`` stores the block weights as "int8" / "fp8"
    (or names the float compute dtype); ``attention`` picks the backend ("auto", "sdpa", "chunked", "flash",
    "sage"); ``compile`` runs the blocks through torch.compile; ``memory_budget`` (GB) lets the planner choose
    what the others leave open, per call. ``prompt_cache``: a folder for cached prompt embeddings (default
    ``$HUNYUAN_I2V_PROMPT_CACHE`` or ``~/.cache/hunyuan-i2v/prompts``), False to turn it off;
    ``prompt_cache_id`` names an encoder that the pipeline cannot fingerprint itself (a loader function).

    LoRAs (docs/lora.md): ``loras=[(path or state dict, scale), ...]`` are checked against the model config now and
    applied when the transformer loads, merged into its weights (``lora_mode="merge"``) or run beside its layers
    (``"adapter"``; always with streamed blocks); :meth:`load_loras`, :meth:`set_lora_scales` and
    :meth:`unload_loras` change them later.
    """

    def __init__(
        self,
        config: ModelConfig,
        transformer: Any,
        vae: Any,
        prompt_encoder: Union[PromptEncoderLike, Callable[[], PromptEncoderLike], PromptEncoderFiles],
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        vae_dtype: Optional[torch.dtype] = None,
        name: Optional[str] = None,
        *,
        offload: Optional[str] = None,
        weights_dtype: str = "auto",
        attention: Optional[str] = None,
        compile: Union[bool, str] = False,
        memory_budget: Optional[float] = None,
        prompt_cache: Union[None, bool, str, Path] = None,
        prompt_cache_id: Optional[str] = None,
        loras: Sequence[Any] = (),
        lora_mode: str = "merge",
        parallel: Any = None,
    ):
        from .memory.runtime import compute_dtype, explicit_plan

        self.config = config
        self.parallel = parallel  # a hunyuan_i2v.parallel.Parallel when this is one process of a torchrun launch
        if parallel is not None:
            parallel.config.check_model(config.transformer.num_heads)
            device = parallel.device if device is None else device
        self.device = torch.device(device) if device is not None else _default_device()
        dtype = compute_dtype(weights_dtype, dtype)
        self.dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.vae_dtype = vae_dtype or (torch.float16 if self.device.type == "cuda" else torch.float32)
        self.name = name or config.name
        self.memory = MemoryOptions(offload, weights_dtype, attention, compile, memory_budget)
        self.memory.check(self.device, self.dtype)
        self._explicit = explicit_plan(self.memory, planner.Target(self.device.type, self.dtype).native_weights)
        self._transformer, self._vae, self._prompt_encoder = transformer, vae, prompt_encoder
        self._setup: Optional[planner.MemoryPlan] = None  # how the loaded transformer is held, once it is
        self._streamer = None
        self._offloader = None
        self._attention: Optional[str] = None  # what the transformer's backend was set from
        self._cache_root, self._cache_id = prompt_cache, prompt_cache_id
        self._prompt_caches: dict[bool, Optional[PromptCache]] = {}  # by "encoder on the CPU", opened on first use
        self._transformer_source = transformer  # what the transformer is (re)loaded from
        self._lora_specs, self._lora_mode = self._checked_loras(loras, lora_mode)
        self._applied_loras = None  # lora.AppliedLoras once applied to the loaded transformer
        self.model_dir: Optional[Path] = None  # from_pretrained's folder: the step-cache calibration lives there

    # -- construction ----------------------------------------------------------------------------

    @classmethod
    def from_pretrained(
        cls,
        path: Union[str, Path],
        device: Union[str, torch.device, None] = None,
        dtype: Optional[torch.dtype] = None,
        vae_dtype: Optional[torch.dtype] = None,
        config: Optional[ModelConfig] = None,
        text_dtype: Optional[torch.dtype] = None,
        **memory: Any,
    ) -> "I2VPipeline":
        """Open a model folder in the official ``ckpts/``, diffusers or flat layout (see :mod:`layout`).

        Files are checked now; weights load when first needed. ``config`` overrides the detected ModelConfig
        (needed only for non-standard models stored without one, e.g. a small model in the official layout).
        ``text_dtype``: the prompt encoders' dtype (default fp16 on CUDA, fp32 elsewhere).
        ``memory``: the keyword options of the constructor (offload, weights_dtype, attention, compile,
        memory_budget, prompt_cache, prompt_cache_id).
        """
        from .layout import resolve_model_files
        from .weights import load_vae

        files = resolve_model_files(path).require_complete()
        device = torch.device(device) if device is not None else _default_device()
        vae_dtype = vae_dtype or (torch.float16 if device.type == "cuda" else torch.float32)
        config = config or model_config_for(files)

        def vae():
            return load_vae(files.vae, dtype=vae_dtype, device=device)

        pipe = cls(config, TransformerCheckpoint(files.transformer, config.transformer), vae,
                   PromptEncoderFiles(files.text_root, config.text, text_dtype), device=device, dtype=dtype,
                   vae_dtype=vae_dtype, name=str(files.root), **memory)
        pipe.model_dir = Path(files.root)
        return pipe

    # -- lazily loaded components ----------------------------------------------------------------

    @property
    def transformer(self):
        """The transformer, loaded (and quantized, streamed, compiled as the memory options say) on first use."""
        if self._setup is None:
            self._prepare_transformer(self._explicit)
        return self._transformer

    def _prepare_transformer(self, plan: planner.MemoryPlan) -> None:
        from .memory import runtime

        source = self._transformer
        if isinstance(source, TransformerCheckpoint) and self._shards_weights:
            logger.info("loading the transformer, its block weights sharded over %d processes",
                        self.parallel.world_size)
            model, self._streamer = self.parallel.load_transformer(source.path, source.config, self.dtype), None
        elif isinstance(source, TransformerCheckpoint) and self.parallel is not None and \
                self.parallel.config.broadcast_weights:
            from .memory import QUANTIZED_WEIGHTS

            logger.info("loading the transformer: rank 0 reads it and sends it to the other processes")
            on_host = plan.offload != "none" or plan.weights_dtype in QUANTIZED_WEIGHTS  # as the local load holds it
            model = self.parallel.load_transformer(source.path, source.config, self.dtype,
                                                   device=torch.device("cpu") if on_host else None)
            model, self._streamer = runtime.place_transformer(model, self.device, plan)
        elif isinstance(source, TransformerCheckpoint):
            logger.info("loading the transformer")
            model, self._streamer = runtime.load_planned_transformer(source.path, source.config, self.device,
                                                                     self.dtype, plan)
        else:
            if callable(source) and not isinstance(source, torch.nn.Module):
                logger.info("loading the transformer")
                source = source()
            model, self._streamer = runtime.place_transformer(source, self.device, plan)
        self._apply_loras(model)
        if self.parallel is not None:
            self.parallel.attach(model)
        if self.memory.compile:
            runtime.compile_blocks(model, self.memory.compile)
        self._transformer = model
        self._setup = plan

    @property
    def vae(self):
        if callable(self._vae) and not isinstance(self._vae, torch.nn.Module):
            logger.info("loading the VAE")
            self._vae = self._vae()
        return self._vae

    def encode_prompts(self, prompts: list[str], images: list[Image.Image], *, on_cpu: bool = False
                       ) -> TextConditioning:
        """The prompt embeddings, from the cache when every pair is there, else from the encoder (the whole batch,
        as without a cache), which are then cached. An encoder given as a loader (or files) is loaded for this
        call only; ``on_cpu`` loads encoder files onto the CPU."""
        cache = self.prompt_cache(on_cpu)
        keys = [cache.key(p, im) for p, im in zip(prompts, images)] if cache else []
        rows = [cache.load(k) for k in keys]
        if cache and all(r is not None for r in rows):
            logger.info("prompt embeddings of %d prompt(s) from the cache %s", len(rows), cache.root)
            return stack_rows(rows, TextConditioning)
        cond = self._run_encoder(prompts, images, on_cpu)
        for key, row in zip(keys, conditioning_rows(cond)):
            cache.store(key, row)
        return cond

    @contextlib.contextmanager
    def prompt_encoder_session(self, *, on_cpu: bool = False) -> Iterator[PromptEncoderLike]:
        """The prompt encoder for many ``encode(prompts, images)`` calls (LoRA preparation embeds thousands): one
        given as files or a loader is loaded once (``on_cpu``: files onto the CPU) and released at exit, before
        anything else needs the memory; one given as an object is lent as it is. No prompt cache is involved."""
        encoder, lazy = self._load_encoder(on_cpu)
        try:
            yield encoder
        finally:
            if lazy:
                getattr(encoder, "release", lambda: None)()  # drops the models even while the caller holds `encoder`
                del encoder
                _free_memory(self.device)

    def _load_encoder(self, on_cpu: bool) -> tuple[PromptEncoderLike, bool]:
        """(the prompt encoder, whether it was loaded for this use and is to be released after it)."""
        source = self._prompt_encoder
        if isinstance(source, PromptEncoderFiles):
            return source.load(torch.device("cpu") if on_cpu else self.device), True
        lazy = callable(source) and not hasattr(source, "encode")
        return (source() if lazy else source), lazy

    def _run_encoder(self, prompts: list[str], images: list[Image.Image], on_cpu: bool) -> TextConditioning:
        encoder, lazy = self._load_encoder(on_cpu)
        try:
            with torch.no_grad():
                return _as_conditioning(encoder.encode(prompts, images))
        finally:
            if lazy:
                del encoder
                _free_memory(self.device)

    def prompt_cache(self, on_cpu: bool = False) -> Optional[PromptCache]:
        """The prompt embedding cache for the encoder on the device (or, for encoder files, on the CPU); None when
        the cache is off or the encoder cannot be identified."""
        if on_cpu not in self._prompt_caches:
            self._prompt_caches[on_cpu] = self._open_prompt_cache(on_cpu)
        return self._prompt_caches[on_cpu]

    def _open_prompt_cache(self, on_cpu: bool) -> Optional[PromptCache]:
        from . import prompt_cache as pc

        if self._cache_root is False:
            return None
        source, text = self._prompt_encoder, self.config.text
        if self._cache_id is not None:
            identity = pc.encoder_identity(text, id=self._cache_id)
        elif isinstance(source, PromptEncoderFiles):
            # the dtype follows where the encoder runs: the CPU (fp32) and the GPU (fp16) give different states
            device = torch.device("cpu") if on_cpu else self.device
            identity = pc.encoder_identity(text, files=pc.files_fingerprint(source.folders()),
                                           device=device.type, dtype=source.dtype_on(device))
        else:
            fingerprint = None if callable(source) and not hasattr(source, "encode") else \
                pc.modules_fingerprint(pc.torch_modules(source))
            if fingerprint is None:
                logger.info("prompt cache off: the prompt encoder cannot be fingerprinted; pass prompt_cache_id")
                return None
            identity = pc.encoder_identity(text, weights=fingerprint)
        root = None if self._cache_root in (None, True) else self._cache_root
        return pc.PromptCache(root, identity, text.text_len)

    # -- LoRAs -----------------------------------------------------------------------------------

    @property
    def loras(self) -> list[dict]:
        """The LoRAs in use, ``[{"name": file name, "scale": s}, ...]`` (what the CLI stores in the video)."""
        from .lora import lora_name

        return [{"name": lora_name(src, i), "scale": s} for i, (src, s) in enumerate(self._lora_specs)]

    @property
    def lora_mode(self) -> str:
        return self._lora_mode

    def load_loras(self, loras: Sequence[Any], mode: Optional[str] = None) -> None:
        """Use these LoRAs (``[(path or state dict, scale), ...]``) instead of the current ones; applied now if the
        transformer is loaded, else when it loads. ``mode``: "merge" or "adapter" (default: the current mode)."""
        specs, mode = self._checked_loras(loras, mode or self._lora_mode)
        self.unload_loras()
        self._lora_specs, self._lora_mode = specs, mode
        if self._setup is not None and self._applied_loras is None:
            self._apply_loras(self._transformer)

    def set_lora_scales(self, scales: Sequence[float]) -> None:
        """New scales, one per LoRA in load order. Immediate for adapters and for LoRAs merged into a transformer
        given as a module (its original weights are kept); a transformer loaded from a checkpoint is reloaded on
        next use instead (keeping 13B originals would double the weights in host memory)."""
        if len(scales) != len(self._lora_specs):
            raise InputError(f"{len(scales)} scale(s) for {len(self._lora_specs)} LoRA(s): give one per LoRA")
        self._lora_specs = [(src, float(s)) for (src, _), s in zip(self._lora_specs, scales)]
        if self._applied_loras is not None:
            if self._applied_loras.exact:
                self._applied_loras.set_scales(scales)
            else:
                self._unload_transformer()

    def unload_loras(self) -> None:
        """Back to the base model: adapters removed, merged LoRAs unmerged (or the transformer reloaded on next use,
        as for :meth:`set_lora_scales`)."""
        applied, self._applied_loras, self._lora_specs = self._applied_loras, None, []
        if applied is not None:
            if applied.exact:
                applied.remove()
            else:
                self._unload_transformer()

    def _checked_loras(self, loras: Sequence[Any], mode: str) -> tuple[list, str]:
        """Normalized (source, scale) pairs, every file checked to fit the model's config (headers only)."""
        from .lora import check_specs

        return check_specs(loras, mode, self.config.transformer)

    def _apply_loras(self, model) -> None:
        if not self._lora_specs:
            return
        from .lora import apply_loras

        mode = self._lora_mode
        if mode == "merge" and (self._streamer is not None or self._shards_weights):
            logger.info("the transformer blocks are streamed: the LoRAs run as adapters (merging needs the weights "
                        "in memory)")
            mode = "adapter"
        # a checkpoint can be reloaded, so merging keeps no host copy of the original weights
        keep = not isinstance(self._transformer_source, TransformerCheckpoint)
        self._applied_loras = apply_loras(model, self._lora_specs, mode, keep_originals=keep)

    def _unload_transformer(self) -> None:
        """Forget the loaded transformer; the next use loads it again from its checkpoint (with the current LoRAs)."""
        if self._streamer is not None:
            self._streamer.remove()
            self._streamer = None
        if self._offloader is not None and self._offloader.active is self._transformer:
            self._offloader.active = None
        self._transformer, self._setup, self._attention = self._transformer_source, None, None
        self._applied_loras = None
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
        cache: Union[None, str, CacheSettings, CachePolicy] = None,
        frame_sink: Optional[Callable[[int, Any, GenerationSettings], None]] = None,
    ) -> I2VOutput:
        """Generate ``num_videos`` videos for each (image, prompt) pair.

        ``latents`` replaces the initial noise ([N, C, T', H/8, W/8], before the stability blend).
        Seeds: video i uses ``seed + i`` (a random seed when None), so any single video can be re-made.
        ``cache``: step caching, "teacache" / "magcache" or a :class:`hunyuan_i2v.cache.CacheSettings` (threshold,
        speed target), calibrated by the model folder's step_cache.json; ``extras["step_cache"]`` then says which
        steps ran. None runs every step.
        ``frame_sink(video_index, frames, settings)`` receives each video's frames as uint8 numpy chunks
        [t, H, W, 3], in order, as soon as the VAE has made them final; the output then keeps no frames
        (``frames`` is None), so host memory does not grow with the video's length (feed a
        :class:`hunyuan_i2v.video.VideoWriter`). The chunks hold exactly the frames ``output_type="np"`` returns.
        """
        defaults = self.config.sampler
        progress = progress and (self.parallel is None or self.parallel.is_main)
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
        base_seed = self._from_main(lambda: random.randint(0, 10**6) if seed is None else int(seed))
        seeds = [(base_seed + i) % (MAX_SEED + 1) for i in range(n_total)]
        step_cache = policy_for(cache, self.model_dir, steps=steps, height=h, width=w, cfg=use_cfg)
        settings = GenerationSettings(prompts, negative, h, w, num_frames, steps, shift, stability, guidance,
                                      cfg_scale, seeds, condition_type, self.name,
                                      step_cache.describe() if step_cache is not None else None)
        lat_t, lat_h, lat_w = vcfg.latent_frames(num_frames), h // vcfg.spatial_compression, w // vcfg.spatial_compression
        shape = (n_total, vcfg.latent_channels, lat_t, lat_h, lat_w)
        if latents is not None and tuple(latents.shape) != shape:
            raise InputError(f"latents must have shape {shape}, got {tuple(latents.shape)}")

        negatives = [black_image_like(i) for i in images] if use_cfg else []
        work = planner.Workload(h, w, num_frames, n_total, use_cfg, len(prompts), steps, encode_prompts=not (
            self._cached(prompts, images) and (not use_cfg or self._cached([negative] * len(prompts), negatives))))
        plan = self._plan(work, vae_tiling)
        if self.parallel is not None:
            self.parallel.check_run(use_cfg, step_cache, plan)
        if step_cache is not None and step_cache.needs_indicator and plan.offload == "blocks":
            raise InputError(f"{step_cache.name} reads the first block's weights outside the block stack, which "
                             "block streaming keeps off the device: use --cache magcache, or --offload model")
        stage = "encoding the prompts"
        try:
            # 1. prompts (the semantic image is the original picture; the negative pass sees a black one)
            if work.encode_prompts:
                self._offload_all()
            bar = tqdm(total=2 if use_cfg else 1, desc="encoding prompts", disable=not progress)
            cond = self._from_main(lambda: self.encode_prompts(prompts, images, on_cpu=plan.text_on_cpu))
            bar.update()
            uncond = None
            if use_cfg:
                uncond = self._from_main(
                    lambda: self.encode_prompts([negative] * len(prompts), negatives, on_cpu=plan.text_on_cpu))
                bar.update()
            bar.close()
            cond = _to(_repeat(cond, num_videos), self.device)
            uncond = _to(_repeat(uncond, num_videos), self.device) if uncond is not None else None

            # 2. the conditioning frame through the VAE (posterior mode, scaled)
            stage = "encoding the image"

            def encode_image() -> Tensor:
                vae = self._on_device(self.vae, plan)
                pixels = torch.cat([image_to_tensor(resize_and_center_crop(img, h, w)) for img in images])
                # the official sampler encodes the reference frame before it turns tiling on (spec 3.4)
                return vae.encode(pixels.to(self.device, self.vae_dtype), tiled=False).float() * vcfg.scaling_factor

            image_latents = self._from_main(encode_image)
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
            stage = "denoising"
            sigmas = get_sigmas(steps, shift)
            g = guidance_tensor(guidance, n_total, device=self.device) if guidance is not None else None
            step_bar = tqdm(total=steps, desc="denoising", disable=not progress)

            def on_step(i: int, total: int, x: Tensor) -> None:
                step_bar.update()
                if callback is not None:
                    callback(i, total, x)

            transformer = self._on_device(self._planned_transformer(plan), plan)
            try:
                latents = denoise(transformer, latents, image_latents, cond, sigmas, condition_type=condition_type,
                                  guidance=g, uncond=uncond, cfg_scale=cfg_scale, callback=on_step, cache=step_cache,
                                  cfg_parallel=self.parallel.cfg if self.parallel is not None else None)
            finally:
                step_bar.close()
            extras = {"memory_plan": plan} if self.memory.memory_budget is not None else {}
            if step_cache is not None:
                extras["step_cache"] = step_cache.summary()
                logger.info("%s: %d of %d transformer passes computed (%.2fx)", step_cache.describe(),
                            step_cache.computed_passes, step_cache.passes, step_cache.speedup)
            tile_size, tile_frames = plan.vae_tile or (None, None)
            decode_kw = dict(tiled=vae_tiling, lean=plan.vae_lean, tile_sample_size=tile_size,
                             tile_sample_frames=tile_frames)
            shared = self._shares_vae_tiles((1, *shape[1:]), decode_kw)
            if output_type == "latent" or (self.parallel is not None and not self.parallel.is_main and not shared):
                return I2VOutput(None, latents, settings, extras)  # the VAE decodes on rank 0 only

            # 5. decode, one video at a time, each chunk of frames to the host as soon as it is final (with
            # several processes and several tiles, every process decodes a share of the tiles; rank 0 blends)
            stage = "decoding"
            vae = self._on_device(self.vae, plan)
            videos = []
            for i in tqdm(range(n_total), desc="decoding", disable=not progress):
                z = (latents[i:i + 1] / vcfg.scaling_factor).to(self.vae_dtype)
                if shared:
                    from .parallel.vae import decode_stream_parallel

                    chunks = decode_stream_parallel(vae, z, **decode_kw)  # the other ranks do their share here
                else:
                    chunks = vae.decode_stream(z, **decode_kw)
                if self.parallel is not None and not self.parallel.is_main:
                    continue  # this rank decoded its share of the tiles above; rank 0 has the video
                try:
                    if frame_sink is not None:
                        _stream_frames(i, chunks, 4 if condition_type == "latent_concat" else 0, frame_sink,
                                       settings)
                        continue
                    x = torch.cat([(c.float() / 2 + 0.5).clamp(0, 1).cpu() for c in chunks], dim=2)
                finally:
                    chunks.close()  # a stream left early tells the other ranks
                if condition_type == "latent_concat":
                    x = x[:, :, 4:]  # the legacy model's first 4 frames are dropped (spec 1.2)
                videos.append(x)
            if self.parallel is not None and not self.parallel.is_main:
                return I2VOutput(None, latents, settings, extras)
        except torch.cuda.OutOfMemoryError as exc:  # torch.OutOfMemoryError (the same class) from torch 2.5
            raise DeviceMemoryError(self._out_of_memory(stage, work, plan, vae_tiling)) from exc
        if frame_sink is not None:
            return I2VOutput(None, latents, settings, extras)
        frames = torch.cat(videos)
        if output_type == "np":
            frames = (frames * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1).numpy()
        return I2VOutput(frames, latents, settings, extras)

    # -- multi-process runs (hunyuan_i2v.parallel) ------------------------------------------------

    @property
    def _shards_weights(self) -> bool:
        return self.parallel is not None and self.parallel.config.shard_weights

    def _shares_vae_tiles(self, shape: tuple[int, ...], decode_kw: dict) -> bool:
        """Whether every process decodes a share of the VAE tiles of one video of latent ``shape`` (a
        multi-process run with parallel_vae, and more than one tile)."""
        if self.parallel is None or not self.parallel.config.parallel_vae:
            return False
        from .model.vae import decode_windows

        sizes = {k: decode_kw[k] for k in ("tiled", "tile_sample_size", "tile_sample_frames")}
        return len(decode_windows(self.config.vae, shape, **sizes)) > 1

    def _from_main(self, fn: Callable[[], Any]) -> Any:
        """fn(); in a multi-process run computed on rank 0 only (text encoders, VAE encoder) and sent to all."""
        return fn() if self.parallel is None else self.parallel.from_main(fn, self.device)

    # -- memory ----------------------------------------------------------------------------------

    def _cached(self, prompts: list[str], images: list[Image.Image]) -> bool:
        cache = self.prompt_cache(False)  # without a plan yet: the device encoder's entries
        return cache is not None and all(cache.contains(cache.key(p, im)) for p, im in zip(prompts, images))

    def _planner_target(self) -> planner.Target:
        return planner.Target.for_device(self.device.type, self.dtype, self.vae_dtype)

    def _planner_kw(self, vae_tiling: Optional[bool]) -> dict:
        from .prompt_cache import torch_modules

        source = self._prompt_encoder
        if isinstance(source, PromptEncoderFiles):
            params = planner.text_encoder_params(source.folders())
        else:
            params = sum(p.numel() for m in torch_modules(source) for p in m.parameters()) or None
        return dict(text_encoder_params=params, movable_encoder=isinstance(source, PromptEncoderFiles),
                    vae_tiling=vae_tiling)

    def _fixed(self) -> planner.Fixed:
        """The user's choices, and once the transformer is loaded, how it is held (that no longer changes)."""
        fixed = self.memory.fixed()
        if self._setup is not None:
            fixed = planner.Fixed(self._setup.offload, self._setup.weights_dtype, fixed.attention)
        return fixed

    def _plan(self, work: planner.Workload, vae_tiling: Optional[bool]) -> planner.MemoryPlan:
        """The memory plan of this call: the planner's with a budget, else the explicit options."""
        if self.memory.memory_budget is None:
            return self._setup or self._explicit
        plan = planner.plan_memory(self.config, work, self._planner_target(), self.memory.memory_budget,
                                   self._fixed(), **self._planner_kw(vae_tiling))
        logger.info("memory plan for %s GB: %s; predicted peaks %s", self.memory.memory_budget, plan.describe(),
                    ", ".join(f"{stage} {planner.format_size(b)}" for stage, b in plan.peaks))
        return plan

    def _planned_transformer(self, plan: planner.MemoryPlan):
        """The transformer, loaded the way the plan holds it, with the plan's attention and feed-forward chunks."""
        from .memory.runtime import set_attention

        if self._setup is None:
            self._prepare_transformer(plan)
        model = self._transformer
        if plan.attention != self._attention:
            set_attention(model, plan.attention)
            self._attention = plan.attention
        if self.memory.memory_budget is not None:
            model.set_ff_chunk_tokens(plan.ff_chunk_tokens)
        return model

    def _on_device(self, module, plan: planner.MemoryPlan):
        """With model offload (or block streaming), ``module`` becomes the one component on the device."""
        if plan.offload == "none":
            return module
        from .memory.offload import ModelOffloader

        if self._offloader is None:
            self._offloader = ModelOffloader(self.device)
        return self._offloader.activate(module)

    def _offload_all(self) -> None:
        if self._offloader is not None:
            self._offloader.offload()
            _free_memory(self.device)

    def _out_of_memory(self, stage: str, work: planner.Workload, plan: planner.MemoryPlan,
                       vae_tiling: Optional[bool]) -> str:
        from .memory.runtime import available_bytes, out_of_memory_message

        available = available_bytes(self.device)
        if self.memory.memory_budget is not None:
            budget = int(self.memory.memory_budget * planner.GB)
            available = budget if available is None else min(available, budget)
        target, kw = self._planner_target(), self._planner_kw(vae_tiling)
        failed = planner.evaluate(self.config, work, target, plan, **kw)
        # for the next run: the user's choices, not how this pipeline happens to hold the transformer
        better = planner.plan_after_oom(self.config, work, target, failed, available, self.memory.fixed(), **kw)
        return out_of_memory_message(self.device, stage, failed, better, available)


def _stream_frames(index: int, chunks, skip: int, sink: Callable, settings: GenerationSettings) -> None:
    """Decoder chunks [1, C, t, H, W] in [-1, 1] -> uint8 [t, H, W, 3] for ``sink``, less the first ``skip``
    frames; the same arithmetic as the non-streamed output, so the frames are identical."""
    for chunk in chunks:
        x = (chunk.float() / 2 + 0.5).clamp(0, 1).cpu()[0]
        drop = min(skip, x.shape[1])
        skip -= drop
        if drop < x.shape[1]:
            sink(index, (x[:, drop:] * 255).round().to(torch.uint8).permute(1, 2, 3, 0).numpy(), settings)


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
