"""The permutation null of the layer metrics and their calibrated scores.

Gröger, Wen, Brbić: "Revisiting the Platonic Representation Hypothesis: An Aristotelian View"
(package `calibrated-similarity`): Y's rows are permuted, the same permutation for every layer
pair, which only relabels the cached structures (a graph g becomes inv[g[π]], a Gram Kc becomes
Kc[π][:, π]); no search runs again. Every metric of the registry (`stages.similarity`) takes
the permutation through its scorer. From the observed s and the null values s_1..s_K: tau =
the ceil((1 - α)(K + 1))-th smallest of {s, s_1..s_K}, calibrated = clip((s - tau) / (1 -
tau), 0, 1) (0 under the null), p = (1 + #{s_k >= s}) / (K + 1), per pair and for the maximum
over pairs (whose null is the maximum of each permuted table: selection's multiple
comparisons). With K < `min_permutations(α)` (19 at α = 0.05) tau is the largest of the K + 1
values, so every calibrated score is 0: `require_permutations` refuses such a K.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from stages import similarity
from stages.structures import Side
from store import UserError

ALPHA = 0.05


def tau_rank(count: int, alpha: float = ALPHA) -> int:
    """The 0-based rank of tau among the count + 1 sorted values."""
    return min(max(math.ceil((1 - alpha) * (count + 1)) - 1, 0), count)


def min_permutations(alpha: float = ALPHA) -> int:
    """The smallest K whose tau is not the largest of the K + 1 values (19 at alpha 0.05)."""
    count = 1
    while tau_rank(count, alpha) >= count:
        count += 1
    return count


def require_permutations(count: int, alpha: float = ALPHA) -> None:
    """Refuse a number of permutations too small for the (1 - alpha) quantile (0: off)."""
    smallest = min_permutations(alpha)
    if 0 < count < smallest:
        raise UserError(
            f"--calibrate {count} cannot reach the {100 * (1 - alpha):g}th percentile of the "
            f"null (every calibrated score would be 0): give at least {smallest} "
            "permutations, or 0 for none"
        )


def calibrate(
    observed: np.ndarray, null: np.ndarray, alpha: float = ALPHA, smax: float = 1.0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(calibrated, p_value, tau) of observed scores (...) against null scores (K, ...), as
    `calibrated_similarity.calibrate`: tau the ceil((1 - alpha)(K + 1))-th smallest of
    observed and null, calibrated = clip((s - tau) / (smax - tau), 0, 1), add-one p."""
    observed, null = np.asarray(observed, dtype=np.float64), np.asarray(null, dtype=np.float64)
    count = len(null)
    combined = np.sort(np.concatenate([observed[None], null]), axis=0)
    tau = combined[tau_rank(count, alpha)]
    p_value = (1 + (null >= observed).sum(axis=0)) / (count + 1)
    calibrated = np.clip((observed - tau) / np.maximum(smax - tau, 1e-12), 0.0, 1.0)
    return calibrated, p_value, tau


def permutation_null(
    metrics: Sequence[str], image: Side, text: Side, permutations: int, seed: int = 0,
    progress: Callable[[Iterable], Iterable] = iter,
) -> dict[str, np.ndarray]:  # fmt: skip
    """(K, Li, Lt) null tables per metric: K seeded permutations of the text rows, each
    applied to every layer pair at once."""
    rng = np.random.default_rng(seed)
    null = {m: np.empty((permutations, image.layers, text.layers)) for m in metrics}
    for t in progress(range(permutations)):
        perm = torch.as_tensor(rng.permutation(image.n), device=text.device)
        for m, table in similarity.tables(metrics, image, text, perm).items():
            null[m][t] = table
    return null


@dataclass
class Calibrated:
    """One metric's calibration: per pair, and for the maximum over all pairs."""

    calibrated: np.ndarray  # (Li, Lt)
    p_value: np.ndarray  # (Li, Lt)
    max_calibrated: float
    max_p_value: float


def calibrate_table(observed: np.ndarray, null: np.ndarray, alpha: float = ALPHA) -> Calibrated:
    """Calibrate an (Li, Lt) table against its (K, Li, Lt) null, per pair and for the max
    (the max of each permuted table is the null of the selected pair's score)."""
    calibrated, p_value, _ = calibrate(observed, null, alpha)
    best, best_p, _ = calibrate(observed.max(), null.reshape(len(null), -1).max(axis=1), alpha)
    return Calibrated(calibrated, p_value, float(best), float(best_p))
