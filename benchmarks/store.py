"""Reading one layer of all rows: the per-layer store against the old (N, L, D) layout.

    python -m benchmarks.store [--n 16384] [--layers 6] [--dim 768] [--block-rows 512]

Writes the same float16 features three ways in one temporary directory: the old layout (one
(N, L, D) array, shards of (block_rows, L, D) with inner chunks (block_rows, 1, D)), and the
current one (one (N, D) array per layer, a chunk per block) with and without the crc32c
checksum on the chunks; then times `read_layer` of the middle layer (best of --repeat, after a
warm-up read, so the page cache holds the files in all three cases) and prints the ratios to
the old layout (the goal: within 2x). Also times reading a CNN-like store whose layers are 64
to 2,048 wide.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import zarr

from store import FeatureStore
from store.features import create_layer_arrays
from tests.helpers import write_features, write_old_layout


def best_seconds(read, repeat: int) -> float:
    read()  # warm-up: the files in the page cache, zarr's metadata loaded
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        read()
        times.append(time.perf_counter() - started)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=16384)
    parser.add_argument("--layers", type=int, default=6)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--block-rows", type=int, default=512)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    n, n_layers, dim, rows = args.n, args.layers, args.dim, args.block_rows
    values = np.random.default_rng(0).normal(size=(n, n_layers, dim)).astype(np.float16)
    names = [f"layer.{i}" for i in range(n_layers)]
    middle = n_layers // 2

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        write_old_layout(tmp / "old.zarr", "d/s/image/m", values, names, rows)
        old = zarr.open_array(tmp / "old.zarr" / "d/s/image/m/features", mode="r")
        write_features(tmp / "new.zarr", "d", "s", "image", "m", values, names, rows, "float16")
        new = FeatureStore(tmp / "new.zarr").open("d", "s", "image", "m")
        # the same layer straight from zarr, with the store's crc32c codec and without it
        bare = zarr.open_group(tmp / "bare.zarr", mode="w", zarr_format=3)
        create_layer_arrays(bare, n, [dim], "float16", rows)  # as the store makes them
        bare.create_array("raw", shape=(n, dim), chunks=(rows, dim), dtype="float16",
                          compressors=None)  # fmt: skip
        checked, raw = bare["layers/0"], bare["raw"]
        checked[:], raw[:] = values[:, middle], values[:, middle]

        t_old = best_seconds(lambda: np.asarray(old[:, middle, :], np.float32), args.repeat)
        t_new = best_seconds(lambda: new.read_layer(middle), args.repeat)
        t_checked = best_seconds(lambda: np.asarray(checked[:], np.float32), args.repeat)
        t_raw = best_seconds(lambda: np.asarray(raw[:], np.float32), args.repeat)

        widths = [64, 256, 512, 1024, 2048]  # ResNet-50's stages
        rng = np.random.default_rng(1)
        cnn = [rng.normal(size=(n, w)).astype(np.float16) for w in widths]
        write_features(tmp / "cnn.zarr", "d", "s", "image", "r", cnn, None, rows, "float16")
        cnn_array = FeatureStore(tmp / "cnn.zarr").open("d", "s", "image", "r")
        t_cnn = [best_seconds(lambda i=i: cnn_array.read_layer(i), args.repeat) for i in range(5)]

    mib = n * dim * 2 / 2**20
    print(f"one layer of {n} rows x {dim} float16 ({mib:.0f} MiB), {n_layers} layers, "
          f"blocks of {rows} rows; best of {args.repeat}")  # fmt: skip
    print(f"old (N, L, D) layout            {t_old * 1e3:8.1f} ms   1.00x")
    print(
        f"per-layer arrays, crc32c        {t_new * 1e3:8.1f} ms   {t_new / t_old:.2f}x (goal <= 2)"
    )
    print(f"  zarr alone, crc32c            {t_checked * 1e3:8.1f} ms   {t_checked / t_old:.2f}x")
    print(f"  zarr alone, no checksum       {t_raw * 1e3:8.1f} ms   {t_raw / t_old:.2f}x")
    print(f"crc32c read cost: {t_checked / t_raw:.2f}x the unchecked read")
    for w, t in zip(widths, t_cnn):
        print(f"CNN layer of width {w:5d}        {t * 1e3:8.1f} ms")


if __name__ == "__main__":
    main()
