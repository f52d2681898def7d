"""Faults that used to give silently wrong features: 16-bit images, changed image files,
interrupted --skip-bad runs, colliding local model names, damaged store chunks."""

from __future__ import annotations

import os
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from stages.datasets import to_rgb
from stages.extract import ExtractOptions, extract
from store import FeatureStore, UserError, pair_rows, write_manifest
from tests.helpers import files, run_cli, save_tiny_resnet

FAST = ExtractOptions(batch_size=4, block_rows=4, num_workers=0, progress=False)


def pairs_file(folder, images: list[Image.Image]):
    """A pairs CSV of the given images (saved as PNG), one caption each."""
    (folder / "img").mkdir(exist_ok=True)
    rows = []
    for i, image in enumerate(images):
        image.save(folder / f"img/{i}.png")
        rows.append((f"img/{i}.png", f"picture {i}"))
    pd.DataFrame(rows, columns=["image", "caption"]).to_csv(folder / "pairs.csv", index=False)
    return folder / "pairs.csv"


# -- item 3: 16-bit images keep their contrast ---------------------------------------------
def test_16_bit_images_are_scaled_by_their_range_not_clipped(tmp_path):
    ramp = np.linspace(300, 65000, 4096).reshape(64, 64).astype(np.uint16)
    noise = np.random.default_rng(0).integers(0, 65535, (64, 64)).astype(np.uint16)
    images = [Image.fromarray(ramp), Image.fromarray(noise)]
    assert images[0].mode.startswith("I;16")
    expected = np.round((ramp - 300.0) * 255 / (ramp.max() - 300.0))  # float64, by hand
    assert np.array_equal(np.asarray(to_rgb(images[0]))[..., 0], expected)
    source = pairs_file(tmp_path, images)
    extract(str(tmp_path / "s.zarr"), "mine", "train", f"pairs:{source}", "tiny-random-vit", FAST)
    features = FeatureStore(tmp_path / "s.zarr").open("mine", "train", "image", "tiny-random-vit")
    last = features.read_layer(-1)
    assert not np.allclose(last[0], last[1])  # saturated, both were the same white image


# -- item 7: a changed file at the same path is noticed --------------------------------------
def test_changed_image_file_is_named_and_overwrite_re_extracts(tmp_path):
    rng = np.random.default_rng(1)
    images = [Image.fromarray(np.uint8(rng.integers(0, 255, (16, 16, 3)))) for _ in range(3)]
    source = f"pairs:{pairs_file(tmp_path, images)}"
    store = str(tmp_path / "s.zarr")
    extract(store, "mine", "train", source, "tiny-random-vit", FAST)
    before = FeatureStore(store).open("mine", "train", "image", "tiny-random-vit").read_layer(-1)
    changed = tmp_path / "img/1.png"
    Image.fromarray(np.uint8(rng.integers(0, 255, (16, 16, 3)))).save(changed)
    os.utime(changed, ns=(1, 1))  # another modification time, whatever the clock's resolution
    with pytest.raises(UserError, match=r"1 image file\(s\) .* changed .*1\.png.*--overwrite"):
        extract(store, "mine", "train", source, "tiny-random-vit", FAST)
    extract(store, "mine", "train", source, "tiny-random-vit", replace(FAST, overwrite=True))
    after = FeatureStore(store).open("mine", "train", "image", "tiny-random-vit").read_layer(-1)
    assert np.array_equal(before[[0, 2]], after[[0, 2]]) and not np.allclose(before[1], after[1])


# -- item 8: an interrupted --skip-bad run resumed without the flag -------------------------
def test_skip_bad_run_resumed_without_the_flag_records_the_skipped_image(tmp_path):
    rng = np.random.default_rng(2)
    images = [Image.fromarray(np.uint8(rng.integers(0, 255, (16, 16, 3)))) for _ in range(6)]
    source = f"pairs:{pairs_file(tmp_path, images)}"
    (tmp_path / "img/1.png").write_bytes(b"not a png")  # in block 0 (rows 0-3)
    store = str(tmp_path / "s.zarr")
    extract(store, "mine", "train", source, "tiny-random-vit", replace(FAST, skip_bad=True))
    # as if killed after block 0: block 1 not written, the skip not yet in the manifest
    fs = FeatureStore(store, create=True)
    fs.open("mine", "train", "image", "tiny-random-vit").done[1] = 0
    write_manifest(
        fs.manifest_path("mine", "train"), fs.manifest("mine", "train").assign(skipped=False)
    )
    extract(store, "mine", "train", source, "tiny-random-vit", FAST)  # resumed, no --skip-bad
    manifest = FeatureStore(store).manifest("mine", "train")
    assert manifest.loc[manifest["skipped"], "image_row"].tolist() == [1]
    assert 1 not in pair_rows(manifest)[0]


# -- item 6: two local model folders of the same name ----------------------------------------
def test_local_model_folders_of_one_name_get_their_own_features(tmp_path, capsys):
    rng = np.random.default_rng(3)
    images = [Image.fromarray(np.uint8(rng.integers(0, 255, (16, 16, 3)))) for _ in range(3)]
    source = f"pairs:{pairs_file(tmp_path, images)}"
    v1, v2 = tmp_path / "m/v1/enc", tmp_path / "m/v2/enc"
    for folder in (v1, v2):
        save_tiny_resnet(folder)
    store = str(tmp_path / "s.zarr")
    extract(store, "mine", "train", source, str(v1), FAST)
    with pytest.raises(UserError, match=r"named enc .* extracted from .*v1/enc, not from .*v2/enc"):
        FeatureStore(store).open("mine", "train", "image", str(v2))  # align would get v1's
    extract(store, "mine", "train", source, str(v2), FAST)
    assert "stored as v2-enc" in capsys.readouterr().out
    fs = FeatureStore(store)
    for folder, name in ((v1, "enc"), (v2, "v2-enc")):
        array = fs.open("mine", "train", "image", str(folder))
        assert array.attrs["model_path"] == str(folder.resolve()) and array.attrs["name"] == name
        assert fs.open("mine", "train", "image", name).path == array.path  # the name works too
    assert sorted(e.model for e in fs.entries()) == ["enc", "v2-enc"]
    extract(store, "mine", "train", source, str(v1), replace(FAST, name="first"))
    assert fs.open("mine", "train", "image", "first").attrs["model_spec"] == str(v1)


# -- item 5: damaged store files are found, named and repaired block by block ----------------
def extracted_images(tmp_path, seed: int, n: int):
    """(source, store, its files' bytes, image array) of n random images through the tiny ViT."""
    rng = np.random.default_rng(seed)
    images = [Image.fromarray(np.uint8(rng.integers(0, 255, (16, 16, 3)))) for _ in range(n)]
    source = f"pairs:{pairs_file(tmp_path, images)}"
    store = tmp_path / "s.zarr"
    extract(str(store), "mine", "train", source, "tiny-random-vit", FAST)
    array = FeatureStore(store).open("mine", "train", "image", "tiny-random-vit")
    return source, store, files(store), array


def test_verify_names_damaged_blocks_and_extract_repairs_exactly_them(tmp_path, capsys):
    source, store, pristine, array = extracted_images(tmp_path, seed=4, n=10)
    flipped, deleted = array.chunk_file(1, 0), array.chunk_file(2, 2)
    data = bytearray(flipped.read_bytes())
    data[8:12] = np.float16([0.5, 0.25]).tobytes()  # finite values, the checksum unchanged
    flipped.write_bytes(bytes(data))
    deleted.unlink()
    code, out, err = run_cli(["store", "ls", "--store", store], capsys)
    assert code == 0 and "damaged: 1 blocks" in out
    with pytest.raises(UserError, match="block 2 of layer .* is missing.*store verify"):
        array.read_layer(2)  # never NaN, silently
    code, out, _ = run_cli(["store", "verify", "--store", store], capsys)
    assert code == 1
    assert "block 0: layer " in out and "unreadable" in out and "block 2: layer " in out
    assert "python -m pipeline extract --model tiny-random-vit --dataset mine" in out
    code, out, _ = run_cli(["store", "verify", "--store", store, "--repair"], capsys)
    assert code == 0 and "marked 2 blocks incomplete" in out
    assert array.completed_blocks().tolist() == [False, True, False]
    extract(str(store), "mine", "train", source, "tiny-random-vit", FAST)
    assert files(store) == pristine  # exactly those blocks, byte for byte
    assert run_cli(["store", "verify", "--store", store], capsys)[0] == 0


def test_extract_redoes_a_deleted_or_truncated_block(tmp_path):
    source, store, pristine, array = extracted_images(tmp_path, seed=5, n=6)
    array.chunk_file(0, 1).unlink()
    array.chunk_file(1, 0).write_bytes(array.chunk_file(1, 0).read_bytes()[:10])
    assert sorted(array.damaged_blocks()) == [0, 1]
    assert extract(str(store), "mine", "train", source, "tiny-random-vit", FAST).rows == 6
    assert files(store) == pristine


# -- item 10: labels over the whole pairs file; "NA" is a caption ----------------------------
def test_pairs_labels_are_numbered_over_the_file_and_na_captions_are_text(tmp_path):
    from stages.datasets import load_source

    rows = [("a.png", "NA", "ant", "train"), ("b.png", "None", "bee", "train"),
            ("c.png", "a cat", "cat", "train"), ("d.png", "a bee", "bee", "test"),
            ("e.png", "a cat", "cat", "test")]  # fmt: skip
    for name in "abcde":
        Image.new("RGB", (4, 4)).save(tmp_path / f"{name}.png")
    table = pd.DataFrame(rows, columns=["image", "caption", "label", "split"])
    table.to_csv(tmp_path / "pairs.csv", index=False)
    train = load_source(f"pairs:{tmp_path / 'pairs.csv'}", "train").manifest
    test = load_source(f"pairs:{tmp_path / 'pairs.csv'}", "test").manifest
    assert train["caption"].tolist()[:2] == ["NA", "None"]
    assert dict(zip(test["label_name"], test["label"])) == {"bee": 1, "cat": 2}  # as in train
    assert dict(zip(train["label_name"], train["label"])) == {"ant": 0, "bee": 1, "cat": 2}


# -- item 9: a local model whose pytorch_model.bin is a pickle of more than tensors -----------
def test_pickled_weights_file_is_one_line_not_loaded(tmp_path):
    import datetime

    import torch

    from stages.encoders import load_encoder

    folder = tmp_path / "enc"
    save_tiny_resnet(folder)
    (folder / "model.safetensors").unlink()
    # an object weights-only loading refuses (a malicious pickle would run code here)
    torch.save({"when": datetime.datetime(2025, 1, 1)}, folder / "pytorch_model.bin")
    with pytest.raises(UserError, match="Python objects besides tensors"):
        load_encoder(str(folder))


# ==== DATA LOSS AND RUNS (align, table, sweep, selection) ====
# (cases of this area go below this line, above the next marker)
def test_ctrl_c_during_align_keeps_the_previous_run(tmp_path):
    """`cp -r $R /tmp/keep; align --out /tmp/keep ... & kill -INT`: the old run stays whole (it
    was emptied before training), and no temporary is left beside it."""
    import signal
    import subprocess
    import sys

    from tests.test_bad_input import TRAIN, build_store

    build_store(tmp_path / "features.zarr", np.random.default_rng(0))
    keep = tmp_path / "keep"
    args = [sys.executable, "-m", "pipeline", "--params", "/dev/null", "align", "--store",
            str(tmp_path / "features.zarr"), "--out", str(keep), *TRAIN]  # fmt: skip
    subprocess.run(args, check=True, capture_output=True, timeout=300)
    before, around = files(keep), sorted(p.name for p in tmp_path.iterdir())
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    long = ["--epochs", "1000000", "--max-steps", "0", "--patience", "0"]
    proc = subprocess.Popen(
        [*args, *long], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert proc.stdout.readline().startswith("layers:")  # training starts now
        import time

        time.sleep(1.5)
        proc.send_signal(signal.SIGINT)
        _, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    assert "Traceback" not in stderr and stderr.strip().startswith("interrupted"), stderr
    assert files(keep) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == around  # no temporary left


def test_a_second_writer_of_one_run_stops_with_one_line(tmp_path, capsys):  # not listed
    """While one process writes a run directory (its lock held), another stops at once."""
    from filelock import FileLock

    from tests.test_bad_input import TRAIN, build_store

    build_store(tmp_path / "features.zarr", np.random.default_rng(0))
    run = tmp_path / "run"
    args = ["--params", "/dev/null", "align", "--store", tmp_path / "features.zarr", "--out", run]
    with FileLock(tmp_path / ".run.lock"):
        code, _, stderr = run_cli([*args, *TRAIN], capsys)
    assert code == 2 and "another process is writing" in stderr and not run.exists(), stderr
    assert len(stderr.strip().splitlines()) == 1 and "Traceback" not in stderr


# ==== SELECT AND LAYER METRICS ====
# (cases of this area go below this line, above the next marker)


@pytest.fixture(scope="module")
def selection_root(tmp_path_factory):
    """A planted store (f.zarr) and a good selection of it (sel/)."""
    from tests.test_select import planted_store, select_args
    from tests.test_select import run_cli as invoke

    root = tmp_path_factory.mktemp("select-faults")
    planted_store(root / "f.zarr", n_images=60, captions=1)
    result = invoke(*select_args(root / "f.zarr", root / "sel", "--no-progress"))
    assert result.exit_code == 0, result.output
    return root


def select_into(root, out, capsys, *extra):
    from tests.test_select import select_args

    return run_cli(["--params", "/dev/null", *select_args(root / "f.zarr", out, *extra)], capsys)


def test_select_interrupted_while_writing_keeps_the_previous_selection(
    selection_root, tmp_path, capsys, monkeypatch
):
    """Ctrl-C (the handler's SystemExit 130) between two heatmaps of the new selection: the
    previous selection is byte-identical and no temporary is left beside it."""
    import shutil

    import stages.select

    sel = tmp_path / "sel"
    shutil.copytree(selection_root / "sel", sel)
    before = files(sel)
    real, calls = stages.select.plot_heatmap, []

    def interrupted(*args):
        calls.append(args)
        if len(calls) == 2:
            raise SystemExit(130)
        real(*args)

    monkeypatch.setattr(stages.select, "plot_heatmap", interrupted)
    code, _, _ = select_into(selection_root, sel, capsys, "--metric", "cka,mutual_knn")
    assert code == 130 and len(calls) == 2
    assert files(sel) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sel.lock", "sel"]  # no temporary


def test_select_second_writer_stops_with_one_line(selection_root, tmp_path, capsys):
    """Not listed: another process holds the selection directory's lock while writing."""
    import shutil

    from store.io import writer_lock
    from tests.helpers import one_line_error

    sel = tmp_path / "sel"
    shutil.copytree(selection_root / "sel", sel)
    before = files(sel)
    with writer_lock(sel):
        code, _, stderr = select_into(selection_root, sel, capsys, "--no-progress", "--seed", "4")
    assert code == 2 and "another process is writing" in one_line_error(stderr)
    assert files(sel) == before


def test_select_under_a_file_size_limit_is_one_line_and_keeps_the_selection(
    selection_root, tmp_path
):
    """A heatmap too large for `ulimit -f`: one line, exit 2, the previous selection intact."""
    import shutil
    import subprocess
    import sys
    from pathlib import Path

    from tests.helpers import one_line_error
    from tests.test_select import select_args

    sel = tmp_path / "sel"
    shutil.copytree(selection_root / "sel", sel)
    before = files(sel)
    args = select_args(selection_root / "f.zarr", sel, "--no-progress", "--seed", "5")
    command = " ".join([sys.executable, "-m", "pipeline", "--params", "/dev/null", *map(str, args)])
    proc = subprocess.run(
        ["bash", "-c", f"trap '' XFSZ; ulimit -f 8; {command}"], capture_output=True, text=True,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}, timeout=300,
    )  # fmt: skip
    assert proc.returncode == 2, proc.stderr
    assert "file too large" in one_line_error(proc.stderr)
    assert files(sel) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [".sel.lock", "sel"]  # no temporary


# ==== ENCODERS, EXTRACT, STORE, MODEL API, CLASSIFY, EMBED, EXPORT ====
# (cases of this area go below this line, above the next marker)


# the model's outputs when the machine fails: a file-size limit, a held lock, dying workers
def enc_limited(command: str, limit_blocks: int, timeout: int = 240):
    """Run `python -m pipeline COMMAND` under `ulimit -f` (512-byte blocks; SIGXFSZ ignored,
    so a write past it fails with EFBIG as when a disk is full)."""
    import subprocess
    import sys

    script = f"trap '' XFSZ; ulimit -f {limit_blocks}; {sys.executable} -m pipeline {command}"
    env = {**os.environ, "PYTHONPATH": os.getcwd(), "TQDM_DISABLE": "1"}
    return subprocess.run(["bash", "-c", script], capture_output=True, text=True,
                          timeout=timeout, env=env)  # fmt: skip


@pytest.fixture(scope="module")
def enc_run(tmp_path_factory):
    from tests.model_helpers import tiny_run

    return tiny_run(tmp_path_factory.mktemp("enc") / "run")


def enc_error_line(stderr: str) -> str:
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, stderr
    return errors[0]


def test_export_with_encoders_past_the_file_size_limit_is_one_line(enc_run, tmp_path):
    from stages.model import export_model

    out = tmp_path / "export"
    export_model(enc_run, out)  # a previous export, without encoders: it must stay whole
    before = files(tmp_path)
    done = enc_limited(f"export --with-encoders --run {enc_run} --out {out}", 300)
    assert done.returncode == 2, done.stderr
    assert "file too large" in enc_error_line(done.stderr)
    assert files(tmp_path) == before  # no temporary left, the old export untouched


def test_embed_under_a_file_size_limit_neither_hangs_nor_half_writes(enc_run, tmp_path):
    """DataLoader workers cannot hand batches over under the limit (they hung): the rest loads
    in this process, said once; the Parquet file too large to write is one line."""
    out = tmp_path / "e.parquet"
    done = enc_limited(f"embed --run {enc_run} --source digits --limit 64 --out {out}", 4)
    assert done.returncode == 2, done.stderr
    assert "file too large" in enc_error_line(done.stderr)
    assert done.stderr.count("warning: the DataLoader workers failed") == 1
    assert not list(tmp_path.iterdir())


def test_two_exports_into_one_out_the_second_stops(enc_run, tmp_path, capsys):
    from store.io import writer_lock

    out = tmp_path / "export"
    with writer_lock(out):  # another `export` is writing it
        code, _, err = run_cli(["export", "--run", enc_run, "--out", out], capsys)
    assert code == 2 and "another process is writing" in enc_error_line(err)
    assert not out.exists()
    code, _, err = run_cli(["export", "--run", enc_run, "--out", out], capsys)
    assert code == 0, err  # the lock was released


def enc_dies_in_a_worker(row: int) -> int:
    """Rows 2.. kill the DataLoader worker that fetches them (as a bus error on a full /dev/shm
    does); in the main process they load."""
    import signal

    from torch.utils.data import get_worker_info

    if row >= 2 and get_worker_info() is not None:
        os.kill(os.getpid(), signal.SIGKILL)
    return row


def test_dying_input_workers_fall_back_to_this_process(monkeypatch):
    """Not listed: workers killed mid-run; the rest of the rows load in this process, said."""
    import torch

    from stages.encoders import Encoder, inputs
    from stages.encoders.inputs import even_batches, row_batches

    monkeypatch.setattr(inputs, "FAILED_WORKERS", [])  # this process's record of failures

    encoder = Encoder("toy", "toy", "", "text", "none", ["x"], [1], torch.nn.Identity(),
                      prepare=float, collate=lambda xs: {"x": torch.tensor(xs)},
                      embed=lambda b: [b["x"]])  # fmt: skip
    said: list[str] = []
    names = [str(i) for i in range(6)]
    batches = row_batches(encoder, enc_dies_in_a_worker, names, even_batches(6, 2), 2,
                          log=said.append)  # fmt: skip
    rows = [int(r) for batch_rows, _, _ in batches for r in batch_rows]
    assert rows == list(range(6))
    assert len(said) == 1 and "workers failed" in said[0]
    again = row_batches(encoder, float, names, even_batches(6, 2), 2, log=said.append)
    rows = [int(r) for batch_rows, _, _ in again for r in batch_rows]
    assert rows == list(range(6)) and len(said) == 1  # not tried again, not said again


# ==== EVALUATE, INDEX, SEARCH, SETTINGS (params.yaml) ====
# (cases of this area go below this line, above the next marker)
@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """The bad-input tests' toy store, a run trained on it, and an index of its test split."""
    from tests.test_bad_input import TRAIN, build_store, invoke

    root = tmp_path_factory.mktemp("faults-index")
    build_store(root / "features.zarr", np.random.default_rng(0))
    invoke("align", "--store", root / "features.zarr", "--out", root / "run", *TRAIN)
    invoke("index", "--store", root / "features.zarr", "--run", root / "run", "--out", root / "ix")
    return root


def _index_args(root, out):
    return ["--params", "/dev/null", "index", "--run", root / "run",
            "--store", root / "features.zarr", "--out", out]  # fmt: skip


def _siblings(folder):
    return sorted(p.name for p in folder.parent.iterdir() if p.name.startswith(f".{folder.name}."))


def test_a_second_index_build_into_one_out_stops_with_one_line(toy_run, tmp_path, capsys):
    """Listed: two `index` builds into one --out could leave one run's index.json beside the
    other's vectors; the second writer now stops at the lock, the first's index intact."""
    import shutil

    from store.io import writer_lock

    out = tmp_path / "ix"
    shutil.copytree(toy_run / "ix", out)
    before = files(out)
    with writer_lock(out):  # the first build, still writing
        code, _, err = run_cli(_index_args(toy_run, out), capsys)
    assert code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err
    assert "another process is writing" in err and "Traceback" not in err
    assert files(out) == before
    code, _, err = run_cli(_index_args(toy_run, out), capsys)  # once it is done: a new index
    assert code == 0, err
    assert files(out)["index.faiss"] == before["index.faiss"]  # the same run, the same vectors


def test_a_failed_index_write_leaves_the_previous_index(toy_run, tmp_path, capsys, monkeypatch):
    """Not listed: the disk fills while the FAISS file is written; the previous index stays,
    whole and readable, and no temporary is left beside it."""
    import errno
    import shutil
    from pathlib import Path

    import faiss

    from stages.index import open_index

    out = tmp_path / "ix"
    shutil.copytree(toy_run / "ix", out)
    before = files(out)

    def full(index, path):
        Path(path).write_bytes(b"\0" * 10)
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(faiss, "write_index", full)
    code, _, err = run_cli(_index_args(toy_run, out), capsys)
    assert code == 2 and "no space left" in err and len(err.strip().splitlines()) == 1, err
    assert files(out) == before
    assert [name for name in _siblings(out) if not name.endswith(".lock")] == []
    assert open_index(out)[0].ntotal == 48
