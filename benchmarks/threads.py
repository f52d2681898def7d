"""Training on a busy machine: the demo's training stages with and without a competing process.

    python -m benchmarks.threads                        # in a folder where `dvc repro` ran
    python -m benchmarks.threads --store features.zarr --select-dir runs/select --repeats 2

Runs the align variants of params.yaml (`variants`: last, similar, similar-rs: the demo's training
stages) in this process, first alone, then while a competing process keeps cores busy with torch
matmuls (another training, a build, another user), and prints seconds and the ratio busy / alone
(goal: at most 1.5x). The competitor runs on one thread (one other job), then on every core
(`--competitor-threads`): with every core taken, a fair scheduler gives a one-thread process 2/3 of
a core on 2 cores, so 1.5x is the best that any choice of threads can do. Twice: with the thread
count stages.threads picks (one thread for small heads), and with torch's default (every core: what
ran before). Then a micro check on synthetic 384-d features (100 and 1,000 pairs, lambda 0 and 10,
d 512, full batch): seconds of 100 steps on 1 and on 2 threads, alone and busy.

Other work on the machine counts as "alone": say what else ran when you quote the figures.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path[0] = str(Path(__file__).resolve().parents[1])  # not benchmarks/ (select.py shadows)

import argparse  # noqa: E402
import os  # noqa: E402
import shlex  # noqa: E402
import subprocess  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import replace  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402

import stages.threads  # noqa: E402
from pipeline.config import default_map, settings_from  # noqa: E402
from stages.align import resolve_layers, run_align  # noqa: E402
from stages.lambda_cv import parse_lambda  # noqa: E402
from stages.pairs import PairSpec  # noqa: E402
from stages.train import AlignSettings, train_heads  # noqa: E402

COMPETITOR = (
    "import torch\n"
    "torch.set_num_threads({threads})\n"
    "a = torch.randn(768, 768)\n"
    "while True:\n"
    "    a = torch.tanh(a @ a)\n"
)


@contextmanager
def competitor(busy: bool, threads: int = 0):
    """A process keeping `threads` cores (0: every core) busy with torch matmuls (ended by its
    pid on exit)."""
    if not busy:
        yield
        return
    code = COMPETITOR.format(threads=threads or os.cpu_count() or 2)
    process = subprocess.Popen([sys.executable, "-c", code])
    try:
        time.sleep(2.0)  # let it start
        yield
    finally:
        process.kill()
        process.wait()


@contextmanager
def torch_default_threads(on: bool):
    """With `on`, stages.threads leaves torch's thread count alone (the behaviour before)."""
    saved = stages.threads.SMALL_STEP_FLOPS
    if on:
        stages.threads.SMALL_STEP_FLOPS = 0.0
    try:
        yield
    finally:
        stages.threads.SMALL_STEP_FLOPS = saved


def variant_flags(flags: str) -> tuple[str, float]:
    """(layers, lambda) from a params.yaml variant such as `--layers auto --lambda 0`."""
    words = shlex.split(flags)
    layers = words[words.index("--layers") + 1] if "--layers" in words else "auto"
    lam = parse_lambda(words[words.index("--lambda") + 1]) if "--lambda" in words else None
    return layers, (AlignSettings.lam if lam is None else lam)


def training_stages(args, params: dict, work: Path) -> float:
    """Seconds of every align variant of params.yaml, trained here."""
    defaults = default_map(params)
    common = params.get("common", {})
    spec = PairSpec(
        args.store, common.get("dataset", "digits"), params["align"].get("split", "train"),
        common.get("image_model", "tiny-random-vit"), common.get("text_model", "tiny-random-text"),
    )  # fmt: skip
    base = settings_from(defaults, "align", AlignSettings)
    lam = params["align"].get("lambda", AlignSettings.lam)
    base = replace(base, lam=float(lam)) if str(lam) != "auto" else base
    started = time.perf_counter()
    for name, flags in params.get("variants", {}).items():
        layers, variant_lam = variant_flags(flags)
        chosen = resolve_layers(layers, spec, Path(args.select_dir), log=print, progress=False)
        run_align(spec, chosen, replace(base, lam=variant_lam), work / name, progress=False)
    return time.perf_counter() - started


def micro(busy: bool) -> list[str]:
    rng = np.random.default_rng(0)
    lines = []
    before = torch.get_num_threads()
    with competitor(busy):
        for n in (100, 1000):
            x = rng.normal(size=(n, 384)).astype(np.float32)
            y = rng.normal(size=(n, 384)).astype(np.float32)
            for lam in (0.0, 10.0):
                settings = AlignSettings(lam=lam, max_steps=100, epochs=100, warmup_steps=10)
                seconds = {}
                for threads in (1, 2):
                    torch.set_num_threads(threads)
                    started = time.perf_counter()
                    train_heads((x, y), None, settings, progress=False)
                    seconds[threads] = time.perf_counter() - started
                lines.append(
                    f"  {'busy' if busy else 'alone':5}  {n:5d} pairs  lambda {lam:4g}:  "
                    f"1 thread {seconds[1]:6.2f} s   2 threads {seconds[2]:6.2f} s   "
                    f"2/1 {seconds[2] / seconds[1]:5.2f}"
                )
    torch.set_num_threads(before)
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--store", default="features.zarr")
    parser.add_argument("--select-dir", default="runs/select")
    parser.add_argument("--params", default="params.yaml")
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--no-micro", action="store_true")
    parser.add_argument("--no-default", action="store_true", help="skip the torch-default pass")
    parser.add_argument(
        "--competitor-threads", default=f"1,{os.cpu_count() or 2}", help="a comma list"
    )
    args = parser.parse_args()
    params = yaml.safe_load(Path(args.params).read_text())
    print(f"{os.cpu_count()} cores, torch default {torch.get_num_threads()} threads")
    work = Path(tempfile.mkdtemp(prefix="threads_"))
    passes = [("threads chosen by stages.threads", False), ("torch default", True)]
    for label, default in passes[: 1 if args.no_default else 2]:
        with torch_default_threads(default):
            alone = min(training_stages(args, params, work) for _ in range(args.repeats))
            for threads in map(int, args.competitor_threads.split(",")):
                with competitor(True, threads):
                    busy = min(training_stages(args, params, work) for _ in range(args.repeats))
                print(
                    f"demo training stages, {label}: alone {alone:.1f} s, beside a "
                    f"{threads}-thread competitor {busy:.1f} s, busy/alone {busy / alone:.2f}x",
                    flush=True,
                )
    if not args.no_micro:
        print("100 steps of train_heads, 384-d features -> d 512, full batch:")
        for busy in (False, True):
            print("\n".join(micro(busy)))


if __name__ == "__main__":
    main()
