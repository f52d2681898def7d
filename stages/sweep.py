"""The paper's data-scaling curves: {methods} x {n_pairs} x {seeds} from one store, with error bars;
and the engine of `table`, which is a preset of this (one seed, the paper's nine methods).

Every run is `stages.align.run_align` + `stages.evaluate.evaluate_run`. The pairs of (n_pairs,
seed) are `stages.pairs.split_pairs`'s seeded draw, the one `align --n-pairs N --seed S` trains
on: the same for every method (a paired comparison), and, for one seed, the first N of one
permutation, so bigger subsets contain the smaller ones. A method is HEAD-VARIANT: any
registered head kind (stages.heads) and one of VARIANTS.

A run already complete with the same settings (its run directory valid, its metrics.json
written, and the digest of its job recorded in config.json equal) is not run again: an
interrupted sweep or table resumes where it stopped.

Writes sweep.csv (one row per run, every metric), summary.md (mean ± sample std over seeds)
and scaling.png (zero-shot top-1 and retrieval R@1 against the pairs, log x, one line per
method, shaded ± std). Runs go in parallel through a process pool, or a dask cluster.
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import pandas as pd

from stages.align import run_align
from stages.cluster import check_scheduler
from stages.evaluate import (
    EVAL_COLUMNS,
    METRICS,
    eval_column,
    evaluate_run,
    metrics_protocol,
    prompts_record,
)
from stages.heads import head_kind, head_kinds, read_run
from stages.lambda_cv import LambdaSearch, parse_grid
from stages.pairs import PairSpec
from stages.train import AlignSettings, check_finite_settings
from store import FeatureStore, UserError, write_json_atomic, write_text_atomic

VARIANTS = {
    "last": "Last",
    "similar": "Similar",
    "similar-rs": "Similar + R_S",
    # R_S also on unpaired images and texts (sweep --unpaired-images/-texts)
    "similar-rs-unpaired": "Similar + R_S + unpaired",
    # λ chosen per run by cross-validation on its training pairs (align --lambda auto)
    "similar-rs-auto": "Similar + R_S (λ auto)",
}
TABLE_VARIANTS = ("last", "similar", "similar-rs")  # the paper's table
DEFAULT_HEADS = ("linear", "mlp", "lowrank", "csa")  # the built-in kinds: the default methods
# what scaling.png plots: column -> panel title (a panel only when the column has values)
PLOTTED = {name: eval_column(name).title for name in ("zs_top1", "i2t_r1", "t2i_r1")}
SUMMARY_COLUMNS = ["zs_top1", "zs_top5", "i2t_r1", "t2i_r1", "seconds"]


# -- methods: HEAD-VARIANT -----------------------------------------------------------------------
def parse_ints(text: str | int | Sequence[int], what: str = "--n-pairs") -> tuple[int, ...]:
    """`250,500,0` -> (250, 500, 0): distinct integers >= 0 (for --n-pairs, 0 = every pair)."""
    items = text if isinstance(text, list | tuple) else str(text).split(",")
    try:
        values = tuple(int(str(v).strip()) for v in items if str(v).strip())
    except ValueError as err:
        raise UserError(f"{what} must be comma-separated integers, got {text!r}") from err
    if not values or any(v < 0 for v in values):
        raise UserError(f"{what} needs one or more integers >= 0, got {text!r}")
    if len(set(values)) != len(values):
        raise UserError(f"{what} lists a value twice: {text!r}")
    return values


def parse_n_pairs(text: str | int | Sequence[int]) -> tuple[int, ...]:
    return parse_ints(text, "--n-pairs")


def known_methods() -> list[str]:
    """Every HEAD-VARIANT of the registered heads (the unpaired variant: gradient-trained)."""
    return [
        f"{name}-{variant}"
        for name, kind in head_kinds().items()
        for variant in VARIANTS
        if kind.gradient_trained or "unpaired" not in variant
    ]


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """`linear-last,csa-similar-rs` -> the method names HEAD-VARIANT, each checked."""
    items = text if isinstance(text, list | tuple) else str(text).split(",")
    methods = tuple(str(m).strip() for m in items if str(m).strip())
    known = known_methods()
    bad = [m for m in methods if m not in known]
    if not methods or bad:
        raise UserError(f"unknown method(s) {bad or text!r}; choose from {', '.join(known)}")
    if len(set(methods)) != len(methods):
        raise UserError(f"--methods lists a method twice: {text!r}")
    return methods


def split_method(method: str) -> tuple[str, str]:
    """HEAD-VARIANT -> (head, variant); the variant is one of VARIANTS (heads may hold `-`)."""
    for variant in sorted(VARIANTS, key=len, reverse=True):
        if method.endswith("-" + variant):
            return method[: -len(variant) - 1], variant
    raise UserError(f"unknown method {method!r}; choose from {', '.join(known_methods())}")


def method_display(method: str) -> str:
    """`linear-similar-rs` -> `Linear + Similar + R_S` (the head's registered display name)."""
    head, variant = split_method(method)
    return f"{head_kind(head).display} + {VARIANTS[variant]}"


@dataclass(frozen=True)
class SweepSettings:
    """What the sweep adds to the align settings, with the defaults of the `sweep` command."""

    methods: tuple[str, ...] = tuple(f"{h}-{v}" for h in DEFAULT_HEADS for v in TABLE_VARIANTS)
    n_pairs: tuple[int, ...] = (100, 250, 1000, 0)
    seeds: tuple[int, ...] = (0, 1, 2)
    lam: float = 10.0  # R_S weight of the gradient-trained + R_S rows
    csa_lambda: float = 0.3  # R_S weight of CSA + Similar + R_S
    lambdas: tuple[float, ...] = ()  # the `-rs` methods once per λ of these (all heads)
    # the `-rs-auto` methods: the search (empty grids: stages.lambda_cv's defaults per head)
    lambda_grid: tuple[float, ...] = ()
    csa_lambda_grid: tuple[float, ...] = ()
    cv_folds: int = 5
    cv_repeats: str = "auto"  # K-fold splits, or auto (stages.lambda_cv.cv_repeats)
    lambda_criterion: str = "retrieval"
    csa_dim: int = 32
    eval_split: str = "test"
    prompts_split: str = "prompts"
    # DATASET/SPLIT of unpaired images and texts for the `*-similar-rs-unpaired` methods
    unpaired_images: str = ""
    unpaired_texts: str = ""
    allow_overlap: bool = False  # unpaired rows from the evaluation or training split
    workers: int = 1  # parallel runs in a process pool (ignored with a dask scheduler)
    scheduler: str = ""  # a dask scheduler address or local:N; empty = the process pool

    def __post_init__(self) -> None:
        parse_methods(self.methods)
        parse_n_pairs(self.n_pairs)
        parse_ints(self.seeds, "--seeds")
        check_finite_settings(self)
        if self.scheduler:
            check_scheduler(self.scheduler)
        wants = any(m.endswith("-unpaired") for m in self.methods)
        if wants != bool(self.unpaired_images or self.unpaired_texts):
            raise UserError(
                "the *-similar-rs-unpaired methods and --unpaired-images/--unpaired-texts go "
                "together: give both or neither"
            )
        if self.workers < 1:
            raise UserError(f"--workers must be >= 1, got {self.workers}")
        if self.csa_dim < 1:
            raise UserError(f"--csa-dim must be >= 1, got {self.csa_dim}")
        for lam, what in ((self.lam, "--lambda"), (self.csa_lambda, "--csa-lambda")):
            if lam <= 0:
                raise UserError(f"{what} must be > 0: it is the R_S weight of the `+ R_S` rows")
        if self.lambdas:
            object.__setattr__(self, "lambdas", parse_grid(self.lambdas, "--lambdas"))
        for head in ("linear", "csa"):
            self.search(head)  # checks the grids, folds and criterion

    def search(self, head: str) -> LambdaSearch:
        """The λ search of the `-rs-auto` methods of `head`."""
        grid = self.csa_lambda_grid if head == "csa" else self.lambda_grid
        return LambdaSearch(tuple(grid), self.cv_folds, self.lambda_criterion, self.cv_repeats)

    def rs_lambdas(self, method: str) -> tuple[float | None, ...]:
        """The λ of each run of `method` at one (n_pairs, seed): (None,) for the methods with
        no R_S or λ auto, else --lambdas or the head's one value."""
        head, variant = split_method(method)
        if not variant.startswith("similar-rs") or variant.endswith("-auto"):
            return (None,)
        return self.lambdas or ((self.csa_lambda if head == "csa" else self.lam),)


def method_settings(
    method: str, n_pairs: int, base: AlignSettings, sweep: SweepSettings, lam: float | None = None
):
    """The align settings of one method: R_S only in the `similar-rs*` variants (at `lam` when
    given, else the head's sweep value); CSA's own d and lambda."""
    head, variant = split_method(method)
    rs = variant.startswith("similar-rs")
    if head == "csa":
        lam = (sweep.csa_lambda if lam is None else lam) if rs else 0.0
        return replace(base, head="csa", n_pairs=n_pairs, out_dim=sweep.csa_dim, lam=lam)
    lam = (sweep.lam if lam is None else lam) if rs else 0.0
    return replace(base, head=head, n_pairs=n_pairs, lam=lam)


# -- presets: where the runs go and what is written at the end ------------------------------------
@dataclass(frozen=True)
class Preset:
    """What makes `sweep` and `table` differ: the run folders, what each run's config.json adds,
    and the outputs written from the rows (returning what the command prints)."""

    run_folder: Callable[[int, int, str], str]  # (n_pairs, seed, method) -> folder under out
    run_config: Callable[[str], dict[str, Any]]  # method -> extra config.json keys
    write: Callable[[Path, pd.DataFrame, list[SweepJob]], pd.DataFrame]


@dataclass(frozen=True)
class SweepJob:
    """One run of the sweep: everything a worker process needs (picklable)."""

    spec: PairSpec
    layers: tuple[str, str]
    settings: AlignSettings
    run_dir: Path
    method: str
    eval_split: str
    prompts_split: str
    unpaired: tuple[str | None, str | None] = (None, None)
    threads: int = 0  # torch threads in a worker process (0: leave as is)
    extra_config: dict[str, Any] = field(default_factory=dict)
    allow_overlap: bool = False
    lambda_search: LambdaSearch | None = None  # the `-rs-auto` methods

    @property
    def digest(self) -> str:
        """What makes two jobs the same run: data, layers, settings, extra data, evaluation."""
        what = {
            "spec": {k: str(v) for k, v in asdict(self.spec).items()},
            "layers": list(self.layers),
            "settings": asdict(self.settings),
            "unpaired": list(self.unpaired),
            "allow_overlap": self.allow_overlap,
            "eval": [self.eval_split, self.prompts_split],
            "config": self.extra_config,
        }
        if self.lambda_search is not None:  # absent otherwise: older sweeps still resume
            what["lambda_search"] = asdict(self.lambda_search)
        text = json.dumps(what, sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def sweep_jobs(
    spec: PairSpec,
    layers: dict[str, tuple[str, str]],
    base: AlignSettings,
    sweep: SweepSettings,
    out: Path,
    preset: Preset | None = None,
) -> list[SweepJob]:
    """Every (n_pairs, seed, method) run, settings built (and so checked) before any runs."""
    preset = preset or SWEEP
    threads = 1 if sweep.workers > 1 or sweep.scheduler else 0
    jobs = []
    runs = [(method, lam) for method in sweep.methods for lam in sweep.rs_lambdas(method)]
    for n in sweep.n_pairs:
        for seed in sweep.seeds:
            for method, lam in runs:
                settings = method_settings(method, n, base, sweep, lam)
                head, variant = split_method(method)
                folder = preset.run_folder(n, seed, method)
                jobs.append(
                    SweepJob(
                        spec=spec,
                        layers=layers["last" if variant == "last" else "similar"],
                        settings=replace(settings, seed=seed),
                        # with --lambdas, one folder per λ under the method's
                        run_dir=out / folder / f"lambda{lam:g}"
                        if sweep.lambdas and lam is not None
                        else out / folder,
                        method=method,
                        eval_split=sweep.eval_split,
                        prompts_split=sweep.prompts_split,
                        unpaired=(
                            (sweep.unpaired_images or None, sweep.unpaired_texts or None)
                            if variant.endswith("-unpaired")
                            else (None, None)
                        ),
                        threads=threads,
                        extra_config=preset.run_config(method),
                        allow_overlap=sweep.allow_overlap,
                        lambda_search=sweep.search(head) if variant.endswith("-auto") else None,
                    )
                )
    return jobs


def completed(job: SweepJob) -> tuple[dict[str, Any], dict[str, Any]] | None:
    """(config, metrics) of the job's run when it is complete with the same settings: a valid
    run directory whose config.json records this job's digest, and its metrics.json."""
    try:
        config = read_run(job.run_dir)
        metrics = json.loads((job.run_dir / METRICS).read_text(encoding="utf-8"))
    except (UserError, OSError, ValueError):
        return None
    if config.get("sweep_job") != job.digest or not isinstance(metrics, dict):
        return None
    return config, metrics


def stale_prompts(job: SweepJob, metrics: dict[str, Any]) -> bool:
    """Whether a complete run's zero-shot numbers came from other prompts than the store now
    holds (its heads stay valid: only the evaluation is redone)."""
    zero_shot = metrics.get("zero_shot")
    if not isinstance(zero_shot, dict) or "skipped" in zero_shot:
        return False
    store = FeatureStore(job.spec.store)
    now = prompts_record(store, job.spec.dataset, job.prompts_split, job.spec.text_model)
    return zero_shot.get("prompts") != now


def run_job(job: SweepJob) -> dict[str, Any]:
    """Train and evaluate one run (in a worker process or here), or take it as it is when it is
    complete with the same settings; its sweep.csv row (`resumed`: taken as it was)."""
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)  # parallel runs share the cores, one thread each
    started = time.perf_counter()
    done = completed(job)
    if done is None:
        config, _ = run_align(
            job.spec,
            job.layers,
            job.settings,
            job.run_dir,
            progress=False,
            extra_config={**job.extra_config, "sweep_job": job.digest},
            unpaired=job.unpaired,
            eval_split=job.eval_split,
            allow_overlap=job.allow_overlap,
            lambda_search=job.lambda_search,
            prompts_split=job.prompts_split,
        )
        metrics = evaluate_run(
            job.run_dir, job.spec.store, job.spec.dataset, job.eval_split, job.prompts_split
        )
        write_json_atomic(job.run_dir / METRICS, metrics)
    else:
        config, metrics = done
        if stale_prompts(job, metrics):  # prompts extracted again, with other templates/names
            metrics = evaluate_run(
                job.run_dir, job.spec.store, job.spec.dataset, job.eval_split, job.prompts_split
            )
            write_json_atomic(job.run_dir / METRICS, metrics)
    row: dict[str, Any] = {
        "method": job.method,
        "n_pairs": job.settings.n_pairs,
        "seed": job.settings.seed,
        "pairs_used": config["n_pairs"],
        "pairs_digest": config["pairs_digest"],
        "n_train": config["n_train"],
        "n_val": config["n_val"],
        "lambda": config["lambda"],  # with λ auto: the chosen one
        # what set λ: its value, or auto (summaries group by it)
        "lambda_setting": "auto" if job.lambda_search else f"{job.settings.lam:g}",
        "image_layer": config["image_layer"],
        "text_layer": config["text_layer"],
        "epochs_run": config["epochs_run"],
        "best_epoch": config["best_epoch"],
        "train_seconds": config["train_seconds"],
        # a resumed run: its training time (its evaluation was not timed)
        "seconds": round(time.perf_counter() - started, 2)
        if done is None
        else config["train_seconds"],
    }
    for column in EVAL_COLUMNS:  # sweep.csv: every evaluation metric, by its machine name
        row[column.name] = column.read(metrics)
    row["zs_protocol"] = metrics_protocol(metrics)  # which templates and class names
    row["resumed"] = done is not None
    return row


def run_jobs(jobs: list[SweepJob], sweep: SweepSettings, log: Callable[[str], None]) -> list[dict]:
    """Every job's row, in the jobs' order: on a dask cluster, in a process pool, or here."""
    if sweep.scheduler:
        from stages.cluster import connect

        with connect(sweep.scheduler) as client:
            return client.gather(client.map(run_job, jobs, pure=False))
    if sweep.workers == 1:
        rows = []
        for i, job in enumerate(jobs, 1):
            rows.append(run_job(job))
            log(f"[{i}/{len(jobs)}] {_brief(rows[-1])}")
        return rows
    import multiprocessing

    # spawn: a forked torch process can deadlock on the parent's thread pools
    context = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(sweep.workers, mp_context=context) as pool:
        rows = []
        for i, row in enumerate(pool.map(run_job, jobs), 1):
            rows.append(row)
            log(f"[{i}/{len(jobs)}] {_brief(row)}")
        return rows


def _brief(row: dict[str, Any]) -> str:
    done = "  (complete before: kept)" if row.get("resumed") else f"  ({row['seconds']:.1f} s)"
    return (
        f"n_pairs {row['n_pairs'] or 'all'} seed {row['seed']} {row['method']:<22} "
        f"zs top1 {row['zs_top1']:5.1f}  I2T R@1 {row['i2t_r1']:5.1f}{done}"
    )


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (method, n_pairs), and per λ setting when the rows record one (`lambda_setting`:
    sweep --lambdas, the `-rs-auto` methods): the seeds, pairs used and the mean and sample std
    (ddof 1; NaN for one seed) of each SUMMARY_COLUMNS column, in the order of first
    appearance."""
    has_setting = "lambda_setting" in rows
    keys = ["method", "lambda_setting", "n_pairs"] if has_setting else ["method", "n_pairs"]
    groups = rows.groupby(keys, sort=False)
    stats = groups[SUMMARY_COLUMNS].agg(["mean", "std"])
    stats.columns = [f"{col}_{stat}" for col, stat in stats.columns]
    stats.insert(0, "seeds", groups["seed"].count())
    stats.insert(1, "pairs_used", groups["pairs_used"].first())
    return stats.reset_index()


def summary_markdown(summary: pd.DataFrame) -> str:
    """summary.md: one line per (method, n_pairs), cells `mean ± std` to one decimal."""

    def cell(mean: float, std: float) -> str:
        if math.isnan(mean):
            return ""
        return f"{mean:.1f}" if math.isnan(std) else f"{mean:.1f} ± {std:.1f}"

    lam = ["λ"] if "lambda_setting" in summary else []
    header = ["method", *lam, "n_pairs", "pairs used", "seeds", *SUMMARY_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in summary.to_dict("records"):
        cells = [r["method"], *([r["lambda_setting"]] if lam else [])]
        cells += [str(r["n_pairs"] or "all"), str(r["pairs_used"]), str(r["seeds"])]
        cells += [cell(r[f"{c}_mean"], r[f"{c}_std"]) for c in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_bands(
    frame: pd.DataFrame,
    path: Path,
    lines: list[tuple[str, pd.DataFrame]],
    x: str,
    xlabel: str,
    **xscale: Any,
) -> None:
    """A panel per PLOTTED metric that has values in `frame`; each (label, rows) of `lines` a
    line against column `x` with the band mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [c for c in PLOTTED if frame[f"{c}_mean"].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, column in zip(axes[0], panels, strict=True):
        for label, group in lines:
            group = group.sort_values(x)
            mean, std = group[f"{column}_mean"], group[f"{column}_std"].fillna(0.0)
            line = ax.plot(group[x], mean, marker="o", label=label)[0]
            ax.fill_between(group[x], mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_xscale(**xscale)
        ax.set(xlabel=xlabel, ylabel=PLOTTED[column], title=PLOTTED[column])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def plot_scaling(summary: pd.DataFrame, path: Path) -> None:
    """scaling.png: x = pairs used (log), a line per method (per method and λ with --lambdas)."""
    by = ["method", "lambda_setting"] if lambda_settings(summary) > 1 else ["method"]
    lines = [
        (key[0] if len(by) == 1 else f"{key[0]} (λ {key[1]})", group)
        for key, group in summary.groupby(by, sort=False)
    ]
    plot_bands(summary, path, lines, "pairs_used", "training pairs", value="log")


def lambda_settings(summary: pd.DataFrame) -> int:
    """The most λ settings any one method has in the summary (1 without --lambdas)."""
    if "lambda_setting" not in summary:
        return 1
    return int(summary.groupby("method")["lambda_setting"].nunique().max())


def plot_lambda(summary: pd.DataFrame, path: Path) -> None:
    """lambda.png (sweep --lambdas): x = λ (symmetric log: 0 shows), a line per (method,
    n_pairs) of the methods run at several λ."""
    fixed = summary[summary["lambda_setting"] != "auto"].copy()
    fixed["lam"] = fixed["lambda_setting"].astype(float)
    fixed = fixed[fixed.groupby("method")["lam"].transform("nunique") > 1]
    lines = [
        (f"{method}, {n or 'all'} pairs", group)
        for (method, n), group in fixed.groupby(["method", "n_pairs"], sort=False)
    ]
    plot_bands(fixed, path, lines, "lam", "λ (weight of R_S)", value="symlog", linthresh=1.0)


def write_sweep(out: Path, rows: pd.DataFrame, jobs: list[SweepJob]) -> pd.DataFrame:
    """out/sweep.csv, out/summary.md, out/scaling.png, and with methods run at several λ
    (--lambdas) out/lambda.png; returns the summary."""
    summary = summarise(rows)
    rows = rows.drop(columns="resumed")
    write_text_atomic(out / "sweep.csv", rows.to_csv(index=False, float_format="%.4f"))
    protocols = ", ".join(sorted(set(rows["zs_protocol"]) - {""})) or "none"
    note = f"\nZero-shot prompts (templates/class names): {protocols}.\n"
    write_text_atomic(out / "summary.md", summary_markdown(summary) + note)
    plot_scaling(summary, out / "scaling.png")
    if lambda_settings(summary) > 1:
        plot_lambda(summary, out / "lambda.png")
    return summary


SWEEP = Preset(
    run_folder=lambda n, seed, method: f"runs/n{n or 'all'}/seed{seed}/{method}",
    run_config=lambda method: {"method": method},
    write=write_sweep,
)


def run_sweep(
    spec: PairSpec,
    layers: dict[str, tuple[str, str]],
    base: AlignSettings,
    sweep: SweepSettings,
    out: str | Path,
    *,
    log: Callable[[str], None] = print,
    preset: Preset | None = None,
) -> pd.DataFrame:
    """Train and evaluate every run not already complete with the same settings, then write
    the preset's outputs (the sweep's: out/sweep.csv, out/summary.md, out/scaling.png, runs in
    out/runs/n*/seed*/METHOD/). Returns what the preset's writer returns (the summary)."""
    preset = preset or SWEEP
    out = Path(out)
    jobs = sweep_jobs(spec, layers, base, sweep, out, preset)
    started = time.perf_counter()
    rows = pd.DataFrame(run_jobs(jobs, sweep, log))
    out.mkdir(parents=True, exist_ok=True)
    result = preset.write(out, rows, jobs)
    kept = int(rows["resumed"].sum())
    also = f" ({kept} complete before, kept)" if kept else ""
    log(f"{len(jobs)} runs{also} in {time.perf_counter() - started:.0f} s")
    return result
