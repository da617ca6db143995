"""The latent cache: a built dataset encoded once by the trained VAE, plus the prompt embeddings, for DiT training.

For each split (``train``, ``heldout``) the cache holds, as fp16 scaled latents (posterior mean x scaling_factor):

* ``{split}_latents.npy`` [M, C, T', h, w]: the clips. In ``train``, rows N..2N-1 are the clips mirrored
  left-right (encoded from the mirrored pixels), whose kinds and captions swap left and right
  (:func:`.data.hflip_clip`, :func:`mirror_caption`).
* ``{split}_first.npy`` [M, C, 1, h, w]: frame 0 encoded *alone*, as the pipeline encodes the input image. The
  VAE's GroupNorm pools over all frames, so this differs slightly from latent frame 0 of the clip; it is what
  token_replace puts in frame 0 (the official trainer re-encodes frame 0 as an image for the same reason, spec
  section 6.3).

``text.safetensors`` holds the prompt embeddings of every unique caption (MiniLM by default), with ``""`` first
(row 0), for prompt dropout: ``text_states`` [U, L, D] fp16 (D = 384 for MiniLM), ``text_mask`` [U, L],
``text_states_2`` [U, D2] fp16. Its metadata entry ``semantic_images`` ("true" / "false") names the layout, so a
resumed ``lora prepare`` keeps the table without loading the encoder.

A prompt encoder that reads the clip's frame 0 as well (``reads_images``: the LLaVA "semantic image", spec 6.3)
makes per-clip embeddings (:func:`embed_captions_with_images`, written by ``lora prepare``): rows 0..U-1 are
``""`` and the unique captions with a black image of the clip size (row 0 is then the inference negative's
``""`` + black image), followed, for every clip of every split, by (caption, frame 0) and (``""``, frame 0).
``caption_ids`` point at the (caption, frame 0) rows, as the pipeline conditions at inference; ``empty_ids`` and
``black_ids`` in cache.json at the rows that prompt dropout and semantic-image dropout swap in, and
``"semantic_images": true`` marks the layout. Without it (a text-only encoder, or a cache from before this
layout) there is one embedding per caption and no black-image variant.
``cache.json`` (written last: its presence marks a complete cache) holds the per-row metadata (caption, caption
row, kind, mirrored, source row, speed name) and the scaling factor; ``model.json`` and ``vae.safetensors`` are
copied from the VAE run so the cache is self-contained.

Encoding resumes after a kill: rows are written into memory-mapped files and a progress file records how many
are on disk.
"""

from __future__ import annotations

import json
import logging
import re
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
from torch import Tensor

from ..config import ModelConfig
from ..errors import InputError
from . import data as D
from .common import PathLike, video_tensor, write_json
from .vae import MODEL_JSON, VAE_FILE, load_model_json

logger = logging.getLogger(__name__)

CACHE_JSON = "cache.json"
TEXT_FILE = "text.safetensors"
SEMANTIC_KEY = "semantic_images"  # text.safetensors metadata: "true" for the per-clip semantic-image layout
CACHE_FORMAT = 1
SPLITS = ("train", "heldout")

_SIDE = re.compile(r"\b(left|right)(wards?)?\b")


def mirror_caption(caption: str) -> str:
    """The caption of the left-right mirrored clip: 'left' <-> 'right' (also 'leftward(s)' and 'rightward(s)')."""
    return _SIDE.sub(lambda m: ("right" if m.group(1) == "left" else "left") + (m.group(2) or ""), caption)


def _rows(meta: dict[str, list], n: int, mirrored: bool) -> list[dict[str, Any]]:
    """Per-row metadata of one copy (original or mirrored) of a split."""
    rows = []
    for i in range(n):
        kind, caption = meta["kinds"][i], meta["captions"][i]
        if mirrored:
            kind, caption = D.flip_kind(kind), mirror_caption(caption)
        rows.append({"caption": caption, "kind": kind, "mirrored": mirrored, "source_row": i,
                     "speed_name": meta.get("speed_names", [""] * n)[i], "source": meta["sources"][i]})
    return rows


@torch.no_grad()
def encode_rows(vae, videos: np.ndarray, rows: Sequence[dict], scaling_factor: float) -> tuple[Tensor, Tensor]:
    """Scaled posterior means of the clips and of their frame 0 alone: ([B, C, T', h, w], [B, C, 1, h, w])."""
    clips = np.stack([D.hflip_clip(videos[r["source_row"]], r["kind"])[0] if r["mirrored"]
                      else videos[r["source_row"]] for r in rows])
    x = video_tensor(clips).to(vae.device, vae.dtype)
    latents = vae.encode(x, tiled=False).float() * scaling_factor
    first = vae.encode(x[:, :, :1], tiled=False).float() * scaling_factor
    return latents, first


def build_latent_cache(
    data_dir: PathLike,
    vae_dir: PathLike,
    out: PathLike,
    *,
    batch: int = 4,
    mirror: bool = True,
    resume: bool = False,
    progress: bool = True,
    prompt_encoder=None,
    save_every_s: float = 20.0,
) -> dict:
    """Encode the dataset at ``data_dir`` with the VAE run at ``vae_dir`` into the cache folder ``out``.

    ``prompt_encoder``: an object with ``encode(prompts) -> PromptEmbeds`` (default: MiniLM with the model's
    text length). Progress is saved every ``save_every_s`` seconds of encoding. Returns the cache.json content.
    """
    from tqdm.auto import tqdm

    from ..weights import load_vae

    data_dir, vae_dir, out = Path(data_dir), Path(vae_dir), Path(out)
    if batch < 1:
        raise InputError(f"--batch must be at least 1, got {batch}")
    if (out / CACHE_JSON).is_file():
        if not resume:
            raise InputError(f"{out} already holds a latent cache: pass --resume to keep it, or choose another --out")
        logger.info("%s is complete already", out)
        return json.loads((out / CACHE_JSON).read_text())
    if out.exists() and any(out.iterdir()) and not resume:
        raise InputError(f"{out} holds a partial latent cache: pass --resume to continue it, or choose another --out")
    for name in (VAE_FILE, MODEL_JSON):
        if not (vae_dir / name).is_file():
            raise InputError(f"{vae_dir} has no {name}: finish the VAE stage first (`python -m hunyuan_i2v.train vae`)")
    config = load_model_json(vae_dir / MODEL_JSON)
    scaling = float(config.vae.scaling_factor)
    manifest = json.loads((data_dir / "manifest.json").read_text()) if (data_dir / "manifest.json").is_file() else {}
    out.mkdir(parents=True, exist_ok=True)
    if not (out / VAE_FILE).is_file():
        shutil.copyfile(vae_dir / VAE_FILE, out / f".{VAE_FILE}.part")
        (out / f".{VAE_FILE}.part").replace(out / VAE_FILE)
    shutil.copyfile(vae_dir / MODEL_JSON, out / MODEL_JSON)
    vae = load_vae(out / VAE_FILE, dtype=torch.float32, device="cpu")

    splits: dict[str, list[dict]] = {}
    for split in SPLITS:
        videos, meta = D.load_split(data_dir, split)
        n = len(videos)
        rows = _rows(meta, n, False) + (_rows(meta, n, True) if mirror and split == "train" else [])
        splits[split] = rows
        _encode_split(vae, videos, rows, scaling, out, split, batch, progress, tqdm, save_every_s)
        del videos

    prompts, index = embed_captions(out, splits, config, prompt_encoder)

    first_latents = np.load(out / "train_latents.npy", mmap_mode="r")
    cache = {
        "format": CACHE_FORMAT,
        "scaling_factor": scaling,
        "latent_shape": list(first_latents.shape[1:]),
        "dataset": str(data_dir.resolve()),
        "dataset_parameters": manifest.get("parameters", {}),
        "vae_run": str(vae_dir.resolve()),
        "prompts": prompts,
        "splits": {split: {"count": len(rows), **{key: [r[key] for r in rows] for key in rows[0]},
                           "caption_ids": [index[r["caption"]] for r in rows]}
                   for split, rows in splits.items()},
    }
    write_json(out / CACHE_JSON, cache)
    logger.info("latent cache %s: %s", out, {s: len(r) for s, r in splits.items()})
    return cache


def _encode_split(vae, videos: np.ndarray, rows: list[dict], scaling: float, out: Path, split: str, batch: int,
                  progress: bool, tqdm, save_every_s: float) -> None:
    final_latents, final_first = out / f"{split}_latents.npy", out / f"{split}_first.npy"
    if final_latents.is_file() and final_first.is_file():
        return
    m = len(rows)
    c = vae.config.latent_channels
    t = vae.config.latent_frames(videos.shape[1])
    h, w = (s // vae.config.spatial_compression for s in videos.shape[2:4])
    shapes = {"latents": (m, c, t, h, w), "first": (m, c, 1, h, w)}
    partial = {k: out / f".{split}_{k}.partial.npy" for k in shapes}
    progress_file = out / f".{split}.progress.json"
    done = 0
    if progress_file.is_file() and all(p.is_file() for p in partial.values()):
        state = json.loads(progress_file.read_text())
        if state.get("shapes") == {k: list(v) for k, v in shapes.items()}:
            done = int(state["done"])
    mode = "r+" if done else "w+"
    arrays = {k: np.lib.format.open_memmap(partial[k], mode=mode, dtype=np.float16, shape=shapes[k]) for k in shapes}
    bar = tqdm(total=m, initial=done, desc=f"encoding {split}", unit="clip", disable=not progress)
    saved = time.monotonic()
    for start in range(done, m, batch):
        stop = min(m, start + batch)
        latents, first = encode_rows(vae, videos, rows[start:stop], scaling)
        arrays["latents"][start:stop] = latents.half().cpu().numpy()
        arrays["first"][start:stop] = first.half().cpu().numpy()
        bar.update(stop - start)
        if time.monotonic() - saved >= save_every_s or stop == m:
            for array in arrays.values():
                array.flush()  # rows on disk before the progress file says so
            write_json(progress_file, {"done": stop, "shapes": {k: list(v) for k, v in shapes.items()}})
            saved = time.monotonic()
    bar.close()
    del arrays
    partial["first"].replace(final_first)
    partial["latents"].replace(final_latents)
    progress_file.unlink()


@torch.no_grad()
def embed_captions(out: Path, splits: dict[str, list[dict]], config, prompt_encoder=None
                   ) -> tuple[list[str], dict[str, int]]:
    """The empty prompt and every distinct caption of the rows, embedded once into ``out/TEXT_FILE`` (an existing
    file is kept, for resumes); returns (prompts, caption -> prompt index)."""
    prompts = [""] + sorted({r["caption"] for rows in splits.values() for r in rows} - {""})
    if not (out / TEXT_FILE).is_file():
        encoder = prompt_encoder
        if encoder is None:
            from ..model.minilm import load_minilm_encoder

            encoder = load_minilm_encoder(max_length=config.text.text_len)
        _save_text(encoder, prompts, out / TEXT_FILE, layout={SEMANTIC_KEY: "false"})
    return prompts, {p: i for i, p in enumerate(prompts)}


def reads_images(encoder) -> bool:
    """Whether a prompt encoder's output depends on the image it is given (``encoder.reads_images``; an encoder
    without the attribute is taken as text-only, as the MiniLM one is)."""
    return bool(getattr(encoder, "reads_images", False))


@torch.no_grad()
def embed_captions_with_images(out: Path, splits: dict[str, list[dict]], image: Callable[[str, int], Any],
                               encoder, progress: bool = True) -> tuple[list[str], dict[str, dict[str, list[int]]]]:
    """The per-clip text table of an image-reading prompt encoder (module docstring) in ``out/TEXT_FILE`` (an
    existing file is kept, for resumes). ``image(split, i)``: frame 0 of row i of the split, a PIL image (one size
    for all). Returns (the prompt of every table row, {split: {"caption_ids", "empty_ids", "black_ids"}})."""
    from ..model.text import black_image_like

    unique = [""] + sorted({r["caption"] for rows in splits.values() for r in rows} - {""})
    index = {p: i for i, p in enumerate(unique)}
    prompts, sources = list(unique), [None] * len(unique)  # None: the black image
    ids: dict[str, dict[str, list[int]]] = {}
    for split, rows in splits.items():
        ids[split] = {"caption_ids": [], "empty_ids": [], "black_ids": []}
        for i, r in enumerate(rows):
            ids[split]["caption_ids"].append(len(prompts))
            ids[split]["empty_ids"].append(len(prompts) + 1)
            ids[split]["black_ids"].append(index[r["caption"]])
            prompts += [r["caption"], ""]
            sources += [(split, i), (split, i)]
    if not (out / TEXT_FILE).is_file():
        first = next((split, 0) for split, rows in splits.items() if rows)
        black = black_image_like(image(*first))
        last: dict[Any, Any] = {}

        def row_image(j: int):
            if sources[j] is None:
                return black
            if sources[j] not in last:  # each clip's frame 0 serves two consecutive rows
                last.clear()
                last[sources[j]] = image(*sources[j])
                if last[sources[j]].size != black.size:
                    raise InputError(f"frame 0 of {sources[j]} is {last[sources[j]].size}, the others "
                                     f"{black.size}: a cache holds one clip size")
            return last[sources[j]]

        _save_text(encoder, prompts, out / TEXT_FILE, chunk=16, images=row_image, progress=progress,
                   layout={SEMANTIC_KEY: "true"})
    return prompts, ids


def text_table_layout(path: Path) -> Optional[bool]:
    """Whether a text table holds the per-clip semantic-image layout (True) or one row per caption (False), from
    its metadata; None for a table written before the layout was recorded there."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        value = (f.metadata() or {}).get(SEMANTIC_KEY)
    return None if value is None else value == "true"


def _save_text(encoder, prompts: list[str], path: Path, chunk: int = 64,
               images: Optional[Callable[[int], Any]] = None, progress: bool = False,
               layout: Optional[dict[str, str]] = None) -> None:
    """Embed ``prompts`` (with ``images(row)`` when given) into ``path``; ``layout`` goes in its metadata."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    from .common import atomic_write

    parts = []
    bar = tqdm(total=len(prompts), desc="encoding prompts", unit="prompt", disable=not progress)
    for i in range(0, len(prompts), chunk):
        batch = prompts[i : i + chunk]
        if images is None:
            embeds = encoder.encode(batch)
        else:
            embeds = encoder.encode(batch, [images(j) for j in range(i, i + len(batch))])
        # to the host as fp16 at once: an encoder on a GPU keeps only one chunk's states there
        parts.append((embeds.text_states.to("cpu", torch.float16), embeds.text_mask.to("cpu", torch.int64),
                      embeds.text_states_2.to("cpu", torch.float16)))
        bar.update(len(batch))
    bar.close()
    states, mask, pooled = (torch.cat(column).contiguous() for column in zip(*parts))
    tensors = {"text_states": states, "text_mask": mask, "text_states_2": pooled}
    atomic_write(path, lambda tmp: save_file(tensors, str(tmp), metadata=layout))


@dataclass
class CacheSplit:
    """One split of a loaded cache."""

    latents: Tensor  # fp16 [M, C, T', h, w], scaled
    first: Tensor  # fp16 [M, C, 1, h, w], scaled, frame 0 encoded alone
    caption_ids: Tensor  # int64 [M], rows of the text tables
    captions: list[str]
    kinds: list[str]
    speed_names: list[str]
    mirrored: list[bool]
    empty_ids: Optional[Tensor] = None  # int64 [M]: "" with the row's frame 0 (None: row 0 for every row)
    black_ids: Optional[Tensor] = None  # int64 [M]: the caption with a black image (None: no such variant)

    def __len__(self) -> int:
        return len(self.latents)

    def text_ids(self, rows: Tensor, drop_prompt: Tensor, drop_image: Tensor) -> Tensor:
        """Text-table rows for ``rows``: the caption, or ``""`` where ``drop_prompt``; with the clip's frame 0,
        or a black image where ``drop_image`` (spec 6.3; only a cache with black-image variants has them, others
        ignore ``drop_image``)."""
        ids = self.caption_ids[rows]
        empty = self.empty_ids[rows] if self.empty_ids is not None else torch.zeros_like(ids)  # row 0 is ""
        ids = torch.where(drop_prompt, empty, ids)
        if self.black_ids is not None:
            black = torch.where(drop_prompt, torch.zeros_like(ids), self.black_ids[rows])  # row 0: "" + black
            ids = torch.where(drop_image, black, ids)
        return ids


@dataclass
class LatentCache:
    """A complete latent cache in memory (see the module docstring)."""

    root: Path
    config: ModelConfig
    scaling_factor: float
    splits: dict[str, CacheSplit]
    prompts: list[str]
    text_states: Tensor  # fp16 [U, L, D]
    text_mask: Tensor  # int64 [U, L]
    text_states_2: Tensor  # fp16 [U, D2]
    meta: dict
    semantic_images: bool = False  # the prompt embeddings read frame 0, with black-image variants (module doc)

    def text(self, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """(text_states fp32, text_mask, text_states_2 fp32) for caption rows ``ids``."""
        return self.text_states[ids].float(), self.text_mask[ids], self.text_states_2[ids].float()


def load_latent_cache(root: PathLike, splits: Sequence[str] = SPLITS) -> LatentCache:
    from safetensors.torch import load_file

    root = Path(root)
    if not (root / CACHE_JSON).is_file():
        raise InputError(f"{root} is not a complete latent cache (no {CACHE_JSON}): build or finish it with "
                         "`python -m hunyuan_i2v.train latents --data DATASET --vae VAE_RUN --out DIR --resume`")
    meta = json.loads((root / CACHE_JSON).read_text())
    if meta.get("format") != CACHE_FORMAT:
        raise InputError(f"{root} was written by another version of the cache format; rebuild it")
    semantic = bool(meta.get("semantic_images", False))
    loaded = {}
    for split in splits:
        info = meta["splits"][split]
        if semantic and not all(k in info for k in ("empty_ids", "black_ids")):
            raise InputError(f"{root}/{CACHE_JSON} marks semantic-image embeddings but split {split} lacks "
                             "empty_ids / black_ids: the cache is damaged; prepare it again")
        optional = {k: torch.tensor(info[k], dtype=torch.int64) for k in ("empty_ids", "black_ids") if semantic}
        loaded[split] = CacheSplit(
            latents=torch.from_numpy(np.load(root / f"{split}_latents.npy")),
            first=torch.from_numpy(np.load(root / f"{split}_first.npy")),
            caption_ids=torch.tensor(info["caption_ids"], dtype=torch.int64),
            captions=list(info["caption"]), kinds=list(info["kind"]), speed_names=list(info["speed_name"]),
            mirrored=[bool(v) for v in info["mirrored"]], **optional,
        )
    text = load_file(str(root / TEXT_FILE))
    if len(text["text_states"]) != len(meta["prompts"]):
        raise InputError(f"{root}: {TEXT_FILE} holds {len(text['text_states'])} prompt embeddings, {CACHE_JSON} "
                         f"lists {len(meta['prompts'])}: the cache is damaged; prepare it again")
    return LatentCache(root, load_model_json(root / MODEL_JSON), float(meta["scaling_factor"]), loaded,
                       list(meta["prompts"]), text["text_states"], text["text_mask"], text["text_states_2"], meta,
                       semantic)


__all__ = ["CacheSplit", "LatentCache", "build_latent_cache", "embed_captions_with_images", "encode_rows",
           "load_latent_cache", "mirror_caption", "reads_images"]
