"""An aligned model as an open_clip model: `model, preprocess, tokenizer = aligned.as_open_clip()`.

Tools written for open_clip models (LAION's CLIP_benchmark, clip-retrieval's inference) call

    images = torch.stack([preprocess(pil) for pil in pils]).to(device)
    tokens = tokenizer(["a photo of a cat.", ...]).to(device)
    model.encode_image(images), model.encode_text(tokens)     # then normalise and compare

and get here exactly what `AlignedModel.encode_image` / `encode_text` give (both are
`AlignedModel.project_batch` on the same collated batch):

- `preprocess(PIL image)`: the tensor extraction feeds the image encoder, one sample (its
  `prepare`; for Hugging Face image processors a resized, cropped uint8 (3, H, W) tensor, the
  rescaling and normalisation running batched inside `encode_image`);
- `tokenizer(texts)`: a LongTensor (B, K, T): the text encoder's K inputs (input ids, attention
  mask) stacked, so that `.to(device)` moves them all and nothing is inferred from padding;
- `encode_image` / `encode_text`: (B, d) float32 unit rows on the input's device (open_clip
  returns unnormalised features; tools normalise them, which changes nothing here);
- `logit_scale`: log(1 / temperature) of the run, and `forward(image, text)` returns
  `(image_features, text_features, logit_scale.exp())` as open_clip's CLIP does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch
from PIL import Image

from stages.datasets import to_rgb
from stages.encoders.arguments import ArgumentError, ArgumentTypeError, string_list

if TYPE_CHECKING:
    from stages.model import AlignedModel


def on_model_device(aligned: AlignedModel, side: str) -> None:
    """Follow the encoder's weights: `model.to(device)` moves them, and the batch must go where
    they are."""
    weights = next(aligned.encoders[side].model.parameters(), None)
    if weights is not None:
        aligned.device = weights.device


class Preprocess:
    """PIL image -> the tensor the image encoder's batches stack (extraction's `prepare`)."""

    def __init__(self, aligned: AlignedModel):
        self.prepare = aligned.encoders["image"].prepare
        self.spec = aligned.encoders["image"].spec

    def __call__(self, image: Image.Image) -> torch.Tensor:
        if not isinstance(image, Image.Image):
            raise ArgumentTypeError(f"preprocess takes a PIL image, not {type(image).__name__}")
        return self.prepare(to_rgb(image))

    def __repr__(self) -> str:
        return f"Preprocess({self.spec}: extraction's per-image preparation)"


class Tokenizer:
    """Texts -> (B, K, T) LongTensor: the text encoder's K collated inputs stacked."""

    def __init__(self, aligned: AlignedModel):
        self.collate = aligned.encoders["text"].collate
        self.keys = tuple(self.collate(["probe"]))  # input_ids, attention_mask, ...

    def __call__(self, texts: str | Sequence[str], context_length: int | None = None):
        """`context_length` is accepted for open_clip's signature; the text encoder's own
        tokenizer decides the length, as at extraction."""
        batch = self.collate(string_list(texts, "texts", single=True))
        return torch.stack([batch[k].long() for k in self.keys], dim=1)

    def unpack(self, tokens: Any) -> dict[str, torch.Tensor]:
        """The encoder's batch from what `__call__` gave (or a mapping of its inputs)."""
        if isinstance(tokens, Mapping):
            return {k: tokens[k] for k in self.keys}
        if not isinstance(tokens, torch.Tensor) or tokens.ndim != 3:
            shape = tuple(tokens.shape) if isinstance(tokens, torch.Tensor) else type(tokens)
            raise ArgumentError(
                f"encode_text takes what this model's tokenizer returns, a (B, {len(self.keys)}, "
                f"T) tensor of {', '.join(self.keys)}; got {shape}"
            )
        if tokens.shape[1] != len(self.keys):
            raise ArgumentError(f"tokens have {tokens.shape[1]} inputs, expected {self.keys}")
        return {k: tokens[:, i] for i, k in enumerate(self.keys)}


class OpenClipModel(torch.nn.Module):
    """The aligned model behind open_clip's interface (encode_image, encode_text, forward,
    logit_scale); its submodules are the two encoders and heads, so `.to()` and `.eval()`
    work as on any model."""

    def __init__(self, aligned: AlignedModel, tokenizer: Tokenizer):
        super().__init__()
        self.aligned, self.tokenizer = aligned, tokenizer
        self.image_encoder = aligned.encoders["image"].model
        self.text_encoder = aligned.encoders["text"].model
        self.image_head, self.text_head = aligned.heads["image"], aligned.heads["text"]
        scale = torch.tensor(math.log(1.0 / aligned.temperature), device=aligned.device)
        self.register_buffer("logit_scale", scale)

    def encode_image(self, image: torch.Tensor, normalize: bool = False) -> torch.Tensor:
        """(B, ...) preprocessed images -> (B, d) unit rows (normalize: already so)."""
        if not isinstance(image, torch.Tensor) or image.ndim < 2:
            raise ArgumentTypeError("encode_image takes a batch of preprocess() outputs, stacked")
        on_model_device(self.aligned, "image")
        batch = self.aligned.encoders["image"].collate(list(image))
        return self.aligned.project_batch("image", batch).to(image.device)

    def encode_text(self, text: Any, normalize: bool = False) -> torch.Tensor:
        """The tokenizer's output -> (B, d) unit rows (normalize: already so)."""
        batch = self.tokenizer.unpack(text)
        device = next(iter(batch.values())).device
        on_model_device(self.aligned, "text")
        return self.aligned.project_batch("text", batch).to(device)

    def forward(self, image: torch.Tensor | None = None, text: Any = None):
        image_features = self.encode_image(image) if image is not None else None
        text_features = self.encode_text(text) if text is not None else None
        return image_features, text_features, self.logit_scale.exp()


def open_clip_triple(aligned: AlignedModel) -> tuple[OpenClipModel, Preprocess, Tokenizer]:
    """`(model, preprocess, tokenizer)` of an aligned model (see the module docstring)."""
    tokenizer = Tokenizer(aligned)
    return OpenClipModel(aligned, tokenizer).eval(), Preprocess(aligned), tokenizer
