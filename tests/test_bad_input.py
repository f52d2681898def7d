"""Bad input and faults, as a hostile user would try them: every command answers one line on
stderr and exit 2, never a traceback, and changes nothing that existed before; and the
silent-wrongness fixes (stale metrics, the run's own dataset, params coercion, ...)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
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


# ==== EVALUATE, INDEX, SEARCH, SETTINGS (params.yaml) ====
# (cases of this area go below this line, above the next marker)
