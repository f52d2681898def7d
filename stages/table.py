"""The paper's table from one store: {Linear, MLP, CSA} x {Last, Similar, Similar + R_S} per
training-set size, each row an `align` run plus its `evaluate` metrics, then one table.

Nothing here trains or scores by itself: rows are `stages.align.run_align` (CSA through its
`TRAINERS` entry) and `stages.evaluate.evaluate_run`, and the table is
`stages.evaluate.comparison_table` with the method name as the row name.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from stages.align import run_align
from stages.evaluate import METRICS, comparison_table, evaluate_run, write_table
from stages.pairs import PairSpec
from stages.train import AlignSettings, check_finite_settings
from store import UserError, write_json_atomic

HEADS = {"linear": "Linear", "mlp": "MLP", "lowrank": "Low-rank", "csa": "CSA"}
TABLE_HEADS = ("linear", "mlp", "csa")  # the nine rows of the paper's table
VARIANTS = {
    "last": "Last",
    "similar": "Similar",
    "similar-rs": "Similar + R_S",
    # sweep only: R_S also on unpaired images and texts (sweep --unpaired-images/-texts)
    "similar-rs-unpaired": "Similar + R_S + unpaired",
}
TABLE_VARIANTS = ("last", "similar", "similar-rs")  # the paper's table
TABLE_COLUMNS = [
    "method",
    "n_pairs",
    "layers (img/txt)",
    "lambda",
    "zs top1",
    "zs top5",
    "I2T R@1",
    "T2I R@1",
]


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


@dataclass(frozen=True)
class TableSettings:
    """What the table adds to the align settings, with the defaults of the `table` command."""

    n_pairs: tuple[int, ...] = (250, 500, 0)  # training-set sizes, one group of rows each
    lam: float = 10.0  # R_S weight of Linear / MLP + Similar + R_S
    csa_lambda: float = 0.3  # R_S weight of CSA + Similar + R_S
    csa_dim: int = 32  # CSA's canonical dimensions d
    eval_split: str = "test"
    prompts_split: str = "prompts"

    def __post_init__(self) -> None:
        parse_n_pairs(self.n_pairs)
        check_finite_settings(self)
        if self.csa_dim < 1:
            raise UserError(f"--csa-dim must be >= 1, got {self.csa_dim}")
        for lam, what in ((self.lam, "--lambda"), (self.csa_lambda, "--csa-lambda")):
            if lam <= 0:
                raise UserError(f"{what} must be > 0: it is the R_S weight of the `+ R_S` rows")


@dataclass(frozen=True)
class TableRow:
    n_pairs: int
    head: str
    variant: str

    @property
    def method(self) -> str:
        return f"{HEADS[self.head]} + {VARIANTS[self.variant]}"

    @property
    def folder(self) -> str:
        return f"n{self.n_pairs or 'all'}/{self.head}-{self.variant}"


def table_rows(n_pairs: Sequence[int]) -> list[TableRow]:
    return [TableRow(n, h, v) for n in n_pairs for h in TABLE_HEADS for v in TABLE_VARIANTS]


def row_settings(row: TableRow, base: AlignSettings, table: TableSettings) -> AlignSettings:
    """The align settings of one row: R_S only in the `similar-rs` variant; CSA's own d and λ."""
    rs = row.variant.startswith("similar-rs")
    if row.head == "csa":
        lam = table.csa_lambda if rs else 0.0
        return replace(base, head="csa", n_pairs=row.n_pairs, out_dim=table.csa_dim, lam=lam)
    return replace(base, head=row.head, n_pairs=row.n_pairs, lam=table.lam if rs else 0.0)


def align_and_evaluate(
    spec: PairSpec,
    layers: tuple[str, str],
    settings: AlignSettings,
    run_dir: Path,
    eval_splits: tuple[str, str],
    extra_config: dict[str, Any],
    **align_options: Any,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """One row: an align run in run_dir (run_align's `align_options`: unpaired, extra pairs),
    evaluated on (eval split, prompts split) of the same dataset, its metrics.json written;
    returns (config, metrics)."""
    config, _ = run_align(
        spec,
        layers,
        settings,
        run_dir,
        progress=False,
        extra_config=extra_config,
        **align_options,
    )
    metrics = evaluate_run(run_dir, spec.store, spec.dataset, *eval_splits)
    write_json_atomic(run_dir / METRICS, metrics)
    return config, metrics


def run_table(
    spec: PairSpec,
    layers: dict[str, tuple[str, str]],
    base: AlignSettings,
    table: TableSettings,
    out: str | Path,
    *,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Train and evaluate every row; write RUN/metrics.json per run and out/table.{md,csv}.

    layers: {"last": (image, text), "similar": (image, text)} layer names."""
    out = Path(out)
    rows = table_rows(table.n_pairs)
    # every row's settings are built (and so checked) before the first run: a bad one fails fast
    settings = [row_settings(r, base, table) for r in rows]
    started = time.perf_counter()
    run_dirs = []
    for i, (row, s) in enumerate(zip(rows, settings, strict=True), 1):
        run_dir = out / row.folder
        t0 = time.perf_counter()
        _, metrics = align_and_evaluate(
            spec,
            layers["last" if row.variant == "last" else "similar"],
            s,
            run_dir,
            (table.eval_split, table.prompts_split),
            {"layers": row.variant, "method": row.method},
        )
        log(
            f"[{i}/{len(rows)}] n_pairs {row.n_pairs or 'all'}  {row.method:<24} "
            f"{_brief(metrics)}  ({time.perf_counter() - t0:.1f} s)"
        )
        run_dirs.append(run_dir)
    result = comparison_table(run_dirs, [r.method for r in rows])
    result = result.rename(columns={"run": "method"})[TABLE_COLUMNS]
    write_table(result, out / "table.md", out / "table.csv")
    log(f"{len(rows)} runs in {time.perf_counter() - started:.0f} s")
    return result


def _brief(metrics: dict[str, Any]) -> str:
    zs, rt = metrics["zero_shot"], metrics["retrieval"]
    parts = []
    if "top1" in zs:
        parts.append(f"zs top1 {zs['top1']:5.1f}")
    if "i2t_r1" in rt:
        parts.append(f"I2T R@1 {rt['i2t_r1']:5.1f}  T2I R@1 {rt['t2i_r1']:5.1f}")
    return "  ".join(parts)
