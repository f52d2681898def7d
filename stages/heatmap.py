"""The heatmap of a selection: image layers x text layers of one metric, its best pair marked."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from stages import similarity

if TYPE_CHECKING:
    from stages.select import Selection


def plot_heatmap(selection: Selection, metric: str, path: Path) -> None:
    """Image layers x text layers of one metric, its best pair marked; with a calibration
    a second panel shows the calibrated scores and the p-value of the best pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = selection.info
    scores = selection.tables.get(metric, selection.scores)
    best = info.get("by_metric", {}).get(metric, info)
    calibration = selection.calibration.get(metric)
    panels = [
        (
            scores,
            similarity.LAYER_METRICS[metric].label
            if metric in similarity.LAYER_METRICS
            else metric,
        )
    ]
    if calibration is not None:
        panels.append((calibration.calibrated, f"calibrated ({info['permutations']} perm.)"))
    li, lt = scores.shape
    width = max(5.0, 0.32 * lt + 3)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width * len(panels), max(4.0, 0.28 * li + 2)), squeeze=False
    )
    for ax, (values, label) in zip(axes[0], panels):
        im = ax.imshow(values, cmap="viridis", aspect="auto", origin="lower")
        fig.colorbar(im, ax=ax, label=f"{label} (k={info['k']}, n={info['n']})")
        ax.set_xticks(range(lt), selection.text_layers, rotation=90, fontsize=7)
        ax.set_yticks(range(li), selection.image_layers, fontsize=7)
        ax.set_xlabel(f"text layer ({info['text_model']})")
        ax.set_ylabel(f"image layer ({info['image_model']})")
        ax.scatter(
            [best["text_index"]], [best["image_index"]], marker="*", s=160, c="red",
            edgecolors="white",
        )  # fmt: skip
    title = (
        f"{info['dataset']}/{info['split']} {metric}: best (*) {best['image_layer']} x "
        f"{best['text_layer']} = {best['score']:.3f}, last pair {best['last_score']:.3f}"
    )
    if calibration is not None:
        title += f"; max-pair p = {best['p_value']:.3g}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
