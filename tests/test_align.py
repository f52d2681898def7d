"""stages.align and `python -m pipeline align` on a planted problem: text = noisy linear map of the
image's latent, stored with a noise layer beside the signal layer of each model."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import torch
from typer.testing import CliRunner

import stages.train as train_module
from pipeline.app import app
from stages.align import run_align, trainer
from stages.heads import build_head, head_kinds, load_run
from stages.losses import clip_loss, structure_regularizer
from stages.pairs import MemoryPairs, PairSpec, split_pairs
from stages.train import (
    HISTORY_COLUMNS,
    AlignSettings,
    lambda_at,
    lr_at,
    optimizer_step,
    train_heads,
    validation_losses,
)
from store import FeatureStore, UserError
from tests.helpers import write_features, write_pairs_manifest

IMAGE_LAYERS = ["block.0", "final_norm"]
TEXT_LAYERS = ["embeddings", "layer.0"]
FAST = AlignSettings(
    lam=1.0,
    out_dim=16,
    hidden_dim=32,
    batch_size=128,
    epochs=40,
    lr=1e-2,
    warmup_steps=20,
    patience=30,
    val_fraction=0.2,
    min_val_pairs=20,
    seed=0,
)


def planted(n: int, rng: np.random.Generator, maps) -> tuple[np.ndarray, np.ndarray]:
    """(image, text) features (n, 2, D): layer 0 is noise, layer 1 carries the shared latent."""
    to_image, to_text = maps
    z = rng.normal(size=(n, to_image.shape[0]))
    image = z @ to_image + 0.3 * rng.normal(size=(n, to_image.shape[1]))
    text = z @ to_text + 0.3 * rng.normal(size=(n, to_text.shape[1]))
    noise_i, noise_t = rng.normal(size=image.shape), rng.normal(size=text.shape)
    return np.stack([noise_i, image], axis=1), np.stack([noise_t, text], axis=1)


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("align") / "features.zarr"
    rng = np.random.default_rng(0)
    maps = (rng.normal(size=(8, 32)), rng.normal(size=(8, 24)))
    for split, n in (("train", 400), ("test", 200)):
        image, text = planted(n, rng, maps)
        write_features(path, "planted", split, "image", "img", image, IMAGE_LAYERS)
        write_features(path, "planted", split, "text", "txt", text, TEXT_LAYERS)
        write_pairs_manifest(path, "planted", split, n)
    return path


def align(store, out, settings=FAST, image_layer="final_norm", text_layer="layer.0", **kw):
    spec = PairSpec(
        store=store, dataset="planted", split="train", image_model="img", text_model="txt"
    )
    return run_align(spec, (image_layer, text_layer), settings, out, progress=False, **kw)


def recall_at_1(image_head, text_head, image: np.ndarray, text: np.ndarray) -> float:
    """Image->text Recall@1 of paired rows, in plain numpy."""
    with torch.no_grad():
        a = image_head(torch.from_numpy(image)).numpy()
        b = text_head(torch.from_numpy(text)).numpy()
    a /= np.linalg.norm(a, axis=1, keepdims=True)
    b /= np.linalg.norm(b, axis=1, keepdims=True)
    return float(np.mean(np.argmax(a @ b.T, axis=1) == np.arange(len(a))))


def test_planted_problem_is_learned_and_saved(store, tmp_path):
    config, result = align(store, tmp_path / "run")
    history = pd.read_csv(tmp_path / "run" / "history.csv")
    assert list(history.columns) == HISTORY_COLUMNS
    assert history["val_loss"].min() < 0.5 * history["val_loss"].iloc[0]
    # the kept weights: the lowest validation objective once lambda is fully on
    candidates = history[history["step"] >= FAST.warmup_steps]
    best = candidates.loc[candidates["val_objective"].idxmin()]
    assert result.best_epoch == best["epoch"]
    assert result.best_val_loss == pytest.approx(best["val_loss"])
    assert (np.diff(history["lambda"]) >= 0).all() and history["lambda"].iloc[-1] == 1.0
    assert history["lr"].iloc[-1] < history["lr"].iloc[0]
    assert (tmp_path / "run" / "curves.png").stat().st_size > 10_000

    test = FeatureStore(store)
    image = test.open("planted", "test", "image", "img").read_layer("final_norm")
    text = test.open("planted", "test", "text", "txt").read_layer("layer.0")
    r1 = recall_at_1(result.image_head, result.text_head, image, text)
    assert r1 > 0.8  # chance is 1/200

    loaded, image_head, text_head = load_run(tmp_path / "run")
    assert recall_at_1(image_head, text_head, image, text) == r1
    assert loaded == json.loads(json.dumps(config))
    expected = {
        "image_model": "img", "text_model": "txt", "dataset": "planted", "split": "train",
        "image_layer": "final_norm", "text_layer": "layer.0", "image_layer_index": 1,
        "text_layer_index": 1, "head": "linear", "image_dim": 32, "text_dim": 24, "out_dim": 16,
        "lambda": 1.0, "levels": 1, "seed": 0, "n_pairs": 400, "n_train": 320, "n_val": 80,
    }  # fmt: skip
    assert {k: loaded[k] for k in expected} == expected
    assert loaded["store_fingerprint"]["image"]["model_id"] == "img"


def test_regularizer_preserves_structure(store):
    """With lambda > 0 the trained heads keep the original structure better than without."""
    data = FeatureStore(store)
    x_img = data.open("planted", "train", "image", "img").read_layer("final_norm")
    x_txt = data.open("planted", "train", "text", "txt").read_layer("layer.0")
    rs = {}
    for lam in (0.0, 10.0):
        settings = AlignSettings(**{**FAST.__dict__, "lam": lam, "val_fraction": 0.0})
        result = train_heads((x_img, x_txt), None, settings, progress=False)
        if lam == 0:
            assert (result.history[["rs_image", "rs_text"]] == 0).all().all()  # not computed
        with torch.no_grad():
            z = result.image_head(torch.from_numpy(x_img))
            rs[lam] = structure_regularizer(torch.from_numpy(x_img), z).item()
    assert rs[10.0] < 0.5 * rs[0.0]


@pytest.mark.parametrize("head", ["linear", "mlp", "lowrank"])
def test_same_seed_same_weights(store, head):
    data = FeatureStore(store)
    x = data.open("planted", "train", "image", "img").read_layer("final_norm")[:200]
    y = data.open("planted", "train", "text", "txt").read_layer("layer.0")[:200]
    # batch 64 of 160: several shuffled steps per epoch, targets recomputed per batch
    base = {**FAST.__dict__, "head": head, "epochs": 5, "batch_size": 64}
    del base["seed"]
    runs = [
        train_heads((x[:160], y[:160]), (x[160:], y[160:]), AlignSettings(**base, seed=s), False)
        for s in (3, 3, 4)
    ]
    states = [r.image_head.state_dict() | r.text_head.state_dict() for r in runs]
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])
    assert not all(torch.equal(states[0][k], states[2][k]) for k in states[0])


def test_split_is_seeded_and_keeps_captions_of_an_image_together():
    image_rows = np.repeat(np.arange(100), 5)  # COCO-like: 5 captions per image
    train, val = split_pairs(image_rows, 200, 0.2, seed=1)
    assert len(train) + len(val) == 200 and 35 <= len(val) <= 45
    assert not set(image_rows[train]) & set(image_rows[val])
    again = split_pairs(image_rows, 200, 0.2, seed=1)
    assert np.array_equal(train, again[0]) and np.array_equal(val, again[1])
    other = split_pairs(image_rows, 200, 0.2, seed=2)
    assert not np.array_equal(train, other[0])
    assert len(split_pairs(image_rows, 0, 0.0, seed=0)[0]) == 500


def test_no_validation_hold_out_below_min_val_pairs():
    """val_fraction 0.1 of 100 pairs was a 10-pair validation set (chance-level noise to choose
    weights on): under min_val pairs every drawn pair trains; above it the hold-out is made."""
    image_rows = np.arange(1500)
    drawn = np.random.default_rng(4).permutation(1500)  # the subset, drawn independently
    train, val = split_pairs(image_rows, 100, 0.1, seed=4, min_val=100)
    assert len(val) == 0 and np.array_equal(train, np.sort(drawn[:100]))
    train, val = split_pairs(image_rows, 1000, 0.1, seed=4, min_val=100)
    assert len(val) == 100 and np.array_equal(np.sort([*train, *val]), np.sort(drawn[:1000]))


def test_early_stopping_waits_for_the_warm_up_and_counts_steps(monkeypatch):
    """A validation objective that only gets worse: the kept weights are those at the end of
    lambda's warm-up, and training stops `patience` optimiser steps later (4 steps an epoch
    here, so a patience counted in epochs would run 4x longer; the old loop also stopped on a
    CLIP loss that ignored R_S)."""
    scores = iter(range(10_000))  # rises at every validation

    def worse(heads, source, batch, settings, lambdas=None):
        value = np.array(float(next(scores)))
        return value, value

    monkeypatch.setattr(train_module, "validation_losses", worse)
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=(200, 12)), rng.normal(size=(200, 10))
    settings = AlignSettings(
        lam=1.0, out_dim=4, batch_size=50, epochs=100, warmup_steps=8, patience=12, seed=0
    )
    result = train_heads((x[:160], y[:160]), (x[160:], y[160:]), settings, progress=False)
    assert result.info["best_step"] == 8 and result.best_epoch == 2  # warm-up over at step 8
    assert result.steps == 8 + 12 and len(result.history) == 5


def test_max_steps_caps_the_epochs_and_the_schedule_ends_there():
    """4 steps an epoch: --max-steps 10 runs exactly 10 steps (3 epochs, the last one of 2
    steps), and the cosine learning rate spans those 10 steps, not --epochs x 4; full batch:
    10 epochs. (It ran 12: the last epoch completed past the cap.)"""
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(200, 12)), rng.normal(size=(200, 10))
    settings = AlignSettings(lam=0.0, out_dim=4, batch_size=50, epochs=100, max_steps=10)
    result = train_heads((x, y), None, settings, progress=False)
    assert result.steps == 10 and len(result.history) == 3
    assert result.history["step"].tolist() == [4, 8, 10]
    # the lr recorded for each epoch is that of its last step: 3, 7, 9 of 10
    expected = [lr_at(step, 10, settings.lr) for step in (3, 7, 9)]
    np.testing.assert_allclose(result.history["lr"], expected)
    full = train_heads((x[:40], y[:40]), None, replace(settings, batch_size=64), progress=False)
    assert full.steps == 10 and len(full.history) == 10
    uncapped = replace(settings, epochs=2, max_steps=0)
    assert train_heads((x, y), None, uncapped, progress=False).steps == 8


def test_validation_score_is_the_trained_objective():
    """validation_losses = CLIP + lambda (R_S image + R_S text) at full lambda, each a mean over
    near-equal chunks of at least `batch` pairs, against the loss functions applied by hand."""
    rng = np.random.default_rng(5)
    x = rng.normal(size=(90, 12)).astype(np.float32)
    y = rng.normal(size=(90, 10)).astype(np.float32)
    settings = AlignSettings(lam=3.0, out_dim=4, levels=2, temperature=0.1)
    torch.manual_seed(0)
    heads = (build_head("linear", 12, 4, 8), build_head("linear", 10, 4, 8))
    clip, objective = validation_losses(heads, MemoryPairs(x, y), 40, settings)
    expected_clip, expected = [], []
    with torch.no_grad():
        for rows in (np.arange(45), np.arange(45, 90)):  # 90 // 40 = 2 chunks of 45
            xi, yi = torch.from_numpy(x[rows]), torch.from_numpy(y[rows])
            zi, zt = heads[0](xi), heads[1](yi)
            a = clip_loss(zi, zt, 0.1).item()
            rs = structure_regularizer(xi, zi, 2, 0.1) + structure_regularizer(yi, zt, 2, 0.1)
            expected_clip.append(a)
            expected.append(a + 3.0 * rs.item())
    assert clip == pytest.approx(np.mean(expected_clip), rel=1e-6)
    assert objective == pytest.approx(np.mean(expected), rel=1e-6)
    assert objective > clip  # R_S of random heads is well above 0


def test_schedules():
    assert lambda_at(0, 10.0, 100) == 0.0
    assert lambda_at(50, 10.0, 100) == 5.0
    assert lambda_at(500, 10.0, 100) == 10.0 and lambda_at(0, 10.0, 0) == 10.0
    assert lr_at(0, 100, 1e-3) == 1e-3
    assert lr_at(50, 100, 1e-3) == pytest.approx(5e-4)
    assert lr_at(100, 100, 1e-3) == pytest.approx(0.0)


def test_bad_input(store, tmp_path):
    with pytest.raises(UserError, match="unknown layer 'block.9'"):
        align(store, tmp_path / "r", image_layer="block.9")
    with pytest.raises(UserError, match="exceeds the 400 pairs"):
        align(store, tmp_path / "r", AlignSettings(n_pairs=401))
    with pytest.raises(UserError, match="1 training pair"):
        align(store, tmp_path / "r", AlignSettings(n_pairs=3, val_fraction=0.1, min_val_pairs=2))
    with pytest.raises(UserError, match="0 training pair"):
        train_heads((np.zeros((0, 4)), np.zeros((0, 4))), None, FAST, progress=False)
    with pytest.raises(UserError, match="levels"):
        align(store, tmp_path / "r", AlignSettings(levels=6))
    with pytest.raises(UserError, match="unknown head"):
        build_head("csa-typo", 4, 4)
    with pytest.raises(UserError, match="no run directory"):
        load_run(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match="has no head.safetensors"):
        load_run(tmp_path / "empty")

    bad = tmp_path / "nan.zarr"
    values = np.random.default_rng(0).normal(size=(20, 2, 8))
    write_features(bad, "planted", "train", "text", "txt", values, TEXT_LAYERS)
    values[7, 1, 3] = np.nan  # in the chosen image layer only
    write_features(bad, "planted", "train", "image", "img", values, IMAGE_LAYERS)
    write_pairs_manifest(bad, "planted", "train", 20)
    with pytest.raises(UserError, match="1 row\\(s\\) with NaN or inf \\(first: \\[7\\]\\)"):
        align(bad, tmp_path / "r")
    assert align(bad, tmp_path / "r", image_layer="block.0")  # the other layer is fine


def cli(*args: str):
    from pipeline import commands  # noqa: F401  (registers the commands)

    return CliRunner().invoke(app, ["--params", "/dev/null", "align", *args])


def test_cli_trains_with_auto_layers_and_the_plain_baseline(store, tmp_path):
    common = [
        "--store", str(store), "--dataset", "planted", "--image-model", "img",
        "--text-model", "txt", "--out-dim", "16", "--batch-size", "128", "--epochs", "5",
        "--warmup-steps", "5", "--no-progress", "--select-dir", str(tmp_path / "select"),
    ]  # fmt: skip
    result = cli(*common, "--out", str(tmp_path / "auto"), "--layers", "auto", "--head", "mlp")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert (config["image_layer"], config["text_layer"]) == ("final_norm", "layer.0")
    assert config["head"] == "mlp" and config["hidden_dim"] == 1024
    result = cli(*common, "--out", str(tmp_path / "plain"), "--layers", "0,-2", "--lambda", "0")
    assert result.exit_code == 0, result.output
    config = json.loads((tmp_path / "plain" / "config.json").read_text())
    assert (config["image_layer"], config["text_layer"], config["lambda"]) == (
        "block.0", "embeddings", 0.0,
    )  # fmt: skip


def test_cli_error_is_one_line_and_exit_2(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "pipeline", "--params", "/dev/null", "align",
         "--store", str(tmp_path / "none.zarr"), "--layers", "last"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: no feature store at") and "Traceback" not in proc.stderr


def test_batch_plan_covers_every_pair_in_equal_batches():
    from stages.pairs import batch_plan

    assert batch_plan(450, 256) == (2, 225)
    assert batch_plan(1294, 256) == (6, 216)
    assert batch_plan(100, 4096) == (1, 100)
    for n, size in [(7, 3), (1000, 999), (4097, 4096)]:
        steps, batch = batch_plan(n, size)
        assert batch <= size and steps * batch >= n > (steps - 1) * batch


def test_every_head_kind_has_a_trainer():
    assert {"linear", "mlp", "lowrank", "csa"} <= set(head_kinds())
    assert all(callable(trainer(name)) for name in head_kinds())


def test_optimizer_step_refuses_a_non_finite_loss_before_touching_the_weights():
    weight = torch.nn.Parameter(torch.ones(3))
    optimizer = torch.optim.SGD([weight], lr=0.1)
    with pytest.raises(UserError, match="the CSA objective became nan at step 7"):
        optimizer_step(optimizer, (weight * float("nan")).sum(), 7, what="the CSA objective")
    assert torch.equal(weight.detach(), torch.ones(3)) and weight.grad is None
    optimizer_step(optimizer, (weight * weight).sum(), 8, clip=[weight])  # grad 2, clipped to 1
    expected = 1 - 0.1 * 2 / np.linalg.norm([2.0, 2.0, 2.0])
    torch.testing.assert_close(weight.detach(), torch.full((3,), expected, dtype=torch.float32))


def test_lowrank_head_shapes_and_a_gradient_reaches_the_gate_and_the_residual_branch():
    torch.manual_seed(0)
    head = build_head("lowrank", 24, 16)
    x = torch.randn(10, 24)
    assert head(x).shape == (10, 16)
    assert head.down.weight.shape == (64, 24) and head.up.weight.shape == (16, 64)
    assert 0 < head.gate.item() < 1  # a gate at 0 (logit -inf) has no gradient: never opens
    head(x).square().sum().backward()
    for name in ("gate_logit", "down.weight", "up.weight", "proj.weight"):
        grad = head.get_parameter(name).grad
        assert grad is not None and torch.isfinite(grad).all() and grad.abs().sum() > 0, name
    # eval mode: no dropout, output = P x + alpha * W2 GELU(W1 x), checked in float64 numpy
    head.eval()
    xs = x.double().numpy()
    w = {k: v.detach().double().numpy() for k, v in head.state_dict().items()}
    hidden = xs @ w["down.weight"].T
    gelu = 0.5 * hidden * (1 + np.vectorize(math.erf)(hidden / math.sqrt(2)))
    alpha = 1 / (1 + np.exp(-w["gate_logit"]))
    expected = xs @ w["proj.weight"].T + alpha * gelu @ w["up.weight"].T
    np.testing.assert_allclose(head(x).detach().numpy(), expected, rtol=1e-4, atol=1e-5)


def test_lowrank_gate_opens_in_training(store):
    data = FeatureStore(store)
    x = data.open("planted", "train", "image", "img").read_layer("final_norm")[:200]
    y = data.open("planted", "train", "text", "txt").read_layer("layer.0")[:200]
    settings = AlignSettings(**{**FAST.__dict__, "head": "lowrank", "epochs": 5})
    start = build_head("lowrank", x.shape[1], settings.out_dim).gate.item()
    result = train_heads((x, y), None, settings, progress=False)
    assert result.image_head.gate.item() != pytest.approx(start, abs=1e-4)
