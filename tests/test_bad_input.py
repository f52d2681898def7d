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


def test_sigint_line_of_a_command_that_does_not_resume_says_the_previous_output_is_kept():
    from pipeline.app import interrupt_message

    assert interrupt_message("sweep") == "interrupted; run the same command to resume"
    assert "resume" not in interrupt_message("align")
    assert "previous output is kept" in interrupt_message("align")


# -- item 10: head names, and a selection.json made from another store ------------------------
def test_head_names_ignore_case_and_the_error_lists_csa():
    from stages.train import AlignSettings
    from store import UserError

    assert AlignSettings(head="CSA").head == "csa"
    with pytest.raises(UserError, match="csa"):
        AlignSettings(head="cnn")


def test_selection_of_another_store_is_not_reused(toy, tmp_path):
    from stages.align import resolve_layers
    from stages.pairs import PairSpec
    from stages.select import SelectSettings

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


@pytest.fixture(scope="module")
def selected(tmp_path_factory) -> Path:
    """A planted store (f.zarr) and a good selection of it (sel/)."""
    from tests.test_select import planted_store, select_args

    root = tmp_path_factory.mktemp("select")
    planted_store(root / "f.zarr", n_images=60, captions=1)
    invoke(*select_args(root / "f.zarr", root / "sel", "--no-progress"))
    return root


def select_refused(selected: Path, out: Path, capsys, *extra: str) -> str:
    """Run select into `out`: exit 2, one `error:` line, nothing on disk changed."""
    from tests.helpers import one_line_error
    from tests.test_select import select_args

    before = files(selected)
    code, _, stderr = run_cli(["--params", "/dev/null", *select_args(selected / "f.zarr", out,
                                                                     "--no-progress", *extra)],
                              capsys)  # fmt: skip
    assert code == 2, stderr
    assert files(selected) == before
    return one_line_error(stderr)


def test_select_calibrate_below_19_is_refused_naming_the_smallest_k(selected, capsys):
    line = select_refused(selected, selected / "sel", capsys, "--calibrate", "3")
    assert "--calibrate 3" in line and "at least 19" in line and "95th percentile" in line
    select_refused(selected, selected / "sel", capsys, "--calibrate", "18")


def test_select_out_that_is_a_file_or_under_a_file_is_refused_before_any_work(selected, capsys):
    (selected / "a-file").write_text("keep me")
    line = select_refused(selected, selected / "a-file", capsys)
    assert "--out" in line and "is a file" in line
    line = select_refused(selected, selected / "a-file" / "sel", capsys)
    assert "a-file is a file, not a folder" in line


def test_select_out_holding_other_files_is_not_replaced(selected, capsys):
    """Not listed: the selection replaces its whole directory, never a folder of other things."""
    (selected / "mine").mkdir(exist_ok=True)
    (selected / "mine" / "notes.txt").write_text("my notes")
    line = select_refused(selected, selected / "mine", capsys)
    assert "'notes.txt'" in line and "not part of a selection" in line


def test_select_unknown_metric_lists_the_registry(selected, capsys):
    line = select_refused(selected, selected / "new", capsys, "--metric", "cka,nope")
    assert "unknown metric ['nope']" in line and "mutual_knn" in line
    assert not (selected / "new").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="a GPU is here")
def test_select_device_cuda_without_a_gpu_is_one_line(selected, capsys):
    line = select_refused(selected, selected / "new", capsys, "--device", "cuda")
    assert "cuda" in line and "no CUDA GPU" in line


@pytest.mark.parametrize(
    "damage, named",
    [
        (lambda sel: (sel / "selection.json").write_text("{not json"), "selection.json: not valid"),
        (lambda sel: (sel / "selection.json").unlink(), "selection.json: missing"),
        (lambda sel: (sel / "heatmap.png").unlink(), "heatmap.png: missing"),
        (lambda sel: (sel / "selection.json").write_text("[]"), "must hold a JSON object"),
        # not listed: scores.parquet edited after the selection was written
        (lambda sel: __import__("pandas").read_parquet(sel / "scores.parquet").assign(score=1.0)
         .to_parquet(sel / "scores.parquet"), "scores.parquet: changed since it was written"),
    ],
)  # fmt: skip
def test_a_damaged_selection_is_refused_by_its_one_reader(selected, tmp_path, damage, named):
    from stages.select import read_selection
    from store import UserError

    sel = tmp_path / "sel"
    shutil.copytree(selected / "sel", sel)
    damage(sel)
    with pytest.raises(UserError) as err:
        read_selection(sel, required=True)
    message = str(err.value)
    assert "\n" not in message and named in message
    assert f"python -m pipeline select --out {sel}" in message


def test_a_selection_json_of_the_wrong_shape_names_the_key(selected, tmp_path):
    from stages.select import read_selection
    from store import UserError

    sel = tmp_path / "sel"
    shutil.copytree(selected / "sel", sel)
    info = json.loads((sel / "selection.json").read_text())
    (sel / "selection.json").write_text(json.dumps({**info, "image_index": "one"}))
    with pytest.raises(UserError, match="`image_index` must be int"):
        read_selection(sel)
    assert read_selection(tmp_path / "nothing-here") is None  # nothing to reuse: None


# ==== ENCODERS, EXTRACT, STORE, MODEL API, CLASSIFY, EMBED, EXPORT ====
# (cases of this area go below this line, above the next marker)


# the aligned model's Python API and its commands (classify, embed, export) on a tiny run: random
# heads on the tiny random encoders, made in seconds (tests/model_helpers.py)
@pytest.fixture(scope="module")
def enc_run(tmp_path_factory) -> Path:
    from tests.model_helpers import tiny_run

    return tiny_run(tmp_path_factory.mktemp("enc") / "run")


@pytest.fixture(scope="module")
def enc_model(enc_run):
    from stages.model import AlignedModel

    return AlignedModel.from_run(enc_run, device="cpu")


def enc_picture(side: int = 12):
    from PIL import Image

    pixels = np.random.default_rng(0).integers(0, 256, (side, side + 3, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def enc_fails(args, capsys, *expected: str) -> str:
    """A command that must stop with exit 2 and one `error: ` line holding `expected`."""
    from tests.helpers import one_line_error

    code, _, err = run_cli(args, capsys)
    assert code == 2, err
    line = one_line_error(err)
    assert all(text in line for text in expected), line
    return line


@pytest.mark.parametrize(
    ("call", "error", "names"),
    [
        (lambda m, im: m.classify(im, "cat"), TypeError, "class_names"),  # not c, a, t
        (lambda m, im: m.classify(im, None), TypeError, "class_names"),
        (lambda m, im: m.classify(im, ["cat", 3]), TypeError, r"class_names\[1\]"),
        (lambda m, im: m.classify(im, ["cat", "cat"]), ValueError, "class_names holds 'cat'"),
        (lambda m, im: m.classify(im, ["cat", " "]), ValueError, r"class_names\[1\] is empty"),
        (lambda m, im: m.classify(im, ["cat", "NaN"]), ValueError, "missing value"),
        (lambda m, im: m.classify(im, ["a", "b"], ["{} and {}"]), ValueError, r"templates\[0\]"),
        (lambda m, im: m.classify(im, ["a", "b"], ["{x} {}"]), ValueError, r"templates\[0\]"),
        (lambda m, im: m.classify(im, ["a", "b"], "a {}"), TypeError, "templates"),
        (lambda m, im: m.classify(im, ["a", "b"], []), ValueError, "templates"),
        (lambda m, im: m.classify(im, ["a", "b"], k=0), ValueError, "k must be at least 1"),
        (lambda m, im: m.classify(im, ["a", "b"], k="3"), TypeError, "k must be an integer"),
        (lambda m, im: m.classify(None, ["a", "b"]), TypeError, "images"),
        (lambda m, im: m.encode_image([im, 7]), TypeError, r"images\[1\]"),
        (lambda m, im: m.encode_image(im, batch_size=0), ValueError, "batch_size"),
        (lambda m, im: m.encode_text(None), TypeError, "texts"),
        (lambda m, im: m.encode_text(["a", None]), TypeError, r"texts\[1\]"),  # not listed
        (lambda m, im: m.class_embeddings(["a"], ["{"]), ValueError, r"templates\[0\]"),
        (lambda m, im: m.encode_image(np.full((8, 8, 3), 2.0)), ValueError, "0..1"),
    ],
)
def test_api_arguments_are_checked_and_named(enc_model, call, error, names):
    from store import UserError

    with pytest.raises(error, match=names) as caught:
        call(enc_model, enc_picture())
    assert isinstance(caught.value, UserError)  # and one line on the command line


def test_api_takes_numpy_and_torch_images(enc_model):
    import torch

    picture = enc_picture()
    pixels = np.array(picture)  # (H, W, 3) uint8, writable
    expected = enc_model.encode_image(picture)
    chw = torch.from_numpy(pixels).permute(2, 0, 1)
    for image in (pixels, pixels / 255.0, chw, chw.float() / 255):
        torch.testing.assert_close(enc_model.encode_image(image), expected, rtol=0, atol=1e-6)
    # the listed case: a CHW tensor of zeros is a black image, not a traceback
    black = enc_model.encode_image(torch.zeros(3, 8, 8))
    torch.testing.assert_close(black, enc_model.encode_image(np.zeros((8, 8, 3), np.uint8)))
    # not listed: a batch (N, C, H, W) is N images
    batch = enc_model.encode_image(torch.stack([chw, chw]))
    torch.testing.assert_close(batch, expected.repeat(2, 1), rtol=0, atol=1e-6)


def test_api_images_without_pixels_or_that_are_folders(enc_model, tmp_path):
    from PIL import Image

    for empty in (Image.new("RGB", (0, 0)), np.zeros((0, 0, 3), np.uint8)):
        with pytest.raises(ValueError, match=r"images\[0\] has no pixels \(0x0\)"):
            enc_model.encode_image(empty)
    with pytest.raises(ValueError, match="is a directory, not an image file"):
        enc_model.encode_image(tmp_path)
    with pytest.raises(ValueError, match="do not exist"):
        enc_model.encode_image(tmp_path / "gone.png")


def test_api_empty_inputs_have_the_width_of_real_rows(tmp_path):
    """A CSA run's rows are out_dim + 1 wide (the slack): so are those of no input."""
    from stages.model import AlignedModel
    from tests.model_helpers import tiny_run

    for head, width in (("csa", 9), ("linear", 8)):
        model = AlignedModel.from_run(tiny_run(tmp_path / head, head, 8), device="cpu")
        assert model.encode_image([enc_picture()]).shape == (1, width)
        assert model.encode_image([]).shape == (0, width)
        assert model.encode_text([]).shape == (0, width)


def test_classify_refuses_bad_labels_and_outputs(enc_run, tmp_path, capsys):
    picture = tmp_path / "a.png"
    enc_picture().save(picture)
    run = ["classify", "--run", enc_run]
    enc_fails([*run, "--labels", "zero,zero,one,one", picture], capsys, "'zero' twice")
    enc_fails([*run, "--labels", "cat,nan", picture], capsys, "missing value")  # not listed
    noise = tmp_path / "labels.bin"
    noise.write_bytes(np.random.default_rng(0).integers(0, 256, 400, dtype=np.uint8).tobytes())
    enc_fails([*run, "--labels-file", noise, picture], capsys, "not UTF-8 text")
    enc_fails([*run, "--labels-file", tmp_path, picture], capsys, "is a directory")
    # not listed: a device that never ends is refused, not read forever
    enc_fails([*run, "--labels-file", "/dev/zero", picture], capsys, "not a regular file")
    enc_fails([*run, "--labels", "a,b", tmp_path], capsys, "is a directory, not an image")
    # the output is checked before any work (the run does not even exist)
    blocker = tmp_path / "file"
    blocker.write_text("mine")
    gone = ["classify", "--run", tmp_path / "no-run", "--labels", "a,b"]
    enc_fails([*gone, "--csv", blocker / "out.csv", picture], capsys, "is a file, not a folder")
    enc_fails([*gone, "--csv", tmp_path, picture], capsys, "is a directory")  # not listed
    assert blocker.read_text() == "mine" and not list(tmp_path.glob(".*tmp"))


def test_embed_ids_are_paths_relative_to_the_source(enc_run, tmp_path, capsys):
    import pandas as pd

    for folder in ("img", "sub"):
        (tmp_path / folder).mkdir()
        enc_picture().save(tmp_path / folder / "d0.png")
    rows = [("img/d0.png", "one", "train"), ("sub/d0.png", "two", "train"),
            ("sub/d0.png", "again two", "train")]  # fmt: skip
    pd.DataFrame(rows, columns=["image", "caption", "split"]).to_csv(tmp_path / "p.csv")
    out = tmp_path / "e.parquet"
    args = ["embed", "--run", enc_run, "--source", f"pairs:{tmp_path / 'p.csv'}", "--split"]
    code, _, err = run_cli([*args, "train", "--num-workers", 0, "--no-progress", "--out", out],
                           capsys)  # fmt: skip
    assert code == 0, err
    table = pd.read_parquet(out)
    assert table["id"].tolist() == ["img/d0.png", "sub/d0.png",  # images, then captions
                                    "img/d0.png", "sub/d0.png", "sub/d0.png#1"]  # fmt: skip


def test_embed_out_must_be_a_file_place(enc_run, tmp_path, capsys):
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "keep.txt").write_text("mine")
    args = ["embed", "--run", enc_run, "--source", "digits", "--limit", 2, "--no-progress"]
    enc_fails([*args, "--out", taken], capsys, "is a directory")
    enc_fails([*args, "--out", taken / "keep.txt" / "e.parquet"], capsys, "is a file, not a")
    assert files(tmp_path) == {"taken/keep.txt": b"mine"}


@pytest.fixture(scope="module")
def enc_export(enc_run, tmp_path_factory) -> Path:
    from stages.model import export_model

    out = tmp_path_factory.mktemp("enc-export") / "export"
    export_model(enc_run, out, with_encoders=True)
    return out


def enc_copy(export: Path, tmp_path: Path) -> Path:
    shutil.copytree(export, tmp_path / "copy")
    return tmp_path / "copy"


def test_export_files_are_0644_and_all_checksummed(enc_export):
    config = json.loads((enc_export / "config.json").read_text())
    written = {str(p.relative_to(enc_export)) for p in enc_export.rglob("*") if p.is_file()}
    assert set(config["files"]) == written - {"config.json"}
    assert "text_encoder/tokenizer_config.json" in config["files"]
    assert {oct(p.stat().st_mode & 0o777) for p in enc_export.rglob("*") if p.is_file()} == {
        "0o644"
    }


@pytest.mark.parametrize("listed", [True, False])
def test_export_without_its_tokenizer_files_does_not_load(enc_export, tmp_path, listed):
    """Deleted, they are missing files; deleted and struck from the checksums too, the
    tokenizer that loads in their place (all [UNK]) differs from the one recorded."""
    from stages.model import AlignedModel
    from store import UserError

    copy = enc_copy(enc_export, tmp_path)
    config = json.loads((copy / "config.json").read_text())
    for name in ("tokenizer_config.json", "added_tokens.json"):
        (copy / "text_encoder" / name).unlink(missing_ok=True)
        if not listed:
            config["files"].pop(f"text_encoder/{name}", None)
    (copy / "config.json").write_text(json.dumps(config))
    expected = "missing" if listed else "other preprocessing than the export recorded"
    with pytest.raises(UserError, match=expected):
        AlignedModel.from_pretrained(copy, device="cpu")


@pytest.mark.parametrize("struck", [False, True])
def test_export_with_an_edited_preprocessor_config_does_not_load(enc_export, tmp_path, struck):
    from stages.model import AlignedModel
    from store import UserError

    copy = enc_copy(enc_export, tmp_path)
    path = copy / "image_encoder" / "preprocessor_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "image_mean": [0.5] * 3}))
    expected = "preprocessor_config.json: changed since it was written"
    if struck:  # its checksum struck out too: the preprocessing is compared with the record
        config = json.loads((copy / "config.json").read_text())
        del config["files"]["image_encoder/preprocessor_config.json"]
        (copy / "config.json").write_text(json.dumps(config))
        expected = r"image_encoder: .*other preprocessing .*\(image_mean\)"
    with pytest.raises(UserError, match=expected):
        AlignedModel.from_pretrained(copy, device="cpu")


def test_export_of_an_older_format_or_changed_head_does_not_load(enc_export, tmp_path):
    """Not listed: the head file is checksummed too; an export without checksums (the format
    before them) is refused with the command that makes it again."""
    from stages.model import AlignedModel
    from store import UserError

    copy = enc_copy(enc_export, tmp_path)
    head = copy / "head.safetensors"
    head.write_bytes(head.read_bytes()[:-1] + b"\1")
    with pytest.raises(UserError, match="head.safetensors: changed since it was written"):
        AlignedModel.load(copy, device="cpu")
    config = json.loads((enc_export / "config.json").read_text())
    (copy / "head.safetensors").write_bytes((enc_export / "head.safetensors").read_bytes())
    del config["export"]["text"]["spec"]  # config.json edited: one line, not a KeyError
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"`export.text` must name the encoder's layer, spec"):
        AlignedModel.from_pretrained(copy, device="cpu")
    config = json.loads((enc_export / "config.json").read_text())
    del config["files"]
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match=r"has no `files`; make it again with `python -m pipe"):
        AlignedModel.from_pretrained(copy, device="cpu")


def test_export_refuses_a_folder_that_is_not_an_export(enc_run, tmp_path, capsys):
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    enc_fails(["export", "--run", enc_run, "--out", tmp_path / "mine"], capsys, "not an export")
    assert files(tmp_path) == {"mine/notes.txt": b"keep"}


@pytest.mark.parametrize("command", ["classify", "export"])
def test_run_config_null_is_one_line(enc_run, tmp_path, capsys, command):
    run = tmp_path / "run"
    shutil.copytree(enc_run, run)
    (run / "config.json").write_text("null")
    picture = tmp_path / "a.png"
    enc_picture().save(picture)
    args = {"classify": ["--labels", "a,b", picture], "export": ["--out", tmp_path / "e"]}
    enc_fails([command, "--run", run, *args[command]], capsys, "config.json")


# ==== EVALUATE, INDEX, SEARCH, SETTINGS (params.yaml) ====
# (cases of this area go below this line, above the next marker)
ROOT = Path(__file__).resolve().parents[1]


def one_error(code: int, stderr: str) -> str:
    """The one `error: ` line of a refused command (exit 2, nothing else on stderr)."""
    assert code == 2, stderr
    assert "Traceback" not in stderr
    assert len(stderr.strip().splitlines()) == 1 and stderr.startswith("error: "), stderr
    return stderr.strip()


# -- settings: params.yaml / --params, wherever they come from -----------------------------------
PARAMS_CASES = {
    # listed: a typo is refused with the key's path, not ignored
    "align.lamda typo": ("align:\n  lamda: 0\n", "align.lamda", "lambda"),
    # not listed: a typo in common, a misspelt section, wrong types in sections nobody listed
    "common.stor typo": ("common:\n  stor: x.zarr\n", "common.stor", "store"),
    "section typo": ("algin:\n  lambda: 0\n", "algin", "align"),
    "index.exact_max text": ("index:\n  exact_max: many\n", "index.exact_max", "many"),
    "select.calibrate fraction": ("select:\n  calibrate: 2.5\n", "select.calibrate", "2.5"),
    "common.seed text": ("common:\n  seed: abc\n", "common.seed", "abc"),
    "sweep.workers a mapping": ("sweep:\n  workers: {a: 1}\n", "sweep.workers", "mapping"),
    "extract.overwrite not a bool": ("extract:\n  overwrite: maybe\n", "extract.overwrite", ""),
    "evaluate.split a bool": ("evaluate:\n  split: no\n", "evaluate.split", "quote"),
    "store section typo": ("store:\n  repare: true\n", "store.repare", "repair"),
}


@pytest.mark.parametrize("text, path, hint", PARAMS_CASES.values(), ids=PARAMS_CASES.keys())
def test_params_keys_and_types_are_checked(toy, tmp_path, capsys, text, path, hint):
    params = tmp_path / "p.yaml"
    params.write_text(text)
    before = files(toy)
    args = ["--params", params, "store", "ls", "--store", toy / "features.zarr"]
    line = one_error(*run_cli(args, capsys)[::2])
    assert f"{params} {path}" in line or f"`{path}`" in line, line
    assert hint in line
    assert files(toy) == before


def test_the_repos_params_yaml_passes_the_check_dvc_keys_included(toy, capsys):
    params = yaml_load(ROOT / "params.yaml")
    assert {"image_splits", "text_splits", "variants"} <= set(params)
    args = ["--params", ROOT / "params.yaml", "store", "ls", "--store", toy / "features.zarr"]
    code, out, err = run_cli(args, capsys)
    assert code == 0 and err == "", err
    assert "toy" in out


def yaml_load(path: Path) -> dict:
    import yaml

    return yaml.safe_load(path.read_text())


def test_common_store_is_honoured_by_the_store_commands(toy, tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text(f"common:\n  store: {toy / 'features.zarr'}\n")
    code, out, err = run_cli(["--params", params, "store", "ls"], capsys)
    assert code == 0, err
    assert "toy" in out and "img" in out  # the toy store, not ./features.zarr
    code, out, err = run_cli(["--params", params, "store", "verify"], capsys)
    assert code == 0 and "toy/train/image/img: ok" in out, err
    # a `store` section applies to every store sub-command, a flag still wins
    params.write_text(f"store:\n  store: {tmp_path / 'none.zarr'}\n")
    args = ["--params", params, "store", "ls", "--store", toy / "features.zarr"]
    assert run_cli(args, capsys)[0] == 0
    line = one_error(*run_cli(["--params", params, "store", "ls"], capsys)[::2])
    assert "none.zarr" in line


def test_without_params_yaml_one_line_says_the_built_in_defaults_apply(
    toy, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    code, out, err = run_cli(["store", "ls", "--store", toy / "features.zarr"], capsys)
    assert code == 0 and "toy" in out
    assert len(err.strip().splitlines()) == 1
    assert "no params.yaml" in err and "built-in defaults" in err
    # with --params, or with a params.yaml there, nothing is said
    (tmp_path / "params.yaml").write_text("common:\n  seed: 0\n")
    assert run_cli(["store", "ls", "--store", toy / "features.zarr"], capsys)[2] == ""


def test_version_and_help_that_reads_whole(capsys):
    import typer

    from pipeline.app import package_version

    code, out, _ = run_cli(["--version"], capsys)
    assert code == 0 and out.strip() == f"structure-align {package_version()}"
    assert package_version()[0].isdigit()
    group = typer.main.get_command(app)

    def helps(command, name=""):
        yield name, command.help or ""
        for sub, child in getattr(command, "commands", {}).items():
            yield from helps(child, f"{name} {sub}".strip())

    for name, text in helps(group):
        assert "\n" not in text.replace("\n\n", ""), f"{name}: a paragraph broken over lines"
    # no option states its default in its help and shows another one (params.yaml's) beside it
    for command in ("extract", "select", "align", "table", "sweep", "index", "evaluate"):
        result = CliRunner().invoke(
            app, ["--params", ROOT / "params.yaml", command, "--help"], env={"COLUMNS": "300"}
        )
        for line in result.output.splitlines():
            said = "(default" in line or "by default" in line
            assert not (said and "[default:" in line), line
    # evaluate's and index's --dataset state one default (the run's), not params.yaml's too
    for command in ("index", "evaluate"):
        result = CliRunner().invoke(
            app, ["--params", ROOT / "params.yaml", command, "--help"], env={"COLUMNS": "200"}
        )
        line = next(x for x in result.output.splitlines() if "--dataset" in x)
        assert "the run was trained on" in line and "[default:" not in line, line


def test_evaluate_and_index_take_their_own_sections_dataset(toy, tmp_path, capsys):
    params = tmp_path / "p.yaml"
    params.write_text("common:\n  dataset: digits\nindex:\n  dataset: elsewhere\n")
    args = ["--params", params, "index", "--run", toy / "run", "--store", toy / "features.zarr"]
    line = one_error(*run_cli([*args, "--out", tmp_path / "ix"], capsys)[::2])
    assert "elsewhere" in line  # the index section's own dataset is used, common's is not


# -- evaluate --------------------------------------------------------------------------------
def test_metrics_record_allow_overlap_false_when_the_run_does_not_say(toy, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(toy / "run", run)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["allow_overlap"] is False
    config = json.loads((run / "config.json").read_text())
    (run / "config.json").write_text(json.dumps({**config, "allow_overlap": True}))
    args = ["--params", "/dev/null", "evaluate", "--run", run, "--store", toy / "features.zarr"]
    assert run_cli(args, capsys)[0] == 0
    assert json.loads((run / "metrics.json").read_text())["run"]["allow_overlap"] is True


# -- index and search ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def toy_index(toy, tmp_path_factory) -> Path:
    """An index of toy/test under the toy run."""
    out = tmp_path_factory.mktemp("ix") / "index"
    invoke("index", "--store", toy / "features.zarr", "--run", toy / "run", "--out", out)
    return out


def _drop(name: str):
    return lambda ix: (ix / name).unlink()


def _truncate(ix: Path) -> None:
    data = (ix / "index.faiss").read_bytes()
    (ix / "index.faiss").write_bytes(data[: len(data) // 2])


def _edit_meta(**changes):
    def edit(ix: Path) -> None:
        meta = json.loads((ix / "index.json").read_text())
        meta.update(changes)
        (ix / "index.json").write_text(json.dumps({k: v for k, v in meta.items() if v != "DEL"}))

    return edit


def _edit_rows(ix: Path) -> None:
    import pandas as pd

    rows = pd.read_parquet(ix / "rows.parquet")
    rows.loc[0, "label_name"] = "two" if rows.loc[0, "label_name"] != "two" else "one"
    rows.to_parquet(ix / "rows.parquet", index=False)


def _old_and_truncated(ix: Path) -> None:
    """An index written before checksums were recorded, whose FAISS file is truncated."""
    _edit_meta(files="DEL")(ix)
    _truncate(ix)


SEARCH_CASES = {
    # listed
    "no index.faiss": (_drop("index.faiss"), "index.faiss: missing"),
    "index.faiss truncated": (_truncate, "index.faiss: changed since it was written"),
    "no rows.parquet": (_drop("rows.parquet"), "rows.parquet: missing"),
    "index.json without run": (_edit_meta(run="DEL"), "index.json: has no `run`"),
    # not listed: edited rows, an edited row count, a damaged index without checksums
    "rows.parquet edited": (_edit_rows, "rows.parquet: changed since it was written"),
    "index.json rows edited": (_edit_meta(rows=3), "does not match its files"),
    "old index truncated": (_old_and_truncated, "truncated, or not a FAISS index"),
}


@pytest.mark.parametrize("damage, message", SEARCH_CASES.values(), ids=SEARCH_CASES.keys())
def test_a_damaged_index_is_one_line_naming_the_file_and_the_index_command(
    toy_index, tmp_path, capsys, damage, message
):
    ix = tmp_path / "index"
    shutil.copytree(toy_index, ix)
    damage(ix)
    before = files(ix)
    line = one_error(*run_cli(["--params", "/dev/null", "search", "--index", ix, "a"], capsys)[::2])
    assert message in line
    assert "python -m pipeline index --run" in line and f"--out {ix}" in line
    assert files(ix) == before


def test_an_empty_query_is_refused(toy_index, capsys):
    for query in ("", "   "):
        args = ["--params", "/dev/null", "search", "--index", toy_index, query]
        assert "query is empty" in one_error(*run_cli(args, capsys)[::2])


def test_a_retrained_run_is_not_called_another_run(toy, tmp_path, capsys):
    run, ix = tmp_path / "run", tmp_path / "ix"
    shutil.copytree(toy / "run", run)
    store = toy / "features.zarr"
    invoke("index", "--store", store, "--run", run, "--out", ix)
    invoke("align", "--store", store, "--out", run, *TRAIN, "--seed", "1")
    before = files(ix)
    for given in ([], ["--run", run]):
        args = ["--params", "/dev/null", "search", "--index", ix, *given, "a"]
        line = one_error(*run_cli(args, capsys)[::2])
        assert "trained again" in line and "another run" not in line
        assert f"python -m pipeline index --run {run.resolve()}" in line
    assert files(ix) == before


def test_a_moved_run_gets_a_run_hint(toy, tmp_path, capsys):
    run, ix = tmp_path / "run", tmp_path / "ix"
    shutil.copytree(toy / "run", run)
    invoke("index", "--store", toy / "features.zarr", "--run", run, "--out", ix)
    run.rename(tmp_path / "moved")
    line = one_error(*run_cli(["--params", "/dev/null", "search", "--index", ix, "a"], capsys)[::2])
    assert "--run" in line and str(run.resolve()) in line


INDEX_CASES = {
    # listed: a text-only split is not a missing image model
    "split prompts": (["--split", "prompts"], "text-only split"),
    # not listed: --out a file, --out a folder that is no index
    "out a file": (["--out", "{run}/config.json"], "is a file"),
    "out not an index": (["--out", "{run}"], "is not an index"),
}


@pytest.mark.parametrize("extra, message", INDEX_CASES.values(), ids=INDEX_CASES.keys())
def test_index_bad_input(toy, tmp_path, capsys, extra, message):
    extra = [a.format(run=toy / "run") for a in extra]
    out = [] if "--out" in extra else ["--out", tmp_path / "ix"]
    before = files(toy)
    args = ["--params", "/dev/null", "index", "--run", toy / "run"]
    line = one_error(*run_cli([*args, "--store", toy / "features.zarr", *out, *extra], capsys)[::2])
    assert message in line
    assert "extract" not in line
    assert files(toy) == before and not (tmp_path / "ix").exists()


@pytest.mark.parametrize("drop", ["image_model", "image_layer"])
def test_index_of_a_run_config_without_its_image_model_or_layer(toy, tmp_path, capsys, drop):
    run = tmp_path / "run"
    shutil.copytree(toy / "run", run)
    config = json.loads((run / "config.json").read_text())
    del config[drop]
    (run / "config.json").write_text(json.dumps(config))
    args = ["--params", "/dev/null", "index", "--run", run, "--store", toy / "features.zarr"]
    line = one_error(*run_cli([*args, "--out", tmp_path / "ix"], capsys)[::2])
    assert f"config.json lacks {drop}" in line and "python -m pipeline align" in line
    assert not (tmp_path / "ix").exists()


def test_compare_refuses_a_metric_that_is_not_a_number(toy, tmp_path, capsys):
    """Not listed: metrics.json edited by hand (a percentage written as text)."""
    run = tmp_path / "run"
    shutil.copytree(toy / "run", run)
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["retrieval"]["i2t_r5"] = "95 %"
    (run / "metrics.json").write_text(json.dumps(metrics))
    before = files(tmp_path)
    out = tmp_path / "t.md"
    line = one_error(*run_cli(["compare", run, "--out-md", out], capsys)[::2])
    assert "retrieval.i2t_r5" in line and "python -m pipeline evaluate --run" in line
    assert files(tmp_path) == before


def test_eval_columns_are_the_one_list_compare_reads(toy):
    from stages.evaluate import COMPARE_COLUMNS, EVAL_COLUMNS, comparison_table, eval_column

    metrics = json.loads((toy / "run/metrics.json").read_text())
    table = comparison_table([toy / "run"])
    assert list(table.columns)[-len(EVAL_COLUMNS) :] == [c.header for c in EVAL_COLUMNS]
    assert list(table.columns) == list(COMPARE_COLUMNS)
    for column in EVAL_COLUMNS:
        assert table[column.header].iloc[0] == metrics[column.section][column.key]
    assert eval_column("zs_top1") is eval_column("zs top1")
    assert np.isnan(eval_column("t2i_r10").read({"retrieval": {"skipped": "no captions"}}))
