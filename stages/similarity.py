"""Layer similarity metrics, each scored from per-layer structures built once: their registry.

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

The registry (`LAYER_METRICS`): one entry per metric, naming the per-layer structures it reads
(kinds of `stages.structures`: graph, ranked_graph, edge_cosines, gram, hops, basis,
transitions, or one registered there) and how every pair is scored from them. The stage
(`select --metric`, its help and its checks), the permutation null (`stages.calibration`) and
`benchmarks/select.py` read it; a metric registered anywhere before they run works in all:

    register_metric(name, needs, label="", scorer=None)

    @register_metric("toy", needs=("gram",), label="toy metric")
    def toy(image: Side, text: Side, perm: torch.Tensor | None) -> np.ndarray:  # (Li, Lt)
        ...  # perm: score the text rows permuted (row r := row perm[r]), for the null

As a decorator it registers a function (image side, text side, perm) -> (Li, Lt) table. Called
with `scorer=`, a function (names, image side, text side, perm) -> {name: table} that scores
several metrics at once: the metrics registered with one scorer are scored in one call (the
graph metrics share their edge lookups, the CKA family its Gram products). A name is lowercase,
without commas; registering it again replaces the entry. A metric that reads a structure of
its own registers that first (`stages.structures.register_structure`).

Per-layer structures, each built once per layer (`stages.structures.build_side`): the kNN graph
(by the caller's exact search) and its edges' cosines; the centred Gram matrix Kc (or, when
the Grams of all layers do not fit in `gram_memory`, the centred features: <Kc, Lc> =
||Xcᵀ Yc||²); the top-q singular basis. Every pair is then scored from the structures alone:
set lookups on the graphs' edges, one matrix product over the stacked Grams, q x q SVDs.
HSIC_u is unchanged by centring the features, so unbiased CKA comes from Kc too: with K~ = Kc
- diag(kc), 1ᵀK~1 = -tr Kc and K~1 = -kc.

l_hop_cka: H K^l H = (H K^(l-1) X)(H X)ᵀ, and K^(l-1) X = X (XᵀX)^(l-1) (d x d products when
d <= n), so each level is one more centred Gram per layer, stored divided by its norm (or, when
the Grams do not fit, its two factors: <U Wᵀ, V Zᵀ> = Σ (UᵀV) ∘ (WᵀZ)). hcs: each layer's
P^l / 2 and Σ_j p log p per row (`stages.losses.structure_targets`); JS = ½ Σ p log p +
½ Σ q log q - Σ m log m with M = (P + Q) / 2, and that last sum mixes the two layers
elementwise: it is the one part computed per pair, an O(n²) pass per level over the two cached
matrices (in row blocks, no n x n temporary), no product with the raw features.

The permutation null and the calibrated scores are `stages.calibration`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stages.structures import (
    HCS_LEVELS,
    HCS_TEMPERATURE,
    HOP_LEVELS,
    Side,
    closure,
    edge_keys,
    factor_dot,
    inverse_permutation,
    lookup,
    masked_hsic,
    relabel_graphs,
    reverse_edges,
)

__all__ = ["HCS_LEVELS", "HCS_TEMPERATURE", "HOP_LEVELS", "LAYER_METRICS", "Side"]
__all__ += ["metric_names", "parse_metrics", "register_metric", "structures_for", "tables"]

Scorer = Callable[[Sequence[str], Side, Side, "torch.Tensor | None"], dict[str, np.ndarray]]
Table = Callable[[Side, Side, "torch.Tensor | None"], np.ndarray]
RESERVED = ("image_layer", "image_index", "text_layer", "text_index", "score")  # table columns


@dataclass(frozen=True)
class LayerMetric:
    """One layer metric: the structures it reads and the scorer of its (Li, Lt) table."""

    name: str
    needs: tuple[str, ...]
    score: Scorer
    label: str


LAYER_METRICS: dict[str, LayerMetric] = {}


def register_metric(
    name: str, needs: Sequence[str], label: str = "", scorer: Scorer | None = None
) -> Callable[[Table], Table] | LayerMetric:
    """Add a layer metric (see the module docstring): a decorator on its table function, or,
    with `scorer`, the entry itself."""
    if not name or name != name.strip().lower() or "," in name or name in RESERVED:
        raise ValueError(f"a metric name is lowercase, without commas or spaces: {name!r}")
    if isinstance(needs, str):
        raise TypeError(f"needs of {name!r}: a sequence of structure names, not a string")
    closure(needs)  # unknown structures: an error now, not at the first selection

    def add(score: Scorer) -> LayerMetric:
        entry = LayerMetric(name, tuple(needs), score, label or name)
        LAYER_METRICS[name] = entry
        return entry

    if scorer is not None:
        return add(scorer)

    def decorator(table: Table) -> Table:
        add(lambda names, image, text, perm: {name: table(image, text, perm)})
        return table

    return decorator


def metric_names() -> tuple[str, ...]:
    """Every registered metric, in the order of registration."""
    return tuple(LAYER_METRICS)


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """A comma list (or a sequence) of metric names, checked; the first one selects."""
    names = spec.split(",") if isinstance(spec, str) else list(spec)
    names = list(dict.fromkeys(name.strip().lower() for name in names if name.strip()))
    unknown = [name for name in names if name not in LAYER_METRICS]
    if unknown or not names:
        known = ", ".join(LAYER_METRICS)
        raise ValueError(f"unknown metric {unknown or spec!r}; known: {known}")
    return names


def structures_for(metrics: Sequence[str]) -> list[str]:
    """The per-layer structures `metrics` read, with those they need, in build order."""
    return closure(need for metric in metrics for need in LAYER_METRICS[metric].needs)


def tables(
    metrics: Sequence[str], image: Side, text: Side, perm: torch.Tensor | None = None
) -> dict[str, np.ndarray]:
    """Every metric's (Li, Lt) float64 table; with perm, the text rows permuted (row r :=
    row perm[r]) through the cached structures. Metrics sharing a scorer: one call."""
    out: dict[str, np.ndarray] = {}
    for metric in metrics:
        if metric not in out:
            score = LAYER_METRICS[metric].score
            group = [m for m in metrics if LAYER_METRICS[m].score is score]
            out |= score(group, image, text, perm)
    return {m: np.asarray(out[m]).astype(np.float64) for m in metrics}


# ------------------------------------------------------------------------------------------
# graph metrics: every text edge looked up among the image layer's edges
# ------------------------------------------------------------------------------------------
def image_graphs(image: Side, perm: torch.Tensor | None):
    """m(X, Y[perm]) = m(X[perm⁻¹], Y): the image graphs (and edge cosines) relabelled, so
    that the text layers' edge index is kept."""
    graphs, sims = image.graphs, image.edge_sims
    if perm is not None:
        inverse = torch.argsort(perm)
        graphs = relabel_graphs(graphs, inverse)
        sims = sims[:, inverse] if sims is not None else None
    return graphs, sims


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
    out = {m: np.empty((li, text.layers)) for m in metrics}
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


@register_metric("mutual_knn", needs=("graph",), label="mutual kNN")
def mutual_knn(image: Side, text: Side, perm: torch.Tensor | None) -> np.ndarray:
    return mutual_knn_table(image_graphs(image, perm)[0], text.graphs)


def indexed_graph_tables(names, image: Side, text: Side, perm: torch.Tensor | None):
    """cycle_knn, lcs_knn and cknna together: one pass over the text layers' edge index."""
    graphs, sims = image_graphs(image, perm)
    return graph_tables(names, graphs, sims, text, image.knn_self)


register_metric("cycle_knn", ("graph",), "cycle kNN", scorer=indexed_graph_tables)
register_metric("lcs_knn", ("ranked_graph",), "LCS kNN", scorer=indexed_graph_tables)
register_metric("cknna", ("edge_cosines",), scorer=indexed_graph_tables)


# ------------------------------------------------------------------------------------------
# CKA family: <Kc_i, Lc_j> for every pair, from the stacked Grams or the centred features
# ------------------------------------------------------------------------------------------
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


def cka_table(cross, norms, image: Side, text: Side, perm) -> np.ndarray:
    return (cross / norms).numpy()


def l_hop_cka_table(cross, norms, image: Side, text: Side, perm) -> np.ndarray:
    """Σ_l CKA(K^l, L^l) / l / Σ_l 1/l; the levels >= 2 are stored normalised."""
    total = cross / norms
    for level in range(2, HOP_LEVELS + 1):
        total += gram_cross(image, text, perm, level) / level
    return (total / sum(1 / level for level in range(1, HOP_LEVELS + 1))).numpy()


def unbiased_cka_table(cross, norms, image: Side, text: Side, perm) -> np.ndarray:
    n = image.n
    kc, lc = image.diag, text.diag if perm is None else text.diag[:, perm]
    diag_dot = (kc @ lc.T).cpu()
    traces = torch.outer(kc.sum(dim=1), lc.sum(dim=1)).cpu()

    def hsic(inner, dot, trace):  # HSIC_u from <Kc, Lc>, kc . lc and tr Kc tr Lc
        return (inner - dot * (1 + 2 / (n - 2)) + trace / ((n - 1) * (n - 2))) / (n * (n - 3))

    self_i = hsic(image.gram_norm2.cpu(), (kc**2).sum(1).cpu(), kc.sum(1).cpu() ** 2)
    self_t = hsic(text.gram_norm2.cpu(), (lc**2).sum(1).cpu(), lc.sum(1).cpu() ** 2)
    return (hsic(cross, diag_dot, traces) / torch.outer(self_i, self_t).sqrt()).numpy()


GRAM_FAMILY = {"cka": cka_table, "unbiased_cka": unbiased_cka_table, "l_hop_cka": l_hop_cka_table}


def gram_tables(
    metrics: Sequence[str], image: Side, text: Side, perm: torch.Tensor | None
) -> dict[str, np.ndarray]:
    """The CKA family together: one <Kc_i, P Lc_j Pᵀ> product for all of them."""
    cross = gram_cross(image, text, perm)
    norms = torch.outer(image.gram_norm2, text.gram_norm2).cpu().sqrt()
    return {name: GRAM_FAMILY[name](cross, norms, image, text, perm) for name in metrics}


register_metric("cka", ("gram",), scorer=gram_tables)
register_metric("unbiased_cka", ("gram",), scorer=gram_tables)
register_metric("l_hop_cka", ("hops",), scorer=gram_tables)


def svcca_table(image: Side, text_bases: torch.Tensor) -> np.ndarray:
    """Mean singular value of U_iᵀ U_j for every pair: (Li, Lt)."""
    products = torch.einsum("anq,bnp->abqp", image.bases, text_bases)
    return torch.linalg.svdvals(products).mean(dim=-1).cpu().numpy()


@register_metric("svcca", needs=("basis",))
def svcca(image: Side, text: Side, perm: torch.Tensor | None) -> np.ndarray:
    return svcca_table(image, text.bases if perm is None else text.bases[:, perm])


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


register_metric("hcs", ("transitions",), scorer=lambda names, *sides: {"hcs": hcs_table(*sides)})
