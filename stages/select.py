"""Stage 2a: pick the (image layer, text layer) pair whose representations agree most.

Every layer pair is scored by the layer metrics of `stages.similarity` (mutual kNN by default:
(1/n) Σ_i |kNN_A(i) ∩ kNN_B(i)| / k), each from per-layer structures built once: Li + Lt kNN
searches (`stages.knn`, exact and the same on every machine), Grams or bases, never a
computation on raw features per pair. Among equal scores the chosen pair is the first in
row-major order (lowest image layer, then lowest text layer), as `np.argmax` gives.

The scoring API (`mutual_knn_scores`, `layer_scores`, `metric_sides`) is pure: arrays in,
tables out. The stage (`run_selection`) reads the store and writes the selection directory,
an artifact (`SELECTION`: selection.json, scores.parquet, heatmap.png and heatmap_{metric}.png)
written through `store.artifacts.write_artifact` (complete or not at all, one writer at a
time, every file's checksum recorded) and read back only through `read_selection`.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from stages import calibration, similarity, structures
from stages.calibration import Calibrated
from stages.device import DEVICES, resolve_device
from stages.heatmap import plot_heatmap
from stages.knn import K_RULES, knn_graph, layer_graphs, normalise_rows, resolve_k
from stages.pairs import PairSpec
from stages.progress import progress_bar
from store import FeatureStore, UserError, pair_rows
from store.artifacts import ArtifactKind, read_description, write_artifact
from store.io import check_output

__all__ = ["K_RULES", "knn_graph", "normalise_rows", "plot_heatmap", "resolve_k"]  # re-exported


def compute_device(device: str) -> str:
    """Where the metrics' matrix work runs (`stages.device`: cuda without one is an error)."""
    return str(resolve_device(device))


# ------------------------------------------------------------------------------------------
# scores from graphs
# ------------------------------------------------------------------------------------------
def mutual_knn_scores(
    image_feats: np.ndarray | Sequence[np.ndarray],
    text_feats: np.ndarray | Sequence[np.ndarray],
    k: int,
    device: str = "auto",
) -> np.ndarray:
    """Mutual-kNN score of every (image layer, text layer) pair -> (Li, Lt) float64. Each side
    is an (N, L, D) array or a sequence of (N, D_l) arrays (layers of different widths). Row i
    of both sides must be the same sample."""
    image_layers, text_layers = as_layers(image_feats), as_layers(text_feats)
    n_image, n_text = len(image_layers[0]), len(text_layers[0])
    if n_image != n_text:
        raise UserError(
            f"image and text features have {n_image} and {n_text} rows; "
            "they must be the same paired samples"
        )
    k = resolve_k(k, n_image)
    a = layer_graphs(image_layers, k, device)
    b = layer_graphs(text_layers, k, device)
    import torch

    a, b = (torch.from_numpy(np.stack(graphs)).to(compute_device(device)) for graphs in (a, b))
    return similarity.mutual_knn_table(a, b)


# ------------------------------------------------------------------------------------------
# every metric of the registry, from per-layer structures built once
# ------------------------------------------------------------------------------------------
GRAM_MEMORY = 8 * 2**30  # stacked centred Grams above this: CKA from the centred features


def as_layers(feats: np.ndarray | Sequence[np.ndarray], name: str = "features") -> list[np.ndarray]:
    """(N, L, D) array or a sequence of (N, D_l) arrays (layers may differ in width)."""
    if isinstance(feats, np.ndarray) and feats.ndim == 3:
        return [feats[:, index] for index in range(feats.shape[1])]
    layers = [np.asarray(x) for x in feats]
    if not layers or any(x.ndim != 2 or len(x) != len(layers[0]) for x in layers):
        raise ValueError(f"{name}: expected (N, L, D) or a sequence of (N, D_l) arrays")
    return layers


def metric_sides(
    image_layers: Iterable, text_layers: Iterable, sizes: tuple[int, int], n: int,
    metrics: Sequence[str], k: int, device: str = "auto", cca_dim: int = 10,
    gram_memory: int = GRAM_MEMORY, graphs: Sequence[Sequence[np.ndarray]] | None = None,
    names: Sequence[Sequence[str]] = ((), ()),
) -> tuple[structures.Side, structures.Side]:  # fmt: skip
    """The image and text structures of `metrics` (as the registry names them) for n samples
    and sizes = (Li, Lt) layers (layers may be generators: one layer in memory at a time); kNN
    graphs by the exact search of `stages.knn`, or the prebuilt `graphs` (one list per side)."""
    needed = similarity.structures_for(metrics)
    where = compute_device(device)
    structures.check_memory(needed, sizes, n, where)
    use_grams = sum(sizes) * n * n * 4 * structures.grams_per_layer(needed) <= gram_memory
    ordered = "ranked_graph" in needed
    sides = []
    for side, layers in enumerate((image_layers, text_layers)):
        layer_names = list(names[side]) or [f"layer {i}" for i in range(sizes[side])]

        def knn(x, index, layer_names=layer_names):
            return knn_graph(x, k, device, layer_names[index], ordered=ordered)

        prebuilt = graphs[side] if graphs else None
        sides.append(
            structures.build_side(
                layers, sizes[side], needed, knn, prebuilt, use_grams, cca_dim, where
            )
        )
    return sides[0], sides[1]


def layer_scores(
    image_feats: np.ndarray | Sequence[np.ndarray],
    text_feats: np.ndarray | Sequence[np.ndarray],
    metric: str = "cka",
    k: int | str = "rice",
    device: str = "auto",
    cca_dim: int = 10,
    gram_memory: int = GRAM_MEMORY,
) -> np.ndarray:
    """One metric of stages.similarity for every (image layer, text layer) pair: (N, Li, Di)
    and (N, Lt, Dt) arrays, or sequences of (N, D_l) arrays, -> (Li, Lt) float64. Row i of
    both must be the same sample. k (kNN metrics, CKNNA): an integer or a rule of resolve_k."""
    (name,) = similarity.parse_metrics(metric)
    image, text = as_layers(image_feats, "image features"), as_layers(text_feats, "text features")
    if len(image[0]) != len(text[0]):
        raise UserError(
            f"image and text features have {len(image[0])} and {len(text[0])} rows; "
            "they must be the same paired samples"
        )
    k_value = resolve_k(k, len(image[0]))
    sizes, n = (len(image), len(text)), len(image[0])
    sides = metric_sides(image, text, sizes, n, [name], k_value, device, cca_dim, gram_memory)
    return similarity.tables([name], *sides)[name]


# ------------------------------------------------------------------------------------------
# the stage: store in, selection directory out
# ------------------------------------------------------------------------------------------
@dataclass
class Selection:
    scores: np.ndarray  # (Li, Lt) of the selecting metric (the first of `tables`)
    image_layers: list[str]
    text_layers: list[str]
    info: dict  # what selection.json holds
    tables: dict[str, np.ndarray] = field(default_factory=dict)  # every metric's (Li, Lt)
    calibration: dict[str, Calibrated] = field(default_factory=dict)

    def table(self) -> pd.DataFrame:
        li, lt = np.meshgrid(
            np.arange(len(self.image_layers)), np.arange(len(self.text_layers)), indexing="ij"
        )
        columns = {
            "image_layer": np.asarray(self.image_layers)[li.ravel()],
            "image_index": li.ravel(),
            "text_layer": np.asarray(self.text_layers)[lt.ravel()],
            "text_index": lt.ravel(),
            "score": self.scores.ravel(),
        }
        for metric, scores in self.tables.items():
            columns[metric] = scores.ravel()
            if metric in self.calibration:
                columns[f"{metric}_calibrated"] = self.calibration[metric].calibrated.ravel()
                columns[f"{metric}_p_value"] = self.calibration[metric].p_value.ravel()
        return pd.DataFrame(columns)


def best_pair(
    scores: np.ndarray, names_i: Sequence[str], names_t: Sequence[str],
    calibration: Calibrated | None = None,
) -> dict:  # fmt: skip
    """The argmax pair of one metric (first in row-major order among ties), and with a
    calibration its calibrated score and p-value as the max over all pairs."""
    best_i, best_t = np.unravel_index(int(np.argmax(scores)), scores.shape)
    pair = {
        "image_layer": names_i[best_i],
        "image_index": int(best_i),
        "text_layer": names_t[best_t],
        "text_index": int(best_t),
        "score": float(scores[best_i, best_t]),
        "last_score": float(scores[-1, -1]),
    }
    if calibration is not None:
        pair["calibrated"] = calibration.max_calibrated
        pair["p_value"] = calibration.max_p_value  # of the max: corrected for the search
        pair["pair_calibrated"] = float(calibration.calibrated[best_i, best_t])
        pair["pair_p_value"] = float(calibration.p_value[best_i, best_t])
    return pair


def layer_graph_task(
    job: tuple[str, str, str, np.ndarray],
    store_root: str,
    dataset: str,
    split: str,
    k: int,
    device: str,
    ordered: bool = True,
) -> np.ndarray:
    """The kNN graph of one stored layer over the sampled rows; job = (modality, model, layer,
    rows). Reads the store where it runs: here, or on a dask worker that sees the same path."""
    modality, model, layer, rows = job
    array = FeatureStore(store_root).open(dataset, split, modality, model, check_source=False)
    name = f"{array.path} {layer}"
    return knn_graph(array.read_layer(layer)[rows], k, device, name, ordered=ordered)


def sample_pairs(
    manifest: pd.DataFrame, n_samples: int, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """(image rows, text rows) of n seeded pairs, one caption per image, in manifest order.

    One caption per image: two captions of one image would give identical image rows, which
    are each other's nearest neighbours in every image layer. n_samples <= 0 means all."""
    image_rows, text_rows = pair_rows(manifest)
    if len(image_rows) == 0:
        raise UserError("the manifest has no usable image-text pairs to select layers on")
    rng = np.random.default_rng(seed)
    shuffled = rng.permutation(len(image_rows))
    _, first = np.unique(image_rows[shuffled], return_index=True)  # a random caption per image
    chosen = shuffled[first]
    if 0 < n_samples < len(chosen):
        chosen = rng.choice(chosen, n_samples, replace=False)
    chosen = np.sort(chosen)
    return image_rows[chosen], text_rows[chosen]


@dataclass(frozen=True)
class SelectSettings:
    """The settings of a selection, with the defaults of the `select` command."""

    n_samples: int = 5000  # pairs sampled, one per image (<= 0: all)
    k: int | str = "rice"  # neighbours: an integer, or rice | sqrt | sturges of n
    seed: int = 0
    device: str = "auto"  # kNN search and metrics on auto | cpu | cuda
    metric: str = "mutual_knn"  # one metric or a comma list; the first one selects
    calibrate: int = 0  # permutations of the null (0: off)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if self.device not in DEVICES:
            raise UserError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.calibrate < 0:
            raise UserError(
                f"--calibrate must be 0 (off) or a number of permutations, got {self.calibrate}"
            )
        calibration.require_permutations(self.calibrate)
        try:
            similarity.parse_metrics(self.metric)
        except ValueError as err:
            raise UserError(f"--metric: {err}") from err


def run_selection(
    spec: PairSpec,
    out: Path,
    settings: SelectSettings = SelectSettings(),
    *,
    progress: bool = True,
    scheduler: str = "",
) -> Selection:
    """Score every layer pair of `spec`'s features on a seeded sample by each metric of
    `settings` (the first one selects) and write the selection directory `out` (`SELECTION`).
    With a dask `scheduler` (address or local:N) the kNN graphs are built on the workers, one
    task per layer. With settings.calibrate = K > 0, K permutations of the text rows give the
    null of every score."""
    dataset, split = spec.dataset, spec.split
    image_model, text_model = spec.image_model, spec.text_model
    n_samples, k, seed, device = settings.n_samples, settings.k, settings.seed, settings.device
    require_selection_out(Path(out))  # before the work, not after it
    compute_device(device)  # cuda without a GPU: refused now
    calibrate = settings.calibrate
    metrics = similarity.parse_metrics(settings.metric)  # checked by SelectSettings
    needed = similarity.structures_for(metrics)
    store, image, text = spec.arrays()
    image.require_complete()
    text.require_complete()
    manifest = store.manifest(dataset, split)
    n_images = int(manifest["image_row"].max()) + 1
    if image.shape[0] != n_images or text.shape[0] != len(manifest):
        raise UserError(
            f"row counts differ: the manifest of {dataset}/{split} lists {n_images} images and "
            f"{len(manifest)} texts, the store holds {image.shape[0]} image rows ({image_model}) "
            f"and {text.shape[0]} text rows ({text_model}); extract both again for this split"
        )
    image_rows, text_rows = sample_pairs(manifest, n_samples, seed)
    n = len(image_rows)
    k_value = resolve_k(k, n)
    names_i, names_t = image.layer_names, text.layer_names
    graphs = None
    if scheduler and "graph" in needed:
        from stages.cluster import connect, run_tasks

        jobs = [("image", image_model, name, image_rows) for name in names_i]
        jobs += [("text", text_model, name, text_rows) for name in names_t]
        ordered = "ranked_graph" in needed
        common = (str(Path(store.root).resolve()), dataset, split, k_value, device, ordered)
        with connect(scheduler) as client:  # one task per layer, features read on the worker
            found = run_tasks(
                client, layer_graph_task, jobs, *common, desc="kNN graphs", unit="layer",
                progress=progress,
            )  # fmt: skip
        graphs = [found[: len(names_i)], found[len(names_i) :]]
    # only the graphs' overlaps need no features here once the cluster has built the graphs
    local = graphs is None or structures.reads_features(needed)

    def layers(array, rows, names, what):  # one layer in memory at a time
        for name in progress_bar(names, desc=f"{what} layers", enabled=progress):
            yield array.read_layer(name)[rows] if local else None

    sides = metric_sides(
        layers(image, image_rows, names_i, "image"), layers(text, text_rows, names_t, "text"),
        (len(names_i), len(names_t)), n, metrics, k_value, device, graphs=graphs,
        names=([f"{image.path} {x}" for x in names_i], [f"{text.path} {x}" for x in names_t]),
    )  # fmt: skip
    tables = similarity.tables(metrics, *sides)
    calibrated = {}
    if calibrate:
        bar = lambda steps: progress_bar(steps, desc="permutations", unit="perm", enabled=progress)  # noqa: E731
        null = calibration.permutation_null(metrics, *sides, calibrate, seed, bar)
        calibrated = {m: calibration.calibrate_table(tables[m], null[m]) for m in metrics}
    by_metric = {m: best_pair(tables[m], names_i, names_t, calibrated.get(m)) for m in metrics}
    info = {
        **by_metric[metrics[0]],
        "metric": metrics[0],
        "last_image_layer": names_i[-1],
        "last_text_layer": names_t[-1],
        "k": k_value,
        "k_rule": str(k),
        "n": n,
        "seed": seed,
        "permutations": calibrate,
        "alpha": calibration.ALPHA,
        "image_model": image_model,
        "text_model": text_model,
        "dataset": dataset,
        "split": split,
        "by_metric": by_metric,
        "features": features_identity(spec),
    }
    selection = Selection(tables[metrics[0]], names_i, names_t, info, tables, calibrated)
    write_selection(selection, Path(out))
    return selection


# ------------------------------------------------------------------------------------------
# the selection directory: one writer, one reader
# ------------------------------------------------------------------------------------------
SELECTION = ArtifactKind(
    name="selection directory",
    description="selection.json",
    remake="python -m pipeline select --out {path}",
    files=("scores.parquet", "heatmap.png"),
    keys={
        **dict.fromkeys(("image_layer", "text_layer", "metric", "image_model", "text_model"), str),
        **dict.fromkeys(("dataset", "split", "k_rule"), str),
        **dict.fromkeys(("image_index", "text_index", "k", "n", "seed", "permutations"), int),
        **dict.fromkeys(("score", "last_score"), float),
        **dict.fromkeys(("by_metric", "features", "files"), dict),
    },
)


def is_selection_file(name: str) -> bool:
    return name in ("selection.json", "scores.parquet") or (
        name.startswith("heatmap") and name.endswith(".png")
    )


def require_selection_out(out: Path) -> None:
    """--out must be a place for a directory that holds a selection or nothing: the selection
    replaces the whole directory, which must not take anything else with it."""
    check_output(out, "dir", "--out")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if not is_selection_file(p.name))
        if foreign:
            raise UserError(
                f"--out {out} holds {foreign[0]!r}, which is not part of a selection (select "
                "replaces the whole directory); give a new or a selection directory"
            )


def write_selection(selection: Selection, out: Path) -> None:
    """The selection directory, atomically and under its lock: scores.parquet, heatmap.png (the
    selecting metric), heatmap_{metric}.png for each other metric, and selection.json (the
    info, plus every file's checksum)."""
    require_selection_out(Path(out))

    def fill(tmp: Path) -> dict:
        selection.table().to_parquet(tmp / "scores.parquet", index=False)
        for rank, metric in enumerate(selection.tables or {"mutual_knn": selection.scores}):
            plot_heatmap(
                selection, metric, tmp / ("heatmap.png" if rank == 0 else f"heatmap_{metric}.png")
            )
        return selection.info

    selection.info = write_artifact(SELECTION, out, fill)


def read_selection(select_dir: Path, required: bool = False) -> dict | None:
    """selection.json of a selection directory, validated (`SELECTION`: its keys and types, its
    files present and unchanged): anything missing, unparsable or changed is one line naming
    the file and the command that makes it again. No selection.json there: None (an error when
    `required`)."""
    select_dir = Path(select_dir)
    if not required and not (select_dir / SELECTION.description).exists():
        return None
    return read_description(SELECTION, select_dir)


def features_identity(spec: PairSpec) -> dict[str, str]:
    """What a selection was computed from: the store folder and both arrays' source and model
    fingerprints and precisions, so that a selection.json of another store (or re-extracted
    features) is not reused."""
    _, image, text = spec.arrays()
    identity = {"store": str(Path(spec.store).resolve())}
    for side, array in (("image", image), ("text", text)):
        keys = ("source_fingerprint", "model_fingerprint", "precision")
        identity[side] = ":".join(str(array.attrs.get(k, "")) for k in keys)
    return identity


def top_pairs(selection: Selection, n: int = 10) -> pd.DataFrame:
    return selection.table().sort_values("score", ascending=False, kind="stable").head(n)
