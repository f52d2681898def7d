"""`python -m pipeline align`: train the projection heads on stored features (CLIP + lambda R_S)."""

from __future__ import annotations

from pathlib import Path

import typer

from pipeline.app import app
from stages.align import AlignSettings, parse_memory_cap, run_align
from store import FeatureStore


@app.command()
def align(
    ctx: typer.Context,
    image_model: str = typer.Option("tiny-random-vit", help="Image model (as extracted)."),
    text_model: str = typer.Option("tiny-random-text", help="Text model (as extracted)."),
    dataset: str = typer.Option("digits", help="Dataset with the training pairs."),
    split: str = typer.Option("train", help="Split with the training pairs."),
    store: Path = typer.Option(Path("features.zarr"), help="Feature store path."),
    out: Path = typer.Option(Path("runs/align"), help="Run directory to write."),
    layers: str = typer.Option(
        "auto", help="auto (mutual-kNN selection), last, or IMAGE,TEXT layer names or indices."
    ),
    metric: str = typer.Option(
        "mutual_knn", help="--layers auto: the metric that picks the pair (see select --metric)."
    ),
    head: str = typer.Option("linear", help="Projection head: linear, mlp or csa (CCA-based)."),
    lam: float = typer.Option(10.0, "--lambda", help="Weight of R_S; 0 = plain CLIP baseline."),
    levels: int = typer.Option(1, help="R_S levels L (powers of the similarity softmax), 1-5."),
    temperature: float = typer.Option(0.05, help="Temperature of CLIP and R_S."),
    n_pairs: int = typer.Option(0, help="Train on a seeded subset of N pairs (0 = all)."),
    epochs: int = typer.Option(100, help="Maximum epochs."),
    batch_size: int = typer.Option(4096, help="Pairs per step (capped at the training set)."),
    lr: float = typer.Option(1e-3, help="Peak AdamW learning rate (cosine decay)."),
    weight_decay: float = typer.Option(1e-4, help="AdamW weight decay (matrices only)."),
    warmup_steps: int = typer.Option(1000, help="Steps over which lambda ramps up from 0."),
    patience: int = typer.Option(10, help="Early stopping: epochs without improvement (0 = off)."),
    out_dim: int = typer.Option(512, help="Shared embedding size."),
    hidden_dim: int = typer.Option(1024, help="Hidden width of the mlp head."),
    val_fraction: float = typer.Option(0.1, help="Held-out share of the pairs for validation."),
    seed: int = typer.Option(0, help="Seed of the subset, split, initialisation and shuffling."),
    select_dir: Path = typer.Option(
        Path("runs/select"), help="Where --layers auto reads (or writes) the layer selection."
    ),
    csa_ridge: float = typer.Option(
        0.1, help="--head csa: canonical ridge eps (C + eps * mean variance * I); 0 = plain CCA."
    ),
    progress: bool = typer.Option(True, help="Show a progress bar."),
    memory_cap: str = typer.Option(
        "0",
        help="Memory for the training features (e.g. 2GiB; 0 = no cap): when the chosen layers "
        "of the pairs exceed it, batches are streamed from the store (same result).",
    ),
) -> None:
    """Train linear or MLP heads, or fit CSA (--head csa; --out-dim canonical dimensions, --lambda
    > 0 refines it with R_S); writes head.safetensors, config.json, history.csv, curves.png."""
    from stages.select import resolve_layers  # select owns --layers auto|last|I,T

    settings = AlignSettings(
        head=head, lam=lam, levels=levels, temperature=temperature, n_pairs=n_pairs,
        epochs=epochs, batch_size=batch_size, lr=lr, weight_decay=weight_decay,
        warmup_steps=warmup_steps, patience=patience, out_dim=out_dim, hidden_dim=hidden_dim,
        val_fraction=val_fraction, seed=seed, csa_ridge=csa_ridge,
    )  # fmt: skip
    settings.check()
    cap = parse_memory_cap(memory_cap)
    # `--layers auto` may run the selection: it uses the select section's defaults
    select_defaults = (ctx.find_root().default_map or {}).get("select", {})
    image_layer, text_layer = resolve_layers(
        layers, FeatureStore(store), dataset, split, image_model, text_model, select_dir,
        n_samples=int(select_defaults.get("n_samples", 5000)),
        k=select_defaults.get("k", "rice"), seed=seed, metric=metric,
    )  # fmt: skip
    typer.echo(f"layers: image {image_layer}, text {text_layer}")
    config, result = run_align(
        store, dataset, split, image_model, text_model, image_layer, text_layer, settings, out,
        progress=progress, memory_cap=cap,
        extra_config={"layers": layers, "layer_metric": metric if layers == "auto" else None},
    )  # fmt: skip
    typer.echo(
        f"{config['n_train']} train / {config['n_val']} validation pairs, "
        f"{config['epochs_run']} epochs ({result.steps} steps, {result.seconds:.1f} s), "
        f"best epoch {result.best_epoch}, validation CLIP loss {result.best_val_loss:.4f}"
    )
    if config["streamed_from_store"]:
        typer.echo(f"features streamed from the store (they exceed --memory-cap {memory_cap})")
    typer.echo(f"wrote {out}/head.safetensors, config.json, history.csv, curves.png")
