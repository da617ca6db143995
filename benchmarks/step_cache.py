"""Step caching on the bundled demo model: speed-up against quality for TeaCache and MagCache (issue 8).

For every (photo, motion prompt) pair the full-step video is made once, then each cache setting with the same
seed. Speed: transformer passes saved (one pass = one CFG half's block stack at one step) and wall time (the
denoising loop alone, and the whole call with prompt encoding, VAE encode and decode). Quality against the
full-step video: PSNR and SSIM over all frames, and motion accuracy with the dataset's motion classifier (the
test of benchmarks/eval_tiny.py), plus how often the classifier's verdict agrees with the full-step video's.

    python benchmarks/step_cache.py [--data ~/.cache/hunyuan-i2v/data/tiny64] [--photos 3] \\
        [--settings teacache@0.15 teacache@x2.5 magcache@0.12 magcache@x2.5 ...] [--json out.json]

A setting is METHOD@THRESHOLD, or METHOD@xSPEED for the speed-target mode (threshold solved from the
calibration), optionally followed by /K<n> (MagCache's skips in a row) and /R<fraction> (steps never skipped at
the start, either method). Photos: the dataset's held-out photos when it is there, else skimage photos the
shipped calibration did not see (chelsea, coffee, motorcycle).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

import hunyuan_i2v.pipeline as pipeline_module
from hunyuan_i2v.cache import CacheSettings
from hunyuan_i2v.cli import bundled_model_dir
from hunyuan_i2v.pipeline import I2VPipeline
from hunyuan_i2v.train.data import GENERATED_VIDEO_BAND, classify_motion, measure_motion

sys.path.insert(0, str(Path(__file__).parent))
from eval_tiny import PROMPTS, direction_ok, psnr  # noqa: E402

DEFAULT_DATA = Path("~/.cache/hunyuan-i2v/data/tiny64").expanduser()
DEFAULT_SETTINGS = ("teacache@0.15", "teacache@x2.0", "teacache@x2.5", "teacache@x3.0",
                    "magcache@0.12", "magcache@x2.0", "magcache@x2.5", "magcache@x3.0")


def parse_setting(text: str, max_skips: int, retention: float) -> CacheSettings:
    """METHOD@VALUE[/K<max skips>][/R<retention>]."""
    head, *extra = text.split("/")
    for e in extra:
        if e.startswith("K"):
            max_skips = int(e[1:])
        elif e.startswith("R"):
            retention = float(e[1:])
        else:
            raise SystemExit(f"bad setting {text!r}: use METHOD@THRESHOLD or METHOD@xSPEED, then /K4, /R0.2")
    method, _, value = head.partition("@")
    if value.startswith("x"):
        return CacheSettings(method, speed=float(value[1:]), max_skips=max_skips, retention=retention)
    return CacheSettings(method, threshold=float(value) if value else None, max_skips=max_skips, retention=retention)


def photos(data: Path, n: int) -> list[tuple[str, Image.Image]]:
    found = sorted((data / "heldout" / "photos").glob("*.png")) if data.is_dir() else []
    if found:
        pick = np.linspace(0, len(found) - 1, min(n, len(found))).round().astype(int)
        return [(found[i].stem, Image.open(found[i]).convert("RGB")) for i in pick]
    import skimage.data as sk

    pool = [("skimage-chelsea", sk.chelsea()), ("skimage-coffee", sk.coffee()),
            ("skimage-motorcycle", sk.stereo_motorcycle()[0])]
    return [(name, Image.fromarray(a).convert("RGB")) for name, a in pool[:n]]


def ssim(a: np.ndarray, b: np.ndarray) -> float:
    from skimage.metrics import structural_similarity

    return float(np.mean([structural_similarity(x, y, channel_axis=-1, data_range=255) for x, y in zip(a, b)]))


class Timed:
    """Wraps the pipeline's denoise to time the loop alone: wall time, and this process's CPU time (steadier on a
    shared machine, where other jobs stretch the wall time)."""

    def __init__(self):
        self.seconds = self.cpu = 0.0
        self._denoise = pipeline_module.denoise

    def __call__(self, *args, **kwargs):
        t0, c0 = time.perf_counter(), time.process_time()
        try:
            return self._denoise(*args, **kwargs)
        finally:
            self.seconds, self.cpu = time.perf_counter() - t0, time.process_time() - c0


def timing(pipe, timer: Timed, image, prompt: str, settings: dict, repeats: int, seed: int) -> int:
    """The fastest of ``repeats`` denoising loops per setting, interleaved so load changes hit all alike."""
    best = {name: (float("inf"), float("inf")) for name in ["full", *settings]}
    calls = {}
    for _ in range(repeats):
        for name in best:
            out = pipe(image, prompt, seed=seed, progress=False, output_type="latent",
                       cache=settings.get(name))
            best[name] = (min(best[name][0], timer.seconds), min(best[name][1], timer.cpu))
            if name != "full":
                c = out.extras["step_cache"]
                calls[name] = (c["computed_passes"], len(set().union(*c["computed_steps"].values())))
    print("| setting | passes computed | block-stack calls | fastest loop wall s | speed-up | fastest loop CPU s "
          "| speed-up |")
    print("|---|---|---|---|---|---|---|")
    fw, fc = best["full"]
    for name, (w, c) in best.items():
        passes, n_calls = calls.get(name, (40, 20))
        print(f"| {name} | {passes} | {n_calls} | {w:.2f} | {fw / w:.2f}x | {c:.2f} | {fc / c:.2f}x |")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(DEFAULT_DATA), help="dataset folder (held-out photos)")
    parser.add_argument("--model", help="model folder (default: the bundled demo model)")
    parser.add_argument("--photos", type=int, default=3)
    parser.add_argument("--settings", nargs="+", default=list(DEFAULT_SETTINGS))
    parser.add_argument("--max-skips", type=int, default=4, help="MagCache K")
    parser.add_argument("--retention", type=float, help="steps retained at the start (default: per method)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", help="also write every measurement to this JSON file")
    parser.add_argument("--timing", type=int, metavar="N",
                        help="instead: time the denoising loop of each setting N times on the first photo and "
                             "prompt (latents only), interleaved, and print the fastest of each")
    parser.add_argument("--references", help="folder to keep the full-step videos (and their timings) in, reused "
                                             "by a later run with the same photos, prompts and seed")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    model_dir = Path(args.model) if args.model else bundled_model_dir()
    pipe = I2VPipeline.from_pretrained(model_dir, device="cpu")
    timer = Timed()
    pipeline_module.denoise = timer
    settings = {s: parse_setting(s, args.max_skips, args.retention) for s in args.settings}
    pics = photos(Path(args.data), args.photos)
    print(f"{len(pics)} photos ({', '.join(n for n, _ in pics)}) x {len(PROMPTS)} prompts, "
          f"{len(settings)} settings", file=sys.stderr)

    if args.timing:
        return timing(pipe, timer, pics[0][1], next(iter(PROMPTS.values())), settings, args.timing, args.seed)

    rows = {name: [] for name in ["full", *settings]}
    for photo_name, image in pics:
        for kind, prompt in PROMPTS.items():
            stored = Path(args.references) / f"{photo_name}-{kind}-{args.seed}.npz" if args.references else None
            if stored is not None and stored.is_file():
                with np.load(stored) as f:
                    ref_video = f["video"]
                    full_wall, full_loop, full_cpu = (float(f[k]) for k in ("wall", "loop", "cpu"))
            else:
                t0 = time.perf_counter()
                ref_video = pipe(image, prompt, seed=args.seed, progress=False).frames[0]
                full_wall, full_loop, full_cpu = time.perf_counter() - t0, timer.seconds, timer.cpu
                if stored is not None:
                    stored.parent.mkdir(parents=True, exist_ok=True)
                    np.savez(stored, video=ref_video, wall=full_wall, loop=full_loop, cpu=full_cpu)
            ref_label = classify_motion(ref_video, band=GENERATED_VIDEO_BAND)
            ref_ok = direction_ok(kind, measure_motion(ref_video, band=GENERATED_VIDEO_BAND), ref_video)
            rows["full"].append(dict(photo=photo_name, kind=kind, wall=full_wall, loop=full_loop, cpu=full_cpu,
                                     passes=1.0,
                                     computed=None, psnr=float("inf"), ssim=1.0, ok=bool(ref_ok), agree=True))
            for name, cache in settings.items():
                t0 = time.perf_counter()
                out = pipe(image, prompt, seed=args.seed, progress=False, cache=cache)
                wall, loop, cpu = time.perf_counter() - t0, timer.seconds, timer.cpu
                video = out.frames[0]
                info = out.extras["step_cache"]
                label = classify_motion(video, band=GENERATED_VIDEO_BAND)
                rows[name].append(dict(
                    photo=photo_name, kind=kind, wall=wall, loop=loop, cpu=cpu, full_wall=full_wall,
                    full_loop=full_loop, full_cpu=full_cpu,
                    passes=info["speedup"], computed=info["computed_passes"], total=info["passes"],
                    setting=info["setting"], psnr=psnr(video, ref_video), ssim=ssim(video, ref_video),
                    ok=bool(direction_ok(kind, measure_motion(video, band=GENERATED_VIDEO_BAND), video)),
                    agree=label == ref_label))
            print(f"{photo_name} {kind}: " + ", ".join(
                f"{n} {rows[n][-1]['psnr']:.1f} dB" for n in settings), file=sys.stderr)

    full = rows["full"]
    print(f"full-step videos: denoising loop {np.mean([r['loop'] for r in full]):.2f} s wall, "
          f"{np.mean([r['cpu'] for r in full]):.2f} s CPU; whole call {np.mean([r['wall'] for r in full]):.2f} s")
    print("| setting | threshold | passes computed (of 40) | fewer passes | loop CPU-time speed-up | loop wall "
          "speed-up | call wall speed-up | PSNR mean (min) dB | SSIM mean | motion accuracy | same motion verdict "
          "as full |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"| full (20 steps, CFG) | - | 40 | 1.00x | 1.00x | 1.00x | 1.00x | - | 1.000 | "
          f"{np.mean([r['ok'] for r in full]):.0%} | - |")
    summary = {}
    for name in settings:
        rs = rows[name]
        computed = np.mean([r["computed"] for r in rs])
        total = rs[0]["total"]
        loop_speed = np.sum([r["full_loop"] for r in rs]) / np.sum([r["loop"] for r in rs])
        cpu_speed = np.sum([r["full_cpu"] for r in rs]) / np.sum([r["cpu"] for r in rs])
        wall_speed = np.sum([r["full_wall"] for r in rs]) / np.sum([r["wall"] for r in rs])
        ps = [r["psnr"] for r in rs]
        thresholds = sorted({r["setting"].split()[2] for r in rs})
        summary[name] = dict(computed=float(computed), total=total, pass_speedup=float(total / computed),
                             cpu_speedup=float(cpu_speed), loop_speedup=float(loop_speed),
                             wall_speedup=float(wall_speed),
                             psnr_mean=float(np.mean(ps)), psnr_min=float(np.min(ps)),
                             ssim_mean=float(np.mean([r["ssim"] for r in rs])),
                             motion_accuracy=float(np.mean([r["ok"] for r in rs])),
                             motion_agreement=float(np.mean([r["agree"] for r in rs])), thresholds=thresholds)
        s = summary[name]
        print(f"| {name} | {', '.join(thresholds)} | {computed:.1f} | {s['pass_speedup']:.2f}x | "
              f"{cpu_speed:.2f}x | {loop_speed:.2f}x | {wall_speed:.2f}x | {s['psnr_mean']:.1f} ({s['psnr_min']:.1f}) | "
              f"{s['ssim_mean']:.3f} | {s['motion_accuracy']:.0%} | {s['motion_agreement']:.0%} |")
    if args.json:
        Path(args.json).write_text(json.dumps({"summary": summary, "rows": rows}, indent=1, default=float))
    return 0


if __name__ == "__main__":
    sys.exit(main())
