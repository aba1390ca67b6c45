"""The teacher's side of the sparse divergences: top-k / sampled targets as coarse distributions.

A cache that stores the teacher's distribution on a few ids per position
(:class:`~lightning_distill.types.SparseTargets`) defines, per position, a coarse distribution
over K + 1 outcomes: the K ids and one "rest" bucket holding everything else.
:func:`sparse_target_logprobs` computes it at a temperature (and documents each kind's
estimate); :class:`_CoarseTeacher` holds it row by row for the chunk engine
(:mod:`lightning_distill.losses.sparse` has the student's side and the divergences).
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
from torch import Tensor

from lightning_distill.losses.chunking import check_temperature
from lightning_distill.types import SparseTargets
from lightning_distill.validation import check_choice, check_int, check_number

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


_SPARSE_KINDS = ("topk", "sampled")


def _check_sparse_targets(targets: SparseTargets) -> None:
    """Structure of the targets on their own (no device sync)."""
    if not isinstance(targets, SparseTargets):
        raise TypeError(f"targets must be SparseTargets, got {type(targets).__name__}.")
    check_choice("SparseTargets.kind", targets.kind, _SPARSE_KINDS)
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
    check_int("SparseTargets.vocab_size", targets.vocab_size, low=1)
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
    check_number("SparseTargets.sample_temperature", targets.sample_temperature, low=0.0, low_open=True)


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
    temperature = check_temperature(temperature)
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
