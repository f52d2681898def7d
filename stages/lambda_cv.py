"""`align --lambda auto`: the weight λ of R_S chosen by K-fold cross-validation on the training
pairs alone (never the evaluation split).

The training pairs are cut into K folds, whole images at a time (an image's captions stay in one
fold), by a seeded shuffle. For every λ of the grid and every fold, a run with the run's own
settings trains on the other K-1 folds (with the run's validation pairs, if any, for early
stopping) and is scored on the held-out fold under a criterion:

- retrieval: held-out-fold R@1, the mean of image→text and text→image (higher is better);
- zeroshot: held-out-fold top-1 over the training split's labels, classes embedded from the
  prompts split (higher is better);
- clip: held-out-fold CLIP loss (lower is better).

With few training images a fold is a handful of images (at 100 pairs and 5 folds, 20: one
image moves top-1 by 5 points), so the split is drawn again with other folds (`--cv-repeats`;
auto: about 300 held-out images scored per λ, 3 splits at 100 images, 1 from 300 up) and every
split's folds count. The chosen λ has the best mean over folds (ties: the smaller λ, less
regularisation). The folds share one process and one data load; only the heads are trained
again. Gradient-trained heads train a fold's grid at once (stages.train.train_lambda_stack: one
loop, the batches and R_S targets shared), and the folds train side by side, one per core
(`stages.threads.fold_lanes`), when each trains on one torch thread.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import Any

import numpy as np

from stages.evaluate import project, retrieval_recall, zero_shot_accuracy
from stages.head_stack import training_draws_random
from stages.pairs import MemoryPairs
from stages.progress import progress_bar
from stages.threads import fold_lanes
from stages.train import AlignSettings, TrainResult, mean_clip_loss
from stages.vectors import class_embeddings
from store import UserError

# criterion -> (what it measures, True when higher is better)
CRITERIA = {
    "retrieval": ("held-out-fold R@1, mean of image→text and text→image (%)", True),
    "zeroshot": ("held-out-fold zero-shot top-1 over the training labels (%)", True),
    "clip": ("held-out-fold CLIP loss", False),
}
# `--cv-repeats auto`: the K-fold split is drawn again (other folds) until about this many
# held-out images are scored per λ: at 100 pairs a fold's score is 20 images, one image 5 points
AUTO_REPEATS_IMAGES = 300
MAX_AUTO_REPEATS = 5
DEFAULT_GRID = (0.0, 1.0, 3.0, 10.0, 30.0)  # gradient-trained heads (the paper's λ is 10)
CSA_GRID = (0.0, 0.1, 0.3, 1.0, 3.0)  # CSA's R_S refinement works at smaller λ (default 0.3)
AUTO = "auto"


def parse_grid(text: str | float | tuple | list, what: str = "--lambda-grid") -> tuple[float, ...]:
    """`0,1,3,10` -> (0.0, 1.0, 3.0, 10.0): distinct finite values >= 0, sorted."""
    items = text if isinstance(text, list | tuple) else str(text).split(",")
    try:
        values = [float(str(v).strip()) for v in items if str(v).strip()]
    except ValueError as err:
        raise UserError(f"{what} must be comma-separated numbers, got {text!r}") from err
    if not values or any(not math.isfinite(v) or v < 0 for v in values):
        raise UserError(f"{what} needs one or more finite numbers >= 0, got {text!r}")
    if len(set(values)) != len(values):
        raise UserError(f"{what} lists a value twice: {text!r}")
    return tuple(sorted(values))


def parse_lambda(text: str | float) -> float | None:
    """`--lambda`: a number >= 0, or `auto` (None: chosen by cross-validation)."""
    if str(text).strip().lower() == AUTO:
        return None
    try:
        value = float(text)
    except ValueError as err:
        raise UserError(f"--lambda must be a number >= 0 or auto, got {text!r}") from err
    return value  # range and finiteness: AlignSettings


def parse_repeats(text: str | int) -> int:
    """`--cv-repeats`: a count >= 1, or `auto` (0: by the number of training images)."""
    if str(text).strip().lower() == AUTO:
        return 0
    try:
        value = int(str(text).strip())
    except ValueError as err:
        raise UserError(f"--cv-repeats must be a whole number >= 1 or auto, got {text!r}") from err
    if value < 1:
        raise UserError(f"--cv-repeats must be >= 1 or auto, got {text!r}")
    return value


def cv_repeats(repeats: int, images: int) -> int:
    """How many K-fold splits to score: `repeats`, or for auto (0) enough that about
    AUTO_REPEATS_IMAGES held-out images are scored (each split scores every image once), at
    most MAX_AUTO_REPEATS: one split from 300 training images up."""
    if repeats:
        return repeats
    return max(1, min(MAX_AUTO_REPEATS, math.ceil(AUTO_REPEATS_IMAGES / images)))


@dataclass(frozen=True)
class LambdaSearch:
    """How `--lambda auto` chooses: the grid, the folds, the criterion. An empty grid means the
    head's default grid (DEFAULT_GRID, or CSA_GRID for csa)."""

    grid: tuple[float, ...] = ()
    folds: int = 5
    criterion: str = "retrieval"
    repeats: int | str = AUTO  # K-fold splits scored, or auto (stored as 0: cv_repeats)

    def __post_init__(self) -> None:
        object.__setattr__(self, "criterion", self.criterion.strip().lower())
        object.__setattr__(self, "repeats", parse_repeats(self.repeats))
        if self.grid:
            object.__setattr__(self, "grid", parse_grid(self.grid))
            if len(self.grid) < 2:
                raise UserError(f"--lambda-grid needs two or more values, got {self.grid}")
        if self.folds < 2:
            raise UserError(f"--cv-folds must be >= 2, got {self.folds}")
        if self.criterion not in CRITERIA:
            raise UserError(
                f"--lambda-criterion must be one of {', '.join(CRITERIA)}, got {self.criterion!r}"
            )

    def grid_for(self, head: str) -> tuple[float, ...]:
        return self.grid or (CSA_GRID if head == "csa" else DEFAULT_GRID)


@dataclass
class ZeroShotData:
    """What the zeroshot criterion needs: the prompts' features at the run's text layer and
    their class labels."""

    prompts: np.ndarray
    prompt_labels: np.ndarray


# -- pure pieces ------------------------------------------------------------------------------
def image_folds(groups: np.ndarray, folds: int, seed: int, repeat: int = 0) -> np.ndarray:
    """The fold (0..folds-1) of every pair: whole images (equal `groups`) at a time, in a seeded
    order, each to the fold with the fewest pairs so far (folds of near-equal size). Repeat r > 0
    of a repeated K-fold shuffles by (seed, r)."""
    groups = np.asarray(groups)
    images = np.unique(groups)
    if len(images) < folds:
        raise UserError(
            f"--cv-folds {folds} needs at least {folds} training images, got {len(images)}; "
            "lower --cv-folds or raise --n-pairs"
        )
    sizes = dict(zip(*np.unique(groups, return_counts=True), strict=True))
    fold_of_image, load = {}, np.zeros(folds, dtype=np.int64)
    rng = np.random.default_rng(seed if repeat == 0 else (seed, repeat))
    for image in rng.permutation(images):
        f = int(np.argmin(load))  # the first of the least loaded folds
        fold_of_image[image] = f
        load[f] += sizes[image]
    return np.array([fold_of_image[g] for g in groups], dtype=np.int64)


def choose_lambda(scores: dict[float, list[float]], higher_is_better: bool) -> float:
    """The λ with the best mean fold score; among equal means, the smallest λ."""
    means = {lam: float(np.mean(values)) for lam, values in scores.items()}
    sign = 1.0 if higher_is_better else -1.0
    best = max(sign * m for m in means.values())
    return min(lam for lam, m in means.items() if sign * m == best)


def summary_rows(scores: dict[float, list[float]]) -> list[dict[str, float]]:
    """Per λ: mean and sample std (ddof 1) of its fold scores."""
    return [
        {
            "lambda": lam,
            "mean": float(np.mean(v)),
            "std": float(np.std(v, ddof=1)) if len(v) > 1 else math.nan,
        }
        for lam, v in scores.items()
    ]


def fold_score(
    criterion: str,
    result: TrainResult,
    held: MemoryPairs,
    held_groups: np.ndarray,
    settings: AlignSettings,
    zeroshot: ZeroShotData | None,
    held_labels: np.ndarray | None,
) -> float:
    """The criterion's value of a run's heads on the held-out fold."""
    image_head, text_head = result.image_head.eval(), result.text_head.eval()
    if criterion == "clip":
        s = settings
        return mean_clip_loss(image_head, text_head, held, s.batch_size, s.temperature)
    _, first, owner = np.unique(held_groups, return_index=True, return_inverse=True)
    image_emb = project(image_head, held.image[first].numpy(), "held-out images")
    if criterion == "retrieval":
        text_emb = project(text_head, held.text.numpy(), "held-out captions")
        recall = retrieval_recall(image_emb, text_emb, owner, ks=(1,))
        return 0.5 * (recall["i2t_r1"] + recall["t2i_r1"])
    assert zeroshot is not None and held_labels is not None
    labels = held_labels[first]
    n_classes = int(zeroshot.prompt_labels.max()) + 1
    classes = class_embeddings(
        project(text_head, zeroshot.prompts, "prompts"), zeroshot.prompt_labels, n_classes
    )
    keep = labels >= 0
    return zero_shot_accuracy(image_emb[keep], classes, labels[keep], topk=(1,))["top1"]


# -- the search ---------------------------------------------------------------------------------
def search_units(folds: int, grid: tuple[float, ...]) -> list[tuple[int, tuple[float, ...]]]:
    """The units of a stacked search: (fold, the λ it trains at once). A fold's whole grid (the
    more copies in one loop, the less each costs), except that with an odd number of folds the
    last one is trained in two halves of its grid: two lanes then finish together."""
    units = [(k, grid) for k in range(folds)]
    if folds % 2 and len(grid) > 1:
        units[-1:] = [(folds - 1, grid[0::2]), (folds - 1, grid[1::2])]
    return units


def fold_scores(
    train: MemoryPairs,
    val: MemoryPairs,
    groups: np.ndarray,
    fold: np.ndarray,
    settings: AlignSettings,
    grid: tuple[float, ...],
    fit: Callable[..., TrainResult],
    criteria: tuple[str, ...],
    *,
    zeroshot: ZeroShotData | None = None,
    train_labels: np.ndarray | None = None,
    progress: bool = True,
    fit_grid: Callable[..., list[TrainResult]] | None = None,
    lanes: int = 1,
    desc: str = "lambda cv",
) -> dict[str, dict[float, list[float]]]:
    """{criterion: {λ: score of each fold}}: for every fold k and λ, one run of `fit` on the
    pairs outside fold k (settings with λ), scored on fold k under every criterion (the runs
    are shared by the criteria). `fit_grid(train, val, settings, lambdas)`: a trainer of
    several λ at once (train_lambda_stack), used instead of `fit` when given: the units of work
    are then `search_units`; `lanes`: units trained at the same time, in threads. The units are
    the same whatever the lanes, and so are the scores."""
    folds = int(fold.max()) + 1
    units = search_units(folds, grid) if fit_grid is not None else [(k, grid) for k in range(folds)]
    bar = progress_bar(total=len(grid) * folds, desc=desc, unit="run", enabled=progress)

    def unit_run(unit: tuple[int, tuple[float, ...]]) -> dict[str, dict[float, float]]:
        """{criterion: {λ: score}} of the λ of `unit` on its fold."""
        k, lambdas = unit
        held_idx, fit_idx = np.flatnonzero(fold == k), np.flatnonzero(fold != k)
        fit_pairs = MemoryPairs(train.image[fit_idx], train.text[fit_idx])
        held = MemoryPairs(train.image[held_idx], train.text[held_idx])
        held_labels = None if train_labels is None else train_labels[held_idx]
        if fit_grid is not None:
            results = fit_grid(fit_pairs, val, settings, lambdas, progress=False, stop=stop)
        else:
            results = [
                fit(fit_pairs, val, replace(settings, lam=lam), progress=False) for lam in lambdas
            ]
        bar.update(len(lambdas))
        return {
            c: {
                lam: float(
                    fold_score(c, r, held, groups[held_idx], settings, zeroshot, held_labels)
                )
                for lam, r in zip(lambdas, results, strict=True)
            }
            for c in criteria
        }

    stop = threading.Event()  # ends the other lanes at their next step
    if lanes <= 1:
        done = [unit_run(u) for u in units]
    else:
        pool = ThreadPoolExecutor(max_workers=lanes)
        try:
            done = list(pool.map(unit_run, units))  # in unit order
        except BaseException:  # Ctrl-C, or a unit that failed: the others end now, not later
            stop.set()
            raise
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    scores: dict[str, dict[float, list[float]]] = {c: {lam: [] for lam in grid} for c in criteria}
    for result in done:  # units in fold order: each λ's list is in fold order
        for c in criteria:
            for lam, value in result[c].items():
                scores[c][lam].append(value)
    return scores


def repeated_fold_scores(
    train: MemoryPairs,
    val: MemoryPairs,
    groups: np.ndarray,
    settings: AlignSettings,
    grid: tuple[float, ...],
    fit: Callable[..., TrainResult],
    criteria: tuple[str, ...],
    folds: int,
    repeats: int,
    *,
    zeroshot: ZeroShotData | None = None,
    train_labels: np.ndarray | None = None,
    progress: bool = True,
    fit_grid: Callable[..., list[TrainResult]] | None = None,
) -> tuple[list[np.ndarray], dict[str, dict[float, list[float]]], int]:
    """fold_scores on `repeats` K-fold splits of the images (split r: image_folds(..., seed,
    r)), their folds side by side where fold_lanes allows. Returns (each split's fold of every
    pair, {criterion: {λ: the scores of split 0's folds, then split 1's, ...}}, lanes)."""
    splits = [image_folds(groups, folds, settings.seed, r) for r in range(repeats)]
    lanes = 1
    if fit_grid is not None:
        units = len(search_units(folds, grid))
        lanes = fold_lanes(units, training_draws_random(settings, train.dims))
    scores: dict[str, dict[float, list[float]]] = {c: {lam: [] for lam in grid} for c in criteria}
    for r, fold in enumerate(splits):
        split_scores = fold_scores(
            train, val, groups, fold, settings, grid, fit, criteria,
            zeroshot=zeroshot, train_labels=train_labels, progress=progress,
            fit_grid=fit_grid, lanes=lanes,
            desc=f"lambda cv {r + 1}/{repeats}" if repeats > 1 else "lambda cv",
        )  # fmt: skip
        for c in criteria:
            for lam in grid:
                scores[c][lam] += split_scores[c][lam]
    return splits, scores, lanes


def search_lambda(
    train: MemoryPairs,
    val: MemoryPairs,
    groups: np.ndarray,
    settings: AlignSettings,
    search: LambdaSearch,
    fit: Callable[..., TrainResult],
    *,
    zeroshot: ZeroShotData | None = None,
    train_labels: np.ndarray | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    fit_grid: Callable[..., list[TrainResult]] | None = None,
) -> dict[str, Any]:
    """Cross-validate every λ of the grid on `train` (pairs; `groups[i]` the image of pair i;
    `train_labels[i]` its class for the zeroshot criterion) with trainer `fit` and the run's
    settings (λ replaced), or with `fit_grid` several λ at once (see fold_scores); `val` stays
    the validation set of every fold's run. Returns what config.json records under
    `lambda_search` (the chosen λ under `chosen`)."""
    grid = search.grid_for(settings.head)
    description, higher = CRITERIA[search.criterion]
    labelled = train_labels is not None and bool((train_labels >= 0).any())
    if search.criterion == "zeroshot" and (zeroshot is None or not labelled):
        raise UserError(
            "--lambda-criterion zeroshot needs class labels on the training pairs and a "
            "prompts split; use retrieval or clip"
        )
    started = time.perf_counter()
    repeats = cv_repeats(search.repeats, len(np.unique(groups)))
    splits, all_scores, lanes = repeated_fold_scores(
        train, val, groups, settings, grid, fit, (search.criterion,), search.folds, repeats,
        zeroshot=zeroshot, train_labels=train_labels, progress=progress, fit_grid=fit_grid,
    )  # fmt: skip
    scores = all_scores[search.criterion]
    chosen = choose_lambda(scores, higher)
    record = {
        "criterion": search.criterion,
        "criterion_means": description,
        "higher_is_better": higher,
        "grid": list(grid),
        "folds": search.folds,
        "repeats": repeats,
        "fold_sizes": [np.bincount(f, minlength=search.folds).tolist() for f in splits],
        "fold_scores": {str(lam): v for lam, v in scores.items()},
        "summary": summary_rows(scores),
        "chosen": chosen,
        "seconds": round(time.perf_counter() - started, 2),
        "lanes": lanes,
    }
    if log is not None:
        log(search_table(record))
    return record


def search_table(record: dict[str, Any]) -> str:
    """The table `align` prints: mean ± std over folds per λ, the chosen one marked."""
    splits = record["repeats"]
    repeated = f" ({splits} splits)" if splits > 1 else ""
    lines = [
        f"lambda by {record['folds']}-fold cross-validation on the training pairs{repeated}, "
        f"{record['criterion']}: {record['criterion_means']}",
        f"{'lambda':>8}  {'mean':>8}  {'std':>7}",
    ]
    for row in record["summary"]:
        mark = "  <- chosen" if row["lambda"] == record["chosen"] else ""
        lines.append(f"{row['lambda']:>8g}  {row['mean']:>8.3f}  {row['std']:>7.3f}{mark}")
    return "\n".join(lines)
