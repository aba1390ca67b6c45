"""Per-slice evaluation of a student against its teacher, and the table people read.

A student learns what the distillation data covered. Scoring it per slice of held-out data
(prose, code, ...) against the teacher shows where it kept up and where it did not.

Retention is ``teacher_perplexity / student_perplexity``: 1.0 means the student predicts the
held-out text as well as the teacher does; 0.5 means its perplexity is twice the teacher's.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any

import torch
from lightning.fabric.utilities.apply_func import move_data_to_device

__all__ = ["SliceStats", "evaluate_slices", "format_slice_table", "stats_from_sums"]


@dataclass
class SliceStats:
    """Sums over one slice; the derived numbers are properties."""

    samples: int = 0
    tokens: int = 0
    student_nll: float = 0.0
    teacher_nll: float | None = None
    agreement: float | None = None
    kl: float | None = None

    @property
    def student_perplexity(self) -> float:
        return math.exp(self.student_nll / max(self.tokens, 1))

    @property
    def teacher_perplexity(self) -> float | None:
        return None if self.teacher_nll is None else math.exp(self.teacher_nll / max(self.tokens, 1))

    @property
    def retention(self) -> float | None:
        teacher = self.teacher_perplexity
        return None if teacher is None else teacher / self.student_perplexity

    @property
    def agreement_rate(self) -> float | None:
        return None if self.agreement is None else self.agreement / max(self.tokens, 1)

    @property
    def mean_kl(self) -> float | None:
        return None if self.kl is None else self.kl / max(self.tokens, 1)

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "student_perplexity": self.student_perplexity,
                "teacher_perplexity": self.teacher_perplexity, "retention": self.retention,
                "agreement_rate": self.agreement_rate, "mean_kl": self.mean_kl}


def _add(current: float | None, value: float) -> float:
    return value if current is None else current + value


@torch.no_grad()
def evaluate_slices(module: Any, dataloader: Iterable[Any], *, slice_key: str = "slice",
                    device: torch.device | str | None = None,
                    targets: Callable[[Any], None] | None = None) -> dict[str, SliceStats]:
    """Score ``module.student`` (and its teacher) on every batch, summed per slice.

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
                entry = stats.setdefault(str(name), SliceStats())
                entry.samples += 1
                entry.tokens += int(out["tokens"][i])
                entry.student_nll += out["student_nll"][i]
                if "teacher_nll" in out:
                    entry.teacher_nll = _add(entry.teacher_nll, out["teacher_nll"][i])
                    entry.agreement = _add(entry.agreement, out["agreement"][i])
                    entry.kl = _add(entry.kl, out["kl"][i])
    finally:
        module.train(was_training)
    return stats


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def stats_from_sums(sums: Mapping[str, Mapping[str, float | None]]) -> dict[str, SliceStats]:
    """:class:`SliceStats` from per-slice sums such as ``CoverageSlices.last_sums``."""
    return {name: SliceStats(samples=int(s.get("samples") or 0), tokens=int(s.get("tokens") or 0),
                             student_nll=float(s.get("student_nll") or 0.0), teacher_nll=s.get("teacher_nll"),
                             agreement=s.get("agreement"), kl=s.get("kl"))
            for name, s in sums.items()}


def format_slice_table(stats: Mapping[str, SliceStats],
                       baseline: Mapping[str, SliceStats] | None = None,
                       coverage: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """A markdown table: per slice, teacher and student perplexity, retention, agreement, KL.

    With ``baseline`` (the same student trained without the teacher), two more columns show
    its perplexity and how much lower the distilled student's is (``gain`` > 1 is better).
    With ``coverage`` (``{slice: row}`` rows of ``CoverageSlices``), a ``train tokens`` column
    shows how much of each slice the student trained on, and a ``gap`` column marks coverage
    gaps with ``GAP``.
    """
    header = ["slice"] + (["train tokens"] if coverage is not None else [])
    header += ["tokens", "teacher ppl", "student ppl", "retention", "top-1 agree", "KL(t||s)"]
    if baseline is not None:
        header += ["no-teacher ppl", "gain"]
    if coverage is not None:
        header += ["gap"]
    rows = [header, ["---"] * len(header)]
    for name, s in stats.items():
        cov = (coverage or {}).get(name) or {}
        row = [name] + ([str(cov.get("train_tokens", "-"))] if coverage is not None else [])
        row += [str(s.tokens), _fmt(s.teacher_perplexity, ".2f"), _fmt(s.student_perplexity, ".2f"),
                _fmt(s.retention, ".3f"), _fmt(s.agreement_rate, ".3f"), _fmt(s.mean_kl, ".3f")]
        if baseline is not None:
            base = baseline.get(name)
            row += [_fmt(base.student_perplexity if base else None, ".2f"),
                    _fmt(base.student_perplexity / s.student_perplexity if base else None, ".3f")]
        if coverage is not None:
            row += ["GAP" if cov.get("gap") else ""]
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    lines = []
    for r in rows:
        cells = [("-" * widths[i]) if r[i] == "---" else r[i].ljust(widths[i]) for i in range(len(r))]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
