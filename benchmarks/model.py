"""The aligned model: encode_image against the full encoder's bare forward, and search latency.

    python -m benchmarks.model                                    # DINOv2-S, layer block.5 of 12
    python -m benchmarks.model --timm resnet50 --layer stage.3 --rows 0  # a CNN, 4 of 5 stages
    python -m benchmarks.model --image-model /work/models/dinov2-small --layer block.8
    python -m benchmarks.model --arch large --layer block.17 --images 256 --device cuda
    python -m benchmarks.model --rows 1000000 --dim 256            # search part only: --images 0

1. Throughput in images/s, in one process, on the same PIL images (224 px after the processor):
   the bare forward of the whole encoder on already preprocessed pixels (the baseline), the
   truncated forward alone, and `AlignedModel.encode_image` end to end (preprocessing, the
   truncated encoder, the head, L2 normalisation). The run is made up (random linear heads)
   around a real encoder directory, or, by default, a DINOv2 architecture of `--arch` size with
   random weights saved to a temporary directory, or (`--timm NAME`) a timm architecture such
   as a CNN with random weights saved to a safetensors file (the timings and sizes do not depend
   on the weights). Then the sizes of the encoder's weights as `export --with-encoders` writes
   them (cut after the chosen layer) against the whole encoder's.
2. Search latency over `--rows` unit embeddings of `--dim`: the exact FAISS IndexFlatIP that
   `index` builds below 2M rows, for one query and a batch of 100, against torch matmul + topk.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from stages.encoders import Encoder, family_of, load_encoder
from stages.encoders.base import model_input
from stages.encoders.precision import place_encoder
from stages.heads import build_head, save_run
from stages.index import make_index
from stages.model import AlignedModel, export_model
from stages.vectors import unit_rows_f32

ARCHS = {  # DINOv2 sizes: hidden, blocks, heads
    "small": (384, 12, 6),
    "base": (768, 12, 12),
    "large": (1024, 24, 16),
}


def best_seconds(fn: Callable[[], object], repeats: int, sync: Callable[[], None]) -> float:
    fn()  # warm-up
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - start)
    return min(times)


def random_dinov2(folder: Path, arch: str) -> str:
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    hidden, blocks, heads = ARCHS[arch]
    config = Dinov2Config(hidden_size=hidden, num_hidden_layers=blocks, num_attention_heads=heads)
    torch.manual_seed(0)
    Dinov2Model(config).save_pretrained(folder)
    processor = BitImageProcessor(size={"shortest_edge": 256}, crop_size=224, do_convert_rgb=True)
    processor.save_pretrained(folder)
    return str(folder)


def random_timm(folder: Path, name: str) -> tuple[str, str]:
    """A timm architecture with random weights in a safetensors file: (spec, weights file)."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(0)
    state = timm.create_model(name, pretrained=False, num_classes=0).state_dict()
    folder.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, folder / "weights.safetensors")
    return f"timm:{name}", str(folder / "weights.safetensors")


def made_up_run(
    folder: Path, image_model: str, layer: str, text_model: str, weights: str | None = None
) -> Path:
    """A run directory around real encoders: random linear heads to a 256-d space."""
    image, text = load_encoder(image_model, weights=weights), load_encoder(text_model)
    image_dim = image.layer_dims[image.layer_names.index(layer)]
    recorded = {"model_spec": image_model, "model_fingerprint": image.fingerprint()}
    config = {
        "image_model": image_model,
        "text_model": text_model,
        "image_layer": layer,
        "text_layer": text.layer_names[-1],
        "head": "linear",
        "image_dim": image_dim,
        "text_dim": text.dim,
        "out_dim": 256,
        "temperature": 0.05,
        "store_fingerprint": {
            "image": {**recorded, **({"weights": weights} if weights else {})},
            "text": {"model_fingerprint": text.fingerprint()},
        },
    }
    heads = [build_head("linear", config[f"{s}_dim"], 256) for s in ("image", "text")]
    return save_run(folder / "run", *heads, config)


def bare_pixels(encoder: Encoder, images: list[Image.Image]) -> torch.Tensor:
    """What a user of the whole model feeds it: the processor's (HF) or timm's eval transform's
    pixels, ready-made."""
    if family_of(encoder).name != "timm":  # Hugging Face models (the tiny ones too)
        return encoder.processor(images=images, return_tensors="pt")["pixel_values"]
    from timm.data import create_transform, resolve_model_data_config

    transform = create_transform(**resolve_model_data_config(encoder.model), is_training=False)
    return torch.stack([transform(image.convert("RGB")) for image in images])


def encode_benchmark(args: argparse.Namespace, tmp: Path) -> None:
    weights = None
    if args.timm:
        image_model, weights = random_timm(tmp / "timm", args.timm)
    else:
        image_model = args.image_model or random_dinov2(tmp / "vit", args.arch)
    layer = args.layer or ("stage.3" if args.timm else "block.5")
    run = made_up_run(tmp, image_model, layer, args.text_model, weights)
    model = AlignedModel.from_run(run, device=args.device)
    full = load_encoder(image_model, weights=weights)  # the same encoder, whole
    device = model.device
    place_encoder(full, device, model.precision)  # as the model's: precision, fused kernels
    cuda = device.type == "cuda"
    sync = torch.cuda.synchronize if cuda else (lambda: None)
    rng = np.random.default_rng(0)
    images = [
        Image.fromarray(rng.integers(0, 255, (300, 400, 3), dtype=np.uint8))
        for _ in range(args.images)
    ]
    encoder = model.encoders["image"]
    chunks = [images[i : i + args.batch_size] for i in range(0, len(images), args.batch_size)]
    batches = [
        {k: v.to(device) for k, v in encoder.collate([encoder.prepare(x) for x in c]).items()}
        for c in chunks
    ]
    # the baseline gets its pixels ready-made, as a user of the model would
    pixels = [model_input(bare_pixels(full, c).to(device), full.model) for c in chunks]
    timm_model = family_of(full).name == "timm"

    def bare_forward() -> None:
        with torch.inference_mode():
            for x in pixels:
                full.model(x) if timm_model else full.model(pixel_values=x)

    def truncated_forward() -> None:
        with torch.inference_mode():
            for batch in batches:
                encoder.embed(batch)

    kept, total = model.blocks["image"]
    unit = "stages" if encoder.pooling == "gap" else "blocks"
    print(f"image encoder {image_model}, layer {layer}: {kept} of {total} {unit} run")
    print(f"device {device}, torch threads {torch.get_num_threads()}, {args.images} images")
    base = best_seconds(bare_forward, args.repeats, sync)
    rows = [
        ("bare forward, whole encoder (baseline)", base),
        ("truncated forward + pooling", best_seconds(truncated_forward, args.repeats, sync)),
        (
            "encode_image end to end (PIL in)",
            best_seconds(lambda: model.encode_image(images, args.batch_size), args.repeats, sync),
        ),
    ]
    for name, seconds in rows:
        rate = args.images / seconds
        print(f"  {name:40} {rate:8.1f} img/s   {base / seconds:5.2f}x the baseline")
    info = export_model(run, tmp / "export", with_encoders=True)["image"]
    saved, whole = info["exported_bytes"], info["full_encoder_bytes"]
    print(
        f"  export --with-encoders: image encoder {saved / 1e6:.1f} MB "
        f"vs {whole / 1e6:.1f} MB whole ({saved / whole:.0%})"
    )


def search_benchmark(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    stored = unit_rows_f32(rng.standard_normal((args.rows, args.dim), dtype=np.float32))
    queries = unit_rows_f32(rng.standard_normal((100, args.dim), dtype=np.float32))
    start = time.perf_counter()
    index, kind, _ = make_index(stored)
    built = time.perf_counter() - start
    print(f"search over {args.rows:,} x {args.dim} embeddings: {kind}, built in {built:.2f} s")
    matrix = torch.from_numpy(stored)
    for n in (1, 100):
        q = queries[:n]
        faiss_s = best_seconds(lambda q=q: index.search(q, 10), args.repeats, lambda: None)
        torch_s = best_seconds(
            lambda q=q: (torch.from_numpy(q) @ matrix.T).topk(10, dim=1), args.repeats, lambda: None
        )
        print(
            f"  {n:3} queries, top 10: FAISS {1000 * faiss_s:8.1f} ms, "
            f"torch matmul + topk {1000 * torch_s:8.1f} ms ({torch_s / faiss_s:.2f}x FAISS's time)"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--image-model", default="", help="encoder directory or spec")
    parser.add_argument("--arch", choices=sorted(ARCHS), default="small")
    parser.add_argument("--timm", default="", help="a timm architecture instead (resnet50, ...)")
    parser.add_argument(
        "--layer", default="", help="the run's chosen image layer (block.5; stage.3 for --timm)"
    )
    parser.add_argument("--text-model", default="tiny-random-text")
    parser.add_argument("--images", type=int, default=64, help="0: skip the encoder part")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="auto")
    parser.add_argument("--rows", type=int, default=1_000_000, help="0: skip the search part")
    parser.add_argument("--dim", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    if args.images:
        with tempfile.TemporaryDirectory() as tmp:
            encode_benchmark(args, Path(tmp))
    if args.rows:
        search_benchmark(args)


if __name__ == "__main__":
    main()
