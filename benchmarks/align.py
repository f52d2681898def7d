"""One training step with R_S against a plain CLIP step: seconds, ratio and pairs/s.

    python -m benchmarks.align                      # batch 4096, D 1024 -> d 512, CPU
    python -m benchmarks.align --device cuda --repeats 10

A step is: both heads forward, the loss, backward, gradient clipping and an AdamW update.
Variants:
  clip               L_A only (the --lambda 0 baseline)
  rs1                + lambda (R_S image + R_S text), level 1, original side computed in the step
  rs1 cached         the same with the original side computed beforehand (one batch = all data)
  rs3                levels 3 (three B x B x B matrix products per side and pass)
  plain rs1 / rs3    a straightforward R_S: autograd through softmax, log and KL, both sides
                     recomputed every step (the original one without gradient)
"""

from __future__ import annotations

import sys
from pathlib import Path

# run as a script, Python puts benchmarks/ first on the path, where select.py would shadow the
# standard library's `select`: put the repository root there instead
sys.path[0] = str(Path(__file__).resolve().parents[1])

import argparse  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from collections.abc import Callable  # noqa: E402

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from stages.losses import clip_loss, structure_regularizer, structure_targets  # noqa: E402


def plain_rs(original: torch.Tensor, aligned: torch.Tensor, levels: int, tau: float):
    """R_S as one would first write it: every step, softmax and KL through autograd."""

    def probs(x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(x, dim=-1)
        x = x - x.mean(dim=0, keepdim=True)
        return torch.softmax(x @ x.T / tau, dim=1)

    with torch.no_grad():
        p = probs(original)
    q = probs(aligned)
    total, pl, ql = 0.0, p, q
    for level in range(1, levels + 1):
        if level > 1:
            pl, ql = pl @ p, ql @ q
        m = 0.5 * (pl + ql)
        eps = torch.finfo(q.dtype).tiny
        kl_p = (pl * (pl.clamp_min(eps).log() - m.clamp_min(eps).log())).sum(1)
        kl_q = (ql * (ql.clamp_min(eps).log() - m.clamp_min(eps).log())).sum(1)
        total = total + (0.5 * (kl_p + kl_q)).mean() / level
    return total / levels


def make_step(variant: str, xi, xt, heads, optimizer, lam: float, tau: float) -> Callable:
    image_head, text_head = heads
    params = [*image_head.parameters(), *text_head.parameters()]
    levels = 3 if variant.endswith("3") else 1
    cached = None
    if variant == "rs1 cached":
        cached = (structure_targets(xi, 1, tau), structure_targets(xt, 1, tau))

    def step() -> None:
        zi, zt = image_head(xi), text_head(xt)
        loss = clip_loss(zi, zt, tau)
        if variant.startswith("plain"):
            loss = loss + lam * (plain_rs(xi, zi, levels, tau) + plain_rs(xt, zt, levels, tau))
        elif variant != "clip":
            ti, tt = cached or (
                structure_targets(xi, levels, tau),
                structure_targets(xt, levels, tau),
            )
            rs = structure_regularizer(ti, zi, levels, tau) + structure_regularizer(
                tt, zt, levels, tau
            )
            loss = loss + lam * rs
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()

    return step


def timed(step: Callable, repeats: int, device: str) -> float:
    """Median seconds of `repeats` steps after one warm-up step."""
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    step()
    sync()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        sync()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--in-dim", type=int, default=1024)
    parser.add_argument("--out-dim", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    parser.add_argument(
        "--variants", default="clip,rs1,rs1 cached,plain rs1,rs3,plain rs3",
        help="Comma-separated subset of: clip, rs1, rs1 cached, plain rs1, rs3, plain rs3.",
    )  # fmt: skip
    args = parser.parse_args()
    torch.manual_seed(0)
    dev = torch.device(args.device)
    xi = torch.randn(args.batch, args.in_dim, device=dev)
    xt = torch.randn(args.batch, args.in_dim, device=dev)
    where = (
        torch.cuda.get_device_name() if dev.type == "cuda" else f"{torch.get_num_threads()} threads"
    )
    print(
        f"batch {args.batch}, D {args.in_dim} -> d {args.out_dim}, linear heads, {args.device} "
        f"({where}), median of {args.repeats} steps, torch {torch.__version__}"
    )
    print(f"{'variant':<12} {'ms/step':>9} {'x clip':>7} {'pairs/s':>9}")
    base = None
    for variant in [v.strip() for v in args.variants.split(",")]:
        heads = (
            torch.nn.Linear(args.in_dim, args.out_dim).to(dev),
            torch.nn.Linear(args.in_dim, args.out_dim).to(dev),
        )
        optimizer = torch.optim.AdamW(
            [*heads[0].parameters(), *heads[1].parameters()], lr=1e-3, betas=(0.9, 0.95)
        )
        step = make_step(variant, xi, xt, heads, optimizer, lam=10.0, tau=0.05)
        seconds = timed(step, args.repeats, args.device)
        base = base or seconds
        print(
            f"{variant:<12} {1e3 * seconds:9.1f} {seconds / base:7.2f} {args.batch / seconds:9.0f}"
        )


if __name__ == "__main__":
    main()
