"""Command line of LoRA training: ``hunyuan-i2v lora prepare|train|plan`` and ``python -m hunyuan_i2v.train
lora-prepare|lora-train`` (the same arguments); ``plan`` predicts the device memory of a training step. Light to
import: the training code loads when a command runs."""

from __future__ import annotations

import shutil
from pathlib import Path

DEFAULT_RANK = 64  # spec 6.2 (r = lora_alpha = 64); train.lora holds the same default
OPTIMIZERS = ("adamw", "adamw8bit")  # train.optim.OPTIMIZERS, named here to keep the parser light
OPTIMIZER_HELP = ("adamw: torch AdamW, two fp32 moments (8 bytes per trainable parameter); adamw8bit: our 8-bit "
                  "AdamW (train/optim.py), int8 / uint8 codes with per-256 block scales, ~2.03 bytes per parameter, "
                  "a quarter of the state (default: adamw)")


def add_base_arguments(p) -> None:
    """How the frozen base is held (the memory engine's flags, named as in ``generate``)."""
    from ..memory import WEIGHTS_DTYPES

    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1 ... (default: cpu)")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="compute dtype of the frozen base (default fp32; the LoRA factors stay fp32, and so do AdamW's "
                        "moments unless --optimizer adamw8bit)")
    p.add_argument("--weights-dtype", choices=WEIGHTS_DTYPES, default="auto",
                   help="storage of the base's block linears: auto (= --dtype), or int8 / fp8 codes with per-row "
                        "scales, dequantized per call (half the bytes of bf16; the base changes slightly)")
    p.add_argument("--offload", choices=["none", "blocks"], default="none",
                   help="blocks: stream the base's double/single blocks from the (memory-mapped) checkpoint, in for "
                        "the forward and again for the backward's recompute (needs --grad-checkpointing)")
    p.add_argument("--offload-activations", action="store_true",
                   help="keep the checkpointed block inputs in pinned host memory until the backward needs them "
                        "(a GPU: at 360p x 129 frames they are ~10 GB of the 13B model's step; same numbers)")


def base_dtype(args) -> str:
    """--dtype, else the float --weights-dtype, else fp32."""
    if args.dtype:
        return args.dtype
    return args.weights_dtype if args.weights_dtype in ("fp32", "bf16", "fp16") else "fp32"


MODEL_HELP = ("official ckpts/, diffusers or flat layout, anything generate --model takes (e.g. ckpts for the 13B "
              "model)")


def add_prepare_arguments(p) -> None:
    p.add_argument("input", help="a folder of videos with same-name .txt captions, or a .json / .csv list of "
                                 "{video, caption}")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--model", default=None,
                   help=f"model folder: {MODEL_HELP}; its VAE encodes the clips and its prompt encoder the captions "
                        "(LLaVA + CLIP with each clip's frame 0 for the 13B model, MiniLM for the tiny one) "
                        "(default: the bundled tiny model)")
    p.add_argument("--trigger", default=None, help="a trigger word put before every caption ('WORD, caption')")
    p.add_argument("--height", type=int, default=None,
                   help="clip height, with --width (default: the model's size; for the 13B model the official "
                        "extractor's 360p bucket of the first video, e.g. 352x624 for 16:9)")
    p.add_argument("--width", type=int, default=None, help="clip width, with --height (default: see --height)")
    p.add_argument("--frames", type=int, default=None,
                   help="frames per clip, 4k+1 (default: the model's: 33 tiny, 129 for the 13B model)")
    p.add_argument("--heldout", type=int, default=0, help="the last N videos form the held-out split")
    p.add_argument("--batch", type=int, default=2, help="clips per VAE call")
    p.add_argument("--device", default="cpu",
                   help="where the prompt encoder and then the VAE run: cpu, cuda, cuda:1 ... (default: cpu); the "
                        "encoder is released before the VAE loads")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="dtype of the prompt encoder and the VAE (default: fp16 on cuda, fp32 on cpu, as generate); "
                        "latents and embeddings are stored in fp16 either way")
    p.add_argument("--resume", action="store_true", help="continue a partial cache in OUT")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_train_arguments(p) -> None:
    p.add_argument("--data", required=True, action="append",
                   help="a prepared cache (repeat for the sizes of a staged run)")
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, log.jsonl, eval/, lora.safetensors)")
    p.add_argument("--model", default=None,
                   help=f"base model folder: {MODEL_HELP} (default: the one the cache was prepared with)")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK, help=f"LoRA rank r (official: {DEFAULT_RANK})")
    p.add_argument("--alpha", type=float, default=None, help="LoRA alpha (default: = rank, as the official recipe)")
    p.add_argument("--minutes", type=float, default=None, help="budget in minutes of loop time (across resumes)")
    p.add_argument("--steps", type=int, default=None, help="budget in optimiser steps")
    p.add_argument("--stages", default=None,
                   help="progressive schedule, e.g. 9:5,33:15 (frames:minutes) or 64x9:100steps,64x33:300steps")
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--lr", type=float, default=1e-4, help="peak learning rate (official 1e-4)")
    p.add_argument("--warmup", type=int, default=100, help="linear LR warm-up steps (official 500)")
    p.add_argument("--cooldown", type=float, default=0.0, help="share of the budget for a final linear LR decay")
    p.add_argument("--shift", type=float, default=3.0, help="timestep shift (official 7.0 at 360p)")
    p.add_argument("--prompt-dropout", type=float, default=0.1,
                   help="probability of training a clip with the empty prompt (official --uncond-p 0.1)")
    p.add_argument("--semantic-drop-p", type=float, default=0.1,
                   help="probability of giving the prompt encoder a black image instead of frame 0, independently of "
                        "--prompt-dropout (official --sematic-cond-drop-p 0.1; 0 disables). Needs a cache prepared "
                        "with an image-reading prompt encoder (LLaVA); with MiniLM (the tiny model) it has no effect")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw", help=OPTIMIZER_HELP)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the forward (fp32 LoRA weights)")
    add_base_arguments(p)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    p.add_argument("--ckpt-every-min", type=float, default=2.0)
    p.add_argument("--eval-every-min", type=float, default=5.0, help="minutes between validations (0: at the end)")
    p.add_argument("--eval-every-steps", type=int, default=None, help="also validate every N steps")
    p.add_argument("--eval-videos", type=int, default=2, help="videos sampled per validation")
    p.add_argument("--eval-steps", type=int, default=10, help="sampling steps of the validation videos")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--save", default=None, help="also copy the kohya file here (e.g. ~/.cache/hunyuan-i2v/loras/x."
                                                "safetensors); the diffusers file goes beside it as *_diffusers")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


TORCH_DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def run_prepare(args) -> dict:
    import torch

    from .common import set_threads
    from .lora import prepare_lora_data

    set_threads(args.threads)
    cache = prepare_lora_data(args.input, args.out, args.model, trigger=args.trigger, height=args.height,
                              width=args.width, frames=args.frames, heldout=args.heldout, batch=args.batch,
                              resume=args.resume, progress=not args.quiet, device=args.device,
                              dtype=getattr(torch, TORCH_DTYPES[args.dtype]) if args.dtype else None)
    return {"out": args.out, "base_model": cache.get("base_model"), "latent_shape": cache["latent_shape"],
            "prompts": len(cache["prompts"]), "semantic_images": cache.get("semantic_images", False),
            "rows": {s: v["count"] for s, v in cache["splits"].items()}, **cache["dataset_parameters"]}


def run_train(args) -> dict:
    from .common import Budget, LoopSettings, run_training, set_threads
    from .lora import DIFFUSERS_FILE, KOHYA_FILE, LoraTask, LoraTrainSettings, parse_stages, stages_budget

    set_threads(args.threads)
    stages = tuple(parse_stages(args.stages)) if args.stages else ()
    minutes, steps = args.minutes, args.steps
    if minutes is None and steps is None and stages:
        minutes, steps = stages_budget(stages)
    settings = LoraTrainSettings(
        rank=args.rank, alpha=float(args.alpha if args.alpha is not None else args.rank), lr=args.lr,
        batch=args.batch, shift=args.shift, prompt_dropout=args.prompt_dropout,
        semantic_drop_p=args.semantic_drop_p, optimizer=args.optimizer,
        grad_checkpointing=args.grad_checkpointing, bf16=args.bf16, dtype=base_dtype(args),
        weights_dtype=args.weights_dtype, offload=args.offload, offload_activations=args.offload_activations,
        stages=stages, eval_videos=args.eval_videos,
        eval_steps=args.eval_steps, seed=args.seed)
    loop = LoopSettings(budget=Budget(minutes, steps), warmup_steps=args.warmup, cooldown=args.cooldown,
                        ckpt_every_min=args.ckpt_every_min, eval_every_min=args.eval_every_min or None,
                        eval_every_steps=args.eval_every_steps, log_every=args.log_every, resume=args.resume,
                        progress=not args.quiet)
    task = LoraTask(args.data, args.model, settings, device=args.device)
    summary = run_training(task, args.out, loop)
    if args.save and not summary.get("stopped"):
        save = Path(args.save).expanduser()
        save.parent.mkdir(parents=True, exist_ok=True)
        run = Path(args.out)
        shutil.copyfile(run / KOHYA_FILE, save)
        shutil.copyfile(run / DIFFUSERS_FILE, save.with_name(save.stem + "_diffusers" + save.suffix))
        summary["saved"] = str(save)
    return summary


def add_plan_arguments(p) -> None:
    from ..memory import QUANTIZED_WEIGHTS

    p.add_argument("--model", default=None, help=f"model folder: {MODEL_HELP} (default: the bundled tiny model)")
    p.add_argument("--preset", default=None, help="a model preset instead of a folder, e.g. hunyuan-i2v-720p")
    p.add_argument("--height", type=int, default=None, help="clip height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="clip width (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip, 4k+1 (default: the model's)")
    p.add_argument("--text-tokens", type=int, default=None, help="text stream tokens (default: the model's)")
    p.add_argument("--device", choices=["cuda", "cpu"], default="cuda", help="the device to plan for")
    p.add_argument("--dtype", choices=["fp32", "bf16", "fp16"], default=None,
                   help="the base's compute dtype (default: bf16 on cuda, fp32 on cpu)")
    p.add_argument("--weights-dtype", choices=["auto", *QUANTIZED_WEIGHTS], default=None,
                   help="only plans with this block storage (auto: the compute dtype)")
    p.add_argument("--offload", choices=["none", "blocks"], default=None, help="only plans with this residency")
    p.add_argument("--rank", type=int, default=DEFAULT_RANK)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="adamw",
                   help="the optimiser state to plan for: adamw (8 bytes per trainable parameter) or adamw8bit "
                        "(2 bytes + block scales)")
    p.add_argument("--memory-budget", type=float, metavar="GB", default=None,
                   help="device memory to fit (GB of 2^30 bytes; 10%% is kept free)")


def run_plan(args) -> str:
    """The text of ``lora plan``: the chosen plan's breakdown and every residency x storage (fitting ones first)."""
    from ..buckets import check_num_frames, check_size
    from ..config import get_preset
    from ..errors import InputError
    from ..memory import planner
    from ..memory.planner import QUANTIZED_WEIGHTS, Target, format_size
    from ..pipeline import model_config_for
    from .lora import lora_base_file, lora_model_files

    if args.preset:
        try:
            config = get_preset(args.preset)
        except ValueError as e:
            raise InputError(str(e)) from None
    else:
        lora_base_file(args.model)  # the one-line error for a folder without a transformer
        config = model_config_for(lora_model_files(args.model))
    sampler, vcfg = config.sampler, config.vae
    height, width = check_size(args.height or sampler.height, args.width or sampler.width,
                               vcfg.spatial_compression * config.transformer.patch_size[1])
    frames = check_num_frames(args.frames or sampler.num_frames)
    if args.rank < 1 or args.batch < 1:
        raise InputError(f"--rank and --batch must be at least 1, got {args.rank}, {args.batch}")
    dtype = planner.FLOAT_WEIGHTS[args.dtype] if args.dtype else None
    target = Target.for_device(args.device, dtype)
    rows = planner.lora_training_table(config, height, width, frames, target, args.memory_budget, args.rank,
                                       args.batch, args.text_tokens, args.optimizer)
    wd = None if args.weights_dtype in (None, "auto") else args.weights_dtype
    if args.weights_dtype == "auto":
        wd = target.native_weights
    rows = [(p, fit) for p, fit in rows if (wd is None or p.weights_dtype == wd)
            and (args.offload is None or p.offload == args.offload)]
    if not rows:
        raise InputError("no training plan has these choices")  # every combination of the flags exists
    first = rows[0][0]
    lines = [f"LoRA training of {config.name} at {height}x{width} x {frames} frames ({first.video_tokens} video + "
             f"{first.text_tokens} text tokens), rank {args.rank}, batch {args.batch}, {args.optimizer}, on "
             f"{args.device} in {target.native_weights}; the VAE and prompt encoders stay off the device "
             "(lora prepare caches)"]

    def rank(p) -> tuple:  # an exact base first, then the faster residency (streaming and moving cost copies)
        quant = QUANTIZED_WEIGHTS.index(p.weights_dtype) + 1 if p.weights_dtype in QUANTIZED_WEIGHTS else 0
        return quant, p.offload == "blocks", p.offload_activations, p.peak

    fitting = [p for p, fit in rows if fit]
    if args.memory_budget is None:
        chosen = min((p for p, _ in rows), key=lambda p: (p.offload != "none", p.weights_dtype != target.native_weights,
                                                            not p.grad_checkpointing, p.offload_activations))
        lines.append(f"plan: {chosen.describe()} ({chosen.flags()})")
    elif fitting:
        chosen = min(fitting, key=rank)
        lines.append(f"fits {args.memory_budget:g} GB: {chosen.describe()} ({chosen.flags()})")
    else:
        chosen = min((p for p, _ in rows), key=lambda p: p.peak)
        lines.append(f"nothing fits {args.memory_budget:g} GB; the leanest needs --memory-budget "
                     f"{chosen.budget_needed():.1f}: {chosen.describe()} ({chosen.flags()})")
    lines += chosen.lines()
    lines.append("every plan (peak; fitting first):")
    for p, fit in rows:
        mark = "" if fit is None else ("fits" if fit else "too big")
        lines.append(f"    {format_size(p.peak):>9}  {mark:<8} {p.describe()}")
    return "\n".join(lines)
