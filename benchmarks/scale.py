"""Scaling out: extraction on 1 and 2 dask workers, and align's peak memory under --memory-cap.

    python -m benchmarks.scale                       # both parts, CPU-sized defaults
    python -m benchmarks.scale --part extract --n 512 --arch base
    python -m benchmarks.scale --part align --pairs 200000 --dim 1024

extract: a real-size DINOv2 architecture with random weights (as benchmarks/extract.py) over N
random JPEGs, run (a) in one process, (b) on `local:1` and (c) on `local:2` (LocalCluster worker
processes, one thread each). Prints rows/s of the embedding loop (the cluster's from the first
task to the last block written; model loading on the workers excluded) and all in, and checks
that the three stores are byte-identical.

align: a store whose chosen layers (float32, as training holds them) are 3x the memory cap;
align runs in a fresh process once in memory and once with --memory-cap, and the peak RSS
above the process's baseline (imports done, store opened) is reported with the seconds/epoch.
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from benchmarks.extract import ARCHS, save_random_dinov2, write_pairs

MiB = 2**20


# -- extraction -----------------------------------------------------------------------------
def extract_runs(args: argparse.Namespace, tmp: Path) -> None:
    from stages.extract import ExtractOptions, extract

    model_dir = tmp / f"dinov2-{args.arch}-random"
    save_random_dinov2(args.arch, model_dir, args.image_size)
    pairs = write_pairs(tmp, args.n)
    rows = {}
    for scheduler in ("", "local:1", "local:2"):
        opts = ExtractOptions(
            batch_size=args.batch_size, block_rows=args.block_rows, device="cpu",
            num_workers=args.num_workers, progress=False, scheduler=scheduler,
        )  # fmt: skip
        name = scheduler or "one process"
        store = tmp / f"{name.replace(':', '')}.zarr"
        started = time.perf_counter()
        result = extract(str(store), "bench", "train", f"pairs:{pairs}", str(model_dir), opts)
        all_in = args.n / (time.perf_counter() - started)
        rows[name] = (result.rows / result.seconds, all_in, store, result.array.path)
    base = rows["one process"][0]
    workers = "" if args.num_workers == 0 else f", {args.num_workers} DataLoader workers"
    print(
        f"\nextract: dinov2-{args.arch} random weights, {args.image_size} px, n={args.n}, "
        f"batch {args.batch_size}, blocks of {args.block_rows} rows, CPU "
        f"(one process: torch's default threads{workers}; cluster workers: 1 thread each)"
    )
    print(f"{'run':<14}{'loop rows/s':>14}{'all-in rows/s':>16}{'vs one process':>17}")
    for name, (loop, all_in, _, _) in rows.items():
        print(f"{name:<14}{loop:>14.1f}{all_in:>16.1f}{loop / base:>16.2f}x")
    print(f"local:2 / local:1 = {rows['local:2'][0] / rows['local:1'][0]:.2f}x")
    reference = files(rows["one process"][2] / rows["one process"][3])
    for name, (_, _, store, path) in rows.items():
        mine = files(store / path)
        differ = sorted(k for k in set(mine) | set(reference) if mine.get(k) != reference.get(k))
        print(f"{name}: store byte-identical to the one-process run: {not differ}"
              + (f" (differing files: {differ[:5]})" if differ else ""))  # fmt: skip


def files(root: Path) -> dict[str, bytes]:
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


# -- align memory ---------------------------------------------------------------------------
def write_store(path: Path, n: int, dim: int, block_rows: int) -> int:
    """n pairs, 2 layers of width dim per modality, float16, written block by block."""
    import pandas as pd

    from store import FeatureStore, write_manifest

    store = FeatureStore(path, create=True)
    rng = np.random.default_rng(0)
    mix = rng.normal(size=(dim, dim)).astype(np.float32) / np.sqrt(dim)
    for modality, model in (("image", "img"), ("text", "txt")):
        array = store.create(
            "big", "train", modality, model, n, ["layer.0", "layer.1"], dim, "float16",
            block_rows, {"model_id": model, "pooling": "synthetic"},
        )  # fmt: skip
        for block in range(array.n_blocks):
            span = array.block_slice(block)
            block_rng = np.random.default_rng([block, 0])  # both modalities share the latent
            z = block_rng.normal(size=(span.stop - span.start, dim)).astype(np.float32)
            noise = rng.normal(size=z.shape).astype(np.float32)
            signal = z @ mix if modality == "text" else z
            array.write_block(block, np.stack([noise, signal + 0.3 * noise], axis=1))
    manifest = pd.DataFrame({"image_row": np.arange(n), "sample_id": [f"s{i}" for i in range(n)]})
    manifest = manifest.assign(image_path=manifest["sample_id"], caption="c", label=-1)
    write_manifest(store.manifest_path("big", "train"), manifest.assign(label_name=""))
    return n * 2 * dim * 4  # the chosen layers of all pairs as float32


def rss_mib() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / MiB


class PeakRSS:
    """The largest RSS seen while the block runs (sampled every 5 ms by a thread)."""

    def __enter__(self) -> PeakRSS:
        import threading

        self.value, self.done = rss_mib(), threading.Event()
        self.thread = threading.Thread(target=self.sample, daemon=True)
        self.thread.start()
        return self

    def sample(self) -> None:
        while not self.done.wait(0.005):
            self.value = max(self.value, rss_mib())

    def __exit__(self, *exc) -> None:
        self.done.set()
        self.thread.join()
        self.value = max(self.value, rss_mib())


def align_child(store: str, cap: int, epochs: int, batch: int) -> None:
    """Runs in a fresh process: warm-up, baseline RSS, align, peak RSS; prints one JSON line.
    The warm-up (one epoch on 2 random batches, the curves plotted) makes the baseline hold
    what any training run holds (libraries, kernels, allocator pools) but no features."""
    import matplotlib.pyplot  # noqa: F401  (plot_curves imports it)

    from stages.align import run_align
    from stages.pairs import PairSpec, open_pairs
    from stages.train import AlignSettings, train_heads

    spec = PairSpec(store=store, dataset="big", split="train", image_model="img", text_model="txt")
    layers = ("layer.1", "layer.1")
    pairs = open_pairs(spec, image_layer=layers[0], text_layer=layers[1])
    settings = AlignSettings(
        lam=10.0, out_dim=256, batch_size=batch, epochs=epochs, warmup_steps=10, patience=0,
        val_fraction=0.1,
    )  # fmt: skip
    rng = np.random.default_rng(0)
    fake = [rng.normal(size=(2 * batch, d)).astype(np.float32) for d in pairs.dims]
    train_heads((fake[0], fake[1]), (fake[0], fake[1]), replace(settings, epochs=1), False)
    del fake
    baseline = rss_mib()
    with tempfile.TemporaryDirectory() as out, PeakRSS() as peak:
        started = time.perf_counter()
        config, _ = run_align(spec, layers, settings, out, progress=False, memory_cap=cap)
        seconds = time.perf_counter() - started
    peak = peak.value
    print(json.dumps({"baseline": baseline, "peak": peak, "seconds": seconds,
                      "streamed": config["streamed_from_store"]}))  # fmt: skip


def align_runs(args: argparse.Namespace, tmp: Path) -> None:
    store = tmp / "big.zarr"
    started = time.perf_counter()
    data = write_store(store, args.pairs, args.dim, args.store_block_rows)
    on_disk = sum(f.stat().st_size for f in store.rglob("*") if f.is_file())
    cap = data // 3
    print(
        f"\nalign: {args.pairs} pairs, chosen layers {args.dim} + {args.dim} wide: "
        f"{data / MiB:.0f} MiB as float32 (store on disk {on_disk / MiB:.0f} MiB, float16, "
        f"2 layers per modality, written in {time.perf_counter() - started:.0f} s); "
        f"memory cap {cap / MiB:.0f} MiB (data = 3x cap); batch {args.align_batch}, "
        f"{args.epochs} epoch(s), lambda 10"
    )
    print(f"{'run':<26}{'peak RSS':>10}{'above baseline':>16}{'s/epoch':>9}")
    for name, run_cap in (("in memory (no cap)", 0), (f"--memory-cap {cap // MiB}MiB", cap)):
        child = subprocess.run(
            [sys.executable, "-m", "benchmarks.scale", "--align-child", str(store),
             str(run_cap), str(args.epochs), str(args.align_batch)],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
        r = json.loads(child.stdout.strip().splitlines()[-1])
        above = r["peak"] - r["baseline"]
        print(
            f"{name:<26}{r['peak']:>8.0f} MiB{above:>12.0f} MiB{r['seconds'] / args.epochs:>9.1f}"
            + ("   (streamed)" if r["streamed"] else "")
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["extract", "align", "both"], default="both")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small")
    parser.add_argument("--n", type=int, default=256, help="images to extract")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--block-rows", type=int, default=32, help="rows per block (task)")
    parser.add_argument("--num-workers", type=int, default=0, help="one-process DataLoader")
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--pairs", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--store-block-rows", type=int, default=4096)
    parser.add_argument("--align-batch", type=int, default=1024)
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--align-child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.align_child:
        store, cap, epochs, batch = args.align_child
        align_child(store, int(cap), int(epochs), int(batch))
        return
    with tempfile.TemporaryDirectory() as tmp:
        if args.part in ("extract", "both"):
            extract_runs(args, Path(tmp))
        if args.part in ("align", "both"):
            align_runs(args, Path(tmp))


if __name__ == "__main__":
    main()
