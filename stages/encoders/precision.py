"""The precision encoders compute in (`--precision fp32|bf16|auto`) and how an encoder is placed
on its device: weights cast to that dtype once (not autocast per op: the weights would be cast
again on every batch), CNN weights and inputs channels-last.

`auto` is bf16 where the hardware computes it natively: a CUDA GPU with bf16 units (Ampere or
newer), a CPU with AVX-512 BF16 or AMX (asked of torch's cpuinfo, not read from /proc); fp32
elsewhere, where bf16 would be emulated and slower than fp32. The store keeps float16 features,
so bf16 compute costs agreement with fp32 (cosine >= 0.999 per row; docs/store.md), not stored
precision. The environment variable STRUCTURE_PRECISION (fp32 or bf16) overrides what `auto`
means, e.g. to pin a test suite or a site to one precision; an explicit --precision wins.
"""

from __future__ import annotations

import os

import torch

from stages.encoders.base import Encoder
from stages.encoders.fold import fuse_for_inference, runs_on_probe, unfuse
from store.errors import UserError

PRECISIONS = ("auto", "fp32", "bf16")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
AUTO_ENV = "STRUCTURE_PRECISION"


def native_bf16(device: torch.device) -> bool:
    """Whether `device` computes bf16 natively (not through conversions to float32)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported(including_emulation=False)
    if device.type == "cpu":
        cpu = torch.cpu  # torch's cpuinfo: AVX-512 BF16 (Cooper Lake, Zen 4+) or AMX tiles (SPR+)
        checks = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
        return any(getattr(cpu, name, lambda: False)() for name in checks)
    return False


def resolve_precision(precision: str, device: torch.device) -> str:
    """`fp32` or `bf16`: `auto` by the hardware (or STRUCTURE_PRECISION), others as given."""
    if precision not in PRECISIONS:
        raise UserError(f"--precision must be one of {', '.join(PRECISIONS)}, not {precision!r}")
    if precision != "auto":
        return precision
    pinned = os.environ.get(AUTO_ENV, "")
    if pinned:
        if pinned not in DTYPES:
            raise UserError(f"{AUTO_ENV} must be fp32 or bf16, not {pinned!r}")
        return pinned
    return "bf16" if native_bf16(device) else "fp32"


def uses_channels_last(encoder: Encoder) -> bool:
    """CNNs (pooled stage maps, `gap`): oneDNN and cuDNN run NHWC convolutions faster, and
    bf16 ones much faster, than NCHW. Transformers gain nothing (one patch convolution)."""
    return encoder.modality == "image" and encoder.pooling == "gap"


def place_encoder(encoder: Encoder, device: torch.device, precision: str) -> None:
    """Ready the encoder's model for inference on `device`: batch norms folded and oneDNN's
    fused kernels on the CPU (stages.encoders.fold, in float32), the floating-point weights
    cast to `precision` (fp32 or bf16, resolved) and, for a CNN, channels-last. Take the
    fingerprint before: it hashes the weights as loaded (`save_encoder` puts them back).
    The fusions are checked in float32; where oneDNN then has no fused kernel in `precision`
    (bf16 on a CPU without AVX-512), the model is put back as loaded, in `precision`."""
    encoder.model.to(device=device)
    fused = fuse_for_inference(encoder)
    cast(encoder, precision)
    if fused and precision != "fp32" and not runs_on_probe(encoder):  # fp32: checked in it
        unfuse(encoder)
        cast(encoder, precision)


def cast(encoder: Encoder, precision: str) -> None:
    """The floating-point weights in `precision`; a CNN's in channels-last."""
    encoder.model.to(dtype=DTYPES[precision])
    if uses_channels_last(encoder):
        encoder.model.to(memory_format=torch.channels_last)
