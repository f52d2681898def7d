"""How many CPU threads torch trains the heads with: one for small steps, torch's own otherwise.

Small heads do too little work per step to share among threads: each matmul waits for its
slowest thread, and on a machine whose cores are busy with other work that wait is a time
slice. Measured on 2 shared cores (benchmarks/threads.py; docs/training.md, "Threads on a busy
machine"): 1,000 full-batch pairs of 384-d features at d 512 ran 3x slower on 2 threads than
on 1, and a 100-pair run with R_S up to 17x slower. So a step under SMALL_STEP_FLOPS runs on
one thread, chosen from the work alone (never from the load of the moment: the same run must
give the same weights), and the caller's setting is restored after; no environment variable is
needed. The cores are then used by running independent trainings side by side, one thread each
(`fold_lanes`: the folds of `align --lambda auto`).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager

import torch

# about 0.2-0.5 s of one core: below it, one thread is as fast as several and far steadier
SMALL_STEP_FLOPS = 1e10


def step_flops(batch: int, dims: tuple[int, int], out_dim: int, hidden: int, rs: bool) -> float:
    """Rough floating-point operations of one training step (forward and backward, x3): both
    heads on `batch` rows (widths up to `hidden`), the batch x batch CLIP logits, and R_S's two
    batch x batch similarity matrices when `rs`."""
    width = max(out_dim, hidden)
    heads = 2.0 * batch * (dims[0] + dims[1]) * width
    pairwise = 2.0 * batch * batch * out_dim * (1 + (2 if rs else 0))
    return 3.0 * (heads + pairwise)


def training_threads(flops: float) -> int:
    """1 for a step under SMALL_STEP_FLOPS, else torch's current thread count."""
    return 1 if flops < SMALL_STEP_FLOPS else torch.get_num_threads()


@contextmanager
def threads_for(flops: float) -> Iterator[int]:
    """torch on `training_threads(flops)` threads inside the block; the caller's count after."""
    before = torch.get_num_threads()
    torch.set_num_threads(training_threads(flops))
    try:
        yield torch.get_num_threads()
    finally:
        torch.set_num_threads(before)


def fold_lanes(units: int, draws_random: bool) -> int:
    """How many units of `align --lambda auto`'s search (stages.lambda_cv.search_units) train
    at once, each in its own thread: one per core the process may use (at most `units`) when
    torch runs on one thread; else 1 (torch's own threads already use the cores), and 1 when a
    training step draws from torch's global random generator (threads would interleave the
    draws: results would depend on timing). Threads on one torch thread each never wait on each
    other, unlike torch's threads inside one matmul: measured 1.7x on 2 cores where torch's 2
    threads gave 1.3x."""
    if draws_random or torch.get_num_threads() > 1:
        return 1
    return max(1, min(units, len(os.sched_getaffinity(0))))
