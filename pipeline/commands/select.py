"""`python -m pipeline select`: score every (image layer, text layer) pair by the layer metrics
of the registry (mutual kNN by default) and pick the most similar one (the selection directory:
scores.parquet, selection.json, heatmap.png in --out)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app, progress_option
from stages.calibration import ALPHA, min_permutations
from stages.pairs import PairSpec
from stages.select import SelectSettings, run_selection, top_pairs
from stages.similarity import metric_names

D = SelectSettings()


@app.command()
def select(
    image_model: str = typer.Option("tiny-random-vit", help="Image model, as given to extract."),
    text_model: str = typer.Option("tiny-random-text", help="Text model, as given to extract."),
    dataset: str = typer.Option("digits", help="Dataset whose pairs are scored."),
    split: str = typer.Option("train", help="Split with the image-text pairs."),
    n_samples: int = typer.Option(
        D.n_samples, help="Pairs sampled, one per image; 0 (or more than there are) takes all."
    ),
    k: str = typer.Option(D.k, help="Neighbours: an integer, or rice, sqrt or sturges of n."),
    seed: int = typer.Option(D.seed, help="Seed of the pair sample and of the permutations."),
    device: str = typer.Option(
        D.device, help="Where the kNN search and the metrics run: auto, cpu or cuda."
    ),
    store: Path = typer.Option(Path("features.zarr"), help="Feature store path."),
    out: Path = typer.Option(
        Path("runs/select"),
        help="Selection directory to write; it is replaced whole, so it must hold a selection "
        "or nothing.",
    ),
    top: int = typer.Option(10, help="How many of the best pairs to print."),
    metric: str = typer.Option(
        D.metric,
        help="Layer metrics, a comma list whose first one selects; registered: "
        f"{', '.join(metric_names())}.",
    ),
    calibrate: int = typer.Option(
        D.calibrate,
        help="Permutations of the null for calibrated scores and p-values at alpha "
        f"{ALPHA:g}: 0 turns it off, and anything else must be at least {min_permutations()}.",
    ),
    scheduler: str = typer.Option(
        "",
        help="Dask scheduler that builds the per-layer kNN graphs (tcp://host:8786 or "
        "local:N); empty builds them in this process.",
    ),
    progress: bool = progress_option(),
) -> None:
    """Pick the layer pair that agrees most by a layer metric (mutual kNN on exact kNN graphs
    unless --metric says otherwise), several metrics at once, optionally calibrated against a
    permutation null."""
    spec = PairSpec(
        store=store, dataset=dataset, split=split, image_model=image_model, text_model=text_model
    )
    settings = SelectSettings(
        n_samples=n_samples, k=k, seed=seed, device=device, metric=metric, calibrate=calibrate
    )
    selection = run_selection(spec, out, settings, progress=progress, scheduler=scheduler)
    info = selection.info
    table = top_pairs(selection, top)
    typer.echo(f"{info['metric']} on n={info['n']} pairs of {dataset}/{split}, k={info['k']}")
    typer.echo(table.to_string(index=False, float_format=lambda v: f"{v:.4f}"))
    typer.echo(
        f"chosen: {info['image_layer']} x {info['text_layer']} = {info['score']:.4f}"
        f"  (last pair {info['last_image_layer']} x {info['last_text_layer']} ="
        f" {info['last_score']:.4f})"
    )
    for name, best in info["by_metric"].items():
        p_value = f", max-pair p = {best['p_value']:.3g}" if "p_value" in best else ""
        typer.echo(
            f"  {name}: {best['image_layer']} x {best['text_layer']} = {best['score']:.4f}{p_value}"
        )
    typer.echo(f"wrote {out}/scores.parquet, selection.json, heatmap*.png")
