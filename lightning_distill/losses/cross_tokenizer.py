"""Logit distillation between models with different tokenizers.

The student and the teacher read the same text, each in its own tokens; a batch carries both
tokenizations and their alignment (:class:`CrossTokenizerBatch`, made by
:class:`~lightning_distill.data.CrossTokenizerDataModule`): tokens grouped into spans that end on
a character boundary common to both (:mod:`lightning_distill.crosstok.align`). At the start of
group ``g`` both models have read exactly the same text, so their next-token distributions at
that point (the *group heads*: the logits at the position before the group's first token) are
conditioned alike and can be compared. Group 0 has no head inside the sample and is skipped.

Two terms:

* :class:`ULDLoss` (Universal Logit Distillation, Boizard et al. 2024): at each group head, the
  L1 distance between the two probability vectors sorted in decreasing order, the shorter padded
  with zeros. It needs no token correspondence, and is zero for any permutation of the same
  distribution.
* :class:`CrossTokenizerKD`, the hybrid. Per group, each side's head distribution is *merged*
  with the rest of the group: the group's text is the event "first token, then the group's
  other tokens", of probability ``p(first) * prod p(next token | ...)`` (the chained token
  probabilities along the side's own tokens). That mass moves from the first token's entry to a
  *group* entry both sides share; the first token's entry keeps ``p(first) * (1 - chain)``
  (it started like the group but went on otherwise; ``1 - chain`` is computed from the rest of
  each chained row's mass, not from the chain, which rounds to 1 for a confident model:
  :func:`_chain_rows`). An entry of the side's vocabulary that
  spells the group's whole text by itself ("ab" where the side read "a" + "b", or another id of
  a one-token group's bytes) is the same event by another path: its mass joins the group entry
  and its entry becomes 0, on each side, so that no shared string holds 0 on one side (moved to
  the group) and its probability on the other (a log-0 term for a KL). The id comes from the
  batch's tokens and the vocabularies' spellings (:attr:`SharedVocab.spellings`, filled by
  :func:`~lightning_distill.crosstok.vocab.shared_vocab`). The entries whose token strings exist in
  both vocabularies (:func:`~lightning_distill.crosstok.vocab.shared_vocab`) plus the group
  entry are renormalised and compared with a registry divergence at the term's temperature
  (times T², as :class:`~lightning_distill.losses.LogitKD`); the entries of one vocabulary only
  are compared by ULD (sorted, unnormalised, ``uld_weight``).

With identical tokenizers every group is one token on each side, every entry is shared and the
chain is 1 and no other id spells the token, so the hybrid equals
:class:`~lightning_distill.losses.LogitKD` with the same divergence and temperature exactly (the
group entry is the first token's probability moved to another index; its old index holds 0 on
both sides, which no divergence counts), and the ULD part is zero.

Both terms return sums over the groups with a head (and a label there that is not
``ignore_index``); the module divides by the student's label positions, as for every term.

Both walk the compared groups in chunks (``chunk_size``): no log-softmax of every position and no
``(groups, V)`` intermediate outlives its chunk; the student's gradient is written chunk by chunk
into one buffer of its logits' size, as :mod:`~lightning_distill.losses.chunking` does for the
same-vocabulary losses. ``_reference_cross_tokenizer_kd`` and ``_reference_uld`` keep the direct
formulation the chunked one is tested and benchmarked against.
"""

from __future__ import annotations

import sys
from collections.abc import Mapping
from dataclasses import dataclass
from itertools import groupby
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.alignment import has_teacher_tokens
from lightning_distill.crosstok.vocab import SharedVocab, Spelling, shared_vocab
from lightning_distill.losses import registry
from lightning_distill.losses.terms import LogitKD, LossTerm
from lightning_distill.types import LossInputs
from lightning_distill.validation import check_int, check_number

__all__ = ["CROSS_BATCH_KEYS", "CrossTokenizerBatch", "CrossTokenizerKD", "ULDLoss", "attach_tokenizers",
           "cross_tokenizer_batch", "cross_tokenizer_kd", "group_heads", "uld"]

#: The batch keys of a cross-tokenizer batch (besides the student's ``input_ids``/``labels``).
CROSS_BATCH_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels", "student_groups",
                    "teacher_groups")
_LOG_FLOOR = torch.finfo(torch.float32).min  # log 0 without -inf (no NaN in sums or gradients)
# Rows x vocabulary per chunk when chunk_size is auto: 2 MiB of float32 per temporary. A chunk of
# the hybrid holds about a dozen; smaller chunks pay Python overhead, larger ones leave the caches.
_CHUNK_ELEMENTS = 2**19


@dataclass
class CrossTokenizerBatch:
    """The two tokenizations of a batch and their alignment.

    Attributes:
        student_ids: ``(B, Ts)`` the student's token ids.
        teacher_ids: ``(B, Tt)`` the teacher's token ids.
        student_groups: ``(B, Ts)`` the aligned group of each student token, ``-1`` at padding.
        teacher_groups: ``(B, Tt)`` the same for the teacher's tokens.
    """

    student_ids: Tensor
    teacher_ids: Tensor
    student_groups: Tensor
    teacher_groups: Tensor

    @classmethod
    def from_batch(cls, batch: Any) -> CrossTokenizerBatch:
        """Read the tokenizations from a batch mapping.

        Raises:
            ValueError: a key is missing (the batch does not come from a cross-tokenizer data module).
        """
        keys = ("input_ids", "teacher_input_ids", "student_groups", "teacher_groups")
        missing = [k for k in keys if not isinstance(batch, Mapping) or batch.get(k) is None]
        if missing:
            raise ValueError(
                f"a cross-tokenizer loss needs the batch keys {list(keys)}, but {missing} are missing; use "
                "CrossTokenizerDataModule (data=cross_tokenizer) or, on your files, TextDataModule(teacher_tokenizer=...) "
                "(data=files data.teacher_tokenizer=...), "
                "which tokenizes the text for both models and aligns the tokens."
            )
        return cls(batch["input_ids"], batch["teacher_input_ids"], batch["student_groups"],
                   batch["teacher_groups"])


@dataclass
class _Heads:
    """Per side, per group (flattened over the batch): head position, first token, chain (as
    ``log(-log c)``, :func:`_merge`), and the id that spells the whole group (``-1``: none besides
    the first token; ``None``: none in the batch, or the spellings are not known)."""

    position: Tensor
    first: Tensor
    chain: Tensor
    whole: Tensor | None = None


def _side(groups: Tensor, ids: Tensor, logp: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(has_head, head_position, first_token, chain)``, each ``(B, num_groups)``; ``chain`` is
    ``log(-log c)`` of the chained probability ``c`` (:func:`_merge`)."""
    b_size = groups.shape[0]
    prev = F.pad(groups[:, :-1], (1, 0), value=-1)
    real = groups >= 0
    starts = real & (groups != prev)
    starts[:, 0] = False  # the first token of a sample has no head position
    inner = real & (groups == prev)
    position = torch.zeros(b_size, num_groups, dtype=torch.long, device=groups.device)
    first = torch.zeros_like(position)
    has = torch.zeros(b_size, num_groups, dtype=torch.bool, device=groups.device)
    b, j = starts.nonzero(as_tuple=True)
    g = groups[b, j]
    position[b, g] = j - 1
    first[b, g] = ids[b, j]
    has[b, g] = True
    b, j = inner.nonzero(as_tuple=True)
    nats = _chain_rows(logp[b, j - 1], ids[b, j])[0]
    chain = _group_logsumexp(nats, b * num_groups + groups[b, j], b_size * num_groups)
    return has, position, first, chain.view(b_size, num_groups)


def group_heads(cross: CrossTokenizerBatch, student_logp: Tensor, teacher_logp: Tensor,
                labels: Tensor | None = None, ignore_index: int = -100,
                vocab: SharedVocab | None = None) -> tuple[Tensor, _Heads, _Heads]:
    """The groups both sides can be compared at, with each side's head and chained probability.

    Args:
        cross: the batch's tokenizations.
        student_logp: ``(B, Ts, Vs)`` the student's log-probabilities.
        teacher_logp: ``(B, Tt, Vt)`` the teacher's.
        labels: the student's aligned labels ``(B, Ts)``: a group whose head has ``ignore_index``
            there is skipped; ``None``: none skipped.
        ignore_index: the mask value in ``labels``.
        vocab: with the two vocabularies' spellings (:func:`shared_vocab`), each side's heads also
            carry the id that spells the whole group (:func:`_whole_ids`).

    Returns:
        ``(batch_index, student_heads, teacher_heads)`` over the ``N`` compared groups.
    """
    num_groups = int(max(int(cross.student_groups.max()), int(cross.teacher_groups.max()), 0)) + 1
    s_has, s_pos, s_first, s_chain = _side(cross.student_groups, cross.student_ids, student_logp, num_groups)
    t_has, t_pos, t_first, t_chain = _side(cross.teacher_groups, cross.teacher_ids, teacher_logp, num_groups)
    valid = s_has & t_has
    if labels is not None:
        valid &= labels.gather(1, s_pos) != ignore_index
    b, g = valid.nonzero(as_tuple=True)
    s_whole, t_whole = _both_whole(cross, vocab, b, g, s_first[b, g], t_first[b, g], num_groups)
    return (b, _Heads(s_pos[b, g], s_first[b, g], s_chain[b, g], s_whole),
            _Heads(t_pos[b, g], t_first[b, g], t_chain[b, g], t_whole))


def _whole_ids(groups: Tensor, ids: Tensor, spelling: Spelling, b: Tensor, g: Tensor, first: Tensor,
               num_groups: int) -> Tensor:
    """Per compared group ``(b, g)``, the id of this side's vocabulary that spells the group's whole
    text (its tokens' bytes joined), or ``-1`` when that is the group's first token or no id does.

    A one-token group is spelled by its token, so only another id of the same bytes counts (the
    lowest one, as the shared map pairs); a longer group's bytes are looked up once per group
    (the batch's groups of several tokens, in Python; no loop over the vocabulary). A group with
    a special token or an id without bytes has no spelling.
    """
    device = ids.device
    whole = spelling.canon.to(device)[first]
    n = b.numel()
    if n:
        slot = torch.full((groups.shape[0], num_groups), -1, dtype=torch.long, device=device)
        slot[b, g] = torch.arange(n, device=device)
        rb, rj = (groups >= 0).nonzero(as_tuple=True)
        k = slot[rb, groups[rb, rj]]
        keep = k >= 0
        k, tokens = k[keep], ids[rb, rj][keep]
        multi = torch.bincount(k, minlength=n)[k] > 1
        k, tokens = k[multi], tokens[multi]  # row-major: each group's tokens together, in order
        if k.numel():
            keys, lookup = spelling.keys, spelling.lookup
            slots, found = [], []
            for index, run in groupby(zip(k.tolist(), tokens.tolist(), strict=True), key=lambda kt: kt[0]):
                try:
                    text = b"".join(keys[t] for _, t in run)
                except TypeError:  # a special token or an id without bytes
                    text = None
                slots.append(index)
                found.append(lookup.get(text, -1))
            whole[torch.tensor(slots, device=device)] = torch.tensor(found, dtype=torch.long, device=device)
    return torch.where(whole == first, -1, whole)


def _both_whole(cross: CrossTokenizerBatch, vocab: SharedVocab | None, b: Tensor, g: Tensor, s_first: Tensor,
                t_first: Tensor, num_groups: int) -> tuple[Tensor | None, Tensor | None]:
    """``(student, teacher)`` :func:`_whole_ids`, ``None`` for a side whose spellings are not known or
    where no compared group has such an id (the merge as without, at no cost)."""
    spellings = vocab.spellings if vocab is not None else (None, None)
    out = []
    for spelling, groups, ids, first in zip(spellings, (cross.student_groups, cross.teacher_groups),
                                            (cross.student_ids, cross.teacher_ids), (s_first, t_first), strict=True):
        whole = None if spelling is None else _whole_ids(groups, ids, spelling, b, g, first, num_groups)
        out.append(None if whole is None or not bool((whole >= 0).any()) else whole)
    return out[0], out[1]


_LN2 = 0.6931471805599453
# Below exp(-60) of the mass, log(-log(1 - q)) is log q (to q / 2) and log(1 - exp(-L)) is log L
# (to L / 2): no exp that underflows is taken.
_TINY_LOG = -60.0


def _chain_rows(x: Tensor, ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per chained row (``x``: ``(R, V)`` logits at the temperature, or log-probabilities: any
    shift of a row; ``ids``: ``(R,)`` the tokens), ``(log(-log p), log q, logsumexp(x))`` for the
    token's probability ``p`` and the rest of the row's mass ``q = 1 - p``.

    ``q`` comes from the log-sum-exp of the row without the token, not from ``1 - p`` (which is 0
    in float32 once ``q`` is below about 6e-8), so the row's nats ``-log p`` are accurate however
    close ``p`` is to 1: ``-log1p(-q)`` where ``p > 1/2`` (``q`` itself when ``q < exp(-60)``),
    ``-log p`` elsewhere. A row whose other entries are all at probability 0 has ``q`` at the
    floor and nats at the floor (``p`` is exactly 1).
    """
    token = ids.unsqueeze(-1)
    xt = x.gather(-1, token).squeeze(-1)
    others = x.scatter(-1, token, _LOG_FLOOR).logsumexp(-1)
    lse = torch.logaddexp(others, xt)
    lp, lq = xt - lse, (others - lse).clamp(min=_LOG_FLOOR)
    near = torch.log(-torch.log1p(-lq.clamp(_TINY_LOG, -_LN2).exp()))
    far = torch.log(-lp.clamp(max=-_LN2))
    return torch.where(lq < -_LN2, torch.where(lq < _TINY_LOG, lq, near), far).clamp(max=80.0), lq, lse


def _group_logsumexp(values: Tensor, slot: Tensor, size: int) -> Tensor:
    """``(size,)``: per slot the log-sum-exp of ``values`` at that slot; the floor for a slot
    without one (a group without chained tokens: its chain is 1, its nats 0)."""
    top = torch.full((size,), _LOG_FLOOR, dtype=values.dtype, device=values.device)
    top = top.scatter_reduce(0, slot, values.detach(), "amax")
    total = torch.zeros_like(top).index_add(0, slot, (values - top[slot]).exp())
    has = total > 0
    return torch.where(has, top + torch.where(has, total, 1.0).log(), _LOG_FLOOR)


def _log1m_chain(nats: Tensor) -> Tensor:
    """``log(1 - c)`` for the chain ``c = exp(-L)`` given ``nats = log L``, accurate for ``c``
    near 1 (``L`` small: ``log(-expm1(-L))``, ``log L`` below ``exp(-60)``) and for ``c`` near 0
    (``log1p(-exp(-L))``); the floor (log 0) for no chained token."""
    size = nats.clamp(min=_TINY_LOG).exp()
    small = torch.log(-torch.expm1(-size.clamp(max=_LN2)))
    large = torch.log1p(-torch.exp(-size.clamp(min=_LN2)))
    return torch.where(nats < _TINY_LOG, nats, torch.where(size < _LN2, small, large))


def _merge(head: Tensor, first: Tensor, chain: Tensor, whole: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """The head distribution with the group's mass moved out of the first token's entry:
    ``(entries with p(first) * (1 - c) at first, log p(group) = log p(first) + log c)``, the chain
    ``c`` given as ``chain = log(-log c)`` (:func:`_chain_rows`, summed over the group's rows in
    log space; the floor for none), so that ``1 - c`` is accurate when ``c`` rounds to 1.

    With ``whole`` (per row an id that spells the whole group, ``-1``: none), that id's mass is
    the same event by another path: it is added to the group entry and its entry becomes 0."""
    lp_first = head.gather(-1, first.unsqueeze(-1)).squeeze(-1)
    tail = lp_first + _log1m_chain(chain)
    merged, group = head.scatter(-1, first.unsqueeze(-1), tail.unsqueeze(-1)), lp_first - chain.exp()
    if whole is None:
        return merged, group
    has = whole >= 0
    at = whole.clamp(min=0).unsqueeze(-1)
    group = torch.where(has, torch.logaddexp(group, head.gather(-1, at).squeeze(-1)), group)
    kept = merged.gather(-1, at).squeeze(-1)  # rows without one write their entry back unchanged
    return merged.scatter(-1, at, torch.where(has, _LOG_FLOOR, kept).unsqueeze(-1)), group


def _sorted_l1(p: Tensor, q: Tensor) -> Tensor:
    """Per row: L1 distance of the two vectors sorted in decreasing order, the shorter zero-padded."""
    width = max(p.shape[-1], q.shape[-1])
    if width == 0:
        return p.new_zeros(p.shape[:-1])
    p = F.pad(p.sort(-1, descending=True).values, (0, width - p.shape[-1]))
    q = F.pad(q.sort(-1, descending=True).values, (0, width - q.shape[-1]))
    return (p - q).abs().sum(-1)


def _log_probs(logits: Tensor, temperature: float) -> Tensor:
    return (logits.float() / temperature).log_softmax(-1)


def _sort_ascending(x: Tensor, order: bool) -> tuple[Tensor, Tensor | None]:
    """The rows of ``x`` (``(n, V)``, non-negative: probabilities) sorted in increasing order, and
    the sorting indices when ``order``.

    On the CPU numpy's vectorised sorts: values alone with ``np.sort`` (30x faster than
    ``torch.sort`` there); with the order, float32 rows as one int64 per entry, the value's bits
    above its index (the bits of non-negative floats order as integers do), sorted with
    ``np.sort`` (15x faster than ``torch.sort``, 4x faster than ``np.argsort``). Elsewhere
    ``torch.sort``.
    """
    x = x.detach()
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64) or x.dim() != 2:
        values, indices = x.sort(-1)
        return values, indices if order else None
    array = np.ascontiguousarray(x.numpy())
    if not order:
        return torch.from_numpy(np.sort(array, axis=-1)), None
    if array.dtype != np.float32 or sys.byteorder != "little":
        indices = np.argsort(array, axis=-1)
        return torch.from_numpy(np.take_along_axis(array, indices, -1)), torch.from_numpy(indices)
    rows, width = array.shape
    pairs = np.empty((rows, width, 2), dtype=np.int32)  # little-endian int64: bits << 32 | index
    pairs[..., 0] = np.arange(width, dtype=np.int32)
    pairs[..., 1] = array.view(np.int32)
    pairs.view(np.int64).reshape(rows, width).sort(axis=-1)
    values = np.ascontiguousarray(pairs[..., 1]).view(np.float32)
    return torch.from_numpy(values), torch.from_numpy(pairs[..., 0].astype(np.int64))


class _SortedL1(torch.autograd.Function):
    """:func:`_sorted_l1` with its gradient (into ``p`` only; ``q`` is a constant), sorting with
    :func:`_sort_ascending`. In increasing order the k-th largest entries of the two rows pair
    up from the end; the longer row's smallest entries meet the zero padding."""

    @staticmethod
    def forward(ctx, p, q):  # type: ignore[override]
        ps, order = _sort_ascending(p, ctx.needs_input_grad[0])
        qs, _ = _sort_ascending(q, False)
        lp, lq = ps.shape[-1], qs.shape[-1]
        k = min(lp, lq)
        diff = ps[..., lp - k:] - qs[..., lq - k:]
        rows = diff.abs().sum(-1) + ps[..., :lp - k].abs().sum(-1) + qs[..., :lq - k].abs().sum(-1)
        if order is not None:
            ctx.save_for_backward(torch.cat([ps[..., :lp - k].sign(), diff.sign()], -1), order)
        return rows

    @staticmethod
    def backward(ctx, grad_rows):  # type: ignore[override]
        sign, order = ctx.saved_tensors
        # ``order`` is a permutation of each row: every entry is written.
        return torch.empty_like(sign).scatter_(-1, order, sign * grad_rows.unsqueeze(-1)), None


@dataclass
class _Plan:
    """The compared groups of a batch as rows of the flattened ``(B * T, V)`` logits.

    Attributes:
        s_rows, t_rows: ``(N,)`` each side's head row per compared group.
        s_first, t_first: ``(N,)`` each side's first token of the group.
        s_inner, t_inner: ``(rows, token ids, group slot)`` of the tokens chained into a compared
            group (the row that predicts the token, the token, the group's index in ``0..N-1``).
        s_whole, t_whole: ``(N,)`` each side's id that spells the whole group, ``-1`` for none
            (:func:`_whole_ids`); ``None`` when no compared group of the batch has one.
    """

    s_rows: Tensor
    t_rows: Tensor
    s_first: Tensor
    t_first: Tensor
    s_inner: tuple[Tensor, Tensor, Tensor]
    t_inner: tuple[Tensor, Tensor, Tensor]
    s_whole: Tensor | None = None
    t_whole: Tensor | None = None

    @property
    def size(self) -> int:
        return int(self.s_rows.numel())


def _side_plan(groups: Tensor, ids: Tensor, num_groups: int):
    """``(has_head, head_position, first_token, (b, j, group) of the inner tokens)``, as :func:`_side`."""
    prev = F.pad(groups[:, :-1], (1, 0), value=-1)
    real = groups >= 0
    starts = real & (groups != prev)
    starts[:, 0] = False
    position = torch.zeros(groups.shape[0], num_groups, dtype=torch.long, device=groups.device)
    first = torch.zeros_like(position)
    has = torch.zeros(position.shape, dtype=torch.bool, device=groups.device)
    b, j = starts.nonzero(as_tuple=True)
    g = groups[b, j]
    position[b, g] = j - 1
    first[b, g] = ids[b, j]
    has[b, g] = True
    b, j = (real & (groups == prev)).nonzero(as_tuple=True)
    return has, position, first, (b, j, groups[b, j])


def _plan(cross: CrossTokenizerBatch, labels: Tensor | None, ignore_index: int,
          vocab: SharedVocab | None = None) -> _Plan:
    """The groups :func:`group_heads` compares, as flat rows (no logits needed), with the ids
    that spell whole groups when ``vocab`` knows the spellings."""
    num_groups = int(max(int(cross.student_groups.max()), int(cross.teacher_groups.max()), 0)) + 1
    s_has, s_pos, s_first, s_inner = _side_plan(cross.student_groups, cross.student_ids, num_groups)
    t_has, t_pos, t_first, t_inner = _side_plan(cross.teacher_groups, cross.teacher_ids, num_groups)
    valid = s_has & t_has
    if labels is not None:
        valid &= labels.gather(1, s_pos) != ignore_index
    b, g = valid.nonzero(as_tuple=True)
    slot = torch.full(valid.shape, -1, dtype=torch.long, device=valid.device)
    slot[b, g] = torch.arange(b.numel(), device=valid.device)

    def inner(found: tuple[Tensor, Tensor, Tensor], ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        ib, ij, ig = found
        k = slot[ib, ig]
        keep = k >= 0
        return (ib * ids.shape[1] + ij - 1)[keep], ids[ib, ij][keep], k[keep]

    ts, tt = cross.student_ids.shape[1], cross.teacher_ids.shape[1]
    s_whole, t_whole = _both_whole(cross, vocab, b, g, s_first[b, g], t_first[b, g], num_groups)
    return _Plan(b * ts + s_pos[b, g], b * tt + t_pos[b, g], s_first[b, g], t_first[b, g],
                 inner(s_inner, cross.student_ids), inner(t_inner, cross.teacher_ids), s_whole, t_whole)


def _chunk_rows(n_rows: int, vocab: int, chunk_size: int | None) -> int:
    """Rows per chunk: ``chunk_size``, or auto (``_CHUNK_ELEMENTS`` per temporary, at least one row)."""
    if chunk_size is not None:
        return chunk_size
    return max(1, min(n_rows, _CHUNK_ELEMENTS // max(vocab, 1)))


def _chains(logits: Tensor, inner: tuple[Tensor, Tensor, Tensor], size: int, temperature: float,
            chunk_size: int | None) -> tuple[Tensor, Tensor]:
    """``(chain, rows)``: per compared group ``(size,)`` the chain of its inner tokens as
    ``log(-log c)`` (:func:`_merge`), and ``(3, R)`` per inner token its row's three numbers
    (:func:`_chain_rows`: nats, rest, log-sum-exp)."""
    rows, ids, slot = inner
    values = torch.empty((3, rows.numel()), dtype=torch.float32, device=logits.device)
    step = _chunk_rows(rows.numel(), logits.shape[-1], chunk_size)
    for start in range(0, rows.numel(), step):
        end = start + step
        z = logits.index_select(0, rows[start:end]).float() / temperature
        values[:, start:end] = torch.stack(_chain_rows(z, ids[start:end]))
    return _group_logsumexp(values[0], slot, size), values


@dataclass
class _Job:
    """One chunked cross-tokenizer loss: the plan, the per-chunk terms and how to walk them.

    ``piece(ls, lt, s_first, s_chain, t_first, t_chain, s_whole, t_whole) -> (divergence sum,
    ULD sum)`` over one chunk of head rows (log-probabilities at the temperature). ``weights``: the gradient that
    forward computes is that of ``weights[0] * divergence + weights[1] * ULD`` (how the caller
    combines the two; backward recomputes when the incoming gradients are not in this ratio).
    """

    plan: _Plan
    piece: Any
    temperature: float
    chunk_size: int | None
    chained: bool
    weights: tuple[float, float] = (1.0, 1.0)

    def run(self, student: Tensor, teacher: Tensor, weights: tuple[Any, Any] | None):
        """``(divergence sum, ULD sum, gradient)``: with ``weights``, the gradient of
        ``weights[0] * divergence + weights[1] * ULD`` with respect to ``student``, else ``None``."""
        plan, temperature = self.plan, self.temperature
        s2, t2 = student.reshape(-1, student.shape[-1]), teacher.reshape(-1, teacher.shape[-1])
        n = plan.size
        none = torch.full((n,), _LOG_FLOOR, dtype=torch.float32, device=s2.device), None
        s_chain, s_rows = _chains(s2, plan.s_inner, n, temperature, self.chunk_size) if self.chained else none
        t_chain = _chains(t2, plan.t_inner, n, temperature, self.chunk_size)[0] if self.chained else none[0]
        grad = None if weights is None else torch.zeros_like(s2)
        chain_grad = torch.zeros_like(s_chain)
        div = torch.zeros((), dtype=torch.float32, device=s2.device)
        rest = torch.zeros_like(div)
        step = _chunk_rows(n, max(s2.shape[-1], t2.shape[-1]), self.chunk_size)
        for start in range(0, n, step):
            end = start + step
            zs = s2.index_select(0, plan.s_rows[start:end]).float()
            lt = _log_probs(t2.index_select(0, plan.t_rows[start:end]), temperature)
            firsts = plan.s_first[start:end], plan.t_first[start:end]
            wholes = tuple(None if w is None else w[start:end] for w in (plan.s_whole, plan.t_whole))
            if grad is None:
                d, r = self.piece(_log_probs(zs, temperature), lt, firsts[0], s_chain[start:end], firsts[1],
                                  t_chain[start:end], *wholes)
            else:
                zs.requires_grad_(True)
                cs = s_chain[start:end].clone().requires_grad_(self.chained)
                with torch.enable_grad():
                    d, r = self.piece(_log_probs(zs, temperature), lt, firsts[0], cs, firsts[1], t_chain[start:end],
                                      *wholes)
                    wanted = d * weights[0] + r * weights[1]
                    leaves = [zs, cs] if self.chained else [zs]
                    found = torch.autograd.grad(wanted, leaves, allow_unused=True)
                if found[0] is not None:
                    grad.index_add_(0, plan.s_rows[start:end], found[0].to(grad.dtype))
                if self.chained and found[1] is not None:
                    chain_grad[start:end] = found[1]
            div += d.detach()
            rest += r.detach()
        if grad is None:
            return div, rest, None
        if self.chained:
            # Through each chained row's nats L = -log p, whose log-sum-exp over the group is the
            # chain: d log L / d logits = (softmax - onehot(token)) / (L T), the token's p - 1 taken
            # as -q (exact where p rounds to 1); none for a row whose other entries are all at
            # probability 0 (p is exactly 1; the direct formulation's gradient is 0 there too).
            rows, ids, slot = plan.s_inner
            s_nats, s_rest, s_lse = s_rows
            live = (s_rest > _LOG_FLOOR) & (s_nats < 80.0)
            nats = torch.where(live, s_nats, 0.0)
            shift = (s_lse + nats).unsqueeze(-1)  # softmax / L = exp(z - logsumexp(z) - log L)
            weight = torch.where(live, chain_grad[slot] * (s_nats - s_chain[slot]).exp(), 0.0) / temperature
            step = _chunk_rows(rows.numel(), s2.shape[-1], self.chunk_size)
            for start in range(0, rows.numel(), step):
                end = start + step
                z = s2.index_select(0, rows[start:end]).float() / temperature
                g = z.sub_(shift[start:end]).exp_().mul_(weight[start:end].unsqueeze(-1))
                token = -(s_rest[start:end] - nats[start:end]).exp() * weight[start:end]
                g.scatter_(-1, ids[start:end].unsqueeze(-1), token.unsqueeze(-1))
                grad.index_add_(0, rows[start:end], g.to(grad.dtype))
        return div, rest, grad.view_as(student)


class _ChunkedCross(torch.autograd.Function):
    """``(divergence sum, ULD sum)`` of a :class:`_Job`, with the student's gradient made chunk by chunk.

    Forward walks the chunks, each with a small local graph, and writes the gradient of the job's
    planned combination of the two sums into one buffer of the student logits' size; backward
    scales it. Incoming gradients in another ratio (the two sums used apart), or a second
    backward, recompute the walk (checkpoint-style) for the gradients that came in.
    """

    @staticmethod
    def forward(ctx, student, teacher, job):  # type: ignore[override]
        div, rest, grad = job.run(student, teacher, job.weights)
        ctx.job, ctx.grad = job, grad
        ctx.save_for_backward(student, teacher)
        return div, rest

    @staticmethod
    def backward(ctx, grad_div, grad_rest):  # type: ignore[override]
        grad, (w_div, w_rest) = ctx.grad, ctx.job.weights
        ctx.grad = None
        # The buffer holds d(w_div * div + w_rest * rest), a zero weight marking a part without a
        # gradient (plain ULD's div, the hybrid's ULD part at uld_weight=0); it serves when the
        # incoming gradients are in the same ratio.
        if grad is not None:
            scale = grad_div / w_div if w_div > 0 else grad_rest / w_rest
            if w_div == 0 or w_rest == 0 or torch.isclose(grad_div * w_rest, grad_rest * w_div):
                return grad.mul_(scale), None, None
        student, teacher = ctx.saved_tensors
        return ctx.job.run(student, teacher, (grad_div, grad_rest))[2], None, None


def _walk(job: _Job, student_logits: Tensor, teacher_logits: Tensor) -> tuple[Tensor, Tensor]:
    teacher = teacher_logits.detach()
    if student_logits.requires_grad and torch.is_grad_enabled():
        return _ChunkedCross.apply(student_logits, teacher, job)
    with torch.no_grad():
        return job.run(student_logits, teacher, None)[:2]


def uld(student_logits: Tensor, teacher_logits: Tensor, cross: CrossTokenizerBatch, *, temperature: float = 1.0,
        labels: Tensor | None = None, ignore_index: int = -100, chunk_size: int | None = None) -> tuple[Tensor, Tensor]:
    """Universal Logit Distillation at the group heads: ``sum |sort(p) - sort(q)|``.

    Walks the group heads in chunks (forward without a graph, backward recomputing each chunk),
    so no ``(groups, V)`` intermediate outlives its chunk; the values and gradients are those
    of the direct formulation (tested).

    Args:
        student_logits: ``(B, Ts, Vs)``.
        teacher_logits: ``(B, Tt, Vt)`` (no gradient flows into them).
        cross: the batch's tokenizations and alignment.
        temperature: both distributions from ``logits / temperature``.
        labels: the student's aligned labels (groups with ``ignore_index`` at the head are skipped).
        ignore_index: the mask value.
        chunk_size: group heads per chunk (default: auto, about 2 MiB per temporary).

    Returns:
        ``(sum over compared groups, number of compared groups)``.

    Raises:
        ValueError: a ``chunk_size`` below 1.
    """
    chunk_size = check_int("chunk_size", chunk_size, low=1, allow_none=True)
    plan = _plan(cross, labels, ignore_index)

    def piece(ls, lt, s_first, s_chain, t_first, t_chain, s_whole, t_whole):
        return ls.new_zeros(()), _SortedL1.apply(ls.exp(), lt.exp()).sum()

    job = _Job(plan, piece, float(temperature), chunk_size, chained=False, weights=(0.0, 1.0))
    _, total = _walk(job, student_logits, teacher_logits)
    return total, torch.tensor(plan.size, device=total.device)


def cross_tokenizer_kd(student_logits: Tensor, teacher_logits: Tensor, cross: CrossTokenizerBatch,
                       vocab: SharedVocab, *, divergence: str = "forward_kl", temperature: float = 1.0,
                       params: Mapping[str, float] | None = None, uld_weight: float = 1.0,
                       labels: Tensor | None = None, ignore_index: int = -100,
                       chunk_size: int | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """The hybrid cross-tokenizer loss (see the module docstring), without the T² factor.

    Walks the compared groups in chunks: the chained probabilities first (a log-sum-exp without
    the token per inner-token row, kept as one number per group, so that ``1 - chain`` stays
    accurate when the chain rounds to 1: :func:`_chain_rows`), then the head rows, forward without a graph
    and backward recomputing each chunk with a local one; the gradient goes into one buffer of the
    student logits' size. No ``(groups, V)`` intermediate outlives its chunk, and the values and
    gradients are those of the direct formulation (tested).

    Args:
        student_logits: ``(B, Ts, Vs)``.
        teacher_logits: ``(B, Tt, Vt)`` (no gradient flows into them).
        cross: the batch's tokenizations and alignment.
        vocab: the shared entries of the two vocabularies.
        divergence: a registry name (not ``logit_mse``: raw logits of two vocabularies do not compare).
        temperature: both distributions from ``logits / temperature``.
        params: the divergence's checked parameter (``{"beta": ...}``), if any.
        uld_weight: the weight of the ULD part over the unshared entries.
        labels: the student's aligned labels.
        ignore_index: the mask value.
        chunk_size: groups per chunk (default: auto, about 2 MiB per temporary).

    Returns:
        ``(divergence sum, ULD sum, number of compared groups)``.

    Raises:
        ValueError: logits whose sizes differ from the map's, or a ``chunk_size`` below 1.
    """
    return _hybrid(student_logits, teacher_logits, cross, vocab, divergence=divergence, temperature=temperature,
                   params=params, uld_weight=uld_weight, labels=labels, ignore_index=ignore_index,
                   chunk_size=chunk_size, div_weight=1.0)


def _hybrid(student_logits: Tensor, teacher_logits: Tensor, cross: CrossTokenizerBatch, vocab: SharedVocab, *,
            divergence: str, temperature: float, params: Mapping[str, float] | None, uld_weight: float,
            labels: Tensor | None, ignore_index: int, chunk_size: int | None,
            div_weight: float) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cross_tokenizer_kd` for a caller that adds ``div_weight * div + ULD`` (the gradient
    forward computes; other uses recompute it in backward)."""
    if student_logits.shape[-1] != vocab.student_size or teacher_logits.shape[-1] != vocab.teacher_size:
        raise ValueError(
            f"the shared-vocabulary map is for {vocab.student_size} student and {vocab.teacher_size} teacher "
            f"entries, but the logits have {student_logits.shape[-1]} and {teacher_logits.shape[-1]}; build it "
            "with shared_vocab(student_tokenizer, teacher_tokenizer, student_size=..., teacher_size=...)."
        )
    chunk_size = check_int("chunk_size", chunk_size, low=1, allow_none=True)
    rows_fn = registry.get(divergence).row_fn(dict(params or {}))
    device = student_logits.device
    s_ids, t_ids = vocab.student_ids.to(device), vocab.teacher_ids.to(device)
    s_only, t_only = vocab.unshared(device) if uld_weight > 0 else (None, None)

    def piece(ls, lt, s_first, s_chain, t_first, t_chain, s_whole, t_whole):
        ms, gs = _merge(ls, s_first, s_chain, s_whole)
        mt, gt = _merge(lt, t_first, t_chain, t_whole)
        # index_select (backward: one index_add) rather than advanced indexing (accumulating index_put).
        xs = torch.cat([ms.index_select(-1, s_ids), gs.unsqueeze(-1)], -1)
        xt = torch.cat([mt.index_select(-1, t_ids), gt.unsqueeze(-1)], -1)
        div = rows_fn(xs, xt, None).sum()
        if s_only is None:
            return div, ms.new_zeros(())
        return div, _SortedL1.apply(ms.index_select(-1, s_only).exp(), mt.index_select(-1, t_only).exp()).sum()

    plan = _plan(cross, labels, ignore_index, vocab)
    job = _Job(plan, piece, float(temperature), chunk_size, chained=True,
               weights=(float(div_weight), float(uld_weight) if s_only is not None else 0.0))
    div, rest = _walk(job, student_logits, teacher_logits)
    return div, rest * uld_weight, torch.tensor(plan.size, device=device)


def _reference_uld(student_logits: Tensor, teacher_logits: Tensor, cross: CrossTokenizerBatch, *, temperature: float = 1.0,
        labels: Tensor | None = None, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """:func:`uld` written directly on full tensors (the formulation it is tested against); the same
    arguments and returns, without ``chunk_size``.
    """
    ls, lt = _log_probs(student_logits, temperature), _log_probs(teacher_logits.detach(), temperature)
    b, s, t = group_heads(cross, ls, lt, labels, ignore_index)
    rows = _sorted_l1(ls[b, s.position].exp(), lt[b, t.position].exp())
    return rows.sum(), torch.tensor(b.numel(), device=rows.device)


def _reference_cross_tokenizer_kd(student_logits: Tensor, teacher_logits: Tensor, cross: CrossTokenizerBatch,
                       vocab: SharedVocab, *, divergence: str = "forward_kl", temperature: float = 1.0,
                       params: Mapping[str, float] | None = None, uld_weight: float = 1.0,
                       labels: Tensor | None = None, ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """:func:`cross_tokenizer_kd` written directly on full tensors: a log-softmax of every position, the
    head rows gathered at once (the formulation it is tested and benchmarked against); the same
    arguments and returns, without ``chunk_size``.
    """
    if student_logits.shape[-1] != vocab.student_size or teacher_logits.shape[-1] != vocab.teacher_size:
        raise ValueError(
            f"the shared-vocabulary map is for {vocab.student_size} student and {vocab.teacher_size} teacher "
            f"entries, but the logits have {student_logits.shape[-1]} and {teacher_logits.shape[-1]}; build it "
            "with shared_vocab(student_tokenizer, teacher_tokenizer, student_size=..., teacher_size=...)."
        )
    rows_fn = registry.get(divergence).row_fn(dict(params or {}))
    ls, lt = _log_probs(student_logits, temperature), _log_probs(teacher_logits.detach(), temperature)
    b, s, t = group_heads(cross, ls, lt, labels, ignore_index, vocab)
    ms, gs = _merge(ls[b, s.position], s.first, s.chain, s.whole)
    mt, gt = _merge(lt[b, t.position], t.first, t.chain, t.whole)
    device = ms.device
    s_ids, t_ids = vocab.student_ids.to(device), vocab.teacher_ids.to(device)
    # index_select (backward: one index_add) rather than advanced indexing (accumulating index_put).
    xs = torch.cat([ms.index_select(-1, s_ids), gs.unsqueeze(-1)], -1)
    xt = torch.cat([mt.index_select(-1, t_ids), gt.unsqueeze(-1)], -1)
    div = rows_fn(xs, xt, None).sum() if xs.shape[0] else ms.new_zeros(())
    if uld_weight > 0:
        s_only, t_only = vocab.unshared(device)
        rest = _sorted_l1(ms.index_select(-1, s_only).exp(), mt.index_select(-1, t_only).exp()).sum()
    else:
        rest = ms.new_zeros(())
    return div, rest * uld_weight, torch.tensor(b.numel(), device=device)


def cross_tokenizer_batch(batch: Any, terms: Mapping[str, LossTerm]) -> bool:
    """Whether ``batch`` carries the teacher's own tokenization (``teacher_input_ids``).

    Raises:
        ValueError: a cross-tokenizer batch and a term that compares with the teacher position by
            position (``LogitKD``): its logits are in the teacher's tokens, not the student's.
    """
    if not has_teacher_tokens(batch):
        return False
    same = [name for name, t in terms.items() if t.requires_teacher and not getattr(t, "cross_tokenizer", False)]
    if same:
        raise ValueError(
            f"the batch has the teacher's own tokens (teacher_input_ids), but the loss terms {same} compare "
            "student and teacher position by position in one vocabulary; use a cross-tokenizer term "
            "(loss=cross_tokenizer: CrossTokenizerKD, or loss=uld: ULDLoss)."
        )
    return True


def attach_tokenizers(terms: Any, datamodule: Any) -> None:
    """Give the cross-tokenizer terms the datamodule's ``tokenizer`` and ``teacher_tokenizer``
    (the module calls this when the Trainer sets up)."""
    student = getattr(datamodule, "tokenizer", None) if datamodule is not None else None
    teacher = getattr(datamodule, "teacher_tokenizer", None) if datamodule is not None else None
    for term in terms:
        attach = getattr(term, "attach_tokenizers", None)
        if callable(attach) and (student is not None or teacher is not None):
            attach(student, teacher)


def _teacher_logits(inputs: LossInputs, who: str) -> Tensor:
    teacher = inputs.teacher
    if teacher is None or teacher.logits is None:
        raise RuntimeError(
            f"{who} needs the teacher's logits over its own tokens, but this batch has none: pass teacher=... "
            "to DistillationModule, or fill the batches from a dense TeacherCache built with this data."
        )
    return teacher.logits


class ULDLoss(LossTerm):
    """Universal Logit Distillation (Boizard et al. 2024) between models with different tokenizers.

    At each aligned group head (:mod:`lightning_distill.losses.cross_tokenizer`), the L1 distance
    between the student's and the teacher's probability vectors sorted in decreasing order, the
    shorter one padded with zeros to the larger vocabulary. Needs cross-tokenizer batches.

    Args:
        temperature: both distributions from ``logits / temperature``.
        weight: multiplier in the total loss.
        chunk_size: group heads per chunk of the memory-bounded computation (default: auto).

    Raises:
        ValueError: a temperature <= 0, a negative weight or a ``chunk_size`` below 1.
        TypeError: a temperature, weight or ``chunk_size`` that is not a number.

    Example:
        >>> ULDLoss(temperature=1.0, weight=0.5)
        ULDLoss(temperature=1.0, weight=0.5)
    """

    requires_teacher = True
    cross_tokenizer = True

    def __init__(self, temperature: float = 1.0, weight: float = 1.0, chunk_size: int | None = None) -> None:
        super().__init__(weight)
        self.temperature = temperature
        self.chunk_size = check_int("chunk_size", chunk_size, low=1, allow_none=True)

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_number("temperature", value, low=0.0, low_open=True)

    def forward(self, inputs: LossInputs) -> Tensor:
        cross = CrossTokenizerBatch.from_batch(inputs.batch)
        teacher = _teacher_logits(inputs, "ULDLoss")
        total, _ = uld(inputs.student_logits, teacher, cross, temperature=self.temperature, labels=inputs.labels,
                       ignore_index=inputs.ignore_index, chunk_size=self.chunk_size)
        return total

    def config(self) -> dict[str, Any]:
        return {**super().config(), "temperature": self.temperature}

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, weight={self.weight}"


class CrossTokenizerKD(LogitKD):
    """Hybrid cross-tokenizer logit distillation: a registry divergence over the shared vocabulary
    with merged group probabilities, plus ULD over the entries of one vocabulary only.

    See :mod:`lightning_distill.losses.cross_tokenizer` for the scheme. The shared-vocabulary map
    comes from ``student_tokenizer``/``teacher_tokenizer`` or, when they are not given, from the
    datamodule (its ``tokenizer`` and ``teacher_tokenizer``) when the Trainer sets up.

    Args:
        divergence: a registry divergence except ``logit_mse`` (default ``forward_kl``).
        temperature: both distributions from ``logits / temperature``.
        weight: multiplier in the total loss.
        scale_by_t2: multiply the divergence part by ``temperature**2``.
        beta: ``generalized_jsd``'s mixture weight.
        alpha: ``skew_*_kl``'s skew.
        chunk_size: groups per chunk of the memory-bounded computation (default: auto, about
            2 MiB per temporary); the value and gradient do not depend on it.
        uld_weight: weight of the ULD part (entries of one vocabulary only), ``>= 0``.
        student_tokenizer: the student's tokenizer (object, or a name/path for ``AutoTokenizer``).
        teacher_tokenizer: the teacher's.

    Raises:
        ValueError: ``logit_mse``, or what ``LogitKD`` refuses; a negative ``uld_weight``.
        TypeError: a non-number ``uld_weight``.

    Example:
        >>> CrossTokenizerKD("forward_kl", temperature=1.0, uld_weight=1.0)
        CrossTokenizerKD(divergence='forward_kl', temperature=1.0, weight=1.0, scale_by_t2=True, uld_weight=1.0)
    """

    cross_tokenizer = True

    def __init__(self, divergence: str = "forward_kl", temperature: float = 1.0, weight: float = 1.0,
                 scale_by_t2: bool = True, beta: float | None = None, alpha: float | None = None,
                 chunk_size: int | None = None, uld_weight: float = 1.0, student_tokenizer: Any = None,
                 teacher_tokenizer: Any = None) -> None:
        if divergence == "logit_mse":
            raise ValueError("divergence='logit_mse' compares raw logits, which mean nothing across two "
                             "vocabularies; use forward_kl (or another distribution divergence).")
        super().__init__(divergence, temperature, weight, scale_by_t2, beta, alpha, chunk_size)
        self.uld_weight = check_number("uld_weight", uld_weight, low=0.0)
        self._tokenizers = (student_tokenizer, teacher_tokenizer)
        self._vocab: SharedVocab | None = None

    def attach_tokenizers(self, student_tokenizer: Any = None, teacher_tokenizer: Any = None) -> None:
        """Set the tokenizers the shared-vocabulary map is built from (those given at construction win).

        The module calls this at setup with the datamodule's ``tokenizer`` and ``teacher_tokenizer``.
        """
        given = self._tokenizers
        self._tokenizers = (given[0] if given[0] is not None else student_tokenizer,
                            given[1] if given[1] is not None else teacher_tokenizer)
        self._vocab = None

    def shared_vocab(self, student_size: int, teacher_size: int) -> SharedVocab:
        """The shared-vocabulary map for these output sizes (built once).

        Raises:
            RuntimeError: no tokenizers were given or attached.
        """
        vocab = self._vocab
        if vocab is not None and (vocab.student_size, vocab.teacher_size) == (student_size, teacher_size):
            return vocab
        student, teacher = (_load_tokenizer(t) for t in self._tokenizers)
        if student is None or teacher is None:
            raise RuntimeError(
                "CrossTokenizerKD needs both tokenizers to know which entries the vocabularies share: pass "
                "student_tokenizer=... and teacher_tokenizer=..., or train with a datamodule that has "
                "tokenizer and teacher_tokenizer (CrossTokenizerDataModule, or TextDataModule(teacher_tokenizer=...))."
            )
        self._vocab = shared_vocab(student, teacher, student_size=student_size, teacher_size=teacher_size)
        return self._vocab

    def forward(self, inputs: LossInputs) -> Tensor:
        cross = CrossTokenizerBatch.from_batch(inputs.batch)
        teacher = _teacher_logits(inputs, "CrossTokenizerKD")
        vocab = self.shared_vocab(inputs.student_logits.shape[-1], teacher.shape[-1])
        div, rest, _ = _hybrid(
            inputs.student_logits, teacher, cross, vocab,
            divergence=self.divergence, temperature=self.temperature, params=self.params,
            uld_weight=self.uld_weight, labels=inputs.labels, ignore_index=inputs.ignore_index,
            chunk_size=self.chunk_size, div_weight=self.temperature**2 if self.scale_by_t2 else 1.0)
        if self.scale_by_t2:
            div = div * (self.temperature**2)
        return div + rest

    def config(self) -> dict[str, Any]:
        return {**super().config(), "uld_weight": self.uld_weight}

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, uld_weight={self.uld_weight}"


def _load_tokenizer(value: Any) -> Any:
    if value is None or not isinstance(value, str):
        return value
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(value)
