"""Multi-process transformer forward: 1 process against N processes (sequence parallel, CFG halves, sharded weights).

Model: hidden 512 (4 heads x 128), 2 double + 4 single blocks, the 13B model's other dimensions (the model of
benchmarks/transformer_forward.py). Inputs: one video at 128x128x17 or 256x256x33 pixels (latents /8 in space,
(T-1)/4+1 frames, patch 2: 320 or 2,304 video tokens) and 396 text positions.

Each configuration runs in fresh processes (torch.multiprocessing, gloo on the CPU, NCCL with --device cuda, one
GPU per process). Time: median of the warm forwards of rank 0 (every rank waits for the others inside the
collectives); CPU s / rank: the median CPU time of one forward in the busiest rank (all its threads), which shows
how the work divides even on a host whose cores are shared with other jobs (there wall-clock time measures the
scheduler as much as the code). Memory per rank: the bytes of the weights the process holds (sharded blocks count their slices);
on the CPU its private memory after loading (RssAnon), its proportional set size after the first forward (PSS:
pages shared with the other ranks, such as a memory-mapped checkpoint, count 1/N each) and its peak RSS during
the first forward (VmHWM, reset through /proc/self/clear_refs); on CUDA the allocated bytes after loading and the
peak allocated during the forward. Max diff: rank 0's output against the single process's.

On one CPU host the replicated weights are pages of the memory-mapped safetensors file, shared by all ranks
through the page cache, while sharded slices are private copies: there sharding lowers "weights / rank" but not
the machine's memory. On GPUs every rank copies its weights into its own device memory, and sharding saves
(N - 1)/N of the block weights there.

Configurations: "1" (one process) or e.g. "u2" (Ulysses 2), "r2" (ring 2), "u2r2", "u2s" (Ulysses 2, sharded
weights), "c2" (CFG halves; the batch is then cond + uncond, as with real CFG, and "1" runs it as one batch of 2).

    nice -n 19 python benchmarks/parallel_forward.py --sizes 128x17,256x33 --configs 1,u2,r2,u2s --threads 1
    python benchmarks/parallel_forward.py --device cuda --configs 1,u2,r2,u2s,u4,u2r2,u8 --dtype bf16 --sizes 256x33
    # the 13B model's 720p x 129 step (one transformer pass) on 1/2/4/8 GPUs
    python benchmarks/parallel_forward.py --device cuda --model 13b --dtype bf16 --sizes 1280x720x129 \
        --configs 1,u2,u4,u8 --runs 1
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from hunyuan_i2v.config import TransformerConfig

TEXT_LEN = 396
CONFIG = TransformerConfig(hidden_size=512, num_heads=4, depth_double=2, depth_single=4)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
MiB = 2**20


def parse_config(text: str) -> dict:
    m = re.fullmatch(r"(?:u(\d+))?(?:r(\d+))?(c2)?(s)?", text)
    if text == "1":
        return dict(ulysses=1, ring=1, cfg=False, shard=False, world=1)
    if not m or not text:
        raise SystemExit(f"bad configuration {text!r}: use 1, u2, r2, u2r2, u2s, c2, u2c2 ...")
    u, r = int(m.group(1) or 1), int(m.group(2) or 1)
    cfg, shard = bool(m.group(3)), bool(m.group(4))
    return dict(ulysses=u, ring=r, cfg=cfg, shard=shard, world=u * r * (2 if cfg else 1))


def parse_size(text: str) -> tuple[int, int, int]:
    """"256x33" (square) or "1280x720x129" -> (width, height, frames)."""
    parts = [int(v) for v in text.lower().split("x")]
    if len(parts) == 2:
        parts = [parts[0], parts[0], parts[1]]
    if len(parts) != 3 or parts[0] % 16 or parts[1] % 16 or (parts[2] - 1) % 4:
        raise SystemExit(f"bad size {text!r}: use SIZExFRAMES or WIDTHxHEIGHTxFRAMES, sides multiples of 16, "
                         "frames 4k+1")
    return parts[0], parts[1], parts[2]


def model_config(name: str) -> TransformerConfig:
    if name == "13b":
        from hunyuan_i2v.config import HUNYUAN_I2V_720P

        return HUNYUAN_I2V_720P.transformer
    return CONFIG


def random_model(cfg: TransformerConfig, device: torch.device, dtype: torch.dtype, seed: int = 0):
    """The transformer built on ``device`` with N(0, 0.02) matrices (1-d weights keep their default init), all
    drawn from ``seed``: the same on every rank, without a checkpoint."""
    from hunyuan_i2v.model.transformer import HunyuanVideoTransformer

    torch.manual_seed(seed)  # seeds the CUDA generators too
    model = HunyuanVideoTransformer(cfg, device=device, dtype=dtype).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim > 1:
                p.normal_(0.0, 0.02)
    return model


def make_inputs(case: tuple[int, int, int], batch: int, dtype: torch.dtype, cfg: TransformerConfig = CONFIG,
                seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width, height, frames = case
    lat_t = (frames - 1) // 4 + 1
    x = torch.randn(1, cfg.in_channels, lat_t, height // 8, width // 8, generator=g).repeat(batch, 1, 1, 1, 1)
    text = torch.randn(batch, TEXT_LEN, cfg.text_states_dim, generator=g)
    mask = torch.ones(batch, TEXT_LEN)
    pooled = torch.randn(batch, cfg.text_states_dim_2, generator=g)
    return (x.to(dtype), torch.full((batch,), 700.0), text.to(dtype), mask, pooled.to(dtype),
            torch.full((batch,), 6016.0))


def write_weights(path: Path, seed: int = 0) -> None:
    from hunyuan_i2v.model.transformer import HunyuanVideoTransformer
    from hunyuan_i2v.weights import save_transformer

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer(CONFIG)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    save_transformer(model, path, format="safetensors")


def _status(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _pss() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("Pss not in /proc/self/smaps_rollup")


def _weight_bytes(model) -> int:
    return sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.is_meta)


# ---------------------------------------------------------------------------------------------
# One configuration (every process runs this)


def worker(rank: int, spec: dict, job: dict) -> None:
    import torch.distributed as dist

    torch.set_num_threads(job["threads"])
    world, cuda = spec["world"], job["device"] == "cuda"
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    par = None
    if world > 1:
        from hunyuan_i2v.parallel import Parallel, ParallelConfig

        dist.init_process_group("nccl" if cuda else "gloo", init_method=f"file://{job['init']}", rank=rank,
                                world_size=world)
        par = Parallel(ParallelConfig(spec["ulysses"], spec["ring"], spec["cfg"], spec["shard"]), device)
    dtype = DTYPES[job["dtype"]]
    cfg = model_config(job["model"])
    if job["weights"] is None:  # --model 13b: random weights made here
        model = random_model(cfg, device, dtype)
        if par is not None:
            model = par.attach(model)
        if cuda:
            torch.cuda.empty_cache()
    elif par is not None:
        model = par.load_transformer(job["weights"], dtype=dtype)
    else:
        from hunyuan_i2v.weights import load_transformer

        model = load_transformer(job["weights"], dtype=dtype, device=device)
    batch = 2 if job["cfg_batch"] else 1
    x, t, text, mask, pooled, g = (a.to(device) for a in make_inputs(tuple(job["case"]), batch, dtype, cfg))
    if spec["cfg"]:  # this rank's half of the CFG batch
        half = slice(par.cfg_half, par.cfg_half + 1)
        x, t, text, mask, pooled, g = (a[half] for a in (x, t, text, mask, pooled, g))

    def forward():
        out = model(x, t, text, mask, pooled, guidance=g)
        if spec["cfg"]:
            out = par.cfg.gather(out)
        if cuda:
            torch.cuda.synchronize(device)
        return out

    sync = (lambda: dist.barrier()) if par is not None else (lambda: None)
    with torch.no_grad():
        sync()
        if cuda:
            loaded = torch.cuda.memory_allocated(device)
            torch.cuda.reset_peak_memory_stats(device)
        else:
            loaded = _status("RssAnon")
            _reset_peak()
        out = forward()
        peak = torch.cuda.max_memory_allocated(device) if cuda else _status("VmHWM")
        pss = 0 if cuda else _pss()
        times, cpu = [], []
        for _ in range(job["runs"]):
            sync()
            start, start_cpu = time.perf_counter(), time.process_time()
            forward()
            times.append(time.perf_counter() - start)
            cpu.append(time.process_time() - start_cpu)
    result = {"rank": rank, "times": times, "cpu": cpu, "weights": _weight_bytes(model), "loaded": loaded, "peak": peak,
              "pss": pss}
    Path(job["out"], f"rank{rank}.json").write_text(json.dumps(result))
    if rank == 0:
        torch.save(out.float().cpu(), Path(job["out"], "out.pt"))
    if par is not None:
        par.close()


def run_config(spec: dict, job: dict) -> tuple[list[dict], torch.Tensor]:
    import torch.multiprocessing as mp

    out = Path(tempfile.mkdtemp(prefix="hy-par-"))
    job = {**job, "out": str(out), "init": str(out / "pg")}
    try:
        mp.spawn(worker, args=(spec, job), nprocs=spec["world"])
        ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(spec["world"])]
        return ranks, torch.load(out / "out.pt")
    finally:
        shutil.rmtree(out, ignore_errors=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128x17,256x33", help="pixel size x frames, comma separated")
    ap.add_argument("--configs", default="1,u2,r2,u2s", help="comma separated, see the module docstring")
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--model", default="small", choices=["small", "13b"],
                    help="small: hidden 512 from a safetensors file; 13b: the full model, random weights per GPU")
    ap.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    ap.add_argument("--threads", type=int, default=1, help="threads per process")
    ap.add_argument("--runs", type=int, default=3, help="timed warm forwards per configuration")
    ap.add_argument("--json", help="also write the results here")
    args = ap.parse_args()

    specs = {c: parse_config(c) for c in args.configs.split(",")}
    if args.device == "cuda" and max(s["world"] for s in specs.values()) > torch.cuda.device_count():
        raise SystemExit(f"a configuration needs more processes than the {torch.cuda.device_count()} GPU(s)")
    cfg_batch = any(s["cfg"] for s in specs.values())
    tmp = Path(tempfile.mkdtemp(prefix="hy-par-bench-"))
    try:
        run_all(args, specs, cfg_batch, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def run_all(args, specs: dict, cfg_batch: bool, tmp: Path) -> None:
    weights = None
    if args.model == "small":
        weights = tmp / "weights.safetensors"
        write_weights(weights)
    elif args.device != "cuda":
        raise SystemExit("--model 13b needs --device cuda (25.6 GB of bf16 weights per process)")
    print(f"torch {torch.__version__}, {args.model} model, {args.device}, {args.dtype}, "
          f"{args.threads} thread(s) per process, {os.cpu_count()} CPUs" + (", batch 2 (CFG)" if cfg_batch else ""), flush=True)
    rows = []
    for size in args.sizes.split(","):
        w, h, f = parse_size(size)
        tokens = ((f - 1) // 4 + 1) * (h // 16) * (w // 16)
        job = dict(case=(w, h, f), dtype=args.dtype, device=args.device, threads=args.threads, runs=args.runs,
                   weights=str(weights) if weights else None, model=args.model, cfg_batch=cfg_batch)
        base, ref = None, None
        for name, spec in specs.items():
            ranks, out = run_config(spec, job)
            sec = statistics.median(ranks[0]["times"])
            if name == "1":
                base, ref = sec, out
            cpu = max(statistics.median(r["cpu"]) for r in ranks)
            row = dict(size=f"{w}x{h}x{f}", tokens=tokens, config=name, procs=spec["world"], seconds=sec, cpu=cpu,
                       speedup=(base / sec) if base else None,
                       weights=max(r["weights"] for r in ranks), loaded=max(r["loaded"] for r in ranks),
                       peak=max(r["peak"] for r in ranks), pss=max(r["pss"] for r in ranks),
                       diff=float((out - ref).abs().max()) if ref is not None else None)
            rows.append(row)
            print(json.dumps(row), flush=True)

    cuda = args.device == "cuda"
    after, peak = ("allocated after load", "peak allocated") if cuda else ("private after load", "peak RSS")
    print(f"\n| size (video tokens) | configuration | processes x threads | forward s | speed-up | CPU s / rank "
          f"| weights / rank MiB "
          f"| {after} / rank MiB |{'' if cuda else ' PSS after forward / rank MiB |'} {peak} / rank MiB "
          f"| max diff vs 1 process |")
    print("|---|---|---|---|---|---|---|---|---|---|" + ("" if cuda else "---|"))
    for r in rows:
        speed = f"{r['speedup']:.2f}x" if r["speedup"] else "-"
        diff = f"{r['diff']:.1e}" if r["diff"] is not None and r["config"] != "1" else "-"
        pss = "" if cuda else f" {r['pss'] / MiB:.0f} |"
        print(f"| {r['size']} ({r['tokens']}) | {r['config']} | {r['procs']} x {args.threads} | {r['seconds']:.3f} | "
              f"{speed} | {r['cpu']:.3f} | {r['weights'] / MiB:.0f} | {r['loaded'] / MiB:.0f} |{pss} {r['peak'] / MiB:.0f} | {diff} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    sys.exit(main())
