"""What every encoder family shares: the `Encoder` it builds, the `EncoderFamily` contract, the
registry of families, and the small pure pooling and normalising pieces.

A family is one class that knows, for the models it claims, how to load them, pool their layers,
cut them after a layer, save them (cut) and load them again from what it saved. Register one
with `@register_family`; families registered later are asked first whether they claim a spec,
so a new family can take specs from the catch-all Hugging Face one.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from store.errors import UserError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
SAVED_WEIGHTS = "model.safetensors"


@dataclass
class Encoder:
    """A frozen model plus the two functions that feed it: `prepare` (per sample, in DataLoader
    workers) and `collate` (per batch), and `embed` (batch -> one pooled (B, D_l) per layer).
    `family` names the `EncoderFamily` that built it (see `family_of`)."""

    spec: str
    model_id: str
    revision: str
    modality: str
    pooling: str
    layer_names: list[str]
    layer_dims: list[int]  # the width of each layer (CNN stages differ: 64, 128, ...)
    model: torch.nn.Module
    prepare: Callable[[Any], Any]
    collate: Callable[[list[Any]], dict[str, torch.Tensor]]
    embed: Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]
    config: dict[str, Any] = field(default_factory=dict)
    processor: Any = None  # the HF image processor or tokenizer (saved by `export`)
    blocks_run: int | None = None  # set by `truncate_encoder`: the blocks / stages still run
    family: str = "hf"
    # modules replaced by stages.encoders.fold (batch norms folded for inference), by name
    unfolded: dict[str, torch.nn.Module] = field(default_factory=dict)

    @property
    def dim(self) -> int:
        """The width of the last layer (the model's usual embedding)."""
        return self.layer_dims[-1]

    def fingerprint(self) -> str:
        """Hash of the architecture and all weights: a changed model never mixes into a store."""
        digest = hashlib.blake2b(digest_size=16)
        digest.update(json.dumps(self.config, sort_keys=True, default=str).encode())
        for name, tensor in self.model.state_dict().items():
            digest.update(name.encode())
            digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
        return digest.hexdigest()


class EncoderFamily:
    """The contract of one family of encoders (Hugging Face, timm, the tiny demo encoders)."""

    name: ClassVar[str]
    takes_weights: ClassVar[bool] = False  # accepts a local weights file (`--weights`)
    optional_tensors: ClassVar[tuple[str, ...]] = ()  # saved weights may lack these prefixes

    def claims(self, spec: str) -> bool:
        """Whether this family loads the model spec `spec`."""
        raise NotImplementedError

    def load(
        self,
        spec: str,
        revision: str | None = None,
        trust_remote_code: bool = False,
        weights: str | None = None,
    ) -> Encoder:
        """The frozen encoder of `spec` on the CPU, every layer pooled as extraction stores it."""
        raise NotImplementedError

    def cut(self, encoder: Encoder, keep: int) -> int:
        """Drop, in place, the blocks or stages after the first `keep` (the layer names are a
        prefix of the encoder's), so they never run; return how many still run."""
        return len(encoder.layer_names) - 1  # a family that cannot cut runs whole: still correct

    def save(self, encoder: Encoder, folder: Path) -> dict[str, Any]:
        """Write the encoder as it is now (cut) into `folder` (safetensors, no pickle); return
        what else rebuilds it offline (recorded in the export's config.json)."""
        raise NotImplementedError

    def load_saved(self, folder: Path, recipe: dict[str, Any], trust_remote_code: bool) -> Encoder:
        """The architecture of an encoder written by `save`, with random weights (nothing
        downloaded), ready for `cut` and the saved weights."""
        raise NotImplementedError

    def preprocessing(self, encoder: Encoder) -> dict[str, Any]:
        """What turns a raw input into the model's input, as JSON: an export records it, and a
        loaded export must give the same (its processor or tokenizer files are what it read)."""
        return {}


FAMILIES: dict[str, EncoderFamily] = {}


def register_family(cls: type[EncoderFamily]) -> type[EncoderFamily]:
    """Class decorator: add a family to the registry under `cls.name`."""
    FAMILIES[cls.name] = cls()
    return cls


def family_of(encoder: Encoder) -> EncoderFamily:
    if encoder.family not in FAMILIES:
        raise UserError(
            f"{encoder.spec}: unknown encoder family {encoder.family!r} "
            f"(known: {', '.join(FAMILIES)})"
        )
    return FAMILIES[encoder.family]


def family_for_spec(spec: str) -> EncoderFamily | None:
    """The family that claims `spec`: the most recently registered first."""
    for family in reversed(FAMILIES.values()):
        if family.claims(spec):
            return family
    return None


# -- pooling: small pure functions ------------------------------------------------------------
def cls_token(hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, D) token states -> (B, D) CLS; (B, C, H, W) conv maps -> (B, C) spatial mean."""
    return hidden[:, 0] if hidden.ndim == 3 else spatial_mean(hidden)


def spatial_mean(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature maps -> (B, C): global average pooling, a CNN's usual embedding,
    summed in float32 (bf16 maps are not copied to float32 first)."""
    return maps.mean(dim=(2, 3), dtype=torch.float32)


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: (B, T, D), (B, T) -> (B, D), computed in float32."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


def device_normaliser(
    scale: float, mean: Sequence[float], std: Sequence[float]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """(batch * scale - mean) / std per channel, on the batch's device, as one multiply-add
    (batch * (scale / std) + (-mean / std): one pass over the pixels, not three)."""
    std_t = torch.tensor(std, dtype=torch.float64).view(1, 3, 1, 1)
    factor = (scale / std_t).float()
    shift = (-torch.tensor(mean, dtype=torch.float64).view(1, 3, 1, 1) / std_t).float()
    on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def to_pixels(batch: torch.Tensor) -> torch.Tensor:
        # copied to the device once: a copy per batch would wait for the GPU every time
        if batch.device not in on_device:
            on_device[batch.device] = (factor.to(batch.device), shift.to(batch.device))
        factor_d, shift_d = on_device[batch.device]
        return torch.addcmul(shift_d, batch.float(), factor_d)

    return to_pixels


def model_input(pixels: torch.Tensor, model: torch.nn.Module) -> torch.Tensor:
    """Pixels in the dtype and memory format of the model's weights as placed
    (`stages.encoders.precision.place_encoder`: bf16, channels-last CNNs)."""
    weight = next((p for p in model.parameters() if p.ndim == 4), None)
    if weight is None:
        weight = next(model.parameters())
    nhwc = weight.ndim == 4 and not weight.is_contiguous()
    nhwc = nhwc and weight.is_contiguous(memory_format=torch.channels_last)
    layout = torch.channels_last if nhwc else torch.contiguous_format
    return pixels.to(dtype=weight.dtype, memory_format=layout)


def stack_pixels(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """The collation of every image family: prepared (3, H, W) tensors -> one batch. Images
    that are (H, W, 3) in memory (PILToTensor's view) make a channels-last batch. Stacked by
    numpy: torch.stack of uint8 images ran 500x slower here (torch 2.14, CPU)."""
    first = items[0]
    hwc = first.ndim == 3 and not first.is_contiguous() and first.permute(1, 2, 0).is_contiguous()
    if not hwc:
        return {"pixel_values": torch.from_numpy(np.stack([item.numpy() for item in items]))}
    stacked = np.stack([item.permute(1, 2, 0).numpy() for item in items])
    return {"pixel_values": torch.from_numpy(stacked).permute(0, 3, 1, 2)}


def probe_widths(encoder: Encoder) -> list[int]:
    """Each layer's width, from one blank image through the encoder's own path (for models
    whose stage widths are not one config field: CNNs, Swin)."""
    blank = Image.new("RGB", (64, 64))
    with torch.inference_mode():
        return [int(t.shape[1]) for t in encoder.embed(encoder.collate([encoder.prepare(blank)]))]


def blocks_needed(layer_name: str, n_blocks: int) -> int:
    """How many blocks (transformers) or stages (CNNs, Swin; the stem is `stage.0`) compute the
    stored layer `layer_name`: `block.i`, `layer.i` and `stage.i` need i + 1, `embeddings`
    none, `final_norm` / `final` (or an unknown name) all of them."""
    kind, _, number = layer_name.rpartition(".")
    if kind in ("block", "layer", "stage") and number.isdigit():
        return int(number) + 1
    return 0 if layer_name == "embeddings" else n_blocks


def download_hint(model_id: str, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"cannot load model {model_id!r} ({first[:200]}). Without network access, download it "
        f"on a connected machine first (`hf download {model_id}` into the HF cache, or "
        "`save_pretrained` to a directory) and pass that local directory as --model"
    )


def as_json(value: Any) -> Any:
    """`value` as JSON gives it back (tuples as lists, other objects as strings)."""
    return json.loads(json.dumps(value, default=str))


def save_weights(model: torch.nn.Module, path: Path) -> None:
    """The model's tensors as safetensors; a failed write (disk full, ulimit -f) is an OSError."""
    from safetensors.torch import save_model

    try:
        save_model(model, str(path), metadata={"format": "pt"})
    except OSError:
        raise
    except Exception as err:  # safetensors reports a failed write as its own error type
        code = re.search(r"os error (\d+)", str(err))
        number = int(code.group(1)) if code else errno.EIO
        raise OSError(number, os.strerror(number), str(path)) from err


def load_weights(model: torch.nn.Module, path: Path, allow_missing: tuple[str, ...] = ()) -> None:
    """Saved weights into the (cut) architecture; every tensor must fit (those whose names
    start with `allow_missing` may be absent)."""
    from safetensors.torch import load_model

    unfit = f"{path} does not fit its architecture"
    try:
        missing, unexpected = load_model(model, str(path), strict=False)
    except (RuntimeError, OSError) as err:  # a tensor of another shape, an unreadable file
        first = " ".join(str(err).strip().splitlines()[:2])[:200]
        raise UserError(f"{unfit}: {first}") from err
    missing = [k for k in missing if not k.startswith(allow_missing)] if allow_missing else missing
    if missing or unexpected:
        raise UserError(f"{unfit}: missing {missing[:3]}, unexpected {unexpected[:3]}")
