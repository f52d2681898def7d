"""Progress bars: one place that decides whether they show (`--no-progress`, TQDM_DISABLE)."""

from __future__ import annotations

import os
import sys
from typing import Any

from tqdm import tqdm


def progress_enabled(enabled: bool = True) -> bool:
    """A bar shows unless the command said --no-progress or the environment sets TQDM_DISABLE
    (tqdm's own variable: an explicit `disable=` would otherwise override it)."""
    return enabled and os.environ.get("TQDM_DISABLE", "").lower() in ("", "0", "false", "no")


def progress_bar(*args: Any, enabled: bool = True, **kwargs: Any) -> tqdm:
    """A tqdm bar on stderr (with throughput: tqdm's rate), hidden when progress is off."""
    kwargs.setdefault("file", sys.stderr)
    return tqdm(*args, disable=not progress_enabled(enabled), **kwargs)
