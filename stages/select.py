"""Stage 2a: pick the (image layer, text layer) pair whose neighbourhoods agree most.

Mutual kNN of two feature sets A, B over the same n samples (cosine similarity, k neighbours,
a sample never its own neighbour):

    mKNN(A, B) = (1/n) * sum_i |kNN_A(i) ∩ kNN_B(i)| / k

Each layer's kNN graph is built once (FAISS exact inner product on L2-normalised float32 rows,
on the GPU when one is usable), then every layer pair is scored from the graphs alone: Li + Lt
searches instead of Li * Lt, and no n x n matrix is ever held.

Ties. Neighbours are ranked by similarity, and among equal similarities the lower row index
ranks first, so a kNN set is always well defined, whatever the search backend returns: the
backend fetches a few spare candidates, they are re-ranked by (similarity desc, index asc), and
a row whose k-th similarity equals the last candidate's (the tie may continue past what was
fetched) is recomputed exactly against all rows. Rows are in sample order (the CLI keeps the
manifest order), so ties go to the pair listed first. Duplicate rows are each other's nearest
neighbours; the sample itself is excluded by index, never by rank.

Among equal scores the chosen pair is the first in row-major order (lowest image layer, then
lowest text layer), as `np.argmax` gives.

The math above (`mutual_knn_scores`, `knn_graph`, `graph_overlap`, `resolve_k`) is pure; the
rest of the module runs the stage: it reads the store and writes the run directory.
"""

from __future__ import annotations

import json
import math
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pandas as pd

from store import FeatureStore, UserError, pair_rows

K_RULES = ("rice", "sqrt", "sturges")
SPARE = 8  # extra candidates fetched per row so that ties at the k-th rank are rarely cut


# ------------------------------------------------------------------------------------------
# k
# ------------------------------------------------------------------------------------------
def resolve_k(k: int | str, n: int) -> int:
    """k from an integer or a rule on the sample size n: rice (2 n^(1/3)), sqrt, sturges."""
    if isinstance(k, str) and k.strip().isdigit():
        k = int(k)
    if isinstance(k, str):
        rule = k.strip().lower()
        if n < 1:
            raise UserError(f"k rule {rule!r} needs at least one sample, got n = {n}")
        # integer arithmetic: float roots misround on exact cubes (27 ** (1/3) > 3)
        if rule == "rice":  # smallest k with k^3 >= 8 n, i.e. ceil(2 n^(1/3))
            k = round((8 * n) ** (1 / 3))
            while k**3 < 8 * n:
                k += 1
            while (k - 1) ** 3 >= 8 * n:
                k -= 1
        elif rule == "sqrt":
            k = math.isqrt(n - 1) + 1
        elif rule == "sturges":  # ceil(log2 n) + 1
            k = (n - 1).bit_length() + 1
        else:
            raise UserError(f"--k must be a positive integer or one of {K_RULES}, got {k!r}")
    if k < 1:
        raise UserError(f"--k must be at least 1, got {k}")
    if k >= n:
        raise UserError(
            f"k = {k} needs more than {k} samples, got n = {n}; lower --k or sample more"
        )
    return int(k)


# ------------------------------------------------------------------------------------------
# kNN graph of one layer
# ------------------------------------------------------------------------------------------
def normalise_rows(x: np.ndarray, name: str = "features") -> np.ndarray:
    """L2-normalised float32 C-contiguous copy; NaN, infinite or all-zero rows are an error."""
    x = np.array(x, dtype=np.float32, order="C", copy=True)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array (n, d), got shape {x.shape}")
    squares = np.einsum("ij,ij->i", x, x)  # no (n, d) temporaries: this runs on every layer
    odd = np.flatnonzero(~np.isfinite(squares) | (squares == 0))
    squares[odd] = 1
    x *= (1 / np.sqrt(squares))[:, None]
    # the few odd rows: NaN or inf, all zero, or a norm that over- or underflows float32
    rows = x[odd].astype(np.float64)
    bad = odd[~np.isfinite(rows).all(axis=1)]
    if bad.size:
        raise UserError(f"{name}: {bad.size} rows hold NaN or inf (first: row {bad[0]})")
    scale = np.abs(rows).max(axis=1, initial=0)
    zero = odd[scale == 0]
    if zero.size:
        raise UserError(
            f"{name}: {zero.size} rows are all zero (first: row {zero[0]}); "
            "cosine similarity is undefined for them"
        )
    rows /= scale[:, None]
    x[odd] = rows / np.linalg.norm(rows, axis=1, keepdims=True)
    return x


def search_cpu(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-m inner products of every row against all rows: (sims, ids), each (n, m)."""
    import faiss

    return faiss.knn(x, x, m, metric=faiss.METRIC_INNER_PRODUCT)


def knn_graph(x: np.ndarray, k: int, device: str = "auto", name: str = "features") -> np.ndarray:
    """The k nearest neighbours (cosine) of every row, self excluded: int32 (n, k), each row
    ranked by (similarity desc, index asc)."""
    x = normalise_rows(x, name)
    n = x.shape[0]
    if not 1 <= k < n:
        raise UserError(f"{name}: k = {k} needs more than {k} samples, got n = {n}")
    m = min(n, k + 1 + SPARE)
    sims, ids = search_backend(device, m)(x, m)
    return rank_candidates(x, sims, ids, k)


def rank_candidates(x: np.ndarray, sims: np.ndarray, ids: np.ndarray, k: int) -> np.ndarray:
    """Pick k neighbours from m > k candidates per row under the documented tie rule."""
    n, m = ids.shape
    sims = sims.astype(np.float32, copy=False)
    ids = ids.astype(np.int64, copy=False)
    # drop self (or, when it was not fetched, the last and least similar candidate)
    self_at = np.where(ids == np.arange(n)[:, None], np.arange(m), m - 1).min(axis=1)
    cols = np.arange(m - 1)[None, :]
    cols = cols + (cols >= self_at[:, None])
    sims = np.take_along_axis(sims, cols, axis=1)
    ids = np.take_along_axis(ids, cols, axis=1)
    # backends return rows by similarity desc: re-rank only rows where ties (or disorder)
    # within the first k + 1 decide the set or its order
    head = sims[:, : k + 1]
    redo = np.flatnonzero((head[:, 1:] >= head[:, :-1]).any(axis=1))
    if redo.size:
        order = np.lexsort((ids[redo], -sims[redo]), axis=1)  # similarity desc, then index
        sims[redo] = np.take_along_axis(sims[redo], order, axis=1)
        ids[redo] = np.take_along_axis(ids[redo], order, axis=1)
    graph = ids[:, :k].astype(np.int32)
    if m < n:
        # the last candidate bounds everything not fetched: a tie with it may hide more
        unsure = np.flatnonzero((sims[:, k - 1] <= sims.min(axis=1)) | (ids < 0).any(axis=1))
        if unsure.size:
            graph[unsure] = exact_neighbours(x, unsure, k)
    return graph


def exact_neighbours(x: np.ndarray, rows: np.ndarray, k: int, block: int = 1024) -> np.ndarray:
    """Exact kNN of the given rows against all rows (a stable sort keeps ties by index)."""
    out = np.empty((len(rows), k), dtype=np.int32)
    for start in range(0, len(rows), block):
        chunk = rows[start : start + block]
        sims = x[chunk] @ x.T
        sims[np.arange(len(chunk)), chunk] = -np.inf
        out[start : start + block] = np.argsort(-sims, axis=1, kind="stable")[:, :k]
    return out


# -- backends: the GPU path is kept here, small and separate -------------------------------
def search_backend(device: str, m: int) -> Callable[[np.ndarray, int], tuple]:
    """cpu: FAISS on the CPU. cuda: a GPU or an error. auto: the GPU when one works."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    if device == "cpu":
        return search_cpu
    gpu = gpu_search(m)
    if gpu is None and device == "cuda":
        raise UserError("--device cuda: no working GPU search (FAISS GPU or torch CUDA)")
    return gpu or search_cpu


def gpu_search(m: int) -> Callable[[np.ndarray, int], tuple] | None:
    """A GPU search that passed its smoke test: FAISS GPU first, then torch on CUDA."""
    if m <= 2048 and working("faiss"):  # FAISS GPU k-selection stops at 2048
        return search_faiss_gpu
    if working("torch"):
        return search_torch_cuda
    return None


def search_faiss_gpu(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    return faiss.knn_gpu(gpu_resources(), x, x, m, metric=faiss.METRIC_INNER_PRODUCT)


def search_torch_cuda(x: np.ndarray, m: int, block: int = 4096) -> tuple[np.ndarray, np.ndarray]:
    import torch

    xt = torch.from_numpy(x).cuda()
    sims, ids = [], []
    for start in range(0, len(x), block):
        top = torch.topk(xt[start : start + block] @ xt.T, m, dim=1)
        sims.append(top.values.cpu())
        ids.append(top.indices.cpu())
    return torch.cat(sims).numpy(), torch.cat(ids).numpy()


@cache
def gpu_resources():
    import faiss

    return faiss.StandardGpuResources()


@cache
def working(backend: str) -> bool:
    """Smoke-test a GPU backend once: some CUDA FAISS wheels lack kernels for newer GPUs."""
    try:
        if backend == "faiss":
            import faiss

            if not (faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")):
                return False
            search = search_faiss_gpu
        else:
            import torch

            if not torch.cuda.is_available():
                return False
            search = search_torch_cuda
        x = normalise_rows(np.random.default_rng(0).standard_normal((256, 32)))
        want = np.argsort(-(x @ x.T), axis=1)[:, :8]  # numpy reference: needs no FAISS
        _, got = search(x, 8)
        if np.array_equal(np.sort(want, axis=1), np.sort(np.asarray(got), axis=1)):
            return True
        warnings.warn(f"GPU search via {backend} gave wrong neighbours; not using it", stacklevel=2)
    except ImportError:  # no torch, or a FAISS build without the GPU
        return False
    except Exception as err:  # a missing kernel image, a driver error: fall back, say why
        warnings.warn(f"GPU search via {backend} failed ({err}); falling back", stacklevel=2)
    return False


# ------------------------------------------------------------------------------------------
# scores from graphs
# ------------------------------------------------------------------------------------------
def graph_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """mKNN of two kNN graphs (n, k) over the same samples: mean shared neighbours / k."""
    if a.shape != b.shape:
        raise ValueError(f"graphs differ in shape: {a.shape} vs {b.shape}")
    # rows hold distinct ids, so after sorting each row of [a | b] a shared id is a repeat
    both = np.sort(np.concatenate([a, b], axis=1), axis=1)
    return float(np.count_nonzero(both[:, 1:] == both[:, :-1])) / a.size


def score_graphs(
    image_graphs: Sequence[np.ndarray], text_graphs: Sequence[np.ndarray], device: str = "cpu"
) -> np.ndarray:
    """(Li, Lt) float64 table of graph_overlap for every layer pair (on the GPU when device
    is not cpu and torch sees one: at n = 50,000 the CPU needs ~35 ms a pair)."""
    if device != "cpu" and working("torch"):
        return score_graphs_cuda(image_graphs, text_graphs)
    scores = np.empty((len(image_graphs), len(text_graphs)), dtype=np.float64)
    for i, a in enumerate(image_graphs):
        for j, b in enumerate(text_graphs):
            scores[i, j] = graph_overlap(a, b)
    return scores


def score_graphs_cuda(
    image_graphs: Sequence[np.ndarray], text_graphs: Sequence[np.ndarray]
) -> np.ndarray:
    """score_graphs with torch on CUDA: one image layer against all text layers at once."""
    import torch

    text = torch.stack([torch.from_numpy(g) for g in text_graphs]).cuda()  # (Lt, n, k)
    lt, n, k = text.shape
    block = max(1, 2**27 // (lt * 2 * k))  # rows per step: ~0.5 GiB of int32 per sort
    counts = torch.zeros((len(image_graphs), lt), dtype=torch.int64, device="cuda")
    for i, graph in enumerate(image_graphs):
        a = torch.from_numpy(graph).cuda()
        for start in range(0, n, block):
            rows = slice(start, start + block)
            both = torch.cat([a[rows].expand(lt, -1, -1), text[:, rows]], dim=2)
            both = torch.sort(both, dim=2).values
            counts[i] += (both[..., 1:] == both[..., :-1]).sum(dim=(1, 2))
    return counts.cpu().numpy().astype(np.float64) / (n * k)


def layer_graphs(
    layers: Iterable[np.ndarray], k: int, device: str = "auto", names: Sequence[str] | None = None
) -> list[np.ndarray]:
    """One kNN graph per layer; `layers` may be a generator so that one layer is in memory."""
    graphs = []
    for i, x in enumerate(layers):
        graphs.append(knn_graph(x, k, device, names[i] if names else f"layer {i}"))
    return graphs


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
    return score_graphs(a, b, device)


def as_layers(feats: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    """An (N, L, D) array or a sequence of (N, D_l) arrays -> a list of (N, D_l) arrays."""
    if isinstance(feats, np.ndarray) and feats.ndim == 3:
        return [feats[:, i] for i in range(feats.shape[1])]
    layers = list(feats)
    if not layers or any(np.ndim(x) != 2 for x in layers):
        raise ValueError("expected an (N, L, D) array or a sequence of (N, D_l) arrays")
    if len({len(x) for x in layers}) != 1:
        raise ValueError(f"layers have different row counts: {[len(x) for x in layers]}")
    return layers


# ------------------------------------------------------------------------------------------
# the stage: store in, run directory out
# ------------------------------------------------------------------------------------------
@dataclass
class Selection:
    scores: np.ndarray  # (Li, Lt)
    image_layers: list[str]
    text_layers: list[str]
    info: dict  # what selection.json holds

    def table(self) -> pd.DataFrame:
        li, lt = np.meshgrid(
            np.arange(len(self.image_layers)), np.arange(len(self.text_layers)), indexing="ij"
        )
        return pd.DataFrame(
            {
                "image_layer": np.asarray(self.image_layers)[li.ravel()],
                "image_index": li.ravel(),
                "text_layer": np.asarray(self.text_layers)[lt.ravel()],
                "text_index": lt.ravel(),
                "score": self.scores.ravel(),
            }
        )


def layer_graph_task(
    job: tuple[str, str, str, np.ndarray],
    store_root: str,
    dataset: str,
    split: str,
    k: int,
    device: str,
) -> np.ndarray:
    """The kNN graph of one stored layer over the sampled rows; job = (modality, model, layer,
    rows). Reads the store where it runs: here, or on a dask worker that sees the same path."""
    modality, model, layer, rows = job
    array = FeatureStore(store_root).open(dataset, split, modality, model, check_source=False)
    return knn_graph(array.read_layer(layer)[rows], k, device, f"{array.path} {layer}")


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


def run_selection(
    store: FeatureStore,
    dataset: str,
    split: str,
    image_model: str,
    text_model: str,
    out: Path,
    n_samples: int = 5000,
    k: int | str = "rice",
    seed: int = 0,
    device: str = "auto",
    progress: bool = True,
    scheduler: str = "",
) -> Selection:
    """Score every layer pair on a seeded sample and write scores.parquet, selection.json and
    heatmap.png to `out`. With a dask `scheduler` (address or local:N) the kNN graphs are
    built on the workers, one task per layer."""
    from tqdm import tqdm

    image = store.open(dataset, split, "image", image_model)
    text = store.open(dataset, split, "text", text_model)
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
    jobs = [("image", image_model, name, image_rows) for name in names_i]
    jobs += [("text", text_model, name, text_rows) for name in names_t]
    common = (str(Path(store.root).resolve()), dataset, split, k_value, device)
    if scheduler:  # one task per layer, features read on the worker; scored here
        from stages.cluster import connect, run_tasks

        with connect(scheduler) as client:
            found = run_tasks(
                client, layer_graph_task, jobs, *common, desc="kNN graphs", unit="layer",
                progress=progress,
            )  # fmt: skip
    else:
        bar = tqdm(jobs, desc="kNN graphs", unit="layer", disable=not progress)
        found = [layer_graph_task(job, *common) for job in bar]  # one layer in memory at a time
    graphs = [found[: len(names_i)], found[len(names_i) :]]
    scores = score_graphs(*graphs, device=device)
    best_i, best_t = np.unravel_index(int(np.argmax(scores)), scores.shape)
    info = {
        "image_layer": names_i[best_i],
        "image_index": int(best_i),
        "text_layer": names_t[best_t],
        "text_index": int(best_t),
        "score": float(scores[best_i, best_t]),
        "last_image_layer": names_i[-1],
        "last_text_layer": names_t[-1],
        "last_score": float(scores[-1, -1]),
        "k": k_value,
        "k_rule": str(k),
        "n": n,
        "seed": seed,
        "image_model": image_model,
        "text_model": text_model,
        "dataset": dataset,
        "split": split,
    }
    selection = Selection(scores, names_i, names_t, info)
    write_selection(selection, Path(out))
    return selection


def write_selection(selection: Selection, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    selection.table().to_parquet(out / "scores.parquet", index=False)
    (out / "selection.json").write_text(json.dumps(selection.info, indent=2) + "\n")
    plot_heatmap(selection, out / "heatmap.png")


def plot_heatmap(selection: Selection, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = selection.info
    li, lt = selection.scores.shape
    fig, ax = plt.subplots(figsize=(max(5.0, 0.32 * lt + 3), max(4.0, 0.28 * li + 2)))
    im = ax.imshow(selection.scores, cmap="viridis", aspect="auto", origin="lower")
    fig.colorbar(im, ax=ax, label=f"mutual kNN (k={info['k']}, n={info['n']})")
    ax.set_xticks(range(lt), selection.text_layers, rotation=90, fontsize=7)
    ax.set_yticks(range(li), selection.image_layers, fontsize=7)
    ax.set_xlabel(f"text layer ({info['text_model']})")
    ax.set_ylabel(f"image layer ({info['image_model']})")
    ax.scatter(
        [info["text_index"]],
        [info["image_index"]],
        marker="*",
        s=160,
        c="red",
        edgecolors="white",
    )
    ax.add_patch(
        plt.Rectangle(
            (info["text_index"] - 0.5, info["image_index"] - 0.5),
            1,
            1,
            fill=False,
            edgecolor="red",
            linewidth=2,
        )
    )
    ax.set_title(
        f"{info['dataset']}/{info['split']}: chosen (*) {info['image_layer']} x "
        f"{info['text_layer']} = {info['score']:.3f}, last pair {info['last_score']:.3f}",
        fontsize=9,
    )
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def top_pairs(selection: Selection, n: int = 10) -> pd.DataFrame:
    return selection.table().sort_values("score", ascending=False, kind="stable").head(n)


# ------------------------------------------------------------------------------------------
# --layers for align: auto | last | IMG,TXT
# ------------------------------------------------------------------------------------------
def resolve_layers(
    spec: str,
    store: FeatureStore,
    dataset: str,
    split: str,
    image_model: str,
    text_model: str,
    select_dir: Path,
    n_samples: int = 5000,
    k: int | str = "rice",
    seed: int = 0,
) -> tuple[str, str]:
    """(image layer name, text layer name) for `align --layers`.

    auto: the pair in select_dir/selection.json when it was made for these models, dataset and
    split (and its layers exist); otherwise the selection is computed there first.
    last: the last layer of each array. IMG,TXT: each by index (negative allowed) or name."""
    image = store.open(dataset, split, "image", image_model)
    text = store.open(dataset, split, "text", text_model)
    spec = spec.strip()
    if spec == "last":
        return image.layer_names[-1], text.layer_names[-1]
    if spec == "auto":
        info = read_selection(Path(select_dir))
        wanted = {
            "image_model": image_model,
            "text_model": text_model,
            "dataset": dataset,
            "split": split,
        }
        if (
            info is None
            or any(info.get(key) != value for key, value in wanted.items())
            or info.get("image_layer") not in image.layer_names
            or info.get("text_layer") not in text.layer_names
        ):
            if info is not None:
                print(
                    f"{select_dir}/selection.json is for other features; selecting again",
                    file=sys.stderr,
                )
            info = run_selection(
                store, dataset, split, image_model, text_model, Path(select_dir), n_samples, k, seed
            ).info
        return info["image_layer"], info["text_layer"]
    parts = [p.strip() for p in spec.split(",")]
    if len(parts) != 2 or not all(parts):
        raise UserError(f"--layers must be auto, last or IMAGE,TEXT (index or name), got {spec!r}")
    return (
        image.layer_names[image.layer_index(parts[0])],
        text.layer_names[text.layer_index(parts[1])],
    )


def read_selection(select_dir: Path) -> dict | None:
    path = select_dir / "selection.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); delete it or run select again") from err
