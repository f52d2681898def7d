"""`python -m pipeline store ls`: what the feature store holds."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app
from store import FeatureArray, FeatureStore
from store.features import model_key, width_summary

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
            else f"damaged: {e.damaged} blocks (run `python -m pipeline store verify`)"
            if e.damaged
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


def extract_command(array: FeatureArray) -> str:
    """The extract command that wrote `array`; run again, it redoes its incomplete blocks."""
    attrs = array.attrs
    spec = attrs.get("model_spec", attrs["model"])
    parts = ["python -m pipeline extract", f"--model {spec}", f"--dataset {attrs['dataset']}",
             f"--split {attrs['split']}", f"--store {array.root}", f"--dtype {attrs['dtype']}",
             f"--block-rows {attrs['block_rows']}"]  # fmt: skip
    if attrs.get("source") and attrs["source"] != attrs["dataset"]:
        parts.append(f"--source {attrs['source']}")
    if attrs.get("name") and attrs["name"] != model_key(spec):
        parts.append(f"--name {attrs['name']}")
    if attrs.get("weights"):
        parts.append(f"--weights {attrs['weights']}")
    return " ".join(parts)


@store_app.command("verify")
def verify(
    store: Path = typer.Option(Path("features.zarr"), help="Feature store path."),
    repair: bool = typer.Option(
        False, help="Mark the damaged blocks incomplete, so that extract redoes exactly those."
    ),
) -> None:
    """Read every completed block of every array (crc32c checksums, file sizes) and name the
    damaged arrays, layers and blocks, with the extract command that repairs them. Exit 1 when
    something is damaged."""
    fs = FeatureStore(store, create=repair)
    new, old = fs.model_paths()
    found = 0
    for path in new:
        array = FeatureArray(fs.group[path], path, fs.root)
        damaged = array.damaged_blocks(read=True)
        if not damaged:
            typer.echo(f"{path}: ok ({array.n_blocks} blocks x {len(array.layers)} layers)")
            continue
        found += len(damaged)
        for block, problems in damaged.items():
            typer.echo(f"{path} block {block}: {'; '.join(problems)}")
        if repair:
            for block in damaged:
                array.done[block] = 0
            typer.echo(f"  marked {len(damaged)} blocks incomplete; repair them with:")
        else:
            typer.echo("  mark them incomplete with --repair, then run:")
        typer.echo(f"  {extract_command(array)}")
    for path in old:
        typer.echo(f"{path}: old layout, not checked; run `python -m pipeline store migrate`")
    if found and not repair:
        raise typer.Exit(1)
