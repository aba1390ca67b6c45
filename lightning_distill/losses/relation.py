"""Relation-based and embedding distillation: the student copies the geometry of the teacher's embeddings.

Embedding and retrieval models are judged by how their outputs relate to each other, not by a
next-token distribution. These terms read ``(B, D)`` embeddings, one per sample (the module's
output function makes them, e.g. :class:`~lightning_distill.models.pooling.Pooling`):

* :func:`rkd_distance` / :class:`RKDDistance` (Park et al. 2019): the pairwise distances of the
  batch, each divided by their mean, compared with the smooth-L1 (Huber) loss;
* :func:`rkd_angle` / :class:`RKDAngle` (Park et al. 2019): the angles formed by every triplet
  (cosines between the unit difference vectors), smooth-L1;
* :func:`similarity_preserving` / :class:`SimilarityPreserving` (Tung & Mori 2019): the batch's
  Gram matrices with L2-normalised rows, squared Frobenius distance / b²;
* :class:`EmbeddingKD`: MSE or cosine distance between the student's embeddings (through a learned
  linear projector when the widths differ) and the teacher's.

The relation functions compare shapes only, never coordinates, so student and teacher may have
different widths, and they are invariant to a scale (all three) and a translation (distance,
angle) of either side. Each returns the batch's mean value; the terms return it times the batch
size (a sum over samples, as every term returns a sum), and the module divides by the samples of
the whole optimizer step, so the trained value is the batch mean averaged over micro-batches.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightning_distill.losses.terms import LossTerm
from lightning_distill.types import LossInputs
from lightning_distill.validation import check_choice, check_int, check_number

__all__ = ["EmbeddingKD", "RKDAngle", "RKDDistance", "SimilarityPreserving", "embedding_pair",
           "rkd_angle", "rkd_distance", "similarity_preserving"]

_PROJECTOR_EXPORT = ("drop", "save")


def _check_pair(student: Tensor, teacher: Tensor) -> None:
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(
            f"relation losses need (batch, width) embeddings of the same samples, got student "
            f"{tuple(student.shape)} and teacher {tuple(teacher.shape)}; pool token states into one "
            "vector per sample (student_logits_fn=Pooling(), teacher_logits_fn=Pooling())."
        )


def _pair_distances(x: Tensor) -> Tensor:
    """Euclidean distances of the pairs ``i < j`` (float32 or wider), ``(B(B-1)/2,)``."""
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    return (x[i] - x[j]).norm(dim=-1)


def rkd_distance(student: Tensor, teacher: Tensor, *, delta: float = 1.0) -> Tensor:
    """RKD distance loss: smooth-L1 between the mean-normalised pairwise distances.

    ``d_ij = ||x_i - x_j||`` over the pairs ``i < j``, divided by their mean; the loss is the mean
    over pairs of ``huber_delta(d_s / mean(d_s), d_t / mean(d_t))``. Zero when the student is a
    scaled (and translated, rotated) copy of the teacher. A batch of one sample has no pair: 0.

    Args:
        student: ``(B, Ds)`` the student's embeddings.
        teacher: ``(B, Dt)`` the teacher's embeddings of the same samples (no gradient is taken).
        delta: the Huber threshold (smooth-L1 ``beta``).

    Raises:
        ValueError: shapes that are not (B, D) pairs over the same samples.
    """
    _check_pair(student, teacher)
    if student.shape[0] < 2:
        return student.float().sum() * 0.0
    ds = _pair_distances(student.float())
    with torch.no_grad():
        dt = _pair_distances(teacher.float())
        dt = dt / dt.mean().clamp_min(1e-12)
    ds = ds / ds.mean().clamp_min(1e-12)
    return F.smooth_l1_loss(ds, dt, beta=delta)


def _triplet_cosines(x: Tensor) -> Tensor:
    """``cos`` of the angle at vertex ``j`` between ``i`` and ``k`` for every ordered triplet of
    distinct ``i, j, k``: ``<e_ji, e_jk>`` with ``e_ji = (x_i - x_j) / ||x_i - x_j||``."""
    diff = F.normalize(x.unsqueeze(0) - x.unsqueeze(1), dim=-1)  # [j, i] = unit(x_i - x_j)
    cos = diff @ diff.transpose(1, 2)  # [j, i, k]
    n = x.shape[0]
    eye = torch.eye(n, dtype=torch.bool, device=x.device)
    distinct = ~(eye.unsqueeze(2) | eye.unsqueeze(1) | eye.unsqueeze(0))  # j != i, j != k, i != k
    return cos[distinct]


def rkd_angle(student: Tensor, teacher: Tensor, *, delta: float = 1.0) -> Tensor:
    """RKD angle loss: smooth-L1 between the cosines of the angles every triplet of samples forms.

    Zero when the student is a scaled, translated or rotated copy of the teacher. Fewer than three
    samples form no triplet: 0. Memory grows as ``B³``: keep batches to a few hundred samples.

    Args:
        student: ``(B, Ds)`` the student's embeddings.
        teacher: ``(B, Dt)`` the teacher's embeddings of the same samples (no gradient is taken).
        delta: the Huber threshold (smooth-L1 ``beta``).

    Raises:
        ValueError: shapes that are not (B, D) pairs over the same samples.
    """
    _check_pair(student, teacher)
    if student.shape[0] < 3:
        return student.float().sum() * 0.0
    with torch.no_grad():
        ct = _triplet_cosines(teacher.float())
    return F.smooth_l1_loss(_triplet_cosines(student.float()), ct, beta=delta)


def _row_normalised_gram(x: Tensor) -> Tensor:
    return F.normalize(x @ x.T, dim=1)


def similarity_preserving(student: Tensor, teacher: Tensor) -> Tensor:
    """Similarity-preserving loss (Tung & Mori 2019): ``||G̃_s - G̃_t||_F² / B²``, where ``G = X Xᵀ``
    and ``G̃`` is ``G`` with each row divided by its L2 norm.

    Zero when the student is a scaled (or rotated) copy of the teacher.

    Args:
        student: ``(B, Ds)`` the student's embeddings (flatten feature maps first).
        teacher: ``(B, Dt)`` the teacher's embeddings of the same samples (no gradient is taken).

    Raises:
        ValueError: shapes that are not (B, D) pairs over the same samples.
    """
    _check_pair(student, teacher)
    with torch.no_grad():
        gt = _row_normalised_gram(teacher.float())
    b = student.shape[0]
    return (_row_normalised_gram(student.float()) - gt).square().sum() / (b * b)


def embedding_pair(inputs: LossInputs, who: str) -> tuple[Tensor, Tensor]:
    """The student's and the teacher's ``(B, D)`` embeddings of a step, or a clear error.

    Raises:
        RuntimeError: the step has no embeddings (the module was not given relation terms) or no
            teacher embeddings.
    """
    student = inputs.student_embeddings
    teacher = inputs.teacher.embeddings if inputs.teacher is not None else None
    if student is None or teacher is None:
        missing = "student" if student is None else "teacher"
        raise RuntimeError(
            f"{who} needs the {missing}'s (batch, width) embeddings, but this step has none: give "
            "DistillationModule a teacher and an output function that pools them (student_logits_fn=Pooling(), "
            "teacher_logits_fn=Pooling())."
        )
    _check_pair(student, teacher)
    return student, teacher


class _RelationTerm(LossTerm):
    """A term over a batch of embeddings: its batch mean times the batch size (a sum over samples)."""

    requires_teacher = True
    reads_embeddings = True

    def _value(self, student: Tensor, teacher: Tensor) -> Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def forward(self, inputs: LossInputs) -> Tensor:
        student, teacher = embedding_pair(inputs, type(self).__name__)
        return self._value(student, teacher) * student.shape[0]

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "type")


class RKDDistance(_RelationTerm):
    """Relational KD, distance-wise (Park et al. 2019): :func:`rkd_distance` over the batch.

    Args:
        weight: multiplier in the total loss.
        delta: the Huber threshold, ``> 0``.

    Raises:
        ValueError: a negative weight or ``delta <= 0``.
        TypeError: a weight or ``delta`` that is not a number.

    Example:
        >>> RKDDistance(weight=1.0)
        RKDDistance(weight=1.0, delta=1.0)
    """

    def __init__(self, weight: float = 1.0, delta: float = 1.0) -> None:
        super().__init__(weight)
        self.delta = check_number("delta", delta, low=0.0, low_open=True)

    def _value(self, student: Tensor, teacher: Tensor) -> Tensor:
        return rkd_distance(student, teacher, delta=self.delta)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "delta": self.delta}


class RKDAngle(_RelationTerm):
    """Relational KD, angle-wise (Park et al. 2019): :func:`rkd_angle` over the batch (``B³`` memory).

    Args:
        weight: multiplier in the total loss (the paper uses twice the distance term's weight).
        delta: the Huber threshold, ``> 0``.

    Raises:
        ValueError: a negative weight or ``delta <= 0``.
        TypeError: a weight or ``delta`` that is not a number.
    """

    def __init__(self, weight: float = 2.0, delta: float = 1.0) -> None:
        super().__init__(weight)
        self.delta = check_number("delta", delta, low=0.0, low_open=True)

    def _value(self, student: Tensor, teacher: Tensor) -> Tensor:
        return rkd_angle(student, teacher, delta=self.delta)

    def config(self) -> dict[str, Any]:
        return {**super().config(), "delta": self.delta}


class SimilarityPreserving(_RelationTerm):
    """Similarity-preserving KD (Tung & Mori 2019): :func:`similarity_preserving` over the batch.

    Args:
        weight: multiplier in the total loss.

    Raises:
        ValueError: a negative weight.
        TypeError: a weight that is not a number.
    """

    def _value(self, student: Tensor, teacher: Tensor) -> Tensor:
        return similarity_preserving(student, teacher)


class EmbeddingKD(LossTerm):
    """Embedding distillation: the student's embedding of each sample against the teacher's.

    Per sample, ``mse`` is the mean over the teacher's width of ``(P s - t)²`` and ``cosine`` is
    ``1 - cos(P s, t)``, where ``P`` is a learned linear projector from the student's width to
    the teacher's (no bias) when the widths differ, else the identity. The projector is a
    parameter of this term, so it trains with the student (the module's optimizer takes the
    terms' parameters) and is saved in checkpoints; at export it is dropped (``projector_export="drop"``,
    the student alone is the product) or written beside the student as
    ``<term name>_projector.safetensors`` (``projector_export="save"``, to map student embeddings into
    the teacher's space), as ``FeatureKD``'s projector (:meth:`export_modules`).

    Args:
        loss: ``"mse"`` or ``"cosine"``.
        weight: multiplier in the total loss.
        student_dim: the student's embedding width; with ``teacher_dim``, a projector is built when
            they differ. ``None``: read from the student's config (``hidden_size``) when the module
            binds the term; no width known at all: the widths must be equal.
        teacher_dim: the teacher's embedding width (``None``: likewise from the teacher).
        projector_export: ``"drop"`` or ``"save"``: what export does with the projector.

    Raises:
        ValueError: an unknown ``loss`` or ``projector``, a width < 1; at bind, one width known and the
            other not readable from its model.
        TypeError: a width that is not an int.

    Example:
        >>> EmbeddingKD("cosine", student_dim=32, teacher_dim=64).projector_layer
        Linear(in_features=32, out_features=64, bias=False)
    """

    requires_teacher = True
    reads_embeddings = True

    def __init__(self, loss: str = "mse", weight: float = 1.0, student_dim: int | None = None,
                 teacher_dim: int | None = None, projector_export: str = "drop") -> None:
        super().__init__(weight)
        self.loss = check_choice("loss", loss, ("mse", "cosine"))
        self.student_dim = check_int("student_dim", student_dim, low=1, allow_none=True)
        self.teacher_dim = check_int("teacher_dim", teacher_dim, low=1, allow_none=True)
        self.projector_export = check_choice("projector_export", projector_export, _PROJECTOR_EXPORT)
        self.projector_layer: nn.Linear | None = None
        self._make_projector()

    def _make_projector(self) -> None:
        if self.student_dim is not None and self.teacher_dim is not None and self.student_dim != self.teacher_dim:
            shape = (self.student_dim, self.teacher_dim)
            if self.projector_layer is None or (self.projector_layer.in_features,
                                                self.projector_layer.out_features) != shape:
                self.projector_layer = nn.Linear(*shape, bias=False)

    def bind(self, student: nn.Module, teacher: nn.Module | None) -> None:
        """A width left out is read from its Hugging Face model's config (``hidden_size``: the width of
        mean/CLS-pooled token states); the projector is built when the widths then differ.

        Raises:
            ValueError: one width is known and the other cannot be read from its model.
        """
        from lightning_distill.models.features import hidden_width

        ds = self.student_dim if self.student_dim is not None else hidden_width(student)
        dt = self.teacher_dim if self.teacher_dim is not None else (
            hidden_width(teacher) if teacher is not None else None)
        if (self.student_dim, self.teacher_dim) == (None, None) and (ds is None or dt is None):
            return  # no width known: the embeddings must be equally wide (checked per step)
        if ds is None or dt is None:
            raise ValueError(f"EmbeddingKD got student_dim={ds} and teacher_dim={dt}, and the missing width "
                             "cannot be read from its model (no Hugging Face hidden_size); give both widths (a "
                             "projector is built when they differ), or neither (equal widths).")
        self.student_dim, self.teacher_dim = ds, dt
        self._make_projector()

    def forward(self, inputs: LossInputs) -> Tensor:
        student, teacher = embedding_pair(inputs, "EmbeddingKD")
        ds, dt = student.shape[-1], teacher.shape[-1]
        if self.student_dim is not None and (ds, dt) != (self.student_dim, self.teacher_dim):
            raise ValueError(f"EmbeddingKD was built for widths student_dim={self.student_dim}, teacher_dim="
                             f"{self.teacher_dim}, but the embeddings are {ds} and {dt} wide; set them to {ds} and {dt}.")
        if self.projector_layer is None and ds != dt:
            raise ValueError(f"the student's embeddings are {ds} wide and the teacher's {dt}: pass EmbeddingKD("
                             f"student_dim={ds}, teacher_dim={dt}) to learn a projector between them.")
        if self.projector_layer is not None:
            student = self.projector_layer(student.to(self.projector_layer.weight.dtype))
        s, t = student.float(), teacher.float().detach()
        if self.loss == "mse":
            return (s - t).square().mean(-1).sum()
        return (1.0 - F.cosine_similarity(s, t, dim=-1)).sum()

    def export_modules(self) -> dict[str, nn.Module]:
        keep = self.projector_layer is not None and self.projector_export == "save"
        return {"projector": self.projector_layer} if keep else {}

    def config(self) -> dict[str, Any]:
        return {**super().config(), "loss": self.loss, "student_dim": self.student_dim,
                "teacher_dim": self.teacher_dim, "projector_export": self.projector_export}

    def extra_repr(self) -> str:
        return (f"loss={self.loss!r}, weight={self.weight}, student_dim={self.student_dim}, "
                f"teacher_dim={self.teacher_dim}, projector_export={self.projector_export!r}")
