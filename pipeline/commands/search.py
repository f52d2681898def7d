"""`python -m pipeline search --index DIR "a text"` (or `--image PATH`): top-k indexed images."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app, precision_option
from stages.heads import CHECKPOINT
from stages.index import check_model_matches, index_model_path, open_index, search
from stages.model import AlignedModel, run_id
from store import UserError


@app.command("search")
def search_command(
    query: str = typer.Argument(None, help="A text query (or --image instead)."),
    index: Path = typer.Option(..., "--index", help="Index directory written by `index`."),
    image: Path = typer.Option(None, "--image", help="Search by this image instead of a text."),
    run: Path = typer.Option(
        None,
        "--run",
        help="Run or export directory of the model; by default, the run that built the index.",
        show_default=False,
    ),
    k: int = typer.Option(10, "-k", "--top-k", min=1, help="How many results to show."),
    device: str = typer.Option("auto", help="Where the encoders run: auto, cpu or cuda."),
    precision: str = precision_option(),
) -> None:
    """Rank, score (cosine), id and path of the top-k images for the query."""
    if (query is None) == (image is None):
        raise UserError('give either a text query or --image PATH, e.g. search --index DIR "a dog"')
    if query is not None and not query.strip():
        raise UserError('the text query is empty; give some words, e.g. search --index DIR "a dog"')
    faiss_index, rows, meta = open_index(index)
    model_path = index_model_path(meta, index, run)
    if (model_path / CHECKPOINT).is_file():  # refused before any encoder is loaded
        check_model_matches(meta, run_id(model_path), index, model_path)
    model = AlignedModel.load(model_path, device, precision=precision)
    check_model_matches(meta, model.run_id, index, model_path)
    vector = model.encode_image(image) if image is not None else model.encode_text([query])
    hits = search(faiss_index, rows, vector.numpy(), k)[0]
    columns = ["rank", "score", "id", "path"] + (
        ["label_name"] if (hits["label_name"] != "").any() else []
    )
    typer.echo(hits[columns].to_string(index=False, float_format=lambda s: f"{s:.4f}"))
