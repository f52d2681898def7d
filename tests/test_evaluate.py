"""Stage 3: metrics on hand-made cases, against float64 numpy, and end to end on a planted store."""

from __future__ import annotations

import csv
import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from typer.testing import CliRunner

import pipeline.commands.evaluate  # noqa: F401  (registers evaluate and compare)
from pipeline.app import app, main
from stages.evaluate import (
    class_embeddings,
    comparison_table,
    evaluate_run,
    retrieval_recall,
    zero_shot_accuracy,
)
from stages.heads import build_head, save_run
from store import FeatureStore, UserError, write_manifest
from tests.helpers import write_features, write_pairs_manifest, write_prompts_manifest

IMG, TXT = "fake-img", "fake-txt"


# -- an independent float64 reference: enumerate every order of the tied candidates ----------
def ref_hit_rates(queries, candidates, relevant, ks):
    """Recall@K in percent: per query, the fraction of all orders of its tied block (the
    candidates scoring exactly as its best relevant one) that put a relevant one in the top K."""
    q = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    c = candidates / np.linalg.norm(candidates, axis=1, keepdims=True)
    scores = q.astype(np.float64) @ c.astype(np.float64).T
    hits = np.zeros((len(scores), len(ks)))
    for i, (s, rel) in enumerate(zip(scores, relevant, strict=True)):
        best = s[rel].max()
        above = int((s > best).sum())
        block = rel[s == best]
        orders = list(itertools.permutations(block))
        first = np.array([above + list(order).index(True) for order in orders])
        hits[i] = [np.mean(first < k) for k in ks]
    return {k: 100 * hits[:, j].mean() for j, k in enumerate(ks)}


def test_perfect_alignment_gives_100():
    rng = np.random.default_rng(0)
    images = rng.normal(size=(30, 16))
    owner = np.repeat(np.arange(30), 3)
    texts = images[owner] + 1e-3 * rng.normal(size=(90, 16))
    assert all(v == 100.0 for v in retrieval_recall(images, texts, owner).values())
    centers = rng.normal(size=(5, 16))
    labels = rng.integers(0, 5, size=50)
    acc = zero_shot_accuracy(centers[labels] + 1e-3 * rng.normal(size=(50, 16)), centers, labels)
    assert acc == {"top1": 100.0, "top5": 100.0}


def test_hand_computed_ranks():
    # 3 images (unit axes), 4 captions; caption t belongs to image owner[t]
    images = np.eye(3)
    texts = np.array([[1, 0.5, 0.2], [0.2, 1, 0.5], [0.5, 0.2, 1], [0.3, 0.2, 1]])
    owner = np.array([0, 0, 1, 2])
    out = retrieval_recall(images, texts, owner, ks=(1, 3, 4))
    # t2i ranks: 0, 2, 2, 0.  i2t (cosine, texts normalised): image0 best t0 rank 0;
    # image1 has only t2 (0.176) below t0 (0.440), t1 (0.880), t3 (0.188): rank 3; image2 rank 0
    assert out["t2i_r1"] == pytest.approx(50.0)
    assert out["t2i_r3"] == pytest.approx(100.0)
    assert out["i2t_r1"] == pytest.approx(200 / 3)
    assert out["i2t_r3"] == pytest.approx(200 / 3)
    assert out["i2t_r4"] == pytest.approx(100.0)


def test_multi_caption_relevance_and_ties():
    # each image has 3 captions; one matches it, two are orthogonal to every image (ties at 0)
    images = np.eye(6)[:3]
    texts = np.zeros((9, 6))
    for i in range(3):
        texts[3 * i, i] = 1.0
        texts[3 * i + 1, 3 + i] = 1.0
        texts[3 * i + 2, 3 + (i + 1) % 3] = 1.0
    owner = np.repeat(np.arange(3), 3)
    out = retrieval_recall(images, texts, owner, ks=(1, 2, 3))
    assert out["i2t_r1"] == 100.0  # any one caption of the image in the top 1 is a hit
    # a decoy ties (score 0) with its image and 2 others: P(hit@1) = 1/3, P(hit@2) = 2/3
    assert out["t2i_r1"] == pytest.approx(100 * (3 + 6 / 3) / 9)
    assert out["t2i_r2"] == pytest.approx(100 * (3 + 6 * 2 / 3) / 9)
    assert out["t2i_r3"] == 100.0


def test_constant_embeddings_score_chance():
    ones = np.ones((8, 4))
    out = retrieval_recall(ones, ones, np.arange(8), ks=(1, 3, 8))
    assert out["i2t_r1"] == out["t2i_r1"] == pytest.approx(100 / 8)
    assert out["t2i_r3"] == pytest.approx(300 / 8) and out["t2i_r8"] == 100.0
    acc = zero_shot_accuracy(ones, np.ones((3, 4)), np.zeros(8, dtype=int), topk=(1, 2, 3))
    assert acc == pytest.approx({"top1": 100 / 3, "top2": 200 / 3, "top3": 100.0})
    # 2 relevant among 6 tied candidates: P(hit@1) = 2/6, P(hit@2) = 1 - C(4,2)/C(6,2) = 9/15
    out = retrieval_recall(np.ones((3, 4)), np.ones((6, 4)), np.repeat(np.arange(3), 2), (1, 2))
    assert out["i2t_r1"] == pytest.approx(100 * 2 / 6) and out["i2t_r2"] == pytest.approx(60.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_recall_matches_float64_reference(seed):
    rng = np.random.default_rng(seed)
    images = rng.normal(size=(40, 8)).astype(np.float32)
    owner = rng.integers(0, 40, size=120)
    owner[:40] = np.arange(40)  # every image has a caption
    texts = (images[owner] + rng.normal(size=(120, 8))).astype(np.float32)
    texts[50:54] = texts[5]  # duplicated captions (of other images): ties
    images[30:33] = images[7]  # duplicated images: ties the other way
    ks = (1, 5, 10)
    got = retrieval_recall(images, texts, owner, ks)
    i2t = ref_hit_rates(images, texts, owner[None, :] == np.arange(40)[:, None], ks)
    t2i = ref_hit_rates(texts, images, np.arange(40)[None, :] == owner[:, None], ks)
    for k in ks:
        assert got[f"i2t_r{k}"] == pytest.approx(i2t[k], abs=1e-9)
        assert got[f"t2i_r{k}"] == pytest.approx(t2i[k], abs=1e-9)
    classes = images[:6] + rng.normal(size=(6, 8)).astype(np.float32)
    classes[4] = classes[2]  # two classes with one embedding
    labels = rng.integers(0, 6, size=40)
    acc = zero_shot_accuracy(images, classes, labels, topk=(1, 2, 5))
    want = ref_hit_rates(images, classes, np.arange(6)[None, :] == labels[:, None], (1, 2, 5))
    assert [acc["top1"], acc["top2"], acc["top5"]] == pytest.approx(list(want.values()))


def test_chance_level_on_random_embeddings():
    rng = np.random.default_rng(0)
    n_img, c, k = 300, 2, 10
    images = rng.normal(size=(n_img, 64))
    texts = rng.normal(size=(n_img * c, 64))
    out = retrieval_recall(images, texts, np.repeat(np.arange(n_img), c), ks=(k,))
    t2i_chance = 100 * k / n_img
    i2t_chance = 100 * (1 - math.comb(n_img * c - c, k) / math.comb(n_img * c, k))
    assert out["t2i_r10"] == pytest.approx(t2i_chance, abs=2.0)  # sd about 0.7 over 600 texts
    assert out["i2t_r10"] == pytest.approx(i2t_chance, abs=3.5)  # sd about 1.4 over 300 images
    labels = rng.integers(0, 10, size=4000)
    acc = zero_shot_accuracy(rng.normal(size=(4000, 32)), rng.normal(size=(10, 32)), labels)
    assert acc["top1"] == pytest.approx(10.0, abs=2.0)  # sd about 0.5
    assert acc["top5"] == pytest.approx(50.0, abs=4.0)


def test_top5_with_fewer_classes():
    image = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    classes = np.eye(3)
    acc = zero_shot_accuracy(image, classes, np.array([0, 2, 1]))
    assert acc["top1"] == pytest.approx(100 / 3)
    assert acc["top5"] == 100.0  # every class is within the top 5 of 3


def test_class_embeddings_match_numpy_float64():
    rng = np.random.default_rng(3)
    emb = rng.normal(size=(21, 7)).astype(np.float32) * rng.uniform(0.1, 10, size=(21, 1))
    labels = np.array([0, 1, 2] * 7)
    rng.shuffle(labels)
    got = class_embeddings(emb, labels, 3).numpy()
    e = emb.astype(np.float64)
    e /= np.linalg.norm(e, axis=1, keepdims=True)
    want = np.stack([e[labels == c].mean(axis=0) for c in range(3)])
    want /= np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_metric_input_errors():
    with pytest.raises(UserError, match="classes \\[2\\] have no prompt"):
        class_embeddings(np.ones((4, 3)), np.array([0, 1, 0, 1]), 3)
    bad = np.ones((4, 3))
    bad[1, 2] = np.nan
    with pytest.raises(UserError, match="NaN"):
        retrieval_recall(bad, np.ones((4, 3)), np.arange(4))
    with pytest.raises(UserError, match="NaN"):
        zero_shot_accuracy(np.ones((4, 3)), bad, np.zeros(4, dtype=int))
    with pytest.raises(UserError, match="at least one caption per image"):
        retrieval_recall(np.eye(3), np.eye(3)[:2], np.array([0, 1]))
    with pytest.raises(UserError, match="must lie in 0..2"):
        zero_shot_accuracy(np.eye(3), np.eye(3), np.array([0, 1, 3]))


# -- end to end on a synthetic store with a planted alignment ---------------------------------
N_IMG, CAPS, N_CLS, LATENT = 120, 2, 10, 16
NAMES = [f"class{c}" for c in range(N_CLS)]
TEMPLATES = ["a photo of a {}.", "a picture of {}", "{}"]
IMG_LAYERS = ["block.0", "block.1", "final_norm"]
TXT_LAYERS = ["embeddings", "layer.0", "layer.1"]


def _planted(x_latent: np.ndarray, mix: np.ndarray, n_layers: int, signal: int, rng):
    """(N, L, D) features: layer `signal` is latent @ mix, the other layers pure noise."""
    feats = rng.normal(size=(x_latent.shape[0], n_layers, mix.shape[1]))
    feats[:, signal] = x_latent @ mix
    return feats.astype(np.float32)


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    """A store whose image layer block.1 and text layer layer.0 share a latent, and the
    mixing matrices (for heads that undo them)."""
    rng = np.random.default_rng(0)
    root = tmp_path_factory.mktemp("eval")
    store = root / "features.zarr"
    mix_img, mix_txt = rng.normal(size=(LATENT, 24)), rng.normal(size=(LATENT, 20))
    centers = 3 * rng.normal(size=(N_CLS, LATENT))
    labels = rng.integers(0, N_CLS, size=N_IMG)
    z = centers[labels] + rng.normal(size=(N_IMG, LATENT))
    z_cap = np.repeat(z, CAPS, axis=0) + 0.05 * rng.normal(size=(N_IMG * CAPS, LATENT))
    z_prompt = np.repeat(centers, len(TEMPLATES), axis=0)
    z_prompt = z_prompt + 0.05 * rng.normal(size=z_prompt.shape)
    for split, modality, model, latent, mix, names in (
        ("test", "image", IMG, z, mix_img, IMG_LAYERS),
        ("test", "text", TXT, z_cap, mix_txt, TXT_LAYERS),
        ("prompts", "text", TXT, z_prompt, mix_txt, TXT_LAYERS),
    ):  # several row blocks, so reading joins blocks
        values = _planted(latent, mix, 3, 1, rng)
        write_features(store, "synth", split, modality, model, values, names, block_rows=50)
    write_pairs_manifest(store, "synth", "test", N_IMG, CAPS, labels.tolist(), NAMES)
    write_prompts_manifest(store, "synth", NAMES, TEMPLATES)
    return {"root": root, "store": store, "mix_img": mix_img, "mix_txt": mix_txt}


def _linear(weight: np.ndarray) -> torch.nn.Module:
    """A linear head (stages.heads) computing x @ weight.T."""
    head = build_head("linear", weight.shape[1], weight.shape[0])
    with torch.no_grad():
        head.proj.weight.copy_(torch.as_tensor(weight, dtype=torch.float32))
        head.proj.bias.zero_()
    return head


def _config(**overrides) -> dict:
    base = {
        "image_model": IMG, "text_model": TXT, "dataset": "synth",
        "image_layer": "block.1", "text_layer": "layer.0", "head": "linear",
        "image_dim": 24, "text_dim": 20, "out_dim": LATENT,
        "seed": 0, "lambda": 10.0, "n_pairs": 100, "levels": 1,
    }  # fmt: skip
    return {**base, **overrides}


def _save(run_dir: Path, image_weight: np.ndarray, text_weight: np.ndarray, **config) -> Path:
    config = _config(out_dim=image_weight.shape[0], **config)
    return save_run(run_dir, _linear(image_weight), _linear(text_weight), config)


def _run(planted, name: str, aligned: bool = True, **config) -> Path:
    if aligned:  # heads that undo the mixing: both sides land on the shared latent
        image_w, text_w = np.linalg.pinv(planted["mix_img"]).T, np.linalg.pinv(planted["mix_txt"]).T
    else:
        rng = np.random.default_rng(1)
        image_w, text_w = rng.normal(size=(LATENT, 24)), rng.normal(size=(LATENT, 20))
    return _save(planted["root"] / name, image_w, text_w, **config)


def _random_features(store, dataset, split, modality, n, rng) -> None:
    model, names, dim = (IMG, IMG_LAYERS, 24) if modality == "image" else (TXT, TXT_LAYERS, 20)
    values = rng.normal(size=(n, 2, dim)).astype(np.float32)
    write_features(store, dataset, split, modality, model, values, names[:2])


def test_planted_alignment_scores_high(planted):
    run = _run(planted, "aligned")
    m = evaluate_run(run, planted["store"], "synth", "test", "prompts")
    assert m["zero_shot"]["n_images"] == N_IMG and m["zero_shot"]["n_classes"] == N_CLS
    assert m["zero_shot"]["top1"] > 90 and m["zero_shot"]["top5"] == 100.0
    assert m["retrieval"]["n_images"] == N_IMG and m["retrieval"]["n_texts"] == N_IMG * CAPS
    assert min(m["retrieval"][f"{d}_r{k}"] for d in ("i2t", "t2i") for k in (1, 5, 10)) > 90
    assert m["run"]["image_layer"] == "block.1" and m["run"]["lambda"] == 10.0


def test_random_heads_and_wrong_layers_are_chance(planted):
    random_heads = _run(planted, "random", aligned=False)
    noise_layers = _run(planted, "lastlayers", image_layer="final_norm", text_layer="layer.1")
    for run in (random_heads, noise_layers):
        m = evaluate_run(run, planted["store"], "synth", "test", "prompts")
        assert m["zero_shot"]["top1"] < 30  # chance 10 %, sd about 3
        assert m["retrieval"]["t2i_r1"] < 8 and m["retrieval"]["i2t_r10"] < 30  # chance 0.8, 16


def test_run_without_checkpoint(planted, tmp_path):
    (tmp_path / "config.json").write_text(json.dumps(_config()))
    with pytest.raises(UserError, match="head.safetensors"):
        evaluate_run(tmp_path, planted["store"], "synth")


def test_cli_errors_are_one_line(planted, tmp_path, monkeypatch, capsys):
    argv = ["pipeline", "--params", "/dev/null", "evaluate", "--run", str(tmp_path)]
    monkeypatch.setattr("sys.argv", argv)
    with pytest.raises(SystemExit) as exit_info:
        main()
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.startswith("error: ") and err.count("\n") == 1
    assert "head.safetensors" in err
    run = _run(planted, "nolayer")
    config = json.loads((run / "config.json").read_text())
    del config["text_layer"]
    (run / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="config.json lacks text_layer"):
        evaluate_run(run, planted["store"])


def test_missing_eval_features_name_the_extract_command(planted, tmp_path):
    run = _run(planted, "other_text_model", text_model="absent-text")
    with pytest.raises(UserError, match="python -m pipeline extract --model absent-text"):
        evaluate_run(run, planted["store"], "synth")
    with pytest.raises(UserError, match="unknown layer 'layer.7'"):
        evaluate_run(_run(planted, "badlayer", text_layer="layer.7"), planted["store"], "synth")


def test_nan_features_are_refused(tmp_path):
    values = np.random.default_rng(0).normal(size=(6, 2, 24)).astype(np.float32)
    values[3, 1, 5] = np.nan
    write_features(tmp_path / "s.zarr", "synth", "test", "image", IMG, values, IMG_LAYERS[:2])
    write_pairs_manifest(tmp_path / "s.zarr", "synth", "test", 6)
    run = _save(tmp_path / "run", np.eye(4, 24), np.eye(4, 20))
    with pytest.raises(UserError, match="synth/test/image/fake-img layer block.1 has NaN"):
        evaluate_run(run, tmp_path / "s.zarr", "synth")


def test_skips_without_labels_or_captions(tmp_path):
    rng = np.random.default_rng(0)
    store = tmp_path / "s.zarr"
    _random_features(store, "nolabels", "test", "image", 5, rng)
    _random_features(store, "nolabels", "test", "text", 5, rng)
    write_pairs_manifest(store, "nolabels", "test", 5)
    run = _save(tmp_path / "run", np.eye(4, 24), np.eye(4, 20))
    m = evaluate_run(run, store, "nolabels")
    assert m["zero_shot"] == {"skipped": "nolabels/test has no labelled images"}
    assert m["retrieval"]["n_images"] == 5
    # a classification split: labels, empty captions, no text features at all
    _random_features(store, "classes", "test", "image", 4, rng)
    table = write_pairs_manifest(store, "classes", "test", 4, 1, [0, 1, 0, 1], ["a", "b"])
    table["caption"] = ""
    write_manifest(FeatureStore(store).manifest_path("classes", "test"), table)
    write_prompts_manifest(store, "classes", ["a", "b"], ["{}"])
    _random_features(store, "classes", "prompts", "text", 2, rng)
    m = evaluate_run(run, store, "classes")
    assert m["retrieval"] == {"skipped": "classes/test has no captions"}
    assert m["zero_shot"]["n_images"] == 4 and m["zero_shot"]["n_classes"] == 2


# -- the CLI: evaluate, compare and evaluate --compare ----------------------------------------
def _cli(*args: str):
    return CliRunner().invoke(app, ["--params", "/dev/null", *args])


def test_cli_evaluate_and_compare(planted, tmp_path):
    good = _run(planted, "cli_good")
    config = _config(head="mlp", hidden_dim=8, n_pairs=50)
    mlp = [build_head("mlp", dim, LATENT, 8) for dim in (24, 20)]
    bad = save_run(planted["root"] / "cli_mlp", *mlp, config)
    for run in (good, bad):
        res = _cli("evaluate", "--run", str(run), "--store", str(planted["store"]))
        assert res.exit_code == 0, res.output
        assert "zero-shot  top1" in res.output and "T2I R@1" in res.output
    metrics = {r: json.loads((r / "metrics.json").read_text()) for r in (good, bad)}
    md, csv_path = tmp_path / "t.md", tmp_path / "t.csv"
    outs = ("--out-md", str(md), "--out-csv", str(csv_path))
    res = _cli("compare", str(good), str(bad), *outs, "--names", "aligned,random")
    assert res.exit_code == 0, res.output
    rows = list(csv.DictReader(csv_path.open()))
    assert [r["run"] for r in rows] == ["aligned", "random"]
    for row, run in zip(rows, (good, bad), strict=True):
        m = metrics[run]
        assert float(row["zs top1"]) == pytest.approx(m["zero_shot"]["top1"], abs=1e-4)
        assert float(row["I2T R@5"]) == pytest.approx(m["retrieval"]["i2t_r5"], abs=1e-4)
        assert float(row["T2I R@10"]) == pytest.approx(m["retrieval"]["t2i_r10"], abs=1e-4)
    assert rows[1]["head"] == "mlp" and rows[1]["n_pairs"] == "50"
    assert rows[0]["layers (img/txt)"] == "block.1/layer.0"
    lines = md.read_text().splitlines()
    assert lines[0].startswith("| run | head | layers (img/txt) | lambda | n_pairs | zs top1")
    top1 = metrics[good]["zero_shot"]["top1"]
    assert lines[2].startswith(f"| aligned | linear | block.1/layer.0 | 10.0 | 100 | {top1:.1f} |")
    # `evaluate --compare` shares the code
    res2 = _cli("evaluate", "--compare", str(good), str(bad), "--names", "aligned,random")
    assert res2.exit_code == 0 and md.read_text() in res2.output


def test_compare_errors(planted, tmp_path):
    run = _save(tmp_path / "noeval", np.eye(4, 24), np.eye(4, 20))
    res = _cli("compare", str(run))
    assert res.exit_code != 0
    with pytest.raises(UserError, match="python -m pipeline evaluate --run"):
        comparison_table([run])
    with pytest.raises(UserError, match="--names has 2 names for 1 runs"):
        comparison_table([run], ["a", "b"])
