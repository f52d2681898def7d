"""CSA: ridge CCA against float64 hand solutions and scikit-learn, the head's exact score,
retrieval on a planted problem, the R_S refinement, errors, and the `table` command."""

import json
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import scipy.linalg
import torch
import yaml
from sklearn.cross_decomposition import CCA

import stages.csa as csa_module
from stages.csa import (
    csa_heads,
    csa_similarity,
    fit_cca,
    moments,
    ridge_covariance,
    train_csa,
)
from stages.evaluate import retrieval_recall
from stages.losses import structure_regularizer
from stages.train import AlignSettings
from stages.vectors import unit_rows
from store import UserError
from tests.helpers import (
    one_line_error,
    run_cli,
    write_features,
    write_pairs_manifest,
    write_prompts_manifest,
)


def planted(n: int, rng: np.random.Generator, dx: int = 12, dy: int = 10, k: int = 4, noise=0.3):
    """x and y share a k-dim latent through fixed random maps (seeded by 0), plus noise."""
    maps = np.random.default_rng(0)
    a, b = maps.normal(size=(k, dx)), maps.normal(size=(k, dy))
    z = rng.normal(size=(n, k))
    return (
        z @ a + noise * rng.normal(size=(n, dx)) + 3.0,
        z @ b + noise * rng.normal(size=(n, dy)) - 1.0,
    )


def hand_cca(x: np.ndarray, y: np.ndarray, dim: int, ridge: float):
    """Float64 CCA as a generalised eigenproblem: C_xy C_yy^-1 C_yx a = rho^2 C_xx a."""
    x, y = x - x.mean(0), y - y.mean(0)
    n = len(x)
    cxx, cyy, cxy = x.T @ x / (n - 1), y.T @ y / (n - 1), x.T @ y / (n - 1)
    cxx = cxx + ridge * np.trace(cxx) / len(cxx) * np.eye(len(cxx))
    cyy = cyy + ridge * np.trace(cyy) / len(cyy) * np.eye(len(cyy))
    values, vectors = scipy.linalg.eigh(cxy @ np.linalg.solve(cyy, cxy.T), cxx)
    order = np.argsort(values)[::-1][:dim]
    return np.sqrt(values[order]), vectors[:, order], cxx, cyy, cxy


@pytest.mark.parametrize("ridge", [0.0, 0.1, 1.0])
def test_cca_matches_a_float64_hand_solution(ridge):
    x, y = planted(150, np.random.default_rng(1))
    solution = fit_cca(x, y, 5, ridge)
    corr, a, cxx, cyy, cxy = hand_cca(x, y, 5, ridge)
    np.testing.assert_allclose(solution.corr, corr, rtol=1e-9, atol=1e-12)
    # the same subspace (the directions are unique up to sign for distinct correlations)
    assert np.max(scipy.linalg.subspace_angles(solution.proj_x, a)) < 1e-6
    # canonical property under the ridge covariances
    px, py = solution.proj_x, solution.proj_y
    np.testing.assert_allclose(px.T @ cxx @ px, np.eye(5), atol=1e-9)
    np.testing.assert_allclose(py.T @ cyy @ py, np.eye(5), atol=1e-9)
    np.testing.assert_allclose(px.T @ cxy @ py, np.diag(corr), atol=1e-9)
    assert (
        np.all(np.diff(solution.corr) <= 0) and 0 <= solution.corr.min() < solution.corr.max() < 1
    )


def test_cca_matches_scikit_learn():
    x, y = planted(300, np.random.default_rng(2), noise=0.8)
    solution = fit_cca(x, y, 3, ridge=0.0)
    reference = CCA(n_components=3, scale=False, max_iter=20000, tol=1e-14).fit(x, y)
    sx, sy = reference.transform(x, y)
    expected = [np.corrcoef(sx[:, k], sy[:, k])[0, 1] for k in range(3)]
    np.testing.assert_allclose(solution.corr, expected, rtol=1e-6)
    zx, zy = solution.project(x, y)
    for k in range(3):  # each canonical variate is scikit-learn's, up to sign and scale
        assert abs(np.corrcoef(zx[:, k], sx[:, k])[0, 1]) > 1 - 1e-6
        assert abs(np.corrcoef(zy[:, k], sy[:, k])[0, 1]) > 1 - 1e-6


def test_streamed_moments_equal_the_whole_batch():
    x, y = planted(101, np.random.default_rng(3))
    whole = moments([(x, y)])
    chunked = moments([(x[i : i + 17], y[i : i + 17]) for i in range(0, 101, 17)])
    for name in ("mean_x", "mean_y", "cov_x", "cov_y", "cov_xy"):
        np.testing.assert_allclose(getattr(chunked, name), getattr(whole, name), atol=1e-12)
    np.testing.assert_allclose(whole.cov_xy, np.cov(x.T, y.T)[:12, 12:], atol=1e-12)


def test_head_cosine_is_csas_weighted_score():
    x, y = planted(200, np.random.default_rng(4))
    solution = fit_cca(x, y, 4)
    image_head, text_head = csa_heads(solution)
    xt, yt = x[:30], y[:40]
    with torch.no_grad():
        fi = image_head(torch.from_numpy(xt).float()).double()
        ft = text_head(torch.from_numpy(yt).float()).double()
    assert fi.shape == (30, 5) and ft.shape == (40, 5)
    np.testing.assert_allclose(fi.norm(dim=1), 1.0, atol=1e-12)
    np.testing.assert_allclose(ft.norm(dim=1), 1.0, atol=1e-7)
    cosine = (unit_rows(fi) @ unit_rows(ft).T).numpy()
    # independent: centre, project, unit-normalise, weight by the correlations
    zx = (xt - solution.mean_x) @ solution.proj_x
    zy = (yt - solution.mean_y) @ solution.proj_y
    zx /= np.linalg.norm(zx, axis=1, keepdims=True)
    zy /= np.linalg.norm(zy, axis=1, keepdims=True)
    expected = np.einsum("ik,jk,k->ij", zx, zy, solution.corr)
    np.testing.assert_allclose(cosine, expected, atol=1e-6)
    np.testing.assert_allclose(csa_similarity(*solution.project(xt, yt), solution.corr), expected)


def test_csa_retrieval_on_a_planted_problem_is_far_above_chance():
    rng = np.random.default_rng(5)
    x, y = planted(600, rng, dx=40, dy=30, k=8, noise=0.5)
    settings = AlignSettings(head="csa", lam=0.0, out_dim=8, val_fraction=0.0)
    result = train_csa((x[:400], y[:400]), None, settings, progress=False)
    with torch.no_grad():
        fi = result.image_head(torch.from_numpy(x[400:]).float())
        ft = result.text_head(torch.from_numpy(y[400:]).float())
    recall = retrieval_recall(fi, ft, np.arange(200))
    assert recall["i2t_r1"] > 60 and recall["t2i_r1"] > 60  # chance: 0.5 %


def test_refinement_keeps_the_canonical_property_and_lowers_rs():
    x, y = planted(160, np.random.default_rng(6), dx=16, dy=12, k=4, noise=1.0)
    base = AlignSettings(head="csa", out_dim=6, csa_steps=30, batch_size=512, lr=0.01, lam=1.0)
    plain = train_csa((x, y), None, replace(base, lam=0.0), progress=False)
    refined = train_csa((x, y), None, base, progress=False)
    assert plain.info["csa"]["refined"] is False and refined.info["csa"]["refined"] is True
    xt, yt = torch.from_numpy(x), torch.from_numpy(y)

    def rs(head, feats) -> float:  # R_S of a head's canonical projections, computed afresh
        z = (feats - head.mean) @ head.proj
        return structure_regularizer(feats, z).item()

    rs_plain = rs(plain.image_head, xt) + rs(plain.text_head, yt)
    rs_refined = rs(refined.image_head, xt) + rs(refined.text_head, yt)
    assert rs_refined < rs_plain - 0.01
    info = refined.info["csa"]
    assert info["rs_image"] == pytest.approx(rs(refined.image_head, xt), abs=1e-9)
    assert info["rs_text"] == pytest.approx(rs(refined.text_head, yt), abs=1e-9)
    assert info["rs_image_cca"] == pytest.approx(rs(plain.image_head, xt), abs=1e-9)
    # the canonical property holds again after re-whitening
    m = moments([(x, y)])
    px, py = refined.image_head.proj.numpy(), refined.text_head.proj.numpy()
    np.testing.assert_allclose(px.T @ ridge_covariance(m.cov_x, 0.1) @ px, np.eye(6), atol=1e-6)
    np.testing.assert_allclose(py.T @ ridge_covariance(m.cov_y, 0.1) @ py, np.eye(6), atol=1e-6)
    corr = np.array(info["corr"])
    np.testing.assert_allclose(px.T @ m.cov_xy @ py, np.diag(corr), atol=1e-5)
    assert np.all(np.diff(corr) <= 1e-12) and corr.min() >= 0
    np.testing.assert_allclose(refined.image_head.weight.numpy(), corr, atol=1e-6)
    history = refined.history  # full batch: a step is an epoch; 20 rows after the start
    assert refined.steps == 30 and len(history) == 21 and history["val_loss"].isna().all()
    assert history["step"].iloc[0] == 0 and history["step"].iloc[-1] == 30
    assert (np.diff(history["step"]) >= 1).all() and np.diff(history["step"]).max() <= 2
    assert (history["epoch"] == history["step"]).all()


@pytest.mark.parametrize("n, batch", [(64, 512), (640, 32)])
def test_refinement_cost_does_not_grow_with_the_pairs(n, batch):
    """--csa-steps steps and 21 history rows (each a CLIP loss over every pair) at any n: the
    refinement used to run --epochs epochs (n / batch steps each) with a row per epoch."""
    x, y = planted(n, np.random.default_rng(10), dx=16, dy=12, k=4, noise=1.0)
    settings = AlignSettings(head="csa", out_dim=4, epochs=50, batch_size=batch, lam=1.0,
                             csa_steps=40, val_fraction=0.0)  # fmt: skip
    calls = []
    original = csa_module.mean_clip_loss

    def counting(*args, **kwargs):
        calls.append(1)
        return original(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(csa_module, "mean_clip_loss", counting)
        result = train_csa((x, y), None, settings, progress=False)
    per_epoch = n // min(batch, n)
    assert result.steps == 40 and len(result.history) == 21 and len(calls) == 21
    np.testing.assert_allclose(result.history["epoch"], result.history["step"] / per_epoch)


def test_same_seed_same_result():
    x, y = planted(200, np.random.default_rng(7))
    s = AlignSettings(head="csa", out_dim=4, csa_steps=9, batch_size=64, lr=0.01, lam=1.0, seed=3)

    def buffers(settings):
        r = train_csa((x, y), None, settings, progress=False)
        return torch.cat([r.image_head.proj.flatten(), r.text_head.proj.flatten()])

    first = buffers(s)
    assert torch.equal(first, buffers(s))
    assert not torch.allclose(first, buffers(replace(s, seed=4)))


def test_too_little_data_is_a_clear_error():
    x, y = planted(30, np.random.default_rng(8), dx=12, dy=10)
    with pytest.raises(UserError, match="lower --out-dim to 10"):
        fit_cca(x, y, 11)
    with pytest.raises(UserError, match="at least 11 training pairs"):
        fit_cca(x[:8], y[:8], 10)
    with pytest.raises(UserError, match="singular.*--csa-ridge"):
        fit_cca(x[:8], y[:8], 5, ridge=0.0)
    with pytest.raises(UserError, match="--csa-ridge must be >= 0"):
        fit_cca(x, y, 3, ridge=-1.0)
    with pytest.raises(UserError, match="constant"):
        fit_cca(np.ones_like(x), y, 3)
    with pytest.raises(UserError, match="at least 2"):
        train_csa((x[:1], y[:1]), None, AlignSettings(head="csa", out_dim=1), progress=False)


# -- the CLI: align --head csa, evaluate, and the table -----------------------------------------
CLASSES = [f"class{i}" for i in range(5)]


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """A planted store: 2 layers per model, labels shared by image and text, a prompts split."""
    path = tmp_path_factory.mktemp("csa") / "features.zarr"
    rng = np.random.default_rng(9)
    centres = rng.normal(size=(5, 4)) * 3
    for split, n in (("train", 160), ("test", 50)):
        labels = np.arange(n) % 5
        x, y = planted(n, rng, dx=10, dy=8, k=4)
        x[:, :4] += centres[labels]
        y[:, :4] += centres[labels]
        image = np.stack([rng.normal(size=x.shape), x], axis=1).astype(np.float32)
        text = np.stack([y, rng.normal(size=y.shape)], axis=1).astype(np.float32)
        write_features(path, "toy", split, "image", "img", image, ["block.0", "final_norm"])
        write_features(path, "toy", split, "text", "txt", text, ["embeddings", "layer.0"])
        write_pairs_manifest(path, "toy", split, n, labels=labels, label_names=CLASSES)
    prompts = write_prompts_manifest(path, "toy", CLASSES, ["a {}", "the {}"])
    proto = np.stack([centres[prompts["label"]], centres[prompts["label"]]], axis=1)
    proto = np.concatenate([proto, np.zeros((len(prompts), 2, 4))], axis=2)
    write_features(
        path, "toy", "prompts", "text", "txt", proto.astype(np.float32), ["embeddings", "layer.0"]
    )
    return path


def params_file(tmp_path, **table) -> str:
    params = {
        "common": {"dataset": "toy", "image_model": "img", "text_model": "txt"},
        "align": {"epochs": 3, "batch_size": 64, "out_dim": 8, "hidden_dim": 16, "lr": 0.01,
                  "warmup_steps": 1, "patience": 0},
        "select": {"n_samples": 100},
        "table": {"csa_dim": 4, **table},
    }  # fmt: skip
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


def test_align_head_csa_then_evaluate(store, tmp_path, capsys):
    run = tmp_path / "run"
    args = ["--params", params_file(tmp_path), "align", "--store", store, "--out", run]
    csa = [
        "--head",
        "csa",
        "--out-dim",
        "4",
        "--lambda",
        "0.5",
        "--csa-steps",
        "3",
        "--no-progress",
    ]
    code, out, err = run_cli([*args, *csa, "--layers", "final_norm,embeddings"], capsys)
    assert code == 0, err
    config = json.loads((run / "config.json").read_text())
    assert config["head"] == "csa" and config["csa"]["dim"] == 4 and config["lambda"] == 0.5
    assert config["refine_steps"] == 3
    assert len(pd.read_csv(run / "history.csv")) == 4  # step 0 (CCA) + 3 refinement steps
    code, out, err = run_cli([args[0], args[1], "evaluate", "--store", store, "--run", run], capsys)
    assert code == 0, err
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["run"]["head"] == "csa" and metrics["zero_shot"]["top1"] > 60  # chance: 20 %
    # a fresh interpreter loads the run without importing stages.csa first
    script = f"from stages.heads import load_run; print(load_run({str(run)!r})[1])"
    loaded = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert loaded.returncode == 0 and "CSAHead" in loaded.stdout, loaded.stderr
    code, out, err = run_cli([*args, "--head", "csa", "--out-dim", "9", "--layers", "last"], capsys)
    assert code == 2 and "lower --out-dim to 8" in one_line_error(err)


def test_table_command_writes_the_nine_rows_per_size(store, tmp_path, capsys):
    out = tmp_path / "table"
    args = ["--params", params_file(tmp_path, n_pairs=[60, 0]), "table", "--store", store]
    code, stdout, err = run_cli([*args, "--out", out, "--select-dir", tmp_path / "sel"], capsys)
    assert code == 0, err
    table = pd.read_csv(out / "table.csv")
    methods = [f"{h} + {v}" for h in ("Linear", "MLP", "CSA")
               for v in ("Last", "Similar", "Similar + R_S")]  # fmt: skip
    assert table["method"].tolist() == methods * 2
    assert table["n_pairs"].tolist() == [60] * 9 + [160] * 9
    assert set(table["layers (img/txt)"][::3]) == {"final_norm/layer.0"}
    rs_rows = table["method"].str.endswith("R_S")
    assert (table.loc[rs_rows & table["method"].str.startswith("CSA"), "lambda"] == 0.3).all()
    assert (table.loc[rs_rows & ~table["method"].str.startswith("CSA"), "lambda"] == 10).all()
    assert (table.loc[~rs_rows, "lambda"] == 0).all()
    for column in ("zs top1", "zs top5", "I2T R@1", "T2I R@1"):
        assert table[column].between(0, 100).all()
    config = json.loads((out / "n60/csa-similar-rs/config.json").read_text())
    assert config["head"] == "csa" and config["n_pairs"] == 60 and config["out_dim"] == 4
    assert (out / "nall/mlp-last/metrics.json").is_file()
    assert (out / "table.md").read_text().count("\n|") == 19
    code, _, err = run_cli([*args, "--out", out, "--n-pairs", "60,x"], capsys)
    assert code == 2 and "--n-pairs" in one_line_error(err)


def test_streamed_from_the_store_gives_the_same_csa(store):
    from stages.pairs import MemoryPairs, PairSpec, StorePairs, open_pairs

    spec = PairSpec(store=store, dataset="toy", split="train", image_model="img", text_model="txt")
    pairs = open_pairs(spec, image_layer="final_norm", text_layer="embeddings")
    (image, text), subset = pairs.load(), np.arange(0, 160, 2)
    s = AlignSettings(head="csa", out_dim=4, epochs=2, batch_size=32, lr=0.01, lam=1.0)
    streamed = train_csa(StorePairs(pairs, subset, window_rows=40), None, s, progress=False)
    in_memory = train_csa(MemoryPairs(image[subset], text[subset]), None, s, progress=False)
    for a, b in (
        (streamed.image_head, in_memory.image_head),
        (streamed.text_head, in_memory.text_head),
    ):
        torch.testing.assert_close(a.proj, b.proj, rtol=0, atol=1e-10)
        torch.testing.assert_close(a.weight, b.weight, rtol=0, atol=1e-10)
