"""The dense divergences: student logits against teacher logits of the same shape.

The public functions (``forward_kl``, ``reverse_kl``, ...) are made from the registry
(:mod:`lightning_distill.losses.registry`), one per entry, all with the same keywords (see
:mod:`lightning_distill.losses.functional`); :func:`cross_entropy` (hard labels) and the top-1
agreement share the chunk engine.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_distill.losses.chunking import Reduction, _check_inputs, _reduce, check_class_ids
from lightning_distill.losses.formulas import _ce_grad, _ce_rows
from lightning_distill.losses.registry import REGISTRY, Divergence, get, make_public


def _dense(entry: Divergence, params: dict[str, float], student_logits: Tensor,
           teacher_logits: Tensor, **keywords):
    return _reduce(entry.row_fn(params), student_logits, teacher_logits, closed_form=entry.closed_form,
                   **keywords)


def _doc(entry: Divergence) -> str:
    param = ""
    if entry.param is not None:
        p = entry.param
        interval = f"{'(' if p.low_open else '['}{p.low:g}, {p.high:g}{')' if p.high_open else ']'}"
        param = f"\n\n``{p.name}`` (default {p.default:g}) lies in {interval}."
    return (f"{entry.formula}: {entry.summary}{param}\n\n"
            "Keywords and reductions as every function of :mod:`lightning_distill.losses.functional`; "
            "made from the registry entry ``registry.REGISTRY[" + repr(entry.name) + "]``.")


#: Divergences by name, for configs: ``LogitKD(divergence="reverse_kl")``.
DIVERGENCES: dict[str, Callable[..., object]] = {
    name: make_public(entry, name, "teacher_logits", _doc(entry), _dense, __name__)
    for name, entry in REGISTRY.items()
}
globals().update(DIVERGENCES)  # forward_kl, reverse_kl, ...: one public function per entry
__all__ = ["DIVERGENCES", "cross_entropy", "divergence", "is_top1", "top1_agreement", *DIVERGENCES]


def divergence(name: str) -> Callable[..., object]:
    """Look a divergence up by name, with an error that lists the known ones.

    Raises:
        ValueError: an unknown name.
    """
    return DIVERGENCES[get(name).name]


def cross_entropy(
    student_logits: Tensor,
    labels: Tensor,
    *,
    temperature: float = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """Hard-label cross-entropy, -log q_label, with the same chunked memory profile.

    Equal to ``F.cross_entropy(logits.flatten(0, -2), labels.flatten(), ignore_index=...)``
    for ``reduction="mean"``.
    """
    check_class_ids(labels)
    return _reduce(
        _ce_rows, student_logits, None, closed_form=_ce_grad, temperature=temperature, labels=labels,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


@torch.no_grad()
def is_top1(logits: Tensor, ids: Tensor) -> Tensor:
    """``(...)`` bool: whether class ``ids`` (``(...)``) is a most likely class of ``logits`` ``(..., V)``.

    The same as ``logits.argmax(-1) == ids`` except at exact ties (every tied class counts), and
    an order of magnitude faster on CPUs: a gather and a max instead of an argmax. An id outside
    ``[0, V)`` (padding, ``ignore_index``, a label the teacher's smaller vocabulary lacks) is never
    top-1.
    """
    vocab = logits.shape[-1]
    picked = logits.gather(-1, ids.clamp(0, vocab - 1).unsqueeze(-1)).squeeze(-1)
    return (picked >= logits.amax(-1)) & (ids >= 0) & (ids < vocab)


@torch.no_grad()
def top1_agreement(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
):
    """Share of positions where the student's and the teacher's most likely token agree."""
    _check_inputs(student_logits, teacher_logits, labels, 1.0, reduction)
    agree = is_top1(student_logits, teacher_logits.argmax(-1)).float()
    if labels is None:
        mask = torch.ones_like(agree, dtype=torch.bool)
    else:
        mask = labels != ignore_index
    agree = agree * mask
    if reduction == "none":
        return agree
    total, count = agree.sum(), mask.sum()
    if reduction == "sum_and_count":
        return total, count
    return total / count.clamp_min(1)
