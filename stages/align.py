"""Stage 2b: one training run, from stored pairs to a run directory.

Opens the pairs (stages.pairs), splits them, hands them to the trainer of the head kind
(`TRAINERS`: gradient training in stages.train, closed-form CSA in stages.csa) and writes the
run directory: head.safetensors + config.json (stages.heads), history.csv and curves.png.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.csa import CSAResult, train_csa
from stages.evaluate import METRICS
from stages.heads import CHECKPOINT, CONFIG, save_run
from stages.pairs import (
    MemoryPairs,
    PairSpec,
    StorePairs,
    batch_plan,
    load_extra_pairs,
    load_unpaired,
    open_pairs,
    pair_sources,
    split_pairs,
)
from stages.train import AlignSettings, TrainResult, train_heads
from store import UserError, write_text_atomic
from store.io import require_directory

# head kind -> trainer(train source, validation source, settings, progress) -> result with
# image_head, text_head, history, steps, seconds and `info` (what config.json adds)
TRAINERS: dict[str, Callable[..., TrainResult | CSAResult]] = {
    "linear": train_heads,
    "mlp": train_heads,
    "lowrank": train_heads,  # the paper's "MLP": linear map + gated low-rank residual
    "csa": train_csa,  # closed-form CCA (+ R_S refinement), not gradient-trained heads
}
UNPAIRED_HEADS = ("linear", "mlp", "lowrank")  # the trainers that take unpaired rows for R_S


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
    ax_loss.plot(e, history["val_objective"], label="validation objective (early stopping)")
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


def pairs_digest(train: np.ndarray, val: np.ndarray) -> str:
    """A short hash of the set of pair indices a run drew (train and validation together)."""
    chosen = np.sort(np.concatenate([train, val])).astype(np.int64)
    return hashlib.sha256(chosen.tobytes()).hexdigest()[:16]


# what a run directory holds; config.json first: without it the folder is no finished run
RUN_FILES = (CONFIG, METRICS, CHECKPOINT, "history.csv", "curves.png")


def clear_run_dir(out: Path) -> None:
    """Refuse an --out that is a file, and delete the previous run's outputs before training:
    an interrupted or failed re-run never leaves the old metrics beside a new config."""
    require_directory(out)
    for name in RUN_FILES:
        (out / name).unlink(missing_ok=True)


def run_align(
    spec: PairSpec,
    layers: tuple[str, str],
    settings: AlignSettings,
    out: str | Path,
    *,
    progress: bool = True,
    extra_config: dict[str, Any] | None = None,
    memory_cap: int = 0,
    unpaired: tuple[str | None, str | None] = (None, None),
    extra_pairs: str | None = None,
    extra_n: int = 0,
) -> tuple[dict[str, Any], TrainResult | CSAResult]:
    """Load the pairs of `spec` at `layers` (image, text), split, train, and write the run
    directory; returns (config, result). When the chosen layers of the pairs exceed `memory_cap`
    bytes (0 = no cap), batches are streamed from the store instead of held in memory; the
    weights are the same.

    unpaired: (images, texts) as DATASET/SPLIT of the same models: unpaired rows for R_S.
    extra_pairs, extra_n: DATASET/SPLIT of the same models, extra_n (0 = all) of its pairs added
    to the training pairs (the paper's in-domain mixing; validation stays on `spec`)."""
    out = Path(out)
    pairs = open_pairs(spec, image_layer=layers[0], text_layer=layers[1])
    train, val = split_pairs(
        pairs.image_rows,
        settings.n_pairs,
        settings.val_fraction,
        settings.seed,
        settings.min_val_pairs,
    )
    train_source, val_source = pair_sources(pairs, train, val, memory_cap)
    names = (pairs.info["image_layer"], pairs.info["text_layer"])
    added: dict[str, Any] = {}
    if extra_pairs:
        if not isinstance(train_source, MemoryPairs):
            raise UserError("--extra-pairs needs the training pairs in memory: raise --memory-cap")
        image, text = load_extra_pairs(spec, extra_pairs, extra_n, names, settings.seed)
        train_source = MemoryPairs(
            np.concatenate([train_source.image.numpy(), image]),
            np.concatenate([train_source.text.numpy(), text]),
        )
        added.update(extra_pairs=extra_pairs, extra_n=len(image))
    kwargs = {}
    if any(unpaired):
        if settings.head not in UNPAIRED_HEADS or settings.lam == 0:
            raise UserError(
                "--unpaired-images/--unpaired-texts feed R_S: they need --lambda > 0 and a "
                f"gradient-trained head ({', '.join(UNPAIRED_HEADS)})"
            )
        rows = [
            load_unpaired(spec, modality, where, name, f"--unpaired-{modality}s") if where else None
            for modality, where, name in zip(("image", "text"), unpaired, names, strict=True)
        ]
        kwargs["unpaired"] = tuple(rows)
        added.update(
            unpaired_images=unpaired[0],
            unpaired_texts=unpaired[1],
            n_unpaired=[0 if r is None else len(r) for r in rows],
        )
    clear_run_dir(out)
    result = TRAINERS[settings.head](
        train_source, val_source, settings, progress=progress, **kwargs
    )
    hyper = asdict(settings)
    hyper["lambda"] = hyper.pop("lam")
    config = {
        "image_model": spec.image_model,
        "text_model": spec.text_model,
        "dataset": spec.dataset,
        "split": spec.split,
        "store": str(spec.store),
        **pairs.info,
        "image_dim": int(pairs.dims[0]),
        "text_dim": int(pairs.dims[1]),
        **hyper,
        "n_pairs_requested": settings.n_pairs,
        "n_pairs": int(len(train) + len(val)),
        "n_train": int(len(train_source)),
        # which pairs (train + validation): equal digests, equal subsets (the sweep's check)
        "pairs_digest": pairs_digest(train, val),
        "n_val": int(len(val)),
        "batch_size_used": batch_plan(len(train_source), settings.batch_size)[1],
        "epochs_run": int(len(result.history)),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "streamed_from_store": isinstance(train_source, StorePairs),
        **result.info,  # the trainer's own: optimiser, early stopping, best epoch (CSA: its fit)
        **added,
        **(extra_config or {}),
    }
    save_run(out, result.image_head, result.text_head, config)
    write_text_atomic(out / "history.csv", result.history.to_csv(index=False))
    plot_curves(result.history, out / "curves.png", config["best_epoch"])
    return config, result
