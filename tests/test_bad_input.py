"""Bad input and faults, as a hostile user would try them: every command answers one line on
stderr and exit 2, never a traceback, and changes nothing that existed before; and the
silent-wrongness fixes (stale metrics, the run's own dataset, params coercion, ...)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import pipeline.commands  # noqa: F401  (registers the commands)
from pipeline.app import app
from tests.helpers import (
    files,
    run_cli,
    write_features,
    write_pairs_manifest,
    write_prompts_manifest,
)

N_IMG, N_CLS = 48, 3
NAMES = ["zero", "one", "two"]
TEMPLATES = ("a {}", "the {}")
LAYERS = ["l0", "l1"]


def build_store(store: Path, rng: np.random.Generator) -> None:
    """Image and text features of `toy` (train, test, prompts) from one shared latent, so a
    tiny run learns something; several row blocks per array."""
    for split in ("train", "test"):
        labels = rng.integers(0, N_CLS, size=N_IMG)
        latent = rng.normal(size=(N_IMG, 6)) + 3 * np.eye(N_CLS, 6)[labels]
        for modality, model, dim in (("image", "img", 8), ("text", "txt", 6)):
            mix = rng.normal(size=(6, dim))
            values = np.stack([latent @ mix, rng.normal(size=(N_IMG, dim))], axis=1)
            write_features(store, "toy", split, modality, model, values, LAYERS, block_rows=16)
        write_pairs_manifest(store, "toy", split, N_IMG, 1, labels.tolist(), NAMES)
    prompts = np.stack(
        [np.eye(N_CLS, 6).repeat(len(TEMPLATES), 0) @ rng.normal(size=(6, 6))] * 2, 1
    )
    write_features(store, "toy", "prompts", "text", "txt", prompts, LAYERS)
    write_prompts_manifest(store, "toy", NAMES, TEMPLATES)


TRAIN = ["--dataset", "toy", "--image-model", "img", "--text-model", "txt", "--layers", "last",
         "--out-dim", "4", "--batch-size", "16", "--epochs", "2", "--warmup-steps", "1",
         "--no-progress"]  # fmt: skip


def invoke(*args: str) -> None:
    result = CliRunner().invoke(app, ["--params", "/dev/null", *map(str, args)])
    assert result.exit_code == 0, result.output


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    """One directory: features.zarr (toy/train, test, prompts) and run/ (trained, evaluated)."""
    root = tmp_path_factory.mktemp("bad")
    build_store(root / "features.zarr", np.random.default_rng(0))
    invoke("align", "--store", root / "features.zarr", "--out", root / "run", *TRAIN)
    invoke("evaluate", "--store", root / "features.zarr", "--run", root / "run")
    return root


# -- item 1: re-training into a run directory drops the old run's outputs -----------------------
def test_retraining_into_a_run_dir_removes_the_old_metrics(toy, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(toy / "run", run)
    assert (run / "metrics.json").is_file()
    invoke("align", "--store", toy / "features.zarr", "--out", run, *TRAIN, "--lambda", "0")
    assert not (run / "metrics.json").exists()  # the old run's numbers are gone
    assert json.loads((run / "config.json").read_text())["lambda"] == 0.0


# -- item 2: evaluate's dataset is the run's own, and said ----------------------------------
def test_evaluate_defaults_to_the_runs_dataset_not_params(toy, tmp_path, capsys):
    params = tmp_path / "params.yaml"
    params.write_text("common:\n  dataset: digits\n")
    out = tmp_path / "metrics.json"
    code, stdout, stderr = run_cli(
        ["--params", params, "evaluate", "--store", toy / "features.zarr", "--run",
         toy / "run", "--out", out], capsys,
    )  # fmt: skip
    assert code == 0, stderr
    assert "evaluated on toy/test" in stdout
    assert json.loads(out.read_text())["run"]["eval_dataset"] == "toy"


# -- item 4: --params --------------------------------------------------------------------
def test_params_numbers_written_as_yaml_strings_are_numbers(tmp_path):
    from pipeline.config import default_map, load_params

    params = tmp_path / "p.yaml"
    params.write_text("align:\n  lr: 1e-3\n  head: mlp\n")
    assert default_map(load_params(params))["align"]["lr"] == 0.001
    assert default_map(load_params(params))["align"]["head"] == "mlp"


# -- the table: every command's bad inputs --------------------------------------------------
# {store} {run} {tmp}: the shared store and run, and this test's own scratch folder
S, R = ["--store", "{store}"], ["--run", "{run}"]
ALIGN = ["align", *S, "--out", "{run}", *TRAIN]  # into the existing run: it must survive
BAD_INPUTS = {
    "params missing": ["--params", "{tmp}/none.yaml", "store", "ls", *S],
    "params a directory": ["--params", "{tmp}", "store", "ls", *S],
    "params scalar section": ["--params", "{tmp}/scalar.yaml", "store", "ls", *S],
    "params not utf-8": ["--params", "{tmp}/latin1.yaml", "store", "ls", *S],
    "params lr not a number": ["--params", "{tmp}/lr.yaml", "table", *S, "--dataset", "toy"],
    "lambda nan": [*ALIGN, "--lambda", "nan"],
    "lr nan": [*ALIGN, "--lr", "nan"],
    "temperature nan": [*ALIGN, "--temperature", "nan"],
    "seed negative": [*ALIGN, "--seed", "-1"],
    "head unknown": [*ALIGN, "--head", "cnn"],
    "table csa-dim 0": ["table", *S, "--dataset", "toy", "--out", "{tmp}/t", "--csa-dim", "0"],
    "table lambda nan": ["table", *S, "--dataset", "toy", "--out", "{tmp}/t", "--lambda", "nan"],
    "align out is a file": ["align", *S, *TRAIN, "--out", "{run}/config.json"],
    "evaluate another store": ["evaluate", *R, "--store", "{tmp}/none.zarr"],
    "evaluate out a directory": ["evaluate", *R, *S, "--out", "{run}"],
    "compare out a directory": ["compare", "{run}", "--out-md", "{run}"],
    "compare malformed metrics": ["compare", "{run}", "{tmp}/badrun"],
    "select out a file": [
        "select",
        *S,
        "--dataset",
        "toy",
        "--image-model",
        "img",
        "--text-model",
        "txt",
        "--out",
        "{run}/config.json",
    ],
    "store under a file": ["extract", "--store", "{run}/config.json/s.zarr"],
    "coco invalid json": ["extract", "--source", "coco:{tmp}/bad-json", "--store", "{tmp}/c.zarr"],
    "coco no annotations": ["extract", "--source", "coco:{tmp}/no-ann", "--store", "{tmp}/c.zarr"],
    "coco unknown image": ["extract", "--source", "coco:{tmp}/unknown", "--store", "{tmp}/c.zarr"],
    "garbage manifest": ["align", "--store", "{tmp}/copy.zarr", "--out", "{tmp}/r", *TRAIN],
    "foreign array": [
        "align",
        "--store",
        "{tmp}/copy.zarr",
        "--out",
        "{tmp}/r",
        *TRAIN,
        "--image-model",
        "foreign",
    ],
    "truncated chunk": [
        "align",
        "--store",
        "{tmp}/copy.zarr",
        "--out",
        "{tmp}/r",
        *TRAIN,
        "--text-model",
        "cut",
    ],
}
SCRATCH = {
    "scalar.yaml": b"align: 5\n",
    "latin1.yaml": "common:\n  dataset: caf\u00e9\n".encode("latin-1"),
    "lr.yaml": b"align:\n  lr: fast\n",
    "badrun/metrics.json": b"[1]\n",
    "bad-json/annotations/captions_train2017.json": b"{bad",
    "no-ann/annotations/captions_train2017.json": b'{"images": []}',
    "unknown/annotations/captions_train2017.json": (
        b'{"images": [{"id": 1, "file_name": "a.png"}], '
        b'"annotations": [{"id": 5, "image_id": 2, "caption": "x"}]}'
    ),
}


def damage_a_copy(toy: Path, tmp: Path, case: str) -> None:
    """The store cases work on a copy: a garbage manifest, a foreign array, a truncated chunk."""
    import zarr

    from store import FeatureStore

    copy = tmp / "copy.zarr"
    shutil.copytree(toy / "features.zarr", copy)
    if case == "garbage manifest":
        (copy / "toy/train/manifest.parquet").write_bytes(b"garbage")
    elif case == "foreign array":
        zarr.open_group(copy, mode="a").create_array(
            "toy/train/image/foreign/complete", shape=(2,), dtype="uint8"
        )
    elif case == "truncated chunk":
        shutil.copytree(copy / "toy/train/text/txt", copy / "toy/train/text/cut")
        array = FeatureStore(copy).open("toy", "train", "text", "cut")
        array.chunk_file(1, 1).write_bytes(array.chunk_file(1, 1).read_bytes()[:7])


@pytest.mark.parametrize("args", BAD_INPUTS.values(), ids=BAD_INPUTS.keys())
def test_bad_input_is_one_line_exit_2_and_changes_nothing(toy, tmp_path, capsys, request, args):
    for name, data in SCRATCH.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(data)
    shutil.copy(toy / "run/config.json", tmp_path / "badrun/config.json")
    damage_a_copy(toy, tmp_path, request.node.callspec.id)
    where = {"store": toy / "features.zarr", "run": toy / "run", "tmp": tmp_path}
    args = [a.format(**where) for a in args]
    if args[0] != "--params":
        args = ["--params", "/dev/null", *args]
    before = files(toy)
    code, _, stderr = run_cli(args, capsys)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr
    assert files(toy) == before


# -- item 10: Ctrl-C ------------------------------------------------------------------------
def test_sigint_says_how_to_resume_and_exits_130(capsys):
    import os
    import signal

    from pipeline.app import exit_on_sigint

    previous = signal.getsignal(signal.SIGINT)
    try:
        exit_on_sigint()
        with pytest.raises(SystemExit) as exit_:
            os.kill(os.getpid(), signal.SIGINT)
            signal.sigtimedwait([], 0.1)  # let the handler run here
    finally:
        signal.signal(signal.SIGINT, previous)
    assert exit_.value.code == 130
    assert capsys.readouterr().err.strip() == "interrupted; run the same command to resume"


# -- item 10: head names, and a selection.json made from another store ------------------------
def test_head_names_ignore_case_and_the_error_lists_csa():
    from stages.train import AlignSettings
    from store import UserError

    assert AlignSettings(head="CSA").head == "csa"
    with pytest.raises(UserError, match="csa"):
        AlignSettings(head="cnn")


def test_selection_of_another_store_is_not_reused(toy, tmp_path):
    from stages.pairs import PairSpec
    from stages.select import SelectSettings, resolve_layers

    spec = PairSpec(
        store=toy / "features.zarr", dataset="toy", split="train", image_model="img",
        text_model="txt",
    )  # fmt: skip
    sel = tmp_path / "sel"
    settings = SelectSettings(n_samples=0, k=4, device="cpu")
    chosen = resolve_layers("auto", spec, sel, settings)
    info = json.loads((sel / "selection.json").read_text())
    # the same models and split, but the features of another store, whose best pair differs
    other = "l1" if chosen[0] == "l0" else "l0"
    info.update(image_layer=other, features={**info["features"], "store": "/elsewhere.zarr"})
    (sel / "selection.json").write_text(json.dumps(info))
    said = []
    assert resolve_layers("auto", spec, sel, settings, log=said.append) == chosen
    assert said and "other features" in said[0]
    info["features"] = json.loads((sel / "selection.json").read_text())["features"]
    info["image_layer"] = other  # its own store's file: reused as it is
    (sel / "selection.json").write_text(json.dumps(info))
    assert resolve_layers("auto", spec, sel, settings)[0] == other


# ==== DATA LOSS AND RUNS (align, table, sweep, selection) ====
# (cases of this area go below this line, above the next marker)
def refused(args: list, capsys, *must: str, never: tuple[str, ...] = ()) -> str:
    """Run a command that must fail: exit 2, one `error: ` line, no traceback; the line holds
    every `must` and none of `never`. Returns the line."""
    code, _, stderr = run_cli(["--params", "/dev/null", *map(str, args)], capsys)
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr
    for text in must:
        assert text in stderr, stderr
    for text in never:
        assert text not in stderr, stderr
    return stderr.strip()


def copy_run(toy: Path, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(toy / "run", run)
    return run


# -- the run directory is one artifact, read through one checked reader -----------------------
def test_run_config_null_is_one_line_naming_the_file_and_align(toy, tmp_path, capsys):
    run = copy_run(toy, tmp_path)
    (run / "config.json").write_text("null\n")
    before = files(run)
    line = refused(["evaluate", "--store", toy / "features.zarr", "--run", run], capsys)
    assert "config.json" in line and "python -m pipeline align" in line
    assert files(run) == before


@pytest.mark.parametrize("key", ["image_model", "image_layer"])
def test_run_config_without_a_key_is_one_line(toy, tmp_path, capsys, key):
    run = copy_run(toy, tmp_path)
    config = json.loads((run / "config.json").read_text())
    del config[key]
    (run / "config.json").write_text(json.dumps(config))
    refused(["evaluate", "--run", run], capsys, "config.json", key, "python -m pipeline align")


def test_run_config_with_a_wrong_type_is_one_line(toy, tmp_path, capsys):  # not listed
    run = copy_run(toy, tmp_path)
    config = json.loads((run / "config.json").read_text())
    config["image_dim"] = "8"
    (run / "config.json").write_text(json.dumps(config))
    refused(["evaluate", "--run", run], capsys, "config.json", "image_dim", "int")


def test_edited_image_layer_of_the_same_width_is_refused(toy, tmp_path, capsys):
    run = copy_run(toy, tmp_path)
    config = json.loads((run / "config.json").read_text())
    assert config["image_layer"] == "l1" and config["image_dim"] == 8  # l0 is 8 wide too
    config["image_layer"] = "l0"
    (run / "config.json").write_text(json.dumps(config))
    refused(["evaluate", "--run", run], capsys, "image_layer", "head.safetensors", "align")


def test_head_file_of_another_run_is_refused(toy, tmp_path, capsys):  # not listed
    run = copy_run(toy, tmp_path)
    other = tmp_path / "other"
    invoke("align", "--store", toy / "features.zarr", "--out", other, *TRAIN, "--seed", "3")
    shutil.copy(other / "head.safetensors", run / "head.safetensors")
    refused(["evaluate", "--run", run], capsys, "head.safetensors", "changed", "align")
    (run / "head.safetensors").unlink()
    refused(["evaluate", "--run", run], capsys, "head.safetensors")


def test_files_added_to_a_run_later_do_not_break_its_reading(toy):  # not listed
    from stages.heads import load_run

    assert (toy / "run" / "metrics.json").is_file()  # written by evaluate after the run
    config, _, _ = load_run(toy / "run")
    assert "metrics.json" not in config["files"] and "head.safetensors" in config["files"]
    modes = {p.name: p.stat().st_mode & 0o777 for p in (toy / "run").iterdir()}
    assert modes["head.safetensors"] == modes["config.json"] == 0o644


def test_failed_retraining_keeps_the_previous_run(toy, tmp_path, capsys):  # not listed
    run = copy_run(toy, tmp_path)
    before = files(run)
    # CLIP logits overflow: the loss is NaN at the first step
    refused(
        ["align", "--store", toy / "features.zarr", "--out", run, *TRAIN,
         "--temperature", "1e-300"],
        capsys, "step 0",
    )  # fmt: skip
    assert files(run) == before


# -- extra data never from the evaluation split or the training split, unless said --------------
ALIGN_TOY = ["align", "--store", "{store}", "--out", "{tmp}/r", *TRAIN, "--lambda", "1"]


@pytest.mark.parametrize(
    "extra, must",
    [
        (["--extra-pairs", "toy/test"], "evaluation split"),
        (["--unpaired-images", "toy/test"], "evaluation split"),
        (["--unpaired-texts", "toy/train"], "training split itself"),  # not listed
    ],
    ids=["extra pairs of the eval split", "unpaired of the eval split", "unpaired of train"],
)
def test_extra_data_overlapping_evaluation_or_training_is_refused(
    toy, tmp_path, capsys, extra, must
):
    where = {"store": toy / "features.zarr", "tmp": tmp_path}
    args = [a.format(**where) for a in ALIGN_TOY]
    refused([*args, *extra], capsys, must, "--allow-overlap")
    assert not (tmp_path / "r").exists()
    code, _, err = run_cli(["--params", "/dev/null", *args, *extra, "--allow-overlap"], capsys)
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "config.json").read_text())["allow_overlap"] is True


@pytest.mark.parametrize(
    "extra, never",
    [
        (["--unpaired-images", "toy/prompts"], "extract"),
        (["--extra-pairs", "toy/prompts"], "extract"),
        (["--unpaired-images", "toy/test/extra"], "--dataset toy/test"),
    ],
    ids=["unpaired images of a text-only split", "extra pairs of a text-only split", "a/b/c"],
)
def test_unclear_extra_data_errors_say_what_is_wrong(toy, tmp_path, capsys, extra, never):
    where = {"store": toy / "features.zarr", "tmp": tmp_path}
    args = [a.format(**where) for a in ALIGN_TOY]
    must = "text-only" if extra[1].endswith("prompts") else "DATASET/SPLIT"
    refused([*args, *extra, "--allow-overlap"], capsys, must, never=(never,))


# -- --max-steps is a cap on optimiser steps, exactly -----------------------------------------
@pytest.mark.parametrize("batch, steps", [(16, 4), (64, 5)], ids=["3 steps an epoch", "full batch"])
def test_max_steps_is_exact(toy, tmp_path, batch, steps):
    out = tmp_path / "r"
    args = [*TRAIN, "--epochs", "100", "--batch-size", str(batch), "--max-steps", str(steps)]
    invoke("align", "--store", toy / "features.zarr", "--out", out, *args)
    config = json.loads((out / "config.json").read_text())
    history = pd.read_csv(out / "history.csv")
    assert config["steps"] == steps and history["step"].iloc[-1] == steps


# -- align --layers auto --metric M never rewrites another metric's selection -----------------
def test_auto_layers_of_another_metric_keep_the_selection(toy, tmp_path, capsys):
    store = toy / "features.zarr"
    models = ["--dataset", "toy", "--image-model", "img", "--text-model", "txt"]
    sel = tmp_path / "sel"
    invoke("select", "--store", store, *models, "--out", sel, "--n-samples", "0", "--k", "4")
    before = files(sel)
    args = ["--store", store, *[a for a in TRAIN if a != "last"], "--select-dir", sel]
    args[args.index("--layers") + 1 : args.index("--layers") + 1] = ["auto"]
    for _ in range(2):  # the second run reuses the cka selection it made (not listed)
        invoke("align", *args, "--metric", "cka", "--out", tmp_path / "r")
    assert files(sel) == before  # the mutual-kNN selection: byte for byte
    own = json.loads((tmp_path / "sel-cka" / "selection.json").read_text())
    assert own["metric"] == "cka"
    config = json.loads((tmp_path / "r" / "config.json").read_text())
    assert config["layer_metric"] == "cka"
    assert [config["image_layer"], config["text_layer"]] == [own["image_layer"], own["text_layer"]]


# -- table and sweep resume: runs complete with the same settings are kept --------------------
def test_sweep_keeps_complete_runs_and_redoes_the_rest(toy, tmp_path, capsys):
    import yaml

    def params(epochs: int) -> Path:
        path = tmp_path / f"params{epochs}.yaml"
        path.write_text(yaml.safe_dump({
            "align": {"epochs": epochs, "batch_size": 16, "out_dim": 4, "warmup_steps": 1},
            "select": {"n_samples": 0, "k": 4},
        }))  # fmt: skip
        return path

    out = tmp_path / "sweep"
    args = ["--params", params(2), "sweep", "--store", toy / "features.zarr", "--dataset", "toy",
            "--image-model", "img", "--text-model", "txt", "--out", out, "--select-dir",
            tmp_path / "sel", "--methods", "linear-last,mlp-last", "--n-pairs", "0",
            "--seeds", "0", "--no-progress"]  # fmt: skip
    code, _, err = run_cli(args, capsys)
    assert code == 0, err
    first, second = out / "runs/nall/seed0/linear-last", out / "runs/nall/seed0/mlp-last"
    kept = files(first)
    (second / "metrics.json").unlink()  # as if Ctrl-C came while evaluating the second run
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "2 runs (1 complete before, kept)" in stdout
    assert files(first) == kept and (second / "metrics.json").is_file()
    # another setting is another run (not listed): nothing kept
    args[1] = params(3)
    code, stdout, err = run_cli(args, capsys)
    assert code == 0, err
    assert "complete before" not in stdout


# ==== SELECT AND LAYER METRICS ====
# (cases of this area go below this line, above the next marker)


# ==== ENCODERS, EXTRACT, STORE, MODEL API, CLASSIFY, EMBED, EXPORT ====
# (cases of this area go below this line, above the next marker)


# ==== EVALUATE, INDEX, SEARCH, SETTINGS (params.yaml) ====
# (cases of this area go below this line, above the next marker)
