"""Parquet manifests: one table per (dataset, split) listing the samples and the pair table.

One manifest row per text (caption or class prompt), in text-feature row order:

    text_row    row of this text in the text feature array (0..T-1)
    image_row   row of its image in the image feature array, -1 for text-only sets (prompts)
    sample_id   the image's id (shared by all captions of an image)
    image_path  where the image comes from (a file path or a `source://index` reference)
    caption     the text
    label       integer class, -1 when there is none
    label_name  class name, "" when there is none
    skipped     the image could not be decoded and was skipped (`extract --skip-bad`)
    image_stat  "size:mtime_ns" of the image file when extracted ("" when not a file): a
                changed file at the same path changes the source fingerprint

The image feature array has one row per distinct image_row; `image_table` lists them.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import pandas as pd

from store.errors import UserError
from store.io import atomic_file

PAIR_COLUMNS = {
    "text_row": "int64",
    "image_row": "int64",
    "sample_id": "string",
    "image_path": "string",
    "caption": "string",
    "label": "int64",
    "label_name": "string",
    "skipped": "bool",
    "image_stat": "string",
}


def normalise_manifest(table: pd.DataFrame) -> pd.DataFrame:
    """Fill optional columns, fix dtypes and check the row numbering."""
    table = table.copy()
    defaults = {"label": -1, "label_name": "", "skipped": False, "image_path": "", "caption": "",
                "image_stat": ""}  # fmt: skip
    for column, value in defaults.items():
        if column not in table:
            table[column] = value
    if "text_row" not in table:
        table["text_row"] = np.arange(len(table))
    missing = [c for c in PAIR_COLUMNS if c not in table]
    if missing:
        raise UserError(f"manifest lacks columns {missing}")
    table = table[list(PAIR_COLUMNS)].astype(PAIR_COLUMNS)
    if not np.array_equal(table["text_row"].to_numpy(), np.arange(len(table))):
        raise ValueError("manifest text_row must be 0..T-1 in order")
    images = table.loc[table["image_row"] >= 0, "image_row"].unique()
    if len(images) and not np.array_equal(np.sort(images), np.arange(len(images))):
        raise ValueError("manifest image_row must number the images 0..I-1")
    return table.reset_index(drop=True)


def write_manifest(path: str | Path, table: pd.DataFrame) -> pd.DataFrame:
    """Write atomically (a unique temporary file, then rename; mode 0644) so that a crash never
    leaves half a manifest and two writers never share a temporary; a write the machine refuses
    is one line (store.io)."""
    table = normalise_manifest(table)
    with atomic_file(path) as tmp:
        table.to_parquet(tmp, index=False)
    return table


def read_manifest(path: str | Path) -> pd.DataFrame:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no manifest at {path}; run `python -m pipeline extract` for this split")
    try:
        table = pd.read_parquet(path)
    except Exception as err:  # pyarrow raises several types for a damaged file
        raise UserError(
            f"{path} is not a readable manifest ({str(err).splitlines()[0][:80]}); extract the "
            "split again with --overwrite"
        ) from err
    return normalise_manifest(table)


def image_table(manifest: pd.DataFrame) -> pd.DataFrame:
    """One row per image, indexed and ordered by image_row."""
    images = manifest[manifest["image_row"] >= 0]
    images = images.drop_duplicates("image_row").sort_values("image_row")
    columns = ["image_row", "sample_id", "image_path", "label", "label_name", "skipped"]
    return images[[*columns, "image_stat"]]


def _usable_pairs(manifest: pd.DataFrame) -> pd.DataFrame:
    return manifest[(manifest["image_row"] >= 0) & ~manifest["skipped"]]


def pair_rows(manifest: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """(image_row, text_row) of every usable image-text pair (skipped images left out)."""
    usable = _usable_pairs(manifest)
    return usable["image_row"].to_numpy(), usable["text_row"].to_numpy()


def pair_labels(manifest: pd.DataFrame) -> np.ndarray:
    """The class label (-1: none) of every pair of `pair_rows`, in the same order."""
    return _usable_pairs(manifest)["label"].to_numpy(dtype=np.int64)


def file_stat(path: str) -> str:
    """What identifies a file's content cheaply: "size:mtime_ns"; "" when `path` is no file."""
    try:
        stat = os.stat(path)
    except (OSError, ValueError):  # a `source://index` reference, or no such file
        return ""
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def with_file_stats(manifest: pd.DataFrame) -> pd.DataFrame:
    """The manifest with every image row's current `image_stat` (one stat per image)."""
    stats = {p: file_stat(p) for p in manifest.loc[manifest["image_row"] >= 0, "image_path"]}
    column = [stats.get(p, "") for p in manifest["image_path"]]  # text-only rows: ""
    return manifest.assign(image_stat=pd.Series(column, index=manifest.index, dtype="string"))


def fingerprint(manifest: pd.DataFrame, modality: str) -> str:
    """A hash of what one modality's features are computed from (ids, paths and file size and
    modification time; or texts). Stores made before file stats hash ids and paths only."""
    if modality == "image":
        images = image_table(manifest)
        columns = ["sample_id", "image_path"] + (
            ["image_stat"] if (images["image_stat"] != "").any() else []
        )
        source = images[columns]
    else:
        source = manifest[["caption"]]
    digest = hashlib.sha256()
    for column in source.columns:
        digest.update("\x1f".join(source[column].astype(str)).encode())
        digest.update(b"\x1e")
    return digest.hexdigest()[:16]
