"""The typer app: params.yaml defaults, the commands, and UserError as a one-line message."""

from __future__ import annotations

import os
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import typer

from pipeline.config import default_map, load_params
from store.errors import UserError

app = typer.Typer(
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Align two frozen unimodal encoders with few pairs (STRUCTURE, NeurIPS 2025).",
)


@app.callback()
def root(
    ctx: typer.Context,
    params: Path = typer.Option(
        Path("params.yaml"), "--params", help="YAML file with every default; flags override it."
    ),
) -> None:
    """Commands read their defaults from --params (params.yaml in the working directory)."""
    source = ctx.get_parameter_source("params")
    given = source is not None and source.name != "DEFAULT"
    ctx.default_map = default_map(load_params(params, given))


def from_params(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` took its value from params.yaml (typer vendors its own click, so
    the source is compared by name)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "DEFAULT_MAP"


def run_option(ctx: typer.Context, name: str, value: Any) -> Any:
    """An option whose default is the run's own (dataset of evaluate, index): the value given on
    the command line, else None; params.yaml's `common` value is another dataset's default."""
    return None if from_params(ctx, name) else value


def progress_option() -> Any:
    """The `--progress/--no-progress` option of every command that shows a progress bar."""
    return typer.Option(
        True, "--progress/--no-progress", help="Show progress bars (TQDM_DISABLE=1 hides them too)."
    )


def echo_error(message: str) -> None:
    """A stage's `log` for warnings: to stderr, beside the command's own output."""
    typer.echo(message, err=True)


INTERRUPTED = 130  # the shell's code for a command ended by SIGINT (128 + 2)


def exit_on_sigint() -> None:
    """Ctrl-C: one line and exit 130. Every stage writes atomically or block by block, so the
    same command resumes; DataLoader workers (forked, same handler) exit quietly."""
    main_pid = os.getpid()

    def interrupted(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid:
            print("\ninterrupted; run the same command to resume", file=sys.stderr)
        warnings.simplefilter("ignore")  # no "coroutine was never awaited" noise at exit
        raise SystemExit(INTERRUPTED)

    signal.signal(signal.SIGINT, interrupted)


def main() -> None:
    from pipeline import commands  # noqa: F401  (registers the commands on `app`)

    exit_on_sigint()

    try:
        app()  # typer handles usage errors and Ctrl-C itself; everything else propagates
    except UserError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(2)
