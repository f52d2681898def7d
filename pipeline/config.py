"""Defaults from params.yaml: every option's default lives there, explicit flags win.

params.yaml has a `common` section (store, dataset, models, seed) and one section per command
(`extract`, `select`, `align`, `evaluate`, ...). A command's defaults are `common` overlaid
with its own section; keys are option names with `-` or `_` (`lambda` maps to `--lambda`).
"""

from __future__ import annotations

import re
from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml

from store.errors import UserError

# params.yaml keys whose Python parameter name differs (`lambda` is a keyword)
KEY_ALIASES = {"lambda": "lam"}
COMMANDS = ("extract", "select", "align", "evaluate", "compare", "table", "sweep", "index", "embed")


DEFAULT_PARAMS = Path("params.yaml")
# YAML 1.1 reads `1e-3` (no dot) as a string; such a value is the number the user meant
FLOAT_TEXT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


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
    for name in ("common", *COMMANDS):
        section = params.get(name)
        if section is not None and not isinstance(section, dict):
            raise UserError(
                f"{path}: section `{name}` must be a mapping of options, not {section!r}"
            )
    return params


def _param_names(section: dict[str, Any]) -> dict[str, Any]:
    return {KEY_ALIASES.get(k, k.replace("-", "_")): v for k, v in section.items()}


def default_map(params: dict[str, Any]) -> dict[str, Any]:
    """Click's default_map: per command, `common` overlaid with the command's own section."""
    common = _param_names(params.get("common") or {})
    defaults: dict[str, Any] = {}
    for command in COMMANDS:
        section = params.get(command) or {}
        values = {**common, **_param_names(section)}
        defaults[command] = {k: _to_option(v) for k, v in values.items()}
    return defaults


Settings = TypeVar("Settings")


def section_settings(ctx: typer.Context, command: str, cls: type[Settings]) -> Settings:
    """A settings dataclass from another command's defaults (its params.yaml section over
    `common`): the fields that section sets, the dataclass defaults for the rest."""
    return settings_from(ctx.find_root().default_map or {}, command, cls)


def settings_from(defaults: dict[str, Any], command: str, cls: type[Settings]) -> Settings:
    """`section_settings` from a `default_map` (for scripts outside the command line)."""
    section = defaults.get(command, {})
    kinds = {f.name: type(f.default) for f in fields(cls)}
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
        raise UserError(f"params.yaml {command}.{key}: expected a number, got {value!r}")
    return value


def _to_option(value: Any) -> Any:
    """Lists in params.yaml become comma-separated option values."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    if isinstance(value, str) and FLOAT_TEXT.fullmatch(value.strip()):
        return float(value)
    return value
