"""stages.losses against independent float64 numpy implementations of DESIGN.md's formulas."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from stages.losses import clip_loss, structure_regularizer, structure_targets


# -- the reference: DESIGN.md's R_S written out in float64 numpy ------------------------------
def ref_probs(x: np.ndarray, tau: float) -> np.ndarray:
    x = x / np.linalg.norm(x, axis=1, keepdims=True)
    x = x - x.mean(axis=0)
    s = x @ x.T / tau
    e = np.exp(s - s.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def ref_kl(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    safe = np.where(a > 0, a, 1.0)
    return np.sum(np.where(a > 0, a * np.log(safe / b), 0.0), axis=1)


def ref_js(p: np.ndarray, q: np.ndarray) -> float:
    m = 0.5 * (p + q)
    return float(np.mean(0.5 * ref_kl(p, m) + 0.5 * ref_kl(q, m)))


def ref_rs(x: np.ndarray, a: np.ndarray, levels: int, tau: float) -> float:
    p, q = ref_probs(x, tau), ref_probs(a, tau)
    terms = [
        ref_js(np.linalg.matrix_power(p, level), np.linalg.matrix_power(q, level)) / level
        for level in range(1, levels + 1)
    ]
    return sum(terms) / levels


def pair(rng: np.random.Generator, b: int, d_x: int = 24, d_a: int = 12, mix: float = 0.0):
    x = rng.normal(size=(b, d_x))
    a = rng.normal(size=(b, d_a)) + mix * x[:, :d_a]
    return x, a


# -- R_S -------------------------------------------------------------------------------------
@pytest.mark.parametrize("levels", [1, 2, 3])
@pytest.mark.parametrize("tau", [0.05, 0.1])
@pytest.mark.parametrize("b", [2, 7, 64, 300])
def test_rs_matches_numpy_float64(levels, tau, b):
    rng = np.random.default_rng(1000 * levels + b)
    for mix in (0.0, 1.0):
        x, a = pair(rng, b, mix=mix)
        expected = ref_rs(x, a, levels, tau)
        got64 = structure_regularizer(torch.tensor(x), torch.tensor(a), levels, tau).item()
        assert got64 == pytest.approx(expected, rel=1e-5, abs=1e-12)
        # float32: the same to 1e-5 relative, or 1e-7 nats where R_S itself is tiny
        x32, a32 = (torch.tensor(v, dtype=torch.float32) for v in (x, a))
        got32 = structure_regularizer(x32, a32, levels, tau).item()
        assert got32 == pytest.approx(expected, rel=1e-5, abs=1e-7)


def test_rs_large_batch_matches_numpy():
    rng = np.random.default_rng(7)
    x, a = pair(rng, 4096, d_x=64, d_a=32, mix=0.5)
    expected = ref_rs(x, a, 1, 0.1)
    x32, a32 = (torch.tensor(v, dtype=torch.float32) for v in (x, a))
    got = structure_regularizer(x32, a32, 1, 0.1)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("levels", [1, 2, 3, 4, 5])
def test_rs_of_identical_structure_is_zero(levels):
    rng = np.random.default_rng(levels)
    x = torch.tensor(rng.normal(size=(50, 16)), dtype=torch.float32)
    rotation, _ = torch.linalg.qr(torch.randn(16, 16, generator=torch.Generator().manual_seed(0)))
    assert structure_regularizer(x, x, levels).item() == pytest.approx(0.0, abs=1e-6)
    # cosine structure ignores row scale and rotations
    same = 3.0 * x @ rotation
    assert structure_regularizer(x, same, levels).item() == pytest.approx(0.0, abs=1e-6)
    # and the different one is not zero
    other = torch.tensor(rng.normal(size=(50, 16)), dtype=torch.float32)
    assert structure_regularizer(x, other, levels, temperature=0.2).item() > 1e-3


@pytest.mark.parametrize("levels", [1, 3, 5])
def test_rs_is_between_zero_and_ln2(levels):
    rng = np.random.default_rng(3)
    values = []
    for tau in (0.01, 0.05, 0.5, 5.0):
        for _ in range(3):
            x, a = pair(rng, 40)
            values.append(
                structure_regularizer(torch.tensor(x), torch.tensor(a), levels, tau).item()
            )
    # extremes: near-identity P against near-uniform Q approaches ln 2
    x = torch.eye(40, dtype=torch.float64)
    a = torch.ones(40, 3, dtype=torch.float64) + 1e-3 * torch.randn(40, 3, dtype=torch.float64)
    values.append(structure_regularizer(x, a, levels, 0.01).item())
    values = np.array(values)
    assert (values >= 0).all() and (values <= math.log(2)).all()
    # each JS <= ln 2, so R_S <= ln 2 * (1 + 1/2 + ... + 1/L) / L, and the extreme comes close
    bound = math.log(2) * sum(1 / level for level in range(1, levels + 1)) / levels
    assert values.max() <= bound
    assert values.max() > 0.8 * bound


def test_rs_stable_when_probabilities_underflow():
    # tau 0.005: logits span ~800 nats, so most softmax entries underflow to exactly 0
    rng = np.random.default_rng(5)
    x, a = pair(rng, 256, mix=0.5)
    x32 = torch.tensor(x, dtype=torch.float32)
    for levels in (1, 3):
        a32 = torch.tensor(a, dtype=torch.float32, requires_grad=True)
        value = structure_regularizer(x32, a32, levels, 0.005)
        value.backward()
        assert torch.isfinite(value) and torch.isfinite(a32.grad).all()
        assert value.item() == pytest.approx(ref_rs(x, a, levels, 0.005), rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("levels", [1, 2, 3])
def test_rs_gradient_flows_to_aligned_only_and_is_exact(levels):
    x = torch.randn(9, 12, dtype=torch.float64, requires_grad=True)
    a = torch.randn(9, 6, dtype=torch.float64, requires_grad=True)
    structure_regularizer(x, a, levels, 0.1).backward()
    assert x.grad is None
    assert a.grad is not None and a.grad.abs().sum() > 0
    # the hand-written backward against finite differences
    xd = x.detach()
    assert torch.autograd.gradcheck(lambda v: structure_regularizer(xd, v, levels, 0.1), (a,))


def plain_rs(x: torch.Tensor, a: torch.Tensor, levels: int, tau: float) -> torch.Tensor:
    """The formula through plain autograd: the reference for the hand-written gradients."""

    def probs(v):
        v = torch.nn.functional.normalize(v, dim=1)
        v = v - v.mean(0)
        return torch.softmax(v @ v.T / tau, dim=1)

    p, q = probs(x), probs(a)
    total = 0.0
    for level in range(1, levels + 1):
        pl, ql = torch.linalg.matrix_power(p, level), torch.linalg.matrix_power(q, level)
        m = 0.5 * (pl + ql)
        js = 0.5 * (pl * (pl / m).log()).sum(1) + 0.5 * (ql * (ql / m).log()).sum(1)
        total = total + js.mean() / level
    return total / levels


@pytest.mark.parametrize("levels", [1, 2])
def test_rs_gradient_on_a_batch_that_takes_the_tiled_paths(levels):
    # B = 1100: the blocked Gram matrix and tiled transposes, with ragged last tiles
    rng = np.random.default_rng(levels)
    x, a = pair(rng, 1100, mix=0.5)
    x = torch.tensor(x)
    grads = []
    for rs in (structure_regularizer, plain_rs):
        v = torch.tensor(a, requires_grad=True)
        value = rs(x, v, levels, 0.1)
        value.backward()
        grads.append((value.item(), v.grad))
    assert grads[0][0] == pytest.approx(grads[1][0], rel=1e-10)
    torch.testing.assert_close(grads[0][1], grads[1][1], rtol=1e-8, atol=1e-14)


def test_cached_targets_give_the_same_value_and_gradient():
    rng = np.random.default_rng(11)
    x, a = pair(rng, 33)
    x, a = torch.tensor(x), torch.tensor(a)
    targets = structure_targets(x, 2, 0.07)
    grads = []
    for original in (x, targets):
        v = a.clone().requires_grad_()
        value = structure_regularizer(original, v, 2, 0.07)
        value.backward()
        grads.append((value.item(), v.grad))
    assert grads[0][0] == grads[1][0]
    assert torch.equal(grads[0][1], grads[1][1])
    with pytest.raises(ValueError, match="levels"):
        structure_regularizer(targets, a, 1, 0.07)
    with pytest.raises(ValueError, match="temperature"):
        structure_regularizer(targets, a, 2, 0.05)
    with pytest.raises(ValueError, match="like the original batch"):
        structure_regularizer(targets, a[:10], 2, 0.07)


# -- CLIP ------------------------------------------------------------------------------------
def test_clip_loss_by_hand():
    img = np.array([[1.0, 0.0], [0.6, 0.8], [0.0, 2.0]])
    txt = np.array([[3.0, 4.0], [1.0, 0.0], [0.0, -1.0]])
    tau = 0.5
    ni = img / np.linalg.norm(img, axis=1, keepdims=True)
    nt = txt / np.linalg.norm(txt, axis=1, keepdims=True)
    logits = ni @ nt.T / tau
    # row i of image->text: -log softmax(logits[i])[i]; text->image uses the columns
    i2t = -np.mean([logits[i, i] - np.log(np.exp(logits[i]).sum()) for i in range(3)])
    t2i = -np.mean([logits[i, i] - np.log(np.exp(logits[:, i]).sum()) for i in range(3)])
    got = clip_loss(torch.tensor(img), torch.tensor(txt), tau).item()
    assert got == pytest.approx(0.5 * (i2t + t2i), rel=1e-12)
    # perfect, well-separated pairs give a loss near 0
    eye = torch.eye(4, dtype=torch.float64)
    assert clip_loss(eye, 5 * eye, 0.01).item() < 1e-10
    with pytest.raises(ValueError, match="batch sizes differ"):
        clip_loss(eye, eye[:3])
