"""`python -m pipeline select`: score every (image layer, text layer) pair by mutual kNN and
pick the most similar one (scores.parquet, selection.json, heatmap.png in --out)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app
from stages.pairs import PairSpec
from stages.select import SelectSettings, run_selection, top_pairs
from stages.similarity import METRICS

D = SelectSettings()


@app.command()
def select(
    image_model: str = typer.Option("tiny-random-vit", help="Image model (as given to extract)."),
    text_model: str = typer.Option("tiny-random-text", help="Text model (as given to extract)."),
    dataset: str = typer.Option("digits", help="Dataset whose pairs are scored."),
    split: str = typer.Option("train", help="Split with the image-text pairs."),
    n_samples: int = typer.Option(
        D.n_samples, help="Pairs sampled, one per image (0: all; all when fewer)."
    ),
    k: str = typer.Option(D.k, help="Neighbours: an integer, or rice | sqrt | sturges of n."),
    seed: int = typer.Option(D.seed, help="Seed of the pair sample."),
    device: str = typer.Option(D.device, help="kNN search on auto | cpu | cuda."),
    store: Path = typer.Option(Path("features.zarr"), help="Feature store path."),
    out: Path = typer.Option(Path("runs/select"), help="Run directory for the outputs."),
    top: int = typer.Option(10, help="How many of the best pairs to print."),
    metric: str = typer.Option(
        D.metric,
        help=f"Metrics, a comma list (the first selects): {', '.join(METRICS)}.",
    ),
    calibrate: int = typer.Option(
        D.calibrate,
        help="Permutations of the null (0: off): calibrated scores and p-values (alpha 0.05).",
    ),
    scheduler: str = typer.Option(
        "",
        help="Build the per-layer kNN graphs on a dask cluster: a scheduler address "
        "(tcp://host:8786) or local:N. Empty: this process.",
    ),
) -> None:
    """Pick the layer pair that agrees most by a similarity metric (default mutual kNN on exact
    kNN graphs); several metrics at once, optionally calibrated against a permutation null."""
    spec = PairSpec(
        store=store, dataset=dataset, split=split, image_model=image_model, text_model=text_model
    )
    settings = SelectSettings(
        n_samples=n_samples, k=k, seed=seed, device=device, metric=metric, calibrate=calibrate
    )
    selection = run_selection(spec, out, settings, scheduler=scheduler)
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
