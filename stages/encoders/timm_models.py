"""The timm family: `timm:<name>`, with timm's pretrained weights or a local weights file.

ViTs (prefix tokens, NLC outputs): the CLS token (or the token mean) of each block (`block.i`)
and the model's pooled embedding (`final_norm`); every other model (ResNet, ConvNeXt, Swin, ...):
the spatial mean of each stage's NCHW map (`stage.i`) and the model's pooled embedding (`final`).
"""

from __future__ import annotations

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
    device_normaliser,
    download_hint,
    model_input,
    register_family,
    save_weights,
    spatial_mean,
    stack_pixels,
)
from store.errors import UserError
from store.io import file_sha256

PREFIX = "timm:"
DATA_CONFIG_KEYS = ("input_size", "mean", "std", "interpolation", "crop_pct", "crop_mode")


def timm_preprocessing(model) -> tuple[Callable[[Image.Image], torch.Tensor], Callable]:
    """timm's eval transform for the model's data config, split as the HF fast path is: the
    resize and crop in the DataLoader workers (ending in uint8), the scaling to [0, 1] and the
    normalisation batched on the device (same pixels as timm's transform)."""
    import torchvision.transforms as T
    from timm.data import create_transform, resolve_model_data_config

    config = resolve_model_data_config(model)
    transform = create_transform(**config, is_training=False)
    tensor_steps = ("ToTensor", "MaybeToTensor", "Normalize")
    steps = [t for t in transform.transforms if type(t).__name__ not in tensor_steps]
    uint8 = T.Compose([*steps, T.PILToTensor()])
    return uint8, device_normaliser(1 / 255, config["mean"], config["std"])


def read_weights(path: Path) -> dict[str, torch.Tensor]:
    """A state dict from a safetensors file, or from a .pth / .bin / .pt file through
    torch.load(weights_only=True) (tensors only: no code runs while loading)."""
    if not path.is_file():
        raise UserError(f"--weights {path}: no such file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            return load_file(path)
        except Exception as err:  # safetensors raises its own error type for a bad header
            raise UserError(f"--weights {path} is not a readable safetensors file: {err}") from err
    if path.suffix not in (".pth", ".pt", ".bin"):
        raise UserError(f"--weights takes a .safetensors, .pth, .pt or .bin file, not {path.name}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # pickle refuses objects that are not plain tensors and containers
        first = str(err).strip().splitlines()[0][:160] if str(err).strip() else type(err).__name__
        raise UserError(
            f"--weights {path} cannot be loaded with torch.load(weights_only=True) ({first}); "
            "save its state_dict to a safetensors file instead"
        ) from err
    for key in ("state_dict", "model", "state_dict_ema"):  # common training-checkpoint wrappers
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    return {k.removeprefix("module."): v for k, v in state.items() if torch.is_tensor(v)}


def load_timm_weights(model, name: str, path: Path) -> str:
    """Load a local state dict into the timm architecture; the classifier's tensors may be in
    the file (the model here has none), every other tensor must match. Returns the file's
    SHA-256, which the model fingerprint covers."""
    state = read_weights(path)
    classifier = model.pretrained_cfg.get("classifier") or "head"
    prefixes = (classifier,) if isinstance(classifier, str) else tuple(classifier)
    state = {k: v for k, v in state.items() if not k.startswith(prefixes)}
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as err:  # a tensor of the wrong shape
        first = str(err).strip().splitlines()
        raise UserError(
            f"--weights {path} does not fit timm:{name}: {' '.join(first[1:2] or first)[:200]}"
        ) from err
    if missing or unexpected:
        raise UserError(
            f"--weights {path} does not fit timm:{name}: "
            f"missing {missing[:3]}{'...' if len(missing) > 3 else ''}, "
            f"unexpected {unexpected[:3]}{'...' if len(unexpected) > 3 else ''}"
        )
    return file_sha256(path)


def create_timm(name: str, pretrained: bool, pretrained_cfg: dict[str, Any] | None = None):
    """timm's architecture NAME without a classifier: with timm's pretrained weights, or with
    random ones (`pretrained=False`: no download) to be overwritten. `pretrained_cfg`: the data
    config recorded at export, instead of the one this timm version registers for NAME."""
    import timm

    extra = {"pretrained_cfg": pretrained_cfg} if pretrained_cfg else {}
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **extra)
    except OSError as err:
        raise download_hint(f"timm/{name}", err) from err
    except RuntimeError as err:  # timm: "Unknown model (...)"
        raise UserError(f"unknown timm model {name!r}: {err}") from err


def timm_pooling(model) -> str:
    """How a timm model's layers are pooled: ViTs (prefix tokens, NLC outputs) by their CLS
    token ("cls", or the token mean without one: "mean"), every other model (NCHW stage maps)
    by the spatial mean ("gap")."""
    if not hasattr(model, "num_prefix_tokens"):
        return "gap"
    return "cls" if model.num_prefix_tokens else "mean"


def timm_embed(
    model, to_pixels: Callable[[torch.Tensor], torch.Tensor], stop: int | None = None
) -> Callable[[dict[str, torch.Tensor]], list[torch.Tensor]]:
    """A batch -> the pooled layers of a timm model through forward_intermediates: ViTs (prefix
    tokens, NLC) the CLS token (or the token mean) of each block; every other model (ResNet,
    ConvNeXt, Swin, ...) the spatial mean of each stage's NCHW map; then `final`, the model's
    own pooled embedding (forward_head with pre_logits). With `stop`, only layers 0..stop-1:
    the blocks after them are never run (stop_early) and there is no `final`."""
    pooling = timm_pooling(model)
    tokens = pooling != "gap"
    options = {"output_fmt": "NLC", "return_prefix_tokens": pooling == "cls"} if tokens else {}

    def pool(out) -> torch.Tensor:
        if not tokens:
            return spatial_mean(out)
        return out[1][:, 0] if pooling == "cls" else out.mean(1)

    def embed(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        pixels = model_input(to_pixels(batch["pixel_values"]), model)
        if stop is not None:
            layers = model.forward_intermediates(
                pixels, indices=list(range(stop)), norm=False, stop_early=True,
                intermediates_only=True, **options,
            )  # fmt: skip
            return [pool(x) for x in layers]
        final, layers = model.forward_intermediates(pixels, norm=False, **options)
        return [*(pool(x) for x in layers), model.forward_head(final, pre_logits=True)]

    return embed


def load_timm(spec: str, name: str, weights: str | None = None) -> Encoder:
    """A timm model (see `timm_embed` for its layers). `weights`: a local file instead of
    timm's pretrained weights (the architecture and preprocessing still come from timm's NAME)."""
    model = create_timm(name, pretrained=weights is None)
    if not weights:
        return timm_encoder(spec, name, model, "")
    sha256 = load_timm_weights(model, name, Path(weights).expanduser())
    return timm_encoder(spec, name, model, f"file:{Path(weights).name}", weights_sha256=sha256)


def timm_encoder(spec: str, name: str, model, revision: str, **extra: str) -> Encoder:
    """The Encoder of timm's architecture NAME, created with its weights in place; its config
    is the name, the pretrained config and `extra`."""
    config = {"timm": name, **{k: str(v) for k, v in model.pretrained_cfg.items()}, **extra}
    if not hasattr(model, "forward_intermediates"):
        raise UserError(f"timm model {name!r} does not expose forward_intermediates")
    model.eval().requires_grad_(False)
    prepare, to_pixels = timm_preprocessing(model)
    pooling = timm_pooling(model)
    tokens = pooling != "gap"  # ViT family: NLC outputs
    # ViTs: `block.i` and `final_norm` as for Hugging Face ViTs; maps: `stage.i` and `final`
    names = [f"{'block' if tokens else 'stage'}.{i}" for i in range(len(model.feature_info))]
    names.append("final_norm" if tokens else "final")
    hub_id = str(model.pretrained_cfg.get("hf_hub_id") or name)
    return Encoder(
        spec=spec,
        model_id=f"timm/{name}",
        revision=revision or hub_id,
        modality="image",
        pooling=pooling,
        layer_names=names,
        layer_dims=[int(f["num_chs"]) for f in model.feature_info] + [int(model.num_features)],
        model=model,
        prepare=lambda image: prepare(image.convert("RGB")),
        collate=stack_pixels,
        embed=timm_embed(model, to_pixels),
        config=config,
        family=TimmFamily.name,
    )


@register_family
class TimmFamily(EncoderFamily):
    """timm:<name>: timm's architecture NAME, its pretrained weights or a local file."""

    name = "timm"
    takes_weights = True

    def claims(self, spec: str) -> bool:
        return spec.startswith(PREFIX)

    def load(self, spec, revision=None, trust_remote_code=False, weights=None) -> Encoder:
        return load_timm(spec, spec.removeprefix(PREFIX), weights)

    def cut(self, encoder: Encoder, keep: int) -> int:
        """timm's own pruning (later blocks or stages, the final norm and the head go), and an
        embed that stops after layer keep - 1."""
        model, keep = encoder.model, max(keep, 1)
        if not hasattr(model, "prune_intermediate_layers"):
            return len(encoder.layer_names) - 1  # runs whole, still correct
        model.prune_intermediate_layers([keep - 1], prune_norm=True, prune_head=True)
        encoder.embed = timm_embed(model, timm_preprocessing(model)[1], stop=keep)
        return keep

    def save(self, encoder: Encoder, folder: Path) -> dict[str, Any]:
        """The weights; the model name and the pretrained config (the data config: input size,
        mean, std, crop) go into the export's config.json."""
        folder.mkdir(parents=True, exist_ok=True)
        save_weights(encoder.model, folder / SAVED_WEIGHTS)
        cfg = as_json(encoder.model.pretrained_cfg)
        return {"timm": {"name": encoder.config["timm"], "pretrained_cfg": cfg}}

    def load_saved(self, folder, recipe, trust_remote_code) -> Encoder:
        timm_recipe = recipe.get("timm") or {}
        if not isinstance(timm_recipe.get("name"), str):
            raise UserError(f"{folder}: the export records no timm model name")
        name = timm_recipe["name"]
        cfg = {k: tuple(v) if isinstance(v, list) else v
               for k, v in (timm_recipe.get("pretrained_cfg") or {}).items()}  # fmt: skip
        model = create_timm(name, pretrained=False, pretrained_cfg=cfg)
        return timm_encoder(f"{PREFIX}{name}", name, model, f"export:{folder.name}")

    def preprocessing(self, encoder: Encoder) -> dict[str, Any]:
        """The data config, part of the pretrained config."""
        return {k: encoder.config[k] for k in DATA_CONFIG_KEYS if k in encoder.config}
