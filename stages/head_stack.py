"""G copies of one head trained at once: `align --lambda auto` trains its whole λ grid in one loop.

The copies start from the same weights (one seed, as G separate runs would) and see the same
batches; only their λ differs. Their parameters are stacked along a new first dimension, the
forward runs all of them in one batched call (`torch.func.vmap` over `functional_call`, so any
registered head kind stacks), and the losses of stages.losses take the (G, B, d) stack. AdamW is
elementwise, so one optimiser over the stacked tensors is G independent optimisers; gradient
clipping is per copy (`clip_grad_norms`). A head class may give its own `stacked_forward(params,
x, generator)` (the built-in heads do): on a batch shared by the copies, their first layers are
then one wide matmul instead of vmap's G small ones, and dropout draws from the stack's generator.
A stack of one runs the head itself, unbatched, and gives (B, d) batches: the arithmetic of one
run, bit for bit.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING

import torch
from torch import nn
from torch.func import functional_call, stack_module_state, vmap

from stages.heads import build_head

if TYPE_CHECKING:  # stages.train imports this module
    from stages.train import AlignSettings


class HeadStack:
    """`size` copies of `head` (its weights as they are now), stacked. `generator`: where a
    `stacked_forward` that takes one draws its random numbers (dropout) instead of torch's
    global generator, so that stacks in parallel threads do not interleave their draws."""

    def __init__(self, head: nn.Module, size: int, generator: torch.Generator | None = None):
        self.template = copy.deepcopy(head)
        self.size = size
        self.generator = generator
        params, buffers = stack_module_state([copy.deepcopy(head) for _ in range(size)])
        self.params = {k: v.detach().clone().requires_grad_() for k, v in params.items()}
        self.buffers = buffers
        # AdamW decays the matrices of the head, not its biases: by the unstacked shape
        self.decayed = {k: p.ndim >= 2 for k, p in head.named_parameters()}

    def parameters(self) -> list[torch.Tensor]:
        return list(self.params.values())

    def train(self, mode: bool = True) -> HeadStack:
        self.template.train(mode)  # what functional_call and stacked_forward see
        return self

    def eval(self) -> HeadStack:
        return self.train(False)

    def _call(self, params: dict, buffers: dict, x: torch.Tensor) -> torch.Tensor:
        return functional_call(self.template, (params, buffers), (x,))

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """(G, B, out) for a batch x (B, in) shared by the copies; (B, out) for one copy."""
        if self.size == 1:
            params = {k: v[0] for k, v in self.params.items()}
            buffers = {k: v[0] for k, v in self.buffers.items()}
            return self._call(params, buffers, x)
        stacked = getattr(self.template, "stacked_forward", None)
        if stacked is not None and not self.buffers:
            return stacked(self.params, x, self.generator)
        # randomness "same": every copy draws the dropout mask a separate run would draw
        batched = vmap(self._call, in_dims=(0, 0, None), randomness="same")
        return batched(self.params, self.buffers, x)

    def state(self, g: int) -> dict[str, torch.Tensor]:
        """Copy g's state dict (a copy, not a view)."""
        tensors = {**self.params, **self.buffers}
        return {k: v[g].detach().clone() for k, v in tensors.items()}

    def module(self, state: dict[str, torch.Tensor]) -> nn.Module:
        """A new head holding `state` (one copy's), in eval mode."""
        head = copy.deepcopy(self.template)
        head.load_state_dict(state)
        return head.eval()


def clip_grad_norms(params: list[torch.Tensor], max_norm: float) -> None:
    """torch.nn.utils.clip_grad_norm_ for each copy of stacked parameters (dimension 0 indexes
    the copy): copy g's gradients scaled by min(1, max_norm / (norm_g + 1e-6))."""
    grads = [p.grad for p in params if p.grad is not None]
    if not grads:
        return
    size = grads[0].shape[0]
    if size == 1:  # torch's own, as an unstacked run clips
        torch.nn.utils.clip_grad_norm_(params, max_norm)
        return
    norms = torch.stack([g.reshape(size, -1).norm(dim=1) for g in grads]).norm(dim=0)
    scale = (max_norm / (norms + 1e-6)).clamp(max=1.0)
    for g in grads:
        g.mul_(scale.view(-1, *[1] * (g.ndim - 1)))


def training_draws_random(settings: AlignSettings, dims: tuple[int, int]) -> bool:
    """Whether a stacked training forward of `settings.head` draws from torch's global random
    generator (dropout through vmap, say): stacks trained in parallel threads would then
    interleave their draws. A `stacked_forward` that takes a generator draws from its own (the
    low-rank head's). Probed on a stack built for the purpose; the generator is left as it
    was."""
    with torch.random.fork_rng(devices=[]):
        for in_dim in dims:
            head = build_head(settings.head, in_dim, settings.out_dim, settings.hidden_dim)
            stack = HeadStack(head, 2, torch.Generator()).train()
            before = torch.get_rng_state()
            stack(torch.zeros(2, in_dim))
            if not torch.equal(before, torch.get_rng_state()):
                return True
    return False
