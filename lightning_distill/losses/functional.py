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
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
from torch import Tensor

__all__ = [
    "DIVERGENCES",
    "cross_entropy",
    "divergence",
    "forward_kl",
    "generalized_jsd",
    "logit_mse",
    "reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
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
    log_q = zs.log_softmax(-1)
    rows = log_q.gather(-1, safe).squeeze(-1).neg_()
    torch.exp(log_q, out=out).scatter_add_(-1, safe, torch.full_like(safe, -1.0, dtype=out.dtype))
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
    zt = None if teacher is None else teacher.detach().float() / temperature
    if mask is not None:
        # Neutral finite logits at masked rows, so that a non-finite row there (a cache's -inf
        # padding, a NaN from a fully masked attention row) cannot back-propagate 0 * inf = NaN.
        masked = ~mask.unsqueeze(-1)
        zs = zs.masked_fill(masked, 0.0)
        zt = None if zt is None else zt.masked_fill(masked, 0.0)
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
    zt = None if teacher is None else teacher.detach().float()
    if temperature != 1.0:
        zs = zs / temperature
        zt = None if zt is None else zt / temperature
    direct = grad_out.dtype == torch.float32 and grad_out.is_contiguous()
    buf = grad_out if direct else torch.empty(zs.shape, dtype=torch.float32, device=zs.device)
    rows = grad_fn(zs, zt, labels, buf)
    if mask is not None:
        # Masked rows count for nothing, whatever their logits hold (even inf or NaN).
        rows = torch.where(mask, rows, 0.0)
        buf.masked_fill_(~mask.unsqueeze(-1), 0.0)
    if not direct:
        grad_out.copy_(buf)
    return rows.sum()


def _chunks(n_rows: int, chunk: int, student: Tensor, teacher: Tensor | None, labels: Tensor | None,
            mask: Tensor | None):
    """Yield ``(start, end, student, teacher, labels, mask)`` row slices of one chunk each."""
    for start in range(0, n_rows, chunk):
        end = start + chunk
        yield (start, end, student[start:end], None if teacher is None else teacher[start:end],
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
        closed_form = _CLOSED_FORM.get(row_fn)
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
    temperature = float(temperature)
    vocab = student_logits.shape[-1]
    lead_shape = student_logits.shape[:-1]
    student = student_logits.reshape(-1, vocab)
    teacher = None if teacher_logits is None else teacher_logits.reshape(-1, vocab)
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
    agree = (student_logits.argmax(-1) == teacher_logits.argmax(-1)).float()
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
