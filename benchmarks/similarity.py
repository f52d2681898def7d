"""Benchmark: every layer-similarity metric's whole table from cached per-layer structures,
against the per-pair method (structures rebuilt from the raw features for every pair), and
the permutation null.

    python -m benchmarks.similarity                      # 24 x 25 layers, N = 5000, D = 1024
    python -m benchmarks.similarity --n 1000 --dim 256 --calibrate 20     # a quick run

For each kind of structure (kNN graphs, their edges' cosines, centred Grams, singular bases)
it times building it for all Li + Lt layers; for each metric, scoring all Li x Lt pairs from
the structures, and the ratio (structures + pairs) / structures (the goal: under 2). The
per-pair method is timed on a few pairs in the same process and scaled to all pairs (its
scores are checked equal). With --calibrate K, the K-permutation null of each metric (the
structures relabeled, no search) is timed. Peak RSS is reported after each phase (torch's
allocations are not seen by tracemalloc). Features: benchmarks.select's synthetic layers.
"""

from __future__ import annotations

import os
import resource
import time

import numpy as np
import torch

from benchmarks.select import cpu_model, make_layer, sync, table_parser
from stages import similarity
from stages.select import knn_graph, resolve_k, torch_device


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB


def main() -> None:
    parser = table_parser(__doc__)
    parser.add_argument("--metrics", default=",".join(similarity.METRICS))
    parser.add_argument("--pairs", type=int, default=2, help="pairs timed with the per-pair method")
    parser.add_argument("--calibrate", type=int, default=0, help="permutations K (0: none)")
    args = parser.parse_args()
    n, dim, li, lt = args.n, args.dim, args.image_layers, args.text_layers
    k = resolve_k(args.k, n)
    metrics = similarity.parse_metrics(args.metrics)
    device = torch_device(args.device)
    print(
        f"N={n} D={dim} layers {li} x {lt} = {li * lt} pairs, k={k}, metrics {metrics}, "
        f"torch on {device}, {torch.get_num_threads()} threads; {cpu_model()}; "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )

    def layers(modality: int):
        count = (li, lt)[modality]
        return [make_layer(modality, i, count, n, dim, args.seed) for i in range(count)]

    image, text = layers(0), layers(1)  # outside the timers
    knn_graph(image[0][:500], 5, args.device)  # warm-up: search backend timing, imports
    print(f"features: {4 * n * dim * (li + lt) / 2**20:.0f} MiB; RSS {peak_rss_mib():.0f} MiB")

    # -- structures, one kind at a time -----------------------------------------------------
    kinds = {
        "graph": [m for m in metrics if m in similarity.GRAPH_METRICS][:1],
        "edge cosines": ["cknna"] if "cknna" in metrics else [],
        "gram": [m for m in metrics if m in similarity.GRAM_METRICS][:1],
        "basis": ["svcca"] if "svcca" in metrics else [],
    }
    built, seconds, graphs = {}, {}, None
    for kind, wanted in kinds.items():
        if not wanted:
            continue
        sync(device)
        start = time.perf_counter()
        sides = []
        for modality, feats in enumerate((image, text)):
            sides.append(
                similarity.build_side(
                    feats,
                    len(feats),
                    wanted,
                    lambda x, i: knn_graph(x, k, args.device),
                    graphs=None if graphs is None else graphs[modality],
                    device=device,
                )  # fmt: skip
            )
        if sides[1].graphs is not None:  # the text layers' edge index: a structure too
            sides[1].edge_index = similarity.edge_indexes(sides[1].graphs)
        sync(device)
        seconds[kind] = time.perf_counter() - start
        if kind == "graph":
            graphs = [side.graphs.cpu().numpy() for side in sides]
        built[kind] = sides
        print(
            f"structures {kind}: {li + lt} layers in {seconds[kind]:.2f} s; "
            f"peak RSS {peak_rss_mib():.0f} MiB"
        )
    if "edge cosines" in built:  # cknna's structures: the graphs and their edges' cosines
        seconds["edge cosines"] += seconds["graph"]

    def kind_of(metric: str) -> str:
        if metric == "cknna":
            return "edge cosines"
        if metric in similarity.GRAPH_METRICS:
            return "graph"
        return "gram" if metric in similarity.GRAM_METRICS else "basis"

    # -- every pair from the structures --------------------------------------------------------
    tables = {}
    print(f"{'metric':>13} {'structures':>11} {'pairs':>8} {'ratio':>6} {'per-pair':>10} speed-up")
    for metric in metrics:
        kind = kind_of(metric)
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
            one = similarity.build_side([image[i]], 1, [metric], lambda x, _: knn_graph(x, k))
            two = similarity.build_side([text[j]], 1, [metric], lambda x, _: knn_graph(x, k))
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
            kind = kind_of(metric)
            sync(device)
            start = time.perf_counter()
            null = similarity.permutation_null([metric], *built[kind], args.calibrate, args.seed)
            sync(device)
            null_s = time.perf_counter() - start
            result = similarity.calibrate_table(tables[metric], null[metric])
            print(
                f"  {metric:>13}: {null_s:.2f} s ({null_s / args.calibrate * 1e3:.0f} ms a "
                f"permutation, {null_s / seconds[kind]:.2f}x the structures); max pair "
                f"calibrated {result.max_calibrated:.3f}, p = {result.max_p_value:.3g}"
            )
        print(f"peak RSS {peak_rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
