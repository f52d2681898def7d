"""`python -m pipeline table`: the paper's nine rows ({Linear, MLP, CSA} x {Last, Similar,
Similar + R_S}) per --n-pairs value, trained and evaluated from one store, as one table."""

from __future__ import annotations

from dataclasses import fields, replace
from pathlib import Path

import typer

from pipeline.app import app
from stages.align import AlignSettings
from stages.evaluate import to_markdown
from stages.table import parse_n_pairs, run_table
from store import FeatureStore


def align_defaults(ctx: typer.Context) -> AlignSettings:
    """The training hyperparameters of the `align` section of params.yaml (epochs, lr, ...)."""
    section = (ctx.find_root().default_map or {}).get("align", {})
    names = {f.name for f in fields(AlignSettings)}
    return AlignSettings(**{k: v for k, v in section.items() if k in names})


@app.command()
def table(
    ctx: typer.Context,
    image_model: str = typer.Option("tiny-random-vit", help="Image model (as extracted)."),
    text_model: str = typer.Option("tiny-random-text", help="Text model (as extracted)."),
    dataset: str = typer.Option("digits", help="Dataset with the training and test pairs."),
    split: str = typer.Option("train", help="Split with the training pairs."),
    eval_split: str = typer.Option("test", help="Split the rows are evaluated on."),
    prompts_split: str = typer.Option("prompts", help="Text-only split with the class prompts."),
    store: Path = typer.Option(Path("features.zarr"), help="Feature store path."),
    out: Path = typer.Option(Path("runs/table"), help="Folder for the runs and table.md/.csv."),
    n_pairs: str = typer.Option(
        "250,500,0", help="Comma-separated training-set sizes, one group of rows each (0 = all)."
    ),
    lam: float = typer.Option(10.0, "--lambda", help="R_S weight of Linear/MLP + Similar + R_S."),
    csa_lambda: float = typer.Option(0.3, help="R_S weight of CSA + Similar + R_S."),
    csa_dim: int = typer.Option(32, help="CSA's canonical dimensions d."),
    csa_ridge: float = typer.Option(0.1, help="CSA's canonical ridge (0 = plain CCA)."),
    seed: int = typer.Option(0, help="Seed of the subsets, splits and training."),
    select_dir: Path = typer.Option(
        None, help="Where the `Similar` layer selection is read or written (default: select's out)."
    ),
) -> None:
    """Train and evaluate the nine rows for each --n-pairs; other training settings come from
    the align section of params.yaml. Writes OUT/table.md, OUT/table.csv and one run per row."""
    from stages.select import resolve_layers  # select owns the `Similar` layers

    sizes = parse_n_pairs(n_pairs)
    base = replace(align_defaults(ctx), seed=seed, csa_ridge=csa_ridge)
    select_defaults = (ctx.find_root().default_map or {}).get("select", {})
    select_dir = select_dir or Path(select_defaults.get("out", "runs/select"))
    feature_store = FeatureStore(store)
    layers = {
        spec: resolve_layers(
            spec,
            feature_store,
            dataset,
            split,
            image_model,
            text_model,
            select_dir,
            n_samples=int(select_defaults.get("n_samples", 5000)),
            k=select_defaults.get("k", "rice"),
            seed=seed,
        )  # fmt: skip
        for spec in ("last", "auto")
    }
    layers["similar"] = layers.pop("auto")
    for name, (image_layer, text_layer) in layers.items():
        typer.echo(f"{name} layers: image {image_layer}, text {text_layer}")
    result = run_table(
        store, dataset, split, image_model, text_model, layers, sizes, base, lam, csa_lambda,
        csa_dim, out, eval_split, prompts_split, log=typer.echo,
    )  # fmt: skip
    typer.echo(to_markdown(result), nl=False)
    typer.echo(f"wrote {out}/table.md, {out}/table.csv")
