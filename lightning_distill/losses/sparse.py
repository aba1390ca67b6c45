"""The sparse divergences: student logits against top-k / sampled teacher targets.

A cache that stores the teacher's distribution on a few ids per position (SparseTargets)
defines, per position, a coarse distribution over K + 1 outcomes: the K ids and one "rest"
bucket holding everything else. The student's softmax is coarse-grained onto the same
outcomes (q at the ids, q_rest = the mass of all other ids), and the sparse divergences apply
the dense row formulas to these (K + 1)-dim log-probability vectors. So:

* top-k with K = V (tail -inf): every sparse divergence equals its dense counterpart;
* top-k with K < V: the divergence between the two coarse-grained distributions, a lower
  bound of the dense one (data-processing inequality), exact at the ids;
* sampled (Sparse Logit Sampling): the teacher side is an estimate from the draws (see
  sparse_target_logprobs); sparse_forward_kl's gradient is unbiased at T = sample_temperature.

The public functions (``sparse_forward_kl``, ...) are made from the registry, one per entry with
a sparse form; :func:`sparse_divergence` looks them up by the dense name.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from lightning_distill.losses.chunking import Reduction, _check_inputs, _reduce_rows
from lightning_distill.losses.formulas import RowFn
from lightning_distill.losses.registry import REGISTRY, Divergence, get, make_public
from lightning_distill.losses.sparse_targets import (
    _NEG,
    _check_sparse_against_student,
    _check_sparse_targets,
    _coarse_teacher,
    _CoarseTeacher,
)
from lightning_distill.types import SparseTargets


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
        rows, student_logits, _coarse_teacher(targets, temperature, mask), closed_form=rows.closed_form,
        temperature=temperature,
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


def _sparse(entry: Divergence, params: dict[str, float], student_logits: Tensor,
            targets: SparseTargets, **keywords):
    value = params.get(entry.param.name) if entry.param is not None else None
    if entry.needs_teacher_mass is not None and entry.needs_teacher_mass(value):
        at = f" with {entry.param.name}={value:g}" if entry.param is not None else ""
        _check_teacher_mass_off_the_ids(targets, f"sparse_{entry.name}{at}")
    rows = _SparseRows(entry.row_fn(params), forward_kl=entry.sparse_forward_kl)
    return _reduce_sparse(rows, student_logits, targets, **keywords)


def _doc(entry: Divergence) -> str:
    doc = (f":func:`~lightning_distill.losses.functional.{entry.name}` against sparse targets "
           "(:class:`~lightning_distill.types.SparseTargets`), on the K + 1 coarse outcomes (the ids "
           f"and the rest): {entry.formula} with P~, Q~ in place of P, Q.")
    if entry.sparse_forward_kl:
        doc += _FORWARD_KL_NOTE
    if entry.needs_teacher_mass is not None:
        doc += ("\n\nInfinite where the teacher has no mass off its ids: raises ``ValueError`` on "
                "sampled targets and on top-k targets without ``tail_logprob``"
                + (" (only at the parameter value that reduces it to reverse KL)." if entry.param else "."))
    return doc


_FORWARD_KL_NOTE = """

P~ is :func:`sparse_target_logprobs` at ``temperature``; Q~ the student's softmax at
``temperature`` on the same outcomes (q at the ids, q_rest off them). Equal to the dense
forward KL for top-k targets with K = V; a lower bound of it for K < V.

Gradient (w.r.t. z / T, z the student's logits): q - P^, with P^_m = p~_m on the ids and
P^_m = q_m * p~_rest / q_rest off them (the rest's mass handed out as the student spreads
it). It is made in closed form, chunk by chunk, into one buffer (as the dense one).
When q_rest underflows (~0), the rest's pull goes nowhere rather than to inf/NaN.

Sampled targets: P~ = c / N at T = T_s, so the gradient q - c / N is an unbiased estimate of
the dense one; the value is  sum_i p~_i (log p_T(i) - log q_i)  with the teacher's own
log-probabilities ``logprobs`` (the plug-in sum_i p~_i log p~_i of the coarse formula is
biased upwards by about (#ids - 1) / 2N). It is unbiased for the dense KL at
T = T_s = 1, exactly 0 where the student equals the teacher, and can be slightly negative
for one draw. At T != 1 the teacher's normaliser is estimated from the draws (consistent)."""

#: Sparse divergences by the name of their dense counterpart (``DIVERGENCES``).
SPARSE_DIVERGENCES: dict[str, Callable[..., object]] = {
    name: make_public(entry, f"sparse_{name}", "targets", _doc(entry), _sparse, __name__)
    for name, entry in REGISTRY.items() if entry.sparse
}
globals().update({f"sparse_{name}": fn for name, fn in SPARSE_DIVERGENCES.items()})
#: The sparse form of forward KL, as the fused KD + cross-entropy reads it.
_SPARSE_FORWARD_KL = _SparseRows(REGISTRY["forward_kl"].rows, forward_kl=True)


def sparse_divergence(name: str) -> Callable[..., object]:
    """The sparse-targets version of the divergence ``name`` (a key of ``DIVERGENCES``).

    Raises:
        ValueError: an unknown name, or a divergence without a sparse form (the message says why
            and lists those that have one).
    """
    entry = get(name) if name in REGISTRY else None
    if entry is not None and not entry.sparse:
        raise ValueError(
            f"{name} {entry.dense_only} and needs dense teacher logits; build the cache with "
            f"kind=dense or choose a divergence of {sorted(SPARSE_DIVERGENCES)}."
        )
    try:
        return SPARSE_DIVERGENCES[name]
    except (KeyError, TypeError):
        raise ValueError(
            f"unknown divergence {name!r} for sparse targets; choose one of "
            f"{sorted(SPARSE_DIVERGENCES)}."
        ) from None


__all__ = ["SPARSE_DIVERGENCES", "sparse_divergence", *(f"sparse_{n}" for n in SPARSE_DIVERGENCES)]
