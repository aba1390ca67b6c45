"""Per-row formulas of the divergences, and their closed-form gradients.

A row function maps float32 logits already divided by the temperature, student ``zs`` (n, V)
and teacher ``zt`` (n, V) or ``None``, and labels (n,) or ``None``, to one float32 value per row.
A closed-form gradient ``(zs, zt, labels, out) -> rows`` returns the same rows and writes
d sum(rows) / d zs into ``out`` (float32, the chunk's slice of the gradient buffer). The
registry (:mod:`lightning_distill.losses.registry`) pairs them by divergence name.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import Tensor

# A row function maps scaled student logits (n, V), scaled teacher logits (n, V) or None,
# and labels (n,) or None to one float32 value per row.
RowFn = Callable[[Tensor, "Tensor | None", "Tensor | None"], Tensor]

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

