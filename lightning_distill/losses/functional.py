"""Divergences between student and teacher logits, as pure functions.

Every function here takes logits of shape ``(..., V)`` (the vocabulary, or the classes, last),
divides both by ``temperature``, and returns the divergence summed over the vocabulary and
averaged over the positions that are not masked. Masking comes from ``labels``: a position
whose label equals ``ignore_index`` (``-100``, as in transformers) counts for nothing.

``reduction`` picks what comes back:

* ``"mean"`` (default): a scalar, the sum over unmasked positions divided by their number;
* ``"sum_and_count"``: ``(sum, count)``, so a caller can divide by the number of valid
  positions in a whole optimizer step (gradient accumulation, several ranks);
* ``"none"``: the per-position values, shape ``(...)``, with masked positions set to zero.

P is the teacher's distribution, Q the student's. The teacher is a constant: no gradient
flows into ``teacher_logits``.

Memory. When the student's logits need a gradient, the functions never hold the whole
``(N, V)`` graph of intermediate tensors: they walk the positions in chunks, compute each
chunk's gradient right away, and keep only that gradient (the size of the student's logits,
which backward needs anyway). Peak working memory for forward + backward is about 1.1x the
student-logits gradient, where a plain ``F.kl_div(log_softmax(s), log_softmax(t))`` takes about
5x (V=32000, 8192 positions; see ``benchmarks/kd_loss_memory.py``).

Sparse teacher targets. A teacher cache may keep only a few ids per position
(:class:`~lightning_distill.types.SparseTargets`: top-k with the tail's mass, or sampled ids with
counts). The ``sparse_*`` divergences take those in place of teacher logits, with the same
keywords: they compare the two distributions coarse-grained onto the K ids plus one "rest"
bucket (:func:`sparse_target_logprobs` gives the teacher's side and documents each kind's
estimate). :func:`sparse_divergence` looks them up by the dense name.
:func:`fused_forward_kl_and_ce` computes forward KL and cross-entropy in one pass over the
student's logits (dense or sparse teacher).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
from torch import Tensor

from lightning_distill.types import SparseTargets

__all__ = [
    "DIVERGENCES",
    "SPARSE_DIVERGENCES",
    "cross_entropy",
    "divergence",
    "forward_kl",
    "fused_forward_kl_and_ce",
    "generalized_jsd",
    "is_top1",
    "logit_mse",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "sparse_divergence",
    "sparse_forward_kl",
    "sparse_generalized_jsd",
    "sparse_reverse_kl",
    "sparse_skew_forward_kl",
    "sparse_skew_reverse_kl",
    "sparse_target_logprobs",
    "sparse_tvd",
    "top1_agreement",
    "tvd",
]

Reduction = Literal["mean", "sum_and_count", "none"]
_REDUCTIONS = ("mean", "sum_and_count", "none")

# A row function maps scaled student logits (n, V), scaled teacher logits (n, V) or None,
# and labels (n,) or None to one float32 value per row.
RowFn = Callable[[Tensor, "Tensor | None", "Tensor | None"], Tensor]

# Elements (rows x vocabulary) handled per chunk: 4M float32 values is 16 MiB per temporary.
_DEFAULT_CHUNK_ELEMENTS = 4 * 2**20
_MIN_CHUNK_ELEMENTS = 2**18


# --------------------------------------------------------------------------------------------
# Per-row formulas. Inputs are float32 logits already divided by the temperature.
# --------------------------------------------------------------------------------------------
def _kl_rows(log_p: Tensor, log_q: Tensor) -> Tensor:
    """KL(P || Q) per row from log-probabilities; 0 * log 0 counts as 0 (a NaN stays NaN)."""
    p = log_p.exp()
    return torch.where(p == 0, 0.0, p * (log_p - log_q)).sum(-1)


def _log_mix(log_a: Tensor, log_b: Tensor, weight_a: float) -> Tensor:
    """log(weight_a * A + (1 - weight_a) * B), computed stably from log A and log B."""
    if weight_a <= 0.0:
        return log_b
    if weight_a >= 1.0:
        return log_a
    return torch.logaddexp(log_a + math.log(weight_a), log_b + math.log1p(-weight_a))


def _forward_kl_rows(zs: Tensor, zt: Tensor, labels: Tensor | None) -> Tensor:
    return _kl_rows(zt.log_softmax(-1), zs.log_softmax(-1))


def _reverse_kl_rows(zs: Tensor, zt: Tensor, labels: Tensor | None) -> Tensor:
    return _kl_rows(zs.log_softmax(-1), zt.log_softmax(-1))


# Closed-form gradients for the common divergences: (zs, zt, labels, out) -> rows, with
# d sum(rows) / d zs written into ``out`` (float32, the chunk's slice of the gradient buffer).
# They skip the local autograd graph and fuse what they can, which keeps the chunked path as
# fast as plain autograd. They never modify their inputs.
GradFn = Callable[[Tensor, "Tensor | None", "Tensor | None", Tensor], Tensor]
_LOG_FLOOR = torch.finfo(torch.float32).min  # stands in for log 0, so 0 * log 0 = 0 (NaN stays NaN)


def _forward_kl_grad(zs: Tensor, zt: Tensor, labels: Tensor | None, out: Tensor) -> Tensor:
    log_q, log_p = zs.log_softmax(-1), zt.log_softmax(-1)
    p = log_p.exp()
    rows = log_p.clamp_min_(_LOG_FLOOR).sub_(log_q).mul_(p).sum(-1)
    torch.exp(log_q, out=out).sub_(p)  # d/dzs KL(P || Q) = Q - P
    return rows


def _reverse_kl_grad(zs: Tensor, zt: Tensor, labels: Tensor | None, out: Tensor) -> Tensor:
    log_q, log_p = zs.log_softmax(-1), zt.log_softmax(-1)
    q = log_q.exp()
    terms = log_q.clamp_min_(_LOG_FLOOR).sub_(log_p)  # log Q/P, 0 where Q = 0 after * q
    rows = torch.mul(q, terms, out=out).sum(-1)
    torch.mul(terms.sub_(rows.unsqueeze(-1)), q, out=out)  # Q * (log Q/P - KL)
    return rows


def _mse_grad(zs: Tensor, zt: Tensor, labels: Tensor | None, out: Tensor) -> Tensor:
    diff = torch.sub(zs, zt, out=out)
    rows = diff.square().sum(-1)
    out.mul_(2.0)
    return rows


def _ce_grad(zs: Tensor, zt: Tensor | None, labels: Tensor | None, out: Tensor) -> Tensor:
    assert labels is not None  # internal: cross_entropy always passes labels
    safe = labels.clamp_min(0).unsqueeze(-1)
    # log-softmax straight into the gradient buffer, then exp in place: no (n, V) temporary.
    torch.log_softmax(zs, -1, out=out)
    rows = out.gather(-1, safe).squeeze(-1).neg_()
    out.exp_().scatter_add_(-1, safe, torch.full_like(safe, -1.0, dtype=out.dtype))
    return rows


def _gjsd_rows(beta: float) -> RowFn:
    def rows(zs: Tensor, zt: Tensor, labels: Tensor | None) -> Tensor:
        log_p, log_q = zt.log_softmax(-1), zs.log_softmax(-1)
        log_m = _log_mix(log_p, log_q, beta)
        return beta * _kl_rows(log_p, log_m) + (1.0 - beta) * _kl_rows(log_q, log_m)

    return rows


def _skew_forward_rows(alpha: float) -> RowFn:
    def rows(zs: Tensor, zt: Tensor, labels: Tensor | None) -> Tensor:
        log_p, log_q = zt.log_softmax(-1), zs.log_softmax(-1)
        return _kl_rows(log_p, _log_mix(log_p, log_q, alpha))

    return rows


def _skew_reverse_rows(alpha: float) -> RowFn:
    def rows(zs: Tensor, zt: Tensor, labels: Tensor | None) -> Tensor:
        log_p, log_q = zt.log_softmax(-1), zs.log_softmax(-1)
        return _kl_rows(log_q, _log_mix(log_q, log_p, alpha))

    return rows


def _tvd_rows(zs: Tensor, zt: Tensor, labels: Tensor | None) -> Tensor:
    return 0.5 * (zs.softmax(-1) - zt.softmax(-1)).abs().sum(-1)


def _mse_rows(zs: Tensor, zt: Tensor, labels: Tensor | None) -> Tensor:
    return (zs - zt).square().sum(-1)


def _ce_rows(zs: Tensor, zt: Tensor | None, labels: Tensor | None) -> Tensor:
    assert labels is not None  # internal: cross_entropy always passes labels
    safe = labels.clamp_min(0)  # masked rows are zeroed by the caller
    return torch.logsumexp(zs, -1) - zs.gather(-1, safe.unsqueeze(-1)).squeeze(-1)


_CLOSED_FORM: dict[Callable[..., Tensor], GradFn] = {
    _forward_kl_rows: _forward_kl_grad,
    _reverse_kl_rows: _reverse_kl_grad,
    _mse_rows: _mse_grad,
    _ce_rows: _ce_grad,
}


# --------------------------------------------------------------------------------------------
# The chunked engine.
# --------------------------------------------------------------------------------------------
def _chunk_rows(n_rows: int, vocab: int, chunk_size: int | None) -> int:
    if chunk_size is not None:
        if chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive number of positions, got {chunk_size}.")
        return chunk_size
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
    if teacher is None or isinstance(teacher, _CoarseTeacher):
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
    if teacher is None or isinstance(teacher, _CoarseTeacher):
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


def _chunks(n_rows: int, chunk: int, student: Tensor, teacher: Tensor | _CoarseTeacher | None,
            labels: Tensor | None, mask: Tensor | None):
    """Yield ``(start, end, student, teacher, labels, mask)`` row slices of one chunk each.

    ``teacher`` is dense logits ``(N, V)`` or sparse targets (:class:`_CoarseTeacher`, whose
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
    def forward(ctx, student, teacher, labels, mask, row_fn, temperature, chunk):  # type: ignore[override]
        grad = torch.empty_like(student)
        total = torch.zeros((), dtype=torch.float32, device=student.device)
        # A row function may carry its own closed form (the sparse divergences do).
        closed_form = getattr(row_fn, "closed_form", None) or _CLOSED_FORM.get(row_fn)
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
        return grad.mul_(grad_output * ctx.scale), None, None, None, None, None, None


def _check_inputs(
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    labels: Tensor | None,
    temperature: float,
    reduction: str,
) -> None:
    if not isinstance(student_logits, Tensor):
        raise TypeError(f"student_logits must be a torch.Tensor, got {type(student_logits).__name__}.")
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
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}.")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}.")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}, got {reduction!r}.")


def _reduce(
    row_fn: RowFn,
    student_logits: Tensor,
    teacher_logits: Tensor | None,
    *,
    temperature: float,
    labels: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    chunk_size: int | None,
):
    _check_inputs(student_logits, teacher_logits, labels, temperature, reduction)
    vocab = student_logits.shape[-1]
    teacher = None if teacher_logits is None else teacher_logits.reshape(-1, vocab)
    return _reduce_rows(
        row_fn, student_logits, teacher, temperature=float(temperature), labels=labels,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def _reduce_rows(
    row_fn: RowFn,
    student_logits: Tensor,
    teacher: Tensor | _CoarseTeacher | None,
    *,
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
        total = _ChunkedSum.apply(student, teacher, flat_labels, mask, row_fn, temperature, chunk)
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


# --------------------------------------------------------------------------------------------
# Public divergences.
# --------------------------------------------------------------------------------------------
def forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """KL(P || Q) = sum_v p_v (log p_v - log q_v): the true KL, zero when the two agree.

    This is Hinton-style distillation without the teacher-entropy constant that soft
    cross-entropy carries (the gradients are the same; the value is a divergence).
    """
    return _reduce(
        _forward_kl_rows, student_logits, teacher_logits, temperature=temperature, labels=labels,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """KL(Q || P) = sum_v q_v (log q_v - log p_v): mode-seeking, as in MiniLLM."""
    return _reduce(
        _reverse_kl_rows, student_logits, teacher_logits, temperature=temperature, labels=labels,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def _check_open_unit(name: str, value: float, low_hint: str, high_hint: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}.")
    if value <= 0.0:
        raise ValueError(f"{name}={value} is outside (0, 1): {low_hint}")
    if value >= 1.0:
        raise ValueError(f"{name}={value} is outside (0, 1): {high_hint}")
    return float(value)


def generalized_jsd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """Generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1).

    JSD(beta) = beta * KL(P || M) + (1 - beta) * KL(Q || M),  M = beta * P + (1 - beta) * Q.

    ``beta`` must lie strictly inside (0, 1): at either end the mixture equals one of the two
    distributions and the divergence is identically zero. Use :func:`forward_kl` or
    :func:`reverse_kl` for the KL ends of the family.
    """
    beta = _check_open_unit(
        "beta", beta,
        "generalized_jsd vanishes at beta=0; use forward_kl (or reverse_kl) for a KL objective.",
        "generalized_jsd vanishes at beta=1; use reverse_kl (or forward_kl) for a KL objective.",
    )
    return _reduce(
        _gjsd_rows(beta), student_logits, teacher_logits, temperature=temperature, labels=labels,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def _check_skew(alpha: float) -> float:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
        raise TypeError(f"alpha must be a finite number, got {alpha!r}.")
    if not 0.0 <= alpha < 1.0:
        raise ValueError(
            f"alpha={alpha} is outside [0, 1): alpha=0 is the plain KL and alpha=1 makes the "
            "divergence identically zero; DistiLLM uses alpha=0.1."
        )
    return float(alpha)


def skew_forward_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """Skew KL of DistiLLM (Ko et al. 2024): KL(P || alpha * P + (1 - alpha) * Q).

    ``alpha`` in [0, 1); ``alpha=0`` is :func:`forward_kl`.
    """
    alpha = _check_skew(alpha)
    return _reduce(
        _skew_forward_rows(alpha), student_logits, teacher_logits, temperature=temperature,
        labels=labels, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def skew_reverse_kl(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """Skew reverse KL of DistiLLM (Ko et al. 2024): KL(Q || (1 - alpha) * P + alpha * Q).

    ``alpha`` in [0, 1); ``alpha=0`` is :func:`reverse_kl`.
    """
    alpha = _check_skew(alpha)
    return _reduce(
        _skew_reverse_rows(alpha), student_logits, teacher_logits, temperature=temperature,
        labels=labels, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def tvd(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """Total variation distance: 0.5 * sum_v |p_v - q_v|, in [0, 1] per position."""
    return _reduce(
        _tvd_rows, student_logits, teacher_logits, temperature=temperature, labels=labels,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def logit_mse(
    student_logits: Tensor,
    teacher_logits: Tensor,
    *,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """Squared error between the (temperature-scaled) logits, summed over the vocabulary."""
    return _reduce(
        _mse_rows, student_logits, teacher_logits, temperature=temperature, labels=labels,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


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
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class ids, got {type(labels).__name__}.")
    if labels.dtype.is_floating_point:
        raise TypeError(f"labels must hold integer class ids, got dtype {labels.dtype}.")
    return _reduce(
        _ce_rows, student_logits, None, temperature=temperature, labels=labels,
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


#: Divergences by name, for configs: ``LogitKD(divergence="reverse_kl")``.
DIVERGENCES: dict[str, Callable[..., object]] = {
    "forward_kl": forward_kl,
    "reverse_kl": reverse_kl,
    "generalized_jsd": generalized_jsd,
    "skew_forward_kl": skew_forward_kl,
    "skew_reverse_kl": skew_reverse_kl,
    "tvd": tvd,
    "logit_mse": logit_mse,
}


def divergence(name: str) -> Callable[..., object]:
    """Look a divergence up by name, with an error that lists the known ones."""
    try:
        return DIVERGENCES[name]
    except KeyError:
        raise ValueError(
            f"unknown divergence {name!r}; choose one of {sorted(DIVERGENCES)}."
        ) from None


# ============================================================================================
# Sparse teacher targets (top-k and sampled caches).
#
# A cache that stores the teacher's distribution on a few ids per position (SparseTargets)
# defines, per position, a coarse distribution over K + 1 outcomes: the K ids and one "rest"
# bucket holding everything else. The student's softmax is coarse-grained onto the same
# outcomes (q at the ids, q_rest = the mass of all other ids), and the sparse divergences apply
# the dense row formulas above to these (K + 1)-dim log-probability vectors. So:
#
# * top-k with K = V (tail -inf): every sparse divergence equals its dense counterpart;
# * top-k with K < V: the divergence between the two coarse-grained distributions, a lower
#   bound of the dense one (data-processing inequality), exact at the ids;
# * sampled (Sparse Logit Sampling): the teacher side is an estimate from the draws (see
#   sparse_target_logprobs); sparse_forward_kl's gradient is unbiased at T = sample_temperature.
# ============================================================================================

#: log 0 in the coarse distributions: finite, so that autograd never meets inf - inf, and
#: exp(_NEG) == 0 in float32. Padding entries hold it on both sides.
_NEG = -1e4


class _CoarseTeacher(NamedTuple):
    """Sparse targets at the loss temperature, one row per position (internal).

    Attributes:
        ids: ``(n, K)`` int64, padding replaced by a real id of the row (0 in an empty row), so
            that ``gather`` and ``scatter_add`` with zero contributions at padding are safe.
        valid: ``(n, K)`` bool, the real entries.
        log_p: ``(n, K)`` the teacher's coarse log-probabilities of the ids (``_NEG``: none).
        log_p_rest: ``(n,)`` the rest bucket's (``_NEG``: none).
        kl_offset: ``(n,)`` or ``None``: added to forward-KL rows (sampled targets: replaces the
            plug-in teacher entropy by the teacher's own log-probabilities, see
            :func:`sparse_forward_kl`).
        p: ``(n, K)`` or ``None``: the teacher's probabilities of the ids (0 at padding) divided
            by ``p_scale`` (the draw counts); set, with ``kd_const``, only by
            :func:`_cached_sampled_rows` (then ``log_p`` and ``log_p_rest`` are ``None``).
        kd_const: ``(n,)`` or ``None``: the teacher's part of each forward-KL row,
            KL = kd_const - p_scale sum_k p_k log q_k.
        p_scale: see ``p``.
    """

    ids: Tensor
    valid: Tensor
    log_p: Tensor | None
    log_p_rest: Tensor | None
    kl_offset: Tensor | None = None
    p: Tensor | None = None
    kd_const: Tensor | None = None
    p_scale: float = 1.0

    def rows(self, start: int, end: int) -> _CoarseTeacher:
        return _CoarseTeacher(*(x[start:end] if isinstance(x, Tensor) else x for x in self))

    def coarse(self) -> Tensor:
        """``(n, K + 1)`` log-probabilities: the ids, then the rest bucket."""
        return torch.cat([self.log_p, self.log_p_rest.unsqueeze(-1)], -1)


def _set_penalty(valid: Tensor) -> Tensor:
    """``(n, K)``: ``_NEG`` at real entries, 0 at padding. ``scatter_add``-ed onto log q it pushes
    the set's ids below any real log-probability and leaves padding (and empty rows) alone,
    whatever ids the padding points at."""
    return torch.where(valid, _NEG, 0.0)


def _coarse_student(zs: Tensor, teacher: _CoarseTeacher) -> Tensor:
    """``(n, K + 1)``: the student's log-probabilities at the ids and of the rest bucket.

    log q_rest = log sum_{m not in ids} q_m is a logsumexp over the row with the ids pushed
    down by ``_NEG``: stable however little mass the rest holds (never below ~``_NEG``).
    Differentiable; the chunked engine uses :func:`_rest_shares_into` instead.
    """
    log_q = zs.log_softmax(-1)
    log_q_ids = log_q.gather(-1, teacher.ids).masked_fill(~teacher.valid, _NEG)
    off_set = log_q.scatter_add(-1, teacher.ids, _set_penalty(teacher.valid))
    return torch.cat([log_q_ids, torch.logsumexp(off_set, -1, keepdim=True)], -1)


def _rest_shares_into(log_q: Tensor, teacher: _CoarseTeacher, out: Tensor) -> tuple[Tensor, Tensor]:
    """The student's coarse log-probabilities, and each id's share of the rest bucket in ``out``.

    Takes ``log_q = log_softmax(zs)`` (n, V) and modifies it in place. Writes
    ``out = exp(log q_off - max)`` where ``log q_off`` is log q with the ids pushed down by
    ``_NEG``, and returns ``(coarse log q (n, K + 1), norm (n, 1))`` with
    ``w = out / norm = softmax(log q_off)``: ``w_m = q_m / q_rest`` off the ids, ``~0`` on them.
    Same values as :func:`_coarse_student` (up to rounding), one (n, V) temporary fewer.
    """
    log_q_ids = log_q.gather(-1, teacher.ids).masked_fill_(~teacher.valid, _NEG)
    log_q.scatter_add_(-1, teacher.ids, _set_penalty(teacher.valid))
    top = log_q.amax(-1, keepdim=True)
    torch.sub(log_q, top, out=out).exp_()
    norm = out.sum(-1, keepdim=True)
    return torch.cat([log_q_ids, top + norm.log()], -1), norm


def _student_grad_from_coarse(out: Tensor, norm: Tensor, coarse_log_q: Tensor, g: Tensor,
                              teacher: _CoarseTeacher) -> None:
    """Chain rule from the coarse student to the (scaled) logits, written into ``out``.

    ``g = d rows / d(coarse log q)``, (n, K + 1); ``out`` and ``norm`` come from
    :func:`_rest_shares_into`. With x_k = log q_k (k in the set S), x_rest = log q_rest:

        d x_k / dz_j = [j = k] - q_j,     d x_rest / dz_j = w_j - q_j,     w = softmax(log q_off)

    so  d rows / dz_j = [j in S] g_j + w_j g_rest - q_j G,  G = sum_k g_k + g_rest.  Off the set
    q_j = w_j q_rest; on it w_j q_rest = q_j exp(_NEG) = 0. Hence, one pass over ``out``:

        d rows / dz_j = w_j (g_rest - q_rest G) + [j in S] (g_j - q_j G).

    Padding entries are constants (``_NEG``): their ``g`` is dropped. When the student has no
    mass off the set (q_rest ~ 0), w sits on the set and x_rest's gradient vanishes: finite.
    """
    g_ids = g[:, :-1].masked_fill(~teacher.valid, 0.0)
    g_rest = g[:, -1:]
    total = g_ids.sum(-1, keepdim=True) + g_rest
    q_rest = coarse_log_q[:, -1:].exp()
    out.mul_((g_rest - q_rest * total) / norm)
    out.scatter_add_(-1, teacher.ids, g_ids - coarse_log_q[:, :-1].exp() * total)


class _SparseRows:
    """A dense row formula applied to the coarse (K + 1)-outcome distributions of sparse targets.

    Called as a row function ``(zs, teacher, labels) -> rows`` it builds the student's coarse
    log-probabilities with autograd (``reduction="none"`` and no-grad paths). ``closed_form`` is
    what the chunked engine calls when the student needs a gradient: it differentiates the
    formula only on the small (n, K + 1) coarse vectors (in closed form for forward KL:
    d/dx_k sum_k p_k (log p_k - x_k) = -p_k) and maps that to the logits with
    :func:`_student_grad_from_coarse`, never building an (n, V) graph.
    """

    def __init__(self, dense_rows: RowFn, *, forward_kl: bool = False) -> None:
        self.dense_rows = dense_rows
        self.forward_kl = forward_kl

    def rows_from_coarse(self, coarse_log_q: Tensor, teacher: _CoarseTeacher,
                         labels: Tensor | None) -> Tensor:
        """The formula on the student's coarse log-probabilities ``(n, K + 1)``."""
        rows = self.dense_rows(coarse_log_q, teacher.coarse(), labels)
        if self.forward_kl and teacher.kl_offset is not None:
            rows = rows + teacher.kl_offset
        return rows

    def __call__(self, zs: Tensor, teacher: _CoarseTeacher, labels: Tensor | None) -> Tensor:
        return self.rows_from_coarse(_coarse_student(zs, teacher), teacher, labels)

    def closed_form(self, zs: Tensor, teacher: _CoarseTeacher, labels: Tensor | None,
                    out: Tensor) -> Tensor:
        coarse_q, norm = _rest_shares_into(zs.log_softmax(-1), teacher, out)
        if self.forward_kl:
            rows = self.rows_from_coarse(coarse_q, teacher, labels)
            g = teacher.coarse().softmax(-1).neg_()
        else:
            leaf = coarse_q.requires_grad_(True)
            with torch.enable_grad():
                rows = self.rows_from_coarse(leaf, teacher, labels)
                (g,) = torch.autograd.grad(rows.sum(), leaf)
            rows, coarse_q = rows.detach(), coarse_q.detach()
        _student_grad_from_coarse(out, norm, coarse_q, g, teacher)
        return rows


# --------------------------------------------------------------------------------------------
# The teacher's coarse distribution.
# --------------------------------------------------------------------------------------------
_SPARSE_KINDS = ("topk", "sampled")


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}.")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}.")
    return float(temperature)


def _check_sparse_targets(targets: SparseTargets) -> None:
    """Structure of the targets on their own (no device sync)."""
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"targets must be SparseTargets, got {type(targets).__name__}.")
    if targets.kind not in _SPARSE_KINDS:
        raise ValueError(
            f"SparseTargets.kind must be one of {_SPARSE_KINDS}, got {targets.kind!r}."
        )
    ids = targets.ids
    if not isinstance(ids, Tensor) or ids.dtype.is_floating_point or ids.dtype == torch.bool:
        raise TypeError(f"SparseTargets.ids must be a tensor of integer token ids, got "
                        f"{getattr(ids, 'dtype', type(ids).__name__)}.")
    if ids.dim() < 1 or ids.shape[-1] < 1:
        raise ValueError(
            f"SparseTargets.ids must have shape (..., K) with K >= 1, got {tuple(ids.shape)}."
        )
    missing_ok = targets.kind == "sampled" and targets.logprobs is None  # a cache without them
    if not missing_ok and (not isinstance(targets.logprobs, Tensor) or targets.logprobs.shape != ids.shape):
        raise ValueError(
            f"SparseTargets.logprobs must have the shape of ids {tuple(ids.shape)}, got "
            f"{tuple(getattr(targets.logprobs, 'shape', ()))}."
        )
    vocab = targets.vocab_size
    if isinstance(vocab, bool) or not isinstance(vocab, int) or vocab < 1:
        raise ValueError(f"SparseTargets.vocab_size must be a positive int, got {vocab!r}.")
    if targets.kind == "topk":
        tail = targets.tail_logprob
        if tail is not None and tail.shape != ids.shape[:-1]:
            raise ValueError(f"SparseTargets.tail_logprob must have one value per position "
                             f"{tuple(ids.shape[:-1])}, got {tuple(tail.shape)}.")
        return
    if targets.counts is None or targets.counts.shape != ids.shape:
        raise ValueError(
            f"sampled SparseTargets need counts of the shape of ids {tuple(ids.shape)}, got "
            f"{None if targets.counts is None else tuple(targets.counts.shape)}."
        )
    ts = targets.sample_temperature
    if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts) or ts <= 0:
        raise ValueError(
            f"SparseTargets.sample_temperature must be a finite number > 0, got {ts!r}."
        )


def _check_sparse_against_student(targets: SparseTargets, student_logits: Tensor) -> None:
    """Targets aligned with the student's positions, ids inside its vocabulary, no repeated id.

    Reads one small tensor back from the device (the largest id and a duplicate flag).
    """
    _check_sparse_targets(targets)
    ids = targets.ids
    positions = tuple(student_logits.shape[:-1])
    if tuple(ids.shape[:-1]) != positions:
        raise ValueError(
            f"sparse targets have ids of shape {tuple(ids.shape)}, i.e. positions "
            f"{tuple(ids.shape[:-1])}, but the student's logits {tuple(student_logits.shape)} have "
            f"positions {positions}; the targets must be aligned with the logits (one row per "
            "position)."
        )
    if ids.numel() == 0:
        return
    if targets.verified:
        # Written by the teacher cache: ids are distinct and < vocab_size by construction, so
        # the vocabulary check is static and no device sync is needed.
        if targets.vocab_size > student_logits.shape[-1]:
            raise ValueError(
                f"sparse targets come from a teacher vocabulary of {targets.vocab_size} ids but the "
                f"student's vocabulary has {student_logits.shape[-1]}; the student must cover every "
                "teacher id."
            )
        return
    ordered = ids.sort(-1).values
    repeated = ((ordered[..., 1:] == ordered[..., :-1]) & (ordered[..., 1:] >= 0)).any()
    max_id, has_repeat = torch.stack([ids.max().long(), repeated.long()]).tolist()
    vocab = student_logits.shape[-1]
    if max_id >= vocab:
        raise ValueError(
            f"sparse targets hold token id {max_id} but the student's vocabulary has {vocab} "
            f"entries (ids must be < {vocab}); was the cache built for another vocabulary?"
        )
    if max_id >= targets.vocab_size:
        raise ValueError(
            f"sparse targets hold token id {max_id} but declare vocab_size={targets.vocab_size}."
        )
    if has_repeat:
        raise ValueError(
            "sparse targets repeat a token id within a position; each id may appear once per "
            "position (padding is -1)."
        )


def sparse_target_logprobs(
    targets: SparseTargets, temperature: float
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """The teacher's coarse distribution at ``temperature``: the ids and one rest bucket.

    Returns ``(ids, log_p, log_p_rest, valid)``:

    * ``ids`` ``(..., K)`` int64, padding replaced by a real id of the same row (0 in a row
      without any), so ``gather``/``scatter`` are safe;
    * ``log_p`` ``(..., K)`` float32, the teacher's log-probabilities of the ids; ``log_p_rest``
      ``(...)`` the log of the mass outside them. ``log 0`` is the finite ``_NEG = -1e4`` (also
      at padding), never ``-inf``;
    * ``valid`` ``(..., K)`` bool, the real entries.

    Per kind (l_i the stored log-probabilities at temperature 1, T the temperature):

    * ``topk``, T = 1: exact, the stored values (``log_p = logprobs``, ``log_p_rest =
      tail_logprob``).
    * ``topk``, T != 1: the head's log-weights are l_i / T. The tail's spread over the V - K'
      ids outside the set (K' real entries in the row) is unknown, so it is taken as uniform:
      each outside id has log-probability t - log(V - K') (t = ``tail_logprob``), which gives
      the rest log-weight  log(V - K') + (t - log(V - K')) / T.  Head and rest are then
      normalised together (logsumexp). Exact at T = 1. The true rest weight is
      sum_{m outside} p_m^(1/T); by the power-mean inequality the uniform spread gives an upper
      bound for T > 1 (x^(1/T) concave: the tail's mass is overestimated) and a lower bound for
      T < 1 (underestimated); the error vanishes when the tail is flat or small.
    * ``topk`` without ``tail_logprob``: the rest has no mass and the head is renormalised
      (plain top-k distillation).
    * ``sampled``: self-normalised importance weights of the draws (counts c_i, drawn at
      T_s = ``sample_temperature``):  p_i = w_i / sum_j w_j,  w_i = c_i exp(l_i (1/T - 1/T_s)).
      At T = T_s this is exactly c_i / N (N = sum_i c_i, the number of draws as a cache writes
      them), an unbiased estimate of the teacher's probabilities; at T != T_s it is
      self-normalised importance sampling (consistent in N, slightly biased). The rest has no
      mass.

    A row with no mass at all (no real entry and no tail, as a padded position) gets
    ``log_p_rest = 0``: one outcome, the whole vocabulary, so every divergence is 0 there.
    The stored values are used as they are (a float16 cache's head and tail may sum to
    1 +- 1e-3); the divergences renormalise both sides, as the dense ones do with logits.
    """
    _check_sparse_targets(targets)
    temperature = _check_temperature(temperature)
    if _at_draw_temperature(targets, temperature):
        return _sampled_at_draw_temperature(targets)
    ids = targets.ids.long()
    valid = ids >= 0
    first_real = valid.to(torch.uint8).argmax(-1, keepdim=True)  # 0 in a row without entries
    ids = torch.where(valid, ids, ids.gather(-1, first_real).clamp_min(0))
    logprobs = None if targets.logprobs is None else targets.logprobs.detach().float()
    no_rest = torch.full(ids.shape[:-1], -math.inf, dtype=torch.float32, device=ids.device)

    log_norm: Tensor | None = None  # None: normalise head + rest with a logsumexp
    if targets.kind == "topk":
        head = torch.where(valid, logprobs / temperature, -math.inf)
        tail = targets.tail_logprob
        if tail is None:
            rest = no_rest
        elif temperature == 1.0:
            rest = tail.detach().float()
            log_norm = torch.zeros_like(rest)  # exact: the stored values
        else:
            outside = (targets.vocab_size - valid.sum(-1)).clamp_min(1).to(torch.float32).log()
            rest = outside + (tail.detach().float() - outside) / temperature
    else:
        counts = targets.counts.detach().float()
        drawn = valid & (counts > 0)
        head = torch.where(drawn, counts.log(), -math.inf)
        rest = no_rest
        ts = float(targets.sample_temperature)
        if temperature == ts:  # c_i / N exactly
            total = torch.where(drawn, counts, 0.0).sum(-1)
            log_norm = torch.where(total > 0, total.log(), 0.0)
        elif logprobs is None:
            raise ValueError(
                f"these sampled targets were cached without log-probabilities (store_logprobs=False), so "
                f"they are exact only at their sample_temperature={ts:g}, not at temperature={temperature:g}; "
                f"train at temperature {ts:g}, or rebuild the cache with store_logprobs=True (importance "
                "reweighting to any temperature, +2 bytes per drawn id)."
            )
        else:
            head = torch.where(drawn, head + logprobs * (1.0 / temperature - 1.0 / ts), -math.inf)

    mass = torch.logsumexp(torch.cat([head, rest.unsqueeze(-1)], -1), -1)
    no_mass = mass == -math.inf
    if log_norm is None:
        log_norm = torch.where(no_mass, 0.0, mass)
    log_p = torch.where(valid, (head - log_norm.unsqueeze(-1)).clamp_min(_NEG), _NEG)
    log_p_rest = torch.where(no_mass, 0.0, (rest - log_norm).clamp_min(_NEG))
    return ids, log_p, log_p_rest, valid


_LOG_COUNT_TABLES: dict[tuple[int, str], Tensor] = {}


def _log_count_table(n: int, device: torch.device) -> Tensor:
    """log(c / N) for c = 0..N (``_NEG`` at c = 0), float32 on ``device``."""
    key = (n, str(device))
    table = _LOG_COUNT_TABLES.get(key)
    if table is None:
        table = (torch.arange(n + 1, dtype=torch.float64) / n).log().clamp_min(_NEG).float().to(device)
        _LOG_COUNT_TABLES[key] = table
    return table


def _cached_sampled_rows(targets: SparseTargets) -> _CoarseTeacher:
    """Cache-written sampled targets at their draw temperature, as the fused loss reads them.

    Rows of int64 ``ids`` (padding pointed at id 0), the counts as ``p`` with ``p_scale = 1 /
    N`` (0 at padding) and ``kd_const``, the teacher's part of forward KL, so that
    KL = kd_const - sum_k (c_k / N) log q_k:

    * with the teacher's entropy H: -H (the unbiased estimate, see :func:`sparse_forward_kl`);
    * with stored log-probabilities l_k (and the draw temperature 1): sum_k (c_k / N) l_k;
    * else sum_k (c_k / N) log(c_k / N) (the plug-in KL).

    One operation on (n, K) (the padding's ids), no ``exp``/``log`` (see
    :func:`_sampled_at_draw_temperature`), no division (the loss scales its row sums). ``valid`` holds the
    empty rows only ``(n, 1)``: the cache writes a row's draws first.
    """
    ids = targets.ids.long().clamp_min(0)
    n = int(targets.num_samples)
    counts = targets.counts.detach().float()
    if targets.logprobs is not None:
        kd_const = (counts * torch.where(counts > 0, targets.logprobs.detach().float(), 0.0)).sum(-1) / n
    elif targets.entropy is not None:
        kd_const = targets.entropy.detach().float().neg()
    else:
        kd_const = (counts * _log_counts(targets)).sum(-1) / n
    k = ids.shape[-1]
    first_real = targets.ids[..., :1] >= 0
    return _CoarseTeacher(ids.reshape(-1, k), first_real.reshape(-1, 1), None, None,
                          p=counts.reshape(-1, k), kd_const=kd_const.reshape(-1), p_scale=1.0 / n)


def _log_counts(targets: SparseTargets) -> Tensor:
    """log(c / N) of the counts (``_NEG`` at c = 0) by table lookup: counts are small integers."""
    n, counts = int(targets.num_samples), targets.counts.detach()
    table = _log_count_table(n, counts.device)
    return table.index_select(0, counts.long().reshape(-1)).reshape(counts.shape)


def _sampled_at_draw_temperature(targets: SparseTargets) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`sparse_target_logprobs` of cache-written sampled targets at their own temperature.

    The same values in a handful of operations (this runs every step): the cache stores every
    distinct draw of a position first with a count >= 1 (padding after, count 0), so the counts
    sum to ``num_samples`` and the first entry of a row is real unless the row is empty.
    log(c / N) is a table lookup: CPUs take a slow path of ``log``/``exp`` at 0 and ``_NEG``,
    which padding is full of.
    """
    ids = targets.ids.long()
    valid = ids >= 0
    ids = torch.where(valid, ids, ids[..., :1].clamp_min(0))
    log_p_rest = torch.where(valid[..., 0], _NEG, 0.0)
    return ids, _log_counts(targets), log_p_rest, valid


def _sampled_kl_offset(
    targets: SparseTargets, temperature: float, valid: Tensor, log_p: Tensor
) -> Tensor:
    """sum_i p~_i (log p_T(i) - log p~_i) per row: turns the plug-in coarse KL into
    sum_i p~_i (log p_T(i) - log q_i), with the teacher's own log-probabilities (see
    :func:`sparse_forward_kl`). ``log_p`` holds log p~ (the importance weights at T).

    log p_T(i) = l_i / T - log Z_T. Z_T = sum_v p_1(v)^(1/T) is 1 at T = 1; else it is estimated
    from the draws (drawn from p_Ts = p_1^(1/T_s) / Z_Ts):

        Z_T = E_Ts[p_1^(1/T - 1/T_s)] / E_Ts[p_1^(1 - 1/T_s)].
    """
    logprobs = targets.logprobs.detach().float()
    counts = targets.counts.detach().float()
    drawn = valid & (counts > 0)
    lp = torch.where(drawn, logprobs, 0.0)
    log_teacher = lp / temperature
    if temperature != 1.0:
        log_c = torch.where(drawn, counts.log(), -math.inf)
        inv_ts = 1.0 / float(targets.sample_temperature)
        log_z = (torch.logsumexp(log_c + lp * (1.0 / temperature - inv_ts), -1)
                 - torch.logsumexp(log_c + lp * (1.0 - inv_ts), -1))
        log_teacher = log_teacher - log_z.unsqueeze(-1)
    p = log_p.exp()
    return torch.where(p > 0, p * (log_teacher - log_p), 0.0).sum(-1)


def _coarse_teacher(
    targets: SparseTargets, temperature: float, mask: Tensor | None
) -> _CoarseTeacher:
    """The targets at ``temperature``, flattened to rows; masked rows hold a neutral, finite
    distribution (all mass in the rest), whatever the cache had there."""
    ids, log_p, log_p_rest, valid = sparse_target_logprobs(targets, temperature)
    offset = None
    if targets.kind == "sampled" and targets.logprobs is not None:
        offset = _sampled_kl_offset(targets, temperature, valid, log_p).reshape(-1)
    elif (targets.kind == "sampled" and targets.entropy is not None
          and temperature == float(targets.sample_temperature)):
        # KL = -H(p) - sum_i p_i log q_i, unbiased with p~ = counts / N in the second term; the
        # coarse formula gives sum p~ (log p~ - log q), so add -H(p) - sum p~ log p~.
        # p = c / N straight from the counts for cache-written targets (no exp of the padding's log 0).
        p = (torch.div(targets.counts.detach(), int(targets.num_samples)).float()
             if _at_draw_temperature(targets, temperature) else log_p.exp())
        offset = (-targets.entropy.detach().float() - (p * log_p).sum(-1)).reshape(-1)
    # Otherwise the value stays the plug-in KL(P~ || Q~), which overstates the KL by
    # H(p) - H(p~) (N draws look less spread than the teacher); the gradient is the same.
    k = ids.shape[-1]
    ids, valid, log_p = ids.reshape(-1, k), valid.reshape(-1, k), log_p.reshape(-1, k)
    log_p_rest = log_p_rest.reshape(-1)
    if mask is not None:
        log_p = log_p.masked_fill(~mask.unsqueeze(-1), _NEG)
        log_p_rest = log_p_rest.masked_fill(~mask, 0.0)
        offset = None if offset is None else offset.masked_fill(~mask, 0.0)
    return _CoarseTeacher(ids, valid, log_p, log_p_rest, offset)


def _at_draw_temperature(targets: SparseTargets, temperature: float) -> bool:
    """Cache-written sampled targets used at the temperature they were drawn at (the fast path)."""
    return (targets.kind == "sampled" and targets.verified and targets.counts is not None
            and temperature == float(targets.sample_temperature))


def _reduce_sparse(
    rows: _SparseRows,
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float,
    labels: Tensor | None,
    ignore_index: int,
    reduction: Reduction,
    chunk_size: int | None,
):
    _check_inputs(student_logits, None, labels, temperature, reduction)
    _check_sparse_against_student(targets, student_logits)
    temperature = float(temperature)
    mask = None if labels is None else labels.reshape(-1) != ignore_index
    return _reduce_rows(
        rows, student_logits, _coarse_teacher(targets, temperature, mask), temperature=temperature,
        labels=labels, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def _check_teacher_mass_off_the_ids(targets: SparseTargets, name: str) -> None:
    """KL(Q || P~) needs teacher mass wherever the student has some: not so off sampled ids."""
    _check_sparse_targets(targets)
    if targets.kind == "sampled":
        raise ValueError(
            f"{name} is infinite on sampled targets: the teacher's estimate is zero off the "
            "drawn ids, where the student has mass. Use forward_kl or generalized_jsd (or "
            "skew_reverse_kl with alpha > 0) on sampled targets, or topk targets (their tail "
            "keeps the rest's mass)."
        )
    if targets.tail_logprob is None:
        raise ValueError(
            f"{name} is infinite on topk targets without tail_logprob: the renormalised top-k "
            "teacher has no mass off the ids, where the student has some. Keep the tail in the "
            "targets, or use forward_kl or generalized_jsd."
        )


# --------------------------------------------------------------------------------------------
# Public sparse divergences.
# --------------------------------------------------------------------------------------------
_SPARSE_FORWARD_KL = _SparseRows(_forward_kl_rows, forward_kl=True)
_SPARSE_REVERSE_KL = _SparseRows(_reverse_kl_rows)
_SPARSE_TVD = _SparseRows(_tvd_rows)


def sparse_forward_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """:func:`forward_kl` against sparse targets: KL(P~ || Q~) on the K + 1 coarse outcomes.

    P~ is :func:`sparse_target_logprobs` at ``temperature``; Q~ the student's softmax at
    ``temperature`` on the same outcomes (q at the ids, q_rest off them). Equal to
    :func:`forward_kl` for top-k targets with K = V; a lower bound of it for K < V.

    Gradient (w.r.t. z / T, z the student's logits): q - P^, with P^_m = p~_m on the ids and
    P^_m = q_m * p~_rest / q_rest off them (the rest's mass handed out as the student spreads
    it). It is made in closed form, chunk by chunk, into one buffer (as :func:`forward_kl`).
    When q_rest underflows (~0), the rest's pull goes nowhere rather than to inf/NaN.

    Sampled targets: P~ = c / N at T = T_s, so the gradient q - c / N is an unbiased estimate of
    the dense one; the value is  sum_i p~_i (log p_T(i) - log q_i)  with the teacher's own
    log-probabilities ``logprobs`` (the plug-in sum_i p~_i log p~_i of the coarse formula is
    biased upwards by about (#ids - 1) / 2N). It is unbiased for the dense KL at
    T = T_s = 1, exactly 0 where the student equals the teacher, and can be slightly negative
    for one draw. At T != 1 the teacher's normaliser is estimated from the draws (consistent).
    """
    return _reduce_sparse(
        _SPARSE_FORWARD_KL, student_logits, targets, temperature=temperature, labels=labels,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def sparse_reverse_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """:func:`reverse_kl` against sparse targets: KL(Q~ || P~) on the K + 1 coarse outcomes.

    Needs top-k targets with their tail: raises ``ValueError`` on sampled targets and on top-k
    targets without ``tail_logprob`` (the teacher has no mass off the ids, so the KL is infinite).
    """
    _check_teacher_mass_off_the_ids(targets, "sparse_reverse_kl")
    return _reduce_sparse(
        _SPARSE_REVERSE_KL, student_logits, targets, temperature=temperature, labels=labels,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def sparse_generalized_jsd(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    beta: float = 0.5,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """:func:`generalized_jsd` against sparse targets, on the K + 1 coarse outcomes.

    JSD(beta) = beta * KL(P~ || M) + (1 - beta) * KL(Q~ || M),  M = beta * P~ + (1 - beta) * Q~.
    """
    beta = _check_open_unit(
        "beta", beta,
        "generalized_jsd vanishes at beta=0; use forward_kl (or reverse_kl) for a KL objective.",
        "generalized_jsd vanishes at beta=1; use reverse_kl (or forward_kl) for a KL objective.",
    )
    return _reduce_sparse(
        _SparseRows(_gjsd_rows(beta)), student_logits, targets, temperature=temperature,
        labels=labels, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def sparse_skew_forward_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """:func:`skew_forward_kl` against sparse targets: KL(P~ || alpha P~ + (1 - alpha) Q~)."""
    alpha = _check_skew(alpha)
    return _reduce_sparse(
        _SparseRows(_skew_forward_rows(alpha)), student_logits, targets, temperature=temperature,
        labels=labels, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def sparse_skew_reverse_kl(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    alpha: float = 0.1,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """:func:`skew_reverse_kl` against sparse targets: KL(Q~ || (1 - alpha) P~ + alpha Q~).

    Finite on any targets for alpha > 0; ``alpha=0`` is :func:`sparse_reverse_kl` and has its
    requirements.
    """
    alpha = _check_skew(alpha)
    if alpha == 0.0:
        _check_teacher_mass_off_the_ids(targets, "sparse_skew_reverse_kl with alpha=0")
    return _reduce_sparse(
        _SparseRows(_skew_reverse_rows(alpha)), student_logits, targets, temperature=temperature,
        labels=labels, ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


def sparse_tvd(
    student_logits: Tensor,
    targets: SparseTargets,
    *,
    temperature: float = 1.0,
    labels: Tensor | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
):
    """:func:`tvd` against sparse targets: 0.5 * sum |p~ - q~| over the K + 1 coarse outcomes."""
    return _reduce_sparse(
        _SPARSE_TVD, student_logits, targets, temperature=temperature, labels=labels,
        ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
    )


#: Sparse divergences by the name of their dense counterpart (``DIVERGENCES``).
SPARSE_DIVERGENCES: dict[str, Callable[..., object]] = {
    "forward_kl": sparse_forward_kl,
    "reverse_kl": sparse_reverse_kl,
    "generalized_jsd": sparse_generalized_jsd,
    "skew_forward_kl": sparse_skew_forward_kl,
    "skew_reverse_kl": sparse_skew_reverse_kl,
    "tvd": sparse_tvd,
}


def sparse_divergence(name: str) -> Callable[..., object]:
    """The sparse-targets version of the divergence ``name`` (a key of ``DIVERGENCES``)."""
    if name == "logit_mse":
        raise ValueError(
            "logit_mse compares raw logits and needs dense teacher logits; build the cache with "
            f"kind=dense or choose a divergence of {sorted(SPARSE_DIVERGENCES)}."
        )
    try:
        return SPARSE_DIVERGENCES[name]
    except KeyError:
        raise ValueError(
            f"unknown divergence {name!r} for sparse targets; choose one of "
            f"{sorted(SPARSE_DIVERGENCES)}."
        ) from None


# --------------------------------------------------------------------------------------------
# Forward KL and cross-entropy in one pass over the student's logits.
# --------------------------------------------------------------------------------------------
def _fused_chunk(
    student: Tensor,
    teacher: Tensor | _CoarseTeacher,
    labels: Tensor,
    mask: Tensor,
    out: Tensor,
    saved: list[tuple[Tensor, ...]] | None,
    exact_rest: bool = True,
) -> tuple[Tensor, Tensor]:
    """One chunk of :func:`fused_forward_kl_and_ce`: ``(kd sum, ce sum)`` at temperature 1.

    Writes q = softmax(z) into ``out`` (float32, the chunk's rows of the gradient buffer): a
    log-softmax into ``out``, then exp in place, as the cross-entropy alone does. For sparse targets the
    student's coarse distribution comes from q at the ids (a gather) and q_rest, the mass off
    the ids: summed exactly (the ids zeroed for one read pass, then restored) when the teacher
    has a rest bucket (``exact_rest``), else ``1 - sum q_ids`` (it then only matters on rows
    without ids, where it is exactly 1). Cache-written sampled targets need neither (see the
    first branch). ``saved`` gets this chunk's per-row (p at the ids, f = p_rest / q_rest[, q at
    the ids]) appended, for backward.
    """
    torch.log_softmax(student.detach().float(), -1, out=out)  # log q, in the buffer
    safe = torch.where(mask, labels, 0).unsqueeze(-1)
    ce_rows = out.gather(-1, safe).squeeze(-1).neg_()
    if isinstance(teacher, _CoarseTeacher) and teacher.kd_const is not None:
        # Cache-written sampled targets (_cached_sampled_rows): every real id has p > 0 and the
        # mass sits on the ids, except in an empty row, whose whole mass is the rest (q_rest = 1
        # there, KL 0, the target P^ = q). So the student's q at the ids is never needed:
        # kd = kd_const - sum_k p_k log q_k, and in backward f = p_rest / q_rest = p_rest.
        # Padding (p = 0) reads id 0: its log q is floored so that a student ruling that id
        # out (-inf) gives 0 * finite there, not NaN (a drawn id the student rules out gives a
        # huge KL, ~1e37, instead of inf; its gradient q - p is exact either way).
        log_q_ids = out.gather(-1, teacher.ids).clamp_min_(_LOG_FLOOR)
        kd_rows = teacher.kd_const - torch.linalg.vecdot(teacher.p, log_q_ids) * teacher.p_scale
        out.exp_()  # q
        if saved is not None:
            saved.append((teacher.p, (~teacher.valid).to(out.dtype)))
    elif isinstance(teacher, _CoarseTeacher):
        ids, valid = teacher.ids, teacher.valid
        log_q_all = out.gather(-1, ids)  # padding repeats a real id of its row: same value
        q_all = log_q_all.exp()
        out.exp_()  # q
        q_ids = torch.where(valid, q_all, 0.0)
        if exact_rest:  # a top-k tail bucket: the coarse formula, renormalised as sparse_forward_kl does
            log_q_ids = log_q_all.masked_fill_(~valid, _NEG)
            out.scatter_(-1, ids, 0.0)
            q_rest = out.sum(-1, keepdim=True)
            out.scatter_(-1, ids, q_all)
            log_q_rest = q_rest.clamp_min(1e-38).log().clamp_min_(_NEG)
            coarse_q = torch.cat([log_q_ids, log_q_rest], -1)
            kd_rows = _SPARSE_FORWARD_KL.rows_from_coarse(coarse_q, teacher, None)
            p = teacher.coarse().softmax(-1)
            p_ids, p_rest = p[:, :-1], p[:, -1:]
        else:  # sampled: the teacher's mass is on the ids (all of it in the rest only in empty rows)
            log_q_ids = log_q_all.masked_fill_(~valid, _NEG)
            q_rest = (1.0 - q_ids.sum(-1, keepdim=True)).clamp_min_(0.0)
            p_ids = teacher.log_p.exp()  # 0 at padding
            p_rest = teacher.log_p_rest.exp().unsqueeze(-1)
            kd_rows = (p_ids * (teacher.log_p - log_q_ids)).sum(-1)
            if teacher.kl_offset is not None:
                kd_rows = kd_rows + teacher.kl_offset
        if saved is not None:
            saved.append((p_ids, p_rest / q_rest.clamp_min(1e-38), q_ids))
    else:
        log_p = teacher.detach().float().log_softmax(-1)
        p = log_p.exp()
        kd_rows = log_p.clamp_min_(_LOG_FLOOR).sub_(out).mul_(p).sum(-1)
        out.exp_()  # q
    return torch.where(mask, kd_rows, 0.0).sum(), torch.where(mask, ce_rows, 0.0).sum()


class _FusedForwardKLAndCE(torch.autograd.Function):
    """``(kd_sum, ce_sum)`` with one (N, V) float32 buffer for both gradients.

    Forward takes one softmax of the student per chunk (q, in the buffer B) and the two values.
    Backward receives (g_kd, g_ce) and builds
    d(g_kd * kd + g_ce * ce)/dz = g_kd (q - P^) + g_ce (q - onehot(label)) in place in B:

    * dense:  B <- (g_kd + g_ce) q - g_kd softmax(teacher)  (the teacher's softmax recomputed
      per chunk), then - g_ce at the labels;
    * sparse: P^ is p_k at the ids and q_m p_rest / q_rest off them, so with f = p_rest / q_rest
      B <- q (g_kd + g_ce - g_kd f) (one scaling pass), then + g_kd (f q_k - p_k) at the ids
      (scatter_add) and - g_ce at the labels (f = 0 for sampled targets, but 1 in an empty row);

    masked rows zero. Like :class:`_ChunkedSum`, the buffer is consumed by the first backward.
    """

    @staticmethod
    def forward(ctx, student, teacher, labels, mask, chunk, exact_rest):  # type: ignore[override]
        n_rows, vocab = student.shape
        buf = torch.empty((n_rows, vocab), dtype=torch.float32, device=student.device)
        pieces: list[tuple[Tensor, ...]] | None = [] if isinstance(teacher, _CoarseTeacher) else None
        sums = [_fused_chunk(s, t, lab, m, buf[start:end], pieces, exact_rest)
                for start, end, s, t, lab, m in _chunks(n_rows, chunk, student, teacher, labels, mask)]
        kd, ce = sums[0] if len(sums) == 1 else (torch.stack([x[0] for x in sums]).sum(),
                                                 torch.stack([x[1] for x in sums]).sum())
        saved = None
        if pieces is not None:  # per-row (p_ids, f[, q_ids]) of every chunk
            saved = pieces[0] if len(pieces) == 1 else tuple(torch.cat(x) for x in zip(*pieces, strict=True))
        ctx.buf, ctx.saved, ctx.teacher = buf, saved, teacher
        ctx.labels, ctx.mask, ctx.chunk, ctx.dtype = labels, mask, chunk, student.dtype
        return kd, ce

    @staticmethod
    def backward(ctx, g_kd, g_ce):  # type: ignore[override]
        buf = ctx.buf
        if buf is None:
            raise RuntimeError(
                "The chunked loss was differentiated twice; its gradient buffer is consumed by the "
                "first backward. Recompute the loss instead of using retain_graph=True."
            )
        ctx.buf = None
        g_kd, g_ce = g_kd.float(), g_ce.float()
        g_both = g_kd + g_ce
        teacher = ctx.teacher
        if ctx.saved is not None:
            # buf holds q. Off the ids the target is q_m p_rest / q_rest (f = p_rest / q_rest):
            # buf <- q (g_both - g_kd f) everywhere, then at the ids + g_kd (f q_k - p_k)
            # (f q_k = 0 for cache-written sampled targets, which save no q_k).
            p_ids, f, *q_ids = ctx.saved  # p_ids, q_ids: 0 at padding
            buf.mul_(g_both - g_kd * f)
            if q_ids:
                at_ids = (f * q_ids[0] - p_ids).mul_(g_kd)
            else:  # cache-written sampled targets: p_ids are counts, p = counts * p_scale
                at_ids = p_ids * (-g_kd * teacher.p_scale)
            buf.scatter_add_(-1, teacher.ids, at_ids)
        else:
            for _, _, b, t, _, _ in _chunks(buf.shape[0], ctx.chunk, buf, teacher, None, None):
                b.mul_(g_both).sub_(t.detach().float().softmax(-1).mul_(g_kd))
        safe = torch.where(ctx.mask, ctx.labels, 0).unsqueeze(-1)
        buf.scatter_add_(-1, safe, (-g_ce).expand(safe.shape))
        _zero_rows_(buf, ctx.mask)
        grad = buf if ctx.dtype == torch.float32 else buf.to(ctx.dtype)
        return grad, None, None, None, None, None


def fused_forward_kl_and_ce(
    student_logits: Tensor,
    teacher: Tensor | SparseTargets,
    labels: Tensor,
    *,
    ignore_index: int = -100,
    chunk_size: int | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Forward KL to the teacher and hard-label cross-entropy in one pass: (kd, ce, count) sums.

    ``kd_sum`` equals ``forward_kl(..., reduction="sum_and_count")[0]`` (dense teacher logits of
    the student's shape) or ``sparse_forward_kl(...)`` (:class:`SparseTargets`), ``ce_sum``
    ``cross_entropy(..., reduction="sum_and_count")[0]``, ``count`` the positions whose label is
    not ``ignore_index`` (masked positions count for neither term). Temperature 1.

    Both sums are differentiable through one autograd function that takes a single softmax of
    the student (a log-softmax and an exp, in place) and keeps a single (N, V) float32 buffer, which
    backward turns into the
    gradient of ``g_kd * kd_sum + g_ce * ce_sum`` in place (see :class:`_FusedForwardKLAndCE`):
    with cached targets a distillation + task step costs about what the task loss alone does.
    Combine both outputs into one loss and call backward once.
    """
    if not isinstance(labels, Tensor):
        raise TypeError(f"labels must be a torch.Tensor of class ids, got {type(labels).__name__}.")
    if labels.dtype.is_floating_point:
        raise TypeError(f"labels must hold integer class ids, got dtype {labels.dtype}.")
    if isinstance(teacher, SparseTargets):
        _check_inputs(student_logits, None, labels, 1.0, "sum_and_count")
        _check_sparse_against_student(teacher, student_logits)
    elif isinstance(teacher, Tensor):
        _check_inputs(student_logits, teacher, labels, 1.0, "sum_and_count")
    else:
        raise TypeError(
            "teacher must be dense logits (a Tensor) or SparseTargets, got "
            f"{type(teacher).__name__}."
        )
    vocab = student_logits.shape[-1]
    student = student_logits.reshape(-1, vocab)
    flat_labels = labels.reshape(-1)
    mask = flat_labels != ignore_index
    if isinstance(teacher, SparseTargets):
        # Unmasked: masked rows are dropped from both sums and zeroed in the gradient, whatever
        # the targets hold there (every quantity is per row).
        flat_teacher: Tensor | _CoarseTeacher
        if _at_draw_temperature(teacher, 1.0):
            flat_teacher = _cached_sampled_rows(teacher)
        else:
            flat_teacher = _coarse_teacher(teacher, 1.0, None)
    else:
        flat_teacher = teacher.reshape(-1, vocab)
    n_rows = student.shape[0]
    chunk = _chunk_rows(n_rows, vocab, chunk_size)
    # Only a top-k tail bucket needs q_rest exactly; sampled rows put no teacher mass there.
    exact_rest = isinstance(teacher, SparseTargets) and teacher.kind == "topk" and teacher.tail_logprob is not None
    if student.requires_grad and torch.is_grad_enabled():
        kd, ce = _FusedForwardKLAndCE.apply(student, flat_teacher, flat_labels, mask, chunk, exact_rest)
    else:
        kd = torch.zeros((), dtype=torch.float32, device=student.device)
        ce = torch.zeros((), dtype=torch.float32, device=student.device)
        for _, _, s, t, lab, m in _chunks(n_rows, chunk, student, flat_teacher, flat_labels, mask):
            scratch = torch.empty(s.shape, dtype=torch.float32, device=s.device)
            kd_chunk, ce_chunk = _fused_chunk(s, t, lab, m, scratch, None, exact_rest)
            kd, ce = kd + kd_chunk, ce + ce_chunk
    return kd, ce, mask.sum()
