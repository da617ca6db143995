"""The bundled VAE's single-image reconstruction on every photo of the demo dataset, training and held out.

Each photo is resized and centre-cropped to the model's size exactly as `hunyuan-i2v generate` prepares its
input (frame 0 of a generated video is the VAE's reconstruction of this image, since token_replace keeps its
latent clean), encoded to the posterior mean and decoded. For scale, the same image through a plain resampler
that keeps as many values as the latent has: bicubic down to the side that gives the latent's value count
(latent channels x latent pixels / 3 colours), then bicubic back up.

    python benchmarks/vae_photo_psnr.py [--model DIR] [--size 64]

Prints one row per photo and the mean of each split (training photos, held-out photos).
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from hunyuan_i2v.buckets import resize_and_center_crop
from hunyuan_i2v.cli import bundled_model_dir
from hunyuan_i2v.train import data as D
from hunyuan_i2v.train.common import psnr_uint8
from hunyuan_i2v.train.vae import reconstruct
from hunyuan_i2v.weights import load_vae


def resampled(image: np.ndarray, side: int) -> np.ndarray:
    """Bicubic down to ``side`` x ``side`` and back up to the image's size (uint8)."""
    size = image.shape[1], image.shape[0]
    small = Image.fromarray(image).resize((side, side), Image.BICUBIC)
    return np.asarray(small.resize(size, Image.BICUBIC))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", type=Path, default=None, help="model folder (default: the bundled demo model)")
    ap.add_argument("--size", type=int, default=64, help="square size the photos are prepared at (default 64)")
    args = ap.parse_args(argv)
    torch.set_num_threads(min(2, torch.get_num_threads()))

    folder = args.model or bundled_model_dir()
    vae = load_vae(folder / "vae.safetensors", dtype=torch.float32).eval()
    cfg = vae.config
    lat = args.size // cfg.spatial_compression
    side = round(math.sqrt(cfg.latent_channels * lat * lat / 3))  # a 3-colour image with the latent's value count
    found = D.resolve_sources(include_clips=False)
    print(f"VAE {folder / 'vae.safetensors'}: {cfg.spatial_compression}x spatial, {cfg.latent_channels} latent "
          f"channels; photos at {args.size}x{args.size}; resampler baseline through {side}x{side}\n")
    print("| photo | split | VAE PSNR dB | bicubic through the latent's value count dB |")
    print("|---|---|---|---|")
    scores: dict[bool, list[tuple[float, float]]] = {False: [], True: []}
    for spec, path in found.photos:
        photo = D.load_photo(spec, path)
        image = np.asarray(resize_and_center_crop(Image.fromarray(photo.rgb), args.size, args.size))
        clip = np.ascontiguousarray(image[None, None])
        vae_db = float(np.mean(psnr_uint8(reconstruct(vae, clip, 1), clip)))
        base_db = float(np.mean(psnr_uint8(resampled(image, side)[None, None], clip)))
        scores[spec.heldout].append((vae_db, base_db))
        print(f"| {spec.key} | {'held out' if spec.heldout else 'training'} | {vae_db:.2f} | {base_db:.2f} |")
    for heldout, name in ((False, "training photos"), (True, "held-out photos")):
        if scores[heldout]:
            v, b = np.mean(scores[heldout], axis=0)
            print(f"| **mean of {len(scores[heldout])} {name}** | | **{v:.2f}** | **{b:.2f}** |")
    if found.skipped:
        print(f"\nnot found (skipped): {', '.join(s['source'] for s in found.skipped)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
