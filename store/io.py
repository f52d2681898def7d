"""Atomic writes of the small text outputs (JSON, CSV, Markdown): a reader, a DVC stage or a
crash never sees half a file."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` to a temporary file beside `path`, then rename it over `path` (atomic on one
    file system). Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
    return path


def write_json_atomic(path: str | Path, data: Any, **dumps: Any) -> Path:
    """`data` as indented JSON plus a final newline, written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, **dumps) + "\n")
