"""`python -m pipeline index --run R --split S --out DIR`: a FAISS index of stored images."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app, run_option
from stages.index import EXACT_MAX, build_index


@app.command("index")
def index_command(
    ctx: typer.Context,
    run: Path = typer.Option(..., "--run", help="Run directory written by `align`."),
    dataset: str = typer.Option(
        None,
        help="Dataset in the store; by default, the one the run was trained on.",
        show_default=False,
    ),
    split: str = typer.Option("test", help="Split whose images to index."),
    store: Path = typer.Option(Path("features.zarr"), help="Feature store path."),
    out: Path = typer.Option(..., "--out", help="Index directory to write."),
    exact_max: int = typer.Option(
        EXACT_MAX,
        min=1,
        help="Exact search up to this many rows; above, an IVF index (its recall is reported).",
    ),
) -> None:
    """The run's image head on the split's stored features (nothing re-encoded), indexed."""
    meta = build_index(run, store, run_option(ctx, "dataset", dataset), split, out, exact_max)
    where = f"{meta['dataset']}/{meta['split']}"
    line = f"{meta['rows']} images of {where}, dim {meta['dim']}, {meta['kind']}"
    if meta["recall_at_10_vs_exact"] is not None:
        line += f", recall@10 vs exact {meta['recall_at_10_vs_exact']:.3f}"
    typer.echo(line)
    typer.echo(f"wrote {out}")
