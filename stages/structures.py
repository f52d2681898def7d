"""Per-layer structures of the layer metrics, each built once per layer: the registry of kinds.

A structure is what a layer metric reads instead of the raw features (`stages.similarity`
scores every layer pair from them). The kinds, by name (`STRUCTURES`):

    graph          the layer's kNN graph (neighbour sets), by the caller's exact search
    ranked_graph   the same graph in rank order (LCS reads the order; sets are cheaper)
    edge_cosines   the cosine at each edge of the graph, and HSIC_u(M∘K, M∘K) (CKNNA)
    gram           the centred Gram matrix Kc (or, when the Grams of all layers do not fit, the
                   centred features: <Kc, Lc> = ||Xcᵀ Yc||²), kc = diag(Kc) and ||Kc||²
    hops           H K^l H / ||H K^l H|| for l = 2..HOP_LEVELS, or its factors (l_hop_cka)
    basis          the top-q left singular vectors of the standardised features (SVCCA)
    transitions    P^l / 2 and Σ_j p log p per row for l = 1..HCS_LEVELS (hcs)

`register_structure(name, build, needs=(), features=True, grams=0, check=None, finish=None)`
adds a kind: `build(side, index, layer)` adds layer `index`'s structure to `side` (a `Side`;
a new kind keeps its values with `side.put(name, index, value)`, read back with
`side.stacked(name)`); `layer` is a `Layer`, whose `unit` (float rows, L2-normalised in
float64) and `centred` are computed once and shared; `needs` are kinds built first;
`features`: whether it reads the layer's features (the graph needs none when the caller
passes prebuilt graphs); `grams`: n x n matrices it keeps per layer (they decide Grams or
factors); `check(sizes, n, device)` refuses, before any work, what cannot fit;
`finish(side)` runs once after the last layer.

A permutation of the rows only relabels the structures (`inverse_permutation`,
`relabel_graphs`): the permutation null never searches again.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from functools import cached_property

import numpy as np
import torch

from stages.losses import structure_targets
from store import UserError

HOP_LEVELS = 3  # l_hop_cka's kernel powers, as the authors' default
HCS_LEVELS, HCS_TEMPERATURE = 3, 0.05  # hcs: R_S's levels and temperature, the authors' defaults


@dataclass
class Side:
    """The structures of every layer of one model, stacked over layers."""

    n: int
    device: str = "cpu"
    n_layers: int = 0
    use_grams: bool = True  # stacked n x n Grams, or (too large) the centred features
    cca_dim: int = 10
    dtype: torch.dtype = torch.float32
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
    extra: dict[str, list] = field(default_factory=dict)  # registered kinds, one entry a layer

    @property
    def layers(self) -> int:
        for value in (self.graphs, self.grams, self.bases, self.diag, self.half_probs):
            if value is not None:
                return len(value)
        return len(self.factors) or self.n_layers

    def put(self, name: str, index: int, value) -> None:
        """Keep layer `index`'s structure of a registered kind."""
        self.extra.setdefault(name, [None] * self.n_layers)[index] = value

    def stacked(self, name: str) -> torch.Tensor:
        """A registered kind's structures of all layers, stacked: (L, ...)."""
        return torch.stack(list(self.extra[name]))


@dataclass
class Layer:
    """One layer's input to the builders: its features (None when prebuilt graphs are all that
    is needed), its prebuilt graph or the search that makes one; unit rows computed once."""

    side: Side
    index: int
    features: np.ndarray | None
    graph: np.ndarray | None = None
    knn: Callable[[np.ndarray, int], np.ndarray] | None = None

    @cached_property
    def unit(self) -> torch.Tensor:
        return unit_rows(self.features, self.side.device, self.side.dtype)

    @cached_property
    def centred(self) -> torch.Tensor:
        return self.unit - self.unit.mean(dim=0)


@dataclass(frozen=True)
class Structure:
    """One kind of per-layer structure (see the module docstring)."""

    name: str
    build: Callable[[Side, int, Layer], None]
    needs: tuple[str, ...] = ()
    features: bool = True
    grams: int = 0
    check: Callable[[tuple[int, int], int, str], None] | None = None
    finish: Callable[[Side], None] | None = None


STRUCTURES: dict[str, Structure] = {}


def register_structure(
    name: str,
    build: Callable[[Side, int, Layer], None],
    needs: Sequence[str] = (),
    features: bool = True,
    grams: int = 0,
    check: Callable[[tuple[int, int], int, str], None] | None = None,
    finish: Callable[[Side], None] | None = None,
) -> Structure:
    """Add a kind of per-layer structure (see the module docstring); returns its entry."""
    unknown = [need for need in needs if need not in STRUCTURES]
    if unknown:
        raise ValueError(f"structure {name!r} needs unknown structures {unknown}")
    entry = Structure(name, build, tuple(needs), features, grams, check, finish)
    STRUCTURES[name] = entry
    return entry


def closure(names: Iterable[str]) -> list[str]:
    """`names` and every structure they need, each once, needs first, otherwise in the order
    of registration (the order they are built in)."""
    wanted: set[str] = set()

    def add(name: str) -> None:
        if name not in STRUCTURES:
            raise ValueError(f"unknown structure {name!r}; known: {', '.join(STRUCTURES)}")
        if name not in wanted:
            wanted.add(name)
            for need in STRUCTURES[name].needs:
                add(need)

    for name in names:
        add(name)
    return [name for name in STRUCTURES if name in wanted]


def reads_features(structures: Sequence[str]) -> bool:
    """Whether any of `structures` reads the features themselves (not only prebuilt graphs)."""
    return any(STRUCTURES[name].features for name in structures)


def grams_per_layer(structures: Sequence[str]) -> int:
    """How many n x n matrices each layer keeps for `structures` (l_hop_cka: one a level)."""
    return sum(STRUCTURES[name].grams for name in structures)


def check_memory(structures: Sequence[str], sizes: tuple[int, int], n: int, device: str) -> None:
    for name in structures:
        if STRUCTURES[name].check is not None:
            STRUCTURES[name].check(sizes, n, device)


def build_side(
    layers: Iterable[np.ndarray | None],
    n_layers: int,
    structures: Sequence[str],
    knn: Callable[[np.ndarray, int], np.ndarray] | None = None,
    graphs: Sequence[np.ndarray] | None = None,
    use_grams: bool = True,
    cca_dim: int = 10,
    device: str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> Side:
    """The `structures` (with those they need) of every layer, one layer at a time (`layers`
    may be a generator). knn(x, layer_index) gives a layer's kNN graph; or pass the prebuilt
    `graphs` (then a layer may be None when no structure reads the features)."""
    structures = closure(structures)
    side: Side | None = None
    for index, x in enumerate(layers):
        if side is None:
            n = len(x) if x is not None else len(graphs[index])
            side = Side(n, device, n_layers, use_grams, cca_dim, dtype)
        layer = Layer(side, index, x, None if graphs is None else graphs[index], knn)
        for name in structures:
            STRUCTURES[name].build(side, index, layer)
    if side is None:
        raise ValueError("no layers")
    for name in structures:
        if STRUCTURES[name].finish is not None:
            STRUCTURES[name].finish(side)
    return side


# ------------------------------------------------------------------------------------------
# the built-in kinds
# ------------------------------------------------------------------------------------------
def unit_rows(x: np.ndarray | torch.Tensor, device: str, dtype: torch.dtype) -> torch.Tensor:
    """Rows divided by their norm in float64, then cast to `dtype`: not `stages.vectors`'
    float32 normalisation, whose rounding would move every metric's last bits."""
    x = torch.as_tensor(np.asarray(x), device=device).double()
    return (x / torch.linalg.vector_norm(x, dim=1, keepdim=True)).to(dtype)


def add_graph(side: Side, index: int, layer: Layer) -> None:
    graph = layer.graph if layer.graph is not None else layer.knn(layer.features, index)
    graph = torch.as_tensor(np.asarray(graph), device=side.device).long()
    if side.graphs is None:
        side.graphs = torch.empty(
            (side.n_layers, *graph.shape), dtype=torch.long, device=side.device
        )
    side.graphs[index] = graph


def add_edge_cosines(side: Side, index: int, layer: Layer, block: int = 256) -> None:
    """(n, k) cosine of each row with its neighbours, a block of rows at a time (the gathered
    neighbours of all rows at once would be n k d floats)."""
    unit, graph = layer.unit, side.graphs[index]
    if side.edge_sims is None:
        side.edge_sims = torch.empty(side.graphs.shape, dtype=side.dtype, device=side.device)
    out = side.edge_sims[index]
    for start in range(0, len(graph), block):
        rows = slice(start, start + block)
        out[rows] = (unit[graph[rows]] * unit[rows, None, :]).sum(dim=-1)


def finish_edge_cosines(side: Side) -> None:
    side.knn_self = torch.stack(
        [self_masked_hsic(g, s) for g, s in zip(side.graphs, side.edge_sims)]
    )


def add_gram(side: Side, index: int, layer: Layer) -> None:
    n, centred = side.n, layer.centred
    if side.diag is None:
        side.diag = torch.empty((side.n_layers, n), dtype=torch.float64, device=side.device)
        side.gram_norm2 = torch.empty(side.n_layers, dtype=torch.float64, device=side.device)
        if side.use_grams:  # preallocated: one copy of the stacked Grams, never two
            side.grams = torch.empty((side.n_layers, n, n), dtype=side.dtype, device=side.device)
    side.diag[index] = (centred.double() ** 2).sum(dim=1)
    if side.use_grams:
        gram = side.grams[index]
        torch.matmul(centred, centred.T, out=gram)
    else:
        side.factors.append(centred)
        gram = centred.T @ centred if centred.shape[1] < n else centred @ centred.T
    side.gram_norm2[index] = torch.linalg.vector_norm(gram, dtype=torch.float64) ** 2


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


def factor_dot(u: torch.Tensor, w: torch.Tensor, v: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """<U Wᵀ, V Zᵀ> = Σ (UᵀV) ∘ (WᵀZ), float64, without the n x n matrices."""
    right = w.T @ z
    left = right if u is w and v is z else u.T @ v
    return (left.double() * right.double()).sum()


def add_hops(side: Side, index: int, layer: Layer) -> None:
    """l_hop_cka's levels 2..h of one layer: H K^l H / ||H K^l H||, or its factors."""
    n, centred = side.n, layer.centred
    if side.use_grams and side.hops is None:
        shape = (HOP_LEVELS - 1, side.n_layers, n, n)
        side.hops = torch.empty(shape, dtype=centred.dtype, device=side.device)
    if not side.use_grams and not side.hop_factors:
        side.hop_factors = [[] for _ in range(HOP_LEVELS - 1)]
    for level, left in enumerate(kernel_powers(layer.unit, HOP_LEVELS)):
        if side.use_grams:
            gram = side.hops[level, index]
            torch.matmul(left, centred.T, out=gram)
            gram /= torch.linalg.vector_norm(gram, dtype=torch.float64).to(gram.dtype)
        else:
            norm2 = factor_dot(left, centred, left, centred)
            side.hop_factors[level].append(left / norm2.sqrt().to(left.dtype))


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


def add_basis(side: Side, index: int, layer: Layer) -> None:
    unit = layer.unit
    basis = singular_basis(unit, min(side.cca_dim, unit.shape[1], side.n - 1))
    if side.bases is None:
        shape = (side.n_layers, *basis.shape)
        side.bases = torch.empty(shape, dtype=basis.dtype, device=side.device)
    side.bases[index] = basis


def add_transitions(side: Side, index: int, layer: Layer) -> None:
    """hcs's structures of one layer: P^l / 2 and Σ_j p log p for l = 1..h."""
    unit = layer.unit
    targets = structure_targets(unit, HCS_LEVELS, HCS_TEMPERATURE)
    if side.half_probs is None:
        n = side.n
        side.half_probs = torch.empty(
            (side.n_layers, HCS_LEVELS, n, n), dtype=unit.dtype, device=side.device
        )
        side.neg_entropy = torch.empty(
            (side.n_layers, HCS_LEVELS, n), dtype=torch.float64, device=side.device
        )
    for level in range(HCS_LEVELS):
        side.half_probs[index, level] = targets.half_probs[level]
        side.neg_entropy[index, level] = targets.neg_entropy[level].double()


def free_memory(device: str) -> int:
    """Bytes free for new tensors on `device` ("cpu" or "cuda")."""
    if device == "cuda":
        return torch.cuda.mem_get_info()[0]
    import psutil

    return psutil.virtual_memory().available


def require_transitions_memory(sizes: tuple[int, int], n: int, device: str) -> None:
    """hcs keeps every layer's n x n transition matrices (no low-rank form): refuse in one
    line, before any work, when they cannot fit, rather than die out of memory midway."""
    need = sum(sizes) * HCS_LEVELS * n * n * 4  # float32
    free = free_memory(device)
    if need > free:
        raise UserError(
            f"--metric hcs needs {need / 2**30:.1f} GiB for its transition matrices "
            f"({sum(sizes)} layers x {HCS_LEVELS} levels x n² at n = {n}), "
            f"{free / 2**30:.1f} GiB free on {device}: lower --n-samples or leave hcs out"
        )


def _ranked(side: Side, index: int, layer: Layer) -> None:
    """Nothing to add: the caller's search ranks the graph when this kind is asked for."""


register_structure("graph", add_graph, features=False)
register_structure("ranked_graph", _ranked, needs=("graph",), features=False)
register_structure("edge_cosines", add_edge_cosines, needs=("graph",), finish=finish_edge_cosines)
register_structure("gram", add_gram, grams=1)
register_structure("hops", add_hops, needs=("gram",), grams=HOP_LEVELS - 1)
register_structure("transitions", add_transitions, check=require_transitions_memory)
register_structure("basis", add_basis)


# ------------------------------------------------------------------------------------------
# graph helpers shared by the structures and the graph metrics
# ------------------------------------------------------------------------------------------
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
