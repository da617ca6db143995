"""Where the parts of a complete model live on disk, for every supported folder layout.

- ``official``: the ``ckpts/`` folder of ``huggingface-cli download tencent/HunyuanVideo-I2V`` (spec 1.10):
  ``hunyuan-video-i2v-720p/transformers/mp_rank_00_model_states.pt``, ``hunyuan-video-i2v-720p/vae/``,
  ``text_encoder_i2v/`` (LLaVA), ``text_encoder_2/`` (CLIP-L).
- ``diffusers``: ``hunyuanvideo-community/HunyuanVideo-I2V`` style: ``transformer/``, ``vae/``, ``text_encoder/``,
  ``tokenizer/``, ``image_processor/``, ``text_encoder_2/``, ``tokenizer_2/``, ``model_index.json``.
- ``flat``: our own single folder: ``model.json`` (the ModelConfig), ``transformer.safetensors``,
  ``vae.safetensors`` and the text encoder folders of either layout above (or ``text_encoder/`` for MiniLM).
- ``safetensors``: any folder of single-file safetensors (e.g. the files ComfyUI users share), recognised by
  their keys: one transformer file (either naming), one VAE file, and the text encoder folders of the official
  or diffusers layout beside them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

from .errors import ModelFilesError

DOWNLOAD_HINT = "download the weights with `hunyuan-i2v download --dest ckpts` and pass --model ckpts"

OFFICIAL_TRANSFORMER = "hunyuan-video-i2v-720p/transformers/mp_rank_00_model_states.pt"
OFFICIAL_VAE = "hunyuan-video-i2v-720p/vae"


@dataclass
class ModelFiles:
    """Resolved paths of one model folder; ``missing`` lists what is needed but absent."""

    root: Path
    layout: str
    transformer: Optional[Path] = None
    vae: Optional[Path] = None
    text_root: Optional[Path] = None  # what the prompt encoder loader is given
    missing: list[str] = field(default_factory=list)
    model_json: Optional[dict] = None

    def require_complete(self) -> "ModelFiles":
        if self.missing:
            listed = ", ".join(self.missing)
            raise ModelFilesError(f"model folder {self.root} ({self.layout} layout) lacks: {listed}; {DOWNLOAD_HINT}")
        return self


def _first_existing(root: Path, candidates: list[str]) -> Optional[Path]:
    for c in candidates:
        if (root / c).exists():
            return root / c
    return None


def resolve_model_files(root: str | Path) -> ModelFiles:
    """Detect the layout of a model folder and locate its parts (never raises for missing parts)."""
    root = Path(root).expanduser()
    if not root.exists():
        raise ModelFilesError(f"model folder not found: {root}; {DOWNLOAD_HINT}")
    if not root.is_dir():
        raise ModelFilesError(f"--model must be a folder, got the file {root}; {DOWNLOAD_HINT}")

    if (root / "model.json").is_file():
        files = ModelFiles(root, "flat", model_json=json.loads((root / "model.json").read_text()))
        files.transformer = _first_existing(root, ["transformer.safetensors"])
        files.vae = _first_existing(root, ["vae.safetensors"])
        files.text_root = root
        for name, path in (("transformer.safetensors", files.transformer), ("vae.safetensors", files.vae)):
            if path is None:
                files.missing.append(name)
        return files

    if (root / "model_index.json").is_file() or (root / "transformer").is_dir():
        files = ModelFiles(root, "diffusers")
        for part in ("transformer", "vae", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"):
            if not (root / part).is_dir():
                files.missing.append(f"{part}/")
        files.transformer = root / "transformer" if (root / "transformer").is_dir() else None
        files.vae = root / "vae" if (root / "vae").is_dir() else None
        files.text_root = root
        return files

    loose = sorted(root.glob("*.safetensors"))
    if loose and not (root / OFFICIAL_TRANSFORMER).exists():
        return _resolve_safetensors_folder(root, loose)

    files = ModelFiles(root, "official")
    files.transformer = _first_existing(root, [OFFICIAL_TRANSFORMER])
    files.vae = _first_existing(root, [OFFICIAL_VAE])
    files.text_root = root
    if files.transformer is None:
        files.missing.append(OFFICIAL_TRANSFORMER)
    if files.vae is None:
        files.missing.append(OFFICIAL_VAE + "/")
    for part in ("text_encoder_i2v", "text_encoder_2"):
        if not (root / part).is_dir():
            files.missing.append(f"{part}/")
    return files


def classify_safetensors(path: Path) -> Optional[str]:
    """'transformer', 'vae' or None, from a safetensors file's key names (its header only)."""
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except Exception:  # not a safetensors file we can read; the caller reports it as missing
        return None
    if any(k.startswith(("double_blocks.", "transformer_blocks.", "img_in.", "x_embedder.")) for k in keys):
        return "transformer"
    if any(k.startswith(("encoder.conv_in.", "decoder.conv_in.", "vae.encoder.")) for k in keys):
        return "vae"
    return None


def _resolve_safetensors_folder(root: Path, candidates: list[Path]) -> ModelFiles:
    files = ModelFiles(root, "safetensors", text_root=root)
    found: dict[str, list[Path]] = {"transformer": [], "vae": []}
    for path in candidates:
        kind = classify_safetensors(path)
        if kind:
            found[kind].append(path)
    for kind in ("transformer", "vae"):
        if len(found[kind]) == 1:
            setattr(files, kind, found[kind][0])
        elif not found[kind]:
            files.missing.append(f"a {kind} .safetensors file")
        else:
            names = ", ".join(p.name for p in found[kind])
            files.missing.append(f"exactly one {kind} file (found {names}: keep one)")
    official = all((root / p).is_dir() for p in ("text_encoder_i2v", "text_encoder_2"))
    diffusers = all((root / p).is_dir() for p in ("text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2"))
    if not (official or diffusers):
        files.missing.append("text encoders (text_encoder_i2v/ + text_encoder_2/, or the diffusers folders)")
    return files
