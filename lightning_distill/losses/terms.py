"""Loss terms: thin ``nn.Module`` wrappers over :mod:`lightning_distill.losses.functional`.

A term carries its weight (and temperature, for soft-target terms) and returns the *sum* of
its per-position values over the valid positions of a micro-batch. The module divides by the
number of valid positions in the whole optimizer step and multiplies by the weight, so every
term is normalised the same way under gradient accumulation and across ranks.

Schedules change ``weight`` and ``temperature`` between steps; terms read them at call time.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Literal

from torch import Tensor, nn

from lightning_distill.losses import functional as LF
from lightning_distill.losses import registry
from lightning_distill.types import LossInputs
from lightning_distill.validation import check_int, check_number

__all__ = ["LogitKD", "LossTerm", "TaskLoss", "check_terms", "fused_pair"]

_TERM_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_RESERVED_TERM_NAMES = frozenset({"loss", "agreement", "kl"})  # the module's own log keys


FusedRole = Literal["kd", "task"]


class LossTerm(nn.Module):
    """Base class of a named, weighted loss term.

    Subclasses implement :meth:`forward` returning a float32 scalar: the term summed over the
    valid positions of the micro-batch (not averaged). What the module needs to know about a
    term, the term declares (the module never asks for its class):

    * ``requires_teacher``: it reads teacher targets (the module then runs the teacher or reads
      the cache, and hands the term the logits over the shared vocabulary);
    * ``reads_labels``: it reads the dataset's labels as class ids of the student (the module
      checks their range on the first batch);
    * ``fused_role``: ``"kd"`` (forward KL at T = 1) or ``"task"`` (hard-label cross-entropy)
      when the term's value is exactly that half of
      :func:`~lightning_distill.losses.functional.fused_forward_kl_and_ce`; the module then
      computes a ``"kd"`` and a ``"task"`` term together, in one pass. ``None``: never fused;
    * ``no_neg_inf``: a teacher logit of ``-inf`` makes its value infinite (the module refuses
      such a teacher output);
    * ``reads_embeddings``: it reads one ``(B, D)`` embedding per sample (the output function's
      result, :mod:`lightning_distill.losses.relation`) instead of logits over a vocabulary: the
      module then passes no labels, counts samples instead of positions and skips vocabulary checks.
    * ``cross_tokenizer``: it compares a teacher with another tokenizer through the batch's
      alignment (:mod:`lightning_distill.losses.cross_tokenizer`); the module then runs the teacher
      on ``teacher_input_ids`` and skips the vocabulary-size check.

    Args:
        weight: multiplier of this term in the total loss, ``>= 0``.
    """

    requires_teacher: bool = False
    reads_labels: bool = False
    cross_tokenizer: bool = False
    #: Features it reads (:mod:`lightning_distill.models.features`): hidden-state indices (``int``,
    #: asks ``output_hidden_states``) or module paths (``str``, hooked for the forward) of each model.
    student_layers: tuple[int | str, ...] = ()
    teacher_layers: tuple[int | str, ...] = ()
    #: It reads attention probabilities (asks ``output_attentions`` of both models).
    reads_attentions: bool = False
    reads_embeddings: bool = False

    @property
    def fused_role(self) -> FusedRole | None:
        return None

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """Called by the module with its models when it is built: resolve what depends on them
        (layer counts, widths, module paths). ``teacher`` is ``None`` when targets come from a
        cache. Default: nothing."""

    def export_modules(self) -> dict[str, nn.Module]:
        """Modules trained with the student that the export saves beside it (e.g. a projector
        kept with ``projector_export="save"``). Default: none."""
        return {}

    @property
    def no_neg_inf(self) -> bool:
        return False

    def __init__(self, weight: float = 1.0) -> None:
        super().__init__()
        self.weight = weight

    @property
    def weight(self) -> float:
        return self._weight

    @weight.setter
    def weight(self, value: float) -> None:
        self._weight = check_number("weight", value, low=0.0)

    def forward(self, inputs: LossInputs) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(inputs).")

    def config(self) -> dict[str, Any]:
        """Plain values that describe this term, for checkpoints and distillation records."""
        return {"type": type(self).__name__, "weight": self.weight}


class TaskLoss(LossTerm):
    """Hard-label cross-entropy of the student against the dataset's labels.

    Args:
        weight: multiplier in the total loss.

    Example:
        >>> TaskLoss(weight=0.5)
        TaskLoss(weight=0.5)
    """

    reads_labels = True

    @property
    def fused_role(self) -> FusedRole | None:
        # A subclass that computes something else does not join the fused path.
        return "task" if type(self).forward is TaskLoss.forward else None

    def forward(self, inputs: LossInputs) -> Tensor:
        total, _ = LF.cross_entropy(
            inputs.student_logits, inputs.labels, ignore_index=inputs.ignore_index,
            reduction="sum_and_count",
        )
        return total

    def extra_repr(self) -> str:
        return f"weight={self.weight}"


class LogitKD(LossTerm):
    """Response-based distillation: a divergence between teacher and student logits.

    Args:
        divergence: a name of the divergence registry (:mod:`lightning_distill.losses.registry`):
            ``forward_kl``, ``reverse_kl``, ``generalized_jsd``, ``skew_forward_kl``,
            ``skew_reverse_kl``, ``tvd``, ``logit_mse``.
        temperature: both distributions are computed from ``logits / temperature``.
        weight: multiplier in the total loss.
        scale_by_t2: multiply by ``temperature**2`` (Hinton et al. 2015) so the gradient's
            size does not shrink as the temperature grows.
        beta: mixture weight of ``generalized_jsd``, strictly inside (0, 1).
        alpha: skew of ``skew_forward_kl`` / ``skew_reverse_kl``, in [0, 1).
        chunk_size: positions per chunk of the memory-saving computation (default: auto).

    Raises:
        ValueError: an unknown divergence, a temperature <= 0, a negative weight, or a
            ``beta``/``alpha`` outside its range or given to a divergence that has none.
        TypeError: a temperature, weight, ``beta`` or ``alpha`` that is not a number.

    Example:
        >>> LogitKD("generalized_jsd", temperature=2.0, beta=0.5)
        LogitKD(divergence='generalized_jsd', temperature=2.0, weight=1.0, scale_by_t2=True, beta=0.5)
    """

    requires_teacher = True

    def __init__(
        self,
        divergence: str = "forward_kl",
        temperature: float = 1.0,
        weight: float = 1.0,
        scale_by_t2: bool = True,
        beta: float | None = None,
        alpha: float | None = None,
        chunk_size: int | None = None,
    ) -> None:
        super().__init__(weight)
        entry = registry.get(divergence)
        self._fn = LF.divergence(divergence)
        self.divergence = divergence
        self.temperature = temperature
        self.scale_by_t2 = bool(scale_by_t2)
        self.chunk_size = check_int("chunk_size", chunk_size, low=1, allow_none=True)
        given = {k: v for k, v in (("beta", beta), ("alpha", alpha)) if v is not None}
        wanted = entry.param
        for key in given:
            if wanted is None or wanted.name != key:
                takes = f"takes {wanted.name}" if wanted else "takes neither beta nor alpha"
                raise ValueError(f"{key}={given[key]} was given, but divergence={divergence!r} {takes}.")
        # Checked now (not at the first step), by the registry entry's own range.
        self.params: dict[str, float] = entry.params(given, caller="LogitKD")

    @property
    def fused_role(self) -> FusedRole | None:
        fusable = (self.divergence == "forward_kl" and self.temperature == 1.0
                   and type(self).forward is LogitKD.forward)
        return "kd" if fusable else None

    @property
    def no_neg_inf(self) -> bool:
        return registry.get(self.divergence).no_neg_inf

    @property
    def temperature(self) -> float:
        return self._temperature

    @temperature.setter
    def temperature(self, value: float) -> None:
        self._temperature = check_number("temperature", value, low=0.0, low_open=True)

    def forward(self, inputs: LossInputs) -> Tensor:
        teacher = inputs.teacher
        if teacher is None or not teacher.has_distribution:
            raise RuntimeError(
                "LogitKD needs teacher logits, but this batch has none: pass teacher=... to "
                "DistillationModule (or attach a teacher cache), or drop the LogitKD term."
            )
        # Live or cached dense logits use the dense divergence; cached top-k / sampled targets
        # the sparse version of the same divergence (losses.functional.sparse_*).
        fn = self._fn if teacher.logits is not None else LF.sparse_divergence(self.divergence)
        target = teacher.logits if teacher.logits is not None else teacher.sparse
        total, _ = fn(
            inputs.student_logits, target, temperature=self.temperature,
            labels=inputs.labels, ignore_index=inputs.ignore_index, reduction="sum_and_count",
            chunk_size=self.chunk_size, **self.params,
        )
        if self.scale_by_t2:
            total = total * (self.temperature**2)
        return total

    def config(self) -> dict[str, Any]:
        return {**super().config(), "divergence": self.divergence, "temperature": self.temperature,
                "scale_by_t2": self.scale_by_t2, **self.params}

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self.params.items())
        return (f"divergence={self.divergence!r}, temperature={self.temperature}, weight={self.weight}, "
                f"scale_by_t2={self.scale_by_t2}{extra}")


def check_terms(losses: Mapping[str, LossTerm]) -> dict[str, LossTerm]:
    """``losses`` as a dict, checked as a module's ``{name: LossTerm}``.

    Raises:
        TypeError: ``losses`` is not a mapping, or a term is not a ``LossTerm``.
        ValueError: an empty mapping, a name that is not an identifier or is reserved, or all
            weights zero.
    """
    if not isinstance(losses, Mapping):
        raise TypeError(f"losses must be a mapping {{name: LossTerm}}, e.g. {{'kd': LogitKD()}}, got "
                        f"{type(losses).__name__}.")
    if not losses:
        raise ValueError("losses must be a non-empty mapping {name: LossTerm}, e.g. {'kd': LogitKD()}, got {}.")
    for name, term in losses.items():
        if not isinstance(name, str) or not _TERM_NAME.match(name) or name in _RESERVED_TERM_NAMES:
            raise ValueError(
                f"loss term name {name!r} is not allowed; use a Python identifier other than "
                f"{sorted(_RESERVED_TERM_NAMES)} (it becomes the log key train/<name>)."
            )
        if not isinstance(term, LossTerm):
            raise TypeError(
                f"loss term {name!r} is a {type(term).__name__}, not a LossTerm; wrap it in a "
                "LossTerm subclass (see lightning_distill.losses)."
            )
    embedding = sorted(n for n, t in losses.items() if t.reads_embeddings)
    if embedding and len(embedding) < len(losses):
        others = sorted(set(losses) - set(embedding))
        raise ValueError(f"loss terms {embedding} read (batch, width) embeddings but {others} read logits over a "
                         "vocabulary; one module's output is one or the other: use embedding terms alone.")
    if all(term.weight == 0 for term in losses.values()):
        raise ValueError(f"every loss term has weight 0 ({', '.join(losses)}); give at least one a weight > 0.")
    return dict(losses)


def fused_pair(active: Mapping[str, LossTerm], inputs: LossInputs, *, same_vocab: bool) -> tuple[str, str] | None:
    """A (``fused_role="kd"``, ``fused_role="task"``) pair of terms that can share one softmax
    (forward KL at T=1 and the task loss), if there is one.

    Args:
        active: the terms that count this step (``weight > 0``).
        inputs: the terms' inputs (a teacher distribution and labels are needed).
        same_vocab: the student's logits were not sliced to the teacher's vocabulary.
    """
    teacher = inputs.teacher
    if not same_vocab or teacher is None or not teacher.has_distribution or inputs.labels is None:
        return None
    kd = next((n for n, t in active.items() if t.fused_role == "kd"), None)
    task = next((n for n, t in active.items() if t.fused_role == "task"), None)
    return None if kd is None or task is None else (kd, task)
