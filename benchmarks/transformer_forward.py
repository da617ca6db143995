"""Transformer forward on CPU: ours against diffusers' HunyuanVideoTransformer3DModel, same weights, same inputs.

Model: hidden 512 (4 heads x 128), 2 double + 4 single blocks, the 13B model's other dimensions (text states 4096,
pooled 768, 2 refiner blocks, token_replace with guidance embedding). Inputs: one video at 128x128x17 or
256x256x33 pixels (latents /8 in space, (T-1)/4+1 frames, patch 2) and 396 text positions (144 image + 252 text
tokens, spec 2.1), either all valid or with the padding of a ~55-token prompt (200 valid).

Every measurement runs in a fresh subprocess, ours and diffusers alternating (interleaved rounds). Time: median
of the warm forwards over all rounds. Memory: the process's peak RSS during the first forward (VmHWM, reset
through /proc/self/clear_refs after loading) above the RSS before it, i.e. activations and workspace; the
weights are the same for both. Max diff: ours vs diffusers on the same inputs; in bf16 also each against
our fp32 output.

    flock /tmp/hy-bench.lock python benchmarks/transformer_forward.py [--sizes 128x17,256x33] [--dtypes fp32,bf16]
        [--valid 396,200] [--rounds 3] [--runs 2] [--threads 2] [--json out.json]
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from hunyuan_i2v.config import TransformerConfig

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
TEXT_LEN = 396
CONFIG = TransformerConfig(hidden_size=512, num_heads=4, depth_double=2, depth_single=4)


def _status(field: str) -> int:
    """A /proc/self/status entry in bytes (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)


def make_inputs(size: int, frames: int, valid: int, dtype: torch.dtype, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    lat_t, lat_hw = (frames - 1) // 4 + 1, size // 8
    x = torch.randn(1, CONFIG.in_channels, lat_t, lat_hw, lat_hw, generator=g)
    text = torch.randn(1, TEXT_LEN, CONFIG.text_states_dim, generator=g)
    mask = torch.zeros(1, TEXT_LEN)
    mask[:, :valid] = 1
    pooled = torch.randn(1, CONFIG.text_states_dim_2, generator=g)
    return x.to(dtype), torch.tensor([700.0]), text.to(dtype), mask, pooled.to(dtype), torch.tensor([6016.0])


def write_weights(path: Path, seed: int = 0) -> None:
    from hunyuan_i2v.model.transformer import HunyuanVideoTransformer
    from hunyuan_i2v.weights import save_transformer

    torch.manual_seed(seed)
    model = HunyuanVideoTransformer(CONFIG)
    with torch.no_grad():
        for p in model.parameters():  # large enough that every path matters, small enough to stay finite
            p.normal_(0.0, 0.02)
    save_transformer(model, path, format="safetensors")


# ---------------------------------------------------------------------------------------------
# One measurement (runs in its own process)


def worker(args) -> dict:
    torch.set_num_threads(args.threads)
    dtype = DTYPES[args.dtype]
    size, frames = args.case
    x, t, text, mask, pooled, g = make_inputs(size, frames, args.valid, dtype)
    from safetensors.torch import load_file

    # Both models copy the weights into their own parameters (load_state_dict), so neither computes from pages of
    # the memory-mapped file, which would count towards the forward's peak RSS.
    state = load_file(args.weights)
    if args.impl == "ours":
        from hunyuan_i2v.model.transformer import HunyuanVideoTransformer

        model = HunyuanVideoTransformer(CONFIG)
        model.load_state_dict(state)
        model = model.to(dtype).eval()
        if args.chunk:
            model.set_ff_chunk_tokens(args.chunk)

        def forward():
            return model(x, t, text, mask, pooled, guidance=g)
    else:
        import diffusers

        from hunyuan_i2v.keymap import official_to_diffusers
        from hunyuan_i2v.weights import transformer_config_to_diffusers

        diffusers.utils.logging.set_verbosity_error()
        kwargs = {k: v for k, v in transformer_config_to_diffusers(CONFIG).items() if not k.startswith("_")}
        model = diffusers.HunyuanVideoTransformer3DModel(**kwargs)
        model.load_state_dict(official_to_diffusers(state))
        model = model.to(dtype).eval()
        mask_long = mask.long()

        def forward():
            return model(x, t, text, mask_long, pooled, guidance=g, return_dict=False)[0]

    del state
    gc.collect()
    with torch.no_grad():
        rss = _status("VmRSS")
        _reset_peak()
        start = time.perf_counter()
        out = forward()
        cold = time.perf_counter() - start
        peak = _status("VmHWM")
        times = []
        for _ in range(args.runs):
            start = time.perf_counter()
            forward()
            times.append(time.perf_counter() - start)
    torch.save(out.float(), args.out)
    return {"times": times, "cold": cold, "rss_before": rss, "peak": peak, "forward_peak": peak - rss}


# ---------------------------------------------------------------------------------------------
# The driver


def _run_worker(impl: str, case: tuple[int, int], dtype: str, valid: int, weights: Path, out: Path, args) -> dict:
    cmd = [sys.executable, __file__, "--worker", impl, "--case", f"{case[0]}x{case[1]}", "--dtypes", dtype,
           "--valid", str(valid), "--weights", str(weights), "--out", str(out), "--runs", str(args.runs),
           "--threads", str(args.threads)] + (["--chunk", str(args.chunk)] if args.chunk and impl == "ours" else [])
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise RuntimeError(f"{impl} worker failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _case(text: str) -> tuple[int, int]:
    size, frames = text.lower().split("x")
    return int(size), int(frames)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", default="128x17,256x33", help="pixel size x frames, comma separated")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--valid", default=f"{TEXT_LEN},200", help="valid text positions out of 396, comma separated")
    ap.add_argument("--rounds", type=int, default=3, help="fresh processes per implementation and case")
    ap.add_argument("--runs", type=int, default=2, help="timed warm forwards per process")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--chunk", type=int, default=0, help="ours: ff_chunk_tokens (0 = off, the default)")
    ap.add_argument("--json", help="also write the results here")
    ap.add_argument("--worker", help=argparse.SUPPRESS)
    ap.add_argument("--case", type=_case, help=argparse.SUPPRESS)
    ap.add_argument("--weights", help=argparse.SUPPRESS)
    ap.add_argument("--out", help=argparse.SUPPRESS)
    args = ap.parse_args()

    if args.worker:
        args.impl, args.dtype, args.valid = args.worker, args.dtypes, int(args.valid)
        print(json.dumps(worker(args)))
        return

    cases = [_case(c) for c in args.sizes.split(",")]
    dtypes = args.dtypes.split(",")
    valids = [int(v) for v in args.valid.split(",")]
    tmp = Path(tempfile.mkdtemp(prefix="hy-bench-"))
    weights = tmp / "weights.safetensors"
    write_weights(weights)
    print(f"torch {torch.__version__}, {args.threads} threads, {os.cpu_count()} CPUs; weights {weights}", flush=True)
    rows = []
    for case in cases:
        for valid in valids:
            fp32_ref = None
            for dtype in dtypes:
                res = {impl: [] for impl in ("ours", "diffusers")}
                outs = {impl: tmp / f"{impl}-{case[0]}-{valid}-{dtype}.pt" for impl in res}
                for r in range(args.rounds):
                    order = ("ours", "diffusers") if r % 2 == 0 else ("diffusers", "ours")
                    for impl in order:
                        res[impl].append(_run_worker(impl, case, dtype, valid, weights, outs[impl], args))
                        print(f"  {case} valid={valid} {dtype} {impl}: {res[impl][-1]['times']}", flush=True)
                o = {impl: torch.load(outs[impl]) for impl in res}
                if dtype == "fp32":
                    fp32_ref = o["ours"]
                row = {"case": f"{case[0]}x{case[0]}x{case[1]}", "valid": valid, "dtype": dtype,
                       "max_diff": (o["ours"] - o["diffusers"]).abs().max().item(),
                       "out_scale": o["diffusers"].abs().max().item()}
                for impl in res:
                    row[f"{impl}_s"] = statistics.median(t for m in res[impl] for t in m["times"])
                    row[f"{impl}_mem"] = statistics.median(m["forward_peak"] for m in res[impl])
                    row[f"{impl}_peak"] = statistics.median(m["peak"] for m in res[impl])
                    if fp32_ref is not None and dtype != "fp32":
                        row[f"{impl}_vs_fp32"] = (o[impl] - fp32_ref).abs().max().item()
                rows.append(row)
                print(json.dumps(row), flush=True)

    mb = 2**20
    print("\n| size | valid text | dtype | ours s | diffusers s | speed-up | ours fwd peak MiB | diffusers fwd peak "
          "MiB | ours / diffusers process peak MiB | max diff |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        diff = f"{r['max_diff']:.2e}"
        if "ours_vs_fp32" in r:
            diff += f" (vs fp32: ours {r['ours_vs_fp32']:.2e}, diffusers {r['diffusers_vs_fp32']:.2e})"
        print(f"| {r['case']} | {r['valid']}/{TEXT_LEN} | {r['dtype']} | {r['ours_s']:.3f} | {r['diffusers_s']:.3f} | "
              f"{r['diffusers_s'] / r['ours_s']:.2f}x | {r['ours_mem'] / mb:.0f} | {r['diffusers_mem'] / mb:.0f} | "
              f"{r['ours_peak'] / mb:.0f} / {r['diffusers_peak'] / mb:.0f} | {diff} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
