"""`python -m pipeline evaluate --run DIR`: zero-shot and retrieval metrics of a run;
`python -m pipeline compare RUN...` (or `evaluate --compare RUN...`): a table of runs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

from pipeline.app import app, run_option
from stages.evaluate import METRICS, comparison_table, evaluate_run, to_markdown, write_table
from store import UserError, write_json_atomic
from store.io import check_output


def format_metrics(metrics: dict[str, Any]) -> str:
    """A few lines for the terminal."""
    lines = []
    zs, rt = metrics["zero_shot"], metrics["retrieval"]
    if "skipped" in zs:
        lines.append(f"zero-shot  skipped: {zs['skipped']}")
    else:
        lines.append(
            f"zero-shot  top1 {zs['top1']:5.1f}  top5 {zs['top5']:5.1f}"
            f"   ({zs['n_images']} images, {zs['n_classes']} classes, "
            f"prompts {zs.get('protocol', 'unrecorded')})"
        )
    if "skipped" in rt:
        lines.append(f"retrieval  skipped: {rt['skipped']}")
    else:
        i2t = "  ".join(f"R@{k} {rt[f'i2t_r{k}']:5.1f}" for k in (1, 5, 10))
        t2i = "  ".join(f"R@{k} {rt[f't2i_r{k}']:5.1f}" for k in (1, 5, 10))
        lines.append(f"retrieval  I2T {i2t}   ({rt['n_images']} images, {rt['n_texts']} texts)")
        lines.append(f"           T2I {t2i}")
    return "\n".join(lines)


def write_comparison(
    runs: list[Path], names: str | None, out_md: Path | None, out_csv: Path | None
) -> None:
    for path, flag in ((out_md, "--out-md"), (out_csv, "--out-csv")):
        if path:
            check_output(path, "file", flag)
    table = comparison_table(runs, [n.strip() for n in names.split(",")] if names else None)
    markdown = to_markdown(table)
    typer.echo(markdown, nl=False)
    write_table(table, out_md, out_csv)
    for path in (out_md, out_csv):
        if path:
            typer.echo(f"wrote {path}")


NAMES_HELP = "Comma-separated row names, one per run; by default, the run folder names."


@app.command()
def evaluate(
    ctx: typer.Context,
    run: Path = typer.Option(None, "--run", help="Run directory written by `align`."),
    dataset: str = typer.Option(
        None,
        help="Dataset to evaluate on; by default, the one the run was trained on.",
        show_default=False,
    ),
    split: str = typer.Option("test", help="Split with the test images and captions."),
    prompts_split: str = typer.Option("prompts", help="Text-only split with the class prompts."),
    store: Path = typer.Option(Path("features.zarr"), help="Feature store path."),
    out: Path = typer.Option(
        None,
        help="Metrics file; by default, metrics.json in the run directory.",
        show_default=False,
    ),
    compare: bool = typer.Option(False, "--compare", help="Compare RUNS instead (see `compare`)."),
    runs: list[Path] = typer.Argument(None, help="Run directories, with --compare."),
    out_md: Path = typer.Option(None, help="With --compare: Markdown table file."),
    out_csv: Path = typer.Option(None, help="With --compare: CSV table file."),
    names: str = typer.Option(None, help=NAMES_HELP),
) -> None:
    """Zero-shot top-1/top-5 and retrieval Recall@1/5/10 of a run's heads; writes metrics.json."""
    if compare:
        write_comparison(list(runs or []) + ([run] if run else []), names, out_md, out_csv)
        return
    if runs:
        raise UserError(f"unexpected arguments {[str(r) for r in runs]}; did you mean --compare?")
    if run is None:
        raise UserError("give the run directory with --run DIR (or compare runs with --compare)")
    path = check_output(out or run / METRICS, "file", "--out")
    metrics = evaluate_run(run, store, run_option(ctx, "dataset", dataset), split, prompts_split)
    write_json_atomic(path, metrics)
    typer.echo(f"evaluated on {metrics['run']['eval_dataset']}/{split}")
    typer.echo(format_metrics(metrics))
    typer.echo(f"wrote {path}")


@app.command("compare")
def compare_runs(
    runs: list[Path] = typer.Argument(..., help="Run directories with metrics.json."),
    out_md: Path = typer.Option(None, help="Markdown table file."),
    out_csv: Path = typer.Option(None, help="CSV table file."),
    names: str = typer.Option(None, help=NAMES_HELP),
) -> None:
    """A table of runs (head, layers, lambda, n_pairs, zero-shot, retrieval) as Markdown and CSV."""
    write_comparison(runs, names, out_md, out_csv)
