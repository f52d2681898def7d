"""One source of truth for defaults: the settings dataclasses, the CLI options built from them,
and params.yaml agree, except where params.yaml deliberately scales the demo down."""

from dataclasses import fields
from pathlib import Path

import pytest
import typer
import yaml

import pipeline.commands  # noqa: F401  (registers the commands)
from pipeline.app import app
from pipeline.config import COMMANDS, KEY_ALIASES, default_map
from stages.select import SelectSettings
from stages.sweep import SweepSettings
from stages.table import TableSettings
from stages.train import AlignSettings

ROOT = Path(__file__).resolve().parents[1]
# params.yaml values that differ from the CLI defaults on purpose: the offline demo trains
# ~1,300 pairs of 64-d random-encoder features, the CLI defaults are the paper's setting
INTENDED = {
    ("align", "out_dim"): (256, 512),
    ("align", "hidden_dim"): (512, 1024),
    ("align", "warmup_steps"): (100, 1000),
    ("align", "batch_size"): (256, 4096),
    ("align", "lr"): (0.003, 0.001),
    # evaluate and index without params.yaml take the run's own dataset; with it, `common.dataset`
    ("evaluate", "dataset"): ("digits", None),
    ("index", "dataset"): ("digits", None),
    # the demo's sweep is small (dvc repro stays a few minutes); the CLI's is the paper's curve
    ("sweep", "methods"): (
        "linear-last,linear-similar-rs,lowrank-similar-rs,csa-similar-rs",
        ",".join(SweepSettings.methods),
    ),
    ("sweep", "n_pairs"): ("100,300,0", "100,250,1000,0"),
    ("sweep", "seeds"): ("0,1", "0,1,2"),
    ("sweep", "workers"): (2, 1),
}


def cli_defaults(command: str) -> dict[str, object]:
    params = typer.main.get_command(app).commands[command].params
    return {p.name: p.default for p in params if p.param_type_name == "option"}


def same(a, b) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return float(a) == float(b)
    return str(a) == str(b)  # paths, and lists given as comma-separated text


def test_params_yaml_agrees_with_the_cli_defaults():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    found = {}
    for command, values in default_map(params).items():
        options = cli_defaults(command)
        own = {KEY_ALIASES.get(k, k.replace("-", "_")) for k in params.get(command) or {}}
        assert own <= set(options), f"params.yaml {command}: no such option {own - set(options)}"
        for key, value in values.items():
            if key in options and not same(value, options[key]):
                found[(command, key)] = (value, options[key])
    assert found == INTENDED


@pytest.mark.parametrize(
    "command, settings",
    [
        ("align", AlignSettings),
        ("select", SelectSettings),
        ("table", TableSettings),
        ("sweep", SweepSettings),
    ],
)
def test_cli_defaults_are_the_settings_defaults(command, settings):
    options = cli_defaults(command)
    expected = settings()
    for field in fields(settings):
        default = getattr(expected, field.name)
        if isinstance(default, tuple):  # table's n_pairs: comma-separated on the command line
            default = ",".join(map(str, default))
        assert same(options[field.name], default), (command, field.name)


def test_every_command_has_a_params_section():
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    # compare has no options to default; index and embed read only the common section
    assert set(COMMANDS) - {"compare", "index", "embed"} <= set(params)
