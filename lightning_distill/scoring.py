"""How well the student matches the labels and the teacher: the numbers reports are made of.

* :func:`sample_sums`: per-sample sums (tokens, NLL, agreement, KL, correct) of one forward, the
  source of every per-slice report (:mod:`lightning_distill.reporting`);
* :func:`agreement_and_kl`: the batch totals of top-1 agreement and forward KL that the module
  logs as ``train/agreement``, ``val/kl``, ...

Both compare at temperature 1 (see :func:`report_temperature` for sampled cache targets) and
count only positions whose label is not ``ignore_index``.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightning_distill.alignment import align_labels, has_teacher_tokens
from lightning_distill.losses import functional as LF
from lightning_distill.teacher import match_sparse_vocab, match_vocab
from lightning_distill.types import LossInputs, SparseTargets, TeacherTargets

__all__ = ["agreement_and_kl", "embedding_sums", "report_temperature", "sample_sums"]


def report_temperature(sparse: SparseTargets) -> float:
    """Reports compare at T = 1; sampled targets without log-probabilities exist only at their
    sample temperature, so their KL is reported there."""
    if sparse.kind == "sampled" and sparse.logprobs is None:
        return float(sparse.sample_temperature)
    return 1.0


@torch.no_grad()
def agreement_and_kl(loss_inputs: LossInputs, kl: Tensor | None = None) -> tuple[Tensor, Tensor] | None:
    """Summed top-1 agreement and forward KL at T=1 over one batch's valid positions.

    Args:
        loss_inputs: the terms' inputs (student logits over the teacher's vocabulary).
        kl: the KL sum when the loss already computed it (it is not computed again).

    Returns:
        ``(agreement, kl)``, or ``None`` without a teacher distribution.
    """
    teacher, ignore_index = loss_inputs.teacher, loss_inputs.ignore_index
    if teacher is None or not teacher.has_distribution:
        return None
    s, labels = loss_inputs.student_logits.detach(), loss_inputs.labels
    if has_teacher_tokens(loss_inputs.batch):
        return None  # a teacher with its own tokens (cross-tokenizer): no position-wise agreement
    if teacher.logits is None:
        mask = labels != ignore_index
        agree = (LF.is_top1(s, teacher.top1) & mask).sum()
        if kl is None:
            kl = LF.sparse_forward_kl(s, teacher.sparse, labels=labels, ignore_index=ignore_index,
                                      temperature=report_temperature(teacher.sparse),
                                      reduction="sum_and_count")[0]
        return agree, kl
    agree = LF.top1_agreement(s, teacher.logits, labels=labels, ignore_index=ignore_index,
                              reduction="sum_and_count")[0]
    if kl is None:
        kl = LF.forward_kl(s, teacher.logits, labels=labels, ignore_index=ignore_index,
                           reduction="sum_and_count")[0]
    return agree, kl


@torch.no_grad()
def sample_sums(student_logits: Tensor, labels: Tensor | None, teacher: TeacherTargets | None, *,
                ignore_index: int, vocab_mismatch: str, batch: Any = None) -> dict[str, Tensor]:
    """Per-sample evaluation sums from one forward's logits (see
    :meth:`DistillationModule.sample_sums <lightning_distill.module.DistillationModule.sample_sums>`).

    Args:
        student_logits: the student's logits, ``(..., V)``.
        labels: labels aligned to the logits.
        teacher: the teacher's targets as they came (before any vocabulary slicing), or ``None``.
        ignore_index: label value that masks a position.
        vocab_mismatch: ``"error"`` or ``"slice"`` (see :mod:`lightning_distill.teacher`).
        batch: the batch. A cross-tokenizer batch (``teacher_input_ids``, ``teacher_labels``,
            ``bytes``) adds ``bytes`` (UTF-8 bytes of the scored text, the same for both models)
            and scores the teacher's NLL on its own tokens; agreement and KL, which need one
            vocabulary, are left out.

    Returns:
        ``{name: (batch,) tensor}``: ``tokens``, ``student_nll``, ``correct`` and, with a teacher,
        ``teacher_nll``, ``agreement``, ``kl``, ``teacher_correct`` (as far as the targets hold them);
        ``bytes`` for a cross-tokenizer batch.

    Raises:
        ValueError: no labels; labels a smaller teacher vocabulary cannot score.
    """
    if labels is None:
        raise ValueError("evaluate_batch needs labels (or input_ids for a causal LM) to score the student.")
    per_sample = (labels.shape[0], -1)
    mask = labels != ignore_index
    out = {
        "tokens": mask.reshape(per_sample).sum(-1),
        "student_nll": LF.cross_entropy(student_logits, labels, ignore_index=ignore_index,
                                        reduction="none").reshape(per_sample).sum(-1),
        "correct": (LF.is_top1(student_logits, labels) & mask).reshape(per_sample).sum(-1),
    }
    if has_teacher_tokens(batch):
        if batch.get("bytes") is not None:
            out["bytes"] = batch["bytes"].reshape(-1)
        if teacher is not None and teacher.logits is not None:
            # Cross-tokenizer batches are causal-LM text: the teacher's labels shift as the student's.
            t_labels = align_labels(batch.get("teacher_labels"), {"input_ids": batch["teacher_input_ids"]},
                                    teacher.logits, shift_labels=True, ignore_index=ignore_index)
            out["teacher_nll"] = LF.cross_entropy(teacher.logits, t_labels, ignore_index=ignore_index,
                                                  reduction="none").reshape(per_sample).sum(-1)
        return out
    if teacher is not None and teacher.logits is not None:
        s, t = match_vocab(student_logits, teacher.logits, vocab_mismatch)
        vt = teacher.logits.shape[-1]
        if vt < student_logits.shape[-1] and bool(((labels >= vt) & mask).any()):
            bad = int(torch.where(mask, labels, -1).max())
            raise ValueError(
                f"label id {bad} is outside the teacher's {vt} output classes (vocab_mismatch='slice', student "
                f"vocabulary {student_logits.shape[-1]}), so the teacher's perplexity is undefined there; mark "
                f"such positions with ignore_index ({ignore_index}) in the evaluation labels, or evaluate "
                "without the teacher."
            )
        out["teacher_nll"] = LF.cross_entropy(teacher.logits, labels, ignore_index=ignore_index,
                                              reduction="none").reshape(per_sample).sum(-1)
        out["agreement"] = LF.top1_agreement(s, t, labels=labels, ignore_index=ignore_index,
                                             reduction="none").reshape(per_sample).sum(-1)
        out["kl"] = LF.forward_kl(s, t, labels=labels, ignore_index=ignore_index,
                                  reduction="none").reshape(per_sample).sum(-1)
        out["teacher_correct"] = (LF.is_top1(teacher.logits, labels) & mask).reshape(per_sample).sum(-1)
    elif teacher is not None and teacher.sparse is not None:
        # Cached top-k / sampled targets: the teacher's label log-probability and top-1 id
        # were stored at build time; KL is the sparse estimate (see docs/teacher_cache.md).
        s = match_sparse_vocab(student_logits, teacher.sparse, vocab_mismatch)
        if teacher.label_logprobs is not None:
            out["teacher_nll"] = torch.where(mask, -teacher.label_logprobs, 0.0).reshape(per_sample).sum(-1)
        if teacher.top1 is not None:
            out["agreement"] = (LF.is_top1(s, teacher.top1) & mask).reshape(per_sample).sum(-1)
            out["teacher_correct"] = ((teacher.top1 == labels) & mask).reshape(per_sample).sum(-1)
        out["kl"] = LF.sparse_forward_kl(s, teacher.sparse, labels=labels, ignore_index=ignore_index,
                                         temperature=report_temperature(teacher.sparse),
                                         reduction="none").reshape(per_sample).sum(-1)
    return out


@torch.no_grad()
def embedding_sums(student: Tensor, teacher: TeacherTargets | None) -> dict[str, Tensor]:
    """Per-sample evaluation values of an embedding model: ``tokens`` (1 per sample, the count the
    step mean uses), ``student_embeddings`` ``(B, Ds)`` and, with a teacher, ``teacher_embeddings``
    ``(B, Dt)``. Per-slice similarity agreement is computed from them
    (:func:`lightning_distill.similarity.similarity_agreement`).
    """
    out = {"tokens": torch.ones(student.shape[0], dtype=torch.long, device=student.device),
           "student_embeddings": student.detach()}
    if teacher is not None and teacher.embeddings is not None:
        out["teacher_embeddings"] = teacher.embeddings.detach()
    return out
