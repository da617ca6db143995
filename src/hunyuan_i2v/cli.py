"""The ``hunyuan-i2v`` command line: thin argument parsing over the Python API.

Every user error is checked before any model is loaded and ends the program with one line on stderr and exit
code 2; no output file is left behind.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
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
    g.add_argument("--lora", action="append", default=[], metavar="PATH[:SCALE]",
                   help="apply a LoRA file (official, diffusers or ComfyUI format) at SCALE (default 1.0); "
                        "repeat for several (see docs/lora.md)")
    g.add_argument("--lora-mode", choices=["merge", "adapter"], default="merge",
                   help="merge: add the LoRAs into the weights (no cost per step, the default); adapter: run them "
                        "beside the layers (used anyway with --offload blocks)")
    _add_memory_args(g)
    g.add_argument("--compile", action="store_true", help="torch.compile the transformer blocks (slow first step)")
    g.add_argument("--no-prompt-cache", action="store_true",
                   help="do not read or write cached prompt embeddings (~/.cache/hunyuan-i2v/prompts, or "
                        "$HUNYUAN_I2V_PROMPT_CACHE)")
    _add_rewrite_args(g)
    _add_cache_args(g)
    _add_parallel_args(g)

    cc = sub.add_parser("calibrate-cache", help="fit the step-cache (TeaCache / MagCache) calibration of a model")
    cc.add_argument("--model", help="model folder (default: the bundled tiny model)")
    cc.add_argument("--images", nargs="+", required=True, help="photos to calibrate on (each with every prompt)")
    cc.add_argument("--prompts", nargs="+", required=True, help="prompts to calibrate on, e.g. \"the camera pans left\"")
    cc.add_argument("--steps", type=int, help="denoising steps to calibrate for (default: the model's)")
    cc.add_argument("--out", help="calibration file to write or extend (default: step_cache.json in the model folder)")
    cc.add_argument("--seed", type=int, default=0, help="seed of the first run; run k uses seed + k (default 0)")
    cc.add_argument("--resolution", default=None, choices=["360p", "540p", "720p"])
    cc.add_argument("--height", type=int)
    cc.add_argument("--width", type=int)
    cc.add_argument("--frames", type=int)
    cc.add_argument("--cfg-scale", type=float, help="real CFG scale (default: the model's)")
    cc.add_argument("--dtype", choices=sorted(DTYPES))
    cc.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available)")
    cc.add_argument("--no-progress", action="store_true", help="hide progress bars")

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

    lo = sub.add_parser("lora", help="train LoRAs: prepare captioned videos, then train (docs/lora.md)")
    lora_sub = lo.add_subparsers(dest="lora_command", required=True)
    from .train.lora_cli import add_plan_arguments, add_prepare_arguments, add_train_arguments

    add_prepare_arguments(lora_sub.add_parser("prepare", help="encode videos + captions into a latent cache"))
    add_train_arguments(lora_sub.add_parser("train", help="train a LoRA on the frozen model from prepared caches"))
    add_plan_arguments(lora_sub.add_parser("plan", help="predict the device memory of a training step"))

    for name, help_text in (("serve", "run the HTTP service (job queue + workers; --ui adds the web UI at /ui)"),
                            ("ui", "run the web UI (with the HTTP service and its queue under /v1)")):
        _add_server_args(sub.add_parser(name, help=help_text), ui=name == "ui")
    _add_worker_args(sub.add_parser("worker", help="run one queue worker made of several processes (a torchrun "
                                                   "group) for a server's data folder (docs/multi-gpu.md)"))
    return parser


def _add_worker_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data-dir", default=None,
                   help="the server's data folder (default: $HUNYUAN_I2V_DATA or ~/.cache/hunyuan-i2v/server)")
    p.add_argument("--model", help="model folder (default: the bundled tiny model)")
    p.add_argument("--nproc", type=int, metavar="N",
                   help="start N processes on this host, as torchrun --standalone would (not needed when started "
                        "by torchrun)")
    p.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="one GPU per process (NCCL) or the CPU (gloo); default: CUDA when available")
    _add_parallel_args(p)
    p.add_argument("--settings", default=None, help=argparse.SUPPRESS)  # ServerSettings JSON from the server
    p.add_argument("--parent", type=int, default=None, help=argparse.SUPPRESS)  # exit with this process
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _add_server_args(p: argparse.ArgumentParser, ui: bool) -> None:
    from .server.settings import Limits

    d = Limits()
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1; any other needs --token)")
    p.add_argument("--port", type=int, default=7860 if ui else 8000, help=f"port (default {7860 if ui else 8000})")
    p.add_argument("--data-dir", default=None,
                   help="queue database, uploads and videos (default: $HUNYUAN_I2V_DATA or ~/.cache/hunyuan-i2v/server)")
    p.add_argument("--model", help="model folder (default: the bundled tiny model)")
    p.add_argument("--lora-dir", metavar="DIR", default=None,
                   help="folder of the LoRA files jobs may name (GET /v1/loras lists them; default: the bundled "
                        "LoRAs of the tiny model)")
    p.add_argument("--devices", default=None,
                   help="comma-separated worker devices, one worker process each (default: every CUDA device, else cpu)")
    p.add_argument("--workers", type=int, default=None, help=argparse.SUPPRESS)  # 0: queue only (tests)
    p.add_argument("--token", default=None, help="bearer token clients must send (default: $HUNYUAN_I2V_TOKEN)")
    if not ui:
        p.add_argument("--ui", action="store_true", help="also serve the web UI at /ui")
    lim = p.add_argument_group("limits (answered with HTTP 4xx)")
    lim.add_argument("--max-upload-mb", type=float, default=d.max_upload_bytes / 2**20, help="upload size (MiB)")
    lim.add_argument("--max-pixels", type=int, default=d.max_image_pixels, help="pixels of an uploaded image")
    lim.add_argument("--max-frames", type=int, default=d.max_frames)
    lim.add_argument("--max-steps", type=int, default=d.max_steps)
    lim.add_argument("--max-side", type=int, default=d.max_side, help="longest side of an explicit height/width")
    lim.add_argument("--resolutions", default=",".join(d.resolutions), help="allowed resolution names")
    lim.add_argument("--max-queue", type=int, default=d.max_queue, help="queued + running jobs")
    lim.add_argument("--max-loras", type=int, default=d.max_loras, help="LoRAs per job (0: none)")
    lim.add_argument("--max-attempts", type=int, default=3,
                     help="runs of a job whose worker dies before it is failed (default 3)")
    _add_rewrite_backend_args(p.add_argument_group("prompt rewriting backend (for jobs with rewrite)"))
    p.add_argument("--log-level", default="info", choices=["critical", "error", "warning", "info", "debug"])


def _add_rewrite_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--rewrite", choices=["normal", "master", "i2v", "lint"],
                        help="rewrite the prompt with a language model first: normal (fluent English, nothing "
                             "added), master (cinematic detail), i2v (short subject + motion, the official I2V "
                             "advice); lint only warns about the prompt")
    _add_rewrite_backend_args(parser)


def _add_rewrite_backend_args(parser) -> None:
    """Where --rewrite (generate) or a job's rewrite (serve, ui) finds its language model."""
    parser.add_argument("--rewrite-model", metavar="DIR",
                        help="local chat model folder for --rewrite (or $HUNYUAN_I2V_REWRITE_MODEL_PATH)")
    parser.add_argument("--rewrite-url", metavar="URL",
                        help="OpenAI-compatible server for --rewrite, e.g. http://localhost:8000/v1 "
                             "(or $HUNYUAN_I2V_REWRITE_URL)")
    parser.add_argument("--rewrite-api-model", metavar="NAME",
                        help="model name on that server (or $HUNYUAN_I2V_REWRITE_API_MODEL; default: the first "
                             "it serves)")
    parser.add_argument("--rewrite-key", metavar="KEY",
                        help="API key for that server (better: $HUNYUAN_I2V_REWRITE_KEY, not seen by other users)")


def _add_cache_args(parser: argparse.ArgumentParser) -> None:
    from .cache import DEFAULT_MAX_SKIPS, DEFAULT_RETENTION, METHODS

    parser.add_argument("--cache", choices=METHODS, default="none",
                        help="skip the transformer's blocks on steps where they change little: teacache or magcache "
                             "(calibrated by step_cache.json in the model folder; see docs/step-cache.md)")
    parser.add_argument("--cache-threshold", type=float, metavar="T",
                        help="skip while the estimated error stays under T (default 0.15 teacache, 0.12 magcache); "
                             "higher is faster")
    parser.add_argument("--cache-speed", type=float, metavar="X",
                        help="instead of a threshold: the one giving X times fewer transformer passes, solved from "
                             "the calibration (e.g. 2.0)")
    parser.add_argument("--cache-max-skips", type=int, default=DEFAULT_MAX_SKIPS, metavar="K",
                        help=f"magcache: at most K skipped steps in a row (default {DEFAULT_MAX_SKIPS})")
    parser.add_argument("--cache-retention", type=float, metavar="R",
                        help=f"no skipping in the first R of the steps (default {DEFAULT_RETENTION['teacache']:g} "
                             f"teacache, {DEFAULT_RETENTION['magcache']:g} magcache)")
    parser.add_argument("--cache-calibration", metavar="FILE",
                        help="calibration file (default: step_cache.json in the model folder)")


def _cache_settings(args: argparse.Namespace):
    from .cache import CacheSettings

    settings = CacheSettings(args.cache, args.cache_threshold, args.cache_speed, args.cache_max_skips,
                             args.cache_retention, calibration=Path(args.cache_calibration)
                             if args.cache_calibration else None)
    settings.check()
    return settings


def _add_parallel_args(parser: argparse.ArgumentParser) -> None:
    p = parser.add_argument_group("multi-GPU (run under torchrun --nproc_per_node N; see docs/multi-gpu.md)")
    p.add_argument("--ulysses", type=int, metavar="N",
                   help="split the video tokens over N processes with all-to-all attention (N divides the head "
                        "count, 24 for the 13B model; default: all processes not taken by --ring)")
    p.add_argument("--ring", type=int, metavar="M",
                   help="split the video tokens over M (more) processes with ring attention; ulysses x ring x "
                        "(2 with --cfg-parallel) = the number of processes (default 1)")
    p.add_argument("--cfg-parallel", action="store_true",
                   help="run the conditional and unconditional passes of real CFG (--cfg-scale > 1) on two halves "
                        "of the processes")
    p.add_argument("--shard-weights", action="store_true",
                   help="keep 1/N of every transformer block's weights on each process, gathered block by block "
                        "(same output, less memory per GPU)")
    p.add_argument("--broadcast-weights", action="store_true",
                   help="rank 0 alone reads the transformer checkpoint and sends it to the other processes (by "
                        "default each one reads the file itself)")
    p.add_argument("--no-parallel-vae", dest="parallel_vae", action="store_false",
                   help="decode the video on rank 0 alone (by default every process decodes a share of the VAE "
                        "tiles; without this flag the other processes load the VAE too when the decode is tiled)")


def _parallel(args: argparse.Namespace):
    """This process's place in a torchrun launch (its process group joined), or None for a single process."""
    import atexit

    from .parallel.mesh import Parallel, ParallelConfig, init_distributed, launched_world

    launched = launched_world()
    if launched is None:
        n = (args.ulysses or 1) * (args.ring or 1) * (2 if args.cfg_parallel else 1)
        if n > 1 or args.shard_weights or args.broadcast_weights or not args.parallel_vae:
            raise InputError("--ulysses/--ring/--cfg-parallel/--shard-weights/--broadcast-weights/--no-parallel-vae "
                             f"share the work of several processes: launch with torchrun --nproc_per_node "
                             f"{max(n, 2)} -m hunyuan_i2v.cli generate ...")
        return None
    config = ParallelConfig.for_world(launched[1], args.ulysses, args.ring, args.cfg_parallel, args.shard_weights,
                                      parallel_vae=args.parallel_vae, broadcast_weights=args.broadcast_weights)
    par = Parallel(config, init_distributed(args.device))
    atexit.register(par.close)
    logger.info("process %d: %s", par.rank, par.describe())
    return par


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


def _rewrite_backend(args: argparse.Namespace):
    """The language model for --rewrite, checked (not loaded) with the other cheap checks."""
    if not args.rewrite:
        return None
    from .rewrite import backend_from_options, require_backend

    backend = None if args.rewrite == "lint" else backend_from_options(
        args.rewrite_model, args.rewrite_url, args.rewrite_api_model, args.rewrite_key, device=args.device)
    require_backend(args.rewrite, backend)
    return backend


def _rewrite(args: argparse.Namespace, backend) -> tuple[str, dict]:
    """The prompt to generate from, and what to add to the video metadata about its rewriting."""
    if not args.rewrite:
        return args.prompt, {}
    from .rewrite import rewrite_prompt

    try:
        result = rewrite_prompt(args.prompt, args.rewrite, backend)
    finally:
        getattr(backend, "close", lambda: None)()  # a local rewrite model leaves the device to the video model
    if result.backend:
        print(f"rewritten prompt ({result.mode}, {result.backend}): {result.prompt}", flush=True)
    for warning in result.warnings:
        print(f"warning: {warning}", file=sys.stderr)
    if args.rewrite == "lint" and not result.warnings:
        print("prompt check: no warnings", file=sys.stderr)
    return result.prompt, {"original_prompt": result.original, "rewrite_mode": result.mode,
                           "rewrite_backend": result.backend}


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
    loras = _lora_args(args.lora)
    rewrite_backend = _rewrite_backend(args)
    cache = _cache_settings(args)
    files = resolve_model_files(_resolve_model(args.model)).require_complete()
    par = _parallel(args)  # under torchrun: rank 0 rewrites, encodes, decodes, writes and prints
    prompt, rewrite_meta = _rewrite(args, rewrite_backend) if par is None or par.is_main else (args.prompt, {})

    from .pipeline import I2VPipeline
    from .video import VideoWriter, unique_output_path, write_frames_png, write_preview, write_video

    if args.attention == "auto":  # the one line saying which backend auto picked, also without --verbose
        logging.getLogger("hunyuan_i2v.model.layers").setLevel(logging.INFO)
    seed = args.seed if args.seed is not None else random.randint(0, 10**6)
    pipe = I2VPipeline.from_pretrained(files.root, device=par.device if par else args.device,
                                       dtype=_torch_dtype(args.dtype), **_memory_kwargs(args), compile=args.compile,
                                       prompt_cache=False if args.no_prompt_cache else None,
                                       loras=loras, lora_mode=args.lora_mode, parallel=par)
    lora_meta = {"loras": pipe.loras, "lora_mode": pipe.lora_mode} if loras else {}
    fps = args.fps or pipe.config.sampler.fps

    def video_meta(settings, i: int) -> dict:
        """What the MP4 of video i stores: the generation settings and how the prompt was made."""
        return {**settings.for_video(i), **rewrite_meta, **lora_meta}

    def output_path(i: int, meta: dict) -> Path:
        if args.output:
            out = Path(args.output)
            out.parent.mkdir(parents=True, exist_ok=True)
            return out if args.num_videos == 1 else out.with_name(f"{out.stem}_{i}{out.suffix}")
        return unique_output_path(args.output_dir, args.prompt, meta["seed"])

    # Without PNG frames or a preview, each video streams into its MP4 as the VAE decodes it (host memory does
    # not grow with the length); each writer is atomic, so an interrupted run leaves no partial file.
    writers: dict[int, VideoWriter] = {}

    def sink(i: int, chunk, settings) -> None:
        if i not in writers:
            for w in writers.values():
                w.close()
            meta = video_meta(settings, i)
            writers.clear()
            writers[i] = VideoWriter(output_path(i, meta), fps=fps, crf=args.crf, metadata=meta)
            written.append((writers[i], meta))
        writers[i].write(chunk)

    written: list = []
    streaming = not (args.frames_dir or args.preview)
    try:
        result = pipe(
            image, prompt, negative_prompt=args.negative_prompt, resolution=args.resolution, height=args.height,
            width=args.width, num_frames=args.frames, steps=args.steps, seed=seed, flow_shift=args.flow_shift,
            stability=args.stability, guidance=args.guidance, cfg_scale=args.cfg_scale, num_videos=args.num_videos,
            progress=not args.no_progress, cache=cache, frame_sink=sink if streaming else None,
        )
        for w in writers.values():
            w.close()
    except BaseException:
        for w in writers.values():
            w.abort()
        raise
    if par is not None and not par.is_main:
        return 0
    if "step_cache" in result.extras:
        c = result.extras["step_cache"]
        print(f"{c['setting']}: {c['computed_passes']} of {c['passes']} transformer passes computed "
              f"({c['speedup']:.2f}x)")
    for writer, meta in written:
        w, h = writer.size
        print(f"{writer.path}  (seed {meta['seed']}, {writer.frames_written} frames, {w}x{h})")
    for i, frames in enumerate(result.frames if result.frames is not None else []):
        meta = video_meta(result.settings, i)
        path = output_path(i, meta)
        write_video(path, frames, fps=fps, crf=args.crf, metadata=meta)
        if args.frames_dir:
            write_frames_png(Path(args.frames_dir) / path.stem if args.num_videos > 1 else args.frames_dir, frames)
        if args.preview:
            p = Path(args.preview)
            p.parent.mkdir(parents=True, exist_ok=True)
            write_preview(p if args.num_videos == 1 else p.with_name(f"{p.stem}_{i}{p.suffix}"), frames, fps)
        print(f"{path}  (seed {meta['seed']}, {frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]})")
    return 0


def _lora_args(values: Sequence[str]) -> list[tuple[Path, float]]:
    """--lora PATH[:SCALE] values -> (path, scale), scale 1.0 when not given; every file must exist."""
    loras = []
    for value in values:
        path, sep, tail = value.rpartition(":")
        try:
            scale = float(tail) if sep else None
        except ValueError:  # the colon belongs to the path (C:\...)
            scale = None
        if scale is None:
            path, scale = value, 1.0
        if not math.isfinite(scale):
            raise InputError(f"--lora {value}: the scale must be a finite number, e.g. {path}:0.8")
        if not Path(path).is_file():
            raise ModelFilesError(f"--lora {value}: no such file {path}")
        loras.append((Path(path), scale))
    return loras


def cmd_calibrate_cache(args: argparse.Namespace) -> int:
    from .images import load_image
    from .layout import resolve_model_files

    if args.steps is not None and args.steps < 2:
        raise InputError(f"--steps must be at least 2 to calibrate step caching, got {args.steps}")
    if (args.height is None) != (args.width is None):
        raise InputError("give both --height and --width, or neither")
    if any(not p.strip() for p in args.prompts):
        raise InputError("a calibration prompt is empty: describe the motion, e.g. \"the camera pans left\"")
    images = [load_image(p) for p in args.images]
    root = _resolve_model(args.model)
    files = resolve_model_files(root).require_complete()
    out = Path(args.out) if args.out else Path(files.root) / "step_cache.json"
    if out.suffix.lower() != ".json":
        raise InputError(f"--out must end in .json, got {out.name!r}")
    _check_output_folder(out.parent if str(out.parent) else Path("."))

    from .cache import calibrate, save_calibration
    from .pipeline import I2VPipeline

    pipe = I2VPipeline.from_pretrained(files.root, device=args.device, dtype=_torch_dtype(args.dtype))
    n = len(images) * len(args.prompts)
    print(f"calibrating on {n} full-step generation(s) ({len(images)} image(s) x {len(args.prompts)} prompt(s))",
          file=sys.stderr)
    entry = calibrate(pipe, images, args.prompts, steps=args.steps, seed=args.seed, progress=not args.no_progress,
                      resolution=args.resolution, height=args.height, width=args.width, num_frames=args.frames,
                      cfg_scale=args.cfg_scale)
    save_calibration(out, [entry], model=pipe.config.name)
    print(f"wrote {out}: {entry.width}x{entry.height}, {entry.num_frames} frames, {entry.steps} steps"
          f"{', real CFG' if entry.cfg else ''}; TeaCache polynomial fit RMSE {entry.fit_rmse:.4f}")
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


def server_settings(args: argparse.Namespace, ui: bool = False):
    """ServerSettings from the serve/ui flags (checked: a non-loopback bind needs a token)."""
    import os

    from .server.settings import Limits, ServerSettings, token_from_env

    for flag in ("max_frames", "max_steps", "max_queue", "max_pixels", "max_side", "max_attempts"):
        if getattr(args, flag) < 1:
            raise InputError(f"--{flag.replace('_', '-')} must be at least 1, got {getattr(args, flag)}")
    if args.max_loras < 0:
        raise InputError(f"--max-loras must be at least 0, got {args.max_loras}")
    if args.max_upload_mb <= 0:
        raise InputError(f"--max-upload-mb must be positive, got {args.max_upload_mb}")
    if not 0 <= args.port < 65536:
        raise InputError(f"--port must be within 0..65535, got {args.port}")
    resolutions = tuple(r.strip() for r in args.resolutions.split(",") if r.strip())
    bad = [r for r in resolutions if r not in ("360p", "540p", "720p")]
    if bad or not resolutions:
        raise InputError(f"--resolutions takes names from 360p, 540p, 720p; got {args.resolutions!r}")
    data_dir = Path(args.data_dir or os.environ.get("HUNYUAN_I2V_DATA") or Path.home() / ".cache/hunyuan-i2v/server")
    _check_output_folder(data_dir)
    model = _resolve_model(args.model)
    from .layout import resolve_model_files

    resolve_model_files(model).require_complete()
    if args.devices:
        devices = tuple(d.strip() for d in args.devices.split(",") if d.strip())
        if not devices:
            raise InputError("--devices names no device: give e.g. cpu, cuda:0 or cuda:0,cuda:1")
    else:
        import torch

        devices = tuple(f"cuda:{i}" for i in range(torch.cuda.device_count())) or ("cpu",)
    if args.workers == 0:
        devices = ()
    limits = Limits(max_upload_bytes=int(args.max_upload_mb * 2**20), max_image_pixels=args.max_pixels,
                    max_frames=args.max_frames, max_steps=args.max_steps, max_side=args.max_side,
                    resolutions=resolutions, max_queue=args.max_queue, max_loras=args.max_loras)
    rewrite = {k: v for k, v in (("model_path", args.rewrite_model), ("url", args.rewrite_url),
                                 ("api_model", args.rewrite_api_model), ("api_key", args.rewrite_key)) if v}
    settings = ServerSettings(data_dir=data_dir, model=model, devices=devices, host=args.host,
                              port=args.port, token=args.token or token_from_env(), limits=limits,
                              max_attempts=args.max_attempts, ui=ui or getattr(args, "ui", False), rewrite=rewrite,
                              lora_dir=Path(args.lora_dir).expanduser() if args.lora_dir else None)
    settings.check()
    return settings


def cmd_serve(args: argparse.Namespace, ui: bool = False) -> int:
    settings = server_settings(args, ui=ui)
    from .server.api import serve

    where = f"http://{settings.host}:{settings.port}"
    print(f"hunyuan-i2v {'web UI' if ui else 'service'} on {where}  (API docs: {where}/docs"
          + (f", UI: {where}/ui" if settings.ui else "") + f"; data: {settings.data_dir})",
          flush=True)
    serve(settings, log_level=args.log_level)
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    from .server.parallel_worker import run

    logging.getLogger().setLevel(args.log_level.upper())
    return run(args)


def cmd_lora(args: argparse.Namespace) -> int:
    from .train.lora_cli import run_plan, run_prepare, run_train

    import json

    if args.lora_command == "plan":
        print(run_plan(args))
        return 0
    summary = run_prepare(args) if args.lora_command == "prepare" else run_train(args)
    print(json.dumps(summary, indent=1, default=str))
    return 0


COMMANDS = {"generate": cmd_generate, "calibrate-cache": cmd_calibrate_cache, "download": cmd_download,
            "convert": cmd_convert, "info": cmd_info, "lora": cmd_lora,
            "serve": cmd_serve, "ui": lambda args: cmd_serve(args, ui=True), "worker": cmd_worker}


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    service = args.command in ("serve", "ui", "worker")  # long-running: every log line says when
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format=("%(asctime)s " if service else "") + "%(levelname)s %(name)s: %(message)s")
    try:
        return COMMANDS[args.command](args)
    except HunyuanI2VError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun every process fails alike: rank 0 says so
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
