"""The "grayfade" LoRA of the bundled tiny model: make its training videos, and measure the effect.

The effect is one the base model never shows: over the clip the colours fade from the photo to black and white
(frame i is the photo's camera move blended towards its own luma by i / (T - 1)). Training clips are camera moves
over the training photos of the demo dataset (:class:`hunyuan_i2v.train.data.CameraMoveSampler`) with the fade,
captioned as the demo dataset's clips ("the camera pans left"); ``hunyuan-i2v lora prepare --trigger grayfade``
puts the trigger word in front. A quarter of the clips keep their colours and get no trigger, so the effect is tied
to the word rather than to every prompt.

    python benchmarks/lora_grayfade.py data --out runs/grayfade/videos
    hunyuan-i2v lora prepare runs/grayfade/videos/list.json --trigger grayfade --out runs/grayfade/cache
    ...  (see docs/lora.md, "Training LoRAs")
    python benchmarks/lora_grayfade.py measure --lora ~/.cache/hunyuan-i2v/loras/grayfade.safetensors

``measure`` generates from the held-out photos (chelsea, coffee, and others marked held-out that are on this
machine) with several prompts and seeds, and prints the mean HSV saturation of the last 8 frames relative to frame
0 (1.0: colours kept; 0.0: black and white) for: the base model, the LoRA at scale 1 with the trigger, and the LoRA
with the prompt without the trigger.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

import numpy as np

logger = logging.getLogger("lora_grayfade")

TRIGGER = "grayfade"
PROMPTS = ("the camera pans left", "static camera", "the camera pans right", "the camera tilts up")


def grayfade(video: np.ndarray) -> np.ndarray:
    """uint8 [T, H, W, 3] faded from colour (frame 0) to its BT.601 luma (last frame), linearly."""
    x = video.astype(np.float32)
    luma = x @ np.array([0.299, 0.587, 0.114], np.float32)
    w = np.linspace(0.0, 1.0, len(video), dtype=np.float32)[:, None, None, None]
    return np.clip((1 - w) * x + w * luma[..., None], 0, 255).round().astype(np.uint8)


def _photos(heldout: bool):
    from hunyuan_i2v.train import data as D

    found = D.resolve_sources(groups=("skimage", "sklearn", "opencv-doc"), fetch=False, include_clips=False)
    photos = []
    for spec, path in found.photos:
        if bool(spec.heldout) != heldout:
            continue
        photo = D.load_photo(spec, path)
        rgb = photo.rgb.astype(np.int16)
        if np.abs(rgb - rgb.mean(axis=-1, keepdims=True)).mean() < 4:  # a grey photo cannot show the fade
            continue
        photos.append(photo)
    return photos


def make_data(out: Path, clips: int, plain_share: float, seed: int, size: int, frames: int) -> dict:
    from hunyuan_i2v.train.data import CameraMoveSampler
    from hunyuan_i2v.video import write_video

    photos = _photos(heldout=False)
    sampler = CameraMoveSampler(photos, size=size, frames=frames, rng=seed)
    rng = np.random.default_rng(seed + 1)
    out.mkdir(parents=True, exist_ok=True)
    entries = []
    for i in range(clips):
        sample = sampler.draw()
        fade = rng.random() >= plain_share
        name = f"clip{i:05d}.mp4"
        write_video(out / name, grayfade(sample.video) if fade else sample.video, fps=8, crf=12)
        entries.append({"video": name, "caption": sample.caption, "trigger": fade})
    (out / "list.json").write_text(json.dumps(entries, indent=0) + "\n")
    fades = sum(e["trigger"] for e in entries)
    return {"list": str(out / "list.json"), "photos": [p.source for p in photos], "fade": fades,
            "plain": clips - fades}


def measure(lora: str, seeds: int, steps: int, model: str | None, photos: int, prompts: int) -> dict:
    import torch
    from PIL import Image

    from hunyuan_i2v import I2VPipeline
    from hunyuan_i2v.cli import bundled_model_dir
    from hunyuan_i2v.train.lora import saturation_ratio

    torch.set_num_threads(2)
    photos = _photos(heldout=True)[:photos]
    chosen = PROMPTS[:prompts]
    model_dir = model or str(bundled_model_dir())
    pipe = I2VPipeline.from_pretrained(model_dir, device="cpu")
    conditions = (("base model, trigger prompt", 0.0, True), ("LoRA x1, trigger prompt", 1.0, True),
                  ("LoRA x1, prompt without trigger", 1.0, False))
    results = {}
    pipe.load_loras([(lora, 1.0)], mode="adapter")
    for name, scale, trigger in conditions:
        pipe.set_lora_scales([scale])
        values = []
        for photo in photos:
            image = Image.fromarray(photo.rgb)
            for prompt in chosen:
                text = f"{TRIGGER}, {prompt}" if trigger else prompt
                for seed in range(seeds):
                    out = pipe(image, text, seed=seed, steps=steps, progress=False)
                    values.append(saturation_ratio(out.frames[0]))
        results[name] = {"mean": float(np.mean(values)), "std": float(np.std(values)), "min": float(np.min(values)),
                         "max": float(np.max(values)), "n": len(values)}
    print(f"held-out photos: {', '.join(p.source for p in photos)}; prompts: {', '.join(chosen)}; "
          f"seeds 0..{seeds - 1}; {steps} steps")
    print("| condition | saturation of the last 8 frames / frame 0 (mean +- std) | min | max | videos |")
    print("|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['mean']:.3f} +- {r['std']:.3f} | {r['min']:.3f} | {r['max']:.3f} | {r['n']} |")
    return results


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    d = sub.add_parser("data", help="write the training videos and list.json (trigger: false for the plain ones)")
    d.add_argument("--out", required=True, type=Path)
    d.add_argument("--clips", type=int, default=256)
    d.add_argument("--plain-share", type=float, default=0.25)
    d.add_argument("--size", type=int, default=64)
    d.add_argument("--frames", type=int, default=33)
    d.add_argument("--seed", type=int, default=7)
    m = sub.add_parser("measure", help="print the effect table on the held-out photos")
    m.add_argument("--lora", required=True)
    m.add_argument("--seeds", type=int, default=2)
    m.add_argument("--steps", type=int, default=20)
    m.add_argument("--model", default=None)
    m.add_argument("--photos", type=int, default=5, help="how many of the held-out photos (chelsea, coffee first)")
    m.add_argument("--prompts", type=int, default=len(PROMPTS), help="how many of the prompts")
    m.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.command == "data":
        print(json.dumps(make_data(args.out, args.clips, args.plain_share, args.seed, args.size, args.frames)))
        return 0
    results = measure(args.lora, args.seeds, args.steps, args.model, args.photos, args.prompts)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
