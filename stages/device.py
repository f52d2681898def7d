"""Where torch work runs: one rule for every command (`--device auto|cpu|cuda`)."""

from __future__ import annotations

import torch

from store.errors import UserError

DEVICES = ("auto", "cpu", "cuda")


def resolve_device(device: str | torch.device) -> torch.device:
    """`auto`: CUDA when torch sees one, else the CPU. `cuda` (or `cuda:N`) without a visible GPU
    is an error everywhere, never a silent fall-back to the CPU."""
    name = str(device)
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise UserError(f"--device {name} was asked for, but torch sees no CUDA GPU")
        return torch.device(name)
    raise UserError(f"--device must be one of {', '.join(DEVICES)}, not {name!r}")
