"""Layer similarity metrics from per-layer structures built once, and their permutation null.

Two representations X (n, dx), Y (n, dy) of the same n samples; each row is L2-normalised
first (as platonic-rep's `compute_score` does before every metric). N_X(i) is the list of the
k nearest neighbours of sample i under cosine similarity, self excluded, in rank order;
K = X Xᵀ, H = I - 11ᵀ/n, Kc = H K H (the centred Gram matrix), kc = diag(Kc).

    mutual_knn    (1/(n k)) Σ_i |N_X(i) ∩ N_Y(i)|
    cycle_knn     (1/n) #{i : some j in N_Y(i) has i in N_X(j)}
    lcs_knn       (1/(n k)) Σ_i LCS(N_X(i), N_Y(i))     (longest common subsequence of the lists)
    cka           <Kc, Lc> / (||Kc|| ||Lc||)           (linear CKA, biased HSIC: Kornblith 2019)
    unbiased_cka  HSIC_u(K, L) / sqrt(HSIC_u(K, K) HSIC_u(L, L)), with K~ = K, zero diagonal:
                  HSIC_u = [tr(K~L~) + 1ᵀK~1 1ᵀL~1 / ((n-1)(n-2)) - 2/(n-2) 1ᵀK~L~1] / (n(n-3))
    cknna         the same with K~, L~ replaced by M∘K, M∘L, M_ij = [j in N_X(i) and j in N_Y(i)],
                  normalised by HSIC_u(M_X∘K, M_X∘K) and HSIC_u(M_Y∘L, M_Y∘L) (Huh et al. 2024)
    svcca         mean of the q canonical correlations of the top-q left singular vectors of
                  the standardised features (columns centred, divided by their std + 1e-8):
                  the singular values of U_Xᵀ U_Y (Raghu et al. 2017; q = cca_dim = 10)
    l_hop_cka     Σ_{l=1..h} CKA(K^l, L^l) / l  /  Σ_{l=1..h} 1/l: linear CKA (biased HSIC) of
                  the matrix powers of the uncentred Grams (the authors' metrics.py, h =
                  HOP_LEVELS = 3; they divide by h, so that identical layers score 0.61)
    hcs           exp(-R_S), R_S = (1/h) Σ_{l=1..h} JS(P^l, Q^l) / l: the STRUCTURE
                  regularizer of stages.losses (rows normalised then centred, P = row-softmax
                  of X Xᵀ / 0.05, JS averaged over rows; h = 3)

Per-layer structures, each built once (`build_side`): the kNN graph (by the caller's exact
search) and its edges' cosines; the centred Gram matrix Kc (or, when the Grams of all layers
do not fit in `gram_memory`, the centred features: <Kc, Lc> = ||Xcᵀ Yc||²); the top-q singular
basis. Every pair is then scored from the structures alone: set lookups on the graphs' edges,
one matrix product over the stacked Grams, q x q SVDs. HSIC_u is unchanged by centring the
features, so unbiased CKA comes from Kc too: with K~ = Kc - diag(kc), 1ᵀK~1 = -tr Kc and
K~1 = -kc.

l_hop_cka: H K^l H = (H K^(l-1) X)(H X)ᵀ, and K^(l-1) X = X (XᵀX)^(l-1) (d x d products when
d <= n), so each level is one more centred Gram per layer, stored divided by its norm (or, when
the Grams do not fit, its two factors: <U Wᵀ, V Zᵀ> = Σ (UᵀV) ∘ (WᵀZ)). hcs: each layer's
P^l / 2 and Σ_j p log p per row (`stages.losses.structure_targets`); JS = ½ Σ p log p +
½ Σ q log q - Σ m log m with M = (P + Q) / 2, and that last sum mixes the two layers
elementwise: it is the one part computed per pair, an O(n²) pass per level over the two cached
matrices (in row blocks, no n x n temporary), no product with the raw features.

The permutation null (Gröger, Wen, Brbić: "Revisiting the Platonic Representation
Hypothesis: An Aristotelian View"; package `calibrated-similarity`): Y's rows are permuted,
the same permutation for every layer pair, which only relabels the cached structures (a
graph g becomes inv[g[π]], a Gram Kc becomes Kc[π][:, π]); no search runs again. From the
observed s and the null values s_1..s_K: tau = the ceil((1 - α)(K + 1))-th smallest of
{s, s_1..s_K}, calibrated = clip((s - tau) / (1 - tau), 0, 1) (0 under the null), p = (1 +
#{s_k >= s}) / (K + 1), per pair and for the maximum over pairs (whose null is the maximum of
each permuted table: selection's multiple comparisons).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from stages.losses import structure_targets

GRAPH_METRICS = ("mutual_knn", "cycle_knn", "lcs_knn", "cknna")
GRAPH_ONLY_METRICS = ("mutual_knn", "cycle_knn", "lcs_knn")  # read nothing but the kNN graphs
INDEXED_METRICS = ("cycle_knn", "lcs_knn", "cknna")  # from the text layers' edge index
RANKED_METRICS = ("lcs_knn",)  # read the neighbours' rank order; the other graph metrics, sets
GRAM_METRICS = ("cka", "unbiased_cka", "l_hop_cka")
METRICS = (*GRAPH_METRICS, *GRAM_METRICS, "svcca", "hcs")
ALPHA = 0.05
HOP_LEVELS = 3  # l_hop_cka's kernel powers, as the authors' default
HCS_LEVELS, HCS_TEMPERATURE = 3, 0.05  # hcs: R_S's levels and temperature, the authors' defaults


def grams_per_layer(metrics: Sequence[str]) -> int:
    """How many n x n centred Grams each layer holds for `metrics` (l_hop_cka: one a level)."""
    if "l_hop_cka" in metrics:
        return HOP_LEVELS
    return 1 if any(m in GRAM_METRICS for m in metrics) else 0


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """A comma list (or a sequence) of metric names, checked; the first one selects."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(name.strip().lower() for name in names if name.strip()))
    unknown = [name for name in names if name not in METRICS]
    if unknown or not names:
        raise ValueError(f"unknown metric {unknown or spec!r}; known: {', '.join(METRICS)}")
    return names


# ------------------------------------------------------------------------------------------
# per-layer structures
# ------------------------------------------------------------------------------------------
@dataclass
class Side:
    """The structures of every layer of one model, stacked over layers."""

    n: int
    device: str = "cpu"
    graphs: torch.Tensor | None = None  # (L, n, k) int64 neighbour ids, rank order
    edge_sims: torch.Tensor | None = None  # (L, n, k) cosine at each edge (cknna)
    grams: torch.Tensor | None = None  # (L, n, n) centred Gram matrices
    factors: list[torch.Tensor] = field(default_factory=list)  # centred features (no Grams)
    diag: torch.Tensor | None = None  # (L, n) float64 kc = diag(Kc)
    gram_norm2: torch.Tensor | None = None  # (L,) float64 ||Kc||²
    bases: torch.Tensor | None = None  # (L, n, q) float64 top-q left singular vectors
    knn_self: torch.Tensor | None = None  # (L,) float64 HSIC_u(M∘K, M∘K) (cknna)
    hops: torch.Tensor | None = None  # (h - 1, L, n, n) H K^l H / ||H K^l H||, l = 2..h
    hop_factors: list[list[torch.Tensor]] = field(default_factory=list)  # no Grams: H K^(l-1) X
    half_probs: torch.Tensor | None = None  # (L, h, n, n) P^l / 2 (hcs)
    neg_entropy: torch.Tensor | None = None  # (L, h, n) float64 Σ_j p log p per row (hcs)
    edge_index: list | None = None  # the graphs' EdgeIndex, built when first needed

    @property
    def layers(self) -> int:
        for value in (self.graphs, self.grams, self.bases, self.diag, self.half_probs):
            if value is not None:
                return len(value)
        return len(self.factors)


def unit_rows(x: np.ndarray | torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    x = torch.as_tensor(np.asarray(x), device=device).double()
    return (x / torch.linalg.vector_norm(x, dim=1, keepdim=True)).to(dtype)


def singular_basis(unit: torch.Tensor, q: int) -> torch.Tensor:
    """The top-q left singular vectors (n, q) float64 of the standardised features, from the
    eigenvectors of the smaller of ZᵀZ and ZZᵀ."""
    z = unit.double()
    z = (z - z.mean(dim=0)) / (z.std(dim=0) + 1e-8)  # as the authors' svcca
    n, d = z.shape
    small = z.to(unit.dtype)  # the n d min(n, d) product in the working precision
    if d <= n:
        values, vectors = torch.linalg.eigh((small.T @ small).double())
        top = vectors[:, -q:].flip(1)
        return (z @ top) / values[-q:].flip(0).clamp_min(1e-300).sqrt()
    return torch.linalg.eigh((small @ small.T).double())[1][:, -q:].flip(1)


def edge_cosines(unit: torch.Tensor, graph: torch.Tensor, block: int = 256) -> torch.Tensor:
    """(n, k) cosine of each row with its neighbours, a block of rows at a time (the gathered
    neighbours of all rows at once would be n k d floats)."""
    out = torch.empty(graph.shape, dtype=unit.dtype, device=unit.device)
    for start in range(0, len(graph), block):
        rows = slice(start, start + block)
        out[rows] = (unit[graph[rows]] * unit[rows, None, :]).sum(dim=-1)
    return out


def build_side(
    layers: Iterable[np.ndarray],
    n_layers: int,
    metrics: Sequence[str],
    knn: Callable[[np.ndarray, int], np.ndarray] | None = None,
    graphs: Sequence[np.ndarray] | None = None,
    use_grams: bool = True,
    cca_dim: int = 10,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Side:
    """The structures the metrics need, one layer at a time (`layers` may be a generator).
    knn(x, layer_index) gives a layer's kNN graph; or pass the prebuilt `graphs` (then a layer
    may be None when no metric but the kNN overlaps needs its features)."""
    need_graph = any(m in GRAPH_METRICS for m in metrics)
    need_gram = any(m in GRAM_METRICS for m in metrics)
    side: Side | None = None
    for index, x in enumerate(layers):
        n = len(x) if x is not None else len(graphs[index])
        if side is None:
            side = Side(n, device)
            if need_gram:
                side.diag = torch.empty((n_layers, n), dtype=torch.float64, device=device)
                side.gram_norm2 = torch.empty(n_layers, dtype=torch.float64, device=device)
                if use_grams:  # preallocated: one copy of the stacked Grams, never two
                    side.grams = torch.empty((n_layers, n, n), dtype=dtype, device=device)
        # graphs come from the caller's search: the graph-only metrics need no unit rows
        needs_unit = x is not None and any(m not in GRAPH_ONLY_METRICS for m in metrics)
        unit = unit_rows(x, device, dtype) if needs_unit else None
        if need_graph:
            graph = np.asarray(graphs[index] if graphs is not None else knn(x, index))
            graph = torch.as_tensor(graph, device=device).long()
            if side.graphs is None:
                side.graphs = torch.empty((n_layers, *graph.shape), dtype=torch.long, device=device)
                if "cknna" in metrics:
                    side.edge_sims = torch.empty(side.graphs.shape, dtype=dtype, device=device)
            side.graphs[index] = graph
            if "cknna" in metrics:
                side.edge_sims[index] = edge_cosines(unit, graph)
        if need_gram:
            centred = unit - unit.mean(dim=0)
            side.diag[index] = (centred.double() ** 2).sum(dim=1)
            if use_grams:
                gram = side.grams[index]
                torch.matmul(centred, centred.T, out=gram)
            else:
                side.factors.append(centred)
                gram = centred.T @ centred if centred.shape[1] < n else centred @ centred.T
            side.gram_norm2[index] = torch.linalg.vector_norm(gram, dtype=torch.float64) ** 2
            if "l_hop_cka" in metrics:
                add_hops(side, index, unit, centred, n_layers, use_grams)
        if "hcs" in metrics:
            add_transitions(side, index, unit, n_layers)
        if "svcca" in metrics:
            basis = singular_basis(unit, min(cca_dim, unit.shape[1], n - 1))
            if side.bases is None:
                side.bases = torch.empty((n_layers, *basis.shape), dtype=basis.dtype, device=device)
            side.bases[index] = basis
    if side is None:
        raise ValueError("no layers")
    if "cknna" in metrics:
        side.knn_self = torch.stack(
            [self_masked_hsic(g, s) for g, s in zip(side.graphs, side.edge_sims)]
        )
    return side


def kernel_powers(unit: torch.Tensor, levels: int) -> Iterable[torch.Tensor]:
    """H K^(l-1) X (n, d) for l = 2..levels, K = X Xᵀ uncentred, each divided by its norm (only
    directions matter to CKA): so that H K^l H = (H K^(l-1) X)(H X)ᵀ up to scale."""
    n, d = unit.shape
    step = unit.T @ unit if d <= n else unit @ unit.T  # the smaller of XᵀX and XXᵀ
    power = unit
    for _ in range(2, levels + 1):
        power = power @ step if d <= n else step @ power  # K^(l-1) X = X (XᵀX)^(l-1)
        power = power / torch.linalg.vector_norm(power)
        yield power - power.mean(dim=0)


def add_hops(
    side: Side, index: int, unit: torch.Tensor, centred: torch.Tensor, n_layers: int,
    use_grams: bool,
) -> None:  # fmt: skip
    """l_hop_cka's levels 2..h of one layer: H K^l H / ||H K^l H||, or its factors."""
    n = side.n
    if use_grams and side.hops is None:
        shape = (HOP_LEVELS - 1, n_layers, n, n)
        side.hops = torch.empty(shape, dtype=centred.dtype, device=side.device)
    if not use_grams and not side.hop_factors:
        side.hop_factors = [[] for _ in range(HOP_LEVELS - 1)]
    for level, left in enumerate(kernel_powers(unit, HOP_LEVELS)):
        if use_grams:
            gram = side.hops[level, index]
            torch.matmul(left, centred.T, out=gram)
            gram /= torch.linalg.vector_norm(gram, dtype=torch.float64).to(gram.dtype)
        else:
            norm2 = factor_dot(left, centred, left, centred)
            side.hop_factors[level].append(left / norm2.sqrt().to(left.dtype))


def add_transitions(side: Side, index: int, unit: torch.Tensor, n_layers: int) -> None:
    """hcs's structures of one layer: P^l / 2 and Σ_j p log p for l = 1..h."""
    targets = structure_targets(unit, HCS_LEVELS, HCS_TEMPERATURE)
    if side.half_probs is None:
        n = side.n
        side.half_probs = torch.empty(
            (n_layers, HCS_LEVELS, n, n), dtype=unit.dtype, device=side.device
        )
        side.neg_entropy = torch.empty(
            (n_layers, HCS_LEVELS, n), dtype=torch.float64, device=side.device
        )
    for level in range(HCS_LEVELS):
        side.half_probs[index, level] = targets.half_probs[level]
        side.neg_entropy[index, level] = targets.neg_entropy[level].double()


# ------------------------------------------------------------------------------------------
# the permutation acts on the structures, not on the features
# ------------------------------------------------------------------------------------------
def inverse_permutation(perm: torch.Tensor) -> torch.Tensor:
    """inverse[perm[i]] = i: a scatter, O(n)."""
    inverse = torch.empty_like(perm)
    inverse[perm] = torch.arange(len(perm), device=perm.device)
    return inverse


def relabel_graphs(graphs: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """The kNN graphs of the features with rows permuted (row r := row perm[r]): row r's
    neighbours are those of perm[r], renamed by the inverse permutation."""
    return inverse_permutation(perm)[graphs[:, perm]]


# ------------------------------------------------------------------------------------------
# graph metrics: every text edge looked up among the image layer's edges
# ------------------------------------------------------------------------------------------
def graph_overlap(a: np.ndarray, b: np.ndarray) -> float:
    """mKNN of two kNN graphs (n, k) over the same samples: mean shared neighbours / k."""
    if a.shape != b.shape:
        raise ValueError(f"graphs differ in shape: {a.shape} vs {b.shape}")
    # rows hold distinct ids, so after sorting each row of [a | b] a shared id is a repeat
    both = np.sort(np.concatenate([a, b], axis=1), axis=1)
    return float(np.count_nonzero(both[:, 1:] == both[:, :-1])) / a.size


def mutual_knn_table(image_graphs: torch.Tensor, text_graphs: torch.Tensor) -> np.ndarray:
    """(Li, Lt) float64 graph_overlap of every pair of (L, n, k) graphs: numpy's row sorts on
    the CPU (10x torch's here, and 10x the edge-index lookups the other graph metrics share),
    torch on CUDA, one image layer against all text layers at once."""
    li, n, k = image_graphs.shape
    if image_graphs.device.type == "cpu":
        image, text = image_graphs.numpy().astype(np.int32), text_graphs.numpy().astype(np.int32)
        return np.array([[graph_overlap(a, b) for b in text] for a in image])
    lt = len(text_graphs)
    block = max(1, 2**27 // (lt * 2 * k))  # rows per step: ~1 GiB of int64 per sort
    counts = torch.zeros((li, lt), dtype=torch.int64, device=image_graphs.device)
    for i in range(li):
        for start in range(0, n, block):
            rows = slice(start, start + block)
            both = torch.cat([image_graphs[i, rows].expand(lt, -1, -1), text_graphs[:, rows]], 2)
            both = torch.sort(both, dim=2).values
            counts[i] += (both[..., 1:] == both[..., :-1]).sum(dim=(1, 2))
    return counts.cpu().numpy().astype(np.float64) / (n * k)


def edge_keys(graph: torch.Tensor) -> torch.Tensor:
    """(..., n, k) keys i * n + j of the edges i -> j."""
    n = graph.shape[-2]
    return torch.arange(n, device=graph.device)[:, None] * n + graph


def lookup(sorted_keys: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """Position of each query in sorted_keys, or -1 where absent."""
    where = torch.searchsorted(sorted_keys, queries).clamp_max(len(sorted_keys) - 1)
    return torch.where(sorted_keys[where] == queries, where, -1)


def reverse_edges(graph: torch.Tensor) -> torch.Tensor:
    """For each edge r -> c of an (n, k) graph (flattened), the position of c -> r, or -1."""
    n, k = graph.shape
    keys = edge_keys(graph).reshape(-1)
    order = torch.argsort(keys)
    rows = torch.arange(n, device=graph.device).repeat_interleave(k)
    back = lookup(keys[order], graph.reshape(-1) * n + rows)
    return torch.where(back >= 0, order[back.clamp_min(0)], -1)


def masked_hsic(
    n: int, rows: torch.Tensor, cols: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
    mutual: torch.Tensor,
) -> torch.Tensor:  # fmt: skip
    """HSIC_u(A, B) of n x n matrices that are nonzero only on edges rows -> cols (off the
    diagonal), one column per mask: a, b (E, c) the values there (0 outside the mask), mutual
    (E, c) whether the reverse edge is in the mask too (where B_cr = b_rc: symmetric kernels)."""
    trace = (a * b * mutual).sum(dim=0)  # sum_rc A_rc B_cr
    sums = a.sum(dim=0) * b.sum(dim=0) / ((n - 1) * (n - 2))
    col_a = torch.zeros((n, a.shape[1]), dtype=a.dtype, device=a.device).index_add_(0, cols, a)
    row_b = torch.zeros((n, b.shape[1]), dtype=b.dtype, device=b.device).index_add_(0, rows, b)
    return (trace + sums - 2 * (col_a * row_b).sum(dim=0) / (n - 2)) / (n * (n - 3))


def self_masked_hsic(graph: torch.Tensor, sims: torch.Tensor) -> torch.Tensor:
    """HSIC_u(M∘K, M∘K) of one layer, M its kNN graph's adjacency."""
    n, k = graph.shape
    rows = torch.arange(n, device=graph.device).repeat_interleave(k)
    values = sims.reshape(-1, 1).double()
    mutual = (reverse_edges(graph) >= 0)[:, None]
    return masked_hsic(n, rows, graph.reshape(-1), values, values, mutual)[0]


def longest_increasing(seq: torch.Tensor) -> torch.Tensor:
    """Length of the longest strictly increasing subsequence of each row, ignoring -1
    entries (patience sorting with a binary search, vectorised over rows). Values < k."""
    rows, k = seq.shape
    seq = seq.to(torch.int32)
    tails = torch.full((rows, k + 1), k, dtype=torch.int32, device=seq.device)  # k: above all
    index = torch.arange(rows, device=seq.device)
    for t in range(k):
        value = seq[:, t]
        slot = torch.searchsorted(tails, value.clamp_min(0)[:, None]).squeeze(1)
        # rows without a value at t write their old tail back: no masked copies
        tails[index, slot] = torch.where(value >= 0, value, tails[index, slot])
    return (tails < k).sum(dim=1)


EDGE_INDEX_LAYERS = 8  # text layers per edge index: its ranks are (edges, 8) int16


@dataclass
class EdgeIndex:
    """The edges of a few layers' kNN graphs: sorted distinct keys i * n + j, and each edge's
    rank in each layer's neighbour list (-1: not an edge there)."""

    layers: slice
    keys: torch.Tensor  # (U,) int64
    ranks: torch.Tensor  # (U, len(layers)) int16


def edge_indexes(graphs: torch.Tensor) -> list[EdgeIndex]:
    out = []
    count, n, k = graphs.shape
    for start in range(0, count, EDGE_INDEX_LAYERS):
        part = graphs[start : start + EDGE_INDEX_LAYERS]
        keys, inverse = torch.unique(edge_keys(part).reshape(-1), return_inverse=True)
        ranks = torch.full((len(keys), len(part)), -1, dtype=torch.int16, device=graphs.device)
        layer = torch.arange(len(part), device=graphs.device).repeat_interleave(n * k)
        rank = torch.arange(k, device=graphs.device).repeat(len(part) * n)
        ranks[inverse, layer] = rank.to(torch.int16)
        out.append(EdgeIndex(slice(start, start + len(part)), keys, ranks))
    return out


def graph_tables(
    metrics: Sequence[str], image_graphs: torch.Tensor, image_sims: torch.Tensor, text: Side,
    image_self: torch.Tensor | None,
) -> dict[str, np.ndarray]:  # fmt: skip
    """The indexed metrics' (Li, Lt) tables: every image edge looked up once in the text
    layers' edge index, which gives its rank in every text layer at once."""
    li, n, k = image_graphs.shape
    out = {m: np.empty((li, text.layers)) for m in metrics if m in INDEXED_METRICS}
    if text.edge_index is None:
        text.edge_index = edge_indexes(text.graphs)
    device = image_graphs.device
    rows = torch.arange(n, device=device).repeat_interleave(k)
    for i in range(li):
        cols = image_graphs[i].reshape(-1)
        keys = rows * n + cols
        # the image edges r -> c read as text edges c -> r, sorted: a lookup in key order
        # touches the index's memory in order (random queries were 2x slower than the rest)
        reverse = torch.sort(cols * n + rows).values
        back_edge = reverse_edges(image_graphs[i]) if "cknna" in out else None  # c -> r, if any
        for index in text.edge_index:
            at = lookup(index.keys, keys)
            ranks = torch.where((at >= 0)[:, None], index.ranks[at.clamp_min(0)], -1)  # (nk, c)
            shared = ranks >= 0
            part = (i, index.layers)
            if "lcs_knn" in out:  # text ranks in image-rank order: LCS = their LIS (ids distinct)
                seq = ranks.reshape(n, k, -1).transpose(1, 2).reshape(-1, k)
                lengths = longest_increasing(seq).reshape(n, -1).sum(dim=0)
                out["lcs_knn"][part] = (lengths.double() / (n * k)).cpu().numpy()
            if "cycle_knn" in out:  # sample c is cycled if a text edge c -> r has r -> c in image
                back = lookup(index.keys, reverse)
                found = torch.where(
                    (back >= 0)[:, None], index.ranks[back.clamp_min(0)] >= 0, False
                )
                cycled = torch.zeros((n, found.shape[1]), device=device)
                cycled.index_add_(0, reverse // n, found.float())
                out["cycle_knn"][part] = (cycled > 0).double().mean(dim=0).cpu().numpy()
            if "cknna" in out:
                sims = text.edge_sims[index.layers].double()  # (c, n, k)
                layer = torch.arange(sims.shape[0], device=device)
                b = sims[layer, rows[:, None], ranks.long().clamp_min(0)] * shared  # (nk, c)
                a = image_sims[i].reshape(-1).double()[:, None] * shared
                mutual = torch.where(
                    (back_edge >= 0)[:, None], shared[back_edge.clamp_min(0)], False
                )
                cross = masked_hsic(n, rows, cols, a, b, shared & mutual)
                norm = torch.sqrt(image_self[i] * text.knn_self[index.layers])
                out["cknna"][part] = (cross / norm).cpu().numpy()
    return out


# ------------------------------------------------------------------------------------------
# CKA family: <Kc_i, Lc_j> for every pair, from the stacked Grams or the centred features
# ------------------------------------------------------------------------------------------
def factor_dot(u: torch.Tensor, w: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """<U Wᵀ, V Zᵀ> = Σ (UᵀV) ∘ (WᵀZ), float64, without the n x n matrices."""
    right = w.T @ z
    left = right if u is w and v is z else u.T @ v
    return (left.double() * right.double()).sum()


def factor_cross(
    image: Sequence[tuple[torch.Tensor, torch.Tensor]],
    text: Sequence[tuple[torch.Tensor, torch.Tensor]],
    perm: torch.Tensor | None,
) -> torch.Tensor:
    """(Li, Lt) float64 <U_i W_iᵀ, P V_j Z_jᵀ Pᵀ> of Grams given by their factors (U, W)."""
    cross = torch.empty((len(image), len(text)), dtype=torch.float64)
    for j, (v, z) in enumerate(text):
        if perm is not None:
            v, z = (v[perm], z[perm]) if v is not z else (v[perm],) * 2
        for i, (u, w) in enumerate(image):
            cross[i, j] = factor_dot(u, w, v, z)
    return cross


def stacked_cross(
    image: torch.Tensor, text: torch.Tensor, perm: torch.Tensor | None, chunk_bytes: int = 2**29
) -> torch.Tensor:
    """(Li, Lt) float64 <A_i, P B_j Pᵀ> of stacked (L, n, n) Grams: one product (a few text
    layers permuted at a time)."""
    li, n = len(image), image.shape[-1]
    flat = image.reshape(li, n * n)
    step = max(1, chunk_bytes // (n * n * text.element_size()))
    parts = []
    for start in range(0, len(text), step):
        grams = text[start : start + step]
        if perm is not None:  # one gather: rows and columns at once
            grams = grams[:, perm[:, None], perm[None, :]]
        # float32 products of n² terms, summed in float64 blocks of rows for accuracy
        part = torch.zeros((li, len(grams)), dtype=torch.float64, device=flat.device)
        rows = max(1, 2**22 // n)
        for r in range(0, n, rows):
            block = slice(r * n, min(n, r + rows) * n)
            part += (flat[:, block] @ grams.reshape(len(grams), n * n)[:, block].T).double()
        parts.append(part)
    return torch.cat(parts, dim=1).cpu()


def gram_cross(image: Side, text: Side, perm: torch.Tensor | None, level: int = 1):
    """(Li, Lt) float64 <Kc_i, P Lc_j Pᵀ> (level 1) or l_hop_cka's <H K^l H, P H L^l H Pᵀ>
    normalised (level l >= 2), from the stacked Grams or their factors."""
    if level == 1:
        if image.grams is not None:
            return stacked_cross(image.grams, text.grams, perm)
        return factor_cross(*([(x, x) for x in side.factors] for side in (image, text)), perm)
    if image.hops is not None:
        return stacked_cross(image.hops[level - 2], text.hops[level - 2], perm)
    pairs = [list(zip(side.hop_factors[level - 2], side.factors)) for side in (image, text)]
    return factor_cross(*pairs, perm)


def gram_tables(
    metrics: Sequence[str], image: Side, text: Side, perm: torch.Tensor | None
) -> dict[str, np.ndarray]:
    cross = gram_cross(image, text, perm)
    out = {}
    norms = torch.outer(image.gram_norm2, text.gram_norm2).cpu().sqrt()
    if "cka" in metrics:
        out["cka"] = (cross / norms).numpy()
    if "l_hop_cka" in metrics:  # Σ_l CKA(K^l, L^l) / l / Σ_l 1/l; levels >= 2 stored normalised
        total = cross / norms
        for level in range(2, HOP_LEVELS + 1):
            total += gram_cross(image, text, perm, level) / level
        out["l_hop_cka"] = (total / sum(1 / level for level in range(1, HOP_LEVELS + 1))).numpy()
    if "unbiased_cka" in metrics:
        n = image.n
        kc, lc = image.diag, text.diag if perm is None else text.diag[:, perm]
        diag_dot = (kc @ lc.T).cpu()
        traces = torch.outer(kc.sum(dim=1), lc.sum(dim=1)).cpu()

        def hsic(inner, dot, trace):  # HSIC_u from <Kc, Lc>, kc . lc and tr Kc tr Lc
            return (inner - dot * (1 + 2 / (n - 2)) + trace / ((n - 1) * (n - 2))) / (n * (n - 3))

        self_i = hsic(image.gram_norm2.cpu(), (kc**2).sum(1).cpu(), kc.sum(1).cpu() ** 2)
        self_t = hsic(text.gram_norm2.cpu(), (lc**2).sum(1).cpu(), lc.sum(1).cpu() ** 2)
        out["unbiased_cka"] = (
            hsic(cross, diag_dot, traces) / torch.outer(self_i, self_t).sqrt()
        ).numpy()
    return out


def svcca_table(image: Side, text_bases: torch.Tensor) -> np.ndarray:
    """Mean singular value of U_iᵀ U_j for every pair: (Li, Lt)."""
    products = torch.einsum("anq,bnp->abqp", image.bases, text_bases)
    return torch.linalg.svdvals(products).mean(dim=-1).cpu().numpy()


def hcs_table(image: Side, text: Side, perm: torch.Tensor | None, block_bytes: int = 2**28):
    """(Li, Lt) exp(-R_S): JS(P^l, Q^l) averaged over rows = ½ mean Σ p log p + ½ mean Σ q log q
    - (1/n) Σ m log m, the last from the cached P^l / 2 and Q^l / 2, a block of rows of all
    text layers at a time. With perm the image side is relabelled by its inverse instead (the
    row mean does not change)."""
    li, levels, n, _ = image.half_probs.shape
    lt = text.layers
    inverse = None if perm is None else inverse_permutation(perm)
    mixed = torch.zeros((li, lt, levels), dtype=torch.float64, device=image.half_probs.device)
    rows = min(n, max(1, block_bytes // (lt * n * image.half_probs.element_size())))
    buffer = image.half_probs.new_empty((lt, rows, n))
    for i in range(li):
        for level in range(levels):
            half = image.half_probs[i, level]
            if inverse is not None:
                half = half[inverse[:, None], inverse[None, :]]
            for start in range(0, n, rows):
                block = slice(start, start + rows)
                m = buffer[:, : len(half[block])]
                torch.add(text.half_probs[:, level, block], half[block], out=m)  # (Lt, rows, n)
                torch.special.xlogy(m, m, out=m)  # m log m in place (0 log 0 = 0)
                # float32 sums are pairwise (accurate); the blocks add up in float64
                mixed[i, :, level] += m.sum(dim=(1, 2)).double()
    own = 0.5 * (image.neg_entropy.mean(dim=-1)[:, None] + text.neg_entropy.mean(dim=-1)[None])
    js = own - mixed / n  # (Li, Lt, h)
    weights = 1 / torch.arange(1, levels + 1, dtype=torch.float64, device=js.device) / levels
    return torch.exp(-(js * weights).sum(dim=-1)).cpu().numpy()


def tables(
    metrics: Sequence[str], image: Side, text: Side, perm: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """Every metric's (Li, Lt) float64 table; with perm, the text rows permuted (row r :=
    row perm[r]) through the cached structures."""
    out: dict[str, np.ndarray] = {}
    if any(m in GRAPH_METRICS for m in metrics):
        # m(X, Y[perm]) = m(X[perm⁻¹], Y): relabel the image graphs and keep the text index
        graphs, sims = image.graphs, image.edge_sims
        if perm is not None:
            inverse = torch.argsort(perm)
            graphs = relabel_graphs(graphs, inverse)
            sims = sims[:, inverse] if sims is not None else None
        if "mutual_knn" in metrics:
            out["mutual_knn"] = mutual_knn_table(graphs, text.graphs)
        if any(m in INDEXED_METRICS for m in metrics):
            out |= graph_tables(metrics, graphs, sims, text, image.knn_self)
    if any(m in GRAM_METRICS for m in metrics):
        out |= gram_tables(metrics, image, text, perm)
    if "svcca" in metrics:
        out["svcca"] = svcca_table(image, text.bases if perm is None else text.bases[:, perm])
    if "hcs" in metrics:
        out["hcs"] = hcs_table(image, text, perm)
    return {m: out[m].astype(np.float64) for m in metrics}


# ------------------------------------------------------------------------------------------
# the permutation null
# ------------------------------------------------------------------------------------------
def calibrate(
    observed: np.ndarray, null: np.ndarray, alpha: float = ALPHA, smax: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibrated, p_value, tau) of observed scores (...) against null scores (K, ...), as
    `calibrated_similarity.calibrate`: tau the ceil((1 - alpha)(K + 1))-th smallest of
    observed and null, calibrated = clip((s - tau) / (smax - tau), 0, 1), add-one p."""
    observed, null = np.asarray(observed, dtype=np.float64), np.asarray(null, dtype=np.float64)
    count = len(null)
    combined = np.sort(np.concatenate([observed[None], null]), axis=0)
    tau = combined[min(max(math.ceil((1 - alpha) * (count + 1)) - 1, 0), count)]
    p_value = (1 + (null >= observed).sum(axis=0)) / (count + 1)
    calibrated = np.clip((observed - tau) / np.maximum(smax - tau, 1e-12), 0.0, 1.0)
    return calibrated, p_value, tau


def permutation_null(
    metrics: Sequence[str], image: Side, text: Side, permutations: int, seed: int = 0,
    progress: Callable[[Iterable], Iterable] = iter,
) -> dict[str, np.ndarray]:  # fmt: skip
    """(K, Li, Lt) null tables per metric: K seeded permutations of the text rows, each
    applied to every layer pair at once."""
    rng = np.random.default_rng(seed)
    null = {m: np.empty((permutations, image.layers, text.layers)) for m in metrics}
    for t in progress(range(permutations)):
        perm = torch.as_tensor(rng.permutation(image.n), device=text.device)
        for m, table in tables(metrics, image, text, perm).items():
            null[m][t] = table
    return null


@dataclass
class Calibrated:
    """One metric's calibration: per pair, and for the maximum over all pairs."""

    calibrated: np.ndarray  # (Li, Lt)
    p_value: np.ndarray  # (Li, Lt)
    max_calibrated: float
    max_p_value: float


def calibrate_table(observed: np.ndarray, null: np.ndarray, alpha: float = ALPHA) -> Calibrated:
    """Calibrate an (Li, Lt) table against its (K, Li, Lt) null, per pair and for the max
    (the max of each permuted table is the null of the selected pair's score)."""
    calibrated, p_value, _ = calibrate(observed, null, alpha)
    best, best_p, _ = calibrate(observed.max(), null.reshape(len(null), -1).max(axis=1), alpha)
    return Calibrated(calibrated, p_value, float(best), float(best_p))
