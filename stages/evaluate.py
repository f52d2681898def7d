"""Stage 3: zero-shot classification and retrieval of a trained run, from stored features.

The metric functions are pure (embeddings in, percentages out) and use cosine similarity.

Ties: a query's hit at K is its expected value when tied scores are ordered uniformly at
random, computed exactly (no sampling), so a result never depends on the order of the
candidates and never credits a tie to the query. Collapsed (constant) embeddings score
chance, not 100 %; identical texts (digits' templated captions repeat across images) share
the credit of a tie instead of all winning or all losing it.

For one query, with s* the score of its best relevant candidate: g irrelevant candidates
score above s*, e irrelevant and r relevant ones score exactly s*. The first relevant item
of the tied block lands behind X of its e irrelevant items, P(X >= m) = C(e, m) / C(e + r, m),
so P(hit at K) = P(g + X < K) = 1 - C(e, K - g) / C(e + r, K - g) (0 when g >= K).
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch

from stages.heads import load_run
from stages.prompts import protocol_summary
from stages.vectors import ArrayLike, as_index, as_matrix, class_embeddings, unit_rows
from store import FeatureStore, UserError, image_table, pair_rows, write_text_atomic

# score matrices are built this many elements at a time (64 MiB of float32)
METRICS = "metrics.json"  # a run's metrics, written by `evaluate` (and `table`)
CHUNK_ELEMENTS = 1 << 24


# -- pure metrics -----------------------------------------------------------------------------
def tie_counts(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    query_group: torch.Tensor,
    candidate_group: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per query (g, e, r): irrelevant candidates scoring above its best relevant one,
    irrelevant ones tied with it, and relevant ones tied with it (r >= 1).

    Candidate c is relevant to query q when candidate_group[c] == query_group[q]. Scores are
    inner products (normalise first for cosine). Every query must have a relevant candidate.
    """
    step = max(1, CHUNK_ELEMENTS // max(candidates.shape[0], 1))
    counts = []
    for start in range(0, queries.shape[0], step):
        scores = queries[start : start + step] @ candidates.T
        relevant = query_group[start : start + step, None] == candidate_group[None, :]
        best = scores.masked_fill(~relevant, -torch.inf).amax(dim=1, keepdim=True)
        tied = scores == best
        counts.append(
            torch.stack(
                [
                    ((scores > best) & ~relevant).sum(1),
                    (tied & ~relevant).sum(1),
                    (tied & relevant).sum(1),
                ]
            )
        )
    g, e, r = torch.cat(counts, dim=1) if counts else torch.zeros(3, 0, dtype=torch.long)
    return g, e, r


def hit_probability(g: torch.Tensor, e: torch.Tensor, r: torch.Tensor, k: int) -> torch.Tensor:
    """P(some relevant candidate is in the top k) with ties in random order (float64)."""
    g, e, r = g.double(), e.double(), r.double()
    m = torch.minimum((k - g).clamp(min=0), e)  # irrelevant tied items that still fit before
    # log C(e, m) - log C(e + r, m); lgamma is exact enough for counts up to millions
    log_ratio = (
        torch.lgamma(e + 1) - torch.lgamma(e - m + 1) - torch.lgamma(e + r + 1)
        + torch.lgamma(e + r - m + 1)
    )  # fmt: skip
    miss = torch.where(k - g > e, 0.0, torch.exp(log_ratio))  # the whole tie fits: a hit
    return torch.where(g >= k, 0.0, 1.0 - miss)


def _recall(counts: tuple[torch.Tensor, ...], k: int) -> float:
    return 100.0 * float(hit_probability(*counts, k).mean())


def zero_shot_accuracy(
    image_emb: ArrayLike, class_emb: ArrayLike, labels: ArrayLike, topk: Sequence[int] = (1, 5)
) -> dict[str, float]:
    """Top-k accuracy in percent ({"top1": .., "top5": ..}) of cosine nearest class embeddings.

    With k >= the number of classes every image is a hit (100 %), as with any top-k.
    """
    images = unit_rows(as_matrix(image_emb, "image embeddings"))
    classes = unit_rows(as_matrix(class_emb, "class embeddings"))
    if images.shape[1] != classes.shape[1]:
        raise UserError(f"image ({images.shape[1]}) and class ({classes.shape[1]}) dims differ")
    if images.shape[0] == 0:
        raise UserError("zero-shot accuracy needs at least one labelled image")
    target = as_index(labels, classes.shape[0], "image labels", images.shape[0])
    counts = tie_counts(images, classes, target, torch.arange(classes.shape[0]))
    return {f"top{k}": _recall(counts, k) for k in topk}


def retrieval_recall(
    image_emb: ArrayLike,
    text_emb: ArrayLike,
    text_to_image: ArrayLike,
    ks: Sequence[int] = (1, 5, 10),
) -> dict[str, float]:
    """Image->text and text->image Recall@K in percent ({"i2t_r1": .., "t2i_r10": ..}).

    text_to_image[t] is the image of caption t; every image needs at least one caption.
    Image->text: a hit when any of the image's captions is in the top K. Text->image: a hit
    when the caption's one image is in the top K.
    """
    images = unit_rows(as_matrix(image_emb, "image embeddings"))
    texts = unit_rows(as_matrix(text_emb, "text embeddings"))
    if images.shape[1] != texts.shape[1]:
        raise UserError(f"image ({images.shape[1]}) and text ({texts.shape[1]}) dims differ")
    owner = as_index(text_to_image, images.shape[0], "text_to_image", texts.shape[0])
    uncaptioned = torch.bincount(owner, minlength=images.shape[0]) == 0
    if images.shape[0] == 0 or uncaptioned.any():
        raise UserError(
            f"retrieval needs at least one caption per image; {int(uncaptioned.sum())} of "
            f"{images.shape[0]} images have none"
        )
    image_ids = torch.arange(images.shape[0])
    i2t = tie_counts(images, texts, image_ids, owner)
    t2i = tie_counts(texts, images, owner, image_ids)
    out = {f"i2t_r{k}": _recall(i2t, k) for k in ks}
    out.update({f"t2i_r{k}": _recall(t2i, k) for k in ks})
    return out


# -- a run on stored features -----------------------------------------------------------------
def project(head: torch.nn.Module, features: np.ndarray, what: str, batch: int = 8192):
    """Apply a head to stored features in batches, without gradients."""
    if as_matrix(features, what).shape[0] == 0:
        raise UserError(f"{what} has no rows")
    head.eval()
    outputs = []
    with torch.inference_mode():
        for start in range(0, features.shape[0], batch):
            chunk = torch.from_numpy(np.ascontiguousarray(features[start : start + batch]))
            try:
                outputs.append(head(chunk).float())
            except RuntimeError as err:  # a shape mismatch: features of another model or layer
                raise UserError(
                    f"the head cannot take {what} (dim {features.shape[1]}): "
                    f"{str(err).splitlines()[0]}"
                ) from err
    return as_matrix(torch.cat(outputs), f"{what} after the head")


def _layer(store: FeatureStore, dataset: str, split: str, modality: str, model: str, layer: str):
    """One layer of one stored array as float32 (N, D), with the array's path for messages."""
    array = store.open(dataset, split, modality, model)
    return array.read_layer(layer), f"{modality} features {array.path} layer {layer}"


def prompts_record(store: FeatureStore, dataset: str, split: str, model: str) -> dict | None:
    """The templates and class names the stored prompts were made of (stages.prompts), None
    for prompts extracted before they were recorded."""
    record = store.open(dataset, split, "text", model).attrs.get("prompts")
    return record if isinstance(record, dict) else None


def _check_rows(values: np.ndarray, expected: int, what: str) -> None:
    if values.shape[0] != expected:
        raise UserError(
            f"{what} has {values.shape[0]} rows but the manifest lists {expected}; "
            "extract this split again with --overwrite"
        )


def _class_names(table: pd.DataFrame) -> dict[int, str]:
    named = table[(table["label"] >= 0) & (table["label_name"] != "")]
    return dict(zip(named["label"].astype(int), named["label_name"].astype(str), strict=True))


RUN_FIELDS = (
    "image_model", "text_model", "dataset", "image_layer", "text_layer", "head",
    "lambda", "levels", "temperature", "n_pairs", "n_train", "seed",
)  # fmt: skip
# what a run's config.json must name for its heads to be applied to stored features
FEATURE_KEYS = ("image_model", "text_model", "image_layer", "text_layer")


def run_summary(config: dict[str, Any], run_dir: str | Path) -> dict[str, Any]:
    """The fields of an align run's config.json that a comparison needs (None when absent), and
    whether the run was allowed to train on evaluation pairs (`allow_overlap`, false when the
    config does not say)."""
    return {
        "run_dir": str(run_dir),
        **{key: config.get(key) for key in RUN_FIELDS},
        "allow_overlap": config.get("allow_overlap", False) is True,
    }


def require_run_keys(config: Any, run_dir: str | Path, keys: Sequence[str]) -> dict[str, Any]:
    """The run's config, refused (one line naming the file and the command that makes it again)
    when it is not a JSON object or any of `keys` is missing or not a non-empty string."""
    path = Path(run_dir) / "config.json"
    again = f"train it again with `python -m pipeline align --out {run_dir}`"
    if not isinstance(config, dict):
        raise UserError(f"{path} must hold a JSON object, not {type(config).__name__}; {again}")
    missing = [k for k in keys if k not in config]
    if missing:
        raise UserError(f"{path} lacks {', '.join(missing)}; {again}")
    bad = [k for k in keys if not isinstance(config[k], str) or not config[k]]
    if bad:
        raise UserError(
            f"{path}: `{bad[0]}` must be a non-empty string, not {config[bad[0]]!r}; {again}"
        )
    dataset = config.get("dataset")
    if dataset is not None and not isinstance(dataset, str):
        raise UserError(f"{path}: `dataset` must be a string, not {dataset!r}; {again}")
    return config


def evaluate_run(
    run_dir: str | Path,
    store: FeatureStore | str | Path,
    dataset: str | None = None,
    split: str = "test",
    prompts_split: str = "prompts",
) -> dict[str, Any]:
    """Zero-shot and retrieval metrics (percent) of a run's heads on one split of the store.

    dataset defaults to the run's training dataset. Zero-shot is skipped when the split has
    no labels, retrieval when it has no captions; the metrics then say why.
    """
    config, image_head, text_head = load_run(run_dir)
    require_run_keys(config, run_dir, FEATURE_KEYS)
    store = store if isinstance(store, FeatureStore) else FeatureStore(store)
    dataset = dataset or config.get("dataset")
    if not dataset:
        raise UserError(f"{run_dir}/config.json names no dataset; pass --dataset")
    image_model, text_model = config["image_model"], config["text_model"]
    image_layer, text_layer = config["image_layer"], config["text_layer"]
    where = f"{dataset}/{split}"

    image_values, image_what = _layer(store, dataset, split, "image", image_model, image_layer)
    manifest = store.manifest(dataset, split)
    images = image_table(manifest)
    _check_rows(image_values, len(images), image_what)
    usable = images[~images["skipped"]]
    if usable.empty:
        raise UserError(f"{where} has no usable images (all were skipped at extraction)")
    # rows of skipped images hold no features: they stay NaN, so any use of them fails loudly
    rows = np.array(usable["image_row"])
    projected = project(image_head, image_values[rows], image_what)
    image_emb = torch.full((len(images), projected.shape[1]), torch.nan)
    image_emb[rows] = projected

    metrics: dict[str, Any] = {}
    labelled = usable[usable["label"] >= 0]
    if labelled.empty:
        metrics["zero_shot"] = {"skipped": f"{where} has no labelled images"}
    else:
        values, what = _layer(store, dataset, prompts_split, "text", text_model, text_layer)
        prompts = store.manifest(dataset, prompts_split)
        _check_rows(values, len(prompts), what)
        if (prompts["label"] < 0).any():
            raise UserError(f"{dataset}/{prompts_split} has prompts without a class label")
        n_classes = int(prompts["label"].max()) + 1
        if int(labelled["label"].max()) >= n_classes:
            raise UserError(
                f"{where} has labels up to {int(labelled['label'].max())} but "
                f"{dataset}/{prompts_split} has prompts for {n_classes} classes"
            )
        split_names, prompt_names = _class_names(labelled), _class_names(prompts)
        clash = [c for c, n in split_names.items() if prompt_names.get(c, n) != n]
        if clash:
            c = clash[0]
            raise UserError(
                f"class {c} is {split_names[c]!r} in {where} but {prompt_names[c]!r} in "
                f"{dataset}/{prompts_split}; extract the prompts from the same label list"
            )
        classes = class_embeddings(project(text_head, values, what), prompts["label"], n_classes)
        rows = np.array(labelled["image_row"])
        record = prompts_record(store, dataset, prompts_split, text_model)
        metrics["zero_shot"] = {
            **zero_shot_accuracy(image_emb[rows], classes, labelled["label"].to_numpy()),
            "n_images": len(rows),
            "n_classes": n_classes,
            "protocol": protocol_summary(record),
            "prompts": record,  # the templates and class names, as extracted
        }

    image_rows, text_rows = pair_rows(manifest)
    captioned = manifest["caption"].to_numpy()[text_rows] != ""
    image_rows, text_rows = image_rows[captioned], text_rows[captioned]
    if len(text_rows) == 0:
        metrics["retrieval"] = {"skipped": f"{where} has no captions"}
    else:
        values, what = _layer(store, dataset, split, "text", text_model, text_layer)
        _check_rows(values, len(manifest), what)
        text_emb = project(text_head, values[text_rows], what)
        image_ids, text_to_image = np.unique(image_rows, return_inverse=True)
        metrics["retrieval"] = {
            **retrieval_recall(image_emb[image_ids], text_emb, text_to_image),
            "n_images": len(image_ids),
            "n_texts": len(text_rows),
        }

    metrics["run"] = {
        **run_summary(config, run_dir),
        "eval_dataset": dataset,
        "split": split,
        "prompts_split": prompts_split,
    }
    return metrics


# -- comparing runs ---------------------------------------------------------------------------
@dataclass(frozen=True)
class EvalColumn:
    """One evaluation metric as a column of every table of runs (compare, table, sweep).

    name: the machine name (sweep.csv's column); header: the column of compare's and table's
    Markdown and CSV; section, key: where metrics.json holds the value; title: a plot's title.
    """

    name: str
    header: str
    section: str
    key: str
    title: str

    def read(self, metrics: Mapping[str, Any]) -> float:
        """The value in a metrics.json object; NaN when the run skipped it (no labels, ...)."""
        section = metrics.get(self.section)
        value = section.get(self.key) if isinstance(section, Mapping) else None
        return np.nan if value is None else value


_SIDES = {"i2t": ("I2T", "image→text"), "t2i": ("T2I", "text→image")}
# THE list of evaluation metrics, in table order: evaluate writes them, every table reads them
EVAL_COLUMNS: tuple[EvalColumn, ...] = (
    EvalColumn("zs_top1", "zs top1", "zero_shot", "top1", "zero-shot top-1 (%)"),
    EvalColumn("zs_top5", "zs top5", "zero_shot", "top5", "zero-shot top-5 (%)"),
    *(
        EvalColumn(f"{side}_r{k}", f"{short} R@{k}", "retrieval", f"{side}_r{k}",
                   f"{long} R@{k} (%)")
        for side, (short, long) in _SIDES.items()
        for k in (1, 5, 10)
    ),
)  # fmt: skip
COMPARE_COLUMNS = (
    "run", "head", "layers (img/txt)", "lambda", "n_pairs", *(c.header for c in EVAL_COLUMNS),
)  # fmt: skip


def metrics_protocol(metrics: Mapping[str, Any]) -> str:
    """Which prompts a run's zero-shot numbers come from (`stages.prompts.protocol_summary`):
    `unrecorded` for metrics written before it was, empty when zero-shot was skipped."""
    zero_shot = metrics.get("zero_shot")
    if not isinstance(zero_shot, Mapping) or "skipped" in zero_shot:
        return ""
    return str(zero_shot.get("protocol") or "unrecorded")


def eval_column(name: str) -> EvalColumn:
    """The column called `name` (its machine name or its header)."""
    for column in EVAL_COLUMNS:
        if name in (column.name, column.header):
            return column
    raise KeyError(f"no evaluation column {name!r}; known: {[c.name for c in EVAL_COLUMNS]}")


def _read_json(path: Path, hint: str) -> dict[str, Any]:
    if not path.is_file():
        raise UserError(f"no {path.name} in {path.parent}; {hint}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UserError(f"{path} is not valid JSON ({str(err).splitlines()[0]}); {hint}") from err
    if not isinstance(data, dict) or not all(
        isinstance(v, dict) for k, v in data.items() if k in ("zero_shot", "retrieval", "run")
    ):
        raise UserError(f"{path} does not hold the expected JSON object; {hint}")
    return data


def comparison_table(runs: Sequence[str | Path], names: Sequence[str] | None = None):
    """One row per run from its metrics.json and config.json, as a DataFrame of COMPARE_COLUMNS.

    Metrics that a run skipped are left empty (NaN).
    """
    if not runs:
        raise UserError("give at least one run directory to compare")
    if names and len(names) != len(runs):
        raise UserError(f"--names has {len(names)} names for {len(runs)} runs")
    paths = [Path(r) for r in runs]
    labels = list(names) if names else [p.name or str(p) for p in paths]
    if not names and len(set(labels)) < len(labels):
        labels = [str(p) for p in paths]  # two runs share a folder name: show whole paths
    rows = []
    for label, path in zip(labels, paths, strict=True):
        metrics = _read_json(
            path / METRICS, f"run `python -m pipeline evaluate --run {path}` first"
        )
        config = _read_json(path / "config.json", "is it a run directory written by `align`?")
        summary = run_summary(config, path)
        row: dict[str, Any] = {
            "run": label,
            "head": summary["head"],
            "layers (img/txt)": f"{summary['image_layer']}/{summary['text_layer']}",
            "lambda": summary["lambda"],
            "n_pairs": summary["n_pairs"],
        }
        for column in EVAL_COLUMNS:
            value = column.read(metrics)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise UserError(
                    f"{path / METRICS}: `{column.section}.{column.key}` must be a number, not "
                    f"{value!r:.40}; run `python -m pipeline evaluate --run {path}` again"
                )
            row[column.header] = value
        rows.append(row)
    return pd.DataFrame(rows, columns=list(COMPARE_COLUMNS))


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return "" if np.isnan(value) else f"{value:.1f}"
    return "" if value is None else str(value)


def to_markdown(table: pd.DataFrame) -> str:
    """A GitHub Markdown table, metrics to one decimal, skipped metrics empty."""
    lines = ["| " + " | ".join(table.columns) + " |", "|" + "---|" * len(table.columns)]
    for row in table.itertuples(index=False):
        lines.append("| " + " | ".join(_cell(v) for v in row) + " |")
    return "\n".join(lines) + "\n"


def write_table(table: pd.DataFrame, md: Path | None = None, csv: Path | None = None) -> None:
    """A comparison table as Markdown (to_markdown) and as CSV (4 decimals), each atomically."""
    if md:
        write_text_atomic(md, to_markdown(table))
    if csv:
        write_text_atomic(csv, table.to_csv(index=False, float_format="%.4f"))
