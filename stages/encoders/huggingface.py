"""The Hugging Face family: any hub id (`org/name`), an alias of `ALIASES`, or a local directory
in `save_pretrained` layout.

Image transformers (ViT, DINOv2): the CLS token of every block (`block.i`) and of the normalised
output (`final_norm`). Hierarchical models (ResNet, ConvNeXt, Swin: a `depths` config): the
spatial mean of every stage's (B, C, H, W) map, the stem first (`stage.i`), and the model's
pooled output (`final`). Text models: the attention-masked mean of every hidden state, the
embedding output first (`embeddings`, then `layer.i`).
"""

from __future__ import annotations

import pickle
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from stages.encoders.base import (
    SAVED_WEIGHTS,
    Encoder,
    EncoderFamily,
    as_json,
    cls_token,
    device_normaliser,
    download_hint,
    masked_mean,
    model_input,
    probe_widths,
    register_family,
    save_weights,
    spatial_mean,
    stack_pixels,
)
from store.errors import UserError

ALIASES = {
    "dinov2": "facebook/dinov2-large",
    "dinov2-small": "facebook/dinov2-small",
    "dinov2-base": "facebook/dinov2-base",
    "dinov2-large": "facebook/dinov2-large",
    "dinov2-giant": "facebook/dinov2-giant",
    "roberta-large": "sentence-transformers/all-roberta-large-v1",
    "minilm": "sentence-transformers/all-MiniLM-L6-v2",
}
HF_STAGE_LISTS = ("encoder.stages", "encoder.layers")  # ResNet and ConvNeXt; Swin
# a text probe whose token ids an export records: a tokenizer read from other files differs
TOKENIZER_PROBE = "A photo of a 7, écrit à la main."


def _size_field(size: Any, key: str) -> int | None:
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def uint8_transform(processor) -> Callable[[Image.Image], torch.Tensor] | None:
    """The resize and crop of a standard HF image processor as torchvision steps ending in a
    uint8 tensor (30x faster per image than calling the processor; same pixels), or None when
    the processor does more than resize, crop, rescale and normalise."""
    import torchvision.transforms.v2 as T

    modes = {
        0: T.InterpolationMode.NEAREST,
        2: T.InterpolationMode.BILINEAR,
        3: T.InterpolationMode.BICUBIC,
    }
    mode = modes.get(int(getattr(processor, "resample", -1) or -1))
    if (
        getattr(processor, "do_pad", False)
        or not getattr(processor, "do_resize", False)
        or not mode
        or getattr(processor, "crop_pct", None)  # ConvNeXt's resize-then-crop rule: slow path
    ):
        return None
    size = processor.size
    short = _size_field(size, "shortest_edge")
    height, width = _size_field(size, "height"), _size_field(size, "width")
    if not short and not (height and width):
        return None
    # resize the uint8 tensor (not the PIL image), as transformers' torchvision backend does
    steps = [
        T.PILToTensor(),
        T.Resize(short or (height, width), interpolation=mode, antialias=True),
    ]
    if getattr(processor, "do_center_crop", False):
        crop = processor.crop_size
        steps.append(T.CenterCrop((_size_field(crop, "height"), _size_field(crop, "width"))))
    return T.Compose(steps)


def uint8_normaliser(processor) -> Callable[[torch.Tensor], torch.Tensor]:
    """Rescale and normalise a uint8 batch on its device, as the processor would."""
    scale = processor.rescale_factor if getattr(processor, "do_rescale", True) else 1.0
    normalise = getattr(processor, "do_normalize", True)
    mean = processor.image_mean if normalise else [0.0] * 3
    std = processor.image_std if normalise else [1.0] * 3
    return device_normaliser(scale, mean, std)


def hf_image_encoder(spec: str, model, processor, revision: str) -> Encoder:
    """Transformers: the CLS token of every block and of the normalised output; hierarchical
    models: the spatial mean of every stage's map and the model's pooled output."""
    maps = getattr(model.config, "depths", None) is not None
    fast = uint8_transform(processor)
    # fast path: workers only decode, resize and crop (uint8, 4x less to copy to the GPU);
    # rescaling and normalisation run batched on the device
    to_pixels = uint8_normaliser(processor) if fast else (lambda pixels: pixels)

    def prepare(image: Image.Image) -> torch.Tensor:
        if fast:
            return fast(image.convert("RGB"))
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    def embed(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        pixels = model_input(to_pixels(batch["pixel_values"]), model)
        out = model(pixel_values=pixels, output_hidden_states=True)
        if maps:  # Swin's hidden_states are token lists; its reshaped_hidden_states are maps
            stages = getattr(out, "reshaped_hidden_states", None) or out.hidden_states
            pooled = getattr(out, "pooler_output", None)
            final = spatial_mean(out.last_hidden_state) if pooled is None else pooled.flatten(1)
            return [spatial_mean(h) for h in stages] + [final]
        return [cls_token(h) for h in out.hidden_states[1:]] + [cls_token(out.last_hidden_state)]

    if maps:
        n_stages = len(model.config.depths) + 1  # the stem (embeddings) output first
        names = [f"stage.{i}" for i in range(n_stages)] + ["final"]
    else:
        n_blocks = model.config.num_hidden_layers
        names = [f"block.{i}" for i in range(n_blocks)] + ["final_norm"]
    encoder = Encoder(
        spec=spec,
        model_id=str(getattr(model, "name_or_path", "") or spec),
        revision=revision,
        modality="image",
        pooling="gap" if maps else "cls",
        layer_names=names,
        layer_dims=[] if maps else [model.config.hidden_size] * len(names),
        model=model,
        prepare=prepare,
        collate=stack_pixels,
        embed=embed,
        config=model.config.to_dict(),
        processor=processor,
    )
    if maps:
        encoder.layer_dims = probe_widths(encoder)
        if len(encoder.layer_dims) != len(names):
            raise UserError(
                f"{spec}: {len(encoder.layer_dims)} pooled stages, expected {len(names)}"
            )
    return encoder


def hf_text_encoder(spec: str, model, tokenizer, revision: str) -> Encoder:
    n_layers = model.config.num_hidden_layers
    max_length = min(getattr(model.config, "max_position_embeddings", 512) or 512, 512)
    if tokenizer.pad_token is None:  # GPT-style tokenizers have none; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token

    def collate(texts: list[str]) -> dict[str, torch.Tensor]:
        tokens = tokenizer(
            list(texts), padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {"input_ids": tokens["input_ids"], "attention_mask": tokens["attention_mask"]}

    def embed(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        out = model(**batch, output_hidden_states=True)
        mask = batch["attention_mask"]
        return [masked_mean(h, mask) for h in out.hidden_states]

    return Encoder(
        spec=spec,
        model_id=str(getattr(model, "name_or_path", "") or spec),
        revision=revision,
        modality="text",
        pooling="masked_mean",
        layer_names=["embeddings"] + [f"layer.{i}" for i in range(n_layers)],
        layer_dims=[model.config.hidden_size] * (n_layers + 1),
        model=model,
        prepare=str,
        collate=collate,
        embed=embed,
        config=model.config.to_dict(),
        processor=tokenizer,
    )


def is_image_config(config) -> bool:
    return hasattr(config, "image_size") or hasattr(config, "num_channels")


def load_hf(
    spec: str,
    model_id: str,
    revision: str | None,
    trust_remote_code: bool,
    random_weights: bool = False,
) -> Encoder:
    """A Hugging Face model and its processor or tokenizer; `random_weights`: the architecture
    of its config only, for weights loaded afterwards (an export's)."""
    from transformers import AutoConfig, AutoImageProcessor, AutoModel, AutoTokenizer

    kwargs = {"revision": revision, "trust_remote_code": trust_remote_code}
    try:
        config = AutoConfig.from_pretrained(model_id, **kwargs)
        if random_weights:
            model = AutoModel.from_config(config, trust_remote_code=trust_remote_code)
        else:
            model = AutoModel.from_pretrained(model_id, **kwargs)
        if is_image_config(config):
            side = AutoImageProcessor.from_pretrained(model_id, **kwargs)
        else:
            side = AutoTokenizer.from_pretrained(model_id, **kwargs)
    except OSError as err:
        raise download_hint(model_id, err) from err
    except ValueError as err:  # e.g. an unknown architecture that needs trust_remote_code
        raise UserError(f"cannot load {model_id!r}: {str(err).splitlines()[0]}") from err
    except pickle.UnpicklingError as err:  # torch.load(weights_only=True) refused a .bin
        raise UserError(
            f"{model_id}: its weights file holds Python objects besides tensors, which are not "
            "loaded (they could run code); convert it to model.safetensors"
        ) from err
    model.eval().requires_grad_(False)
    rev = getattr(config, "_commit_hash", None) or revision or "local"
    build = hf_image_encoder if is_image_config(config) else hf_text_encoder
    return build(spec, model, side, rev)


def block_list(model: torch.nn.Module, n_blocks: int) -> tuple[torch.nn.Module, str] | None:
    """(parent, attribute name) of the model's list of its n_blocks transformer blocks
    (`encoder.layer` in BERT, ViT and DINOv2), or None."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_blocks and name:
            parent, _, attr = name.rpartition(".")
            return model.get_submodule(parent), attr
    return None


def cut_hf_stages(encoder: Encoder, keep: int) -> int:
    """CNNs and Swin: the stem (`stage.0`) and the first keep - 1 stages stay (at least one:
    with none some return no stage maps); the final layer norm, sized for the last stage and
    used only by the pooled `final`, goes. The config is left whole: an export rebuilds the
    whole architecture and cuts it the same way before loading its weights."""
    model = encoder.model
    n_stages = len(model.config.depths)
    for path in HF_STAGE_LISTS:
        parent_path, _, attr = path.rpartition(".")
        parent = getattr(model, parent_path, None)
        stages = getattr(parent, attr, None)
        if isinstance(stages, torch.nn.ModuleList) and len(stages) == n_stages:
            kept = max(keep - 1, 1)
            setattr(parent, attr, torch.nn.ModuleList(list(stages)[:kept]))
            if isinstance(getattr(model, "layernorm", None), torch.nn.LayerNorm):
                model.layernorm = torch.nn.Identity()
            return kept + 1
    return n_stages + 1  # another layout: runs whole, still correct


def cut_hf_blocks(encoder: Encoder, keep: int) -> int:
    """Transformers whose hidden states are one per block: the block list cut (at least one
    block: with none they return no hidden states), and the config with it, so that an export
    writes the truncated model's config."""
    model = encoder.model
    n_blocks = len(encoder.layer_names) - 1
    keep = max(keep, 1)
    found = block_list(model, n_blocks)
    if getattr(model.config, "num_hidden_layers", None) != n_blocks or found is None:
        return n_blocks  # another layout: runs whole, still correct
    parent, attr = found
    setattr(parent, attr, torch.nn.ModuleList(list(getattr(parent, attr))[:keep]))
    config = model.config
    config.num_hidden_layers = keep
    if hasattr(config, "stage_names"):  # backbone configs (DINOv2): one stage per block
        config.stage_names = ["stem"] + [f"stage{i}" for i in range(1, keep + 1)]
        config.set_output_features_output_indices(out_features=None, out_indices=None)
    return keep


@register_family
class HuggingFaceFamily(EncoderFamily):
    """Any Hugging Face model: a hub id, an alias, or a local `save_pretrained` directory."""

    name = "hf"
    # a text model saved without its pooler (BERT's, unused: layers are masked means) gets one
    # from its config
    optional_tensors = ("pooler.",)

    def claims(self, spec: str) -> bool:
        return spec in ALIASES or "/" in spec or Path(spec).expanduser().is_dir()

    def load(self, spec, revision=None, trust_remote_code=False, weights=None) -> Encoder:
        path = Path(spec).expanduser()
        if path.is_dir():
            return load_hf(spec, str(path), revision, trust_remote_code)
        if spec.startswith(("/", "./", "../", "~")):
            raise UserError(f"model directory {spec} does not exist")
        return load_hf(spec, ALIASES.get(spec, spec), revision, trust_remote_code)

    def cut(self, encoder: Encoder, keep: int) -> int:
        if encoder.pooling == "gap":  # stage maps (a `depths` config)
            return cut_hf_stages(encoder, keep)
        return cut_hf_blocks(encoder, keep)

    def save(self, encoder: Encoder, folder: Path) -> dict[str, Any]:
        """The weights, the config and the processor or tokenizer files."""
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(encoder.model, folder / SAVED_WEIGHTS)
        encoder.model.config.save_pretrained(folder)
        encoder.processor.save_pretrained(folder)
        return {}

    def load_saved(self, folder, recipe, trust_remote_code) -> Encoder:
        encoder = load_hf(str(folder), str(folder), None, trust_remote_code, random_weights=True)
        encoder.family = self.name
        return encoder

    def preprocessing(self, encoder: Encoder) -> dict[str, Any]:
        processor = encoder.processor
        if encoder.modality == "image":
            return as_json(processor.to_dict())
        probe = processor(TOKENIZER_PROBE)["input_ids"]
        return {
            "tokenizer": type(processor).__name__,
            "vocab_size": len(processor),
            "probe_ids": [int(i) for i in probe],
        }
