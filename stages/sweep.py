"""The paper's data-scaling curves: {methods} x {n_pairs} x {seeds} from one store, with error bars.

Every run is `stages.align.run_align` + `stages.evaluate.evaluate_run`, exactly as `table` runs a
row. The pairs of (n_pairs, seed) are `stages.pairs.split_pairs`'s seeded draw, the one `align
--n-pairs N --seed S` trains on: the same for every method (a paired comparison), and, for one
seed, the first N of one permutation, so bigger subsets contain the smaller ones.

Writes sweep.csv (one row per run, every metric), summary.md (mean ± sample std over seeds)
and scaling.png (zero-shot top-1 and retrieval R@1 against the pairs, log x, one line per
method, shaded ± std). Runs go in parallel through a process pool, or a dask cluster.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from stages.align import UNPAIRED_HEADS
from stages.cluster import check_scheduler
from stages.pairs import PairSpec
from stages.table import (
    HEADS,
    TABLE_VARIANTS,
    VARIANTS,
    TableRow,
    TableSettings,
    align_and_evaluate,
    parse_ints,
    parse_n_pairs,
    row_settings,
)
from stages.train import AlignSettings
from store import UserError, write_text_atomic

# sweep.csv's metric columns: (metrics.json section, key) -> column
METRIC_COLUMNS = {
    ("zero_shot", "top1"): "zs_top1",
    ("zero_shot", "top5"): "zs_top5",
    **{("retrieval", f"{d}_r{k}"): f"{d}_r{k}" for d in ("i2t", "t2i") for k in (1, 5, 10)},
}
# what scaling.png plots: column -> panel title (a panel only when the column has values)
PLOTTED = {
    "zs_top1": "zero-shot top-1 (%)",
    "i2t_r1": "image→text R@1 (%)",
    "t2i_r1": "text→image R@1 (%)",
}
SUMMARY_COLUMNS = ["zs_top1", "zs_top5", "i2t_r1", "t2i_r1", "seconds"]


def parse_methods(text: str | Sequence[str]) -> tuple[str, ...]:
    """`linear-last,csa-similar-rs` -> the method names HEAD-VARIANT, each checked."""
    items = text if isinstance(text, list | tuple) else str(text).split(",")
    methods = tuple(str(m).strip() for m in items if str(m).strip())
    known = [
        f"{h}-{v}" for h in HEADS for v in VARIANTS if h in UNPAIRED_HEADS or "unpaired" not in v
    ]
    bad = [m for m in methods if m not in known]
    if not methods or bad:
        raise UserError(f"unknown method(s) {bad or text!r}; choose from {', '.join(known)}")
    if len(set(methods)) != len(methods):
        raise UserError(f"--methods lists a method twice: {text!r}")
    return methods


def method_row(method: str, n_pairs: int) -> TableRow:
    head, variant = next((h, method[len(h) + 1 :]) for h in HEADS if method.startswith(h + "-"))
    return TableRow(n_pairs, head, variant)


@dataclass(frozen=True)
class SweepSettings:
    """What the sweep adds to the align settings, with the defaults of the `sweep` command."""

    methods: tuple[str, ...] = tuple(f"{h}-{v}" for h in HEADS for v in TABLE_VARIANTS)
    n_pairs: tuple[int, ...] = (100, 250, 1000, 0)
    seeds: tuple[int, ...] = (0, 1, 2)
    lam: float = 10.0  # R_S weight of the gradient-trained + R_S rows
    csa_lambda: float = 0.3  # R_S weight of CSA + Similar + R_S
    csa_dim: int = 32
    eval_split: str = "test"
    prompts_split: str = "prompts"
    # DATASET/SPLIT of unpaired images and texts for the `*-similar-rs-unpaired` methods
    unpaired_images: str = ""
    unpaired_texts: str = ""
    workers: int = 1  # parallel runs in a process pool (ignored with a dask scheduler)
    scheduler: str = ""  # a dask scheduler address or local:N; empty = the process pool

    def __post_init__(self) -> None:
        parse_methods(self.methods)
        parse_n_pairs(self.n_pairs)
        parse_ints(self.seeds, "--seeds")
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
        self.table()  # checks lambda and csa_lambda

    def table(self) -> TableSettings:
        return TableSettings(
            n_pairs=self.n_pairs,
            lam=self.lam,
            csa_lambda=self.csa_lambda,
            csa_dim=self.csa_dim,
            eval_split=self.eval_split,
            prompts_split=self.prompts_split,
        )


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


def sweep_jobs(
    spec: PairSpec,
    layers: dict[str, tuple[str, str]],
    base: AlignSettings,
    sweep: SweepSettings,
    out: Path,
) -> list[SweepJob]:
    """Every (n_pairs, seed, method) run, settings built (and so checked) before any runs."""
    table = sweep.table()
    threads = 1 if sweep.workers > 1 or sweep.scheduler else 0
    jobs = []
    for n in sweep.n_pairs:
        for seed in sweep.seeds:
            for method in sweep.methods:
                row = method_row(method, n)
                settings = row_settings(row, base, table)
                jobs.append(
                    SweepJob(
                        spec=spec,
                        layers=layers["last" if row.variant == "last" else "similar"],
                        settings=AlignSettings(**{**settings.__dict__, "seed": seed}),
                        run_dir=out / "runs" / f"n{n or 'all'}" / f"seed{seed}" / method,
                        method=method,
                        eval_split=sweep.eval_split,
                        prompts_split=sweep.prompts_split,
                        unpaired=(
                            (sweep.unpaired_images or None, sweep.unpaired_texts or None)
                            if row.variant.endswith("-unpaired")
                            else (None, None)
                        ),
                        threads=threads,
                    )
                )
    return jobs


def run_job(job: SweepJob) -> dict[str, Any]:
    """Train and evaluate one run (in a worker process or here); its sweep.csv row."""
    if job.threads:
        import torch

        torch.set_num_threads(job.threads)  # parallel runs share the cores, one thread each
    started = time.perf_counter()
    config, metrics = align_and_evaluate(
        job.spec,
        job.layers,
        job.settings,
        job.run_dir,
        (job.eval_split, job.prompts_split),
        {"method": job.method},
        unpaired=job.unpaired,
    )
    row: dict[str, Any] = {
        "method": job.method,
        "n_pairs": job.settings.n_pairs,
        "seed": job.settings.seed,
        "pairs_used": config["n_pairs"],
        "pairs_digest": config["pairs_digest"],
        "n_train": config["n_train"],
        "n_val": config["n_val"],
        "lambda": job.settings.lam,
        "image_layer": config["image_layer"],
        "text_layer": config["text_layer"],
        "epochs_run": config["epochs_run"],
        "best_epoch": config["best_epoch"],
        "train_seconds": config["train_seconds"],
        "seconds": round(time.perf_counter() - started, 2),
    }
    for (section, key), column in METRIC_COLUMNS.items():
        row[column] = (metrics.get(section) or {}).get(key, math.nan)
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
    return (
        f"n_pairs {row['n_pairs'] or 'all'} seed {row['seed']} {row['method']:<22} "
        f"zs top1 {row['zs_top1']:5.1f}  I2T R@1 {row['i2t_r1']:5.1f}  ({row['seconds']:.1f} s)"
    )


def summarise(rows: pd.DataFrame) -> pd.DataFrame:
    """Per (method, n_pairs): the seeds, pairs used and the mean and sample std (ddof 1; NaN
    for one seed) of each SUMMARY_COLUMNS column, in the order of first appearance."""
    groups = rows.groupby(["method", "n_pairs"], sort=False)
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

    header = ["method", "n_pairs", "pairs used", "seeds", *SUMMARY_COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in summary.to_dict("records"):
        cells = [r["method"], str(r["n_pairs"] or "all"), str(r["pairs_used"]), str(r["seeds"])]
        cells += [cell(r[f"{c}_mean"], r[f"{c}_std"]) for c in SUMMARY_COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot_scaling(summary: pd.DataFrame, path: Path) -> None:
    """scaling.png: a panel per PLOTTED metric that has values; x = pairs used (log), a line per
    method with the band mean ± std over seeds."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [c for c in PLOTTED if summary[f"{c}_mean"].notna().any()]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4), squeeze=False)
    for ax, column in zip(axes[0], panels, strict=True):
        for method, group in summary.groupby("method", sort=False):
            group = group.sort_values("pairs_used")
            x, mean = group["pairs_used"], group[f"{column}_mean"]
            std = group[f"{column}_std"].fillna(0.0)
            line = ax.plot(x, mean, marker="o", label=method)[0]
            ax.fill_between(x, mean - std, mean + std, color=line.get_color(), alpha=0.2)
        ax.set_xscale("log")
        ax.set(xlabel="training pairs", ylabel=PLOTTED[column], title=PLOTTED[column])
        ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def run_sweep(
    spec: PairSpec,
    layers: dict[str, tuple[str, str]],
    base: AlignSettings,
    sweep: SweepSettings,
    out: str | Path,
    *,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Train and evaluate every run; write out/sweep.csv, out/summary.md, out/scaling.png and
    out/runs/n*/seed*/METHOD/. Returns the summary."""
    out = Path(out)
    jobs = sweep_jobs(spec, layers, base, sweep, out)
    started = time.perf_counter()
    rows = pd.DataFrame(run_jobs(jobs, sweep, log))
    summary = summarise(rows)
    out.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out / "sweep.csv", rows.to_csv(index=False, float_format="%.4f"))
    write_text_atomic(out / "summary.md", summary_markdown(summary))
    plot_scaling(summary, out / "scaling.png")
    log(f"{len(jobs)} runs in {time.perf_counter() - started:.0f} s")
    return summary
