"""hunyuan-i2v: a from-scratch, weight-compatible HunyuanVideo-I2V implementation.

Public API: :class:`I2VPipeline`, :func:`load_transformer`, :func:`load_vae`, the checkpoint converters and the
config presets. Names are imported on first use so that ``import hunyuan_i2v`` (and the CLI's error paths) stay fast.
"""

from __future__ import annotations

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "I2VPipeline": "pipeline",
    "I2VOutput": "pipeline",
    "load_transformer": "weights",
    "load_vae": "weights",
    "save_transformer": "weights",
    "save_vae": "weights",
    "convert_checkpoint": "weights",
    "detect_checkpoint": "weights",
    "HunyuanVideoTransformer": "model.transformer",
    "CausalVAE": "model.vae",
    "load_prompt_encoder": "model.text",
    "ModelConfig": "config",
    "TransformerConfig": "config",
    "VAEConfig": "config",
    "TextEncoderConfig": "config",
    "PRESETS": "config",
    "get_preset": "config",
}

__all__ = sorted(_EXPORTS) + ["__version__"]


def __getattr__(name: str):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'hunyuan_i2v' has no attribute {name!r}")
