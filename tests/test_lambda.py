"""`align --lambda auto`: folds by image, the choice rule, fold scores against an independent
float64 recomputation, and the command end to end (the final run equals `--lambda CHOSEN`)."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from safetensors.torch import load_file

from pipeline.config import settings_from
from stages.lambda_cv import (
    CSA_GRID,
    LambdaSearch,
    choose_lambda,
    cv_repeats,
    fold_scores,
    image_folds,
    parse_grid,
    parse_repeats,
    search_lambda,
    search_units,
)
from stages.pairs import MemoryPairs
from stages.threads import threads_for
from stages.train import AlignSettings, train_heads, train_lambda_stack
from store import UserError
from tests.helpers import (
    one_line_error,
    run_cli,
    write_features,
    write_pairs_manifest,
    write_prompts_manifest,
)
from tests.test_csa import planted

CLASSES = ["ant", "bee", "cat", "dog"]
SMALL = AlignSettings(
    out_dim=8, batch_size=64, epochs=20, max_steps=20, lr=0.01, warmup_steps=2, patience=0
)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """60 train images with 2 captions each (labels shared by image and text), a prompts split."""
    path = tmp_path_factory.mktemp("lambda") / "features.zarr"
    rng = np.random.default_rng(3)
    centres = rng.normal(size=(4, 4)) * 3
    for split, n in (("train", 60), ("test", 20)):
        labels = np.arange(n) % 4
        x, y = planted(2 * n, rng, dx=10, dy=8, k=4)
        x = x[::2].copy()  # one image row per image, two caption rows per image
        x[:, :4] += centres[labels]
        y[:, :4] += centres[np.repeat(labels, 2)]
        image = np.stack([rng.normal(size=x.shape), x], axis=1).astype(np.float32)
        text = np.stack([y, rng.normal(size=y.shape)], axis=1).astype(np.float32)
        write_features(path, "toy", split, "image", "img", image, ["block.0", "final_norm"])
        write_features(path, "toy", split, "text", "txt", text, ["embeddings", "layer.0"])
        write_pairs_manifest(path, "toy", split, n, 2, labels=labels, label_names=CLASSES)
    prompts = write_prompts_manifest(path, "toy", CLASSES, ["a {}", "the {}"])
    proto = np.concatenate([centres[prompts["label"]], np.zeros((len(prompts), 4))], axis=1)
    proto = np.stack([proto, proto], axis=1).astype(np.float32)
    write_features(path, "toy", "prompts", "text", "txt", proto, ["embeddings", "layer.0"])
    return path


def test_folds_keep_images_whole_near_equal_and_seeded():
    groups = np.repeat(np.arange(23), [1, 2, 3] * 7 + [2, 2])  # uneven captions per image
    fold = image_folds(groups, 4, seed=5)
    for g in np.unique(groups):
        assert len(set(fold[groups == g])) == 1  # an image's captions in one fold
    sizes = np.bincount(fold, minlength=4)
    assert sizes.sum() == len(groups) and sizes.max() - sizes.min() <= 3  # within one image
    assert np.array_equal(fold, image_folds(groups, 4, seed=5))
    assert np.array_equal(fold, image_folds(groups, 4, seed=5, repeat=0))  # split 0: the seed's
    assert not np.array_equal(fold, image_folds(groups, 4, seed=6))
    again = image_folds(groups, 4, seed=5, repeat=1)  # another split, as whole and as even
    assert not np.array_equal(fold, again)
    assert all(len(set(again[groups == g])) == 1 for g in np.unique(groups))
    assert np.ptp(np.bincount(again, minlength=4)) <= 3
    assert np.array_equal(again, image_folds(groups, 4, seed=5, repeat=1))
    with pytest.raises(UserError, match="--cv-folds 30 needs at least 30 training images"):
        image_folds(groups, 30, seed=0)


def test_auto_repeats_score_about_300_held_out_images():
    assert [cv_repeats(0, n) for n in (20, 60, 61, 100, 150, 299, 300, 5000)] == [
        5, 5, 5, 3, 2, 2, 1, 1,
    ]  # fmt: skip
    assert cv_repeats(2, 100) == 2 and cv_repeats(7, 5000) == 7  # as given
    assert parse_repeats("auto") == 0 and parse_repeats(" 4 ") == 4
    for bad in ("0", "-1", "two", "1.5", ""):
        with pytest.raises(UserError, match="--cv-repeats"):
            parse_repeats(bad)


def test_choice_rule_best_mean_then_smaller_lambda():
    scores = {0.0: [1.0, 3.0], 1.0: [2.0, 4.0], 3.0: [4.0, 2.0], 10.0: [0.0, 1.0]}
    assert choose_lambda(scores, higher_is_better=True) == 1.0  # 3.0 also has mean 3: tie
    assert choose_lambda(scores, higher_is_better=False) == 10.0
    assert parse_grid("10, 0,3") == (0.0, 3.0, 10.0)
    for bad in ("", "1,x", "1,-1", "1,1", "nan"):
        with pytest.raises(UserError):
            parse_grid(bad)
    with pytest.raises(UserError, match="--cv-folds"):
        LambdaSearch(folds=1)
    with pytest.raises(UserError, match="--lambda-criterion"):
        LambdaSearch(criterion="accuracy")


def r_at_1(image: np.ndarray, text: np.ndarray, owner: np.ndarray) -> float:
    """Float64 mean of image→text and text→image R@1 (no ties in continuous planted data)."""
    image = image / np.linalg.norm(image, axis=1, keepdims=True)
    text = text / np.linalg.norm(text, axis=1, keepdims=True)
    sim = image @ text.T
    i2t = np.mean(owner[sim.argmax(1)] == np.arange(len(image)))
    t2i = np.mean(sim.argmax(0) == owner)
    return 50.0 * (i2t + t2i)


def test_fold_scores_equal_an_independent_retraining_and_recomputation():
    rng = np.random.default_rng(0)
    x, y = planted(48, rng, dx=10, dy=8, k=4)
    groups = np.repeat(np.arange(24), 2)
    x = x[groups * 2]  # the two captions of an image share its image features
    train = MemoryPairs(x, y)
    empty = MemoryPairs(np.zeros((0, 10)), np.zeros((0, 8)))
    search = LambdaSearch(grid=(0.0, 2.0), folds=3, repeats=2)
    with threads_for(0.0):  # one torch thread, as align trains small heads: folds in lanes
        record = search_lambda(
            train, empty, groups, SMALL, search, train_heads, progress=False,
            fit_grid=train_lambda_stack,
        )  # fmt: skip
    units = search_units(3, (0.0, 2.0))  # folds 0 and 1 whole, fold 2 in two halves
    assert units == [(0, (0.0, 2.0)), (1, (0.0, 2.0)), (2, (0.0,)), (2, (2.0,))]
    assert record["lanes"] == min(4, len(os.sched_getaffinity(0)))  # linear heads: no draws
    splits = [image_folds(groups, 3, SMALL.seed, r) for r in range(2)]
    for lam in (0.0, 2.0):
        assert len(record["fold_scores"][str(lam)]) == 6  # split 0's three folds, then split 1's
        for i, (fold, k) in enumerate((f, k) for f in splits for k in range(3)):
            fit = fold != k
            result = train_heads((x[fit], y[fit]), None, replace(SMALL, lam=lam), progress=False)
            with torch.no_grad():
                zi = result.image_head(torch.as_tensor(x[~fit], dtype=torch.float32)).double()
                zt = result.text_head(torch.as_tensor(y[~fit], dtype=torch.float32)).double()
            held_groups = groups[~fit]
            images, first, owner = np.unique(held_groups, return_index=True, return_inverse=True)
            expected = r_at_1(zi.numpy()[first], zt.numpy(), owner)
            assert record["fold_scores"][str(lam)][i] == pytest.approx(expected, abs=1e-6)
    means = {lam: np.mean(record["fold_scores"][str(lam)]) for lam in (0.0, 2.0)}
    assert record["chosen"] == max(means, key=lambda lam: (means[lam], -lam))
    assert record["repeats"] == 2
    assert record["fold_sizes"] == [np.bincount(f).tolist() for f in splits]


@pytest.mark.parametrize("head", ["linear", "lowrank"])
def test_lanes_change_nothing_and_the_stack_equals_one_run_per_lambda(head):
    """The folds trained side by side in threads give the scores of the folds one after the
    other, exactly (the low-rank head's dropout too: each stack draws from its own generator);
    and the stacked grid, those of one run per λ (up to float rounding)."""
    rng = np.random.default_rng(1)
    x, y = planted(60, rng, dx=10, dy=8, k=4)
    groups, fold = np.arange(60), np.arange(60) % 3
    train, empty = MemoryPairs(x, y), MemoryPairs(np.zeros((0, 10)), np.zeros((0, 8)))
    grid, criteria = (0.0, 1.0, 4.0), ("retrieval", "clip")
    args = (train, empty, groups, fold, replace(SMALL, head=head), grid, train_heads, criteria)
    one = fold_scores(*args, progress=False, fit_grid=train_lambda_stack, lanes=1)
    assert fold_scores(*args, progress=False, fit_grid=train_lambda_stack, lanes=3) == one
    alone = fold_scores(*args, progress=False)
    for lam in grid:
        assert np.allclose(one["clip"][lam], alone["clip"][lam], rtol=1e-5)
        assert one["retrieval"][lam] == alone["retrieval"][lam]


def params_file(tmp_path) -> str:
    params = {
        "common": {"dataset": "toy", "image_model": "img", "text_model": "txt"},
        "align": {"epochs": 20, "max_steps": 20, "batch_size": 64, "out_dim": 8, "lr": 0.01,
                  "warmup_steps": 2, "patience": 0, "layers": "final_norm,embeddings"},
    }  # fmt: skip
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return str(path)


@pytest.mark.parametrize("criterion", ["zeroshot", "clip"])
def test_align_auto_records_the_search_and_equals_the_chosen_fixed_run(
    store, tmp_path, capsys, criterion
):
    base = ["--params", params_file(tmp_path), "align", "--store", store, "--no-progress"]
    auto = tmp_path / "auto"
    code, out, err = run_cli(
        [*base, "--out", auto, "--lambda", "auto", "--lambda-grid", "0,1,5", "--cv-folds", "3",
         "--lambda-criterion", criterion],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    config = json.loads((auto / "config.json").read_text())
    search = config["lambda_search"]
    assert search["criterion"] == criterion and search["grid"] == [0.0, 1.0, 5.0]
    assert search["repeats"] == 5  # auto: 60 training images, at most five splits
    assert all(len(v) == 3 * 5 for v in search["fold_scores"].values())
    assert [sum(sizes) for sizes in search["fold_sizes"]] == [120] * 5  # 2 captions per image
    means = {float(k): np.mean(v) for k, v in search["fold_scores"].items()}
    sign = 1 if criterion == "zeroshot" else -1
    assert config["lambda"] == max(means, key=lambda lam: (sign * means[lam], -lam))
    assert "<- chosen" in out and f"lambda {config['lambda']:g} (auto)" in out
    fixed = tmp_path / "fixed"
    code, _, err = run_cli([*base, "--out", fixed, "--lambda", str(config["lambda"])], capsys)
    assert code == 0, err
    a, b = load_file(auto / "head.safetensors"), load_file(fixed / "head.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--lambda", "ten"], "--lambda must be a number >= 0 or auto"),
        (["--lambda", "auto", "--cv-folds", "1"], "--cv-folds must be >= 2"),
        (["--lambda", "auto", "--cv-repeats", "0"], "--cv-repeats must be >= 1 or auto"),
        (["--lambda", "auto", "--lambda-criterion", "acc"], "--lambda-criterion must be one of"),
        (["--lambda", "auto", "--lambda-grid", "3"], "--lambda-grid needs two or more"),
        (["--lambda", "2", "--lambda-grid", "0,3"], "--lambda-grid goes with --lambda auto"),
        (
            ["--lambda", "auto", "--lambda-criterion", "zeroshot", "--prompts-split", "none"],
            "zeroshot needs class labels on the training pairs and a prompts split",
        ),
    ],
)
def test_bad_auto_options_are_one_line_errors_and_write_nothing(
    store, tmp_path, capsys, flags, message
):
    out = tmp_path / "run"
    args = ["--params", params_file(tmp_path), "align", "--store", store, "--out", out]
    code, _, err = run_cli([*args, "--no-progress", *flags], capsys)
    assert code == 2 and message in one_line_error(err)
    assert not out.exists()


def test_align_lambda_auto_in_params_leaves_sweep_and_table_their_own_lambda():
    settings = settings_from({"align": {"lam": "auto", "out_dim": 8}}, "align", AlignSettings)
    assert settings.lam == AlignSettings.lam and settings.out_dim == 8


def test_align_says_how_much_the_layers_agree_and_warns_on_chance_agreement(
    store, tmp_path, capsys
):
    params = params_file(tmp_path)
    select_dir = tmp_path / "select"
    code, _, err = run_cli(
        ["--params", params, "select", "--store", store, "--out", select_dir, "--calibrate", "19",
         "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    table = pd.read_parquet(select_dir / "scores.parquet").set_index(["image_layer", "text_layer"])
    base = ["--params", params, "align", "--store", store, "--select-dir", select_dir,
            "--no-progress", "--max-steps", "2", "--lambda", "1"]  # fmt: skip
    seen = {}
    for layers in ("final_norm,embeddings", "block.0,layer.0"):  # planted pair; two noise layers
        run = tmp_path / layers.replace(",", "-")
        code, out, err = run_cli([*base, "--layers", layers, "--out", run], capsys)
        assert code == 0, err
        record = json.loads((run / "config.json").read_text())["layer_agreement"]
        row = table.loc[tuple(layers.split(","))]
        assert record["score"] == pytest.approx(row["mutual_knn"])
        assert record["calibrated"] == pytest.approx(row["mutual_knn_calibrated"])
        assert record["p_value"] == pytest.approx(row["mutual_knn_p_value"])
        seen[layers] = (record["p_value"], out)
    p, out = seen["final_norm,embeddings"]
    assert p == pytest.approx(1 / 20) and "layer agreement: mutual_knn" in out  # above every null
    assert "agree no more than chance" not in out
    p, out = seen["block.0,layer.0"]
    assert p > 0.05 and "agree no more than chance" in out


def test_sweep_lambdas_and_the_auto_variant(store, tmp_path, capsys):
    params = yaml.safe_load(Path(params_file(tmp_path)).read_text())
    params["select"] = {"n_samples": 100}
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params))
    out = tmp_path / "sweep"
    code, _, err = run_cli(
        ["--params", tmp_path / "params.yaml", "sweep", "--store", store, "--out", out,
         "--select-dir", tmp_path / "select",
         "--methods", "linear-similar-rs,linear-similar-rs-auto",
         "--lambdas", "2,0", "--n-pairs", "40,0", "--seeds", "0,1", "--lambda-grid", "0,2",
         "--cv-folds", "2", "--cv-repeats", "2", "--workers", "1", "--no-progress"],
        capsys,
    )  # fmt: skip
    assert code == 0, err
    searches = [json.loads(p.read_text()).get("lambda_search") for p in out.rglob("config.json")]
    assert [s["repeats"] for s in searches if s] == [2] * 4  # 2 sizes x 2 seeds
    rows = pd.read_csv(out / "sweep.csv")
    assert len(rows) == 2 * 2 * 3 and (out / "lambda.png").stat().st_size > 0
    fixed = rows[rows["method"] == "linear-similar-rs"]
    assert sorted(fixed["lambda_setting"].astype(str).unique()) == ["0", "2"]
    assert (fixed["lambda"].astype(float) == fixed["lambda_setting"].astype(float)).all()
    # an auto run equals the fixed run at the λ it chose (same pairs, seed, settings)
    for _, auto in rows[rows["method"] == "linear-similar-rs-auto"].iterrows():
        twin = fixed[(fixed["n_pairs"] == auto["n_pairs"]) & (fixed["seed"] == auto["seed"])]
        twin = twin[twin["lambda"].astype(float) == float(auto["lambda"])].iloc[0]
        for column in ("zs_top1", "i2t_r1", "t2i_r1"):
            assert auto[column] == pytest.approx(twin[column], abs=1e-3)
    summary = (out / "summary.md").read_text()
    assert "| method | λ | n_pairs |" in summary
    group = fixed[(fixed["n_pairs"] == 40) & (fixed["lambda_setting"].astype(str) == "2")]
    mean, std = group["zs_top1"].mean(), group["zs_top1"].std()
    assert f"| linear-similar-rs | 2 | 40 | 40 | 2 | {mean:.1f} ± {std:.1f} |" in summary


def test_csa_auto_searches_its_own_grid_and_equals_the_fixed_run(store, tmp_path, capsys):
    base = ["--params", params_file(tmp_path), "align", "--store", store, "--no-progress",
            "--head", "csa", "--out-dim", "4", "--csa-steps", "10"]  # fmt: skip
    code, _, err = run_cli([*base, "--out", tmp_path / "auto", "--lambda", "auto",
                            "--cv-folds", "2"], capsys)  # fmt: skip
    assert code == 0, err
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert config["lambda_search"]["grid"] == list(CSA_GRID)
    code, _, err = run_cli([*base, "--out", tmp_path / "fixed", "--lambda",
                            str(config["lambda"])], capsys)  # fmt: skip
    assert code == 0, err
    a = load_file(tmp_path / "auto" / "head.safetensors")
    b = load_file(tmp_path / "fixed" / "head.safetensors")
    assert all(torch.equal(a[k], b[k]) for k in a)
