"""Stage 2a: pick the (image layer, text layer) pair whose neighbourhoods agree most.

Mutual kNN of two feature sets A, B over the same n samples (cosine similarity, k neighbours,
a sample never its own neighbour):

    mKNN(A, B) = (1/n) * sum_i |kNN_A(i) ∩ kNN_B(i)| / k

Each layer's kNN graph is built once, then every layer pair is scored from the graphs alone:
Li + Lt searches instead of Li * Lt, and no n x n matrix is ever held.

Exact graphs, the same on every machine. The reference similarity s64(i, j) is defined bit
for bit: each row rounded to float32, divided in float64 by its norm and rounded to float32
(the unit rows), then the exact float64 products of two unit rows (24-bit mantissas) summed in
one fixed binary tree (`tree_sum`, which also sums the squares of the norm: elementwise IEEE
operations only, so no BLAS kernel, SIMD width or thread count can change a bit; BLAS can round
two identical columns of x x^T differently). Neighbours rank by (s64 desc, index asc), so ties
go to the lower row index, and a sample is never its own neighbour (excluded by index).

A fast search (`SEARCHES`: blocked float32 matmuls with a top-k, or FAISS) proposes the top
k + 1 + MARGIN candidates of every row by its float32 similarity s32 of the same unit rows. A
float32 dot product of d terms, in any order, with or without FMA, is within gamma_d = d u /
(1 - d u) (u = 2^-24) times sum |a_t b_t| <= (1 + u)^2 of the exact one, and the tree's float64
sum within gamma_d (u = 2^-53) of it, so |s32 - s64| <= E = similarity_error(d) (6.1e-5 at
d = 1,024). Two candidates whose s32 differ by more than 2E are therefore in s64 order, and one
more than 2E above the least similarity fetched is above everything not fetched. So each row's
candidates, sorted by s32, split into clusters at gaps wider than 2E; only clusters of two or
more before the first gap at or after rank k get s64 (and their order from it), and a row with
no such gap among its candidates (its k-th neighbour may hide among those not fetched, as with
many duplicates) is recomputed against all rows: every row within 2E of its k-th s32, decided
on s64. A backend whose s32 strays beyond E from s64 is an error, never a silent miss. MARGIN
only trades the search's cost against how often a row is recomputed: correctness comes from
the per-row check, not from the margin.

Among equal scores the chosen pair is the first in row-major order (lowest image layer, then
lowest text layer), as `np.argmax` gives.

The math above (`mutual_knn_scores`, `knn_graph`, `resolve_k`) is pure; the
rest of the module runs the stage: it reads the store and writes the run directory.
"""

from __future__ import annotations

import json
import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cache, partial
from pathlib import Path

import numpy as np
import pandas as pd

from stages import similarity
from stages.pairs import PairSpec
from store import FeatureStore, UserError, pair_rows, write_json_atomic
from store.io import require_directory

K_RULES = ("rice", "sqrt", "sturges")


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
U32, U64 = 2.0**-24, 2.0**-53  # unit roundoff of float32 and float64
MARGIN = 8  # spare candidates per row: only speed depends on it, every row is verified


def gamma(n: int, u: float) -> float:
    """Higham's gamma_n = n u / (1 - n u): the relative error bound of n roundings."""
    return n * u / (1 - n * u)


def similarity_error(d: int) -> float:
    """Bound on |s32 - s64| for two unit rows of dimension d (see the module docstring)."""
    return gamma(d + 4, U32) + gamma(d + 4, U64)


def tree_sum(p: np.ndarray) -> np.ndarray:
    """Sum over the last axis in one fixed binary tree (adjacent pairs, an odd last element
    carried up): the same bits on every CPU, unlike BLAS, einsum or numpy's SIMD sums."""
    while p.shape[-1] > 1:
        half = p.shape[-1] // 2
        pairs = p[..., 0 : 2 * half : 2] + p[..., 1 : 2 * half : 2]
        p = np.concatenate([pairs, p[..., 2 * half :]], axis=-1) if p.shape[-1] % 2 else pairs
    return p[..., 0]


def similarities(unit: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 128) -> np.ndarray:
    """The reference cosine s64 of the row pairs (i[t], j[t]) of float32 unit rows: exact
    float64 products (float32 has 24 bits), summed in the fixed tree. float64 (len(i),)."""
    out = np.empty(len(i), dtype=np.float64)
    for start in range(0, len(i), chunk):
        part = slice(start, start + chunk)
        a, b = unit[i[part]].astype(np.float64), unit[j[part]].astype(np.float64)
        out[part] = tree_sum(a * b)  # float64(a) * float64(b): no casting ufunc, 2x faster
    return out


def normalise_rows(x: np.ndarray, name: str = "features", block: int = 256) -> np.ndarray:
    """float32 unit rows, C-contiguous: each row rounded to float32, divided in float64 by its
    norm (summed in the fixed tree: float32 squares can overflow), rounded to float32. NaN,
    infinite or all-zero rows are an error."""
    x = np.asarray(x)
    if x.ndim != 2:
        raise ValueError(f"{name}: expected a 2-d array (n, d), got shape {x.shape}")
    norms = np.empty(len(x), dtype=np.float64)
    unit = np.empty(x.shape, dtype=np.float32)
    for start in range(0, len(x), block):  # 256 rows of float64 stay in cache: 1.5x 1,024
        part = slice(start, start + block)
        rows = x[part].astype(np.float32).astype(np.float64)
        norms[part] = np.sqrt(tree_sum(rows * rows))
        with np.errstate(invalid="ignore", divide="ignore"):  # bad rows: reported below
            unit[part] = rows / norms[part, None]
    bad = np.flatnonzero(~np.isfinite(norms))
    if bad.size:
        raise UserError(f"{name}: {bad.size} rows hold NaN or inf (first: row {bad[0]})")
    zero = np.flatnonzero(norms == 0)
    if zero.size:
        raise UserError(
            f"{name}: {zero.size} rows are all zero (first: row {zero[0]}); "
            "cosine similarity is undefined for them"
        )
    return unit


def knn_graph(
    x: np.ndarray,
    k: int,
    device: str = "auto",
    name: str = "features",
    search: str = "",
    ordered: bool = True,
) -> np.ndarray:
    """The k nearest neighbours (cosine) of every row, self excluded: int32 (n, k), each row
    ranked by (similarity desc, index asc); with ordered=False the same neighbours sorted by
    index (all that set metrics such as mutual kNN need, and cheaper: only the ties at rank k
    are decided in float64). `search` names a backend of SEARCHES; empty: the fastest working
    one for `device`."""
    unit = normalise_rows(x, name)
    n, d = unit.shape
    if not 1 <= k < n:
        raise UserError(f"{name}: k = {k} needs more than {k} samples, got n = {n}")
    m = min(n, k + 1 + MARGIN)
    search = search or fastest_search(device, d, n)
    if search == "faiss-gpu" and m > 2048:  # FAISS GPU k-selection stops at 2048
        search = "torch-cuda"
    sims, ids = SEARCHES[search](unit, m)
    return rank_candidates(unit, np.asarray(sims), np.asarray(ids), k, ordered)


def rank_candidates(
    unit: np.ndarray, sims: np.ndarray, ids: np.ndarray, k: int, ordered: bool = True
) -> np.ndarray:
    """The exact graph from a backend's top-m (m > k) float32 candidates of every row.

    Candidates are sorted by their float32 similarity; wherever two neighbours in that order
    are within 2E (E = similarity_error), they form a cluster whose order is decided on s64,
    then index (ordered=False: only the cluster across rank k, which decides the set; rows
    come back sorted by index). A row whose k-th candidate is not more than 2E above
    everything not fetched goes to `exact_neighbours`."""
    n, m = ids.shape
    rows = np.arange(n)
    if ordered or m <= k + 1:
        return ranked_rows(unit, sims, ids, rows, k, ordered)
    # sets: most rows have a gap wider than 2E between their k-th and (k+1)-th candidates
    # (self excluded), and then their first k by float32 are the set; no sort, no s64
    ids = ids.astype(np.int64, copy=False)
    fetched = (ids >= 0).all(axis=1)
    values = np.where(ids == rows[:, None], -np.inf, sims.astype(np.float64))
    part = np.argpartition(-values, (k - 1, k), axis=1)
    kth, after = (np.take_along_axis(values, part[:, [k - 1, k]], axis=1)).T
    clear = fetched & (kth - after > 2 * similarity_error(unit.shape[1]))
    graph = np.empty((n, k), dtype=np.int32)
    graph[clear] = np.take_along_axis(ids[clear], part[clear, :k], axis=1)
    rest = rows[~clear]
    graph[rest] = ranked_rows(unit, sims[rest], ids[rest], rest, k, ordered)
    return np.sort(graph, axis=1)


def ranked_rows(
    unit: np.ndarray, sims: np.ndarray, ids: np.ndarray, rows: np.ndarray, k: int, ordered: bool
) -> np.ndarray:
    """`rank_candidates` for the given rows (their candidates in `sims`, `ids`), by clusters."""
    m = ids.shape[1]
    err = similarity_error(unit.shape[1])
    ids = ids.astype(np.int64, copy=False)
    sims = sims.astype(np.float64)
    fetched = ids >= 0
    unfetched_max = np.where(fetched, sims, np.inf).min(axis=1)  # bounds every row not fetched
    sims[~fetched | (ids == rows[:, None])] = -np.inf  # self is never a neighbour
    order = np.argsort(-sims, axis=1, kind="stable")[:, : m - 1]
    sims = np.take_along_axis(sims, order, axis=1)
    ids = np.take_along_axis(ids, order, axis=1)
    # linked[:, t]: candidates t and t + 1 may swap; the last column links to the unfetched
    below = np.concatenate([sims[:, 1:], unfetched_max[:, None]], axis=1)
    with np.errstate(invalid="ignore"):
        linked = ~(sims - below > 2 * err)  # NaN from -inf - -inf: linked, so redone exactly
    cut = ~linked[:, k - 1 :]
    redo = ~cut.any(axis=1) | ~fetched.all(axis=1)
    cluster = np.cumsum(~linked, axis=1) - ~linked  # breaks before each position
    if ordered:  # s64 for the members of clusters of two or more, up to the first break at or
        end = k - 1 + cut.argmax(axis=1)  # after rank k, where the set is certain
        position = np.arange(m - 1)
        in_cluster = linked | np.pad(linked[:, :-1], ((0, 0), (1, 0)))
        need = in_cluster & (position <= end[:, None])
    else:  # only for the cluster that holds ranks k and k + 1: the rest are wholly in or out
        need = (cluster == cluster[:, k - 1 : k]) & linked[:, k - 1 : k]
    row, col = np.nonzero(need & ~redo[:, None])
    exact = np.zeros_like(sims)
    exact[row, col] = similarities(unit, rows[row], ids[row, col])
    if row.size and np.abs(exact[row, col] - sims[row, col]).max() > err:
        raise RuntimeError("the search backend's similarities exceed the float32 error bound")
    order = np.lexsort((ids, -exact, cluster), axis=1)
    graph = np.take_along_axis(ids, order[:, :k], axis=1).astype(np.int32)
    redo = np.flatnonzero(redo)
    if redo.size:
        graph[redo] = exact_neighbours(unit, rows[redo], k)
    return graph if ordered else np.sort(graph, axis=1)


def exact_neighbours(unit: np.ndarray, index: np.ndarray, k: int, block: int = 256) -> np.ndarray:
    """The exact graph of the given rows against all rows: every row within 2E of the k-th
    float32 similarity is a candidate, decided on s64 then index."""
    err = similarity_error(unit.shape[1])
    out = np.empty((len(index), k), dtype=np.int32)
    for start in range(0, len(index), block):
        chunk = index[start : start + block]
        sims = unit[chunk] @ unit.T
        sims[np.arange(len(chunk)), chunk] = -np.inf
        kth = -np.partition(-sims, k - 1, axis=1)[:, k - 1]
        row, col = np.nonzero(sims >= (kth - 2 * err)[:, None])
        exact = similarities(unit, chunk[row], col)
        order = np.lexsort((col, -exact, row))  # by row, then similarity desc, then index
        row, col = row[order], col[order]
        first = np.searchsorted(row, np.arange(len(chunk)))
        take = first[:, None] + np.arange(k)
        out[start : start + len(chunk)] = col[take]
    return out


# -- candidate searches: top-m float32 inner products of unit rows, by name ---------------------
def blocked_top(x: np.ndarray, m: int, gram: Callable, device: str = "cpu", block: int = 4096):
    """Top-m of every row of x x^T from the blocks on and above the diagonal, each used for
    its rows and, transposed, for its columns: about half the multiply-adds of the full
    matrix, and one block of it in memory. gram(a, b) is the block x[a] x[b]^T (torch)."""
    import torch

    n = len(x)
    starts = range(0, n, block)
    found = {a: [] for a in starts}  # per block of rows: (similarities, ids) of its candidates
    for a in starts:
        rows = slice(a, min(a + block, n))
        for b in range(a, n, block):
            sims = gram(rows, slice(b, min(b + block, n)))
            top = torch.topk(sims, min(m, sims.shape[1]), dim=1, sorted=False)
            found[a].append((top.values, top.indices + b))
            if b > a:  # the same block, seen from the rows of block b
                top = torch.topk(sims, min(m, sims.shape[0]), dim=0, sorted=False)
                found[b].append((top.values.T, top.indices.T + a))
    sims, ids = [], []
    for a in starts:
        values = torch.cat([v for v, _ in found[a]], dim=1)
        top = torch.topk(values, m, dim=1, sorted=False)
        sims.append(top.values.cpu())
        ids.append(torch.gather(torch.cat([i for _, i in found[a]], dim=1), 1, top.indices).cpu())
    return torch.cat(sims).numpy(), torch.cat(ids).numpy()


BLAS_BLOCK_ROWS = 512  # rows of a tile of x x^T in `search_blas`: 1 MiB of float32, in cache


@cache
def blas_controller():
    """threadpoolctl's handle on the BLAS libraries loaded (numpy's OpenBLAS or MKL)."""
    from threadpoolctl import ThreadpoolController

    return ThreadpoolController().select(user_api="blas")


def blas_threads() -> int:
    """The threads numpy's BLAS would use (OMP_NUM_THREADS and the like, threadpoolctl's
    limits): the tiled search runs as many."""
    return max((lib.num_threads for lib in blas_controller().lib_controllers), default=1)


def search_blas(
    x: np.ndarray, m: int, block: int = BLAS_BLOCK_ROWS
) -> tuple[np.ndarray, np.ndarray]:
    """The tiles on and above the diagonal of x x^T, each one single-threaded BLAS call,
    shared among as many Python threads as BLAS would use (numpy and FAISS release the GIL).
    Each tile feeds FAISS's top-m heaps of its rows (one comparison per similarity against the
    row's current m-th best) and, transposed while in cache, those of its columns, each block
    of heaps under its own lock. Against one threaded BLAS call for the whole matrix: the same
    multiply-adds as its symmetric rank-k update, one tile per thread held instead of N x N,
    and no idle OpenBLAS workers spinning (2^28 cycles after each call) on the cores that the
    heap pass needs: at N 5,000 on 2 cores a graph takes 20% less time."""
    import faiss

    n = len(x)
    block = -(-n // -(-n // block))  # equal tiles of at most `block` rows
    starts = range(0, n, block)
    # the diagonal tiles, half the work each, last: they even out the threads' ends
    tiles = sorted(((a, b) for a in starts for b in starts if b >= a), key=lambda t: t[0] == t[1])
    pending, next_tile = iter(tiles), threading.Lock()
    locks = {a: threading.Lock() for a in starts}  # one per block of rows of the heaps
    workers = min(blas_threads(), len(tiles))
    sims, ids = np.empty((n, m), dtype=np.float32), np.empty((n, m), dtype=np.int64)
    heaps = faiss.float_minheap_array_t()  # min-heaps: keep the m largest of each row
    heaps.k, heaps.nh = m, n
    heaps.val, heaps.ids = faiss.swig_ptr(sims), faiss.swig_ptr(ids)
    heaps.heapify()

    def add(gram: np.ndarray, rows: int, columns: int) -> None:
        with locks[rows]:
            heaps.addn(gram.shape[1], faiss.swig_ptr(gram), columns, rows, gram.shape[0])

    def work() -> None:
        faiss.omp_set_num_threads(1)  # this thread's OpenMP setting only
        while True:
            with next_tile:
                a, b = next(pending, (None, None))
            if a is None:
                return
            rows = x[a : a + block]
            gram = rows @ (rows if b == a else x[b : b + block]).T
            add(gram, a, b)
            if b > a:
                add(np.ascontiguousarray(gram.T), b, a)

    with blas_controller().limit(limits=1), ThreadPoolExecutor(workers) as pool:
        for task in [pool.submit(work) for _ in range(workers)]:
            task.result()
    return sims, ids


BLOCK_ROWS = 8192  # rows of a block of the N x N matrix in `search_torch` on the CPU: 256 MiB


def search_torch(
    x: np.ndarray, m: int, device: str = "cpu", block: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """torch for the blocks and the top-k: the CUDA search, and the CPU's where torch's BLAS
    measures faster."""
    import torch

    xt = torch.from_numpy(x).to(device)
    block = block or (BLOCK_ROWS if device == "cpu" else 16384)
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # TF32 would break the float32 error bound
    try:
        return blocked_top(x, m, lambda a, b: xt[a] @ xt[b].T, device, block)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32


def search_faiss(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    return faiss.knn(x, x, m, metric=faiss.METRIC_INNER_PRODUCT)


def search_faiss_gpu(x: np.ndarray, m: int) -> tuple[np.ndarray, np.ndarray]:
    import faiss

    return faiss.knn_gpu(gpu_resources(), x, x, m, metric=faiss.METRIC_INNER_PRODUCT)


SEARCHES: dict[str, Callable[[np.ndarray, int], tuple]] = {
    "blas": search_blas,
    "torch": search_torch,
    "faiss": search_faiss,
    "torch-cuda": partial(search_torch, device="cuda"),
    "faiss-gpu": search_faiss_gpu,
}
CPU_SEARCHES = ("blas", "torch", "faiss")
GPU_SEARCHES = ("faiss-gpu", "torch-cuda")


def search_backends(device: str) -> tuple[str, ...]:
    """cpu: the CPU searches. cuda: the GPU searches that work, or an error. auto: the GPU
    searches when one works, else the CPU ones."""
    if device not in ("auto", "cpu", "cuda"):
        raise UserError(f"--device must be auto, cpu or cuda, got {device!r}")
    gpu = () if device == "cpu" else tuple(name for name in GPU_SEARCHES if working(name))
    if device == "cuda" and not gpu:
        raise UserError("--device cuda: no working GPU search (FAISS GPU or torch CUDA)")
    return gpu or CPU_SEARCHES


TIMED_ROWS = 8192  # the most rows a start-up timing uses


def fastest_search(device: str, d: int = 256, n: int = 2048) -> str:
    """The backend for `device` and n rows of dimension d, by timing (`timed_fastest`)."""
    return timed_fastest(device, d, min(n, TIMED_ROWS))


@cache
def timed_fastest(device: str, d: int, n: int) -> str:
    """The fastest backend on n random rows of dimension d, timed once per process: which is
    fastest depends on the CPU (FAISS's is 3x slower than a matmul on some, its GPU search
    faster on others), on d and on n (FAISS wins at 2,048 rows on a CPU where the blocked BLAS
    search wins at 5,000). Each backend's best of three full-size runs, taken in turns, so
    that neither a burst of load elsewhere nor a first run's page faults decide it."""
    names = search_backends(device)
    if len(names) == 1:
        return names[0]
    x = normalise_rows(np.random.default_rng(0).standard_normal((n, d), dtype=np.float32))
    m = min(n, 32)
    seconds = dict.fromkeys(names, math.inf)
    for name in names:
        SEARCHES[name](x[:256], min(m, 256))  # warm-up: imports, kernels
    for _ in range(3):
        for name in names:
            start = time.perf_counter()
            SEARCHES[name](x, m)
            seconds[name] = min(seconds[name], time.perf_counter() - start)
    return min(names, key=seconds.__getitem__)


@cache
def gpu_resources():
    import faiss

    return faiss.StandardGpuResources()


@cache
def working(name: str) -> bool:
    """Smoke-test a GPU search once: some CUDA FAISS wheels lack kernels for newer GPUs, and
    its similarities must keep to the float32 error bound (no TF32)."""
    try:
        if name == "faiss-gpu":
            import faiss

            if not (faiss.get_num_gpus() > 0 and hasattr(faiss, "StandardGpuResources")):
                return False
        else:
            import torch

            if not torch.cuda.is_available():
                return False
        unit = normalise_rows(np.random.default_rng(0).standard_normal((256, 32)))
        exact = unit.astype(np.float64) @ unit.T.astype(np.float64)
        want = np.sort(np.argsort(-exact, axis=1)[:, :8], axis=1)  # numpy reference
        sims, ids = (np.asarray(a) for a in SEARCHES[name](unit, 8))
        found = np.take_along_axis(exact, ids, axis=1)
        if np.array_equal(want, np.sort(ids, axis=1)) and np.abs(found - sims).max() <= (
            similarity_error(32)
        ):
            return True
        warnings.warn(f"GPU search {name} gave wrong neighbours; not using it", stacklevel=2)
    except ImportError:  # no torch, or a FAISS build without the GPU
        return False
    except Exception as err:  # a missing kernel image, a driver error: fall back, say why
        warnings.warn(f"GPU search {name} failed ({err}); falling back", stacklevel=2)
    return False


# ------------------------------------------------------------------------------------------
# scores from graphs
# ------------------------------------------------------------------------------------------
def layer_graphs(
    layers: Iterable[np.ndarray], k: int, device: str = "auto", names: Sequence[str] | None = None
) -> list[np.ndarray]:
    """One kNN graph per layer, each row sorted by index (mutual kNN needs the sets only);
    `layers` may be a generator so that one layer is in memory."""
    graphs = []
    for i, x in enumerate(layers):
        name = names[i] if names else f"layer {i}"
        graphs.append(knn_graph(x, k, device, name, ordered=False))  # overlaps read sets
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
    import torch

    a, b = (torch.from_numpy(np.stack(graphs)).to(torch_device(device)) for graphs in (a, b))
    return similarity.mutual_knn_table(a, b)


# ------------------------------------------------------------------------------------------
# every metric of stages.similarity, from per-layer structures built once
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


def torch_device(device: str) -> str:
    """Where the metrics' matrix work runs: CUDA when asked for (or auto) and present."""
    import torch

    return "cuda" if device != "cpu" and torch.cuda.is_available() else "cpu"


def free_memory(device: str) -> int:
    """Bytes free for new tensors on `device` ("cpu" or "cuda")."""
    if device == "cuda":
        import torch

        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def require_hcs_memory(sizes: tuple[int, int], n: int, device: str) -> None:
    """hcs keeps every layer's n x n transition matrices (no low-rank form): refuse in one
    line, before any work, when they cannot fit, rather than die out of memory midway."""
    need = sum(sizes) * similarity.HCS_LEVELS * n * n * 4  # float32
    free = free_memory(device)
    if need > free:
        raise UserError(
            f"--metric hcs needs {need / 2**30:.1f} GiB for its transition matrices "
            f"({sum(sizes)} layers x {similarity.HCS_LEVELS} levels x n² at n = {n}), "
            f"{free / 2**30:.1f} GiB free on {device}: lower --n-samples or leave hcs out"
        )


def metric_sides(
    image_layers: Iterable, text_layers: Iterable, sizes: tuple[int, int], n: int,
    metrics: Sequence[str], k: int, device: str = "auto", cca_dim: int = 10,
    gram_memory: int = GRAM_MEMORY, graphs: Sequence[Sequence[np.ndarray]] | None = None,
    names: Sequence[Sequence[str]] = ((), ()),
) -> tuple[similarity.Side, similarity.Side]:  # fmt: skip
    """The image and text structures of `metrics` for n samples and sizes = (Li, Lt) layers
    (layers may be generators: one layer in memory at a time); kNN graphs by this module's
    exact search, or the prebuilt `graphs` (one list per side)."""
    if "hcs" in metrics:
        require_hcs_memory(sizes, n, torch_device(device))
    use_grams = sum(sizes) * n * n * 4 * similarity.grams_per_layer(metrics) <= gram_memory
    ordered = any(m in similarity.RANKED_METRICS for m in metrics)
    sides = []
    for side, layers in enumerate((image_layers, text_layers)):
        layer_names = list(names[side]) or [f"layer {i}" for i in range(sizes[side])]

        def knn(x, index, layer_names=layer_names):
            return knn_graph(x, k, device, layer_names[index], ordered=ordered)

        sides.append(
            similarity.build_side(
                layers,
                sizes[side],
                metrics,
                knn,
                graphs[side] if graphs else None,
                use_grams,
                cca_dim,
                torch_device(device),
            )  # fmt: skip
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
# the stage: store in, run directory out
# ------------------------------------------------------------------------------------------
@dataclass
class Selection:
    scores: np.ndarray  # (Li, Lt) of the selecting metric (the first of `tables`)
    image_layers: list[str]
    text_layers: list[str]
    info: dict  # what selection.json holds
    tables: dict[str, np.ndarray] = field(default_factory=dict)  # every metric's (Li, Lt)
    calibration: dict[str, similarity.Calibrated] = field(default_factory=dict)

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
    calibration: similarity.Calibrated | None = None,
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
    device: str = "auto"  # kNN search on auto | cpu | cuda
    metric: str = "mutual_knn"  # one metric or a comma list; the first one selects
    calibrate: int = 0  # permutations of the null (0: off)

    def __post_init__(self) -> None:
        if self.seed < 0:
            raise UserError(f"--seed must be >= 0, got {self.seed}")
        if self.device not in ("auto", "cpu", "cuda"):
            raise UserError(f"--device must be auto, cpu or cuda, got {self.device!r}")
        if self.calibrate < 0:
            raise UserError(
                f"--calibrate must be 0 (off) or a number of permutations, got {self.calibrate}"
            )
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
    `settings` (the first one selects) and write scores.parquet, selection.json and the heatmaps
    to `out`. With a dask `scheduler` (address or local:N) the kNN graphs are built on the
    workers, one task per layer. With settings.calibrate = K > 0, K permutations of the text
    rows give the null of every score."""
    from tqdm import tqdm

    dataset, split = spec.dataset, spec.split
    image_model, text_model = spec.image_model, spec.text_model
    n_samples, k, seed, device = settings.n_samples, settings.k, settings.seed, settings.device
    require_directory(Path(out))  # before the work, not after it
    calibrate = settings.calibrate
    metrics = similarity.parse_metrics(settings.metric)  # checked by SelectSettings
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
    if scheduler and any(m in similarity.GRAPH_METRICS for m in metrics):
        from stages.cluster import connect, run_tasks

        jobs = [("image", image_model, name, image_rows) for name in names_i]
        jobs += [("text", text_model, name, text_rows) for name in names_t]
        ordered = any(m in similarity.RANKED_METRICS for m in metrics)
        common = (str(Path(store.root).resolve()), dataset, split, k_value, device, ordered)
        with connect(scheduler) as client:  # one task per layer, features read on the worker
            found = run_tasks(
                client, layer_graph_task, jobs, *common, desc="kNN graphs", unit="layer",
                progress=progress,
            )  # fmt: skip
        graphs = [found[: len(names_i)], found[len(names_i) :]]
    # only the graphs' overlaps need no features here once the cluster has built the graphs
    local = graphs is None or any(m not in similarity.GRAPH_ONLY_METRICS for m in metrics)

    def layers(array, rows, names, what):  # one layer in memory at a time
        for name in tqdm(names, desc=f"{what} layers", disable=not progress):
            yield array.read_layer(name)[rows] if local else None

    sides = metric_sides(
        layers(image, image_rows, names_i, "image"), layers(text, text_rows, names_t, "text"),
        (len(names_i), len(names_t)), n, metrics, k_value, device, graphs=graphs,
        names=([f"{image.path} {x}" for x in names_i], [f"{text.path} {x}" for x in names_t]),
    )  # fmt: skip
    tables = similarity.tables(metrics, *sides)
    calibration = {}
    if calibrate:
        bar = partial(tqdm, desc="permutations", unit="perm", disable=not progress)
        null = similarity.permutation_null(metrics, *sides, calibrate, seed, bar)
        calibration = {m: similarity.calibrate_table(tables[m], null[m]) for m in metrics}
    by_metric = {m: best_pair(tables[m], names_i, names_t, calibration.get(m)) for m in metrics}
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
        "alpha": similarity.ALPHA,
        "image_model": image_model,
        "text_model": text_model,
        "dataset": dataset,
        "split": split,
        "by_metric": by_metric,
        "features": features_identity(spec),
    }
    selection = Selection(tables[metrics[0]], names_i, names_t, info, tables, calibration)
    write_selection(selection, Path(out))
    return selection


def write_selection(selection: Selection, out: Path) -> None:
    """scores.parquet, selection.json, heatmap.png (the selecting metric) and
    heatmap_{metric}.png for each other metric."""
    out.mkdir(parents=True, exist_ok=True)
    selection.table().to_parquet(out / "scores.parquet", index=False)
    write_json_atomic(out / "selection.json", selection.info)
    for rank, metric in enumerate(selection.tables or {"mutual_knn": selection.scores}):
        path = out / ("heatmap.png" if rank == 0 else f"heatmap_{metric}.png")
        plot_heatmap(selection, metric, path)


METRIC_LABELS = {"mutual_knn": "mutual kNN", "cycle_knn": "cycle kNN", "lcs_knn": "LCS kNN"}


def plot_heatmap(selection: Selection, metric: str, path: Path) -> None:
    """Image layers x text layers of one metric, its best pair marked; with a calibration
    a second panel shows the calibrated scores and the p-value of the best pair."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    info = selection.info
    scores = selection.tables.get(metric, selection.scores)
    best = info.get("by_metric", {}).get(metric, info)
    calibration = selection.calibration.get(metric)
    panels = [(scores, METRIC_LABELS.get(metric, metric))]
    if calibration is not None:
        panels.append((calibration.calibrated, f"calibrated ({info['permutations']} perm.)"))
    li, lt = scores.shape
    width = max(5.0, 0.32 * lt + 3)
    fig, axes = plt.subplots(
        1, len(panels), figsize=(width * len(panels), max(4.0, 0.28 * li + 2)), squeeze=False
    )
    for ax, (values, label) in zip(axes[0], panels):
        im = ax.imshow(values, cmap="viridis", aspect="auto", origin="lower")
        fig.colorbar(im, ax=ax, label=f"{label} (k={info['k']}, n={info['n']})")
        ax.set_xticks(range(lt), selection.text_layers, rotation=90, fontsize=7)
        ax.set_yticks(range(li), selection.image_layers, fontsize=7)
        ax.set_xlabel(f"text layer ({info['text_model']})")
        ax.set_ylabel(f"image layer ({info['image_model']})")
        ax.scatter(
            [best["text_index"]], [best["image_index"]], marker="*", s=160, c="red",
            edgecolors="white",
        )  # fmt: skip
    title = (
        f"{info['dataset']}/{info['split']} {metric}: best (*) {best['image_layer']} x "
        f"{best['text_layer']} = {best['score']:.3f}, last pair {best['last_score']:.3f}"
    )
    if calibration is not None:
        title += f"; max-pair p = {best['p_value']:.3g}"
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def top_pairs(selection: Selection, n: int = 10) -> pd.DataFrame:
    return selection.table().sort_values("score", ascending=False, kind="stable").head(n)


# ------------------------------------------------------------------------------------------
# --layers for align: auto | last | IMG,TXT
# ------------------------------------------------------------------------------------------
def resolve_layers(
    layers: str,
    spec: PairSpec,
    select_dir: Path,
    settings: SelectSettings = SelectSettings(),
    *,
    log: Callable[[str], None] = print,
) -> tuple[str, str]:
    """(image layer name, text layer name) of `spec`'s features for `align --layers`.

    auto: the best pair by settings.metric (its first metric) in select_dir/selection.json when
    it was made for these models, dataset and split and scored that metric (and its layers
    exist); otherwise the selection is computed there first (`settings`).
    last: the last layer of each array. IMG,TXT: each by index (negative allowed) or name."""
    _, image, text = spec.arrays()
    layers = layers.strip()
    if layers == "last":
        return image.layer_names[-1], text.layer_names[-1]
    if layers == "auto":
        metric = similarity.parse_metrics(settings.metric)[0]  # checked by SelectSettings
        info = read_selection(Path(select_dir))
        pair = None
        if info is not None:  # the selecting metric's pair is the top level (mutual kNN in
            # files from before --metric), the others' are under by_metric
            selecting = info.get("metric", "mutual_knn") == metric
            pair = info if selecting else info.get("by_metric", {}).get(metric)
        wanted = {
            "image_model": spec.image_model,
            "text_model": spec.text_model,
            "dataset": spec.dataset,
            "split": spec.split,
            "features": features_identity(spec),  # not another store's features
        }
        if (
            pair is None
            or any(info.get(key) != value for key, value in wanted.items())
            or pair.get("image_layer") not in image.layer_names
            or pair.get("text_layer") not in text.layer_names
        ):
            if info is not None:
                log(
                    f"{select_dir}/selection.json is for other features or metrics; selecting again"
                )
            settings = replace(settings, metric=metric)
            pair = run_selection(spec, Path(select_dir), settings).info
        return pair["image_layer"], pair["text_layer"]
    parts = [p.strip() for p in layers.split(",")]
    if len(parts) != 2 or not all(parts):
        raise UserError(
            f"--layers must be auto, last or IMAGE,TEXT (index or name), got {layers!r}"
        )
    return (
        image.layer_names[image.layer_index(parts[0])],
        text.layer_names[text.layer_index(parts[1])],
    )


def features_identity(spec: PairSpec) -> dict[str, str]:
    """What a selection was computed from: the store folder and both arrays' source and model
    fingerprints, so that a selection.json of another store (or re-extracted features) is not
    reused."""
    _, image, text = spec.arrays()
    identity = {"store": str(Path(spec.store).resolve())}
    for side, array in (("image", image), ("text", text)):
        keys = ("source_fingerprint", "model_fingerprint")
        identity[side] = ":".join(str(array.attrs.get(k, "")) for k in keys)
    return identity


def read_selection(select_dir: Path) -> dict | None:
    path = select_dir / "selection.json"
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise UserError(f"{path} is not valid JSON ({err}); delete it or run select again") from err
