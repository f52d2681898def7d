"""Extraction throughput: the whole pipeline against the bare model forward, same process.

The model is a real-size architecture with random weights (no download): DINOv2 (`small`,
`base`, `large`) saved to a temporary directory and loaded through the Hugging Face code path,
like a user's local model, or timm's ResNet-50 (`resnet50`: a CNN whose five stored layers are
64 to 2,048 wide) saved to a safetensors file and loaded with `timm:resnet50 --weights FILE`.
The data are N random JPEG files listed in a pairs CSV, so decoding and preprocessing are real.

    python -m benchmarks.extract --arch small --n 256                                  # CPU
    python -m benchmarks.extract --arch resnet50 --n 64 --batch-size 16                # CPU
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

from stages.device import resolve_device
from stages.encoders import load_encoder
from stages.extract import ExtractOptions, extract
from store.features import width_summary

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


def save_random_resnet50(path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    model = timm.create_model("resnet50", pretrained=False)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)


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


def bare_forward(encoder, pairs: Path, n: int, batch_size: int, device) -> float:
    """Rows/s of the model alone (its plain forward) on one batch prepared beforehand, already
    on the device."""
    encoder.model.to(device)
    images = [Image.open(pairs.parent / f"img/{i}.jpg").convert("RGB") for i in range(batch_size)]
    pixels = encoder.collate([encoder.prepare(im) for im in images])["pixel_values"].to(device)
    if encoder.spec.startswith("timm:"):
        pixels = pixels.float()

        def forward():
            return encoder.model(pixels)
    else:

        def forward():
            return encoder.model(pixel_values=pixels, output_hidden_states=True)

    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    n_batches = -(-n // batch_size)
    with torch.inference_mode(), autocast:
        forward()  # warm-up
        if device.type == "cuda":
            torch.cuda.synchronize()
        started = time.perf_counter()
        for _ in range(n_batches):
            forward()
        if device.type == "cuda":
            torch.cuda.synchronize()
    return n_batches * batch_size / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=[*sorted(ARCHS), "resnet50"], default="small")
    parser.add_argument("--n", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="auto")
    args = parser.parse_args()
    device = resolve_device(args.device)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = ""
        if args.arch == "resnet50":  # timm's preprocessing for resnet50: 224 px crops
            model, weights = "timm:resnet50", str(tmp / "resnet50.safetensors")
            save_random_resnet50(Path(weights))
        else:
            model = str(tmp / f"dinov2-{args.arch}-random")
            save_random_dinov2(args.arch, Path(model), args.image_size)
        pairs = write_pairs(tmp, args.n)
        encoder = load_encoder(model, weights=weights or None)
        floor = bare_forward(encoder, pairs, args.n, args.batch_size, device)
        del encoder
        opts = ExtractOptions(
            batch_size=args.batch_size,
            block_rows=1024,
            device=args.device,
            num_workers=args.num_workers,
            weights=weights,
            progress=False,
        )
        started = time.perf_counter()
        result = extract(str(tmp / "bench.zarr"), "bench", "train", f"pairs:{pairs}", model, opts)
        all_in = args.n / (time.perf_counter() - started)
    loop = result.rows / result.seconds
    print(
        f"device {device}; {'' if args.arch == 'resnet50' else 'dinov2-'}{args.arch} random "
        f"weights; layer widths {width_summary(result.array.layer_dims)}; n={args.n}; "
        f"batch {args.batch_size}; {args.num_workers} workers; "
        f"{224 if args.arch == 'resnet50' else args.image_size} px"
    )
    print(f"bare forward      {floor:9.1f} rows/s")
    print(f"extract loop      {loop:9.1f} rows/s   overhead {floor / loop:.3f}x (goal <= 1.10)")
    print(f"extract all in    {all_in:9.1f} rows/s   overhead {floor / all_in:.3f}x")


if __name__ == "__main__":
    main()
