"""Label alignment: the one place that decides which label scores which logit.

The module (training and evaluation), the coverage callback (training tokens per slice) and the
teacher cache (which positions to store) all count positions the same way through these functions:

* :func:`split_batch`: ``(inputs, labels)`` from a mapping batch or an ``(inputs, target)`` pair;
* :func:`align_labels`: labels per logit position, shifted for next-token prediction, with
  ``ignore_index`` where nothing is scored;
* :func:`valid_positions`: how many positions of each sample are scored;
* :func:`has_teacher_tokens` / :func:`teacher_inputs`: what the teacher reads when a batch carries
  its own tokenization (two tokenizers), for the module's live teacher and the teacher cache alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["align_labels", "has_teacher_tokens", "split_batch", "teacher_inputs", "valid_positions"]


def split_batch(batch: Any) -> tuple[Any, Tensor | None]:
    """The model inputs and the labels of ``batch``.

    Args:
        batch: a mapping (``input_ids``, ``attention_mask``, ``labels``, ...; the whole mapping
            is the inputs) or an ``(inputs, target)`` pair.

    Returns:
        ``(inputs, labels)``; ``labels`` is ``None`` for a mapping without ``"labels"``.

    Raises:
        TypeError: ``batch`` is neither a mapping nor a pair.
    """
    if isinstance(batch, Mapping):
        return batch, batch.get("labels")
    if isinstance(batch, (tuple, list)) and len(batch) == 2:
        return batch[0], batch[1]
    raise TypeError(
        f"a batch must be a mapping (input_ids, attention_mask, labels, ...) or an (inputs, target) "
        f"pair, got {type(batch).__name__}"
        + (f" of length {len(batch)}" if isinstance(batch, (tuple, list)) else "") + "."
    )


def has_teacher_tokens(batch: Any) -> bool:
    """Whether ``batch`` carries the teacher's own tokenization (``teacher_input_ids``: two tokenizers)."""
    return isinstance(batch, Mapping) and batch.get("teacher_input_ids") is not None


def teacher_inputs(batch: Any, inputs: Any) -> Any:
    """What the teacher reads: ``teacher_input_ids``/``teacher_attention_mask`` when ``batch`` carries
    the teacher's own tokens (:func:`has_teacher_tokens`), else the student's ``inputs``."""
    if has_teacher_tokens(batch):
        return {"input_ids": batch["teacher_input_ids"], "attention_mask": batch.get("teacher_attention_mask")}
    return inputs


def align_labels(labels: Tensor | None, inputs: Any, logits: Tensor | None = None, *, shift_labels: bool,
                 ignore_index: int = -100) -> Tensor | None:
    """One label per logit position, ``ignore_index`` where no position is scored.

    With ``shift_labels`` (causal LMs) the labels are shifted left, the way transformers does it
    (logits at ``t`` score token ``t + 1``); without labels, a causal LM's ``input_ids`` are the
    labels (padding, ``attention_mask == 0``, is ignored).

    Args:
        labels: the batch's labels, or ``None``.
        inputs: the model inputs (a mapping with ``input_ids`` for the causal-LM fallback).
        logits: the student's logits, to check that the labels cover the same positions;
            ``None``: no check.
        shift_labels: shift for next-token prediction.
        ignore_index: the label value that masks a position.

    Returns:
        The aligned labels, or ``None`` when there are none.

    Raises:
        ValueError: the aligned labels do not have the logits' positions.
    """
    if labels is None and shift_labels and isinstance(inputs, Mapping) and "input_ids" in inputs:
        labels = inputs["input_ids"]
        mask = inputs.get("attention_mask")
        if mask is not None:
            labels = labels.masked_fill(mask == 0, ignore_index)
    if labels is None:
        return None
    if shift_labels:
        # Shift the labels, not the logits: logits stay contiguous (no copy of (B, T, V)).
        labels = F.pad(labels[..., 1:], (0, 1), value=ignore_index)
    if logits is not None and labels.shape != logits.shape[:-1]:
        raise ValueError(
            f"labels of shape {tuple(labels.shape)} do not match the student's logits "
            f"{tuple(logits.shape)} (one label per position expected); check the batch's "
            "'labels' or pass student_logits_fn to reshape the output."
        )
    return labels


def valid_positions(batch: Any, *, shift_labels: bool, ignore_index: int = -100) -> Tensor:
    """Scored label positions per sample (the ``tokens`` that evaluation counts), without a forward.

    Args:
        batch: a training or evaluation batch (see :func:`split_batch`).
        shift_labels: as the module's ``shift_labels``.
        ignore_index: as the module's ``ignore_index``.

    Returns:
        A 1-D integer tensor, one count per sample.

    Raises:
        ValueError: the batch has neither labels nor ``input_ids``.
    """
    inputs, labels = split_batch(batch)
    source = labels
    if source is None and isinstance(inputs, Mapping):
        source = inputs.get("input_ids")
    if source is None:
        raise ValueError("cannot count label positions: the batch has no labels or input_ids.")
    aligned = align_labels(labels, inputs, shift_labels=shift_labels, ignore_index=ignore_index)
    if aligned is None:  # input_ids without labels and no shift: one per sample
        return torch.ones(source.shape[0], dtype=torch.long, device=source.device)
    return (aligned != ignore_index).reshape(aligned.shape[0], -1).sum(-1)
