"""LoRAs (hunyuan_i2v.lora): the official, diffusers and ComfyUI formats on a tiny random transformer, merging and
unmerging, adapters (also over int8 layers and streamed blocks), the user errors, the pipeline and the CLI."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from safetensors.torch import save_file

from hunyuan_i2v.errors import CheckpointError, InputError, ModelFilesError
from hunyuan_i2v.lora import (
    OFFICIAL_PREFIX,
    LoraLinear,
    apply_loras,
    check_lora_file,
    lora_target_shapes,
    read_lora,
)
from hunyuan_i2v.memory.offload import load_streamed_transformer, stream_transformer
from hunyuan_i2v.memory.quant import QuantizedLinear, dequantize_model, quantize_model
from hunyuan_i2v.weights import save_transformer
from tiny_components import random_transformer

RANK, ALPHA = 4, 8.0  # alpha / r = 2: the stored alpha must count
# PEFT's target_modules of the official trainer (spec 6.2), matched on the last name component like PEFT does
OFFICIAL_TARGETS = ("linear", "fc1", "fc2", "img_attn_qkv", "img_attn_proj", "txt_attn_qkv", "txt_attn_proj",
                    "linear1", "linear2")
# beyond the official trainer's: the halves-swapped final modulation, a refiner qkv and an embedder
EXTRA_TARGETS = ("final_layer.adaLN_modulation.1", "txt_in.individual_token_refiner.blocks.0.self_attn_qkv",
                 "time_in.mlp.0")


def _targets(model, extra=True) -> dict[str, tuple[int, int]]:
    shapes = lora_target_shapes(model)
    return {n: s for n, s in shapes.items()
            if n.rsplit(".", 1)[-1] in OFFICIAL_TARGETS or (extra and n in EXTRA_TARGETS)}


def _factors(targets, seed=1, rank=RANK, dtype=torch.bfloat16) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """module -> (up [out, r], down [r, in]), random, stored in bf16 like the official files."""
    g = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.1).to(dtype)

    return {name: (rand(o, rank), rand(rank, i)) for name, (o, i) in targets.items()}


def official_sd(factors, alpha=ALPHA, prefix=OFFICIAL_PREFIX, dotted=False, up="lora_up", down="lora_down"):
    """The official trainer's naming (spec 6.4): prefix + all dots but the last two replaced by "_"."""
    sd = {}
    for name, (u, d) in factors.items():
        stem = prefix + (name if dotted else name.replace(".", "_"))
        sd[f"{stem}.{down}.weight"], sd[f"{stem}.{up}.weight"] = d, u
        if alpha is not None:
            sd[f"{stem}.alpha"] = torch.tensor(alpha, dtype=d.dtype)
    return sd


# The diffusers names, written out here by hand (not from keymap.py) so the test checks the map independently.
_DOUBLE = {"img_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"),
           "txt_attn_qkv": ("attn.add_q_proj", "attn.add_k_proj", "attn.add_v_proj"),
           "img_attn_proj": "attn.to_out.0", "txt_attn_proj": "attn.to_add_out", "img_mod.linear": "norm1.linear",
           "txt_mod.linear": "norm1_context.linear", "img_mlp.fc1": "ff.net.0.proj", "img_mlp.fc2": "ff.net.2",
           "txt_mlp.fc1": "ff_context.net.0.proj", "txt_mlp.fc2": "ff_context.net.2"}
_SINGLE = {"linear1": ("attn.to_q", "attn.to_k", "attn.to_v", "proj_mlp"), "linear2": "proj_out",
           "modulation.linear": "norm.linear"}
_REFINER = {"self_attn_qkv": ("attn.to_q", "attn.to_k", "attn.to_v"), "mlp.fc1": "ff.net.0.proj",
            "mlp.fc2": "ff.net.2"}
_TOP = {"final_layer.linear": "proj_out", "final_layer.adaLN_modulation.1": "norm_out.linear",
        "time_in.mlp.0": "time_text_embed.timestep_embedder.linear_1"}


def _diffusers_name(name: str):
    parts = name.split(".")
    if parts[0] == "double_blocks":
        return f"transformer_blocks.{parts[1]}.", _DOUBLE[".".join(parts[2:])]
    if parts[0] == "single_blocks":
        return f"single_transformer_blocks.{parts[1]}.", _SINGLE[".".join(parts[2:])]
    if name.startswith("txt_in.individual_token_refiner.blocks."):
        return f"context_embedder.token_refiner.refiner_blocks.{parts[3]}.", _REFINER[".".join(parts[4:])]
    return "", _TOP[name]


def diffusers_sd(factors, hidden=64, separate_downs=False, seed=7):
    """What diffusers makes of an official LoRA: down copied to every part of a fused layer, up split (the
    single blocks' linear1 as [h, h, h, rest]), the final modulation's halves swapped; "transformer." prefix.
    ``separate_downs``: every part gets a fresh down matrix of its own (returned as the exact update too)."""
    g = torch.Generator().manual_seed(seed)
    sd, expected = {}, {}
    for name, (u, d) in factors.items():
        prefix, target = _diffusers_name(name)
        if isinstance(target, tuple):
            sizes = [hidden] * 3 + [u.shape[0] - 3 * hidden] if len(target) == 4 else [u.shape[0] // 3] * 3
            rows = []
            for part, u_part in zip(target, torch.split(u, sizes)):
                d_part = (torch.randn(d.shape, generator=g) * 0.1).to(d.dtype) if separate_downs else d.clone()
                sd[f"transformer.{prefix}{part}.lora_A.weight"] = d_part
                sd[f"transformer.{prefix}{part}.lora_B.weight"] = u_part.contiguous()
                rows.append(u_part.float() @ d_part.float())
            expected[name] = torch.cat(rows)
        else:
            if name == "final_layer.adaLN_modulation.1":
                u = torch.cat(u.chunk(2)[::-1])  # (shift, scale) -> diffusers' (scale, shift)
            sd[f"transformer.{prefix}{target}.lora_A.weight"] = d
            sd[f"transformer.{prefix}{target}.lora_B.weight"] = u.contiguous()
            expected[name] = factors[name][0].float() @ d.float()
    return sd, expected


def _diffusers_metadata(rank=RANK, alpha=ALPHA) -> dict[str, str]:
    info = {"transformer.r": rank, "transformer.lora_alpha": alpha}
    return {"format": "pt", "lora_adapter_metadata": json.dumps(info)}


def _inputs(model):
    cfg = model.config
    mask = torch.ones(2, 12)
    mask[0, 7:] = 0
    g = torch.tensor([6016.0, 3008.0]) if cfg.guidance_embed else None
    gen = torch.Generator().manual_seed(3)
    args = (torch.randn(2, cfg.in_channels, 3, 8, 6, generator=gen), torch.tensor([700.0, 250.0]),
            torch.randn(2, 12, cfg.text_states_dim, generator=gen), mask,
            torch.randn(2, cfg.text_states_dim_2, generator=gen))
    return args, g


def _run(model):
    args, g = _inputs(model)
    with torch.no_grad():
        return model(*args, guidance=g)


def _close(a, b, tol=1e-5):
    return (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item())


@pytest.fixture
def model():
    return random_transformer()


@pytest.fixture
def factors(model):
    return _factors(_targets(model))


# ---------------------------------------------------------------------------------------------
# Formats


def test_an_official_lora_file_merges_exactly_as_predicted(model, factors, tmp_path):
    path = tmp_path / "pytorch_lora_kohaya_weights.safetensors"
    save_file(official_sd(factors), str(path))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    applied = apply_loras(model, [(path, 0.7)])
    assert applied.files[0].format == "official" and applied.files[0].rank == RANK
    assert set(applied.files[0].deltas) == set(factors)
    assert len([n for n in factors if n.startswith("double_blocks.0.")]) == 10  # the trainer's 10 per double block
    after = model.state_dict()
    for key, w in before.items():
        module = key.rpartition(".")[0]
        if key.endswith(".weight") and module in factors:
            up, down = factors[module]
            expected = w + (0.7 * (ALPHA / RANK)) * (up.float() @ down.float())
            assert torch.equal(after[key], expected), key
        else:
            assert torch.equal(after[key], w), key  # biases and untouched layers


@pytest.mark.parametrize("variant", ["diffusers", "diffusers-pt", "comfyui", "comfyui-kohya", "kohya-unet"])
def test_every_format_of_the_same_lora_gives_the_official_output(factors, tmp_path, variant):
    reference = random_transformer()
    base_out = _run(reference)
    apply_loras(reference, [(official_sd(factors), 1.3)])
    expected = _run(reference)
    assert (expected - base_out).abs().max() > 1e-2  # the LoRA changes the output

    metadata = None
    if variant.startswith("diffusers"):
        sd, _ = diffusers_sd(factors)
        metadata = _diffusers_metadata()  # diffusers keeps alpha in the metadata, not per module
    elif variant == "comfyui":
        sd = official_sd(factors, prefix="diffusion_model.", dotted=True, up="lora_B", down="lora_A")
    elif variant == "comfyui-kohya":
        sd = official_sd(factors, prefix="diffusion_model.", dotted=True)
    else:
        sd = official_sd(factors, prefix="lora_unet_")
    if variant == "diffusers-pt":  # torch files carry no metadata: the scale goes into the file's ups
        path = tmp_path / "lora.pt"
        torch.save({k: v * ALPHA / RANK if ".lora_B." in k else v for k, v in sd.items()}, path)
    else:
        path = tmp_path / "lora.safetensors"
        save_file(sd, str(path), metadata=metadata)
    other = random_transformer()
    applied = apply_loras(other, [(path, 1.3)])
    assert applied.files[0].format == {"diffusers": "diffusers", "diffusers-pt": "diffusers", "comfyui": "comfyui",
                                       "comfyui-kohya": "comfyui", "kohya-unet": "kohya"}[variant]
    assert _close(_run(other), expected)


def test_diffusers_parts_with_their_own_down_matrices_merge_exactly(model, factors):
    sd, exact = diffusers_sd(factors, separate_downs=True)
    before = {n: model.get_submodule(n).weight.detach().clone() for n in factors}
    apply_loras(model, [({**sd}, 1.0)])
    for name, w in before.items():
        got = model.get_submodule(name).weight - w
        assert _close(got, exact[name], 1e-6), name  # q, k, v (and the MLP rows) each see only their own down
    lora = read_lora(sd, random_transformer())
    qkv = lora.deltas["double_blocks.0.img_attn_qkv"]
    assert qkv.rank == 3 * RANK  # block structured: still low rank


def test_diffusers_own_conversion_of_an_official_lora_reads_back_the_same(model):
    """Parity with diffusers' converter (_convert_hunyuan_video_lora_to_diffusers), on the layers it converts for
    any width: it hard-codes the 13B width for linear1 and mis-handles the A of the refiner qkv and final adaLN."""
    conversion = pytest.importorskip("diffusers.loaders.lora_conversion_utils")
    factors = _factors(_targets(model, extra=False))
    factors = {n: f for n, f in factors.items() if not n.endswith("linear1")}
    official = official_sd(factors, alpha=None, prefix="diffusion_model.", dotted=True, up="lora_B", down="lora_A")
    converted = conversion._convert_hunyuan_video_lora_to_diffusers(dict(official))
    assert any(k.startswith("transformer.transformer_blocks.0.attn.to_q.") for k in converted)
    ours, theirs = read_lora(official, model), read_lora(converted, model)
    assert ours.format == "comfyui" and theirs.format == "diffusers"
    assert set(ours.deltas) == set(theirs.deltas) == set(factors)
    for name in factors:
        assert torch.equal(ours.deltas[name].delta(), theirs.deltas[name].delta()), name


def test_two_loras_combine_linearly(model, factors):
    other = _factors(_targets(model, extra=False), seed=5, rank=2)
    originals = {n: model.get_submodule(n).weight.detach().clone() for n in factors}

    def delta_of(loras):
        m = copy.deepcopy(model)
        apply_loras(m, loras)
        return {n: m.get_submodule(n).weight - w for n, w in originals.items()}

    one = delta_of([(official_sd(factors), 0.5)])
    two = delta_of([(official_sd(other, alpha=None), -1.5)])
    both = delta_of([(official_sd(factors), 0.5), (official_sd(other, alpha=None), -1.5)])
    assert any(n not in other for n in factors)  # some layers get only the first LoRA
    for name in factors:
        assert _close(both[name], one[name] + two[name], 1e-6), name


def test_unmerge_and_rescaling_are_exact(model, factors):
    base_out = _run(model)
    base_sd = {k: v.clone() for k, v in model.state_dict().items()}
    applied = apply_loras(model, [(official_sd(factors), 1.0)])
    merged = _run(model)
    assert not torch.equal(merged, base_out)
    applied.set_scales([0.25])
    fresh = random_transformer()
    apply_loras(fresh, [(official_sd(factors), 0.25)])
    assert torch.equal(_run(model), _run(fresh))  # rescaled from the kept originals, not on top of the merge
    applied.set_enabled(False)
    assert torch.equal(_run(model), base_out)
    applied.set_enabled(True)
    applied.remove()
    assert torch.equal(_run(model), base_out)
    assert all(torch.equal(v, base_sd[k]) for k, v in model.state_dict().items())
    with pytest.raises(InputError, match="removed"):
        applied.set_scales([1.0])


def test_merging_without_originals_cannot_be_undone(model, factors):
    applied = apply_loras(model, [(official_sd(factors), 1.0)], keep_originals=False)
    assert not applied.exact
    with pytest.raises(InputError, match="keep_originals=False"):
        applied.remove()


# ---------------------------------------------------------------------------------------------
# Adapters


def test_adapters_match_the_merge_and_turn_off_exactly(model, factors):
    base_out = _run(model)
    keys = set(model.state_dict())
    merged = copy.deepcopy(model)
    second = _factors(_targets(model, extra=False), seed=9, rank=2)
    loras = [(official_sd(factors), 0.8), (official_sd(second), -0.6)]
    apply_loras(merged, loras)
    applied = apply_loras(model, loras, mode="adapter")
    assert isinstance(model.get_submodule("single_blocks.0.linear1"), LoraLinear)
    assert set(model.state_dict()) == {k.replace(".weight", ".base.weight").replace(".bias", ".base.bias")
                                       if k.rpartition(".")[0] in factors else k for k in keys}
    assert _close(_run(model), _run(merged))  # the inference path's row-sliced linear1 included
    applied.set_enabled(False)
    assert torch.equal(_run(model), base_out)
    applied.set_enabled(True)
    applied.set_scales([0.0, 0.0])
    assert torch.equal(_run(model), base_out)
    applied.set_scales([0.8, -0.6])
    with torch.enable_grad():  # the training path (autograd, unsliced linear1) agrees too
        args, g = _inputs(model)
        assert _close(model(*args, guidance=g).detach(), _run(merged))
    applied.remove()
    assert set(model.state_dict()) == keys
    assert not any(isinstance(m, LoraLinear) for m in model.modules())
    assert torch.equal(_run(model), base_out)


def test_adapters_over_an_int8_transformer(model, factors):
    quantize_model(model, "int8")
    assert isinstance(model.get_submodule("double_blocks.0.img_attn_qkv"), QuantizedLinear)
    base_out = _run(model)
    reference = dequantize_model(copy.deepcopy(model))  # the same weights in full precision
    apply_loras(reference, [(official_sd(factors), 1.0)], mode="adapter")
    applied = apply_loras(model, [(official_sd(factors), 1.0)], mode="adapter")
    out = _run(model)
    assert _close(out, _run(reference))
    assert (out - base_out).abs().max() > 1e-2
    applied.set_enabled(False)
    assert torch.equal(_run(model), base_out)
    applied.remove()
    assert torch.equal(_run(model), base_out)

    # merging requantizes each row from the merged weight; removing restores the codes exactly
    merged = apply_loras(model, [(official_sd(factors), 1.0)])
    merged_out = _run(model)
    rel = ((merged_out - out).norm() / out.norm()).item()
    assert 0 < rel < 2.5e-2  # int8 rounding of the merged weights (measured 1.5e-2; int8 itself costs ~1.2e-2)
    merged.remove()
    assert torch.equal(_run(model), base_out)


def test_adapters_on_blocks_streamed_from_host_memory(model, factors):
    reference = copy.deepcopy(model)
    apply_loras(reference, [(official_sd(factors), 1.0)], mode="adapter")
    expected = _run(reference)
    with stream_transformer(model, None, "cpu") as streamer:
        with pytest.raises(InputError, match="mode='adapter'"):
            apply_loras(model, [(official_sd(factors), 1.0)])  # merge needs resident weights
        applied = apply_loras(model, [(official_sd(factors), 1.0)], mode="adapter")
        for _ in range(2):
            assert torch.equal(_run(model), expected)
        assert streamer.loads == 2 * 4
        applied.set_enabled(False)
        base = _run(model)
    assert torch.equal(base, _run(random_transformer()))


def test_adapters_on_blocks_streamed_from_a_file(model, factors, tmp_path):
    path = save_transformer(model, tmp_path / "t.safetensors", format="safetensors")
    reference = copy.deepcopy(model)
    apply_loras(reference, [(official_sd(factors), 0.9)], mode="adapter")
    streamer = load_streamed_transformer(path)
    try:
        apply_loras(streamer.model, [(official_sd(factors), 0.9)], mode="adapter")
        assert torch.equal(_run(streamer.model), _run(reference))
        wrapper = streamer.model.get_submodule("double_blocks.1.img_attn_qkv")
        adapter = next(iter(wrapper.adapters.values()))
        assert wrapper.base.weight.is_meta and not adapter.up.is_meta  # the adapter stays resident
    finally:
        streamer.remove()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_adapters_on_blocks_streamed_to_cuda(model, factors):
    reference = copy.deepcopy(model)
    apply_loras(reference, [(official_sd(factors), 1.0)], mode="adapter")
    expected = _run(reference)
    with stream_transformer(model, None, "cuda", prefetch=2):
        apply_loras(model, [(official_sd(factors), 1.0)], mode="adapter")
        adapter = next(iter(model.get_submodule("single_blocks.1.linear1").adapters.values()))
        assert adapter.up.device.type == "cuda"  # beside the resident part, where the streamed blocks compute
        args, g = _inputs(model)
        with torch.no_grad():
            out = model(*(a.cuda() for a in args), guidance=g.cuda()).cpu()
    assert _close(out, expected, 1e-4)


def test_the_13b_official_layout_places_325_modules():
    """The key layout the official trainer writes for the 13B model (spec 6.2, 6.4), checked from shapes alone."""
    from hunyuan_i2v.config import HUNYUAN_I2V_720P
    from hunyuan_i2v.lora import _plan, _Targets

    targets = _Targets.for_config(HUNYUAN_I2V_720P.transformer)
    shapes = {}
    for name, (o, i) in targets.shapes.items():
        if name.rsplit(".", 1)[-1] in OFFICIAL_TARGETS:
            stem = OFFICIAL_PREFIX + name.replace(".", "_")
            shapes.update({f"{stem}.lora_down.weight": (64, i), f"{stem}.lora_up.weight": (o, 64), f"{stem}.alpha": ()})
    plan, fmt = _plan(shapes, targets, "pytorch_lora_kohaya_weights.safetensors", strict=True)
    assert fmt == "official" and len(plan) == 325
    assert sum(64 * sum(targets.shapes[m]) for m in plan) == 326_569_984  # 326.6 M trainable parameters
    assert OFFICIAL_PREFIX + "txt_in_individual_token_refiner_blocks_0_mlp_fc1.lora_down.weight" in shapes


# ---------------------------------------------------------------------------------------------
# Errors


def test_a_lora_for_another_model_size_names_the_layer_and_both_shapes(model, tmp_path):
    first = "double_blocks.1.img_attn_qkv"
    o, i = (2 * n for n in lora_target_shapes(model)[first])  # a model twice as wide
    path = tmp_path / "wide.safetensors"
    save_file(official_sd(_factors({first: (o, i)})), str(path))
    with pytest.raises(CheckpointError) as e:
        apply_loras(model, [(path, 1.0)])
    msg = str(e.value)
    assert f"{OFFICIAL_PREFIX}{first.replace('.', '_')}' does not fit layer {first}" in msg
    assert f"lora_up [{o}, {RANK}] and lora_down [{RANK}, {i}]" in msg
    assert f"the layer's weight is [{o // 2}, {i // 2}]" in msg
    with pytest.raises(CheckpointError, match="does not fit layer"):
        check_lora_file(path, model.config)  # the same answer from the header alone


def test_keys_that_match_nothing_are_listed_with_the_expected_naming(model, factors, tmp_path):
    path = tmp_path / "text_encoder_lora.safetensors"
    save_file({"lora_te_text_model_encoder_layers_0_mlp_fc1.lora_down.weight": torch.zeros(4, 8),
               "lora_te_text_model_encoder_layers_0_mlp_fc1.lora_up.weight": torch.zeros(8, 4)}, str(path))
    with pytest.raises(CheckpointError) as e:
        apply_loras(model, [(path, 1.0)])
    msg = str(e.value)
    assert "none of its 2 tensors" in msg and "lora_te_text_model_encoder_layers_0_mlp_fc1" in msg
    assert OFFICIAL_PREFIX + "double_blocks_0_img_attn_qkv.lora_down.weight" in msg

    partly = {**official_sd(factors), "Hunyuan_video_I2V_lora_double_blocks_9_img_attn_qkv.lora_down.weight":
              torch.zeros(4, 64), "something.else": torch.zeros(1)}
    with pytest.raises(CheckpointError, match=r"2 of its \d+ tensors fit no layer.*double_blocks_9.*strict=False"):
        apply_loras(model, [(partly, 1.0)])
    before = _run(model)
    apply_loras(model, [(partly, 1.0)], strict=False)  # the rest applies
    assert not torch.equal(_run(model), before)


def test_incomplete_and_missing_files_are_refused(model, factors, tmp_path):
    sd = official_sd(factors)
    del sd[OFFICIAL_PREFIX + "single_blocks_0_linear2.lora_up.weight"]
    with pytest.raises(CheckpointError, match="single_blocks_0_linear2.*lora_up"):
        read_lora(sd, model)
    with pytest.raises(ModelFilesError, match="does not exist"):
        apply_loras(model, [(tmp_path / "nope.safetensors", 1.0)])
    with pytest.raises(InputError, match="mode"):
        apply_loras(model, [], mode="fuse")
    with pytest.raises(InputError, match="list of LoRAs"):
        apply_loras(model, str(tmp_path / "x.safetensors"))


# ---------------------------------------------------------------------------------------------
# Pipeline and command line


PROMPT = "the camera pans left"
PIPE_KW = dict(height=32, width=48, num_frames=5, steps=2, seed=3, progress=False, output_type="latent")
SMALL = ["--height", "32", "--width", "48", "--frames", "5", "--steps", "2", "--no-progress"]


@pytest.fixture(scope="module")
def tiny_flat(tmp_path_factory):
    from tiny_components import build_tiny_model

    root = tmp_path_factory.mktemp("lora_model")
    tiny = build_tiny_model(root / "src")
    return tiny, tiny.save(root / "flat", "flat")


@pytest.fixture(scope="module")
def style_lora(tiny_flat, tmp_path_factory):
    tiny, _ = tiny_flat
    path = tmp_path_factory.mktemp("loras") / "style.safetensors"
    save_file(official_sd(_factors(_targets(tiny.transformer)), alpha=2.0 * RANK), str(path))
    return path


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    import numpy as np
    from PIL import Image

    path = tmp_path_factory.mktemp("photo") / "photo.png"
    rng = np.random.default_rng(0)
    Image.fromarray((rng.random((64, 96, 3)) * 255).astype(np.uint8)).save(path)
    return path


def test_the_pipeline_applies_changes_and_unloads_loras(tiny_flat, style_lora, photo):
    from hunyuan_i2v.pipeline import I2VPipeline

    _, flat = tiny_flat
    base = I2VPipeline.from_pretrained(flat, device="cpu")(photo, PROMPT, **PIPE_KW).latents
    pipe = I2VPipeline.from_pretrained(flat, device="cpu", loras=[(style_lora, 0.8)])
    assert pipe.loras == [{"name": "style.safetensors", "scale": 0.8}] and pipe.lora_mode == "merge"
    merged = pipe(photo, PROMPT, **PIPE_KW).latents
    assert (merged - base).abs().max() > 1e-3
    pipe.unload_loras()  # merged into a checkpoint's transformer: reloaded from the file, exactly the base
    assert torch.equal(pipe(photo, PROMPT, **PIPE_KW).latents, base)
    pipe.load_loras([(style_lora, 0.8)], mode="adapter")
    adapted = pipe(photo, PROMPT, **PIPE_KW).latents
    assert _close(adapted, merged)
    assert isinstance(pipe.transformer.get_submodule("double_blocks.0.img_attn_qkv"), LoraLinear)
    pipe.set_lora_scales([0.0])
    assert torch.equal(pipe(photo, PROMPT, **PIPE_KW).latents, base)
    pipe.unload_loras()
    assert pipe.loras == [] and not any(isinstance(m, LoraLinear) for m in pipe.transformer.modules())

    streamed = I2VPipeline.from_pretrained(flat, device="cpu", offload="blocks", loras=[(style_lora, 0.8)])
    assert _close(streamed(photo, PROMPT, **PIPE_KW).latents, merged)  # merge falls back to adapters
    assert streamed._streamer is not None and streamed._applied_loras.mode == "adapter"


def test_the_pipeline_checks_lora_files_before_loading_anything(tiny_flat, tmp_path):
    from hunyuan_i2v.pipeline import I2VPipeline

    tiny, flat = tiny_flat
    wide = {n: (2 * o, 2 * i) for n, (o, i) in _targets(tiny.transformer).items()}
    path = tmp_path / "wide.safetensors"
    save_file(official_sd(_factors(wide)), str(path))
    with pytest.raises(CheckpointError, match="does not fit layer"):
        I2VPipeline.from_pretrained(flat, device="cpu", loras=[(path, 1.0)])
    with pytest.raises(ModelFilesError):
        I2VPipeline.from_pretrained(flat, device="cpu", loras=[tmp_path / "missing.safetensors"])
    with pytest.raises(InputError, match="mode"):
        I2VPipeline.from_pretrained(flat, device="cpu", lora_mode="fuse")


def test_cli_generate_with_loras_records_them_in_the_video(tiny_flat, style_lora, photo, tmp_path, capsys):
    from hunyuan_i2v.cli import main
    from hunyuan_i2v.video import read_video

    _, flat = tiny_flat
    out = tmp_path / "v.mp4"
    code = main(["generate", str(photo), PROMPT, "--model", str(flat), "-o", str(out), "--seed", "2",
                 "--lora", f"{style_lora}:0.5", "--lora", str(style_lora), "--lora-mode", "adapter", *SMALL])
    assert code == 0, capsys.readouterr().err
    meta = read_video(out)[2]
    assert meta["loras"] == [{"name": "style.safetensors", "scale": 0.5}, {"name": "style.safetensors", "scale": 1.0}]
    assert meta["lora_mode"] == "adapter"


@pytest.mark.parametrize("lora,match", [("missing.safetensors", "no such file"),
                                        ("wide.safetensors", "does not fit layer"),
                                        ("wide.safetensors:inf", "finite number")])
def test_cli_refuses_a_bad_lora_in_one_line(tiny_flat, photo, tmp_path, capsys, lora, match):
    from hunyuan_i2v.cli import main

    tiny, flat = tiny_flat
    wide = {n: (2 * o, 2 * i) for n, (o, i) in _targets(tiny.transformer).items()}
    save_file(official_sd(_factors(wide)), str(tmp_path / "wide.safetensors"))
    out = tmp_path / "out" / "v.mp4"
    code = main(["generate", str(photo), PROMPT, "--model", str(flat), "-o", str(out),
                 "--lora", str(tmp_path / lora), *SMALL])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("error: ") and len(err.splitlines()) == 1, err
    assert match in err and not out.exists()
