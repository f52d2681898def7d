"""The tiny demo family: two offline encoders with RANDOM (seeded) weights for tests and the demo,
`tiny-random-vit` and `tiny-random-text`. They are Hugging Face architectures, so they cut, save
and load again as that family does; only how they are made differs."""

from __future__ import annotations

from stages.encoders.base import IMAGENET_MEAN, IMAGENET_STD, Encoder, register_family
from stages.encoders.huggingface import HuggingFaceFamily, hf_image_encoder, hf_text_encoder


def tiny_random_vit(spec: str) -> Encoder:
    """A 4-block DINOv2 architecture (32 px, width 64) with seeded RANDOM weights."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    config = Dinov2Config(
        image_size=32,
        patch_size=8,
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        mlp_ratio=2,
    )
    torch.manual_seed(0)
    model = Dinov2Model(config).eval().requires_grad_(False)
    processor = BitImageProcessor(
        size={"shortest_edge": 32},
        crop_size={"height": 32, "width": 32},
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    )
    return hf_image_encoder(spec, model, processor, revision="random-init-seed-0")


def tiny_random_text(spec: str) -> Encoder:
    """A 4-layer BERT architecture (width 64) with seeded RANDOM weights and a byte-level
    tokenizer (ByT5's, which needs no download)."""
    import torch
    from transformers import BertConfig, BertModel, ByT5Tokenizer

    tokenizer = ByT5Tokenizer()
    config = BertConfig(
        vocab_size=len(tokenizer),
        hidden_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        intermediate_size=128,
        max_position_embeddings=256,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(0)
    model = BertModel(config, add_pooling_layer=False).eval().requires_grad_(False)
    return hf_text_encoder(spec, model, tokenizer, revision="random-init-seed-0")


TINY = {"tiny-random-vit": tiny_random_vit, "tiny-random-text": tiny_random_text}


@register_family
class TinyRandomFamily(HuggingFaceFamily):
    """`tiny-random-vit`, `tiny-random-text`: made in memory, nothing downloaded."""

    name = "tiny"

    def claims(self, spec: str) -> bool:
        return spec in TINY

    def load(self, spec, revision=None, trust_remote_code=False, weights=None) -> Encoder:
        encoder = TINY[spec](spec)
        encoder.family = self.name
        return encoder
