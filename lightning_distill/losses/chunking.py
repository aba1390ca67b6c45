"""The chunk engine: a divergence's sum over positions without the (N, V) autograd graph.

Every loss function of this package reduces through :func:`_reduce` (dense teacher logits) or
:func:`_reduce_rows` (any per-row teacher, such as the sparse targets' coarse rows). When the
student's logits need a gradient, :class:`_ChunkedSum` walks the positions in chunks, computes
each chunk's gradient right away (in closed form when the divergence has one, else with a
small local graph) and keeps only that gradient, in one buffer of the student-logits' size.
Peak working memory for forward + backward is about 1.1x that buffer (see
``benchmarks/kd_loss_memory.py``).
"""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightning_distill.losses.formulas import GradFn, RowFn
from lightning_distill.validation import check_choice, check_int, check_number, check_tensor

Reduction = Literal["mean", "sum_and_count", "none"]
_REDUCTIONS = ("mean", "sum_and_count", "none")

# Elements (rows x vocabulary) handled per chunk: 4M float32 values is 16 MiB per temporary.
_DEFAULT_CHUNK_ELEMENTS = 4 * 2**20
_MIN_CHUNK_ELEMENTS = 2**18

#: A teacher's rows as the engine walks them: dense logits (a Tensor), ``None`` (no teacher), or
#: an object with ``rows(start, end)`` (the sparse targets' coarse rows) that row functions read.
RowTeacher = Any


def _chunk_rows(n_rows: int, vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        return check_int("chunk_size", chunk_size, low=1)
    vocab = max(vocab, 1)
    if n_rows * vocab <= _DEFAULT_CHUNK_ELEMENTS:
        return max(1, n_rows)  # small enough that one chunk costs less than the loop would
    # At most 1/32 of the rows (so the per-chunk temporaries stay small next to the N x V
    # gradient buffer at any N), at least 1 MiB and at most 16 MiB of float32 per temporary.
    rows = -(-n_rows // 32)
    rows = max(_MIN_CHUNK_ELEMENTS // vocab, min(rows, _DEFAULT_CHUNK_ELEMENTS // vocab))
    return max(1, min(n_rows, rows))


def _rows_for_chunk(
    row_fn: RowFn,
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor | None,
    mask: Tensor | None,
    temperature: float,
) -> Tensor:
    zs = student.float() / temperature
    if not isinstance(teacher, Tensor):
        zt = teacher  # sparse targets come at the temperature already, masked rows neutral
    else:
        zt = teacher.detach().float() / temperature
    if mask is not None:
        # Neutral finite logits at masked rows, so that a non-finite row there (a cache's -inf
        # padding, a NaN from a fully masked attention row) cannot back-propagate 0 * inf = NaN.
        masked = ~mask.unsqueeze(-1)
        zs = zs.masked_fill(masked, 0.0)
        zt = zt.masked_fill(masked, 0.0) if isinstance(zt, Tensor) else zt
    rows = row_fn(zs, zt, labels)
    if mask is not None:
        rows = torch.where(mask, rows, torch.zeros_like(rows))
    return rows


def _closed_form_chunk(
    grad_fn: GradFn,
    student: Tensor,
    teacher: Tensor | None,
    labels: Tensor | None,
    mask: Tensor | None,
    temperature: float,
    grad_out: Tensor,
) -> Tensor:
    """Value of one chunk; writes d value / d zs into ``grad_out`` (zs = student / T: the
    caller owes the gradient a factor 1 / T, which backward folds into its one scaling pass)."""
    zs = student.detach().float()
    if not isinstance(teacher, Tensor):
        zt = teacher  # sparse targets come at the temperature already
    else:
        zt = teacher.detach().float()
    if temperature != 1.0:
        zs = zs / temperature
        zt = zt / temperature if isinstance(zt, Tensor) else zt
    direct = grad_out.dtype == torch.float32 and grad_out.is_contiguous()
    buf = grad_out if direct else torch.empty(zs.shape, dtype=torch.float32, device=zs.device)
    rows = grad_fn(zs, zt, labels, buf)
    if mask is not None:
        # Masked rows count for nothing, whatever their logits hold (even inf or NaN).
        rows = torch.where(mask, rows, 0.0)
        _zero_rows_(buf, mask)
    if not direct:
        grad_out.copy_(buf)
    return rows.sum()


def _zero_rows_(buf: Tensor, mask: Tensor) -> None:
    """``buf[~mask] = 0`` in place for an ``(n, V)`` buffer and an ``(n,)`` row mask.

    On CPUs ``masked_fill_`` with a broadcast row mask walks all n * V elements (it costs as
    much as the softmax); ``index_fill_`` touches the masked rows only (finding them is a host
    read, free there). Accelerators keep the sync-free ``masked_fill_``.
    """
    if buf.device.type == "cpu":
        rows = (~mask).nonzero().squeeze(-1)
        if rows.numel():
            buf.index_fill_(0, rows, 0.0)
    else:
        buf.masked_fill_(~mask.unsqueeze(-1), 0.0)


def _chunks(n_rows: int, chunk: int, student: Tensor, teacher: RowTeacher,
            labels: Tensor | None, mask: Tensor | None):
    """Yield ``(start, end, student, teacher, labels, mask)`` row slices of one chunk each.

    ``teacher`` is dense logits ``(N, V)`` or sparse targets (an object with ``rows(start, end)``, whose
    tensors are sliced together).
    """
    if chunk >= n_rows:  # one chunk: the tensors themselves, no slicing
        yield 0, n_rows, student, teacher, labels, mask
        return
    for start in range(0, n_rows, chunk):
        end = start + chunk
        if teacher is None or isinstance(teacher, Tensor):
            t = None if teacher is None else teacher[start:end]
        else:
            t = teacher.rows(start, end)
        yield (start, end, student[start:end], t,
               None if labels is None else labels[start:end], None if mask is None else mask[start:end])


class _ChunkedSum(torch.autograd.Function):
    """Sum of ``row_fn`` over all rows, with the student gradient made chunk by chunk.

    Forward computes each chunk's value and its gradient (in closed form for forward/reverse KL,
    MSE and cross-entropy, else with a small local graph), writes the gradient into one
    preallocated buffer, and drops everything else. Backward scales that
    buffer by the incoming gradient (in place) and hands it over.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, mask, row_fn, closed_form, temperature, chunk):  # type: ignore[override]
        grad = torch.empty_like(student)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for start, end, s, t, lab, m in _chunks(student.shape[0], chunk, student, teacher, labels, mask):
            if closed_form is not None:
                total += _closed_form_chunk(closed_form, s, t, lab, m, temperature, grad[start:end])
                continue
            piece = s.detach().requires_grad_(True)
            with torch.enable_grad():
                chunk_sum = _rows_for_chunk(row_fn, piece, t, lab, m, temperature).sum()
                (piece_grad,) = torch.autograd.grad(chunk_sum, piece)
            grad[start:end].copy_(piece_grad)
            total += chunk_sum.detach()
            del piece, piece_grad, chunk_sum
        ctx.grad = grad
        ctx.scale = 1.0 / temperature if closed_form is not None else 1.0
        return total

    @staticmethod
    def backward(ctx, grad_output):  # type: ignore[override]
        grad = ctx.grad
        if grad is None:
            raise RuntimeError(
                "The chunked loss was differentiated twice; its gradient buffer is consumed by the "
                "first backward. Recompute the loss instead of using retain_graph=True."
            )
        ctx.grad = None  # let autograd own (and accumulate into) the buffer
        return grad.mul_(grad_output * ctx.scale), None, None, None, None, None, None, None


def _check_inputs(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    temperature: float,
    reduction: str,
) -> None:
    check_tensor("student_logits", student_logits)
    if student_logits.dim() < 1:
        raise ValueError("student_logits must have a vocabulary dimension last, got a 0-d tensor.")
    if teacher_logits is not None and teacher_logits.shape != student_logits.shape:
        raise ValueError(
            f"teacher logits {tuple(teacher_logits.shape)} and student logits "
            f"{tuple(student_logits.shape)} differ in shape; a vocabulary mismatch "
            f"({teacher_logits.shape[-1]} vs {student_logits.shape[-1]}) must be resolved before "
            "the loss (DistillationModule(vocab_mismatch='slice') when one vocabulary extends the other)."
        )
    if labels is not None and labels.shape != student_logits.shape[:-1]:
        raise ValueError(
            f"labels have shape {tuple(labels.shape)} but the logits' positions have shape "
            f"{tuple(student_logits.shape[:-1])}; pass one label per position (ignore_index to mask)."
        )
    check_temperature(temperature)
    check_choice("reduction", reduction, _REDUCTIONS)


def check_class_ids(labels: Tensor) -> Tensor:
    """``labels`` if it is a tensor of integer class ids (TypeError otherwise)."""
    check_tensor("labels", labels, what="a torch.Tensor of class ids")
    if labels.dtype.is_floating_point:
        raise TypeError(f"labels must hold integer class ids, got dtype {labels.dtype}.")
    return labels


def check_temperature(temperature: float) -> float:
    """``temperature`` as a float: a finite number > 0 (TypeError / ValueError otherwise)."""
    return check_number("temperature", temperature, low=0.0, low_open=True)


def _reduce(
    row_fn: RowFn,
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    *,
    temperature: float,
    labels: Tensor | None,
    reduction: Reduction,
    **keywords: Any,
):
    """Check the inputs, then :func:`_reduce_rows` with one teacher row per position
    (``keywords``: its ``closed_form``, ``ignore_index`` and ``chunk_size``)."""
    _check_inputs(student_logits, teacher_logits, labels, temperature, reduction)
    vocab = student_logits.shape[-1]
    teacher = None if teacher_logits is None else teacher_logits.reshape(-1, vocab)
    return _reduce_rows(row_fn, student_logits, teacher, temperature=float(temperature), labels=labels,
                        reduction=reduction, **keywords)


def _reduce_rows(
    row_fn: RowFn,
    student_logits: Tensor,
    teacher: RowTeacher,
    *,
    closed_form: GradFn | None = None,
    temperature: float,
    labels: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    chunk_size: int | None,
):
    """:func:`_reduce` once the inputs are checked; ``teacher`` already has one row per position."""
    vocab = student_logits.shape[-1]
    lead_shape = student_logits.shape[:-1]
    student = student_logits.reshape(-1, vocab)
    flat_labels = None if labels is None else labels.reshape(-1)
    mask = None if flat_labels is None else flat_labels != ignore_index
    n_rows = student.shape[0]
    chunk = _chunk_rows(n_rows, vocab, chunk_size)

    if reduction == "none":
        pieces = [_rows_for_chunk(row_fn, s, t, lab, m, temperature)
                  for _, _, s, t, lab, m in _chunks(n_rows, chunk, student, teacher, flat_labels, mask)]
        rows = torch.cat(pieces) if pieces else student.new_zeros(0, dtype=torch.float32)
        return rows.reshape(lead_shape)

    if student.requires_grad and torch.is_grad_enabled():
        total = _ChunkedSum.apply(student, teacher, flat_labels, mask, row_fn, closed_form, temperature, chunk)
    else:
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        for _, _, s, t, lab, m in _chunks(n_rows, chunk, student, teacher, flat_labels, mask):
            total = total + _rows_for_chunk(row_fn, s, t, lab, m, temperature).sum()
    if mask is None:
        count = torch.tensor(n_rows, device=student.device)
    else:
        count = mask.sum()
    if reduction == "sum_and_count":
        return total, count
    return total / count.clamp_min(1)

