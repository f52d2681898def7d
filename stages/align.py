"""Stage 2b: train the two projection heads on stored features (CLIP loss + lambda * R_S).

    L = L_A(f1(X1), f2(X2)) + lambda_t * (R_S(X1, f1(X1)) + R_S(X2, f2(X2)))

Plain loop: AdamW, cosine learning rate, lambda warmed up linearly, gradient clipping, early
stopping on the validation CLIP loss (the best weights are kept). Writes into the run
directory: head.safetensors + config.json (stages.heads), history.csv and curves.png.
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from stages.heads import build_head, save_run
from stages.losses import clip_loss, structure_regularizer, structure_targets
from store import FeatureStore, UserError, pair_rows

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
    "lr",
]


@dataclass(frozen=True)
class AlignSettings:
    """Every hyperparameter of one training run (the `align` section of params.yaml)."""

    head: str = "linear"
    lam: float = 10.0
    levels: int = 1
    temperature: float = 0.05
    n_pairs: int = 0
    epochs: int = 100
    batch_size: int = 4096
    lr: float = 1e-3
    weight_decay: float = 1e-4
    warmup_steps: int = 1000
    patience: int = 10
    out_dim: int = 512
    hidden_dim: int = 1024
    val_fraction: float = 0.1
    seed: int = 0

    def check(self) -> None:
        problems = [
            (self.lam < 0, f"--lambda must be >= 0, got {self.lam}"),
            (not 1 <= self.levels <= 5, f"--levels must be 1 to 5, got {self.levels}"),
            (self.temperature <= 0, f"--temperature must be > 0, got {self.temperature}"),
            (self.n_pairs < 0, f"--n-pairs must be >= 0 (0 = all), got {self.n_pairs}"),
            (self.epochs < 1, f"--epochs must be >= 1, got {self.epochs}"),
            (self.batch_size < 2, f"--batch-size must be >= 2, got {self.batch_size}"),
            (self.lr <= 0, f"--lr must be > 0, got {self.lr}"),
            (self.weight_decay < 0, f"--weight-decay must be >= 0, got {self.weight_decay}"),
            (self.warmup_steps < 0, f"--warmup-steps must be >= 0, got {self.warmup_steps}"),
            (self.patience < 0, f"--patience must be >= 0 (0 = off), got {self.patience}"),
            (
                not 0 <= self.val_fraction < 1,
                f"--val-fraction must be in [0, 1), got {self.val_fraction}",
            ),
        ]
        for bad, message in problems:
            if bad:
                raise UserError(message)


@dataclass
class PairedFeatures:
    """One row per image-text pair: the chosen layers as float32, and each pair's image row."""

    image: np.ndarray
    text: np.ndarray
    image_rows: np.ndarray
    info: dict[str, Any] = field(default_factory=dict)


@dataclass
class TrainResult:
    image_head: nn.Module
    text_head: nn.Module
    history: pd.DataFrame
    best_epoch: int
    best_val_loss: float
    steps: int
    seconds: float


# -- data -------------------------------------------------------------------------------------
def _finite(values: np.ndarray, what: str) -> np.ndarray:
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise UserError(
            f"{what} has {bad.sum()} row(s) with NaN or inf (first: {rows[:5].tolist()}); "
            "extract them again (float16 overflow: --dtype float32 --overwrite)"
        )
    return values


def _fingerprint(attrs: dict[str, Any]) -> dict[str, Any]:
    keys = ("model_id", "revision", "pooling", "source", "source_fingerprint", "model_fingerprint")
    return {k: attrs[k] for k in keys if k in attrs}


def load_pairs(
    store: FeatureStore,
    dataset: str,
    split: str,
    image_model: str,
    text_model: str,
    image_layer: str,
    text_layer: str,
) -> PairedFeatures:
    """The chosen layer of each array, row-paired through the manifest (captions share images)."""
    image = store.open(dataset, split, "image", image_model)
    text = store.open(dataset, split, "text", text_model)
    image_index, text_index = image.layer_index(image_layer), text.layer_index(text_layer)
    image_rows, text_rows = pair_rows(store.manifest(dataset, split))
    if len(image_rows) == 0:
        raise UserError(f"{dataset}/{split} has no image-text pairs to train on")
    for array, rows in ((image, image_rows), (text, text_rows)):
        if rows.max() >= array.shape[0]:
            raise UserError(
                f"the manifest of {dataset}/{split} points past the {array.shape[0]} rows of "
                f"{array.path}; extract this split again with --overwrite"
            )
    image_name, text_name = image.layer_names[image_index], text.layer_names[text_index]
    image_what = f"image features {image.path} layer {image_name}"
    text_what = f"text features {text.path} layer {text_name}"
    info = {
        "image_layer": image_name,
        "text_layer": text_name,
        "image_layer_index": image_index,
        "text_layer_index": text_index,
        "store_fingerprint": {"image": _fingerprint(image.attrs), "text": _fingerprint(text.attrs)},
    }
    return PairedFeatures(
        image=_finite(image.read_layer(image_index)[image_rows], image_what),
        text=_finite(text.read_layer(text_index)[text_rows], text_what),
        image_rows=image_rows,
        info=info,
    )


def split_pairs(
    image_rows: np.ndarray, n_pairs: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) pair indices: a seeded subset of n_pairs (0 = all), then a seeded
    hold-out of about val_fraction of it, whole images at a time (its captions stay together)."""
    total = len(image_rows)
    if n_pairs > total:
        raise UserError(f"--n-pairs {n_pairs} exceeds the {total} pairs available")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(total)[: n_pairs or total]
    # at least 2 validation pairs: a CLIP loss needs a negative
    n_val = 0 if val_fraction == 0 else max(2, round(val_fraction * len(chosen)))
    groups = image_rows[chosen]
    val_groups: set[int] = set()
    count = 0
    for group in rng.permutation(np.unique(groups)):
        if count >= n_val:
            break
        val_groups.add(int(group))
        count += int((groups == group).sum())
    is_val = np.isin(groups, list(val_groups))
    train, val = np.sort(chosen[~is_val]), np.sort(chosen[is_val])
    if len(train) < 2:
        raise UserError(
            f"only {len(train)} training pair(s) after holding out {len(val)} for validation; "
            "CLIP needs at least 2: raise --n-pairs or lower --val-fraction"
        )
    return train, val


# -- schedules ----------------------------------------------------------------------------------
def lambda_at(step: int, lam: float, warmup_steps: int) -> float:
    """Linear ramp from 0 to lam over warmup_steps."""
    return lam if warmup_steps == 0 else lam * min(1.0, step / warmup_steps)


def lr_at(step: int, total_steps: int, lr: float) -> float:
    """Cosine decay from lr to 0 over total_steps."""
    return 0.5 * lr * (1.0 + math.cos(math.pi * min(step, total_steps) / total_steps))


# -- training -------------------------------------------------------------------------------
def _optimizer(modules: list[nn.Module], lr: float, weight_decay: float) -> torch.optim.AdamW:
    # decay the matrices, not the biases (nanoGPT's rule)
    params = [p for m in modules for p in m.parameters()]
    decay = [p for p in params if p.ndim >= 2]
    other = [p for p in params if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": other, "weight_decay": 0}]
    return torch.optim.AdamW(groups, lr=lr, betas=BETAS)


@torch.no_grad()
def validation_loss(
    image_head: nn.Module, text_head: nn.Module, xi: Tensor, xt: Tensor, batch: int, tau: float
) -> float:
    """Mean CLIP loss over near-equal validation chunks of at least the training batch size."""
    if len(xi) < 2:
        return float("nan")
    chunks = torch.arange(len(xi)).tensor_split(max(1, len(xi) // batch))
    return float(
        np.mean([clip_loss(image_head(xi[c]), text_head(xt[c]), tau).item() for c in chunks])
    )


def train_heads(
    train: tuple[np.ndarray, np.ndarray],
    val: tuple[np.ndarray, np.ndarray] | None,
    settings: AlignSettings,
    progress: bool = True,
) -> TrainResult:
    """Train an image head and a text head on paired float32 features (row i of each pairs up)."""
    settings.check()
    xi, xt = (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in train)
    if len(xi) != len(xt):
        raise UserError(f"{len(xi)} image rows but {len(xt)} text rows; they must pair up")
    if len(xi) < 2:
        raise UserError(f"{len(xi)} training pair(s): CLIP needs at least 2; raise --n-pairs")
    for x, what in ((xi, "image"), (xt, "text")):
        if not torch.isfinite(x).all():
            raise UserError(f"the {what} training features hold NaN or inf")
    vi, vt = (
        (torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32)) for a in val)
        if val is not None and len(val[0]) >= 2
        else (xi[:0], xt[:0])
    )
    s = settings
    torch.manual_seed(s.seed)
    image_head = build_head(s.head, xi.shape[1], s.out_dim, s.hidden_dim)
    text_head = build_head(s.head, xt.shape[1], s.out_dim, s.hidden_dim)
    params = [*image_head.parameters(), *text_head.parameters()]
    optimizer = _optimizer([image_head, text_head], s.lr, s.weight_decay)
    shuffle = torch.Generator().manual_seed(s.seed)

    n = len(xi)
    batch = min(s.batch_size, n)
    steps_per_epoch = n // batch  # drop the ragged end: a tiny last batch has few negatives
    total_steps = s.epochs * steps_per_epoch
    full_batch = steps_per_epoch == 1 and batch == n
    use_rs = s.lam > 0
    # one batch = all the data: order does not matter to either loss, so the original-side
    # targets of R_S are computed once for the whole run
    cached = (
        (
            structure_targets(xi, s.levels, s.temperature),
            structure_targets(xt, s.levels, s.temperature),
        )
        if use_rs and full_batch
        else None
    )

    history, step, best = [], 0, (math.inf, 0, None)
    start_time, bad_epochs = time.perf_counter(), 0
    bar = tqdm(range(1, s.epochs + 1), desc="align", unit="epoch", disable=not progress)
    for epoch in bar:
        image_head.train()
        text_head.train()
        order = torch.arange(n) if full_batch else torch.randperm(n, generator=shuffle)
        sums = np.zeros(4)  # clip, rs_image, rs_text, total
        for b in range(steps_per_epoch):
            idx = order[b * batch : (b + 1) * batch]
            bi, bt = xi[idx], xt[idx]
            lam_t, lr_t = lambda_at(step, s.lam, s.warmup_steps), lr_at(step, total_steps, s.lr)
            for group in optimizer.param_groups:
                group["lr"] = lr_t
            zi, zt = image_head(bi), text_head(bt)
            loss_a = clip_loss(zi, zt, s.temperature)
            if use_rs:
                ti, tt = cached or (
                    structure_targets(bi, s.levels, s.temperature),
                    structure_targets(bt, s.levels, s.temperature),
                )
                rs_i = structure_regularizer(ti, zi, s.levels, s.temperature)
                rs_t = structure_regularizer(tt, zt, s.levels, s.temperature)
                loss = loss_a + lam_t * (rs_i + rs_t)
            else:
                rs_i = rs_t = torch.zeros(())
                loss = loss_a
            if not math.isfinite(loss.item()):
                raise UserError(
                    f"the training loss became {loss.item()} at step {step}; "
                    "lower --lr or --lambda, or raise --temperature"
                )
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
            optimizer.step()
            step += 1
            sums += [loss_a.item(), rs_i.item(), rs_t.item(), loss.item()]
        image_head.eval()
        text_head.eval()
        val_loss = validation_loss(image_head, text_head, vi, vt, batch, s.temperature)
        clip_mean, rs_i_mean, rs_t_mean, train_mean = sums / steps_per_epoch
        history.append(
            {"epoch": epoch, "step": step, "clip_loss": clip_mean, "rs_image": rs_i_mean,
             "rs_text": rs_t_mean, "lambda": lam_t, "train_loss": train_mean,
             "val_loss": val_loss, "lr": lr_t}
        )  # fmt: skip
        bar.set_postfix(loss=f"{train_mean:.4f}", val=f"{val_loss:.4f}")
        # without a validation set the last weights are kept
        score = val_loss if math.isfinite(val_loss) else -epoch
        if score < best[0]:
            state = (copy.deepcopy(image_head.state_dict()), copy.deepcopy(text_head.state_dict()))
            best, bad_epochs = (score, epoch, state), 0
        else:
            bad_epochs += 1
            if s.patience and bad_epochs >= s.patience:
                break
    bar.close()
    image_head.load_state_dict(best[2][0])
    text_head.load_state_dict(best[2][1])
    return TrainResult(
        image_head=image_head.eval(),
        text_head=text_head.eval(),
        history=pd.DataFrame(history, columns=HISTORY_COLUMNS),
        best_epoch=best[1],
        best_val_loss=float(best[0]) if len(vi) else float("nan"),
        steps=step,
        seconds=time.perf_counter() - start_time,
    )


# -- outputs ----------------------------------------------------------------------------------
def plot_curves(history: pd.DataFrame, path: Path, best_epoch: int | None = None) -> None:
    """Loss curves (train, validation, CLIP, lambda * R_S) and the lr / lambda schedules."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_loss, ax_rs, ax_sched) = plt.subplots(1, 3, figsize=(14, 4))
    e = history["epoch"]
    ax_loss.plot(e, history["train_loss"], label="train loss")
    ax_loss.plot(e, history["clip_loss"], label="train CLIP loss")
    ax_loss.plot(e, history["val_loss"], label="validation CLIP loss")
    if best_epoch:
        ax_loss.axvline(best_epoch, color="grey", linestyle=":", label=f"best epoch {best_epoch}")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="losses")
    ax_rs.plot(e, history["rs_image"], label="R_S image")
    ax_rs.plot(e, history["rs_text"], label="R_S text")
    ax_rs.set(xlabel="epoch", ylabel="R_S (nats)", title="STRUCTURE regularizer")
    ax_sched.plot(e, history["lr"], label="learning rate", color="tab:green")
    ax_sched.set(xlabel="epoch", ylabel="learning rate", title="schedules")
    ax_lam = ax_sched.twinx()
    ax_lam.plot(e, history["lambda"], label="lambda", color="tab:red")
    ax_lam.set_ylabel("lambda")
    for ax in (ax_loss, ax_rs, ax_sched, ax_lam):
        ax.legend(loc="best", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_align(
    store_path: str | Path,
    dataset: str,
    split: str,
    image_model: str,
    text_model: str,
    image_layer: str,
    text_layer: str,
    settings: AlignSettings,
    out: str | Path,
    progress: bool = True,
    extra_config: dict[str, Any] | None = None,
) -> tuple[dict[str, Any], TrainResult]:
    """Load the pairs, split, train, and write the run directory; returns (config, result)."""
    settings.check()
    store = FeatureStore(store_path)
    pairs = load_pairs(store, dataset, split, image_model, text_model, image_layer, text_layer)
    train, val = split_pairs(
        pairs.image_rows, settings.n_pairs, settings.val_fraction, settings.seed
    )
    result = train_heads(
        (pairs.image[train], pairs.text[train]),
        (pairs.image[val], pairs.text[val]) if len(val) else None,
        settings,
        progress=progress,
    )
    hyper = asdict(settings)
    hyper["lambda"] = hyper.pop("lam")
    config = {
        "image_model": image_model,
        "text_model": text_model,
        "dataset": dataset,
        "split": split,
        "store": str(store_path),
        **pairs.info,
        "image_dim": int(pairs.image.shape[1]),
        "text_dim": int(pairs.text.shape[1]),
        "head_options": {},
        **hyper,
        "n_pairs_requested": settings.n_pairs,
        "n_pairs": int(len(train) + len(val)),
        "n_train": int(len(train)),
        "n_val": int(len(val)),
        "batch_size_used": int(min(settings.batch_size, len(train))),
        "betas": list(BETAS),
        "grad_clip": GRAD_CLIP,
        "lr_schedule": "cosine to 0",
        "early_stopping": "validation CLIP loss",
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "epochs_run": int(len(result.history)),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        **(extra_config or {}),
    }
    out = Path(out)
    save_run(out, result.image_head, result.text_head, config)
    result.history.to_csv(out / "history.csv", index=False)
    plot_curves(result.history, out / "curves.png", result.best_epoch)
    return config, result
