"""Defaults from params.yaml: every option's default lives there, explicit flags win.

params.yaml has a `common` section (store, dataset, models, seed) that applies to every command
with such an option, and one section per command (`extract`, `select`, `align`, `evaluate`,
... ; a group such as `store` has one section for all its sub-commands). Keys are option names
with `-` or `_` (`lambda` maps to `--lambda`). The top-level keys that dvc.yaml reads
(`DVC_KEYS`) are not command sections.

Every key is checked against the options of the commands it applies to (`check_params`): a
key that no such command has (a typo such as `align: {lamda: 0}`) or a value of the wrong
type is refused with the key's path, one line, before any command runs.
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Mapping
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml

from store.errors import UserError

# params.yaml keys whose Python parameter name differs (`lambda` is a keyword)
KEY_ALIASES = {"lambda": "lam"}
OPTION_KEYS = {v: k for k, v in KEY_ALIASES.items()}  # parameter name -> params.yaml key
COMMANDS = ("extract", "select", "align", "evaluate", "compare", "table", "sweep", "index", "embed")
COMMON = "common"
# top-level keys that dvc.yaml reads (the splits it extracts, the align variants it runs)
DVC_KEYS = ("image_splits", "text_splits", "variants")

DEFAULT_PARAMS = Path("params.yaml")
# YAML 1.1 reads `1e-3` (no dot) as a string; such a value is the number the user meant
FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")

# The command tree: {command: None} for a command, {group: {sub-command: None, ...}}
CommandTree = Mapping[str, "Mapping[str, None] | None"]


def load_params(path: str | Path, given: bool = True) -> dict[str, Any]:
    """The parameters file as {section: {key: value}}. A missing params.yaml in the working
    directory means built-in defaults; a file named with --params must exist (`--params
    /dev/null`: built-in defaults)."""
    path = Path(path)
    if not path.exists() and not given:
        return {}
    if not path.exists() or path.is_dir():  # /dev/null is fine: no parameters
        raise UserError(f"--params {path}: {'is a directory' if path.is_dir() else 'no such file'}")
    try:
        params = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except UnicodeDecodeError as err:
        raise UserError(f"{path} is not UTF-8 text ({err.reason} at byte {err.start})") from err
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(params, dict):
        raise UserError(f"{path} must hold a mapping of sections")
    for name in (COMMON, *COMMANDS):
        section = params.get(name)
        if section is not None and not isinstance(section, dict):
            raise UserError(
                f"{path}: section `{name}` must be a mapping of options, not {section!r}"
            )
    return params


def _param_name(key: Any) -> str:
    return KEY_ALIASES.get(str(key), str(key).replace("-", "_"))


def _param_names(section: dict[str, Any]) -> dict[str, Any]:
    return {_param_name(k): v for k, v in section.items()}


def default_map(params: dict[str, Any], commands: CommandTree | None = None) -> dict[str, Any]:
    """Click's default_map: per command, `common` overlaid with the command's own section (a
    group's section applies to each of its sub-commands). `commands` is the command tree
    (`command_tree` of the app); without it, the sections of COMMANDS."""
    common = _param_names(params.get(COMMON) or {})
    tree: CommandTree = commands if commands is not None else dict.fromkeys(COMMANDS)

    def values(command: str) -> dict[str, Any]:
        merged = {**common, **_param_names(params.get(command) or {})}
        return {k: _to_option(v) for k, v in merged.items()}

    defaults: dict[str, Any] = {}
    for command, subcommands in tree.items():
        if subcommands is None:
            defaults[command] = values(command)
        else:
            defaults[command] = {sub: values(command) for sub in subcommands}
    return defaults


# -- checking a parameters file against the options of the commands ------------------------------
def _suggest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f" (did you mean `{close[0]}`?)" if close else ""


def _type_name(annotation: Any) -> str:
    if annotation is bool:
        return "true or false"
    if annotation is int:
        return "an integer"
    if annotation is float:
        return "a number"
    if isinstance(annotation, type) and issubclass(annotation, Path):
        return "a path"
    return "text"


def _problem(value: Any, param: Any) -> str | None:
    """Why `value` cannot be the value of option `param` (None: it can)."""
    if value is None:  # `key:` with no value: the option's own default
        return None
    annotation = getattr(getattr(param, "type_descriptor", None), "annotation", None)
    expected = _type_name(annotation)
    if isinstance(value, dict):
        return f"expected {expected}, got a mapping"
    if isinstance(value, list) and (
        annotation is not str or any(isinstance(v, dict | list) for v in value)
    ):
        return f"expected {expected}, got a list"
    if isinstance(value, bool) != (annotation is bool):
        # YAML 1.1 reads yes/no/on/off as booleans: text must be quoted
        return f"expected {expected}, got {str(value).lower()}" + (
            " (quote it if you mean the text)" if isinstance(value, bool) else ""
        )
    coerce = getattr(param, "get_runtime_param", None)
    if coerce is None:
        return None
    try:
        coerce().coerce(_to_option(value), param=param, ctx=None)
    except typer.BadParameter as err:
        return f"{value!r} is not a valid value ({str(err.message).splitlines()[0]})"
    except (TypeError, ValueError) as err:
        return f"{value!r} is not a valid value ({err})"
    return None


def check_params(
    params: Mapping[str, Any], options: Mapping[str, Mapping[str, Any]], path: str | Path
) -> None:
    """Refuse, with the key's path (`align.lamda`) in one line, any section that is no command,
    any key that is not an option of the commands it applies to, and any value of the wrong
    type. `options` maps each section (command, or group of sub-commands) to its options by
    parameter name; `common` keys must be an option of at least one command."""
    for section, values in params.items():
        if section in DVC_KEYS:
            continue
        if section != COMMON and section not in options:
            sections = [COMMON, *options]
            raise UserError(
                f"{path}: no command `{section}`{_suggest(str(section), sections)}; sections "
                f"are {', '.join(sections)} (and {', '.join(DVC_KEYS)} for dvc.yaml)"
            )
        if values is not None and not isinstance(values, dict):
            raise UserError(
                f"{path}: section `{section}` must be a mapping of options, not {values!r:.40}"
            )
        # the commands this section applies to: every command for `common`, else its own
        applies = list(options.values()) if section == COMMON else [options[section]]
        what = "any command" if section == COMMON else f"`{section}`"
        for key, value in (values or {}).items():
            name = _param_name(key)
            holders = [own[name] for own in applies if name in own]
            if not holders:
                known = sorted({OPTION_KEYS.get(n, n) for own in applies for n in own})
                raise UserError(
                    f"{path} {section}.{key}: no such option of {what}{_suggest(str(key), known)}"
                )
            for param in holders:
                problem = _problem(value, param)
                if problem:
                    raise UserError(f"{path} {section}.{key}: {problem}")


Settings = TypeVar("Settings")


def section_settings(ctx: typer.Context, command: str, cls: type[Settings]) -> Settings:
    """A settings dataclass from another command's defaults (its params.yaml section over
    `common`): the fields that section sets, the dataclass defaults for the rest."""
    return settings_from(ctx.find_root().default_map or {}, command, cls)


def settings_from(defaults: dict[str, Any], command: str, cls: type[Settings]) -> Settings:
    """`section_settings` from a `default_map` (for scripts outside the command line)."""
    section = dict(defaults.get(command, {}))
    kinds = {f.name: type(f.default) for f in fields(cls)}
    # `align: {lambda: auto}` is align's own (cross-validated); a command that reuses the align
    # section (sweep, table) sets lambda per method, so the dataclass default stands in for it
    if str(section.get("lam", "")).strip().lower() == "auto":
        section.pop("lam")
    return cls(**{k: _coerce(command, k, v, kinds[k]) for k, v in section.items() if k in kinds})


def _coerce(command: str, key: str, value: Any, kind: type) -> Any:
    """A params.yaml value as its setting's type (`lr: 3` is the float 3.0); a value of another
    kind is the user's to fix, named, rather than a TypeError deep in training."""
    if kind in (int, float) and not isinstance(value, bool):
        try:
            number = kind(value)
            if kind is float or number == float(value):
                return number
        except (TypeError, ValueError):
            pass
        key = OPTION_KEYS.get(key, key)
        raise UserError(f"params.yaml {command}.{key}: expected a number, got {value!r}")
    return value


def _to_option(value: Any) -> Any:
    """Lists in params.yaml become comma-separated option values."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    return value
