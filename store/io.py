"""Atomic writes of the small text outputs (JSON, CSV, Markdown): a reader, a DVC stage or a
crash never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from store.errors import UserError


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (atomic on one
    file system). Creates the parent folder."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise UserError(f"cannot write {path}: a part of its folder is a file") from err
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)  # nothing stray after a failure
    return path


def write_json_atomic(path: str | Path, data: Any, **dumps: Any) -> Path:
    """`data` as indented JSON plus a final newline, written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, **dumps) + "\n")


def require_directory(path: Path) -> None:
    """An output folder (--out of align, select, ...) must not be an existing file."""
    if path.exists() and not path.is_dir():
        raise UserError(f"--out {path} is a file; give a directory")
