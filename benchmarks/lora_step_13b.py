"""One LoRA training step of the full 13B transformer on the CPU, its int8 base streamed from disk (issue 7).

The 13B configuration (HUNYUAN_I2V_720P) with random weights, from the int8 block-sharded checkpoint that
``benchmarks/stream_13b.py`` writes (``--dir``/int8, 13.2 GB; it is read, never rewritten). In a fresh process:
the blocks memory-mapped and streamed (``load_streamed_transformer``), rank-64 adapters (alpha 64) on the official
targets, gradient checkpointing per block (the backward's recompute streams every block in again), bf16 compute,
AdamW, one step at a small size (64x64, 5 frames). The table gives the peak RSS (VmHWM), the RSS after ``import
torch`` (the floor every process pays), the step time, the adapters' size, the planner's prediction for the same
step, and the planner's estimate for 360p (352x608, the 16:9 bucket) x 129 frames on a 24 GB GPU::

    python benchmarks/stream_13b.py --storages int8          # once, if the int8 checkpoint is not there yet
    python benchmarks/lora_step_13b.py --text-tokens 64,396

``--config small`` runs the same script on a mid-size model (hidden 1024, 2 + 4 blocks; its int8 checkpoint,
~0.2 GB, is written once under ``--dir``/small-int8) to check it in a few minutes.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from pathlib import Path

import torch
from procstat import proc_status_bytes

GB = 1e9
INDEX = "transformer.safetensors.index.json"
GPU_360P = (352, 608, 129)  # the 360p bucket of a 16:9 image (spec), 129 frames


def model_config(name: str):
    from hunyuan_i2v.config import HUNYUAN_I2V_720P

    if name == "13b":
        return HUNYUAN_I2V_720P
    transformer = dataclasses.replace(HUNYUAN_I2V_720P.transformer, hidden_size=1024, num_heads=8, depth_double=2,
                                      depth_single=4, rope_axes_dim=(16, 56, 56))
    return dataclasses.replace(HUNYUAN_I2V_720P, name="hunyuan-i2v-small", transformer=transformer)


def write_small_checkpoint(folder: Path, config) -> Path:
    """The mid-size model with random weights, block linears int8, one shard per block, as stream_13b.py lays out
    the 13B one."""
    from safetensors.torch import save_file

    from hunyuan_i2v.memory.quant import quantize_weight
    from hunyuan_i2v.model.transformer import HunyuanVideoTransformer

    index = folder / INDEX
    if index.exists():
        return index
    folder.mkdir(parents=True, exist_ok=True)
    model = HunyuanVideoTransformer(config.transformer, device="meta", dtype=torch.bfloat16)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    gen = torch.Generator().manual_seed(0)
    for name, meta in model.state_dict().items():
        parts = name.split(".")
        group = ".".join(parts[:2]) if parts[0] in ("double_blocks", "single_blocks") else "resident"
        if name.endswith("bias"):
            x = torch.zeros(meta.shape, dtype=torch.bfloat16)
        elif meta.ndim == 1:
            x = torch.ones(meta.shape, dtype=torch.bfloat16)
        else:
            x = (torch.randn(meta.shape, generator=gen) * 0.02).to(torch.bfloat16)
        tensors = groups.setdefault(group, {})
        if group != "resident" and meta.ndim == 2:
            tensors[name], tensors[name[: -len("weight")] + "weight_scale"] = quantize_weight(x, "int8")
        else:
            tensors[name] = x
    weight_map = {}
    for n, (group, tensors) in enumerate(groups.items()):
        shard = f"transformer-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(tensors, str(folder / shard))
        weight_map.update({k: shard for k in tensors})
    index.write_text(json.dumps({"metadata": {"storage": "int8"}, "weight_map": weight_map}))
    return index


def run_step(index: Path, config_name: str, size: int, frames: int, text_tokens: int, rank: int, threads: int
             ) -> dict:
    """In this (fresh) process: stream the int8 base, attach the adapters, take one AdamW step; RSS and time."""
    torch.set_num_threads(threads)
    floor = proc_status_bytes("VmRSS")
    from hunyuan_i2v.memory import planner
    from hunyuan_i2v.memory.offload import load_streamed_transformer
    from hunyuan_i2v.train.lora import attach_trainable_loras, lora_loss

    config = model_config(config_name)
    cfg = config.transformer
    t0 = time.time()
    streamer = load_streamed_transformer(index, device="cpu", dtype=torch.bfloat16, config=cfg)
    model = streamer.model
    adapters = attach_trainable_loras(model, rank, float(rank))
    model.train().enable_gradient_checkpointing(True)
    params = [p for a in adapters.values() for p in a.parameters()]
    optimizer = torch.optim.AdamW(params, lr=1e-4, eps=1e-8, weight_decay=0.0)
    after_load = proc_status_bytes("VmRSS")
    load_s = time.time() - t0

    gen = torch.Generator().manual_seed(0)
    latent = (1, cfg.in_channels, (frames - 1) // 4 + 1, size // 8, size // 8)
    x0, noise = torch.randn(latent, generator=gen), torch.randn(latent, generator=gen)
    first = x0[:, :, :1].clone()
    text = (torch.randn(1, text_tokens, cfg.text_states_dim, generator=gen).to(torch.bfloat16),
            torch.ones(1, text_tokens, dtype=torch.bool),
            torch.randn(1, cfg.text_states_dim_2, generator=gen).to(torch.bfloat16))
    guidance = torch.full((1,), 6000.0) if cfg.guidance_embed else None
    # Where the peak lives: anonymous memory (activations, adapters, optimiser state, dequantized weights) against
    # file-backed pages (the mapped block being computed), sampled after every layer, forward and recompute.
    split = {"anon": 0, "file": 0}

    def sample(*_):
        split.update(anon=max(split["anon"], proc_status_bytes("RssAnon")),
                     file=max(split["file"], proc_status_bytes("RssFile")))

    for block in [*model.double_blocks, *model.single_blocks]:
        for m in block.modules():
            if not list(m.children()):
                m.register_forward_hook(sample)
    t1 = time.time()
    loss = lora_loss(model, x0, first, noise, torch.tensor([0.7]), text, guidance)
    forward_s = time.time() - t1
    loss.backward()
    backward_s = time.time() - t1 - forward_s
    grad_norm = torch.nn.utils.clip_grad_norm_(params, 1.0)
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    step_s = time.time() - t1
    sample()
    loads, backward_loads = streamer.loads, streamer.backward_loads
    streamer.remove()

    target = planner.Target("cpu", torch.bfloat16, torch.float32, torch.float32)
    small = planner.plan_lora_training(config, size, size, frames, target, "int8", "blocks", True, rank,
                                       text_len=text_tokens)
    return {"config": config.name, "size": size, "frames": frames, "text_tokens": text_tokens, "rank": rank,
            "peak_rss": proc_status_bytes("VmHWM"), "floor_rss": floor, "after_load_rss": after_load,
            "peak_anon": split["anon"], "peak_file": split["file"], "load_s": load_s, "forward_s": forward_s,
            "backward_s": backward_s, "step_s": step_s, "loss": float(loss.detach()),
            "grad_norm": float(grad_norm), "finite": bool(torch.isfinite(loss).item()),
            "adapter_params": sum(p.numel() for p in params), "adapter_layers": len(adapters), "loads": loads,
            "backward_loads": backward_loads, "blocks": cfg.depth_double + cfg.depth_single,
            "predicted_peak": small.peak, "predicted": dataclasses.asdict(small)}


def gpu_estimate(config_name: str, rank: int) -> list[str]:
    """The planner's lines for 360p x 129 frames on a 24 GB CUDA GPU (bf16 compute)."""
    from hunyuan_i2v.memory import planner

    config = model_config(config_name)
    gpu = planner.Target.for_device("cuda")
    h, w, f = GPU_360P
    rows = planner.lora_training_table(config, h, w, f, gpu, 24, rank)
    out = [f"planner, {config.name} at {h}x{w} x {f} frames, rank {rank}, bf16 on a 24 GB CUDA GPU (GB = 2^30 "
           f"bytes, as the planner prints them; fits: peak <= 90% of 24 GB = {24 * 0.9:.1f} GB):", "",
           "| residency | block weights | block inputs | peak GB | fits 24 GB | weights / LoRA+grads+AdamW / "
           "block inputs / one block / other GB |", "|---|---|---|---|---|---|"]
    for p, fit in rows:
        if not p.grad_checkpointing:
            continue
        inputs = "host memory" if p.offload_activations else "device"
        out.append(f"| {p.offload} | {p.weights_dtype} | {inputs} | {p.peak / 2**30:.2f} | {'yes' if fit else 'no'} "
                   f"| {p.weights / 2**30:.2f} / {(p.adapters + p.gradients + p.optimizer) / 2**30:.2f} / "
                   f"{p.checkpoints / 2**30:.2f} / {p.block / 2**30:.2f} / {p.other / 2**30:.2f} |")
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dir", default=str(Path.home() / ".cache/hunyuan-i2v/bench/13b"))
    p.add_argument("--config", choices=["13b", "small"], default="13b")
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--frames", type=int, default=5)
    p.add_argument("--text-tokens", default="64", help="comma-separated: one step (fresh process) per count")
    p.add_argument("--rank", type=int, default=64)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--json", help="also write the rows here")
    p.add_argument("--_step", type=int, help=argparse.SUPPRESS)  # internal: one step in this process
    args = p.parse_args()
    root = Path(args.dir).expanduser()
    if args.config == "13b":
        index = root / "int8" / INDEX
        if not index.exists():
            print(f"{index} is missing: write it once with python benchmarks/stream_13b.py --storages int8")
            return 1
    else:
        index = write_small_checkpoint(root / "small-int8", model_config("small"))
    if args._step is not None:
        row = run_step(index, args.config, args.size, args.frames, args._step, args.rank, args.threads)
        print("RESULT " + json.dumps(row), flush=True)
        return 0
    rows = []
    for tokens in [int(x) for x in args.text_tokens.split(",")]:
        proc = subprocess.run([sys.executable, __file__, "--dir", str(root), "--config", args.config, "--size",
                               str(args.size), "--frames", str(args.frames), "--rank", str(args.rank), "--threads",
                               str(args.threads), "--_step", str(tokens)], capture_output=True, text=True)
        line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
        if line is None:
            print(proc.stdout[-2000:], proc.stderr[-4000:])
            return 1
        rows.append(json.loads(line[7:]))
    r0 = rows[0]
    print(f"\n{r0['config']}: one LoRA training step (rank {args.rank}, alpha {args.rank}, official targets, "
          f"gradient checkpointing, int8 base streamed from memory-mapped shards, bf16 compute, AdamW) at "
          f"{args.size}x{args.size}x{args.frames}, {args.threads} CPU threads (GB = 10^9 bytes)\n")
    print("| text tokens | peak RSS GB | RSS after `import torch` GB | peak - floor GB | planner GB | planner / "
          "(peak - floor) | sampled peak anon / file GB | adapters (layers, M params) | load s | forward / "
          "backward / step s | blocks streamed (backward) | loss |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        net = r["peak_rss"] - r["floor_rss"]
        print(f"| {r['text_tokens']} | {r['peak_rss'] / GB:.2f} | {r['floor_rss'] / GB:.2f} | {net / GB:.2f} | "
              f"{r['predicted_peak'] / GB:.2f} | {r['predicted_peak'] / net:.2f} | "
              f"{r['peak_anon'] / GB:.2f} / {r['peak_file'] / GB:.2f} | {r['adapter_layers']}, "
              f"{r['adapter_params'] / 1e6:.1f} | {r['load_s']:.1f} | {r['forward_s']:.0f} / {r['backward_s']:.0f} / "
              f"{r['step_s']:.0f} | {r['loads']} ({r['backward_loads']}) | {r['loss']:.4f} |")
    print()
    print("\n".join(gpu_estimate(args.config, args.rank)))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
