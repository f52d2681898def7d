"""Benchmark: the select stage's layer tables.

    python -m benchmarks.select                      # 24 x 25 layers, D = 1024, N = 5000
    python -m benchmarks.select --n 50000 --device cuda --pairs 1
    python -m benchmarks.select --metrics all --calibrate 100      # every metric, K = 100
    python -m benchmarks.select --metrics cka --n 1000 --dim 256 --calibrate 20   # quick

Default: the mutual-kNN table. Ours builds each layer's kNN graph once (blocked matmuls with a
partial top-k, or FAISS, whichever measured faster at start-up; exact, decided on float64
similarities) and scores all Li x Lt pairs from the graphs, by the stage's own code. The floor
is one N x N Gram matrix per layer, the best of two runs in a row; each graph and each floor
starts after BLAS's idle workers have gone to sleep (`settle`). The authors' method
(platonic-rep `mutual_knn`, which the STRUCTURE code uses) rebuilds both graphs for every pair
from a full N x N similarity matrix, an argsort of it and two N x N masks; it is timed on a
few pairs in the same process and scaled to all pairs; its scores are checked in float64 too,
where float32 rounding cannot swap neighbours.

--metrics: the metrics of the registry (`stages.similarity.register_metric`), grouped by the
per-layer structures they read (kNN graphs, their edges' cosines, centred Grams, those of
l_hop_cka's kernel powers, singular bases, hcs's transition matrices P^l, or a registered
kind): the time to build each group's structures for all Li + Lt layers; for each metric,
scoring all Li x Lt pairs from the structures, and the ratio (structures + pairs) /
structures (the goal: under 2); the per-pair method (the structures rebuilt from the raw
features for every pair, its scores checked equal) timed on a few pairs and scaled. With
--calibrate K, the K-permutation null of each metric (the structures relabelled, no search).
Peak RSS after each phase (torch's allocations are not seen by tracemalloc).

Features are synthetic (a shared latent at layer-dependent strength plus noise), generated
one layer at a time outside the timers.
"""

from __future__ import annotations

import os
import sys

# run as a script, this file's folder comes first on sys.path, where its name would shadow the
# standard library's `select` (which subprocess, and so torch, imports): take the folder off
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or ".") != HERE]
sys.path.insert(0, os.path.dirname(HERE))

import argparse  # noqa: E402
import resource  # noqa: E402
import time  # noqa: E402
import tracemalloc  # noqa: E402
from functools import partial  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stages import calibration, similarity, structures  # noqa: E402
from stages.device import resolve_device  # noqa: E402
from stages.knn import fastest_search, knn_graph, resolve_k  # noqa: E402
from stages.select import metric_sides  # noqa: E402

LATENT = 32


def make_layer(modality: int, index: int, n_layers: int, n: int, dim: int, seed: int):
    """float32 (n, dim): the latent, strongest at a middle layer, plus fresh noise."""
    latent = np.random.default_rng([seed, 0]).standard_normal((n, LATENT), dtype=np.float32)
    rng = np.random.default_rng([seed, 1 + modality, index])
    strength = 0.3 + 2.0 * np.exp(-(((index / n_layers) - 0.6) ** 2) / 0.05)
    weights = rng.standard_normal((LATENT, dim), dtype=np.float32) * np.float32(strength / 4)
    return latent @ weights + rng.standard_normal((n, dim), dtype=np.float32)


def authors_mutual_knn(a: torch.Tensor, b: torch.Tensor, topk: int) -> float:
    """The per-pair method of the authors' code (platonic-rep metrics.mutual_knn)."""

    def nearest(feats):
        return (feats @ feats.T).fill_diagonal_(-1e8).argsort(dim=1, descending=True)[:, :topk]

    a, b = F.normalize(a, dim=-1), F.normalize(b, dim=-1)
    knn_a, knn_b = nearest(a), nearest(b)
    n = knn_a.shape[0]
    range_tensor = torch.arange(n, device=knn_a.device).unsqueeze(1)
    lvm_mask = torch.zeros(n, n, device=knn_a.device)
    llm_mask = torch.zeros(n, n, device=knn_a.device)
    lvm_mask[range_tensor, knn_a] = 1.0
    llm_mask[range_tensor, knn_b] = 1.0
    return ((lvm_mask * llm_mask).sum(dim=1) / topk).mean().item()


def cpu_model() -> str:
    with open("/proc/cpuinfo") as info:
        names = [line.split(":", 1)[1].strip() for line in info if line.startswith("model name")]
    return names[0] if names else "unknown CPU"


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def gram_seconds(x: np.ndarray, device: str, runs: int = 2) -> list[float]:
    """Seconds for each of `runs` x @ x.T in a row: numpy on the CPU (a symmetric rank-k
    update), torch on a GPU. The floor is the best run: a first run from idle pays for waking
    BLAS's workers (1.5x the second here)."""
    if device != "cpu":
        x = torch.from_numpy(x).to(device)
    seconds = []
    for _ in range(runs):
        sync(device)
        start = time.perf_counter()
        gram = x @ x.T
        sync(device)
        del gram
        seconds.append(time.perf_counter() - start)
    return seconds


def settle(seconds: float = 0.3) -> None:
    """Wait until BLAS's idle workers sleep: after a threaded call OpenBLAS's spin for about
    2^28 cycles (0.1 s) and take a core from whatever runs next (14% of a graph's time when it
    followed the floor at once). Each timed step starts from that state, as a graph does in
    the stage, after reading its layer."""
    time.sleep(seconds)


def sync(device: str) -> None:
    if device != "cpu" and torch.cuda.is_available():
        torch.cuda.synchronize()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=5000)
    parser.add_argument("--dim", type=int, default=1024)
    parser.add_argument("--image-layers", type=int, default=24)
    parser.add_argument("--text-layers", type=int, default=25)
    parser.add_argument("--k", default="rice")
    parser.add_argument("--device", default="cpu", help="ours: cpu | cuda | auto")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pairs", type=int, default=3, help="pairs timed per-pair")
    parser.add_argument(
        "--metrics", default="", help="a comma list, or all: each metric from cached structures"
    )
    parser.add_argument("--calibrate", type=int, default=0, help="permutations K (--metrics)")
    args = parser.parse_args()
    if args.metrics:
        if args.metrics == "all":
            args.metrics = ",".join(similarity.metric_names())
        return metric_suite(args)
    mutual_knn_table_vs_authors(args)


def mutual_knn_table_vs_authors(args: argparse.Namespace) -> None:
    """The default: the mutual-kNN table vs the Gram floor and the authors' per-pair method."""
    n, dim, li, lt = args.n, args.dim, args.image_layers, args.text_layers
    k = resolve_k(args.k, n)
    base_device = str(resolve_device(args.device))
    print(
        f"N={n} D={dim} layers {li} x {lt} = {li * lt} pairs, k={k}, "
        f"ours on {args.device}, authors' method on {base_device}, "
        f"torch threads {torch.get_num_threads()}; {cpu_model()}"
    )

    def layer(modality: int, index: int) -> np.ndarray:
        return make_layer(modality, index, (li, lt)[modality], n, dim, args.seed)

    # -- ours: Li + Lt searches, then all pairs from the graphs --------------------------------
    start = time.perf_counter()
    knn_graph(layer(0, 0)[:500], 5, args.device)  # warm-up: imports, GPU smoke test
    print(
        f"search backend: {fastest_search(args.device, dim, n)} (chosen by timing at start-up, "
        f"{time.perf_counter() - start:.2f} s)"
    )
    # the floor: one N x N Gram matrix per layer, nothing else (numpy's BLAS on the CPU, the
    # faster of the two here; torch on the GPU), each timed just before that layer's graph so
    # that both see the same load on a shared machine
    rss_before = peak_rss_mib()
    search_s, floor_s, first_s, traced_peak, graphs = 0.0, 0.0, 0.0, 0.0, ([], [])
    for modality, count in ((0, li), (1, lt)):
        for index in range(count):
            x = layer(modality, index)
            settle()
            runs = gram_seconds(x, base_device)
            floor_s, first_s = floor_s + min(runs), first_s + runs[0]
            settle()
            tracemalloc.start()
            start = time.perf_counter()
            graphs[modality].append(knn_graph(x, k, args.device, ordered=False))
            search_s += time.perf_counter() - start
            traced_peak = max(traced_peak, tracemalloc.get_traced_memory()[1] / 2**20)
            tracemalloc.stop()
            del x
    start = time.perf_counter()
    # the stage's own path: the graphs into its structures, the table from them
    no_features = ([None] * li, [None] * lt)
    sides = metric_sides(*no_features, (li, lt), n, ["mutual_knn"], k, args.device, graphs=graphs)
    scores = similarity.tables(["mutual_knn"], *sides)["mutual_knn"]
    score_s = time.perf_counter() - start
    rss_ours = peak_rss_mib()
    ours_s = search_s + score_s
    print(
        f"ours: {li + lt} kNN graphs {search_s:.2f} s + {li * lt} pair scores {score_s:.2f} s"
        f" = {ours_s:.2f} s for the whole table"
    )
    print(
        f"ours: peak traced (numpy) memory {traced_peak:.0f} MiB per graph (one layer of "
        f"features and temporaries); peak RSS {rss_before:.0f} -> {rss_ours:.0f} MiB"
    )
    print(
        f"floor: {li + lt} Gram matrices ({'numpy' if base_device == 'cpu' else 'torch'} on "
        f"{base_device}, each the best of two runs in a row, just before its graph) "
        f"{floor_s:.2f} s; whole table / floor {ours_s / floor_s:.2f}x (against the first runs, "
        f"which start from idle as each graph does: {first_s:.2f} s, {ours_s / first_s:.2f}x); "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    # -- the authors' method on a few pairs, same features --------------------------------------
    rng = np.random.default_rng(args.seed)
    pairs = [(0, 0), (li - 1, lt - 1)] + [tuple(p) for p in rng.integers((li, lt), size=(8, 2))]
    pairs = list(dict.fromkeys(pairs))[: args.pairs]
    warm = torch.from_numpy(layer(0, 0)[:500]).to(base_device)
    authors_mutual_knn(warm, warm, 5)  # warm-up, as for ours: kernels, allocator
    times, diffs, diffs64 = [], [], []
    for i, j in pairs:
        a = torch.from_numpy(layer(0, i)).to(base_device)
        b = torch.from_numpy(layer(1, j)).to(base_device)
        sync(base_device)
        start = time.perf_counter()
        try:
            theirs = authors_mutual_knn(a, b, k)
        except torch.OutOfMemoryError:
            print(f"authors' method: out of memory at N={n} on {base_device}")
            return
        sync(base_device)
        times.append(time.perf_counter() - start)
        theirs64 = authors_mutual_knn(a.double(), b.double(), k)  # untimed
        diffs.append(abs(theirs - scores[i, j]))
        diffs64.append(abs(theirs64 - scores[i, j]))
        print(
            f"  pair ({i:2d},{j:2d}): authors {theirs:.6f} in {times[-1]:.2f} s "
            f"(in float64 {theirs64:.6f}), ours {scores[i, j]:.6f}, |diff| {diffs[-1]:.2e} = "
            f"{diffs[-1] * n * k:.1f}/(n k), in float64 {diffs64[-1] * n * k:.1f}/(n k)"
        )
        del a, b
    per_pair = float(np.mean(times))
    theirs_s = per_pair * li * lt
    print(
        f"authors' method: {per_pair:.2f} s per pair x {li * lt} = {theirs_s:.0f} s "
        f"(scaled); peak RSS now {peak_rss_mib():.0f} MiB"
    )
    print(f"speed-up: {theirs_s / ours_s:.0f}x  (whole table {ours_s:.2f} s vs {theirs_s:.0f} s)")
    # a neighbour swap at the k-th rank moves a score by 1/(n k), so agreement is counted in
    # those units (the authors' mean is float32, ~1e-7): float32 rounding in their method can
    # swap neighbours whose similarities differ by ~1e-6; run in float64 it cannot
    print(
        f"same scores on {len(pairs)} pairs as the authors' method in float64: max |diff| "
        f"{max(diffs64):.2e} ({round(max(diffs64) * n * k)} neighbour swaps of {n * k}); "
        f"in float32 {max(diffs):.2e} ({round(max(diffs) * n * k)} swaps)"
    )
    best = tuple(int(v) for v in np.unravel_index(scores.argmax(), scores.shape))
    print(f"chosen (image, text) layer pair {best}: {scores.max():.4f}; last {scores[-1, -1]:.4f}")


def pair_knn(x: np.ndarray, _: int, k: int, ordered: bool) -> np.ndarray:
    return knn_graph(x, k, ordered=ordered)


def metric_suite(args: argparse.Namespace) -> None:
    """Every --metrics metric from per-layer structures vs the per-pair method; --calibrate."""
    n, dim, li, lt = args.n, args.dim, args.image_layers, args.text_layers
    k = resolve_k(args.k, n)
    metrics = similarity.parse_metrics(args.metrics)
    device = str(resolve_device(args.device))
    print(
        f"N={n} D={dim} layers {li} x {lt} = {li * lt} pairs, k={k}, metrics {metrics}, "
        f"torch on {device}, {torch.get_num_threads()} threads; {cpu_model()}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    def layers(modality: int):
        count = (li, lt)[modality]
        return [make_layer(modality, i, count, n, dim, args.seed) for i in range(count)]

    image, text = layers(0), layers(1)  # outside the timers
    ordered = "ranked_graph" in similarity.structures_for(metrics)  # as the stage builds them
    knn_graph(image[0][:500], 5, args.device)  # warm-up: search backend timing, imports
    print(f"features: {4 * n * dim * (li + lt) / 2**20:.0f} MiB; RSS {peak_rss_mib():.0f} MiB")

    # -- structures: the metrics grouped by the structures the registry says they read ---------
    groups: dict[tuple[str, ...], list[str]] = {}
    for metric in metrics:
        groups.setdefault(tuple(similarity.structures_for([metric])), []).append(metric)
    built, seconds, graphs, graph_s = {}, {}, None, 0.0
    for kind in groups:
        sync(device)
        start = time.perf_counter()
        sides = []
        for modality, feats in enumerate((image, text)):
            sides.append(
                structures.build_side(
                    feats,
                    len(feats),
                    kind,
                    lambda x, i: knn_graph(x, k, args.device, ordered=ordered),
                    graphs=None if graphs is None else graphs[modality],
                    device=device,
                )  # fmt: skip
            )
        if sides[1].graphs is not None:  # the text layers' edge index: a structure too
            sides[1].edge_index = similarity.edge_indexes(sides[1].graphs)
        sync(device)
        seconds[kind] = time.perf_counter() - start
        if "graph" in kind and graphs is None:  # the first group with graphs builds them
            graphs = [side.graphs.cpu().numpy() for side in sides]
            graph_s = seconds[kind]
        elif "graph" in kind:  # the others reuse them: their time includes the graphs'
            seconds[kind] += graph_s
        built[kind] = sides
        print(
            f"structures {' + '.join(kind)} ({', '.join(groups[kind])}): {li + lt} layers in "
            f"{seconds[kind]:.2f} s; peak RSS {peak_rss_mib():.0f} MiB"
        )
    kind_of = {metric: kind for kind, names in groups.items() for metric in names}

    # -- every pair from the structures --------------------------------------------------------
    tables = {}
    print(f"{'metric':>13} {'structures':>11} {'pairs':>8} {'ratio':>6} {'per-pair':>10} speed-up")
    for metric in metrics:
        kind = kind_of[metric]
        per_pair_knn = partial(pair_knn, k=k, ordered="ranked_graph" in kind)
        sync(device)
        start = time.perf_counter()
        tables[metric] = similarity.tables([metric], *built[kind])[metric]
        sync(device)
        pair_s = time.perf_counter() - start
        # the per-pair method: both layers' structures rebuilt from the raw features per pair
        per_pair = []
        for i, j in [(0, 0), (li - 1, lt - 1), (li // 2, lt // 2)][: args.pairs]:
            sync(device)
            start = time.perf_counter()
            one = structures.build_side([image[i]], 1, kind, per_pair_knn)
            two = structures.build_side([text[j]], 1, kind, per_pair_knn)
            value = similarity.tables([metric], one, two)[metric][0, 0]
            sync(device)
            per_pair.append(time.perf_counter() - start)
            assert abs(value - tables[metric][i, j]) < 1e-5, (metric, value, tables[metric][i, j])
        theirs = float(np.mean(per_pair)) * li * lt
        ours = seconds[kind] + pair_s
        print(
            f"{metric:>13} {seconds[kind]:>10.2f}s {pair_s:>7.2f}s {ours / seconds[kind]:>5.2f}x "
            f"{theirs:>9.0f}s {theirs / ours:>6.0f}x"
        )
    print(f"peak RSS {peak_rss_mib():.0f} MiB")
    for metric, table in tables.items():
        best = np.unravel_index(table.argmax(), table.shape)
        print(f"  {metric}: best pair {tuple(int(b) for b in best)} = {table.max():.4f}")

    # -- the permutation null ------------------------------------------------------------------
    if args.calibrate:
        print(f"calibration: K = {args.calibrate} permutations, each applied to all pairs")
        for metric in metrics:
            kind = kind_of[metric]
            sync(device)
            start = time.perf_counter()
            null = calibration.permutation_null([metric], *built[kind], args.calibrate, args.seed)
            sync(device)
            null_s = time.perf_counter() - start
            result = calibration.calibrate_table(tables[metric], null[metric])
            print(
                f"  {metric:>13}: {null_s:.2f} s ({null_s / args.calibrate * 1e3:.0f} ms a "
                f"permutation, {null_s / seconds[kind]:.2f}x the structures); max pair "
                f"calibrated {result.max_calibrated:.3f}, p = {result.max_p_value:.3g}"
            )
        print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
