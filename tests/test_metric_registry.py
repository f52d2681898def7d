"""The layer-metric registry: a metric (and a structure of its own) registered from this file
alone runs end to end through `select`, calibration included, against an independent float64
numpy reference; the registry's checks on what is registered."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
import torch

from stages import similarity, structures
from stages.select import read_selection
from stages.similarity import register_metric
from stages.structures import register_structure
from store import FeatureStore
from tests.helpers import one_line_error, run_cli
from tests.test_select import IMAGE_LAYERS, TEXT_LAYERS, planted_store


@pytest.fixture
def registries():
    """Whatever a test registers is gone after it."""
    saved = dict(similarity.LAYER_METRICS), dict(structures.STRUCTURES)
    yield
    for registry, before in zip((similarity.LAYER_METRICS, structures.STRUCTURES), saved):
        registry.clear()
        registry.update(before)


def register_toy() -> None:
    """distance_corr: the Pearson correlation, over samples, of each sample's distance from
    the centroid of the unit rows in an image layer and in a text layer."""

    def centroid_distance(side, index, layer):
        side.put(
            "centroid_distance", index, torch.linalg.vector_norm(layer.centred.double(), dim=1)
        )

    register_structure("centroid_distance", centroid_distance)

    @register_metric("distance_corr", needs=("centroid_distance",), label="distance corr.")
    def distance_corr(image, text, perm):
        a, b = image.stacked("centroid_distance"), text.stacked("centroid_distance")
        if perm is not None:  # the text rows permuted (row r := row perm[r])
            b = b[:, perm]
        a = a - a.mean(dim=1, keepdim=True)
        b = b - b.mean(dim=1, keepdim=True)
        cov = a @ b.T
        return (cov / torch.outer(a.norm(dim=1), b.norm(dim=1))).cpu().numpy()


def reference_distance_corr(x: np.ndarray, y: np.ndarray) -> float:
    def distances(z):
        unit = z.astype(np.float64) / np.linalg.norm(z.astype(np.float64), axis=1, keepdims=True)
        return np.linalg.norm(unit - unit.mean(axis=0), axis=1)

    return float(np.corrcoef(distances(x), distances(y))[0, 1])


def test_a_metric_registered_here_runs_end_to_end_through_select(registries, tmp_path, capsys):
    register_toy()
    store, out = tmp_path / "f.zarr", tmp_path / "sel"
    planted_store(store, n_images=120, captions=1)  # n_samples 0, one caption: rows in order
    code, stdout, stderr = run_cli(
        ["--params", "/dev/null", "select", "--store", store, "--dataset", "toy",
         "--image-model", "img-model", "--text-model", "txt-model", "--out", out,
         "--device", "cpu", "--n-samples", "0", "--k", "5", "--no-progress",
         "--metric", "distance_corr,mutual_knn", "--calibrate", "19"],
        capsys,
    )  # fmt: skip
    assert code == 0, stderr
    assert stderr == ""  # --no-progress: no bars
    fs = FeatureStore(store)
    image = fs.open("toy", "train", "image", "img-model")
    text = fs.open("toy", "train", "text", "txt-model")
    want = np.array(
        [[reference_distance_corr(image.read_layer(i), text.read_layer(t)) for t in TEXT_LAYERS]
         for i in IMAGE_LAYERS]
    )  # fmt: skip
    best = np.unravel_index(np.argmax(want), want.shape)
    assert np.sort(want.ravel())[-1] - np.sort(want.ravel())[-2] > 1e-3  # a clear winner
    scores = pd.read_parquet(out / "scores.parquet")
    np.testing.assert_allclose(scores["distance_corr"], want.ravel(), rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(scores["score"], scores["distance_corr"])
    assert {"distance_corr_calibrated", "distance_corr_p_value"} <= set(scores.columns)
    info = read_selection(out, required=True)  # validated: keys, files, checksums
    assert info == json.loads((out / "selection.json").read_text())
    assert info["metric"] == "distance_corr" and info["permutations"] == 19
    assert (info["image_index"], info["text_index"]) == tuple(int(b) for b in best)
    assert (info["image_layer"], info["text_layer"]) == (
        IMAGE_LAYERS[best[0]],
        TEXT_LAYERS[best[1]],
    )
    assert 0 < info["p_value"] <= 1 and "distance_corr" in info["by_metric"]
    assert (out / "heatmap.png").stat().st_size > 0
    assert (out / "heatmap_mutual_knn.png").stat().st_size > 0
    assert f"chosen: {info['image_layer']} x {info['text_layer']}" in stdout


def test_the_metric_option_reads_the_registry(registries, capsys):
    code, _, stderr = run_cli(["--params", "/dev/null", "select", "--metric", "distance_corr"],
                              capsys)  # fmt: skip
    assert code == 2 and "unknown metric" in one_line_error(stderr)
    register_toy()
    assert "distance_corr" in similarity.metric_names()
    assert similarity.structures_for(["distance_corr", "l_hop_cka"]) == [
        "gram", "hops", "centroid_distance",
    ]  # fmt: skip


def test_what_is_registered_is_checked(registries):
    with pytest.raises(ValueError, match="unknown structure 'no_such_structure'; known: graph"):
        register_metric("bad", needs=("no_such_structure",))
    with pytest.raises(ValueError, match="lowercase"):
        register_metric("Two,Names", needs=("gram",))
    with pytest.raises(ValueError, match="lowercase"):
        register_metric("score", needs=("gram",))  # a column of scores.parquet
    with pytest.raises(TypeError, match="not a string"):
        register_metric("bad", needs="gram")
    with pytest.raises(ValueError, match="unknown structures"):
        register_structure("bad", lambda side, index, layer: None, needs=("nope",))
