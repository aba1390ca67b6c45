"""The optimizer and learning-rate scheduler that ``DistillationModule.configure_optimizers`` returns."""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterable
from typing import Any

import torch
from lightning.pytorch.utilities.types import OptimizerLRScheduler

__all__ = ["default_optimizer", "optimizers_config"]


def default_optimizer(params) -> torch.optim.Optimizer:
    """AdamW at lr 3e-4."""
    return torch.optim.AdamW(params, lr=3e-4)


def optimizers_config(params: Iterable[torch.nn.Parameter], optimizer: Callable[..., torch.optim.Optimizer],
                      lr_scheduler: Callable[..., Any] | None, *, interval: str,
                      training_steps: Callable[[], int]) -> OptimizerLRScheduler:
    """Lightning's optimizer configuration for ``params``.

    Args:
        params: the trainable parameters.
        optimizer: ``params -> Optimizer``.
        lr_scheduler: ``optimizer -> LRScheduler`` or ``None``; a ``num_training_steps`` argument
            it requires and is not given is filled with ``training_steps()``.
        interval: ``"step"`` or ``"epoch"``.
        training_steps: the trainer's estimated stepping batches (called only when needed).

    Raises:
        ValueError: no trainable parameters.
    """
    params = list(params)
    if not params:
        raise ValueError("the student has no trainable parameters (all requires_grad=False).")
    opt = optimizer(params)
    if lr_scheduler is None:
        return opt
    if _needs_training_steps(lr_scheduler):
        lr_scheduler = functools.partial(lr_scheduler, num_training_steps=int(training_steps()))
    return {"optimizer": opt, "lr_scheduler": {"scheduler": lr_scheduler(opt), "interval": interval}}


def _needs_training_steps(factory: Callable[..., Any]) -> bool:
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return False
    param = signature.parameters.get("num_training_steps")
    return param is not None and param.default is inspect.Parameter.empty
