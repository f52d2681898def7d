"""`python -m pipeline select`: score every (image layer, text layer) pair by mutual kNN and
pick the most similar one (scores.parquet, selection.json, heatmap.png in --out)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app
from stages.select import run_selection, top_pairs
from store import FeatureStore


@app.command()
def select(
    image_model: str = typer.Option("tiny-random-vit", help="Image model (as given to extract)."),
    text_model: str = typer.Option("tiny-random-text", help="Text model (as given to extract)."),
    dataset: str = typer.Option("digits", help="Dataset whose pairs are scored."),
    split: str = typer.Option("train", help="Split with the image-text pairs."),
    n_samples: int = typer.Option(
        5000, help="Pairs sampled, one per image (0: all; all when fewer)."
    ),
    k: str = typer.Option("rice", help="Neighbours: an integer, or rice | sqrt | sturges of n."),
    seed: int = typer.Option(0, help="Seed of the pair sample."),
    device: str = typer.Option("auto", help="kNN search on auto | cpu | cuda."),
    store: Path = typer.Option(Path("features.zarr"), help="Feature store path."),
    out: Path = typer.Option(Path("runs/select"), help="Run directory for the outputs."),
    top: int = typer.Option(10, help="How many of the best pairs to print."),
    metric: str = typer.Option(
        "mutual_knn",
        help="Metrics, a comma list (the first selects): mutual_knn, cycle_knn, lcs_knn, cknna, "
        "cka, unbiased_cka, svcca.",
    ),
    calibrate: int = typer.Option(
        0, help="Permutations of the null (0: off): calibrated scores and p-values (alpha 0.05)."
    ),
    scheduler: str = typer.Option(
        "",
        help="Build the per-layer kNN graphs on a dask cluster: a scheduler address "
        "(tcp://host:8786) or local:N. Empty: this process.",
    ),
) -> None:
    """Pick the layer pair that agrees most by a similarity metric (default mutual kNN on exact
    kNN graphs); several metrics at once, optionally calibrated against a permutation null."""
    selection = run_selection(
        FeatureStore(store),
        dataset,
        split,
        image_model,
        text_model,
        out,
        n_samples=n_samples,
        k=k,
        seed=seed,
        device=device,
        scheduler=scheduler,
        metric=metric,
        calibrate=calibrate,
    )
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
