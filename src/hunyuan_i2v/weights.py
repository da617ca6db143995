"""Checkpoint formats: detect, load, save and convert transformer and VAE weights (spec sections 1.9, 1.10, 3.3).

Formats understood, for the transformer:

- ``official-pt``: Tencent's ``mp_rank_00_model_states.pt``, a torch pickle with the weights under ``"module"``
  (``"ema"``, ``"model"``, ``"state_dict"`` wrappers and a bare state dict are accepted too). Read with
  ``weights_only=True`` (never unpickles code) and ``mmap=True`` (tensors stay in the page cache).
- ``diffusers-folder``: a ``HunyuanVideoTransformer3DModel`` folder (``config.json`` + one or sharded
  ``diffusion_pytorch_model*.safetensors``), or a model root holding ``transformer/``.
- ``safetensors`` / ``safetensors-sharded``: plain safetensors in either naming; the files we write carry the
  config in their metadata.

Loading builds the model on the meta device, compares every key and shape with the checkpoint first (a mismatch
is a :class:`CheckpointError` naming the file and the key, never a silent partial load), then assigns the
checkpoint's tensors to the model (``load_state_dict(assign=True)``), so the weights exist once in memory.
The official <-> diffusers key map lives in :mod:`hunyuan_i2v.keymap`; VAE keys are the same in both (spec 3.3).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping, Optional, Sequence, Union

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor, nn
from tqdm.auto import tqdm

from .config import TransformerConfig, VAEConfig
from .errors import CheckpointError, ModelFilesError
from .keymap import detect_naming, diffusers_to_official, official_to_diffusers
from .model.transformer import HunyuanVideoTransformer

logger = logging.getLogger(__name__)

PathLike = Union[str, os.PathLike]

OFFICIAL_TRANSFORMER_FILE = "mp_rank_00_model_states.pt"
OFFICIAL_VAE_FILE = "pytorch_model.pt"
OFFICIAL_MODEL_DIR = "hunyuan-video-i2v-720p"  # below the ckpts root (spec 1.10)
DIFFUSERS_WEIGHTS_NAME = "diffusion_pytorch_model"
CONFIG_FILE = "config.json"
WRAPPER_KEYS = ("module", "ema", "model", "state_dict")  # tried in this order, one level deep
METADATA_CONFIG_KEY = "config"  # safetensors metadata entry holding the diffusers-style config (json)
DEFAULT_MAX_SHARD_SIZE = 10 * 10**9  # like diffusers' save_pretrained ("10GB")

TRANSFORMER_CLASS = "HunyuanVideoTransformer3DModel"
VAE_CLASS_DIFFUSERS = "AutoencoderKLHunyuanVideo"
VAE_CLASS_OFFICIAL = "AutoencoderKLCausal3D"

CHECKPOINT_KINDS = ("official-pt", "diffusers-folder", "safetensors", "safetensors-sharded")

_SAFETENSORS_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}


# ---------------------------------------------------------------------------------------------
# Detection


@dataclass
class CheckpointInfo:
    """What :func:`detect_checkpoint` found: the format, the key naming, the weight files and any config."""

    kind: str  # one of CHECKPOINT_KINDS
    naming: str  # "official" | "diffusers"
    files: list[Path]
    config: Optional[dict] = None  # diffusers-style config (config.json or safetensors metadata)
    location: Optional[Path] = None  # what the user pointed at, for messages

    @property
    def name(self) -> str:
        """The file (or folder, for several files) that error messages name."""
        return str(self.files[0] if len(self.files) == 1 else self.files[0].parent)


def detect_checkpoint(path: PathLike, *, load_key: Optional[str] = None) -> CheckpointInfo:
    """Find the transformer weights at ``path`` and tell their format and key naming.

    ``path`` may be a weight file (``.pt``/``.pth``/``.bin``, ``.safetensors``, a ``*.safetensors.index.json``),
    a transformer folder, a diffusers model root (with ``transformer/``) or the official ckpts root.
    """
    files, kind, config = _locate_transformer(Path(path))
    with _open_reader(files, kind, load_key) as reader:
        naming = _naming(reader.keys(), reader.name)
        if config is None:
            config = reader.metadata_config()
    return CheckpointInfo(kind=kind, naming=naming, files=files, config=config, location=Path(path))


def _locate_transformer(path: Path) -> tuple[list[Path], str, Optional[dict]]:
    if not path.exists():
        raise ModelFilesError(f"{path}: no such file or folder; point to a transformer checkpoint "
                              f"(e.g. ckpts/{OFFICIAL_MODEL_DIR}/transformers/{OFFICIAL_TRANSFORMER_FILE})")
    if path.is_file():
        return _locate_file(path)
    config_json = path / CONFIG_FILE
    diffusers_files = _safetensors_in(path, DIFFUSERS_WEIGHTS_NAME)
    if config_json.is_file() and diffusers_files:
        config = _read_json(config_json)
        cls = config.get("_class_name")
        if cls not in (None, TRANSFORMER_CLASS):
            raise CheckpointError(f"{config_json}: describes a {cls}, not a {TRANSFORMER_CLASS}; "
                                  "point to the transformer folder of the model")
        return diffusers_files, "diffusers-folder", config
    if (path / "transformer").is_dir():  # a diffusers model root
        return _locate_transformer(path / "transformer")
    for candidate in (path / OFFICIAL_TRANSFORMER_FILE, path / "transformers" / OFFICIAL_TRANSFORMER_FILE,
                      path / OFFICIAL_MODEL_DIR / "transformers" / OFFICIAL_TRANSFORMER_FILE):  # official layouts
        if candidate.is_file():
            return [candidate], "official-pt", None
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) == 1:
        return _locate_file(indexes[0])
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return _locate_file(singles[0])
    raise ModelFilesError(
        f"{path}: found no transformer weights; expected {OFFICIAL_TRANSFORMER_FILE}, a diffusers folder "
        f"({CONFIG_FILE} + {DIFFUSERS_WEIGHTS_NAME}.safetensors), a transformer/ subfolder, or one .safetensors file")


def _locate_file(path: Path) -> tuple[list[Path], str, Optional[dict]]:
    name = path.name
    if name.endswith(".safetensors.index.json"):
        return _shards_from_index(path), "safetensors-sharded", None
    if name.endswith(".safetensors"):
        return [path], "safetensors", None
    if path.suffix in (".pt", ".pth", ".bin", ".ckpt"):
        return [path], "official-pt", None
    raise CheckpointError(f"{path}: unknown checkpoint file type; use a .pt/.pth torch file or a .safetensors file")


def _safetensors_in(folder: Path, basename: str) -> list[Path]:
    index = folder / f"{basename}.safetensors.index.json"
    if index.is_file():
        return _shards_from_index(index)
    single = folder / f"{basename}.safetensors"
    return [single] if single.is_file() else []


def _shards_from_index(index: Path) -> list[Path]:
    weight_map = _read_json(index).get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: has no weight_map; re-download or re-save the sharded checkpoint")
    files = [index.parent / f for f in dict.fromkeys(weight_map.values())]
    missing = [f for f in files if not f.is_file()]
    if missing:
        raise ModelFilesError(f"{index}: lists shard {missing[0].name}, which is missing "
                              f"({len(missing)} of {len(files)} shards missing); download the missing shards")
    return files


def _read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: unreadable json ({e}); re-download or re-create the file") from None
    if not isinstance(data, dict):
        raise CheckpointError(f"{path}: expected a json object, found {type(data).__name__}")
    return data


def _naming(keys: Iterable[str], where: str) -> str:
    try:
        return detect_naming(keys)
    except ValueError:
        raise CheckpointError(f"{where}: not a HunyuanVideo transformer checkpoint (neither official nor diffusers "
                              "key names); check that the path points at the transformer weights") from None


# ---------------------------------------------------------------------------------------------
# Reading tensors lazily


class _Reader:
    """Lazy, uniform access to the tensors of one checkpoint, whether a torch pickle or safetensors shards."""

    def __init__(self, name: str):
        self.name = name
        self._where: dict[str, tuple[object, str, Path]] = {}  # key -> (handle, key in the file, file)
        self._metadata: dict[str, str] = {}

    def __enter__(self) -> "_Reader":
        return self

    def __exit__(self, *exc) -> None:
        self._where.clear()

    def keys(self) -> list[str]:
        return list(self._where)

    def file_of(self, key: str) -> Path:
        return self._where[key][2]

    def shape(self, key: str) -> tuple[int, ...]:
        handle, k, _ = self._where[key]
        if isinstance(handle, dict):
            return tuple(handle[k].shape)
        return tuple(handle.get_slice(k).get_shape())

    def dtype(self, key: str) -> torch.dtype:
        handle, k, path = self._where[key]
        if isinstance(handle, dict):
            return handle[k].dtype
        code = handle.get_slice(k).get_dtype()
        if code not in _SAFETENSORS_DTYPES:
            raise CheckpointError(f"{path}: tensor {key!r} has unsupported dtype {code}")
        return _SAFETENSORS_DTYPES[code]

    def get(self, key: str) -> Tensor:
        handle, k, path = self._where[key]
        if isinstance(handle, dict):
            return handle[k]
        try:
            return handle.get_tensor(k)
        except SafetensorError as e:
            raise CheckpointError(f"{path}: cannot read tensor {key!r} ({e}); the file is truncated or corrupt, "
                                  "download it again") from None

    def shapes(self) -> dict[str, tuple[int, ...]]:
        return {k: self.shape(k) for k in self._where}

    def strip_prefix(self, prefix: str) -> None:
        """Keep only the keys under ``prefix`` and drop it (the official VAE loader's "vae." rule, spec 1.10)."""
        if any(k.startswith(prefix) for k in self._where):
            self._where = {k[len(prefix):]: v for k, v in self._where.items() if k.startswith(prefix)}

    def metadata_config(self) -> Optional[dict]:
        text = self._metadata.get(METADATA_CONFIG_KEY)
        if not text:
            return None
        try:
            config = json.loads(text)
        except json.JSONDecodeError:
            logger.warning("%s: ignoring unreadable config in the safetensors metadata", self.name)
            return None
        return config if isinstance(config, dict) else None


def _open_reader(files: Sequence[Path], kind: str, load_key: Optional[str] = None) -> _Reader:
    name = str(files[0] if len(files) == 1 else files[0].parent)
    reader = _Reader(name)
    if kind == "official-pt":
        (path,) = files
        sd = _unwrap_state_dict(_torch_load(path), path, load_key)
        reader._where = {k: (sd, k, path) for k in sd}
        return reader
    for path in files:
        try:
            handle = safe_open(str(path), framework="pt", device="cpu")
            keys = list(handle.keys())
            reader._metadata.update(handle.metadata() or {})
        except (SafetensorError, OSError) as e:
            raise CheckpointError(f"{path}: not a readable safetensors file ({e}); it is truncated or corrupt, "
                                  "download it again") from None
        for k in keys:
            if k in reader._where:
                raise CheckpointError(f"{path}: tensor {k!r} is also in {reader._where[k][2]}; remove the stray shard")
            reader._where[k] = (handle, k, path)
    return reader


def _torch_load(path: Path) -> object:
    """torch.load that never runs pickled code (weights_only) and maps the file instead of reading it (mmap)."""
    try:
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError as e:
            if "mmap can only be used" not in str(e):
                raise
            # Legacy (pre-zip) torch files cannot be mapped: read them whole, still without running code.
            logger.warning("%s: legacy torch format, reading it into memory (no mmap)", path)
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        if "weights only load failed" in str(e).lower():
            raise CheckpointError(
                f"{path}: holds Python objects other than tensors, which a safe load (weights_only=True) refuses; "
                "if you trust the file, re-save its state dict as a plain dict of tensors or as safetensors"
            ) from None
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(e)}); "
                              "the file is truncated or corrupt, download it again") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path}: not a readable torch checkpoint ({_first_line(e)}); "
                              "the file is truncated or corrupt, download it again") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip().splitlines()
    return f"{type(e).__name__}: {text[0] if text else ''}"


def _unwrap_state_dict(obj: object, path: Path, load_key: Optional[str] = None) -> dict[str, Tensor]:
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: holds a {type(obj).__name__}, not a state dict; "
                              "save weights with torch.save(model.state_dict(), path)")
    if load_key is not None:
        if load_key not in obj:
            raise CheckpointError(f"{path}: has no {load_key!r} entry (top-level keys: {_preview(obj)}); "
                                  "choose another load_key")
        obj = obj[load_key]
    else:
        for key in WRAPPER_KEYS:
            if isinstance(obj.get(key), dict):
                obj = obj[key]
                break
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: the weights entry is a {type(obj).__name__}, not a state dict")
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, Tensor):
            raise CheckpointError(f"{path}: not a state dict: entry {k!r} is a {type(v).__name__}, not a tensor "
                                  f"(top-level keys: {_preview(obj)}); pass load_key= to pick the weights entry")
    return obj


def _preview(d: dict, n: int = 5) -> str:
    keys = [repr(k) for k in list(d)[:n]]
    return ", ".join(keys) + (", ..." if len(d) > n else "")


# ---------------------------------------------------------------------------------------------
# Transformer config


_DIFFUSERS_TRANSFORMER_DEFAULTS = {  # HunyuanVideoTransformer3DModel.__init__ defaults (diffusers-peer.md section 2)
    "in_channels": 16, "out_channels": 16, "num_attention_heads": 24, "attention_head_dim": 128,
    "num_layers": 20, "num_single_layers": 40, "num_refiner_layers": 2, "mlp_ratio": 4.0, "patch_size": 2,
    "patch_size_t": 1, "qk_norm": "rms_norm", "guidance_embeds": True, "text_embed_dim": 4096,
    "pooled_projection_dim": 768, "rope_theta": 256.0, "rope_axes_dim": (16, 56, 56), "image_condition_type": None,
}
OFFICIAL_ROPE_AXES_DIM = (16, 56, 56)  # for head_dim 128 (spec 1.1, 1.8)


def _block_count(keys: Iterable[str], prefix: str) -> int:
    pattern = re.compile(re.escape(prefix) + r"(\d+)\.")
    indices = [int(m.group(1)) for k in keys if (m := pattern.match(k))]
    return max(indices) + 1 if indices else 0


def _as_shape(v) -> tuple[int, ...]:
    return tuple(v.shape) if hasattr(v, "shape") else tuple(int(x) for x in v)


def transformer_config_from_state_dict(
    shapes: Mapping[str, Union[Tensor, Sequence[int]]],
    rope_axes_dim: Optional[Sequence[int]] = None,
    rope_theta: float = 256.0,
) -> TransformerConfig:
    """Infer the transformer config from a state dict's shapes (tensors, meta tensors or shape tuples).

    Either naming works. RoPE is not visible in the weights: it defaults to the official (16, 56, 56) when
    head_dim is 128; for other widths pass ``rope_axes_dim``. ``condition_type`` is ``latent_concat`` when
    in_channels == 2 * out + 1 (noisy + image latent + mask, spec 1.1), else ``token_replace``.
    """
    shapes = {k: _as_shape(v) for k, v in shapes.items()}
    if _naming(shapes, "state dict") == "diffusers":
        meta = {k: torch.empty(s, device="meta") for k, s in shapes.items()}
        try:
            shapes = {k: tuple(v.shape) for k, v in diffusers_to_official(meta).items()}
        except KeyError as e:
            raise CheckpointError(f"cannot read the diffusers state dict: {e.args[0]}") from None

    def get(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"cannot infer the transformer config: key {key!r} is missing")
        return shapes[key]

    hidden, in_channels, pt, ph, pw = get("img_in.proj.weight")
    depth_double = _block_count(shapes, "double_blocks.")
    depth_single = _block_count(shapes, "single_blocks.")
    if depth_double:
        head_dim = get("double_blocks.0.img_attn_q_norm.weight")[0]
        mlp_hidden = get("double_blocks.0.img_mlp.fc1.weight")[0]
    elif depth_single:
        head_dim = get("single_blocks.0.q_norm.weight")[0]
        mlp_hidden = get("single_blocks.0.linear1.weight")[0] - 3 * hidden
    else:
        raise CheckpointError("cannot infer the transformer config: the state dict has no double or single blocks")
    if hidden % head_dim:
        raise CheckpointError(f"cannot infer the transformer config: hidden size {hidden} is not a multiple of "
                              f"the q-norm size {head_dim}")
    patch_values = get("final_layer.linear.weight")[0]
    out_channels = patch_values // (pt * ph * pw)
    if rope_axes_dim is None:
        if head_dim != sum(OFFICIAL_ROPE_AXES_DIM):
            raise CheckpointError(
                f"cannot infer rope_axes_dim for head_dim {head_dim} (only 128 -> {OFFICIAL_ROPE_AXES_DIM} is "
                "known); pass rope_axes_dim=(t, h, w) summing to head_dim, or a full TransformerConfig")
        rope_axes_dim = OFFICIAL_ROPE_AXES_DIM
    return TransformerConfig(
        in_channels=in_channels,
        out_channels=out_channels,
        hidden_size=hidden,
        num_heads=hidden // head_dim,
        depth_double=depth_double,
        depth_single=depth_single,
        mlp_ratio=mlp_hidden / hidden,
        patch_size=(pt, ph, pw),
        rope_axes_dim=tuple(int(d) for d in rope_axes_dim),
        rope_theta=float(rope_theta),
        text_states_dim=get("txt_in.input_embedder.weight")[1],
        text_states_dim_2=get("vector_in.in_layer.weight")[1],
        refiner_depth=_block_count(shapes, "txt_in.individual_token_refiner.blocks."),
        guidance_embed=any(k.startswith("guidance_in.") for k in shapes),
        condition_type="latent_concat" if in_channels == 2 * out_channels + 1 else "token_replace",
    )


def transformer_config_from_diffusers(config: Mapping) -> TransformerConfig:
    """A :class:`TransformerConfig` from a diffusers ``HunyuanVideoTransformer3DModel`` config.json dict."""
    cls = config.get("_class_name")
    if cls not in (None, TRANSFORMER_CLASS):
        raise CheckpointError(f"config describes a {cls}, not a {TRANSFORMER_CLASS}")
    c = {**_DIFFUSERS_TRANSFORMER_DEFAULTS, **{k: v for k, v in config.items() if not k.startswith("_")}}
    if c["qk_norm"] != "rms_norm":
        raise CheckpointError(f"unsupported qk_norm {c['qk_norm']!r}: HunyuanVideo uses 'rms_norm'")
    if c["image_condition_type"] not in (None, "token_replace", "latent_concat"):
        raise CheckpointError(f"unknown image_condition_type {c['image_condition_type']!r}")
    try:
        return TransformerConfig(
            in_channels=int(c["in_channels"]),
            out_channels=int(c["out_channels"] if c["out_channels"] is not None else c["in_channels"]),
            hidden_size=int(c["num_attention_heads"]) * int(c["attention_head_dim"]),
            num_heads=int(c["num_attention_heads"]),
            depth_double=int(c["num_layers"]),
            depth_single=int(c["num_single_layers"]),
            mlp_ratio=float(c["mlp_ratio"]),
            patch_size=(int(c["patch_size_t"]), int(c["patch_size"]), int(c["patch_size"])),
            rope_axes_dim=tuple(int(d) for d in c["rope_axes_dim"]),
            rope_theta=float(c["rope_theta"]),
            text_states_dim=int(c["text_embed_dim"]),
            text_states_dim_2=int(c["pooled_projection_dim"]),
            refiner_depth=int(c["num_refiner_layers"]),
            guidance_embed=bool(c["guidance_embeds"]),
            condition_type=c["image_condition_type"],
        )
    except (TypeError, ValueError) as e:
        raise CheckpointError(f"invalid transformer config.json: {e}") from None


def transformer_config_to_diffusers(config: TransformerConfig) -> dict:
    """The diffusers ``HunyuanVideoTransformer3DModel`` config.json dict for ``config``."""
    pt, ph, pw = config.patch_size
    if ph != pw:
        raise ValueError(f"diffusers needs a square spatial patch, got patch_size {config.patch_size}")
    return {
        "_class_name": TRANSFORMER_CLASS,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "num_attention_heads": config.num_heads,
        "attention_head_dim": config.head_dim,
        "num_layers": config.depth_double,
        "num_single_layers": config.depth_single,
        "num_refiner_layers": config.refiner_depth,
        "mlp_ratio": config.mlp_ratio,
        "patch_size": ph,
        "patch_size_t": pt,
        "qk_norm": "rms_norm",
        "guidance_embeds": config.guidance_embed,
        "text_embed_dim": config.text_states_dim,
        "pooled_projection_dim": config.text_states_dim_2,
        "rope_theta": config.rope_theta,
        "rope_axes_dim": list(config.rope_axes_dim),
        "image_condition_type": config.condition_type,
    }


# ---------------------------------------------------------------------------------------------
# Shared loading machinery


def fit_problems(
    expected: Mapping[str, Tensor],
    keys: Sequence[str],
    shape_of: Callable[[str], tuple],
    file_of: Optional[Callable[[str], str]] = None,
) -> tuple[list[str], Optional[str]]:
    """Keys and shapes of a model (``expected``) against a checkpoint's ``keys``: (problems, the first offending
    checkpoint key). ``problems`` is empty when they fit; each names a count and the first key, and ``file_of``
    (when given) adds the file a checkpoint key is in."""
    found = set(keys)
    missing = [k for k in expected if k not in found]
    unexpected = [k for k in keys if k not in expected]
    mismatched = [k for k in keys if k in expected and tuple(shape_of(k)) != tuple(expected[k].shape)]
    where = (lambda k: f" (in {file_of(k)})") if file_of is not None else (lambda k: "")
    problems = []
    if mismatched:
        k = mismatched[0]
        problems.append(f"{len(mismatched)} shape mismatch(es), first {k!r}: checkpoint {list(shape_of(k))} "
                        f"vs model {list(expected[k].shape)}{where(k)}")
    if missing:
        problems.append(f"{len(missing)} missing key(s), first {missing[0]!r}")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected key(s), first {unexpected[0]!r}{where(unexpected[0])}")
    return problems, (mismatched or unexpected or [None])[0]


def _check_fit(expected: Mapping[str, Tensor], reader: _Reader, what: str, remedy: str) -> None:
    """Compare keys and shapes before loading; one error that names the file, the first bad key and the counts."""
    problems, first = fit_problems(expected, reader.keys(), reader.shape, reader.file_of)
    if not problems:
        return
    first_file = reader.file_of(first) if first is not None else reader.name
    raise CheckpointError(f"{first_file}: does not fit the {what}: " + "; ".join(problems) + f"; {remedy}")


def _majority_dtype(reader: _Reader) -> torch.dtype:
    """The floating dtype holding most of the checkpoint's elements (its storage dtype)."""
    totals: dict[torch.dtype, int] = {}
    for k in reader.keys():
        dt = reader.dtype(k)
        if dt.is_floating_point:
            n = 1
            for s in reader.shape(k):
                n *= s
            totals[dt] = totals.get(dt, 0) + n
    return max(totals, key=totals.get) if totals else torch.float32


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t.to(dtype) if t.is_floating_point() and t.dtype != dtype else t


def _group_keys(keys: Iterable[str]) -> list[list[str]]:
    """Group keys by their block (the prefix up to the first numeric component) so fused tensors meet."""
    groups: dict[str, list[str]] = {}
    for k in keys:
        m = re.match(r"(.*?\.\d+\.)", k)
        groups.setdefault(m.group(1) if m else "", []).append(k)
    return list(groups.values())


def _convert_stream(
    keys: Sequence[str],
    get: Callable[[str], Tensor],
    src_naming: str,
    dst_naming: str,
    hidden_probe: Optional[Tensor] = None,
) -> Iterator[tuple[str, Tensor]]:
    """Yield (key, tensor) in ``dst_naming``, one block at a time, so only one block's split/fused copies exist."""
    if src_naming == dst_naming:
        for k in keys:
            yield k, get(k)
        return
    probe_key = "img_in.proj.weight"
    for group in _group_keys(keys):
        sd = {k: get(k) for k in group}
        if src_naming == "diffusers":
            yield from diffusers_to_official(sd).items()
            continue
        # official_to_diffusers reads the hidden size from img_in (to split single-block linear1): lend it a meta
        # stand-in for groups that lack it and drop what the stand-in turns into.
        lend = probe_key not in sd
        out = official_to_diffusers({probe_key: hidden_probe, **sd} if lend else sd)
        lent = set(official_to_diffusers({probe_key: hidden_probe})) if lend else set()
        for k, v in out.items():
            if k not in lent:
                yield k, v


def _assign_load(model: nn.Module, items: Iterable[tuple[str, Tensor]], dtype: torch.dtype, where: str,
                 total: int) -> None:
    sd: dict[str, Tensor] = {}
    for k, t in tqdm(items, total=total, desc=f"loading {Path(where).name}", unit="tensor", leave=False,
                     disable=None):
        sd[k] = _cast(t, dtype)
    model.load_state_dict(sd, strict=True, assign=True)
    stale = [n for n, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    assert not stale, f"parameters left on the meta device after loading: {stale[:3]}"


# ---------------------------------------------------------------------------------------------
# Transformer loading


def _transformer_config_for(info: CheckpointInfo, reader: _Reader) -> TransformerConfig:
    if info.config is not None:
        return transformer_config_from_diffusers(info.config)
    try:
        return transformer_config_from_state_dict(reader.shapes())
    except CheckpointError as e:
        raise CheckpointError(f"{info.name}: {e}") from None


def read_transformer_config(path: PathLike, *, load_key: Optional[str] = None) -> TransformerConfig:
    """The TransformerConfig of a checkpoint (config.json / metadata, else the shapes), without loading weights."""
    info = detect_checkpoint(path, load_key=load_key)
    with _open_reader(info.files, info.kind, load_key) as reader:
        return _transformer_config_for(info, reader)


def load_transformer(
    path: PathLike,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    config: Optional[TransformerConfig] = None,
    *,
    load_key: Optional[str] = None,
) -> HunyuanVideoTransformer:
    """Load a HunyuanVideo(-I2V) transformer from any supported format (see :func:`detect_checkpoint`).

    ``config``: the model config; default from config.json / safetensors metadata, else inferred from the shapes.
    ``dtype``: default the checkpoint's storage dtype. ``device``: moved there at the end (default CPU).
    ``load_key``: the entry of a torch pickle holding the weights (default: module, ema, model, state_dict).
    """
    info = detect_checkpoint(path, load_key=load_key)
    with _open_reader(info.files, info.kind, load_key) as reader:
        if config is None:
            config = _transformer_config_for(info, reader)
        logger.info("loading transformer from %s (%s, %s naming, %d tensors)", info.name, info.kind, info.naming,
                    len(reader.keys()))
        model = HunyuanVideoTransformer(config, device="meta")
        official = model.state_dict()
        expected = official_to_diffusers(official) if info.naming == "diffusers" else official
        _check_fit(expected, reader, "transformer config",
                   "check that the file is a HunyuanVideo(-I2V) transformer and that the config matches it "
                   "(in_channels 16 vs 33, guidance_embed, depths)")
        dtype = dtype or _majority_dtype(reader)
        items = _convert_stream(reader.keys(), reader.get, info.naming, "official")
        _assign_load(model, items, dtype, info.name, total=len(official))
    if device is not None:
        model.to(device)
    return model.eval()


# ---------------------------------------------------------------------------------------------
# Writing


def _owned(t: Tensor) -> Tensor:
    """A contiguous tensor that owns exactly its storage (split views would drag their siblings along)."""
    if t.is_meta:
        raise ValueError("cannot save tensors on the meta device; load or initialise the weights first")
    t = t.detach()
    if t.device.type != "cpu":
        t = t.cpu()
    if not t.is_contiguous() or t.untyped_storage().nbytes() != t.numel() * t.element_size():
        t = t.contiguous().clone()
    return t


def _parse_size(size: Union[int, str]) -> int:
    if isinstance(size, int):
        return size
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMGT]?)(i?)B\s*", size.upper().replace("IB", "iB"))
    if not m:
        raise ValueError(f"bad size {size!r}; use bytes or a string like '10GB' or '500MiB'")
    base = 1024 if m.group(3) else 1000
    return int(float(m.group(1)) * base ** " KMGT".index(m.group(2) or " "))


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def _atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Write through a temporary file in the same folder, then rename: a failed write leaves no half file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(path)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def _write_json(path: Path, data: dict) -> None:
    def write(tmp: Path) -> None:
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(data, f, indent=2, sort_keys=False)
            f.write("\n")
    _atomic(path, write)


def _save_safetensors(tensors: dict[str, Tensor], path: Path, metadata: dict[str, str]) -> None:
    _atomic(path, lambda tmp: save_file(tensors, str(tmp), metadata=metadata))


def _save_torch(obj: object, path: Path) -> None:
    _atomic(path, lambda tmp: torch.save(obj, tmp))


def _write_sharded(items: Iterable[tuple[str, Tensor]], folder: Path, basename: str, max_shard_size: int,
                   metadata: dict[str, str]) -> list[Path]:
    """HF-style safetensors shards + index json, holding at most one shard in memory; returns the files."""
    folder.mkdir(parents=True, exist_ok=True)
    stale = set(folder.glob(f"{basename}*.safetensors")) | set(folder.glob(f"{basename}.safetensors.index.json"))
    tmps: list[tuple[Path, list[str]]] = []
    shard: dict[str, Tensor] = {}
    size = total = 0

    def flush() -> None:
        tmp = folder / f".{basename}.part{len(tmps)}.tmp{os.getpid()}"
        save_file(shard, str(tmp), metadata=metadata)
        tmps.append((tmp, list(shard)))
        shard.clear()

    try:
        for k, t in items:
            t = _owned(t)
            n = t.numel() * t.element_size()
            if shard and size + n > max_shard_size:
                flush()
                size = 0
            shard[k] = t
            size += n
            total += n
        if shard or not tmps:
            flush()
        if len(tmps) == 1:
            names = [f"{basename}.safetensors"]
        else:
            names = [f"{basename}-{i + 1:05d}-of-{len(tmps):05d}.safetensors" for i in range(len(tmps))]
        for (tmp, _), name in zip(tmps, names):
            os.replace(tmp, folder / name)
        written = [folder / n for n in names]
        if len(tmps) > 1:
            weight_map = {k: name for (_, keys), name in zip(tmps, names) for k in keys}
            index = folder / f"{basename}.safetensors.index.json"
            _write_json(index, {"metadata": {"total_size": total}, "weight_map": weight_map})
            written.append(index)
    finally:
        for tmp, _ in tmps:
            if tmp.exists():
                tmp.unlink()
    for old in stale - set(written):
        old.unlink()  # shards of an earlier save that the new index no longer lists
    return written


def _write_checkpoint(items: Iterable[tuple[str, Tensor]], dest: Path, format: str, config_dict: Optional[dict],
                      max_shard_size: int) -> Path:
    metadata = {"format": "pt"}
    if config_dict is not None:
        metadata[METADATA_CONFIG_KEY] = json.dumps(config_dict)
    if format == "official-pt":
        _save_torch({"module": {k: _owned(t) for k, t in items}}, dest)
    elif format == "safetensors":
        _save_safetensors({k: _owned(t) for k, t in items}, dest, metadata)
    elif format == "diffusers":
        assert config_dict is not None
        _write_sharded(items, dest, DIFFUSERS_WEIGHTS_NAME, max_shard_size, {"format": "pt"})
        _write_json(dest / CONFIG_FILE, config_dict)
    else:
        raise ValueError(f"unknown format {format!r}; choose official-pt, diffusers or safetensors")
    return dest


def _check_format(format: str, naming: Optional[str]) -> str:
    if format not in ("official-pt", "diffusers", "safetensors"):
        raise ValueError(f"unknown format {format!r}; choose official-pt, diffusers or safetensors")
    naming = naming or ("diffusers" if format == "diffusers" else "official")
    if naming not in ("official", "diffusers"):
        raise ValueError(f"unknown naming {naming!r}; choose official or diffusers")
    if format == "diffusers" and naming != "diffusers":
        raise ValueError("a diffusers folder uses diffusers key names; drop naming= or use format='safetensors'")
    return naming


def save_transformer(
    model_or_state_dict: Union[nn.Module, Mapping[str, Tensor]],
    dest: PathLike,
    format: str = "official-pt",
    naming: Optional[str] = None,
    *,
    config: Optional[TransformerConfig] = None,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
) -> Path:
    """Save transformer weights (official names in, any format out); every file is written atomically.

    format: ``official-pt`` (``{"module": sd}``, torch.save), ``diffusers`` (a folder: config.json + safetensors,
    sharded above ``max_shard_size``) or ``safetensors`` (one file, config in its metadata).
    naming: key names of the output (default: official, diffusers for the diffusers folder).
    """
    naming = _check_format(format, naming)
    if isinstance(model_or_state_dict, nn.Module):
        sd = model_or_state_dict.state_dict()
        config = config or getattr(model_or_state_dict, "config", None)
    else:
        sd = dict(model_or_state_dict)
    src_naming = _naming(sd, "state dict")
    if config is None:
        try:
            config = transformer_config_from_state_dict(sd)
        except CheckpointError as e:
            if format == "diffusers":
                raise ValueError(f"cannot write config.json: {e}") from None
            logger.warning("saving without a config in the metadata: %s", e)
    config_dict = transformer_config_to_diffusers(config) if config is not None else None
    probe = _hidden_probe(sd, src_naming)
    items = _convert_stream(list(sd), sd.__getitem__, src_naming, naming, probe)
    dest = Path(dest)
    logger.info("saving transformer to %s (%s, %s naming)", dest, format, naming)
    return _write_checkpoint(items, dest, format, config_dict, _parse_size(max_shard_size))


def _hidden_probe(shapes_source: Mapping, naming: str) -> Optional[Tensor]:
    if naming != "official":
        return None
    return torch.empty(_as_shape(shapes_source["img_in.proj.weight"]), device="meta")


def convert_checkpoint(
    src: PathLike,
    dst: PathLike,
    to: str = "diffusers",
    naming: Optional[str] = None,
    *,
    dtype: Optional[torch.dtype] = None,
    config: Optional[TransformerConfig] = None,
    max_shard_size: Union[int, str] = DEFAULT_MAX_SHARD_SIZE,
    load_key: Optional[str] = None,
) -> Path:
    """Convert a transformer checkpoint between formats, tensor by tensor from the (memory-mapped) source.

    Converting to safetensors holds at most one shard (or, for a single file, the output tensors) in memory;
    from an official .pt the source tensors stay in the page cache. ``dtype`` casts on the way (e.g. bf16).
    """
    naming = _check_format(to, naming)
    info = detect_checkpoint(src, load_key=load_key)
    with _open_reader(info.files, info.kind, load_key) as reader:
        shapes = reader.shapes()
        cfg = config or (transformer_config_from_diffusers(info.config) if info.config is not None else None)
        if cfg is None and (to == "diffusers" or _head_dim(shapes) == sum(OFFICIAL_ROPE_AXES_DIM)):
            cfg = _transformer_config_for(info, reader)
        # Without a config (RoPE dims unknown) the output carries none; RoPE has no weights, so any split of
        # head_dim serves the shape check.
        shape_cfg = cfg or transformer_config_from_state_dict(shapes, rope_axes_dim=(_head_dim(shapes), 0, 0))
        official = HunyuanVideoTransformer(shape_cfg, device="meta").state_dict()
        expected = official_to_diffusers(official) if info.naming == "diffusers" else official
        n_out = len(official) if naming == "official" else len(official_to_diffusers(official))
        _check_fit(expected, reader, "transformer config", "check the source checkpoint and config")
        get = reader.get if dtype is None else (lambda k: _cast(reader.get(k), dtype))
        probe = _hidden_probe(shapes, info.naming)
        items = _convert_stream(reader.keys(), get, info.naming, naming, probe)
        items = tqdm(items, total=n_out, desc=f"converting {Path(info.name).name}", unit="tensor",
                     leave=False, disable=None)
        logger.info("converting %s (%s, %s) -> %s (%s, %s)", info.name, info.kind, info.naming, dst, to, naming)
        config_dict = transformer_config_to_diffusers(cfg) if cfg is not None else None
        return _write_checkpoint(items, Path(dst), to, config_dict, _parse_size(max_shard_size))


def _head_dim(shapes: Mapping[str, tuple[int, ...]]) -> int:
    """head_dim from either naming's q-norm weight (only for placeholder RoPE dims)."""
    for k, s in shapes.items():
        if k.endswith(("q_norm.weight", "norm_q.weight")):
            return s[0]
    raise CheckpointError("cannot infer the transformer config: no q-norm weight found")


# ---------------------------------------------------------------------------------------------
# VAE


def _vae_module():
    from .model import vae  # imported late: the VAE module is independent of transformer-only use

    return vae


def vae_config_from_state_dict(shapes: Mapping[str, Union[Tensor, Sequence[int]]],
                               norm_num_groups: Optional[int] = None) -> VAEConfig:
    """Infer a VAEConfig from shapes. GroupNorm's group count is invisible in weights: default 32 (spec 3.1)."""
    shapes = {k: _as_shape(v) for k, v in shapes.items()}

    def get(key: str) -> tuple[int, ...]:
        if key not in shapes:
            raise CheckpointError(f"cannot infer the VAE config: key {key!r} is missing")
        return shapes[key]

    n_blocks = _block_count(shapes, "encoder.down_blocks.")
    if not n_blocks:
        raise CheckpointError("cannot infer the VAE config: no encoder.down_blocks.* keys")
    channels = tuple(get(f"encoder.down_blocks.{i}.resnets.0.conv1.conv.weight")[0] for i in range(n_blocks))
    n_down = sum(any(k.startswith(f"encoder.down_blocks.{i}.downsamplers.") for k in shapes) for i in range(n_blocks))
    groups = norm_num_groups or 32
    if any(c % groups for c in channels):
        raise CheckpointError(f"cannot infer norm_num_groups for channels {channels}; pass a VAEConfig")
    return VAEConfig(
        in_channels=get("encoder.conv_in.conv.weight")[1],
        out_channels=get("decoder.conv_out.conv.weight")[0],
        latent_channels=get("post_quant_conv.weight")[0],
        block_out_channels=channels,
        layers_per_block=_block_count(shapes, "encoder.down_blocks.0.resnets."),
        norm_num_groups=groups,
        spatial_compression=2**n_down,
        # Which downsamplers also stride time is invisible (same 3x3x3 kernels); the official VAE strides time
        # in all but the first (3 -> 4x, spec 3.2).
        temporal_compression=2 ** max(n_down - 1, 0),
        mid_block_add_attention=any(k.startswith("encoder.mid_block.attentions.") for k in shapes),
    )


def vae_config_to_diffusers(config: VAEConfig) -> dict:
    """The diffusers ``AutoencoderKLHunyuanVideo`` config.json dict for ``config``."""
    n = len(config.block_out_channels)
    return {
        "_class_name": VAE_CLASS_DIFFUSERS,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "latent_channels": config.latent_channels,
        "down_block_types": ["HunyuanVideoDownBlock3D"] * n,
        "up_block_types": ["HunyuanVideoUpBlock3D"] * n,
        "block_out_channels": list(config.block_out_channels),
        "layers_per_block": config.layers_per_block,
        "act_fn": "silu",
        "norm_num_groups": config.norm_num_groups,
        "scaling_factor": config.scaling_factor,
        "spatial_compression_ratio": config.spatial_compression,
        "temporal_compression_ratio": config.temporal_compression,
        "mid_block_add_attention": config.mid_block_add_attention,
    }


def vae_config_to_official(config: VAEConfig) -> dict:
    """The official ``vae/config.json`` dict (AutoencoderKLCausal3D, spec 3.1) for ``config``."""
    n = len(config.block_out_channels)
    return {
        "_class_name": VAE_CLASS_OFFICIAL,
        "act_fn": "silu",
        "block_out_channels": list(config.block_out_channels),
        "down_block_types": ["DownEncoderBlockCausal3D"] * n,
        "up_block_types": ["UpDecoderBlockCausal3D"] * n,
        "in_channels": config.in_channels,
        "out_channels": config.out_channels,
        "latent_channels": config.latent_channels,
        "layers_per_block": config.layers_per_block,
        "norm_num_groups": config.norm_num_groups,
        "sample_size": config.tile_sample_size,
        "sample_tsize": config.tile_sample_frames,
        "scaling_factor": config.scaling_factor,
        "time_compression_ratio": config.temporal_compression,
        "mid_block_add_attention": config.mid_block_add_attention,
    }


def _locate_vae(path: Path) -> tuple[list[Path], str, Optional[dict]]:
    if not path.exists():
        raise ModelFilesError(f"{path}: no such file or folder; point to the VAE (e.g. ckpts/{OFFICIAL_MODEL_DIR}/vae)")
    if path.is_file():
        files, kind, _ = _locate_file(path)
        config_json = path.parent / CONFIG_FILE
        return files, kind, _read_json(config_json) if config_json.is_file() and kind == "official-pt" else None
    config_json = path / CONFIG_FILE
    if config_json.is_file():
        if (path / OFFICIAL_VAE_FILE).is_file():
            return [path / OFFICIAL_VAE_FILE], "official-pt", _read_json(config_json)
        files = _safetensors_in(path, DIFFUSERS_WEIGHTS_NAME)
        if files:
            return files, "diffusers-folder", _read_json(config_json)
    for sub in (path / "vae", path / OFFICIAL_MODEL_DIR / "vae"):
        if sub.is_dir():
            return _locate_vae(sub)
    if (path / "model.json").is_file():  # a flat model folder (the demo model's layout) or a VAE training run
        from .layout import resolve_model_files

        flat_vae = resolve_model_files(path).vae
        if flat_vae is not None:
            return _locate_vae(flat_vae)
    singles = sorted(path.glob("*.safetensors"))
    if len(singles) == 1:
        return singles, "safetensors", None
    raise ModelFilesError(f"{path}: found no VAE weights; expected {CONFIG_FILE} + {OFFICIAL_VAE_FILE} (official), "
                          f"{CONFIG_FILE} + {DIFFUSERS_WEIGHTS_NAME}.safetensors (diffusers), or a vae/ subfolder")


def load_vae(
    path: PathLike,
    dtype: Optional[torch.dtype] = None,
    device: Optional[Union[str, torch.device]] = None,
    config: Optional[VAEConfig] = None,
):
    """Load the 3D causal VAE: an official or diffusers ``vae/`` folder, a model root holding one, or a weight file.

    ``config``: default from config.json / safetensors metadata, else inferred from the shapes (spec 3.1 defaults).
    ``dtype``: default the checkpoint's storage dtype (the official pipeline runs the VAE in fp16).
    """
    vae_mod = _vae_module()
    files, kind, config_json = _locate_vae(Path(path))
    with _open_reader(files, kind) as reader:
        reader.strip_prefix("vae.")  # official loader rule (spec 1.10)
        if config is None:
            config_json = config_json or reader.metadata_config()
            if config_json is not None:
                try:
                    config = vae_mod.vae_config_from_dict(config_json)
                except ValueError as e:
                    raise CheckpointError(f"{reader.name}: invalid VAE config ({e})") from None
            else:
                try:
                    config = vae_config_from_state_dict(reader.shapes())
                except CheckpointError as e:
                    raise CheckpointError(f"{reader.name}: {e}") from None
        logger.info("loading VAE from %s (%s, %d tensors)", reader.name, kind, len(reader.keys()))
        with torch.device("meta"):
            model = vae_mod.CausalVAE(config)
        _check_fit(model.state_dict(), reader, "VAE config",
                   "check that the file is the HunyuanVideo 3D VAE and that its config.json matches")
        dtype = dtype or _majority_dtype(reader)
        _assign_load(model, ((k, reader.get(k)) for k in reader.keys()), dtype, reader.name, len(reader.keys()))
    if device is not None:
        model.to(device)
    return model.eval()


def save_vae(vae_or_state_dict, dest: PathLike, format: str = "diffusers", *, config: Optional[VAEConfig] = None
             ) -> Path:
    """Save the VAE. format: ``official`` (folder: config.json + pytorch_model.pt), ``diffusers`` (folder:
    config.json + diffusion_pytorch_model.safetensors) or ``safetensors`` (one file, config in its metadata)."""
    if isinstance(vae_or_state_dict, nn.Module):
        sd = vae_or_state_dict.state_dict()
        config = config or getattr(vae_or_state_dict, "config", None)
    else:
        sd = dict(vae_or_state_dict)
    if config is None:
        config = vae_config_from_state_dict(sd)
    sd = {k: _owned(t) for k, t in sd.items()}
    dest = Path(dest)
    logger.info("saving VAE to %s (%s)", dest, format)
    if format == "official":
        _save_torch(sd, dest / OFFICIAL_VAE_FILE)
        _write_json(dest / CONFIG_FILE, vae_config_to_official(config))
    elif format == "diffusers":
        _save_safetensors(sd, dest / f"{DIFFUSERS_WEIGHTS_NAME}.safetensors", {"format": "pt"})
        _write_json(dest / CONFIG_FILE, vae_config_to_diffusers(config))
    elif format == "safetensors":
        # diffusers' keys plus the official tile sizes, which diffusers' config has no place for
        full = {**vae_config_to_diffusers(config), "sample_size": config.tile_sample_size,
                "sample_tsize": config.tile_sample_frames}
        _save_safetensors(sd, dest, {"format": "pt", METADATA_CONFIG_KEY: json.dumps(full)})
    else:
        raise ValueError(f"unknown VAE format {format!r}; choose official, diffusers or safetensors")
    return dest
