"""store.io: the atomic text writer replaces a file whole and leaves no temporary behind."""

import json

import pytest

from store import write_json_atomic, write_text_atomic


def test_write_text_atomic_replaces_whole_and_cleans_up(tmp_path):
    path = tmp_path / "deep" / "table.md"
    write_text_atomic(path, "old\n" * 100)
    write_text_atomic(path, "new\n")
    assert path.read_text() == "new\n"
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.md"]


def test_failed_write_keeps_the_old_file(tmp_path):
    path = tmp_path / "metrics.json"
    write_json_atomic(path, {"a": 1})
    with pytest.raises(TypeError):
        write_json_atomic(path, {"a": object()})  # not JSON: fails before anything is written
    assert json.loads(path.read_text()) == {"a": 1}
    assert path.read_text() == '{\n  "a": 1\n}\n'


def test_writer_lock_where_its_file_lives_and_what_it_reports(tmp_path):
    from store import UserError
    from store.io import writer_lock

    target, lock = tmp_path / "data.zarr" / "a", tmp_path / "locks" / "a.lock"
    with writer_lock(target, lock_path=lock):
        assert lock.is_file()
        second = pytest.raises(UserError, match=f"another process is writing {target}")
        with second, writer_lock(target, lock_path=lock):
            pass
    with writer_lock(target, lock_path=lock):  # released: taken again
        pass
    # an error of the writer itself is not reported as the lock file's
    with (
        pytest.raises(PermissionError, match="the writer's own"),
        writer_lock(target, lock_path=lock),
    ):
        raise PermissionError("the writer's own")


def test_manifest_is_written_0644_through_a_unique_temporary(tmp_path, monkeypatch):
    import os

    import pandas as pd

    from store import write_manifest

    path = tmp_path / "d" / "train" / "manifest.parquet"
    old = os.umask(0o077)
    try:
        write_manifest(path, pd.DataFrame({"image_row": [0], "sample_id": ["s"], "caption": ["a"]}))
    finally:
        os.umask(old)
    assert path.stat().st_mode & 0o777 == 0o644
    assert sorted(p.name for p in path.parent.iterdir()) == ["manifest.parquet"]
