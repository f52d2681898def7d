"""`python -m pipeline table`: the paper's nine rows ({Linear, MLP, CSA} x {Last, Similar,
Similar + R_S}) per --n-pairs value, trained and evaluated from one store, as one table (a
preset of `sweep`)."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import typer

from pipeline.app import app, echo_error, progress_option
from pipeline.config import section_settings
from stages.align import resolve_layers
from stages.evaluate import to_markdown
from stages.pairs import PairSpec
from stages.select import SelectSettings
from stages.sweep import parse_n_pairs
from stages.table import TableSettings, run_table
from stages.train import AlignSettings

D = TableSettings()


@app.command()
def table(
    ctx: typer.Context,
    image_model: str = typer.Option("tiny-random-vit", help="Image model (as extracted)."),
    text_model: str = typer.Option("tiny-random-text", help="Text model (as extracted)."),
    dataset: str = typer.Option("digits", help="Dataset with the training and test pairs."),
    split: str = typer.Option("train", help="Split with the training pairs."),
    eval_split: str = typer.Option(D.eval_split, help="Split the rows are evaluated on."),
    prompts_split: str = typer.Option(D.prompts_split, help="Text-only split of class prompts."),
    store: Path = typer.Option(Path("features.zarr"), help="Feature store path."),
    out: Path = typer.Option(Path("runs/table"), help="Folder for the runs and table.md/.csv."),
    n_pairs: str = typer.Option(
        ",".join(map(str, D.n_pairs)),
        help="Comma-separated training-set sizes, one group of rows each (0 = all).",
    ),
    lam: float = typer.Option(D.lam, "--lambda", help="R_S weight of Linear/MLP + Similar + R_S."),
    csa_lambda: float = typer.Option(D.csa_lambda, help="R_S weight of CSA + Similar + R_S."),
    csa_dim: int = typer.Option(D.csa_dim, help="CSA's canonical dimensions d."),
    csa_ridge: float = typer.Option(
        AlignSettings.csa_ridge, help="CSA's canonical ridge (0 = plain CCA)."
    ),
    seed: int = typer.Option(AlignSettings.seed, help="Seed of the subsets, splits and training."),
    select_dir: Path = typer.Option(
        None,
        help="Where the `Similar` layer selection is read or written; when not given, the "
        "select section's out in params.yaml, else runs/select.",
    ),
    progress: bool = progress_option(),
) -> None:
    """Train and evaluate the nine rows for each --n-pairs; other training settings come from
    the align section of params.yaml. Writes OUT/table.md, OUT/table.csv and one run per row;
    rows already complete with the same settings are kept, so an interrupted table resumes."""
    settings = TableSettings(
        n_pairs=parse_n_pairs(n_pairs),
        lam=lam,
        csa_lambda=csa_lambda,
        csa_dim=csa_dim,
        eval_split=eval_split,
        prompts_split=prompts_split,
    )
    base = replace(section_settings(ctx, "align", AlignSettings), seed=seed, csa_ridge=csa_ridge)
    spec = PairSpec(
        store=store, dataset=dataset, split=split, image_model=image_model, text_model=text_model
    )
    layers = last_and_similar_layers(ctx, spec, select_dir, seed, progress)
    result = run_table(spec, layers, base, settings, out, log=typer.echo)
    typer.echo(to_markdown(result), nl=False)
    typer.echo(f"wrote {out}/table.md, {out}/table.csv")


def last_and_similar_layers(
    ctx: typer.Context, spec: PairSpec, select_dir: Path | None, seed: int, progress: bool = True
) -> dict[str, tuple[str, str]]:
    """{"last": (image, text), "similar": (image, text)}: the `Similar` pair from the layer
    selection in select_dir (default: select's out), run with the select section if missing."""
    select = replace(section_settings(ctx, "select", SelectSettings), seed=seed)
    select_defaults = (ctx.find_root().default_map or {}).get("select", {})
    select_dir = select_dir or Path(select_defaults.get("out", "runs/select"))
    layers = {
        name: resolve_layers(choice, spec, select_dir, select, log=echo_error, progress=progress)
        for name, choice in (("last", "last"), ("similar", "auto"))
    }
    for name, (image_layer, text_layer) in layers.items():
        typer.echo(f"{name} layers: image {image_layer}, text {text_layer}")
    return layers
