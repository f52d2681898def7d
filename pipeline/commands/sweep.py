"""`python -m pipeline sweep`: {methods} x {n_pairs} x {seeds} from one store, the paper's
data-scaling curves with error bars (sweep.csv, summary.md, scaling.png)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from pipeline.app import app, progress_option
from pipeline.commands.table import last_and_similar_layers
from pipeline.config import section_settings
from stages.heads import head_kinds
from stages.lambda_cv import parse_grid
from stages.pairs import PairSpec
from stages.sweep import (
    VARIANTS,
    SweepSettings,
    parse_ints,
    parse_methods,
    parse_n_pairs,
    run_sweep,
    summary_markdown,
)
from stages.train import AlignSettings

D = SweepSettings()


@app.command()
def sweep(
    ctx: typer.Context,
    image_model: str = typer.Option("tiny-random-vit", help="Image model (as extracted)."),
    text_model: str = typer.Option("tiny-random-text", help="Text model (as extracted)."),
    dataset: str = typer.Option("digits", help="Dataset with the training and test pairs."),
    split: str = typer.Option("train", help="Split with the training pairs."),
    eval_split: str = typer.Option(D.eval_split, help="Split the runs are evaluated on."),
    prompts_split: str = typer.Option(D.prompts_split, help="Text-only split of class prompts."),
    store: Path = typer.Option(Path("features.zarr"), help="Feature store path."),
    out: Path = typer.Option(Path("runs/sweep"), help="Folder for sweep.csv, summary.md, plots."),
    methods: str = typer.Option(
        ",".join(D.methods),
        help="Comma-separated HEAD-VARIANT names: HEAD "
        + "|".join(head_kinds())
        + ", VARIANT "
        + "|".join(VARIANTS)
        + " (the unpaired one for gradient-trained heads, with --unpaired-images/-texts), "
        "e.g. linear-last,lowrank-similar-rs.",
    ),
    n_pairs: str = typer.Option(
        ",".join(map(str, D.n_pairs)), help="Comma-separated training-set sizes (0 = all)."
    ),
    seeds: str = typer.Option(
        ",".join(map(str, D.seeds)),
        help="Comma-separated seeds: each draws its own nested subsets, split and init.",
    ),
    lam: float = typer.Option(D.lam, "--lambda", help="R_S weight of the + R_S gradient rows."),
    csa_lambda: float = typer.Option(D.csa_lambda, help="R_S weight of CSA + Similar + R_S."),
    csa_dim: int = typer.Option(D.csa_dim, help="CSA's canonical dimensions d."),
    lambdas: str = typer.Option(
        "",
        help="Comma-separated λ values: every `-rs` method runs once per value (CSA's too, "
        "instead of --lambda/--csa-lambda); summary.md gains a λ column and lambda.png plots "
        "every metric against λ, a line per n_pairs.",
    ),
    lambda_grid: str = typer.Option(
        "", help="The `-rs-auto` methods: λ values tried (empty: align --lambda auto's default)."
    ),
    csa_lambda_grid: str = typer.Option("", help="The same for csa-similar-rs-auto."),
    cv_folds: int = typer.Option(D.cv_folds, help="The `-rs-auto` methods: folds."),
    cv_repeats: str = typer.Option(
        D.cv_repeats, help="The `-rs-auto` methods: K-fold splits (align --cv-repeats)."
    ),
    lambda_criterion: str = typer.Option(
        D.lambda_criterion, help="The `-rs-auto` methods: retrieval, zeroshot or clip."
    ),
    unpaired_images: str = typer.Option(
        D.unpaired_images,
        help="DATASET/SPLIT of unpaired images (same image model) for the *-similar-rs-unpaired "
        "methods: each step's image R_S also sees a batch of them.",
    ),
    unpaired_texts: str = typer.Option(
        D.unpaired_texts, help="DATASET/SPLIT of unpaired texts for the *-unpaired methods."
    ),
    allow_overlap: bool = typer.Option(
        D.allow_overlap,
        "--allow-overlap",
        help="Let --unpaired-images/-texts name the evaluation split or the training split "
        "itself (refused otherwise: the metrics would be inflated); recorded in config.json.",
    ),
    workers: int = typer.Option(D.workers, help="Runs in parallel (a process pool)."),
    scheduler: str = typer.Option(
        D.scheduler, help="Run on a dask cluster instead: tcp://host:8786 or local:N."
    ),
    seed: int = typer.Option(AlignSettings.seed, help="Seed of the layer selection (Similar)."),
    select_dir: Path = typer.Option(
        None,
        help="Where the `Similar` layer selection is read or written; when not given, the "
        "select section's out in params.yaml, else runs/select.",
    ),
    progress: bool = progress_option(),
) -> None:
    """Train and evaluate every method for every --n-pairs and --seeds; other training settings
    come from the align section of params.yaml. The subset of (n_pairs, seed) is the one `align
    --n-pairs N --seed S` draws: the same for every method, bigger ones containing smaller ones.
    Runs already complete with the same settings are kept, so an interrupted sweep resumes."""
    settings = SweepSettings(
        methods=parse_methods(methods),
        n_pairs=parse_n_pairs(n_pairs),
        seeds=parse_ints(seeds, "--seeds"),
        lam=lam,
        csa_lambda=csa_lambda,
        csa_dim=csa_dim,
        lambdas=parse_grid(lambdas, "--lambdas") if lambdas.strip() else (),
        lambda_grid=parse_grid(lambda_grid) if lambda_grid.strip() else (),
        csa_lambda_grid=parse_grid(csa_lambda_grid, "--csa-lambda-grid")
        if csa_lambda_grid.strip()
        else (),
        cv_folds=cv_folds,
        cv_repeats=cv_repeats,
        lambda_criterion=lambda_criterion,
        eval_split=eval_split,
        prompts_split=prompts_split,
        unpaired_images=unpaired_images,
        unpaired_texts=unpaired_texts,
        allow_overlap=allow_overlap,
        workers=workers,
        scheduler=scheduler,
    )
    base = section_settings(ctx, "align", AlignSettings)
    spec = PairSpec(
        store=store, dataset=dataset, split=split, image_model=image_model, text_model=text_model
    )
    layers = last_and_similar_layers(ctx, spec, select_dir, seed, progress)
    summary = run_sweep(spec, layers, replace(base, seed=seed), settings, out, log=typer.echo)
    typer.echo(summary_markdown(summary), nl=False)
    plots = f"{out}/scaling.png" + (f", {out}/lambda.png" if settings.lambdas else "")
    typer.echo(f"wrote {out}/sweep.csv, {out}/summary.md, {plots}")
