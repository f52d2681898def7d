"""Writing artifacts so that nothing is ever half-written, lost or mixed: the one place for it.

- An output is written under a unique temporary sibling and renamed into place when complete
  (`write_text_atomic`, `atomic_file`, `atomic_directory`): a reader, a DVC stage, a crash or
  Ctrl-C never sees half an artifact, and an existing artifact is replaced only by a complete
  successor. Two writers never share a temporary.
- Output paths are checked before any work (`check_output`): a directory where a file goes, a
  parent that is a file, an unwritable place: one line.
- One writer at a time (`writer_lock`): a lock file through `filelock`.
- A failing write (disk full, file too large, read-only) is a `UserError`, not a traceback.

Files are written 0644 whatever the process umask gives temporary files.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Literal

from store.errors import UserError

FILE_MODE = 0o644
DIR_MODE = 0o755


def temp_sibling(path: Path, tag: str = "tmp") -> Path:
    """A unique hidden name beside `path` (same file system, so the rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.{tag}")


def write_error(path: Path, err: OSError) -> UserError:
    """A failed write as one line that says what the machine refused."""
    reasons = {
        errno.ENOSPC: "no space left on the device",
        errno.EFBIG: "file too large for this process's limit (ulimit -f)",
        errno.EROFS: "the file system is read-only",
        errno.EACCES: "permission denied",
        errno.EPERM: "operation not permitted (immutable or owned by another user?)",
        errno.EDQUOT: "disk quota exceeded",
    }
    reason = reasons.get(err.errno, err.strerror or str(err))
    return UserError(f"cannot write {path}: {reason}")


def _nearest_existing(path: Path) -> Path:
    for parent in (path, *path.parents):
        if parent.exists() or parent.is_symlink():
            return parent
    return Path(".")


def check_output(path: str | Path, kind: Literal["file", "dir"], flag: str = "--out") -> Path:
    """Refuse, before any work, an output that cannot be written: a directory where a file goes
    (or the reverse), a parent that is a file, or a place this process cannot write."""
    path = Path(path)
    if kind == "file" and path.is_dir():
        raise UserError(f"{flag} {path} is a directory; give a file name")
    if kind == "dir" and path.exists() and not path.is_dir():
        raise UserError(f"{flag} {path} is a file; give a directory")
    existing = _nearest_existing(path.parent if not path.exists() else path)
    if not existing.is_dir() and existing != path:
        raise UserError(f"{flag} {path}: {existing} is a file, not a folder")
    folder = existing if existing.is_dir() else existing.parent
    if path.exists() and path != folder:  # replacing `path` needs its own folder writable
        folder = path.parent
    if not os.access(folder, os.W_OK | os.X_OK):
        raise UserError(f"{flag} {path}: cannot write in {folder} (permission denied)")
    return path


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except (FileExistsError, NotADirectoryError) as err:
        raise UserError(f"cannot write {path}: a part of its folder is a file") from err
    except OSError as err:
        raise write_error(path.parent, err) from err


@contextmanager
def atomic_file(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path beside `path`; on success it is renamed onto `path` (mode 0644),
    on any failure (Ctrl-C included) it is removed and `path` is untouched."""
    path = Path(path)
    if path.is_dir():
        raise UserError(f"{path} is a directory; give a file name")
    _make_parent(path)
    tmp = temp_sibling(path)
    try:
        yield tmp
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, path)
    except OSError as err:
        raise write_error(path, err) from err
    finally:
        tmp.unlink(missing_ok=True)


def write_bytes_atomic(path: str | Path, data: bytes) -> Path:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)
    return Path(path)


def write_text_atomic(path: str | Path, text: str) -> Path:
    """Write `text` (UTF-8) to a unique temporary file beside `path`, then rename it over `path`
    (atomic on one file system). Creates the parent folder."""
    return write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str | Path, data: Any, **dumps: Any) -> Path:
    """`data` as indented JSON plus a final newline, written atomically."""
    return write_text_atomic(path, json.dumps(data, indent=2, **dumps) + "\n")


def _set_modes(folder: Path) -> None:
    for root, _dirs, files in os.walk(folder):
        os.chmod(root, DIR_MODE)
        for name in files:
            os.chmod(os.path.join(root, name), FILE_MODE)


@contextmanager
def atomic_directory(out: str | Path) -> Iterator[Path]:
    """Yield an empty temporary directory beside `out`; when the block ends without error it
    replaces `out` (the previous `out`, if any, is removed only after the new one is in place).
    On any failure, Ctrl-C included, the temporary is removed and `out` is untouched."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} is a file; give a directory")
    _make_parent(out)
    tmp = temp_sibling(out)
    old = temp_sibling(out, "old")
    try:
        tmp.mkdir()
        yield tmp
        _set_modes(tmp)
        if out.exists():
            os.replace(out, old)
        os.replace(tmp, out)
    except OSError as err:
        raise write_error(out, err) from err
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


@contextmanager
def writer_lock(
    target: str | Path, wait: float = 0, lock_path: str | Path | None = None
) -> Iterator[None]:
    """Hold the lock of `target` (a lock file beside it, `.NAME.lock`, unless `lock_path` says
    where) while writing it. A second writer waits up to `wait` seconds, then stops with one
    line."""
    from filelock import FileLock, Timeout

    target = Path(target)
    lock_path = Path(lock_path) if lock_path else target.with_name(f".{target.name}.lock")
    _make_parent(lock_path)
    lock = FileLock(lock_path, timeout=wait)
    try:  # only taking the lock is checked here: the writer's own errors pass unchanged
        lock.acquire()
    except Timeout as err:
        raise UserError(
            f"another process is writing {target} (lock {lock_path}); wait for it to finish"
        ) from err
    except OSError as err:  # a read-only or immutable place: PermissionError, EROFS
        raise write_error(lock_path, err) from err
    try:
        yield
    finally:
        lock.release()


def file_sha256(path: str | Path) -> str:
    """The SHA-256 of a file's bytes, read in 1 MiB pieces."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for piece in iter(lambda: handle.read(1 << 20), b""):
            digest.update(piece)
    return digest.hexdigest()
