"""A FAISS inner-product index of a split's images, built from the store (the run's image head
applied to the stored features: nothing is encoded again), and search by text or image.

Exact search (`IndexFlatIP`) up to `exact_max` rows; past it an IVF index (4 sqrt(N) lists),
whose recall@10 against exact search is measured on sampled rows and recorded. The index
directory holds `index.faiss` (FAISS's own binary format), `rows.parquet` (id, path, label of
each indexed row) and `index.json`, which names the run whose heads built it: search refuses
a model of another run.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from stages.evaluate import project
from stages.heads import load_run
from stages.model import run_id
from stages.vectors import unit_rows_f32
from store import FeatureStore, UserError, image_table

INDEX_FILE, ROWS_FILE, META_FILE = "index.faiss", "rows.parquet", "index.json"
EXACT_MAX = 2_000_000  # rows searched exactly; above, IVF
RECALL_QUERIES = 1000


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
    """Index the split's usable images under the run's image head; returns index.json's content."""
    import faiss

    config, image_head, _ = load_run(run_dir)
    dataset = dataset or config.get("dataset")
    if not dataset:
        raise UserError(f"{run_dir}/config.json names no dataset; pass --dataset")
    store = FeatureStore(store_path)
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
    out = Path(out)
    if out.exists() and not (out / META_FILE).is_file():
        raise UserError(f"{out} exists and is not an index; choose another --out")
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        faiss.write_index(index, str(tmp / INDEX_FILE))
        table.to_parquet(tmp / ROWS_FILE, index=False)
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2) + "\n")
        shutil.rmtree(out, ignore_errors=True)
        os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return meta


def open_index(index_dir: str | Path):
    """(index, rows table, index.json) of an index directory."""
    import faiss

    index_dir = Path(index_dir)
    if not (index_dir / META_FILE).is_file():
        raise UserError(f"{index_dir} is not an index (no {META_FILE}); build one with `index`")
    meta = json.loads((index_dir / META_FILE).read_text())
    return (
        faiss.read_index(str(index_dir / INDEX_FILE)),
        pd.read_parquet(index_dir / ROWS_FILE),
        meta,
    )


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


def check_model_matches(meta: dict[str, Any], model_run_id: str, index_dir: str | Path) -> None:
    if meta["run_id"] != model_run_id:
        raise UserError(
            f"the index {index_dir} was built by run {meta['run']}, and the model given is of "
            "another run: its embeddings live in another space; search with that run or "
            "build the index again with this one"
        )
