"""Stage 2b: train the two projection heads on stored features (CLIP loss + lambda * R_S).

    L = L_A(f1(X1), f2(X2)) + lambda_t * (R_S(X1, f1(X1)) + R_S(X2, f2(X2)))

Plain loop: AdamW, cosine learning rate, lambda warmed up linearly, gradient clipping, early
stopping on the validation CLIP loss (the best weights are kept). Writes into the run
directory: head.safetensors + config.json (stages.heads), history.csv and curves.png.

Rows reach the loop through a pair source: in memory (`MemoryPairs`), or, when the chosen layers
of the pairs exceed `memory_cap`, streamed from the store (`StorePairs`): each epoch's shuffled
batches are cut into windows that fit the cap, and each window is gathered with one pass over
the store blocks it touches. Both sources yield the same batches, so for one seed the weights
are the same.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch import Tensor, nn
from tqdm import tqdm

from stages.heads import build_head, save_run
from stages.losses import clip_loss, structure_regularizer, structure_targets
from store import FeatureArray, FeatureStore, UserError, pair_rows

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
    csa_ridge: float = 0.1  # --head csa: canonical ridge, relative to the mean variance

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
            (self.csa_ridge < 0, f"--csa-ridge must be >= 0, got {self.csa_ridge}"),
        ]
        for bad, message in problems:
            if bad:
                raise UserError(message)


def batch_plan(n: int, batch_size: int) -> tuple[int, int]:
    """(steps per epoch, batch size): every pair in every epoch, in batches of equal size
    (+-1) no larger than batch_size; no tiny ragged batch with few negatives, no pair left out."""
    steps = math.ceil(n / min(batch_size, n))
    return steps, math.ceil(n / steps)


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
    keys = ("model_id", "revision", "pooling", "weights", "source", "source_fingerprint",
            "model_fingerprint")  # fmt: skip
    return {k: attrs[k] for k in keys if k in attrs}


@dataclass
class StoredPairs:
    """The two stored arrays, the chosen layer of each and the rows that pair up (not read)."""

    image: FeatureArray
    text: FeatureArray
    image_layer: int
    text_layer: int
    image_rows: np.ndarray
    text_rows: np.ndarray
    info: dict[str, Any]

    @property
    def dims(self) -> tuple[int, int]:
        return self.image.layer_dims[self.image_layer], self.text.layer_dims[self.text_layer]

    def nbytes(self, n_pairs: int) -> int:
        """Memory of n pairs of the chosen layers as float32 (what in-memory training holds)."""
        return n_pairs * sum(self.dims) * 4

    def what(self, modality: str) -> str:
        array, layer = (
            (self.image, self.image_layer) if modality == "image" else (self.text, self.text_layer)
        )
        return f"{modality} features {array.path} layer {array.layer_names[layer]}"

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image, text): both chosen layers in memory as float32, one row per pair."""
        image = self.image.read_layer(self.image_layer)[self.image_rows]
        text = self.text.read_layer(self.text_layer)[self.text_rows]
        return _finite(image, self.what("image")), _finite(text, self.what("text"))


def open_pairs(
    store: FeatureStore,
    dataset: str,
    split: str,
    image_model: str,
    text_model: str,
    image_layer: str,
    text_layer: str,
) -> StoredPairs:
    """Check the arrays, layers and manifest; nothing of the features is read yet."""
    image = store.open(dataset, split, "image", image_model)
    text = store.open(dataset, split, "text", text_model)
    image_index, text_index = image.layer_index(image_layer), text.layer_index(text_layer)
    image_rows, text_rows = pair_rows(store.manifest(dataset, split))
    if len(image_rows) == 0:
        raise UserError(f"{dataset}/{split} has no image-text pairs to train on")
    for array, rows in ((image, image_rows), (text, text_rows)):
        array.require_complete()
        if rows.max() >= array.shape[0]:
            raise UserError(
                f"the manifest of {dataset}/{split} points past the {array.shape[0]} rows of "
                f"{array.path}; extract this split again with --overwrite"
            )
    info = {
        "image_layer": image.layer_names[image_index],
        "text_layer": text.layer_names[text_index],
        "image_layer_index": image_index,
        "text_layer_index": text_index,
        "store_fingerprint": {"image": _fingerprint(image.attrs), "text": _fingerprint(text.attrs)},
    }
    return StoredPairs(image, text, image_index, text_index, image_rows, text_rows, info)


# -- pair sources: where the training loop gets its batches -----------------------------------
class MemoryPairs:
    """Paired float32 rows held in memory; `take` yields the rows of each index array."""

    def __init__(self, image: np.ndarray | Tensor, text: np.ndarray | Tensor):
        self.image = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))
        self.text = torch.as_tensor(np.ascontiguousarray(text, dtype=np.float32))
        if len(self.image) != len(self.text):
            raise UserError(
                f"{len(self.image)} image rows but {len(self.text)} text rows; they must pair up"
            )
        for x, what in ((self.image, "image"), (self.text, "text")):
            if not torch.isfinite(x).all():
                raise UserError(f"the {what} training features hold NaN or inf")

    def __len__(self) -> int:
        return len(self.image)

    @property
    def dims(self) -> tuple[int, int]:
        return self.image.shape[1], self.text.shape[1]

    def take(self, batches: Sequence[np.ndarray]) -> Iterator[tuple[Tensor, Tensor]]:
        for idx in batches:
            idx = torch.as_tensor(idx)
            yield self.image[idx], self.text[idx]


class StorePairs:
    """Pairs `subset` (indices into the stored pairs) read from the store as they are needed.

    `take` gathers consecutive batches in windows of at most `window_rows` rows, each with one
    pass over the store blocks the window touches (one block of one layer read at a time), so
    memory holds about two windows (the one in use, the next) whatever the size of the store."""

    def __init__(self, pairs: StoredPairs, subset: np.ndarray, window_rows: int):
        self.pairs, self.subset, self.window_rows = pairs, np.asarray(subset), max(1, window_rows)

    def __len__(self) -> int:
        return len(self.subset)

    @property
    def dims(self) -> tuple[int, int]:
        return self.pairs.dims

    def take(self, batches: Sequence[np.ndarray]) -> Iterator[tuple[Tensor, Tensor]]:
        p, i = self.pairs, 0
        while i < len(batches):
            group = [np.asarray(batches[i])]  # at least one batch, however small the window
            while (
                i + len(group) < len(batches)
                and sum(map(len, group)) + len(batches[i + len(group)]) <= self.window_rows
            ):
                group.append(np.asarray(batches[i + len(group)]))
            pairs = self.subset[np.concatenate(group)]
            image = gather_rows(p.image, p.image_layer, p.image_rows[pairs], p.what("image"))
            text = gather_rows(p.text, p.text_layer, p.text_rows[pairs], p.what("text"))
            image, text = torch.from_numpy(image), torch.from_numpy(text)
            start = 0
            for idx in group:
                yield image[start : start + len(idx)], text[start : start + len(idx)]
                start += len(idx)
            i += len(group)


def gather_rows(array: FeatureArray, layer: int, rows: np.ndarray, what: str) -> np.ndarray:
    """array[rows, layer] as float32 in the order of `rows`, reading one store block of that
    layer at a time (one inner chunk), so memory holds the result plus one block."""
    out = np.empty((len(rows), array.layer_dims[layer]), dtype=np.float32)
    blocks = rows // array.block_rows
    order = np.argsort(blocks, kind="stable")
    found, starts = np.unique(blocks[order], return_index=True)
    for block, lo, hi in zip(found, starts, [*starts[1:], len(order)]):
        span = array.block_slice(int(block))
        where = order[lo:hi]
        values = array.read_rows(layer, span)
        out[where] = values[rows[where] - span.start]
    return _finite(out, what)


def parse_memory_cap(text: str | int) -> int:
    """Bytes from `0` (no cap), `123456`, `512MiB`, `2GiB`, `1.5GB`..."""
    from dask.utils import parse_bytes

    try:
        cap = parse_bytes(str(text).strip()) if str(text).strip() else 0
    except (ValueError, TypeError) as err:
        raise UserError(
            f"--memory-cap must be a size such as 2GiB, 512MB or 0 (no cap), got {text!r}"
        ) from err
    if cap < 0:
        raise UserError(f"--memory-cap must be >= 0 (0 = no cap), got {text!r}")
    return int(cap)


def pair_sources(
    pairs: StoredPairs, train: np.ndarray, val: np.ndarray, memory_cap: int = 0
) -> tuple[MemoryPairs | StorePairs, MemoryPairs | StorePairs]:
    """(train, validation) sources: in memory when the chosen layers of these pairs fit
    `memory_cap` bytes (0 = no cap), else streamed from the store in windows within it."""
    need = pairs.nbytes(len(train) + len(val))
    if memory_cap <= 0 or need <= memory_cap:
        image, text = pairs.load()
        return MemoryPairs(image[train], text[train]), MemoryPairs(image[val], text[val])
    window = memory_cap // (2 * pairs.nbytes(1))  # the window in use and the next one
    return StorePairs(pairs, train, window), StorePairs(pairs, val, window)


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
    image_head: nn.Module,
    text_head: nn.Module,
    source: MemoryPairs | StorePairs,
    batch: int,
    tau: float,
) -> float:
    """Mean CLIP loss over near-equal validation chunks of at least the training batch size."""
    if len(source) < 2:
        return float("nan")
    chunks = np.array_split(np.arange(len(source)), max(1, len(source) // batch))
    return float(
        np.mean([clip_loss(image_head(xi), text_head(xt), tau).item()
                 for xi, xt in source.take(chunks)])
    )  # fmt: skip


def train_heads(
    train: tuple[np.ndarray, np.ndarray] | MemoryPairs | StorePairs,
    val: tuple[np.ndarray, np.ndarray] | MemoryPairs | StorePairs | None,
    settings: AlignSettings,
    progress: bool = True,
) -> TrainResult:
    """Train an image head and a text head on paired float32 features (row i of each pairs up),
    given as arrays or as a pair source (in memory or streamed from the store)."""
    settings.check()
    source = MemoryPairs(*train) if isinstance(train, tuple) else train
    if len(source) < 2:
        raise UserError(f"{len(source)} training pair(s): CLIP needs at least 2; raise --n-pairs")
    val_source = MemoryPairs(*val) if isinstance(val, tuple) else val
    if val_source is None or len(val_source) < 2:
        val_source = MemoryPairs(np.zeros((0, source.dims[0])), np.zeros((0, source.dims[1])))
    s = settings
    torch.manual_seed(s.seed)
    image_head = build_head(s.head, source.dims[0], s.out_dim, s.hidden_dim)
    text_head = build_head(s.head, source.dims[1], s.out_dim, s.hidden_dim)
    params = [*image_head.parameters(), *text_head.parameters()]
    optimizer = _optimizer([image_head, text_head], s.lr, s.weight_decay)
    shuffle = torch.Generator().manual_seed(s.seed)

    n = len(source)
    steps_per_epoch, batch = batch_plan(n, s.batch_size)
    total_steps = s.epochs * steps_per_epoch
    # early stopping and best weights only once lambda is fully on: during its warm-up the
    # validation CLIP loss says nothing about the regularised model being trained
    first_candidate_step = min(s.warmup_steps, total_steps) if s.lam > 0 else 0
    full_batch = steps_per_epoch == 1
    use_rs = s.lam > 0
    if full_batch and isinstance(source, StorePairs):  # one batch: read it once, not per epoch
        source = MemoryPairs(*next(source.take([np.arange(n)])))
    # one batch = all the data: order does not matter to either loss, so the original-side
    # targets of R_S are computed once for the whole run
    cached = (
        (
            structure_targets(source.image, s.levels, s.temperature),
            structure_targets(source.text, s.levels, s.temperature),
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
        batches = [part.numpy() for part in torch.tensor_split(order, steps_per_epoch)]
        for bi, bt in source.take(batches):
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
        val_loss = validation_loss(image_head, text_head, val_source, batch, s.temperature)
        clip_mean, rs_i_mean, rs_t_mean, train_mean = sums / steps_per_epoch
        history.append(
            {"epoch": epoch, "step": step, "clip_loss": clip_mean, "rs_image": rs_i_mean,
             "rs_text": rs_t_mean, "lambda": lam_t, "train_loss": train_mean,
             "val_loss": val_loss, "lr": lr_t}
        )  # fmt: skip
        bar.set_postfix(loss=f"{train_mean:.4f}", val=f"{val_loss:.4f}")
        if step < first_candidate_step:
            continue
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
        best_val_loss=float(best[0]) if len(val_source) else float("nan"),
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
    memory_cap: int = 0,
) -> tuple[dict[str, Any], TrainResult]:
    """Load the pairs, split, train, and write the run directory; returns (config, result).
    When the chosen layers of the pairs exceed `memory_cap` bytes (0 = no cap), batches are
    streamed from the store instead of held in memory; the weights are the same."""
    settings.check()
    store = FeatureStore(store_path)
    pairs = open_pairs(store, dataset, split, image_model, text_model, image_layer, text_layer)
    train, val = split_pairs(
        pairs.image_rows, settings.n_pairs, settings.val_fraction, settings.seed
    )
    train_source, val_source = pair_sources(pairs, train, val, memory_cap)
    streamed = isinstance(train_source, StorePairs)
    trainer = train_heads
    if settings.head == "csa":  # closed-form CCA (+ R_S refinement), not gradient-trained heads
        from stages.csa import train_csa as trainer
    result = trainer(train_source, val_source, settings, progress=progress)
    hyper = asdict(settings)
    hyper["lambda"] = hyper.pop("lam")
    config = {
        "image_model": image_model,
        "text_model": text_model,
        "dataset": dataset,
        "split": split,
        "store": str(store_path),
        **pairs.info,
        "image_dim": int(pairs.dims[0]),
        "text_dim": int(pairs.dims[1]),
        "head_options": {},
        **hyper,
        "n_pairs_requested": settings.n_pairs,
        "n_pairs": int(len(train) + len(val)),
        "n_train": int(len(train)),
        "n_val": int(len(val)),
        "batch_size_used": batch_plan(len(train), settings.batch_size)[1],
        "betas": list(BETAS),
        "grad_clip": GRAD_CLIP,
        "lr_schedule": "cosine to 0",
        "early_stopping": "validation CLIP loss",
        "best_epoch": result.best_epoch,
        "best_val_loss": result.best_val_loss,
        "epochs_run": int(len(result.history)),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "streamed_from_store": streamed,
        **getattr(result, "info", {}),  # what a head kind adds (CSA: correlations, R_S)
        **(extra_config or {}),
    }
    out = Path(out)
    save_run(out, result.image_head, result.text_head, config)
    result.history.to_csv(out / "history.csv", index=False)
    plot_curves(result.history, out / "curves.png", result.best_epoch)
    return config, result
