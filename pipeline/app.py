"""The typer app: params.yaml defaults, the commands, and UserError as a one-line message."""

from __future__ import annotations

import inspect
import os
import re
import signal
import sys
import warnings
from pathlib import Path
from typing import Any

import typer

from pipeline.config import CommandTree, check_params, default_map, load_params
from store.errors import UserError

PACKAGE = "structure-align"  # the distribution name in pyproject.toml
PARAMS_META = "pipeline.params"  # ctx.meta key: the parameters file as loaded


def _one_line_paragraphs(text: str | None) -> str | None:
    """A docstring's paragraphs each on one line: typer's rich help keeps single line breaks,
    which break a sentence mid-way in the command list; the terminal wraps them whole."""
    if not text:
        return text
    paragraphs = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(re.sub(r"\s*\n\s*", " ", p) for p in paragraphs)


STATES_DEFAULT = re.compile(r"\(default[ :]|\bby default\b", re.IGNORECASE)


class Group(typer.core.TyperGroup):
    """The app's command group: every command's and sub-command's help reads whole, and an
    option whose help says its default (the run's own dataset, ...) shows no second one from
    params.yaml."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.help = _one_line_paragraphs(self.help)
        _tidy_help(self)


def _tidy_help(group: Any) -> None:
    for command in getattr(group, "commands", {}).values():
        command.help = _one_line_paragraphs(command.help)
        for param in command.params:
            if STATES_DEFAULT.search(getattr(param, "help", None) or ""):
                param.show_default = False
        _tidy_help(command)


app = typer.Typer(
    cls=Group,
    add_completion=False,
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    help="Align two frozen unimodal encoders with few pairs (STRUCTURE, NeurIPS 2025).",
)


def package_version() -> str:
    """The installed package's version; from pyproject.toml when running from a checkout that
    was not installed."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(PACKAGE)
    except PackageNotFoundError:
        pyproject = Path(__file__).resolve().parents[1] / "pyproject.toml"
        try:
            import tomllib  # Python 3.11+; the package supports 3.10

            return tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]["version"]
        except (ImportError, OSError, KeyError, ValueError):  # TOMLDecodeError is a ValueError
            return "unknown"


def _print_version(value: bool) -> None:
    if value:
        typer.echo(f"{PACKAGE} {package_version()}")
        raise typer.Exit()


def command_tree(group: Any) -> CommandTree:
    """{command: None} per command, {group: {sub-command: None}} per group of `group`."""
    return {
        name: dict.fromkeys(command.commands) if hasattr(command, "commands") else None
        for name, command in group.commands.items()
    }


def command_options(group: Any) -> dict[str, dict[str, Any]]:
    """Per params.yaml section (a command, or a group: the options of all its sub-commands),
    its options by parameter name."""
    sections: dict[str, dict[str, Any]] = {}
    for name, command in group.commands.items():
        leaves = command.commands.values() if hasattr(command, "commands") else [command]
        options = sections.setdefault(name, {})
        for leaf in leaves:
            for param in leaf.params:
                if param.param_type_name == "option" and param.name and param.expose_value:
                    options.setdefault(param.name, param)
    return sections


@app.callback()
def root(
    ctx: typer.Context,
    params: Path = typer.Option(
        Path("params.yaml"),
        "--params",
        help="YAML file with the defaults of every command; flags on the command line win.",
    ),
    version: bool = typer.Option(
        False,
        "--version",
        callback=_print_version,
        is_eager=True,
        expose_value=False,
        help="Print the version and exit.",
    ),
) -> None:
    """Commands read their defaults from --params (params.yaml in the working directory)."""
    source = ctx.get_parameter_source("params")
    given = source is not None and source.name != "DEFAULT"
    if not given and not params.exists():
        typer.echo(
            f"note: no {params} in {Path.cwd()}: every command uses its built-in defaults "
            "(see its --help); give a parameters file with --params FILE",
            err=True,
        )
    INVOKED[:] = [ctx.invoked_subcommand]
    loaded = load_params(params, given)
    check_params(loaded, command_options(ctx.command), params)
    ctx.meta[PARAMS_META] = loaded
    ctx.default_map = default_map(loaded, command_tree(ctx.command))


def from_params(ctx: typer.Context, name: str) -> bool:
    """Whether option `name` took its value from params.yaml (typer vendors its own click, so
    the source is compared by name)."""
    source = ctx.get_parameter_source(name)
    return source is not None and source.name == "DEFAULT_MAP"


def run_option(ctx: typer.Context, name: str, value: Any) -> Any:
    """An option whose default is the run's own (dataset of evaluate, index): the value given on
    the command line or in the command's own params.yaml section, else None (`common`'s value
    is the default of the commands that make features and runs, not a run's own)."""
    if not from_params(ctx, name):
        return value
    section = (ctx.meta.get(PARAMS_META) or {}).get(ctx.info_name) or {}
    own = {n.replace("-", "_") for n in section}
    return value if name in own else None


def progress_option() -> Any:
    """The `--progress/--no-progress` option of every command that shows a progress bar."""
    return typer.Option(
        True, "--progress/--no-progress", help="Show progress bars (TQDM_DISABLE=1 hides them too)."
    )


def precision_option() -> Any:
    """The `--precision` option of every command that runs an encoder."""
    return typer.Option(
        "auto",
        help="fp32, bf16 or auto: bf16 on CUDA and on CPUs with native bf16 (AVX-512 BF16, "
        "AMX), else fp32 (STRUCTURE_PRECISION=fp32|bf16 changes what auto means).",
    )


def echo_error(message: str) -> None:
    """A stage's `log` for warnings: to stderr, beside the command's own output."""
    typer.echo(message, err=True)


INTERRUPTED = 130  # the shell's code for a command ended by SIGINT (128 + 2)


INVOKED: list[str | None] = [None]  # the command being run, for the Ctrl-C line
# commands that pick up where they stopped (blocks of the store, complete runs of a sweep)
RESUMING = {None, "extract", "table", "sweep", "store"}


def interrupt_message(command: str | None) -> str:
    """What Ctrl-C leaves: resuming commands resume; every other output is written whole, so
    the previous one (a run, a selection, an index, ...) is still there, untouched."""
    if command in RESUMING:
        return "interrupted; run the same command to resume"
    if command == "serve":  # writes nothing
        return "stopped"
    return f"interrupted; {command} writes its output whole, so any previous output is kept"


def exit_on_sigint() -> None:
    """Ctrl-C: one line that tells the truth (see interrupt_message) and exit 130; DataLoader
    workers (forked, same handler) exit quietly."""
    main_pid = os.getpid()
    INVOKED[:] = [None]  # no command known until the root callback names it

    def interrupted(signum: int, frame: Any) -> None:
        if os.getpid() == main_pid:
            print(f"\n{interrupt_message(INVOKED[0])}", file=sys.stderr)
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
