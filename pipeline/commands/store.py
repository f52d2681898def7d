"""`python -m pipeline store ls`: what the feature store holds."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app
from store import FeatureStore

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
    """List every feature array: dataset, split, modality, model, N, L, D, dtype, size, state."""
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
            str(e.dim),
            e.dtype,
            human_bytes(e.bytes),
            "complete" if e.complete else f"partial {e.blocks_done}/{e.blocks} blocks",
        )
        for e in entries
    ]
    widths = [max(len(r[i]) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        typer.echo("  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip())
