"""The full-width VAE (random weights) decoding 9 latent frames at 256x256: ours vs diffusers (issue 5).

All decode the same latents with the same weights, each in a fresh process so that peak RSS is its own:
diffusers' default ``decode`` (spatial tiling off, but framewise decoding on: temporal tiles of 16 frames with a
stride of 12 once there are more than 4 latent frames), diffusers with framewise decoding off (the untiled
decode, the reference), and ours as the pipeline runs it (the official tile rules, which do not tile at this
size, and the lean streaming decoder). Reported: wall time, peak RSS above the process's RSS just before the
decode (weights and latents already in memory), and the largest difference from the untiled decode, absolute
and relative to the reference's largest magnitude::

    python benchmarks/vae_decode.py --size 256 --latent-frames 9 --runs 1
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from procstat import proc_status_bytes, reset_peak_rss

GB = 1e9


def build(seed: int):
    import diffusers

    from hunyuan_i2v.config import VAEConfig

    cfg = VAEConfig()
    torch.manual_seed(seed)
    ref = diffusers.AutoencoderKLHunyuanVideo(
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, latent_channels=cfg.latent_channels,
        block_out_channels=cfg.block_out_channels, layers_per_block=cfg.layers_per_block,
        norm_num_groups=cfg.norm_num_groups, scaling_factor=cfg.scaling_factor,
        spatial_compression_ratio=cfg.spatial_compression, temporal_compression_ratio=cfg.temporal_compression,
        mid_block_add_attention=cfg.mid_block_add_attention).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.02 * torch.randn_like(p))
    return cfg, ref


def run_one(impl: str, size: int, latent_frames: int, runs: int, threads: int, out: Path) -> dict:
    torch.set_num_threads(threads)
    cfg, ref = build(0)
    if impl == "ours":
        from hunyuan_i2v.model.vae import CausalVAE

        model = CausalVAE(cfg).eval()
        model.load_state_dict(ref.state_dict(), strict=True)
        del ref

        def decode(z):
            return model.decode(z, lean=True)
    else:
        model = ref
        if impl == "diffusers-untiled":
            model.use_framewise_decoding = False

        def decode(z):
            return model.decode(z).sample
    h = size // cfg.spatial_compression
    z = torch.randn(1, cfg.latent_channels, latent_frames, h, h, generator=torch.Generator().manual_seed(1))
    times = []
    video = None
    net_peak = 0
    for _ in range(runs):
        video = None
        floor = proc_status_bytes("VmRSS")
        reset_peak_rss()
        t0 = time.perf_counter()
        with torch.no_grad():
            video = decode(z)
        times.append(time.perf_counter() - t0)
        net_peak = max(net_peak, proc_status_bytes("VmHWM") - floor)
    np.save(out, video.float().numpy())
    return {"impl": impl, "seconds": min(times), "all_seconds": times, "net_peak": net_peak,
            "shape": list(video.shape)}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", type=int, default=256)
    p.add_argument("--latent-frames", type=int, default=9)
    p.add_argument("--runs", type=int, default=1, help="decodes per implementation (the fastest is reported)")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json")
    p.add_argument("--_impl", help=argparse.SUPPRESS)
    p.add_argument("--_out", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args._impl:
        row = run_one(args._impl, args.size, args.latent_frames, args.runs, args.threads, Path(args._out))
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    rows, outputs = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for impl in ("diffusers-untiled", "diffusers", "ours"):
            out = Path(tmp) / f"{impl}.npy"
            proc = subprocess.run([sys.executable, __file__, "--_impl", impl, "--_out", str(out), "--size",
                                   str(args.size), "--latent-frames", str(args.latent_frames), "--runs",
                                   str(args.runs), "--threads", str(args.threads)], capture_output=True, text=True)
            line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
            if line is None:
                print(proc.stdout[-2000:], proc.stderr[-4000:])
                return 1
            rows[impl] = json.loads(line[7:])
            outputs[impl] = np.load(out)
    ref = outputs["diffusers-untiled"]
    scale = float(np.abs(ref).max())
    for impl, row in rows.items():
        row["max_diff"] = float(np.abs(outputs[impl] - ref).max())
        row["rel_diff"] = row["max_diff"] / scale
    frames = 1 + 4 * (args.latent_frames - 1)
    names = {"diffusers-untiled": "diffusers, framewise decoding off (untiled)",
             "diffusers": "diffusers `decode` default (framewise: temporal tiles)",
             "ours": "ours (official tile rules + lean streaming decoder)"}
    print(f"\nFull-width VAE decode, {args.latent_frames} latent frames -> {frames} x {args.size} x {args.size}, "
          f"fp32, {args.threads} CPU threads, best of {args.runs}; reference magnitude {scale:.3g}\n")
    print("| decode | seconds | peak RSS above the start, GB | max abs diff vs untiled | relative |")
    print("|---|---|---|---|---|")
    for impl, row in rows.items():
        print(f"| {names[impl]} | {row['seconds']:.1f} | {row['net_peak'] / GB:.2f} | {row['max_diff']:.2e} | "
              f"{row['rel_diff']:.1e} |")
    d, o = rows["diffusers"], rows["ours"]
    print(f"\nours vs diffusers' default: speed-up {d['seconds'] / o['seconds']:.2f}x, peak memory ratio "
          f"{o['net_peak'] / d['net_peak']:.2f}x")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
