"""`python -m pipeline align`: train the projection heads on stored features (CLIP + lambda R_S)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from pipeline.app import app, echo_error, progress_option
from pipeline.config import section_settings
from stages.align import agreement_lines, layer_agreement, resolve_layers, run_align
from stages.heads import head_help
from stages.lambda_cv import CSA_GRID, DEFAULT_GRID, LambdaSearch, parse_grid, parse_lambda
from stages.pairs import PairSpec, parse_memory_cap
from stages.select import SelectSettings
from stages.train import AlignSettings
from store import UserError

D = AlignSettings()  # the defaults of every training option


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
        "auto", help="auto (the best pair by --metric), last, or IMAGE,TEXT layer names or indices."
    ),
    metric: str = typer.Option(
        SelectSettings.metric,
        help="--layers auto: the metric that picks the pair (see select --metric).",
    ),
    head: str = typer.Option(D.head, help=head_help()),
    lam: str = typer.Option(
        str(D.lam),
        "--lambda",
        help="Weight of R_S (0 = plain CLIP baseline), or auto: chosen from --lambda-grid by "
        "--cv-folds cross-validation on the training pairs under --lambda-criterion.",
    ),
    lambda_grid: str = typer.Option(
        "",
        help="--lambda auto: the values tried (empty: "
        + ",".join(f"{v:g}" for v in DEFAULT_GRID)
        + "; --head csa: "
        + ",".join(f"{v:g}" for v in CSA_GRID)
        + ").",
    ),
    cv_folds: int = typer.Option(
        LambdaSearch.folds, help="--lambda auto: folds of the training pairs (by image, seeded)."
    ),
    cv_repeats: str = typer.Option(
        LambdaSearch.repeats,
        help="--lambda auto: K-fold splits scored, each with other folds (auto: about 300 "
        "held-out images, e.g. 3 splits at 100 training images, 1 from 300 up).",
    ),
    lambda_criterion: str = typer.Option(
        LambdaSearch.criterion,
        help="--lambda auto: what the held-out fold scores: retrieval (R@1, both directions), "
        "zeroshot (top-1 over the split's labels, classes from --prompts-split) or clip (loss).",
    ),
    prompts_split: str = typer.Option(
        "prompts", help="--lambda-criterion zeroshot: the split of class prompts."
    ),
    levels: int = typer.Option(D.levels, help="R_S levels L (softmax powers), 1 to 5."),
    temperature: float = typer.Option(D.temperature, help="Temperature of CLIP and R_S."),
    n_pairs: int = typer.Option(D.n_pairs, help="Train on a seeded subset of N pairs (0 = all)."),
    epochs: int = typer.Option(D.epochs, help="Maximum epochs."),
    max_steps: int = typer.Option(
        D.max_steps,
        help="Maximum optimiser steps, exactly (0 = no cap): training stops there, within an "
        "epoch if need be, and the cosine schedule spans the steps run.",
    ),
    batch_size: int = typer.Option(D.batch_size, help="Pairs per step (capped at the pairs)."),
    lr: float = typer.Option(D.lr, help="Peak AdamW learning rate (cosine decay)."),
    weight_decay: float = typer.Option(D.weight_decay, help="AdamW weight decay (matrices)."),
    warmup_steps: int = typer.Option(D.warmup_steps, help="Steps over which lambda ramps up."),
    patience: int = typer.Option(
        D.patience,
        help="Early stopping: optimiser steps without a better validation objective, counted "
        "once lambda's warm-up ends (0 = off).",
    ),
    out_dim: int = typer.Option(D.out_dim, help="Shared embedding size."),
    hidden_dim: int = typer.Option(D.hidden_dim, help="Hidden width of the mlp head."),
    val_fraction: float = typer.Option(D.val_fraction, help="Held-out share for validation."),
    min_val_pairs: int = typer.Option(
        D.min_val_pairs,
        help="Smallest validation hold-out: with fewer, every pair trains, no early stopping, "
        "the last weights are kept.",
    ),
    seed: int = typer.Option(D.seed, help="Seed of the subset, split, initialisation, shuffling."),
    select_dir: Path = typer.Option(
        Path("runs/select"),
        help="Where --layers auto reads the layer selection, computing it there when missing; "
        "a selection made by another metric is kept (the new one goes to SELECT_DIR-METRIC).",
    ),
    csa_ridge: float = typer.Option(
        D.csa_ridge, help="--head csa: canonical ridge eps (C + eps * mean variance * I); 0 = CCA."
    ),
    csa_steps: int = typer.Option(
        D.csa_steps, help="--head csa with --lambda > 0: R_S refinement steps (for any --n-pairs)."
    ),
    unpaired_images: str = typer.Option(
        "",
        help="DATASET/SPLIT of images extracted with the same image model: unpaired images "
        "that each step's image R_S also sees (never the CLIP loss).",
    ),
    unpaired_texts: str = typer.Option(
        "", help="DATASET/SPLIT of texts (same text model): unpaired texts for the text R_S."
    ),
    extra_pairs: str = typer.Option(
        "",
        help="DATASET/SPLIT of pairs (same models) to add to the training pairs: the paper's "
        "in-domain mixing.",
    ),
    extra_n: int = typer.Option(0, help="How many --extra-pairs pairs (seeded draw; 0 = all)."),
    eval_split: str = typer.Option(
        None,
        help="The split the run will be evaluated on (SPLIT of --dataset, or DATASET/SPLIT); "
        "when not given, the evaluate section's split in params.yaml, else test.",
    ),
    allow_overlap: bool = typer.Option(
        False,
        "--allow-overlap",
        help="Let --extra-pairs/--unpaired-* name the evaluation split or the training split "
        "itself (refused otherwise: the metrics would be inflated); recorded in config.json.",
    ),
    progress: bool = progress_option(),
    memory_cap: str = typer.Option(
        "0",
        help="Memory for the training features (e.g. 2GiB; 0 = no cap): when the chosen layers "
        "of the pairs exceed it, batches are streamed from the store (same result).",
    ),
) -> None:
    """Train the two projection heads (any registered kind; CSA is fitted in closed form, with
    --out-dim canonical dimensions, and refined with R_S when --lambda is above 0). Writes the
    run directory (head.safetensors, config.json, history.csv, curves.png); a previous run at
    --out is replaced only when the new one is complete."""
    fixed = parse_lambda(lam)
    search = None
    if fixed is None:
        search = LambdaSearch(
            grid=parse_grid(lambda_grid) if lambda_grid.strip() else (),
            folds=cv_folds,
            criterion=lambda_criterion,
            repeats=cv_repeats,
        )
    elif lambda_grid.strip():
        raise UserError("--lambda-grid goes with --lambda auto")
    settings = AlignSettings(
        head=head,
        lam=D.lam if fixed is None else fixed,
        levels=levels,
        temperature=temperature,
        n_pairs=n_pairs,
        epochs=epochs,
        max_steps=max_steps,
        batch_size=batch_size,
        lr=lr,
        weight_decay=weight_decay,
        warmup_steps=warmup_steps,
        patience=patience,
        out_dim=out_dim,
        hidden_dim=hidden_dim,
        val_fraction=val_fraction,
        min_val_pairs=min_val_pairs,
        seed=seed,
        csa_ridge=csa_ridge,
        csa_steps=csa_steps,
    )
    cap = parse_memory_cap(memory_cap)
    if extra_n < 0 or (extra_n and not extra_pairs):
        raise UserError("--extra-n must be >= 0 and goes with --extra-pairs DATASET/SPLIT")
    spec = PairSpec(
        store=store, dataset=dataset, split=split, image_model=image_model, text_model=text_model
    )
    evaluate_defaults = (ctx.find_root().default_map or {}).get("evaluate", {})
    eval_split = eval_split or evaluate_defaults.get("split") or "test"
    # `--layers auto` may run the selection: with the select section's settings and this seed
    select = replace(section_settings(ctx, "select", SelectSettings), seed=seed, metric=metric)
    chosen = resolve_layers(layers, spec, select_dir, select, log=echo_error, progress=progress)
    typer.echo(f"layers: image {chosen[0]}, text {chosen[1]}")
    agreement = layer_agreement(select_dir, metric, spec, chosen)
    config, result = run_align(
        spec,
        chosen,
        settings,
        out,
        progress=progress,
        extra_config={
            "layers": layers,
            "layer_metric": metric if layers == "auto" else None,
            "layer_agreement": agreement,
        },
        memory_cap=cap,
        unpaired=(unpaired_images or None, unpaired_texts or None),
        extra_pairs=extra_pairs or None,
        extra_n=extra_n,
        eval_split=eval_split,
        allow_overlap=allow_overlap,
        lambda_search=search,
        prompts_split=prompts_split,
        log=typer.echo,
    )
    if search is not None:
        typer.echo(f"lambda {config['lambda']:g} (auto), final run on every training pair")
    for line in agreement_lines(agreement, config["lambda"]):
        typer.echo(line)
    kept = (
        f"best epoch {config['best_epoch']}, validation CLIP loss {config['best_val_loss']:.4f}"
        if config["n_val"]
        else f"no validation (fewer than --min-val-pairs {settings.min_val_pairs}): last weights"
    )
    typer.echo(
        f"{config['n_train']} train / {config['n_val']} validation pairs, "
        f"{config['epochs_run']} epochs ({result.steps} steps, {result.seconds:.1f} s), {kept}"
    )
    if config["streamed_from_store"]:
        typer.echo(f"features streamed from the store (they exceed --memory-cap {memory_cap})")
    typer.echo(f"wrote {out}/head.safetensors, config.json, history.csv, curves.png")
