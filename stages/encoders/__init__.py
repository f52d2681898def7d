"""Encoders: a model spec by name -> a frozen encoder that returns every layer's pooled embedding.

A spec is claimed by one registered family (`FAMILIES`, `register_family`):
  - `tiny` (stages.encoders.tiny): `tiny-random-vit` / `tiny-random-text`, offline encoders with
    RANDOM weights (tests, demo);
  - `timm` (stages.encoders.timm_models): `timm:<name>` (timm's pretrained weights, or a local
    file given as `weights`);
  - `hf` (stages.encoders.huggingface): an alias of `ALIASES` (`dinov2` = DINOv2 ViT-L/14,
    `roberta-large`, `minilm`, ...), any Hugging Face id (`org/name`) or a local directory in
    `save_pretrained` layout.
Each family knows how to load, pool, cut (run only up to a layer), save and load again its
models; nothing outside it looks at a spec's string. Raw inputs reach an encoder through
`stages.encoders.inputs` (per-sample preparation in DataLoader workers, collation, batches,
the fall-back when workers fail), the one path of both extraction and the aligned model;
`stages.encoders.arguments` checks them as users give them (images, texts, class names).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from stages.encoders import huggingface, timm_models, tiny  # noqa: F401  (register the families)
from stages.encoders.base import (
    FAMILIES,
    SAVED_WEIGHTS,
    Encoder,
    EncoderFamily,
    blocks_needed,
    cls_token,
    family_for_spec,
    family_of,
    load_weights,
    masked_mean,
    register_family,
    spatial_mean,
)
from stages.encoders.fold import unfuse
from stages.encoders.huggingface import ALIASES
from stages.encoders.tiny import TINY
from store.errors import UserError

__all__ = [
    "ALIASES",
    "FAMILIES",
    "SAVED_WEIGHTS",
    "Encoder",
    "EncoderFamily",
    "cls_token",
    "family_of",
    "known_models",
    "load_encoder",
    "load_saved_encoder",
    "masked_mean",
    "register_family",
    "save_encoder",
    "spatial_mean",
    "truncate_encoder",
]


def known_models() -> list[str]:
    return sorted(ALIASES) + sorted(TINY)


def load_encoder(
    spec: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    weights: str | None = None,
) -> Encoder:
    """Resolve a model spec (see the module docstring) to a frozen encoder on the CPU;
    `weights`: a local weights file for a family that takes one (timm:NAME)."""
    family = family_for_spec(spec)
    if family is None and spec.startswith(("/", "./", "../", "~")):
        raise UserError(f"model directory {spec} does not exist")
    if family is None:
        raise UserError(
            f"unknown model {spec!r}; known: {', '.join(known_models())}; or a Hugging Face id "
            "(org/name), a local model directory, or timm:<name>"
        )
    if weights and not family.takes_weights:
        raise UserError(f"--weights is for timm:<name> models; {spec!r} is not one")
    return family.load(spec, revision, trust_remote_code, weights)


def truncate_encoder(encoder: Encoder, layer: int) -> int:
    """Drop, in place, the blocks (or stages) after the one that computes
    `encoder.layer_names[layer]`, so they are never run. The kept ones are a prefix, so
    `encoder.embed(batch)[layer]` stays that layer with extraction's pooling. Returns the number
    of blocks or stages still run; a second call for a layer still computed changes nothing."""
    # the layer names are blocks + final_norm, embeddings + layers, or stages + final
    n_blocks = len(encoder.layer_names) - 1
    keep = blocks_needed(encoder.layer_names[layer], n_blocks)
    if encoder.blocks_run is not None:
        if keep > encoder.blocks_run:
            raise ValueError(f"{encoder.spec} was cut before {encoder.layer_names[layer]}")
        return encoder.blocks_run
    if keep >= n_blocks:
        encoder.blocks_run = n_blocks
    else:
        encoder.blocks_run = family_of(encoder).cut(encoder, keep)
    return encoder.blocks_run


def save_encoder(encoder: Encoder, folder: Path) -> dict[str, Any]:
    """Write the encoder as it is now (cut by `truncate_encoder`) into `folder` (safetensors
    weights, and what its family needs besides: config, processor or tokenizer files). Returns
    what rebuilds it, for the export's config.json: its family and the family's recipe."""
    unfuse(encoder)  # the modules and weights as loaded, whatever placing fused
    return {"family": encoder.family, **family_of(encoder).save(encoder, folder)}


def load_saved_encoder(
    folder: Path, layer: str, recipe: dict[str, Any], trust_remote_code: bool
) -> Encoder:
    """An encoder written by `save_encoder`: its family builds the architecture with random
    weights (nothing downloaded), it is cut at `layer` as it was when saved, then the saved
    weights are loaded into it; every tensor must fit."""
    name = recipe.get("family")
    if name not in FAMILIES:
        raise UserError(
            f"{folder}: the export names encoder family {name!r}, which this version does not "
            f"know (known: {', '.join(FAMILIES)})"
        )
    family = FAMILIES[name]
    encoder = family.load_saved(folder, recipe, trust_remote_code)
    if layer not in encoder.layer_names:
        raise UserError(f"{folder} has no layer {layer!r} (its layers: {encoder.layer_names})")
    truncate_encoder(encoder, encoder.layer_names.index(layer))
    load_weights(encoder.model, folder / SAVED_WEIGHTS, family.optional_tensors)
    return encoder
