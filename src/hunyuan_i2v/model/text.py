"""Prompt encoders: the LLaVA MLLM (image + chat template) and the CLIP-L text model.

The transformer consumes two text inputs (spec section 2):

* ``text_states`` / ``text_mask``: hidden layer -3 of ``llava-llama-3-8b`` run on a chat template that holds the
  reference image, cropped to the (sub-sampled) image tokens followed by the user's prompt tokens;
* ``text_states_2``: the pooled CLIP-L text embedding of the raw prompt.

The official code relies on transformers 4.39, whose LLaVA expanded the single ``<image>`` placeholder into 576
embeddings inside the model. Newer transformers expect the input ids to hold one placeholder per image feature,
so :func:`expand_image_tokens` widens the ids first; every position then lines up with the official run
(hidden index = input index - 1 + 576 for tokens after the image).

The token-level functions (:func:`tokenize_prompts`, :func:`expand_image_tokens`, :func:`crop_mllm_states`) are
pure and need no model; the encoder classes wrap the Hugging Face models and own nothing else.
"""

from __future__ import annotations

import gc
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

import torch
from PIL import Image

from ..config import PromptTemplate, TextEncoderConfig
from ..errors import CheckpointError, InputError, ModelFilesError

logger = logging.getLogger(__name__)

PathLike = Union[str, Path]

# "<|eot_id|><|start_header_id|>assistant<|end_header_id|>": the assistant header in front of the final "\n\n",
# which the official crop drops (spec section 2.1).
ASSISTANT_HEADER_TOKENS = 4

IMAGE_TOKEN = "<image>"


# ---------------------------------------------------------------------------------------------
# Token-level functions


def tokenize_prompts(
    tokenizer, prompts: Sequence[str], template: PromptTemplate, text_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fill ``template`` with each prompt and tokenize to exactly ``text_len + crop_start`` tokens.

    Right padding and right truncation, as the official ``text2tokens`` (spec section 2.1). Returns int64
    ``input_ids`` and ``attention_mask``, both ``[B, text_len + crop_start]``.
    """
    if "{}" not in template.template:
        raise InputError("the prompt template needs a '{}' placeholder for the prompt")
    if getattr(tokenizer, "truncation_side", "right") != "right":
        raise InputError("the MLLM tokenizer must truncate on the right: set tokenizer.truncation_side = 'right'")
    if tokenizer.pad_token_id is None:
        raise InputError("the MLLM tokenizer has no pad token: set tokenizer.pad_token (e.g. to its eos token)")
    texts = [template.template.format(p) for p in prompts]
    max_length = text_len + template.crop_start
    enc = tokenizer(
        texts,
        max_length=max_length,
        padding="max_length",
        padding_side="right",
        truncation=True,
        return_attention_mask=True,
        return_tensors="pt",
    )
    input_ids, mask = enc["input_ids"].long(), enc["attention_mask"].long()

    # Only a row that fills the whole window can have been truncated; count its untruncated length to say so.
    full_rows = [i for i in range(len(texts)) if bool(mask[i].all())]
    if full_rows:
        lengths = [len(ids) for ids in tokenizer([texts[i] for i in full_rows], truncation=False)["input_ids"]]
        for i, n in zip(full_rows, lengths):
            if n > max_length:
                logger.warning(
                    "prompt %d is %d tokens too long for the MLLM (text_len %d); its end was cut off",
                    i, n - max_length, text_len,
                )
    return input_ids, mask


def expand_image_tokens(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, image_token_id: int, image_emb_len: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Repeat every ``<image>`` placeholder ``image_emb_len`` times, as a LLaVA processor does.

    Returns ``(input_ids, attention_mask, position_ids)`` widened by ``image_emb_len - 1`` per placeholder. The
    position ids are those transformers 4.39's LLaVA merge built: the running count of attended tokens, with
    every padded position set to 1 (this only matters for the hidden states of padding, which stay masked).
    """
    if image_emb_len < 1:
        raise InputError(f"image_emb_len must be positive, got {image_emb_len}")
    is_image = input_ids == image_token_id
    counts = is_image.sum(dim=1)
    if bool((counts != counts[0]).any()):
        raise InputError(f"every prompt needs the same number of {IMAGE_TOKEN} tokens, got {counts.tolist()}")
    batch = input_ids.shape[0]
    repeats = torch.where(is_image, image_emb_len, 1).flatten()
    ids = torch.repeat_interleave(input_ids.flatten(), repeats).view(batch, -1)
    mask = torch.repeat_interleave(attention_mask.flatten(), repeats).view(batch, -1)
    position_ids = (mask.long().cumsum(dim=-1) - 1).masked_fill(mask == 0, 1)
    return ids, mask, position_ids


def assistant_split_index(input_ids_row: torch.Tensor, template: PromptTemplate) -> int:
    """Input index ``p`` of the last "\\n\\n" token: the crop drops the 4 tokens before it (spec section 2.1).

    If truncation removed every "\\n\\n" after the user text starts, ``p`` is the sequence length, so the last 4
    tokens are dropped. This is the official rule applied to one row (the official code applies it to the
    whole batch, which breaks when rows hold different numbers of "\\n\\n").
    """
    hits = torch.nonzero(input_ids_row == template.double_return_token_id).flatten()
    hits = hits[hits >= template.crop_start]
    return int(hits[-1]) if hits.numel() else input_ids_row.shape[0]


def crop_mllm_states(
    hidden: torch.Tensor,
    input_ids: torch.Tensor,
    attention_mask: torch.Tensor,
    template: PromptTemplate,
    image_embed_interleave: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut the MLLM's hidden states into the transformer's text stream (spec section 2.1).

    ``hidden`` is ``[B, L - 1 + image_emb_len, D]`` (the image placeholder expanded); ``input_ids`` and
    ``attention_mask`` are the unexpanded ``[B, L]`` tokenizer outputs. Returns ``(states, mask)`` of
    ``[B, ceil(image_emb_len / interleave) + L - crop_start - 4, ...]``: the image tokens ``[start:end]`` taken
    every ``interleave``-th (mask ones), then the prompt tokens, the final "\\n\\n" and the padding, with the
    assistant header removed.
    """
    t = template
    batch, length = input_ids.shape
    if image_embed_interleave < 1:
        raise InputError(f"image_embed_interleave must be a positive integer, got {image_embed_interleave}")
    if t.image_emb_end - t.image_emb_start != t.image_emb_len:
        raise InputError(
            f"template image span [{t.image_emb_start}, {t.image_emb_end}) does not hold image_emb_len "
            f"{t.image_emb_len} tokens"
        )
    if hidden.shape[:2] != (batch, length - 1 + t.image_emb_len):
        raise InputError(
            f"hidden states {tuple(hidden.shape[:2])} do not match {length} input tokens with one image of "
            f"{t.image_emb_len} tokens: expected ({batch}, {length - 1 + t.image_emb_len})"
        )
    if attention_mask.shape != input_ids.shape:
        raise InputError(f"attention_mask {tuple(attention_mask.shape)} != input_ids {tuple(input_ids.shape)}")

    shift = t.image_emb_len - 1  # hidden index = input index + shift, for every token after the image
    text_start = t.crop_start + shift
    image = hidden[:, t.image_emb_start : t.image_emb_end : image_embed_interleave]
    image_mask = attention_mask.new_ones(batch, image.shape[1])

    text, text_mask = [], []
    for i in range(batch):
        p = assistant_split_index(input_ids[i], t)
        cut = p - ASSISTANT_HEADER_TOKENS
        text.append(torch.cat([hidden[i, text_start : cut + shift], hidden[i, p + shift :]]))
        text_mask.append(torch.cat([attention_mask[i, t.crop_start : cut], attention_mask[i, p:]]))
    states = torch.cat([image, torch.stack(text)], dim=1)
    mask = torch.cat([image_mask, torch.stack(text_mask)], dim=1)
    return states, mask


def check_template(tokenizer, template: PromptTemplate, image_token_id: int) -> None:
    """Check the template's token positions against the tokenizer, before any model runs.

    The crop trusts ``crop_start`` and ``image_emb_start``; a tokenizer that splits the template differently
    would silently crop the wrong tokens.
    """
    prefix = template.template.split("{}", 1)[0]
    ids = tokenizer(prefix)["input_ids"]
    if len(ids) != template.crop_start:
        raise InputError(
            f"the template has {len(ids)} tokens before the prompt with this tokenizer, but crop_start is "
            f"{template.crop_start}: use a PromptTemplate with crop_start={len(ids)} or the Llama-3 tokenizer"
        )
    image_slots = [i for i, tok in enumerate(ids) if tok == image_token_id]
    if image_slots != [template.image_emb_start]:
        raise InputError(
            f"the template's {IMAGE_TOKEN} token (id {image_token_id}) sits at token index {image_slots}, expected "
            f"exactly one at image_emb_start {template.image_emb_start}: check the tokenizer has {IMAGE_TOKEN} "
            "as a special token matching the model config's image_token_id"
        )


def black_image_like(image: Image.Image) -> Image.Image:
    """The unconditional (negative) branch's image: black, same size (spec section 2.1)."""
    return Image.new("RGB", image.size)


# ---------------------------------------------------------------------------------------------
# Encoders


def _model_device_dtype(model: torch.nn.Module) -> tuple[torch.device, torch.dtype]:
    p = next(model.parameters())
    return p.device, p.dtype


class MLLMEncoder:
    """``llava-llama-3-8b`` turning (prompt, reference image) pairs into the transformer's text stream."""

    def __init__(
        self,
        model,  # LlavaForConditionalGeneration or its LlavaModel
        tokenizer,
        image_processor,
        template: PromptTemplate,
        text_len: int = 256,
        hidden_state_skip_layer: int = 2,
        image_embed_interleave: int = 4,
        image_token_id: Optional[int] = None,
    ):
        from transformers import LlavaForConditionalGeneration

        # Only the hidden states are needed: keep the LlavaModel and skip the 128k-vocabulary lm_head.
        if isinstance(model, LlavaForConditionalGeneration):
            model = model.model
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.image_processor = image_processor
        self.template = template
        self.text_len = text_len
        self.hidden_state_skip_layer = hidden_state_skip_layer
        self.image_embed_interleave = image_embed_interleave
        if image_embed_interleave < 1:
            raise InputError(f"image_embed_interleave must be a positive integer, got {image_embed_interleave}")

        if tokenizer.pad_token is None:
            # Padding is masked out; the eos token is as good a filler as any.
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "right"
        tokenizer.truncation_side = "right"

        config = self.model.config
        if image_token_id is None:
            image_token_id = getattr(config, "image_token_id", None)
            if image_token_id is None:
                image_token_id = getattr(config, "image_token_index", None)
        if image_token_id is None:
            image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.image_token_id = int(image_token_id)

        n_image = _vision_token_count(config)
        if n_image != template.image_emb_len:
            raise CheckpointError(
                f"the vision tower yields {n_image} image tokens but the template expects "
                f"image_emb_len {template.image_emb_len}"
            )
        n_layers = config.text_config.num_hidden_layers
        if not 0 <= hidden_state_skip_layer < n_layers:
            raise InputError(f"hidden_state_skip_layer must be in [0, {n_layers}), got {hidden_state_skip_layer}")
        check_template(tokenizer, template, self.image_token_id)

    @property
    def device(self) -> torch.device:
        return _model_device_dtype(self.model)[0]

    @property
    def dtype(self) -> torch.dtype:
        return _model_device_dtype(self.model)[1]

    @property
    def num_tokens(self) -> int:
        """Length of the output sequence: sub-sampled image tokens + ``text_len - 4`` text tokens."""
        n_image = -(-self.template.image_emb_len // self.image_embed_interleave)
        return n_image + self.text_len - ASSISTANT_HEADER_TOKENS

    def pixel_values(self, images: Sequence[Image.Image]) -> torch.Tensor:
        """CLIP preprocessing: shortest-side resize, centre crop, normalise (336 x 336 for the real model)."""
        return self.image_processor(list(images), return_tensors="pt")["pixel_values"]

    @torch.inference_mode()
    def encode(
        self, prompts: Sequence[str], images: Sequence[Image.Image]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Encode one reference image per prompt. Returns ``states [B, N, D]`` (model dtype) and ``mask [B, N]``."""
        prompts, images = _as_list(prompts), _as_list(images)
        if len(prompts) != len(images):
            raise InputError(f"need one image per prompt, got {len(prompts)} prompts and {len(images)} images")
        if not prompts:
            raise InputError("no prompts to encode")
        device, dtype = self.device, self.dtype
        input_ids, mask = tokenize_prompts(self.tokenizer, prompts, self.template, self.text_len)
        ids, llm_mask, position_ids = expand_image_tokens(
            input_ids, mask, self.image_token_id, self.template.image_emb_len
        )
        out = self.model(
            input_ids=ids.to(device),
            attention_mask=llm_mask.to(device),
            position_ids=position_ids.to(device),
            pixel_values=self.pixel_values(images).to(device, dtype),
            output_hidden_states=True,
            use_cache=False,
        )
        # Layer -(skip + 1) without the final norm (spec section 2.1: apply_final_norm is False). transformers
        # 4.39 also zeroed the input embeddings of padding; that changes only padded (masked) positions.
        hidden = out.hidden_states[-(self.hidden_state_skip_layer + 1)]
        return crop_mllm_states(
            hidden, input_ids.to(device), mask.to(device), self.template, self.image_embed_interleave
        )


def _vision_token_count(llava_config) -> int:
    vision = llava_config.vision_config
    patches = (vision.image_size // vision.patch_size) ** 2
    # "default" drops the CLS token, "full" keeps it.
    return patches + (0 if llava_config.vision_feature_select_strategy == "default" else 1)


class CLIPTextEncoder:
    """CLIP-L text model giving the pooled prompt vector (spec section 2.2)."""

    def __init__(self, model, tokenizer, max_length: int = 77):
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer
        self.max_length = max_length

    @property
    def device(self) -> torch.device:
        return _model_device_dtype(self.model)[0]

    @property
    def dtype(self) -> torch.dtype:
        return _model_device_dtype(self.model)[1]

    @torch.inference_mode()
    def encode(self, prompts: Sequence[str]) -> torch.Tensor:
        """``pooler_output [B, hidden]`` (the EOS token after the final layer norm) of the raw prompts."""
        prompts = _as_list(prompts)
        if not prompts:
            raise InputError("no prompts to encode")
        enc = self.tokenizer(
            prompts,
            max_length=self.max_length,
            padding="max_length",
            truncation=True,
            return_attention_mask=True,
            return_tensors="pt",
        )
        full_rows = [i for i in range(len(prompts)) if bool(enc["attention_mask"][i].all())]
        if full_rows:
            untruncated = self.tokenizer([prompts[i] for i in full_rows], truncation=False)["input_ids"]
            for i, ids in zip(full_rows, untruncated):
                if len(ids) > self.max_length:
                    dropped = self.tokenizer.decode(ids[self.max_length - 1 : -1])
                    logger.warning(
                        "CLIP takes at most %d tokens; this part of prompt %d was cut off: %r",
                        self.max_length, i, dropped,
                    )
        device = self.device
        out = self.model(
            input_ids=enc["input_ids"].to(device), attention_mask=enc["attention_mask"].to(device)
        )
        return out.pooler_output


def _as_list(x) -> list:
    if isinstance(x, (str, Image.Image)):
        return [x]
    return list(x)


# ---------------------------------------------------------------------------------------------
# Both encoders together


@dataclass
class PromptEmbeds:
    """What the transformer needs from a batch of prompts."""

    text_states: torch.Tensor  # [B, N, D] MLLM states (image tokens, then text tokens)
    text_mask: torch.Tensor  # [B, N] 1 = attend
    text_states_2: torch.Tensor  # [B, D2] CLIP pooled

    def to(self, device=None, dtype: Optional[torch.dtype] = None) -> "PromptEmbeds":
        """Move to ``device``; ``dtype`` applies to the float states, the mask stays integer."""
        return PromptEmbeds(
            self.text_states.to(device=device, dtype=dtype),
            self.text_mask.to(device=device),
            self.text_states_2.to(device=device, dtype=dtype),
        )


class PromptEncoder:
    """The MLLM and CLIP encoders behind one ``encode`` call, and a way to free them.

    Use as a context manager to free the encoders (about 16 GB in fp16) before the transformer runs::

        with load_prompt_encoder("ckpts") as encoder:
            positive = encoder.encode([prompt], [image])
            negative = encoder.encode([negative_prompt], [black_image_like(image)])
    """

    reads_images = True  # the MLLM sees the semantic image (LoRA prepare caches black-image variants for dropout)

    def __init__(self, mllm: MLLMEncoder, clip: CLIPTextEncoder):
        self.mllm: Optional[MLLMEncoder] = mllm
        self.clip: Optional[CLIPTextEncoder] = clip

    def encode(self, prompts: Sequence[str], images: Sequence[Image.Image]) -> PromptEmbeds:
        if self.mllm is None or self.clip is None:
            raise RuntimeError("this PromptEncoder was released; load it again to encode more prompts")
        prompts = _as_list(prompts)
        states, mask = self.mllm.encode(prompts, images)
        pooled = self.clip.encode(prompts)
        return PromptEmbeds(states, mask, pooled)

    def to(self, device) -> "PromptEncoder":
        """Move both models (e.g. to ``"cpu"`` to park them while the transformer runs)."""
        for enc in (self.mllm, self.clip):
            if enc is not None:
                enc.model.to(device)
        return self

    def release(self) -> None:
        """Drop the models so their memory can be reclaimed (the caller must hold no other reference)."""
        devices = {enc.device for enc in (self.mllm, self.clip) if enc is not None}
        self.mllm = self.clip = None
        gc.collect()
        if any(d.type == "cuda" for d in devices):
            torch.cuda.empty_cache()

    def __enter__(self) -> "PromptEncoder":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


# ---------------------------------------------------------------------------------------------
# Loading

# Sub-folders of the two checkpoint layouts (spec section 1.10; diffusers-peer section 1).
OFFICIAL_TEXT_DIRS = {"mllm": "text_encoder_i2v", "clip": "text_encoder_2"}
DIFFUSERS_TEXT_DIRS = {
    "mllm": "text_encoder",
    "tokenizer": "tokenizer",
    "image_processor": "image_processor",
    "clip": "text_encoder_2",
    "clip_tokenizer": "tokenizer_2",
}


def find_text_encoder_dirs(root: PathLike) -> dict[str, Path]:
    """Locate the encoder folders under ``root``: the official ``ckpts/`` or a diffusers pipeline folder.

    Returns paths for keys ``mllm``, ``tokenizer``, ``image_processor``, ``clip``, ``clip_tokenizer``.
    """
    root = Path(root)
    if not root.is_dir():
        raise ModelFilesError(f"{root} is not a folder; pass the official ckpts/ folder or a diffusers pipeline")
    if (root / OFFICIAL_TEXT_DIRS["mllm"]).is_dir():
        layout, names = "official", OFFICIAL_TEXT_DIRS
    elif (root / DIFFUSERS_TEXT_DIRS["mllm"]).is_dir():
        layout, names = "diffusers", DIFFUSERS_TEXT_DIRS
    else:
        raise ModelFilesError(
            f"no text encoders under {root}: expected the official layout "
            f"({', '.join(d + '/' for d in OFFICIAL_TEXT_DIRS.values())}) or the diffusers layout "
            f"({', '.join(d + '/' for d in DIFFUSERS_TEXT_DIRS.values())}). Download them with e.g. "
            "`huggingface-cli download xtuner/llava-llama-3-8b-v1_1-transformers --local-dir ckpts/text_encoder_i2v` "
            "and `huggingface-cli download openai/clip-vit-large-patch14 --local-dir ckpts/text_encoder_2`"
        )
    missing = sorted({d for d in names.values() if not (root / d).is_dir()})
    if missing:
        raise ModelFilesError(
            f"{root} looks like the {layout} layout but lacks {', '.join(m + '/' for m in missing)}"
        )
    if layout == "official":
        # The LLaVA folder holds its own tokenizer and preprocessor; the CLIP folder its tokenizer.
        mllm, clip = root / names["mllm"], root / names["clip"]
        return {"mllm": mllm, "tokenizer": mllm, "image_processor": mllm, "clip": clip, "clip_tokenizer": clip}
    return {key: root / name for key, name in names.items()}


def _default_dtype(device: Optional[Union[str, torch.device]]) -> torch.dtype:
    # fp16 as the official code on GPU; fp16 matmuls are slow or missing on CPU.
    return torch.float16 if device is not None and torch.device(device).type == "cuda" else torch.float32


def load_mllm_encoder(
    model_dir: PathLike,
    tokenizer_dir: Optional[PathLike] = None,
    image_processor_dir: Optional[PathLike] = None,
    *,
    config: TextEncoderConfig = TextEncoderConfig(),
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> MLLMEncoder:
    """Load the LLaVA MLLM, its tokenizer and CLIP image processor from local folders (never downloads)."""
    from transformers import AutoImageProcessor, AutoTokenizer, LlavaForConditionalGeneration

    dtype = dtype or _default_dtype(device)
    tokenizer_dir = tokenizer_dir or model_dir
    image_processor_dir = image_processor_dir or model_dir
    try:
        model = LlavaForConditionalGeneration.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir), local_files_only=True)
        # The PIL backend: torchvision is optional, and PIL resizing is what transformers 4.39 did.
        image_processor = AutoImageProcessor.from_pretrained(
            str(image_processor_dir), backend="pil", local_files_only=True
        )
    except OSError as e:
        raise ModelFilesError(f"cannot load the MLLM text encoder from {model_dir}: {e}") from e
    # Drop the lm_head (1 GB in fp16) before moving anything: only hidden states are used.
    model = model.model
    if device is not None:
        model.to(device)
    return MLLMEncoder(
        model,
        tokenizer,
        image_processor,
        template=config.template,
        text_len=config.text_len,
        hidden_state_skip_layer=config.hidden_state_skip_layer,
        image_embed_interleave=config.image_embed_interleave,
    )


def load_clip_text_encoder(
    model_dir: PathLike,
    tokenizer_dir: Optional[PathLike] = None,
    *,
    max_length: int = 77,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
) -> CLIPTextEncoder:
    """Load the CLIP text model (a full ``CLIPModel`` folder works too) and its tokenizer; never downloads."""
    from transformers import AutoTokenizer, CLIPTextModel

    dtype = dtype or _default_dtype(device)
    try:
        model = CLIPTextModel.from_pretrained(str(model_dir), dtype=dtype, local_files_only=True)
        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir or model_dir), local_files_only=True)
    except OSError as e:
        raise ModelFilesError(f"cannot load the CLIP text encoder from {model_dir}: {e}") from e
    if device is not None:
        model.to(device)
    return CLIPTextEncoder(model, tokenizer, max_length=max_length)


def load_prompt_encoder(
    root: PathLike,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    config: TextEncoderConfig = TextEncoderConfig(),
) -> PromptEncoder:
    """Load both prompt encoders from the official ``ckpts/`` folder or a diffusers pipeline folder.

    ``dtype`` defaults to fp16 on CUDA and fp32 elsewhere. For ``config.kind == "minilm"`` (the demo model) the
    small MiniLM encoder is returned instead.
    """
    if config.kind == "minilm":
        from .minilm import load_minilm_encoder

        return load_minilm_encoder(root, dtype=dtype, device=device, max_length=config.text_len)
    if config.kind != "llava-clip":
        raise InputError(f"unknown prompt encoder kind {config.kind!r}: use 'llava-clip' or 'minilm'")
    dirs = find_text_encoder_dirs(root)
    logger.info("loading prompt encoders from %s", root)
    mllm = load_mllm_encoder(
        dirs["mllm"], dirs["tokenizer"], dirs["image_processor"], config=config, dtype=dtype, device=device
    )
    clip = load_clip_text_encoder(
        dirs["clip"], dirs["clip_tokenizer"], max_length=config.clip_max_length, dtype=dtype, device=device
    )
    return PromptEncoder(mllm, clip)


__all__ = [
    "ASSISTANT_HEADER_TOKENS",
    "CLIPTextEncoder",
    "MLLMEncoder",
    "PromptEmbeds",
    "PromptEncoder",
    "assistant_split_index",
    "black_image_like",
    "check_template",
    "crop_mllm_states",
    "expand_image_tokens",
    "find_text_encoder_dirs",
    "load_clip_text_encoder",
    "load_mllm_encoder",
    "load_prompt_encoder",
    "tokenize_prompts",
]
