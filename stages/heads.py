"""Projection heads, their registry, and the run directory (an artifact kind: `RUN`).

A head maps one frozen encoder's layer features (in_dim) into the shared space (out_dim). Every
kind is registered once, with `register_head`, on an `nn.Module` class whose constructor takes
`(in_dim, out_dim, hidden_dim)`:

    @register_head("mine", display="Mine")
    class MyHead(nn.Module):
        def __init__(self, in_dim, out_dim, hidden_dim): ...

(optionally with a `stacked_forward(params, x, generator)`: G copies of stacked parameters on one
batch at once, for `--lambda auto`'s stacked grid, stages.head_stack; without it, vmap) and is
then trained by `align` (gradient training of stages.train unless `trainer=` names
another, as CSA's does), offered by `sweep` and `table`, and loaded by `evaluate`, the model and
its export: the registry is the only place to touch. Display names, `--help` choices and the
validation of `--head` come from it.

A run directory is written by `write_run` (through store.artifacts: atomic, locked, every file's
SHA-256 recorded in config.json's `files`) and read by `read_run` / `load_run`, which check it:
config.json an object with its keys and types, head.safetensors present and unchanged, and the
features the heads were trained on (recorded in the checksummed head.safetensors metadata) the
ones config.json names. Fixed matrices (CSA's) travel as buffers in the same safetensors file.
Never pickle.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from store import UserError
from store.artifacts import ArtifactKind, read_description, write_artifact

CHECKPOINT = "head.safetensors"
CONFIG = "config.json"


# -- the registry ----------------------------------------------------------------------------
@dataclass(frozen=True)
class HeadKind:
    """One registered head kind: its class, display name, `--help` text and trainer."""

    name: str
    cls: type[nn.Module]
    display: str
    help: str = ""
    # trainer(train, val, settings, progress=..., **options) -> stages.train.TrainResult;
    # None: gradient training (stages.train.train_heads), which also takes unpaired rows for R_S
    trainer: Callable[..., Any] | None = None

    @property
    def gradient_trained(self) -> bool:
        return self.trainer is None


_HEADS: dict[str, HeadKind] = {}


def register_head(
    name: str, *, display: str | None = None, help: str = "", trainer: Callable | None = None
) -> Callable[[type[nn.Module]], type[nn.Module]]:
    """Class decorator: register an `nn.Module` whose constructor takes (in_dim, out_dim,
    hidden_dim) as head kind `name` (lower case; `--head NAME`). `display`: its name in tables
    (default: NAME capitalised); `help`: a few words for `--help`; `trainer`: a function like
    stages.train.train_heads returning a TrainResult (default: gradient training)."""
    key = name.strip().lower()
    if not key or not key.replace("-", "").replace("_", "").isalnum():
        raise ValueError(f"a head name is letters, digits, - and _, got {name!r}")

    def decorate(cls: type[nn.Module]) -> type[nn.Module]:
        _HEADS[key] = HeadKind(key, cls, display or key.capitalize(), help, trainer)
        return cls

    return decorate


def head_kinds() -> dict[str, HeadKind]:
    """Every registered head kind, in registration order (the built-in ones first)."""
    import stages.csa  # noqa: F401  (CSA registers itself there, beside its trainer)

    return dict(_HEADS)


def head_kind(name: str) -> HeadKind:
    """The kind `name` (any case), or a one-line UserError listing the kinds."""
    kinds = head_kinds()
    key = str(name).strip().lower()
    if key not in kinds:
        raise UserError(f"unknown head {name!r}; choose one of {', '.join(kinds)}")
    return kinds[key]


def head_help() -> str:
    """The `--head` help text, from the registry."""
    kinds = head_kinds().values()
    return (
        "Projection head: "
        + ", ".join(f"{k.name} ({k.help})" if k.help else k.name for k in kinds)
        + "."
    )


def wide_linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """G linear maps (weight (G, out, in), bias (G, out)) of one batch x (B, in), as one matmul
    x @ [W_1 .. W_G]^T: (G, B, out), where vmap would run G small ones."""
    copies, out, _ = weight.shape
    wide = weight.reshape(copies * out, -1).T
    z = x @ wide if bias is None else torch.addmm(bias.reshape(-1), x, wide)
    return z.view(len(x), copies, out).transpose(0, 1).contiguous()  # (G, B, out) rows dense


# -- the built-in kinds (CSA's is registered in stages.csa, beside its trainer) ------------------
@register_head("linear", display="Linear")
class LinearHead(nn.Module):
    """One affine map in_dim -> out_dim (hidden_dim unused)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)

    @staticmethod
    def stacked_forward(
        params: dict[str, torch.Tensor], x: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """G copies (stacked parameters, stages.head_stack) on one batch x: (G, B, out); no
        random draws."""
        return wide_linear(x, params["proj.weight"], params["proj.bias"])


@register_head("mlp", display="MLP")
class MLPHead(nn.Module):
    """Two layers: in_dim -> hidden_dim -> GELU -> out_dim."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))

    @staticmethod
    def stacked_forward(
        params: dict[str, torch.Tensor], x: torch.Tensor, generator: torch.Generator | None
    ) -> torch.Tensor:
        """G copies (stacked parameters, stages.head_stack) on one batch x: (G, B, out); no
        random draws."""
        hidden = F.gelu(wide_linear(x, params["fc1.weight"], params["fc1.bias"]))
        return torch.baddbmm(params["fc2.bias"].unsqueeze(1), hidden, params["fc2.weight"].mT)


# the authors' ResLowRankHead settings (configs/losses_mlp/*.yaml): rank 64, dropout 0.1
LOWRANK_RANK = 64
LOWRANK_DROPOUT = 0.1
# initial gate alpha = sigmoid(logit): small, so the head starts close to its linear map, but
# not 0: their code starts the logit at -inf (gate_init 0), where sigmoid has no gradient and
# the residual branch can never open (their "MLP" trains as a linear map)
LOWRANK_GATE_INIT = 0.1


@register_head(
    "lowrank",
    display="Low-rank",
    help="the paper's MLP: linear map + gated low-rank residual, rank 64",
)
class LowRankHead(nn.Module):
    """The paper's "MLP" (the authors' ResLowRankHead): a linear map plus a gated low-rank
    residual branch, z = P x + alpha * W2 Dropout(GELU(W1 x)), alpha = sigmoid(logit) in (0, 1).

    P and W1 start orthogonal (as theirs); W2 starts small rather than zero and alpha at
    LOWRANK_GATE_INIT, so that the gate, W1 and W2 all get a gradient from the first step.
    hidden_dim is unused: the rank is the authors' LOWRANK_RANK."""

    def __init__(
        self, in_dim: int, out_dim: int, hidden_dim: int | None = None, rank: int = LOWRANK_RANK
    ):
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

    def stacked_forward(
        self,
        params: dict[str, torch.Tensor],
        x: torch.Tensor,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """G copies (stacked parameters, stages.head_stack) on one batch x: (G, B, out). One
        dropout mask for all copies, drawn from `generator` exactly as nn.Dropout draws one
        copy's mask on the CPU (bernoulli_, then / (1 - p)): from the same generator state, the
        same mask as that copy's own run."""
        rank = params["down.weight"].shape[1]
        hidden = F.gelu(wide_linear(x, params["down.weight"], None))
        p = self.dropout.p
        if self.training and p > 0:
            keep = x.new_empty(len(x), rank).bernoulli_(1 - p, generator=generator).div_(1 - p)
            hidden = hidden * keep
        residual = torch.bmm(hidden, params["up.weight"].mT)
        gate = torch.sigmoid(params["gate_logit"]).view(-1, 1, 1)
        return wide_linear(x, params["proj.weight"], None) + gate * residual


def build_head(kind: str, in_dim: int, out_dim: int, hidden_dim: int = 1024) -> nn.Module:
    """A new head of a registered kind."""
    cls = head_kind(kind).cls
    if min(in_dim, out_dim, hidden_dim) < 1:
        raise UserError(
            f"head dimensions must be >= 1 (in {in_dim}, out {out_dim}, hidden {hidden_dim})"
        )
    return cls(in_dim, out_dim, hidden_dim)


# -- the run directory -------------------------------------------------------------------------
RUN = ArtifactKind(
    name="run directory",
    description=CONFIG,
    remake="python -m pipeline align --out {path}",
    files=(CHECKPOINT,),
    keys={
        "image_model": str,
        "text_model": str,
        "image_layer": str,
        "text_layer": str,
        "head": str,
        "image_dim": int,
        "text_dim": int,
        "out_dim": int,
    },
    # diagnostics: checked when present, a run (or its export) without them still loads
    optional=("history.csv", "curves.png"),
)
# what the heads were trained on, kept in head.safetensors' metadata (checksummed in `files`):
# a config.json edited to name another layer, even one of the same width, is refused
IDENTITY_KEYS = (
    "head",
    "image_layer",
    "text_layer",
    "image_layer_index",
    "text_layer_index",
    "image_dim",
    "text_dim",
    "out_dim",
    "dataset",
    "split",
)
FEATURES_METADATA = "features"


def feature_identity(config: dict[str, Any]) -> dict[str, Any]:
    """The IDENTITY_KEYS of a run's config (those it has)."""
    return {k: config[k] for k in IDENTITY_KEYS if k in config}


def write_heads(
    folder: str | Path, image_head: nn.Module, text_head: nn.Module, config: dict[str, Any]
) -> None:
    """head.safetensors: both heads' tensors (prefixed `image.` and `text.`), with the feature
    identity of `config` in its metadata."""
    tensors = {f"image.{k}": v for k, v in image_head.state_dict().items()}
    tensors.update({f"text.{k}": v for k, v in text_head.state_dict().items()})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    metadata = {
        "head": str(config.get("head")),
        FEATURES_METADATA: json.dumps(feature_identity(config), sort_keys=True),
    }
    save_file(tensors, str(Path(folder) / CHECKPOINT), metadata=metadata)


def write_run(
    run_dir: str | Path,
    image_head: nn.Module,
    text_head: nn.Module,
    config: dict[str, Any],
    extra: Callable[[Path], None] | None = None,
) -> dict[str, Any]:
    """Write a run directory atomically (an existing one is replaced only by a complete one,
    never while another process writes it): the heads, `extra(folder)` (history, curves) and
    config.json with every file's SHA-256. Returns the config as written."""

    def fill(tmp: Path) -> dict[str, Any]:
        write_heads(tmp, image_head, text_head, config)
        if extra is not None:
            extra(tmp)
        return dict(sorted(config.items()))

    return write_artifact(RUN, run_dir, fill)


def save_run(
    run_dir: str | Path, image_head: nn.Module, text_head: nn.Module, config: dict[str, Any]
) -> Path:
    """Write a run directory of two heads and a config (write_run); returns its path."""
    write_run(run_dir, image_head, text_head, config)
    return Path(run_dir)


def _remake(run_dir: Path) -> str:
    return RUN.remake_hint(run_dir)


def read_run(run_dir: str | Path) -> dict[str, Any]:
    """The config of a run directory, checked: the folder, config.json and head.safetensors
    exist; config.json is an object with the keys and types of `RUN`; every file it records is
    unchanged; the feature identity recorded in head.safetensors is the one config.json names.
    Files added later (evaluate's metrics.json) are not its business. Anything wrong: one line
    naming the file and the command that makes the run again."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(
            f"no run directory {run_dir}; train one with `python -m pipeline align --out {run_dir}`"
        )
    for name in (CHECKPOINT, CONFIG):
        if not (run_dir / name).is_file():
            raise UserError(
                f"{run_dir} has no {name}; it is not a finished align run ({_remake(run_dir)})"
            )
    try:
        raw = json.loads((run_dir / CONFIG).read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raw = None  # read_description names the problem
    if isinstance(raw, dict):
        missing = [k for k in RUN.keys if k not in raw]
        if missing:
            raise UserError(f"{run_dir}/{CONFIG} lacks {', '.join(missing)}; {_remake(run_dir)}")
    config = read_description(RUN, run_dir)
    if config["head"].strip().lower() not in head_kinds():
        problem = f"`head` {config['head']!r} is no registered head ({', '.join(head_kinds())})"
        raise RUN.error(run_dir, run_dir / CONFIG, problem)
    recorded = _recorded_identity(run_dir)
    for key, value in recorded.items():
        if config.get(key) != value:
            raise UserError(
                f"{run_dir}/{CONFIG}: `{key}` is {config.get(key)!r} but the heads in "
                f"{CHECKPOINT} were trained on {value!r}; {_remake(run_dir)}"
            )
    return config


def _recorded_identity(run_dir: Path) -> dict[str, Any]:
    path = run_dir / CHECKPOINT
    try:
        with safe_open(str(path), framework="pt") as handle:
            metadata = handle.metadata() or {}
    except Exception as err:  # safetensors raises its own error types
        raise RUN.error(run_dir, path, f"unreadable ({err})") from err
    try:
        identity = json.loads(metadata.get(FEATURES_METADATA, "{}"))
    except json.JSONDecodeError as err:
        raise RUN.error(run_dir, path, "its metadata is not valid JSON") from err
    return identity if isinstance(identity, dict) else {}


def load_heads(run_dir: str | Path, config: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """(image_head, text_head) of head.safetensors in `run_dir`, built as `config` says, in
    eval mode on the CPU."""
    run_dir = Path(run_dir)
    try:
        tensors = load_file(str(run_dir / CHECKPOINT))
    except Exception as err:  # OS and safetensors' own error types
        raise RUN.error(run_dir, run_dir / CHECKPOINT, f"unreadable ({err})") from err
    hidden = config.get("hidden_dim", 1024)
    if not isinstance(hidden, int) or isinstance(hidden, bool):
        raise RUN.error(run_dir, run_dir / CONFIG, f"`hidden_dim` must be int, not {hidden!r}")
    heads = []
    for side in ("image", "text"):
        head = build_head(config["head"], config[f"{side}_dim"], config["out_dim"], hidden)
        prefix = f"{side}."
        state = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        try:
            head.load_state_dict(state, strict=True)
        except RuntimeError as err:
            first = str(err).strip().splitlines()[0]
            raise UserError(
                f"{run_dir}: the {side} head in {CHECKPOINT} does not match its config "
                f"({first}); {_remake(run_dir)}"
            ) from err
        heads.append(head.eval())
    return heads[0], heads[1]


def load_run(run_dir: str | Path) -> tuple[dict[str, Any], nn.Module, nn.Module]:
    """(config, image_head, text_head) of a run directory (checked by read_run), heads in eval
    mode on the CPU."""
    config = read_run(run_dir)
    return (config, *load_heads(run_dir, config))
