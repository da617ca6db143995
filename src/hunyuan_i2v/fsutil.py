"""Small file-system helpers shared by the writers (datasets, exported models)."""

from __future__ import annotations

import os
import shutil
import uuid
from pathlib import Path


def replace_dir(tmp: Path, out: Path) -> None:
    """Move the finished folder ``tmp`` to ``out``, replacing an existing ``out`` without a moment where neither
    exists in a usable state: the old folder is renamed aside first and deleted only after the swap."""
    if out.exists():
        trash = out.parent / f".{out.name}.{uuid.uuid4().hex[:8]}.old"
        os.replace(out, trash)
        os.replace(tmp, out)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out)
