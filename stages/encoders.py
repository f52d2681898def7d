"""Encoder registry: a model spec by name -> a frozen encoder that returns every layer's embedding.

A spec is one of
  - an alias of `ALIASES` (`dinov2` = DINOv2 ViT-L/14, `roberta-large`, `minilm`, ...),
  - `tiny-random-vit` / `tiny-random-text`: offline encoders with RANDOM weights (tests, demo),
  - `timm:<name>` (timm's pretrained weights, or a local file given as `weights`),
  - any Hugging Face id (`org/name`) or a local directory in `save_pretrained` layout.

Every encoder maps a batch to one pooled (B, D_l) tensor per layer (widths may differ):
  image transformers: the CLS token of every block's output (`block.i`), then the final
                normalised output (`final_norm`), the model's usual embedding;
  CNNs and Swin: the spatial mean (global average pooling) of every stage's (B, C, H, W) map
                (`stage.i`), then the model's own pooled embedding (`final`);
  text models:  the attention-masked mean of every hidden state, embedding output first
                (`embeddings`, then `layer.i`).
"""

from __future__ import annotations

import hashlib
import json
import pickle
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

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
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass
class Encoder:
    """A frozen model plus the two functions that feed it: `prepare` (per sample, in DataLoader
    workers) and `collate` (per batch), and `embed` (batch -> (B, L, D) pooled layers)."""

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


# -- pooling: small pure functions ------------------------------------------------------------
def cls_token(hidden: torch.Tensor) -> torch.Tensor:
    """(B, T, D) token states -> (B, D) CLS; (B, C, H, W) conv maps -> (B, C) spatial mean."""
    return hidden[:, 0] if hidden.ndim == 3 else spatial_mean(hidden)


def spatial_mean(maps: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) feature maps -> (B, C): global average pooling, a CNN's usual embedding."""
    return maps.float().mean(dim=(2, 3))


def masked_mean(hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean over the real tokens: (B, T, D), (B, T) -> (B, D), computed in float32."""
    weights = mask.to(torch.float32).unsqueeze(-1)
    return (hidden.float() * weights).sum(1) / weights.sum(1).clamp_min(1.0)


# -- Hugging Face ---------------------------------------------------------------------------
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


def device_normaliser(
    scale: float, mean: Sequence[float], std: Sequence[float]
) -> Callable[[torch.Tensor], torch.Tensor]:
    """(batch * scale - mean) / std per channel, on the batch's device."""
    mean_t = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
    std_t = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)
    on_device: dict[torch.device, tuple[torch.Tensor, torch.Tensor]] = {}

    def to_pixels(batch: torch.Tensor) -> torch.Tensor:
        # copied to the device once: a copy per batch would wait for the GPU every time
        if batch.device not in on_device:
            on_device[batch.device] = (mean_t.to(batch.device), std_t.to(batch.device))
        mean_d, std_d = on_device[batch.device]
        return (batch.float() * scale - mean_d) / std_d

    return to_pixels


def probe_widths(encoder: Encoder) -> list[int]:
    """Each layer's width, from one blank image through the encoder's own path (for models
    whose stage widths are not one config field: CNNs, Swin)."""
    blank = Image.new("RGB", (64, 64))
    with torch.inference_mode():
        return [int(t.shape[1]) for t in encoder.embed(encoder.collate([encoder.prepare(blank)]))]


def hf_image_encoder(spec: str, model, processor, revision: str) -> Encoder:
    """Transformers (ViT, DINOv2): the CLS token of every block and of the normalised output.
    Hierarchical models (ResNet, ConvNeXt, Swin: a `depths` config): the spatial mean of every
    stage's (B, C, H, W) map, the stem first, and the model's pooled output (`final`)."""
    maps = getattr(model.config, "depths", None) is not None
    fast = uint8_transform(processor)
    # fast path: workers only decode, resize and crop (uint8, 4x less to copy to the GPU);
    # rescaling and normalisation run batched on the device
    to_pixels = uint8_normaliser(processor) if fast else (lambda pixels: pixels)

    def prepare(image: Image.Image) -> torch.Tensor:
        if fast:
            return fast(image.convert("RGB"))
        return processor(images=image, return_tensors="pt")["pixel_values"][0]

    def collate(items: list[torch.Tensor]) -> dict[str, torch.Tensor]:
        return {"pixel_values": torch.stack(items)}

    def embed(batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        pixels = to_pixels(batch["pixel_values"])
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
        collate=collate,
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


def download_hint(model_id: str, err: Exception) -> UserError:
    first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"cannot load model {model_id!r} ({first[:200]}). Without network access, download it "
        f"on a connected machine first (`hf download {model_id}` into the HF cache, or "
        "`save_pretrained` to a directory) and pass that local directory as --model"
    )


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


# -- timm -------------------------------------------------------------------------------------
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
    return hashlib.sha256(path.read_bytes()).hexdigest()


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
        pixels = to_pixels(batch["pixel_values"])
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
        collate=lambda items: {"pixel_values": torch.stack(items)},
        embed=timm_embed(model, to_pixels),
        config=config,
    )


# -- offline encoders with random weights -------------------------------------------------------
def tiny_random_vit(spec: str) -> Encoder:
    """A 4-block DINOv2 architecture (32 px, width 64) with seeded RANDOM weights."""
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


def known_models() -> list[str]:
    return sorted(ALIASES) + sorted(TINY)


def load_encoder(
    spec: str,
    revision: str | None = None,
    trust_remote_code: bool = False,
    weights: str | None = None,
) -> Encoder:
    """Resolve a model spec (see the module docstring) to a frozen encoder on the CPU;
    `weights`: a local weights file for a timm:NAME architecture."""
    if weights and not spec.startswith("timm:"):
        raise UserError(f"--weights is for timm:<name> models; {spec!r} is not one")
    if spec in TINY:
        return TINY[spec](spec)
    if spec.startswith("timm:"):
        return load_timm(spec, spec.removeprefix("timm:"), weights)
    path = Path(spec).expanduser()
    if path.is_dir():
        return load_hf(spec, str(path), revision, trust_remote_code)
    if spec.startswith(("/", "./", "../", "~")):
        raise UserError(f"model directory {spec} does not exist")
    if spec in ALIASES or "/" in spec:
        return load_hf(spec, ALIASES.get(spec, spec), revision, trust_remote_code)
    raise UserError(
        f"unknown model {spec!r}; known: {', '.join(known_models())}; or a Hugging Face id "
        "(org/name), a local model directory, or timm:<name>"
    )


# -- running an encoder only up to one layer (used by stages.model) -----------------------------
def blocks_needed(layer_name: str, n_blocks: int) -> int:
    """How many blocks (transformers) or stages (CNNs, Swin; the stem is `stage.0`) compute the
    stored layer `layer_name`: `block.i`, `layer.i` and `stage.i` need i + 1, `embeddings`
    none, `final_norm` / `final` (or an unknown name) all of them."""
    kind, _, number = layer_name.rpartition(".")
    if kind in ("block", "layer", "stage") and number.isdigit():
        return int(number) + 1
    return 0 if layer_name == "embeddings" else n_blocks


def block_list(model: torch.nn.Module, n_blocks: int) -> tuple[torch.nn.Module, str] | None:
    """(parent, attribute name) of the model's list of its n_blocks transformer blocks
    (`encoder.layer` in BERT, ViT and DINOv2), or None."""
    for name, module in model.named_modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == n_blocks and name:
            parent, _, attr = name.rpartition(".")
            return model.get_submodule(parent), attr
    return None


def cut_timm(encoder: Encoder, keep: int) -> int:
    """timm's own pruning (later blocks or stages, the final norm and the head go), and an
    embed that stops after layer keep - 1."""
    model = encoder.model
    if not hasattr(model, "prune_intermediate_layers"):
        return len(encoder.layer_names) - 1  # runs whole, still correct
    model.prune_intermediate_layers([keep - 1], prune_norm=True, prune_head=True)
    encoder.embed = timm_embed(model, timm_preprocessing(model)[1], stop=keep)
    return keep


HF_STAGE_LISTS = ("encoder.stages", "encoder.layers")  # ResNet and ConvNeXt; Swin


def cut_hf_stages(encoder: Encoder, keep: int) -> int:
    """Hugging Face CNNs and Swin: the stem (`stage.0`) and the first keep - 1 stages stay (at
    least one: with none some return no stage maps); the final layer norm, sized for the last
    stage and used only by the pooled `final`, goes. The config is left whole: an export
    rebuilds the whole architecture and cuts it the same way before loading its weights."""
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
    """Hugging Face transformers whose hidden states are one per block: the block list cut
    (at least one block: with none they return no hidden states), and the config with it, so
    that an export writes the truncated model's config."""
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
    elif encoder.config.get("timm"):
        encoder.blocks_run = cut_timm(encoder, max(keep, 1))
    elif encoder.pooling == "gap":
        encoder.blocks_run = cut_hf_stages(encoder, keep)
    else:
        encoder.blocks_run = cut_hf_blocks(encoder, keep)
    return encoder.blocks_run


# -- an encoder as `export` saves it: cut weights and what rebuilds the architecture offline ---
SAVED_WEIGHTS = "model.safetensors"


def save_encoder(encoder: Encoder, folder: Path) -> dict[str, Any]:
    """Write the encoder as it is now (cut by `truncate_encoder`) into `folder`: its weights
    (safetensors) and, for Hugging Face models, their config and processor or tokenizer files.
    Returns what else rebuilds it: for timm, the model name and the pretrained config (the data
    config: input size, mean, std, crop), recorded in the export's config.json."""
    from safetensors.torch import save_model

    folder.mkdir(parents=True, exist_ok=True)
    save_model(encoder.model, str(folder / SAVED_WEIGHTS), metadata={"format": "pt"})
    name = encoder.config.get("timm")
    if name:
        cfg = json.loads(json.dumps(encoder.model.pretrained_cfg, default=str))
        return {"timm": {"name": name, "pretrained_cfg": cfg}}
    encoder.model.config.save_pretrained(folder)
    encoder.processor.save_pretrained(folder)
    return {}


def load_saved_encoder(
    folder: Path, layer: str, timm_recipe: dict[str, Any] | None, trust_remote_code: bool
) -> Encoder:
    """An encoder written by `save_encoder`: the architecture built with random weights
    (nothing downloaded), cut at `layer` as it was when saved, then the saved weights loaded
    into it; every tensor must fit."""
    from safetensors.torch import load_model

    if timm_recipe:
        name = timm_recipe["name"]
        cfg = {k: tuple(v) if isinstance(v, list) else v
               for k, v in timm_recipe["pretrained_cfg"].items()}  # fmt: skip
        model = create_timm(name, pretrained=False, pretrained_cfg=cfg)
        encoder = timm_encoder(f"timm:{name}", name, model, f"export:{folder.name}")
    else:
        encoder = load_hf(str(folder), str(folder), None, trust_remote_code, random_weights=True)
    if layer not in encoder.layer_names:
        raise UserError(f"{folder} has no layer {layer!r} (its layers: {encoder.layer_names})")
    truncate_encoder(encoder, encoder.layer_names.index(layer))
    path = folder / SAVED_WEIGHTS
    unfit = f"{path} does not fit its architecture"
    try:
        missing, unexpected = load_model(encoder.model, str(path), strict=False)
    except (RuntimeError, OSError) as err:  # a tensor of another shape, an unreadable file
        first = " ".join(str(err).strip().splitlines()[:2])[:200]
        raise UserError(f"{unfit}: {first}") from err
    # a text model saved without its pooler (BERT's, unused: layers are masked means) gets one
    # from its config; any other tensor missing or left over is refused
    missing = [k for k in missing if not k.startswith("pooler.")]
    if missing or unexpected:
        raise UserError(f"{unfit}: missing {missing[:3]}, unexpected {unexpected[:3]}")
    return encoder
