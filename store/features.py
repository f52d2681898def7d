"""Zarr v3 feature store: one (N, D_l) array per layer of each (dataset, split, modality, model).

Layout inside the group (one directory on disk):

    {dataset}/{split}/manifest.parquet                          the samples and the pair table
    {dataset}/{split}/{modality}/{model_key}/                   a group; its attributes: model,
                                                                layer names and widths, dtype...
    {dataset}/{split}/{modality}/{model_key}/layers/{i}         (N, D_i) float16 or float32
    {dataset}/{split}/{modality}/{model_key}/complete           (n_blocks,) uint8, 1 = written

Layers of one model may differ in width (CNN and Swin stages: 64, 128, ..., 2048): each layer
is its own array, so nothing is padded. Rows are written in blocks of `block_rows`; a block of
a layer is one chunk (block_rows, D_i), i.e. one file with one writer, and reading one layer of
all rows reads one file per block and nothing of the other layers. Every chunk carries a
crc32c checksum: a corrupted file is an error, never silently wrong features. Block completion
lives in its own tiny array (chunks of 1) and is written after every layer of the block: a
killed run never marks a half-written block complete, and attributes (which rewrite zarr.json)
are only written at creation.

Stores written before per-layer widths hold one (N, L, D) `features` array per model; they are
refused with the command that converts them in place (`python -m pipeline store migrate`).

One writer at a time: a process that writes an array (extract, `store migrate`, `store verify
--repair`) holds its lock, a file in `{store}/.locks/` (filelock); a second writer of the same
array stops with one line. Creating the store, its groups and arrays, and replacing a split's
manifest hold short store-wide locks there too, so that concurrent writers of different arrays
never race. The lock files live inside the store but outside every zarr node (zarr lists no
`.locks` member) and outside every DVC output (dvc.yaml's outputs are the modality folders
`{store}/{dataset}/{split}/{modality}`), and they go wherever the store goes. A write the machine
refuses (disk full, file too large, read-only, immutable) is one line naming the store, and the
block it was writing stays incomplete.
"""

from __future__ import annotations

import hashlib
import os
import re
import warnings
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import zarr
from zarr.codecs import Crc32cCodec

from store.errors import UserError
from store.io import write_error, writer_lock
from store.manifest import fingerprint, read_manifest

MODALITIES = ("image", "text")
DTYPES = ("float16", "float32")
OLD_ARRAY = "features"  # the (N, L, D) array of the layout before per-layer widths
MIGRATE_COMMAND = "python -m pipeline store migrate"
VERIFY_COMMAND = "python -m pipeline store verify"
LOCK_DIR = ".locks"  # the store's lock files (see the module docstring)
LAYOUT_WAIT = 60.0  # seconds a writer waits for another one's short store-wide locks


@contextmanager
def writing(path: Path) -> Iterator[None]:
    """A write into the store that the machine refuses (no space, ulimit -f, read-only,
    immutable) is a one-line UserError naming `path`, not a traceback."""
    try:
        yield
    except OSError as err:
        raise write_error(path, err) from err


def model_key(model: str) -> str:
    """A store-safe key for a model spec: an alias, a Hugging Face id, `timm:name` or a path."""
    spec = model.rstrip("/")
    if spec.startswith(("/", "./", "../", "~")) or Path(spec).is_dir():
        spec = Path(spec).expanduser().name
    return re.sub(r"[^A-Za-z0-9._-]+", "--", spec.replace(":", "_"))


def local_model_dir(model: str) -> Path | None:
    """The resolved folder of a model given as a local directory, else None."""
    path = Path(model.rstrip("/")).expanduser()
    return path.resolve() if path.is_dir() else None


def local_names(folder: Path) -> list[str]:
    """Store names for a local model folder, most readable first: `enc`, then `v2-enc` (its
    parent too), then `enc-<hash of the path>`; the first one free (or already this folder's)
    is taken, so two folders named `enc` never share features."""
    digest = hashlib.sha256(str(folder).encode()).hexdigest()[:8]
    names = [folder.name, f"{folder.parent.name}-{folder.name}", f"{folder.name}-{digest}"]
    return [model_key(n) for n in names]


def array_path(dataset: str, split: str, modality: str, model: str) -> str:
    if modality not in MODALITIES:
        raise UserError(f"modality must be one of {MODALITIES}, got {modality!r}")
    return f"{dataset}/{split}/{modality}/{model_key(model)}"


def old_layout_error(root: Path, path: str) -> UserError:
    return UserError(
        f"{path} in {root} is in the old (N, L, D) store layout; convert the store once with: "
        f"{MIGRATE_COMMAND} --store {root}"
    )


def directory_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def width_summary(dims: Sequence[int]) -> str:
    """`768` when every layer has that width, else the range `64-2048`."""
    low, high = min(dims), max(dims)
    return str(low) if low == high else f"{low}-{high}"


@dataclass(frozen=True)
class StoreEntry:
    dataset: str
    split: str
    modality: str
    model: str
    n: int
    layer_dims: tuple[int, ...]
    dtype: str
    bytes: int
    blocks_done: int
    blocks: int
    old_layout: bool = False
    damaged: int = 0  # completed blocks whose files are missing or truncated

    @property
    def layers(self) -> int:
        return len(self.layer_dims)

    @property
    def complete(self) -> bool:
        return self.blocks_done == self.blocks


class FeatureArray:
    """The per-layer arrays of one model over one split, and its block-completion record."""

    def __init__(self, group: zarr.Group, path: str, root: Path):
        self.path = path
        self.root = root
        self.attrs: dict[str, Any] = dict(group.attrs)
        self.layers: list[zarr.Array] = [
            group[f"layers/{i}"] for i in range(len(self.attrs["layer_names"]))
        ]
        self.done: zarr.Array = group["complete"]

    # -- shape and names -------------------------------------------------------------------
    @property
    def n_rows(self) -> int:
        return int(self.layers[0].shape[0])

    @property
    def shape(self) -> tuple[int, int]:
        """(rows, layers); the widths differ per layer: `layer_dims`."""
        return self.n_rows, len(self.layers)

    @property
    def layer_dims(self) -> list[int]:
        return [int(a.shape[1]) for a in self.layers]

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(self.attrs["dtype"])

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
        return slice(start, min(start + self.block_rows, self.n_rows))

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

    # -- integrity ------------------------------------------------------------------------
    def chunk_file(self, layer: int, block: int) -> Path:
        """The one file of a block of a layer (zarr v3 chunk key `c/{block}/0`)."""
        return self.root / self.path / "layers" / str(layer) / "c" / str(block) / "0"

    def chunk_problem(self, layer: int, block: int) -> str:
        """Why the file of a completed block cannot hold its data ("" when its size is right):
        it is missing (it would read as NaN) or has another size than rows x width + crc32c."""
        expected = self.block_rows * self.layer_dims[layer] * self.dtype.itemsize + 4
        try:
            size = self.chunk_file(layer, block).stat().st_size
        except FileNotFoundError:
            return "missing"
        return "" if size == expected else f"truncated ({size} of {expected} bytes)"

    def damaged_blocks(self, read: bool = False) -> dict[int, list[str]]:
        """{block: ["layer NAME: why", ...]} of the completed blocks whose files are missing or
        of the wrong size; with `read`, every block is also read (its crc32c checked)."""
        damaged: dict[int, list[str]] = {}
        for block in np.flatnonzero(self.completed_blocks()).tolist():
            for i, name in enumerate(self.layer_names):
                problem = self.chunk_problem(i, block)
                if not problem and read:
                    try:
                        self.layers[i][self.block_slice(block)]
                    except Exception as err:  # zarr's crc32c codec raises ValueError
                        problem = f"unreadable ({str(err).splitlines()[0][:60]})"
                if problem:
                    damaged.setdefault(block, []).append(f"layer {name}: {problem}")
        return damaged

    def check_chunks(self, layer: int, rows: slice) -> None:
        """Refuse to read completed blocks of `layer` whose files are missing or truncated (a
        missing chunk would read as NaN, silently)."""
        start, stop, _ = rows.indices(self.n_rows)
        first, last = start // self.block_rows, -(-stop // self.block_rows)
        for block in np.flatnonzero(self.done[first:last]).tolist():
            problem = self.chunk_problem(layer, first + block)
            if problem:
                raise UserError(
                    f"block {first + block} of layer {self.layer_names[layer]} of {self.root}/"
                    f"{self.path} is {problem}; repair the store with: {VERIFY_COMMAND} "
                    f"--store {self.root} --repair"
                )

    # -- writing ----------------------------------------------------------------------------
    def write_block(self, block: int, values: np.ndarray | Sequence[np.ndarray]) -> None:
        """Write one whole block of rows: one (rows, D_l) array per layer (or one (rows, L, D)
        array when all widths are equal), then mark the block complete."""
        rows = self.block_slice(block)
        if isinstance(values, np.ndarray) and values.ndim == 3:
            values = [values[:, i] for i in range(values.shape[1])]
        shapes = [tuple(v.shape) for v in values]
        expected = [(rows.stop - rows.start, dim) for dim in self.layer_dims]
        if shapes != expected:
            raise ValueError(f"block {block} has layer shapes {shapes}, expected {expected}")
        with np.errstate(over="ignore"):  # overflow is reported below, with the fix
            cast = [v.astype(self.dtype, copy=False) for v in values]
        if any(np.isinf(v).any() for v in cast):
            raise UserError(
                f"features of {self.path} overflow {self.dtype} in rows {rows.start}-"
                f"{rows.stop - 1}; extract again with --dtype float32 --overwrite"
            )
        with writing(self.root / self.path):  # a failed write leaves the block incomplete
            for layer, v in zip(self.layers, cast):
                layer[rows] = v
            self.done[block] = 1

    def mark_incomplete(self, blocks: Sequence[int]) -> None:
        """Mark blocks to be extracted again (`store verify --repair`)."""
        with writing(self.root / self.path):
            for block in blocks:
                self.done[block] = 0

    def remove_partial_files(self) -> int:
        """Delete temporary files a killed write can leave behind; returns how many."""
        leftovers = list((self.root / self.path).rglob("*.partial"))
        with writing(self.root / self.path):
            for f in leftovers:
                f.unlink(missing_ok=True)
        return len(leftovers)

    # -- reading ----------------------------------------------------------------------------
    def read_rows(self, layer: int | str, rows: slice) -> np.ndarray:
        """Rows of one layer as float32 (n, D_l), complete or not (unwritten rows are NaN);
        a chunk whose checksum does not match is a UserError naming the array and layer."""
        index = self.layer_index(layer)
        self.check_chunks(index, rows)
        try:
            return np.asarray(self.layers[index][rows], dtype=np.float32)
        except ValueError as err:  # zarr's crc32c codec: "Stored and computed checksum ..."
            raise UserError(
                f"corrupt feature data in {self.root}/{self.path} layer "
                f"{self.layer_names[index]} ({str(err).splitlines()[0][:80]}); "
                f"find and repair every damaged block with: {VERIFY_COMMAND} --store {self.root} "
                "--repair"
            ) from err

    def read_layer(self, layer: int | str) -> np.ndarray:
        """One layer of all rows as float32 (N, D_l)."""
        self.require_complete()
        return self.read_rows(layer, slice(None))

    def read(self, layers: Sequence[int | str] | None = None) -> list[np.ndarray]:
        """Several layers (default all), one float32 (N, D_l) array each."""
        self.require_complete()
        return [self.read_rows(layer, slice(None)) for layer in (layers or range(len(self.layers)))]

    def to_dask(self, layer: int | str):
        """One layer as an (N, D_l) dask array chunked by row block, for work larger than
        memory."""
        import dask.array as da

        self.require_complete()
        index = self.layer_index(layer)
        self.check_chunks(index, slice(None))
        return da.from_zarr(self.layers[index])


def create_layer_arrays(
    group: zarr.Group, n_rows: int, dims: Sequence[int], dtype: str, block_rows: int
) -> None:
    """The per-layer arrays: one chunk of (block_rows, D_l) per block, crc32c-checksummed."""
    for i, dim in enumerate(dims):
        group.create_array(
            f"layers/{i}",
            shape=(n_rows, dim),
            chunks=(block_rows, dim),
            dtype=dtype,
            fill_value=np.nan,
            compressors=[Crc32cCodec()],
            dimension_names=("row", "dim"),
            overwrite=True,
        )


class FeatureStore:
    """The Zarr group on disk. Open for reading (default); `write=True` opens an existing store
    for writing, `create=True` also creates a missing one."""

    def __init__(self, path: str | Path, create: bool = False, write: bool = False):
        self.root = Path(path)
        if create and not self._is_store():
            self._create_root()
        if not self.root.exists():
            raise UserError(f"no feature store at {self.root} (run `python -m pipeline extract`)")
        if not self.root.is_dir():
            raise UserError(f"{self.root} is a file, not a feature store")
        if not (self.root / "zarr.json").is_file():
            raise UserError(f"{self.root} is not a feature store (no zarr.json at its top)")
        try:
            mode = "a" if create or write else "r"
            self.group = zarr.open_group(self.root, mode=mode, zarr_format=3)
        except Exception as err:  # zarr raises several types for a damaged group
            raise UserError(f"{self.root} is not a readable feature store: {err}") from err

    def _is_store(self) -> bool:
        return (self.root / "zarr.json").is_file()

    def _create_root(self) -> None:
        """A new store: its folder, then (under the store-wide lock, so that two processes
        creating it at once agree) its zarr.json. A folder holding only the store's lock files
        (a creation that was interrupted) counts as new; any other existing folder does not."""
        if any(p.exists() and not p.is_dir() for p in self.root.parents):
            raise UserError(f"cannot create the store {self.root}: a part of its path is a file")
        if self.root.exists() and (not self.root.is_dir() or self._foreign()):
            return  # refused by the caller: a file, or a folder that is not a store
        with writing(self.root):
            self.root.mkdir(parents=True, exist_ok=True)
        with self.lock("", wait=LAYOUT_WAIT):
            if not self._is_store() and not self._foreign():
                with writing(self.root):
                    zarr.open_group(self.root, mode="a", zarr_format=3)

    def _foreign(self) -> bool:
        """An existing folder with no zarr.json and more in it than the store's lock files (and
        the temporary zarr.json of another process creating the store at this moment)."""
        ours = [p.name == LOCK_DIR or p.name.endswith(".partial") for p in self.root.iterdir()]
        return not self._is_store() and not all(ours)

    @contextmanager
    def lock(self, path: str, wait: float = 0) -> Iterator[None]:
        """Hold the lock of `path` inside the store ("" = the store's own layout: creating
        groups and arrays) while writing it; another writer waits `wait` seconds, then stops
        with one line. The lock files are `{store}/.locks/*.lock`. A store this process cannot
        write (read-only, immutable, another user's) takes no lock: it reads what it needs
        (an extract with nothing left to do succeeds), and its first write is refused in one
        line."""
        name = re.sub(r"[^A-Za-z0-9._-]+", "+", path.strip("/")) or "_layout"
        folder = self.root / LOCK_DIR
        if not os.access(folder if folder.is_dir() else self.root, os.W_OK | os.X_OK):
            yield
            return
        with writing(self.root):
            folder.mkdir(exist_ok=True)
        with writer_lock(self.root / path, wait, lock_path=folder / f"{name}.lock"):
            yield

    def manifest_lock(self, dataset: str, split: str) -> Any:
        """The short lock of one split's manifest, which the image and the text extraction of
        the split both write: a later writer waits for it."""
        return self.lock(f"{dataset}/{split}/manifest.parquet", wait=LAYOUT_WAIT)

    def array_lock(self, path: str) -> Any:
        """The lock of one model's features (`array_path`): one writer at a time."""
        return self.lock(path, wait=0)

    def manifest_path(self, dataset: str, split: str) -> Path:
        return self.root / dataset / split / "manifest.parquet"

    def manifest(self, dataset: str, split: str) -> pd.DataFrame:
        return read_manifest(self.manifest_path(dataset, split))

    def has(self, dataset: str, split: str, modality: str, model: str) -> bool:
        path = self.locate(dataset, split, modality, model)
        return self._exists(path)

    def _exists(self, path: str) -> bool:
        return f"{path}/complete" in self.group or f"{path}/{OLD_ARRAY}" in self.group

    def locate(
        self, dataset: str, split: str, modality: str, model: str, check: bool = False
    ) -> str:
        """The array path of `model`: a name (as `store ls` lists it) or a Hugging Face id is
        its own key; a local model folder is found by the folder the features were extracted
        from (`local_names`): a free name when none was. With `check`, a folder whose
        readable name holds another folder's features is an error saying so."""
        folder = local_model_dir(model)
        if folder is None:
            return array_path(dataset, split, modality, model)
        paths = [array_path(dataset, split, modality, n) for n in local_names(folder)]
        for path in paths:
            if self._exists(path) and self.group[path].attrs.get("model_path", str(folder)) == str(
                folder
            ):
                return path
        if check and self._exists(paths[0]):
            other = self.group[paths[0]].attrs.get("model_path")
            raise UserError(
                f"the {modality} features named {paths[0].rsplit('/', 1)[1]} in {self.root} "
                f"were extracted from {other}, not from {folder}; extract {folder} (it gets a "
                "name of its own) or pass the name of its features (`store ls`)"
            )
        return next((p for p in paths if not self._exists(p)), paths[-1])

    def open(
        self, dataset: str, split: str, modality: str, model: str, check_source: bool = True
    ) -> FeatureArray:
        """The features of (dataset, split, modality, model); refuses features whose source
        differs from the split's manifest (stale after `extract --overwrite` of another model),
        or that were extracted from another local folder of the same name."""
        path = self.locate(dataset, split, modality, model, check=True)
        if f"{path}/{OLD_ARRAY}" in self.group:
            raise old_layout_error(self.root, path)
        if f"{path}/complete" not in self.group:
            raise UserError(
                f"the store {self.root} has no {modality} features of {model} for "
                f"{dataset}/{split}; make them with: python -m pipeline extract --model {model} "
                f"--dataset {dataset} --split {split} --store {self.root}"
            )
        if "layer_names" not in self.group[path].attrs:
            raise UserError(f"{self.root}/{path} was not written by extract (no layer names)")
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
        dims: int | Sequence[int],
        dtype: str,
        block_rows: int,
        attributes: dict[str, Any],
    ) -> FeatureArray:
        """Create (or replace) empty features: one array per layer, of width dims[l] (an int:
        the same width for every layer); every row reads NaN until its block is written."""
        if dtype not in DTYPES:
            raise UserError(f"--dtype must be one of {DTYPES}, got {dtype!r}")
        if n_rows < 1:
            raise UserError(f"{dataset}/{split} has no rows to extract")
        dims = [dims] * len(layer_names) if isinstance(dims, int) else [int(d) for d in dims]
        if len(dims) != len(layer_names):
            raise ValueError(f"{len(layer_names)} layer names but {len(dims)} widths")
        path = self.locate(dataset, split, modality, model)
        block_rows = min(block_rows, n_rows)
        attrs = {
            **attributes,
            "dataset": dataset,
            "split": split,
            "modality": modality,
            "model": model,
            "name": path.rsplit("/", 1)[1],
            "layer_names": list(layer_names),
            "layer_dims": dims,
            "dtype": dtype,
            "block_rows": block_rows,
        }
        n_blocks = -(-n_rows // block_rows)
        with writing(self.root / path):  # the caller holds this array's lock
            if path in self.group:
                del self.group[path]
        # under the layout lock: writers of other arrays may create the same parent groups
        with self.lock("", wait=LAYOUT_WAIT), writing(self.root / path):
            group = self.group.create_group(path, attributes=attrs)
            create_layer_arrays(group, n_rows, dims, dtype, block_rows)
            group.create_array(
                "complete", shape=(n_blocks,), chunks=(1,), dtype="uint8", fill_value=0
            )
        return FeatureArray(group, path, self.root)

    def model_paths(self) -> tuple[list[str], list[str]]:
        """(paths in the per-layer layout, paths in the old (N, L, D) layout)."""
        with warnings.catch_warnings():  # manifests are Parquet files beside the arrays
            warnings.simplefilter("ignore")
            members = [name for name, node in self.group.members(max_depth=None)
                       if isinstance(node, zarr.Array)]  # fmt: skip
        old = sorted(n.rsplit("/", 1)[0] for n in members if n.endswith(f"/{OLD_ARRAY}"))
        new = sorted(
            p
            for p in (n.rsplit("/", 1)[0] for n in members if n.endswith("/complete"))
            if p not in old and "layer_names" in self.group[p].attrs
        )  # fmt: skip  (arrays that extract did not write are not features: left alone)
        old = [p for p in old if "layer_names" in self.group[f"{p}/{OLD_ARRAY}"].attrs]
        return new, old

    def entries(self) -> list[StoreEntry]:
        """Every model's features in the store, sorted by dataset, split, modality, model
        (those in the old layout too, flagged, so that `store ls` can say to migrate them)."""
        new, old = self.model_paths()
        found = []
        for path in [*new, *old]:
            group = self.group[path]
            if path in old:
                data = group[OLD_ARRAY]
                attrs, n_rows = {**data.attrs, "dtype": str(data.dtype)}, data.shape[0]
                dims = [data.shape[2]] * data.shape[1]
            else:
                array = FeatureArray(group, path, self.root)
                attrs, n_rows, dims = array.attrs, array.n_rows, array.layer_dims
                damaged = len(array.damaged_blocks())
            done = np.asarray(group["complete"][:], dtype=bool)
            found.append(
                StoreEntry(
                    dataset=attrs["dataset"],
                    split=attrs["split"],
                    modality=attrs["modality"],
                    # what later commands take: a local folder's store name, else the spec
                    model=attrs["name"] if "model_path" in attrs else attrs["model"],
                    n=n_rows,
                    layer_dims=tuple(dims),
                    dtype=attrs["dtype"],
                    bytes=directory_bytes(self.root / path),
                    blocks_done=int(done.sum()),
                    blocks=done.size,
                    old_layout=path in old,
                    damaged=0 if path in old else damaged,
                )
            )
        return sorted(found, key=lambda e: (e.dataset, e.split, e.modality, e.model))

    def migrate(self) -> list[str]:
        """Convert every model in the old (N, L, D) layout to per-layer arrays, in place, one
        block of one layer in memory at a time; returns the converted paths. The old array is
        deleted last, so an interrupted migration is simply run again."""
        _, old = self.model_paths()
        for path in old:
            with self.array_lock(path), writing(self.root / path):
                self._migrate(path)
        return old

    def _migrate(self, path: str) -> None:
        group = self.group[path]
        data = group[OLD_ARRAY]
        n_rows, n_layers, dim = data.shape
        attrs = dict(data.attrs)
        block_rows = int(attrs["block_rows"])
        create_layer_arrays(group, n_rows, [dim] * n_layers, str(data.dtype), block_rows)
        for layer in range(n_layers):
            target = group[f"layers/{layer}"]
            for start in range(0, n_rows, block_rows):
                rows = slice(start, min(start + block_rows, n_rows))
                target[rows] = data[rows, layer, :]
        group.attrs.update({**attrs, "layer_dims": [dim] * n_layers})
        del group[OLD_ARRAY]
