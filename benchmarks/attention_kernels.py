"""Time and peak memory of each attention backend at the 13B model's attention shapes (issue 5, item 4).

One joint attention of the DiT: 24 heads x 128, image tokens + 256 text tokens, batch 1; with the text right-padded
(a key-padding mask, the usual case) and unpadded (no mask). Prints a markdown table; backends that cannot run on
the device/dtype are listed with the reason.

    # smoke, on any machine
    python benchmarks/attention_kernels.py --device cpu --heads 2 --head-dim 32 --lengths 64 --text 16 --repeats 1
    # GPU: image tokens from 4k to 720p x 129 frames (45 x 80 patches x 33 latent frames = 118,800)
    python benchmarks/attention_kernels.py --device cuda --dtype bf16 --lengths 4096,16384,32768,67320,118800

Peak memory is what the call allocates beyond q, k, v and the mask: on CUDA from the allocator's peak counter, on
CPU as the peak resident set of a fresh worker process per measurement, minus its size just before the call.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time

import torch

from hunyuan_i2v.model.layers import ATTENTION_BACKENDS, attention, available_attention_backends, key_padding_mask

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def make_inputs(n_img: int, n_text: int, valid_text: int, padded: bool, heads: int, head_dim: int,
                device: torch.device, dtype: torch.dtype, seed: int = 0):
    gen = torch.Generator(device=device).manual_seed(seed)
    shape = (1, heads, n_img + n_text, head_dim)
    q, k, v = (torch.randn(shape, generator=gen, device=device, dtype=dtype) for _ in range(3))
    mask = None
    if padded:
        text_mask = torch.zeros(1, n_text, device=device)
        text_mask[:, :valid_text] = 1
        mask = key_padding_mask(n_img, text_mask)
    return q, k, v, mask


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def measure(backend: str, args, n_img: int, padded: bool) -> dict:
    """Time (median ms), extra peak bytes, and max |difference| from SDPA of one backend at one shape."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    q, k, v, mask = make_inputs(n_img, args.text, args.valid_text, padded, args.heads, args.head_dim, device, dtype)
    with torch.no_grad():
        # Load kernels and libraries first, so their one-off allocations are not counted as the call's memory.
        small = make_inputs(8, 8, 4, padded, args.heads, args.head_dim, device, dtype)
        attention(*small, backend=backend)
        del small
        _sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
            base = torch.cuda.memory_allocated(device)
        else:
            base = _rss_bytes()
        out = attention(q, k, v, mask, backend=backend)
        _sync(device)
        if device.type == "cuda":
            peak = torch.cuda.max_memory_allocated(device) - base
        else:
            peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base  # Linux: ru_maxrss in KiB
        times = []
        for _ in range(args.repeats):
            _sync(device)
            start = time.perf_counter()
            attention(q, k, v, mask, backend=backend)
            _sync(device)
            times.append(time.perf_counter() - start)
        reference = attention(q, k, v, mask, backend="sdpa")
        diff = (out.float() - reference.float()).abs().max().item()
    return {"ms": 1000 * statistics.median(times), "peak": max(peak, 0), "diff": diff}


def measure_in_worker(backend: str, args, n_img: int, padded: bool) -> dict:
    """CPU memory has no peak counter to reset, so each CPU measurement runs in a process of its own."""
    cmd = [sys.executable, __file__, "--worker", json.dumps([backend, n_img, padded])] + args.forward
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"worker for {backend} at {n_img} tokens failed:\n{done.stderr}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N]")
    p.add_argument("--dtype", choices=DTYPES, default=None, help="default: bf16 on CUDA, fp32 on CPU")
    p.add_argument("--lengths", default=None, help="image token counts, comma separated "
                   "(default: 1024,4096 on CPU; 4096,16384,32768,67320,118800 on CUDA)")
    p.add_argument("--text", type=int, default=256, help="text tokens (the model pads text to 256)")
    p.add_argument("--valid-text", type=int, default=None, help="unpadded text tokens (default: a third)")
    p.add_argument("--heads", type=int, default=24)
    p.add_argument("--head-dim", type=int, default=128)
    p.add_argument("--backends", default=",".join(ATTENTION_BACKENDS), help="comma separated; chunked:<MiB> allowed")
    p.add_argument("--padding", choices=["both", "padded", "none"], default="both")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="CPU threads for torch")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.forward = [a for i, a in enumerate(argv) if a != "--worker" and (i == 0 or argv[i - 1] != "--worker")]
    device = torch.device(args.device)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    if args.valid_text is None:
        args.valid_text = max(1, args.text // 3)
    torch.set_num_threads(args.threads)

    if args.worker:
        backend, n_img, padded = json.loads(args.worker)
        print(json.dumps(measure(backend, args, n_img, padded)))
        return

    default_lengths = "4096,16384,32768,67320,118800" if device.type == "cuda" else "1024,4096"
    lengths = [int(x) for x in (args.lengths or default_lengths).split(",")]
    variants = {"both": [True, False], "padded": [True], "none": [False]}[args.padding]
    reasons = available_attention_backends(device, DTYPES[args.dtype])
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else "CPU"
    print(f"attention: batch 1, {args.heads} heads x {args.head_dim}, image tokens + {args.text} text "
          f"({args.valid_text} valid when padded), {args.dtype}, {name}, torch {torch.__version__}, "
          f"{args.threads} threads, median of {args.repeats}\n")
    print("| backend | image + text tokens | text padded | time (ms) | extra peak (MiB) | max abs diff vs sdpa |")
    print("|---|---|---|---|---|---|")
    for backend in args.backends.split(","):
        reason = reasons.get(backend.partition(":")[0])
        if reason:
            print(f"| {backend} | - | - | skipped: {reason} | | |")
            continue
        for n_img in lengths:
            for padded in variants:
                run = measure_in_worker if device.type == "cpu" else measure
                try:
                    r = run(backend, args, n_img, padded)
                except torch.OutOfMemoryError:
                    print(f"| {backend} | {n_img} + {args.text} | {'yes' if padded else 'no'} | out of memory | | |")
                    torch.cuda.empty_cache()
                    continue
                print(f"| {backend} | {n_img} + {args.text} | {'yes' if padded else 'no'} | {r['ms']:.1f} | "
                      f"{r['peak'] / 2**20:.1f} | {r['diff']:.2e} |", flush=True)


if __name__ == "__main__":
    main()
