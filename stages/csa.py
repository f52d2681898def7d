"""CSA (canonical similarity analysis; Li et al., ICLR 2025) as a head kind, and CSA + R_S.

CSA maps two frozen unimodal feature sets into a shared space without gradient training:

1. centre each view on the training mean; fit CCA with d canonical dimensions;
2. score a pair by the canonical-correlation-weighted cosine of its projections,

       s(x, y) = sum_k rho_k zx_k zy_k,  zx = unit(P_x^T (x - mu_x)),  zy = unit(P_y^T (y - mu_y))

   (the authors' `weighted_corr_sim`: projections L2-normalised, then weighted by rho).

Regularisation (not in CSA, whose code fits an unregularised CCA): with few pairs the sample
covariances are singular or nearly so and CCA finds spurious correlations of 1. We use canonical
ridge: C_xx + eps * (tr(C_xx) / D_x) * I (same for y), eps = `ridge` (relative to the mean
variance, so it does not depend on the feature scale). Since C + eps s I >= C, the regularised
canonical correlations stay in [0, 1); eps = 0 is plain CCA and needs full-rank covariances.

Evaluation applies two heads and takes the cosine of their outputs. To make that cosine equal
s(x, y) exactly, the heads are asymmetric and one dimension longer than d:

    image head: [rho * zx, sqrt(1 - ||rho * zx||^2)]      text head: [zy, 0]

Both outputs have unit norm (rho < 1), so their cosine is their dot product, sum_k rho_k zx_k zy_k.
Zero-shot prompts go through the text head and are averaged over templates like any other run.

CSA + R_S (this product's combination; the CSA paper has no R_S): starting from the CCA solution,
the two projections are refined by gradient (Adam, cosine learning rate) on

    lambda * (R_S(X, Z_x) + R_S(Y, Z_y)) - mean_k rho_k(Z_x, Z_y)

where Z are the per-view whitened projections (identity covariance under the ridge covariance)
and rho_k the canonical correlations between them (the singular values of their cross-covariance;
at the start their mean is CCA's own optimum). Then each view is re-whitened and the two rotated
by the SVD of the cross-covariance, so that the canonical property holds again: P_x^T C_xx P_x =
I, P_y^T C_yy P_y = I, P_x^T C_xy P_y = diag(rho) (ridge covariances). R_S only sees row
normalisations and inner products, so this final rotation leaves it unchanged: the R_S reached
by the refinement is the R_S of the heads' canonical projections. lambda = 0: plain CSA.

Whitened coordinates make the refinement scale-free: P_x = W_x G_x with W_x = C_xx^{-1/2}, and the
loss depends only on the span of G_x (it is whitened again through a Cholesky factor each step).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

from stages.heads import register_head
from stages.losses import structure_regularizer, structure_targets
from stages.pairs import PairData, PairSource, as_source, batch_plan, epoch_batches
from stages.train import (
    HISTORY_COLUMNS,
    AlignSettings,
    TrainResult,
    lr_at,
    mean_clip_loss,
    optimizer_step,
)
from store import UserError

MOMENT_CHUNK = 4096  # rows per pass when accumulating the covariances (and streaming)
# history rows of a refinement: each costs a CLIP loss over every training pair, so their
# number stays fixed (a row per epoch made CSA + R_S 8-12x plain CSA on real features)
LOG_POINTS = 20
CSA_HISTORY = [*HISTORY_COLUMNS, "mean_corr", "val_mean_corr"]


# -- moments and CCA (float64) ----------------------------------------------------------------
@dataclass(frozen=True)
class Moments:
    """Means and (n - 1)-normalised covariances of paired rows x (n, Dx), y (n, Dy)."""

    n: int
    mean_x: np.ndarray
    mean_y: np.ndarray
    cov_x: np.ndarray
    cov_y: np.ndarray
    cov_xy: np.ndarray


def moments(chunks: Iterable[tuple[np.ndarray | Tensor, np.ndarray | Tensor]]) -> Moments:
    """Float64 means and covariances of paired chunks, merged chunk by chunk (Chan et al.'s
    pairwise update: no sum of squares minus squared sum, so no cancellation)."""
    n, dim_x, mean, m2 = 0, 0, None, None
    for x, y in chunks:
        x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
        if len(x) == 0:
            continue
        xy = np.concatenate([x, y], axis=1)
        chunk_mean = xy.mean(axis=0)
        centred = xy - chunk_mean
        chunk_m2 = centred.T @ centred
        if mean is None:
            n, dim_x, mean, m2 = len(xy), x.shape[1], chunk_mean, chunk_m2
            continue
        delta, total = chunk_mean - mean, n + len(xy)
        m2 = m2 + chunk_m2 + np.outer(delta, delta) * (n * len(xy) / total)
        mean = mean + delta * (len(xy) / total)
        n = total
    if mean is None or n < 2:
        raise UserError(f"CSA needs at least 2 training pairs, got {n}; raise --n-pairs")
    cov, d = m2 / (n - 1), dim_x
    return Moments(n, mean[:d], mean[d:], cov[:d, :d], cov[d:, d:], cov[:d, d:])


def ridge_covariance(cov: np.ndarray, ridge: float) -> np.ndarray:
    """C + ridge * (tr(C) / D) * I: canonical ridge, relative to the mean variance."""
    return cov + ridge * (np.trace(cov) / cov.shape[0]) * np.eye(cov.shape[0])


def inverse_sqrt(cov: np.ndarray, what: str) -> np.ndarray:
    """C^{-1/2} of a symmetric positive definite matrix, or a UserError when it is singular."""
    values, vectors = np.linalg.eigh(cov)
    top = values.max(initial=0.0)
    if not top > 0:
        raise UserError(
            f"the {what} features are constant over the training pairs; CSA needs variance"
        )
    # relative threshold: the float64 eigenvalue noise of a rank-deficient matrix is ~1e-16 * top
    rank = int((values > 1e-10 * top).sum())
    if rank < len(values):
        raise UserError(
            f"the covariance of the {what} features is singular (rank {rank} of {len(values)}, "
            "e.g. fewer pairs than dimensions); set --csa-ridge above 0"
        )
    return (vectors / np.sqrt(values)) @ vectors.T


def check_dimensions(n: int, dim_x: int, dim_y: int, dim: int) -> None:
    """d canonical pairs need d <= min(Dx, Dy) and d <= n - 1 (centred pairs span n - 1 dims)."""
    if dim < 1:
        raise UserError(f"CSA needs at least 1 canonical dimension (--out-dim), got {dim}")
    if dim > min(dim_x, dim_y):
        raise UserError(
            f"CSA cannot have {dim} canonical dimensions (--out-dim) with image features of "
            f"{dim_x} and text features of {dim_y} dims; lower --out-dim to {min(dim_x, dim_y)} "
            "or less"
        )
    if dim > n - 1:
        raise UserError(
            f"CSA with {dim} canonical dimensions needs at least {dim + 1} training pairs "
            f"(centred pairs span at most n - 1 dims), got {n}; raise --n-pairs or lower "
            f"--out-dim to {max(n - 1, 1)} or less"
        )


@dataclass(frozen=True)
class Whitened:
    """The CCA problem in whitened coordinates: W_x = C_xx^{-1/2}, W_y, and T = W_x C_xy W_y,
    whose singular values are the (ridge) canonical correlations."""

    w_x: np.ndarray
    w_y: np.ndarray
    cross: np.ndarray


def whiten(m: Moments, ridge: float) -> Whitened:
    if ridge < 0:
        raise UserError(f"--csa-ridge must be >= 0, got {ridge}")
    w_x = inverse_sqrt(ridge_covariance(m.cov_x, ridge), "image")
    w_y = inverse_sqrt(ridge_covariance(m.cov_y, ridge), "text")
    return Whitened(w_x, w_y, w_x @ m.cov_xy @ w_y)


@dataclass(frozen=True)
class CCASolution:
    """Centre with mean_*, project with proj_* (D, d); corr: descending canonical correlations.

    Canonical property (ridge covariances): proj_x^T C_xx proj_x = I, proj_y^T C_yy proj_y = I,
    proj_x^T C_xy proj_y = diag(corr)."""

    mean_x: np.ndarray
    mean_y: np.ndarray
    proj_x: np.ndarray
    proj_y: np.ndarray
    corr: np.ndarray
    ridge: float

    @property
    def dim(self) -> int:
        return len(self.corr)

    def project(self, x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return (
            (np.asarray(x, np.float64) - self.mean_x) @ self.proj_x,
            (np.asarray(y, np.float64) - self.mean_y) @ self.proj_y,
        )


def canonical_rotation(
    m: Moments, w: Whitened, basis_x: np.ndarray, basis_y: np.ndarray, ridge: float
) -> CCASolution:
    """CCA restricted to the whitened subspaces spanned by basis_x (Dx, d) and basis_y (Dy, d):
    orthonormalise each basis, then rotate both by the SVD of their cross-covariance."""
    q_x, _ = np.linalg.qr(basis_x)
    q_y, _ = np.linalg.qr(basis_y)
    u, s, vt = np.linalg.svd(q_x.T @ w.cross @ q_y)
    return CCASolution(
        mean_x=m.mean_x,
        mean_y=m.mean_y,
        proj_x=w.w_x @ q_x @ u,
        proj_y=w.w_y @ q_y @ vt.T,
        corr=s,
        ridge=float(ridge),
    )


def cca_from_moments(m: Moments, dim: int, ridge: float = AlignSettings.csa_ridge) -> CCASolution:
    """Top-d (ridge) CCA: the leading singular pairs of T = W_x C_xy W_y."""
    check_dimensions(m.n, len(m.mean_x), len(m.mean_y), dim)
    w = whiten(m, ridge)
    u, _, vt = np.linalg.svd(w.cross)
    return canonical_rotation(m, w, u[:, :dim], vt[:dim].T, ridge)


def fit_cca(
    x: np.ndarray, y: np.ndarray, dim: int, ridge: float = AlignSettings.csa_ridge
) -> CCASolution:
    """Ridge CCA of paired rows x (n, Dx), y (n, Dy) with dim canonical dimensions."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or y.ndim != 2 or len(x) != len(y):
        raise UserError(f"CCA needs paired (n, D) arrays, got {x.shape} and {y.shape}")
    if not (np.isfinite(x).all() and np.isfinite(y).all()):
        raise UserError("the CCA training features hold NaN or inf")
    return cca_from_moments(moments([(x, y)]), dim, ridge)


def csa_similarity(zx: np.ndarray, zy: np.ndarray, corr: np.ndarray) -> np.ndarray:
    """CSA's score of every (x, y): sum_k corr_k * unit(zx)_k * unit(zy)_k, shape (Nx, Ny)."""
    zx = zx / np.linalg.norm(zx, axis=1, keepdims=True)
    zy = zy / np.linalg.norm(zy, axis=1, keepdims=True)
    return (zx * corr) @ zy.T


# -- the head ---------------------------------------------------------------------------------
class CSAHead(nn.Module):
    """CSA's head (train_csa fits it): centre, project to d canonical dimensions, L2-normalise,
    weight; plus a slack dimension that brings the output to unit norm (output size d + 1,
    float64 buffers; hidden_dim unused).

    The image head carries weight = rho, the text head weight = 1: the dot product (= cosine) of
    the two outputs is CSA's score. Registered as head kind `csa` at the end of this module,
    with its trainer."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int | None = None):
        super().__init__()
        self.register_buffer("mean", torch.zeros(in_dim, dtype=torch.float64))
        self.register_buffer("proj", torch.zeros(in_dim, out_dim, dtype=torch.float64))
        self.register_buffer("weight", torch.ones(out_dim, dtype=torch.float64))

    def forward(self, x: Tensor) -> Tensor:
        z = F.normalize((x.to(torch.float64) - self.mean) @ self.proj, dim=-1)
        z = z * self.weight
        slack = (1.0 - (z * z).sum(dim=-1, keepdim=True)).clamp_min(0.0).sqrt()
        return torch.cat([z, slack], dim=-1)


def csa_heads(solution: CCASolution) -> tuple[CSAHead, CSAHead]:
    """(image head, text head) computing CSA's score as the cosine of their outputs."""
    heads = []
    for mean, proj, weight in (
        (solution.mean_x, solution.proj_x, solution.corr),
        (solution.mean_y, solution.proj_y, np.ones_like(solution.corr)),
    ):
        head = CSAHead(proj.shape[0], proj.shape[1])
        head.mean.copy_(torch.from_numpy(mean))
        head.proj.copy_(torch.from_numpy(proj))
        head.weight.copy_(torch.from_numpy(np.clip(weight, 0.0, 1.0)))
        heads.append(head.eval())
    return heads[0], heads[1]


# -- CSA + R_S --------------------------------------------------------------------------------
def _orthonormal(g: Tensor) -> Tensor:
    """g L^{-T} with L L^T = g^T g: a differentiable orthonormal basis of span(g)."""
    chol = torch.linalg.cholesky(g.T @ g)
    return torch.linalg.solve_triangular(chol, g.T, upper=False).T


@dataclass
class Refinement:
    solution: CCASolution
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    rs: tuple[float, float] = (math.nan, math.nan)  # R_S (image, text) of the final solution


def log_points(steps: int, points: int = LOG_POINTS) -> list[int]:
    """The steps after which the history records a row: about `points` of them, evenly spread,
    the last step always (so the diagnostics cost the same at 100 pairs and at 10,000)."""
    return sorted({round(steps * (i + 1) / points) for i in range(points)} - {0} | {steps})


def refine_with_structure(
    source: PairSource,
    m: Moments,
    start: CCASolution,
    settings: AlignSettings,
    *,
    steps: int,
    on_log: Callable[[int, int, CCASolution, dict[str, float]], None] | None = None,
    progress: bool = False,
) -> Refinement:
    """Refine the CCA subspaces for `steps` steps by Adam on lambda * (R_S(X, Z_x) +
    R_S(Y, Z_y)) - mean rho (lambda, levels, temperature, batch size, lr and seed from
    `settings`), then re-whiten and rotate (canonical_rotation). The history gets a row at step
    0 and at each of log_points(steps); `on_log(row index, step, solution, row)` may add to it.
    A row's `epoch` is the passes over the pairs so far (fractional)."""
    lam, levels, temperature = settings.lam, settings.levels, settings.temperature
    batch_size, lr, seed = settings.batch_size, settings.lr, settings.seed
    w = whiten(m, start.ridge)
    # the start in whitened coordinates: W_x^{-1} proj_x has orthonormal columns
    g_x = torch.from_numpy(np.linalg.solve(w.w_x, start.proj_x)).requires_grad_(True)
    g_y = torch.from_numpy(np.linalg.solve(w.w_y, start.proj_y)).requires_grad_(True)
    cross = torch.from_numpy(w.cross)
    to_white_x = torch.from_numpy(w.w_x)
    to_white_y = torch.from_numpy(w.w_y)
    mean_x, mean_y = torch.from_numpy(m.mean_x), torch.from_numpy(m.mean_y)
    optimizer = torch.optim.Adam([g_x, g_y], lr=lr)

    n = len(source)
    # whole batches of exactly `batch` pairs, the ragged end of each epoch dropped
    per_epoch, batch = batch_plan(n, batch_size, drop_ragged=True)
    full_batch = per_epoch == 1 and batch == n
    cache: dict[str, Any] = {}

    def batch_terms(x: Tensor, y: Tensor, key: str | None):
        """Whitened features and the R_S targets of one batch (cached when it is all the data)."""
        if key is not None and key in cache:
            return cache[key]
        x, y = x.to(torch.float64), y.to(torch.float64)
        terms = (
            (x - mean_x) @ to_white_x,
            (y - mean_y) @ to_white_y,
            structure_targets(x, levels, temperature),
            structure_targets(y, levels, temperature),
        )
        if key is not None:
            cache[key] = terms
        return terms

    def objective(xw: Tensor, yw: Tensor, t_x, t_y) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        basis_x, basis_y = _orthonormal(g_x), _orthonormal(g_y)
        mean_corr = torch.linalg.svdvals(basis_x.T @ cross @ basis_y).mean()
        rs_x = structure_regularizer(t_x, xw @ basis_x, levels, temperature)
        rs_y = structure_regularizer(t_y, yw @ basis_y, levels, temperature)
        return lam * (rs_x + rs_y) - mean_corr, rs_x, rs_y, mean_corr

    def current() -> CCASolution:
        with torch.no_grad():
            return canonical_rotation(m, w, g_x.detach().numpy(), g_y.detach().numpy(), start.ridge)

    def record(index: int, step: int, sums: np.ndarray, lr_t: float) -> dict[str, float]:
        loss, rs_x, rs_y, corr = sums
        row = {
            "epoch": step / per_epoch,
            "step": step,
            "rs_image": rs_x,
            "rs_text": rs_y,
            "lambda": lam,
            "train_loss": loss,
            "lr": lr_t,
            "mean_corr": corr,
        }
        if on_log is not None:
            on_log(index, step, current(), row)
        return row

    def run_batches(batches: list[np.ndarray], step: int, train: bool) -> tuple[np.ndarray, int]:
        sums = np.zeros(4)
        for x, y in source.take(batches):
            xw, yw, t_x, t_y = batch_terms(x, y, "all" if full_batch else None)
            if train:
                for group in optimizer.param_groups:
                    group["lr"] = lr_at(step, steps, lr)
                loss, rs_x, rs_y, corr = objective(xw, yw, t_x, t_y)
                optimizer_step(optimizer, loss, step, what="the CSA + R_S objective")
                step += 1
            else:
                with torch.no_grad():
                    loss, rs_x, rs_y, corr = objective(xw, yw, t_x, t_y)
            sums += [loss.item(), rs_x.item(), rs_y.item(), corr.item()]
        return sums / max(len(batches), 1), step

    generator = torch.Generator().manual_seed(seed)
    schedule: list[np.ndarray] = []
    while len(schedule) < max(steps, per_epoch):  # as many epochs as the steps need
        schedule += epoch_batches(n, per_epoch, batch, generator, drop_ragged=True)
    history = [record(0, 0, run_batches(schedule[:per_epoch], 0, train=False)[0], lr)]
    step = 0
    bar = tqdm(log_points(steps) if steps else [], desc="csa + R_S", disable=not progress)
    for index, until in enumerate(bar, 1):
        lr_t = lr_at(step, steps, lr)
        sums, step = run_batches(schedule[step:until], step, train=True)
        history.append(record(index, step, sums, lr_t))
        bar.set_postfix(loss=f"{sums[0]:.4f}", corr=f"{sums[3]:.3f}")
    bar.close()
    # history rows average the values seen before each step; this is R_S after the last one,
    # on the last epoch's batches
    if steps:
        final = run_batches(schedule[max(steps - per_epoch, 0) : steps], step, train=False)[0]
        rs = (final[1], final[2])
    else:
        rs = (history[0]["rs_image"], history[0]["rs_text"])
    return Refinement(current(), history, step, (float(rs[0]), float(rs[1])))


# -- training entry point (head kind `csa`, registered below) ---------------------------------
def _chunks(n: int) -> list[np.ndarray]:
    return [np.arange(i, min(i + MOMENT_CHUNK, n)) for i in range(0, n, MOMENT_CHUNK)]


def _pair_corr(solution: CCASolution, m: Moments | None) -> float:
    """Mean over dims of the correlation of the paired projections under moments m (plain
    covariances: on held-out pairs this is the honest canonical correlation)."""
    if m is None:
        return float("nan")
    px, py = solution.proj_x, solution.proj_y
    cross = np.einsum("ik,ij,jk->k", px, m.cov_xy, py)
    var_x = np.einsum("ik,ij,jk->k", px, m.cov_x, px)
    var_y = np.einsum("ik,ij,jk->k", py, m.cov_y, py)
    return float(np.mean(cross / np.sqrt(np.maximum(var_x * var_y, 1e-300))))


def train_csa(
    train: PairData,
    val: PairData | None,
    settings: AlignSettings,
    progress: bool = True,
) -> TrainResult:
    """Fit CSA (d = settings.out_dim, ridge = settings.csa_ridge); with settings.lam > 0 refine
    it with R_S for settings.csa_steps steps (the authors refine for a fixed 10 epochs; a fixed
    step count keeps the cost the same at any number of pairs). Returns heads, history and a
    summary (`info`)."""
    s = settings
    started = time.perf_counter()
    source, val_source = as_source(train), as_source(val)
    if len(source) < 2:
        raise UserError(f"{len(source)} training pair(s): CSA needs at least 2; raise --n-pairs")
    if val_source is not None and len(val_source) < 2:
        val_source = None
    m = moments(source.take(_chunks(len(source))))
    if not all(np.isfinite(a).all() for a in (m.cov_x, m.cov_y, m.cov_xy)):
        raise UserError("the CSA training features hold NaN or inf")
    m_val = moments(val_source.take(_chunks(len(val_source)))) if val_source else None
    cca = cca_from_moments(m, s.out_dim, s.csa_ridge)
    batch = min(s.batch_size, len(source))

    def losses(solution: CCASolution) -> tuple[float, float]:
        image_head, text_head = csa_heads(solution)
        train_loss = mean_clip_loss(image_head, text_head, source, batch, s.temperature)
        val_loss = (
            mean_clip_loss(image_head, text_head, val_source, batch, s.temperature)
            if val_source
            else float("nan")
        )
        return train_loss, val_loss

    def on_log(index: int, step: int, solution: CCASolution, row: dict[str, float]) -> None:
        row["clip_loss"], row["val_loss"] = losses(solution)
        row["val_mean_corr"] = _pair_corr(solution, m_val)

    steps = s.csa_steps if s.lam > 0 else 0
    refined = refine_with_structure(
        source, m, cca, s, steps=steps, on_log=on_log, progress=progress
    )
    solution = refined.solution if s.lam > 0 else cca
    history = pd.DataFrame(refined.history, columns=CSA_HISTORY)
    first, last = history.iloc[0], history.iloc[-1]
    image_head, text_head = csa_heads(solution)
    info = {
        "csa": {
            "dim": solution.dim,
            "ridge": solution.ridge,
            "corr": [round(float(c), 6) for c in solution.corr],
            "corr_cca": [round(float(c), 6) for c in cca.corr],
            "mean_corr_train": float(np.mean(solution.corr)),
            "mean_corr_val": _pair_corr(solution, m_val),
            "mean_corr_val_cca": _pair_corr(cca, m_val),
            "rs_image_cca": float(first["rs_image"]),
            "rs_text_cca": float(first["rs_text"]),
            "rs_image": refined.rs[0],
            "rs_text": refined.rs[1],
            "refined": s.lam > 0,
            "score": "sum_k rho_k * unit(zx)_k * unit(zy)_k (CSA's weighted_corr_sim)",
        },
        "out_dim_head": solution.dim + 1,
        "optimizer": "Adam on the whitened subspaces" if s.lam > 0 else "none (closed-form CCA)",
        "betas": [0.9, 0.999] if s.lam > 0 else None,
        "grad_clip": None,
        "lr_schedule": "cosine to 0" if s.lam > 0 else None,
        "early_stopping": "none: CCA, then a fixed number of R_S refinement steps",
        "refine_steps": refined.steps,
        # config.json's keys of the kept weights: here those of the last step
        "best_epoch": round(float(last["epoch"]), 3),
        "best_val_loss": float(last["val_loss"]),
    }
    return TrainResult(
        image_head=image_head,
        text_head=text_head,
        history=history,
        best_epoch=info["best_epoch"],
        best_val_loss=info["best_val_loss"],
        steps=refined.steps,
        seconds=time.perf_counter() - started,
        info=info,
    )


register_head("csa", display="CSA", help="CCA-based, fitted in closed form", trainer=train_csa)(
    CSAHead
)
