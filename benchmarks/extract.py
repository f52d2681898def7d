"""Extraction throughput against the machine's limit: a roofline, the bare forward, the whole
`extract` command, and (with --baseline) an older checkout's `extract` on the same data.

The model is a real-size architecture with random weights (no download): DINOv2 (`small`,
`base`, `large`) saved to a temporary directory and loaded through the Hugging Face code path,
like a user's local model, or a timm CNN (`resnet50`, `efficientnet_lite0`) saved to a
safetensors file and loaded with `timm:NAME --weights FILE`. The data are N random JPEG files
listed in a pairs CSV, so decoding and preprocessing are real.

    python -m benchmarks.extract --arch small --n 128                            # CPU
    python -m benchmarks.extract --arch efficientnet_lite0 --n 256 --baseline /path/to/main
    python -m benchmarks.extract --arch large --n 8192 --batch-size 256 --num-workers 12  # GPU

Prints, all measured in this run:
  - the matmul rate (2048 x 2048) in float32 and in the compute dtype (the roofline's roof);
  - the model's FLOPs per image (torch.utils.flop_counter on one batch of its extraction path);
  - rows/s and achieved GFLOPS (and the share of the matmul rate) of the bare forward over one
    pre-made batch on the device (placed as extraction places it: precision, channels-last,
    folded norms), of the encoder's `embed` on that batch (every layer pooled), and of
    `python -m pipeline extract` (its loop: decoding, preprocessing, pooling, store writes;
    model loading excluded);
  - with --baseline DIR: the same `extract` command run from the checkout DIR (e.g. the main
    branch before a change; its own defaults), alternated --repeats times with this one, and
    the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from PIL import Image

from stages.device import resolve_device
from stages.encoders import load_encoder
from stages.encoders.precision import DTYPES, place_encoder, resolve_precision

ROOT = Path(__file__).resolve().parents[1]
ARCHS = {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16)}
TIMM = ("resnet50", "efficientnet_lite0")


def save_random_dinov2(arch: str, directory: Path, image_size: int) -> None:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    hidden, blocks, heads = ARCHS[arch]
    config = Dinov2Config(
        hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads, patch_size=14
    )
    Dinov2Model(config).save_pretrained(directory)
    crop = {"height": image_size, "width": image_size}
    BitImageProcessor(size={"shortest_edge": 256}, crop_size=crop).save_pretrained(directory)


def save_random_timm(name: str, path: Path) -> None:
    import timm
    from safetensors.torch import save_file

    model = timm.create_model(name, pretrained=False)
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


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def timed_rate(step, units: float, device: torch.device, repeats: int) -> float:
    """units/s of `step` (after one warm-up call)."""
    step()
    sync(device)
    started = time.perf_counter()
    for _ in range(repeats):
        step()
    sync(device)
    return units * repeats / (time.perf_counter() - started)


def matmul_gflops(dtype: torch.dtype, device: torch.device, size: int = 2048) -> float:
    a = torch.randn(size, size, device=device).to(dtype)
    b = torch.randn(size, size, device=device).to(dtype)
    repeats = 50 if device.type == "cuda" else 5
    return timed_rate(lambda: a @ b, 2 * size**3 / 1e9, device, repeats)


def forward_path(encoder, pixels: torch.Tensor, spec: str):
    """The plain forward of the model (no hidden states kept, no pooling), in its dtype and
    layout as placed."""
    from stages.encoders.base import model_input

    model = encoder.model
    if spec.startswith("timm:"):
        return lambda: model(model_input(pixels.float() / 255, model))
    return lambda: model(pixel_values=model_input(pixels.float(), model))


def flops_per_row(step, rows: int) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        step()
    return counter.get_total_flops() / rows


def run_extract(checkout: Path, model: str, pairs: Path, store: Path, args, extra: list[str]):
    """rows/s of `python -m pipeline extract` run from `checkout` (the embedding loop, as the
    command prints it)."""
    command = [
        sys.executable, "-m", "pipeline", "--params", "/dev/null", "extract", "--model", model,
        "--source", f"pairs:{pairs}", "--dataset", "bench", "--store", str(store),
        "--batch-size", str(args.batch_size), "--num-workers", str(args.num_workers),
        "--device", args.device, "--no-progress", *extra,
    ]  # fmt: skip
    path = os.pathsep.join(filter(None, [str(checkout), os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "PYTHONPATH": path}  # the checkout's code first, the user's path kept
    done = subprocess.run(command, cwd=checkout, env=env, capture_output=True, text=True)
    found = re.search(r"\(([\d.]+) rows/s", done.stdout)
    if done.returncode or not found:
        raise SystemExit(f"extract from {checkout} failed:\n{done.stdout}\n{done.stderr}")
    return float(found.group(1))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", choices=[*sorted(ARCHS), *TIMM], default="small")
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--num-workers", type=int, default=2)
    parser.add_argument("--image-size", type=int, default=224)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--precision", default="auto", help="fp32, bf16 or auto")
    parser.add_argument("--baseline", type=Path, help="a checkout whose extract to compare")
    parser.add_argument("--repeats", type=int, default=2, help="extract runs of each checkout")
    args = parser.parse_args()
    device = resolve_device(args.device)
    precision = resolve_precision(args.precision, device)
    dtype = DTYPES[precision]

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        weights = ""
        if args.arch in TIMM:  # timm's preprocessing for the model: 224 px crops
            model, weights = f"timm:{args.arch}", str(tmp / f"{args.arch}.safetensors")
            save_random_timm(args.arch, Path(weights))
        else:
            model = str(tmp / f"dinov2-{args.arch}-random")
            save_random_dinov2(args.arch, Path(model), args.image_size)
        pairs = write_pairs(tmp, args.n)

        roof = {"float32": matmul_gflops(torch.float32, device)}
        roof[str(dtype).removeprefix("torch.")] = matmul_gflops(dtype, device)
        encoder = load_encoder(model, weights=weights or None)
        images = [Image.open(tmp / f"img/{i}.jpg").convert("RGB") for i in range(args.batch_size)]
        batch = encoder.collate([encoder.prepare(im) for im in images])
        with torch.inference_mode():  # the model as loaded: fused kernels count no FLOPs
            flops = flops_per_row(partial(encoder.embed, batch), args.batch_size)
        place_encoder(encoder, device, precision)
        batch = {k: v.to(device) for k, v in batch.items()}
        forward = forward_path(encoder, batch["pixel_values"], model)
        n_batches = max(1, args.n // args.batch_size)
        with torch.inference_mode():
            bare = timed_rate(forward, args.batch_size, device, n_batches)
            embed = timed_rate(partial(encoder.embed, batch), args.batch_size, device, n_batches)
        del encoder, forward  # the extract runs below load their own

        runs: dict[str, list[float]] = {"this": [], "baseline": []}
        weights_flag = ["--weights", weights] if weights else []
        for i in range(args.repeats):  # alternated: a machine's load drifts
            if args.baseline:
                store = tmp / f"base{i}.zarr"
                rate = run_extract(args.baseline, model, pairs, store, args, weights_flag)
                runs["baseline"].append(rate)
            extra = ["--precision", precision, *weights_flag]
            runs["this"].append(run_extract(ROOT, model, pairs, tmp / f"s{i}.zarr", args, extra))

    best = roof[str(dtype).removeprefix("torch.")]
    print(
        f"device {device}; {args.arch} random weights; precision {precision}; n={args.n}; "
        f"batch {args.batch_size}; {args.num_workers} workers; {os.cpu_count()} CPUs"
    )
    print("matmul 2048^2    " + "   ".join(f"{k} {v:7.1f} GFLOPS" for k, v in roof.items()))
    print(f"model            {flops / 1e9:7.2f} GFLOPs per image (extraction path)")

    def line(name: str, rate: float) -> str:
        achieved = rate * flops / 1e9
        return (
            f"{name:<16} {rate:7.1f} rows/s  {achieved:7.1f} GFLOPS = "
            f"{achieved / best:5.1%} of the {precision} matmul"
        )

    print(line("bare forward", bare))
    print(line("embed", embed) + "   (every layer pooled: extraction's path, no data loading)")
    this = statistics.median(runs["this"])
    print(line("extract loop", this) + f"   (runs: {', '.join(f'{r:.1f}' for r in runs['this'])})")
    if args.baseline:
        base = statistics.median(runs["baseline"])
        print(
            line("baseline loop", base)
            + f"   (runs: {', '.join(f'{r:.1f}' for r in runs['baseline'])}; {args.baseline})"
        )
        print(f"speed-up         {this / base:7.2f}x this checkout's extract over the baseline's")


if __name__ == "__main__":
    main()
