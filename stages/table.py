"""The paper's table from one store: {Linear, MLP, CSA} x {Last, Similar, Similar + R_S} per
training-set size, each row an `align` run plus its `evaluate` metrics, then one table.

`table` is a preset of `sweep` (stages.sweep): one seed, the nine methods, the runs in
OUT/n{N}/{head}-{variant}/, and table.md / table.csv at the end instead of the sweep's summary.
Same code path: the runs, their settings and their resumption (a row already complete with the
same settings is kept) are the sweep's.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from stages.evaluate import METRICS, comparison_table, eval_column, metrics_protocol, write_table
from stages.pairs import PairSpec
from stages.sweep import (
    TABLE_VARIANTS,
    Preset,
    SweepJob,
    SweepSettings,
    method_display,
    parse_n_pairs,
    run_sweep,
    split_method,
)
from stages.train import AlignSettings, check_finite_settings
from store import UserError

TABLE_HEADS = ("linear", "mlp", "csa")  # the nine rows of the paper's table
TABLE_METHODS = tuple(f"{h}-{v}" for h in TABLE_HEADS for v in TABLE_VARIANTS)
TABLE_COLUMNS = [
    "method",
    "n_pairs",
    "layers (img/txt)",
    "lambda",
    *(eval_column(name).header for name in ("zs_top1", "zs_top5", "i2t_r1", "t2i_r1")),
    "zs protocol",  # which templates / class names the zero-shot numbers come from
]


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

    def sweep(self, seed: int) -> SweepSettings:
        """The sweep this table is: its nine methods per size, one seed, one run at a time."""
        return SweepSettings(
            methods=TABLE_METHODS,
            n_pairs=self.n_pairs,
            seeds=(seed,),
            lam=self.lam,
            csa_lambda=self.csa_lambda,
            csa_dim=self.csa_dim,
            eval_split=self.eval_split,
            prompts_split=self.prompts_split,
            workers=1,
        )


def write_table_files(out: Path, rows: pd.DataFrame, jobs: list[SweepJob]) -> pd.DataFrame:
    """out/table.md and out/table.csv from the runs' metrics; returns the table."""
    names = [method_display(job.method) for job in jobs]
    result = comparison_table([job.run_dir for job in jobs], names)
    result["zs protocol"] = [
        metrics_protocol(json.loads((job.run_dir / METRICS).read_text(encoding="utf-8")))
        for job in jobs
    ]  # read back as comparison_table just did
    result = result.rename(columns={"run": "method"})[TABLE_COLUMNS]
    write_table(result, out / "table.md", out / "table.csv")
    return result


TABLE = Preset(
    run_folder=lambda n, seed, method: f"n{n or 'all'}/{method}",
    run_config=lambda method: {"layers": split_method(method)[1], "method": method_display(method)},
    write=write_table_files,
)


def run_table(
    spec: PairSpec,
    layers: dict[str, tuple[str, str]],
    base: AlignSettings,
    table: TableSettings,
    out: str | Path,
    *,
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Train and evaluate every row not already complete; write RUN/metrics.json per run and
    out/table.{md,csv}; returns the table. layers: {"last": (image, text), "similar": (image,
    text)} layer names; the seed is base's."""
    return run_sweep(spec, layers, base, table.sweep(base.seed), out, log=log, preset=TABLE)
