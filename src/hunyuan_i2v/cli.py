"""The ``hunyuan-i2v`` command line: thin argument parsing over the Python API.

Every user error is checked before any model is loaded and ends the program with one line on stderr and exit
code 2; no output file is left behind.
"""

from __future__ import annotations

import argparse
import logging
import random
import sys
import tempfile
from pathlib import Path
from typing import Optional, Sequence

from . import __version__
from .errors import HunyuanI2VError, InputError, ModelFilesError

logger = logging.getLogger("hunyuan_i2v")

EXIT_USAGE = 2
DTYPES = {"fp32": "float32", "float32": "float32", "bf16": "bfloat16", "bfloat16": "bfloat16",
          "fp16": "float16", "float16": "float16"}

OFFICIAL_REPOS = {
    # repo id -> (sub folder in dest, files the I2V model needs)
    "tencent/HunyuanVideo-I2V": (".", ["hunyuan-video-i2v-720p/transformers/mp_rank_00_model_states.pt",
                                       "hunyuan-video-i2v-720p/vae/*"]),
    "xtuner/llava-llama-3-8b-v1_1-transformers": ("text_encoder_i2v", ["*.json", "*.safetensors", "tokenizer*"]),
    "openai/clip-vit-large-patch14": ("text_encoder_2", ["*.json", "model.safetensors", "*.txt"]),
}
DIFFUSERS_REPO = "hunyuanvideo-community/HunyuanVideo-I2V"


def bundled_model_dir() -> Optional[Path]:
    """The tiny demo model shipped inside the package, if this install has it."""
    path = Path(__file__).parent / "assets" / "tiny"
    return path if (path / "model.json").is_file() else None


# ---------------------------------------------------------------------------------------------
# argument parsing


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hunyuan-i2v", description="HunyuanVideo-I2V: animate a photo from a prompt.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    sub = parser.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="make a video from an image and a prompt")
    g.add_argument("image", help="input photo (PNG, JPEG, WebP, ...)")
    g.add_argument("prompt", help="what should happen, e.g. \"the camera slowly zooms in\"")
    g.add_argument("-o", "--output", help="output .mp4 (default: a new name in --output-dir)")
    g.add_argument("--output-dir", default="outputs", help="folder for automatically named outputs (default: outputs)")
    g.add_argument("--model", help="model folder: official ckpts/, diffusers or flat layout (default: the bundled tiny model)")
    g.add_argument("--resolution", default=None, choices=["360p", "540p", "720p"],
                   help="size bucket chosen from the image's aspect ratio (default: 720p; the tiny model has its own size)")
    g.add_argument("--height", type=int, help="exact output height (multiple of 16; with --width)")
    g.add_argument("--width", type=int, help="exact output width (multiple of 16; with --height)")
    g.add_argument("--frames", type=int, help="number of frames, 4k+1 (default 129 = 5.4 s at 24 fps)")
    g.add_argument("--steps", type=int, help="denoising steps (default 50)")
    g.add_argument("--seed", type=int, help="random seed (default: random; printed, and stored in the video)")
    g.add_argument("--flow-shift", type=float, help="sampling schedule shift (default 17, or 7 with --stability)")
    g.add_argument("--stability", action="store_true", help="start from noise blended with the image: steadier video")
    g.add_argument("--guidance", type=float, help="embedded (distilled) guidance scale (default 6.0)")
    g.add_argument("--cfg-scale", type=float, help="real classifier-free guidance, >1 doubles the cost (default: the model's, 1.0 = off for the 13B model)")
    g.add_argument("--negative-prompt", help="what to avoid (used when --cfg-scale > 1)")
    g.add_argument("--num-videos", type=int, default=1, help="videos to make (seeds seed, seed+1, ...)")
    g.add_argument("--fps", type=float, help="frame rate of the MP4 (default: the model's, 24 for HunyuanVideo-I2V)")
    g.add_argument("--crf", type=int, default=18, help="H.264 quality, 0..51, lower is better (default 18)")
    g.add_argument("--dtype", choices=sorted(DTYPES), help="transformer dtype (default: bf16 on GPU, fp32 on CPU)")
    g.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    g.add_argument("--frames-dir", help="also write every frame as PNG into this folder")
    g.add_argument("--preview", help="also write an animated preview (.webp or .gif)")
    g.add_argument("--no-progress", action="store_true", help="hide progress bars")
    _add_memory_args(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (slow first step)")
    g.add_argument("--no-prompt-cache", action="store_true",
                   help="do not read or write cached prompt embeddings (~/.cache/hunyuan-i2v/prompts, or "
                        "$HUNYUAN_I2V_PROMPT_CACHE)")

    d = sub.add_parser("download", help="fetch the official weights (needs internet)")
    d.add_argument("--dest", default="ckpts", help="target folder (default: ckpts)")
    d.add_argument("--layout", choices=["official", "diffusers"], default="official",
                   help="official ckpts/ layout (3 repositories) or the diffusers single repository")

    c = sub.add_parser("convert", help="convert a transformer checkpoint (official .pt, diffusers, safetensors)")
    c.add_argument("src", help="source checkpoint: a .pt/.safetensors file, a transformer folder or a model folder")
    c.add_argument("dst", help="destination file (official-pt, safetensors) or folder (diffusers)")
    c.add_argument("--to", required=True, choices=["official-pt", "diffusers", "safetensors"], help="target format")
    c.add_argument("--naming", choices=["official", "diffusers"],
                   help="key names inside a safetensors file (default: official; diffusers folders always use diffusers)")
    c.add_argument("--dtype", choices=sorted(DTYPES), help="cast the weights (default: keep the stored dtype)")

    i = sub.add_parser("info", help="check a model folder and show the plan for a generation")
    i.add_argument("--model", help="model folder (default: the bundled tiny model)")
    i.add_argument("--image", help="an input image, to show its size bucket")
    i.add_argument("--resolution", default=None, choices=["360p", "540p", "720p"])
    i.add_argument("--height", type=int)
    i.add_argument("--width", type=int)
    i.add_argument("--frames", type=int)
    i.add_argument("--dtype", choices=sorted(DTYPES))
    i.add_argument("--device", help="the device to plan for: cuda or cpu (default: cuda if available)")
    i.add_argument("--plan", action="store_true",
                   help="show the memory plan and the predicted peak of every residency and weights dtype")
    _add_memory_args(i)
    return parser


def _add_memory_args(parser: argparse.ArgumentParser) -> None:
    from .memory import ATTENTION_CHOICES, OFFLOAD_MODES, WEIGHTS_DTYPES

    parser.add_argument("--offload", choices=OFFLOAD_MODES, default=None,
                        help="none: all weights on the device (the default without --memory-budget); model: one "
                             "component on the device at a time; blocks: also stream the transformer blocks")
    parser.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default=None,
                        help="storage of the transformer block weights (default auto: the compute dtype); "
                             "int8/fp8 halve them and change the output slightly")
    parser.add_argument("--attention", choices=ATTENTION_CHOICES, default=None,
                        help="attention backend (default: PyTorch SDPA; auto picks the fastest installed)")
    parser.add_argument("--memory-budget", type=float, metavar="GB",
                        help="device memory to plan for: offload, weights dtype, chunk sizes and VAE tiles are "
                             "chosen to fit (the flags above override the plan)")


# ---------------------------------------------------------------------------------------------
# commands


def _resolve_model(model: Optional[str]) -> Path:
    if model:
        return Path(model)
    bundled = bundled_model_dir()
    if bundled is None:
        raise ModelFilesError(
            "no --model given and this install has no bundled demo model; "
            "get the weights with `hunyuan-i2v download --dest ckpts` and pass --model ckpts"
        )
    return bundled


def _check_output_folder(folder: Path) -> None:
    """Fail early when outputs could not be written: probe with a real file (root ignores permission bits)."""
    existing = folder if folder.exists() else _nearest_existing_parent(folder)
    if not existing.is_dir():
        raise InputError(f"cannot create the output folder {folder}: {existing} is not a folder")
    try:
        with tempfile.NamedTemporaryFile(dir=existing, prefix=".hunyuan-i2v-probe-"):
            pass
    except OSError as exc:
        raise InputError(
            f"cannot write to the output folder {existing} ({exc.strerror or exc}): choose another with -o or --output-dir"
        ) from None


def _nearest_existing_parent(path: Path) -> Path:
    path = path.absolute()
    while not path.exists():
        path = path.parent
    return path


def _torch_dtype(name: Optional[str]):
    import torch

    return getattr(torch, DTYPES[name]) if name else None


def cmd_generate(args: argparse.Namespace) -> int:
    # Cheap checks first: nothing heavy is imported or loaded until the inputs are known to be usable.
    from .buckets import check_num_frames, check_size
    from .images import load_image
    from .layout import resolve_model_files

    if not args.prompt.strip():
        raise InputError("the prompt is empty: describe the motion, e.g. \"the camera slowly zooms in\"")
    image = load_image(args.image)
    if args.frames is not None:
        check_num_frames(args.frames)
    if (args.height is None) != (args.width is None):
        raise InputError("give both --height and --width, or neither")
    if args.height is not None:
        check_size(args.height, args.width)
    if args.num_videos < 1:
        raise InputError(f"--num-videos must be at least 1, got {args.num_videos}")
    if args.steps is not None and args.steps < 1:
        raise InputError(f"--steps must be at least 1, got {args.steps}")
    if args.cfg_scale is not None and args.cfg_scale < 1:
        raise InputError(f"--cfg-scale must be >= 1 (1 turns it off), got {args.cfg_scale}")
    if args.fps is not None and args.fps <= 0:
        raise InputError(f"--fps must be positive, got {args.fps}")
    if not 0 <= args.crf <= 51:
        raise InputError(f"--crf must be within 0..51, got {args.crf}")
    if args.output:
        out = Path(args.output)
        if out.suffix.lower() not in (".mp4", ".mov", ".mkv"):
            raise InputError(f"output must end in .mp4, .mov or .mkv, got {out.name!r}")
        _check_output_folder(out.parent if str(out.parent) else Path("."))
    else:
        _check_output_folder(Path(args.output_dir))
    if args.preview:
        if Path(args.preview).suffix.lower() not in (".webp", ".gif"):
            raise InputError(f"--preview must end in .webp or .gif, got {Path(args.preview).name!r}")
        _check_output_folder(Path(args.preview).parent)
    if args.frames_dir:
        _check_output_folder(Path(args.frames_dir))
    files = resolve_model_files(_resolve_model(args.model)).require_complete()

    from .pipeline import I2VPipeline
    from .video import unique_output_path, write_frames_png, write_preview, write_video

    if args.attention == "auto":  # the one line saying which backend auto picked, also without --verbose
        logging.getLogger("hunyuan_i2v.model.layers").setLevel(logging.INFO)
    seed = args.seed if args.seed is not None else random.randint(0, 10**6)
    pipe = I2VPipeline.from_pretrained(files.root, device=args.device, dtype=_torch_dtype(args.dtype),
                                       **_memory_kwargs(args), compile=args.compile,
                                       prompt_cache=False if args.no_prompt_cache else None)
    result = pipe(
        image, args.prompt, negative_prompt=args.negative_prompt, resolution=args.resolution, height=args.height,
        width=args.width, num_frames=args.frames, steps=args.steps, seed=seed, flow_shift=args.flow_shift,
        stability=args.stability, guidance=args.guidance, cfg_scale=args.cfg_scale, num_videos=args.num_videos,
        progress=not args.no_progress,
    )
    fps = args.fps or pipe.config.sampler.fps
    for i, frames in enumerate(result.frames):
        meta = result.settings.for_video(i)
        if args.output:
            out = Path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            path = out if args.num_videos == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        else:
            path = unique_output_path(args.output_dir, args.prompt, meta["seed"])
        write_video(path, frames, fps=fps, crf=args.crf, metadata=meta)
        if args.frames_dir:
            write_frames_png(Path(args.frames_dir) / path.stem if args.num_videos > 1 else args.frames_dir, frames)
        if args.preview:
            p = Path(args.preview)
            p.parent.mkdir(parents=True, exist_ok=True)
            write_preview(p if args.num_videos == 1 else p.with_name(f"{p.stem}_{i}{p.suffix}"), frames, fps)
        print(f"{path}  (seed {meta['seed']}, {frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]})")
    return 0


def cmd_download(args: argparse.Namespace) -> int:
    try:
        from huggingface_hub import snapshot_download
    except ImportError:  # pragma: no cover - a runtime dependency
        raise InputError("huggingface_hub is not installed: pip install huggingface_hub") from None
    dest = Path(args.dest)
    _check_output_folder(dest)
    jobs = ([(DIFFUSERS_REPO, dest, None)] if args.layout == "diffusers"
            else [(repo, dest / sub, patterns) for repo, (sub, patterns) in OFFICIAL_REPOS.items()])
    for repo, folder, patterns in jobs:
        print(f"downloading {repo} -> {folder}", file=sys.stderr)
        try:
            snapshot_download(repo_id=repo, local_dir=str(folder), allow_patterns=patterns)
        except Exception as exc:  # network, auth, disk: one line, partial files stay for resuming
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise DownloadError(
                f"could not download {repo} ({type(exc).__name__}: {first[:200]}); check the network and run "
                f"the same command again to resume"
            ) from None
    print(f"done: use --model {dest}")
    return 0


class DownloadError(HunyuanI2VError):
    pass


def cmd_convert(args: argparse.Namespace) -> int:
    from .weights import convert_checkpoint

    dst = Path(args.dst)
    if dst.exists() and (dst.is_file() or any(dst.iterdir())):
        raise InputError(f"{dst} already exists: choose a new destination (nothing is overwritten)")
    _check_output_folder(dst.parent if args.to != "diffusers" else dst)
    try:
        out = convert_checkpoint(args.src, dst, to=args.to, naming=args.naming, dtype=_torch_dtype(args.dtype))
    except ValueError as exc:  # bad format/naming combination
        raise InputError(str(exc)) from None
    print(f"wrote {out}")
    return 0


def _memory_kwargs(args: argparse.Namespace) -> dict:
    return dict(offload=args.offload, weights_dtype=args.weights_dtype or "auto", attention=args.attention,
                memory_budget=args.memory_budget)


def cmd_info(args: argparse.Namespace) -> int:
    from .plan import describe_model, describe_plan

    root = _resolve_model(args.model)
    report = describe_model(root)
    plan = describe_plan(report, image=args.image, resolution=args.resolution, height=args.height, width=args.width,
                         num_frames=args.frames, dtype=_torch_dtype(args.dtype), device=args.device,
                         show_alternatives=args.plan, **_memory_kwargs(args))
    print(report.text)
    print(plan)
    return 0 if not report.missing else 1


COMMANDS = {"generate": cmd_generate, "download": cmd_download, "convert": cmd_convert, "info": cmd_info}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except HunyuanI2VError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except MemoryError:
        print("error: out of memory: try a lower --resolution, fewer --frames, or --device cpu", file=sys.stderr)
        return 1
    except Exception as exc:  # torch.OutOfMemoryError outside generate (which names a plan that fits)
        if type(exc).__name__ == "OutOfMemoryError":
            print("error: out of GPU memory: try --memory-budget, --resolution 360p or fewer --frames",
                  file=sys.stderr)
            return 1
        raise


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
