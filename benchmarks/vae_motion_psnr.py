"""Where a VAE loses PSNR on full-length clips: the reconstruction of a built dataset's clips, by motion.

Every held-out clip and an even spread of training clips are encoded to the posterior mean and decoded at the
dataset's full length (33 frames for the demo dataset), as `benchmarks/eval_tiny.py` scores its VAE row. The
mean PSNR per clip is grouped by what the clip shows (pan/tilt, zoom, static camera, real footage) and by speed,
with the PSNR of frame 0 (coded alone, like an image) beside that of the later frames (four per latent frame).

    python benchmarks/vae_motion_psnr.py --data ~/.cache/hunyuan-i2v/data/tiny64z [--model DIR] [--train-clips 120]

``--model`` takes a model folder, a VAE run folder or a VAE file (default: the bundled demo model).
"""

from __future__ import annotations

import argparse
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

from hunyuan_i2v.cli import bundled_model_dir
from hunyuan_i2v.train import data as D
from hunyuan_i2v.train.common import psnr_uint8
from hunyuan_i2v.train.vae import load_vae_option, reconstruct


def group(kind: str, speed: str) -> tuple[str, str]:
    if kind in ("real", "static"):
        return kind, ""
    return ("zoom" if kind.startswith("zoom") else "pan/tilt"), speed


def score(vae, videos: np.ndarray, meta: dict, pick: np.ndarray) -> dict[tuple[str, str], list[tuple[float, ...]]]:
    rows: dict[tuple[str, str], list[tuple[float, ...]]] = defaultdict(list)
    for i in pick:
        clip = videos[i : i + 1]
        recon = reconstruct(vae, clip, 1)
        per_frame = psnr_uint8(recon[0], clip[0])  # frames along the first axis: one PSNR per frame
        key = group(meta["kinds"][i], meta["speed_names"][i])
        rows[key].append((float(psnr_uint8(recon, clip)[0]), float(per_frame[0]), float(per_frame[1:].mean())))
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, required=True, help="a dataset built by `python -m hunyuan_i2v.train.data build`")
    ap.add_argument("--model", default=None, help="model folder, VAE run folder or VAE file (default: bundled model)")
    ap.add_argument("--train-clips", type=int, default=120, help="training clips scored, spread evenly (default 120)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    vae = load_vae_option(args.model or bundled_model_dir(), "--model").float().eval()
    results = {}
    for split, count in (("train", args.train_clips), ("heldout", None)):
        videos, meta = D.load_split(args.data, split)
        n = len(videos) if count is None else min(count, len(videos))
        pick = np.linspace(0, len(videos) - 1, n).round().astype(int)
        results[split] = score(vae, videos, meta, pick)
        frames = videos.shape[1]
        del videos

    print(f"VAE {args.model or bundled_model_dir()}: {vae.config.latent_channels} latent channels, clips of {frames} "
          "frames\n")
    print("| clips | speed | training: clips | PSNR dB | frame 0 | frames 1.. | held out: clips | PSNR dB | frame 0 "
          "| frames 1.. |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    keys = sorted(set(results["train"]) | set(results["heldout"]))
    for key in keys + [("all", "")]:
        cells = []
        for split in ("train", "heldout"):
            rows = ([r for v in results[split].values() for r in v] if key == ("all", "")
                    else results[split].get(key, []))
            if rows:
                m = np.mean(rows, axis=0)
                cells += [str(len(rows)), f"{m[0]:.2f}", f"{m[1]:.2f}", f"{m[2]:.2f}"]
            else:
                cells += ["0", "", "", ""]
        name = f"**{key[0]}**" if key[0] == "all" else key[0]
        print(f"| {name} | {key[1]} | " + " | ".join(cells) + " |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
