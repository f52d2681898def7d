"""`python -m pipeline store ls|migrate|verify`: what the feature store holds, its conversion
to the current layout, and its integrity. Every store command refuses a store that does not
exist, and takes `--store` from params.yaml's `common.store` unless given."""

from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path

import typer

from pipeline.app import app
from pipeline.config import load_params
from store import FeatureArray, FeatureStore
from store.features import model_key, width_summary

store_app = typer.Typer(help="Inspect the feature store.", no_args_is_help=True)
app.add_typer(store_app, name="store")
STORE_COMMANDS = ("ls", "migrate", "verify")


@store_app.callback()
def store_defaults(ctx: typer.Context) -> None:
    """Inspect the feature store."""
    # click gives a sub-command of `store` the defaults default_map["store"][command], which
    # pipeline.config does not fill: `common.store` is put there, flags still win
    root = ctx.find_root()
    source = root.get_parameter_source("params")
    given = source is not None and source.name != "DEFAULT"
    common = load_params(root.params.get("params") or Path("params.yaml"), given).get("common")
    value = (common or {}).get("store")
    if value:
        defaults = dict(ctx.default_map or {})
        for name in STORE_COMMANDS:
            defaults[name] = {"store": str(value), **(defaults.get(name) or {})}
        ctx.default_map = defaults


def human_bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} TiB"


# help texts as one summary line and one paragraph without line breaks: typer's rich help
# keeps a docstring's single line breaks, which would break sentences in the middle
LS_HELP = (
    "List every model's features in the store, with their state.\n\n"
    "Columns: dataset, split, modality, model, N, L, D (the layers' widths, or their range), "
    "dtype, size, state (complete; partial, with its count of complete blocks; damaged; or in "
    "the old layout)."
)
VERIFY_HELP = (
    "Check every completed block of every array; name what is damaged or partial.\n\n"
    "Reads every completed block (crc32c checksums, file sizes) and names the damaged arrays, "
    "layers and blocks, with the extract command that repairs them; an array not yet complete "
    "is called partial, with its count of complete blocks. Exit 1 when something is damaged "
    "or partial (with --repair: 0 once the damage is marked)."
)


@store_app.command("ls", help=LS_HELP)
def ls(store: Path = typer.Option(Path("features.zarr"), help="Feature store path.")) -> None:
    """`LS_HELP`."""
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
    converted = FeatureStore(store, write=True).migrate()
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


@store_app.command("verify", help=VERIFY_HELP)
def verify(
    store: Path = typer.Option(Path("features.zarr"), help="Feature store path."),
    repair: bool = typer.Option(
        False, help="Mark the damaged blocks incomplete, so that extract redoes exactly those."
    ),
) -> None:
    """`VERIFY_HELP`."""
    fs = FeatureStore(store, write=repair)
    new, old = fs.model_paths()
    found = partial = 0
    for path in new:
        array = FeatureArray(fs.group[path], path, fs.root)
        # --repair checks and marks under the array's lock: never while an extract writes it
        with fs.array_lock(path) if repair else nullcontext():
            damaged = array.damaged_blocks(read=True)
            if damaged and repair:
                array.mark_incomplete(list(damaged))
        done, blocks = int(array.completed_blocks().sum()), array.n_blocks
        if not damaged:
            if done == blocks:
                typer.echo(f"{path}: ok ({blocks} blocks x {len(array.layers)} layers)")
            else:
                partial += 1
                typer.echo(f"{path}: partial, {done} of {blocks} blocks complete (those ok); "
                           "finish it with:")  # fmt: skip
                typer.echo(f"  {extract_command(array)}")
            continue
        found += len(damaged)
        for block, problems in damaged.items():
            typer.echo(f"{path} block {block}: {'; '.join(problems)}")
        if repair:
            typer.echo(f"  marked {len(damaged)} blocks incomplete; repair them with:")
        else:
            typer.echo("  mark them incomplete with --repair, then run:")
        typer.echo(f"  {extract_command(array)}")
    for path in old:
        typer.echo(f"{path}: old layout, not checked; run `python -m pipeline store migrate`")
    if (found or partial) and not repair:
        raise typer.Exit(1)
