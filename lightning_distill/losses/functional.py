"""Divergences between student and teacher logits, as pure functions.

Every function here takes logits of shape ``(..., V)`` (the vocabulary, or the classes, last),
divides both by ``temperature``, and returns the divergence summed over the vocabulary and
averaged over the positions that are not masked. Masking comes from ``labels``: a position
whose label equals ``ignore_index`` (``-100``, as in transformers) counts for nothing.

``reduction`` picks what comes back:

* ``"mean"`` (default): a scalar, the sum over unmasked positions divided by their number;
* ``"sum_and_count"``: ``(sum, count)``, so a caller can divide by the number of valid
  positions in a whole optimizer step (gradient accumulation, several ranks);
* ``"none"``: the per-position values, shape ``(...)``, with masked positions set to zero.

P is the teacher's distribution, Q the student's. The teacher is a constant: no gradient
flows into ``teacher_logits``.

Memory. When the student's logits need a gradient, the functions never hold the whole
``(N, V)`` graph of intermediate tensors: they walk the positions in chunks, compute each
chunk's gradient right away, and keep only that gradient (the size of the student's logits,
which backward needs anyway). Peak working memory for forward + backward is about 1.1x the
student-logits gradient, where a plain ``F.kl_div(log_softmax(s), log_softmax(t))`` takes about
5x (V=32000, 8192 positions; see ``benchmarks/kd_loss_memory.py``).

Sparse teacher targets. A teacher cache may keep only a few ids per position
(:class:`~lightning_distill.types.SparseTargets`: top-k with the tail's mass, or sampled ids with
counts). The ``sparse_*`` divergences take those in place of teacher logits, with the same
keywords: they compare the two distributions coarse-grained onto the K ids plus one "rest"
bucket (:func:`sparse_target_logprobs` gives the teacher's side and documents each kind's
estimate). :func:`sparse_divergence` looks them up by the dense name.
:func:`fused_forward_kl_and_ce` computes forward KL and cross-entropy in one pass over the
student's logits (dense or sparse teacher).

Where the code lives (this module re-exports the public names):

* :mod:`~lightning_distill.losses.registry`: the divergences, one entry each (formula,
  gradient, parameter, sparse form); the public functions are made from it;
* :mod:`~lightning_distill.losses.formulas`: the per-row formulas and closed-form gradients;
* :mod:`~lightning_distill.losses.chunking`: the chunk engine and its autograd function;
* :mod:`~lightning_distill.losses.dense`, :mod:`~lightning_distill.losses.sparse` (with
  :mod:`~lightning_distill.losses.sparse_targets`), :mod:`~lightning_distill.losses.fused`.
"""

from __future__ import annotations

from lightning_distill.losses.chunking import Reduction
from lightning_distill.losses.dense import (
    DIVERGENCES,
    cross_entropy,
    divergence,
    is_top1,
    top1_agreement,
)
from lightning_distill.losses.fused import fused_forward_kl_and_ce
from lightning_distill.losses.sparse import SPARSE_DIVERGENCES, sparse_divergence
from lightning_distill.losses.sparse_targets import sparse_target_logprobs

# One public function per registry entry (dense), and per entry with a sparse form (sparse_*).
globals().update(DIVERGENCES)
globals().update({f"sparse_{name}": fn for name, fn in SPARSE_DIVERGENCES.items()})

__all__ = [
    "DIVERGENCES",
    "SPARSE_DIVERGENCES",
    "Reduction",
    "cross_entropy",
    "divergence",
    "fused_forward_kl_and_ce",
    "is_top1",
    "sparse_divergence",
    "sparse_target_logprobs",
    "top1_agreement",
]
__all__ += [*DIVERGENCES, *(f"sparse_{name}" for name in SPARSE_DIVERGENCES)]
