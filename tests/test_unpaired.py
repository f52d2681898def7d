"""Unpaired samples for R_S (`align --unpaired-images/--unpaired-texts`) and in-domain mixing
(`align --extra-pairs/--extra-n`)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

import stages.train
from stages.heads import build_head
from stages.losses import clip_loss, structure_regularizer, structure_targets
from stages.train import AlignSettings, batch_losses, train_heads
from store import FeatureStore, UserError
from tests.test_align import FAST, align, store  # noqa: F401  (the planted store fixture)


def test_batch_losses_unpaired_rows_reach_rs_but_not_clip():
    torch.manual_seed(0)
    heads = (build_head("linear", 6, 4), build_head("linear", 5, 4))
    pair = (torch.randn(8, 6), torch.randn(8, 5))
    unpaired = (torch.randn(5, 6), torch.randn(3, 5))
    s = AlignSettings(lam=1.0, temperature=0.5)
    clip, rs_i, rs_t = batch_losses(heads, pair, s, unpaired=unpaired)
    zi, zt = heads[0](pair[0]), heads[1](pair[1])
    torch.testing.assert_close(clip, clip_loss(zi, zt, 0.5))  # the 8 pairs, nothing else
    for head, x, z, extra, got in ((heads[0], pair[0], zi, unpaired[0], rs_i),
                                   (heads[1], pair[1], zt, unpaired[1], rs_t)):  # fmt: skip
        both = torch.cat([x, extra])
        want = structure_regularizer(
            structure_targets(both, 1, 0.5), torch.cat([z, head(extra)]), 1, 0.5
        )
        torch.testing.assert_close(got, want)
        alone = structure_regularizer(structure_targets(x, 1, 0.5), z, 1, 0.5)
        assert abs(got.item() - alone.item()) > 1e-4  # the unpaired rows changed R_S
    # a gradient from R_S reaches the head through the unpaired rows too
    only_unpaired = batch_losses(heads, (pair[0][:2], pair[1][:2]), s, unpaired=unpaired)[1]
    only_unpaired.backward()
    assert heads[0].proj.weight.grad.abs().sum() > 0


def test_training_sends_unpaired_rows_to_rs_only(store, monkeypatch):  # noqa: F811
    data = FeatureStore(store)
    x = data.open("planted", "train", "image", "img").read_layer("final_norm")[:100]
    y = data.open("planted", "train", "text", "txt").read_layer("layer.0")[:100]
    u = data.open("planted", "test", "image", "img").read_layer("final_norm")
    seen = {"clip": set(), "rs": set()}

    def clip_spy(a, b, tau):
        seen["clip"].add((len(a), len(b)))
        return clip_loss(a, b, tau)

    def rs_spy(targets, z, levels, tau):
        seen["rs"].add(len(z))
        return structure_regularizer(targets, z, levels, tau)

    monkeypatch.setattr(stages.train, "clip_loss", clip_spy)
    monkeypatch.setattr(stages.train, "structure_regularizer", rs_spy)
    s = replace(FAST, epochs=2, batch_size=50, val_fraction=0.0)
    train_heads((x, y), None, s, progress=False, unpaired=(u, None))
    assert seen["clip"] == {(50, 50)}  # pairs only: a batch of 50
    assert seen["rs"] == {50 + 50, 50}  # image R_S: 50 pairs + 50 unpaired; text R_S: pairs


def test_align_with_unpaired_data_and_extra_pairs(store, tmp_path):  # noqa: F811
    settings = replace(FAST, epochs=3, n_pairs=60)
    config, _ = align(store, tmp_path / "u", settings, unpaired=("planted/test", "planted/test"))
    assert config["unpaired_images"] == "planted/test" and config["n_unpaired"] == [200, 200]
    plain, _ = align(store, tmp_path / "p", settings)
    assert config["pairs_digest"] == plain["pairs_digest"]  # the same pairs, more R_S data
    mixed, _ = align(store, tmp_path / "m", settings, extra_pairs="planted/test", extra_n=30)
    assert mixed["extra_n"] == 30 and mixed["n_train"] == plain["n_train"] + 30
    assert mixed["n_val"] == plain["n_val"]  # validation stays on the training split
    with pytest.raises(UserError, match="need --lambda > 0"):
        align(store, tmp_path / "x", replace(settings, lam=0.0), unpaired=("planted/test", None))
    with pytest.raises(UserError, match="DATASET/SPLIT"):
        align(store, tmp_path / "x", settings, unpaired=("test", None))
    with pytest.raises(UserError, match="exceeds the 200 pairs"):
        align(store, tmp_path / "x", settings, extra_pairs="planted/test", extra_n=201)
    with pytest.raises(UserError, match="no image features"):
        align(store, tmp_path / "x", settings, unpaired=("planted/nope", None))
