"""The exact kNN search engine of layer selection: every layer's k nearest neighbours (cosine),
the same on every machine.

Mutual kNN of two feature sets A, B over the same n samples (cosine similarity, k neighbours,
a sample never its own neighbour) needs each layer's kNN graph once (`knn_graph`); the layer
metrics of `stages.similarity` then score every pair from the graphs alone.

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

Also here: k from an integer or a rule on n (`resolve_k`), and one graph per layer of a model
(`layer_graphs`). Pure: arrays in, arrays out; no store, no files.
"""

from __future__ import annotations

import math
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import cache, partial

import numpy as np

from store import UserError

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
# every layer of a model
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
