"""Layer similarity metrics against independent float64 numpy implementations of their
formulas (dense n x n matrices, as the authors' code), CKA's known values, and the permutation
null: equal to the `calibrated-similarity` package, ~0 and uniform p-values on independent
features, a planted pair found."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch
from scipy.linalg import subspace_angles

from stages import calibration, similarity
from stages.select import as_layers, layer_scores, metric_sides, resolve_k
from store import UserError
from tests.test_select import PLANTED, planted_store, run_cli, select_args

K = 5


# -- the references: dense, float64, straight from the formulas ---------------------------------
def unit(x):
    x = np.asarray(x, dtype=np.float64)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def cosine(x):
    u = unit(x)
    return u @ u.T


def ref_knn(x, k):
    s = cosine(x)
    np.fill_diagonal(s, -np.inf)
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def mask(graph):
    m = np.zeros((len(graph), len(graph)))
    np.put_along_axis(m, graph, 1.0, axis=1)
    return m


def ref_mutual_knn(x, y, k):
    return (mask(ref_knn(x, k)) * mask(ref_knn(y, k))).sum(axis=1).mean() / k


def ref_cycle_knn(x, y, k):  # the authors' knn_A[knn_B]
    a, b = ref_knn(x, k), ref_knn(y, k)
    n = len(a)
    return (a[b] == np.arange(n)[:, None, None]).reshape(n, -1).any(axis=1).mean()


def lcs(p, q):
    dp = np.zeros((len(p) + 1, len(q) + 1), dtype=int)
    for i in range(1, len(p) + 1):
        for j in range(1, len(q) + 1):
            same = dp[i - 1, j - 1] + 1 if p[i - 1] == q[j - 1] else 0
            dp[i, j] = max(same, dp[i - 1, j], dp[i, j - 1])
    return dp[-1, -1]


def ref_lcs_knn(x, y, k):
    return np.mean([lcs(p, q) for p, q in zip(ref_knn(x, k), ref_knn(y, k))]) / k


def hsic_biased(a, b):
    h = np.eye(len(a)) - 1 / len(a)
    return np.trace(a @ h @ b @ h)


def hsic_unbiased(a, b):  # Song et al. (2012), eq. 5, as the authors' hsic_unbiased
    m = len(a)
    a, b = a.copy(), b.copy()
    np.fill_diagonal(a, 0)
    np.fill_diagonal(b, 0)
    value = (a * b.T).sum() + a.sum() * b.sum() / ((m - 1) * (m - 2)) - 2 * (a @ b).sum() / (m - 2)
    return value / (m * (m - 3))


def ref_cka(x, y, hsic=hsic_biased):
    a, b = cosine(x), cosine(y)
    return hsic(a, b) / np.sqrt(hsic(a, a) * hsic(b, b))


def ref_unbiased_cka(x, y, k):
    return ref_cka(x, y, hsic_unbiased)


def ref_cknna(x, y, k):
    a, b = cosine(x), cosine(y)
    ma, mb = mask(ref_knn(x, k)), mask(ref_knn(y, k))

    def sim(ka, kb, m):
        return hsic_unbiased(m * ka, m * kb)

    return sim(a, b, ma * mb) / np.sqrt(sim(a, a, ma) * sim(b, b, mb))


def ref_svcca(x, y, k, q=10):
    def basis(v):
        z = unit(v)
        z = (z - z.mean(0)) / (z.std(0, ddof=1) + 1e-8)
        return np.linalg.svd(z, full_matrices=False)[0][:, :q]

    return np.cos(subspace_angles(basis(x), basis(y))).mean()  # canonical correlations


def ref_l_hop_cka(x, y, k, levels=similarity.HOP_LEVELS):
    """The authors' l_hop_cka ("ip" kernel, biased HSIC) times levels / Σ 1/l (1 at most)."""
    a, b = cosine(x), cosine(y)
    total, weights = 0.0, 0.0
    for level in range(1, levels + 1):
        ka, kb = np.linalg.matrix_power(a, level), np.linalg.matrix_power(b, level)
        total += hsic_biased(ka, kb) / np.sqrt(hsic_biased(ka, ka) * hsic_biased(kb, kb)) / level
        weights += 1 / level
    return total / weights


def ref_hcs(x, y, k, levels=similarity.HCS_LEVELS, tau=similarity.HCS_TEMPERATURE):
    """exp(-R_S): the paper's R_S, JS averaged over rows, 0 log 0 = 0."""

    def transitions(v):
        z = unit(v)
        z = z - z.mean(axis=0)
        s = z @ z.T / tau
        p = np.exp(s - s.max(axis=1, keepdims=True))
        return p / p.sum(axis=1, keepdims=True)

    def plogp(p):
        return np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(axis=1)

    p, q = transitions(x), transitions(y)
    total = 0.0
    for level in range(1, levels + 1):
        pl, ql = np.linalg.matrix_power(p, level), np.linalg.matrix_power(q, level)
        js = 0.5 * plogp(pl) + 0.5 * plogp(ql) - plogp((pl + ql) / 2)
        total += js.mean() / level
    return np.exp(-total / levels)


REFERENCES = {
    "l_hop_cka": ref_l_hop_cka,
    "hcs": ref_hcs,
    "mutual_knn": ref_mutual_knn,
    "cycle_knn": ref_cycle_knn,
    "lcs_knn": ref_lcs_knn,
    "cknna": ref_cknna,
    "cka": lambda x, y, k: ref_cka(x, y),
    "unbiased_cka": ref_unbiased_cka,
    "svcca": ref_svcca,
}


def layered(n=40, seed=0):
    """Image layers of widths 12, 16, 11 and text layers of 13, 14: some related, some not."""
    rng = np.random.default_rng(seed)
    latent = rng.standard_normal((n, 4))
    image = [s * latent @ rng.standard_normal((4, d)) + rng.standard_normal((n, d))
             for s, d in ((2.0, 12), (0.3, 16), (0.0, 11))]  # fmt: skip
    text = [s * latent @ rng.standard_normal((4, d)) + rng.standard_normal((n, d))
            for s, d in ((1.5, 13), (0.0, 14))]  # fmt: skip
    return image, text


@pytest.mark.parametrize("metric", similarity.metric_names())
def test_every_metric_matches_its_formula(metric):
    image, text = layered()
    got = layer_scores(image, text, metric=metric, k=K, device="cpu")
    want = np.array([[REFERENCES[metric](x, y, K) for y in text] for x in image])
    assert got.shape == (3, 2) and got.dtype == np.float64
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # the related pair stands out in every metric: the tables say something. hcs keeps the
    # softmax's diagonal (|z_i|² / 0.05 = 20 against off-diagonal cosines of ±0.3 / 0.05 here),
    # so two unrelated noise layers both have P ≈ I and agree: only within its image row does
    # the related text layer win
    assert got[0, 0] == (got[0].max() if metric == "hcs" else got.max())


@pytest.mark.parametrize("metric", ["l_hop_cka", "hcs"])
def test_layers_wider_than_the_sample(metric):
    """d > n: l_hop_cka's kernel powers go through X Xᵀ instead of XᵀX."""
    rng = np.random.default_rng(5)
    image = [rng.standard_normal((14, 30)), rng.standard_normal((14, 9))]
    text = [image[0] @ rng.standard_normal((30, 40)) + rng.standard_normal((14, 40))]
    got = layer_scores(image, text, metric=metric, device="cpu")
    want = np.array([[REFERENCES[metric](x, y, K) for y in text] for x in image])
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
@pytest.mark.parametrize("metric", similarity.metric_names())
def test_gpu_tables_equal_the_cpu_ones(metric):
    image, text = layered()
    on_cpu = layer_scores(image, text, metric=metric, k=K, device="cpu")
    on_gpu = layer_scores(image, text, metric=metric, k=K, device="cuda")
    np.testing.assert_allclose(on_gpu, on_cpu, rtol=1e-5, atol=1e-6)


def test_cka_from_the_centred_features_when_grams_do_not_fit():
    image, text = layered(n=30)
    names = similarity.metric_names()
    for metric in [m for m in names if "gram" in similarity.structures_for([m])]:
        via_grams = layer_scores(image, text, metric=metric, device="cpu")
        via_features = layer_scores(image, text, metric=metric, device="cpu", gram_memory=0)
        np.testing.assert_allclose(via_features, via_grams, rtol=1e-5, atol=1e-6)


def test_hcs_refused_in_one_line_when_its_matrices_do_not_fit(monkeypatch):
    image, text = layered(n=30)
    layers = len(as_layers(image)) + len(as_layers(text))
    need = layers * 3 * 30 * 30 * 4  # float32 P^l for 3 levels, every layer of both sides
    monkeypatch.setattr("stages.structures.free_memory", lambda device: need - 1)
    with pytest.raises(UserError, match="hcs needs .* GiB .* lower --n-samples"):
        layer_scores(image, text, metric="hcs", device="cpu")
    layer_scores(image, text, metric="cka", device="cpu")  # the others keep no such matrices
    monkeypatch.setattr("stages.structures.free_memory", lambda device: need)
    assert layer_scores(image, text, metric="hcs", device="cpu").shape == (
        len(as_layers(image)),
        len(as_layers(text)),
    )


def test_cka_known_values():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((50, 8))
    q, _ = np.linalg.qr(rng.standard_normal((8, 8)))
    y = np.stack([x, x @ q, 3.7 * x, rng.standard_normal((50, 8))], axis=1)
    for metric in ("cka", "unbiased_cka", "l_hop_cka", "hcs"):
        scores = layer_scores(x[:, None], y, metric=metric, device="cpu")[0]
        np.testing.assert_allclose(scores[:3], 1.0, atol=1e-6)  # identical, rotated, scaled
        if metric != "hcs":  # hcs of two 8-d noise layers is ~1 too (see above: P ≈ I)
            assert abs(scores[3]) < 0.5


def test_array_and_sequence_inputs_agree():
    rng = np.random.default_rng(2)
    image, text = rng.standard_normal((30, 3, 6)), rng.standard_normal((30, 2, 5))
    for metric in ("mutual_knn", "cka"):
        np.testing.assert_array_equal(
            layer_scores(image, text, metric, k=4, device="cpu"),
            layer_scores(as_layers(image, "i"), list(text.transpose(1, 0, 2)), metric, k=4),
        )
    with pytest.raises(ValueError, match="unknown metric"):
        layer_scores(image, text, metric="nope")


# -- the permutation null -------------------------------------------------------------------------
def sides(image, text, metrics, k=K):
    n = len(image[0])
    return metric_sides(image, text, (len(image), len(text)), n, metrics, k, "cpu")


def test_relabeled_structures_equal_a_fresh_search_on_permuted_rows():
    image, text = layered(n=30)
    metrics = list(similarity.metric_names())
    perm = np.random.default_rng(3).permutation(30)
    got = similarity.tables(metrics, *sides(image, text, metrics), torch.as_tensor(perm))
    want = similarity.tables(metrics, *sides(image, [y[perm] for y in text], metrics))
    for metric in metrics:
        np.testing.assert_allclose(got[metric], want[metric], rtol=1e-5, atol=1e-6)


def test_calibration_equals_the_calibrated_similarity_package():
    package = pytest.importorskip("calibrated_similarity")
    image, text = layered(n=30, seed=4)
    count, seed = 24, 7
    metrics = ["mutual_knn", "cka"]
    observed = similarity.tables(metrics, *sides(image, text, metrics))
    null = calibration.permutation_null(metrics, *sides(image, text, metrics), count, seed)
    sims = {
        "mutual_knn": lambda x, y: ref_mutual_knn(x.numpy(), y.numpy(), K),
        "cka": lambda x, y: ref_cka(x.numpy(), y.numpy()),
    }

    def perms():  # the same permutations, in the same order
        rng = np.random.default_rng(seed)
        return lambda n, device: torch.as_tensor(rng.permutation(n))

    tx = [torch.as_tensor(x) for x in image]
    ty = [torch.as_tensor(y) for y in text]
    for metric in metrics:
        ours = calibration.calibrate_table(observed[metric], null[metric])
        for i, j in [(0, 0), (1, 1), (2, 0)]:
            cal, p, _ = package.calibrate(tx[i], ty[j], sims[metric], K=count, perm_fn=perms())
            assert float(p) == pytest.approx(ours.p_value[i, j])
            assert float(cal) == pytest.approx(ours.calibrated[i, j], abs=1e-5)
        cal, p, _ = package.calibrate_layers(tx, ty, sims[metric], K=count, perm_fn=perms())
        assert float(p) == pytest.approx(ours.max_p_value)
        assert float(cal) == pytest.approx(ours.max_calibrated, abs=1e-5)


@pytest.fixture
def one_thread():
    """Tiny matrices: torch's thread pool costs ms a product on a busy machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_null_calibrated_near_zero_and_p_values_uniform(one_thread):
    """100 independent data sets (fixed seeds), 2 x 2 unrelated layers, 19 permutations each:
    the per-pair and max-pair p-values are uniform on {1/20, ..., 1} (Kolmogorov-Smirnov
    distance below its 1 % critical value 1.63 / sqrt(100)) and calibrated scores ~0."""
    metrics = ["cka", "mutual_knn", "l_hop_cka", "hcs"]
    count, runs = 19, 100
    p = {m: [] for m in metrics}
    calibrated = {m: [] for m in metrics}
    for seed in range(runs):
        rng = np.random.default_rng(100 + seed)
        image = [rng.standard_normal((24, 6)) for _ in range(2)]
        text = [rng.standard_normal((24, 5)) for _ in range(2)]
        structures = sides(image, text, metrics, k=3)
        observed = similarity.tables(metrics, *structures)
        null = calibration.permutation_null(metrics, *structures, count, seed)
        for metric in metrics:
            result = calibration.calibrate_table(observed[metric], null[metric])
            p[metric].append((result.p_value[0, 1], result.max_p_value))
            calibrated[metric].append(result.max_calibrated)
    grid = np.arange(1, count + 2) / (count + 1)
    for metric in metrics:
        values = np.array(p[metric])
        for column in values.T:
            cdf = (column[:, None] <= grid + 1e-12).mean(axis=0)
            # mutual kNN takes few values: ties with the null make its p conservative
            gap = (cdf - grid) if metric == "mutual_knn" else np.abs(cdf - grid)
            assert gap.max() < 1.63 / np.sqrt(runs), (metric, gap.max())
        assert np.mean(calibrated[metric]) < 0.02


def test_planted_pair_found_with_small_p_value(tmp_path):
    store, out = tmp_path / "f.zarr", tmp_path / "sel"
    planted_store(store, n_images=60, captions=1)
    metrics = ("cka", "mutual_knn", "svcca", "l_hop_cka", "hcs")
    args = select_args(store, out, "--metric", ",".join(metrics), "--calibrate", "99")
    result = run_cli(*args)
    assert result.exit_code == 0, result.output + repr(result.exception)
    info = json.loads((out / "selection.json").read_text())
    assert info["metric"] == "cka" and info["permutations"] == 99
    table = pd.read_parquet(out / "scores.parquet")
    for metric in metrics:
        best = info["by_metric"][metric]
        row = table[(table.image_index == PLANTED[0]) & (table.text_index == PLANTED[1])]
        if metric == "hcs":
            # raw hcs is highest for two noise layers (both transition matrices ≈ I, see
            # test_every_metric_matches_its_formula) and calibration says so; the planted pair
            # has the highest calibrated score
            assert best["p_value"] > 0.05 and best["calibrated"] == 0
            calibrated = table["hcs_calibrated"].to_numpy()
            assert row.index.item() == int(np.argmax(calibrated))
        else:
            assert (best["image_index"], best["text_index"]) == PLANTED
            assert best["p_value"] < 0.05 and best["calibrated"] > 0
        assert row[f"{metric}_p_value"].item() == pytest.approx(0.01)
        assert row[f"{metric}_calibrated"].item() > 0
        assert (out / ("heatmap.png" if metric == "cka" else f"heatmap_{metric}.png")).is_file()
    np.testing.assert_array_equal(table["score"], table["cka"])
    # the unrelated layers (block.0 with text embeddings: no latent at all) are not significant
    unrelated = table[(table.image_index == 0) & (table.text_index == 0)]
    assert unrelated["cka_p_value"].item() > 0.05
    assert resolve_k("rice", 60) == info["k"]


def test_align_auto_selects_by_the_metric(tmp_path):
    from stages.align import resolve_layers  # align's since the select stage split
    from stages.pairs import PairSpec
    from stages.select import SelectSettings

    store, sel = tmp_path / "f.zarr", tmp_path / "sel"
    planted_store(store, n_images=60, captions=1)
    assert run_cli(*select_args(store, sel, "--metric", "cka,mutual_knn")).exit_code == 0
    spec = PairSpec(
        store=store, dataset="toy", split="train", image_model="img-model", text_model="txt-model"
    )
    # a metric the selection scored: its best pair, read from selection.json
    info = json.loads((sel / "selection.json").read_text())
    info["by_metric"]["mutual_knn"].update(image_layer="block.0", text_layer="embeddings")
    (sel / "selection.json").write_text(json.dumps(info))
    by = {m: SelectSettings(metric=m) for m in ("mutual_knn", "cka")}
    assert resolve_layers("auto", spec, sel, by["mutual_knn"]) == ("block.0", "embeddings")
    assert resolve_layers("auto", spec, sel, by["cka"]) == ("block.1", "layer.1")
    # a metric it did not score: selected again, by that metric ...
    result = run_cli(
        "align", "--store", str(store), "--dataset", "toy", "--image-model", "img-model",
        "--text-model", "txt-model", "--select-dir", str(sel), "--out", str(tmp_path / "run"),
        "--layers", "auto", "--metric", "svcca", "--epochs", "1", "--out-dim", "8",
        "--no-progress",
    )  # fmt: skip
    assert result.exit_code == 0, result.output + repr(result.exception)
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert (config["image_layer"], config["text_layer"]) == ("block.1", "layer.1")
    assert config["layer_metric"] == "svcca"
    # ... into a folder of its own: the selection of another metric is never rewritten
    assert json.loads((sel / "selection.json").read_text())["metric"] == "cka"
    assert json.loads((tmp_path / "sel-svcca" / "selection.json").read_text())["metric"] == "svcca"
    bad = run_cli(*select_args(store, sel, "--metric", "cka,nope"))
    assert isinstance(bad.exception, UserError) and "unknown metric" in str(bad.exception)
