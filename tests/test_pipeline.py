"""Image to video end to end on tiny random models saved in every layout, and parity with diffusers' pipeline."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from hunyuan_i2v.buckets import bucket_for
from hunyuan_i2v.errors import InputError, ModelFilesError
from hunyuan_i2v.keymap import official_to_diffusers
from hunyuan_i2v.pipeline import I2VPipeline
from hunyuan_i2v.video import read_video, write_video
from tiny_components import TINY_T, build_tiny_model, clip_text_model

skimage_data = pytest.importorskip("skimage.data")

PROMPT = "the camera slowly zooms in"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_src"))


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("layouts")
    return {layout: tiny.save(root / layout, layout) for layout in ("official", "diffusers", "flat", "safetensors")}


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(skimage_data.astronaut())


def _pipe(saved, layout, tiny):
    # the official and diffusers folders carry no text-template config for this tiny LLaVA: pass ours
    config = None if layout == "flat" else tiny.config
    return I2VPipeline.from_pretrained(saved[layout], device="cpu", config=config)


def test_photo_to_mp4_follows_the_bucket_rule(saved, tiny, astronaut, tmp_path):
    """A real photo at 360p: the official bucket decides the size, the default (tiled) decode runs, MP4 round trip."""
    pipe = _pipe(saved, "flat", tiny)
    out = pipe(astronaut, PROMPT, resolution="360p", num_frames=5, steps=2, seed=7, progress=False)
    h, w = bucket_for(astronaut.width, astronaut.height, "360p")
    assert (h, w) == (480, 480)
    assert out.frames.shape == (1, 5, h, w, 3) and out.frames.dtype == np.uint8
    path = write_video(tmp_path / "astronaut.mp4", out.frames[0], fps=24, metadata=out.settings.for_video(0))
    frames, fps, meta = read_video(path)
    assert frames.shape == (5, h, w, 3)
    assert fps == pytest.approx(24)
    assert meta["seed"] == 7 and meta["prompt"] == PROMPT and meta["height"] == h


def test_every_layout_loads_and_gives_the_same_video(saved, tiny, tmp_path):
    chelsea = Image.fromarray(skimage_data.chelsea())  # 451x300 landscape
    videos = {}
    for layout in ("official", "diffusers", "flat", "safetensors"):
        out = _pipe(saved, layout, tiny)(chelsea, PROMPT, height=48, width=64, num_frames=5, steps=2, seed=3,
                                         progress=False)
        path = write_video(tmp_path / f"{layout}.mp4", out.frames[0], fps=12, metadata=out.settings.for_video(0))
        frames, fps, _ = read_video(path)
        assert frames.shape == (5, 48, 64, 3) and fps == pytest.approx(12)
        videos[layout] = out.frames
    assert np.array_equal(videos["official"], videos["diffusers"])
    assert np.array_equal(videos["official"], videos["flat"])
    # loose diffusers-named files: the same weights, float rounding may differ by the memory layout of the loads
    assert np.abs(videos["official"].astype(int) - videos["safetensors"]).max() <= 1


def test_same_seed_same_video_and_batches_differ(saved, tiny, astronaut):
    pipe = _pipe(saved, "flat", tiny)
    kw = dict(height=48, width=64, num_frames=5, steps=2, progress=False)
    a = pipe(astronaut, PROMPT, seed=11, **kw)
    b = pipe(astronaut, PROMPT, seed=11, **kw)
    assert np.array_equal(a.frames, b.frames)
    two = pipe(astronaut, PROMPT, seed=11, num_videos=2, **kw)
    assert two.settings.seeds == [11, 12]
    # video i depends only on its own seed (up to float rounding of the batched matmuls)
    assert np.abs(two.frames[0].astype(int) - a.frames[0]).max() <= 1
    assert not np.array_equal(two.frames[0], two.frames[1])
    # two prompts x two videos in one call
    many = pipe([astronaut, astronaut.rotate(90)], [PROMPT, "static shot"], seed=5, num_videos=2, **kw)
    assert many.frames.shape[0] == 4 and many.settings.for_video(3)["prompt"] == "static shot"
    assert len({f.tobytes() for f in many.frames}) == 4


def test_frame_zero_is_the_reconstructed_image_latent(saved, tiny, astronaut):
    pipe = _pipe(saved, "flat", tiny)
    out = pipe(astronaut, PROMPT, height=32, width=32, num_frames=9, steps=3, seed=0, output_type="latent",
               progress=False)
    from hunyuan_i2v.buckets import resize_and_center_crop
    from hunyuan_i2v.images import image_to_tensor

    pixels = image_to_tensor(resize_and_center_crop(astronaut, 32, 32))
    expected = pipe.vae.encode(pixels, tiled=False) * tiny.config.vae.scaling_factor
    assert out.latents.shape == (1, 4, 3, 4, 4)
    torch.testing.assert_close(out.latents[:, :, :1], expected)


def test_real_cfg_runs_a_negative_pass(saved, tiny, astronaut):
    pipe = _pipe(saved, "flat", tiny)
    kw = dict(height=32, width=32, num_frames=5, steps=2, seed=1, progress=False, output_type="latent")
    plain = pipe(astronaut, PROMPT, **kw).latents
    cfg = pipe(astronaut, PROMPT, cfg_scale=4.0, **kw)
    assert cfg.settings.negative_prompt and (cfg.latents - plain).abs().max() > 1e-4


def test_input_errors(saved, tiny, astronaut):
    pipe = _pipe(saved, "flat", tiny)
    with pytest.raises(InputError, match="4k\\+1"):
        pipe(astronaut, PROMPT, num_frames=8, progress=False)
    with pytest.raises(InputError, match="multiples of 16"):
        pipe(astronaut, PROMPT, height=40, width=32, progress=False)
    with pytest.raises(InputError, match="empty"):
        pipe(astronaut, "  ", progress=False)
    with pytest.raises(InputError, match="2 images for 3 prompts"):
        pipe([astronaut, astronaut], ["a", "b", "c"], progress=False)
    empty = saved["flat"].parent / "empty"
    empty.mkdir(exist_ok=True)
    with pytest.raises(ModelFilesError, match="lacks"):
        I2VPipeline.from_pretrained(empty)
    with pytest.raises(ModelFilesError, match="not found"):
        I2VPipeline.from_pretrained(saved["flat"].parent / "nothing-here")


# ---------------------------------------------------------------------------------------------
# parity with diffusers' HunyuanVideoImageToVideoPipeline


@pytest.mark.parametrize("condition_type", ["token_replace", "latent_concat"])
def test_pipeline_matches_diffusers(condition_type, tmp_path):
    diffusers = pytest.importorskip("diffusers")
    tiny = build_tiny_model(tmp_path, condition_type=condition_type, seed=1)
    tcfg, vcfg = tiny.config.transformer, tiny.config.vae
    peer_transformer = diffusers.HunyuanVideoTransformer3DModel(
        in_channels=tcfg.in_channels, out_channels=tcfg.out_channels, num_attention_heads=tcfg.num_heads,
        attention_head_dim=tcfg.head_dim, num_layers=tcfg.depth_double, num_single_layers=tcfg.depth_single,
        num_refiner_layers=tcfg.refiner_depth, text_embed_dim=tcfg.text_states_dim,
        pooled_projection_dim=tcfg.text_states_dim_2, rope_axes_dim=tcfg.rope_axes_dim,
        guidance_embeds=tcfg.guidance_embed, image_condition_type=condition_type,
    ).eval()
    peer_transformer.load_state_dict(official_to_diffusers(tiny.transformer.state_dict()))
    peer_vae = diffusers.AutoencoderKLHunyuanVideo(
        latent_channels=vcfg.latent_channels, block_out_channels=vcfg.block_out_channels,
        layers_per_block=vcfg.layers_per_block, norm_num_groups=vcfg.norm_num_groups,
        scaling_factor=vcfg.scaling_factor,
    ).eval()
    peer_vae.load_state_dict(tiny.vae.state_dict())
    peer_vae.use_framewise_encoding = peer_vae.use_framewise_decoding = False  # the untiled decode we compare
    shift = 7.0
    peer = diffusers.HunyuanVideoImageToVideoPipeline(
        text_encoder=tiny.llava, tokenizer=tiny.llama_tok, transformer=peer_transformer, vae=peer_vae,
        scheduler=diffusers.FlowMatchEulerDiscreteScheduler(shift=shift), text_encoder_2=clip_text_model(tiny.clip_full),
        tokenizer_2=tiny.clip_tok, image_processor=tiny.processor,
    )
    peer.set_progress_bar_config(disable=True)

    ours = I2VPipeline(tiny.config, tiny.transformer, tiny.vae, _prompt_encoder(tiny), device="cpu")
    h, w, frames, steps = 48, 32, 9, 3
    image = Image.fromarray(skimage_data.astronaut()).resize((w, h))  # exact size: neither side resizes or crops
    noise = torch.randn(1, vcfg.latent_channels, 3, h // 8, w // 8)
    guidance = 4.0  # 4000 is exact in bf16, so the official rounding and diffusers' fp32 agree
    template = {"template": TINY_T.template, "crop_start": TINY_T.crop_start, "image_emb_start": TINY_T.image_emb_start,
                "image_emb_end": TINY_T.image_emb_end, "image_emb_len": TINY_T.image_emb_len}
    with torch.no_grad():
        expected = peer(image=image, prompt=PROMPT, height=h, width=w, num_frames=frames, num_inference_steps=steps,
                        guidance_scale=guidance, latents=noise.clone(), output_type="pt", prompt_template=template,
                        max_sequence_length=tiny.config.text.text_len, return_dict=False)[0]
    got = ours(image, PROMPT, height=h, width=w, num_frames=frames, steps=steps, flow_shift=shift, guidance=guidance,
               stability=True, latents=noise.clone(), output_type="pt", vae_tiling=False, progress=False)
    # diffusers "pt" video: [B, T, C, H, W]; ours [B, C, T, H, W]
    expected = expected.permute(0, 2, 1, 3, 4)
    assert got.frames.shape == expected.shape == (1, 3, frames - (4 if condition_type == "latent_concat" else 0), h, w)
    assert (got.frames - expected).abs().max().item() <= 1e-5


def _prompt_encoder(tiny):
    from hunyuan_i2v.model.text import CLIPTextEncoder, MLLMEncoder, PromptEncoder

    clip = clip_text_model(tiny.clip_full)
    text = tiny.config.text
    mllm = MLLMEncoder(tiny.llava, tiny.llama_tok, tiny.processor, template=text.template, text_len=text.text_len,
                       image_embed_interleave=text.image_embed_interleave)
    return PromptEncoder(mllm, CLIPTextEncoder(clip, tiny.clip_tok))
