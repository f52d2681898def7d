"""Scaling out: extraction and kNN graphs on a 2-worker dask LocalCluster, a killed worker."""

import os
import signal
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from distributed import Client, LocalCluster, WorkerPlugin

from stages import cluster as cluster_mod
from stages.cluster import check_scheduler
from stages.extract import ExtractOptions, extract
from stages.pairs import PairSpec
from stages.select import SelectSettings, run_selection
from store import FeatureStore, UserError
from tests.helpers import files, one_line_error, run_cli

MODELS = {"image": "tiny-random-vit", "text": "tiny-random-text"}
ARGS = ["--limit", "200", "--block-rows", "32", "--batch-size", "24", "--num-workers", "0"]


@pytest.fixture(scope="module")
def address():
    """One LocalCluster for the module, reached through its address like a remote one."""
    with LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None
    ) as cluster:
        yield cluster.scheduler_address


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Both models extracted in one process, the usual way."""
    path = tmp_path_factory.mktemp("ref") / "ref.zarr"
    opts = ExtractOptions(limit=200, block_rows=32, batch_size=24, num_workers=0, progress=False)
    for model in MODELS.values():
        extract(str(path), "digits", "train", "digits", model, opts)
    return path


def assert_same_store(a: Path, b: Path, modality: str) -> None:
    """Every file of the array (layer chunks, completion chunks, metadata) equal, byte for
    byte."""
    x = FeatureStore(a).open("digits", "train", modality, MODELS[modality])
    assert x.complete and all(np.isfinite(layer).all() for layer in x.read())
    mine, theirs = files(a / x.path), files(b / x.path)
    assert sorted(mine) == sorted(theirs) and len(mine) > 7 * 6  # 7 blocks x 5 layers, 7 marks
    assert all(mine[name] == theirs[name] for name in theirs)


def test_extract_on_cluster_is_byte_identical(tmp_path, address, reference, capsys):
    store = tmp_path / "c.zarr"
    for modality, model in MODELS.items():
        args = ["extract", "--model", model, "--store", store, "--scheduler", address, *ARGS]
        code, out, err = run_cli(args, capsys)
        assert code == 0, err
        assert "200 rows x 5 layers" in out and "/200" in err  # the progress bar counted rows
        assert_same_store(store, reference, modality)
    pd.testing.assert_frame_equal(
        FeatureStore(store).manifest("digits", "train"),
        FeatureStore(reference).manifest("digits", "train"),
    )
    # a second run finds every block complete and submits nothing
    code, out, _ = run_cli(["extract", "--store", store, "--scheduler", address, *ARGS], capsys)
    assert code == 0 and "already complete" in out


class KillOnce(WorkerPlugin):
    """Makes the first block write on the cluster die half-way: a wrong shard on disk, a
    temporary file left behind, then SIGKILL of the worker process (the nanny restarts it)."""

    def __init__(self, marker: str):
        self.marker = marker

    def setup(self, worker) -> None:
        from store.features import FeatureArray

        marker, real = Path(self.marker), FeatureArray.write_block

        def write_block(array, block, values):
            try:  # atomic: of two workers writing at once, exactly one dies
                fd = os.open(marker, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
            except FileExistsError:
                fd = None
            if fd is not None:
                os.close(fd)
                rows = array.block_slice(block)  # the first layer written wrong, then killed
                array.layers[0][rows] = np.zeros_like(values[0], array.dtype)
                (array.root / array.path / "layers" / "0" / "leftover.partial").write_bytes(b"x")
                os.kill(os.getpid(), signal.SIGKILL)
            real(array, block, values)

        FeatureArray.write_block = write_block


def test_killed_worker_is_survived(tmp_path, address, reference, capsys):
    marker = tmp_path / "killed"
    with Client(address) as client:
        pids = set(client.run(os.getpid).values())
        client.register_plugin(KillOnce(str(marker)), name="kill-once")
        try:
            args = ["extract", "--model", MODELS["image"], "--store", tmp_path / "k.zarr"]
            code, _, err = run_cli([*args, "--scheduler", address, *ARGS], capsys)
        finally:
            client.unregister_worker_plugin("kill-once")
        assert code == 0, err
        assert marker.exists()  # a worker really died mid-block ...
        client.wait_for_workers(2, timeout=60)
        assert len(pids - set(client.run(os.getpid).values())) == 1  # ... and was replaced
    assert_same_store(tmp_path / "k.zarr", reference, "image")


def test_a_bad_image_on_a_worker_is_one_line_error(tmp_path, address, capsys):
    from PIL import Image

    (tmp_path / "img").mkdir()
    for i in range(4):
        Image.new("RGB", (8, 8), (i, i, i)).save(tmp_path / f"img/{i}.png")
    (tmp_path / "img/2.png").write_bytes(b"not a png")
    table = pd.DataFrame({"image": [f"img/{i}.png" for i in range(4)], "caption": "c"})
    table.to_csv(tmp_path / "pairs.csv", index=False)
    args = ["extract", "--dataset", "mine", "--source", f"pairs:{tmp_path / 'pairs.csv'}"]
    args += ["--store", tmp_path / "s.zarr", "--block-rows", "2", "--num-workers", "0"]
    code, _, err = run_cli([*args, "--scheduler", address], capsys)
    assert code == 2 and "2.png" in one_line_error(err) and "--skip-bad" in err


def test_select_on_local_cluster_equals_one_process(tmp_path, reference, capsys):
    spec = PairSpec(reference, "digits", "train", MODELS["image"], MODELS["text"])
    local = run_selection(spec, tmp_path / "one", SelectSettings(k=5, device="cpu"), progress=False)
    args = ["select", "--store", reference, "--out", tmp_path / "dask", "--k", "5"]
    code, out, err = run_cli([*args, "--device", "cpu", "--scheduler", "local:2"], capsys)
    assert code == 0, err
    assert "kNN graphs" in err and "chosen:" in out
    scores = pd.read_parquet(tmp_path / "dask" / "scores.parquet")
    pd.testing.assert_frame_equal(scores, local.table())
    assert (tmp_path / "dask" / "selection.json").read_text() == (
        tmp_path / "one" / "selection.json"
    ).read_text()


def test_bad_scheduler_specs(tmp_path, reference, monkeypatch, capsys):
    assert check_scheduler(" local:3 ") == "local:3"
    for bad in ("local:0", "local:x", "local", "", "tcp://a b"):
        with pytest.raises(UserError, match="--scheduler must be"):
            check_scheduler(bad)
    args = ["select", "--store", reference, "--out", tmp_path / "s", "--device", "cpu"]
    code, _, err = run_cli([*args, "--scheduler", "local:0"], capsys)
    assert code == 2 and "local:N" in one_line_error(err)
    monkeypatch.setattr(cluster_mod, "CONNECT_TIMEOUT", "1s")
    code, _, err = run_cli([*args, "--scheduler", "tcp://127.0.0.1:9"], capsys)
    assert code == 2 and "cannot reach the dask scheduler" in one_line_error(err)
