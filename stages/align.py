"""Stage 2b: one training run, from stored pairs to a run directory.

Opens the pairs (stages.pairs), splits them, hands them to the trainer of the head kind
(`TRAINERS`: gradient training in stages.train, closed-form CSA in stages.csa) and writes the
run directory: head.safetensors + config.json (stages.heads), history.csv and curves.png.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from stages.csa import CSAResult, train_csa
from stages.evaluate import METRICS
from stages.heads import CHECKPOINT, CONFIG, save_run
from stages.pairs import PairSpec, StorePairs, batch_plan, open_pairs, pair_sources, split_pairs
from stages.train import AlignSettings, TrainResult, train_heads
from store import write_text_atomic
from store.io import require_directory

# head kind -> trainer(train source, validation source, settings, progress) -> result with
# image_head, text_head, history, steps, seconds and `info` (what config.json adds)
TRAINERS: dict[str, Callable[..., TrainResult | CSAResult]] = {
    "linear": train_heads,
    "mlp": train_heads,
    "csa": train_csa,  # closed-form CCA (+ R_S refinement), not gradient-trained heads
}


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
) -> tuple[dict[str, Any], TrainResult | CSAResult]:
    """Load the pairs of `spec` at `layers` (image, text), split, train, and write the run
    directory; returns (config, result). When the chosen layers of the pairs exceed `memory_cap`
    bytes (0 = no cap), batches are streamed from the store instead of held in memory; the
    weights are the same."""
    out = Path(out)
    pairs = open_pairs(spec, image_layer=layers[0], text_layer=layers[1])
    train, val = split_pairs(
        pairs.image_rows, settings.n_pairs, settings.val_fraction, settings.seed
    )
    train_source, val_source = pair_sources(pairs, train, val, memory_cap)
    clear_run_dir(out)
    result = TRAINERS[settings.head](train_source, val_source, settings, progress=progress)
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
        "n_train": int(len(train)),
        "n_val": int(len(val)),
        "batch_size_used": batch_plan(len(train), settings.batch_size)[1],
        "epochs_run": int(len(result.history)),
        "steps": result.steps,
        "train_seconds": round(result.seconds, 2),
        "streamed_from_store": isinstance(train_source, StorePairs),
        **result.info,  # the trainer's own: optimiser, early stopping, best epoch (CSA: its fit)
        **(extra_config or {}),
    }
    save_run(out, result.image_head, result.text_head, config)
    write_text_atomic(out / "history.csv", result.history.to_csv(index=False))
    plot_curves(result.history, out / "curves.png", config["best_epoch"])
    return config, result
