"""The Zarr feature store and the Parquet manifests."""

import numpy as np
import pandas as pd
import pytest

from store import FeatureStore, UserError, image_table, pair_rows, read_manifest, write_manifest
from store.features import model_key
from tests.helpers import one_line_error, run_cli, write_features, write_pairs_manifest


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_per_dtype(tmp_path, dtype):
    values = np.random.default_rng(0).normal(size=(150, 3, 8)).astype(np.float32)
    write_features(
        tmp_path / "s.zarr",
        "d",
        "train",
        "image",
        "org/model",
        values,
        layer_names=["a", "b", "c"],
        block_rows=64,
        dtype=dtype,
    )
    array = FeatureStore(tmp_path / "s.zarr").open("d", "train", "image", "org/model")
    expected = values.astype(dtype).astype(np.float32)
    assert array.data.dtype == np.dtype(dtype)
    assert array.n_blocks == 3 and array.complete
    np.testing.assert_array_equal(array.read_layer("b"), expected[:, 1])
    np.testing.assert_array_equal(array.read_layer(-1), expected[:, 2])
    np.testing.assert_array_equal(array.read(["c", 0]), expected[:, [2, 0]])
    np.testing.assert_array_equal(
        array.to_dask()[:, 1].compute().astype(np.float32), expected[:, 1]
    )
    assert array.read_layer(0).dtype == np.float32
    # one layer of all rows is one inner chunk per block
    assert array.data.chunks == (64, 1, 8) and array.data.shards == (64, 3, 8)


def test_layer_lookup_errors(tmp_path):
    write_features(tmp_path / "s.zarr", "d", "train", "text", "m", np.zeros((4, 2, 3)))
    array = FeatureStore(tmp_path / "s.zarr").open("d", "train", "text", "m")
    with pytest.raises(UserError, match="unknown layer 'nope'"):
        array.read_layer("nope")
    with pytest.raises(UserError, match="out of range"):
        array.read_layer(5)


def test_incomplete_array_is_refused_and_reads_nan(tmp_path):
    store = FeatureStore(tmp_path / "s.zarr", create=True)
    array = store.create("d", "train", "image", "m", 100, ["x"], 4, "float16", 32, {})
    array.write_block(1, np.ones((32, 1, 4)))
    assert array.completed_blocks().tolist() == [False, True, False, False]
    assert np.isnan(array.data[0, 0, 0]) and array.data[40, 0, 0] == 1
    with pytest.raises(UserError, match="incomplete \\(1 of 4 blocks\\)"):
        array.read_layer(0)


def test_float16_overflow_is_refused(tmp_path):
    store = FeatureStore(tmp_path / "s.zarr", create=True)
    array = store.create("d", "train", "image", "m", 4, ["x"], 2, "float16", 4, {})
    with pytest.raises(UserError, match="--dtype float32"):
        array.write_block(0, np.full((4, 1, 2), 1e6))
    assert not array.complete


def test_missing_features_name_the_extract_command(tmp_path):
    write_features(tmp_path / "s.zarr", "d", "train", "image", "m", np.zeros((4, 1, 2)))
    with pytest.raises(UserError, match="python -m pipeline extract --model other"):
        FeatureStore(tmp_path / "s.zarr").open("d", "train", "image", "other")


def test_not_a_store(tmp_path, capsys):
    (tmp_path / "plain").mkdir()
    with pytest.raises(UserError, match="not a feature store"):
        FeatureStore(tmp_path / "plain")
    code, _, err = run_cli(["store", "ls", "--store", tmp_path / "plain"], capsys)
    assert code == 2 and "not a feature store" in one_line_error(err)


def test_manifest_round_trip_and_pairs(tmp_path):
    table = write_pairs_manifest(
        tmp_path / "s.zarr", "coco", "train", n_images=3, captions_per_image=5, labels=[2, 0, 1]
    )
    stored = FeatureStore(tmp_path / "s.zarr").manifest("coco", "train")
    pd.testing.assert_frame_equal(stored, table)
    images, texts = pair_rows(stored)
    assert texts.tolist() == list(range(15))
    assert images.tolist() == [i for i in range(3) for _ in range(5)]
    assert image_table(stored)["label"].tolist() == [2, 0, 1]
    skipped = stored.assign(skipped=stored["image_row"] == 1)
    write_manifest(tmp_path / "m.parquet", skipped)
    images, _ = pair_rows(read_manifest(tmp_path / "m.parquet"))
    assert 1 not in images.tolist() and len(images) == 10


def test_manifest_rejects_bad_numbering(tmp_path):
    table = pd.DataFrame({"image_row": [0, 2], "sample_id": ["a", "b"], "caption": ["x", "y"]})
    with pytest.raises(ValueError, match="image_row"):
        write_manifest(tmp_path / "m.parquet", table)


def test_store_ls_lists_entries(tmp_path, capsys):
    write_features(
        tmp_path / "s.zarr",
        "digits",
        "train",
        "image",
        "facebook/dinov2-small",
        np.zeros((10, 13, 384)),
        dtype="float16",
    )
    code, out, _ = run_cli(["store", "ls", "--store", tmp_path / "s.zarr"], capsys)
    assert code == 0
    row = out.splitlines()[1].split()
    assert row[:8] == [
        "digits",
        "train",
        "image",
        "facebook/dinov2-small",
        "10",
        "13",
        "384",
        "float16",
    ]
    assert row[-1] == "complete"


def test_model_keys_are_path_safe(tmp_path):
    assert model_key("facebook/dinov2-large") == "facebook--dinov2-large"
    assert (
        model_key("timm:vit_small_patch14_dinov2.lvd142m")
        == "timm_vit_small_patch14_dinov2.lvd142m"
    )
    assert model_key(str(tmp_path / "my-model") + "/") == "my-model"
