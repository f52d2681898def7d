"""The paper's table from one store: {Linear, MLP, CSA} x {Last, Similar, Similar + R_S} per
training-set size, each row an `align` run plus its `evaluate` metrics, then one table.

Nothing here trains or scores by itself: rows are `stages.align.run_align` (CSA through its
`--head csa` dispatch) and `stages.evaluate.evaluate_run`, and the table is
`stages.evaluate.comparison_table` with the method name as the row name.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import pandas as pd

from stages.align import AlignSettings, run_align
from stages.evaluate import comparison_table, evaluate_run, to_markdown
from store import FeatureStore, UserError

HEADS = {"linear": "Linear", "mlp": "MLP", "csa": "CSA"}
VARIANTS = {"last": "Last", "similar": "Similar", "similar-rs": "Similar + R_S"}
TABLE_COLUMNS = [
    "method", "n_pairs", "layers (img/txt)", "lambda",
    "zs top1", "zs top5", "I2T R@1", "T2I R@1",
]  # fmt: skip


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


def parse_n_pairs(text: str | int | Sequence[int]) -> list[int]:
    """`250,500,0` -> [250, 500, 0] (0 = every pair)."""
    items = text if isinstance(text, list | tuple) else str(text).split(",")
    try:
        values = [int(str(v).strip()) for v in items if str(v).strip()]
    except ValueError as err:
        raise UserError(f"--n-pairs must be comma-separated integers, got {text!r}") from err
    if not values or any(v < 0 for v in values):
        raise UserError(f"--n-pairs needs one or more integers >= 0 (0 = all), got {text!r}")
    if len(set(values)) != len(values):
        raise UserError(f"--n-pairs lists a value twice: {text!r}")
    return values


def table_rows(n_pairs: Sequence[int]) -> list[TableRow]:
    return [TableRow(n, h, v) for n in n_pairs for h in HEADS for v in VARIANTS]


def row_settings(
    row: TableRow, base: AlignSettings, lam: float, csa_lambda: float, csa_dim: int
) -> AlignSettings:
    """The align settings of one row: R_S only in the `similar-rs` variant; CSA's own d and λ."""
    rs = row.variant == "similar-rs"
    if row.head == "csa":
        return replace(
            base, head="csa", n_pairs=row.n_pairs, out_dim=csa_dim, lam=csa_lambda if rs else 0.0
        )
    return replace(base, head=row.head, n_pairs=row.n_pairs, lam=lam if rs else 0.0)


def run_table(
    store_path: str | Path,
    dataset: str,
    split: str,
    image_model: str,
    text_model: str,
    layers: dict[str, tuple[str, str]],
    n_pairs: Sequence[int],
    base: AlignSettings,
    lam: float,
    csa_lambda: float,
    csa_dim: int,
    out: str | Path,
    eval_split: str = "test",
    prompts_split: str = "prompts",
    log: Callable[[str], None] = print,
) -> pd.DataFrame:
    """Train and evaluate every row; write RUN/metrics.json per run and out/table.{md,csv}.

    layers: {"last": (image, text), "similar": (image, text)} layer names."""
    out = Path(out)
    rows = table_rows(n_pairs)
    for lam_value, what in ((lam, "--lambda"), (csa_lambda, "--csa-lambda")):
        if lam_value <= 0:
            raise UserError(f"{what} must be > 0: it is the R_S weight of the `+ R_S` rows")
    # every row's settings are checked before the first run, so a bad one fails fast
    settings = [row_settings(r, base, lam, csa_lambda, csa_dim) for r in rows]
    for s in settings:
        s.check()
    store = FeatureStore(store_path)
    started = time.perf_counter()
    run_dirs = []
    for i, (row, s) in enumerate(zip(rows, settings, strict=True), 1):
        run_dir = out / row.folder
        image_layer, text_layer = layers["last" if row.variant == "last" else "similar"]
        t0 = time.perf_counter()
        run_align(
            store_path, dataset, split, image_model, text_model, image_layer, text_layer, s,
            run_dir, progress=False, extra_config={"layers": row.variant, "method": row.method},
        )  # fmt: skip
        metrics = evaluate_run(run_dir, store, dataset, eval_split, prompts_split)
        (run_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        log(
            f"[{i}/{len(rows)}] n_pairs {row.n_pairs or 'all'}  {row.method:<24} "
            f"{_brief(metrics)}  ({time.perf_counter() - t0:.1f} s)"
        )
        run_dirs.append(run_dir)
    table = comparison_table(run_dirs, [r.method for r in rows])
    table = table.rename(columns={"run": "method"})[TABLE_COLUMNS]
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(to_markdown(table))
    (out / "table.csv").write_text(table.to_csv(index=False, float_format="%.4f"))
    log(f"{len(rows)} runs in {time.perf_counter() - started:.0f} s")
    return table


def _brief(metrics: dict[str, Any]) -> str:
    zs, rt = metrics["zero_shot"], metrics["retrieval"]
    parts = []
    if "top1" in zs:
        parts.append(f"zs top1 {zs['top1']:5.1f}")
    if "i2t_r1" in rt:
        parts.append(f"I2T R@1 {rt['i2t_r1']:5.1f}  T2I R@1 {rt['t2i_r1']:5.1f}")
    return "  ".join(parts)
