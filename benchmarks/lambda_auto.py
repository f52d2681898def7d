"""`align --lambda auto` against every fixed λ of its grid, measured on the test split.

    python -m benchmarks.lambda_auto --store /work/real/features.zarr \\
        --image-model dinov2-small --text-model minilm \\
        --layers block.6,embeddings --layers block.0,embeddings \\
        --n-pairs 100,1000 --seeds 0,1,2 --out lambda_auto.csv

Per (layers, n_pairs, seed): one run per λ of the grid (the training settings of params.yaml's
`align` section, evaluated on the test split), and the K-fold search on the training pairs alone
under both criteria (retrieval and zeroshot score the same fold runs), as align runs it: each
fold's grid stacked in one loop, the folds side by side (stages.threads.fold_lanes), on as many
K-fold splits as align draws (--cv-repeats, auto by default); the λ the first split alone would
choose is reported beside. `align
--lambda auto`'s final run is the fixed run at the chosen λ (same seed, same weights:
tests/test_lambda.py), so its test metrics are that run's. Prints, per configuration, the chosen λ,
its test metrics, those of the best fixed λ and of λ = 0, and the cost: (search + final run) / one
run at the default λ, all timed in this process. With --cost-only: whole `align` runs, `--lambda
auto` against `--lambda 10`, alternated, and the ratio of the medians."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (select.py shadows)

import argparse  # noqa: E402
import statistics  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import pandas as pd  # noqa: E402
import yaml  # noqa: E402

from pipeline.config import default_map, settings_from  # noqa: E402
from stages.align import run_align, zeroshot_data  # noqa: E402
from stages.evaluate import evaluate_run  # noqa: E402
from stages.lambda_cv import (  # noqa: E402
    CRITERIA,
    DEFAULT_GRID,
    LambdaSearch,
    choose_lambda,
    cv_repeats,
    parse_repeats,
    repeated_fold_scores,
)
from stages.pairs import PairSpec, batch_plan, open_pairs, pair_sources, split_pairs  # noqa: E402
from stages.threads import step_flops, threads_for  # noqa: E402
from stages.train import AlignSettings, train_heads, train_lambda_stack  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", required=True)
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--image-model", required=True)
    parser.add_argument("--text-model", required=True)
    parser.add_argument("--layers", action="append", required=True, help="IMAGE,TEXT (repeat)")
    parser.add_argument("--n-pairs", default="100,1000")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--grid", default=",".join(f"{v:g}" for v in DEFAULT_GRID))
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument(
        "--cv-repeats", default="auto",
        help="K-fold splits, as align's (columns auto_*; split1_*: the first split alone)",
    )  # fmt: skip
    parser.add_argument("--params", default="params.yaml", help="its align section: settings")
    parser.add_argument("--out", default="lambda_auto.csv")
    parser.add_argument(
        "--cost-only", action="store_true", help="time `align --lambda auto` against `align"
        " --lambda 10` (whole runs, alternated --repeats times), nothing else",
    )  # fmt: skip
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    base = settings_from(default_map(params), "align", AlignSettings)
    grid = tuple(float(v) for v in args.grid.split(","))
    spec = PairSpec(args.store, args.dataset, "train", args.image_model, args.text_model)
    if args.cost_only:
        return cost(args, spec, base, grid)
    rows = []
    work = Path(tempfile.mkdtemp(prefix="lambda_auto_"))
    for layers in args.layers:
        image_layer, text_layer = layers.split(",")
        pairs = open_pairs(spec, image_layer=image_layer, text_layer=text_layer)
        for n in map(int, args.n_pairs.split(",")):
            for seed in map(int, args.seeds.split(",")):
                settings = replace(base, n_pairs=n, seed=seed)
                row = {"layers": layers, "n_pairs": n, "seed": seed}
                for lam in grid:  # every fixed λ, on the test split
                    out = work / f"{image_layer}-{n}-{seed}-{lam:g}"
                    started = time.perf_counter()
                    config, _ = run_align(
                        spec, (image_layer, text_layer), replace(settings, lam=lam), out,
                        progress=False,
                    )  # fmt: skip
                    row[f"sec_{lam:g}"] = time.perf_counter() - started
                    metrics = evaluate_run(out, args.store, args.dataset, "test", "prompts")
                    row[f"zs_{lam:g}"] = metrics["zero_shot"]["top1"]
                    row[f"r1_{lam:g}"] = 0.5 * (
                        metrics["retrieval"]["i2t_r1"] + metrics["retrieval"]["t2i_r1"]
                    )
                # the search, on the training pairs alone (as run_align does it)
                started = time.perf_counter()
                train, val = split_pairs(
                    pairs.image_rows, n, settings.val_fraction, seed, settings.min_val_pairs
                )
                train_source, val_source = pair_sources(pairs, train, val)
                zeroshot, labels = zeroshot_data(spec, "prompts", text_layer, train)
                groups = pairs.image_rows[train]
                batch = batch_plan(len(train_source), settings.batch_size)[1]
                flops = step_flops(batch, pairs.dims, settings.out_dim, settings.hidden_dim, True)
                repeats = cv_repeats(parse_repeats(args.cv_repeats), len(set(groups)))
                with threads_for(flops):
                    _, scores, _ = repeated_fold_scores(
                        train_source, val_source, groups, settings, grid, train_heads,
                        ("retrieval", "zeroshot"), args.folds, repeats, zeroshot=zeroshot,
                        train_labels=labels, progress=False, fit_grid=train_lambda_stack,
                    )  # fmt: skip
                row["sec_search"] = time.perf_counter() - started
                row["repeats"] = repeats
                for criterion in ("retrieval", "zeroshot"):
                    higher = CRITERIA[criterion][1]
                    chosen = choose_lambda(scores[criterion], higher)
                    row[f"auto_{criterion}"] = chosen
                    first = {lam: v[: args.folds] for lam, v in scores[criterion].items()}
                    row[f"split1_{criterion}"] = choose_lambda(first, higher)
                    row[f"cost_{criterion}"] = (row["sec_search"] + row[f"sec_{chosen:g}"]) / row[
                        "sec_10"
                    ]
                rows.append(row)
                print(pd.DataFrame([row]).round(2).to_string(index=False), flush=True)
                pd.DataFrame(rows).to_csv(args.out, index=False)
    print(report(pd.DataFrame(rows), grid))


def cost(args, spec: PairSpec, base: AlignSettings, grid: tuple[float, ...]) -> None:
    """Seconds of whole `align` runs as a user runs them (pairs loaded, search, final run,
    run directory written), `--lambda auto` (retrieval) against `--lambda 10`, alternated; the
    ratio of the medians."""
    work = Path(tempfile.mkdtemp(prefix="lambda_cost_"))
    search = LambdaSearch(grid=grid, folds=args.folds)
    for layers in args.layers:
        chosen = tuple(layers.split(","))
        for n in map(int, args.n_pairs.split(",")):
            for seed in map(int, args.seeds.split(",")):
                settings = replace(base, n_pairs=n, seed=seed, lam=10.0)
                times: dict[str, list[float]] = {"fixed": [], "auto": []}
                for _ in range(args.repeats):
                    for kind in ("fixed", "auto"):
                        started = time.perf_counter()
                        run_align(
                            spec, chosen, settings, work / kind, progress=False,
                            lambda_search=search if kind == "auto" else None,
                        )  # fmt: skip
                        times[kind].append(time.perf_counter() - started)
                fixed, auto = (statistics.median(times[k]) for k in ("fixed", "auto"))
                print(
                    f"{layers} {n} pairs seed {seed}: align --lambda 10 {fixed:.1f} s, "
                    f"--lambda auto {auto:.1f} s: {auto / fixed:.1f}x "
                    f"(runs {', '.join(f'{t:.1f}' for t in times['fixed'])} / "
                    f"{', '.join(f'{t:.1f}' for t in times['auto'])})",
                    flush=True,
                )


def report(rows: pd.DataFrame, grid: tuple[float, ...]) -> str:
    """Per (layers, n_pairs), mean ± std over seeds of: auto (each criterion) on its own
    metric, as align chooses (every split) and by the first split alone, the best fixed λ of
    the grid (best mean on the test split), λ = 0, and the cost."""
    lines = [
        "| layers | pairs | metric | auto | chosen λ | first split alone (λ) | best fixed λ "
        "| λ = 0 | splits | auto cost (x one run) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]

    def at(group: pd.DataFrame, metric: str, column: str) -> str:
        values = pd.Series([r[f"{metric}_{r[column]:g}"] for _, r in group.iterrows()])
        return f"{values.mean():.1f} ± {values.std():.1f}"

    for (layers, n), group in rows.groupby(["layers", "n_pairs"], sort=False):
        for criterion, metric in (("retrieval", "r1"), ("zeroshot", "zs")):
            means = {lam: group[f"{metric}_{lam:g}"].mean() for lam in grid}
            best = max(means, key=means.get)
            first = f"split1_{criterion}"
            lines.append(
                f"| {layers} | {n} | {'R@1' if metric == 'r1' else 'zero-shot'} | "
                f"{at(group, metric, f'auto_{criterion}')} | "
                f"{', '.join(f'{v:g}' for v in group[f'auto_{criterion}'])} | "
                f"{at(group, metric, first)} ({', '.join(f'{v:g}' for v in group[first])}) | "
                f"{means[best]:.1f} ± {group[f'{metric}_{best:g}'].std():.1f} (λ {best:g}) | "
                f"{means[0.0]:.1f} ± {group[f'{metric}_0'].std():.1f} | "
                f"{group['repeats'].iloc[0]} | {group[f'cost_{criterion}'].mean():.1f} |"
            )
    return "\n".join(lines)


if __name__ == "__main__":
    main()
