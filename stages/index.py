"""A FAISS inner-product index of a split's images, built from the store (the run's image head
applied to the stored features: nothing is encoded again), and search by text or image.

Exact search (`IndexFlatIP`) up to `exact_max` rows; past it an IVF index (4 sqrt(N) lists),
whose recall@10 against exact search is measured on sampled rows and recorded. The index
directory holds `index.faiss` (FAISS's own binary format), `rows.parquet` (id, path, label of
each indexed row) and `index.json`, which names the run whose heads built it (search refuses
a model of another run) and records the SHA-256 of the other two files.

The directory is an artifact of kind `INDEX` (store.artifacts): `build_index` writes it under
a unique temporary sibling while holding its lock, and `open_index` is its one reader, which
checks the schema and the checksums before FAISS reads a byte.
"""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.evaluate import project, require_run_keys
from stages.heads import load_run
from stages.model import run_id
from stages.vectors import unit_rows_f32
from store import FeatureStore, UserError, image_table
from store.artifacts import ArtifactKind, read_description, write_artifact
from store.io import check_output

INDEX_FILE, ROWS_FILE, META_FILE = "index.faiss", "rows.parquet", "index.json"
ROW_COLUMNS = ("image_row", "id", "path", "label_name")
EXACT_MAX = 2_000_000  # rows searched exactly; above, IVF
RECALL_QUERIES = 1000
INDEX = ArtifactKind(
    name="index",
    description=META_FILE,
    remake="python -m pipeline index --run RUN --split SPLIT --out {path}",
    files=(INDEX_FILE, ROWS_FILE),
    keys={
        "run": str,
        "run_id": str,
        "store": str,
        "dataset": str,
        "split": str,
        "image_model": str,
        "image_layer": str,
        "rows": int,
        "dim": int,
        "kind": str,
        "recall_at_10_vs_exact": (float, type(None)),
    },
)


def index_command(run: str | Path, dataset: str | None, split: str, out: str | Path) -> str:
    """The command that builds this index again (the run's own dataset when `dataset` is None)."""
    given = f" --dataset {dataset}" if dataset else ""
    return f"python -m pipeline index --run {run}{given} --split {split} --out {out}"


def make_index(embeddings: np.ndarray, exact_max: int = EXACT_MAX, seed: int = 0):
    """(index, description, recall@10 vs exact or None) for unit rows, chosen by their count."""
    import faiss

    n, dim = embeddings.shape
    if n <= exact_max:
        index = faiss.IndexFlatIP(dim)
        index.add(embeddings)
        return index, "IndexFlatIP (exact)", None
    n_lists = int(4 * np.sqrt(n))
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, n_lists, faiss.METRIC_INNER_PRODUCT)
    rng = np.random.default_rng(seed)
    sample = rng.choice(n, size=min(n, 64 * n_lists), replace=False)
    index.train(embeddings[np.sort(sample)])
    index.add(embeddings)
    index.nprobe = 32
    queries = embeddings[rng.choice(n, size=min(n, RECALL_QUERIES), replace=False)]
    return (
        index,
        f"IndexIVFFlat ({n_lists} lists, nprobe 32)",
        recall_at(index, embeddings, queries),
    )


def recall_at(index, embeddings: np.ndarray, queries: np.ndarray, k: int = 10) -> float:
    """Mean fraction of the exact top k that `index` returns for the queries."""
    import faiss

    _, exact = faiss.knn(queries, embeddings, k, metric=faiss.METRIC_INNER_PRODUCT)
    _, found = index.search(queries, k)
    return float(np.mean([len(set(a) & set(b)) / k for a, b in zip(exact, found, strict=True)]))


def build_index(
    run_dir: str | Path,
    store_path: str | Path,
    dataset: str | None,
    split: str,
    out: str | Path,
    exact_max: int = EXACT_MAX,
) -> dict[str, Any]:
    """Index the split's usable images under the run's image head; returns index.json's content.

    `out` is checked before any work and replaced only by a complete index, under its lock (a
    second `index` into the same --out stops with one line)."""
    import faiss

    out = check_output(out, "dir", "--out")
    if out.is_dir() and any(out.iterdir()) and not (out / META_FILE).is_file():
        raise UserError(f"--out {out} exists and is not an index; choose another --out")
    config, image_head, _ = load_run(run_dir)
    require_run_keys(config, run_dir, ("image_model", "image_layer"))
    dataset = dataset or config.get("dataset")
    if not dataset:
        raise UserError(f"{run_dir}/config.json names no dataset; pass --dataset")
    store = FeatureStore(store_path)
    if store.manifest_path(dataset, split).is_file():
        images = image_table(store.manifest(dataset, split))
        if images.empty:
            raise UserError(
                f"{dataset}/{split} is a text-only split (no images, e.g. class prompts): "
                "nothing to index; give a split with images, e.g. --split test"
            )
    array = store.open(dataset, split, "image", config["image_model"])
    recorded = (config.get("store_fingerprint") or {}).get("image", {}).get("model_fingerprint")
    if recorded and array.attrs.get("model_fingerprint") != recorded:
        raise UserError(
            f"{array.path} was extracted with other weights of {config['image_model']} than "
            f"run {run_dir} was trained on; extract it again with the same model"
        )
    images = image_table(store.manifest(dataset, split))
    usable = images[~images["skipped"]]
    if usable.empty:
        raise UserError(f"{dataset}/{split} has no usable images to index")
    values = array.read_layer(config["image_layer"])
    rows = np.asarray(usable["image_row"])
    what = f"image features {array.path} layer {config['image_layer']}"
    embeddings = unit_rows_f32(project(image_head, values[rows], what).numpy())
    index, kind, recall = make_index(embeddings, exact_max)
    meta = {
        "run": str(Path(run_dir).resolve()),
        "run_id": run_id(run_dir),
        "store": str(Path(store_path).resolve()),
        "dataset": dataset,
        "split": split,
        "image_model": config["image_model"],
        "image_layer": config["image_layer"],
        "rows": len(rows),
        "dim": int(embeddings.shape[1]),
        "kind": kind,
        "recall_at_10_vs_exact": recall,
    }
    table = pd.DataFrame(
        {
            "image_row": rows,
            "id": usable["sample_id"].astype(str).to_numpy(),
            "path": usable["image_path"].astype(str).to_numpy(),
            "label_name": usable["label_name"].astype(str).to_numpy(),
        }
    )

    def fill(folder: Path) -> dict[str, Any]:
        faiss.write_index(index, str(folder / INDEX_FILE))
        table.to_parquet(folder / ROWS_FILE, index=False)
        return meta

    return write_artifact(INDEX, out, fill)


def _index_kind(index_dir: Path) -> ArtifactKind:
    """INDEX, whose remake hint names the run, dataset and split that index.json still names."""
    try:
        meta = json.loads((index_dir / META_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return INDEX
    if not isinstance(meta, dict):
        return INDEX
    run, dataset, split = (meta.get(key) for key in ("run", "dataset", "split"))
    if not isinstance(split, str):
        return INDEX
    run = run if isinstance(run, str) else "RUN"
    dataset = dataset if isinstance(dataset, str) else None
    return replace(INDEX, remake=index_command(run, dataset, split, "{path}"))


def open_index(index_dir: str | Path):
    """(index, rows table, index.json) of an index directory, through the one reader of the
    INDEX kind: the files present, index.json's keys and types, the recorded checksums, then
    the FAISS file and the rows table read and checked against each other."""
    import faiss

    index_dir = Path(index_dir)
    if index_dir.is_dir() and not {META_FILE, INDEX_FILE, ROWS_FILE} & set(os.listdir(index_dir)):
        raise UserError(
            f"{index_dir} is not an index (no {META_FILE}, {INDEX_FILE} or {ROWS_FILE}); build "
            f"one with `python -m pipeline index --run RUN --out {index_dir}`"
        )
    kind = _index_kind(index_dir)
    meta = read_description(kind, index_dir)
    try:
        index = faiss.read_index(str(index_dir / INDEX_FILE))
    except RuntimeError as err:  # FAISS's own (multi-line) error for a truncated or foreign file
        problem = "truncated, or not a FAISS index"
        raise kind.error(index_dir, index_dir / INDEX_FILE, problem) from err
    try:
        rows = pd.read_parquet(index_dir / ROWS_FILE)
    except Exception as err:  # pyarrow's error types for a damaged file
        raise kind.error(index_dir, index_dir / ROWS_FILE, "not a readable Parquet file") from err
    missing = [c for c in ROW_COLUMNS if c not in rows.columns]
    if missing:
        raise kind.error(index_dir, index_dir / ROWS_FILE, f"has no column {missing[0]}")
    if not (index.ntotal == len(rows) == meta["rows"]) or index.d != meta["dim"]:
        raise kind.error(
            index_dir,
            index_dir / META_FILE,
            f"does not match its files ({meta['rows']} rows of dim {meta['dim']} recorded; "
            f"{INDEX_FILE} holds {index.ntotal} of dim {index.d}, {ROWS_FILE} {len(rows)} rows)",
        )
    return index, rows, meta


def search(index, rows: pd.DataFrame, queries: np.ndarray, k: int = 10) -> list[pd.DataFrame]:
    """Per query row, its top k indexed images: rank, score, id, path, label_name."""
    scores, found = index.search(unit_rows_f32(queries), min(k, index.ntotal))
    results = []
    for query_scores, query_found in zip(scores, found, strict=True):
        keep = query_found >= 0
        hits = rows.iloc[query_found[keep]].reset_index(drop=True)
        hits.insert(0, "score", query_scores[keep])
        hits.insert(0, "rank", np.arange(1, int(keep.sum()) + 1))
        results.append(hits)
    return results


def check_model_matches(
    meta: dict[str, Any], model_run_id: str, index_dir: str | Path, model_path: str | Path
) -> None:
    """Refuse a model whose heads are not those that built the index: the index's own run
    re-trained since (build the index again), or another run (search with the index's run)."""
    if meta["run_id"] == model_run_id:
        return
    again = index_command(meta["run"], meta["dataset"], meta["split"], index_dir)
    if Path(model_path).resolve() == Path(meta["run"]):
        raise UserError(
            f"run {meta['run']} was trained again after the index {index_dir} was built: its "
            f"heads changed, so the index is stale; build it again with `{again}`"
        )
    rebuild = index_command(model_path, meta["dataset"], meta["split"], index_dir)
    raise UserError(
        f"the index {index_dir} was built by run {meta['run']}, and {model_path} is another run "
        "(its embeddings live in another space); search with --run of the index's run, or "
        f"build the index with this run: `{rebuild}`"
    )


def index_model_path(meta: dict[str, Any], index_dir: str | Path, run: str | Path | None) -> Path:
    """The model to search the index with: `run` when given, else the index's run, which must
    still be where the index recorded it (a moved run is given with --run)."""
    if run is not None:
        return Path(run)
    recorded = Path(meta["run"])
    if not recorded.is_dir():
        raise UserError(
            f"the run {recorded} that built the index {index_dir} is not there (moved or "
            "deleted?); give its new place with --run DIR"
        )
    return recorded
