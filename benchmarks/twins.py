"""Each `+ R_S` training run against its lambda = 0 twin (same head, pairs, seed and settings):
training seconds and their ratio, in one process. The issue's goal: no ratio above 10.

    python -m benchmarks.twins                                   # synthetic 384-d pairs
    python -m benchmarks.twins --store /work/real/features.zarr --image-model dinov2-small \
        --text-model all-MiniLM-L6-v2 --layers block.6,embeddings --n-pairs 100,1000

Training settings are the `align` section of params.yaml (--params), as `sweep` uses them;
lambda is `--lambda` for the gradient heads and `--csa-lambda` for CSA (table's defaults). The
pairs and the validation hold-out are `align --n-pairs N --seed S`'s (stages.pairs.split_pairs).
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, Python puts benchmarks/ first on the path, where select.py would shadow the
# standard library's `select`: put the repository root there instead
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import time  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from pipeline.config import default_map, load_params, settings_from  # noqa: E402
from stages.align import trainer  # noqa: E402
from stages.pairs import MemoryPairs, PairSpec, open_pairs, split_pairs  # noqa: E402
from stages.table import TableSettings  # noqa: E402
from stages.train import AlignSettings  # noqa: E402


def align_settings(params_path: str) -> AlignSettings:
    """AlignSettings from params.yaml's align section over `common`, as `sweep` takes them."""
    return settings_from(default_map(load_params(params_path, given=False)), "align", AlignSettings)


def synthetic(n: int, dim: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Paired (image, text) rows sharing a 16-d latent, and the image row of each pair."""
    rng = np.random.default_rng(seed)
    z = rng.normal(size=(n, 16))
    image = z @ rng.normal(size=(16, dim)) + rng.normal(size=(n, dim))
    text = z @ rng.normal(size=(16, dim)) + rng.normal(size=(n, dim))
    return image.astype(np.float32), text.astype(np.float32), np.arange(n)


def timed(settings: AlignSettings, train: MemoryPairs, val: MemoryPairs) -> tuple[float, int]:
    """(seconds, steps) of one training run."""
    started = time.perf_counter()
    result = trainer(settings.head)(train, val, settings, progress=False)
    return time.perf_counter() - started, result.steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="", help="a feature store (default: synthetic)")
    parser.add_argument("--dataset", default="digits")
    parser.add_argument("--split", default="train")
    parser.add_argument("--image-model", default="")
    parser.add_argument("--text-model", default="")
    parser.add_argument("--layers", default="", help="IMAGE,TEXT layer names (with --store)")
    parser.add_argument("--synthetic-n", type=int, default=1438)
    parser.add_argument("--synthetic-dim", type=int, default=384)
    parser.add_argument("--heads", default="linear,mlp,lowrank,csa")
    parser.add_argument("--n-pairs", default="100,1000")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--lambda", dest="lam", type=float, default=TableSettings.lam)
    parser.add_argument("--csa-lambda", type=float, default=TableSettings.csa_lambda)
    parser.add_argument("--csa-dim", type=int, default=TableSettings.csa_dim)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    if args.store:
        spec = PairSpec(
            store=Path(args.store),
            dataset=args.dataset,
            split=args.split,
            image_model=args.image_model,
            text_model=args.text_model,
        )
        image_layer, text_layer = args.layers.split(",")
        pairs = open_pairs(spec, image_layer=image_layer, text_layer=text_layer)
        image, text = pairs.load()
        image_rows = pairs.image_rows
        where = f"{args.store} {image_layer}/{text_layer}"
    else:
        image, text, image_rows = synthetic(args.synthetic_n, args.synthetic_dim)
        where = f"synthetic {args.synthetic_n} x {args.synthetic_dim}"
    base = align_settings(args.params)
    print(f"{where}; {args.params} align: epochs {base.epochs}, batch {base.batch_size}, "
          f"patience {base.patience} steps, min_val_pairs {base.min_val_pairs}, "
          f"csa_steps {base.csa_steps}; {args.threads} thread(s)")  # fmt: skip
    print(f"{'head':<8} {'n_pairs':>7} {'seed':>4} {'val':>4} {'lambda 0 s':>10} {'steps':>6} "
          f"{'+ R_S s':>8} {'steps':>6} {'ratio':>6}")  # fmt: skip
    worst = 0.0
    for n in (int(v) for v in args.n_pairs.split(",")):
        for seed in (int(v) for v in args.seeds.split(",")):
            train, val = split_pairs(image_rows, n, base.val_fraction, seed, base.min_val_pairs)
            sources = (
                MemoryPairs(image[train], text[train]),
                MemoryPairs(image[val], text[val]),
            )
            for head in args.heads.split(","):
                own = {"out_dim": args.csa_dim} if head == "csa" else {}
                lam = args.csa_lambda if head == "csa" else args.lam
                twin = replace(base, head=head, n_pairs=n, seed=seed, lam=0.0, **own)
                # warm-up: the first linear-algebra calls of a process load their libraries
                timed(replace(twin, lam=lam, epochs=1, csa_steps=1), *sources)
                plain, plain_steps = timed(twin, *sources)
                rs, rs_steps = timed(replace(twin, lam=lam), *sources)
                worst = max(worst, rs / plain)
                print(f"{head:<8} {n:>7} {seed:>4} {len(val):>4} {plain:>10.2f} "
                      f"{plain_steps:>6} {rs:>8.2f} {rs_steps:>6} {rs / plain:>6.1f}x")  # fmt: skip
    print(f"largest ratio: {worst:.1f}x (goal: 10x)")


if __name__ == "__main__":
    main()
