"""Forward KL and hard-label cross-entropy in one pass over the student's logits.

:func:`fused_forward_kl_and_ce` takes one softmax of the student per chunk and keeps one
(N, V) float32 buffer for both gradients: with cached targets a distillation + task step costs
about what the task loss alone does. A term joins this path by declaring
``LossTerm.fused_role`` (``"kd"`` or ``"task"``); the module pairs them.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_distill.losses.chunking import (
    _check_inputs,
    _chunk_rows,
    _chunks,
    _zero_rows_,
    check_class_ids,
)
from lightning_distill.losses.formulas import _LOG_FLOOR
from lightning_distill.losses.sparse import _SPARSE_FORWARD_KL
from lightning_distill.losses.sparse_targets import (
    _NEG,
    _at_draw_temperature,
    _cached_sampled_rows,
    _check_sparse_against_student,
    _coarse_teacher,
    _CoarseTeacher,
)
from lightning_distill.types import SparseTargets

__all__ = ["fused_forward_kl_and_ce"]


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
    check_class_ids(labels)
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
