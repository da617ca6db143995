"""Checkpoint detection, loading, saving and conversion (hunyuan_i2v.weights), on tiny random models (CPU, fp32).

Round trips must reproduce the model bit for bit; diffusers (an independent implementation) must load the folders
we write and we must load the folders it writes; broken files must fail loudly, naming the file and the key.
"""

import json
import pickle

import pytest
import torch
from safetensors.torch import load_file, save_file

from hunyuan_i2v import weights as W
from hunyuan_i2v.config import HUNYUAN_I2V_33CH, HUNYUAN_I2V_720P, TINY_TEST, TINY_TEST_33CH, VAEConfig
from hunyuan_i2v.errors import CheckpointError, ModelFilesError
from hunyuan_i2v.keymap import official_to_diffusers
from hunyuan_i2v.model.transformer import HunyuanVideoTransformer, count_parameters

TINY_ROPE = TINY_TEST.transformer.rope_axes_dim
CONFIGS = {"token_replace": TINY_TEST.transformer, "latent_concat": TINY_TEST_33CH.transformer}


class Arbitrary:
    """A class weights_only unpickling must refuse."""

    def __init__(self):
        self.payload = torch.zeros(2)


def random_transformer(cfg, dtype=torch.float32) -> HunyuanVideoTransformer:
    model = HunyuanVideoTransformer(cfg, dtype=dtype)
    with torch.no_grad():
        for p in model.parameters():  # every tensor random, so a wrong or swapped key shows in the output
            p.normal_(0.0, 0.1)
    return model.eval()


def inputs(cfg, seed=1):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, cfg.in_channels, 3, 8, 6, generator=g)
    t = torch.tensor([700.0, 250.0])
    text = torch.randn(2, 12, cfg.text_states_dim, generator=g)
    mask = torch.ones(2, 12)
    mask[0, 7:] = 0  # right-padded, as both implementations assume
    pooled = torch.randn(2, cfg.text_states_dim_2, generator=g)
    guidance = torch.tensor([6000.0, 3500.0]) if cfg.guidance_embed else None
    return x, t, text, mask, pooled, guidance


def run(model, cfg):
    with torch.no_grad():
        return model(*inputs(cfg))


def assert_same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


def leftovers(folder):
    return [p.name for p in folder.rglob("*") if ".tmp" in p.name]


# ---------------------------------------------------------------------------------------------
# Round trips through every format


SAVES = {  # name -> (save kwargs, dest name, expected kind, expected naming)
    "official-pt": (dict(format="official-pt"), "mp_rank_00_model_states.pt", "official-pt", "official"),
    "diffusers": (dict(format="diffusers"), "transformer", "diffusers-folder", "diffusers"),
    "diffusers-sharded": (dict(format="diffusers", max_shard_size=40_000), "transformer", "diffusers-folder",
                          "diffusers"),
    "safetensors-official": (dict(format="safetensors"), "t.safetensors", "safetensors", "official"),
    "safetensors-diffusers": (dict(format="safetensors", naming="diffusers"), "t.safetensors", "safetensors",
                              "diffusers"),
}


@pytest.mark.parametrize("condition", ["token_replace", "latent_concat"])
@pytest.mark.parametrize("save", list(SAVES))
def test_round_trip_gives_identical_outputs(tmp_path, save, condition):
    cfg = CONFIGS[condition]
    model = random_transformer(cfg)
    kwargs, name, kind, naming = SAVES[save]
    dest = W.save_transformer(model, tmp_path / name, **kwargs)

    info = W.detect_checkpoint(dest)
    assert (info.kind, info.naming) == (kind, naming)
    if save == "diffusers-sharded":
        assert len(info.files) > 2 and (dest / "diffusion_pytorch_model.safetensors.index.json").is_file()
        assert not (dest / "diffusion_pytorch_model.safetensors").exists()
    # A .pt carries no config and head_dim 32 leaves RoPE unknown: it must say so, then load with a config.
    if save == "official-pt":
        with pytest.raises(CheckpointError, match="rope_axes_dim"):
            W.load_transformer(dest)
        loaded = W.load_transformer(dest, config=cfg)
    else:
        loaded = W.load_transformer(dest)
    assert loaded.config == cfg
    assert_same_weights(model, loaded)
    assert torch.equal(run(loaded, cfg), run(model, cfg))
    assert leftovers(tmp_path) == []


def test_config_inferred_from_shapes_in_both_namings():
    for condition, cfg in CONFIGS.items():
        sd = random_transformer(cfg).state_dict()
        assert W.transformer_config_from_state_dict(sd, rope_axes_dim=TINY_ROPE) == cfg
        assert W.transformer_config_from_state_dict(official_to_diffusers(sd), rope_axes_dim=TINY_ROPE) == cfg
        shapes = {k: list(v.shape) for k, v in sd.items()}  # plain shapes work too
        inferred = W.transformer_config_from_state_dict(shapes, rope_axes_dim=TINY_ROPE)
        assert inferred.condition_type == condition
        assert inferred.guidance_embed == (condition == "token_replace")


def test_diffusers_config_round_trip():
    for cfg in (*CONFIGS.values(), HUNYUAN_I2V_720P.transformer, HUNYUAN_I2V_33CH.transformer):
        d = W.transformer_config_to_diffusers(cfg)
        assert W.transformer_config_from_diffusers(json.loads(json.dumps(d))) == cfg
    with pytest.raises(CheckpointError, match="AutoencoderKLHunyuanVideo"):
        W.transformer_config_from_diffusers({"_class_name": "AutoencoderKLHunyuanVideo"})


# ---------------------------------------------------------------------------------------------
# The 13B model on the meta device


def test_13b_meta_state_dict_matches_official_table_and_infers_its_config():
    cfg = HUNYUAN_I2V_720P.transformer
    model = HunyuanVideoTransformer(cfg, device="meta")
    shapes = {k: list(v.shape) for k, v in model.state_dict().items()}
    table = {  # spec 1.9
        "img_in.proj.weight": [3072, 16, 1, 2, 2],
        "txt_in.input_embedder.weight": [3072, 4096],
        "txt_in.t_embedder.mlp.0.weight": [3072, 256],
        "txt_in.c_embedder.linear_1.weight": [3072, 4096],
        "txt_in.individual_token_refiner.blocks.1.self_attn_qkv.weight": [9216, 3072],
        "txt_in.individual_token_refiner.blocks.1.mlp.fc1.weight": [12288, 3072],
        "txt_in.individual_token_refiner.blocks.1.adaLN_modulation.1.weight": [6144, 3072],
        "time_in.mlp.2.weight": [3072, 3072],
        "guidance_in.mlp.0.weight": [3072, 256],
        "vector_in.in_layer.weight": [3072, 768],
        "double_blocks.19.img_mod.linear.weight": [18432, 3072],
        "double_blocks.0.img_attn_qkv.bias": [9216],
        "double_blocks.0.img_attn_q_norm.weight": [128],
        "double_blocks.0.txt_mlp.fc2.weight": [3072, 12288],
        "single_blocks.0.linear1.weight": [21504, 3072],
        "single_blocks.39.linear2.weight": [3072, 15360],
        "single_blocks.0.modulation.linear.weight": [9216, 3072],
        "final_layer.linear.weight": [64, 3072],
        "final_layer.adaLN_modulation.1.weight": [6144, 3072],
    }
    for key, shape in table.items():
        assert shapes[key] == shape, key
    assert "double_blocks.20.img_mod.linear.weight" not in shapes and "single_blocks.40.linear1.bias" not in shapes
    prefixes = {k.split(".")[0] for k in shapes}
    assert prefixes == {"img_in", "txt_in", "time_in", "vector_in", "guidance_in", "double_blocks", "single_blocks",
                        "final_layer"}
    assert count_parameters(model) == 12_821_012_544
    assert W.transformer_config_from_state_dict(model.state_dict()) == cfg
    assert W.transformer_config_from_state_dict(shapes) == cfg
    meta33 = HunyuanVideoTransformer(HUNYUAN_I2V_33CH.transformer, device="meta").state_dict()
    assert list(meta33["img_in.proj.weight"].shape) == [3072, 33, 1, 2, 2]
    assert W.transformer_config_from_state_dict(meta33) == HUNYUAN_I2V_33CH.transformer


# ---------------------------------------------------------------------------------------------
# Independent check: diffusers reads what we write, we read what diffusers writes


@pytest.mark.parametrize("condition", ["token_replace", "latent_concat"])
def test_diffusers_loads_our_folder(tmp_path, condition):
    diffusers = pytest.importorskip("diffusers")
    cfg = CONFIGS[condition]
    model = random_transformer(cfg)
    folder = W.save_transformer(model, tmp_path / "transformer", format="diffusers", max_shard_size="100KB")
    peer = diffusers.HunyuanVideoTransformer3DModel.from_pretrained(folder).eval()
    x, t, text, mask, pooled, guidance = inputs(cfg)
    with torch.no_grad():
        expected = peer(x, t, text, mask.long(), pooled, guidance=guidance, return_dict=False)[0]
    got = run(model, cfg)
    assert expected.abs().max() > 0.1
    assert (got - expected).abs().max().item() <= 1e-5


def test_we_load_diffusers_save_pretrained(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    cfg = CONFIGS["token_replace"]
    peer = diffusers.HunyuanVideoTransformer3DModel(**{
        k: v for k, v in W.transformer_config_to_diffusers(cfg).items() if not k.startswith("_")}).eval()
    with torch.no_grad():
        for p in peer.parameters():
            p.normal_(0.0, 0.1)
    x, t, text, mask, pooled, guidance = inputs(cfg)
    with torch.no_grad():
        expected = peer(x, t, text, mask.long(), pooled, guidance=guidance, return_dict=False)[0]
    peer.save_pretrained(tmp_path / "one" / "transformer")
    peer.save_pretrained(tmp_path / "sharded", max_shard_size="50KB")
    for path in (tmp_path / "one", tmp_path / "sharded"):  # a model root and a sharded transformer folder
        ours = W.load_transformer(path)
        assert ours.config == cfg
        assert (run(ours, cfg) - expected).abs().max().item() <= 1e-5
    assert len(W.detect_checkpoint(tmp_path / "sharded").files) > 1


# ---------------------------------------------------------------------------------------------
# Official layouts and wrappers


def test_official_layouts_and_wrappers(tmp_path):
    cfg = CONFIGS["latent_concat"]
    model = random_transformer(cfg)
    sd = model.state_dict()
    root = tmp_path / "ckpts"
    pt = root / "hunyuan-video-i2v-720p" / "transformers" / "mp_rank_00_model_states.pt"
    W.save_transformer(model, pt)
    assert set(torch.load(pt, weights_only=True)) == {"module"}
    for path in (root, root / "hunyuan-video-i2v-720p", pt.parent, pt):
        info = W.detect_checkpoint(path)
        assert info.files == [pt] and info.kind == "official-pt"
    assert_same_weights(model, W.load_transformer(root, config=cfg))

    for wrapper in ("ema", "model", "state_dict", None):
        f = tmp_path / f"{wrapper}.pt"
        torch.save(sd if wrapper is None else {wrapper: sd, "step": 3}, f)
        assert_same_weights(model, W.load_transformer(f, config=cfg))
    # Both entries present: "module" wins unless load_key says otherwise.
    shifted = {k: v + 1 for k, v in sd.items()}
    f = tmp_path / "both.pt"
    torch.save({"module": sd, "ema": shifted}, f)
    assert torch.equal(W.load_transformer(f, config=cfg).img_in.proj.weight, sd["img_in.proj.weight"])
    assert torch.equal(W.load_transformer(f, config=cfg, load_key="ema").img_in.proj.weight,
                       shifted["img_in.proj.weight"])


def test_assign_load_from_meta_follows_requested_dtype(tmp_path):
    cfg = CONFIGS["token_replace"]
    model = random_transformer(cfg)
    path = W.save_transformer(model, tmp_path / "t.safetensors", format="safetensors")
    loaded = W.load_transformer(path, dtype=torch.bfloat16)
    params = dict(loaded.named_parameters())
    assert len(params) == len(model.state_dict())
    for name, p in params.items():
        assert isinstance(p, torch.nn.Parameter) and not p.is_meta, name
        assert p.dtype == torch.bfloat16 and p.device.type == "cpu", name
        assert torch.equal(p, model.state_dict()[name].to(torch.bfloat16)), name
    out = run(loaded, cfg)
    assert out.dtype == torch.bfloat16 and torch.isfinite(out.float()).all()

    # Default dtype = the checkpoint's: a bf16 .pt loads as bf16, an fp32 one as fp32.
    W.save_transformer(loaded, tmp_path / "bf16.pt")
    assert W.load_transformer(tmp_path / "bf16.pt", config=cfg).dtype == torch.bfloat16
    assert W.load_transformer(path, device="cpu").dtype == torch.float32


def test_convert_checkpoint_chain_is_lossless(tmp_path):
    cfg = CONFIGS["token_replace"]
    model = random_transformer(cfg)
    src = W.save_transformer(model, tmp_path / "a.pt")
    W.convert_checkpoint(src, tmp_path / "diff", to="diffusers", config=cfg, max_shard_size=30_000)
    W.convert_checkpoint(tmp_path / "diff", tmp_path / "b.safetensors", to="safetensors", naming="diffusers")
    W.convert_checkpoint(tmp_path / "b.safetensors", tmp_path / "c.pt", to="official-pt")
    W.convert_checkpoint(tmp_path / "c.pt", tmp_path / "d.safetensors", to="safetensors")  # no config: RoPE unknown
    assert W.detect_checkpoint(tmp_path / "diff").config["rope_axes_dim"] == list(TINY_ROPE)
    assert W.detect_checkpoint(tmp_path / "b.safetensors").naming == "diffusers"
    assert set(torch.load(tmp_path / "c.pt", weights_only=True)) == {"module"}
    for path in ("c.pt", "d.safetensors"):
        assert_same_weights(model, W.load_transformer(tmp_path / path, config=cfg))
    assert torch.equal(run(W.load_transformer(tmp_path / "diff"), cfg), run(model, cfg))
    W.convert_checkpoint(src, tmp_path / "half.safetensors", to="safetensors", dtype=torch.bfloat16, config=cfg)
    assert all(v.dtype == torch.bfloat16 for v in load_file(tmp_path / "half.safetensors").values())
    assert leftovers(tmp_path) == []


def test_resave_replaces_stale_shards(tmp_path):
    cfg = CONFIGS["token_replace"]
    model = random_transformer(cfg)
    folder = tmp_path / "transformer"
    W.save_transformer(model, folder, format="diffusers", max_shard_size=30_000)
    assert len(list(folder.glob("*.safetensors"))) > 2
    W.save_transformer(model, folder, format="diffusers")
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "diffusion_pytorch_model.safetensors"]
    assert_same_weights(model, W.load_transformer(folder))


def test_failed_save_leaves_nothing(tmp_path):
    meta = HunyuanVideoTransformer(CONFIGS["token_replace"], device="meta")
    with pytest.raises(ValueError, match="meta"):
        W.save_transformer(meta, tmp_path / "x.pt")
    with pytest.raises(ValueError, match="meta"):
        W.save_transformer(meta, tmp_path / "x", format="diffusers")
    assert list(tmp_path.rglob("*.pt")) == [] and list(tmp_path.rglob("*.safetensors*")) == []


# ---------------------------------------------------------------------------------------------
# Broken checkpoints fail loudly


def _error(path, **kwargs) -> str:
    with pytest.raises(CheckpointError) as e:
        W.load_transformer(path, **kwargs)
    message = str(e.value)
    assert "\n" not in message
    return message


def test_truncated_files(tmp_path):
    cfg = CONFIGS["token_replace"]
    model = random_transformer(cfg)
    for name, fmt in (("t.pt", "official-pt"), ("t.safetensors", "safetensors")):
        path = W.save_transformer(model, tmp_path / name, format=fmt)
        data = path.read_bytes()
        cut = tmp_path / f"cut-{name}"
        cut.write_bytes(data[: len(data) * 2 // 3])
        message = _error(cut, config=cfg)
        assert str(cut) in message and ("truncated" in message or "corrupt" in message)


@pytest.mark.filterwarnings("ignore:Detected pickle protocol")  # the plain pickle below is meant to be odd
def test_pickles_that_are_not_state_dicts(tmp_path):
    cfg = CONFIGS["token_replace"]
    listed = tmp_path / "list.pt"
    torch.save([torch.zeros(2), torch.ones(2)], listed)
    assert str(listed) in _error(listed, config=cfg) and "list" in _error(listed, config=cfg)
    plain = tmp_path / "plain.pkl.pt"
    with open(plain, "wb") as f:
        pickle.dump([1, 2, 3], f)
    assert str(plain) in _error(plain, config=cfg)
    evil = tmp_path / "evil.pt"
    torch.save({"module": Arbitrary()}, evil)
    message = _error(evil, config=cfg)
    assert str(evil) in message and "weights_only" in message
    mixed = tmp_path / "mixed.pt"
    torch.save({"module": {"img_in.proj.weight": torch.zeros(2), "note": "hello"}}, mixed)
    message = _error(mixed, config=cfg)
    assert str(mixed) in message and "'note'" in message


def test_key_and_shape_mismatches_name_file_and_key(tmp_path):
    cfg = CONFIGS["token_replace"]
    sd = random_transformer(cfg).state_dict()

    def save(name, state):
        path = tmp_path / name
        torch.save({"module": state}, path)
        return path

    wrong = dict(sd, **{"double_blocks.1.img_attn_qkv.weight": torch.zeros(8, 64)})
    message = _error(save("wrong.pt", wrong), config=cfg)
    assert "wrong.pt" in message and "double_blocks.1.img_attn_qkv.weight" in message and "[8, 64]" in message
    missing = {k: v for k, v in sd.items() if k != "single_blocks.1.linear2.bias"}
    message = _error(save("missing.pt", missing), config=cfg)
    assert "missing.pt" in message and "1 missing key(s)" in message and "single_blocks.1.linear2.bias" in message
    extra = dict(sd, **{"double_blocks.0.img_attn_extra.weight": torch.zeros(3)})
    message = _error(save("extra.pt", extra), config=cfg)
    assert "extra.pt" in message and "unexpected" in message and "double_blocks.0.img_attn_extra.weight" in message
    # A 33-channel checkpoint against the 16-channel config: the first mismatch is img_in.
    sd33 = random_transformer(CONFIGS["latent_concat"]).state_dict()
    message = _error(save("33ch.pt", sd33), config=cfg)
    assert "img_in.proj.weight" in message and "missing key(s), first 'guidance_in" in message


def test_bad_key_in_a_diffusers_shard_names_the_shard(tmp_path):
    cfg = CONFIGS["token_replace"]
    folder = W.save_transformer(random_transformer(cfg), tmp_path / "transformer", format="diffusers",
                                max_shard_size=30_000)
    index = json.loads((folder / "diffusion_pytorch_model.safetensors.index.json").read_text())
    key = "single_transformer_blocks.1.proj_out.weight"
    shard = folder / index["weight_map"][key]
    tensors = load_file(shard)
    tensors[key] = torch.zeros(64, 7)
    save_file(tensors, shard, metadata={"format": "pt"})
    message = _error(folder)
    assert shard.name in message and key in message and "[64, 7]" in message


def test_missing_paths_and_unknown_content(tmp_path):
    with pytest.raises(ModelFilesError):
        W.load_transformer(tmp_path / "nope")
    with pytest.raises(ModelFilesError):
        W.detect_checkpoint(tmp_path)  # an empty folder
    other = tmp_path / "other.safetensors"
    save_file({"encoder.conv_in.conv.weight": torch.zeros(2)}, other)
    assert "not a HunyuanVideo transformer" in _error(other)


# ---------------------------------------------------------------------------------------------
# VAE


def random_vae(config=TINY_TEST.vae):
    from hunyuan_i2v.model.vae import CausalVAE

    vae = CausalVAE(config)
    with torch.no_grad():
        for p in vae.parameters():
            p.normal_(0.0, 0.05)
    return vae.eval()


def decode(vae):
    z = torch.randn(1, vae.config.latent_channels, 2, 4, 4, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        return vae.decode(z)


def test_vae_round_trips(tmp_path):
    pytest.importorskip("hunyuan_i2v.model.vae")
    vae = random_vae()
    expected = decode(vae)
    official = W.save_vae(vae, tmp_path / "ckpts" / "hunyuan-video-i2v-720p" / "vae", format="official")
    assert json.loads((official / "config.json").read_text())["_class_name"] == "AutoencoderKLCausal3D"
    diffusers_dir = W.save_vae(vae, tmp_path / "model" / "vae", format="diffusers")
    single = W.save_vae(vae, tmp_path / "vae.safetensors", format="safetensors")
    paths = (official, tmp_path / "ckpts", diffusers_dir, tmp_path / "model", single)
    for path in paths:
        loaded = W.load_vae(path)
        assert loaded.config == vae.config, path
        assert_same_weights(vae, loaded)
    assert torch.equal(decode(loaded), expected)  # same weights and config -> same decode
    half = W.load_vae(official, dtype=torch.float16)
    assert all(p.dtype == torch.float16 and not p.is_meta for p in half.parameters())

    # The official loader's conventions: a "state_dict" wrapper and a "vae." prefix (spec 1.10).
    wrapped = tmp_path / "wrapped"
    wrapped.mkdir()
    (wrapped / "config.json").write_text((official / "config.json").read_text())
    sd = vae.state_dict()
    torch.save({"state_dict": {**{f"vae.{k}": v for k, v in sd.items()}, "loss.w": torch.zeros(1)}},
               wrapped / "pytorch_model.pt")
    assert_same_weights(vae, W.load_vae(wrapped))
    assert leftovers(tmp_path) == []


def test_vae_config_inferred_from_shapes():
    pytest.importorskip("hunyuan_i2v.model.vae")
    from hunyuan_i2v.model.vae import CausalVAE

    full = CausalVAE(VAEConfig(), device="meta").state_dict()
    assert W.vae_config_from_state_dict(full) == VAEConfig()
    assert W.vae_config_from_state_dict(random_vae().state_dict(), norm_num_groups=4) == TINY_TEST.vae
    with pytest.raises(CheckpointError, match="norm_num_groups"):
        W.vae_config_from_state_dict(random_vae().state_dict())


def test_vae_mismatch_names_file_and_key(tmp_path):
    pytest.importorskip("hunyuan_i2v.model.vae")
    folder = W.save_vae(random_vae(), tmp_path / "vae", format="official")
    sd = torch.load(folder / "pytorch_model.pt", weights_only=True)
    del sd["decoder.conv_out.conv.bias"]
    torch.save(sd, folder / "pytorch_model.pt")
    with pytest.raises(CheckpointError) as e:
        W.load_vae(folder)
    assert "pytorch_model.pt" in str(e.value) and "decoder.conv_out.conv.bias" in str(e.value)


def test_vae_folders_interoperate_with_diffusers(tmp_path):
    pytest.importorskip("hunyuan_i2v.model.vae")
    diffusers = pytest.importorskip("diffusers")
    vae = random_vae()
    folder = W.save_vae(vae, tmp_path / "ours", format="diffusers")
    peer = diffusers.AutoencoderKLHunyuanVideo.from_pretrained(folder)
    peer_sd = peer.state_dict()
    assert set(peer_sd) == set(vae.state_dict())
    assert all(torch.equal(peer_sd[k], v) for k, v in vae.state_dict().items())
    assert peer.config.norm_num_groups == 4 and tuple(peer.config.block_out_channels) == (8, 16, 32, 32)

    peer.save_pretrained(tmp_path / "theirs")
    assert_same_weights(vae, W.load_vae(tmp_path / "theirs"))
