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
  (it started like the group but went on otherwise). The entries whose token strings exist in
  both vocabularies (:func:`~lightning_distill.crosstok.vocab.shared_vocab`) plus the group
  entry are renormalised and compared with a registry divergence at the term's temperature
  (times T², as :class:`~lightning_distill.losses.LogitKD`); the entries of one vocabulary only
  are compared by ULD (sorted, unnormalised, ``uld_weight``).

With identical tokenizers every group is one token on each side, every entry is shared and the
chain is 1, so the hybrid equals :class:`~lightning_distill.losses.LogitKD` with the same
divergence and temperature exactly (the group entry is the first token's probability moved to
another index; its old index holds 0 on both sides, which no divergence counts), and the ULD part
is zero.

Both terms return sums over the groups with a head (and a label there that is not
``ignore_index``); the module divides by the student's label positions, as for every term.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

from lightning_distill.crosstok.vocab import SharedVocab, shared_vocab
from lightning_distill.losses import registry
from lightning_distill.losses.terms import LogitKD, LossTerm
from lightning_distill.types import LossInputs
from lightning_distill.validation import check_number

__all__ = ["CROSS_BATCH_KEYS", "CrossTokenizerBatch", "CrossTokenizerKD", "ULDLoss", "attach_tokenizers",
           "cross_tokenizer_batch", "cross_tokenizer_kd", "group_heads", "uld"]

#: The batch keys of a cross-tokenizer batch (besides the student's ``input_ids``/``labels``).
CROSS_BATCH_KEYS = ("teacher_input_ids", "teacher_attention_mask", "teacher_labels", "student_groups",
                    "teacher_groups")
_LOG_FLOOR = torch.finfo(torch.float32).min  # log 0 without -inf (no NaN in sums or gradients)


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
    """Per side, per group (flattened over the batch): head position, first token, chain log-prob."""

    position: Tensor
    first: Tensor
    chain: Tensor


def _side(groups: Tensor, ids: Tensor, logp: Tensor, num_groups: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``(has_head, head_position, first_token, chain_logprob)``, each ``(B, num_groups)``."""
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
    chain = torch.zeros(b_size, num_groups, dtype=logp.dtype, device=logp.device)
    b, j = inner.nonzero(as_tuple=True)
    if b.numel():
        values = logp[b, j - 1].gather(-1, ids[b, j].unsqueeze(-1)).squeeze(-1)
        chain = chain.index_put((b, groups[b, j]), values, accumulate=True)
    return has, position, first, chain


def group_heads(cross: CrossTokenizerBatch, student_logp: Tensor, teacher_logp: Tensor,
                labels: Tensor | None = None, ignore_index: int = -100) -> tuple[Tensor, _Heads, _Heads]:
    """The groups both sides can be compared at, with each side's head and chained probability.

    Args:
        cross: the batch's tokenizations.
        student_logp: ``(B, Ts, Vs)`` the student's log-probabilities.
        teacher_logp: ``(B, Tt, Vt)`` the teacher's.
        labels: the student's aligned labels ``(B, Ts)``: a group whose head has ``ignore_index``
            there is skipped; ``None``: none skipped.
        ignore_index: the mask value in ``labels``.

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
    return b, _Heads(s_pos[b, g], s_first[b, g], s_chain[b, g]), _Heads(t_pos[b, g], t_first[b, g], t_chain[b, g])


def _log1mexp(x: Tensor) -> Tensor:
    """``log(1 - exp(x))`` for ``x <= 0``; the floor (log 0) at ``x == 0``, with finite gradients."""
    zero = x >= 0
    safe = torch.where(zero, torch.full_like(x, -1.0), x)
    value = torch.where(safe > -0.6931471805599453, torch.log(-torch.expm1(safe)), torch.log1p(-torch.exp(safe)))
    return torch.where(zero, torch.full_like(x, _LOG_FLOOR), value)


def _merge(head: Tensor, first: Tensor, chain: Tensor) -> tuple[Tensor, Tensor]:
    """The head distribution with the group's mass moved out of the first token's entry:
    ``(entries with p(first) * (1 - chain) at first, log p(group) = log p(first) + chain)``."""
    lp_first = head.gather(-1, first.unsqueeze(-1)).squeeze(-1)
    tail = lp_first + _log1mexp(chain)
    return head.scatter(-1, first.unsqueeze(-1), tail.unsqueeze(-1)), lp_first + chain


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


def uld(student_logits: Tensor, teacher_logits: Tensor, cross: CrossTokenizerBatch, *, temperature: float = 1.0,
        labels: Tensor | None = None, ignore_index: int = -100) -> tuple[Tensor, Tensor]:
    """Universal Logit Distillation at the group heads: ``sum |sort(p) - sort(q)|``.

    Args:
        student_logits: ``(B, Ts, Vs)``.
        teacher_logits: ``(B, Tt, Vt)`` (no gradient flows into them).
        cross: the batch's tokenizations and alignment.
        temperature: both distributions from ``logits / temperature``.
        labels: the student's aligned labels (groups with ``ignore_index`` at the head are skipped).
        ignore_index: the mask value.

    Returns:
        ``(sum over compared groups, number of compared groups)``.
    """
    ls, lt = _log_probs(student_logits, temperature), _log_probs(teacher_logits.detach(), temperature)
    b, s, t = group_heads(cross, ls, lt, labels, ignore_index)
    rows = _sorted_l1(ls[b, s.position].exp(), lt[b, t.position].exp())
    return rows.sum(), torch.tensor(b.numel(), device=rows.device)


def cross_tokenizer_kd(student_logits: Tensor, teacher_logits: Tensor, cross: CrossTokenizerBatch,
                       vocab: SharedVocab, *, divergence: str = "forward_kl", temperature: float = 1.0,
                       params: Mapping[str, float] | None = None, uld_weight: float = 1.0,
                       labels: Tensor | None = None, ignore_index: int = -100) -> tuple[Tensor, Tensor, Tensor]:
    """The hybrid cross-tokenizer loss (see the module docstring), without the T² factor.

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

    Returns:
        ``(divergence sum, ULD sum, number of compared groups)``.
    """
    if student_logits.shape[-1] != vocab.student_size or teacher_logits.shape[-1] != vocab.teacher_size:
        raise ValueError(
            f"the shared-vocabulary map is for {vocab.student_size} student and {vocab.teacher_size} teacher "
            f"entries, but the logits have {student_logits.shape[-1]} and {teacher_logits.shape[-1]}; build it "
            "with shared_vocab(student_tokenizer, teacher_tokenizer, student_size=..., teacher_size=...)."
        )
    rows_fn = registry.get(divergence).row_fn(dict(params or {}))
    ls, lt = _log_probs(student_logits, temperature), _log_probs(teacher_logits.detach(), temperature)
    b, s, t = group_heads(cross, ls, lt, labels, ignore_index)
    ms, gs = _merge(ls[b, s.position], s.first, s.chain)
    mt, gt = _merge(lt[b, t.position], t.first, t.chain)
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
    if not (isinstance(batch, Mapping) and batch.get("teacher_input_ids") is not None):
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

    Raises:
        ValueError: a temperature <= 0 or a negative weight.
        TypeError: a temperature or weight that is not a number.

    Example:
        >>> ULDLoss(temperature=1.0, weight=0.5)
        ULDLoss(temperature=1.0, weight=0.5)
    """

    requires_teacher = True
    cross_tokenizer = True

    def __init__(self, temperature: float = 1.0, weight: float = 1.0) -> None:
        super().__init__(weight)
        self.temperature = temperature

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_number("temperature", value, low=0.0, low_open=True)

    def forward(self, inputs: LossInputs) -> Tensor:
        cross = CrossTokenizerBatch.from_batch(inputs.batch)
        teacher = _teacher_logits(inputs, "ULDLoss")
        total, _ = uld(inputs.student_logits, teacher, cross,
                       temperature=self.temperature, labels=inputs.labels, ignore_index=inputs.ignore_index)
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
        chunk_size: accepted for config symmetry with ``LogitKD``; unused.
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
        div, rest, _ = cross_tokenizer_kd(
            inputs.student_logits, teacher, cross, vocab,
            divergence=self.divergence, temperature=self.temperature, params=self.params,
            uld_weight=self.uld_weight, labels=inputs.labels, ignore_index=inputs.ignore_index)
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
