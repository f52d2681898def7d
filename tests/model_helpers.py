"""Runs of the aligned model made in seconds: the tiny random encoders and random heads, no
extraction or training (the model's checks need a run, not a good one)."""

from __future__ import annotations

from pathlib import Path

import torch

from stages.encoders import load_encoder
from stages.heads import build_head, save_run

IMAGE, TEXT = "tiny-random-vit", "tiny-random-text"


def tiny_run(folder: Path, head: str = "linear", out_dim: int = 8) -> Path:
    """A run directory on block.1 / layer.1 of the tiny encoders with seeded random heads."""
    image, text = load_encoder(IMAGE), load_encoder(TEXT)
    config = {
        "image_model": IMAGE, "text_model": TEXT, "image_layer": "block.1",
        "text_layer": "layer.1", "head": head, "image_dim": 64, "text_dim": 64,
        "out_dim": out_dim, "hidden_dim": 16, "temperature": 0.05,
        "store_fingerprint": {
            "image": {"model_spec": IMAGE, "model_fingerprint": image.fingerprint()},
            "text": {"model_spec": TEXT, "model_fingerprint": text.fingerprint()},
        },
    }  # fmt: skip
    torch.manual_seed(0)
    heads = [build_head(head, 64, out_dim, 16) for _ in ("image", "text")]
    return save_run(folder, *heads, config)
