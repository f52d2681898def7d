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
