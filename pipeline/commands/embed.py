"""`python -m pipeline embed --run R --source SPEC --split S --out FILE.parquet`: embed any data
source into the run's shared space."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app, precision_option, progress_option
from pipeline.commands.export import RUN_HELP
from stages.model import AlignedModel, embed_source
from store.io import atomic_file, check_output


@app.command("embed")
def embed_command(
    run: Path = typer.Option(..., "--run", help=RUN_HELP),
    source: str = typer.Option(
        ..., help="digits | pairs:FILE | coco:ROOT | imagefolder:ROOT | torchvision:NAME."
    ),
    split: str = typer.Option("test", help="Split of the source."),
    out: Path = typer.Option(..., "--out", help="Parquet file to write."),
    modality: str = typer.Option("both", help="image, text or both."),
    limit: int = typer.Option(0, min=0, help="Only the first N images (or texts); 0 = all."),
    batch_size: int = typer.Option(64, min=1, help="Images or texts per forward pass."),
    num_workers: int = typer.Option(2, min=0, help="DataLoader worker processes."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = precision_option(),
    progress: bool = progress_option(),
) -> None:
    """One row per image and caption: modality, id (the file's path relative to the source, or
    the sample id), path, caption, label_name, embedding."""
    check_output(out, "file", "--out")
    model = AlignedModel.load(run, device, precision=precision)
    table = embed_source(model, source, split, modality, limit, batch_size, num_workers, progress)
    with atomic_file(out) as tmp:
        table.to_parquet(tmp, index=False)
    typer.echo(f"wrote {out}: {len(table)} rows of dim {len(table['embedding'].iloc[0])}")
