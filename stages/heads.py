"""Projection heads and the run checkpoint: `head.safetensors` + `config.json` in a run directory.

A head maps one frozen encoder's layer features (in_dim) into the shared space (out_dim).
Every kind (linear, mlp, lowrank, CSA's) is built from the run's config through the static registry
`HEAD_BUILDERS`; a new kind is one class and one entry there. Fixed matrices (CSA's) travel as
buffers in the same safetensors file. Never pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from store import UserError, write_json_atomic

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


# the authors' ResLowRankHead settings (configs/losses_mlp/*.yaml): rank 64, dropout 0.1
LOWRANK_RANK = 64
LOWRANK_DROPOUT = 0.1
# initial gate alpha = sigmoid(logit): small, so the head starts close to its linear map, but
# not 0: their code starts the logit at -inf (gate_init 0), where sigmoid has no gradient and
# the residual branch can never open (their "MLP" trains as a linear map)
LOWRANK_GATE_INIT = 0.1


class LowRankHead(nn.Module):
    """The paper's "MLP" (the authors' ResLowRankHead): a linear map plus a gated low-rank
    residual branch, z = P x + alpha * W2 Dropout(GELU(W1 x)), alpha = sigmoid(logit) in (0, 1).

    P and W1 start orthogonal (as theirs); W2 starts small rather than zero and alpha at
    LOWRANK_GATE_INIT, so that the gate, W1 and W2 all get a gradient from the first step."""

    def __init__(self, in_dim: int, out_dim: int, rank: int = LOWRANK_RANK):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim, bias=False)
        self.down = nn.Linear(in_dim, rank, bias=False)
        self.up = nn.Linear(rank, out_dim, bias=False)
        nn.init.orthogonal_(self.proj.weight)
        nn.init.orthogonal_(self.down.weight)
        nn.init.normal_(self.up.weight, std=0.01)
        self.act = nn.GELU()
        self.dropout = nn.Dropout(LOWRANK_DROPOUT)
        gate = LOWRANK_GATE_INIT
        self.gate_logit = nn.Parameter(torch.tensor(math.log(gate / (1 - gate))))

    @property
    def gate(self) -> torch.Tensor:
        return torch.sigmoid(self.gate_logit)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.up(self.dropout(self.act(self.down(x))))
        return self.proj(x) + self.gate * residual


class CSAHead(nn.Module):
    """CSA's head (stages.csa fits it): centre, project to d canonical dimensions, L2-normalise,
    weight; plus a slack dimension that brings the output to unit norm (output size d + 1,
    float64 buffers).

    The image head carries weight = rho, the text head weight = 1: the dot product (= cosine) of
    the two outputs is CSA's score."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim, dtype=torch.float64))
        self.register_buffer("proj", torch.zeros(in_dim, out_dim, dtype=torch.float64))
        self.register_buffer("weight", torch.ones(out_dim, dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.normalize((x.to(torch.float64) - self.mean) @ self.proj, dim=-1)
        z = z * self.weight
        slack = (1.0 - (z * z).sum(dim=-1, keepdim=True)).clamp_min(0.0).sqrt()
        return torch.cat([z, slack], dim=-1)


# kind -> builder(in_dim, out_dim, hidden_dim): every head kind, built (and loaded) by name
HEAD_BUILDERS: dict[str, Callable[[int, int, int], nn.Module]] = {
    "linear": lambda in_dim, out_dim, hidden_dim: LinearHead(in_dim, out_dim),
    "mlp": lambda in_dim, out_dim, hidden_dim: MLPHead(in_dim, out_dim, hidden_dim),
    "lowrank": lambda in_dim, out_dim, hidden_dim: LowRankHead(in_dim, out_dim),
    "csa": lambda in_dim, out_dim, hidden_dim: CSAHead(in_dim, out_dim),
}


def build_head(kind: str, in_dim: int, out_dim: int, hidden_dim: int = 1024) -> nn.Module:
    if kind not in HEAD_BUILDERS:
        raise UserError(f"unknown head {kind!r}; choose one of {', '.join(HEAD_BUILDERS)}")
    if min(in_dim, out_dim, hidden_dim) < 1:
        raise UserError(
            f"head dimensions must be >= 1 (in {in_dim}, out {out_dim}, hidden {hidden_dim})"
        )
    return HEAD_BUILDERS[kind](in_dim, out_dim, hidden_dim)


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
    write_json_atomic(run_dir / CONFIG, config, sort_keys=True)
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
