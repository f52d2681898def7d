"""Stacked heads (`align --lambda auto` trains its grid of λ in one loop): the losses of a stack
against each model alone in float64, per-copy gradient clipping against torch's, and whole
stacked runs against one run per λ, early stopping and dropout included."""

from __future__ import annotations

import threading
from dataclasses import replace

import numpy as np
import pytest
import torch

from stages.head_stack import HeadStack, clip_grad_norms, training_draws_random
from stages.heads import LowRankHead, build_head
from stages.losses import clip_loss, structure_regularizer, structure_targets
from stages.pairs import MemoryPairs
from stages.train import AlignSettings, TrainingStopped, train_heads, train_lambda_stack


@pytest.mark.parametrize("levels", [1, 2])
def test_losses_of_a_stack_are_each_models_losses(levels):
    """clip_loss and R_S of a (G, B, d) stack, values and gradients, equal those of each (B, d)
    slice computed alone (float64); the original side is one batch shared by the stack."""
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(7, 5, generator=gen, dtype=torch.float64)
    zi = torch.randn(3, 7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    zt = torch.randn(3, 7, 4, generator=gen, dtype=torch.float64, requires_grad=True)
    targets = structure_targets(x, levels, 0.1)
    clip = clip_loss(zi, zt, 0.1)
    rs = structure_regularizer(targets, zi, levels, 0.1)
    assert clip.shape == rs.shape == (3,)
    (clip.sum() + (rs * torch.tensor([0.0, 1.0, 3.0], dtype=torch.float64)).sum()).backward()
    for g, weight in enumerate((0.0, 1.0, 3.0)):
        a = zi.detach()[g].clone().requires_grad_()
        b = zt.detach()[g].clone().requires_grad_()
        clip_g = clip_loss(a, b, 0.1)
        rs_g = structure_regularizer(x, a, levels, 0.1)
        assert clip[g].item() == pytest.approx(clip_g.item(), rel=1e-12)
        assert rs[g].item() == pytest.approx(rs_g.item(), rel=1e-12)
        (clip_g + weight * rs_g).backward()
        assert torch.allclose(zi.grad[g], a.grad, rtol=1e-10, atol=1e-14)
        assert torch.allclose(zt.grad[g], b.grad, rtol=1e-10, atol=1e-14)


def test_each_copy_is_clipped_as_torch_clips_one_model():
    """Copy 0's gradient is far above the clip norm, copy 1's below: each scaled (or not) as
    torch.nn.utils.clip_grad_norm_ scales that copy's gradients alone."""
    gen = torch.Generator().manual_seed(1)
    params = [torch.zeros(2, 3, 4, requires_grad=True), torch.zeros(2, 4, requires_grad=True)]
    grads = [torch.randn(p.shape, generator=gen) for p in params]
    grads[0][1] *= 1e-3
    grads[1][1] *= 1e-3
    for p, g in zip(params, grads, strict=True):
        p.grad = g.clone()
    clip_grad_norms(params, 1.0)
    for copy in range(2):
        alone = [torch.zeros(p.shape[1:], requires_grad=True) for p in params]
        for a, g in zip(alone, grads, strict=True):
            a.grad = g[copy].clone()
        torch.nn.utils.clip_grad_norm_(alone, 1.0)
        for p, a in zip(params, alone, strict=True):
            assert torch.allclose(p.grad[copy], a.grad, rtol=1e-6)
    norm0 = torch.cat([p.grad[0].flatten() for p in params]).norm()
    assert norm0.item() == pytest.approx(1.0, rel=1e-5)


@pytest.mark.parametrize("head", ["mlp", "lowrank"])
def test_a_stacked_run_is_one_run_per_lambda(head):
    """Every copy ends where its own run ends: the same steps (the λ 0 copy of the MLP stops
    early, at its own step, while the others go on), best epoch, weights to float rounding,
    history; the low-rank head's dropout draws the masks its own runs draw."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(300, 24)).astype(np.float32)
    y = (x @ rng.normal(size=(24, 20)) / 5 + rng.normal(size=(300, 20))).astype(np.float32)
    settings = AlignSettings(
        head=head, out_dim=16, hidden_dim=32, batch_size=512, lr=3e-3, warmup_steps=10,
        max_steps=60, epochs=60, min_val_pairs=50, val_fraction=0.2, patience=15,
    )  # fmt: skip
    train, val = MemoryPairs(x[:240], y[:240]), MemoryPairs(x[240:], y[240:])
    lambdas = (0.0, 3.0, 10.0)
    stacked = train_lambda_stack(train, val, settings, lambdas, progress=False)
    steps = []
    for lam, result in zip(lambdas, stacked, strict=True):
        alone = train_heads(train, val, replace(settings, lam=lam), progress=False)
        assert (result.steps, result.best_epoch) == (alone.steps, alone.best_epoch)
        for mine, theirs in (
            (result.image_head, alone.image_head),
            (result.text_head, alone.text_head),
        ):  # noqa: E501
            for key, value in theirs.state_dict().items():
                assert torch.allclose(mine.state_dict()[key], value, atol=2e-6), key
        assert result.history.shape == alone.history.shape
        assert np.allclose(result.history.to_numpy(float), alone.history.to_numpy(float), atol=1e-5)
        steps.append(result.steps)
    if head == "mlp":
        assert steps[0] < steps[1]  # copies stop on their own


def test_which_heads_draw_random_numbers_in_training(monkeypatch):
    """A stacked low-rank head draws its dropout masks from the stack's own generator (its
    folds can train in parallel threads); without its stacked_forward, vmap's dropout draws
    from torch's global generator (they cannot). The probe leaves the generator as it was."""
    torch.manual_seed(5)
    before = torch.get_rng_state()
    settings = AlignSettings(out_dim=8, hidden_dim=16)
    lowrank = replace(settings, head="lowrank")
    assert not training_draws_random(settings, (6, 5))
    assert not training_draws_random(lowrank, (6, 5))
    monkeypatch.delattr(LowRankHead, "stacked_forward")
    assert training_draws_random(lowrank, (6, 5))
    assert torch.equal(before, torch.get_rng_state())


def test_a_stack_of_one_is_the_head_itself():
    torch.manual_seed(0)
    head = build_head("mlp", 6, 4, 8)
    stack = HeadStack(head, 1)
    x = torch.randn(5, 6)
    assert torch.equal(stack(x), head(x))
    assert HeadStack(head, 3)(x).shape == (3, 5, 4)


def test_a_stack_stops_when_told_from_another_thread():
    """The λ search's lanes end at their next step once one fails or Ctrl-C arrives."""
    stop = threading.Event()
    stop.set()
    x = np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    with pytest.raises(TrainingStopped, match="step 0"):
        train_lambda_stack((x, x), None, AlignSettings(out_dim=2), (0.0, 1.0), False, stop=stop)
