"""The step-wide token mean: one normalisation for gradient accumulation and DDP.

Every loss term returns a sum over valid positions. :class:`StepMean` makes the gradient that
of the mean over the valid positions of the *whole optimizer step* (all accumulated
micro-batches, all ranks), so accumulation and DDP give the gradients of one big batch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

__all__ = ["StepMean"]


class StepMean:
    """Sum-normalised backward per micro-batch, rescaled once before the optimizer step.

    Each micro-batch backpropagates ``sum / C`` (:meth:`loss`; ``C`` a constant fixed at the first
    step) and Lightning divides it by ``accumulate_grad_batches``; DDP averages over ranks.
    :meth:`rescale_gradients` then multiplies the gradients by
    ``accumulate * world_size * C / valid_positions``, where ``valid_positions`` is summed over all
    micro-batches and ranks of the step (one all-reduce).
    """

    def __init__(self) -> None:
        self.count: Tensor | None = None  # valid positions of this step's micro-batches so far
        self.scale: float | None = None  # C

    def loss(self, weighted: Tensor, count: Tensor, trainer: Any) -> Tensor:
        """The micro-batch's loss to backpropagate: ``weighted`` (a sum) ``/ C``; counts ``count``."""
        self.count = count.detach() if self.count is None else self.count + count.detach()
        if self.scale is None:
            first = trainer.strategy.reduce(count.detach().float(), reduce_op="max")
            self.scale = max(float(first), 1.0)
        return weighted / self.scale

    def rescale_gradients(self, optimizer: torch.optim.Optimizer, trainer: Any) -> None:
        """Turn the accumulated gradient of sums into the gradient of the step-wide mean."""
        if self.count is None or self.scale is None:
            return
        total = trainer.strategy.reduce(self.count.float(), reduce_op="sum")
        self.count = None
        scale = trainer.accumulate_grad_batches * trainer.world_size * self.scale / total.clamp_min(1.0)
        grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        if grads:
            torch._foreach_mul_(grads, scale.to(grads[0].device))
