"""Stored image-text pairs as training data: which pairs (`PairSpec`), checked and opened
(`open_pairs`), split into train / validation, and served in batches by a pair source.

Rows reach a training loop through a pair source: in memory (`MemoryPairs`), or, when the
chosen layers of the pairs exceed `memory_cap`, streamed from the store (`StorePairs`): each
epoch's shuffled batches are cut into windows that fit the cap, and each window is gathered with
one pass over the store blocks it touches. Both sources yield the same batches, so for one seed
the weights are the same.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from store import FeatureArray, FeatureStore, UserError, pair_rows

# the attributes of a stored array that say where its features came from (config.json keeps them)
PROVENANCE_KEYS = (
    "model_spec",
    "model_path",
    "model_id",
    "revision",
    "pooling",
    "weights",
    "source",
    "source_fingerprint",
    "model_fingerprint",
    "precision",
)


@dataclass(frozen=True)
class PairSpec:
    """Which stored pairs: a feature store, one dataset split, and the two models as extracted."""

    store: str | Path
    dataset: str
    split: str
    image_model: str
    text_model: str

    def arrays(self) -> tuple[FeatureStore, FeatureArray, FeatureArray]:
        """(store, image array, text array); nothing of the features is read."""
        store = FeatureStore(self.store)
        image = store.open(self.dataset, self.split, "image", self.image_model)
        text = store.open(self.dataset, self.split, "text", self.text_model)
        return store, image, text


def batch_plan(n: int, batch_size: int, *, drop_ragged: bool = False) -> tuple[int, int]:
    """(steps per epoch, batch size): the one batch plan of every trainer.

    Gradient training (default): every pair in every epoch, in batches of equal size (+-1) no
    larger than batch_size; no tiny ragged batch with few negatives, no pair left out.
    drop_ragged (CSA's R_S refinement): batches of exactly min(batch_size, n) pairs, the ragged
    end of each epoch dropped."""
    batch = min(batch_size, n)
    if drop_ragged:
        return n // batch, batch
    steps = math.ceil(n / batch)
    return steps, math.ceil(n / steps)


def epoch_batches(
    n: int, steps: int, batch: int, generator: torch.Generator, *, drop_ragged: bool = False
) -> list[np.ndarray]:
    """The index batches of one epoch of `batch_plan(n, ...) = (steps, batch)`: a shuffle of the
    n pairs (drawn from `generator`; none when one batch holds every pair, whose order matters
    to neither loss), cut into `steps` near-equal parts, or with drop_ragged into `steps`
    batches of exactly `batch`."""
    full = steps == 1 and batch == n
    order = torch.arange(n) if full else torch.randperm(n, generator=generator)
    if drop_ragged:
        return [order[b * batch : (b + 1) * batch].numpy() for b in range(steps)]
    return [part.numpy() for part in torch.tensor_split(order, steps)]


def finite_rows(values: np.ndarray, what: str) -> np.ndarray:
    """`values` unchanged, or a UserError naming the rows with NaN or inf."""
    bad = ~np.isfinite(values).all(axis=1)
    if bad.any():
        rows = np.flatnonzero(bad)
        raise UserError(
            f"{what} has {bad.sum()} row(s) with NaN or inf (first: {rows[:5].tolist()}); "
            "extract them again (float16 overflow: --dtype float32 --overwrite)"
        )
    return values


def provenance(attrs: dict[str, Any]) -> dict[str, Any]:
    """Where a stored array's features came from: model, revision, pooling, source, hashes."""
    return {k: attrs[k] for k in PROVENANCE_KEYS if k in attrs}


@dataclass
class StoredPairs:
    """The two stored arrays, the chosen layer of each and the rows that pair up (not read)."""

    image: FeatureArray
    text: FeatureArray
    image_layer: int
    text_layer: int
    image_rows: np.ndarray
    text_rows: np.ndarray
    info: dict[str, Any]

    @property
    def dims(self) -> tuple[int, int]:
        return self.image.layer_dims[self.image_layer], self.text.layer_dims[self.text_layer]

    def nbytes(self, n_pairs: int) -> int:
        """Memory of n pairs of the chosen layers as float32 (what in-memory training holds)."""
        return n_pairs * sum(self.dims) * 4

    def what(self, modality: str) -> str:
        array, layer = (
            (self.image, self.image_layer) if modality == "image" else (self.text, self.text_layer)
        )
        return f"{modality} features {array.path} layer {array.layer_names[layer]}"

    def load(self) -> tuple[np.ndarray, np.ndarray]:
        """(image, text): both chosen layers in memory as float32, one row per pair."""
        image = self.image.read_layer(self.image_layer)[self.image_rows]
        text = self.text.read_layer(self.text_layer)[self.text_rows]
        return finite_rows(image, self.what("image")), finite_rows(text, self.what("text"))


def open_pairs(spec: PairSpec, *, image_layer: str, text_layer: str) -> StoredPairs:
    """Check the arrays, layers and manifest; nothing of the features is read yet."""
    store, image, text = spec.arrays()
    image_index, text_index = image.layer_index(image_layer), text.layer_index(text_layer)
    image_rows, text_rows = pair_rows(store.manifest(spec.dataset, spec.split))
    where = f"{spec.dataset}/{spec.split}"
    if len(image_rows) == 0:
        raise UserError(f"{where} has no image-text pairs to train on")
    for array, rows in ((image, image_rows), (text, text_rows)):
        array.require_complete()
        if rows.max() >= array.shape[0]:
            raise UserError(
                f"the manifest of {where} points past the {array.shape[0]} rows of "
                f"{array.path}; extract this split again with --overwrite"
            )
    info = {
        "image_layer": image.layer_names[image_index],
        "text_layer": text.layer_names[text_index],
        "image_layer_index": image_index,
        "text_layer_index": text_index,
        "store_fingerprint": {"image": provenance(image.attrs), "text": provenance(text.attrs)},
    }
    return StoredPairs(image, text, image_index, text_index, image_rows, text_rows, info)


# -- pair sources: where a training loop gets its batches --------------------------------------
class MemoryPairs:
    """Paired float32 rows held in memory; `take` yields the rows of each index array."""

    def __init__(self, image: np.ndarray | Tensor, text: np.ndarray | Tensor):
        self.image = torch.as_tensor(np.ascontiguousarray(image, dtype=np.float32))
        self.text = torch.as_tensor(np.ascontiguousarray(text, dtype=np.float32))
        if len(self.image) != len(self.text):
            raise UserError(
                f"{len(self.image)} image rows but {len(self.text)} text rows; they must pair up"
            )
        for x, what in ((self.image, "image"), (self.text, "text")):
            if not torch.isfinite(x).all():
                raise UserError(f"the {what} training features hold NaN or inf")

    def __len__(self) -> int:
        return len(self.image)

    @property
    def dims(self) -> tuple[int, int]:
        return self.image.shape[1], self.text.shape[1]

    def take(self, batches: Sequence[np.ndarray]) -> Iterator[tuple[Tensor, Tensor]]:
        for idx in batches:
            idx = torch.as_tensor(idx)
            yield self.image[idx], self.text[idx]


class StorePairs:
    """Pairs `subset` (indices into the stored pairs) read from the store as they are needed.

    `take` gathers consecutive batches in windows of at most `window_rows` rows, each with one
    pass over the store blocks the window touches (one block of one layer read at a time), so
    memory holds about two windows (the one in use, the next) whatever the size of the store."""

    def __init__(self, pairs: StoredPairs, subset: np.ndarray, window_rows: int):
        self.pairs, self.subset, self.window_rows = pairs, np.asarray(subset), max(1, window_rows)

    def __len__(self) -> int:
        return len(self.subset)

    @property
    def dims(self) -> tuple[int, int]:
        return self.pairs.dims

    def take(self, batches: Sequence[np.ndarray]) -> Iterator[tuple[Tensor, Tensor]]:
        p, i = self.pairs, 0
        while i < len(batches):
            group = [np.asarray(batches[i])]  # at least one batch, however small the window
            while (
                i + len(group) < len(batches)
                and sum(map(len, group)) + len(batches[i + len(group)]) <= self.window_rows
            ):
                group.append(np.asarray(batches[i + len(group)]))
            pairs = self.subset[np.concatenate(group)]
            image = gather_rows(p.image, p.image_layer, p.image_rows[pairs], p.what("image"))
            text = gather_rows(p.text, p.text_layer, p.text_rows[pairs], p.what("text"))
            image, text = torch.from_numpy(image), torch.from_numpy(text)
            start = 0
            for idx in group:
                yield image[start : start + len(idx)], text[start : start + len(idx)]
                start += len(idx)
            i += len(group)


PairSource = MemoryPairs | StorePairs
# what the trainers accept: (image, text) arrays or a pair source
PairData = tuple[np.ndarray, np.ndarray] | PairSource


def as_source(data: PairData | None) -> PairSource | None:
    """A pair source from arrays (held in memory) or a source as it is; None stays None."""
    return MemoryPairs(*data) if isinstance(data, tuple) else data


def gather_rows(array: FeatureArray, layer: int, rows: np.ndarray, what: str) -> np.ndarray:
    """array[rows, layer] as float32 in the order of `rows`, reading one store block of that
    layer at a time (one inner chunk), so memory holds the result plus one block."""
    out = np.empty((len(rows), array.layer_dims[layer]), dtype=np.float32)
    blocks = rows // array.block_rows
    order = np.argsort(blocks, kind="stable")
    found, starts = np.unique(blocks[order], return_index=True)
    for block, lo, hi in zip(found, starts, [*starts[1:], len(order)]):
        span = array.block_slice(int(block))
        where = order[lo:hi]
        values = array.read_rows(layer, span)
        out[where] = values[rows[where] - span.start]
    return finite_rows(out, what)


def parse_memory_cap(text: str | int) -> int:
    """Bytes from `0` (no cap), `123456`, `512MiB`, `2GiB`, `1.5GB`..."""
    from dask.utils import parse_bytes

    try:
        cap = parse_bytes(str(text).strip()) if str(text).strip() else 0
    except (ValueError, TypeError) as err:
        raise UserError(
            f"--memory-cap must be a size such as 2GiB, 512MB or 0 (no cap), got {text!r}"
        ) from err
    if cap < 0:
        raise UserError(f"--memory-cap must be >= 0 (0 = no cap), got {text!r}")
    return int(cap)


def pair_sources(
    pairs: StoredPairs, train: np.ndarray, val: np.ndarray, memory_cap: int = 0
) -> tuple[PairSource, PairSource]:
    """(train, validation) sources: in memory when the chosen layers of these pairs fit
    `memory_cap` bytes (0 = no cap), else streamed from the store in windows within it."""
    need = pairs.nbytes(len(train) + len(val))
    if memory_cap <= 0 or need <= memory_cap:
        image, text = pairs.load()
        return MemoryPairs(image[train], text[train]), MemoryPairs(image[val], text[val])
    window = memory_cap // (2 * pairs.nbytes(1))  # the window in use and the next one
    return StorePairs(pairs, train, window), StorePairs(pairs, val, window)


def split_pairs(
    image_rows: np.ndarray, n_pairs: int, val_fraction: float, seed: int, min_val: int = 2
) -> tuple[np.ndarray, np.ndarray]:
    """(train, validation) pair indices: a seeded subset of n_pairs (0 = all), then a seeded
    hold-out of about val_fraction of it, whole images at a time (its captions stay together).
    No hold-out when val_fraction of the subset is under min_val pairs (too few to choose
    weights on): every pair trains."""
    total = len(image_rows)
    if n_pairs > total:
        raise UserError(f"--n-pairs {n_pairs} exceeds the {total} pairs available")
    rng = np.random.default_rng(seed)
    chosen = rng.permutation(total)[: n_pairs or total]
    # at least 2 validation pairs: a CLIP loss needs a negative
    n_val = 0 if val_fraction == 0 else max(2, round(val_fraction * len(chosen)))
    if n_val < min_val:
        n_val = 0
    groups = image_rows[chosen]
    val_groups: set[int] = set()
    count = 0
    for group in rng.permutation(np.unique(groups)):
        if count >= n_val:
            break
        val_groups.add(int(group))
        count += int((groups == group).sum())
    is_val = np.isin(groups, list(val_groups))
    train, val = np.sort(chosen[~is_val]), np.sort(chosen[is_val])
    if len(train) < 2:
        raise UserError(
            f"only {len(train)} training pair(s) after holding out {len(val)} for validation; "
            "CLIP needs at least 2: raise --n-pairs or lower --val-fraction"
        )
    return train, val


# -- data beyond the training pairs: unpaired samples for R_S, extra pairs from another dataset --
def parse_where(text: str, flag: str) -> tuple[str, str]:
    """`DATASET/SPLIT` -> (dataset, split): exactly one dataset and one split."""
    parts = [part.strip() for part in str(text).strip().split("/")]
    if len(parts) != 2 or not all(parts):
        raise UserError(
            f"{flag} takes DATASET/SPLIT (one dataset and one extracted split, e.g. "
            f"digits/train), got {text!r}"
        )
    return parts[0], parts[1]


def require_images(store: FeatureStore, dataset: str, split: str, flag: str) -> None:
    """A UserError when DATASET/SPLIT is a text-only split (class prompts: its manifest lists
    no image), rather than a hint to extract an image model on it."""
    if not store.manifest_path(dataset, split).is_file():
        return  # the store's own error names what to extract
    if (store.manifest(dataset, split)["image_row"] < 0).all():
        raise UserError(
            f"{flag} {dataset}/{split} is a text-only split (its manifest lists no images, "
            "e.g. class prompts); name a split of image-text pairs or images"
        )


def load_unpaired(spec: PairSpec, modality: str, where: str, layer: str, flag: str) -> np.ndarray:
    """Every stored `modality` row of `where` (DATASET/SPLIT, extracted with spec's model of that
    modality) at `layer`, as float32; rows of images skipped at extraction (NaN) left out."""
    dataset, split = parse_where(where, flag)
    model = spec.image_model if modality == "image" else spec.text_model
    store = FeatureStore(spec.store)
    if modality == "image":
        require_images(store, dataset, split, flag)
    array = store.open(dataset, split, modality, model)
    values = array.read_layer(array.layer_index(layer))
    values = values[np.isfinite(values).all(axis=1)]
    if len(values) < 2:
        raise UserError(f"{flag} {where}: {len(values)} usable {modality} row(s); R_S needs 2+")
    return values


def load_extra_pairs(
    spec: PairSpec, where: str, n: int, layers: tuple[str, str], seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) of n pairs (0 = all) drawn with `seed` from `where` (DATASET/SPLIT, same
    models), at the layers of the same names: the in-domain pairs added to the training pairs."""
    dataset, split = parse_where(where, "--extra-pairs")
    require_images(FeatureStore(spec.store), dataset, split, "--extra-pairs")
    extra_spec = PairSpec(spec.store, dataset, split, spec.image_model, spec.text_model)
    pairs = open_pairs(extra_spec, image_layer=layers[0], text_layer=layers[1])
    total = len(pairs.image_rows)
    if n > total:
        raise UserError(f"--extra-n {n} exceeds the {total} pairs of {where}")
    chosen = np.sort(np.random.default_rng(seed).permutation(total)[: n or total])
    image, text = pairs.load()
    return image[chosen], text[chosen]
