"""Faults of the machine and of concurrency around the feature store, as a hostile user meets
them: every one is one `error: ` line and a non-zero exit (or, for DataLoader workers, one
`warning: ` line and a correct result), never a traceback or a hang, and no block is ever
marked complete that was not written.

| case                                                        | mechanism                   |
|-------------------------------------------------------------|-----------------------------|
| two identical extracts into one new store                   | one writer per array (lock) |
| a second and a third writer while one holds the array       | one writer per array (lock) |
| `store verify --repair` while an extract writes (unlisted)  | one writer per array (lock) |
| extract under `ulimit -f` with 2 DataLoader workers (hung)  | refused writes, no hang     |
| disk full / file too large / read-only / EPERM on a chunk   | refused writes              |
| a write that fails after some blocks (unlisted)             | no block marked complete... |
| a read-only store: --overwrite, a new --dataset             | refused writes              |
| a store whose parent is read-only (unlisted)                | lock files inside the store |
| DataLoader workers killed / shared memory refused           | in-process fallback         |
| DataLoader workers stuck (unlisted)                         | in-process fallback         |
"""

from __future__ import annotations

import errno
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import stages.extract as extract_module
from stages.extract import ExtractOptions, extract
from store import FeatureStore
from tests.helpers import files, fill_disk_after, one_line_error, run_cli

ROOT = Path(__file__).resolve().parents[1]
FAST = ExtractOptions(batch_size=8, block_rows=16, num_workers=0, progress=False)
MODEL = "tiny-random-vit"


def extract_args(store: Path, *extra: str, limit: int = 48) -> list[str]:
    return ["--params", "/dev/null", "extract", "--store", str(store), "--limit", str(limit),
            "--block-rows", "16", "--batch-size", "8", "--no-progress", *extra]  # fmt: skip


def pipeline(args: list[str], shell_prefix: str = "", timeout: float = 240):
    """`python -m pipeline ARGS` in a subprocess (optionally after shell settings such as a
    ulimit), from the repository root so that it imports this checkout."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    command = " ".join([f"{sys.executable} -m pipeline", *(f"'{a}'" for a in args)])
    return subprocess.run(
        ["bash", "-c", f"{shell_prefix}{command}"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def intact(store: Path, dataset: str = "digits") -> np.ndarray:
    """The completion record of the array, after checking that every block it calls complete
    reads back whole (files of the right size, checksums)."""
    array = FeatureStore(store).open(dataset, "train", "image", MODEL)
    assert array.damaged_blocks(read=True) == {}
    return array.completed_blocks()


# ==== one writer at a time ======================================================================
def test_two_identical_extracts_into_one_new_store(tmp_path):
    """Before: ContainsArrayError or KeyError 'layers/2'. Now: one writes, the other stops
    with one line (or, started after the first finished, finds nothing to do). Unlisted: a
    third process writing another array of the same new store at the same time is not
    disturbed (the store, its groups and arrays are created under a store-wide lock)."""
    store = tmp_path / "s.zarr"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TQDM_DISABLE": "1"}
    image = [sys.executable, "-m", "pipeline", *extract_args(store, "--num-workers", "0")]
    text = [*image, "--model", "tiny-random-text"]
    pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, "text": True}
    runs = [subprocess.Popen(a, cwd=ROOT, env=env, **pipes) for a in (image, image, text)]
    results = [(run.wait(timeout=240), *run.communicate()) for run in runs]
    for code, _out, err in results:
        assert "Traceback" not in err, err
        assert code == 0 or (code == 2 and "another process is writing" in one_line_error(err))
    assert any(code == 0 for code, _, _ in results[:2]) and results[2][0] == 0
    assert intact(store).all()
    texts = FeatureStore(store).open("digits", "train", "text", "tiny-random-text")
    assert texts.damaged_blocks(read=True) == {} and texts.complete


def test_a_second_and_third_writer_stop_with_one_line(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    extract(str(store), "digits", "train", "digits", MODEL, replace(FAST, limit=32))
    before = files(store)
    fs = FeatureStore(store)
    with fs.array_lock("digits/train/image/tiny-random-vit"):  # a first writer, running
        for extra in ([], ["--overwrite"]):  # the second and third writer
            code, _, err = run_cli(extract_args(store, *extra, limit=32), capsys)
            line = one_line_error(err)
            assert code == 2 and "another process is writing" in line and "tiny-random-vit" in line
        # unlisted: repairing the array while it is written is refused too
        code, _, err = run_cli(["store", "verify", "--store", store, "--repair"], capsys)
        assert code == 2 and "another process is writing" in one_line_error(err)
    assert files(store) == before
    # another array of the same store is not blocked by that lock
    with fs.array_lock("digits/train/image/tiny-random-vit"):
        code, _, err = run_cli(extract_args(store, "--model", "tiny-random-text", limit=32), capsys)
    assert code == 0, err


def test_lock_files_live_in_the_store_outside_zarr_and_dvc_outputs(tmp_path, capsys):
    store = tmp_path / "s.zarr"
    extract(str(store), "digits", "train", "digits", MODEL, replace(FAST, limit=16))
    locks = sorted(p.relative_to(store).as_posix() for p in (store / ".locks").iterdir())
    assert locks and all(name.endswith(".lock") for name in locks)
    assert not [p for p in store.rglob("*.lock") if p.parent != store / ".locks"]
    # dvc.yaml's outputs are {store}/{dataset}/{split}/{modality}: no lock file is in one
    assert not list((store / "digits" / "train" / "image").rglob("*lock*"))
    code, out, err = run_cli(["store", "ls", "--store", store], capsys)
    assert code == 0 and "complete" in out and "Warning" not in err


# ==== refused writes ==========================================================================
def test_ulimit_f_with_dataloader_workers_is_an_error_not_a_hang(tmp_path):
    """Before: the default extract (2 workers) under `ulimit -f 100` hung forever. Now: the
    workers' shared memory is refused, said once, loading falls back to this process, and
    the chunk write that the limit refuses is one line; nothing is marked complete."""
    store = tmp_path / "s.zarr"
    args = [
        "--params",
        "/dev/null",
        "extract",
        "--store",
        str(store),
        "--limit",
        "160",
        "--block-rows",
        "160",
        "--dtype",
        "float32",
    ]  # fmt: skip  (chunks of 40 KiB)
    started = time.perf_counter()
    result = pipeline(args, shell_prefix="trap '' XFSZ; ulimit -f 20; ", timeout=300)
    assert time.perf_counter() - started < 300
    line = one_line_error(result.stderr)
    assert result.returncode == 2 and "file too large" in line and "ulimit -f" in line
    assert "warning: the DataLoader workers failed" in result.stderr
    assert not intact(store).any()


@pytest.mark.parametrize(
    "code, words",
    [
        (errno.ENOSPC, "no space left"),
        (errno.EFBIG, "file too large"),
        (errno.EROFS, "read-only"),
        (errno.EPERM, "not permitted"),
        (errno.EACCES, "permission denied"),
    ],  # fmt: skip
)
def test_a_refused_chunk_write_is_one_line_and_no_block_complete(
    tmp_path, capsys, monkeypatch, code, words
):
    import zarr.storage._local as local

    real_put = local._put

    def refusing(path, value, exclusive=False):
        if "/c/" in str(path):  # feature chunks and the completion record: refused
            raise OSError(code, os.strerror(code))
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", refusing)
    store = tmp_path / "s.zarr"
    exit_code, _, err = run_cli(extract_args(store, "--num-workers", "0", limit=32), capsys)
    assert exit_code == 2 and words in one_line_error(err) and str(store) in err
    monkeypatch.undo()
    assert not intact(store).any()


def test_a_write_failing_after_some_blocks_leaves_exactly_those_complete(tmp_path, monkeypatch):
    """Unlisted: the disk fills up in the middle of the run. The blocks written before stay
    complete; the one being written is not; the same command then finishes byte-identical."""
    clean = tmp_path / "clean.zarr"
    extract(str(clean), "digits", "train", "digits", MODEL, replace(FAST, limit=48))
    fill_disk_after(monkeypatch, 7)  # block 0's 5 layers, then 2 layers of block 1
    store = tmp_path / "s.zarr"
    with pytest.raises(Exception, match="no space left on the device"):
        extract(str(store), "digits", "train", "digits", MODEL, replace(FAST, limit=48))
    monkeypatch.undo()
    assert intact(store).tolist() == [True, False, False]
    extract(str(store), "digits", "train", "digits", MODEL, replace(FAST, limit=48))
    assert files(store / "digits") == files(clean / "digits")


def immutable(path: Path) -> bool:
    """Make `path` (recursively) read-only for this process: `chattr -R +i` (root, ext4), else
    `chmod -R a-w` (not root). False when neither makes it read-only here."""
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "+i", str(path)], capture_output=True)
    else:
        subprocess.run(["chmod", "-R", "a-w", str(path)], capture_output=True)
    probe = (path if path.is_dir() else path.parent) / ".probe"
    try:
        probe.touch()
    except OSError:
        return True
    probe.unlink()
    writable(path)
    return False


def writable(path: Path) -> None:
    if os.geteuid() == 0:
        subprocess.run(["chattr", "-R", "-i", str(path)], capture_output=True)
    subprocess.run(["chmod", "-R", "u+w", str(path)], capture_output=True)


@pytest.fixture
def read_only():
    """Yields a function that makes a path read-only; everything is made writable again after
    the test (else pytest could not remove its temporary folders)."""
    made: list[Path] = []

    def make(path: Path) -> None:
        made.append(path)
        if not immutable(path):
            pytest.skip("cannot make a folder read-only here (no chattr, no chmod effect)")

    yield make
    for path in made:
        writable(path)


def test_a_read_only_store_is_one_line_and_unchanged(tmp_path, capsys, read_only):
    """Before: PermissionError tracebacks, with --overwrite and with a new --dataset."""
    store = tmp_path / "s.zarr"
    extract(str(store), "digits", "train", "digits", MODEL, replace(FAST, limit=32))
    before = files(store)
    read_only(store)
    for extra in (["--overwrite"], ["--dataset", "other"], ["--model", "tiny-random-text"]):
        code, _, err = run_cli(extract_args(store, "--num-workers", "0", *extra, limit=32), capsys)
        assert code == 2 and "cannot write" in one_line_error(err), (extra, err)
    code, _, err = run_cli(["store", "verify", "--store", store], capsys)  # reading still works
    assert code == 0, err
    # unlisted: the same extract again has nothing to write, and says so
    code, out, err = run_cli(extract_args(store, "--num-workers", "0", limit=32), capsys)
    assert code == 0 and "already complete" in out, err
    assert files(store) == before


def test_a_store_whose_parent_is_read_only(tmp_path, capsys, read_only):
    """Unlisted: the store's lock files live inside the store, so a writable store in a
    read-only folder is written as usual; a new store there is one line."""
    parent = tmp_path / "shared"
    store = parent / "s.zarr"
    extract(str(store), "digits", "train", "digits", MODEL, replace(FAST, limit=16))
    if os.geteuid() == 0:  # chattr +i on the parent only (the store stays writable)
        subprocess.run(["chattr", "+i", str(parent)], capture_output=True)
        read_only_parent = not os.access(parent, os.W_OK)
        if not read_only_parent:
            try:
                (parent / ".probe").touch()
                (parent / ".probe").unlink()
            except OSError:
                read_only_parent = True
        if not read_only_parent:
            pytest.skip("chattr has no effect here")
    else:
        os.chmod(parent, 0o555)
    try:
        code, _, err = run_cli(extract_args(store, "--model", "tiny-random-text", limit=16), capsys)
        assert code == 0, err
        code, _, err = run_cli(extract_args(parent / "new.zarr", limit=16), capsys)
        assert code == 2 and "cannot write" in one_line_error(err)
        assert not (parent / "new.zarr").exists()
    finally:
        writable(parent)


# ==== DataLoader workers that fail ===============================================================
def worker_sabotage(monkeypatch, action) -> None:
    """Make every DataLoader worker process run `action` when it loads an image (the main
    process loads normally)."""
    from torch.utils.data import get_worker_info

    real = extract_module.load_source

    def load_source(spec, split, *prompts):
        source = real(spec, split, *prompts)
        load = source.load_image

        def load_image(row):
            if get_worker_info() is not None:
                action()
            return load(row)

        return replace(source, load_image=load_image)

    monkeypatch.setattr(extract_module, "load_source", load_source)


def killed() -> None:
    os._exit(1)  # as the kernel's OOM killer or a SIGBUS on full shared memory leave it


def shm_full() -> None:
    import torch

    def refuse(self):
        raise RuntimeError("unable to write to file </torch_1_2_3>: No space left on device (28)")

    torch.Tensor.share_memory_ = refuse  # in this worker process only


def stuck() -> None:
    time.sleep(3600)


@pytest.mark.parametrize("action", [killed, shm_full, stuck], ids=["killed", "shm", "stuck"])
def test_failing_dataloader_workers_fall_back_to_this_process(
    tmp_path, capsys, monkeypatch, action
):
    clean = tmp_path / "clean.zarr"
    extract(str(clean), "digits", "train", "digits", MODEL, replace(FAST, limit=48))
    worker_sabotage(monkeypatch, action)
    # where the loader guard lives (stages.extract, or the encoders' inputs it may move to)
    guard = sys.modules[extract_module.row_batches.__module__]
    monkeypatch.setattr(guard, "LOADER_TIMEOUT", 3.0)  # `stuck`: unlisted
    monkeypatch.setattr(guard, "FAILED_WORKERS", [], raising=False)  # said once per process
    store = tmp_path / "s.zarr"
    extract(str(store), "digits", "train", "digits", MODEL, replace(FAST, limit=48, num_workers=2))
    err = capsys.readouterr().err
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1 and "in this process" in warnings[0], err
    assert "Traceback" not in err
    assert files(store / "digits") == files(clean / "digits")  # the same bytes
