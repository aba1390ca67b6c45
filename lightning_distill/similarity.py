"""How alike two embedding geometries are: pairwise cosine similarities and their rank agreement.

An embedding or retrieval model is judged by the order of its similarities (which sentence is
nearer to which), not by their values. :func:`similarity_agreement` compares a student's and a
teacher's embeddings of the same samples by the Spearman rank correlation of their pairwise cosine
similarities over all pairs ``i < j``: 1.0 means the student orders every pair as the teacher
does, whatever the widths of the two embeddings.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightning_distill.validation import check_tensor

__all__ = ["pair_cosines", "rank_with_ties", "similarity_agreement", "spearman"]


def pair_cosines(embeddings: Tensor) -> Tensor:
    """Cosine similarity of every pair ``i < j`` of the rows of ``embeddings`` ``(n, D)``, as ``(n(n-1)/2,)``."""
    x = torch.nn.functional.normalize(embeddings.double(), dim=-1)
    n = x.shape[0]
    i, j = torch.triu_indices(n, n, offset=1, device=x.device)
    return (x @ x.T)[i, j]


def rank_with_ties(values: Tensor) -> Tensor:
    """Ranks ``0 .. n-1`` of a 1-D tensor, tied values sharing the mean of their ranks (float64)."""
    order = torch.argsort(values, stable=True)
    sorted_values = values[order]
    _, inverse, counts = torch.unique_consecutive(sorted_values, return_inverse=True, return_counts=True)
    ends = torch.cumsum(counts, 0).double()
    mean_rank = ends - (counts.double() + 1) / 2  # the mean of the 0-based ranks start .. end - 1
    ranks = torch.empty_like(values, dtype=torch.float64)
    ranks[order] = mean_rank[inverse]
    return ranks


def spearman(a: Tensor, b: Tensor) -> float | None:
    """Spearman's rank correlation of two 1-D tensors of the same length (ties get mean ranks).

    ``None`` when it is undefined: fewer than 2 values, or one side constant.
    """
    if a.shape != b.shape or a.dim() != 1:
        raise ValueError(f"spearman needs two 1-D tensors of one length, got shapes {tuple(a.shape)} and "
                         f"{tuple(b.shape)}.")
    if a.numel() < 2:
        return None
    ra, rb = rank_with_ties(a), rank_with_ties(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    denom = (ra.square().sum() * rb.square().sum()).sqrt()
    if float(denom) == 0.0:
        return None
    return float((ra * rb).sum() / denom)


def similarity_agreement(student: Tensor, teacher: Tensor) -> float | None:
    """Spearman correlation of the student's and the teacher's pairwise cosine similarities.

    Args:
        student: ``(n, Ds)`` the student's embeddings of ``n`` samples.
        teacher: ``(n, Dt)`` the teacher's embeddings of the same samples, in the same order.

    Returns:
        A number in [-1, 1] (1: the student orders every pair as the teacher), or ``None`` with
        fewer than 3 samples or constant similarities.

    Raises:
        ValueError: not 2-D, or different numbers of samples.
    """
    check_tensor("student", student)
    check_tensor("teacher", teacher)
    if student.dim() != 2 or teacher.dim() != 2 or student.shape[0] != teacher.shape[0]:
        raise ValueError(f"similarity_agreement needs (n, D) embeddings of the same n samples, got shapes "
                         f"{tuple(student.shape)} and {tuple(teacher.shape)}.")
    if student.shape[0] < 3:
        return None
    return spearman(pair_cosines(student), pair_cosines(teacher))
