"""`python -m pipeline classify --run R --labels "cat,dog" IMAGE...`: zero-shot classes."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import typer

from pipeline.app import app, precision_option
from pipeline.commands.export import RUN_HELP
from stages.encoders.arguments import checked_class_names
from stages.evaluate import prompts_record
from stages.model import AlignedModel
from stages.prompts import CLIP, SIMPLE, protocol_dataset, read_lines, resolve_templates
from store import FeatureStore, UserError
from store.io import atomic_file, check_output


def read_labels(labels: str | None, labels_file: Path | None) -> list[str]:
    """Class names from a comma-separated list and/or a file (one per line, UTF-8); blank
    entries are skipped; a name given twice, or a missing-value marker (NaN), is refused."""
    names = [n.strip() for n in (labels or "").split(",")]
    if labels_file is not None:
        names += read_lines(labels_file, "--labels-file", "give one class name per line")
    names = [n for n in names if n]
    if not names:
        raise UserError("give the class names with --labels a,b,c or --labels-file FILE")
    return checked_class_names(names, "--labels")


@app.command("classify")
def classify_command(
    images: list[Path] = typer.Argument(..., help="Image files."),
    run: Path = typer.Option(..., "--run", help=RUN_HELP),
    labels: str = typer.Option(None, help="Comma-separated class names, each once."),
    labels_file: Path = typer.Option(None, help="A UTF-8 file with one class name per line."),
    top_k: int = typer.Option(3, min=1, help="Classes shown per image."),
    csv: Path = typer.Option(None, "--csv", help="Write the table as CSV instead of printing it."),
    templates: str = typer.Option(
        SIMPLE,
        help="With --labels: simple, clip (with --protocol-dataset) or a FILE of templates "
        "with {c}, one per line.",
    ),
    protocol_dataset_name: str = typer.Option(
        "", "--protocol-dataset", help="CLIP_benchmark's dataset of --templates clip."
    ),
    prompts_dataset: str = typer.Option(
        None,
        help="Instead of --labels: the class names and templates recorded with this dataset's "
        "prompts in the store (the ones `evaluate` uses).",
        show_default=False,
    ),
    store: Path = typer.Option(Path("features.zarr"), help="Feature store of --prompts-dataset."),
    prompts_split: str = typer.Option("prompts", help="The prompts split of --prompts-dataset."),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = precision_option(),
) -> None:
    """Each image's top-k classes and probabilities (templates averaged as in `evaluate`)."""
    if csv:
        check_output(csv, "file", "--csv")
    if prompts_dataset is None:
        names = read_labels(labels, labels_file)
        wanted = protocol_dataset(protocol_dataset_name) if templates == CLIP else None
        template_list = resolve_templates(templates, wanted)
    elif labels or labels_file or templates != SIMPLE:
        raise UserError("--prompts-dataset takes the class names and templates from the store; "
                        "give it without --labels, --labels-file and --templates")  # fmt: skip
    model = AlignedModel.load(run, device, precision=precision)
    if prompts_dataset is not None:
        text_model = model.config["text_model"]
        record = prompts_record(FeatureStore(store), prompts_dataset, prompts_split, text_model)
        if record is None:
            raise UserError(
                f"{prompts_dataset}/{prompts_split} in {store} records no templates (extracted "
                "before they were); extract it again with --overwrite, or give --labels"
            )
        names, template_list = record["class_names"], record["template_list"]
    result = model.classify([str(p) for p in images], names, template_list, k=top_k)
    table = pd.DataFrame(
        [
            {"image": str(image), "rank": r + 1, "class": names[int(c)], "probability": float(p)}
            for image, probs, classes in zip(
                images, result.top_probs, result.top_classes, strict=True
            )
            for r, (p, c) in enumerate(zip(probs, classes, strict=True))
        ]
    )
    if csv:
        with atomic_file(csv) as tmp:
            table.to_csv(tmp, index=False, float_format="%.6f")
        typer.echo(f"wrote {csv}")
    else:
        typer.echo(table.to_string(index=False, float_format=lambda p: f"{p:.4f}"))
