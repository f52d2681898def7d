"""Stage 1: run a frozen encoder once over a split and store every layer's pooled embedding.

Rows are processed block by block (a block is one chunk of each layer); batches never cross a
block, so a block's bytes depend only on the block, and a run that was killed and started again
skips the blocks already marked complete and ends byte-identical to an uninterrupted run.

One writer per array: the run holds the array's lock (store.features) from before it touches
the array until its last block is written; a second run of the same array stops with one line.
DataLoader workers that die, time out or cannot use shared memory (a full /dev/shm, `ulimit
-f`) are said in one line and the remaining blocks are loaded in this process; a write the
machine refuses is one line, and no block is marked complete that was not written.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Sampler
from tqdm import tqdm

from stages.datasets import load_source
from stages.device import resolve_device
from stages.encoders import Encoder, load_encoder
from stages.encoders.inputs import Batch, limit_manifest, row_batches, rows_to_embed
from stages.encoders.precision import place_encoder, resolve_precision
from stages.progress import progress_bar
from stages.prompts import PromptSpec
from store import FeatureArray, FeatureStore, UserError, fingerprint, write_manifest
from store.features import local_model_dir, model_key, width_summary
from store.io import check_output
from store.manifest import normalise_manifest, with_file_stats

SOURCE_COLUMNS = ["image_row", "sample_id", "image_path", "caption", "label", "label_name"]


@dataclass
class ExtractResult:
    array: FeatureArray
    rows: int  # rows embedded by this run (0 when it was already complete)
    seconds: float  # time in the embedding loop (model loading excluded)


@dataclass
class ExtractOptions:
    batch_size: int = 64
    block_rows: int = 512
    dtype: str = "float16"
    device: str = "auto"
    precision: str = "auto"  # fp32 | bf16 | auto (stages.encoders.precision); resolved when planned
    num_workers: int = 2
    limit: int = 0
    overwrite: bool = False
    skip_bad: bool = False
    revision: str | None = None
    trust_remote_code: bool = False
    weights: str = ""  # a local weights file for a timm:NAME architecture
    progress: bool = True
    scheduler: str = ""  # a dask scheduler address or local:N; empty = this process
    retries: int = 2  # re-runs of a failed cluster task (a killed worker's are re-run anyway)
    name: str = ""  # the features' name in the store (default: the model spec, or for a local
    # folder its name, made unique: store.features.local_names)
    prompts: PromptSpec = field(default_factory=PromptSpec)  # how the `prompts` split is made


class BlockBatches(Sampler[list[int]]):
    """Batches of at most batch_size rows that never cross a block boundary."""

    def __init__(self, array: FeatureArray, blocks: list[int], batch_size: int):
        self.array, self.blocks, self.batch_size = array, blocks, batch_size

    def __iter__(self) -> Iterator[list[int]]:
        for block in self.blocks:
            rows = self.array.block_slice(block)
            for start in range(rows.start, rows.stop, self.batch_size):
                yield list(range(start, min(start + self.batch_size, rows.stop)))

    def __len__(self) -> int:
        spans = [self.array.block_slice(b) for b in self.blocks]
        return sum(-(-(s.stop - s.start) // self.batch_size) for s in spans)


def sync_manifest(
    store: FeatureStore, dataset: str, split: str, manifest: pd.DataFrame, overwrite: bool
) -> pd.DataFrame:
    """Write the manifest, or keep the stored one when it describes the same samples (under
    the split's manifest lock: image and text runs of one split may run at once)."""
    with store.manifest_lock(dataset, split):
        return _sync_manifest(store, dataset, split, manifest, overwrite)


def _sync_manifest(
    store: FeatureStore, dataset: str, split: str, manifest: pd.DataFrame, overwrite: bool
) -> pd.DataFrame:
    path = store.manifest_path(dataset, split)
    if path.is_file():
        stored = store.manifest(dataset, split)
        if stored[SOURCE_COLUMNS].equals(manifest[SOURCE_COLUMNS]):
            changed = changed_files(stored, manifest)
            if not changed:
                return stored
            if not overwrite:
                raise UserError(
                    f"{len(changed)} image file(s) of {dataset}/{split} changed (size or "
                    f"modification time) since they were extracted, e.g. {changed[0]}; pass "
                    "--overwrite to extract them again"
                )
        elif not overwrite:
            raise UserError(
                f"the samples of {dataset}/{split} differ from those already in the store "
                "(another source, --limit, file contents or prompt --templates/--classnames); "
                "pass --overwrite to replace them, "
                "or give this data another --dataset name"
            )
    return write_manifest(path, manifest)


def changed_files(stored: pd.DataFrame, current: pd.DataFrame) -> list[str]:
    """Image paths whose size or modification time differ from the stored manifest's (a store
    made before file stats recorded none: nothing to compare)."""
    before, now = stored["image_stat"], current["image_stat"]
    differs = (before != "") & (before != now)
    return current.loc[differs.to_numpy(), "image_path"].unique().tolist()


def open_array(
    store: FeatureStore,
    dataset: str,
    split: str,
    encoder: Encoder,
    n_rows: int,
    attrs: dict[str, Any],
    opts: ExtractOptions,
) -> FeatureArray:
    """The existing array when it matches this source and model, else a new empty one."""
    name = opts.name or encoder.spec
    if store.has(dataset, split, encoder.modality, name) and not opts.overwrite:
        array = store.open(dataset, split, encoder.modality, name, check_source=False)
        wanted = {**attrs, "dtype": opts.dtype}
        keys = ["source_fingerprint", "model_fingerprint", "precision", "dtype"]
        if "precision" not in array.attrs and array.complete:
            keys.remove("precision")  # complete before precisions were recorded: nothing to mix
        changed = [k for k in keys if array.attrs.get(k) != wanted[k]]
        if array.n_rows != n_rows or array.layer_dims != encoder.layer_dims:
            changed.append("shape")
        if changed:
            raise UserError(
                f"{array.path} in the store was extracted with a different "
                f"{', '.join(changed)}; pass --overwrite to replace it"
            )
        return array
    return store.create(
        dataset,
        split,
        encoder.modality,
        name,
        n_rows,
        encoder.layer_names,
        encoder.layer_dims,
        opts.dtype,
        opts.block_rows,
        attrs,
    )


@dataclass
class ExtractJob:
    """What the coordinator knows after planning: the array (created), the manifest (synced)
    and the blocks still to embed."""

    store: FeatureStore
    array: FeatureArray
    encoder: Encoder
    manifest: pd.DataFrame
    fetch: Callable[[int], Any]
    names: list[str]
    todo: list[int]


def load_inputs(
    source_spec: str, split: str, model: str, opts: ExtractOptions
) -> tuple[pd.DataFrame, Encoder, Callable[[int], Any], list[str], dict | None]:
    """The split's manifest (limited), the encoder, how to fetch each row to embed, and the
    prompts' record (stages.prompts; None for other splits): what the coordinator and every
    cluster worker load alike."""
    source = load_source(source_spec, split, opts.prompts)
    manifest = with_file_stats(limit_manifest(normalise_manifest(source.manifest), opts.limit))
    encoder = load_encoder(model, opts.revision, opts.trust_remote_code, opts.weights or None)
    fetch, names = rows_to_embed(source, manifest, encoder.modality)
    return manifest, encoder, fetch, names, source.prompts


def plan_extraction(
    store_path: str,
    dataset: str,
    split: str,
    source_spec: str,
    model: str,
    opts: ExtractOptions,
    held: ExitStack,
) -> ExtractJob:
    """Load the source and the model, take the array's lock (held by `held` until the caller
    is done writing), sync the manifest, create (or reopen) the array, and list the incomplete
    blocks. Only this coordinator creates arrays and writes attributes."""
    manifest, encoder, fetch, names, prompts = load_inputs(source_spec, split, model, opts)

    store = FeatureStore(store_path, create=True)
    locked = store.locate(dataset, split, encoder.modality, opts.name or encoder.spec)
    held.enter_context(store.array_lock(locked))
    manifest = sync_manifest(store, dataset, split, manifest, opts.overwrite)
    folder = local_model_dir(model)
    attrs = {
        "model_spec": model,  # what loads the encoder again (stages.model), whatever the name
        **({"model_path": str(folder)} if folder else {}),  # readers check they get this folder
        "model_id": encoder.model_id,
        "revision": encoder.revision,
        "pooling": encoder.pooling,
        "weights": opts.weights,
        "source": source_spec,
        "source_fingerprint": fingerprint(manifest, encoder.modality),
        "model_fingerprint": encoder.fingerprint(),
        "precision": opts.precision,  # resolved by `extract`: never two precisions in one array
        **({"prompts": prompts} if prompts else {}),  # the templates and names (evaluate's)
    }
    array = open_array(store, dataset, split, encoder, len(names), attrs, opts)
    if array.path != locked:  # a local folder's free name was taken meanwhile
        raise UserError(f"another process is writing {store.root}/{locked}; run the command again")
    if local_model_dir(model) and array.attrs["name"] != model_key(model):
        print(f"{model} is stored as {array.attrs['name']} (another folder has its name)")
    todo = [b for b, done in enumerate(array.completed_blocks()) if not done]
    damaged = sorted(array.damaged_blocks())  # files deleted or truncated since written
    if damaged:
        print(f"{array.path}: {len(damaged)} completed blocks have missing or truncated files; "
              "extracting them again")  # fmt: skip
        todo = sorted(set(todo) | set(damaged))
    if todo and len(todo) < array.n_blocks:
        leftovers = array.remove_partial_files()
        print(
            f"{array.path}: resuming, {array.n_blocks - len(todo)} of {array.n_blocks} "
            f"blocks already done" + (f", removed {leftovers} partial files" if leftovers else "")
        )
    return ExtractJob(store, array, encoder, manifest, fetch, names, todo)


def block_rows_total(array: FeatureArray, blocks: list[int]) -> int:
    return sum(array.block_slice(b).stop - array.block_slice(b).start for b in blocks)


def extract(
    store_path: str, dataset: str, split: str, source_spec: str, model: str, opts: ExtractOptions
) -> ExtractResult:
    """Extract every layer of `model` over one split into the store; resumes where it stopped.
    With opts.scheduler the blocks run as tasks on a dask cluster (stages.cluster). The array's
    lock is held throughout: a second writer of it stops with one line."""
    opts = replace(opts, precision=planned_precision(opts))  # a bad one: before any write
    store = Path(store_path)
    manifest = store / dataset / split / "manifest.parquet"
    if not store.exists() or opts.overwrite or not manifest.is_file():  # it surely writes
        check_output(store, "dir", "--store")  # before any work
    with ExitStack() as held:  # the array's lock, taken by plan_extraction
        job = plan_extraction(store_path, dataset, split, source_spec, model, opts, held)
        array, encoder = job.array, job.encoder
        if not job.todo:
            print(f"{array.path}: already complete ({array.n_rows} rows), nothing to do")
            if encoder.modality == "image":  # an interrupted --skip-bad run finished without it
                record_skipped(job.store, dataset, split, job.manifest, array)
            return ExtractResult(array, 0, 0.0)
        n_todo = block_rows_total(array, job.todo)
        if opts.scheduler:
            seconds = extract_on_cluster(job, store_path, dataset, split, source_spec, model, opts)
        else:
            device = resolve_device(opts.device)
            place_encoder(encoder, device, opts.precision)
            started = time.perf_counter()
            embed_blocks(array, encoder, job.fetch, job.names, job.todo, device, opts)
            seconds = time.perf_counter() - started
        if encoder.modality == "image":  # also when an interrupted --skip-bad run is resumed
            record_skipped(job.store, dataset, split, job.manifest, array)
        print(
            f"{array.path}: {n_todo} rows x {len(encoder.layer_names)} layers of width "
            f"{width_summary(encoder.layer_dims)} "
            f"in {seconds:.1f} s ({n_todo / seconds:.1f} rows/s, {opts.precision})"
        )
        return ExtractResult(array, n_todo, seconds)


def planned_precision(opts: ExtractOptions) -> str:
    """The one precision of this run's array (fp32 or bf16). On a cluster, `auto` is decided by
    the coordinator's hardware (its GPU unless --device cpu), so that every worker computes in
    the same precision; pass --precision for a cluster of other machines."""
    if opts.scheduler:
        cuda = opts.device != "cpu" and torch.cuda.is_available()
        return resolve_precision(opts.precision, torch.device("cuda" if cuda else "cpu"))
    return resolve_precision(opts.precision, resolve_device(opts.device))


def embed_blocks(
    array: FeatureArray,
    encoder: Encoder,
    fetch: Callable[[int], Any],
    names: list[str],
    blocks: list[int],
    device: torch.device,
    opts: ExtractOptions,
) -> None:
    """Embed and write the given blocks: the one code path of both the single process and
    every cluster task (there with one block, num_workers=0 and no progress bar)."""
    batches = row_batches(
        encoder,
        fetch,
        names,
        list(BlockBatches(array, blocks, opts.batch_size)),
        num_workers=opts.num_workers,
        pin_memory=device.type == "cuda",
        log=lambda message: tqdm.write(message, file=sys.stderr),  # above the progress bar
    )
    run_blocks(array, encoder, batches, names, device, opts, block_rows_total(array, blocks))


# -- the same blocks as tasks on a dask cluster -------------------------------------------------
@dataclass
class WorkerJob:
    """Everything a worker needs to embed any block of one array; built once per worker."""

    array: FeatureArray
    encoder: Encoder
    fetch: Callable[[int], Any]
    names: list[str]
    device: torch.device
    opts: ExtractOptions


def load_worker_job(
    store_path: str, dataset: str, split: str, source_spec: str, model: str, opts: ExtractOptions
) -> WorkerJob:
    """Runs on each worker (LoadOnce plugin): the model, the source and the array the
    coordinator created, refusing a worker that sees other samples or other weights."""
    manifest, encoder, fetch, names, _ = load_inputs(source_spec, split, model, opts)
    array = FeatureStore(store_path, write=True).open(
        dataset, split, encoder.modality, opts.name or encoder.spec, check_source=False
    )
    seen = {
        "source_fingerprint": fingerprint(manifest, encoder.modality),
        "model_fingerprint": encoder.fingerprint(),
        "precision": opts.precision,  # resolved by the coordinator
    }
    differs = [k for k, v in seen.items() if array.attrs.get(k) != v]
    if differs or array.n_rows != len(names):
        raise UserError(
            f"a dask worker sees other {' and '.join(differs) or 'row counts'} than the "
            f"coordinator for {array.path}; give every worker the same data, model and store"
        )
    device = resolve_device(opts.device)
    place_encoder(encoder, device, opts.precision)
    # daemonic worker processes cannot start DataLoader workers; one bar is on the client
    worker_opts = replace(opts, num_workers=0, progress=False)
    return WorkerJob(array, encoder, fetch, names, device, worker_opts)


def embed_block_task(block: int, plugin_name: str) -> str:
    """One cluster task: embed and write one block (its chunks, this task their only writer).
    A bad input comes back as its message, not raised: retrying it would not help."""
    from stages.cluster import loaded

    job: WorkerJob = loaded(plugin_name)
    try:
        embed_blocks(job.array, job.encoder, job.fetch, job.names, [block], job.device, job.opts)
    except UserError as err:
        return str(err)
    return ""


def extract_on_cluster(
    job: ExtractJob,
    store_path: str,
    dataset: str,
    split: str,
    source_spec: str,
    model: str,
    opts: ExtractOptions,
) -> float:
    """Run the incomplete blocks as tasks on the cluster; seconds from the first task submitted
    (model loading on the workers excluded) to the last block written."""
    from stages.cluster import connect, plugin, run_tasks

    array = job.array
    store_path = str(Path(store_path).resolve())  # workers may run in another directory
    name = f"extract-{array.path}"
    with (
        connect(opts.scheduler) as client,
        plugin(client, name, load_worker_job, store_path, dataset, split, source_spec, model, opts),
    ):
        started = time.perf_counter()
        errors = run_tasks(
            client,
            embed_block_task,
            job.todo,
            name,
            desc=f"extract {job.encoder.spec}",
            unit=" img" if job.encoder.modality == "image" else " txt",
            weights=[block_rows_total(array, [b]) for b in job.todo],
            retries=opts.retries,
            progress=opts.progress,
        )
        seconds = time.perf_counter() - started
    first = next((e for e in errors if e), "")
    if first:
        raise UserError(first)
    array.remove_partial_files()  # no writer is left: temporaries of killed workers can go
    array.require_complete()
    return seconds


def run_blocks(
    array: FeatureArray,
    encoder: Encoder,
    loader: Iterable[Batch],
    names: list[str],
    device: torch.device,
    opts: ExtractOptions,
    n_todo: int,
) -> None:
    """The hot loop: embed batches into a block buffer on the device, write full blocks.

    Nothing waits for the device inside a block, so the GPU queue stays full while the
    DataLoader prepares the next batches; a full block is copied to the host once and written
    by a background thread while the next block is embedded (one write in flight at a time).
    """
    # one (rows, sum of widths) buffer per block: the layers side by side, split on the host
    offsets = np.cumsum([0, *encoder.layer_dims])
    unit = " img" if encoder.modality == "image" else " txt"
    bar = progress_bar(
        total=n_todo,
        unit=unit,
        desc=f"extract {encoder.spec}",
        enabled=opts.progress,
        smoothing=0.1,
    )
    block, buffer, filled, writing = -1, None, 0, None
    # the bar closes before any error is printed, so the error stays on a line of its own
    with bar, ThreadPoolExecutor(max_workers=1) as writer:
        for rows, batch, errors in loader:
            bad = [i for i, err in enumerate(errors) if err]
            if bad and not opts.skip_bad:
                i = bad[0]
                raise UserError(
                    f"cannot read image {names[rows[i]]}: {errors[i]} "
                    "(fix or remove it, or pass --skip-bad to skip such images)"
                )
            if int(rows[0]) // array.block_rows != block:  # batches never cross blocks
                block = int(rows[0]) // array.block_rows
                span = array.block_slice(block)
                buffer = torch.full(
                    (span.stop - span.start, int(offsets[-1])), float("nan"), device=device
                )
                filled, skipped = 0, np.zeros(len(buffer), dtype=bool)
            skipped[rows[bad] - span.start] = True
            if batch is not None:
                # rows of a batch are consecutive: a slice, unless images were skipped
                # (an index tensor copied to the GPU would wait for it)
                lo, hi = int(rows[0]) - span.start, int(rows[-1]) + 1 - span.start
                good = (
                    slice(lo, hi) if not bad else torch.as_tensor(np.delete(rows, bad) - span.start)
                )
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                with torch.inference_mode():  # in the weights' dtype (place_encoder)
                    buffer[good] = torch.cat(encoder.embed(batch), dim=1).float()
            filled += len(rows)
            if filled == len(buffer):
                # checked and cast to the store's dtype on the device: half the bytes to copy
                finite = torch.isfinite(buffer).all(1).cpu().numpy()
                check_finite(finite, skipped, encoder.spec, span)
                values = buffer.to(getattr(torch, str(array.dtype))).cpu().numpy()
                values = np.split(values, offsets[1:-1], axis=1)
                if writing is not None:
                    writing.result()
                writing = writer.submit(array.write_block, block, values)
            bar.update(len(rows))
        if writing is not None:
            writing.result()


def check_finite(finite: np.ndarray, skipped: np.ndarray, model: str, span: slice) -> None:
    """Every embedded row of a block must be finite (skipped rows are NaN on purpose)."""
    broken = ~finite & ~skipped
    if broken.any():
        row = span.start + int(np.flatnonzero(broken)[0])
        raise UserError(
            f"{model} produced NaN or infinite features (row {row}); "
            "the model or its inputs are broken"
        )


def record_skipped(
    store: FeatureStore, dataset: str, split: str, manifest: pd.DataFrame, array: FeatureArray
) -> None:
    """Mark in the manifest the images whose rows hold NaN (unreadable, skipped by this run or
    by an earlier, interrupted --skip-bad run); the manifest is rewritten only when it changes."""
    nan_rows = np.flatnonzero(np.isnan(array.read_rows(-1, slice(None))[:, 0]))
    skipped = manifest["image_row"].isin(nan_rows)
    if skipped.equals(manifest["skipped"]):
        return
    if skipped.any():
        print(f"skipped {len(nan_rows)} unreadable images; recorded in the manifest")
    with store.manifest_lock(dataset, split):
        write_manifest(store.manifest_path(dataset, split), manifest.assign(skipped=skipped))
