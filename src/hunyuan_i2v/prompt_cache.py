"""Prompt embeddings cached on disk, so a repeated (prompt, image) pair skips the prompt encoders.

One safetensors file per pair under ``~/.cache/hunyuan-i2v/prompts`` (``$HUNYUAN_I2V_PROMPT_CACHE`` or the
pipeline's ``prompt_cache`` argument choose another folder). The file name is a SHA-256 over the prompt, the
image's pixels, the encoder's identity (its configuration, dtype and a fingerprint of its weights) and the text
length, so a different encoder or setting never reads another's entries. Files are written atomically (a
temporary file, then a rename); one that cannot be read or does not hold what its name promises is ignored and
rewritten by the next encoding. The folder is kept under a size limit (2 GiB by default,
``$HUNYUAN_I2V_PROMPT_CACHE_MAX_MB`` or ``max_bytes`` to change it): after each write the least recently used
entries (by modification time, which a read refreshes) are deleted until it fits. Delete the folder to clear it.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import uuid
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence, Union

import torch
from PIL import Image
from torch import Tensor, nn

logger = logging.getLogger(__name__)

ENV_VAR = "HUNYUAN_I2V_PROMPT_CACHE"
FORMAT = "hunyuan-i2v prompt embedding 1"
FIELDS = ("text_states", "text_mask", "text_states_2")  # one row of a TextConditioning
MAX_HASHED_BYTES = 2 * 1024**3  # encoder objects larger than this are not fingerprinted by their weights
MAX_ENV_VAR = "HUNYUAN_I2V_PROMPT_CACHE_MAX_MB"
DEFAULT_MAX_BYTES = 2 * 1024**3  # ~600 prompts of the 13B model's encoders (about 3.3 MB each)

PathLike = Union[str, os.PathLike]


def default_cache_dir() -> Path:
    env = os.environ.get(ENV_VAR)
    return Path(env).expanduser() if env else Path.home() / ".cache" / "hunyuan-i2v" / "prompts"


def default_max_bytes() -> int:
    env = os.environ.get(MAX_ENV_VAR)
    if env:
        try:
            return max(0, int(float(env) * 1024**2))
        except ValueError:
            logger.warning("ignoring %s=%r (not a number of MB)", MAX_ENV_VAR, env)
    return DEFAULT_MAX_BYTES


def image_digest(image: Image.Image) -> str:
    """SHA-256 of the decoded pixels (mode, size and bytes): the same picture from PNG or JPEG files of different
    bytes hashes alike only if it decodes alike."""
    h = hashlib.sha256(f"{image.mode}:{image.size}".encode())
    h.update(image.tobytes())
    return h.hexdigest()


def files_fingerprint(folders: Iterable[PathLike]) -> str:
    """Names, sizes and modification times of every file under ``folders`` (cheap: no file is read)."""
    h = hashlib.sha256()
    for folder in folders:
        folder = Path(folder)
        for path in sorted(p for p in folder.rglob("*") if p.is_file()):
            st = path.stat()
            h.update(f"{path.relative_to(folder)}:{st.st_size}:{st.st_mtime_ns}\n".encode())
    return h.hexdigest()


def torch_modules(obj: Any, depth: int = 2) -> list[nn.Module]:
    """The torch modules an encoder object holds: itself, or its attributes (and theirs, ``depth`` levels)."""
    if isinstance(obj, nn.Module):
        return [obj]
    if depth == 0 or not hasattr(obj, "__dict__"):
        return []
    found: list[nn.Module] = []
    for value in vars(obj).values():
        found.extend(m for m in torch_modules(value, depth - 1) if all(m is not f for f in found))
    return found


def modules_fingerprint(modules: Sequence[nn.Module]) -> Optional[str]:
    """SHA-256 over the modules' state (names, dtypes, devices, values); None when there is none or it is too
    large to hash quickly (pass the pipeline a ``prompt_cache_id`` then)."""
    tensors = [(f"{i}.{k}", t) for i, m in enumerate(modules) for k, t in m.state_dict().items()]
    if not tensors or sum(t.numel() * t.element_size() for _, t in tensors) > MAX_HASHED_BYTES:
        return None
    h = hashlib.sha256()
    for name, t in tensors:
        t = t.detach()
        h.update(f"{name}:{t.dtype}:{t.device.type}:{tuple(t.shape)}\n".encode())
        h.update(t.cpu().contiguous().view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


class PromptCache:
    """Rows of prompt embeddings by (prompt, image) for one encoder ``identity``."""

    def __init__(self, root: Optional[PathLike], identity: str, text_len: int, max_bytes: Optional[int] = None):
        self.root = Path(root).expanduser() if root is not None else default_cache_dir()
        self.identity, self.text_len = identity, text_len
        self.max_bytes = default_max_bytes() if max_bytes is None else max_bytes

    def key(self, prompt: str, image: Image.Image) -> str:
        data = {"format": FORMAT, "prompt": prompt, "image": image_digest(image), "encoder": self.identity,
                "text_len": self.text_len}
        return hashlib.sha256(json.dumps(data, sort_keys=True).encode()).hexdigest()

    def path(self, key: str) -> Path:
        return self.root / key[:2] / f"{key}.safetensors"

    def contains(self, key: str) -> bool:
        return self.path(key).is_file()

    def load(self, key: str) -> Optional[dict[str, Tensor]]:
        """The row stored under ``key`` (tensors on the CPU), or None when absent, unreadable or not what the key
        names (a corrupt file is logged and left for :meth:`store` to replace)."""
        from safetensors import safe_open

        path = self.path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                row = {name: f.get_tensor(name) for name in FIELDS}
            if meta.get("format") != FORMAT or meta.get("key") != key:
                raise ValueError("its metadata names another entry")
            if row["text_states"].ndim != 2 or row["text_mask"].shape != row["text_states"].shape[:1] \
                    or row["text_states_2"].ndim != 1:
                raise ValueError("its tensors have the wrong shapes")
        except Exception as exc:  # noqa: BLE001 - any damage means: encode again
            logger.warning("ignoring the unreadable prompt cache file %s (%s: %s); it will be rewritten", path,
                           type(exc).__name__, str(exc).splitlines()[0] if str(exc) else "")
            return None
        with contextlib.suppress(OSError):
            os.utime(path)  # a read counts as a use, for the least-recently-used pruning
        return row

    def store(self, key: str, row: dict[str, Tensor]) -> None:
        """Write one row atomically; a cache that cannot be written is logged, never fatal."""
        from safetensors.torch import save_file

        path = self.path(key)
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            save_file({k: v.detach().cpu().contiguous() for k, v in row.items()}, str(tmp),
                      metadata={"format": FORMAT, "key": key})
            os.replace(tmp, path)
        except Exception as exc:  # noqa: BLE001 - OSError, or safetensors' own error for a failed write
            logger.warning("could not write the prompt cache file %s (%s); continuing without it", path, exc)
            with contextlib.suppress(OSError):
                tmp.unlink(missing_ok=True)
            return
        self.prune(keep=path)

    def prune(self, keep: Optional[Path] = None) -> int:
        """Delete the least recently used entries until the folder holds at most ``max_bytes``; returns how many.

        ``keep`` (the entry just written) is never deleted, even when it alone is over the limit.
        """
        entries = []
        for p in self.root.glob("*/*.safetensors"):
            with contextlib.suppress(OSError):
                st = p.stat()
                entries.append((st.st_mtime_ns, st.st_size, p))
        total = sum(size for _, size, _ in entries)
        removed = 0
        for _, size, p in sorted(entries, key=lambda e: e[0]):
            if total <= self.max_bytes:
                break
            if keep is not None and p == keep:
                continue
            with contextlib.suppress(OSError):
                p.unlink()
                total -= size
                removed += 1
        if removed:
            logger.info("prompt cache: removed %d least recently used entries to stay under %.0f MB", removed,
                        self.max_bytes / 1024**2)
        return removed


def conditioning_rows(cond: Any) -> list[dict[str, Tensor]]:
    """A TextConditioning batch as one dict of tensors per row."""
    return [{name: getattr(cond, name)[i] for name in FIELDS} for i in range(cond.text_states.shape[0])]


def stack_rows(rows: Sequence[dict[str, Tensor]], cls):
    """The inverse of :func:`conditioning_rows`: a ``cls`` (TextConditioning) batch."""
    return cls(*(torch.stack([r[name] for r in rows]) for name in FIELDS))


def encoder_identity(config: Any, **parts: Any) -> str:
    """A stable string naming an encoder: its text config (a dataclass) and the given parts."""
    data = {"config": dataclasses.asdict(config) if dataclasses.is_dataclass(config) else str(config),
            **{k: str(v) for k, v in parts.items()}}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()
