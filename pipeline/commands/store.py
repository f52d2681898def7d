"""`python -m pipeline store ls`: what the feature store holds."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app
from store import FeatureStore
from store.features import width_summary

store_app = typer.Typer(help="Inspect the feature store.", no_args_is_help=True)
app.add_typer(store_app, name="store")


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


@store_app.command("ls")
def ls(store: Path = typer.Option(Path("features.zarr"), help="Feature store path.")) -> None:
    """List every model's features: dataset, split, modality, model, N, L, D (the layers'
    widths, or their range), dtype, size, state."""
    entries = FeatureStore(store).entries()
    if not entries:
        typer.echo(f"{store}: empty")
        return
    header = ("dataset", "split", "modality", "model", "N", "L", "D", "dtype", "size", "state")
    rows = [
        (
            e.dataset,
            e.split,
            e.modality,
            e.model,
            str(e.n),
            str(e.layers),
            width_summary(e.layer_dims),
            e.dtype,
            human_bytes(e.bytes),
            "old layout: run `python -m pipeline store migrate`"
            if e.old_layout
            else "complete"
            if e.complete
            else f"partial {e.blocks_done}/{e.blocks} blocks",
        )
        for e in entries
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())


@store_app.command("migrate")
def migrate(store: Path = typer.Option(Path("features.zarr"), help="Feature store path.")) -> None:
    """Convert features in the old (N, L, D) layout to one array per layer, in place."""
    converted = FeatureStore(store, create=True).migrate()
    for path in converted:
        typer.echo(f"{store}/{path}: converted to one array per layer")
    if not converted:
        typer.echo(f"{store}: nothing to convert")
