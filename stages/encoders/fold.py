"""Inference-only fusions: batch norms folded into the convolutions before them (CNNs), and on
the CPU oneDNN's linears and convolutions with their bias and activation fused.

In eval mode a BatchNorm after a convolution is an affine map per channel, so it folds exactly
into the convolution's weight and bias: y = (W x + b - mean) * g / sqrt(var + eps) + beta. On a
CPU the separate norm pass over every feature map is a memory-bound quarter of an
EfficientNet's forward; folded, it costs nothing. timm's norm + activation modules go further
on the CPU: the activation runs inside oneDNN's convolution (a post-op), one more pass over the
map saved. Which norm follows which convolution is observed on one probe batch (a norm whose
input is a convolution's output, each module run once), and the folded encoder must give the
same pooled layers on that batch, else the model is left as it was. The replaced modules are
kept: `unfuse` (called by `save_encoder`) puts them back, so an export saves the
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
    hf_gelu = type(act).__name__ == "GELUActivation" and type(act).__module__.startswith("trans")
    if hf_gelu and getattr(act, "act", None) is nn.functional.gelu:  # transformers' exact GELU
        return "gelu", [], "none"
    return None


def fusable_kernels() -> bool:
    """Whether this torch has oneDNN's convolution and linear with fused activations (CPU)."""
    try:
        return torch.backends.mkldnn.is_available() and bool(
            torch.ops.mkldnn._convolution_pointwise and torch.ops.mkldnn._linear_pointwise
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


class OneDNNLinear(nn.Linear):
    """An nn.Linear (same parameters, same state-dict keys: its class is swapped in place)
    computed on the CPU by oneDNN with its bias, and the activation after it when there is
    one, fused: torch's addmm first copies the bias into the whole output, a third of a ViT's
    linear time. `post_op`: (oneDNN name, scalars, algorithm, the activation module or None)."""

    post_op: tuple[str, list[float], str, nn.Module | None] = ("none", [], "", None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        name, scalars, algorithm, act = self.post_op
        if x.device.type == "cpu" and x.dtype == self.weight.dtype:
            return torch.ops.mkldnn._linear_pointwise(
                x, self.weight, self.bias, name, scalars, algorithm
            )
        out = nn.functional.linear(x, self.weight, self.bias)
        return out if act is None else act(out)


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
        or not fusable_kernels()
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


def direct_pairs(
    model: nn.Module, batch: dict[str, torch.Tensor], embed, first, second
) -> list[tuple[str, str]]:
    """(name, name) of the modules A, B (first(A), second(B) true) where, on `batch`, B's input
    was A's output (the same tensor), both run once."""
    names = {module: name for name, module in model.named_modules()}
    calls: dict[nn.Module, int] = {}
    # id of a convolution's output -> (the convolution, the output: kept alive, so that no
    # later tensor gets its id)
    produced: dict[int, tuple[nn.Module, torch.Tensor]] = {}
    seen: list[tuple[nn.Module, nn.Module]] = []

    def after_first(module, args, output):
        calls[module] = calls.get(module, 0) + 1
        produced[id(output)] = (module, output)

    def before_second(module, args):
        calls[module] = calls.get(module, 0) + 1
        conv, _ = produced.get(id(args[0]), (None, None))
        if conv is not None:
            seen.append((conv, module))

    hooks = []
    for module in model.modules():
        if first(module):
            hooks.append(module.register_forward_hook(after_first))
        elif second(module):
            hooks.append(module.register_forward_pre_hook(before_second))
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
    """One seeded noise image (or a sentence), prepared and collated as extraction does."""
    if encoder.modality == "image":
        pixels = np.random.default_rng(0).integers(0, 256, (96, 96, 3), dtype=np.uint8)
        item = Image.fromarray(pixels)
    else:
        item = "A probe sentence, with 7 words and digits 0-9."
    batch = encoder.collate([encoder.prepare(item)])
    return {k: v.to(device) for k, v in batch.items()}


def is_norm(module: nn.Module) -> bool:
    return norm_replacement(module) is not None and module.track_running_stats


def fuse_for_inference(encoder: Encoder) -> int:
    """Fold, in place, every batch norm that directly follows a convolution into it and, on
    the CPU, compute linears (and convolutions before timm's norm + activation) with oneDNN,
    fusing the activation that directly follows them. The model is in float32 on its device.
    Returns how many modules changed; the replaced ones are kept in `encoder.unfolded`."""
    model = encoder.model
    device = next(model.parameters()).device
    cpu = device.type == "cpu" and fusable_kernels()
    has_norms = any(is_norm(m) for m in model.modules())
    if model.training or not (has_norms or cpu):
        return 0
    batch = probe_batch(encoder, device)
    norms = direct_pairs(model, batch, encoder.embed, is_conv, is_norm) if has_norms else []
    linears = [name for name, m in model.named_modules() if type(m) is nn.Linear] if cpu else []
    acts = direct_pairs(model, batch, encoder.embed, is_linear, is_activation) if cpu else []
    if not (norms or linears):
        return 0
    with torch.inference_mode():
        before = [x.float() for x in encoder.embed(batch)]
    saved = {name: copy.deepcopy(model.get_submodule(name)) for pair in norms for name in pair}
    saved.update({act: model.get_submodule(act) for _, act in acts})
    encoder.unfolded.update(saved)
    for conv_name, norm_name in norms:
        conv, norm = model.get_submodule(conv_name), model.get_submodule(norm_name)
        fold_pair(conv, norm)
        new_conv, new_norm = fused(conv, norm)
        model.set_submodule(norm_name, new_norm)
        model.set_submodule(conv_name, new_conv)
    for name in linears:
        model.get_submodule(name).__class__ = OneDNNLinear
    for linear_name, act_name in acts:
        act = model.get_submodule(act_name)
        model.get_submodule(linear_name).post_op = (*onednn_activation(act), act)
        model.set_submodule(act_name, nn.Identity())
    try:
        with torch.inference_mode():
            after = [x.float() for x in encoder.embed(batch)]
        agree = all(same_rows(a, b) for a, b in zip(before, after, strict=True))
    except RuntimeError:  # a kernel oneDNN does not have for these shapes
        agree = False
    if not agree:
        unfuse(encoder)  # the probe disagrees: leave the model as it was
        return 0
    return len(norms) + len(linears) + len(acts)


def runs_on_probe(encoder: Encoder) -> bool:
    """Whether the model, as placed, runs the probe batch: oneDNN's fused linears and
    convolutions have no bf16 kernels on a CPU without AVX-512 ('could not create a primitive
    descriptor')."""
    device = next(encoder.model.parameters()).device
    try:
        with torch.inference_mode():
            encoder.embed(probe_batch(encoder, device))
    except RuntimeError:
        return False
    return True


def unfuse(encoder: Encoder) -> None:
    """Put back the modules as loaded (before saving the weights)."""
    for name, module in encoder.unfolded.items():
        encoder.model.set_submodule(name, module)
    encoder.unfolded.clear()
    for module in encoder.model.modules():
        if isinstance(module, OneDNNLinear):
            module.__class__ = nn.Linear
            module.__dict__.pop("post_op", None)


def is_conv(module: nn.Module) -> bool:
    return isinstance(module, nn.Conv2d)


def is_linear(module: nn.Module) -> bool:
    return type(module) is nn.Linear


def is_activation(module: nn.Module) -> bool:
    return onednn_activation(module) is not None


def same_rows(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to float32 rounding of a reordered sum (relative to each row's size)."""
    scale = a.abs().amax(dim=1, keepdim=True).clamp_min(1e-6)
    return bool(((a - b).abs() / scale).max() <= 1e-3)
