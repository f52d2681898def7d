"""`python -m pipeline serve --run R --index I`: the model and the index behind a JSON API and a
search page, loaded once (docs/serve.md)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app, precision_option
from pipeline.commands.export import RUN_HELP


@app.command("serve")
def serve_command(
    run: Path = typer.Option(..., "--run", help=RUN_HELP),
    index: Path = typer.Option(
        None, "--index", help="Index directory written by `index`; without it, search is off."
    ),
    host: str = typer.Option(
        "127.0.0.1", help="Address to listen on; 0.0.0.0 exposes the server to the network."
    ),
    port: int = typer.Option(8000, min=0, max=65535, help="Port; 0 picks a free one."),
    device: str = typer.Option("auto", help="Where the encoders run: auto, cpu or cuda."),
    precision: str = precision_option(),
) -> None:
    """A search page at / and a JSON API under /api (search, classify, embed, info); the run and
    the index are checked and loaded once, before the server listens."""
    from stages.serve import Service, serve  # FastAPI and uvicorn: 0.3 s no other command pays

    service = Service(run, index, device, precision=precision)
    serve(service, host, port, echo=lambda line: typer.echo(line, err=line.startswith("warn")))
