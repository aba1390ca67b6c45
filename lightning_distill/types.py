"""The values that travel along the one data path: teacher targets and loss inputs."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Literal

from torch import Tensor

__all__ = ["LossInputs", "SparseTargets", "TeacherTargets"]


@dataclass
class SparseTargets:
    """The teacher's distribution known on a few token ids per position (from a cache).

    Two kinds, as the teacher cache writes them:

    * ``"topk"``: the ``K`` most likely ids with their log-probabilities, plus the log of the
      mass outside them (``tail_logprob``), so the full distribution collapses exactly onto
      ``K + 1`` outcomes (the ids and one "rest" bucket) at temperature 1;
    * ``"sampled"`` (Sparse Logit Sampling): ``num_samples`` draws with replacement from the
      teacher's distribution at ``sample_temperature``; ``counts / num_samples`` is an unbiased
      estimate of the teacher's probabilities of the drawn ids.

    Rows hold different numbers of entries; the padding entries have ``ids == -1``.

    Attributes:
        kind: ``"topk"`` or ``"sampled"``.
        ids: ``(..., K)`` int64 token ids, ``-1`` at padding.
        logprobs: ``(..., K)`` float32 teacher log-probabilities of ``ids`` at temperature 1
            (any value at padding). ``None`` for sampled targets stored without them (exact only
            at ``sample_temperature``).
        vocab_size: the teacher's vocabulary size ``V``.
        tail_logprob: ``topk`` only: ``(...)`` float32 log of the teacher's probability mass
            outside ``ids`` at temperature 1 (``-inf`` when the ids hold all of it); ``None``
            renormalises the top-k entries (no tail signal).
        counts: ``sampled`` only: ``(..., K)`` draws per id (0 at padding).
        num_samples: ``sampled`` only: draws per position ``N``.
        sample_temperature: ``sampled`` only: temperature of the distribution the draws came from.
        entropy: ``sampled`` only: ``(...)`` the entropy of the distribution the draws came from
            (the teacher at ``sample_temperature``), which makes the reported KL an unbiased
            estimate without per-id log-probabilities.
        verified: the ids are known to be distinct per position and below ``vocab_size`` (set by
            the teacher cache, which writes them that way), so the losses skip checking them.
    """

    kind: Literal["topk", "sampled"]
    ids: Tensor
    logprobs: Tensor | None
    vocab_size: int
    tail_logprob: Tensor | None = None
    counts: Tensor | None = None
    num_samples: int | None = None
    sample_temperature: float = 1.0
    entropy: Tensor | None = None
    verified: bool = False


@dataclass
class TeacherTargets:
    """What the teacher says about a batch, whoever computed it.

    A live teacher fills ``logits`` with its dense output; a cache fills ``logits`` (dense
    kind) or ``sparse`` (top-k or sampled kinds) from disk. Loss terms read this value and
    never ask where it came from.

    Attributes:
        logits: dense teacher logits, shape ``(..., V)``, aligned with the student's logits.
        sparse: the teacher's distribution on a few ids per position (cached top-k or samples).
        label_logprobs: ``(...)`` the teacher's log-probability of each position's label
            (teacher perplexity without dense logits); ``None`` when ``logits`` give it.
        top1: ``(...)`` the teacher's most likely id per position; ``None`` when ``logits``
            (or top-k ``sparse`` ids) give it.
        hidden_states: per-layer hidden states, for feature losses: Hugging Face's
            ``hidden_states`` tuple (index 0 = embeddings) from a live teacher, or the layers a
            cache stored.
        hidden_layers: the indices into the teacher's ``hidden_states`` that ``hidden_states``
            holds, in order (a cache's ``hidden_layers``); ``None``: the whole tuple.
        attentions: the live teacher's ``attentions`` tuple (one ``(B, heads, T, T)`` per block).
        modules: ``{module path: output}`` of the live teacher's hooked modules.
        hidden_states: optional per-layer hidden states, for feature losses.
        embeddings: ``(B, D)`` the teacher's embedding of each sample (its output through an
            output function such as :class:`~lightning_distill.models.pooling.Pooling`), for
            relation and embedding terms (those that declare ``reads_embeddings``).
    """

    logits: Tensor | None = None
    sparse: SparseTargets | None = None
    label_logprobs: Tensor | None = None
    top1: Tensor | None = None
    hidden_states: tuple[Tensor, ...] | None = None
    hidden_layers: tuple[int, ...] | None = None
    attentions: tuple[Tensor, ...] | None = None
    modules: dict[str, Tensor] | None = None
    embeddings: Tensor | None = None

    @property
    def has_distribution(self) -> bool:
        """Whether these targets say something about the teacher's output distribution."""
        return self.logits is not None or self.sparse is not None


@dataclass
class LossInputs:
    """Everything a loss term may read for one micro-batch.

    Attributes:
        student_logits: ``(..., V)``; for causal LMs position ``t`` scores token ``t + 1``.
        labels: ``(...)`` targets aligned with ``student_logits``; ``ignore_index`` marks
            positions that count for nothing (padding, prompts, the last position of a
            causal LM). ``None`` when the batch has no labels: KD terms then count every
            position and a term that needs labels (``TaskLoss``) fails.
        teacher: the teacher's targets, or ``None`` when no teacher is attached.
        ignore_index: the mask value in ``labels``.
        student_output: the student's raw output, for terms that need more than logits.
        batch: the batch as the dataloader gave it.
        student_features: the student's hidden states, attentions and hooked module outputs
            (:class:`~lightning_distill.models.features.Features`) when an active term declares
            that it reads them; else ``None``.
        student_embeddings: ``(B, D)`` the student's embedding of each sample, when the terms
            read embeddings (then ``student_logits`` is the same tensor and ``labels`` is ``None``).
    """

    student_logits: Tensor
    labels: Tensor | None
    teacher: TeacherTargets | None = None
    ignore_index: int = -100
    student_output: Any = None
    batch: Any = None
    student_features: Any = None
    student_embeddings: Tensor | None = None
