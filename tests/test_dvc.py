"""The DVC graph end to end on a minimal params set, in a temporary git + DVC repository."""

import json
import os
import shutil
import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
VARIANTS = ("last", "similar", "similar-rs")


def run(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "DVC_NO_ANALYTICS": "1", "HF_HUB_OFFLINE": "1"}
    done = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    return done


def changed_stages(cwd: Path) -> set[str]:
    return set(json.loads(run(["dvc", "status", "--json"], cwd).stdout))


@pytest.fixture(scope="module")
def repo(tmp_path_factory) -> Path:
    if shutil.which("dvc") is None:
        pytest.skip("dvc is not installed")
    repo = tmp_path_factory.mktemp("dvc-demo")
    for item in ("dvc.yaml", "stages", "store", "pipeline"):
        copy = shutil.copytree if (ROOT / item).is_dir() else shutil.copy
        copy(ROOT / item, repo / item)
    params = yaml.safe_load((ROOT / "params.yaml").read_text())
    params["extract"].update(limit=300, num_workers=0)
    params["select"]["n_samples"] = 200
    params["align"].update(epochs=4, warmup_steps=2, batch_size=128, out_dim=32)
    params["table"].update(n_pairs=[0], csa_dim=16)
    params["sweep"].update(n_pairs=[100, 0], seeds=[0], methods=["linear-last"], csa_dim=16)
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    run(["git", "init", "-q"], repo)
    run(["dvc", "init", "-q"], repo)
    run(["dvc", "repro"], repo)
    return repo


def test_repro_writes_metrics_and_the_comparison_table(repo):
    table = pd.read_csv(repo / "results.csv")
    assert table["run"].tolist() == list(VARIANTS)
    for name in VARIANTS:
        metrics = json.loads((repo / f"runs/align/{name}/metrics.json").read_text())
        config = json.loads((repo / f"runs/align/{name}/config.json").read_text())
        zero_shot, retrieval = metrics["zero_shot"], metrics["retrieval"]
        assert 0 <= zero_shot["top1"] <= zero_shot["top5"] <= 100
        assert zero_shot["n_classes"] == 10 and retrieval["n_images"] == 300
        assert 0 <= retrieval["i2t_r1"] <= retrieval["i2t_r5"] <= retrieval["i2t_r10"] <= 100
        row = table.set_index("run").loc[name]
        assert row.filter(like="top1").iloc[0] == pytest.approx(zero_shot["top1"], abs=0.05)
        assert config["lambda"] == (0.0 if name != "similar-rs" else 10.0)
        assert metrics["run"]["allow_overlap"] is False  # no evaluation pairs in training
    selection = json.loads((repo / "runs/select/selection.json").read_text())
    similar = json.loads((repo / "runs/align/similar/config.json").read_text())
    last = json.loads((repo / "runs/align/last/config.json").read_text())
    assert similar["image_layer"] == selection["image_layer"]
    assert similar["text_layer"] == selection["text_layer"]
    assert (last["image_layer"], last["text_layer"]) == ("final_norm", "layer.3")
    assert (repo / "runs/select/heatmap.png").stat().st_size > 0
    assert (repo / "results.md").read_text().count("\n|") >= 4
    assert len(pd.read_csv(repo / "runs/table/table.csv")) == 9
    assert len(pd.read_csv(repo / "runs/sweep/sweep.csv")) == 2
    assert (repo / "runs/sweep/scaling.png").stat().st_size > 0


def test_dvc_sees_metrics_and_nothing_left_to_run(repo):
    shown = json.loads(run(["dvc", "metrics", "show", "--json"], repo).stdout)
    files = next(iter(shown.values()))["data"]
    assert {f"runs/align/{v}/metrics.json" for v in VARIANTS} <= set(files)
    assert changed_stages(repo) == set()


def test_changing_lambda_reruns_only_align_and_after(repo):
    params_path = repo / "params.yaml"
    original = params_path.read_text()
    params = yaml.safe_load(original)
    params["align"]["lambda"] = 1.0
    params_path.write_text(yaml.safe_dump(params, sort_keys=False))
    try:
        changed = changed_stages(repo)
    finally:
        params_path.write_text(original)
    assert "align@similar-rs" in changed
    assert not {s for s in changed if s.startswith(("extract", "select"))}
