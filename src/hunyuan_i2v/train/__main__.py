"""Command line of the training stages: ``python -m hunyuan_i2v.train {vae,latents,dit,export,lora-prepare,lora-train}``
(the LoRA stages are also ``hunyuan-i2v lora prepare|train``; see docs/lora.md).

Typical run of the demo model (each stage resumes after a kill when rerun with the same command)::

    python -m hunyuan_i2v.train.data build --out data/tiny64
    python -m hunyuan_i2v.train vae     --data data/tiny64 --out runs/vae --minutes 60 --resume
    python -m hunyuan_i2v.train latents --data data/tiny64 --vae runs/vae --out runs/latents --resume
    python -m hunyuan_i2v.train dit     --data runs/latents --out runs/dit --minutes 120 --resume
    python -m hunyuan_i2v.train export  --dit runs/dit --out models/hunyuan-i2v-tiny
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
from typing import Optional, Sequence

from ..config import TINY_DEMO, get_preset
from ..errors import HunyuanI2VError, InputError

logger = logging.getLogger("hunyuan_i2v.train")


def _add_loop_options(p: argparse.ArgumentParser, eval_every: float, warmup: int) -> None:
    g = p.add_argument_group("budget and schedule")
    g.add_argument("--minutes", type=float, default=None,
                   help="training budget in minutes of loop time (counted across resumes)")
    g.add_argument("--steps", type=int, default=None, help="training budget in optimiser steps")
    g.add_argument("--batch", type=int, default=None,
                   help="batch size (VAE: of the single-frame steps; clip steps scale with it, at least 2)")
    g.add_argument("--lr", type=float, default=None, help="peak learning rate")
    g.add_argument("--warmup", type=int, default=warmup, help="linear LR warm-up steps")
    g.add_argument("--cooldown", type=float, default=0.15, help="share of the budget for the final linear LR decay")
    g.add_argument("--lr-floor", type=float, default=0.1, help="LR multiplier at the end of the cooldown")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint.pt when it exists")
    g.add_argument("--ckpt-every-min", type=float, default=5.0, help="minutes between checkpoints")
    g.add_argument("--eval-every-min", type=float, default=eval_every,
                   help="minutes between evaluations (0: only at the end)")
    g.add_argument("--log-every", type=int, default=10, help="steps per log.jsonl record (mean of the metrics)")
    g.add_argument("--grad-checkpointing", action="store_true", help="recompute activations in backward (less memory)")
    g.add_argument("--bf16", action="store_true",
                   help="bf16 autocast of the forward (fp32 weights and optimiser); faster where the CPU has bf16 "
                        "matrix units (AMX, AVX512-BF16) and on GPUs")
    g.add_argument("--model-config", default=None,
                   help="a model.json or a preset name (default: the previous stage's model.json; "
                        "the VAE stage: hunyuan-i2v-tiny)")


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m hunyuan_i2v.train", description="Train the tiny demo model.",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog="example:" + __doc__.split("::")[1],
    )
    sub = parser.add_subparsers(dest="stage", required=True)

    vae = sub.add_parser("vae", help="train the causal VAE on on-the-fly samples of a built dataset's train split")
    vae.add_argument("--data", required=True, help="a dataset built by `python -m hunyuan_i2v.train.data build`")
    vae.add_argument("--out", required=True, help="run folder (checkpoint.pt, log.jsonl, vae.safetensors, model.json)")
    _add_loop_options(vae, eval_every=5.0, warmup=30)
    vae.add_argument("--ema", type=float, default=0.0, help="EMA decay of the weights (0: off)")
    vae.add_argument("--augment", action="store_true",
                     help="views of 30-100%% of a photo, flips/rotations and shuffled colour channels (generalises "
                          "better to unseen photos)")
    vae.add_argument("--step-kinds", default=None, metavar="FxB:W,...",
                     help="the step mix: frames x batch : weight per kind (default: "
                          "1x8:0.4,5x3:0.3,9x2:0.25,17x2:0.05)")
    vae.add_argument("--init-from", default=None, metavar="PATH",
                     help="start from these VAE weights: a VAE run folder, a model folder or a VAE file")
    vae.add_argument("--freeze-encoder", action="store_true",
                     help="train the decoder only (needs --init-from): the latents stay those of the source VAE, so "
                          "a DiT trained on them still fits (export --vae)")
    _add_common(vae)

    lat = sub.add_parser("latents", help="encode a dataset with a trained VAE into a latent cache, with prompt embeddings")
    lat.add_argument("--data", required=True, help="the built dataset")
    lat.add_argument("--vae", required=True, help="the VAE run folder (vae.safetensors + model.json)")
    lat.add_argument("--out", required=True, help="cache folder")
    lat.add_argument("--batch", type=int, default=4, help="clips per encoder call")
    lat.add_argument("--no-mirror", action="store_true", help="skip the left-right mirrored copies of the train split")
    lat.add_argument("--resume", action="store_true", help="continue a partial cache in OUT")
    _add_common(lat)

    dit = sub.add_parser("dit", help="train the transformer on a latent cache")
    dit.add_argument("--data", required=True, help="the latent cache folder")
    dit.add_argument("--out", required=True, help="run folder (checkpoint.pt, log.jsonl, eval/, model.json)")
    _add_loop_options(dit, eval_every=10.0, warmup=50)
    dit.add_argument("--shift", type=float, default=3.0, help="timestep shift s of t <- s t / (1 + (s - 1) t)")
    dit.add_argument("--ema", type=float, default=0.999, help="EMA decay (warmed up over the first steps)")
    dit.add_argument("--prompt-dropout", type=float, default=0.1, help="probability of training on the empty prompt")
    dit.add_argument("--weight-decay", type=float, default=0.0)
    dit.add_argument("--eval-videos", type=int, default=7, help="held-out videos sampled per evaluation")
    dit.add_argument("--eval-steps", type=int, default=10, help="sampling steps of the evaluation videos")
    dit.add_argument("--frames", type=int, default=None,
                     help="train on the first 4k+1 frames of each cached clip (default: all; sets the model's default)")
    dit.add_argument("--init-from", default=None,
                     help="start from the EMA weights of another DiT run folder (progressive training: e.g. 17 "
                          "frames first, then 33); optimiser and schedule start fresh")
    _add_common(dit)

    exp = sub.add_parser("export", help="write a flat model folder from a DiT run (fp16 EMA weights + the VAE)")
    exp.add_argument("--dit", required=True, help="the DiT run folder")
    exp.add_argument("--out", required=True, help="model folder to write")
    exp.add_argument("--data", default=None, help="latent cache (default: the one recorded in the DiT run)")
    exp.add_argument("--vae", default=None, metavar="PATH",
                     help="export this VAE instead of the latent cache's: a decoder fine-tune (vae --freeze-encoder) "
                          "whose encoder is the cache's")
    exp.add_argument("--max-mb", type=float, default=25.0, help="size limit of VAE + transformer in MB (1e6 bytes)")
    exp.add_argument("--no-ema", action="store_true", help="export the raw weights instead of the EMA")
    exp.add_argument("--overwrite", action="store_true", help="replace an existing folder")
    _add_common(exp)

    from .lora_cli import add_prepare_arguments, add_train_arguments

    add_prepare_arguments(sub.add_parser("lora-prepare", help="encode captioned videos into a cache for LoRA training"))
    add_train_arguments(sub.add_parser("lora-train", help="train a LoRA on a frozen model from prepared caches"))
    return parser


def _model_config(value: Optional[str], fallback=None):
    from pathlib import Path

    from .vae import load_model_json

    if value is None:
        return fallback
    if Path(value).suffix == ".json" or Path(value).is_file():
        return load_model_json(value)
    try:
        return get_preset(value)
    except ValueError as err:
        raise InputError(f"--model-config: {err}, or a path to a model.json") from None


def _loop_settings(args):
    from .common import Budget, LoopSettings

    return LoopSettings(
        budget=Budget(args.minutes, args.steps), warmup_steps=args.warmup, cooldown=args.cooldown,
        lr_floor=args.lr_floor, ckpt_every_min=args.ckpt_every_min,
        eval_every_min=args.eval_every_min or None, log_every=args.log_every, resume=args.resume,
        progress=not args.quiet,
    )


def run(args) -> dict:
    from .common import set_threads

    if args.stage in ("lora-prepare", "lora-train"):
        from .lora_cli import run_prepare, run_train

        return run_prepare(args) if args.stage == "lora-prepare" else run_train(args)
    set_threads(args.threads)
    if args.stage == "vae":
        from .common import run_training
        from .vae import DEFAULT_STEP_KINDS, VAETask, VAETrainSettings, parse_step_kinds

        settings = VAETrainSettings(batch=args.batch, ema_decay=args.ema, grad_checkpointing=args.grad_checkpointing,
                                    bf16=args.bf16, seed=args.seed, augment=args.augment,
                                    step_kinds=parse_step_kinds(args.step_kinds) if args.step_kinds
                                    else DEFAULT_STEP_KINDS,
                                    init_from=args.init_from, freeze_encoder=args.freeze_encoder)
        if args.lr is not None:
            settings = dataclasses.replace(settings, lr=args.lr)
        loop = _loop_settings(args)
        task = VAETask(_model_config(args.model_config, TINY_DEMO), args.data, settings)
        return run_training(task, args.out, loop)
    if args.stage == "latents":
        from .latents import build_latent_cache

        cache = build_latent_cache(args.data, args.vae, args.out, batch=args.batch, mirror=not args.no_mirror,
                                   resume=args.resume, progress=not args.quiet)
        return {"out": args.out, "scaling_factor": cache["scaling_factor"], "latent_shape": cache["latent_shape"],
                "rows": {s: v["count"] for s, v in cache["splits"].items()}, "prompts": len(cache["prompts"])}
    if args.stage == "dit":
        from .common import run_training
        from .dit import DiTTask, DiTTrainSettings

        settings = DiTTrainSettings(
            shift=args.shift, ema_decay=args.ema, prompt_dropout=args.prompt_dropout, weight_decay=args.weight_decay,
            grad_checkpointing=args.grad_checkpointing, bf16=args.bf16, eval_videos=args.eval_videos,
            eval_steps=args.eval_steps,
            seed=args.seed, frames=args.frames, init_from=args.init_from,
        )
        if args.lr is not None:
            settings = dataclasses.replace(settings, lr=args.lr)
        if args.batch is not None:
            settings = dataclasses.replace(settings, batch=args.batch)
        loop = _loop_settings(args)
        task = DiTTask(args.data, settings, config=_model_config(args.model_config))
        return run_training(task, args.out, loop)
    from .export import export_model

    if args.max_mb <= 0:
        raise InputError(f"--max-mb must be positive, got {args.max_mb}")
    return export_model(args.dit, args.out, cache_dir=args.data, vae=args.vae, max_bytes=int(args.max_mb * 1e6),
                        use_ema=not args.no_ema, overwrite=args.overwrite)


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        summary = run(args)
    except HunyuanI2VError as err:
        logger.error("%s", err)
        return 2
    sys.stdout.write(json.dumps(summary, indent=1, default=str) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
