"""Defaults from params.yaml: every option's default lives there, explicit flags win.

params.yaml has a `common` section (store, dataset, models, seed) and one section per command
(`extract`, `select`, `align`, `evaluate`, ...). A command's defaults are `common` overlaid
with its own section; keys are option names with `-` or `_` (`lambda` maps to `--lambda`).
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path
from typing import Any, TypeVar

import typer
import yaml

from store.errors import UserError

# params.yaml keys whose Python parameter name differs (`lambda` is a keyword)
KEY_ALIASES = {"lambda": "lam"}
COMMANDS = ("extract", "select", "align", "evaluate", "compare", "table", "sweep", "index", "embed")


def load_params(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        params = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise UserError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from err
    if not isinstance(params, dict):
        raise UserError(f"{path} must hold a mapping of sections")
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
    section = (ctx.find_root().default_map or {}).get(command, {})
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in section.items() if k in names})


def _to_option(value: Any) -> Any:
    """Lists in params.yaml become comma-separated option values."""
    if isinstance(value, list):
        return ",".join(str(v) for v in value)
    return value
