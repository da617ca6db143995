"""Weight residency (issue 5, item 1): block streaming from safetensors and host memory, model-level offload.

Streaming must give exactly the all-resident output and hold only the running block plus the prefetched ones."""

import dataclasses

import pytest
import torch

from hunyuan_i2v.errors import CheckpointError
from hunyuan_i2v.memory import quant
from hunyuan_i2v.memory.offload import (
    MappedSafetensors,
    ModelOffloader,
    load_streamed_transformer,
    move_module,
    on_device,
    stream_transformer,
)
from tiny_components import random_transformer
from hunyuan_i2v.model.transformer import HunyuanVideoTransformer
from hunyuan_i2v.weights import save_transformer




def _inputs(model: HunyuanVideoTransformer):
    cfg = model.config
    mask = torch.ones(2, 12)
    mask[0, 7:] = 0
    g = torch.tensor([6016.0, 3008.0]) if cfg.guidance_embed else None
    args = (torch.randn(2, cfg.in_channels, 3, 8, 6), torch.tensor([700.0, 250.0]),
            torch.randn(2, 12, cfg.text_states_dim), mask, torch.randn(2, cfg.text_states_dim_2))
    return args, g


def _forward(model, inputs, g):
    with torch.no_grad():
        return model(*inputs, guidance=g)


def _block_is_meta(block) -> bool:
    return all(t.is_meta for t in block.state_dict().values())


def _blocks(model):
    return list(model.double_blocks) + list(model.single_blocks)


@pytest.mark.parametrize("condition_type,naming,prefetch", [
    ("token_replace", "official", 1), ("token_replace", "diffusers", 2), ("latent_concat", "official", 0),
])
def test_streaming_from_safetensors_is_exact(tmp_path, condition_type, naming, prefetch):
    model = random_transformer(condition_type)
    inputs, g = _inputs(model)
    expected = _forward(model, inputs, g)
    path = save_transformer(model, tmp_path / "t.safetensors", format="safetensors", naming=naming)

    streamer = load_streamed_transformer(path, prefetch=prefetch)
    streamed = streamer.model
    assert all(_block_is_meta(b) for b in _blocks(streamed))  # nothing of the blocks read yet
    assert not any(t.is_meta for k, t in streamed.state_dict().items() if not k.startswith(("double", "single")))
    for _ in range(2):  # the second step starts from the blocks prefetched at the end of the first
        assert torch.equal(_forward(streamed, inputs, g), expected)
    assert streamer.loads == 2 * len(_blocks(streamed))
    assert all(_block_is_meta(b) for b in _blocks(streamed))  # between steps: placeholders only
    streamer.remove()


def test_streaming_a_sharded_diffusers_folder_into_a_model_with_weights(tmp_path):
    model = random_transformer()
    inputs, g = _inputs(model)
    expected = _forward(model, inputs, g)
    files = save_transformer(model, tmp_path / "transformer", format="diffusers", max_shard_size=200_000)
    assert len(list(files.glob("*.safetensors"))) > 2
    with stream_transformer(model, files, "cpu") as streamer:  # frees the blocks' own copies
        assert all(_block_is_meta(b) for b in _blocks(model))
        assert torch.equal(_forward(model, inputs, g), expected)
        assert streamer.held() == [0]  # the next step's first block, prefetched


@pytest.mark.parametrize("prefetch", [0, 1, 3])
def test_streaming_holds_the_running_block_and_the_prefetched_ones(tmp_path, prefetch):
    model = random_transformer()
    inputs, g = _inputs(model)
    path = save_transformer(model, tmp_path / "t.safetensors", format="safetensors")
    streamer = load_streamed_transformer(path, prefetch=prefetch)
    blocks = _blocks(streamer.model)
    seen = []

    def census(module, args):  # runs after the streamer's own pre-hook
        materialised = [b for b in blocks if not _block_is_meta(b)]
        seen.append((materialised == [module], len(streamer.held())))

    hooks = [b.register_forward_pre_hook(census) for b in blocks]
    _forward(streamer.model, inputs, g)
    for h in hooks:
        h.remove()
    assert len(seen) == len(blocks)
    assert all(only_running for only_running, _ in seen)
    assert max(n for _, n in seen) == 1 + prefetch
    streamer.remove()


def test_streaming_from_host_memory_is_exact_and_remove_restores_the_model():
    model = random_transformer()
    inputs, g = _inputs(model)
    expected = _forward(model, inputs, g)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    streamer = stream_transformer(model)  # source None: the blocks' own tensors, kept on the host
    assert all(_block_is_meta(b) for b in _blocks(model))
    assert torch.equal(_forward(model, inputs, g), expected)
    streamer.remove()
    restored = model.state_dict()
    assert all(torch.equal(restored[k], v) for k, v in state.items())
    assert torch.equal(_forward(model, inputs, g), expected)


def test_streaming_quantized_blocks_from_a_quantized_file(tmp_path):
    model = quant.quantize_model(random_transformer(), "int8")
    inputs, g = _inputs(model)
    expected = _forward(model, inputs, g)
    from hunyuan_i2v.weights import transformer_config_to_diffusers
    import json

    path = quant.save_quantized(model, tmp_path / "q.safetensors",
                                metadata={"config": json.dumps(transformer_config_to_diffusers(model.config))})
    with load_streamed_transformer(path) as streamer:
        assert isinstance(streamer.model.single_blocks[0].linear1, quant.QuantizedLinear)
        assert torch.equal(_forward(streamer.model, inputs, g), expected)


def test_transform_quantizes_blocks_while_they_stream(tmp_path):
    """A full-precision file streamed into a model with quantized layers, quantizing each block as it is read."""
    model = random_transformer()
    path = save_transformer(model, tmp_path / "t.safetensors", format="safetensors")
    reference = quant.quantize_model(random_transformer(), "int8")
    inputs, g = _inputs(reference)
    expected = _forward(reference, inputs, g)

    target = HunyuanVideoTransformer(model.config, device="meta").eval()
    quant.prepare_quantized_layers(target, quant.quantized_layers(reference))

    def quantize(prefix, tensors):
        out = dict(tensors)
        for name in list(tensors):
            layer = name[: -len(".weight")]
            if name.endswith(".weight") and f"{prefix}{layer}" in quant.quantized_layers(reference):
                out[name], out[layer + ".weight_scale"] = quant.quantize_weight(tensors[name], "int8")
        return out

    with stream_transformer(target, path, "cpu", transform=quantize):
        assert torch.equal(_forward(target, inputs, g), expected)


def test_a_file_that_does_not_fit_is_refused_before_streaming(tmp_path):
    model = random_transformer()
    path = save_transformer(model, tmp_path / "t.safetensors", format="safetensors")
    other = HunyuanVideoTransformer(dataclasses.replace(model.config, depth_single=3), device="meta")
    with pytest.raises(CheckpointError, match="missing key"):
        stream_transformer(other, path, "cpu")
    pt = save_transformer(model, tmp_path / "t.pt", format="official-pt")
    with pytest.raises(ValueError, match="safetensors"):
        stream_transformer(random_transformer(), pt, "cpu")


def test_mapped_safetensors_reads_views_without_copies(tmp_path):
    model = random_transformer()
    path = save_transformer(model, tmp_path / "t.safetensors", format="safetensors")
    files = MappedSafetensors([path])
    key = "single_blocks.1.linear1.weight"
    t = files.tensor(key)
    assert torch.equal(t, model.state_dict()[key])
    twice = files.tensor(key)
    assert t.data_ptr() == twice.data_ptr()  # both view the same mapped bytes
    files.release([key])  # pages unmapped: a later read maps them again from the file
    assert torch.equal(t, model.state_dict()[key])
    del t, twice
    files.close()


def test_move_module_skips_meta_placeholders_of_a_streamed_model():
    model = random_transformer()
    with stream_transformer(model, None, "cpu"):
        with pytest.raises(NotImplementedError):
            model.to("cpu")  # a plain .to() trips over the placeholders
        move_module(model, "cpu")  # moves the resident part, leaves the placeholders
        assert all(_block_is_meta(b) for b in _blocks(model))


def test_model_offloader_keeps_one_module_active():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    offload = ModelOffloader("cpu")
    assert offload.activate(a) is a and offload.active is a
    with offload.use(b):
        assert offload.active is b
    offload.offload()
    assert offload.active is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device to offload to")
def test_offload_moves_modules_to_the_device_and_back():
    a, b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)
    with on_device(a, "cuda"):
        assert a.weight.is_cuda
    assert not a.weight.is_cuda
    offload = ModelOffloader("cuda")
    offload.activate(a)
    offload.activate(b)
    assert b.weight.is_cuda and not a.weight.is_cuda


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device for the side-stream path")
@pytest.mark.parametrize("from_file", [False, True])
def test_streaming_to_cuda_is_exact(tmp_path, from_file):
    model = random_transformer()
    inputs, g = _inputs(model)
    resident = random_transformer().cuda()
    expected = _forward(resident, [a.cuda() for a in inputs], g.cuda())
    source = save_transformer(model, tmp_path / "t.safetensors", format="safetensors") if from_file else None
    with stream_transformer(model, source, "cuda", prefetch=2):
        got = _forward(model, [a.cuda() for a in inputs], g.cuda())
    assert torch.equal(got, expected)
