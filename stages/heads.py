"""Projection heads and the run checkpoint: `head.safetensors` + `config.json` in a run directory.

A head maps one frozen encoder's layer features (in_dim) into the shared space (out_dim).
Every kind is built from the run's config through `HEAD_BUILDERS`, so a later kind (CSA, a
CCA-based projection) plugs in by registering a builder; its fixed matrices travel as buffers
in the same safetensors file. Never pickle.
"""

from __future__ import annotations

import importlib
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from store.errors import UserError

CHECKPOINT = "head.safetensors"
CONFIG = "config.json"


class LinearHead(nn.Module):
    """One affine map in_dim -> out_dim."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


class MLPHead(nn.Module):
    """Two layers: in_dim -> hidden_dim -> GELU -> out_dim."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


# kind -> builder(in_dim, out_dim, hidden_dim, **options); options come from config["head_options"]
HeadBuilder = Callable[..., nn.Module]
HEAD_BUILDERS: dict[str, HeadBuilder] = {
    "linear": lambda in_dim, out_dim, hidden_dim, **_: LinearHead(in_dim, out_dim),
    "mlp": lambda in_dim, out_dim, hidden_dim, **_: MLPHead(in_dim, out_dim, hidden_dim),
}


# kinds that live in their own module, imported the first time one is built or loaded
HEAD_MODULES = {"csa": "stages.csa"}


def register_head(kind: str, builder: HeadBuilder) -> None:
    """Make a new head kind buildable (and loadable by `load_run`)."""
    HEAD_BUILDERS[kind] = builder


def build_head(
    kind: str, in_dim: int, out_dim: int, hidden_dim: int = 1024, **options: Any
) -> nn.Module:
    if kind not in HEAD_BUILDERS and kind in HEAD_MODULES:
        importlib.import_module(HEAD_MODULES[kind])
    if kind not in HEAD_BUILDERS:
        raise UserError(f"unknown head {kind!r}; choose one of {', '.join(HEAD_BUILDERS)}")
    if min(in_dim, out_dim, hidden_dim) < 1:
        raise UserError(
            f"head dimensions must be >= 1 (in {in_dim}, out {out_dim}, hidden {hidden_dim})"
        )
    return HEAD_BUILDERS[kind](in_dim, out_dim, hidden_dim, **options)


def save_run(
    run_dir: str | Path, image_head: nn.Module, text_head: nn.Module, config: dict[str, Any]
) -> Path:
    """Write both heads' tensors (prefixed `image.` and `text.`) and the JSON config."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    tensors = {f"image.{k}": v for k, v in image_head.state_dict().items()}
    tensors.update({f"text.{k}": v for k, v in text_head.state_dict().items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    save_file(tensors, str(run_dir / CHECKPOINT), metadata={"head": str(config.get("head"))})
    (run_dir / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return run_dir


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], nn.Module, nn.Module]:
    """(config, image_head, text_head) of a trained run, heads in eval mode on the CPU."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"no run directory {run_dir}; train one with `python -m pipeline align`")
    for name in (CHECKPOINT, CONFIG):
        if not (run_dir / name).is_file():
            raise UserError(
                f"{run_dir} has no {name}; it is not a finished align run "
                "(train it with `python -m pipeline align --out DIR`)"
            )
    try:
        config = json.loads((run_dir / CONFIG).read_text())
        tensors = load_file(str(run_dir / CHECKPOINT))
    except Exception as err:  # json, OS and safetensors' own error types
        raise UserError(f"{run_dir} holds an unreadable checkpoint: {err}") from err
    heads = []
    for side in ("image", "text"):
        try:
            head = build_head(
                config["head"],
                config[f"{side}_dim"],
                config["out_dim"],
                config.get("hidden_dim", 1024),
                **config.get("head_options", {}),
            )
        except KeyError as err:
            raise UserError(f"{run_dir}/{CONFIG} lacks the key {err}") from err
        prefix = f"{side}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as err:
            raise UserError(f"{run_dir}: the {side} head does not match its config: {err}") from err
        heads.append(head.eval())
    return config, heads[0], heads[1]
