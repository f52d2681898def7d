"""What the server does, without HTTP: the model and the index loaded once, and the answers to
search, classify, embed and info as plain Python values.

Loading goes through the checked readers (`AlignedModel.load`, `stages.index.open_index`,
`check_model_matches`), so a damaged run or index is one `UserError` before anything listens.
The model and FAISS run one request at a time (`Service.lock`): the fast tokenizers are not safe
to share between threads, and on a few cores parallel forwards only compete for them. Text
searches that arrive together are batched instead (`Batcher`): one forward and one pass over the
index answer all of them.
"""

from __future__ import annotations

import json
import queue
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
from PIL import Image

from stages.evaluate import METRICS, metrics_protocol
from stages.heads import load_run
from stages.index import check_model_matches, open_index, search
from stages.model import AlignedModel, run_id
from store import FeatureStore, UserError


@dataclass(frozen=True)
class Limits:
    """The caps on what one request may ask (reported by /api/info)."""

    max_upload_bytes: int = 10 * 1024 * 1024
    max_image_pixels: int = 40_000_000
    max_k: int = 100
    max_labels: int = 100
    max_texts: int = 64
    max_text_chars: int = 1000
    max_batch: int = 32  # text queries encoded and searched together


class BadRequest(ValueError):
    """Input the client must fix: the message is the whole answer (HTTP 400)."""


class SearchOff(LookupError):
    """A search on a server started without an index (HTTP 404)."""


@dataclass
class Index:
    faiss: Any
    rows: pd.DataFrame  # the index's rows.parquet plus `row` (position) and `caption`
    meta: dict[str, Any]
    path: Path
    captions: bool  # whether the store's manifest gave the captions


def image_captions(meta: dict[str, Any], rows: pd.DataFrame) -> pd.Series | None:
    """Each indexed image's first caption, from the split's manifest in the store the index
    records; None when the store is not there or its manifest no longer matches the index
    (an id that differs: no caption rather than another image's)."""
    try:
        manifest = FeatureStore(meta["store"]).manifest(meta["dataset"], meta["split"])
    except (UserError, OSError):
        return None
    manifest = manifest[manifest["image_row"] >= 0]
    first = manifest.drop_duplicates("image_row").set_index("image_row")
    ids = first["sample_id"].astype(str).reindex(rows["image_row"]).to_numpy()
    if not np.array_equal(ids, rows["id"].astype(str).to_numpy()):
        return None
    captioned = manifest[manifest["caption"].astype(str).str.strip() != ""]
    captions = captioned.drop_duplicates("image_row").set_index("image_row")["caption"]
    return captions.astype(str).reindex(rows["image_row"]).fillna("").reset_index(drop=True)


def load_index(index_dir: str | Path) -> Index:
    faiss_index, rows, meta = open_index(index_dir)
    captions = image_captions(meta, rows)
    rows = rows.assign(
        row=np.arange(len(rows)),
        caption="" if captions is None else captions.to_numpy(),
    )
    return Index(faiss_index, rows, meta, Path(index_dir), captions is not None)


def run_protocol(run_dir: Path) -> dict[str, Any]:
    """What the run's metrics.json records about how it was evaluated (the protocol, the
    prompts), when there is one; {} otherwise."""
    try:
        metrics = json.loads((run_dir / METRICS).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(metrics, dict):
        return {}
    zero_shot = metrics.get("zero_shot") if isinstance(metrics.get("zero_shot"), dict) else {}
    found = {"protocol": metrics_protocol(metrics), "prompts": zero_shot.get("prompts")}
    found = {k: v for k, v in found.items() if v}
    run = metrics.get("run") if isinstance(metrics.get("run"), dict) else {}
    evaluated = {k: run[k] for k in ("eval_dataset", "split", "prompts_split") if k in run}
    return {**found, **({"evaluated_on": evaluated} if evaluated else {})}


class Batcher:
    """Items submitted from many threads, handled in batches by one worker thread: whatever
    arrived while the previous batch ran, up to `max_batch`, goes into the next."""

    def __init__(self, handle: Callable[[list[Any]], list[Any]], max_batch: int):
        self.handle, self.max_batch = handle, max_batch
        self.waiting: queue.Queue = queue.Queue()
        self.worker = threading.Thread(target=self.work, daemon=True, name="serve-batcher")
        self.worker.start()

    def submit(self, *item: Any) -> Any:
        done: Future = Future()
        self.waiting.put((item, done))
        return done.result()  # the worker's exception, if any, is raised here

    def close(self) -> None:
        """Stop the worker once the items already submitted are answered."""
        self.waiting.put(None)

    def work(self) -> None:
        while True:
            first = self.waiting.get()
            if first is None:
                return
            batch = [first]
            while len(batch) < self.max_batch and not self.waiting.empty():
                item = self.waiting.get_nowait()
                if item is None:  # answer this batch, then stop
                    self.waiting.put(None)
                    break
                batch.append(item)
            try:
                answers = self.handle([item for item, _ in batch])
            except Exception as err:  # each waiting request gets it, the worker lives on
                for _, done in batch:
                    done.set_exception(err)
                continue
            for (_, done), answer in zip(batch, answers, strict=True):
                done.set_result(answer)


class Service:
    """The model and (optionally) the index, loaded once; every answer a plain value."""

    def __init__(
        self,
        run: str | Path,
        index: str | Path | None = None,
        device: str = "auto",
        limits: Limits | None = None,
        precision: str = "auto",
    ):
        self.run = Path(run).resolve()
        self.limits = limits or Limits()
        self.index = load_index(index) if index is not None else None
        if self.index:  # a damaged run, then another run's index: refused before any encoder
            load_run(self.run)
            check_model_matches(self.index.meta, run_id(self.run), self.index.path, self.run)
        self.model = AlignedModel.load(self.run, device, precision=precision)
        if self.index:
            check_model_matches(self.index.meta, self.model.run_id, self.index.path, self.run)
        self.dim = self.model.output_dim("text")
        self.protocol = run_protocol(self.run)
        self.lock = threading.Lock()
        self.batcher = Batcher(self.search_texts, self.limits.max_batch)

    def close(self) -> None:
        """Stop the batching thread (which holds the model) once its queue is answered."""
        self.batcher.close()

    # -- checks of the request's values -------------------------------------------------------
    def checked_k(self, k: int) -> int:
        if not 1 <= k <= self.limits.max_k:
            raise BadRequest(f"k must be between 1 and {self.limits.max_k} (the server's cap)")
        return k

    def checked_text(self, text: str, what: str) -> str:
        if not text.strip():
            raise BadRequest(f"{what} is empty; give some words, e.g. a handwritten seven")
        if len(text) > self.limits.max_text_chars:
            raise BadRequest(
                f"{what} has {len(text)} characters; the server takes at most "
                f"{self.limits.max_text_chars}"
            )
        return text

    def checked_texts(self, texts: list[str]) -> list[str]:
        if not 1 <= len(texts) <= self.limits.max_texts:
            raise BadRequest(f"give 1 to {self.limits.max_texts} texts, not {len(texts)}")
        return [self.checked_text(t, f"texts[{i}]") for i, t in enumerate(texts)]

    def checked_labels(self, labels: list[str]) -> list[str]:
        """Class names: one form field each, or one field split at commas and new lines (as
        classify's --labels); the model's own checks then refuse doubles and empties."""
        if len(labels) == 1:
            labels = [n for part in labels[0].splitlines() for n in part.split(",")]
        labels = [n.strip() for n in labels if n.strip()]
        if not 1 <= len(labels) <= self.limits.max_labels:
            raise BadRequest(f"give 1 to {self.limits.max_labels} labels, not {len(labels)}")
        for i, name in enumerate(labels):
            self.checked_text(name, f"labels[{i}]")
        return labels

    # -- answers ------------------------------------------------------------------------------
    def results(self, hits: pd.DataFrame) -> list[dict[str, Any]]:
        return [
            {
                "rank": int(hit.rank),
                "score": float(hit.score),
                "id": str(hit.id),
                "label_name": str(hit.label_name),
                "caption": str(hit.caption),
                "image_url": f"/images/{int(hit.row)}",
            }
            for hit in hits.itertuples(index=False)
        ]

    def search_text(self, query: str, k: int) -> list[dict[str, Any]]:
        """Text queries arriving together are encoded and searched as one batch (one pass over
        the index for all of them): under load, throughput grows with the clients."""
        query, k = self.checked_text(query, "the query q"), self.checked_k(k)
        self.require_index()
        return self.results(self.batcher.submit(query, k))

    def search_texts(self, batch: list[tuple[str, int]]) -> list[pd.DataFrame]:
        """The top k of each (text, k): one forward and one FAISS call for the batch."""
        with self.lock:
            vectors = self.model.encode_text([text for text, _ in batch]).numpy()
            found = search(self.index.faiss, self.index.rows, vectors, max(k for _, k in batch))
        return [hits.head(k) for hits, (_, k) in zip(found, batch, strict=True)]

    def search_image(self, image: Image.Image, k: int) -> list[dict[str, Any]]:
        k = self.checked_k(k)
        self.require_index()
        with self.lock:
            vector = self.model.encode_image(image).numpy()
            return self.results(search(self.index.faiss, self.index.rows, vector, k)[0])

    def require_index(self) -> None:
        if self.index is None:
            raise SearchOff("search is off: the server was started without --index")

    def classify(self, image: Image.Image, labels: list[str]) -> list[dict[str, Any]]:
        labels = self.checked_labels(labels)
        with self.lock:
            result = self.model.classify(image, labels, k=len(labels))
        return [
            {"rank": r + 1, "label": labels[int(c)], "probability": float(p)}
            for r, (p, c) in enumerate(zip(result.top_probs[0], result.top_classes[0], strict=True))
        ]

    def embed_texts(self, texts: list[str]) -> np.ndarray:
        texts = self.checked_texts(texts)
        with self.lock:
            return self.model.encode_text(texts).numpy()

    def embed_image(self, image: Image.Image) -> np.ndarray:
        with self.lock:
            return self.model.encode_image(image).numpy()

    def info(self) -> dict[str, Any]:
        model = self.model
        index = None
        if self.index is not None:
            meta = self.index.meta
            index = {
                "path": str(self.index.path),
                **{k: meta[k] for k in ("rows", "dim", "kind", "dataset", "split")},
                "recall_at_10_vs_exact": meta["recall_at_10_vs_exact"],
                "captions": self.index.captions,
            }
        return {
            "run": str(self.run),
            "run_id": model.run_id,
            "models": {side: model.encoders[side].spec for side in ("image", "text")},
            "layers": {side: model.config[f"{side}_layer"] for side in ("image", "text")},
            "blocks_run": {side: list(model.blocks[side]) for side in ("image", "text")},
            "head": model.config.get("head"),
            "dim": self.dim,
            "temperature": model.temperature,
            "device": str(model.device),
            "precision": model.precision,
            "index": index,
            **({"protocol": self.protocol} if self.protocol else {}),
            "limits": asdict(self.limits),
        }


def elapsed_ms(start: float) -> float:
    return round(1000 * (time.perf_counter() - start), 2)
