"""Evaluate the bundled demo model on held-out photos and clips (issue: the bundled tiny model).

Prints a markdown table: motion following per prompt kind, first-frame fidelity, stability of static prompts,
VAE reconstruction on held-out clips, and the wall time of one default `hunyuan-i2v generate`.

    python benchmarks/eval_tiny.py --data ~/.cache/hunyuan-i2v/data/tiny64 [--model DIR] [--steps N]

The held-out photos and clips come from the dataset builder's held-out split (never seen in training).
Motion convention (hunyuan_i2v.train.data.MOTION_KINDS): "pan left" moves the content right, etc.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hunyuan_i2v.buckets import resize_and_center_crop
from hunyuan_i2v.cli import bundled_model_dir
from hunyuan_i2v.pipeline import I2VPipeline
from hunyuan_i2v.train.data import GENERATED_VIDEO_BAND, MOTION_KINDS, classify_motion, load_split, measure_motion

PROMPTS = {
    "pan_left": "the camera pans left",
    "pan_right": "the camera pans right",
    "tilt_up": "the camera tilts up",
    "tilt_down": "the camera tilts down",
    "zoom_in": "the camera zooms in",
    "zoom_out": "the camera zooms out",
    "static": "static shot, the scene stays still",
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else 10 * np.log10(255.0**2 / mse)


def direction_ok(kind: str, motion: np.ndarray, video: np.ndarray) -> bool:
    """Whether the measured mean motion has the prompt's direction (for static: the classifier says static).

    Band-limited measurement (GENERATED_VIDEO_BAND): the decoder's fixed fine texture would otherwise pull every
    estimate to zero shift.
    """
    if kind == "static":
        return classify_motion(video, band=GENERATED_VIDEO_BAND) == "static"
    want = MOTION_KINDS[kind]
    dx, dy, log_s = motion.mean(axis=0)
    if want.scale_sign:
        return np.sign(log_s) == want.scale_sign and classify_motion(video, band=GENERATED_VIDEO_BAND).startswith("zoom")
    if want.dx_sign:
        return np.sign(dx) == want.dx_sign and classify_motion(video, band=GENERATED_VIDEO_BAND) == kind
    return np.sign(dy) == want.dy_sign and classify_motion(video, band=GENERATED_VIDEO_BAND) == kind


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", required=True, help="dataset folder built by python -m hunyuan_i2v.train.data build")
    parser.add_argument("--model", help="model folder (default: the bundled demo model)")
    parser.add_argument("--steps", type=int, help="sampling steps (default: the model's)")
    parser.add_argument("--seeds", type=int, default=1, help="seeds per (photo, prompt)")
    parser.add_argument("--vae-clips", type=int, default=40, help="held-out clips for the VAE PSNR")
    parser.add_argument("--json", help="also write the figures to this JSON file")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    model_dir = Path(args.model) if args.model else bundled_model_dir()
    if model_dir is None:
        sys.exit("no --model and no bundled model")
    pipe = I2VPipeline.from_pretrained(model_dir, device="cpu")
    sampler = pipe.config.sampler
    size = (sampler.height or 64, sampler.width or 64)
    photos = sorted((Path(args.data) / "heldout" / "photos").glob("*.png"))
    if not photos:
        sys.exit(f"no held-out photos in {args.data}/heldout/photos")

    results = {k: [] for k in PROMPTS}
    first_psnr, static_speed = [], []
    for photo in photos:
        image = Image.open(photo).convert("RGB")
        reference = np.asarray(resize_and_center_crop(image, *size))
        for kind, prompt in PROMPTS.items():
            for seed in range(args.seeds):
                out = pipe(image, prompt, steps=args.steps, seed=seed, progress=False)
                video = out.frames[0]
                motion = measure_motion(video, band=GENERATED_VIDEO_BAND)
                results[kind].append(direction_ok(kind, motion, video))
                first_psnr.append(psnr(video[0], reference))
                if kind == "static":  # the larger of the band-limited and the full-band estimate
                    speeds = [np.hypot(m[:, 0], m[:, 1]).mean() for m in (motion, measure_motion(video))]
                    static_speed.append(float(max(speeds)))

    videos, meta = load_split(args.data, "heldout")
    vae = pipe.vae
    vae_psnr = []
    pick = np.linspace(0, len(videos) - 1, min(args.vae_clips, len(videos))).round().astype(int)
    with torch.no_grad():
        for i in pick:
            clip = torch.from_numpy(videos[i]).permute(3, 0, 1, 2)[None].float() / 127.5 - 1
            recon = vae.decode(vae.encode(clip))
            recon = ((recon[0].clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).numpy()
            vae_psnr.append(psnr(recon, videos[i]))

    photo = photos[0]
    cmd = [str(Path(sys.executable).with_name("hunyuan-i2v")), "generate", str(photo), PROMPTS["zoom_in"],
           "-o", "/tmp/eval_tiny_timing.mp4", "--no-progress"]
    if args.model:
        cmd += ["--model", args.model]
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, capture_output=True)
    wall = time.perf_counter() - t0

    motion_acc = {k: float(np.mean(v)) for k, v in results.items()}
    moving = [x for k, v in results.items() if k != "static" for x in v]
    figures = {
        "photos": len(photos), "seeds": args.seeds,
        "motion_accuracy": motion_acc, "motion_accuracy_moving": float(np.mean(moving)),
        "motion_accuracy_all": float(np.mean([x for v in results.values() for x in v])),
        "first_frame_psnr": float(np.mean(first_psnr)),
        "static_px_per_frame": float(np.mean(static_speed)),
        "vae_psnr_heldout": float(np.mean(vae_psnr)), "vae_clips": len(vae_psnr),
        "generate_wall_s": wall,
    }
    print("| metric | value | target |")
    print("|---|---|---|")
    for kind, acc in motion_acc.items():
        print(f"| motion direction: {kind} | {acc:.0%} | |")
    print(f"| motion direction, all moving prompts | {figures['motion_accuracy_moving']:.0%} | >= 85% |")
    print(f"| motion direction incl. static | {figures['motion_accuracy_all']:.0%} | |")
    print(f"| first-frame PSNR (dB) | {figures['first_frame_psnr']:.1f} | >= 23 |")
    print(f"| static prompts: global motion (px/frame) | {figures['static_px_per_frame']:.2f} | < 0.5 |")
    print(f"| VAE reconstruction PSNR, {len(vae_psnr)} held-out clips (dB) | {figures['vae_psnr_heldout']:.1f} | >= 24 |")
    print(f"| wall time of one default `generate` (s) | {wall:.1f} | < 30 |")
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
