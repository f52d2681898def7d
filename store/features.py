"""Zarr v3 feature store: one (N, L, D) array per (dataset, split, modality, model).

Layout inside the group (one directory on disk):

    {dataset}/{split}/manifest.parquet                    the samples and the pair table
    {dataset}/{split}/{modality}/{model_key}/features     (N, L, D), float16 or float32
    {dataset}/{split}/{modality}/{model_key}/complete     (n_blocks,) uint8, 1 = block written

Rows are written in blocks of `block_rows`; each block is one shard (block_rows, L, D) made of
inner chunks (block_rows, 1, D), so a block is one file with one writer and reading one layer
of all rows touches one inner chunk per shard. Block completion lives in its own tiny array
(chunks of 1) and is written after the block's data: a killed run never marks a half-written
block complete, and attributes (which rewrite zarr.json) are only written at creation.
"""

from __future__ import annotations

import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr

from store.errors import UserError
from store.manifest import fingerprint, read_manifest

MODALITIES = ("image", "text")
DTYPES = ("float16", "float32")


def model_key(model: str) -> str:
    """A store-safe key for a model spec: an alias, a Hugging Face id, `timm:name` or a path."""
    spec = model.rstrip("/")
    if spec.startswith(("/", "./", "../", "~")) or Path(spec).is_dir():
        spec = Path(spec).expanduser().name
    return re.sub(r"[^A-Za-z0-9._-]+", "--", spec.replace(":", "_"))


def array_path(dataset: str, split: str, modality: str, model: str) -> str:
    if modality not in MODALITIES:
        raise UserError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return f"{dataset}/{split}/{modality}/{model_key(model)}"


@dataclass(frozen=True)
class StoreEntry:
    dataset: str
    split: str
    modality: str
    model: str
    n: int
    layers: int
    dim: int
    dtype: str
    bytes: int
    blocks_done: int
    blocks: int

    @property
    def complete(self) -> bool:
        return self.blocks_done == self.blocks


class FeatureArray:
    """One (N, L, D) feature array and its block-completion record."""

    def __init__(self, group: zarr.Group, path: str, root: Path):
        self.path = path
        self.root = root
        self.data: zarr.Array = group["features"]
        self.done: zarr.Array = group["complete"]
        self.attrs: dict[str, Any] = dict(self.data.attrs)

    # -- shape and names -------------------------------------------------------------------
    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.data.shape)  # type: ignore[return-value]

    @property
    def layer_names(self) -> list[str]:
        return list(self.attrs["layer_names"])

    @property
    def block_rows(self) -> int:
        return int(self.attrs["block_rows"])

    @property
    def n_blocks(self) -> int:
        return int(self.done.shape[0])

    def block_slice(self, block: int) -> slice:
        start = block * self.block_rows
        return slice(start, min(start + self.block_rows, self.shape[0]))

    def layer_index(self, layer: int | str) -> int:
        """Resolve a layer given by index (negative allowed), digit string or name."""
        names = self.layer_names
        if isinstance(layer, str) and layer.lstrip("-").isdigit():
            layer = int(layer)
        if isinstance(layer, int | np.integer):
            if not -len(names) <= layer < len(names):
                raise UserError(f"layer {layer} out of range for {self.path} ({len(names)} layers)")
            return int(layer) % len(names)
        if layer not in names:
            raise UserError(f"unknown layer {layer!r} in {self.path}; layers: {', '.join(names)}")
        return names.index(layer)

    # -- completion -------------------------------------------------------------------------
    def completed_blocks(self) -> np.ndarray:
        return np.asarray(self.done[:], dtype=bool)

    @property
    def complete(self) -> bool:
        return bool(self.completed_blocks().all())

    def require_complete(self) -> None:
        done = self.completed_blocks()
        if not done.all():
            raise UserError(
                f"features {self.path} are incomplete ({done.sum()} of {done.size} blocks); "
                "run the same extract command again to finish them"
            )

    # -- writing ----------------------------------------------------------------------------
    def write_block(self, block: int, values: np.ndarray) -> None:
        """Write one whole block of rows (all layers), then mark it complete."""
        rows = self.block_slice(block)
        expected = (rows.stop - rows.start, *self.shape[1:])
        if values.shape != expected:
            raise ValueError(f"block {block} has shape {values.shape}, expected {expected}")
        with np.errstate(over="ignore"):  # overflow is reported below, with the fix
            cast = values.astype(self.data.dtype, copy=False)
        if np.isinf(cast).any():
            raise UserError(
                f"features of {self.path} overflow {self.data.dtype} in rows {rows.start}-"
                f"{rows.stop - 1}; extract again with --dtype float32 --overwrite"
            )
        self.data[rows] = cast
        self.done[block] = 1

    def remove_partial_files(self) -> int:
        """Delete temporary files a killed write can leave behind; returns how many."""
        leftovers = list((self.root / self.path).rglob("*.partial"))
        for f in leftovers:
            f.unlink()
        return len(leftovers)

    # -- reading ----------------------------------------------------------------------------
    def read_layer(self, layer: int | str) -> np.ndarray:
        """One layer as float32 (N, D)."""
        self.require_complete()
        return np.asarray(self.data[:, self.layer_index(layer), :], dtype=np.float32)

    def read(self, layers: Sequence[int | str] | None = None) -> np.ndarray:
        """Several layers (default all) as float32 (N, len(layers), D)."""
        self.require_complete()
        if layers is None:
            return np.asarray(self.data[:], dtype=np.float32)
        return np.stack([self.read_layer(layer) for layer in layers], axis=1)

    def to_dask(self):
        """The whole array as a dask array, chunked by row block and layer."""
        import dask.array as da

        self.require_complete()
        return da.from_zarr(self.data)

    def nbytes_on_disk(self) -> int:
        return sum(f.stat().st_size for f in (self.root / self.path).rglob("*") if f.is_file())


class FeatureStore:
    """The Zarr group on disk. Open for reading (default) or with `create=True` to write."""

    def __init__(self, path: str | Path, create: bool = False):
        self.root = Path(path)
        if not self.root.exists():
            if not create:
                raise UserError(
                    f"no feature store at {self.root} (run `python -m pipeline extract`)"
                )
            self.group = zarr.open_group(self.root, mode="a", zarr_format=3)
            return
        if not (self.root / "zarr.json").is_file():
            raise UserError(f"{self.root} is not a feature store (no zarr.json at its top)")
        try:
            self.group = zarr.open_group(self.root, mode="a" if create else "r", zarr_format=3)
        except Exception as err:  # zarr raises several types for a damaged group
            raise UserError(f"{self.root} is not a readable feature store: {err}") from err

    def manifest_path(self, dataset: str, split: str) -> Path:
        return self.root / dataset / split / "manifest.parquet"

    def manifest(self, dataset: str, split: str) -> pd.DataFrame:
        return read_manifest(self.manifest_path(dataset, split))

    def has(self, dataset: str, split: str, modality: str, model: str) -> bool:
        return f"{array_path(dataset, split, modality, model)}/features" in self.group

    def open(
        self, dataset: str, split: str, modality: str, model: str, check_source: bool = True
    ) -> FeatureArray:
        """The array of (dataset, split, modality, model); refuses features whose source
        differs from the split's manifest (stale after `extract --overwrite` of another model)."""
        path = array_path(dataset, split, modality, model)
        if f"{path}/features" not in self.group:
            raise UserError(
                f"the store {self.root} has no {modality} features of {model} for "
                f"{dataset}/{split}; make them with: python -m pipeline extract --model {model} "
                f"--dataset {dataset} --split {split} --store {self.root}"
            )
        array = FeatureArray(self.group[path], path, self.root)
        if check_source and self.manifest_path(dataset, split).is_file():
            expected = fingerprint(self.manifest(dataset, split), modality)
            if array.attrs.get("source_fingerprint", expected) != expected:
                raise UserError(
                    f"{path} was extracted from other samples than the current manifest of "
                    f"{dataset}/{split}; extract it again with --overwrite"
                )
        return array

    def create(
        self,
        dataset: str,
        split: str,
        modality: str,
        model: str,
        n_rows: int,
        layer_names: Sequence[str],
        dim: int,
        dtype: str,
        block_rows: int,
        attributes: dict[str, Any],
    ) -> FeatureArray:
        """Create (or replace) an empty array; every row reads NaN until its block is written."""
        if dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
        if n_rows < 1:
            raise UserError(f"{dataset}/{split} has no rows to extract")
        path = array_path(dataset, split, modality, model)
        if path in self.group:
            del self.group[path]
        group = self.group.require_group(path)
        block_rows = min(block_rows, n_rows)
        n_layers = len(layer_names)
        attrs = {
            **attributes,
            "dataset": dataset,
            "split": split,
            "modality": modality,
            "model": model,
            "layer_names": list(layer_names),
            "dtype": dtype,
            "block_rows": block_rows,
        }
        group.create_array(
            "features",
            shape=(n_rows, n_layers, dim),
            shards=(block_rows, n_layers, dim),
            chunks=(block_rows, 1, dim),
            dtype=dtype,
            fill_value=np.nan,
            compressors=None,
            dimension_names=("row", "layer", "dim"),
            attributes=attrs,
        )
        n_blocks = -(-n_rows // block_rows)
        group.create_array("complete", shape=(n_blocks,), chunks=(1,), dtype="uint8", fill_value=0)
        return FeatureArray(group, path, self.root)

    def entries(self) -> list[StoreEntry]:
        """Every feature array in the store, sorted by dataset, split, modality, model."""
        found = []
        with warnings.catch_warnings():  # manifests are Parquet files beside the arrays
            warnings.simplefilter("ignore")
            members = list(self.group.members(max_depth=None))
        for name, node in members:
            if not (isinstance(node, zarr.Array) and name.endswith("/features")):
                continue
            path = name.rsplit("/", 1)[0]
            arr = FeatureArray(self.group[path], path, self.root)
            n, layers, dim = arr.shape
            found.append(
                StoreEntry(
                    dataset=arr.attrs["dataset"],
                    split=arr.attrs["split"],
                    modality=arr.attrs["modality"],
                    model=arr.attrs["model"],
                    n=n,
                    layers=layers,
                    dim=dim,
                    dtype=str(arr.data.dtype),
                    bytes=arr.nbytes_on_disk(),
                    blocks_done=int(arr.completed_blocks().sum()),
                    blocks=arr.n_blocks,
                )
            )
        return sorted(found, key=lambda e: (e.dataset, e.split, e.modality, e.model))
