"""Inference-only folding of batch norms into the convolutions before them (CNNs).

In eval mode a BatchNorm after a convolution is an affine map per channel, so it folds exactly
into the convolution's weight and bias: y = (W x + b - mean) * g / sqrt(var + eps) + beta. On a
CPU the separate norm pass over every feature map is a memory-bound quarter of an
EfficientNet's forward; folded, it costs nothing. timm's norm + activation modules go further
on the CPU: the activation runs inside oneDNN's convolution (a post-op), one more pass over the
map saved. Which norm follows which convolution is observed on one probe batch (a norm whose
input is a convolution's output, each module run once), and the folded encoder must give the
same pooled layers on that batch, else the model is left as it was. The replaced modules are
kept: `unfold_batch_norms` (called by `save_encoder`) puts them back, so an export saves the
weights as loaded.
"""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image
from torch import nn

from stages.encoders.base import Encoder


def onednn_activation(act: nn.Module) -> tuple[str, list[float], str] | None:
    """The oneDNN post-op (name, scalars, algorithm) computing `act`, or None."""
    if type(act) is nn.ReLU:
        return "relu", [], ""
    if type(act) in (nn.ReLU6, nn.Hardtanh):
        return "hardtanh", [float(act.min_val), float(act.max_val)], ""
    if type(act) is nn.SiLU:
        return "swish", [], ""
    if type(act) is nn.Hardswish:
        return "hardswish", [], ""
    if type(act) is nn.GELU:
        return "gelu", [], act.approximate
    return None


def fusable_convolutions() -> bool:
    """Whether this torch has oneDNN's convolution with a fused activation (CPU builds)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(
            torch.ops.mkldnn._convolution_pointwise
        )
    except (AttributeError, RuntimeError):
        return False


class ConvActivation(nn.Module):
    """A convolution and the activation after it as one oneDNN call on the CPU (the activation
    applied to the output while it is still in cache: one pass over the map less); elsewhere,
    the two modules."""

    def __init__(self, conv: nn.Conv2d, act: nn.Module, post_op: tuple[str, list[float], str]):
        super().__init__()
        self.conv, self.act, self.post_op = conv, act, post_op

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        conv = self.conv
        if x.device.type != "cpu":
            return self.act(conv(x))
        name, scalars, algorithm = self.post_op
        return torch.ops.mkldnn._convolution_pointwise(
            x, conv.weight, conv.bias, list(conv.padding), list(conv.stride),
            list(conv.dilation), conv.groups, name, scalars, algorithm,
        )  # fmt: skip


def fused(conv: nn.Module, norm: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(what replaces the convolution, what replaces its folded norm): timm's norm + activation
    on the CPU becomes the convolution with a fused activation and nothing."""
    act = getattr(norm, "act", None)
    post_op = onednn_activation(act) if act is not None else None
    plain_conv = type(conv) is nn.Conv2d and conv.padding_mode == "zeros"
    plain_conv = plain_conv and not isinstance(conv.padding, str)
    if (
        post_op is None
        or not plain_conv
        or type(norm.drop) is not nn.Identity
        or conv.weight.device.type != "cpu"
        or not fusable_convolutions()
    ):
        return conv, norm_replacement(norm)
    return ConvActivation(conv, act, post_op), nn.Identity()


def norm_replacement(norm: nn.Module) -> nn.Module | None:
    """What replaces a folded norm: nothing (BatchNorm2d), its dropout and activation (timm's
    BatchNormAct2d); None for another kind (not folded)."""
    if type(norm) is nn.BatchNorm2d:
        return nn.Identity()
    if type(norm).__name__ == "BatchNormAct2d" and type(norm).__module__.startswith("timm."):
        return nn.Sequential(norm.drop, norm.act)
    return None


def conv_norm_pairs(model: nn.Module, batch: dict[str, torch.Tensor], embed) -> list[tuple]:
    """(conv name, norm name) pairs where, on `batch`, the norm's input was the convolution's
    output (the same tensor), both run once."""
    names = {module: name for name, module in model.named_modules()}
    calls: dict[nn.Module, int] = {}
    # id of a convolution's output -> (the convolution, the output: kept alive, so that no
    # later tensor gets its id)
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    seen: list[tuple[nn.Module, nn.Module]] = []

    def after_conv(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        produced[id(output)] = (module, output)

    def before_norm(module, args):
        calls[module] = calls.get(module, 0) + 1
        conv, _ = produced.get(id(args[0]), (None, None))
        if conv is not None:
            seen.append((conv, module))

    hooks = []
    for module in model.modules():
        if isinstance(module, nn.Conv2d):
            hooks.append(module.register_forward_hook(after_conv))
        elif norm_replacement(module) is not None and module.track_running_stats:
            hooks.append(module.register_forward_pre_hook(before_norm))
    try:
        with torch.inference_mode():
            outputs = embed(batch)
    finally:
        for hook in hooks:
            hook.remove()
    del outputs
    produced.clear()
    return [(names[c], names[n]) for c, n in seen if calls[c] == 1 and calls[n] == 1]


def fold_pair(conv: nn.Conv2d, norm: nn.BatchNorm2d) -> None:
    """The norm's affine map into the convolution's weight and bias (float64 arithmetic)."""
    scale = norm.weight.double() / torch.sqrt(norm.running_var.double() + norm.eps)
    shift = norm.bias.double() - norm.running_mean.double() * scale
    weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
    bias = shift if conv.bias is None else conv.bias.double() * scale + shift
    dtype = conv.weight.dtype
    conv.weight = nn.Parameter(weight.to(dtype), requires_grad=False)
    conv.bias = nn.Parameter(bias.to(dtype), requires_grad=False)


def probe_batch(encoder: Encoder, device: torch.device) -> dict[str, torch.Tensor]:
    """One seeded noise image, prepared and collated as extraction does, on `device`."""
    pixels = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
    batch = encoder.collate([encoder.prepare(Image.fromarray(pixels))])
    return {k: v.to(device) for k, v in batch.items()}


def fold_batch_norms(encoder: Encoder) -> int:
    """Fold, in place, every batch norm that directly follows a convolution into it (the model
    in float32 on its device); return how many. The replaced modules are kept in
    `encoder.unfolded` for `unfold_batch_norms`."""
    model = encoder.model
    if model.training or not any(norm_replacement(m) for m in model.modules()):
        return 0
    batch = probe_batch(encoder, next(model.parameters()).device)
    pairs = conv_norm_pairs(model, batch, encoder.embed)
    if not pairs:
        return 0
    with torch.inference_mode():
        before = [x.float() for x in encoder.embed(batch)]
    saved = {name: copy.deepcopy(model.get_submodule(name)) for pair in pairs for name in pair}
    for conv_name, norm_name in pairs:
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        fold_pair(conv, norm)
        new_conv, new_norm = fused(conv, norm)
        model.set_submodule(norm_name, new_norm)
        model.set_submodule(conv_name, new_conv)
    with torch.inference_mode():
        after = [x.float() for x in encoder.embed(batch)]
    encoder.unfolded.update(saved)
    if not all(same_rows(a, b) for a, b in zip(before, after, strict=True)):
        unfold_batch_norms(encoder)  # the probe disagrees: leave the model as it was
        return 0
    return len(pairs)


def unfold_batch_norms(encoder: Encoder) -> None:
    """Put back the convolutions and norms as loaded (before saving the weights)."""
    for name, module in encoder.unfolded.items():
        encoder.model.set_submodule(name, module)
    encoder.unfolded.clear()


def same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding of a reordered sum (relative to each row's size)."""
    scale = a.abs().amax(dim=1, keepdim=True).clamp_min(1e-6)
    return bool(((a - b).abs() / scale).max() <= 1e-3)
