"""The memory options through the pipeline and the CLI on a tiny model: offloaded, streamed and chunked runs give
the plain video exactly, quantized ones within a stated tolerance; attention backends, torch.compile, the memory
budget, and the out-of-memory answer."""

from __future__ import annotations

import logging

import numpy as np
import pytest
import torch
from PIL import Image

from hunyuan_i2v.cli import main
from hunyuan_i2v.errors import DeviceMemoryError, HunyuanI2VError, InputError
from hunyuan_i2v.memory.quant import QuantizedLinear
from hunyuan_i2v.pipeline import I2VPipeline
from hunyuan_i2v.video import read_video
from tiny_components import build_tiny_model

skimage_data = pytest.importorskip("skimage.data")

PROMPT = "the camera slowly zooms in"
KW = dict(height=48, width=64, num_frames=9, steps=2, seed=3, progress=False)
# Quantized block weights, through two denoising steps of the tiny random model: relative L2 distance of the final
# latents from the full-precision run (measured when written: int8 5.0e-4, fp8 1.9e-3).
QUANTIZED_TOLERANCE = {"int8": 2e-3, "fp8": 6e-3}


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("memory_tiny"))


@pytest.fixture(scope="module")
def saved(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("memory_layouts")
    return {layout: tiny.save(root / layout, layout) for layout in ("flat", "official")}


@pytest.fixture(scope="module")
def astronaut():
    return Image.fromarray(skimage_data.astronaut())


def _pipe(saved, tiny, layout="flat", **memory) -> I2VPipeline:
    # the official folder carries no text-template config for this tiny LLaVA: pass ours
    return I2VPipeline.from_pretrained(saved[layout], device="cpu", config=None if layout == "flat" else tiny.config,
                                       **memory)


@pytest.fixture(scope="module")
def plain(saved, tiny, astronaut):
    return _pipe(saved, tiny)(astronaut, PROMPT, **KW)


def _same(a, b) -> None:
    assert np.array_equal(a.frames, b.frames) and torch.equal(a.latents, b.latents)


def _blocks(model):
    return [*model.double_blocks, *model.single_blocks]


@pytest.mark.parametrize("layout,offload", [("flat", "model"), ("flat", "blocks"), ("official", "blocks")])
def test_offload_and_block_streaming_give_the_plain_video_exactly(saved, tiny, astronaut, plain, layout, offload):
    pipe = _pipe(saved, tiny, layout, offload=offload)
    _same(pipe(astronaut, PROMPT, **KW), plain)
    assert pipe._offloader is not None and pipe._offloader.active is pipe.vae  # the VAE decoded last
    if offload == "blocks":
        streamer = pipe._streamer
        assert streamer.loads == KW["steps"] * len(_blocks(pipe.transformer))
        assert all(t.is_meta for b in _blocks(pipe.transformer) for t in b.state_dict().values())
        # safetensors stream from the file through memory maps; the official .pt from a host copy
        assert (streamer._file is not None) == (layout == "flat")
    _same(pipe(astronaut, PROMPT, **KW), plain)  # and again, from the blocks prefetched at the end


def test_chunked_feed_forward_through_the_pipeline_is_exact(saved, tiny, astronaut, plain):
    pipe = _pipe(saved, tiny, offload="blocks")
    pipe.transformer.set_ff_chunk_tokens(16)  # 36 image tokens: chunks of 16 and 20
    _same(pipe(astronaut, PROMPT, **KW), plain)


def test_chunked_attention_is_the_plain_video_up_to_rounding(saved, tiny, astronaut, plain):
    out = _pipe(saved, tiny, attention="chunked")(astronaut, PROMPT, **KW)
    assert ((out.latents - plain.latents).norm() / plain.latents.norm()).item() < 1e-6
    assert np.abs(out.frames.astype(int) - plain.frames).max() <= 1


@pytest.mark.parametrize("storage", ["int8", "fp8"])
@pytest.mark.parametrize("offload", ["none", "blocks"])
def test_quantized_block_weights_stay_within_tolerance(saved, tiny, astronaut, plain, storage, offload):
    pipe = _pipe(saved, tiny, offload=offload, weights_dtype=storage)
    out = pipe(astronaut, PROMPT, **KW)
    layers = [m for b in _blocks(pipe.transformer) for m in b.modules() if isinstance(m, QuantizedLinear)]
    assert layers and all(m.weights_dtype == storage for m in layers)
    error = ((out.latents - plain.latents).norm() / plain.latents.norm()).item()
    assert 0 < error < QUANTIZED_TOLERANCE[storage]
    assert np.abs(out.frames.astype(int) - plain.frames).max() <= 3


def test_auto_attention_logs_one_line_and_changes_nothing_on_a_cpu(saved, tiny, astronaut, plain, caplog):
    with caplog.at_level(logging.INFO, logger="hunyuan_i2v.model.layers"):
        pipe = _pipe(saved, tiny, attention="auto")
        out = pipe(astronaut, PROMPT, **KW)
        pipe(astronaut, PROMPT, **KW)
    lines = [r.getMessage() for r in caplog.records if "attention backend" in r.getMessage()]
    assert len(lines) == 1 and lines[0].startswith("attention backend: sdpa (auto:")
    _same(out, plain)


@pytest.mark.parametrize("backend", ["flash", "sage"])
def test_forcing_a_backend_that_cannot_run_fails_before_loading(saved, tiny, backend):
    with pytest.raises(InputError, match=f"attention backend '{backend}' cannot run here: .*CUDA"):
        _pipe(saved, tiny, attention=backend)


def test_compiled_blocks_give_the_plain_video(saved, tiny, astronaut, plain):
    pipe = _pipe(saved, tiny, compile="eager")  # the dynamo capture without code generation: seconds, not minutes
    _same(pipe(astronaut, PROMPT, **KW), plain)
    assert all("forward" in vars(b) for b in _blocks(pipe.transformer))  # each block's compiled forward


def test_a_memory_budget_plans_each_call(saved, tiny, astronaut, plain):
    pipe = _pipe(saved, tiny, memory_budget=1.0)
    out = pipe(astronaut, PROMPT, **KW)
    plan = out.extras["memory_plan"]
    assert plan.rank == (0, 0, 0) and plan.peak <= 0.9 * 2**30
    _same(out, plain)
    fixed = _pipe(saved, tiny, memory_budget=1.0, offload="blocks", weights_dtype="int8")
    plan = fixed(astronaut, PROMPT, **KW).extras["memory_plan"]
    assert (plan.offload, plan.weights_dtype) == ("blocks", "int8")
    with pytest.raises(InputError, match=r"no plan fits in 0.001 GB: .* needs \d+\.\d GB"):
        _pipe(saved, tiny, memory_budget=0.001)(astronaut, PROMPT, **KW)


def test_the_streamed_decode_is_the_whole_video_decode(saved, tiny, astronaut):
    """The pipeline decodes chunk by chunk; the frames equal the whole-video decode of the same latents, also
    when small tiles make both spatial and temporal tiling run."""
    import dataclasses

    from hunyuan_i2v.model.vae import CausalVAE

    config = dataclasses.replace(tiny.config, vae=dataclasses.replace(tiny.config.vae, tile_sample_size=32,
                                                                      tile_sample_frames=16))
    vae = CausalVAE(config.vae).eval()
    vae.load_state_dict(tiny.vae.state_dict())
    encoder = _pipe(saved, tiny)._prompt_encoder
    pipe = I2VPipeline(config, tiny.transformer, vae, encoder, device="cpu")
    kw = dict(KW, num_frames=21)
    out = pipe(astronaut, PROMPT, **kw)
    with torch.no_grad():
        whole = vae.decode(out.latents / config.vae.scaling_factor)
    expected = ((whole.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 4, 1)
    assert np.array_equal(out.frames, expected.numpy())


# ---------------------------------------------------------------------------------------------
# Out of memory


def _run_out_of_memory(monkeypatch):
    def denoise(*args, **kwargs):  # what CUDA raises when an allocation fails, here at the first step
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")

    monkeypatch.setattr("hunyuan_i2v.pipeline.denoise", denoise)


def test_out_of_memory_names_a_plan_that_fits(saved, tiny, astronaut, monkeypatch):
    _run_out_of_memory(monkeypatch)
    with pytest.raises(DeviceMemoryError) as info:
        _pipe(saved, tiny, memory_budget=1.0)(astronaut, PROMPT, **KW)
    message = str(info.value)
    assert isinstance(info.value, RuntimeError) and isinstance(info.value.__cause__, torch.OutOfMemoryError)
    assert "out of memory on cpu while denoising with all weights resident" in message
    assert "this would fit" in message and "--memory-budget" in message and "--offload" in message
    assert "\n" not in message


def test_the_cli_answers_out_of_memory_in_one_line_with_exit_code_2(saved, astronaut, tmp_path, monkeypatch,
                                                                     capsys):
    _run_out_of_memory(monkeypatch)
    photo = tmp_path / "photo.png"
    astronaut.save(photo)
    code = main(["generate", str(photo), PROMPT, "--model", str(saved["flat"]), "-o", str(tmp_path / "o.mp4"),
                 "--height", "48", "--width", "64", "--frames", "9", "--steps", "2", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("error: out of memory on cpu while denoising") and "--memory-budget" in err
    assert not (tmp_path / "o.mp4").exists()


# ---------------------------------------------------------------------------------------------
# The command line


def _generate(saved, photo, out, *extra) -> list[str]:
    return ["generate", str(photo), PROMPT, "--model", str(saved["flat"]), "-o", str(out), "--height", "48",
            "--width", "64", "--frames", "9", "--steps", "2", "--seed", "3", "--no-progress", *extra]


@pytest.fixture
def photo(astronaut, tmp_path):
    path = tmp_path / "photo.png"
    astronaut.save(path)
    return path


def test_cli_memory_flags_make_the_same_video(saved, photo, tmp_path, capsys):
    assert main(_generate(saved, photo, tmp_path / "plain.mp4")) == 0
    assert main(_generate(saved, photo, tmp_path / "lean.mp4", "--offload", "blocks", "--attention", "sdpa",
                          "--memory-budget", "2")) == 0
    assert np.array_equal(read_video(tmp_path / "plain.mp4")[0], read_video(tmp_path / "lean.mp4")[0])
    assert main(_generate(saved, photo, tmp_path / "int8.mp4", "--weights-dtype", "int8")) == 0
    assert read_video(tmp_path / "int8.mp4")[0].shape == (9, 48, 64, 3)


@pytest.mark.parametrize("extra,match", [
    (["--attention", "flash"], "attention backend 'flash' cannot run here"),
    (["--dtype", "fp32", "--weights-dtype", "bf16"], "--weights-dtype bf16 differs from the transformer dtype fp32"),
    (["--memory-budget", "0"], "memory budget must be a positive number"),
    (["--memory-budget", "0.001"], "no plan fits in 0.001 GB"),
])
def test_cli_memory_errors_are_one_line_with_exit_code_2(saved, photo, tmp_path, capsys, extra, match):
    code = main(_generate(saved, photo, tmp_path / "o.mp4", *extra))
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and err.startswith("error: "), err
    assert match in err and not (tmp_path / "o.mp4").exists()


def test_cli_info_prints_the_plan(saved, photo, capsys):
    assert main(["info", "--model", str(saved["flat"]), "--image", str(photo), "--frames", "9", "--plan",
                 "--memory-budget", "16"]) == 0
    out = capsys.readouterr().out
    assert "memory plan for 16 GB on cpu: all weights resident" in out
    for stage in ("text encoding", "image encoding", "denoising", "decoding"):
        assert stage in out
    assert "every residency and weights dtype" in out and "blocks  int8" in out


def test_info_plans_the_13b_model_for_a_16_gb_gpu(tmp_path):
    from hunyuan_i2v.config import HUNYUAN_I2V_720P
    from hunyuan_i2v.layout import resolve_model_files
    from hunyuan_i2v.plan import ModelReport, describe_plan

    report = ModelReport(resolve_model_files(tmp_path), config=HUNYUAN_I2V_720P)
    text = describe_plan(report, resolution="720p", device="cuda", memory_budget=16, show_alternatives=True)
    assert "memory plan for 16 GB on cuda: transformer blocks streamed" in text
    assert "--offload blocks --weights-dtype bf16" in text and "113256 video + 396 text" in text
    assert "none    bf16" in text and "too big" in text and "fits" in text
    with pytest.raises(HunyuanI2VError, match="needs"):
        describe_plan(report, resolution="720p", device="cuda", memory_budget=4)
