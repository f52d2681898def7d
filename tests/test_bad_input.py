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


def enc_run_reader_is_checked() -> bool:
    """Whether the run reader checks config.json (read_run, from branch `train`)."""
    from stages import heads

    return hasattr(heads, "read_run")


@pytest.mark.xfail(
    not enc_run_reader_is_checked(), reason="needs the checked run reader", strict=True
)
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
