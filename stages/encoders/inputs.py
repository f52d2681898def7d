"""Raw inputs to an encoder: which rows of a data source to embed, how each is fetched and
prepared (in DataLoader workers), collated and batched. The one path of both extraction
(`stages.extract`) and the aligned model (`stages.model`).

A batch is `(rows, collated inputs or None, errors)`: a row that cannot be read is reported
with its message, not raised, so that the caller decides (stop with its name, or skip it).
"""

from __future__ import annotations

import resource
import sys
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from PIL import Image
from torch.utils.data import DataLoader, Dataset

from stages.encoders.base import Encoder
from store.errors import UserError
from store.manifest import image_table

if TYPE_CHECKING:
    from stages.datasets import Source


class ArgumentError(UserError, ValueError):
    """A bad argument value given to the Python API (a ValueError) or a command (one line)."""


class ArgumentTypeError(UserError, TypeError):
    """An argument of the wrong type given to the Python API (a TypeError)."""


Batch = tuple[np.ndarray, dict[str, torch.Tensor] | None, list[str]]
# DataLoader workers hand batches over through shared-memory files: under a file-size limit
# (`ulimit -f`) below this, a batch's file cannot grow and the worker's hand-over fails while
# the main process waits for it forever
WORKER_FILE_LIMIT = 1 << 30
SAID: set[str] = set()  # the fall-backs already reported


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


def workers_unusable() -> str:
    """Why DataLoader worker processes cannot hand batches over here ('' when they can)."""
    soft, _ = resource.getrlimit(resource.RLIMIT_FSIZE)
    if soft != resource.RLIM_INFINITY and soft < WORKER_FILE_LIMIT:
        return f"the file-size limit (ulimit -f) is {soft} bytes"
    return ""


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
    collated, in DataLoader workers when it can work: under a small file-size limit they are
    loaded in this process from the start, and when the workers die (shared memory full, as in
    Docker) the rest is loaded in this process; both are said through `log`."""
    dataset = RowDataset(fetch, encoder.prepare, list(names))
    batches = list(batches)
    reason = workers_unusable() if num_workers else ""
    if reason:
        if reason not in SAID:  # once per process, not once per modality
            log(f"{reason}: loading the inputs in this process, not in {num_workers} workers")
            SAID.add(reason)
        num_workers = 0
    done = 0
    while done < len(batches):
        loader = DataLoader(
            dataset,
            batch_sampler=batches[done:],
            num_workers=num_workers,
            collate_fn=make_collate(encoder),
            pin_memory=pin_memory,
        )
        try:
            for batch in loader:
                yield batch
                done += 1
        except RuntimeError as err:
            if not num_workers or "DataLoader worker" not in str(err):
                raise
            first = str(err).strip().splitlines()[0][:200]
            log(f"the input loading workers died ({first}); loading the rest in this process")
            num_workers = 0


def even_batches(n_rows: int, batch_size: int) -> list[list[int]]:
    """Rows 0..n_rows-1 in batches of batch_size (the last one shorter)."""
    return [list(range(s, min(s + batch_size, n_rows))) for s in range(0, n_rows, batch_size)]


# -- images as users hold them -----------------------------------------------------------------
ImageInput = Image.Image | str | Path | np.ndarray | torch.Tensor


def checked_size(image: Image.Image, what: str) -> Image.Image:
    if image.width < 1 or image.height < 1:
        raise ArgumentError(f"{what} has no pixels ({image.width}x{image.height})")
    return image


def array_to_image(pixels: np.ndarray, what: str, channels_first: bool) -> Image.Image:
    """An HWC (numpy) or CHW (torch) array, uint8 0..255 or float 0..1, 1, 3 or 4 channels, or
    HW grayscale -> an RGB PIL image."""
    if pixels.ndim == 3 and channels_first:
        pixels = np.moveaxis(pixels, 0, -1)
    layout = "CHW" if channels_first else "HWC"
    if pixels.ndim == 3 and pixels.shape[2] == 1:
        pixels = pixels[:, :, 0]
    if pixels.ndim not in (2, 3) or (pixels.ndim == 3 and pixels.shape[2] not in (3, 4)):
        shape = tuple(pixels.shape if not channels_first else np.moveaxis(pixels, -1, 0).shape)
        raise ArgumentError(
            f"{what} must be an image array of shape {layout} with 1, 3 or 4 channels "
            f"(or HW grayscale), not shape {shape}"
        )
    if pixels.shape[0] < 1 or pixels.shape[1] < 1:
        raise ArgumentError(f"{what} has no pixels ({pixels.shape[1]}x{pixels.shape[0]})")
    if pixels.dtype == np.uint8:
        values = pixels
    elif np.issubdtype(pixels.dtype, np.floating):
        if not np.isfinite(pixels).all():
            raise ArgumentError(f"{what} has NaN or infinite pixel values")
        if pixels.min() < 0 or pixels.max() > 1:
            raise ArgumentError(
                f"{what}: float pixel values must lie in 0..1 (uint8 arrays hold 0..255), "
                f"got {float(pixels.min()):g}..{float(pixels.max()):g}"
            )
        values = np.round(pixels.astype(np.float64) * 255).astype(np.uint8)
    elif pixels.dtype == np.bool_:
        values = pixels.astype(np.uint8) * 255
    else:
        raise ArgumentTypeError(
            f"{what}: pixels must be uint8 (0..255) or float (0..1), not {pixels.dtype}"
        )
    return Image.fromarray(np.ascontiguousarray(values)).convert("RGB")


def as_image(item: Any, what: str, open_file: Callable[[Path], Image.Image]) -> Image.Image:
    """One image as a user may hold it: a PIL image, a file path, a numpy array (HWC) or a torch
    tensor (CHW) -> a PIL image; anything else a UserError naming `what`."""
    if isinstance(item, Image.Image):
        return checked_size(item, what)
    if isinstance(item, str | Path):
        return checked_size(open_file(Path(item)), f"{what} ({item})")
    if isinstance(item, torch.Tensor):
        return array_to_image(item.detach().cpu().numpy(), what, channels_first=True)
    if isinstance(item, np.ndarray):
        return array_to_image(item, what, channels_first=False)
    raise ArgumentTypeError(
        f"{what} must be a PIL image, an image path, a numpy array (HWC) or a torch tensor "
        f"(CHW), not {type(item).__name__}"
    )
