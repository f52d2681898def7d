"""`python -m pipeline extract`: run a frozen encoder once and store every layer's embedding."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app, precision_option, progress_option
from stages.extract import ExtractOptions, extract
from stages.prompts import SIMPLE, SOURCE, PromptSpec, is_prompts_split
from store import UserError


@app.command("extract")
def extract_command(
    model: str = typer.Option(
        "tiny-random-vit",
        "--model",
        "-m",
        help="Alias (dinov2, dinov2-small|base|large|giant, roberta-large, minilm, "
        "tiny-random-vit, tiny-random-text), Hugging Face id, local directory or timm:<name>.",
    ),
    dataset: str = typer.Option("digits", help="Dataset name in the store."),
    source: str = typer.Option(
        "",
        help="digits | pairs:FILE | coco:ROOT | imagefolder:ROOT | torchvision:NAME "
        "(default: the dataset name).",
    ),
    split: str = typer.Option(
        "train", help="train, test, ... or `prompts` (class prompts; also prompts-NAME)."
    ),
    store: Path = typer.Option(Path("features.zarr"), help="Feature store path."),
    batch_size: int = typer.Option(64, min=1, help="Images (or texts) per forward pass."),
    block_rows: int = typer.Option(512, min=1, help="Rows per store block (resume unit)."),
    dtype: str = typer.Option("float16", help="float16 or float32."),
    device: str = typer.Option("auto", help="auto, cpu, cuda or cuda:N."),
    precision: str = precision_option(),
    num_workers: int = typer.Option(
        2,
        min=0,
        help="DataLoader worker processes (if they fail, e.g. for lack of shared memory, the "
        "rest loads in this process, said once).",
    ),
    limit: int = typer.Option(0, min=0, help="Only the first N images (or texts); 0 = all."),
    overwrite: bool = typer.Option(False, help="Replace features of another source or model."),
    skip_bad: bool = typer.Option(False, help="Skip unreadable images (recorded in the manifest)."),
    revision: str = typer.Option("", help="Hugging Face revision (branch, tag or commit)."),
    trust_remote_code: bool = typer.Option(False, help="Allow a model's own Python code."),
    weights: str = typer.Option(
        "",
        help="Local weights for a timm:NAME model (safetensors; .pth/.bin only as tensors): "
        "the architecture and preprocessing come from timm, the weights from this file.",
    ),
    scheduler: str = typer.Option(
        "",
        help="Run the blocks on a dask cluster: a scheduler address (tcp://host:8786) or "
        "local:N (N local worker processes). Empty: this process.",
    ),
    retries: int = typer.Option(2, min=0, help="Re-runs of a failed cluster task."),
    name: str = typer.Option(
        "",
        help="The features' name in the store, for later commands' --image-model/--text-model "
        "(default: the model spec; a local folder's name, made unique if another folder has it).",
    ),
    templates: str = typer.Option(
        SIMPLE,
        help="With --split prompts: simple (five generic templates), clip (CLIP's set for the "
        "dataset, from CLIP_benchmark) or a FILE with one template per line, each with {c}.",
    ),
    classnames: str = typer.Option(
        SOURCE,
        help="With --split prompts: source (the labels' names; ImageNet WordNet ids become "
        "the curated names), clip (CLIP_benchmark's) or a FILE with one name per label, in order.",
    ),
    protocol_dataset: str = typer.Option(
        "",
        help="CLIP_benchmark's name of the dataset for clip (cifar10, imagenet1k, pets, ...); "
        "by default from --dataset or the source (imagenet -> imagenet1k).",
    ),
    progress: bool = progress_option(),
) -> None:
    """Extract every layer's pooled embedding of MODEL over one split into the store."""
    prompts = PromptSpec(templates, classnames, protocol_dataset, dataset)
    if not is_prompts_split(split) and prompts != PromptSpec(dataset=dataset):
        raise UserError(
            "--templates, --classnames and --protocol-dataset apply to --split prompts "
            "(or prompts-NAME)"
        )
    opts = ExtractOptions(
        batch_size=batch_size,
        block_rows=block_rows,
        dtype=dtype,
        device=device,
        precision=precision,
        num_workers=num_workers,
        limit=limit,
        overwrite=overwrite,
        skip_bad=skip_bad,
        revision=revision or None,
        trust_remote_code=trust_remote_code,
        weights=weights,
        scheduler=scheduler,
        retries=retries,
        name=name,
        progress=progress,
        prompts=prompts,
    )
    extract(str(store), dataset, split, source or dataset, model, opts)
