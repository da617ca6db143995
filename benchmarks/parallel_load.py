"""Loading the transformer in a multi-process run: every rank reads the checkpoint, or rank 0 reads it and
broadcasts it (hunyuan_i2v.parallel.broadcast), each replicated or with sharded block weights.

Model: the one of benchmarks/parallel_forward.py (hidden 512, 2 double + 4 single blocks, the 13B model's other
dimensions; random N(0, 0.02) fp32 weights in one safetensors file, 187 MiB). Each mode runs in 2 fresh processes
(torch.multiprocessing, gloo, one thread each), which load the model with Parallel.load_transformer after a
barrier and then read every weight once (a sum, as the first forward would: a memory-mapped checkpoint is only
paged in when its tensors are used). Per rank, against the process just before the load: the wall time of the load and that read; how far its RSS peaked above
the start (VmHWM, reset through /proc/self/clear_refs); after the load, the private memory added (RssAnon), the
file pages newly mapped (RssFile: the checkpoint's, 0 for a rank that never touched the file) and the proportional
set size added (PSS: pages shared with the other rank, such as the page cache of a memory-mapped file, count half
each); and the bytes of weights the model holds.

On one host the file's pages sit in the page cache once whoever reads them; what broadcasting saves is the
reading itself (one rank instead of N reading a network file system or a cold disk) and, on the receiving ranks,
any mapping of the file. Its cost is the transfer and, transiently, one bucket (--bucket-mb) on each rank.

    nice -n 19 python benchmarks/parallel_load.py --modes read,broadcast,read-sharded,broadcast-sharded
    nice -n 19 python benchmarks/parallel_load.py --modes broadcast --bucket-mb 16
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from parallel_forward import write_weights  # noqa: E402 - the same model and weights
from procstat import proc_status_bytes, reset_peak_rss  # noqa: E402

MiB = 2**20
MODES = {"read": (False, False), "broadcast": (True, False), "read-sharded": (False, True),
         "broadcast-sharded": (True, True)}


def _pss() -> int:
    with open("/proc/self/smaps_rollup") as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1]) * 1024
    return 0


def _memory() -> dict:
    return dict(rss=proc_status_bytes("VmRSS"), private=proc_status_bytes("RssAnon"), file=proc_status_bytes("RssFile"),
                pss=_pss())


def worker(rank: int, mode: str, job: dict) -> None:
    import torch.distributed as dist

    from hunyuan_i2v.parallel import Parallel, ParallelConfig
    from hunyuan_i2v.parallel.broadcast import broadcast_transformer

    torch.set_num_threads(1)
    broadcast, shard = MODES[mode]
    dist.init_process_group("gloo", init_method=f"file://{job['init']}", rank=rank, world_size=2)
    par = Parallel(ParallelConfig(ulysses=2, shard_weights=shard, broadcast_weights=broadcast))
    dist.barrier()
    before = _memory()
    reset_peak_rss()
    start = time.perf_counter()
    if broadcast:  # what Parallel.load_transformer does, with this run's bucket size
        loaded = broadcast_transformer(job["weights"] if rank == 0 else None, torch.device("cpu"), shard=shard,
                                       bucket_bytes=job["bucket_mb"] * MiB)
        model = par.attach(loaded.model if shard else loaded)
    else:
        model = par.load_transformer(job["weights"])
    with torch.no_grad():  # read every weight once, as the first forward would: lazily mapped pages count too
        for t in [*model.parameters(), *model.buffers()]:
            if not t.is_meta:
                t.sum()
    seconds = time.perf_counter() - start
    peak = proc_status_bytes("VmHWM")
    dist.barrier()
    after = _memory()
    weights = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()] if not t.is_meta)
    result = dict(rank=rank, seconds=seconds, peak=peak - before["rss"], weights=weights,
                  **{k: after[k] - before[k] for k in ("private", "file", "pss")})
    Path(job["out"], f"{mode}-rank{rank}.json").write_text(json.dumps(result))
    par.close()


def main() -> None:
    import torch.multiprocessing as mp

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--modes", default=",".join(MODES), help=f"comma separated, from {', '.join(MODES)}")
    ap.add_argument("--bucket-mb", type=int, default=256, help="the most one broadcast carries (MiB)")
    ap.add_argument("--runs", type=int, default=1, help="runs of each mode (fresh processes each); the last counts")
    args = ap.parse_args()
    modes = args.modes.split(",")
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise SystemExit(f"unknown mode {unknown[0]!r}: use {', '.join(MODES)}")
    tmp = Path(tempfile.mkdtemp(prefix="hy-load-bench-"))
    try:
        weights = tmp / "weights.safetensors"
        write_weights(weights)
        print(f"torch {torch.__version__}, 2 processes x 1 thread, gloo; weights {weights.stat().st_size / MiB:.0f} "
              f"MiB; bucket {args.bucket_mb} MiB", flush=True)
        rows = []
        for mode in modes:
            for _ in range(args.runs):
                job = dict(weights=str(weights), out=str(tmp), init=str(tmp / f"pg-{mode}-{time.time_ns()}"),
                           bucket_mb=args.bucket_mb)
                mp.spawn(worker, args=(mode, job), nprocs=2)
            ranks = [json.loads((tmp / f"{mode}-rank{r}.json").read_text()) for r in range(2)]
            rows.append((mode, ranks))
            print(json.dumps({"mode": mode, "ranks": ranks}), flush=True)
        print("\n| mode | load s (rank 0 / 1) | peak RSS growth MiB | private memory added MiB | checkpoint pages "
              "mapped MiB | PSS added MiB | weights held MiB |")
        print("|---|---|---|---|---|---|---|")
        for mode, (r0, r1) in rows:
            def pair(key: str, scale: float = MiB, fmt: str = ".0f") -> str:
                return f"{r0[key] / scale:{fmt}} / {r1[key] / scale:{fmt}}"

            print(f"| {mode} | {pair('seconds', 1, '.2f')} | {pair('peak')} | {pair('private')} | {pair('file')} | "
                  f"{pair('pss')} | {pair('weights')} |")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
