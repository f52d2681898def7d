"""A head registered from this file alone (`stages.heads.register_head`) works end to end: align
(its --head choice and validation), sweep, evaluate, the model of the run and its export."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from torch import nn
from typer.testing import CliRunner

import pipeline.commands  # noqa: F401  (registers the commands)
from pipeline.app import app
from stages.extract import ExtractOptions, extract
from stages.heads import head_kind, head_kinds, register_head
from stages.model import AlignedModel, export_model
from stages.train import AlignSettings
from store import FeatureStore, UserError


@register_head("toy-scaled", display="Toy scaled", help="a linear map times a learnt scale")
class ToyScaledHead(nn.Module):
    """A linear map times one learnt scale (gradient-trained: no trainer given)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int):
        super().__init__()
        self.proj = nn.Linear(in_dim, out_dim)
        self.scale = nn.Parameter(torch.ones(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.scale * self.proj(x)


MODELS = ["--image-model", "tiny-random-vit", "--text-model", "tiny-random-text"]
TRAIN = [*MODELS, "--layers", "last", "--out-dim", "8", "--batch-size", "32", "--epochs", "3",
         "--warmup-steps", "1", "--no-progress"]  # fmt: skip


def invoke(*args) -> str:
    result = CliRunner().invoke(app, ["--params", "/dev/null", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = str(tmp_path_factory.mktemp("toyhead") / "features.zarr")
    for split, limit in (("train", 96), ("test", 40), ("prompts", 0)):
        opts = ExtractOptions(
            batch_size=48, block_rows=48, num_workers=0, progress=False, limit=limit
        )
        if split != "prompts":
            extract(path, "digits", split, "digits", "tiny-random-vit", opts)
        extract(path, "digits", split, "digits", "tiny-random-text", opts)
    return path


def test_the_registry_names_validates_and_helps():
    assert head_kind("TOY-SCALED").display == "Toy scaled"
    assert head_kind("toy-scaled").gradient_trained
    assert AlignSettings(head="Toy-Scaled").head == "toy-scaled"
    assert list(head_kinds())[:4] == ["linear", "mlp", "lowrank", "csa"]
    with pytest.raises(UserError, match="toy-scaled"):
        AlignSettings(head="toy")


def test_a_registered_head_trains_evaluates_loads_and_exports(store, tmp_path):
    run = tmp_path / "run"
    invoke("align", "--store", store, "--out", run, *TRAIN, "--head", "toy-scaled")
    config = json.loads((run / "config.json").read_text())
    assert config["head"] == "toy-scaled" and config["steps"] == 3 * 3  # 96 pairs, batch 32

    invoke("evaluate", "--store", store, "--run", run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["head"] == "toy-scaled" and 0 <= metrics["zero_shot"]["top1"] <= 100

    # the model of the run: its heads are the registered class, applied to the stored features
    model = AlignedModel.from_run(run, device="cpu")
    assert isinstance(model.heads["image"], ToyScaledHead)
    stored = FeatureStore(store).open("digits", "test", "text", "tiny-random-text")
    manifest = FeatureStore(store).manifest("digits", "test")
    captions = manifest["caption"].tolist()[:4]
    features = torch.from_numpy(stored.read_layer(config["text_layer"])[:4])
    with torch.no_grad():
        expected = torch.nn.functional.normalize(model.heads["text"](features), dim=-1)
    got = model.encode_text(captions)
    torch.testing.assert_close(got, expected, atol=5e-3, rtol=0)  # float16 storage

    export_model(run, tmp_path / "export")
    loaded = AlignedModel.from_pretrained(tmp_path / "export", device="cpu")
    assert isinstance(loaded.heads["text"], ToyScaledHead)
    torch.testing.assert_close(loaded.encode_text(captions), got)


def test_a_registered_head_is_a_sweep_method(store, tmp_path):
    import yaml

    out, params = tmp_path / "sweep", tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"align": {"epochs": 3, "out_dim": 8, "batch_size": 32}}))
    args = ["--params", str(params), "sweep", "--store", store, *MODELS, "--out", str(out),
            "--methods", "toy-scaled-last", "--n-pairs", "0", "--seeds", "0",
            "--select-dir", str(tmp_path / "sel"), "--no-progress"]  # fmt: skip
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    rows = pd.read_csv(out / "sweep.csv")
    assert rows["method"].tolist() == ["toy-scaled-last"]
    assert np.isfinite(rows["zs_top1"]).all()
