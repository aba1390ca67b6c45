"""The values that travel along the one data path: teacher targets and loss inputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import Tensor

__all__ = ["LossInputs", "TeacherTargets"]


@dataclass
class TeacherTargets:
    """What the teacher says about a batch, whoever computed it.

    A live teacher fills ``logits`` with its dense output; a cache may fill the same fields
    from disk. Loss terms read this value and never ask where it came from.

    Attributes:
        logits: dense teacher logits, shape ``(..., V)``, aligned with the student's logits.
        hidden_states: optional per-layer hidden states, for feature losses.
        extras: anything else a target source wants to hand to the loss terms.
    """

    logits: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    extras: dict[str, Any] = field(default_factory=dict)


@dataclass
class LossInputs:
    """Everything a loss term may read for one micro-batch.

    Attributes:
        student_logits: ``(..., V)``; for causal LMs position ``t`` scores token ``t + 1``.
        labels: ``(...)`` targets aligned with ``student_logits``; ``ignore_index`` marks
            positions that count for nothing (padding, prompts, the last position of a
            causal LM). Never ``None``: without labels the module builds an all-valid mask.
        teacher: the teacher's targets, or ``None`` when no teacher is attached.
        ignore_index: the mask value in ``labels``.
        student_output: the student's raw output, for terms that need more than logits.
        batch: the batch as the dataloader gave it.
    """

    student_logits: Tensor
    labels: Tensor
    teacher: TeacherTargets | None = None
    ignore_index: int = -100
    student_output: Any = None
    batch: Any = None
