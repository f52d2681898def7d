"""`python -m pipeline export --run R --out DIR [--with-encoders]`: a run as a standalone model."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app
from stages.model import SIDES, export_model

RUN_HELP = "Run directory written by `align` (or a directory written by `export`)."


def megabytes(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.1f} MB"


@app.command("export")
def export_command(
    run: Path = typer.Option(..., "--run", help="Run directory written by `align`."),
    out: Path = typer.Option(
        ..., "--out", help="Directory to write (an existing export there is replaced)."
    ),
    with_encoders: bool = typer.Option(
        False, help="Also save both encoders, cut after the chosen layer (safetensors)."
    ),
) -> None:
    """config.json, head.safetensors (and the truncated encoders): for from_pretrained(DIR)."""
    export = export_model(run, out, with_encoders)
    for side in SIDES:
        info = export[side]
        blocks = f"{info['blocks_run']} of {info['blocks_total']} blocks"
        line = f"{side:5} {info['spec']} layer {info['layer']}: {blocks}"
        if with_encoders:
            saved, full = info["exported_bytes"], info["full_encoder_bytes"]
            line += f", {megabytes(saved)} saved vs {megabytes(full)} whole ({saved / full:.0%})"
        typer.echo(line)
    typer.echo(f"wrote {out}")
