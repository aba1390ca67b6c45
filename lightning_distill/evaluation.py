"""Per-slice evaluation of a student against its teacher without a Trainer: :func:`evaluate_slices`.

A student learns what the distillation data covered. Scoring it per slice of held-out data
(prose, code, ...) against the teacher shows where it kept up and where it did not. The
per-slice model and the table live in :mod:`lightning_distill.reporting` (re-exported here).

Retention is ``teacher_perplexity / student_perplexity``: 1.0 means the student predicts the
held-out text as well as the teacher does; 0.5 means its perplexity is twice the teacher's.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

from lightning_distill.reporting import SliceStats, format_slice_table, stats_from_sums

__all__ = ["SliceStats", "evaluate_slices", "format_slice_table", "stats_from_sums"]


@torch.no_grad()
def evaluate_slices(module: Any, dataloader: Iterable[Any], *, slice_key: str = "slice",
                    device: torch.device | str | None = None,
                    targets: Callable[[Any], None] | None = None) -> dict[str, SliceStats]:
    """Score ``module.student`` (and its teacher) on every batch, summed per slice.

    One forward per batch through ``module.evaluate_batch`` (the per-sample sums the module's
    eval step returns to :class:`~lightning_distill.callbacks.CoverageSlices`).

    Args:
        module: a :class:`~lightning_distill.DistillationModule`.
        dataloader: batches that are mappings carrying ``slice_key`` (a list of slice names,
            one per sample); batches without it count as slice ``"all"``.
        slice_key: the batch key that names each sample's slice.
        device: where to run; default: the student's device.
        targets: called with each batch (on ``device``) before scoring, to attach teacher
            targets, e.g. ``functools.partial(teacher_cache.attach, "test", module)``.

    Returns:
        ``{slice: SliceStats}`` in order of first appearance.
    """
    device = torch.device(device) if device is not None else next(module.student.parameters()).device
    was_training = module.training
    module.eval()
    stats: dict[str, SliceStats] = {}
    try:
        for batch in dataloader:
            names = batch.get(slice_key) if isinstance(batch, Mapping) else None
            batch = move_data_to_device(batch, device)
            if targets is not None:
                targets(batch)
            out = {k: v.double().cpu().tolist() for k, v in module.evaluate_batch(batch).items()}
            names = list(names) if names is not None else ["all"] * len(out["tokens"])
            for i, name in enumerate(names):
                stats.setdefault(str(name), SliceStats()).add(out, i)
    finally:
        module.train(was_training)
    return stats
