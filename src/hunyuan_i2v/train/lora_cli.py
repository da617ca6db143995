"""Command line of LoRA training: ``hunyuan-i2v lora prepare|train`` and ``python -m hunyuan_i2v.train
lora-prepare|lora-train`` (the same arguments). Light to import: the training code loads when a command runs."""

from __future__ import annotations

import shutil
from pathlib import Path

DEFAULT_RANK = 64  # spec 6.2 (r = lora_alpha = 64); train.lora holds the same default




def add_prepare_arguments(p) -> None:
    p.add_argument("input", help="a folder of videos with same-name .txt captions, or a .json / .csv list of "
                                 "{video, caption}")
    p.add_argument("--out", required=True, help="cache folder to write")
    p.add_argument("--model", default=None, help="model folder (default: the bundled tiny model)")
    p.add_argument("--trigger", default=None, help="a trigger word put before every caption ('WORD, caption')")
    p.add_argument("--height", type=int, default=None, help="clip height (default: the model's)")
    p.add_argument("--width", type=int, default=None, help="clip width (default: the model's)")
    p.add_argument("--frames", type=int, default=None, help="frames per clip, 4k+1 (default: the model's)")
    p.add_argument("--heldout", type=int, default=0, help="the last N videos form the held-out split")
    p.add_argument("--batch", type=int, default=2, help="clips per VAE call")
    p.add_argument("--resume", action="store_true", help="continue a partial cache in OUT")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def add_train_arguments(p) -> None:
    p.add_argument("--data", required=True, action="append",
                   help="a prepared cache (repeat for the sizes of a staged run)")
    p.add_argument("--out", required=True, help="run folder (checkpoint.pt, log.jsonl, eval/, lora.safetensors)")
    p.add_argument("--model", default=None, help="base model folder (default: the one the cache was made with)")
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
    p.add_argument("--prompt-dropout", type=float, default=0.1)
    p.add_argument("--grad-checkpointing", action="store_true", help="recompute block activations in backward")
    p.add_argument("--bf16", action="store_true", help="bf16 autocast of the forward (fp32 LoRA weights)")
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


def run_prepare(args) -> dict:
    from .common import set_threads
    from .lora import prepare_lora_data

    set_threads(args.threads)
    cache = prepare_lora_data(args.input, args.out, args.model, trigger=args.trigger, height=args.height,
                              width=args.width, frames=args.frames, heldout=args.heldout, batch=args.batch,
                              resume=args.resume, progress=not args.quiet)
    return {"out": args.out, "latent_shape": cache["latent_shape"], "prompts": len(cache["prompts"]),
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
        grad_checkpointing=args.grad_checkpointing, bf16=args.bf16, stages=stages, eval_videos=args.eval_videos,
        eval_steps=args.eval_steps, seed=args.seed)
    loop = LoopSettings(budget=Budget(minutes, steps), warmup_steps=args.warmup, cooldown=args.cooldown,
                        ckpt_every_min=args.ckpt_every_min, eval_every_min=args.eval_every_min or None,
                        eval_every_steps=args.eval_every_steps, log_every=args.log_every, resume=args.resume,
                        progress=not args.quiet)
    task = LoraTask(args.data, args.model, settings)
    summary = run_training(task, args.out, loop)
    if args.save and not summary.get("stopped"):
        save = Path(args.save).expanduser()
        save.parent.mkdir(parents=True, exist_ok=True)
        run = Path(args.out)
        shutil.copyfile(run / KOHYA_FILE, save)
        shutil.copyfile(run / DIFFUSERS_FILE, save.with_name(save.stem + "_diffusers" + save.suffix))
        summary["saved"] = str(save)
    return summary
