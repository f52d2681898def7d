"""Stage 2a: mutual-kNN layer selection against a brute-force float64 reference, end to end
through the CLI on a synthetic store, the k rules, sampling and bad input."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from typer.testing import CliRunner

import pipeline.commands  # noqa: F401  (registers the commands)
from pipeline.app import app
from stages.knn import (
    CPU_SEARCHES,
    GPU_SEARCHES,
    SEARCHES,
    blas_controller,
    knn_graph,
    normalise_rows,
    rank_candidates,
    resolve_k,
    search_backends,
    search_blas,
    similarities,
    similarity_error,
    working,
)
from stages.pairs import PairSpec
from stages.select import SelectSettings, mutual_knn_scores, sample_pairs
from stages.similarity import graph_overlap
from store import FeatureStore, UserError
from tests.helpers import write_features, write_pairs_manifest

ROOT = Path(__file__).resolve().parents[1]


# -- an independent reference: the documented float64 cosine in plain Python ----------------
def tree(values: list[float]) -> float:
    """Sum in the documented fixed tree: adjacent pairs, an odd last element carried up."""
    while len(values) > 1:
        pairs = [values[t] + values[t + 1] for t in range(0, len(values) - 1, 2)]
        values = pairs + values[len(pairs) * 2 :]
    return values[0]


def reference_unit(row) -> list[float]:
    """A row rounded to float32, divided by its norm in float64, rounded to float32."""
    row = [float(v) for v in np.asarray(row, dtype=np.float32)]
    norm = math.sqrt(tree([v * v for v in row]))
    return [float(np.float32(v / norm)) for v in row]


def reference_cosines(x: np.ndarray) -> list[list[float]]:
    """s64 of every pair: exact products of the unit rows (float32 values), summed in the tree."""
    units = [reference_unit(row) for row in x]
    return [[tree([a * b for a, b in zip(u, v, strict=True)]) for v in units] for u in units]


def brute_knn(x: np.ndarray, k: int) -> list[list[int]]:
    """Neighbours of each row by (cosine desc, index asc), self excluded."""
    sims = reference_cosines(x)
    n = len(sims)
    return [
        sorted((j for j in range(n) if j != i), key=lambda j: (-sims[i][j], j))[:k]
        for i in range(n)
    ]


def brute_mknn(a_graph: list[list[int]], b_graph: list[list[int]], k: int) -> float:
    return float(np.mean([len(set(p) & set(q)) / k for p, q in zip(a_graph, b_graph, strict=True)]))


def brute_table(image: np.ndarray, text: np.ndarray, k: int) -> np.ndarray:
    image_graphs = [brute_knn(image[:, i], k) for i in range(image.shape[1])]
    text_graphs = [brute_knn(text[:, j], k) for j in range(text.shape[1])]
    return np.array([[brute_mknn(a, b, k) for b in text_graphs] for a in image_graphs])


# -- math ---------------------------------------------------------------------------------
@pytest.mark.parametrize("k", [1, 4, "rice"])
def test_scores_match_brute_force_on_random_input(k):
    rng = np.random.default_rng(1)
    n = 70
    latent = rng.standard_normal((n, 3))
    image = np.stack(
        [
            latent @ rng.standard_normal((3, 12)) * w + rng.standard_normal((n, 12))
            for w in (0.0, 1.0, 4.0)
        ],
        axis=1,
    )
    text = np.stack(
        [
            latent @ rng.standard_normal((3, 7)) * w + rng.standard_normal((n, 7))
            for w in (4.0, 0.5, 0.0, 2.0)
        ],
        axis=1,
    )
    scores = mutual_knn_scores(image, text, k, device="cpu")
    want = brute_table(image, text, resolve_k(k, n))
    assert scores.shape == (3, 4) and scores.dtype == np.float64
    np.testing.assert_allclose(scores, want, rtol=0, atol=1e-12)
    assert np.ptp(scores) > 0.1  # the latent makes the pairs differ: a real test of the ranking


def test_scores_of_layers_of_different_widths():
    """A sequence of (N, D_l) arrays (CNN stages) scores as each pair's brute force; the
    (N, L, D) form of equal-width layers gives the same numbers as its list of layers."""
    rng = np.random.default_rng(4)
    latent = rng.standard_normal((60, 3))
    image = [latent @ rng.standard_normal((3, d)) * w + rng.standard_normal((60, d))
             for d, w in ((4, 0.0), (16, 1.0), (64, 3.0))]  # fmt: skip
    text = [latent @ rng.standard_normal((3, d)) + rng.standard_normal((60, d)) for d in (8, 5)]
    scores = mutual_knn_scores(image, text, 5, device="cpu")
    want = [[brute_mknn(brute_knn(a, 5), brute_knn(b, 5), 5) for b in text] for a in image]
    np.testing.assert_allclose(scores, want, rtol=0, atol=1e-12)
    assert np.ptp(scores) > 0.1
    same = np.stack([text[0], text[0][:, ::-1]], axis=1)
    np.testing.assert_array_equal(
        mutual_knn_scores(image, same, 5, device="cpu"),
        mutual_knn_scores(image, list(same.transpose(1, 0, 2)), 5, device="cpu"),
    )
    with pytest.raises(ValueError, match="sequence of \\(N, D_l\\) arrays"):
        mutual_knn_scores([latent[:, 0]], text, 5, device="cpu")


def duplicated_rows(rng: np.random.Generator, n_distinct: int, dim: int) -> np.ndarray:
    """Rows repeated and rescaled by powers of two (exact, so cosines tie exactly)."""
    base = rng.standard_normal((n_distinct, dim))
    copies = [base, 2.0 * base, 0.25 * base[: n_distinct // 2]]
    x = np.concatenate(copies)
    return x[rng.permutation(len(x))]


def lattice_rows(n_repeats: int) -> np.ndarray:
    """Every nonzero vector of {-1, 0, 1}^3, repeated: many exactly tied cosines."""
    grid = np.array([(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1)])
    grid = grid[np.abs(grid).sum(axis=1) > 0]
    return np.concatenate([grid] * n_repeats).astype(np.float64)


@pytest.mark.parametrize("k", [1, 3, 7, 12])
def test_graphs_match_brute_force_with_ties(k):
    rng = np.random.default_rng(2)
    for x in (
        duplicated_rows(rng, 30, 5),
        lattice_rows(3),
        np.repeat(rng.standard_normal((4, 3)), 20, axis=0),
    ):
        graph = knn_graph(x, k, device="cpu")
        assert graph.shape == (len(x), k)
        # same neighbours in the same order: ties go to the lower index, self never included
        want = np.array(brute_knn(x, k))
        np.testing.assert_array_equal(graph, want)
        # the sets alone (ties at rank k decided the same way), sorted by index
        np.testing.assert_array_equal(knn_graph(x, k, "cpu", ordered=False), np.sort(want, 1))


def test_scores_match_brute_force_with_ties():
    rng = np.random.default_rng(3)
    image = np.stack(
        [lattice_rows(2), lattice_rows(2) + 0.1 * rng.standard_normal((52, 3))], axis=1
    )
    text = np.stack([np.repeat(rng.standard_normal((13, 4)), 4, axis=0)], axis=1)
    for k in (2, 5, 9):
        np.testing.assert_allclose(
            mutual_knn_scores(image, text, k, device="cpu"), brute_table(image, text, k), atol=1e-12
        )


@pytest.mark.parametrize("ordered", [True, False])
def test_near_ties_decided_in_float64_whatever_the_backend_rounds(ordered):
    """A cloud of near-duplicates (cosines apart by far less than 2E, not in index order) and
    a backend that rounds each similarity anywhere within E of s64: only the float64 decision
    gives the brute-force neighbours (ordering such ties by index alone would fail here)."""
    rng = np.random.default_rng(11)
    base = rng.standard_normal(16)
    x = np.concatenate([base + 1e-4 * rng.standard_normal((40, 16)), rng.standard_normal((20, 16))])
    unit = normalise_rows(x)
    n, err = len(x), similarity_error(16)
    everyone = np.repeat(np.arange(n), n), np.tile(np.arange(n), n)
    exact = similarities(unit, *everyone).reshape(n, n)
    ids = np.tile(np.arange(n), (n, 1))  # every row a candidate: nothing left unfetched
    for k in (3, 12, 30):
        want = np.array(brute_knn(x, k))
        want = want if ordered else np.sort(want, axis=1)
        for seed in range(3):
            noise = np.random.default_rng(seed).uniform(-0.9, 0.9, (n, n)) * err
            sims = (exact + noise).astype(np.float32)
            np.testing.assert_array_equal(rank_candidates(unit, sims, ids, k, ordered), want)


def test_candidate_order_from_the_backend_does_not_matter():
    rng = np.random.default_rng(6)
    x = np.concatenate([rng.standard_normal((60, 6))] * 2)  # ties everywhere
    unit = normalise_rows(x)
    sims, ids = SEARCHES["faiss"](unit, 14)
    shuffle = np.argsort(rng.random(ids.shape), axis=1)
    shuffled = rank_candidates(
        unit, np.take_along_axis(sims, shuffle, 1), np.take_along_axis(ids, shuffle, 1), 5
    )
    np.testing.assert_array_equal(shuffled, rank_candidates(unit, sims, ids, 5))
    np.testing.assert_array_equal(shuffled, np.array(brute_knn(x, 5)))
    shuffled = rank_candidates(
        unit, np.take_along_axis(sims, shuffle, 1), np.take_along_axis(ids, shuffle, 1), 5, False
    )
    np.testing.assert_array_equal(shuffled, np.sort(brute_knn(x, 5), axis=1))


@pytest.mark.parametrize("name", ["blas", "torch"])
def test_blocked_searches_find_the_top_candidates(name):
    # blocks smaller than n: off-diagonal blocks serve their rows and, transposed, their columns
    rng = np.random.default_rng(10)
    x = np.concatenate([rng.standard_normal((250, 8)), rng.standard_normal((20, 8)).repeat(3, 0)])
    unit = normalise_rows(x)
    sims, ids = SEARCHES[name](unit, 12, block=64)
    exact = unit.astype(np.float64) @ unit.T.astype(np.float64)
    found = np.take_along_axis(exact, ids, axis=1)
    np.testing.assert_allclose(np.sort(sims, axis=1), np.sort(found, axis=1), atol=1e-6)
    # the 12 largest, up to float32 rounding: nothing left out is clearly larger
    assert (np.sort(exact, axis=1)[:, -12] <= found.min(axis=1) + 1e-6).all()
    np.testing.assert_array_equal(rank_candidates(unit, sims, ids, 5), np.array(brute_knn(x, 5)))


def test_blas_search_the_same_on_one_and_several_threads():
    # 14 x 14 tiles taken by 1, 2 or 3 threads in any order, one lock per block of heap rows
    x = tied_and_near_tied_rows()
    unit, want = normalise_rows(x), np.array(brute_knn(x, 9))
    found = []
    for threads in (1, 2, 3):
        with blas_controller().limit(limits=threads):
            sims, ids = search_blas(unit, 16, block=24)
        np.testing.assert_array_equal(rank_candidates(unit, sims, ids, 9), want)
        found.append(np.sort(sims, axis=1))
    for other in found[1:]:
        np.testing.assert_array_equal(other, found[0])


def test_similarities_out_of_bound_are_an_error():
    unit = normalise_rows(np.repeat(np.random.default_rng(7).standard_normal((10, 4)), 2, axis=0))
    sims, ids = SEARCHES["blas"](unit, 6)
    with pytest.raises(RuntimeError, match="error bound"):  # off by 10 E: not float32 rounding
        rank_candidates(unit, sims + 10 * similarity_error(4), ids, 3)


def test_duplicate_rows_get_bit_identical_similarities():
    # BLAS picks kernels by CPU and by column position: two equal columns of x @ x.T can differ
    rng = np.random.default_rng(8)
    x = rng.standard_normal((301, 1024)).astype(np.float32)
    copies = [5, 6, 100, 257, 300]
    x[copies] = x[5]
    unit = normalise_rows(x)
    everyone = np.arange(len(x))
    sims = [similarities(unit, everyone, np.full(len(x), j)) for j in copies]
    for other in sims[1:]:
        np.testing.assert_array_equal(other, sims[0])
    # and they are the documented tree sums, bit for bit (a few rows, in plain Python)
    for i in (0, 7, 300):
        units = reference_unit(x[i]), reference_unit(x[5])
        assert sims[0][i] == tree([a * b for a, b in zip(*units, strict=True)])


def tied_and_near_tied_rows(seed: int = 9) -> np.ndarray:
    """Sign vectors (integer dot products, so exact ties float32 may break either way),
    duplicated rows and Gaussian rows."""
    rng = np.random.default_rng(seed)
    signs = rng.integers(-1, 2, size=(150, 40)).astype(np.float32)
    signs[signs.any(axis=1) == 0, 0] = 1
    x = np.concatenate([signs, np.repeat(rng.standard_normal((10, 40)), 5, axis=0)])
    x = np.concatenate([x, rng.standard_normal((100, 40)), 3 * signs[:30]])
    return x[rng.permutation(len(x))].astype(np.float32)


GRAPHS_SCRIPT = """
import sys, numpy as np
from stages.knn import CPU_SEARCHES, knn_graph
x = np.load(sys.argv[1])
graphs = [knn_graph(x, 9, "cpu", search=s, ordered=o) for s in CPU_SEARCHES for o in (1, 0)]
np.save(sys.argv[2], np.stack(graphs))
"""


def test_graphs_identical_across_backends_and_threads(tmp_path):
    x = tied_and_near_tied_rows()
    want = np.array(brute_knn(x, 9))
    for name in CPU_SEARCHES:  # here with 2 threads (or what the machine has)
        np.testing.assert_array_equal(knn_graph(x, 9, "cpu", search=name), want, err_msg=name)
        graph = knn_graph(x, 9, "cpu", search=name, ordered=False)
        np.testing.assert_array_equal(graph, np.sort(want, axis=1), err_msg=name)
    np.save(tmp_path / "x.npy", x)
    one_thread = {"OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    subprocess.run(
        [sys.executable, "-c", GRAPHS_SCRIPT, tmp_path / "x.npy", tmp_path / "g.npy"],
        cwd=ROOT,
        env={**os.environ, **one_thread},
        check=True,
        timeout=120,
    )
    graphs = np.load(tmp_path / "g.npy")
    assert len(graphs) == 2 * len(CPU_SEARCHES)
    for graph in graphs[0::2]:
        np.testing.assert_array_equal(graph, want)
    for graph in graphs[1::2]:
        np.testing.assert_array_equal(graph, np.sort(want, axis=1))


@pytest.mark.parametrize("name", GPU_SEARCHES)
def test_gpu_graphs_equal_the_cpu_reference(name):
    """Where a GPU is lent: FAISS-GPU and torch on CUDA give the plain-Python graphs too."""
    if not working(name):
        pytest.skip(f"no working {name} search here")
    x = tied_and_near_tied_rows()
    want = np.array(brute_knn(x, 9))
    np.testing.assert_array_equal(knn_graph(x, 9, "cuda", search=name), want)
    graph = knn_graph(x, 9, "cuda", search=name, ordered=False)
    np.testing.assert_array_equal(graph, np.sort(want, axis=1))


def test_normalise_rows_at_extreme_scales():
    x = np.array([[1e30, 1e30, 0], [1e-30, 0, 1e-30], [3, 4, 0], [0, -2e-45, 0]])
    want = x / np.linalg.norm(x / np.abs(x).max(axis=1, keepdims=True), axis=1, keepdims=True)
    want /= np.abs(x).max(axis=1, keepdims=True)
    got = normalise_rows(x.astype(np.float32))
    assert got.dtype == np.float32 and got.flags.c_contiguous
    np.testing.assert_allclose(got, want, atol=1e-6)


def test_identical_and_unrelated_layers():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((200, 16))
    assert graph_overlap(knn_graph(x, 10, "cpu"), knn_graph(3 * x, 10, "cpu")) == 1.0
    # unrelated features share about k / (n - 1) of their neighbours by chance
    y = rng.standard_normal((200, 16))
    chance = graph_overlap(knn_graph(x, 10, "cpu"), knn_graph(y, 10, "cpu"))
    assert chance < 0.15


def test_cpu_searches_and_cuda_needs_a_gpu():
    assert search_backends("cpu") == CPU_SEARCHES
    with pytest.raises(UserError, match="--device"):
        search_backends("tpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(UserError, match="no working GPU"):
            search_backends("cuda")


# -- k rules ----------------------------------------------------------------------------------
def test_k_rules():
    for n in (2, 9, 27, 100, 1000, 4999, 5000, 50000):
        rice, sqrt, sturges = (
            resolve_k(r, n) if resolve_k_ok(r, n) else None for r in ("rice", "sqrt", "sturges")
        )
        if rice is not None:  # the smallest integer >= 2 n^(1/3): checked without roots
            assert rice**3 >= 8 * n > (rice - 1) ** 3
        if sqrt is not None:
            assert sqrt**2 >= n > (sqrt - 1) ** 2
        if sturges is not None:
            assert 2 ** (sturges - 1) >= n > 2 ** (sturges - 2)
    # near-misses of floating point roots: exact cubes, squares and powers of two
    assert resolve_k("rice", 27) == 2 * 3 and resolve_k("rice", 1000) == 2 * 10
    assert resolve_k("rice", 5000) == math.ceil(2 * 5000 ** (1 / 3))
    assert resolve_k("sqrt", 4900) == 70 and resolve_k("sqrt", 4901) == 71
    assert resolve_k("sturges", 1024) == 11 and resolve_k("sturges", 1025) == 12
    assert resolve_k(7, 100) == 7 and resolve_k("7", 100) == 7 and resolve_k(" RICE ", 64) == 8


def resolve_k_ok(rule: str, n: int) -> bool:
    try:
        resolve_k(rule, n)
    except UserError:
        return False
    return True


@pytest.mark.parametrize(
    ("k", "n", "match"),
    [
        (10, 10, "more than 10"),
        (0, 10, "at least 1"),
        ("bogus", 10, "rice"),
        ("rice", 4, "more than"),
    ],
)
def test_bad_k(k, n, match):
    with pytest.raises(UserError, match=match):
        resolve_k(k, n)


# -- bad input to the math --------------------------------------------------------------------
def test_bad_arrays():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((30, 2, 4))
    with pytest.raises(UserError, match="30 and 29 rows"):
        mutual_knn_scores(x, x[:29], 3)
    with pytest.raises(UserError, match="more than 30"):
        mutual_knn_scores(x, x, 30)
    nan = x.copy()
    nan[7, 1, 2] = np.nan
    with pytest.raises(UserError, match="NaN.*row 7"):
        mutual_knn_scores(nan, x, 3)
    zero = x.copy()
    zero[11, 0] = 0
    with pytest.raises(UserError, match="all zero.*row 11"):
        mutual_knn_scores(x, zero, 3)


# -- the stage on a synthetic store -----------------------------------------------------------
IMAGE_LAYERS = ["block.0", "block.1", "block.2", "final_norm"]
TEXT_LAYERS = ["embeddings", "layer.0", "layer.1", "layer.2", "layer.3"]
PLANTED = (1, 2)  # block.1 x layer.1 share the latent; every other pair much less


def planted_store(path: Path, n_images: int = 150, captions: int = 2, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n_images, 4))
    image_strength = [0.2, 3.0, 0.5, 0.2]
    text_strength = [0.0, 0.3, 3.0, 0.6, 0.3]
    image = np.stack(
        [
            w * latent @ rng.standard_normal((4, 24)) + rng.standard_normal((n_images, 24))
            for w in image_strength
        ],
        axis=1,
    )
    text_latent = np.repeat(latent, captions, axis=0)  # captions of image i: rows i*c .. i*c+c-1
    n_texts = n_images * captions
    text = np.stack(
        [
            w * text_latent @ rng.standard_normal((4, 16)) + rng.standard_normal((n_texts, 16))
            for w in text_strength
        ],
        axis=1,
    )
    write_pairs_manifest(path, "toy", "train", n_images, captions_per_image=captions)
    write_features(path, "toy", "train", "image", "img-model", image, IMAGE_LAYERS, block_rows=64)
    write_features(path, "toy", "train", "text", "txt-model", text, TEXT_LAYERS, block_rows=64)


def run_cli(*args: str):
    return CliRunner().invoke(app, ["--params", "/dev/null", *args], catch_exceptions=True)


def select_args(store: Path, out: Path, *extra: str) -> list[str]:
    return [
        "select",
        "--store",
        str(store),
        "--dataset",
        "toy",
        "--image-model",
        "img-model",
        "--text-model",
        "txt-model",
        "--out",
        str(out),
        "--device",
        "cpu",
        *extra,
    ]


def test_cli_finds_the_planted_pair(tmp_path):
    store, out = tmp_path / "f.zarr", tmp_path / "sel"
    planted_store(store)
    result = run_cli(*select_args(store, out, "--n-samples", "120", "--seed", "3"))
    assert result.exit_code == 0, result.output + repr(result.exception)
    info = json.loads((out / "selection.json").read_text())
    assert (info["image_index"], info["text_index"]) == PLANTED
    assert (info["image_layer"], info["text_layer"]) == ("block.1", "layer.1")
    assert info["n"] == 120 and info["k"] == resolve_k("rice", 120) and info["seed"] == 3
    assert (info["last_image_layer"], info["last_text_layer"]) == ("final_norm", "layer.3")
    assert info["image_model"] == "img-model" and info["dataset"] == "toy"

    table = pd.read_parquet(out / "scores.parquet")
    assert list(table.columns) == [
        "image_layer",
        "image_index",
        "text_layer",
        "text_index",
        "score",
        "mutual_knn",
    ]
    assert len(table) == len(IMAGE_LAYERS) * len(TEXT_LAYERS)
    scores = table.pivot(index="image_index", columns="text_index", values="score").to_numpy()
    best = scores[PLANTED]
    assert best == info["score"] and best > 1.5 * np.delete(scores.ravel(), np.argmax(scores)).max()
    assert info["last_score"] == scores[-1, -1]

    # the same numbers from the pure function on the same sample, paired through the manifest
    fs = FeatureStore(store)
    image_rows, text_rows = sample_pairs(fs.manifest("toy", "train"), 120, 3)
    image = np.stack(fs.open("toy", "train", "image", "img-model").read(), axis=1)[image_rows]
    text = np.stack(fs.open("toy", "train", "text", "txt-model").read(), axis=1)[text_rows]
    np.testing.assert_allclose(scores, brute_table(image, text, info["k"]), atol=1e-12)

    assert (out / "heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "block.1" in result.output and "layer.1" in result.output and "chosen" in result.output


def test_sampling_is_seeded_and_one_caption_per_image(tmp_path):
    planted_store(tmp_path / "f.zarr", n_images=100, captions=3)
    manifest = FeatureStore(tmp_path / "f.zarr").manifest("toy", "train")
    a = sample_pairs(manifest, 40, seed=5)
    b = sample_pairs(manifest, 40, seed=5)
    c = sample_pairs(manifest, 40, seed=6)
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], c[0])
    image_rows, text_rows = a
    assert len(set(image_rows)) == 40 and np.all(np.diff(image_rows) > 0)
    np.testing.assert_array_equal(text_rows // 3, image_rows)  # each caption is of its image
    everything = sample_pairs(manifest, 10_000, seed=5)[0]
    np.testing.assert_array_equal(everything, np.arange(100))  # all images when fewer
    np.testing.assert_array_equal(sample_pairs(manifest, 0, seed=5)[0], np.arange(100))


def test_cli_bad_input(tmp_path):
    store, out = tmp_path / "f.zarr", tmp_path / "sel"
    planted_store(store, n_images=40, captions=1)
    cases = [
        (["--k", "40"], "more than 40"),
        (["--k", "many"], "rice"),
        (["--image-model", "nope"], "no image features of nope"),
    ]
    for extra, match in cases:
        result = run_cli(*select_args(store, out, *extra))
        assert isinstance(result.exception, UserError), (extra, result.output)
        assert match in str(result.exception)
    # a NaN row in the store
    bad = np.random.default_rng(0).standard_normal((40, 4, 24))
    bad[5, 2] = np.nan
    write_features(store, "toy", "train", "image", "nan-model", bad, IMAGE_LAYERS)
    result = run_cli(*select_args(store, out, "--image-model", "nan-model"))
    assert isinstance(result.exception, UserError) and "NaN" in str(result.exception)
    # text features whose rows no longer match the manifest
    write_features(store, "toy", "train", "text", "short", np.ones((39, 5, 16)), TEXT_LAYERS)
    result = run_cli(*select_args(store, out, "--text-model", "short"))
    assert isinstance(result.exception, UserError) and "row counts differ" in str(result.exception)
    assert not out.exists()  # nothing written on bad input


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    store = tmp_path / "f.zarr"
    planted_store(store, n_images=20, captions=1)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "pipeline",
            "--params",
            "/dev/null",
            *select_args(store, tmp_path / "sel", "--text-model", "missing"),
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and "Traceback" not in proc.stderr
    assert "no text features of missing" in proc.stderr


# -- --layers for align -------------------------------------------------------------------------
def test_resolve_layers(tmp_path):
    from stages.align import resolve_layers  # align's since the select stage split

    store_path, sel = tmp_path / "f.zarr", tmp_path / "sel"
    planted_store(store_path)
    args = (PairSpec(store_path, "toy", "train", "img-model", "txt-model"), sel)
    assert resolve_layers("last", *args) == ("final_norm", "layer.3")
    assert resolve_layers("1,layer.0", *args) == ("block.1", "layer.0")
    assert resolve_layers("-2, 4", *args) == ("block.2", "layer.3")
    for bad, match in [
        ("1", "IMAGE,TEXT"),
        ("9,0", "out of range"),
        ("block.7,0", "unknown layer"),
    ]:
        with pytest.raises(UserError, match=match):
            resolve_layers(bad, *args)

    # auto: computed when absent, written to the select run dir
    assert resolve_layers("auto", *args, SelectSettings(n_samples=0, k=8, seed=1)) == (
        "block.1",
        "layer.1",
    )
    info = json.loads((sel / "selection.json").read_text())
    assert info["k"] == 8 and info["n"] == 150
    # auto: an existing selection for these features is used as it is
    info.update(image_layer="block.0", text_layer="embeddings")
    (sel / "selection.json").write_text(json.dumps(info))
    assert resolve_layers("auto", *args) == ("block.0", "embeddings")
    # auto: a selection made for other models is replaced
    info.update(text_model="someone-else")
    (sel / "selection.json").write_text(json.dumps(info))
    assert resolve_layers("auto", *args, SelectSettings(n_samples=0, k=8)) == ("block.1", "layer.1")
    assert json.loads((sel / "selection.json").read_text())["text_model"] == "txt-model"
