"""Bad input to the store commands and to extraction's data sources, as a hostile user gives
it: one `error: ` line on stderr and exit 2 (`store verify`: exit 1 and its report), never a
traceback, and nothing on disk changed or created.

| case                                                         | mechanism                   |
|--------------------------------------------------------------|-----------------------------|
| `store migrate/verify/ls --store TYPO.zarr` (created it)     | a store must exist          |
| `store verify --store FILE` (unlisted)                       | a store must exist          |
| `common: {store: X}` ignored by `store ls/verify/migrate`    | settings from params.yaml   |
| `store verify` said "ok (23 blocks)" on a 6/23 partial array | verify tells partial        |
| labels "", NaN, nan became classes ("a photo of a .")        | data sources                |
| duplicate class names (pairs labels; folders, unlisted)      | data sources                |
| an empty image cell named the CSV's folder                   | data sources                |
| `--split prompts` of a pairs file demanded `train` rows      | data sources                |
| a directory given as an image: "does not exist"              | data sources                |
| a directory given as the pairs file (unlisted)               | data sources                |
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.datasets import load_source
from store import FeatureStore, UserError
from tests.helpers import files, one_line_error, run_cli, write_features


def tiny_store(path: Path, blocks: int = 4, done: int | None = None) -> Path:
    """A store of one array of `blocks` blocks, the first `done` of them complete."""
    values = np.random.default_rng(0).normal(size=(4 * blocks, 2, 3)).astype(np.float32)
    write_features(path, "d", "train", "image", "m", values, block_rows=4)
    if done is not None:
        array = FeatureStore(path, write=True).open("d", "train", "image", "m")
        array.mark_incomplete(list(range(done, blocks)))
    return path


# ==== a store must exist =======================================================================
@pytest.mark.parametrize(
    "command", [["ls"], ["migrate"], ["verify"], ["verify", "--repair"]], ids=" ".join
)
def test_store_commands_refuse_a_store_that_does_not_exist(tmp_path, capsys, command):
    typo = tmp_path / "TYPO.zarr"
    code, _, err = run_cli(["store", *command, "--store", typo], capsys)
    assert code == 2 and f"no feature store at {typo}" in one_line_error(err)
    assert not typo.exists()  # `store migrate` created it


@pytest.mark.parametrize("command", [["ls"], ["migrate"], ["verify"]], ids=" ".join)
def test_store_commands_refuse_a_file(tmp_path, capsys, command):
    """Unlisted: a file given as the store."""
    (tmp_path / "f.zarr").write_text("not a store")
    code, _, err = run_cli(["store", *command, "--store", tmp_path / "f.zarr"], capsys)
    assert code == 2 and "not a feature store" in one_line_error(err)
    assert (tmp_path / "f.zarr").read_text() == "not a store"


def test_store_commands_honour_common_store(tmp_path, capsys, monkeypatch):
    tiny_store(tmp_path / "mine.zarr")
    (tmp_path / "params.yaml").write_text("common:\n  store: mine.zarr\n")
    monkeypatch.chdir(tmp_path)  # params.yaml of the working directory
    for command in (["ls"], ["verify"], ["migrate"]):
        code, out, err = run_cli(["store", *command], capsys)
        assert code == 0 and "features.zarr" not in out + err, (command, out, err)
    assert "d  " in run_cli(["store", "ls"], capsys)[1]
    # --params names another file; a flag still wins over both
    (tmp_path / "other.yaml").write_text("common:\n  store: nowhere.zarr\n")
    code, _, err = run_cli(["--params", tmp_path / "other.yaml", "store", "ls"], capsys)
    assert code == 2 and "no feature store at nowhere.zarr" in one_line_error(err)
    args = ["--params", tmp_path / "other.yaml", "store", "ls", "--store", "mine.zarr"]
    assert run_cli(args, capsys)[0] == 0


# ==== verify tells partial from complete =======================================================
def test_verify_calls_a_partial_array_partial(tmp_path, capsys):
    store = tiny_store(tmp_path / "s.zarr", blocks=23, done=6)
    before = files(store)
    code, out, err = run_cli(["store", "verify", "--store", store], capsys)
    assert code == 1 and "Traceback" not in err
    assert "partial, 6 of 23 blocks complete" in out and "ok (23 blocks" not in out
    assert "python -m pipeline extract --model m --dataset d --split train" in out
    code, out, _ = run_cli(["store", "ls", "--store", store], capsys)
    assert code == 0 and "partial 6/23 blocks" in out
    assert files(store) == before


# ==== data sources =============================================================================
def pairs(folder: Path, rows: list[tuple], columns=("image", "caption", "label")) -> str:
    """A pairs CSV beside 4x4 PNGs named by the image column (empty cells and folders left
    alone)."""
    for row in rows:
        name = str(row[0])
        if name.endswith(".png"):
            Image.new("RGB", (4, 4)).save(folder / name)
    path = folder / "pairs.csv"
    pd.DataFrame(rows, columns=list(columns)).to_csv(path, index=False)
    return f"pairs:{path}"


def extract_cli(tmp_path: Path, source: str, *extra: str) -> list[str]:
    return ["--params", "/dev/null", "extract", "--store", tmp_path / "s.zarr", "--dataset",
            "mine", "--source", source, "--num-workers", "0", "--no-progress", *extra]  # fmt: skip


def test_empty_and_nan_labels_are_not_classes(tmp_path):
    rows = [("a.png", "an ant", "ant"), ("b.png", "blank", ""), ("c.png", "x", "NaN"),
            ("d.png", "y", "nan"), ("e.png", "a bee", "bee")]  # fmt: skip
    source = pairs(tmp_path, rows)
    train = load_source(source, "train")
    assert train.label_names == ["ant", "bee"]
    assert train.manifest["label"].tolist() == [0, -1, -1, -1, 1]
    assert train.manifest["label_name"].tolist() == ["ant", "", "", "", "bee"]
    prompts = load_source(source, "prompts").manifest["caption"].tolist()
    assert "a photo of a ." not in prompts and "a photo of a nan." not in prompts
    assert "a photo of a ant." in prompts and len(prompts) == 2 * 5


def test_duplicate_class_names_are_refused(tmp_path, capsys):
    rows = [("a.png", "a cat", "cat"), ("b.png", "a big cat", "Cat "), ("c.png", "a dog", "dog")]
    source = pairs(tmp_path, rows)
    for split in ("train", "prompts"):
        code, _, err = run_cli(extract_cli(tmp_path, source, "--split", split), capsys)
        line = one_line_error(err)
        assert code == 2 and "'Cat'" in line and "'cat'" in line and "one name twice" in line
    assert not (tmp_path / "s.zarr").exists()


def test_image_folder_classes_differing_in_case_are_refused(tmp_path, capsys):
    """Unlisted: class folders `Cat` and `cat` would give two prompts of one class."""
    for name in ("Cat", "cat", "dog"):
        (tmp_path / "folder" / name).mkdir(parents=True)
        Image.new("RGB", (4, 4)).save(tmp_path / "folder" / name / "1.png")
    source = f"imagefolder:{tmp_path / 'folder'}"
    code, _, err = run_cli(extract_cli(tmp_path, source, "--split", "prompts"), capsys)
    assert code == 2 and "one name twice" in one_line_error(err)


def test_an_empty_image_cell_names_its_row(tmp_path, capsys):
    source = pairs(tmp_path, [("a.png", "one", "x"), ("", "two", "y"), ("c.png", "three", "x")])
    code, _, err = run_cli(extract_cli(tmp_path, source), capsys)
    line = one_line_error(err)
    assert code == 2 and "empty image paths in rows [1]" in line
    assert f"{tmp_path}," not in line and not line.endswith(str(tmp_path))  # not the folder


def test_prompts_of_a_pairs_file_need_no_train_rows(tmp_path, capsys):
    rows = [("a.png", "an ant", "ant", "test"), ("b.png", "a bee", "bee", "val")]
    source = pairs(tmp_path, rows, columns=("image", "caption", "label", "split"))
    (tmp_path / "a.png").unlink()  # class names need no image either
    args = extract_cli(tmp_path, source, "--split", "prompts", "--model", "tiny-random-text")
    code, out, err = run_cli(args, capsys)
    assert code == 0, err
    manifest = FeatureStore(tmp_path / "s.zarr").manifest("mine", "prompts")
    assert sorted(set(manifest["label_name"])) == ["ant", "bee"]


def test_a_directory_given_as_an_image_is_said_to_be_one(tmp_path, capsys):
    (tmp_path / "photos").mkdir()
    source = pairs(tmp_path, [("a.png", "one", "x"), ("photos", "two", "y")])
    code, _, err = run_cli(extract_cli(tmp_path, source), capsys)
    line = one_line_error(err)
    assert code == 2 and "directories" in line and "photos" in line and "does not exist" not in line


def test_a_directory_given_as_the_pairs_file(tmp_path, capsys):
    """Unlisted: --source pairs:FOLDER."""
    code, _, err = run_cli(extract_cli(tmp_path, f"pairs:{tmp_path}"), capsys)
    line = one_line_error(err)
    assert code == 2 and "is a directory" in line and "does not exist" not in line
    (tmp_path / "annotations" / "captions_train2017.json").mkdir(parents=True)
    with pytest.raises(UserError, match="is a directory"):
        load_source(f"coco:{tmp_path}", "train")
