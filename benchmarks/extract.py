"""Extraction throughput: the whole pipeline against the bare model forward, same process.

The model is a real-size DINOv2 architecture with random weights (no download), saved to a
temporary directory and loaded through the Hugging Face code path, like a user's local model.
The data are N random JPEG files listed in a pairs CSV, so decoding and preprocessing are real.

    python -m benchmarks.extract --arch small --n 256                                  # CPU
    python -m benchmarks.extract --arch large --n 8192 --batch-size 256 --num-workers 12  # GPU

Prints rows/s of (a) the bare forward over one pre-made batch already on the device (the floor:
no decoding, preprocessing, pooling, copies or store writes), (b) the extract loop, and (c)
extract all in (model loading and fingerprinting included, a one-off per run), and the ratios.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from stages.encoders import load_encoder
from stages.extract import ExtractOptions, extract, pick_device

ARCHS = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}


def save_random_dinov2(arch: str, directory: Path, image_size: int) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    hidden, blocks, heads = ARCHS[arch]
    config = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads, patch_size=14
    )
    Dinov2Model(config).save_pretrained(directory)
    crop = {"height": image_size, "width": image_size}
    BitImageProcessor(size={"shortest_edge": 256}, crop_size=crop).save_pretrained(directory)


def write_pairs(directory: Path, n: int) -> Path:
    (directory / "img").mkdir()

    def write(i: int) -> None:
        pixels = np.random.default_rng(i).integers(0, 255, (256, 320, 3), dtype=np.uint8)
        Image.fromarray(pixels).save(directory / f"img/{i}.jpg", quality=90)

    with ThreadPoolExecutor() as pool:  # PIL's JPEG encoder releases the GIL
        list(pool.map(write, range(n)))
    table = pd.DataFrame({"image": [f"img/{i}.jpg" for i in range(n)], "caption": "x"})
    table.to_csv(directory / "pairs.csv", index=False)
    return directory / "pairs.csv"


def bare_forward(model_dir: str, pairs: Path, n: int, batch_size: int, device) -> float:
    """Rows/s of the model alone on one batch prepared beforehand, already on the device."""
    encoder = load_encoder(model_dir)
    encoder.model.to(device)
    images = [Image.open(pairs.parent / f"img/{i}.jpg").convert("RGB") for i in range(batch_size)]
    pixels = encoder.collate([encoder.prepare(im) for im in images])["pixel_values"].to(device)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    n_batches = -(-n // batch_size)
    with torch.inference_mode(), autocast:
        encoder.model(pixel_values=pixels)  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(n_batches):
            encoder.model(pixel_values=pixels, output_hidden_states=True)
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n_batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = pick_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        model_dir = str(tmp / f"dinov2-{args.arch}-random")
        save_random_dinov2(args.arch, Path(model_dir), args.image_size)
        pairs = write_pairs(tmp, args.n)
        floor = bare_forward(model_dir, pairs, args.n, args.batch_size, device)
        opts = ExtractOptions(
            batch_size=args.batch_size,
            block_rows=1024,
            device=args.device,
            num_workers=args.num_workers,
            progress=False,
        )
        started = time.perf_counter()
        result = extract(
            str(tmp / "bench.zarr"), "bench", "train", f"pairs:{pairs}", model_dir, opts
        )
        all_in = args.n / (time.perf_counter() - started)
    loop = result.rows / result.seconds
    print(
        f"device {device}; dinov2-{args.arch} random weights; n={args.n}; "
        f"batch {args.batch_size}; {args.num_workers} workers; {args.image_size} px"
    )
    print(f"bare forward      {floor:9.1f} rows/s")
    print(f"extract loop      {loop:9.1f} rows/s   overhead {floor / loop:.3f}x (goal <= 1.10)")
    print(f"extract all in    {all_in:9.1f} rows/s   overhead {floor / all_in:.3f}x")


if __name__ == "__main__":
    main()
