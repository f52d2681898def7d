"""The Zarr feature store and the Parquet manifests."""

import numpy as np
import pandas as pd
import pytest

from store import FeatureStore, UserError, image_table, pair_rows, read_manifest, write_manifest
from store.features import model_key
from tests.helpers import (
    one_line_error,
    run_cli,
    write_features,
    write_old_layout,
    write_pairs_manifest,
)


@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_round_trip_per_dtype_and_width(tmp_path, dtype):
    rng = np.random.default_rng(0)
    values = [rng.normal(size=(150, d)).astype(np.float32) for d in (8, 3, 20)]
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
    expected = [x.astype(dtype).astype(np.float32) for x in values]
    assert array.dtype == np.dtype(dtype) and array.layer_dims == [8, 3, 20]
    assert array.n_blocks == 3 and array.complete and array.shape == (150, 3)
    np.testing.assert_array_equal(array.read_layer("b"), expected[1])
    np.testing.assert_array_equal(array.read_layer(-1), expected[2])
    got = array.read(["c", 0])
    assert len(got) == 2
    np.testing.assert_array_equal(got[0], expected[2])
    np.testing.assert_array_equal(got[1], expected[0])
    np.testing.assert_array_equal(array.to_dask("b").compute().astype(np.float32), expected[1])
    assert array.read_layer(0).dtype == np.float32
    # one layer of all rows is one chunk (one file) per block, nothing padded
    assert [a.chunks for a in array.layers] == [(64, 8), (64, 3), (64, 20)]
    layer_files = sorted((tmp_path / "s.zarr" / array.path / "layers" / "1").rglob("c/*/*"))
    assert len(layer_files) == 3


def test_corrupt_chunk_is_a_one_line_error(tmp_path, capsys):
    values = np.random.default_rng(0).normal(size=(40, 2, 4))
    write_features(tmp_path / "s.zarr", "d", "train", "image", "m", values, block_rows=16)
    array = FeatureStore(tmp_path / "s.zarr").open("d", "train", "image", "m")
    chunk = tmp_path / "s.zarr" / array.path / "layers" / "1" / "c" / "1" / "0"
    data = bytearray(chunk.read_bytes())
    data[5] ^= 0x40  # one flipped bit in a float16... of row 16's first value
    chunk.write_bytes(bytes(data))
    np.testing.assert_array_equal(array.read_layer(0), values[:, 0].astype(np.float32))
    with pytest.raises(
        UserError, match=r"corrupt feature data in .*d/train/image/m layer layer\.1"
    ):
        array.read_layer(1)
    with pytest.raises(UserError, match="corrupt"):
        array.read_rows(1, slice(16, 20))
    assert array.read_rows(1, slice(0, 16)).shape == (16, 4)  # the other blocks still read


def test_old_layout_is_refused_then_migrated(tmp_path, capsys):
    values = np.random.default_rng(1).normal(size=(50, 3, 6)).astype(np.float16)
    text_layers, image_layers = ["embeddings", "layer.0", "layer.1"], ["block.0", "final_norm"]
    write_old_layout(tmp_path / "s.zarr", "d/train/text/m", values, text_layers, 16)
    write_old_layout(tmp_path / "s.zarr", "d/train/image/m", values[:, :2], image_layers, 16)
    with pytest.raises(UserError, match="store migrate --store"):
        FeatureStore(tmp_path / "s.zarr").open("d", "train", "text", "m")
    code, out, _ = run_cli(["store", "ls", "--store", tmp_path / "s.zarr"], capsys)
    assert code == 0 and "store migrate" in out.splitlines()[1]
    code, _, err = run_cli(
        ["select", "--store", tmp_path / "s.zarr", "--dataset", "d"]
        + ["--image-model", "m", "--text-model", "m"],
        capsys,
    )
    assert code == 2 and "python -m pipeline store migrate" in one_line_error(err)

    code, out, _ = run_cli(["store", "migrate", "--store", tmp_path / "s.zarr"], capsys)
    assert code == 0 and out.count("converted") == 2
    array = FeatureStore(tmp_path / "s.zarr").open("d", "train", "text", "m")
    assert array.layer_dims == [6, 6, 6] and array.layer_names[1] == "layer.0"
    for i in range(3):
        np.testing.assert_array_equal(array.read_layer(i), values[:, i].astype(np.float32))
    assert not (tmp_path / "s.zarr" / array.path / "features").exists()
    code, out, _ = run_cli(["store", "migrate", "--store", tmp_path / "s.zarr"], capsys)
    assert code == 0 and "nothing to convert" in out


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
    array.write_block(1, [np.ones((32, 4))])
    assert array.completed_blocks().tolist() == [False, True, False, False]
    assert (
        np.isnan(array.read_rows(0, slice(0, 1))).all()
        and array.read_rows(0, slice(40, 41)).min() == 1
    )
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
    widths = [np.zeros((10, d)) for d in (64, 128, 512)]
    write_features(tmp_path / "s.zarr", "digits", "train", "image", "timm:resnet18", widths)
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
    row = out.splitlines()[2].split()
    assert row[3:8] == ["timm:resnet18", "10", "3", "64-512", "float32"]


def test_model_keys_are_path_safe(tmp_path):
    assert model_key("facebook/dinov2-large") == "facebook--dinov2-large"
    assert (
        model_key("timm:vit_small_patch14_dinov2.lvd142m")
        == "timm_vit_small_patch14_dinov2.lvd142m"
    )
    assert model_key(str(tmp_path / "my-model") + "/") == "my-model"
