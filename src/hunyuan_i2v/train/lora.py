"""LoRA training (spec section 6): prepare a latent cache from captioned videos, then train low-rank adapters on the
official target modules of a frozen transformer with the flow-matching objective of :mod:`.dit`.

``prepare`` (:func:`prepare_lora_data`) works on any model folder ``generate`` opens (official ``ckpts/``,
diffusers, flat; :meth:`~..pipeline.I2VPipeline.from_pretrained` resolves it): it reads a folder of videos with
same-name ``.txt`` captions, or a JSON / CSV list of ``{video, caption}``; prepends an optional trigger word
("grayfade, the camera pans left"); takes each video's first ``frames`` frames from index 0 (every second frame at
50 fps and more, as the official extractor, spec 6.1); resizes and center-crops them to the model's size, or for a
model without one (the 13B model) the extractor's 360p bucket (:func:`training_bucket`); embeds the captions once
with the model's prompt encoder, which is then released, and encodes the clips with the model's VAE (posterior
mean x scaling factor, and frame 0 alone for token_replace), in the order ``generate`` uses its memory. A prompt
encoder that reads images (``reads_images``: the 13B model's LLaVA, the "semantic image", spec 6.3) gets each
clip's frame 0, and the caption and ``""`` are also encoded with a black image of the same size, for
semantic-image dropout; a text-only encoder (the tiny model's MiniLM) gives one embedding per caption. The output is
a latent cache in the format :mod:`.latents` writes, so the DiT trainer reads it too, with the model's config and
VAE in it and the model folder recorded as ``base_model`` (``train``'s default base). Encoding resumes after a kill.

``train`` (:class:`LoraTask`, driven by :func:`.common.run_training`): :class:`TrainableLoraAdapter` factors inside
:class:`hunyuan_i2v.lora.LoraLinear` wrappers on every linear layer whose name ends in one of
:data:`OFFICIAL_TARGETS` (spec 6.2: 325 layers of the 13B model), PEFT's "gaussian" init (down ~ N(0, 1/r), up = 0,
so training starts from the base model's output), the base weights frozen. Each step is the DiT step (spec 6.3,
the functions of :mod:`.dit`): lognorm timesteps with shift, token_replace with the clean first-frame latent and
the loss on frames 1.., prompt dropout to "" and, independently, semantic-image dropout to the black image (both
p = 0.1 officially; the second needs a cache with black-image variants). AdamW at 1e-4 with warm-up and gradient
clipping 1.0 (the official settings), or :class:`.optim.AdamW8bit` (8-bit moments, a quarter of the optimiser
state); optional bf16 autocast and gradient checkpointing. Checkpoints hold the adapters, the optimiser, the
samplers and generators, so a resumed run replays the same steps.

The frozen base can be held the way the memory engine holds it for inference (:func:`load_lora_base`): block
linears stored as int8 / fp8 codes (``weights_dtype``, dequantized per call; :class:`~..memory.quant.QuantizedLinear`
saves its codes, not a dequantized copy, for the backward pass), and the double/single blocks streamed
(``offload="blocks"``, :mod:`~..memory.offload`), which needs gradient checkpointing: the backward pass recomputes
each block and the streamer brings its weights in again for that. The adapters are attached after streaming
started, so they stay resident with their optimiser state. ``memory.planner.plan_lora_training`` predicts the
memory of such a run.

Progressive stages (``--stages 9:5,33:15``: frames : minutes, or ``HxWxFRAMES:200steps``) train short clips first:
a stage of fewer frames cuts the first 1 + (frames - 1) / 4 latent frames from the cache (exact with a causal VAE);
a stage of another size needs a cache of that size (give ``--data`` once per size).

The result is written in the official (kohya) format, ``lora.safetensors``, and in the diffusers format,
``lora_diffusers.safetensors``; both load with :func:`hunyuan_i2v.lora.read_lora` / ``generate --lora``.
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np
import torch
from torch import Tensor, nn

from ..errors import InputError
from ..lora import OFFICIAL_PREFIX, LoraLinear
from .common import EpochSampler, PathLike, atomic_write, write_json
from .dit import check_compatible, flow_matching_loss, flow_matching_pair, sample_cached, sample_timesteps
from .latents import (CACHE_FORMAT, CACHE_JSON, LatentCache, _encode_split, embed_captions,
                      embed_captions_with_images, load_latent_cache, reads_images)
from .optim import OPTIMIZERS, make_optimizer, optimizer_state_bytes
from .vae import MODEL_JSON, VAE_FILE

logger = logging.getLogger(__name__)

OFFICIAL_TARGETS = ("linear", "fc1", "fc2", "img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj",
                    "linear1", "linear2")
DEFAULT_RANK = 64  # spec 6.2: r = lora_alpha = 64
DEFAULT_ALPHA = 64.0
VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".gif", ".m4v")
KOHYA_FILE = "lora.safetensors"
DIFFUSERS_FILE = "lora_diffusers.safetensors"
RESULT_FILE = "lora_result.json"
ADAPTER_KEY = "trainable"


# ---------------------------------------------------------------------------------------------
# Data preparation


@dataclass(frozen=True)
class VideoItem:
    video: Path
    caption: str
    trigger: bool = True  # False: a regularisation clip, left without the trigger word


def with_trigger(caption: str, trigger: Optional[str]) -> str:
    """``"TRIGGER, caption"`` (the trigger word first, as in the official LoRA examples); unchanged without one."""
    caption = caption.strip()
    if not trigger:
        return caption
    trigger = trigger.strip()
    return f"{trigger}, {caption}" if caption else trigger


def list_videos(source: PathLike) -> list[VideoItem]:
    """The (video, caption) items of a folder (videos with same-name .txt files), a JSON list or a CSV file.

    JSON: a list of ``{"video": path, "caption": text}`` (also the official ``{"video_path", "raw_caption":
    {"long caption"}}``), or one such object per line; ``"trigger": false`` keeps an entry's caption without the
    trigger word (regularisation clips). CSV: a header with ``video`` and ``caption`` (and optionally ``trigger``)
    columns. Relative video paths are relative to the list file's folder.
    """
    source = Path(source)
    if source.is_dir():
        videos = sorted(p for p in source.iterdir() if p.suffix.lower() in VIDEO_EXTENSIONS)
        if not videos:
            raise InputError(f"{source} holds no videos ({', '.join(VIDEO_EXTENSIONS)})")
        missing = [v.name for v in videos if not v.with_suffix(".txt").is_file()]
        if missing:
            raise InputError(f"{len(missing)} video(s) in {source} have no same-name .txt caption, e.g. "
                             f"{missing[0]} needs {Path(missing[0]).with_suffix('.txt').name}")
        return [VideoItem(v, v.with_suffix(".txt").read_text(encoding="utf-8").strip()) for v in videos]
    if not source.is_file():
        raise InputError(f"training data {source} not found: give a folder of videos with .txt captions, "
                         "or a .json / .csv list of {video, caption}")
    text = source.read_text(encoding="utf-8")
    if source.suffix.lower() == ".csv":
        records = list(csv.DictReader(text.splitlines()))
    else:
        try:
            records = json.loads(text)
        except json.JSONDecodeError:
            try:
                records = [json.loads(line) for line in text.splitlines() if line.strip()]
            except json.JSONDecodeError as err:
                raise InputError(f"{source} is neither JSON nor JSON lines: {err}") from None
        if isinstance(records, dict):
            records = [records]
    items = []
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise InputError(f"{source}: entry {i} is not an object with video and caption")
        video = record.get("video") or record.get("video_path") or record.get("path")
        caption = record.get("caption", record.get("prompt"))
        if caption is None and isinstance(record.get("raw_caption"), dict):
            caption = record["raw_caption"].get("long caption")
        if not video or caption is None:
            raise InputError(f"{source}: entry {i} needs a 'video' and a 'caption', got keys {sorted(record)}")
        path = Path(video)
        trig = record.get("trigger", True)
        if isinstance(trig, str):
            trig = trig.strip().lower() not in ("0", "false", "no", "")
        items.append(VideoItem(path if path.is_absolute() else source.parent / path, str(caption).strip(),
                               bool(trig)))
    if not items:
        raise InputError(f"{source} lists no videos")
    return items


def clip_frames(video: np.ndarray, fps: float, frames: int) -> Optional[np.ndarray]:
    """The first ``frames`` frames from index 0, every second one at 50 fps and more (spec 6.1); None if too short."""
    stride = 2 if fps >= 50 else 1
    picked = video[::stride][:frames]
    return picked if len(picked) == frames else None


def fit_frames(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """Every frame resized (bilinear, antialiased) and center-cropped to ``height x width``: uint8 [T, h, w, 3]."""
    from PIL import Image

    from ..buckets import resize_and_center_crop

    if video.shape[1:3] == (height, width):
        return np.ascontiguousarray(video)
    return np.stack([np.asarray(resize_and_center_crop(Image.fromarray(f), height, width)) for f in video])


class _Clips:
    """The clips of a list of videos, decoded on demand (so encoding never holds every video in memory); looks
    like the uint8 [N, T, H, W, 3] array :func:`.latents._encode_split` indexes."""

    def __init__(self, videos: Sequence[Path], frames: int, height: int, width: int):
        self.videos, self.frames, self.height, self.width = list(videos), frames, height, width

    @property
    def shape(self) -> tuple[int, int, int, int, int]:
        return (len(self.videos), self.frames, self.height, self.width, 3)

    def __len__(self) -> int:
        return len(self.videos)

    def __getitem__(self, i: int) -> np.ndarray:
        from ..video import read_video

        video, fps, _ = read_video(self.videos[i], max_frames=2 * self.frames)
        clip = clip_frames(video, fps, self.frames)
        assert clip is not None, "lengths are checked before encoding"
        return fit_frames(clip, self.height, self.width)


def first_frame(path: Path, height: int, width: int):
    """Frame 0 of a video as the clip has it (resized and center-cropped): the semantic image, a PIL image."""
    from PIL import Image

    from ..video import read_video

    video, _, _ = read_video(path, max_frames=1)
    return Image.fromarray(fit_frames(video[:1], height, width)[0])


def _frame_count(path: Path, frames: int) -> tuple[int, float, tuple[int, int]]:
    """(frames available after the stride rule, fps, (height, width)) of a video, reading at most what a clip
    needs."""
    from ..video import read_video

    video, fps, _ = read_video(path, max_frames=2 * frames)
    return len(video[:: 2 if fps >= 50 else 1]), fps, tuple(video.shape[1:3])


TRAINING_BASE_SIZE = 480  # spec 6.1: the official extractor's target_size [480, 480], i.e. 360p buckets


def training_bucket(height: int, width: int, base_size: int = TRAINING_BASE_SIZE) -> tuple[int, int]:
    """The official LoRA extractor's ``(h, w)`` bucket for a ``height x width`` video (spec 6.1): the buckets of
    ``base_size`` in 16-px steps below 540 (else 32), the one whose w/h is closest (a plain argmin, not the
    inference rule of :func:`~..buckets.closest_bucket`)."""
    from ..buckets import generate_crop_size_list

    buckets = generate_crop_size_list(base_size, 16 if base_size < 540 else 32)
    return min(buckets, key=lambda b: abs(b[1] / b[0] - width / height))


@dataclass(frozen=True)
class _TextLayout:
    prompts: list[str]
    ids: dict[str, dict[str, list[int]]]  # {split: {"caption_ids"[, "empty_ids", "black_ids"]}}
    semantic: bool


def _embed_prompts(out: Path, rows: dict, items: dict, height: int, width: int, pipe, prompt_encoder,
                   progress: bool) -> _TextLayout:
    """The caption embeddings of the cache (text.safetensors): encoded now with the model's prompt encoder
    (loaded once, released before the VAE needs the memory), or kept from an interrupted run."""
    from .latents import TEXT_FILE, text_table_layout

    def frame0(split: str, i: int):
        return first_frame(items[split][i].video, height, width)

    def embed(encoder, semantic: bool) -> _TextLayout:
        if semantic:
            prompts, ids = embed_captions_with_images(out, rows, frame0, encoder, progress)
            return _TextLayout(prompts, ids, True)
        prompts, index = embed_captions(out, rows, pipe.config, encoder)
        return _TextLayout(prompts, {s: {"caption_ids": [index[x["caption"]] for x in r]} for s, r in rows.items()},
                           False)

    if (out / TEXT_FILE).is_file():
        semantic = text_table_layout(out / TEXT_FILE)
        if semantic is not None:
            return embed(None, semantic)  # an existing table is kept: nothing loads
        (out / TEXT_FILE).unlink()  # written before its layout was recorded: embed again
    session = contextlib.nullcontext(prompt_encoder) if prompt_encoder is not None else pipe.prompt_encoder_session()
    with session as encoder:
        layout = embed(encoder, reads_images(encoder))
    if not layout.semantic:
        logger.info("the prompt encoder ignores images: one embedding per caption, no black-image variants "
                    "(lora train --semantic-drop-p has no effect on this cache)")
    return layout


def _cache_vae(out: Path, files) -> None:
    """``out/vae.safetensors``, the model's VAE in the cache (the trainers decode evaluation videos with it): a
    copy of a flat folder's file, else the VAE's own weights (its stored dtype) saved in that format."""
    from ..weights import load_vae, save_vae

    if (out / VAE_FILE).is_file():
        return
    part = out / f".{VAE_FILE}.part"
    if files.layout == "flat":
        shutil.copyfile(files.vae, part)
    else:
        save_vae(load_vae(files.vae, device="cpu"), part, format="safetensors")
    part.replace(out / VAE_FILE)


def _check_vae(vae_config, config, root: Path) -> None:
    """The loaded VAE must make the latents the model config expects (a config given for a non-standard model)."""
    fields = ("latent_channels", "spatial_compression", "temporal_compression")
    got, want = ([getattr(c, f) for f in fields] for c in (vae_config, config.vae))
    if got != want:
        raise InputError(f"the VAE of {root} has (latent channels, spatial, temporal compression) {tuple(got)}, "
                         f"the model config {tuple(want)}: pass the model's own config")


def prepare_lora_data(
    source: PathLike,
    out: PathLike,
    model: Optional[PathLike] = None,
    *,
    trigger: Optional[str] = None,
    height: Optional[int] = None,
    width: Optional[int] = None,
    frames: Optional[int] = None,
    heldout: int = 0,
    batch: int = 2,
    resume: bool = False,
    progress: bool = True,
    prompt_encoder=None,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    config=None,
) -> dict:
    """Encode captioned videos into a latent cache folder ``out`` for :class:`LoraTask` (and the DiT trainer).

    ``model``: any model folder ``generate --model`` / :meth:`I2VPipeline.from_pretrained` opens (the official
    ``ckpts/``, a diffusers folder, our flat folder; default the bundled tiny model); its config, VAE and prompt
    encoder (LLaVA + CLIP for the 13B model, MiniLM for the tiny one) come from that loader. ``config`` overrides
    the detected ModelConfig, as for ``from_pretrained``. ``device``/``dtype``: where and in which dtype the prompt
    encoder and the VAE run (default fp16 on CUDA, fp32 elsewhere, as ``generate``); the prompt encoder runs
    first and is released before the VAE loads. ``height``/``width`` default to the model's fixed size, else the
    official extractor's 360p bucket of the first video (:func:`training_bucket`); ``frames`` to the model's
    frame count (4k+1). Videos shorter than ``frames`` are skipped with a warning. The last ``heldout`` videos
    form the held-out split. ``prompt_encoder``: ``encode(prompts, images) -> PromptEmbeds`` instead of the
    model's; with ``reads_images`` true it gets each clip's frame 0 (and a black image for the dropout variants).
    Returns the cache.json content.
    """
    from tqdm.auto import tqdm

    from ..buckets import check_num_frames, check_size
    from ..config import model_config_to_dict
    from ..pipeline import I2VPipeline

    out, files = Path(out), lora_model_files(model).require_complete()
    if (height is None) != (width is None):
        raise InputError("give both --height and --width, or neither (then the model's size is used)")
    if batch < 1 or heldout < 0:
        raise InputError(f"--batch must be >= 1 and --heldout >= 0, got {batch}, {heldout}")
    device = torch.device(device)
    pipe = I2VPipeline.from_pretrained(files.root, device=device, vae_dtype=dtype, text_dtype=dtype, config=config,
                                       prompt_cache=False)
    config = pipe.config
    sampler, multiple = config.sampler, config.vae.spatial_compression * config.transformer.patch_size[1]
    if height is None and sampler.height is not None:
        height, width = sampler.height, sampler.width
    if height is not None:
        height, width = check_size(height, width, multiple)
    frames = check_num_frames(frames or sampler.num_frames)
    if (out / CACHE_JSON).is_file():
        if not resume:
            raise InputError(f"{out} already holds a latent cache: pass --resume to keep it, or choose another --out")
        return json.loads((out / CACHE_JSON).read_text())
    if out.exists() and any(out.iterdir()) and not resume:
        raise InputError(f"{out} holds a partial cache: pass --resume to continue it, or choose another --out")
    recorded = json.loads(json.dumps(model_config_to_dict(config)))
    if (out / MODEL_JSON).is_file() and json.loads((out / MODEL_JSON).read_text()) != recorded:
        raise InputError(f"{out} was started with another model than {files.root}: resume it with the --model it "
                         "was started with, or choose another --out")
    items = list_videos(source)
    usable, first_size = [], None
    for item in tqdm(items, desc="checking videos", unit="video", disable=not progress):
        count, _, size = _frame_count(item.video, frames)
        if count < frames:
            logger.warning("skipping %s: %d frames, the clips need %d (try --frames %d)", item.video, count, frames,
                           max(1, (count - 1) // 4 * 4 + 1))
            continue
        first_size = first_size or size
        usable.append(VideoItem(item.video, with_trigger(item.caption, trigger if item.trigger else None)))
    if len(usable) <= heldout:
        raise InputError(f"{len(usable)} usable video(s) of {len(items)}, need more than --heldout {heldout}")
    if height is None:  # a model without a fixed size (the 13B one): the official extractor's 360p bucket
        height, width = check_size(*training_bucket(*first_size), multiple)
        logger.info("clips at %dx%d, the 360p bucket of %s's %dx%d (--height/--width choose another size)",
                    height, width, usable[0].video.name, *first_size)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / MODEL_JSON, recorded)
    split_items = {"train": usable[: len(usable) - heldout], "heldout": usable[len(usable) - heldout:]}
    rows = {split: [{"caption": it.caption, "kind": "real", "mirrored": False, "source_row": i, "speed_name": "",
                     "source": str(it.video)} for i, it in enumerate(chosen)]
            for split, chosen in split_items.items()}
    # the prompt encoder first, then the VAE: as in generate, the encoder's memory is free before the VAE loads
    text = _embed_prompts(out, rows, split_items, height, width, pipe, prompt_encoder, progress)
    _cache_vae(out, files)
    scaling = float(config.vae.scaling_factor)
    for split, chosen in split_items.items():
        if not chosen:
            _save_empty_split(out, split, config.vae, frames, height, width)
        elif not all((out / f"{split}_{name}.npy").is_file() for name in ("latents", "first")):
            vae = pipe.vae  # loaded on first use (a resumed run with every latent done loads none)
            _check_vae(vae.config, config, files.root)
            clips = _Clips([it.video for it in chosen], frames, height, width)
            _encode_split(vae, clips, rows[split], scaling, out, split, batch, progress, tqdm, 20.0)
    keys = ("caption", "kind", "mirrored", "source_row", "speed_name", "source")
    cache = {
        "format": CACHE_FORMAT,
        "scaling_factor": scaling,
        "latent_shape": list(np.load(out / "train_latents.npy", mmap_mode="r").shape[1:]),
        "dataset": str(Path(source).resolve()),
        "dataset_parameters": {"trigger": trigger, "height": height, "width": width, "frames": frames,
                               "videos": len(items), "skipped": len(items) - len(usable)},
        "base_model": str(files.root.resolve()),  # lora train's default base: any layout lora_model_files reads
        "base_layout": files.layout,
        "prompts": text.prompts,
        "semantic_images": text.semantic,
        "splits": {split: {"count": len(r), **{k: [x[k] for x in r] for k in keys}, **text.ids[split]}
                   for split, r in rows.items()},
    }
    write_json(out / CACHE_JSON, cache)
    logger.info("LoRA cache %s: %d train / %d held-out clips of %d frames at %dx%d", out, len(rows["train"]),
                len(rows["heldout"]), frames, height, width)
    return cache


def _save_empty_split(out: Path, split: str, vae_config, frames: int, height: int, width: int) -> None:
    c, s = vae_config.latent_channels, vae_config.spatial_compression
    t = vae_config.latent_frames(frames)
    for name, shape in (("latents", (0, c, t, height // s, width // s)), ("first", (0, c, 1, height // s, width // s))):
        path = out / f"{split}_{name}.npy"
        atomic_write(path, lambda tmp, shape=shape: np.save(open(tmp, "wb"), np.zeros(shape, np.float16)))


SUPPORTED_LAYOUTS = ("the official ckpts/ folder, a diffusers folder (transformer/, vae/, ...), our flat folder "
                     "(model.json, transformer.safetensors, vae.safetensors) or a folder of single-file safetensors")


def lora_model_files(model: Optional[PathLike]):
    """The :class:`~..layout.ModelFiles` of the model LoRA training works on: any folder ``generate --model``
    opens (:data:`SUPPORTED_LAYOUTS`); None: the bundled tiny model. Missing parts are left for the caller to
    require (prepare needs every part, train only the transformer)."""
    from ..layout import resolve_model_files

    if model is None:
        from ..cli import bundled_model_dir

        found = bundled_model_dir()
        if found is None:
            raise InputError("no bundled model in this install: pass --model MODEL (" + SUPPORTED_LAYOUTS + ")")
        model = found
    return resolve_model_files(model)


def lora_base_file(model: Optional[PathLike]) -> Path:
    """The transformer checkpoint of a model folder in any layout :func:`lora_model_files` reads."""
    files = lora_model_files(model)
    if files.transformer is None:
        raise InputError(f"{files.root} holds no transformer weights ({files.layout} layout, lacks "
                         f"{', '.join(files.missing)}): lora train takes {SUPPORTED_LAYOUTS}")
    return files.transformer


# ---------------------------------------------------------------------------------------------
# Trainable adapters


class TrainableLoraAdapter(nn.Module):
    """The trainable form of :class:`hunyuan_i2v.lora.LoraAdapter`: ``down [r, in]`` and ``up [out, r]`` are
    parameters, with PEFT's "gaussian" init (down ~ N(0, 1/r), up = 0: the wrapped layer starts as the base)."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float,
                 generator: Optional[torch.Generator] = None, device=None):
        super().__init__()
        self.down = nn.Parameter(torch.randn(rank, in_features, generator=generator).div_(rank).to(device))
        self.up = nn.Parameter(torch.zeros(out_features, rank, device=device))
        self.alpha_scale = alpha / rank
        self.scale = 1.0
        self.active = True

    def factors(self, x: Tensor) -> tuple[Tensor, Tensor]:
        return self.down.to(x.dtype), self.up.to(x.dtype)


def lora_target_modules(model: nn.Module, targets: Sequence[str] = OFFICIAL_TARGETS) -> list[str]:
    """Names of the linear layers (full precision or quantized) whose last name part is one of ``targets``
    (PEFT's suffix rule)."""
    from ..memory.quant import QuantizedLinear

    wanted = set(targets)
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Linear, QuantizedLinear)) and name.split(".")[-1] in wanted
            and not name.endswith(".base")]


def attach_trainable_loras(model: nn.Module, rank: int = DEFAULT_RANK, alpha: float = DEFAULT_ALPHA,
                           targets: Sequence[str] = OFFICIAL_TARGETS, seed: int = 0, device=None
                           ) -> dict[str, TrainableLoraAdapter]:
    """Freeze ``model`` and wrap every target layer with a trainable adapter; returns {module name: adapter}.

    ``device``: where the adapters live; default the layer's weights', and for a streamed block (meta placeholders
    between uses) the model's resident part's. With block streaming, attach after ``stream_transformer`` started:
    the streamer keeps placing the base weights, and the adapters stay resident.
    """
    from ..memory.offload import _first_device
    from ..memory.quant import _replace_module

    if rank < 1 or alpha <= 0:
        raise InputError(f"--rank must be >= 1 and --alpha > 0, got rank {rank}, alpha {alpha}")
    model.requires_grad_(False)
    generator = torch.Generator().manual_seed(seed)
    adapters = {}
    names = lora_target_modules(model, targets)
    if not names:
        raise InputError(f"no linear layer of the model ends in any of {', '.join(targets)}")
    resident = _first_device(model) or torch.device("cpu")
    for name in names:
        layer = model.get_submodule(name)
        wrapper = LoraLinear(layer)
        _replace_module(model, name, wrapper)
        where = device if device is not None else (resident if layer.weight.is_meta else layer.weight.device)
        adapter = TrainableLoraAdapter(layer.in_features, layer.out_features, rank, alpha, generator, where)
        wrapper.adapters[ADAPTER_KEY] = adapter
        adapters[name] = adapter
    return adapters


def kohya_state_dict(adapters: dict[str, TrainableLoraAdapter], alpha: float,
                     dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """The official trainer's file (spec 6.4): ``Hunyuan_video_I2V_lora_<module with _>.lora_down/up.weight`` and a
    scalar ``.alpha``, all in ``dtype`` (bf16 as the official files)."""
    out = {}
    for module, a in adapters.items():
        stem = OFFICIAL_PREFIX + module.replace(".", "_")
        out[f"{stem}.lora_down.weight"] = a.down.detach().to("cpu", dtype).contiguous()
        out[f"{stem}.lora_up.weight"] = a.up.detach().to("cpu", dtype).contiguous()
        out[f"{stem}.alpha"] = torch.tensor(float(alpha), dtype=dtype)
    return out


def diffusers_state_dict(adapters: dict[str, TrainableLoraAdapter], hidden_size: int,
                         dtype: torch.dtype = torch.bfloat16) -> dict[str, Tensor]:
    """The diffusers file: ``transformer.<diffusers module>.lora_A/B.weight``. Fused official layers split as
    diffusers splits them (``img_attn_qkv`` -> ``to_q/k/v``, ``linear1`` -> q, k, v, ``proj_mlp``): every part keeps
    the shared ``down`` and the rows of ``up`` its weight rows have. Alpha goes in the metadata."""
    from ..keymap import official_to_diffusers

    probe = torch.empty(hidden_size, 0)  # official_to_diffusers reads the hidden size from img_in's weight
    out = {}
    for module, a in adapters.items():
        down = a.down.detach().to("cpu", dtype).contiguous()
        parts = official_to_diffusers({"img_in.proj.weight": probe, f"{module}.weight": a.up.detach().to("cpu")})
        for key, up in parts.items():
            if key.startswith("x_embedder."):
                continue
            stem = "transformer." + key[: -len(".weight")]
            out[f"{stem}.lora_A.weight"] = down.clone()  # safetensors stores no shared tensors
            out[f"{stem}.lora_B.weight"] = up.to(dtype).contiguous()
    return out


def save_lora_files(adapters: dict[str, TrainableLoraAdapter], rank: int, alpha: float, hidden_size: int,
                    kohya_path: PathLike, diffusers_path: Optional[PathLike] = None,
                    metadata: Optional[dict[str, str]] = None) -> None:
    """Write the official (kohya) file and, optionally, the diffusers file, atomically."""
    from safetensors.torch import save_file

    meta = {k: str(v) for k, v in (metadata or {}).items()}
    kohya = kohya_state_dict(adapters, alpha)
    atomic_write(kohya_path, lambda tmp: save_file(kohya, str(tmp), metadata=meta or None))
    if diffusers_path is not None:
        info = {"r": rank, "lora_alpha": alpha, "target_modules": list(OFFICIAL_TARGETS)}
        dmeta = {**meta, "lora_adapter_metadata": json.dumps(info)}
        diff = diffusers_state_dict(adapters, hidden_size)
        atomic_write(diffusers_path, lambda tmp: save_file(diff, str(tmp), metadata=dmeta))


# ---------------------------------------------------------------------------------------------
# Progressive stages


@dataclass(frozen=True)
class Stage:
    """Train on ``frames``-frame clips at ``height x width`` (None: the cache's) for ``minutes`` or ``steps``."""

    frames: int
    height: Optional[int] = None
    width: Optional[int] = None
    minutes: Optional[float] = None
    steps: Optional[int] = None

    def describe(self) -> str:
        size = f"{self.height}x{self.width}x" if self.height else ""
        if self.steps is None and self.minutes is None:
            return f"{size}{self.frames} frames"
        length = f"{self.steps} steps" if self.steps is not None else f"{self.minutes:g} min"
        return f"{size}{self.frames} frames for {length}"


_STAGE = re.compile(r"^(?:(\d+)x(?:(\d+)x)?)?(\d+):(\d+(?:\.\d+)?)(m|min|steps?|st)?$")


def parse_stages(text: str) -> list[Stage]:
    """``"9:5,33:15"`` (frames : minutes), ``"64x9:5"`` (size x frames), ``"48x64x33:200steps"`` (h x w x frames)."""
    stages = []
    for part in (p.strip() for p in text.split(",") if p.strip()):
        m = _STAGE.match(part.replace(" ", ""))
        if not m:
            raise InputError(f"bad stage {part!r}: write FRAMES:MINUTES, SIZExFRAMES:MINUTES or HxWxFRAMES:MINUTES, "
                             "with :Nsteps for a step count, e.g. --stages 32x9:5,64x33:15")
        a, b, frames, amount, unit = m.groups()
        height, width = (int(a), int(b)) if b else ((int(a), int(a)) if a else (None, None))
        frames = int(frames)
        if (frames - 1) % 4:
            raise InputError(f"stage {part!r}: frames must be 4k+1, e.g. {frames // 4 * 4 + 1}")
        if unit and unit.startswith("st"):
            stages.append(Stage(frames, height, width, steps=int(float(amount))))
        else:
            stages.append(Stage(frames, height, width, minutes=float(amount)))
    if not stages:
        raise InputError("--stages is empty")
    if len({s.steps is None for s in stages}) > 1:
        raise InputError("--stages: give every stage in minutes or every stage in steps, not a mix")
    return stages


def stages_budget(stages: Sequence[Stage]) -> tuple[Optional[float], Optional[int]]:
    """(minutes, steps) that the stages add up to."""
    if stages[0].steps is not None:
        return None, sum(s.steps for s in stages)
    return sum(s.minutes for s in stages), None


# ---------------------------------------------------------------------------------------------
# The task


@dataclass
class LoraTrainSettings:
    rank: int = DEFAULT_RANK
    alpha: float = DEFAULT_ALPHA
    targets: tuple[str, ...] = OFFICIAL_TARGETS
    lr: float = 1e-4  # spec 6.3
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.0
    batch: int = 1
    shift: float = 3.0  # the official 7.0 is for 360p token counts; the tiny model's sampler uses 3 (see dit.py)
    prompt_dropout: float = 0.1
    semantic_drop_p: float = 0.1  # frame 0 -> black image for the prompt encoder (spec 6.3 --sematic-cond-drop-p)
    optimizer: str = "adamw"  # adamw, or adamw8bit (train/optim.py: 8-bit moments)
    grad_clip: float = 1.0
    grad_checkpointing: bool = False
    bf16: bool = False  # autocast the forward to bf16 (the LoRA factors and optimiser stay fp32)
    dtype: str = "fp32"  # the frozen base's compute dtype (fp32, bf16, fp16)
    weights_dtype: str = "auto"  # storage of its block linears: auto (= dtype), int8 or fp8 (quantized)
    offload: str = "none"  # none, or blocks: stream the double/single blocks (needs grad_checkpointing)
    offload_activations: bool = False  # keep the checkpointed block inputs in host memory (a GPU's relief)
    guidance: float = 6.0  # embedded guidance (x 1000) for models with guidance_in (spec 6.3); unused otherwise
    stages: tuple[Stage, ...] = ()
    val_clips: int = 8
    eval_videos: int = 2
    eval_steps: int = 10
    eval_cfg: Optional[float] = None
    seed: int = 0


def lora_loss(model: nn.Module, x0: Tensor, first: Tensor, noise: Tensor, t: Tensor,
              text: tuple[Tensor, Tensor, Tensor], guidance: Optional[Tensor] = None, bf16: bool = False,
              offload_activations: bool = False) -> Tensor:
    """The training loss of one batch (spec 6.3): x_t with the clean first-frame latent in frame 0, the model's
    velocity (bf16 autocast when asked), MSE against noise - x0 on frames 1.. . ``t`` in (0, 1).

    ``offload_activations``: what the forward saves for backward outside the checkpointed blocks, which with
    gradient checkpointing is mostly each block's input, waits in host memory (pinned for a GPU) and goes back to
    the device when the backward needs it (``torch.autograd.graph.save_on_cpu``); same numbers.
    """
    x_t, target = flow_matching_pair(x0, noise, t, first)
    guidance = None if guidance is None else guidance.to(x_t.device)
    saved = (torch.autograd.graph.save_on_cpu(pin_memory=x_t.device.type == "cuda") if offload_activations
             else contextlib.nullcontext())
    with saved, torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=bf16):
        pred = model(x_t, t * 1000.0, *text, guidance=guidance)
    return flow_matching_loss(pred, target)


_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
SEMANTIC_SEED_OFFSET = 7919
BASE_OFFLOADS = ("none", "blocks")


def check_base_options(settings: LoraTrainSettings) -> None:
    """The user errors of the base's dtype, storage and residency, before anything loads."""
    from ..memory import QUANTIZED_WEIGHTS, WEIGHTS_DTYPES

    if settings.dtype not in _DTYPES:
        raise InputError(f"--dtype must be one of {', '.join(_DTYPES)}, got {settings.dtype!r}")
    wd = settings.weights_dtype
    if wd not in WEIGHTS_DTYPES:
        raise InputError(f"--weights-dtype must be one of {', '.join(WEIGHTS_DTYPES)}, got {wd!r}")
    if wd not in ("auto", *QUANTIZED_WEIGHTS) and wd != settings.dtype:
        raise InputError(f"--weights-dtype {wd} differs from the base dtype {settings.dtype}: float weights are "
                         f"stored in the compute dtype; pass --dtype {wd} instead")
    if settings.offload not in BASE_OFFLOADS:
        raise InputError(f"--offload for training is one of {', '.join(BASE_OFFLOADS)}, got {settings.offload!r}")
    if settings.offload == "blocks" and not settings.grad_checkpointing:
        raise InputError("--offload blocks needs --grad-checkpointing: without it the backward pass would keep every "
                         "block's weights alive; add --grad-checkpointing")
    if settings.offload_activations and not settings.grad_checkpointing:
        raise InputError("--offload-activations moves the checkpointed block inputs to host memory; add "
                         "--grad-checkpointing (without it the activations stay inside the blocks)")


def _stored_quantization(path: Path) -> Optional[str]:
    """"int8" / "fp8" when a safetensors checkpoint holds quantized block linears (``memory.quant`` layout)."""
    from ..memory.offload import MappedSafetensors
    from ..memory.quant import quantized_layer_dtypes
    from ..memory.runtime import STREAMABLE_KINDS
    from ..weights import detect_checkpoint

    info = detect_checkpoint(path)
    if info.kind not in STREAMABLE_KINDS:
        return None
    files = MappedSafetensors(info.files)
    try:
        kinds = set(quantized_layer_dtypes({k: e.dtype for k, e in files.entries.items()}).values())
    finally:
        files.close()
    if len(kinds) > 1:
        raise InputError(f"{path} mixes {' and '.join(sorted(kinds))} layers; LoRA training takes one storage")
    return kinds.pop() if kinds else None


def load_lora_base(path: PathLike, config, device, dtype: torch.dtype, weights_dtype: str = "auto",
                   offload: str = "none"):
    """The frozen base transformer for LoRA training; returns (model, BlockStreamer or None).

    A full-precision checkpoint loads as the pipeline loads it (``memory.runtime.load_planned_transformer``):
    quantized on the host when ``weights_dtype`` is int8/fp8, streamed from the memory-mapped file (or, when
    quantized, from the host copy) with ``offload="blocks"``. A checkpoint written quantized (``save_quantized``, or
    shards in that layout) keeps its codes: streamed from the file, or read whole into memory.
    """
    from ..memory.offload import load_streamed_transformer, move_module
    from ..memory.planner import FLOAT_WEIGHTS, MemoryPlan
    from ..memory.quant import load_quantized
    from ..memory.runtime import load_planned_transformer
    from ..model.transformer import HunyuanVideoTransformer

    path, device = Path(path), torch.device(device)
    stored = _stored_quantization(path)
    if stored is None:
        native = next(n for n, d in FLOAT_WEIGHTS.items() if d == dtype)
        plan = MemoryPlan(offload, native if weights_dtype == "auto" else weights_dtype)
        return load_planned_transformer(path, config, device, dtype, plan)
    if weights_dtype not in ("auto", stored):
        raise InputError(f"{path} stores {stored} block weights; --weights-dtype {weights_dtype} would need the "
                         f"full-precision checkpoint: use --weights-dtype {stored} (or auto) with this file")
    if offload == "blocks":
        streamer = load_streamed_transformer(path, device, dtype, config=config)
        return streamer.model, streamer
    model = HunyuanVideoTransformer(config, device="meta", dtype=dtype)
    load_quantized(model, path)
    move_module(model.to(dtype), device)
    return model.eval(), None


class LoraTask:
    """LoRA training for :func:`~.common.run_training` (see the module docstring)."""

    name = "lora"

    def __init__(self, cache_dirs: Sequence[PathLike] | PathLike, model_dir: Optional[PathLike] = None,
                 settings: LoraTrainSettings = LoraTrainSettings(), device: str = "cpu", model: Optional[nn.Module] = None):
        """``model_dir``: the base model, any folder :func:`lora_model_files` reads (default: the model recorded in
        the cache); ``model``: a base transformer module to train on instead."""
        if settings.batch < 1:
            raise InputError(f"--batch must be at least 1, got {settings.batch}")
        probabilities = {"--prompt-dropout": settings.prompt_dropout, "--semantic-drop-p": settings.semantic_drop_p}
        for flag, p in probabilities.items():
            if not 0.0 <= p <= 1.0:
                raise InputError(f"{flag} is a probability in [0, 1], got {p}")
        if settings.optimizer not in OPTIMIZERS:
            raise InputError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}, got {settings.optimizer!r}")
        check_base_options(settings)
        if settings.offload_activations and torch.device(device).type == "cpu":
            raise InputError("--offload-activations frees device memory by keeping activations in host memory; on "
                             "the CPU they are there already: drop it, or train on a GPU (--device cuda)")
        self.settings = settings
        dirs = [cache_dirs] if isinstance(cache_dirs, (str, Path)) else list(cache_dirs)
        if not dirs:
            raise InputError("give at least one prepared cache (--data)")
        self.caches: list[LatentCache] = [load_latent_cache(d) for d in dirs]
        self.config = self.caches[0].config
        for cache in self.caches:
            check_compatible(self.config, cache)
        self.streamer = None  # a memory.offload.BlockStreamer when the blocks are streamed
        if model is None:
            if model_dir is None:  # the model the cache was prepared with, in whatever layout
                model_dir = self.caches[0].meta.get("base_model")
            self.base_file = lora_base_file(model_dir)
            model, self.streamer = load_lora_base(self.base_file, self.config.transformer, device,
                                                  _DTYPES[settings.dtype], settings.weights_dtype, settings.offload)
        else:
            self.base_file = None
        self.model = model
        self.adapters = attach_trainable_loras(self.model, settings.rank, settings.alpha, settings.targets,
                                               settings.seed)
        self.model.train().enable_gradient_checkpointing(settings.grad_checkpointing)
        self.params = [p for a in self.adapters.values() for p in a.parameters()]
        self.optimizer = make_optimizer(settings.optimizer, self.params, settings.lr, settings.betas, settings.eps,
                                        settings.weight_decay)
        self.stages = list(settings.stages) or [Stage(self._cache_frames(self.caches[0]))]
        self.stage_caches = [self._cache_for(s) for s in self.stages]
        self.samplers = [EpochSampler(len(c.splits["train"]), settings.seed + i) for i, c in enumerate(self.caches)]
        self.generator = torch.Generator().manual_seed(settings.seed)
        # semantic-image dropout draws from its own stream: the noise, timesteps and prompt dropout stay those of a
        # run without it, and the two dropouts are independent
        self.semantic_generator = torch.Generator().manual_seed(settings.seed + SEMANTIC_SEED_OFFSET)
        if settings.semantic_drop_p > 0:
            for cache in self.caches:
                if not cache.semantic_images:
                    logger.info("%s has one prompt embedding per caption (its prompt encoder ignores images, or it "
                                "was prepared before black-image variants were cached): --semantic-drop-p %g has no "
                                "effect on it", cache.root, settings.semantic_drop_p)
        self.steps_done, self.train_seconds = 0, 0.0
        self.samples_dir: Optional[Path] = None
        self._vae = None
        trainable = sum(p.numel() for p in self.params)
        logger.info("LoRA training: %d layers, rank %d, alpha %g, %.3fM trainable parameters; stages: %s",
                    len(self.adapters), settings.rank, settings.alpha, trainable / 1e6,
                    "; ".join(s.describe() for s in self.stages))

    # -- stages --------------------------------------------------------------------------------

    def _cache_frames(self, cache: LatentCache) -> int:
        t = cache.splits["train"].latents.shape[2]
        return (t - 1) * self.config.vae.temporal_compression + 1

    def _cache_for(self, stage: Stage) -> int:
        s = self.config.vae.spatial_compression
        for i, cache in enumerate(self.caches):
            h, w = cache.splits["train"].latents.shape[3:]
            if stage.height is not None and (h * s, w * s) != (stage.height, stage.width):
                continue
            if stage.frames > self._cache_frames(cache):
                continue
            return i
        sizes = ", ".join(f"{c.splits['train'].latents.shape[3] * s}x{c.splits['train'].latents.shape[4] * s}x"
                          f"{self._cache_frames(c)}" for c in self.caches)
        raise InputError(f"stage {stage.describe()} has no cache of that size with enough frames (have {sizes}): "
                         "prepare one (`hunyuan-i2v lora prepare ... --height H --width W --frames F`) and add "
                         "--data for it")

    def current_stage(self) -> int:
        """The stage for the next step: by steps done, or by training seconds spent (stages in minutes)."""
        done_steps, done_min = self.steps_done, self.train_seconds / 60.0
        for i, stage in enumerate(self.stages[:-1]):
            if stage.steps is not None:
                if done_steps < stage.steps:
                    return i
                done_steps -= stage.steps
            else:
                if done_min < stage.minutes:
                    return i
                done_min -= stage.minutes
        return len(self.stages) - 1

    def _batch(self, split: str, rows: Tensor, cache: LatentCache, frames: int) -> tuple[Tensor, Tensor]:
        keep = (frames - 1) // self.config.vae.temporal_compression + 1
        data = cache.splits[split]
        return data.latents[rows][:, :, :keep].float(), data.first[rows].float()

    # -- TrainTask -----------------------------------------------------------------------------

    def identity(self) -> dict:
        s = self.settings
        out = {"transformer": dataclasses.asdict(self.config.transformer),
               "base": str(self.base_file) if self.base_file else None,
               "rank": s.rank, "alpha": s.alpha, "targets": list(s.targets),
               "caches": [{"rows": len(c.splits["train"]), "shape": list(c.splits["train"].latents.shape[1:])}
                          for c in self.caches],
               "stages": [dataclasses.asdict(st) for st in self.stages]}
        if (s.dtype, s.weights_dtype) != ("fp32", "auto"):  # another base (streaming alone changes nothing)
            out["base_storage"] = [s.dtype, s.weights_dtype]
        if s.optimizer != "adamw":  # its state does not load into another optimiser
            out["optimizer"] = s.optimizer
        return out

    def prepare(self, run_dir: Path) -> None:
        write_json(run_dir / "run.json", {"caches": [str(c.root.resolve()) for c in self.caches],
                                          "base": str(self.base_file) if self.base_file else None,
                                          "settings": json.loads(json.dumps(dataclasses.asdict(self.settings),
                                                                            default=str))})
        self.samples_dir = run_dir / "eval"

    def _guidance(self, batch: int) -> Optional[Tensor]:
        if not self.config.transformer.guidance_embed:
            return None
        return torch.full((batch,), self.settings.guidance * 1000.0)

    def _forward(self, x_t: Tensor, t: Tensor, text: tuple[Tensor, Tensor, Tensor]) -> Tensor:
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16, enabled=self.settings.bf16):
            return self.model(x_t, t * 1000.0, *text, guidance=self._guidance(len(x_t)))

    def train_step(self, lr_scale: float) -> dict[str, float]:
        started = time.perf_counter()
        s, g = self.settings, self.generator
        stage_index = self.current_stage()
        stage = self.stages[stage_index]
        cache_index = self.stage_caches[stage_index]
        cache = self.caches[cache_index]
        idx = torch.from_numpy(self.samplers[cache_index].next(s.batch))
        x0, first = self._batch("train", idx, cache, stage.frames)
        device = next(iter(self.params)).device
        x0, first = x0.to(device), first.to(device)
        noise = torch.randn(x0.shape, generator=g).to(device)
        t = sample_timesteps(s.batch, s.shift, g).to(device)
        drop = torch.rand(s.batch, generator=g) < s.prompt_dropout
        blank = torch.rand(s.batch, generator=self.semantic_generator) < s.semantic_drop_p
        text_ids = cache.splits["train"].text_ids(idx, drop, blank)
        for group in self.optimizer.param_groups:
            group["lr"] = s.lr * lr_scale
        text = tuple(x.to(device) for x in cache.text(text_ids))
        loss = lora_loss(self.model, x0, first, noise, t, text, self._guidance(s.batch), s.bf16,
                         s.offload_activations)
        loss.backward()
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, s.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.steps_done += 1
        self.train_seconds += time.perf_counter() - started
        blanked = float(blank.float().mean()) if cache.semantic_images else 0.0
        return {"loss": float(loss.detach()), "grad_norm": float(grad_norm), "t": float(t.mean()),
                "stage": float(stage_index), "semantic_drop": blanked}

    def _val_rows(self) -> tuple[str, np.ndarray]:
        cache = self.caches[self.stage_caches[-1]]
        split = "heldout" if len(cache.splits["heldout"]) else "train"
        n = len(cache.splits[split])
        return split, np.unique(np.linspace(0, n - 1, min(n, self.settings.val_clips)).round()).astype(int)

    @torch.no_grad()
    def validation_loss(self) -> float:
        """Flow-matching loss of the final stage's clips at fixed (noise, t) pairs (held-out ones if any)."""
        cache, frames = self.caches[self.stage_caches[-1]], self.stages[-1].frames
        split, rows = self._val_rows()
        g = torch.Generator().manual_seed(1234)
        idx = torch.from_numpy(rows)
        x0, first = self._batch(split, idx, cache, frames)
        noise = torch.randn(x0.shape, generator=g)
        t = sample_timesteps(len(rows), self.settings.shift, g)
        x_t, target = flow_matching_pair(x0, noise, t, first)
        total = 0.0
        for i in range(len(rows)):  # one clip at a time: evaluation memory stays that of a training step
            pred = self._forward(x_t[i : i + 1], t[i : i + 1], cache.text(cache.splits[split].caption_ids[idx[i : i + 1]]))
            total += float(flow_matching_loss(pred, target[i : i + 1]))
        return total / len(rows)

    @property
    def vae(self):
        if self._vae is None:
            from ..weights import load_vae

            self._vae = load_vae(self.caches[0].root / VAE_FILE, dtype=torch.float32, device="cpu")
        return self._vae

    @torch.no_grad()
    def sample_videos(self, rows: Sequence[int], split: str, steps: int, cfg: float, seed: int = 4321) -> np.ndarray:
        """Videos generated from cached first frames and captions with the current LoRA; uint8 [N, T, H, W, 3]."""
        cache = self.caches[self.stage_caches[-1]]
        data = cache.splits[split]
        keep = (self.stages[-1].frames - 1) // self.config.vae.temporal_compression + 1
        videos = []
        for row in rows:
            idx = torch.tensor([row])
            shape = (1, *data.latents.shape[1:2], keep, *data.latents.shape[3:])
            noise = torch.randn(shape, generator=torch.Generator().manual_seed(seed + int(row)))
            videos.append(sample_cached(self.model, cache, data, idx, noise, steps, cfg,
                                        self.config.sampler.flow_shift, self._guidance(1), self.vae))
        return np.concatenate(videos)

    @torch.no_grad()
    def evaluate(self, step: int) -> dict[str, Any]:
        s = self.settings
        self.model.eval()
        try:
            metrics: dict[str, Any] = {"val_loss": self.validation_loss()}
            if s.eval_videos > 0 and s.eval_steps > 0:
                split, rows = self._val_rows()
                rows = rows[: s.eval_videos]
                cfg = self.config.sampler.cfg_scale if s.eval_cfg is None else s.eval_cfg
                videos = self.sample_videos(rows.tolist(), split, s.eval_steps, cfg)
                metrics["saturation_ratio"] = float(np.mean([saturation_ratio(v) for v in videos]))
                if self.samples_dir is not None:
                    _save_strip(self.samples_dir / f"step{step:07d}.png", videos)
        finally:
            self.model.train()
        return metrics

    def state_dict(self) -> dict:
        return {"adapters": {name: {"down": a.down.detach().clone(), "up": a.up.detach().clone()}
                             for name, a in self.adapters.items()},
                "optimizer": self.optimizer.state_dict(), "samplers": [sm.state_dict() for sm in self.samplers],
                "generator": self.generator.get_state(), "semantic_generator": self.semantic_generator.get_state(),
                "steps_done": self.steps_done, "train_seconds": self.train_seconds}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        for name, a in self.adapters.items():
            a.down.copy_(state["adapters"][name]["down"])
            a.up.copy_(state["adapters"][name]["up"])
        self.optimizer.load_state_dict(state["optimizer"])
        for sm, st in zip(self.samplers, state["samplers"]):
            sm.load_state_dict(st)
        self.generator.set_state(state["generator"])
        if "semantic_generator" in state:  # checkpoints from before semantic-image dropout continue from its seed
            self.semantic_generator.set_state(state["semantic_generator"])
        self.steps_done, self.train_seconds = int(state["steps_done"]), float(state["train_seconds"])

    def save(self, kohya_path: PathLike, diffusers_path: Optional[PathLike] = None, step: int = 0) -> None:
        s = self.settings
        meta = {"hunyuan_i2v_lora": json.dumps({"rank": s.rank, "alpha": s.alpha, "steps": step,
                                                "targets": list(s.targets)})}
        save_lora_files(self.adapters, s.rank, s.alpha, self.config.transformer.hidden_size, kohya_path,
                        diffusers_path, meta)

    def finish(self, run_dir: Path, step: int) -> dict[str, Any]:
        self.save(run_dir / KOHYA_FILE, run_dir / DIFFUSERS_FILE, step)
        metrics = self.evaluate(step)
        result = {"steps": step, "kohya": str(run_dir / KOHYA_FILE), "diffusers": str(run_dir / DIFFUSERS_FILE),
                  "size_bytes": (run_dir / KOHYA_FILE).stat().st_size, "optimizer": self.settings.optimizer,
                  "optimizer_state_bytes": optimizer_state_bytes(self.optimizer), **metrics}
        write_json(run_dir / RESULT_FILE, result)
        return result


# ---------------------------------------------------------------------------------------------
# Measuring a colour effect


def saturation(frames: np.ndarray) -> np.ndarray:
    """Mean HSV saturation (max - min) / max of each frame of uint8 [T, H, W, 3], in 0..1."""
    x = frames.astype(np.float32)
    high, low = x.max(axis=-1), x.min(axis=-1)
    sat = np.where(high > 0, (high - low) / np.maximum(high, 1e-6), 0.0)
    return sat.reshape(len(frames), -1).mean(axis=1)


def saturation_ratio(video: np.ndarray, last: int = 8) -> float:
    """Mean saturation of the last ``last`` frames over that of frame 0 (1: colour kept, 0: black and white)."""
    s = saturation(video)
    return float(s[-last:].mean() / max(s[0], 1e-6))


def _save_strip(path: Path, videos: np.ndarray) -> None:
    from PIL import Image

    path.parent.mkdir(parents=True, exist_ok=True)
    t = videos.shape[1]
    rows = [np.concatenate([v[0], v[t // 2], v[-1]], axis=1) for v in videos]
    atomic_write(path, lambda tmp: Image.fromarray(np.concatenate(rows, axis=0)).save(tmp, format="PNG"))


__all__ = [
    "LoraTask",
    "LoraTrainSettings",
    "OFFICIAL_TARGETS",
    "Stage",
    "TrainableLoraAdapter",
    "attach_trainable_loras",
    "check_base_options",
    "diffusers_state_dict",
    "first_frame",
    "kohya_state_dict",
    "list_videos",
    "load_lora_base",
    "lora_base_file",
    "lora_model_files",
    "lora_loss",
    "lora_target_modules",
    "parse_stages",
    "prepare_lora_data",
    "save_lora_files",
    "saturation_ratio",
    "training_bucket",
    "with_trigger",
]
