"""Raw inputs to an encoder: which rows of a data source to embed, how each is fetched and
prepared (in DataLoader workers), collated and batched. The one path of both extraction
(`stages.extract`) and the aligned model (`stages.model`).

A batch is `(rows, collated inputs or None, errors)`: a row that cannot be read is reported
with its message, not raised, so that the caller decides (stop with its name, or skip it).
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, Dataset, get_worker_info

from stages.encoders.base import Encoder
from store.errors import UserError
from store.manifest import image_table

if TYPE_CHECKING:
    from stages.datasets import Source


Batch = tuple[np.ndarray, dict[str, torch.Tensor] | None, list[str]]
# seconds without a batch from the DataLoader workers before they count as stuck (a batch that
# cannot reach the main process, e.g. through full shared memory, would otherwise wait forever)
LOADER_TIMEOUT = 300.0
FAILED_WORKERS: list[str] = []  # why the workers failed in this process (then not tried again)


class RowDataset(Dataset):
    """Row r -> (r, prepared input or None, error message); a bad image is reported, not raised,
    so the main process decides (stop with its name, or skip it with --skip-bad)."""

    def __init__(
        self, fetch: Callable[[int], Any], prepare: Callable[[Any], Any], names: list[str]
    ):
        self.fetch, self.prepare, self.names = fetch, prepare, names

    def __len__(self) -> int:
        return len(self.names)

    def __getitem__(self, row: int) -> tuple[int, Any, str]:
        try:
            return row, self.prepare(self.fetch(row)), ""
        except Exception as err:  # PIL raises many types for a corrupt file
            return row, None, f"{type(err).__name__}: {err}"


def make_collate(encoder: Encoder) -> Callable[[list[tuple[int, Any, str]]], Batch]:
    def collate(items: list[tuple[int, Any, str]]) -> Batch:
        rows = np.array([row for row, _, _ in items])
        errors = [err for _, _, err in items]
        good = [value for _, value, err in items if not err]
        return rows, (encoder.collate(good) if good else None), errors

    return collate


def limit_manifest(manifest: pd.DataFrame, limit: int) -> pd.DataFrame:
    """The first `limit` images with all their captions (or the first `limit` texts)."""
    if limit <= 0:
        return manifest
    if (manifest["image_row"] >= 0).any():
        kept = manifest[manifest["image_row"] < limit]
    else:
        kept = manifest.head(limit)
    return kept.assign(text_row=np.arange(len(kept))).reset_index(drop=True)


def rows_to_embed(source: Source, manifest: pd.DataFrame, modality: str):
    """(fetch(row), row names) for the rows of the feature array of this modality."""
    if modality == "image":
        images = image_table(manifest)
        if source.load_image is None or images.empty:
            raise UserError("this split has no images (it is text-only); extract a text model")
        return source.load_image, images["image_path"].tolist()
    captions = manifest["caption"].tolist()
    if not any(captions):
        raise UserError("this split has no captions (an image folder); extract an image model")
    return captions.__getitem__, [f"text row {i}" for i in range(len(captions))]


class LoaderFailed(Exception):
    """The DataLoader's worker processes died, timed out or could not hand over a batch."""


def shared_collate(collate: Callable[[list], Batch]) -> Callable[[list], Batch]:
    """`collate`, then, in a worker process, the batch's tensors moved into shared memory by
    the worker itself: were they moved while being sent (torch's queue feeder thread), a full
    /dev/shm or `ulimit -f` would be printed and the batch dropped, and the main process would
    wait for it forever; raised here, the failure reaches the main process as an error."""

    def collate_shared(items: list) -> Batch:
        rows, batch, errors = collate(items)
        if batch is not None and get_worker_info() is not None:
            for value in batch.values():
                if isinstance(value, torch.Tensor):
                    value.share_memory_()
        return rows, batch, errors

    return collate_shared


def loader_batches(loader: DataLoader) -> Iterator[Any]:
    """The loader's batches; with worker processes, their failures (a killed worker, a
    timeout, shared memory refused) are a LoaderFailed carrying torch's last line."""
    if loader.num_workers == 0:
        yield from loader
        return
    try:
        iterator = iter(loader)
    except (RuntimeError, OSError) as err:  # workers could not be started
        raise LoaderFailed(last_line(err)) from err
    while True:
        try:
            item = next(iterator)
        except StopIteration:
            return
        except (RuntimeError, OSError) as err:
            shutdown = getattr(iterator, "_shutdown_workers", None)
            if shutdown is not None:  # now, not when the traceback is collected
                shutdown()
            raise LoaderFailed(last_line(err)) from err
        yield item


def last_line(err: BaseException) -> str:
    """The last non-empty line of an error (torch puts the worker's own error there)."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return (lines[-1] if lines else type(err).__name__)[:200]


def say(message: str) -> None:
    print(message, file=sys.stderr)


def row_batches(
    encoder: Encoder,
    fetch: Callable[[int], Any],
    names: Sequence[str],
    batches: Sequence[list[int]],
    num_workers: int = 0,
    pin_memory: bool = False,
    log: Callable[[str], None] = say,
) -> Iterator[Batch]:
    """The batches of rows `batches` (lists of row numbers), each fetched, prepared and
    collated, in `num_workers` DataLoader workers. When the workers fail (LoaderFailed: killed,
    stuck, or shared memory refused under a full /dev/shm or `ulimit -f`), the remaining
    batches load in this process, said once through `log`; later calls in this process then
    load in it from the start, saying nothing more."""
    dataset = RowDataset(fetch, encoder.prepare, list(names))
    batches = list(batches)

    def loader(todo: list[list[int]], workers: int) -> DataLoader:
        return DataLoader(
            dataset,
            batch_sampler=todo,
            num_workers=workers,
            collate_fn=shared_collate(make_collate(encoder)),
            pin_memory=pin_memory,
            timeout=LOADER_TIMEOUT if workers else 0,
        )

    done = 0
    if num_workers > 0 and not FAILED_WORKERS:
        try:
            for batch in loader_batches(loader(batches, num_workers)):
                yield batch
                done += 1
            return
        except LoaderFailed as err:
            FAILED_WORKERS.append(str(err))
            log(
                f"warning: the DataLoader workers failed ({err}); loading the remaining "
                f"{len(batches) - done} batches in this process instead (as with --num-workers 0)"
            )
    yield from loader(batches[done:], 0)


def even_batches(n_rows: int, batch_size: int) -> list[list[int]]:
    """Rows 0..n_rows-1 in batches of batch_size (the last one shorter)."""
    return [list(range(s, min(s + batch_size, n_rows))) for s in range(0, n_rows, batch_size)]
