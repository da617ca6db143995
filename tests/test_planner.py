"""The memory planner: its choices for the 13B preset at 720p x 129 frames over a range of budgets, the explicit
choices it must keep, and its walks of the inference code against the live tensor bytes of real runs."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from hunyuan_i2v.config import HUNYUAN_I2V_720P, TINY_TEST, TINY_TEST_33CH, TINY_VAE, VAEConfig
from hunyuan_i2v.errors import InputError
from hunyuan_i2v.memory import planner
from hunyuan_i2v.memory.planner import GB, MARGIN, Fixed, PlanError, Target, plan_memory
from hunyuan_i2v.memory.quant import quantize_model
from hunyuan_i2v.model.transformer import HunyuanVideoTransformer
from hunyuan_i2v.model.vae import CausalVAE
from live_memory import LiveTensorBytes

C13 = HUNYUAN_I2V_720P
WORK_720P = planner.workload_for(C13, 704, 1248, 129)  # the 720p bucket of a 16:9 image
GPU = Target.for_device("cuda")


def _plan(budget, **fixed):
    return plan_memory(C13, WORK_720P, GPU, budget, Fixed(**fixed))


def _stage(plan, name):
    return dict(plan.peaks)[name]


# ---------------------------------------------------------------------------------------------
# Choices for the 13B model


def test_the_workload_is_the_official_token_count():
    s = planner._sizes(C13, WORK_720P, GPU, None, None)
    assert (s.video_tokens, s.text_tokens, s.latents) == (113256, 396, (33, 88, 156))


def test_a_large_budget_keeps_everything_resident_in_bf16():
    plan = _plan(80)
    assert (plan.offload, plan.weights_dtype, plan.rank) == ("none", "bf16", (0, 0, 0))
    assert plan.ff_chunk_tokens is None and plan.vae_tile is None and not plan.vae_lean
    # the transformer's bf16 weights (12.8 B parameters) are on the device in every stage
    assert all(b > 2 * 12.8e9 for _, b in plan.peaks)


def test_a_mid_budget_offloads_whole_models():
    plan = _plan(40)
    assert (plan.offload, plan.weights_dtype, plan.rank) == ("model", "bf16", (0, 0, 0))
    # all resident does not fit: the prompt encoders would share the device with the transformer
    resident = planner.plan_for(C13, WORK_720P, GPU)
    assert resident.peak > 40 * GB * (1 - MARGIN) >= plan.peak


def test_a_small_budget_streams_the_blocks():
    plan = _plan(16)
    assert (plan.offload, plan.weights_dtype) == ("blocks", "bf16")
    assert plan.peak <= 16 * GB * (1 - MARGIN)
    # 8 B prompt-encoder parameters in fp16 do not fit beside anything: they run on the CPU for this budget
    assert plan.text_on_cpu and _stage(plan, "text encoding") < GB
    assert _stage(_plan(24), "text encoding") > 14 * GB and not _plan(24).text_on_cpu
    # a little less, and the feed-forward runs in chunks (exact, a few more kernel launches)
    assert plan.ff_chunk_tokens is None and _plan(12).ff_chunk_tokens is not None
    assert _stage(_plan(12), "denoising") < _stage(plan, "denoising")


def test_a_smaller_budget_quantizes_the_streamed_blocks():
    blocks = planner.candidate_plans(C13, WORK_720P, GPU, Fixed(offload="blocks"))
    leanest = {wd: min(p.peak for p in blocks if p.weights_dtype == wd) for wd in ("bf16", "int8", "fp8")}
    assert leanest["int8"] == leanest["fp8"] < leanest["bf16"]  # same bytes; int8 is preferred, more exact
    budget = (leanest["int8"] + leanest["bf16"]) / 2 / (1 - MARGIN) / GB
    plan = _plan(budget)
    assert (plan.offload, plan.weights_dtype) == ("blocks", "int8")
    assert plan.rank[0] == 1  # quantization is the last resort: nothing exact fits


def test_an_impossible_budget_names_the_smallest_that_fits():
    with pytest.raises(PlanError, match=r"no plan fits in 4 GB: the leanest .* needs (\d+\.\d) GB") as info:
        _plan(4)
    needed = float(info.value.args[0].split(" needs ")[1].split(" GB")[0])
    assert 4 < needed < 16
    assert "--memory-budget" in str(info.value) and "\n" not in str(info.value)
    assert _plan(needed).peak <= needed * GB * (1 - MARGIN)  # that budget does fit...
    with pytest.raises(PlanError):
        _plan(needed - 0.1)  # ...and is the smallest, to the 0.1 GB it is rounded to


def test_explicit_choices_override_the_plan():
    assert _plan(80, offload="blocks").offload == "blocks"
    quantized = _plan(80, weights_dtype="int8")
    assert (quantized.offload, quantized.weights_dtype) == ("none", "int8")
    with pytest.raises(PlanError, match="with --offload none"):
        plan_memory(C13, WORK_720P, GPU, 16, Fixed(offload="none"))
    with pytest.raises(InputError, match="--weights-dtype fp16 differs from the transformer dtype bf16"):
        _plan(80, weights_dtype="fp16")
    with pytest.raises(InputError, match="positive"):
        _plan(0)


def test_cached_prompts_free_the_text_stage():
    cached = dataclasses.replace(WORK_720P, encode_prompts=False)
    plan = plan_memory(C13, cached, GPU, 24)
    assert not plan.text_on_cpu and _stage(plan, "text encoding") < GB


def test_the_cpu_plans_fp32_weights():
    cpu = Target.for_device("cpu")
    plan = planner.plan_for(C13, WORK_720P, cpu)
    assert plan.weights_dtype == "fp32"
    assert _stage(plan, "denoising") > 4 * 12.8e9


def test_the_explicit_plan_predicts_more_with_real_cfg_and_more_videos():
    base = planner.plan_for(C13, WORK_720P, GPU)
    bigger = planner.plan_for(C13, dataclasses.replace(WORK_720P, cfg=True, videos=2), GPU)
    assert _stage(bigger, "denoising") > _stage(base, "denoising") + 3 * GB


def test_after_an_out_of_memory_error_a_leaner_plan_is_named():
    failed = planner.plan_for(C13, WORK_720P, GPU)
    better = planner.plan_after_oom(C13, WORK_720P, GPU, failed, available=24 * GB)
    assert better is not None and better.peak < min(failed.peak, 24 * GB * (1 - MARGIN))
    assert better.offload == "blocks"
    assert planner.plan_after_oom(C13, WORK_720P, GPU, failed, available=GB) is None


def test_describe_and_flags():
    plan = _plan(16)
    assert plan.flags() == "--offload blocks --weights-dtype bf16"
    assert "streamed" in plan.describe() and "prompt encoders on the CPU" in plan.describe()
    assert [line.split()[0] for line in plan.peak_lines()] == ["text", "image", "denoising", "decoding"]


# ---------------------------------------------------------------------------------------------
# The walks against real runs (live tensor bytes; the margin covers what they leave out)


def _ratio(predicted: int, measured: int) -> float:
    return predicted / measured


def _zero_vae(cfg) -> CausalVAE:
    """A VAE with zero weights: the memory a decode takes does not depend on the values, and zeroing is far
    cheaper than the random initialisation of the 13B VAE's 250 M parameters."""
    vae = CausalVAE(cfg, device="meta").to_empty(device="cpu")
    for t in [*vae.parameters(), *vae.buffers()]:
        t.data.zero_()
    return vae.eval()


@pytest.mark.parametrize("base", [TINY_TEST, TINY_TEST_33CH])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("ff_chunk,attention,storage", [
    (None, None, None), (32, None, None), (32, "chunked:1", None), (None, None, "int8"), (32, None, "fp8"),
])
def test_denoise_activations_match_a_real_forward(base, dtype, ff_chunk, attention, storage):
    cfg = dataclasses.replace(base.transformer, hidden_size=128, num_heads=2, rope_axes_dim=(16, 24, 24))
    model = HunyuanVideoTransformer(cfg).eval().to(dtype)
    if storage:
        quantize_model(model, storage)
    model.cpu_fp32_matmul = False  # the upcasting mode makes copies the planner does not model
    model.set_ff_chunk_tokens(ff_chunk)
    model.set_attention_backend(attention)
    b, frames, h, w, text = 2, 3, 16, 16, 12
    mask = torch.ones(b, text)
    mask[0, 9:] = 0
    args = (torch.randn(b, cfg.in_channels, frames, h, w), torch.tensor([500.0] * b),
            torch.randn(b, text, cfg.text_states_dim), mask, torch.randn(b, cfg.text_states_dim_2))
    with torch.no_grad(), LiveTensorBytes() as live:
        model(*args, guidance=torch.tensor([6000.0] * b) if cfg.guidance_embed else None)
    predicted = planner.denoise_activation_bytes(cfg, frames * h * w // 4, text, b, dtype, ff_chunk, attention,
                                                 "cpu", quantized=storage is not None)
    assert 0.95 <= _ratio(predicted, live.peak) <= 1.2


VAE_CASES = {
    "tiny": (TINY_VAE, (3, 8, 8)),
    "tiny-long": (TINY_VAE, (9, 6, 10)),
    "widening-no-attention": (dataclasses.replace(TINY_VAE, block_out_channels=(8, 16, 16, 24),
                                                  mid_block_add_attention=False), (5, 6, 6)),
    "13b-channels": (VAEConfig(), (2, 4, 6)),
}


@pytest.mark.parametrize("case", sorted(VAE_CASES))
@pytest.mark.parametrize("lean", [False, True])
def test_decoder_walk_matches_a_real_decode(case, lean):
    cfg, shape = VAE_CASES[case]
    vae = _zero_vae(cfg)
    z = torch.randn(1, cfg.latent_channels, *shape)
    with torch.no_grad(), LiveTensorBytes() as live:
        vae.decode(z, tiled=False, lean=lean)
    assert 0.99 <= _ratio(planner.decoder_walk(cfg, shape, torch.float32, lean).peak, live.peak) <= 1.1


def test_lean_walk_follows_the_chunks(monkeypatch):
    """With a small chunk budget the lean decoder splits every convolution into single frames."""
    import hunyuan_i2v.model.vae as vae_module

    monkeypatch.setattr(vae_module, "_CHUNK_BYTES", 64 * 1024)
    cfg, shape = VAE_CASES["tiny-long"]
    vae = _zero_vae(cfg)
    with torch.no_grad(), LiveTensorBytes() as live:
        vae.decode(torch.randn(1, cfg.latent_channels, *shape), tiled=False, lean=True)
    predicted = planner.decoder_walk.__wrapped__(cfg, shape, torch.float32, True).peak
    assert 0.99 <= _ratio(predicted, live.peak) <= 1.1
    assert predicted < 0.5 * planner.decoder_walk(cfg, shape, torch.float32, False).peak


@pytest.mark.parametrize("case", sorted(VAE_CASES))
def test_encoder_walk_matches_a_real_encode(case):
    cfg, (_, h, w) = VAE_CASES[case]
    vae = _zero_vae(cfg)
    pixels = torch.randn(2, 3, 1, 8 * h, 8 * w)
    with torch.no_grad(), LiveTensorBytes() as live:
        vae.encode(pixels, tiled=False)
    predicted = planner.encoder_peak_bytes(cfg, 2, 8 * h, 8 * w, torch.float32)
    # the pixels are made outside the measured block but counted by the planner (they are on the device)
    assert 1.0 <= _ratio(predicted, live.peak + pixels.numel() * 4) <= 1.1


def test_the_tiling_mirrors_the_decoder():
    """The tiles the planner counts are the ones decode_stream runs: one chunk per temporal tile."""
    cfg = dataclasses.replace(TINY_VAE, tile_sample_size=32, tile_sample_frames=16)
    vae = CausalVAE(cfg).eval()
    latents = torch.randn(1, 4, 9, 6, 10)
    calls = []
    vae.decoder.register_forward_pre_hook(lambda m, args: calls.append(tuple(args[0].shape[2:])))
    with torch.no_grad():
        chunks = list(vae.decode_stream(latents))
    tiling = planner._decode_tiling(cfg, (9, 6, 10), None, None)
    assert tiling.tiles == len(calls)
    assert tuple(max(c[i] for c in calls) for i in range(3)) == tiling.tile_latents
    assert max(c.shape[2] for c in chunks) == tiling.chunk_frames


def test_weights_of_the_13b_blocks_halve_when_quantized():
    bf16 = planner.transformer_weights(C13.transformer, "bf16", torch.bfloat16)
    int8 = planner.transformer_weights(C13.transformer, "int8", torch.bfloat16)
    assert len(bf16.blocks) == 60 and int8.resident == bf16.resident
    assert 0.5 < sum(int8.blocks) / sum(bf16.blocks) < 0.51
    assert sum(bf16.block_params) + bf16.resident // 2 == 12_821_012_544


def test_text_encoder_params_count_what_the_loaders_load(tmp_path):
    from hunyuan_i2v.pipeline import PromptEncoderFiles
    from tiny_components import build_tiny_model, clip_text_model

    tiny = build_tiny_model(tmp_path / "src")
    root = tiny.save(tmp_path / "official", "official")
    folders = PromptEncoderFiles(root, tiny.config.text).folders()
    loaded = [tiny.llava.model, clip_text_model(tiny.clip_full)]  # no lm_head, no CLIP vision tower
    assert planner.text_encoder_params(folders) == sum(p.numel() for m in loaded for p in m.parameters())


# ---------------------------------------------------------------------------------------------
# LoRA training (train/lora.py): the step's walk against a real step, and the 13B model at 360p


def _lora_step_live_bytes(cfg, dtype, storage, checkpointing, batch, frames, size, text):
    from hunyuan_i2v.train.lora import attach_trainable_loras, lora_loss

    model = HunyuanVideoTransformer(cfg).to(dtype)
    if storage:
        quantize_model(model, storage)
    attach_trainable_loras(model, 4, 4.0)
    model.train().enable_gradient_checkpointing(checkpointing)
    g = torch.Generator().manual_seed(0)
    states = (torch.randn(batch, text, cfg.text_states_dim), torch.ones(batch, text),
              torch.randn(batch, cfg.text_states_dim_2))
    latent_frames = (frames - 1) // 4 + 1
    with LiveTensorBytes() as live:  # the step makes its latents, as LoraTask.train_step does
        x0 = torch.randn(batch, cfg.in_channels, latent_frames, size // 8, size // 8, generator=g)
        noise = torch.randn(x0.shape, generator=g)
        loss = lora_loss(model, x0, x0[:, :, :1].clone(), noise, torch.rand(batch, generator=g), states)
        loss.backward()
    return live.peak


@pytest.mark.parametrize("dtype,storage,checkpointing,batch,frames,text", [
    (torch.float32, None, True, 1, 9, 12),
    (torch.bfloat16, None, True, 1, 9, 12),
    (torch.float32, "int8", True, 1, 9, 12),
    (torch.float32, None, False, 1, 9, 12),
    (torch.bfloat16, None, False, 1, 9, 12),
    (torch.float32, None, True, 2, 9, 40),
    (torch.float32, None, True, 1, 17, 12),
])
def test_lora_training_walk_matches_a_real_step(dtype, storage, checkpointing, batch, frames, text):
    """Activations (the block inputs kept for backward, one block's recompute + backward, the rest) and the
    adapters' gradients, predicted against the live tensor bytes of a forward + backward of a real step on a
    small model (hidden 64, 2 + 2 blocks, rank 4): within 0.95-1.2 (measured 1.04-1.13)."""
    cfg = dataclasses.replace(TINY_TEST.transformer, guidance_embed=False, condition_type="token_replace",
                              rope_axes_dim=(8, 12, 12))
    config = dataclasses.replace(TINY_TEST, transformer=cfg)
    size = 256  # 32 x 32 latents: the block activations dominate the step, as they do at 360p
    measured = _lora_step_live_bytes(cfg, dtype, storage, checkpointing, batch, frames, size, text)
    plan = planner.plan_lora_training(config, size, size, frames, Target("cpu", dtype), storage, "none",
                                      checkpointing, rank=4, batch=batch, text_len=text)
    assert 0.95 <= _ratio(plan.activations + plan.gradients, measured) <= 1.2


def test_lora_training_of_the_13b_model_at_360p_fits_24_gb_streamed():
    """360p (352x608, the 16:9 bucket) x 129 frames, rank 64, bf16 compute on a GPU: the int8 base streamed with
    the checkpointed block inputs in host memory fits 24 GB with room; every resident base needs more."""
    plans = {(p.offload, p.weights_dtype, p.grad_checkpointing, p.offload_activations): (p, fit)
             for p, fit in planner.lora_training_table(C13, 352, 608, 129, GPU, 24)}
    streamed, fits = plans[("blocks", "int8", True, True)]
    assert fits and streamed.peak < 16 * GB
    assert (streamed.video_tokens, streamed.text_tokens) == (27588, 396)
    assert streamed.adapters == 4 * 326_569_984 and streamed.optimizer == 2 * streamed.adapters  # 325 layers
    # the block inputs: one [27984, 3072] bf16 stream per block, 60 blocks, when they stay on the device
    kept, _ = plans[("blocks", "int8", True, False)]
    assert kept.checkpoints == 60 * 27984 * 3072 * 2 and kept.peak > streamed.peak + 9 * GB
    assert not any(fit for (offload, *_), (p, fit) in plans.items() if offload == "none")
    with pytest.raises(InputError, match="needs --grad-checkpointing"):
        planner.plan_lora_training(C13, 352, 608, 129, GPU, "int8", "blocks", grad_checkpointing=False)


def test_the_8bit_optimizer_plans_a_quarter_of_the_optimizer_state():
    """adamw8bit: two 1-byte codes per trainable parameter and two fp32 scales per 256-element block of each
    adapter tensor, instead of AdamW's 8 bytes: 0.62 GB instead of 2.43 GB (2^30 bytes) for the 13B model at
    rank 64."""
    args = (C13, 352, 608, 129, GPU, "int8", "blocks", True, 64, 1, None, True)
    fp32, int8 = (planner.plan_lora_training(*args, optimizer=name) for name in ("adamw", "adamw8bit"))
    params = 326_569_984
    assert fp32.optimizer == 8 * params and fp32.optimizer_name == "adamw"
    # every adapter tensor of the 13B model is a whole number of blocks (r = 64 times a multiple of 4)
    assert int8.optimizer == 2 * params + 2 * 4 * params // 256
    assert 0.25 < int8.optimizer / fp32.optimizer < 0.254
    assert int8.weights == fp32.weights and int8.checkpoints == fp32.checkpoints and int8.block == fp32.block
    assert fp32.peak - int8.peak > 1.8 * GB
    assert "--optimizer adamw8bit" in int8.flags() and "8-bit" in "\n".join(int8.lines())
    assert "--optimizer" not in fp32.flags()
    with pytest.raises(InputError, match="--optimizer is one of adamw, adamw8bit"):
        planner.plan_lora_training(*args, optimizer="sgd")
