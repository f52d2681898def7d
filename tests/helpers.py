"""Small builders shared by the tests: synthetic feature stores with known contents."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from store import FeatureStore, write_manifest


def write_features(
    store_path: str | Path,
    dataset: str,
    split: str,
    modality: str,
    model: str,
    values: np.ndarray | Sequence[np.ndarray],
    layer_names: Sequence[str] | None = None,
    block_rows: int = 64,
    dtype: str = "float32",
) -> None:
    """Store an (N, L, D) array, or one (N, D_l) array per layer, as complete features, as
    `extract` would."""
    is_3d = isinstance(values, np.ndarray) and values.ndim == 3
    layers = [values[:, i] for i in range(values.shape[1])] if is_3d else list(values)
    n, dims = len(layers[0]), [x.shape[1] for x in layers]
    names = list(layer_names) if layer_names else [f"layer.{i}" for i in range(len(layers))]
    store = FeatureStore(store_path, create=True)
    array = store.create(
        dataset,
        split,
        modality,
        model,
        n,
        names,
        dims,
        dtype,
        block_rows,
        {"model_id": model, "pooling": "synthetic"},
    )
    for block in range(array.n_blocks):
        array.write_block(block, [x[array.block_slice(block)] for x in layers])


def write_old_layout(
    root: str | Path, path: str, values: np.ndarray, layer_names: Sequence[str], block_rows: int
) -> None:
    """Complete float16 features in the layout before per-layer widths, as the store wrote
    them: one (N, L, D) array `features`, shards (block_rows, L, D) of inner chunks
    (block_rows, 1, D), attributes on that array. `path` is dataset/split/modality/model."""
    import zarr

    dataset, split, modality, model = path.split("/")
    group = zarr.open_group(root, mode="a", zarr_format=3).require_group(path)
    n, n_layers, dim = values.shape
    attrs = {"dataset": dataset, "split": split, "modality": modality, "model": model,
             "layer_names": list(layer_names), "dtype": "float16",
             "block_rows": block_rows}  # fmt: skip
    data = group.create_array(
        "features", shape=values.shape, shards=(block_rows, n_layers, dim),
        chunks=(block_rows, 1, dim), dtype="float16", fill_value=np.nan, compressors=None,
        attributes=attrs,
    )  # fmt: skip
    data[:] = values
    done = group.create_array("complete", shape=(-(-n // block_rows),), chunks=(1,), dtype="uint8")
    done[:] = 1


def write_pairs_manifest(
    store_path: str | Path,
    dataset: str,
    split: str,
    n_images: int,
    captions_per_image: int = 1,
    labels: Sequence[int] | None = None,
    label_names: Sequence[str] | None = None,
) -> pd.DataFrame:
    """A manifest of n_images images with captions_per_image captions each (text rows grouped
    by image: image i has text rows i*c .. i*c + c - 1)."""
    image_row = np.repeat(np.arange(n_images), captions_per_image)
    label = np.asarray(labels)[image_row] if labels is not None else np.full(len(image_row), -1)
    names = [label_names[i] if label_names is not None and i >= 0 else "" for i in label]
    table = pd.DataFrame(
        {
            "image_row": image_row,
            "sample_id": [f"img{i}" for i in image_row],
            "image_path": [f"synthetic://{i}" for i in image_row],
            "caption": [f"caption {t} of image {i}" for t, i in enumerate(image_row)],
            "label": label,
            "label_name": names,
        }
    )
    return write_manifest(
        FeatureStore(store_path, create=True).manifest_path(dataset, split), table
    )


def write_prompts_manifest(
    store_path: str | Path, dataset: str, label_names: Sequence[str], templates: Sequence[str]
) -> pd.DataFrame:
    """A text-only `prompts` split: every class name in every template."""
    rows = [(c, name, t.format(name)) for c, name in enumerate(label_names) for t in templates]
    table = pd.DataFrame(
        {
            "image_row": -1,
            "sample_id": [f"class{c}" for c, _, _ in rows],
            "caption": [text for _, _, text in rows],
            "label": [c for c, _, _ in rows],
            "label_name": [name for _, name, _ in rows],
        }
    )
    return write_manifest(
        FeatureStore(store_path, create=True).manifest_path(dataset, "prompts"), table
    )


def save_tiny_resnet(directory: Path) -> Path:
    """A 4-stage Hugging Face ResNet with RANDOM (seeded) weights and stage widths 8, 16, 24,
    32 (the stem 8), and the image processor of microsoft/resnet-50 at 32 px, saved with
    save_pretrained: a CNN whose layers differ in width, loaded like a user's local model."""
    from transformers import ConvNextImageProcessor, ResNetConfig, ResNetModel

    config = ResNetConfig(
        embedding_size=8, hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1], layer_type="basic"
    )
    torch.manual_seed(0)
    ResNetModel(config).save_pretrained(directory)
    ConvNextImageProcessor(size={"shortest_edge": 32}, crop_pct=0.875).save_pretrained(directory)
    return directory


def save_random_timm(name: str, path: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A timm architecture with seeded RANDOM weights and a 10-class classifier (as a user's
    fine-tuned checkpoint has), saved as safetensors."""
    import timm
    from safetensors.torch import save_file

    torch.manual_seed(seed)
    state = timm.create_model(name, pretrained=False, num_classes=10).state_dict()
    state = {k: v.contiguous() for k, v in state.items()}
    save_file(state, path)
    return state


def save_tiny_hf_maps(kind: str, directory: Path) -> Path:
    """A tiny Hugging Face ConvNeXt or Swin (4 stages, RANDOM seeded weights) and an image
    processor, saved with save_pretrained."""
    from transformers import (
        ConvNextConfig,
        ConvNextModel,
        SwinConfig,
        SwinModel,
        ViTImageProcessor,
    )

    torch.manual_seed(0)
    if kind == "convnext":
        model = ConvNextModel(ConvNextConfig(hidden_sizes=[8, 16, 24, 32], depths=[1, 1, 1, 1]))
    else:
        config = SwinConfig(image_size=32, patch_size=2, embed_dim=8, depths=[1, 1, 1, 1],
                            num_heads=[1, 1, 1, 1], window_size=2)  # fmt: skip
        model = SwinModel(config)
    model.save_pretrained(directory)
    ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(directory)
    return directory


def files(root: Path) -> dict[str, bytes]:
    """Every file under root, by relative path: to compare stores byte for byte."""
    return {str(f.relative_to(root)): f.read_bytes() for f in root.rglob("*") if f.is_file()}


def run_cli(args: Sequence[str], capsys) -> tuple[int, str, str]:
    """Run `python -m pipeline ARGS` in-process: (exit code, stdout, stderr)."""
    import sys

    from pipeline.app import main

    argv = sys.argv
    sys.argv = ["pipeline", *map(str, args)]
    try:
        main()
        code = 0
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else 1
    finally:
        sys.argv = argv
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def one_line_error(stderr: str) -> str:
    """The single `error: ...` line of a failed command (progress bars may precede it)."""
    assert "Traceback" not in stderr, stderr
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, stderr
    return errors[0]


def fill_disk_after(monkeypatch, chunk_writes: int) -> None:
    """Make the local store refuse (ENOSPC) every feature chunk write after the first
    `chunk_writes`, until `monkeypatch.undo()`: a disk filling up in the middle of a run."""
    import errno

    import zarr.storage._local as local

    real_put, writes = local._put, []

    def filling(path, value, exclusive=False):
        if "/layers/" in str(path) and "/c/" in str(path):
            writes.append(path)
            if len(writes) > chunk_writes:
                raise OSError(errno.ENOSPC, "No space left on device")
        return real_put(path, value, exclusive=exclusive)

    monkeypatch.setattr(local, "_put", filling)
