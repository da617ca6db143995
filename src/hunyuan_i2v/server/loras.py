"""The LoRAs a server offers: the files of one folder (``--lora-dir``; default the bundled ``assets/loras``).

A job names its LoRAs by file name, as ``GET /v1/loras`` lists them. A name is only ever looked up in the
folder's listing, never joined to a path, so a client can reach no other file. Each file is checked once against
the served model (for safetensors from the header alone) and the answer is cached by its size and modification
time, so listing and validating stay cheap while an operator adds or replaces files under a running server.

The worker applies a job's LoRAs as runtime adapters on the pipeline it keeps loaded and removes them after the
job (:func:`job_loras`): the base weights are never touched, so the next job without LoRAs gets the base output
exactly, and nothing is reloaded.
"""

from __future__ import annotations

import logging
import os
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

from ..errors import HunyuanI2VError
from .settings import LimitError

if TYPE_CHECKING:
    from ..config import TransformerConfig
    from .settings import ServerSettings

log = logging.getLogger(__name__)

LORA_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin", ".ckpt")  # what lora.load_lora_state_dict reads
_NAMES_SHOWN = 10  # names listed in an "unknown LoRA" message


def bundled_lora_dir() -> Optional[Path]:
    """The LoRAs shipped inside the package (``assets/loras``), if this install has them."""
    path = Path(__file__).resolve().parent.parent / "assets" / "loras"
    return path if path.is_dir() else None


@dataclass(frozen=True)
class LoraEntry:
    name: str  # the file name: what a job gives
    path: Path
    size_bytes: int
    format: Optional[str]  # official | kohya | diffusers | peft | comfyui | ...; None when not checked
    error: Optional[str]  # why it does not fit the served model; None when it does (or was not checked)

    def public(self) -> dict:
        """What a client sees (no paths)."""
        return {"name": self.name, "size_bytes": self.size_bytes, "format": self.format, "usable": self.error is None,
                "error": self.error}


class LoraCatalog:
    """The LoRA files of ``folder`` (non-recursive), each checked against the transformer of ``model``.

    Thread-safe: the API answers from several threads with one catalog.
    """

    def __init__(self, folder: Optional[Path], model: Optional[Path] = None):
        self.folder = Path(folder) if folder is not None else None
        self.model = model
        self._lock = threading.Lock()
        self._checked: dict[tuple[str, int, int], tuple[Optional[str], Optional[str]]] = {}
        self._config: Any = None  # the served model's TransformerConfig; False once it could not be read

    @classmethod
    def for_settings(cls, settings: "ServerSettings") -> "LoraCatalog":
        from ..cli import bundled_model_dir

        folder = settings.lora_dir if settings.lora_dir is not None else bundled_lora_dir()
        return cls(folder, settings.model or bundled_model_dir())

    def entries(self) -> list[LoraEntry]:
        """The LoRA files now in the folder, sorted by name (hidden files and other suffixes left out)."""
        if self.folder is None:
            return []
        try:
            found = [e for e in os.scandir(self.folder) if not e.name.startswith(".")
                     and e.name.lower().endswith(LORA_SUFFIXES) and e.is_file()]
        except OSError as exc:
            log.warning("cannot list the LoRA folder %s: %s", self.folder, exc)
            return []
        out = []
        for e in sorted(found, key=lambda e: e.name):
            try:
                st = e.stat()
            except OSError:  # removed meanwhile
                continue
            fmt, error = self._check(Path(e.path), st.st_size, st.st_mtime_ns)
            out.append(LoraEntry(e.name, Path(e.path), st.st_size, fmt, error))
        return out

    def get(self, name: str) -> LoraEntry:
        """The entry of a usable LoRA by its listed name; a :class:`LimitError` (HTTP 422) for any other name."""
        entries = self.entries()
        for entry in entries:
            if entry.name == name:
                if entry.error is not None:
                    raise LimitError(f"LoRA {name!r} does not fit this server's model: {entry.error}")
                return entry
        shown = name if len(name) <= 80 else name[:77] + "..."
        usable = [e.name for e in entries if e.error is None]
        if not usable:
            raise LimitError(f"unknown LoRA {shown!r}: this server has no LoRAs")
        listed = ", ".join(usable[:_NAMES_SHOWN]) + (", ..." if len(usable) > _NAMES_SHOWN else "")
        raise LimitError(f"unknown LoRA {shown!r}: this server has {listed} (GET /v1/loras lists them)")

    # -- checking ----------------------------------------------------------------------------------

    def _check(self, path: Path, size: int, mtime_ns: int) -> tuple[Optional[str], Optional[str]]:
        key = (path.name, size, mtime_ns)
        with self._lock:
            if key not in self._checked:
                self._checked = {k: v for k, v in self._checked.items() if k[0] != path.name}  # an older version
                self._checked[key] = self._check_file(path)
            return self._checked[key]

    def _check_file(self, path: Path) -> tuple[Optional[str], Optional[str]]:
        from ..lora import check_lora_file

        config = self._transformer_config()
        if config is None:
            return None, None  # the worker checks it when it applies it
        try:
            return check_lora_file(path, config), None
        except (HunyuanI2VError, OSError) as exc:
            return None, (str(exc).strip().splitlines() or [type(exc).__name__])[0]

    def _transformer_config(self) -> Optional["TransformerConfig"]:
        if self._config is None:
            self._config = False
            if self.model is not None:
                try:
                    from ..layout import resolve_model_files
                    from ..pipeline import model_config_for

                    self._config = model_config_for(resolve_model_files(self.model)).transformer
                except (HunyuanI2VError, OSError, ValueError) as exc:
                    log.warning("cannot read the model config of %s (%s); LoRAs are checked when a job uses them",
                                self.model, exc)
        return self._config or None


class LoraRemovalError(RuntimeError):
    """A job's LoRAs could not be taken off the pipeline: it must not serve another job."""


@contextmanager
def job_loras(pipe, loras: list[dict], catalog: LoraCatalog) -> Iterator[None]:
    """Run a job's LoRAs (``[{"name", "scale"}, ...]``) as adapters on ``pipe`` for the ``with`` block, then remove
    them: the base layers stay untouched, so the pipeline afterwards gives the base output bit for bit."""
    if not loras:
        yield
        return
    files = [(catalog.get(item["name"]).path, item["scale"]) for item in loras]
    try:
        pipe.load_loras(files, mode="adapter")
        yield
    finally:
        try:
            pipe.unload_loras()  # also after a failed load: no spec may stay behind for the next job
        except Exception as exc:
            raise LoraRemovalError(f"could not remove the LoRAs after the job: {exc}") from exc
