"""One reader and one writer for every artifact directory (run, selection, index, export).

An artifact kind is a schema (`ArtifactKind`): the files it must hold, the JSON file that
describes it, the keys that JSON must have and their types, and the command that makes it
again. The writer (`write_artifact`) builds the directory under a unique temporary sibling
while holding the artifact's lock, records the SHA-256 of every file it wrote in the
description (`files`), and renames it into place only when complete. The reader
(`read_artifact`) checks everything the schema names and every recorded checksum; anything
missing, unparsable or changed is one line naming the file and the command that remakes it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from store.errors import UserError
from store.io import atomic_directory, check_output, file_sha256, writer_lock

CHECKSUMS = "files"  # the description's key: {relative file name: sha256}


@dataclass(frozen=True)
class ArtifactKind:
    """The schema of one kind of artifact directory."""

    name: str  # "run directory", "index", ...
    description: str  # the JSON file describing it, e.g. "config.json"
    remake: str  # the command that makes it again; `{path}` is the artifact's path
    files: tuple[str, ...] = ()  # required besides the description
    keys: Mapping[str, type | tuple[type, ...]] = field(default_factory=dict)
    # recorded files that may be absent (diagnostics); checked against their checksum if present
    optional: tuple[str, ...] = ()

    def remake_hint(self, folder: Path) -> str:
        return f"make it again with `{self.remake.format(path=folder)}`"

    def error(self, folder: Path, path: Path, problem: str) -> UserError:
        return UserError(f"{path}: {problem}; {self.remake_hint(folder)}")


def _type_names(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    return " or ".join("null" if k is type(None) else k.__name__ for k in kinds)


def _check_type(value: Any, kind: type | tuple[type, ...]) -> bool:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    if isinstance(value, bool) and bool not in kinds:  # JSON true is not a number here
        return False
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        return True
    return isinstance(value, kinds)


def read_description(kind: ArtifactKind, folder: str | Path) -> dict[str, Any]:
    """The artifact's description JSON, checked against the schema: the folder exists, the
    required files are present, the keys have their types, the recorded checksums match."""
    folder = Path(folder)
    if not folder.is_dir():
        what = "is a file, not a folder" if folder.exists() else "does not exist"
        raise UserError(f"{kind.name} {folder} {what}; {kind.remake_hint(folder)}")
    path = folder / kind.description
    if not path.is_file():
        raise kind.error(folder, path, f"missing ({kind.name} incomplete)")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise kind.error(folder, path, f"not valid JSON ({err})") from err
    if not isinstance(data, dict):
        raise kind.error(folder, path, f"must hold a JSON object, not {type(data).__name__}")
    for key, key_kind in kind.keys.items():
        if key not in data:
            raise kind.error(folder, path, f"has no `{key}`")
        if not _check_type(data[key], key_kind):
            raise kind.error(
                folder, path, f"`{key}` must be {_type_names(key_kind)}, not {data[key]!r:.60}"
            )
    for name in kind.files:
        if not (folder / name).is_file():
            raise kind.error(folder, folder / name, "missing")
    recorded = data.get(CHECKSUMS, {})
    if not isinstance(recorded, dict):
        raise kind.error(folder, path, f"`{CHECKSUMS}` must map file names to SHA-256 digests")
    for name, digest in recorded.items():
        file = folder / name
        if not file.is_file() and name in kind.optional:
            continue
        if not file.is_file():
            raise kind.error(folder, file, "missing")
        if file_sha256(file) != digest:
            raise kind.error(folder, file, "changed since it was written (checksum mismatch)")
    return data


def write_artifact(
    kind: ArtifactKind,
    out: str | Path,
    fill: Callable[[Path], dict[str, Any]],
    *,
    wait: float = 0,
) -> dict[str, Any]:
    """Make the artifact at `out`: `fill(tmp)` writes every file but the description into the
    temporary folder and returns the description; the checksums of the files are added to it
    and the folder is renamed into place, replacing a previous `out` only now. Holds `out`'s
    lock throughout, so a second writer stops with one line (or waits `wait` seconds)."""
    out = check_output(out, "dir")
    with writer_lock(out, wait=wait), atomic_directory(out) as tmp:
        description = fill(tmp)
        files = sorted(str(p.relative_to(tmp)) for p in tmp.rglob("*") if p.is_file())
        digests = {name: file_sha256(tmp / name) for name in files if name != kind.description}
        text = json.dumps({**description, CHECKSUMS: digests}, indent=2) + "\n"
        (tmp / kind.description).write_text(text, encoding="utf-8")
        return read_description(kind, tmp)  # the writer's output passes its own reader
