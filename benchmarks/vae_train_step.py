"""One VAE training step of the bundled model's VAE (issue 4's recipe): the step kinds of the VAE stage, timed
with and without the single-frame fold (a 1-frame input's causal conv as one temporal tap) and with and without
bf16 autocast (``train vae --bf16``); a table of seconds per step, the speed-ups, and the recipe mix's average::

    python benchmarks/vae_train_step.py --rounds 6

"Padded" restores the plain computation (replicate-pad kt-1 copies of the frame, then the 3x3x3 conv), so both
columns run in the same process on the same weights and inputs. ``--also channels-last,compile`` adds columns for
the folded bf16 step with the weights and inputs in channels-last (NDHWC) memory format, and with the encoder and
decoder through ``torch.compile`` (inductor; each step kind compiles once, minutes per kind on a 2-core CPU, outside
the timing), each with its speed against the plain folded bf16 step.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F

from hunyuan_i2v.config import TINY_DEMO
from hunyuan_i2v.model.vae import CausalConv3d, CausalVAE
from hunyuan_i2v.train.vae import DEFAULT_STEP_KINDS

FOLDED = (CausalConv3d.pad, CausalConv3d.run)


def _padded_pad(self, x):
    return F.pad(x, self.padding, mode="replicate") if any(self.padding) else x


def _padded_run(self, h):
    return self.conv(h)


def use_fold(on: bool) -> None:
    CausalConv3d.pad, CausalConv3d.run = FOLDED if on else (_padded_pad, _padded_run)


def step_seconds(vae, opt, frames: int, batch: int, size: int, bf16: bool, rounds: int,
                 memory_format=torch.contiguous_format) -> float:
    def step():
        x = (torch.rand(batch, 3, frames, size, size) * 2 - 1).contiguous(memory_format=memory_format)
        with torch.autocast("cpu", torch.bfloat16, enabled=bf16):
            recon, _ = vae(x, sample_posterior=True)
        loss = (recon.float() - x).abs().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    step()  # warm-up (and, for a compiled model, the compilation of this shape)
    step()
    t0 = time.perf_counter()
    for _ in range(rounds):
        step()
    return (time.perf_counter() - t0) / rounds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rounds", type=int, default=6)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--also", default="", help="extra folded + bf16 columns: channels-last, compile (comma-separated)")
    args = ap.parse_args()
    extras = [e for e in args.also.split(",") if e]
    unknown = sorted(set(extras) - {"channels-last", "compile"})
    if unknown:
        ap.error(f"--also: unknown column(s) {', '.join(unknown)} (choose from channels-last, compile)")
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    vae = CausalVAE(TINY_DEMO.vae).train()
    opt = torch.optim.AdamW(vae.parameters(), lr=1e-5)
    compiled = None
    if "compile" in extras:  # its own copy (same weights), so that the other columns run eagerly
        compiled = copy.deepcopy(vae)
        compiled.encoder.compile(dynamic=False)
        compiled.decoder.compile(dynamic=False)
        compiled_opt = torch.optim.AdamW(compiled.parameters(), lr=1e-5)
    configs = [("padded", False, False), ("folded", True, False), ("folded + bf16", True, True)]
    names = [n for n, _, _ in configs] + [f"bf16 + {e}" for e in extras]
    print(f"VAE {TINY_DEMO.vae.block_out_channels}, {args.size}x{args.size}, {args.threads} threads, "
          f"{args.rounds} steps per cell")
    print("| frames x batch | recipe weight | " + " | ".join(f"{n} s" for n in names) + " | fold | fold + bf16 |"
          + "".join(f" {e} |" for e in extras))
    print("|---|---|" + "---|" * (len(names) + 2 + len(extras)))
    mix = [0.0] * len(names)

    def ratios(secs):
        return [secs[0] / secs[1], secs[0] / secs[2]] + [secs[2] / s for s in secs[3:]]

    for kind in DEFAULT_STEP_KINDS:
        secs = []
        for _, fold, bf16 in configs:
            use_fold(fold)
            secs.append(step_seconds(vae, opt, kind.frames, kind.batch, args.size, bf16, args.rounds))
        use_fold(True)
        for extra in extras:
            if extra == "channels-last":
                vae.to(memory_format=torch.channels_last_3d)
                secs.append(step_seconds(vae, opt, kind.frames, kind.batch, args.size, True, args.rounds,
                                         torch.channels_last_3d))
                vae.to(memory_format=torch.contiguous_format)
            else:
                secs.append(step_seconds(compiled, compiled_opt, kind.frames, kind.batch, args.size, True,
                                         args.rounds))
        mix = [m + kind.weight * s for m, s in zip(mix, secs)]
        print(f"| {kind.frames} x {kind.batch} | {kind.weight:.2f} | " + " | ".join(f"{s:.3f}" for s in secs)
              + " | " + " | ".join(f"{r:.2f}x" for r in ratios(secs)) + " |", flush=True)
    total = sum(k.weight for k in DEFAULT_STEP_KINDS)
    mix = [m / total for m in mix]
    print("| recipe mix | 1.00 | " + " | ".join(f"{m:.3f}" for m in mix)
          + " | " + " | ".join(f"{r:.2f}x" for r in ratios(mix)) + " |")


if __name__ == "__main__":
    main()
