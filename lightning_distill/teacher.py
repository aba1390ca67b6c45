"""The teacher side of :class:`~lightning_distill.module.DistillationModule`.

* :class:`TeacherLogitsCheck`: a live teacher's NaN/+inf (or -inf) logits stop the run, naming
  the step and the samples; on CUDA the check is read one step later (no host sync).
* Vocabulary alignment between student and teacher logits: :func:`check_model_vocabs` (at fit
  start, from the models' configs), :func:`match_vocab` (dense teacher logits),
  :func:`check_cached_vocab` and :func:`match_sparse_vocab` (cached top-k/sampled targets).

``policy`` is the module's ``vocab_mismatch``: ``"error"`` or ``"slice"`` (compare over the
shared first ``min(V_student, V_teacher)`` entries when one vocabulary extends the other).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import Tensor, nn

from lightning_distill.losses import registry
from lightning_distill.models.adapters import (
    is_classifier,
    output_vocab_size,
    vocab_mismatch_message,
)
from lightning_distill.types import SparseTargets

__all__ = ["TeacherLogitsCheck", "check_cached_vocab", "check_model_vocabs", "match_sparse_vocab", "match_vocab"]

_NO_NEG_INF = registry.no_neg_inf_names()  # divergences that turn a teacher's -inf into inf


class TeacherLogitsCheck:
    """Refuse a live teacher's NaN/+inf, an all ``-inf`` row, and (``strict``) any ``-inf``.

    :meth:`check` does one reduction over the vocabulary; the result is inspected at once on
    CPU and at the next :meth:`check` or :meth:`flush` on CUDA (no host sync on the hot path).
    """

    def __init__(self) -> None:
        # The check waiting on the device: (bad rows, CUDA event or None, where, sample ids, strict).
        self._pending: tuple[Tensor, Any, str, Any, bool] | None = None

    def check(self, logits: Tensor, batch: Any, inputs: Any, *, strict: bool, step: int | None) -> None:
        """Check ``logits`` of one batch (raises here for an earlier CUDA batch found bad).

        Args:
            logits: the teacher's logits ``(..., V)``.
            batch: the batch (its ``sample_id`` values name the bad samples).
            inputs: the model inputs (positions masked out by ``attention_mask`` never count).
            strict: any ``-inf`` is refused (a term such as ``reverse_kl`` cannot take one).
            step: the global step, for the message (``None``: "this batch").

        Raises:
            ValueError: non-finite teacher logits (see :meth:`flush`).
        """
        if strict:
            low, high = torch.aminmax(logits.detach(), dim=-1)
            bad = ~torch.isfinite(high) | (low == float("-inf")) | torch.isnan(low)
        else:
            bad = ~torch.isfinite(logits.detach().amax(-1))  # amax keeps NaN; +inf; an all -inf row
        mask = inputs.get("attention_mask") if isinstance(inputs, Mapping) else None
        if isinstance(mask, Tensor) and mask.shape == bad.shape:
            bad = bad & (mask != 0)  # padding positions are never scored
        bad = bad.reshape(bad.shape[0], -1).any(-1) if bad.dim() > 1 else bad
        ids = batch.get("sample_id") if isinstance(batch, Mapping) else None
        where = f"global step {step}" if step is not None else "this batch"
        self.flush()
        if bad.device.type == "cuda":
            host = bad.to("cpu", non_blocking=True)
            event = torch.cuda.Event()
            event.record()
            self._pending = (host, event, where, ids, strict)
        else:
            self._pending = (bad, None, where, ids, strict)
            self.flush()

    def flush(self) -> None:
        """Raise for a pending check that found a non-finite output.

        Raises:
            ValueError: naming the step and the batch's ``sample_id`` values (or row numbers).
        """
        pending, self._pending = self._pending, None
        if pending is None:
            return
        bad, event, where, ids, strict = pending
        if event is not None:
            event.synchronize()
        if not bool(bad.any()):
            return
        rows = torch.nonzero(bad.cpu()).flatten().tolist()
        if isinstance(ids, Tensor):
            ids = ids.detach().cpu().reshape(-1).tolist()
        named = [ids[r] for r in rows] if isinstance(ids, list | tuple) and len(ids) == len(bad) else None
        who = f"sample id(s) {named}" if named is not None else f"batch row(s) {rows} (no 'sample_id' in the batch)"
        neg = " or -inf (which " + " / ".join(_NO_NEG_INF) + " cannot compare)" if strict else ""
        raise ValueError(
            f"the teacher's logits contain NaN or +inf (or a row of only -inf){neg} at {where}, for {who}; "
            "training stopped before the student's weights turn NaN. Check the teacher and these inputs "
            "(building a teacher cache refuses the same samples)."
        )


def check_model_vocabs(student: nn.Module, teacher: nn.Module, policy: str) -> None:
    """Compare the models' output sizes (when their configs tell) before any step.

    Raises:
        ValueError: the sizes differ and ``policy`` is ``"error"`` (for classifiers: the label sets).
    """
    vs, vt = output_vocab_size(student), output_vocab_size(teacher)
    if vs is not None and vt is not None and vs != vt and policy == "error":
        if is_classifier(student) or is_classifier(teacher):
            raise ValueError(
                f"the student classifies into {vs} labels and the teacher into {vt} (config.num_labels); "
                "distillation compares their label distributions, so both need the same label set in the "
                "same order (their token vocabularies may differ)."
            )
        raise ValueError(vocab_mismatch_message(vs, vt))


def match_vocab(student_logits: Tensor, teacher_logits: Tensor, policy: str) -> tuple[Tensor, Tensor]:
    """Student and teacher logits over the same vocabulary (the shared prefix under ``"slice"``).

    Raises:
        ValueError: the logits cover different positions, or the vocabularies differ under ``"error"``.
    """
    vs, vt = student_logits.shape[-1], teacher_logits.shape[-1]
    if student_logits.shape[:-1] != teacher_logits.shape[:-1]:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} cover different positions; both models must see the "
            "same batch (same tokenizer and sequence length)."
        )
    if vs == vt:
        return student_logits, teacher_logits
    if policy == "slice":
        shared = min(vs, vt)
        return student_logits[..., :shared], teacher_logits[..., :shared]
    raise ValueError(vocab_mismatch_message(vs, vt))


def check_cached_vocab(vs: int, vt: int, *, sparse: bool, policy: str) -> None:
    """Raise when cached targets over ``vt`` ids cannot meet a student over ``vs`` ids.

    Dense cached logits follow the live rule (``policy``); top-k/sampled ids also need
    ``vs >= vt`` under ``"slice"`` (an id past the student's vocabulary has no logit; a cache
    built with the student attached folds those ids, so its ``vt`` is ``vs``).

    Raises:
        ValueError: the vocabularies cannot be compared under ``policy``, with the fix.
    """
    if vs == vt or (policy == "slice" and (vs > vt or not sparse)):
        return
    hint = (f" These cached top-k/sampled targets index {vt} ids, more than the student has: build the cache "
            "with this student and the teacher attached (under vocab_mismatch='slice' the ids past the "
            "student's vocabulary are folded), or use a cache built for this student."
            if policy == "slice" else "")
    raise ValueError(vocab_mismatch_message(vs, vt) + hint)


def match_sparse_vocab(student_logits: Tensor, sparse: SparseTargets, policy: str) -> Tensor:
    """The student's logits over the ``sparse`` targets' vocabulary (see :func:`check_cached_vocab`)."""
    vs, vt = student_logits.shape[-1], sparse.vocab_size
    check_cached_vocab(vs, vt, sparse=True, policy=policy)
    return student_logits if vs == vt else student_logits[..., :vt]
