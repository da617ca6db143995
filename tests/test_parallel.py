"""Multi-process generation (hunyuan_i2v.parallel) on the CPU with gloo.

The multi-process tests start 2 and 4 processes (one thread each) once per group of cases; every process builds
the same tiny random transformer (4 heads, so Ulysses degrees 2 and 4 fit), computes the single-process output
itself and then the parallel one, and the test compares them: fp32, atol 1e-5. Cases cover Ulysses, ring and
the 2x2 mesh, with and without text padding, at a token count (45) that no degree divides, CFG halves on
separate processes (alone and with sequence parallelism), and sharded block weights (bit-equal to replicated).
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hunyuan_i2v.config import TINY_TEST
from hunyuan_i2v.errors import InputError

ATOL = 1e-5
# TINY_TEST's transformer with 4 heads of 16 (RoPE 4 + 6 + 6), guidance embedding on, token_replace
CONFIG = dataclasses.replace(TINY_TEST.transformer, num_heads=4, rope_axes_dim=(4, 6, 6), guidance_embed=True)
ODD = (3, 6, 10)  # latent T, H, W -> 3 x 3 x 5 = 45 video tokens: 2 and 4 do not divide it; 15 in frame 0
EVEN = (2, 4, 4)  # 2 x 2 x 2 = 8 tokens
VAE_CONFIG = dataclasses.replace(TINY_TEST.vae, tile_sample_size=32, tile_sample_frames=16)
# latents [B, C, T', h, w]: 3 temporal windows x 2 x 2 spatial tiles; 3 x 1 tiles (odd: 2 on rank 0, 1 on rank 1)
VAE_LATENT = [(1, VAE_CONFIG.latent_channels, 9, 6, 5), (2, VAE_CONFIG.latent_channels, 9, 3, 3)]


def tiny_transformer(seed: int = 0):
    from hunyuan_i2v.model.transformer import HunyuanVideoTransformer

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer(CONFIG).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.1)
    return model


def model_inputs(latent: tuple[int, int, int], valid: list[int], seed: int = 1):
    """One row per entry of ``valid`` (its count of valid text tokens; rows shorter than the longest are padded)."""
    g = torch.Generator().manual_seed(seed)
    b, n = len(valid), max(valid)
    x = torch.randn(b, CONFIG.in_channels, *latent, generator=g)
    text = torch.randn(b, n, CONFIG.text_states_dim, generator=g)
    mask = torch.zeros(b, n)
    for i, v in enumerate(valid):
        mask[i, :v] = 1
    pooled = torch.randn(b, CONFIG.text_states_dim_2, generator=g)
    return x, torch.full((b,), 700.0), text, mask, pooled, torch.full((b,), 6016.0)


# ---------------------------------------------------------------------------------------------
# In one process: the pure pieces


def test_chunk_layout_pads_to_a_multiple_of_the_degree():
    from hunyuan_i2v.parallel.sequence import chunk_layout, take_rows

    assert chunk_layout(45, 2) == (23, 46)
    assert chunk_layout(45, 4) == (12, 48)
    assert chunk_layout(8, 4) == (2, 8)
    x = torch.arange(10.0).view(1, 5, 2)
    last = take_rows(x, 4, 3)  # one real row, two padding rows
    assert last.tolist() == [[[8.0, 9.0], [0.0, 0.0], [0.0, 0.0]]]
    assert take_rows(x, 6, 2).abs().sum() == 0  # a chunk entirely past the tokens


def test_local_rope_rows_keep_each_tokens_true_position():
    from hunyuan_i2v.model.transformer import rope_tables
    from hunyuan_i2v.parallel.sequence import local_rope

    full = rope_tables((3, 3, 5), CONFIG.rope_axes_dim, CONFIG.rope_theta, "cpu")
    part = local_rope(full, 23, 23)  # rank 1 of 2 over 45 tokens: tokens 23..44 and one padding row
    assert torch.equal(part.cos[:22], full.cos[23:]) and torch.equal(part.rotation[:22], full.rotation[23:])
    assert torch.equal(part.cos[22], torch.ones_like(part.cos[22]))  # padding rotates by nothing
    assert torch.equal(part.sin[22], torch.zeros_like(part.sin[22]))
    assert torch.equal(part.rotation[22], torch.ones_like(part.rotation[22]))


def test_partial_attentions_merge_into_the_full_attention():
    from hunyuan_i2v.parallel.sequence import attention_with_lse, merge_partials

    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=g) for _ in range(3))
    k, v = (torch.cat([t, torch.randn(2, 3, 4, 16, generator=g)], 2) for t in (k, v))
    valid = torch.ones(2, 13, dtype=torch.bool)
    valid[1, 6:] = False  # row 1: only the first 6 keys are real
    want = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=valid[:, None, None, :])
    # key sets [0, 5), [5, 9) and [9, 13): row 1 has none valid in the last one (lse -inf, weighs nothing)
    out, lse = attention_with_lse(q, k[:, :, :5], v[:, :, :5], valid[:, :5])
    for lo, hi in ((5, 9), (9, 13)):
        part_out, part_lse = attention_with_lse(q, k[:, :, lo:hi], v[:, :, lo:hi], valid[:, lo:hi],
                                                max_score_bytes=64)  # also chunked over the queries
        if lo == 9:
            assert torch.isinf(part_lse[1]).all() and part_out[1].abs().max() == 0
        merge_partials(out, lse, part_out, part_lse)
    torch.testing.assert_close(out, want, atol=1e-6, rtol=0)
    full_out, full_lse = attention_with_lse(q, k, v, valid)
    torch.testing.assert_close(lse, full_lse, atol=1e-6, rtol=0)


def test_a_callable_backend_replaces_the_attention_function():
    from hunyuan_i2v.model.layers import attention

    q = k = v = torch.randn(1, 2, 3, 4)
    seen = []

    def backend(q_, k_, v_, mask):
        seen.append((q_.shape, mask))
        return torch.zeros_like(q_)

    assert attention(q, k, v, None, backend=backend).abs().sum() == 0 and seen == [(q.shape, None)]
    assert not torch.equal(attention(q, k, v, None, backend="sdpa"), torch.zeros_like(q))


def test_the_transformer_runs_without_sequence_parallelism_by_default():
    model = tiny_transformer()
    assert model.sequence_parallel is None
    with torch.no_grad():
        a = model(*model_inputs(ODD, [7, 4]))
        b = model(*model_inputs(ODD, [7, 4]))
    assert torch.equal(a, b)


def tiny_vae(seed: int = 0):
    """A VAE with small tiles (32 px, 16 frames) whose weights are perturbed away from their initialisation."""
    from hunyuan_i2v.model.vae import CausalVAE

    torch.manual_seed(seed)
    vae = CausalVAE(VAE_CONFIG).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return vae


def test_the_decode_windows_are_the_tiles_the_decode_runs_in_its_order():
    vae = tiny_vae()
    latents = torch.randn(VAE_LATENT[0])
    windows = vae.decode_windows(latents.shape, tiled=True)
    assert len(windows) == 3 * 2 * 2  # 3 temporal windows x 2 x 2 spatial tiles
    seen = []
    decode_tile = vae._decode_tile
    vae._decode_tile = lambda x, **kw: seen.append(tuple(x.shape)) or decode_tile(x, **kw)
    with torch.no_grad():
        ref = vae.decode(latents, tiled=True)
        tiles = [decode_tile(latents[:, :, f, r, c]) for f, r, c in windows]
        assembled = torch.cat(list(vae.decode_stream(latents, tiled=True, tiles=iter(tiles))), dim=2)
    assert seen == [tuple(latents[:, :, f, r, c].shape) for f, r, c in windows]
    assert torch.equal(assembled, ref)
    assert vae.decode_windows((1, 4, 3, 4, 4)) == [(slice(0, None),) * 3]  # within one tile: untiled


def test_parallel_config_fills_in_the_degrees_for_the_launch():
    from hunyuan_i2v.parallel import ParallelConfig

    assert ParallelConfig.for_world(4) == ParallelConfig(ulysses=4, ring=1)
    assert ParallelConfig.for_world(4, ring=2) == ParallelConfig(ulysses=2, ring=2)
    assert ParallelConfig.for_world(8, ulysses=2, cfg_parallel=True) == ParallelConfig(2, 2, cfg_parallel=True)
    assert ParallelConfig.for_world(2, cfg_parallel=True).sequence_degree == 1
    with pytest.raises(InputError, match="even number"):
        ParallelConfig.for_world(3, cfg_parallel=True)
    with pytest.raises(InputError, match="--ring 3 does not divide"):
        ParallelConfig.for_world(4, ring=3)
    with pytest.raises(InputError, match="= 4 processes, but torchrun --nproc_per_node 8"):
        ParallelConfig.for_world(8, ulysses=2, ring=2)
    with pytest.raises(InputError, match="at least 1"):
        ParallelConfig(ulysses=0)


def test_ulysses_must_divide_the_head_count_and_the_error_names_a_fit():
    from hunyuan_i2v.parallel import ParallelConfig

    ParallelConfig(ulysses=8).check_model(24)
    with pytest.raises(InputError, match="--ulysses 5 does not divide the model's 24 attention heads: use --ulysses 1 "
                                         "--ring 5"):
        ParallelConfig(ulysses=5).check_model(24)
    with pytest.raises(InputError, match="use --ulysses 8 --ring 2"):
        ParallelConfig(ulysses=16).check_model(24)


def test_the_cli_asks_for_torchrun_when_the_flags_need_several_processes(tmp_path, capsys, monkeypatch):
    from PIL import Image

    from hunyuan_i2v.cli import main

    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(var, raising=False)
    photo = tmp_path / "p.png"
    Image.new("RGB", (64, 48), (120, 80, 40)).save(photo)
    code = main(["generate", str(photo), "the camera pans left", "-o", str(tmp_path / "o.mp4"), "--ulysses", "2",
                 "--cfg-parallel", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and "launch with torchrun --nproc_per_node 4" in err and len(err.splitlines()) == 1
    assert not (tmp_path / "o.mp4").exists()


# ---------------------------------------------------------------------------------------------
# Several processes: each case runs in every process of one spawned group


def _case_forward(par_config, latent, valid, shard=False, weights=None, **_):
    """Max |parallel - single-process| over the output; with ``shard`` also whether sharded weights give exactly
    the replicated weights' output."""
    from hunyuan_i2v.parallel import Parallel
    from hunyuan_i2v.parallel.shard import load_sharded_transformer

    inputs = model_inputs(tuple(latent), valid)
    model = tiny_transformer()
    with torch.no_grad():
        ref = model(*inputs)
        par = Parallel(par_config)
        par.attach(model)
        out = model(*inputs)
    result = {"diff": float((out - ref).abs().max()), "scale": float(ref.abs().max())}
    if shard:
        sharded = tiny_transformer()
        blocks = dataclasses.replace(par_config, shard_weights=True)
        Parallel(blocks).attach(sharded)  # sharded in memory
        loaded = load_sharded_transformer(weights, torch.device("cpu"))  # sharded from the file
        Parallel(blocks).attach(loaded.model)
        with torch.no_grad():
            out_mem, out_file = sharded(*inputs), loaded.model(*inputs)
        result.update(shard_equal=bool(torch.equal(out_mem, out) and torch.equal(out_file, out)),
                      shard_diff=[float((out_mem - out).abs().max()), float((out_file - out).abs().max())],
                      shard_bytes=loaded.local_bytes(), full_bytes=loaded.full_bytes(),
                      meta_between_uses=all(p.is_meta for p in loaded.model.double_blocks.parameters()),
                      gathers=loaded.gathers)
        loaded.remove()  # every block gathered for good: an ordinary model again
        with torch.no_grad():
            again = loaded.model(*inputs)
        result["removed"] = bool(torch.equal(again, out)) and not any(p.is_meta for p in loaded.model.parameters())
    return result


def _case_denoise(par_config, latent, valid, steps=2, **_):
    """Max |parallel - single-process| of the latents after ``steps`` Euler steps with real CFG, the conditional
    text ``valid[0]`` tokens long and the negative one ``valid[1]`` (the single process pads the shorter)."""
    from hunyuan_i2v.parallel import Parallel
    from hunyuan_i2v.sampling import TextConditioning, denoise, get_sigmas

    x, _, text, mask, pooled, g = model_inputs(tuple(latent), valid)
    cond = TextConditioning(text[:1, :valid[0]], mask[:1, :valid[0]], pooled[:1])
    uncond = TextConditioning(text[1:, :valid[1]], mask[1:, :valid[1]], pooled[1:])
    if valid[0] != valid[1]:  # the batched single-process run needs one length: pad the shorter
        n = max(valid)
        cond, uncond = (TextConditioning(torch.nn.functional.pad(c.text_states, (0, 0, 0, n - c.text_states.shape[1])),
                                         torch.nn.functional.pad(c.text_mask, (0, n - c.text_mask.shape[1])),
                                         c.text_states_2) for c in (cond, uncond))
    kw = dict(condition_type="token_replace", guidance=g[:1], uncond=uncond, cfg_scale=3.0)
    sigmas = get_sigmas(steps, 7.0)
    model = tiny_transformer()
    with torch.no_grad():
        ref = denoise(model, x[:1], x[:1, :, :1], cond, sigmas, **kw)
        par = Parallel(par_config)
        par.attach(model)
        out = denoise(model, x[:1], x[:1, :, :1], cond, sigmas, cfg_parallel=par.cfg, **kw)
    return {"diff": float((out - ref).abs().max()), "scale": float(ref.abs().max())}


def _case_errors(par_config, **_):
    """The settings a run cannot honour, each one InputError before any work."""
    from hunyuan_i2v.memory.planner import MemoryPlan
    from hunyuan_i2v.parallel import Parallel

    par = Parallel(par_config)
    messages = []
    for use_cfg, cache, plan in ((False, None, None), (True, object(), None),
                                 (True, None, MemoryPlan("blocks", "bf16", None)),
                                 (True, None, MemoryPlan("none", "int8", None))):
        try:
            par.check_run(use_cfg, cache, plan)
            messages.append(None)
        except InputError as exc:
            messages.append(str(exc))
    # rank 0 fails: every rank raises the same error instead of waiting for a result
    try:
        par.from_main(lambda: (_ for _ in ()).throw(InputError("bad input on rank 0")))
        messages.append(None)
    except InputError as exc:
        messages.append(str(exc))
    got = par.from_main(lambda: {"x": torch.arange(3) * 2, "n": 5})
    messages.append([got["x"].tolist(), got["n"]])
    return {"messages": messages}


def _case_vae(shape, lean=False, **_):
    """The tiled decode with the tiles shared by the processes against this process's own tiled decode; then the
    destination stops reading after one chunk, then rank 1 fails on a tile: every process raises."""
    import torch.distributed as dist

    from hunyuan_i2v.parallel.vae import decode_parallel, decode_stream_parallel

    vae, rank = tiny_vae(), dist.get_rank()
    latents = torch.randn(shape, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        ref = vae.decode(latents, tiled=True, lean=lean)
        stream = decode_stream_parallel(vae, latents, tiled=True, lean=lean)
        chunks = list(stream)
        out = decode_parallel(vae, latents, tiled=True, lean=lean)
    result = {"decoded": stream.decoded, "tiles": len(stream.windows), "chunks": len(chunks),
              "none_elsewhere": out is None if rank else None, "scale": float(ref.abs().max())}
    if rank == 0:
        result["diff"] = max(float((torch.cat(chunks, dim=2) - ref).abs().max()), float((out - ref).abs().max()))
    else:
        result["diff"] = 0.0
    errors = []
    with torch.no_grad():
        try:  # the destination reads one chunk and stops
            stream = decode_stream_parallel(vae, latents, tiled=True)
            if rank == 0:
                next(stream)
                stream.close()
            errors.append(None)
        except Exception as exc:  # noqa: BLE001 - the test looks at what each rank raised
            errors.append(f"{type(exc).__name__}: {exc}")
        decode_tile = vae._decode_tile
        calls = []

        def failing(x, **kw):
            calls.append(1)
            if rank == 1 and len(calls) == 2:
                raise RuntimeError("out of memory on rank 1")
            return decode_tile(x, **kw)

        vae._decode_tile = failing
        try:
            decode_parallel(vae, latents, tiled=True)
            errors.append(None)
        except Exception as exc:  # noqa: BLE001
            errors.append(f"{type(exc).__name__}: {exc}")
        vae._decode_tile = decode_tile
        again = decode_parallel(vae, latents, tiled=True)  # the group is still in step
        errors.append(bool(torch.equal(again, out)) if rank == 0 else again is None)
    result["errors"] = errors
    return result


def _case_pipeline(par_config, **_):
    """The bundled demo model through I2VPipeline with small VAE tiles (9 per video): one process (on rank 0), then
    every process with ``par_config``; the frames (fp32, [0, 1]) and what each rank decoded."""
    import torch.distributed as dist
    from PIL import Image

    from hunyuan_i2v.cli import bundled_model_dir
    from hunyuan_i2v.parallel import Parallel
    from hunyuan_i2v.pipeline import I2VPipeline

    tiles = dict(tile_sample_size=32, tile_sample_frames=16)
    photo = Image.radial_gradient("L").convert("RGB").resize((64, 64))
    kw = dict(height=64, width=64, num_frames=9, steps=2, seed=3, progress=False, output_type="pt", vae_tiling=True)

    def pipeline(parallel=None):
        pipe = I2VPipeline.from_pretrained(bundled_model_dir(), device="cpu", prompt_cache=False, parallel=parallel)
        pipe.config = dataclasses.replace(pipe.config, vae=dataclasses.replace(pipe.config.vae, **tiles))
        pipe.vae.config = dataclasses.replace(pipe.vae.config, **tiles)
        decode_tile = pipe.vae._decode_tile
        pipe.decoded = []
        pipe.vae._decode_tile = lambda x, **k: pipe.decoded.append(1) or decode_tile(x, **k)
        return pipe

    ref = pipeline()(photo, "the camera pans left", **kw) if dist.get_rank() == 0 else None
    pipe = pipeline(Parallel(par_config))
    out = pipe(photo, "the camera pans left", **kw)
    result = {"decoded": len(pipe.decoded), "frames": out.frames is not None}
    if ref is not None:
        result.update(diff=float((out.frames - ref.frames).abs().max()), scale=float(ref.frames.abs().max()))
    else:
        result.update(diff=0.0, scale=1.0)
    return result


def _digest(model) -> dict[str, str]:
    import hashlib

    return {k: hashlib.sha256(t.detach().contiguous().numpy().tobytes()).hexdigest()
            for k, t in model.state_dict().items()}


def _case_broadcast(weights, **_):
    """Rank 0 reads the checkpoint (safetensors with small buckets, a diffusers folder, an official .pt) and
    broadcasts it; rank 1 is given a path that does not exist. Digests of every tensor, the sharded variant's
    output against the replicated one, and the error when rank 0's file is missing."""
    import torch.distributed as dist

    from hunyuan_i2v.errors import ModelFilesError
    from hunyuan_i2v.parallel.broadcast import broadcast_transformer
    from hunyuan_i2v.weights import load_transformer, save_transformer

    rank, cpu = dist.get_rank(), torch.device("cpu")
    nowhere = "/nonexistent/transformer.safetensors"
    folder = Path(weights).parent
    if rank == 0:  # the other formats, written by rank 0 alone
        save_transformer(tiny_transformer(), folder / "diffusers", format="diffusers")
        save_transformer(tiny_transformer(), folder / "transformer.pt", format="official-pt")
    dist.barrier()
    result = {}
    for name, path, kw in (("safetensors", weights, dict(bucket_bytes=64 * 1024)),
                           ("diffusers", folder / "diffusers", {}),
                           ("pt", folder / "transformer.pt", dict(config=CONFIG))):
        model = broadcast_transformer(path if rank == 0 else nowhere, cpu, **kw)
        result[name] = _digest(model)
        result[name + "-requires-grad"] = all(p.requires_grad for p in model.parameters())
        if rank == 0:
            result[name + "-local"] = _digest(load_transformer(path, config=kw.get("config")))
    inputs = model_inputs(ODD, [7, 4])
    replicated = broadcast_transformer(weights if rank == 0 else None, cpu)
    sharded = broadcast_transformer(weights if rank == 0 else None, cpu, shard=True)
    with torch.no_grad():
        result["sharded_equal"] = bool(torch.equal(sharded.model(*inputs), replicated(*inputs)))
    result.update(shard_bytes=sharded.local_bytes(), full_bytes=sharded.full_bytes())
    try:
        broadcast_transformer(nowhere if rank == 0 else weights, cpu)
        result["missing"] = None
    except ModelFilesError as exc:
        result["missing"] = str(exc)
    return result


CASE_KINDS = {"forward": _case_forward, "denoise": _case_denoise, "errors": _case_errors, "vae": _case_vae,
              "pipeline": _case_pipeline, "broadcast": _case_broadcast}


def _worker(rank: int, world: int, init_file: str, out_dir: str, cases: list[dict], weights: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        results = {c["name"]: CASE_KINDS[c["kind"]](weights=weights, **c) for c in cases}
    finally:
        dist.destroy_process_group()
    Path(out_dir, f"rank{rank}.json").write_text(json.dumps(results))


def _spawn(world: int, cases: list[dict], tmp: Path) -> dict[str, list[dict]]:
    """Run ``cases`` in ``world`` processes; {case name: [result of rank 0, rank 1, ...]}."""
    import torch.multiprocessing as mp

    from hunyuan_i2v.weights import save_transformer

    weights = tmp / "transformer.safetensors"
    save_transformer(tiny_transformer(), weights, format="safetensors")
    mp.spawn(_worker, args=(world, str(tmp / "pg"), str(tmp), cases, str(weights)), nprocs=world)
    per_rank = [json.loads((tmp / f"rank{r}.json").read_text()) for r in range(world)]
    return {name: [r[name] for r in per_rank] for name in per_rank[0]}


def _parallel_config(world: int, **kw):
    from hunyuan_i2v.parallel import ParallelConfig

    return ParallelConfig.for_world(world, **kw)


def _cases(world: int) -> list[dict]:
    from hunyuan_i2v.parallel import ParallelConfig

    def forward(name, u, r, latent, valid, **kw):
        return dict(name=name, kind="forward", par_config=ParallelConfig(u, r), latent=latent, valid=valid, **kw)

    if world == 2:
        return [
            forward("ulysses2", 2, 1, ODD, [7]),
            forward("ulysses2-text-padding", 2, 1, ODD, [7, 4]),
            forward("ulysses2-even", 2, 1, EVEN, [5]),
            forward("ring2", 1, 2, ODD, [7]),
            forward("ring2-text-padding", 1, 2, ODD, [7, 4]),
            forward("ring2-even", 1, 2, EVEN, [5, 2]),
            forward("ulysses2-sharded", 2, 1, ODD, [7, 4], shard=True),
            dict(name="cfg2", kind="denoise", par_config=ParallelConfig(cfg_parallel=True), latent=ODD, valid=[7, 4]),
            dict(name="errors", kind="errors", par_config=ParallelConfig(ulysses=1, cfg_parallel=True,
                                                                          shard_weights=True)),
        ]
    return [
        forward("mesh2x2", 2, 2, ODD, [7]),
        forward("mesh2x2-text-padding", 2, 2, ODD, [7, 4]),
        forward("ulysses4-text-padding", 4, 1, ODD, [7, 4]),
        forward("ring4-text-padding", 1, 4, ODD, [7, 4]),
        forward("mesh2x2-sharded", 2, 2, EVEN, [5, 3], shard=True),
        dict(name="cfg2-ulysses2", kind="denoise", par_config=ParallelConfig(2, 1, cfg_parallel=True), latent=ODD,
             valid=[7, 4]),
        dict(name="cfg2-ring2", kind="denoise", par_config=ParallelConfig(1, 2, cfg_parallel=True), latent=ODD,
             valid=[6, 6]),
    ]


@pytest.fixture(scope="module")
def two_processes(tmp_path_factory):
    return _spawn(2, _cases(2), tmp_path_factory.mktemp("parallel2"))


@pytest.fixture(scope="module")
def two_processes_vae(tmp_path_factory):
    cases = [dict(name="grid", kind="vae", shape=VAE_LATENT[0]), dict(name="grid-lean", kind="vae",
             shape=VAE_LATENT[0], lean=True), dict(name="odd", kind="vae", shape=VAE_LATENT[1]),
             dict(name="pipeline", kind="pipeline", par_config=_parallel_config(2))]
    return _spawn(2, cases, tmp_path_factory.mktemp("parallel2vae"))


@pytest.fixture(scope="module")
def two_processes_broadcast(tmp_path_factory):
    cases = [dict(name="broadcast", kind="broadcast"),
             dict(name="pipeline", kind="pipeline", par_config=_parallel_config(2, broadcast_weights=True,
                                                                                 shard_weights=True))]
    return _spawn(2, cases, tmp_path_factory.mktemp("parallel2broadcast"))


@pytest.fixture(scope="module")
def four_processes(tmp_path_factory):
    return _spawn(4, _cases(4), tmp_path_factory.mktemp("parallel4"))


def _check_close(results: list[dict]) -> None:
    for rank, r in enumerate(results):
        assert r["scale"] > 0.1, r  # a real output, so the tolerance means something
        assert r["diff"] <= ATOL, f"rank {rank}: parallel differs from one process by {r['diff']:.3g}"


@pytest.mark.parametrize("case", ["ulysses2", "ulysses2-text-padding", "ulysses2-even", "ring2", "ring2-text-padding",
                                  "ring2-even", "ulysses2-sharded", "cfg2"])
def test_two_processes_match_one(two_processes, case):
    _check_close(two_processes[case])


def test_sharded_weights_give_the_replicated_output_exactly(two_processes):
    for r in two_processes["ulysses2-sharded"]:
        assert r["shard_equal"] and r["meta_between_uses"] and r["removed"]
        assert r["gathers"] == CONFIG.depth_double + CONFIG.depth_single  # one gather per block per forward
        blocks = CONFIG.depth_double + CONFIG.depth_single
        assert 0 <= r["shard_bytes"] * 2 - r["full_bytes"] <= blocks * 4  # half each, plus <= 1 fp32 of padding


def test_a_multi_process_run_refuses_what_it_cannot_do(two_processes):
    for r in two_processes["errors"]:
        no_cfg, cache, streamed, quantized, rank0_error, broadcast = r["messages"]
        assert "--cfg-parallel splits the two passes of real CFG, but CFG is off" in no_cfg
        assert "drop one of the two" in cache
        assert "--offload blocks" in streamed and "int8" in quantized
        assert rank0_error == "bad input on rank 0"
        assert broadcast == [[0, 2, 4], 5]


@pytest.mark.parametrize("case", ["grid", "grid-lean", "odd"])
def test_vae_tiles_decoded_by_two_processes_match_one(two_processes_vae, case):
    results = two_processes_vae[case]
    _check_close(results)
    tiles = results[0]["tiles"]
    assert tiles == {"grid": 12, "grid-lean": 12, "odd": 3}[case]
    assert [r["decoded"] for r in results] == [(tiles + 1) // 2, tiles // 2]  # round-robin, rank 0 first
    assert results[0]["chunks"] == 3  # one chunk per temporal window, on rank 0
    assert results[1]["chunks"] == 0 and results[1]["none_elsewhere"]


def test_the_pipeline_shares_the_vae_tiles_among_the_processes(two_processes_vae):
    rank0, rank1 = two_processes_vae["pipeline"]
    _check_close([rank0])
    assert rank0["frames"] and not rank1["frames"]  # the video on rank 0 only
    assert (rank0["decoded"], rank1["decoded"]) == (5, 4)  # 9 tiles (3 x 3, one temporal window), round-robin


def test_a_parallel_vae_decode_that_stops_on_one_process_stops_on_all(two_processes_vae):
    (stopped0, failed0, again0), (stopped1, failed1, again1) = (r["errors"] for r in two_processes_vae["grid"])
    assert stopped0 is None and stopped1 == ("ParallelError: rank 0 stopped reading the decoded video; the other "
                                             "processes stop too")
    assert failed1 == "RuntimeError: out of memory on rank 1"
    assert failed0.startswith("ParallelError: rank 1 failed to decode its VAE tile (round 2 of 6)")
    assert again0 and again1


def test_weights_read_by_rank_0_and_broadcast_equal_the_file_on_every_rank(two_processes_broadcast):
    rank0, rank1 = two_processes_broadcast["broadcast"]
    for name in ("safetensors", "diffusers", "pt"):
        assert rank0[name] == rank0[name + "-local"], name  # what rank 0 sent is what the local loader reads
        assert rank1[name] == rank0[name], name  # rank 1, pointed at a path that does not exist, got the same
        assert rank0[name + "-requires-grad"] and rank1[name + "-requires-grad"]
    for r in (rank0, rank1):
        assert r["sharded_equal"]
        assert 0 <= r["shard_bytes"] * 2 - r["full_bytes"] <= (CONFIG.depth_double + CONFIG.depth_single) * 4
        assert r["missing"] is not None and "/nonexistent/transformer.safetensors: no such file" in r["missing"]
    assert rank0["missing"] == rank1["missing"]  # rank 0's error, raised on rank 1 too


def test_the_pipeline_with_broadcast_sharded_weights_matches_one_process(two_processes_broadcast):
    rank0, rank1 = two_processes_broadcast["pipeline"]
    _check_close([rank0])
    assert rank0["frames"] and not rank1["frames"]


@pytest.mark.parametrize("case", ["mesh2x2", "mesh2x2-text-padding", "ulysses4-text-padding", "ring4-text-padding",
                                  "mesh2x2-sharded", "cfg2-ulysses2", "cfg2-ring2"])
def test_four_processes_match_one(four_processes, case):
    _check_close(four_processes[case])
    if case.endswith("sharded"):
        assert all(r["shard_equal"] for r in four_processes[case])


# ---------------------------------------------------------------------------------------------
# The command line under torchrun


def _run_group(argv: list[str], env: dict, timeout: float = 240) -> subprocess.CompletedProcess:
    """Run a command in its own process group; on a timeout the whole group (torchrun's workers too) is killed."""
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, err = proc.communicate()
        pytest.fail(f"{' '.join(argv[:8])} ... did not finish in {timeout} s: {err[-2000:]}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)


@pytest.mark.slow
def test_generate_under_torchrun_writes_the_single_process_video(tmp_path):
    """``hunyuan-i2v generate`` with the bundled demo model (real CFG): 1 process, then 2 under torchrun with
    Ulysses, then 2 with CFG halves and sharded weights; only rank 0 prints and writes; the frames (PNG, lossless)
    agree."""
    import numpy as np
    from PIL import Image

    photo = tmp_path / "p.png"
    Image.radial_gradient("L").convert("RGB").resize((64, 48)).save(photo)
    common = [str(photo), "the camera pans left", "--device", "cpu", "--height", "48", "--width", "64",
              "--frames", "5", "--steps", "2", "--seed", "3", "--no-progress", "--no-prompt-cache"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HUNYUAN_I2V_PROMPT_CACHE": str(tmp_path / "pc")}
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    runs = {"one": [sys.executable, "-m", "hunyuan_i2v.cli", "generate", *common],
            "ulysses": [*torchrun, "-m", "hunyuan_i2v.cli", "generate", *common, "--ulysses", "2"],
            "cfg-sharded": [*torchrun, "-m", "hunyuan_i2v.cli", "generate", *common, "--cfg-parallel",
                            "--shard-weights"]}
    frames = {}
    for name, argv in runs.items():
        out = tmp_path / f"{name}.mp4"
        proc = _run_group([*argv, "-o", str(out), "--frames-dir", str(tmp_path / name)], env)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert proc.stdout.count(str(out)) == 1, proc.stdout  # one line, from rank 0
        assert sorted(p.name for p in tmp_path.glob("*.mp4")).count(out.name) == 1
        pngs = sorted((tmp_path / name).glob("*.png"))
        assert len(pngs) == 5
        frames[name] = np.stack([np.asarray(Image.open(p)) for p in pngs])
    for name in ("ulysses", "cfg-sharded"):
        diff = np.abs(frames[name].astype(int) - frames["one"].astype(int))
        # the latents agree to ~1e-6 (see the tests above); a rare pixel may round to the next level
        assert diff.max() <= 1 and (diff == 0).mean() > 0.99, (name, diff.max(), (diff == 0).mean())
