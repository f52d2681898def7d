"""Evaluation metrics at the paper's test scale: time and peak memory of the pure functions.

    python -m benchmarks.evaluate                    # COCO-5k-like: 5,000 images x 5 captions
    python -m benchmarks.evaluate --images 1000 --captions 5 --classes 1000 --dim 512

Times `retrieval_recall` (both directions, Recall@1/5/10 with exact tie handling) and
`zero_shot_accuracy` (top-1/top-5 against `--classes` class embeddings) on random unit
embeddings, and prints the peak resident memory of the process. Heads and store reads are not
included: they are a matmul and a layer read, measured by the align and extract benchmarks.
"""

from __future__ import annotations

import argparse
import resource
import time

import numpy as np
import torch

from stages.evaluate import retrieval_recall, zero_shot_accuracy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--captions", type=int, default=5, help="captions per image")
    parser.add_argument("--classes", type=int, default=1000)
    parser.add_argument("--dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    rng = np.random.default_rng(0)
    images = torch.from_numpy(rng.normal(size=(args.images, args.dim)).astype(np.float32))
    owner = np.repeat(np.arange(args.images), args.captions)
    noise = rng.normal(size=(len(owner), args.dim)).astype(np.float32)
    texts = images[owner] + 8 * torch.from_numpy(noise)  # recall well below 100 %
    classes = torch.from_numpy(rng.normal(size=(args.classes, args.dim)).astype(np.float32))
    labels = rng.integers(0, args.classes, size=args.images)

    print(f"torch threads: {torch.get_num_threads()}")
    for name, fn in (
        (
            f"retrieval {args.images} images x {len(owner)} texts",
            lambda: retrieval_recall(images, texts, owner),
        ),
        (
            f"zero-shot {args.images} images x {args.classes} classes",
            lambda: zero_shot_accuracy(images, classes, labels),
        ),
    ):
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            out = fn()
            times.append(time.perf_counter() - start)
        shown = ", ".join(f"{k} {v:.1f}" for k, v in out.items())
        print(f"{name}: best {min(times):.2f} s of {args.repeats}  ({shown})")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory: {peak:.0f} MiB")


if __name__ == "__main__":
    main()
