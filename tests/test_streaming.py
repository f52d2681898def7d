"""align with --memory-cap: batches streamed from the store equal in-memory training."""

import json

import numpy as np
import pytest
import torch

import stages.pairs
from stages.align import run_align
from stages.pairs import (
    PairSpec,
    StorePairs,
    gather_rows,
    open_pairs,
    pair_sources,
    parse_memory_cap,
)
from stages.train import AlignSettings
from store import UserError
from tests.helpers import one_line_error, run_cli, write_features, write_pairs_manifest

SETTINGS = AlignSettings(
    lam=1.0,
    out_dim=8,
    hidden_dim=16,
    batch_size=32,
    epochs=3,
    lr=1e-2,
    warmup_steps=5,
    patience=0,
    val_fraction=0.2,
    seed=0,
)
N_IMAGES, CAPTIONS, DI, DT = 120, 2, 12, 10


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    """float16 features in blocks of 16 rows; two captions per image (image rows repeat)."""
    path = tmp_path_factory.mktemp("stream") / "f.zarr"
    rng = np.random.default_rng(0)
    z = rng.normal(size=(N_IMAGES, 4))
    image = np.stack([rng.normal(size=(N_IMAGES, DI)), z @ rng.normal(size=(4, DI))], axis=1)
    text = np.repeat(z, CAPTIONS, axis=0) @ rng.normal(size=(4, DT))
    text = np.stack([rng.normal(size=text.shape), text + 0.1 * rng.normal(size=text.shape)], 1)
    write_features(path, "p", "train", "image", "img", image, block_rows=16, dtype="float16")
    write_features(path, "p", "train", "text", "txt", text, block_rows=16, dtype="float16")
    write_pairs_manifest(path, "p", "train", N_IMAGES, captions_per_image=CAPTIONS)
    return path


def weights(result) -> dict[str, torch.Tensor]:
    heads = {"image": result.image_head, "text": result.text_head}
    return {f"{m}.{k}": v for m, h in heads.items() for k, v in h.state_dict().items()}


def train(store, tmp_path, name: str, cap: int, **changes):
    settings = AlignSettings(**{**SETTINGS.__dict__, **changes})
    return run_align(
        spec(store),
        ("layer.1", "layer.1"),
        settings,
        tmp_path / name,
        progress=False,
        memory_cap=cap,
    )


def spec(store) -> PairSpec:
    return PairSpec(store=store, dataset="p", split="train", image_model="img", text_model="txt")


def layer_1(store):
    return open_pairs(spec(store), image_layer="layer.1", text_layer="layer.1")


@pytest.mark.parametrize(
    "changes",
    [{}, {"head": "mlp", "levels": 2}, {"batch_size": 4096}, {"val_fraction": 0.0}],
    ids=["linear", "mlp-levels2", "full-batch", "no-validation"],
)
def test_streamed_training_equals_in_memory(store, tmp_path, changes):
    pairs = layer_1(store)
    row = pairs.nbytes(1)
    config_m, memory = train(store, tmp_path, "memory", 0, **changes)
    # a cap of 2 * 40 rows: windows of 40 rows, one batch of 32 each; and 2 * 70: two batches
    for cap_rows in (40, 70):
        config_s, streamed = train(store, tmp_path, f"s{cap_rows}", 2 * cap_rows * row, **changes)
        assert not config_m["streamed_from_store"] and config_s["streamed_from_store"]
        a, b = weights(memory), weights(streamed)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), changes
        np.testing.assert_array_equal(memory.history.to_numpy(), streamed.history.to_numpy())
        assert config_s["best_epoch"] == config_m["best_epoch"]
    # the cap decides: a cap the data fits in keeps it in memory
    assert not train(store, tmp_path, "fits", 10**9, **changes)[0]["streamed_from_store"]


class CountingReads:
    """Wraps a zarr array and records the shape of every read."""

    def __init__(self, data):
        self.data, self.shapes, self.shape = data, [], data.shape

    def __getitem__(self, key):
        values = self.data[key]
        self.shapes.append(values.shape)
        return values


def test_gather_reads_one_block_at_a_time_in_any_order(store):
    pairs = layer_1(store)
    text = pairs.text
    rows = np.random.default_rng(1).integers(0, text.shape[0], 150)  # repeats, any order
    expected = text.read_layer(1)[rows]
    text.layers[1] = reads = CountingReads(text.layers[1])
    got = gather_rows(text, 1, rows, "text")
    assert got.dtype == np.float32
    np.testing.assert_array_equal(got, expected)
    assert len(reads.shapes) == len(np.unique(rows // 16))  # each touched block once
    assert all(shape[0] <= 16 and len(shape) == 2 for shape in reads.shapes)


def test_windows_hold_whole_batches_within_the_cap(store, monkeypatch):
    pairs = layer_1(store)
    subset = np.arange(100)
    train, _ = pair_sources(pairs, subset, subset[:0], memory_cap=2 * 45 * pairs.nbytes(1))
    assert isinstance(train, StorePairs) and train.window_rows == 45
    image = pairs.image.read_layer(1)[pairs.image_rows[subset]]
    reads = []

    def spy(array, layer, rows, what):
        reads.append(len(rows))
        return gather_rows(array, layer, rows, what)

    monkeypatch.setattr(stages.pairs, "gather_rows", spy)
    batches = [np.arange(i, i + 20) for i in range(0, 100, 20)]
    got = [bi for bi, _ in train.take(batches)]
    assert reads == [40, 40, 40, 40, 20, 20]  # (image, text) per window: 40 + 40 + 20 rows
    for idx, bi in zip(batches, got):
        np.testing.assert_array_equal(bi.numpy(), image[idx])


def test_memory_cap_parsing_and_cli(store, tmp_path, capsys):
    assert parse_memory_cap("0") == 0 and parse_memory_cap("") == 0
    assert parse_memory_cap("2GiB") == 2 * 2**30 and parse_memory_cap("512MB") == 512 * 10**6
    assert parse_memory_cap(1234) == 1234
    for bad in ("lots", "-1", "2 parsecs"):
        with pytest.raises(UserError, match="--memory-cap"):
            parse_memory_cap(bad)
    args = ["align", "--store", store, "--dataset", "p", "--image-model", "img"]
    args += ["--text-model", "txt", "--layers", "1,1", "--epochs", "2", "--batch-size", "32"]
    args += ["--out", tmp_path / "run", "--no-progress"]
    code, out, err = run_cli([*args, "--memory-cap", "4KiB"], capsys)
    assert code == 0, err
    assert "streamed from the store" in out
    assert json.loads((tmp_path / "run" / "config.json").read_text())["streamed_from_store"]
    code, _, err = run_cli([*args, "--memory-cap", "lots"], capsys)
    assert code == 2 and "--memory-cap" in one_line_error(err)
