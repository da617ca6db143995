"""One denoising step of the full 13B transformer on the CPU, its blocks streamed from disk (issue 5).

The 13B configuration (HUNYUAN_I2V_720P) with random weights is written once, one safetensors shard per block
(bf16: 25.6 GB; int8 block linears: ~13 GB), then each storage runs one transformer forward at 64x64, 5 frames,
396 text tokens in a fresh process, with the blocks memory-mapped and streamed (``load_streamed_transformer``).
The table gives the process's peak RSS (VmHWM), its RSS after importing torch (the floor every process pays), the
step time, and the planner's predicted denoising peak for the same plan::

    python benchmarks/stream_13b.py --dir ~/.cache/hunyuan-i2v/bench/13b --storages bf16,int8

Writing needs ~40 GB of disk once (kept for reruns: ``--keep``, the default); reading is what the step does.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch
from procstat import proc_status_bytes

GB = 1e9


def write_checkpoint(folder: Path, storage: str, seed: int = 0) -> Path:
    """Random weights of the 13B transformer as one shard per block (+ one for the rest) and an index."""
    from safetensors.torch import save_file

    from hunyuan_i2v.config import HUNYUAN_I2V_720P
    from hunyuan_i2v.memory.quant import quantize_weight
    from hunyuan_i2v.model.transformer import HunyuanVideoTransformer

    index = folder / "transformer.safetensors.index.json"
    if index.exists():
        return index
    folder.mkdir(parents=True, exist_ok=True)
    cfg = HUNYUAN_I2V_720P.transformer
    model = HunyuanVideoTransformer(cfg, device="meta", dtype=torch.bfloat16)
    groups: dict[str, list[tuple[str, torch.Tensor]]] = {}
    for name, t in model.state_dict().items():
        parts = name.split(".")
        group = ".".join(parts[:2]) if parts[0] in ("double_blocks", "single_blocks") else "resident"
        groups.setdefault(group, []).append((name, t))
    gen = torch.Generator().manual_seed(seed)
    weight_map = {}
    t0 = time.time()
    for n, (group, items) in enumerate(groups.items()):
        tensors = {}
        for name, meta in items:
            if name.endswith("bias"):
                x = torch.zeros(meta.shape, dtype=torch.bfloat16)
            elif meta.ndim == 1:  # norm scales
                x = torch.ones(meta.shape, dtype=torch.bfloat16)
            else:
                x = (torch.randn(meta.shape, generator=gen) * 0.02).to(torch.bfloat16)
            is_block_linear = group != "resident" and meta.ndim == 2
            if storage == "int8" and is_block_linear:
                codes, scale = quantize_weight(x, "int8")
                tensors[name] = codes
                tensors[name[: -len("weight")] + "weight_scale"] = scale
            else:
                tensors[name] = x
        shard = f"transformer-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(folder / shard))
        weight_map.update({k: shard for k in tensors})
        print(f"  wrote {shard} ({group}, {sum(t.numel() * t.element_size() for t in tensors.values()) / GB:.2f} GB)"
              f"  {time.time() - t0:.0f} s", flush=True)
    tmp = index.with_suffix(".tmp")
    tmp.write_text(json.dumps({"metadata": {"storage": storage}, "weight_map": weight_map}))
    os.replace(tmp, index)
    return index


def run_step(index: Path, storage: str, frames: int, size: int, text_tokens: int, threads: int) -> dict:
    """In this (fresh) process: load the streamed model, run one forward, report RSS and time."""
    torch.set_num_threads(threads)
    base = proc_status_bytes("VmRSS")
    from hunyuan_i2v.config import HUNYUAN_I2V_720P
    from hunyuan_i2v.memory import planner
    from hunyuan_i2v.memory.offload import load_streamed_transformer

    config = HUNYUAN_I2V_720P
    cfg = config.transformer
    t0 = time.time()
    streamer = load_streamed_transformer(index, device="cpu", dtype=torch.bfloat16, config=cfg)
    model = streamer.model
    after_load = proc_status_bytes("VmRSS")
    lat_t, lat_hw = (frames - 1) // 4 + 1, size // 8
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(1, cfg.in_channels, lat_t, lat_hw, lat_hw, generator=gen).to(torch.bfloat16)
    t = torch.full((1,), 900.0)
    text = torch.randn(1, text_tokens, cfg.text_states_dim, generator=gen).to(torch.bfloat16)
    mask = torch.ones(1, text_tokens, dtype=torch.bool)
    text_2 = torch.randn(1, cfg.text_states_dim_2, generator=gen).to(torch.bfloat16)
    guidance = torch.full((1,), 6000.0) if cfg.guidance_embed else None
    t_load = time.time() - t0
    # Where the peak lives: anonymous memory (activations, dequantized or cast copies) against file-backed pages
    # (the mapped block being computed), sampled after every layer of every block.
    split = {"anon": 0, "file": 0, "sum": 0}

    def sample(*_):
        anon, file = proc_status_bytes("RssAnon"), proc_status_bytes("RssFile")
        split.update(anon=max(split["anon"], anon), file=max(split["file"], file),
                     sum=max(split["sum"], anon + file))

    hooks = [m.register_forward_hook(sample) for block in [*model.double_blocks, *model.single_blocks]
             for m in block.modules() if not list(m.children())]
    t1 = time.time()
    with torch.no_grad():
        out = model(x, t, text, mask, text_2, guidance=guidance)
    t_step = time.time() - t1
    for h in hooks:
        h.remove()
    finite = bool(torch.isfinite(out.float()).all())
    streamer.remove()
    work = planner.Workload(size, size, frames, steps=1, encode_prompts=False)
    target = planner.Target("cpu", torch.bfloat16, torch.float32, torch.float32)
    plan = planner.plan_for(config, work, target, planner.Fixed(offload="blocks", weights_dtype=storage))
    peaks = dict(plan.peaks)
    return {"storage": storage, "peak_rss": proc_status_bytes("VmHWM"), "base_rss": base,
            "after_load_rss": after_load, "peak_anon": split["anon"], "peak_file": split["file"],
            "peak_sampled": split["sum"],
            "load_s": t_load, "step_s": t_step, "finite": finite, "out_shape": list(out.shape),
            "predicted_denoising": peaks.get("denoising", plan.peak), "loads": streamer.loads,
            "file_bytes": sum(f.stat().st_size for f in index.parent.glob("*.safetensors"))}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(Path.home() / ".cache/hunyuan-i2v/bench/13b"))
    p.add_argument("--storages", default="bf16,int8")
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--text-tokens", type=int, default=396)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--_step", help=argparse.SUPPRESS)  # internal: run one storage in this process
    args = p.parse_args()
    root = Path(args.dir).expanduser()
    if args._step:
        row = run_step(root / args._step / "transformer.safetensors.index.json", args._step, args.frames, args.size,
                       args.text_tokens, args.threads)
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    rows = []
    for storage in args.storages.split(","):
        print(f"{storage}: writing the random 13B checkpoint (once)", flush=True)
        write_checkpoint(root / storage, storage)
        subprocess.run(["sync"], check=False)
        proc = subprocess.run([sys.executable, __file__, "--dir", str(root), "--_step", storage, "--frames",
                               str(args.frames), "--size", str(args.size), "--text-tokens", str(args.text_tokens),
                               "--threads", str(args.threads)], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            return 1
        rows.append(json.loads(line[7:]))
    print(f"\n13B transformer, one step at {args.size}x{args.size}x{args.frames}, {args.text_tokens} text tokens, "
          f"blocks streamed from memory-mapped safetensors, {args.threads} CPU threads\n")
    print("| storage | files GB | peak RSS GB | RSS after `import torch` GB | peak - floor GB | planner denoising GB "
          "| planner / (peak - floor) | sampled peak anon / file GB | load s | step s | blocks streamed | finite |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        net = r["peak_rss"] - r["base_rss"]
        print(f"| {r['storage']} | {r['file_bytes'] / GB:.1f} | {r['peak_rss'] / GB:.2f} | {r['base_rss'] / GB:.2f} | "
              f"{net / GB:.2f} | {r['predicted_denoising'] / GB:.2f} | {r['predicted_denoising'] / net:.2f} | "
              f"{r['peak_anon'] / GB:.2f} / {r['peak_file'] / GB:.2f} | "
              f"{r['load_s']:.1f} | {r['step_s']:.1f} | {r['loads']} | {r['finite']} |")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
