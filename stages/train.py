"""Gradient training of the two projection heads on paired features (CLIP loss + lambda * R_S).

    L = L_A(f1(X1), f2(X2)) + lambda_t * (R_S(X1, f1(X1)) + R_S(X2, f2(X2)))

Plain loop (nanoGPT's shape): AdamW, cosine learning rate, lambda warmed up linearly, gradient
clipping, early stopping on the validation objective (the best weights are kept). Also the
pieces other trainers share: the settings, the schedules, the mean CLIP loss of a pair source
and the guarded optimiser step.

Few pairs (the point of the method) shape three rules, each measured on real encoders
(docs/training.md, "Training with few pairs"):

- no validation hold-out smaller than `min_val_pairs`: a loss over a few dozen or hundred
  pairs is noise, and choosing weights or stopping on it is choosing at random, at a learning
  rate that the cosine schedule has not yet lowered. Below that the pairs all train, the whole
  schedule runs and the last weights are kept;
- early stopping watches the objective being trained (CLIP + lambda * R_S at full lambda, on the
  validation pairs; the authors' `overall_loss`), never fires and keeps no weights before
  lambda's warm-up ends, and counts its patience in optimiser steps, not epochs: with one
  full-batch step per epoch, "20 epochs" was 20 steps;
- R_S of the frozen side of a repeated full batch is computed once.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field, fields
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from stages.heads import build_head, head_kinds
from stages.losses import (
    StructureTargets,
    clip_loss,
    structure_regularizer,
    structure_targets,
)
from stages.pairs import (
    MemoryPairs,
    PairData,
    PairSource,
    StorePairs,
    as_source,
    batch_plan,
    epoch_batches,
)
from store import UserError

BETAS = (0.9, 0.95)
GRAD_CLIP = 1.0
HISTORY_COLUMNS = [
    "epoch",
    "step",
    "clip_loss",
    "rs_image",
    "rs_text",
    "lambda",
    "train_loss",
    "val_loss",
    "val_objective",
    "lr",
]


def check_finite_settings(settings: Any) -> None:
    """NaN passes every `<` check (`--lambda nan` would turn R_S off silently): refuse it, and
    infinities, in every float field of a settings dataclass."""
    for f in fields(settings):
        value = getattr(settings, f.name)
        if isinstance(value, float) and not math.isfinite(value):
            option = "--lambda" if f.name == "lam" else f"--{f.name.replace('_', '-')}"
            raise UserError(f"{option} must be a finite number, got {value}")


@dataclass(frozen=True)
class AlignSettings:
    """Every hyperparameter of one training run, with the defaults of the `align` command (the
    paper's setting; params.yaml's `align` section scales some down for the offline demo).
    Checked on construction: a bad value is a one-line UserError naming the option."""

    head: str = "linear"
    lam: float = 10.0
    levels: int = 1
    temperature: float = 0.05
    n_pairs: int = 0
    epochs: int = 1000  # the authors' n_epochs; with few pairs an epoch is one step
    max_steps: int = 1000  # and no more epochs than these optimiser steps need (0 = no cap)
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    patience: int = 200  # optimiser steps without a better validation objective (0 = off)
    out_dim: int = 512
    hidden_dim: int = 1024
    val_fraction: float = 0.1
    min_val_pairs: int = 1000  # a smaller hold-out is not made: all pairs train, last weights
    seed: int = 0
    csa_ridge: float = 0.1  # --head csa: canonical ridge, relative to the mean variance
    csa_steps: int = 200  # --head csa with lambda > 0: R_S refinement steps (any n_pairs)

    def __post_init__(self) -> None:
        object.__setattr__(self, "head", self.head.strip().lower())  # --head CSA is csa
        heads = list(head_kinds())  # every registered kind, csa's included
        check_finite_settings(self)
        problems = [
            (
                self.head not in heads,
                f"unknown head {self.head!r}; choose one of {', '.join(heads)}",
            ),
            (self.seed < 0, f"--seed must be >= 0, got {self.seed}"),
            (self.out_dim < 1, f"--out-dim must be >= 1, got {self.out_dim}"),
            (self.hidden_dim < 1, f"--hidden-dim must be >= 1, got {self.hidden_dim}"),
            (self.lam < 0, f"--lambda must be >= 0, got {self.lam}"),
            (not 1 <= self.levels <= 5, f"--levels must be 1 to 5, got {self.levels}"),
            (self.temperature <= 0, f"--temperature must be > 0, got {self.temperature}"),
            (self.n_pairs < 0, f"--n-pairs must be >= 0 (0 = all), got {self.n_pairs}"),
            (self.epochs < 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.max_steps < 0, f"--max-steps must be >= 0 (0 = no cap), got {self.max_steps}"),
            (self.batch_size < 2, f"--batch-size must be >= 2, got {self.batch_size}"),
            (self.lr <= 0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay < 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps < 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.patience < 0, f"--patience must be >= 0 (0 = off), got {self.patience}"),
            (self.min_val_pairs < 2, f"--min-val-pairs must be >= 2, got {self.min_val_pairs}"),
            (self.csa_steps < 1, f"--csa-steps must be >= 1, got {self.csa_steps}"),
            (
                not 0 <= self.val_fraction < 1,
                f"--val-fraction must be in [0, 1), got {self.val_fraction}",
            ),
            (self.csa_ridge < 0, f"--csa-ridge must be >= 0, got {self.csa_ridge}"),
        ]
        for bad, message in problems:
            if bad:
                raise UserError(message)


@dataclass
class TrainResult:
    """What every trainer returns (gradient training here, CSA's fit in stages.csa): the heads
    (eval mode) with the kept weights (those of `best_epoch`), the history (a row per epoch, or
    per logged point of CSA's refinement), the optimiser steps, the seconds, and `info`."""

    image_head: nn.Module
    text_head: nn.Module
    history: pd.DataFrame
    best_epoch: int | float  # CSA: the (fractional) passes over the pairs of its last step
    best_val_loss: float
    steps: int
    seconds: float
    info: dict[str, Any] = field(default_factory=dict)  # what the run's config.json adds


# -- schedules ----------------------------------------------------------------------------------
def lambda_at(step: int, lam: float, warmup_steps: int) -> float:
    """Linear ramp from 0 to lam over warmup_steps."""
    return lam if warmup_steps == 0 else lam * min(1.0, step / warmup_steps)


def run_epochs(epochs: int, max_steps: int, steps_per_epoch: int) -> int:
    """Epochs of a run: `epochs`, or fewer when `max_steps` (> 0) optimiser steps need fewer
    (the last one may be partial: see run_steps). One step an epoch with few pairs, dozens with
    many: a cap in steps keeps the schedule the same length at any number of pairs."""
    if max_steps == 0:
        return epochs
    return max(1, min(epochs, math.ceil(max_steps / steps_per_epoch)))


def run_steps(epochs: int, max_steps: int, steps_per_epoch: int) -> int:
    """Optimiser steps of a run: those of `epochs` epochs, never more than `max_steps` (> 0):
    the cap is exact (the last epoch stops at it) and the cosine schedule spans these steps."""
    total = epochs * steps_per_epoch
    return min(total, max_steps) if max_steps else total


def lr_at(step: int, total_steps: int, lr: float) -> float:
    """Cosine decay from lr to 0 over total_steps."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


# -- pieces shared by the trainers ---------------------------------------------------------------
def optimizer_step(
    optimizer: torch.optim.Optimizer,
    loss: torch.Tensor,
    step: int,
    what: str = "the training loss",
    clip: list[nn.Parameter] | None = None,
) -> None:
    """One optimiser step on `loss`, clipping the gradient norm of `clip` to GRAD_CLIP when
    given; a UserError first when the loss is not finite (one NaN step ruins every weight)."""
    if not math.isfinite(loss.item()):
        raise UserError(
            f"{what} became {loss.item()} at step {step}; "
            "lower --lr or --lambda, or raise --temperature"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None:
        torch.nn.utils.clip_grad_norm_(clip, GRAD_CLIP)
    optimizer.step()


@torch.no_grad()
def evaluation_chunks(n: int, batch: int) -> list[np.ndarray]:
    """Near-equal chunks of n pairs of at least `batch` pairs each, for evaluating a loss; none
    with fewer than 2 pairs (a CLIP loss needs a negative)."""
    return np.array_split(np.arange(n), max(1, n // batch)) if n >= 2 else []


def mean_clip_loss(
    image_head: nn.Module, text_head: nn.Module, source: PairSource, batch: int, tau: float
) -> float:
    """Mean CLIP loss of the heads over `evaluation_chunks` of `source` (NaN with fewer than 2
    pairs)."""
    chunks = evaluation_chunks(len(source), batch)
    if not chunks:
        return float("nan")
    losses = [
        clip_loss(image_head(xi), text_head(xt), tau).item() for xi, xt in source.take(chunks)
    ]
    return float(np.mean(losses))


def _optimizer(modules: list[nn.Module], lr: float, weight_decay: float) -> torch.optim.AdamW:
    # decay the matrices, not the biases (nanoGPT's rule)
    params = [p for m in modules for p in m.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0}]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS)


@dataclass
class EarlyStopping:
    """The best weights seen so far (lowest score) and when `patience` optimiser steps went by
    without a better one (patience 0: never stop early). Counted in steps, not epochs: an epoch
    is one step with few pairs and dozens with many."""

    patience: int
    best_score: float = math.inf
    best_epoch: int = 0
    best_step: int = 0
    best_state: list[dict[str, torch.Tensor]] = field(default_factory=list)

    def update(self, epoch: int, step: int, score: float, modules: list[nn.Module]) -> bool:
        """Record the score after `step` steps (in `epoch`); True when training should stop."""
        if score < self.best_score:
            self.best_score, self.best_epoch, self.best_step = score, epoch, step
            self.best_state = [copy.deepcopy(m.state_dict()) for m in modules]
            return False
        return bool(self.patience) and step - self.best_step >= self.patience

    def restore(self, modules: list[nn.Module]) -> None:
        for module, state in zip(modules, self.best_state, strict=True):
            module.load_state_dict(state)


# -- one batch's losses --------------------------------------------------------------------------
Unpaired = tuple[torch.Tensor | None, torch.Tensor | None]  # (image rows, text rows) or None


def batch_losses(
    heads: tuple[nn.Module, nn.Module],
    pair: tuple[torch.Tensor, torch.Tensor],
    settings: AlignSettings,
    targets: tuple[StructureTargets | None, StructureTargets | None] = (None, None),
    unpaired: Unpaired = (None, None),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CLIP, R_S image, R_S text) of one batch. CLIP sees the pairs only; each R_S (when
    settings.lam > 0) sees the pairs plus that modality's unpaired rows, if any: R_S needs no
    partner, the CLIP loss does. `targets`: R_S targets of the pairs computed once (no unpaired)."""
    s = settings
    z = [head(x) for head, x in zip(heads, pair, strict=True)]
    clip = clip_loss(z[0], z[1], s.temperature)
    if s.lam == 0:
        return clip, torch.zeros(()), torch.zeros(())
    rs = []
    for head, x, zx, extra, target in zip(heads, pair, z, unpaired, targets, strict=True):
        if extra is not None:
            x, zx, target = torch.cat([x, extra]), torch.cat([zx, head(extra)]), None
        if target is None:
            target = structure_targets(x, s.levels, s.temperature)
        rs.append(structure_regularizer(target, zx, s.levels, s.temperature))
    return clip, rs[0], rs[1]


@torch.no_grad()
def validation_losses(
    heads: tuple[nn.Module, nn.Module], source: PairSource, batch: int, settings: AlignSettings
) -> tuple[float, float]:
    """(CLIP loss, objective CLIP + lambda * (R_S image + R_S text) at full lambda), each the
    mean over `evaluation_chunks` of `source` (NaN with fewer than 2 pairs). The objective is
    what early stopping watches: the loss being trained, not a part of it (R_S trades CLIP
    loss for structure, so the CLIP part alone rises when R_S works)."""
    chunks = evaluation_chunks(len(source), batch)
    if not chunks:
        return float("nan"), float("nan")
    sums = np.zeros(2)
    for pair in source.take(chunks):
        clip, rs_i, rs_t = batch_losses(heads, pair, settings)
        sums += [clip.item(), (clip + settings.lam * (rs_i + rs_t)).item()]
    clip_mean, objective = sums / len(chunks)
    return float(clip_mean), float(objective)


def unpaired_batch(rows: torch.Tensor | None, size: int, generator: torch.Generator):
    """`size` rows drawn without replacement (all of them when there are fewer), or None."""
    if rows is None or len(rows) <= size:
        return rows
    return rows[torch.randperm(len(rows), generator=generator)[:size]]


# -- the loop -------------------------------------------------------------------------------------
def train_heads(
    train: PairData,
    val: PairData | None,
    settings: AlignSettings,
    progress: bool = True,
    unpaired: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
) -> TrainResult:
    """Train an image head and a text head on paired float32 features (row i of each pairs up),
    given as arrays or as a pair source (in memory or streamed from the store). `unpaired`:
    (image rows, text rows) without partners, each step's R_S of that modality also sees a
    batch of --batch-size of them (the CLIP loss never does)."""
    s = settings
    extra = tuple(None if u is None else torch.as_tensor(u, dtype=torch.float32) for u in unpaired)
    source = as_source(train)
    if len(source) < 2:
        raise UserError(f"{len(source)} training pair(s): CLIP needs at least 2; raise --n-pairs")
    val_source = as_source(val)
    if val_source is None or len(val_source) < 2:
        val_source = MemoryPairs(np.zeros((0, source.dims[0])), np.zeros((0, source.dims[1])))
    torch.manual_seed(s.seed)
    image_head = build_head(s.head, source.dims[0], s.out_dim, s.hidden_dim)
    text_head = build_head(s.head, source.dims[1], s.out_dim, s.hidden_dim)
    heads = [image_head, text_head]
    params = [*image_head.parameters(), *text_head.parameters()]
    optimizer = _optimizer(heads, s.lr, s.weight_decay)
    shuffle = torch.Generator().manual_seed(s.seed)

    n = len(source)
    steps_per_epoch, batch = batch_plan(n, s.batch_size)
    epochs = run_epochs(s.epochs, s.max_steps, steps_per_epoch)
    total_steps = run_steps(epochs, s.max_steps, steps_per_epoch)
    # early stopping and best weights only once lambda is fully on: during its warm-up the
    # validation objective (at full lambda) is not yet the one being trained
    first_candidate_step = min(s.warmup_steps, total_steps) if s.lam > 0 else 0
    full_batch = steps_per_epoch == 1
    use_rs = s.lam > 0
    if full_batch and isinstance(source, StorePairs):  # one batch: read it once, not per epoch
        source = MemoryPairs(*next(source.take([np.arange(n)])))
    # one batch = all the data: order does not matter to either loss, so the original-side
    # targets of R_S are computed once for the whole run (not with unpaired rows: they vary)
    cached: tuple[StructureTargets | None, StructureTargets | None] = (None, None)
    if use_rs and full_batch:
        cached = tuple(  # type: ignore[assignment]
            None if e is not None else structure_targets(x, s.levels, s.temperature)
            for x, e in zip((source.image, source.text), extra, strict=True)
        )
    unpaired_draw = torch.Generator().manual_seed(s.seed + 1)

    history, step, stopping = [], 0, EarlyStopping(s.patience)
    start_time = time.perf_counter()
    bar = tqdm(range(1, epochs + 1), desc="align", unit="epoch", disable=not progress)
    for epoch in bar:
        image_head.train()
        text_head.train()
        sums = np.zeros(4)  # clip, rs_image, rs_text, total
        batches = epoch_batches(n, steps_per_epoch, batch, shuffle)
        batches = batches[: total_steps - step]  # --max-steps is exact: a partial last epoch
        for bi, bt in source.take(batches):
            lam_t, lr_t = lambda_at(step, s.lam, s.warmup_steps), lr_at(step, total_steps, s.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr_t
            batch_extra = tuple(unpaired_batch(e, s.batch_size, unpaired_draw) for e in extra)
            loss_a, rs_i, rs_t = batch_losses(
                (image_head, text_head), (bi, bt), s, cached, batch_extra
            )
            loss = loss_a + lam_t * (rs_i + rs_t)
            optimizer_step(optimizer, loss, step, clip=params)
            step += 1
            sums += [loss_a.item(), rs_i.item(), rs_t.item(), loss.item()]
        image_head.eval()
        text_head.eval()
        val_loss, val_objective = validation_losses((image_head, text_head), val_source, batch, s)
        clip_mean, rs_i_mean, rs_t_mean, train_mean = sums / len(batches)
        history.append(
            {
                "epoch": epoch,
                "step": step,
                "clip_loss": clip_mean,
                "rs_image": rs_i_mean,
                "rs_text": rs_t_mean,
                "lambda": lam_t,
                "train_loss": train_mean,
                "val_loss": val_loss,
                "val_objective": val_objective,
                "lr": lr_t,
            }
        )
        bar.set_postfix(loss=f"{train_mean:.4f}", val=f"{val_loss:.4f}")
        if step < first_candidate_step:
            continue
        # without a validation set the last weights are kept
        score = val_objective if math.isfinite(val_objective) else -epoch
        if stopping.update(epoch, step, score, heads):
            break
    bar.close()
    stopping.restore(heads)
    best = history[stopping.best_epoch - 1] if stopping.best_epoch else {}
    best_val_loss = float(best.get("val_loss", math.nan))
    best_val_objective = float(best.get("val_objective", math.nan))
    return TrainResult(
        image_head=image_head.eval(),
        text_head=text_head.eval(),
        history=pd.DataFrame(history, columns=HISTORY_COLUMNS),
        best_epoch=stopping.best_epoch,
        best_val_loss=best_val_loss,
        steps=step,
        seconds=time.perf_counter() - start_time,
        info={
            "betas": list(BETAS),
            "grad_clip": GRAD_CLIP,
            "lr_schedule": "cosine to 0",
            "early_stopping": (
                f"validation objective, patience {s.patience} steps, after lambda's warm-up"
                if len(val_source)
                else "none: no validation pairs, the last weights"
            ),
            "best_epoch": stopping.best_epoch,
            "best_step": stopping.best_step,
            "best_val_loss": best_val_loss,
            "best_val_objective": best_val_objective,
        },
    )
