"""Prompt encoders (spec section 2): template positions and crop with the real Llama-3 tokenizer, then tiny random
LLaVA / CLIP models end to end, checked against hand-built inputs_embeds runs, diffusers' pipeline code and
save/load round trips through both checkpoint layouts."""

from __future__ import annotations

import dataclasses
import logging
import types

import pytest
import torch
from PIL import Image

from hunyuan_i2v.config import (
    DEFAULT_NEGATIVE_PROMPT,
    I2V_IMAGE_TEMPLATE,
    I2V_VIDEO_TEMPLATE,
)
from hunyuan_i2v.errors import CheckpointError, InputError, ModelFilesError
from hunyuan_i2v.model.text import (
    CLIPTextEncoder,
    MLLMEncoder,
    PromptEmbeds,
    PromptEncoder,
    assistant_split_index,
    black_image_like,
    check_template,
    crop_mllm_states,
    expand_image_tokens,
    find_text_encoder_dirs,
    load_clip_text_encoder,
    load_prompt_encoder,
    tokenize_prompts,
)

from tiny_components import (
    IMAGE_ID,
    PAD_ID,
    TINY_CFG,
    TINY_IMAGE,
    TINY_T,
    llama_tokenizer,
    tiny_clip_models,
    tiny_image_processor,
    tiny_llava,
    write_clip_tokenizer,
)

transformers = pytest.importorskip("transformers")
T = I2V_VIDEO_TEMPLATE
TEXT_LEN = 256
L = TEXT_LEN + T.crop_start  # 359 tokens per row

PROMPT = "A red panda climbs a mossy tree, then turns to look at the camera."
BLANK_PROMPT = "A harbour at dawn\n\nBoats rock gently\n\nGulls circle overhead"  # two inner "\n\n" tokens
LONG_PROMPT = " ".join(["A slow pan across a crowded night market full of lanterns and steam."] * 30)


# ---------------------------------------------------------------------------------------------
# The real Llama-3 tokenizer


@pytest.fixture(scope="module")
def llama_tok():
    return llama_tokenizer()


def _ids(tok, token: str) -> int:
    return tok.convert_tokens_to_ids(token)


def _index_hidden(batch: int, length: int) -> torch.Tensor:
    """Fake expanded hidden states whose features name their (row, hidden index)."""
    rows = torch.arange(batch, dtype=torch.float64)[:, None].expand(batch, length)
    cols = torch.arange(length, dtype=torch.float64)[None].expand(batch, length)
    return torch.stack([rows, cols], dim=-1)


def _prompt_ids(tok, prompt: str) -> list[int]:
    """The prompt's tokens as they appear inside the filled template (between the user header and eot)."""
    ids = tok(T.template.format(prompt))["input_ids"]
    end = ids.index(_ids(tok, "<|eot_id|>"), T.crop_start)
    return ids[T.crop_start : end]


def test_template_positions_match_the_tokenizer(llama_tok):
    tok = llama_tok
    prefix = tok(T.template.split("{}")[0])["input_ids"]
    assert len(prefix) == T.crop_start == 103
    assert prefix[0] == tok.bos_token_id
    system = tok("system", add_special_tokens=False)["input_ids"]
    assert len(system) == 1
    assert prefix[:6] == [
        tok.bos_token_id, _ids(tok, "<|start_header_id|>"), system[0], _ids(tok, "<|end_header_id|>"), 271, IMAGE_ID
    ]
    assert prefix.index(IMAGE_ID) == T.image_emb_start == 5
    assert T.image_emb_end - T.image_emb_start == T.image_emb_len == 576
    assert tok.decode([T.double_return_token_id]) == "\n\n"
    # Four "\n\n" tokens: after the system header, the system <|eot_id|>, the user header and the assistant header.
    ids = tok(T.template.format(PROMPT))["input_ids"]
    doubles = [i for i, x in enumerate(ids) if x == 271]
    assert len(doubles) == 4 and doubles[:3] == [4, 98, 102] and doubles[3] == len(ids) - 1
    assert ids[-5:-1] == [_ids(tok, t) for t in ("<|eot_id|>", "<|start_header_id|>")] + [
        tok("assistant", add_special_tokens=False)["input_ids"][0], _ids(tok, "<|end_header_id|>")]
    check_template(tok, T, IMAGE_ID)


def test_image_template_crop_start_is_the_t2v_value(llama_tok):
    # The official I2V image template keeps crop_start 36 from the T2V template without "<image>\n"; with the
    # image line it has 38 tokens before the prompt (the template is unused in I2V mode: spec section 2.1).
    tok = llama_tok
    prefix = I2V_IMAGE_TEMPLATE.template.split("{}")[0]
    assert len(tok(prefix.replace("<image>\n", ""))["input_ids"]) == I2V_IMAGE_TEMPLATE.crop_start == 36
    assert len(tok(prefix)["input_ids"]) == 38
    with pytest.raises(InputError, match="crop_start=38"):
        check_template(tok, I2V_IMAGE_TEMPLATE, IMAGE_ID)
    check_template(tok, dataclasses.replace(I2V_IMAGE_TEMPLATE, crop_start=38), IMAGE_ID)


def test_check_template_catches_a_missing_image_token(llama_tok):
    with pytest.raises(InputError, match="image"):
        check_template(llama_tok, T, image_token_id=12345)


def test_tokenize_prompts_pads_right_to_text_len_plus_crop_start(llama_tok):
    ids, mask = tokenize_prompts(llama_tok, [PROMPT, "A cat."], T, TEXT_LEN)
    assert ids.shape == mask.shape == (2, L) and ids.dtype == mask.dtype == torch.int64
    for row in range(2):
        n = int(mask[row].sum())
        assert bool(mask[row, :n].all()) and not bool(mask[row, n:].any())
        assert bool((ids[row, n:] == PAD_ID).all()) and int(ids[row, n - 1]) == 271
        assert int(ids[row, T.image_emb_start]) == IMAGE_ID


def _crop_row(tok, prompt: str, interleave: int = 4):
    ids, mask = tokenize_prompts(tok, [prompt], T, TEXT_LEN)
    hidden = _index_hidden(1, L - 1 + T.image_emb_len)
    states, out_mask = crop_mllm_states(hidden, ids, mask, T, interleave)
    return ids, mask, states, out_mask


def _selected_input_ids(ids_row, states_row, n_image):
    """Input tokens behind the text part of a crop of _index_hidden states (hidden j <-> input j - 575)."""
    cols = states_row[n_image:, 1].long()
    return ids_row[cols - (T.image_emb_len - 1)]


def test_crop_keeps_prompt_and_final_double_return(llama_tok):
    ids, mask, states, out_mask = _crop_row(llama_tok, PROMPT)
    assert states.shape == (1, 144 + 252, 2) and out_mask.shape == (1, 396)
    # Image part: hidden 5, 9, ..., 577 (every 4th of the 576 image tokens), all attended.
    assert states[0, :144, 1].tolist() == list(range(5, 581, 4))
    assert bool(out_mask[0, :144].all())
    # Text part starts at hidden 103 - 1 + 576 = 678: the prompt, then "\n\n", then padding.
    assert int(states[0, 144, 1]) == 678
    prompt_ids = _prompt_ids(llama_tok, PROMPT)
    kept = _selected_input_ids(ids[0], states[0], 144).tolist()
    n = len(prompt_ids)
    assert kept[:n] == prompt_ids and kept[n] == 271 and set(kept[n + 1 :]) == {PAD_ID}
    assert int(out_mask[0, 144:].sum()) == n + 1
    assert out_mask[0, 144:].tolist() == [1] * (n + 1) + [0] * (252 - n - 1)


def test_crop_with_blank_lines_in_the_prompt_uses_the_last_double_return(llama_tok):
    ids, mask, states, out_mask = _crop_row(llama_tok, BLANK_PROMPT)
    prompt_ids = _prompt_ids(llama_tok, BLANK_PROMPT)
    assert 271 in prompt_ids  # the prompt's own blank lines tokenize to "\n\n" here
    kept = _selected_input_ids(ids[0], states[0], 144).tolist()
    n = len(prompt_ids)
    assert kept[:n] == prompt_ids and kept[n] == 271 and set(kept[n + 1 :]) == {PAD_ID}
    assert int(out_mask[0, 144:].sum()) == n + 1


def test_crop_of_a_truncated_prompt_with_blank_lines_follows_the_official_rule(llama_tok):
    # The official rule takes the last "\n\n" after the user header even when it is the prompt's own (the
    # assistant's was cut off): the 4 prompt tokens before it are dropped instead of the last 4.
    prompt = "\n\n".join(["A slow pan across a crowded night market full of lanterns and steam"] * 30)
    ids, mask, states, _ = _crop_row(llama_tok, prompt)
    row = ids[0].tolist()
    p = max(i for i, x in enumerate(row) if x == 271)
    assert T.crop_start < p < L - 1 and assistant_split_index(ids[0], T) == p
    kept = _selected_input_ids(ids[0], states[0], 144).tolist()
    assert kept == row[T.crop_start : p - 4] + row[p:]


def test_crop_of_a_truncated_prompt_drops_the_last_four_tokens(llama_tok, caplog):
    with caplog.at_level(logging.WARNING, logger="hunyuan_i2v.model.text"):
        ids, mask, states, out_mask = _crop_row(llama_tok, LONG_PROMPT)
    assert "too long" in caplog.text
    assert bool(mask.all())
    # Only the three template "\n\n" before the prompt survive: p = sequence length.
    assert [i for i, x in enumerate(ids[0].tolist()) if x == 271] == [4, 98, 102]
    assert assistant_split_index(ids[0], T) == L
    kept = _selected_input_ids(ids[0], states[0], 144)
    assert torch.equal(kept, ids[0, T.crop_start : L - 4])
    assert states.shape == (1, 396, 2) and bool(out_mask.all())


def test_crop_batches_rows_with_different_double_return_counts(llama_tok):
    prompts = [PROMPT, BLANK_PROMPT, LONG_PROMPT, ""]
    ids, mask = tokenize_prompts(llama_tok, prompts, T, TEXT_LEN)
    counts = (ids == 271).sum(1).tolist()
    assert len(set(counts)) > 1  # the official batch-wide reshape cannot handle this batch
    hidden = _index_hidden(len(prompts), L - 1 + T.image_emb_len)
    states, out_mask = crop_mllm_states(hidden, ids, mask, T, 4)
    assert states.shape == (4, 396, 2)
    for i, prompt in enumerate(prompts):
        _, _, s, m = _crop_row(llama_tok, prompt)
        assert torch.equal(states[i, :, 1], s[0, :, 1]) and bool((states[i, :, 0] == i).all())
        assert torch.equal(out_mask[i], m[0])
    assert int(out_mask[3, 144:].sum()) == 1  # the empty prompt keeps only the final "\n\n"


def test_crop_interleave_and_shape_errors(llama_tok):
    ids, mask = tokenize_prompts(llama_tok, [PROMPT], T, TEXT_LEN)
    hidden = _index_hidden(1, L - 1 + T.image_emb_len)
    states, _ = crop_mllm_states(hidden, ids, mask, T, 2)  # latent_concat weights: 288 image tokens
    assert states.shape[1] == 288 + 252
    assert states[0, :288, 1].tolist() == list(range(5, 581, 2))
    with pytest.raises(InputError):
        crop_mllm_states(hidden, ids, mask, T, 0)
    with pytest.raises(InputError, match="hidden states"):
        crop_mllm_states(hidden[:, :-1], ids, mask, T, 4)


def test_expand_image_tokens_positions_and_diffusers_parity(llama_tok):
    ids, mask = tokenize_prompts(llama_tok, [PROMPT, BLANK_PROMPT], T, TEXT_LEN)
    ex_ids, ex_mask, pos = expand_image_tokens(ids, mask, IMAGE_ID, T.image_emb_len)
    assert ex_ids.shape == ex_mask.shape == pos.shape == (2, L + 575)
    assert bool((ex_ids[:, T.image_emb_start : T.image_emb_end] == IMAGE_ID).all())
    assert torch.equal(ex_ids[:, : T.image_emb_start], ids[:, : T.image_emb_start])
    assert torch.equal(ex_ids[:, T.image_emb_end :], ids[:, T.image_emb_start + 1 :])  # hidden j = input j + 575
    assert bool(ex_mask[:, : T.image_emb_end].all())
    for row in range(2):
        n = int(ex_mask[row].sum())
        assert pos[row, :n].tolist() == list(range(n)) and bool((pos[row, n:] == 1).all())

    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import (
        _expand_input_ids_with_image_tokens,
    )

    ref = _expand_input_ids_with_image_tokens(
        ids, mask, L, IMAGE_ID, T.image_emb_len, T.image_emb_start, T.image_emb_end, PAD_ID
    )
    assert torch.equal(ref["input_ids"], ex_ids)
    assert torch.equal(ref["attention_mask"].long(), ex_mask)
    assert torch.equal(ref["position_ids"], pos)

    two = torch.tensor([[1, IMAGE_ID, 2], [IMAGE_ID, 3, 4]])
    with pytest.raises(InputError, match="same number"):
        expand_image_tokens(two, torch.ones_like(two), 3, 4)  # rows with 0 and 1 images of id 3


# ---------------------------------------------------------------------------------------------
# Tiny random models

@pytest.fixture(scope="module")
def tiny(llama_tok, tmp_path_factory):
    """Tiny LLaVA + tiny CLIP, saved in both checkpoint layouts."""
    torch.manual_seed(0)
    llava = tiny_llava()
    processor = tiny_image_processor()
    root = tmp_path_factory.mktemp("text_encoders")
    clip_tok, clip_vocab = write_clip_tokenizer(root / "clip_tokenizer_src")
    # The official text_encoder_2 is the full openai/clip-vit-large-patch14 CLIPModel.
    clip_full = tiny_clip_models(clip_vocab, clip_tok)

    official = root / "ckpts"
    llava.save_pretrained(official / "text_encoder_i2v")
    llama_tok.save_pretrained(official / "text_encoder_i2v")
    processor.save_pretrained(official / "text_encoder_i2v")
    clip_full.save_pretrained(official / "text_encoder_2")
    clip_tok.save_pretrained(official / "text_encoder_2")

    clip_text = transformers.CLIPTextModel.from_pretrained(str(official / "text_encoder_2")).eval()
    diffusers_root = root / "diffusers"
    llava.save_pretrained(diffusers_root / "text_encoder")
    llama_tok.save_pretrained(diffusers_root / "tokenizer")
    processor.save_pretrained(diffusers_root / "image_processor")
    clip_text.save_pretrained(diffusers_root / "text_encoder_2")
    clip_tok.save_pretrained(diffusers_root / "tokenizer_2")

    mllm = MLLMEncoder(llava, llama_tok, processor, template=TINY_T, text_len=TEXT_LEN)
    clip = CLIPTextEncoder(clip_text, clip_tok)
    return types.SimpleNamespace(
        llava=llava, processor=processor, mllm=mllm, clip=clip, clip_tok=clip_tok,
        official=official, diffusers=diffusers_root,
    )


def _noise_image(w: int, h: int, seed: int) -> Image.Image:
    g = torch.Generator().manual_seed(seed)
    return Image.fromarray(torch.randint(0, 256, (h, w, 3), generator=g, dtype=torch.uint8).numpy())


def _reference_mllm(llava, processor, tok, prompts, images, interleave=4):
    """Independent reconstruction: splice the projected image features into the token embeddings by hand,
    run the bare Llama with 4.39-style position ids, take layer -3 and crop by locating the assistant header."""
    enc = tok([T.template.format(p) for p in prompts], max_length=L, padding="max_length", truncation=True,
              return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    pixels = processor(images, return_tensors="pt")["pixel_values"]
    assert pixels.shape == (len(images), 3, TINY_IMAGE, TINY_IMAGE)
    inner = llava.model
    with torch.no_grad():
        vision = inner.vision_tower(pixels, output_hidden_states=True).hidden_states[-2][:, 1:]  # drop CLS
        feats = inner.multi_modal_projector(vision)
        assert feats.shape == (len(images), 16, 32)
        emb = inner.language_model.get_input_embeddings()(ids)
        s = TINY_T.image_emb_start
        embeds = torch.cat([emb[:, :s], feats, emb[:, s + 1 :]], dim=1)
        full_mask = torch.cat([mask[:, :s], torch.ones(len(prompts), 16, dtype=mask.dtype), mask[:, s + 1 :]], 1)
        arange = torch.arange(full_mask.shape[1]).expand_as(full_mask)
        pos = torch.where(full_mask.bool(), arange, torch.ones_like(arange))
        h = inner.language_model(inputs_embeds=embeds, attention_mask=full_mask, position_ids=pos,
                                 output_hidden_states=True).hidden_states[-3]
    header = [tok.convert_tokens_to_ids(t) for t in ("<|eot_id|>", "<|start_header_id|>")] + [
        tok("assistant", add_special_tokens=False)["input_ids"][0], tok.convert_tokens_to_ids("<|end_header_id|>")]
    states, masks = [], []
    for i in range(len(prompts)):
        row = ids[i].tolist()
        starts = [j for j in range(len(row) - 3) if row[j : j + 4] == header]
        q = starts[-1] if starts else L - 4  # first dropped input index
        keep = list(range(T.crop_start, q)) + list(range(q + 4, L))
        states.append(torch.cat([h[i, s : s + 16 : interleave], h[i, [j + 15 for j in keep]]]))
        masks.append(torch.cat([torch.ones(-(-16 // interleave), dtype=mask.dtype), mask[i, keep]]))
    return torch.stack(states), torch.stack(masks), feats


def test_mllm_encode_matches_a_hand_built_llava_run(tiny, llama_tok):
    prompts = [PROMPT, BLANK_PROMPT]
    images = [_noise_image(80, 60, 1), _noise_image(56, 90, 2)]
    states, mask = tiny.mllm.encode(prompts, images)
    assert tiny.mllm.num_tokens == 4 + 252
    assert states.shape == (2, 256, 32) and mask.shape == (2, 256)
    ref_states, ref_mask, feats = _reference_mllm(tiny.llava, tiny.processor, llama_tok, prompts, images)
    torch.testing.assert_close(states, ref_states, rtol=1e-5, atol=1e-5)
    assert torch.equal(mask, ref_mask)
    for i, p in enumerate(prompts):
        assert int(mask[i].sum()) == 4 + len(_prompt_ids(llama_tok, p)) + 1


def test_mllm_matches_diffusers_pipeline_code(tiny, llama_tok):
    from diffusers.pipelines.hunyuan_video.pipeline_hunyuan_video_image2video import (
        HunyuanVideoImageToVideoPipeline,
    )

    image = _noise_image(64, 64, 3)
    fake_pipe = types.SimpleNamespace(text_encoder=tiny.llava, tokenizer=llama_tok, image_processor=tiny.processor)
    template = {"template": T.template, "crop_start": T.crop_start, "image_emb_start": TINY_T.image_emb_start,
                "image_emb_end": TINY_T.image_emb_end, "image_emb_len": TINY_T.image_emb_len}
    with torch.no_grad():
        ref, ref_mask = HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds(
            fake_pipe, image, [BLANK_PROMPT], template, device=torch.device("cpu"), dtype=torch.float32,
            max_sequence_length=TEXT_LEN, num_hidden_layers_to_skip=2, image_embed_interleave=4,
        )
    states, mask = tiny.mllm.encode([BLANK_PROMPT], [image])
    torch.testing.assert_close(states, ref, rtol=1e-6, atol=1e-6)  # padding positions included
    assert torch.equal(mask, ref_mask.long())


def test_black_image_changes_only_the_states(tiny):
    image = _noise_image(72, 48, 4)
    black = black_image_like(image)
    assert black.size == image.size and black.mode == "RGB" and black.getextrema() == ((0, 0),) * 3
    pixels = tiny.mllm.pixel_values([black])[0]
    assert pixels.std(dim=(1, 2)).max() < 1e-6  # a constant image after CLIP normalisation

    encoder = PromptEncoder(tiny.mllm, tiny.clip)
    both = encoder.encode([PROMPT, PROMPT], [image, black])
    assert torch.equal(both.text_mask[0], both.text_mask[1])
    assert torch.equal(both.text_states_2[0], both.text_states_2[1])  # CLIP never sees the image
    diff = (both.text_states[0] - both.text_states[1]).abs().amax(-1)
    assert bool((diff[:4] > 1e-4).all())  # image tokens
    assert bool((diff[4:] > 1e-6).all())  # text tokens attend to the image (causal, image first)
    # Rows do not interact: the negative row equals encoding it alone.
    alone = encoder.encode([PROMPT], [black])
    torch.testing.assert_close(alone.text_states[0], both.text_states[1], rtol=1e-5, atol=1e-5)


def test_prompt_encoder_embeds_and_release(tiny):
    encoder = PromptEncoder(tiny.mllm, tiny.clip)
    image = _noise_image(64, 48, 5)
    with encoder:
        out = encoder.encode([PROMPT, DEFAULT_NEGATIVE_PROMPT], [image, black_image_like(image)])
    assert isinstance(out, PromptEmbeds)
    assert out.text_states.shape == (2, 256, 32) and out.text_mask.shape == (2, 256)
    assert out.text_states_2.shape == (2, 16)
    half = out.to(dtype=torch.float16)
    assert half.text_states.dtype == torch.float16 and half.text_mask.dtype == torch.int64
    assert encoder.mllm is None and encoder.clip is None
    with pytest.raises(RuntimeError, match="released"):
        encoder.encode([PROMPT], [image])
    with pytest.raises(InputError, match="one image per prompt"):
        tiny.mllm.encode([PROMPT, PROMPT], [image])


def test_load_prompt_encoder_from_both_layouts(tiny):
    image = _noise_image(60, 60, 6)
    prompts = [BLANK_PROMPT, "A cat and the hat."]
    images = [image, black_image_like(image)]
    expected = PromptEncoder(tiny.mllm, tiny.clip).encode(prompts, images)
    for root in (tiny.official, tiny.diffusers):
        loaded = load_prompt_encoder(root, config=TINY_CFG)
        assert loaded.mllm.dtype == torch.float32 and loaded.mllm.image_token_id == IMAGE_ID
        got = loaded.encode(prompts, images)
        assert torch.equal(got.text_states, expected.text_states), root
        assert torch.equal(got.text_mask, expected.text_mask)
        assert torch.equal(got.text_states_2, expected.text_states_2)
        loaded.release()
    half = load_clip_text_encoder(tiny.official / "text_encoder_2", dtype=torch.float16)
    assert half.dtype == torch.float16


def test_layout_detection_errors(tiny, tmp_path):
    with pytest.raises(ModelFilesError, match="text_encoder_i2v/.*text_encoder/"):
        find_text_encoder_dirs(tmp_path)
    (tmp_path / "text_encoder").mkdir()
    (tmp_path / "tokenizer").mkdir()
    with pytest.raises(ModelFilesError, match="diffusers layout but lacks image_processor/, text_encoder_2/, "
                                              "tokenizer_2/"):
        find_text_encoder_dirs(tmp_path)
    dirs = find_text_encoder_dirs(tiny.official)
    assert dirs["tokenizer"] == dirs["image_processor"] == dirs["mllm"] == tiny.official / "text_encoder_i2v"
    with pytest.raises(CheckpointError, match="image_emb_len"):
        MLLMEncoder(tiny.llava, tiny.mllm.tokenizer, tiny.processor, template=T)  # T expects 576 image tokens


# ---------------------------------------------------------------------------------------------
# CLIP pooled


def test_clip_pooled_is_the_eos_state(tiny):
    prompts = ["the cat and the hat", "a red panda"]
    pooled = tiny.clip.encode(prompts)
    assert pooled.shape == (2, 16)
    model, tok = tiny.clip.model, tiny.clip_tok
    with torch.no_grad():
        for i, p in enumerate(prompts):
            ids = tok(p, return_tensors="pt")["input_ids"]  # unpadded: BOS ... EOS
            assert int(ids[0, -1]) == tok.eos_token_id
            eos_state = model(input_ids=ids).last_hidden_state[0, -1]
            torch.testing.assert_close(pooled[i], eos_state, rtol=1e-5, atol=1e-5)
        # The causal mask already hides the padding from the EOS token: diffusers' unmasked call agrees.
        padded = tok(prompts, max_length=77, padding="max_length", return_tensors="pt")["input_ids"]
        torch.testing.assert_close(pooled, model(input_ids=padded).pooler_output, rtol=1e-5, atol=1e-5)


def test_clip_truncation_warns_and_keeps_77_tokens(tiny, caplog):
    long_prompt = "the cat " * 60
    with caplog.at_level(logging.WARNING, logger="hunyuan_i2v.model.text"):
        pooled = tiny.clip.encode([long_prompt])
    assert "cut off" in caplog.text
    tok = tiny.clip_tok
    ids = tok(long_prompt)["input_ids"]
    assert len(ids) > 77
    kept = torch.tensor([ids[:76] + [tok.eos_token_id]])
    with torch.no_grad():
        ref = tiny.clip.model(input_ids=kept).last_hidden_state[:, -1]
    torch.testing.assert_close(pooled, ref, rtol=1e-5, atol=1e-5)
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="hunyuan_i2v.model.text"):
        tiny.clip.encode(["the cat"])
    assert "cut off" not in caplog.text
