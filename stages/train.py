"""Gradient training of the two projection heads on paired features (CLIP loss + lambda * R_S).

    L = L_A(f1(X1), f2(X2)) + lambda_t * (R_S(X1, f1(X1)) + R_S(X2, f2(X2)))

Plain loop (nanoGPT's shape): AdamW, cosine learning rate, lambda warmed up linearly, gradient
clipping, early stopping on the validation objective (the best weights are kept). Also the
pieces other trainers share: the settings, the schedules, the mean CLIP loss of a pair source
and the guarded optimiser step.

`train_heads` trains one pair of heads; `train_lambda_stack` trains one pair per λ of a list at
once, in the same loop (stages.head_stack: the copies share the batches and the R_S targets; a
list of one is `train_heads`, bit for bit). `align --lambda auto` trains its grid that way.

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

import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import nn
from tqdm import tqdm

from stages.head_stack import HeadStack, clip_grad_norms
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


class TrainingStopped(Exception):
    """A training ended from outside (train_lambda_stack's `stop`): its caller stops too."""


SEEDING = threading.Lock()  # torch's global generator: one seeding and initialisation at a time
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
    clip: list[torch.Tensor] | None = None,
    stacked: bool = False,
) -> None:
    """One optimiser step on `loss`, clipping the gradient norm of `clip` to GRAD_CLIP when
    given (of each copy's, when `clip` holds stacked heads' parameters); a UserError first
    when the loss is not finite (one NaN step ruins every weight)."""
    if not math.isfinite(loss.item()):
        raise UserError(
            f"{what} became {loss.item()} at step {step}; "
            "lower --lr or --lambda, or raise --temperature"
        )
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if clip is not None and stacked:
        clip_grad_norms(clip, GRAD_CLIP)
    elif clip is not None:
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


def _optimizer(stacks: list[HeadStack], lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over stacked heads, decaying the matrices, not the biases (nanoGPT's rule; by the
    head's own shapes, not the stacked ones). A stack of several copies uses the fused AdamW
    (one pass over each tensor, 5x faster on the CPU; the same update up to rounding); one copy
    keeps torch's default, as a run always has: its weights stay those of earlier runs, bit
    for bit."""
    decay = [p for st in stacks for k, p in st.params.items() if st.decayed[k]]
    other = [p for st in stacks for k, p in st.params.items() if not st.decayed[k]]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0}]
    fused = stacks[0].size > 1 or None
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS, fused=fused)


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

    def update(
        self,
        epoch: int,
        step: int,
        score: float,
        state: Callable[[], list[dict[str, torch.Tensor]]],
    ) -> bool:
        """Record the score after `step` steps (in `epoch`) and, when it is the best so far, the
        weights `state()` returns (copies); True when training should stop."""
        if score < self.best_score:
            self.best_score, self.best_epoch, self.best_step = score, epoch, step
            self.best_state = state()
            return False
        return bool(self.patience) and step - self.best_step >= self.patience


# -- one batch's losses --------------------------------------------------------------------------
Unpaired = tuple[torch.Tensor | None, torch.Tensor | None]  # (image rows, text rows) or None
Heads = nn.Module | HeadStack  # one head, or stacked copies of it


def batch_losses(
    heads: tuple[Heads, Heads],
    pair: tuple[torch.Tensor, torch.Tensor],
    settings: AlignSettings,
    targets: tuple[StructureTargets | None, StructureTargets | None] = (None, None),
    unpaired: Unpaired = (None, None),
    rs: bool | torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(CLIP, R_S image, R_S text) of one batch; each of shape (G,) for G stacked heads. CLIP
    sees the pairs only; each R_S sees the pairs plus that modality's unpaired rows, if any: R_S
    needs no partner, the CLIP loss does. `rs`: whether R_S is computed (default settings.lam >
    0), or for stacked heads a mask of the copies that need it (0 for the others: a copy at
    λ 0 pays nothing for it). `targets`: R_S targets of the pairs computed once (no unpaired)."""
    s = settings
    z = [head(x) for head, x in zip(heads, pair, strict=True)]
    clip = clip_loss(z[0], z[1], s.temperature)
    on, some = (s.lam > 0 if rs is None else rs), None
    if isinstance(on, torch.Tensor):  # stacked copies: those with λ > 0, unless all are
        some = None if on.all() else on.nonzero().squeeze(1)
        on = bool(on.any())
    if not on:
        return clip, torch.zeros(clip.shape), torch.zeros(clip.shape)
    rs_values = []
    for head, x, zx, extra, target in zip(heads, pair, z, unpaired, targets, strict=True):
        if extra is not None:
            x, target = torch.cat([x, extra]), None
            zx = torch.cat([zx, head(extra)], dim=-2)
        if target is None:
            target = structure_targets(x, s.levels, s.temperature)
        if some is None:
            rs_values.append(structure_regularizer(target, zx, s.levels, s.temperature))
        else:
            value = structure_regularizer(target, zx[some], s.levels, s.temperature)
            rs_values.append(torch.zeros(clip.shape).index_put((some,), value))
    return clip, rs_values[0], rs_values[1]


@torch.no_grad()
def validation_losses(
    heads: tuple[Heads, Heads],
    source: PairSource,
    batch: int,
    settings: AlignSettings,
    lambdas: torch.Tensor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """(CLIP loss, objective CLIP + lambda * (R_S image + R_S text) at full lambda), each the
    mean over `evaluation_chunks` of `source` (NaN with fewer than 2 pairs): 0-d arrays, or of
    shape (G,) for stacked heads trained at `lambdas`. The objective is what early stopping
    watches: the loss being trained, not a part of it (R_S trades CLIP loss for structure, so
    the CLIP part alone rises when R_S works)."""
    lam = settings.lam if lambdas is None else lambdas
    rs = settings.lam > 0 if lambdas is None else lambdas > 0
    chunks = evaluation_chunks(len(source), batch)
    if not chunks:
        nan = np.full(() if lambdas is None else len(lambdas), np.nan)
        return nan, nan.copy()
    sums = np.zeros(2)
    for pair in source.take(chunks):
        clip, rs_i, rs_t = batch_losses(heads, pair, settings, rs=rs)
        objective = clip + lam * (rs_i + rs_t)
        sums = sums + np.stack([clip.numpy(), objective.numpy()]).astype(np.float64).T
    means = sums / len(chunks)
    return means[..., 0], means[..., 1]


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
    return train_lambda_stack(train, val, settings, (settings.lam,), progress, unpaired)[0]


def train_lambda_stack(
    train: PairData,
    val: PairData | None,
    settings: AlignSettings,
    lambdas: Sequence[float],
    progress: bool = True,
    unpaired: tuple[np.ndarray | None, np.ndarray | None] = (None, None),
    stop: threading.Event | None = None,
) -> list[TrainResult]:
    """train_heads at every λ of `lambdas` (settings.lam ignored), in one loop: the result of
    each as a separate run would give it (the same seed, batches and schedule; equal up to
    float rounding, since the copies run as one batched computation). Each copy stops early,
    and keeps its best weights, on its own validation objective. `stop`: set from another
    thread, it ends the loop at the next step with TrainingStopped."""
    s = settings
    if not lambdas:
        raise ValueError("train_lambda_stack needs at least one lambda")
    for lam in lambdas:
        replace(s, lam=lam)  # checks each λ as AlignSettings does
    lams = torch.tensor(lambdas, dtype=torch.float32)
    size = len(lambdas)
    extra = tuple(None if u is None else torch.as_tensor(u, dtype=torch.float32) for u in unpaired)
    source = as_source(train)
    if len(source) < 2:
        raise UserError(f"{len(source)} training pair(s): CLIP needs at least 2; raise --n-pairs")
    val_source = as_source(val)
    if val_source is None or len(val_source) < 2:
        val_source = MemoryPairs(np.zeros((0, source.dims[0])), np.zeros((0, source.dims[1])))
    with SEEDING:  # threads (lambda_cv's lanes) must not reseed between seed and draws
        torch.manual_seed(s.seed)
        image_head = build_head(s.head, source.dims[0], s.out_dim, s.hidden_dim)
        text_head = build_head(s.head, source.dims[1], s.out_dim, s.hidden_dim)
        # a stack's own draws (dropout masks) go on where one run's would: from this state
        draws = torch.Generator().set_state(torch.get_rng_state()) if size > 1 else None
    heads = (HeadStack(image_head, size, draws), HeadStack(text_head, size, draws))
    params = [p for stack in heads for p in stack.parameters()]
    optimizer = _optimizer(list(heads), s.lr, s.weight_decay)
    shuffle = torch.Generator().manual_seed(s.seed)

    n = len(source)
    steps_per_epoch, batch = batch_plan(n, s.batch_size)
    epochs = run_epochs(s.epochs, s.max_steps, steps_per_epoch)
    total_steps = run_steps(epochs, s.max_steps, steps_per_epoch)
    # early stopping and best weights only once lambda is fully on: during its warm-up the
    # validation objective (at full lambda) is not yet the one being trained
    first_candidate = [min(s.warmup_steps, total_steps) if lam > 0 else 0 for lam in lambdas]
    full_batch = steps_per_epoch == 1
    use_rs = max(lambdas) > 0
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
    rs = use_rs if size == 1 else lams > 0  # a copy at λ 0 computes no R_S, as its run would

    def states(g: int) -> Callable[[], list[dict[str, torch.Tensor]]]:
        return lambda: [stack.state(g) for stack in heads]

    history: list[list[dict]] = [[] for _ in lambdas]
    stopping = [EarlyStopping(s.patience) for _ in lambdas]
    stopped_at = [0] * size  # the step a copy stopped at (0: still training)
    step = 0
    start_time = time.perf_counter()
    bar = tqdm(range(1, epochs + 1), desc="align", unit="epoch", disable=not progress)
    for epoch in bar:
        for stack in heads:
            stack.train()
        sums = np.zeros((size, 4))  # clip, rs_image, rs_text, total
        batches = epoch_batches(n, steps_per_epoch, batch, shuffle)
        batches = batches[: total_steps - step]  # --max-steps is exact: a partial last epoch
        for bi, bt in source.take(batches):
            if stop is not None and stop.is_set():
                raise TrainingStopped(f"stopped at step {step}")
            lam_t = [lambda_at(step, lam, s.warmup_steps) for lam in lambdas]
            lr_t = lr_at(step, total_steps, s.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr_t
            batch_extra = tuple(unpaired_batch(e, s.batch_size, unpaired_draw) for e in extra)
            loss_a, rs_i, rs_t = batch_losses(heads, (bi, bt), s, cached, batch_extra, rs)
            # one pair of heads: λ a Python number, the arithmetic of the unstacked loop
            weight = lam_t[0] if size == 1 else torch.tensor(lam_t)
            loss = loss_a + weight * (rs_i + rs_t)
            what = "the training loss" if size == 1 else "the training loss of a lambda"
            optimizer_step(optimizer, loss.sum(), step, what, clip=params, stacked=True)
            step += 1
            parts = [loss_a, rs_i, rs_t, loss]
            sums += np.stack([t.detach().reshape(size).numpy() for t in parts], axis=1)
        for stack in heads:
            stack.eval()
        val_loss, val_objective = validation_losses(
            heads, val_source, batch, s, None if size == 1 else lams
        )
        val_loss, val_objective = val_loss.reshape(size), val_objective.reshape(size)
        means = sums / len(batches)
        for g in range(size):
            if stopped_at[g]:
                continue
            clip_mean, rs_i_mean, rs_t_mean, train_mean = means[g]
            history[g].append(
                {
                    "epoch": epoch,
                    "step": step,
                    "clip_loss": clip_mean,
                    "rs_image": rs_i_mean,
                    "rs_text": rs_t_mean,
                    "lambda": lam_t[g],
                    "train_loss": train_mean,
                    "val_loss": float(val_loss[g]),
                    "val_objective": float(val_objective[g]),
                    "lr": lr_t,
                }
            )
            if step < first_candidate[g] or (not len(val_source) and epoch < epochs):
                continue  # without a validation set the last weights are kept: copied once
            score = val_objective[g] if math.isfinite(val_objective[g]) else -epoch
            if stopping[g].update(epoch, step, float(score), states(g)):
                stopped_at[g] = step
        bar.set_postfix(loss=f"{means[0, 3]:.4f}", val=f"{val_loss[0]:.4f}")
        if all(stopped_at):
            break
    bar.close()
    seconds = time.perf_counter() - start_time
    return [
        _result(heads, stopping[g], history[g], stopped_at[g] or step, seconds, s, val_source)
        for g in range(size)
    ]


def _result(
    heads: tuple[HeadStack, HeadStack],
    stopping: EarlyStopping,
    history: list[dict],
    steps: int,
    seconds: float,
    s: AlignSettings,
    val_source: PairSource,
) -> TrainResult:
    """One copy's TrainResult: its best weights as heads, its history and early stopping."""
    image_head, text_head = (
        stack.module(state) for stack, state in zip(heads, stopping.best_state, strict=True)
    )
    best = history[stopping.best_epoch - 1] if stopping.best_epoch else {}
    best_val_loss = float(best.get("val_loss", math.nan))
    best_val_objective = float(best.get("val_objective", math.nan))
    return TrainResult(
        image_head=image_head,
        text_head=text_head,
        history=pd.DataFrame(history, columns=HISTORY_COLUMNS),
        best_epoch=stopping.best_epoch,
        best_val_loss=best_val_loss,
        steps=steps,
        seconds=seconds,
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
