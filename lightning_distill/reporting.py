"""Per-slice numbers and what people read: one slice model, the rows, tables, plot and report files.

Evaluation (the module's eval step, :func:`~lightning_distill.evaluation.evaluate_slices`) produces
per-sample sums; they are added up per slice into a :class:`SliceStats`. Everything shown to a
person (``report.md``, ``coverage.md/json/png``, the distillation card's slice table) is derived
from those sums here.

**Retention** is the student's task metric relative to the teacher's, 1.0 = as good as the teacher:
``metric="perplexity"``: ``teacher_ppl / student_ppl = exp((teacher_nll - student_nll) / tokens)``;
``metric="accuracy"``: ``student_acc / teacher_acc``;
``metric="bits_per_byte"`` (teacher and student with different tokenizers, whose per-token
perplexities are not comparable): ``2 ** (teacher_bpb - student_bpb) = exp((teacher_nll - student_nll) /
bytes)``, the ratio of per-byte perplexities, where bits per byte = NLL in bits / UTF-8 bytes of the
scored text (the same text for both models). A perplexity report switches to it by itself when
the sums carry ``bytes`` (:func:`effective_metric`).
``metric="similarity"`` (embedding models): the Spearman correlation of the student's and the
teacher's pairwise cosine similarities over the slice's samples
(:func:`lightning_distill.similarity.similarity_agreement`), 1.0 = the teacher's order of every pair.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["COVERAGE_FIELDS", "METRICS", "TABLE_KEYS", "SliceStats", "card_rows", "coverage_markdown", "coverage_rows",
           "describe_row", "effective_metric", "fmt", "format_coverage_table", "format_slice_table", "markdown_table",
           "plot_retention", "retention", "stats_from_sums", "write_coverage_reports"]

#: Per-slice sums kept for held-out evaluation (``sample_sums`` keys plus ``samples``).
COVERAGE_FIELDS = ("samples", "tokens", "student_nll", "teacher_nll", "agreement", "kl", "correct",
                   "teacher_correct", "bytes")
#: The metric kinds retention is defined for.
METRICS = ("perplexity", "accuracy", "similarity", "bits_per_byte")
_LN2 = math.log(2.0)
#: The columns of a coverage row, in table order (the W&B table).
TABLE_KEYS = ("slice", "samples", "tokens", "train_samples", "train_tokens", "teacher_metric",
              "student_metric", "retention", "agreement", "kl", "gap")
_TEACHER_FIELDS = ("teacher_nll", "agreement", "kl", "teacher_correct")


def fmt(value: Any, spec: str = "") -> str:
    """``"-"`` for ``None``; a number formatted with ``spec``; anything else as ``str``."""
    if value is None:
        return "-"
    return format(value, spec) if spec and isinstance(value, (int, float)) else str(value)


def retention(metric: str, *, tokens: float, student_nll: float | None = None,
              teacher_nll: float | None = None, correct: float | None = None,
              teacher_correct: float | None = None, similarity: float | None = None,
              bytes: float | None = None) -> float | None:
    """Student relative to teacher, 1.0 = as good as the teacher (see the module docstring).

    ``perplexity``: ``exp((teacher_nll - student_nll) / tokens)``; ``accuracy``:
    ``correct / teacher_correct``; ``similarity``: the slice's ``similarity`` (Spearman agreement,
    computed from embeddings, not from sums); ``bits_per_byte``: ``exp((teacher_nll - student_nll) /
    bytes)``. ``None`` when it is undefined (no tokens or bytes, no teacher, or a teacher with accuracy 0).

    Raises:
        ValueError: an unknown ``metric``.
    """
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {METRICS}, got {metric!r}.")
    if tokens <= 0:
        return None
    if metric == "similarity":
        return similarity
    if metric == "bits_per_byte":
        if teacher_nll is None or student_nll is None or not bytes:
            return None
        return math.exp((teacher_nll - student_nll) / bytes)
    if metric == "perplexity":
        if teacher_nll is None or student_nll is None:
            return None
        return math.exp((teacher_nll - student_nll) / tokens)
    if teacher_correct is None or correct is None or teacher_correct <= 0:
        return None
    return correct / teacher_correct


def _add(current: float | None, value: float) -> float:
    return value if current is None else current + value


@dataclass
class SliceStats:
    """Sums over one slice; the derived numbers are properties. Teacher sums are ``None`` without one."""

    samples: int = 0
    tokens: int = 0
    student_nll: float = 0.0
    teacher_nll: float | None = None
    agreement: float | None = None
    kl: float | None = None
    correct: float | None = None
    teacher_correct: float | None = None
    bytes: float | None = None

    def add(self, values: Mapping[str, Sequence[float]], i: int) -> None:
        """Add sample ``i`` of per-sample sums (``DistillationModule.sample_sums``, as lists)."""
        self.samples += 1
        self.tokens += int(values["tokens"][i])
        self.student_nll += values["student_nll"][i]
        if "bytes" in values:
            self.bytes = _add(self.bytes, values["bytes"][i])
        if "teacher_nll" in values:
            self.teacher_nll = _add(self.teacher_nll, values["teacher_nll"][i])
        for key in ("agreement", "kl"):
            if key in values:
                setattr(self, key, _add(getattr(self, key), values[key][i]))

    @property
    def student_perplexity(self) -> float:
        return math.exp(self.student_nll / max(self.tokens, 1))

    @property
    def teacher_perplexity(self) -> float | None:
        return None if self.teacher_nll is None else math.exp(self.teacher_nll / max(self.tokens, 1))

    @property
    def student_bits_per_byte(self) -> float | None:
        return self.student_nll / _LN2 / self.bytes if self.bytes else None

    @property
    def teacher_bits_per_byte(self) -> float | None:
        return None if self.teacher_nll is None or not self.bytes else self.teacher_nll / _LN2 / self.bytes

    @property
    def metric(self) -> str:
        """``"bits_per_byte"`` when the sums carry bytes (different tokenizers), else ``"perplexity"``."""
        return "bits_per_byte" if self.bytes else "perplexity"

    @property
    def retention(self) -> float | None:
        if self.bytes:
            return retention("bits_per_byte", tokens=self.tokens, student_nll=self.student_nll,
                             teacher_nll=self.teacher_nll, bytes=self.bytes)
        teacher = self.teacher_perplexity
        return None if teacher is None else teacher / self.student_perplexity

    @property
    def agreement_rate(self) -> float | None:
        return None if self.agreement is None else self.agreement / max(self.tokens, 1)

    @property
    def mean_kl(self) -> float | None:
        return None if self.kl is None else self.kl / max(self.tokens, 1)

    def metrics(self, metric: str) -> tuple[float | None, float | None]:
        """``(student, teacher)`` perplexity or accuracy; ``None`` without tokens (or teacher)."""
        if self.tokens <= 0:
            return None, None
        if metric == "bits_per_byte":
            return self.student_bits_per_byte, self.teacher_bits_per_byte
        if metric == "perplexity":
            return self.student_perplexity, self.teacher_perplexity
        if metric == "similarity":
            return None, None  # the agreement is the retention (a pair of geometries, not two scores)
        teacher = None if self.teacher_correct is None else self.teacher_correct / self.tokens
        return (None if self.correct is None else self.correct / self.tokens), teacher

    def to_dict(self) -> dict[str, Any]:
        """The sums and derived numbers as plain values (``report.json``)."""
        return {"samples": self.samples, "tokens": self.tokens, "student_nll": self.student_nll,
                "teacher_nll": self.teacher_nll, "agreement": self.agreement, "kl": self.kl,
                "student_perplexity": self.student_perplexity, "teacher_perplexity": self.teacher_perplexity,
                "retention": self.retention, "agreement_rate": self.agreement_rate, "mean_kl": self.mean_kl,
                "bytes": self.bytes, "student_bits_per_byte": self.student_bits_per_byte,
                "teacher_bits_per_byte": self.teacher_bits_per_byte}


def stats_from_sums(sums: Mapping[str, Mapping[str, float | None]]) -> dict[str, SliceStats]:
    """:class:`SliceStats` from per-slice sums (``COVERAGE_FIELDS``) such as ``CoverageSlices.last_sums``.
    Sums with ``bytes`` (different tokenizers) have no agreement or KL (they need one vocabulary)."""
    return {name: SliceStats(samples=int(s.get("samples") or 0), tokens=int(s.get("tokens") or 0),
                             student_nll=float(s.get("student_nll") or 0.0), teacher_nll=s.get("teacher_nll"),
                             agreement=None if s.get("bytes") else s.get("agreement"),
                             kl=None if s.get("bytes") else s.get("kl"), correct=s.get("correct"),
                             teacher_correct=s.get("teacher_correct"), bytes=s.get("bytes") or None)
            for name, s in sums.items()}


def effective_metric(metric: str, per_slice: Mapping[str, Mapping[str, float | None]]) -> str:
    """``"bits_per_byte"`` for a ``"perplexity"`` report whose sums carry bytes (teacher and student
    tokenize differently, so per-token perplexities do not compare), else ``metric``."""
    if metric == "perplexity" and any(s.get("bytes") for s in per_slice.values()):
        return "bits_per_byte"
    return metric


def coverage_rows(per_slice: Mapping[str, Mapping[str, float | None]],
                  train: Mapping[str, Mapping[str, float]] | None = None, *, metric: str = "perplexity",
                  min_retention: float | None = None, min_relative_retention: float | None = None,
                  max_gap_to_best: float | None = None) -> list[dict[str, Any]]:
    """From per-slice sums (``COVERAGE_FIELDS``) to table rows with retention and gap flags
    (``perplexity`` becomes ``bits_per_byte`` when the sums carry bytes: :func:`effective_metric`)."""
    metric = effective_metric(metric, per_slice)
    rows = []
    for name, s in stats_from_sums(per_slice).items():
        student_metric, teacher_metric = s.metrics(metric)
        tr = (train or {}).get(name, {})
        rows.append({
            "slice": name, "samples": s.samples, "tokens": s.tokens,
            "train_samples": int(tr.get("samples", 0)), "train_tokens": int(tr.get("tokens", 0)),
            "teacher_metric": teacher_metric, "student_metric": student_metric,
            "retention": retention(metric, tokens=s.tokens, student_nll=s.student_nll, teacher_nll=s.teacher_nll,
                                   correct=s.correct, teacher_correct=s.teacher_correct,
                                   similarity=per_slice[name].get("similarity"), bytes=s.bytes),
            "agreement": s.agreement_rate if s.tokens > 0 else None,
            "kl": s.mean_kl if s.tokens > 0 else None,
            "gap": False, "gap_reason": None,
        })
        if metric == "similarity":  # samples whose pairs were compared (a bounded sample per slice)
            rows[-1]["pairs"] = per_slice[name].get("pairs")
    scored = [r["retention"] for r in rows if r["retention"] is not None]
    best = max(scored) if scored else None
    for r in rows:
        value = r["retention"]
        if value is None:
            continue
        reasons = []
        if min_retention is not None and value < min_retention:
            reasons.append(f"retention {value:.3f} < min_retention {min_retention:g}")
        if min_relative_retention is not None and best is not None and value < min_relative_retention * best:
            reasons.append(f"retention {value:.3f} < {min_relative_retention:g} x best slice's {best:.3f}")
        if max_gap_to_best is not None and best is not None and value < best - max_gap_to_best:
            reasons.append(f"retention {value:.3f} < best {best:.3f} - max_gap_to_best {max_gap_to_best:g}")
        if reasons:
            r["gap"], r["gap_reason"] = True, "; ".join(reasons)
    return rows


def card_rows(stats: Mapping[str, SliceStats]) -> list[dict[str, Any]]:
    """Slice rows for the distillation card when no ``CoverageSlices`` ran (perplexity, no gap rule)."""
    return [{"slice": n, "tokens": s.tokens, "teacher_metric": s.metrics(s.metric)[1],
             "student_metric": s.metrics(s.metric)[0], "retention": s.retention, "gap": None}
            for n, s in stats.items()]


# ---------------------------------------------------------------------- tables
def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A markdown table with padded columns (cells are strings)."""
    table = [list(header), ["---"] * len(header), *[list(r) for r in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    return "\n".join("| " + " | ".join(("-" * widths[i]) if r[i] == "---" else r[i].ljust(widths[i])
                                       for i in range(len(header))) + " |" for r in table)


def format_slice_table(stats: Mapping[str, SliceStats],
                       baseline: Mapping[str, SliceStats] | None = None,
                       coverage: Mapping[str, Mapping[str, Any]] | None = None) -> str:
    """A markdown table: per slice, teacher and student perplexity, retention, agreement, KL.

    With ``baseline`` (the same student trained without the teacher), two more columns show
    its perplexity and how much lower the distilled student's is (``gain`` > 1 is better).
    With ``coverage`` (``{slice: row}`` rows of ``CoverageSlices``), a ``train tokens`` column
    shows how much of each slice the student trained on, and a ``gap`` column marks coverage
    gaps with ``GAP``. When the stats carry bytes (teacher and student tokenize differently), the
    columns are bits per byte (``bpb``) and ``gain`` is ``2 ** (no-teacher bpb - student bpb)``.
    """
    bpb = any(s.bytes for s in stats.values())
    unit = "bpb" if bpb else "ppl"
    header = ["slice"] + (["train tokens"] if coverage is not None else [])
    header += ["tokens", f"teacher {unit}", f"student {unit}", "retention", "top-1 agree", "KL(t||s)"]
    if baseline is not None:
        header += [f"no-teacher {unit}", "gain"]
    if coverage is not None:
        header += ["gap"]
    rows = []
    for name, s in stats.items():
        cov = (coverage or {}).get(name) or {}
        row = [name] + ([str(cov.get("train_tokens", "-"))] if coverage is not None else [])
        if bpb:
            row += [str(s.tokens), fmt(s.teacher_bits_per_byte, ".3f"), fmt(s.student_bits_per_byte, ".3f")]
        else:
            row += [str(s.tokens), fmt(s.teacher_perplexity, ".2f"), fmt(s.student_perplexity, ".2f")]
        row += [fmt(s.retention, ".3f"), fmt(s.agreement_rate, ".3f"), fmt(s.mean_kl, ".3f")]
        if baseline is not None:
            base = baseline.get(name)
            if bpb:
                ok = base is not None and base.bytes and s.bytes
                row += [fmt(base.student_bits_per_byte if ok else None, ".3f"),
                        fmt(2.0 ** (base.student_bits_per_byte - s.student_bits_per_byte) if ok else None, ".3f")]
            else:
                row += [fmt(base.student_perplexity if base else None, ".2f"),
                        fmt(base.student_perplexity / s.student_perplexity if base else None, ".3f")]
        if coverage is not None:
            row += ["GAP" if cov.get("gap") else ""]
        rows.append(row)
    return markdown_table(header, rows)


def _metric_label(metric: str) -> str:
    return {"perplexity": "ppl", "accuracy": "acc", "bits_per_byte": "bpb"}.get(metric, "Spearman")


def describe_row(row: Mapping[str, Any], metric: str) -> str:
    """One coverage row in words (for warnings and errors)."""
    label = _metric_label(metric)
    if metric == "similarity":
        return (f"similarity agreement {fmt(row['retention'], '.3f')} (Spearman over {fmt(row.get('pairs'))} "
                f"pairs of {row['samples']} eval samples)")
    return (f"retention {fmt(row['retention'], '.3f')} (teacher {label} {fmt(row['teacher_metric'], '.3f')}, "
            f"student {label} {fmt(row['student_metric'], '.3f')}, {row['tokens']} eval tokens)")


def format_coverage_table(rows: Sequence[Mapping[str, Any]], metric: str = "perplexity") -> str:
    """A markdown table: per slice, training coverage next to retention, and a GAP marker."""
    if metric == "similarity":
        header = ["slice", "train samples", "eval samples", "pairs", "similarity agreement (Spearman)", "gap"]
        return markdown_table(header, [
            [r["slice"], str(r["train_samples"]), str(r["samples"]), fmt(r.get("pairs")), fmt(r["retention"], ".3f"),
             "GAP" if r["gap"] else ""] for r in rows])
    label = _metric_label(metric)
    spec = ".2f" if metric == "perplexity" else ".3f"
    header = ["slice", "train tokens", "eval tokens", f"teacher {label}", f"student {label}", "retention",
              "top-1 agree", "KL(t||s)", "gap"]
    return markdown_table(header, [
        [r["slice"], str(r["train_tokens"]), str(r["tokens"]), fmt(r["teacher_metric"], spec),
         fmt(r["student_metric"], spec), fmt(r["retention"], ".3f"), fmt(r["agreement"], ".3f"),
         fmt(r["kl"], ".3f"), "GAP" if r["gap"] else ""] for r in rows])


def _definition(metric: str) -> str:
    if metric == "bits_per_byte":
        return ("Teacher and student tokenize differently, so per-token perplexities do not compare: the table "
                "shows *bits per byte* (bpb: NLL in bits / UTF-8 bytes of the scored text, the same text for "
                "both models). *Retention* = 2^(teacher bpb - student bpb), the ratio of per-byte perplexities "
                "(1.0: as good as the teacher). *Train tokens*: the student's label positions of the slice.")
    if metric == "similarity":
        return ("*Similarity agreement* (the retention of embedding models) = Spearman correlation of the "
                "student's and the teacher's cosine similarities over every pair of the slice's eval samples "
                "(1.0: the student orders every pair as the teacher; 0: no relation). *Train samples*: samples "
                "of the slice the student trained on.")
    if metric == "perplexity":
        return ("*Retention* = teacher perplexity / student perplexity (1.0: as good as the teacher; "
                "0.5: twice the teacher's perplexity). *Train tokens*: label positions of the slice the "
                "student trained on.")
    return ("*Retention* = student accuracy / teacher accuracy (1.0: as good as the teacher). "
            "*Train tokens*: labelled examples/positions of the slice the student trained on.")


def _rule_text(thresholds: Mapping[str, float | None]) -> str:
    rules = []
    if thresholds.get("min_retention") is not None:
        rules.append(f"retention < {thresholds['min_retention']:g}")
    if thresholds.get("min_relative_retention") is not None:
        rules.append(f"retention < {thresholds['min_relative_retention']:g} x the best slice's retention")
    if thresholds.get("max_gap_to_best") is not None:
        rules.append(f"retention < best - {thresholds['max_gap_to_best']:g}")
    return "A slice is a coverage gap if " + (" or ".join(rules) if rules else "never (no threshold set)") + "."


def coverage_markdown(record: Mapping[str, Any]) -> str:
    """``coverage.md``: the title, the coverage table, the definitions, the gap rule and the gaps."""
    metric = record["metric"]
    lines = [f"# {_coverage_title(record)}", "", format_coverage_table(record["slices"], metric), "",
             _definition(metric), "", _rule_text(record["thresholds"]), ""]
    gaps = record["gaps"]
    lines.append(f"**Coverage gaps: {', '.join(gaps)}**" if gaps else "No coverage gap.")
    lines += ["", "![retention per slice](coverage.png)", ""]
    return "\n".join(lines)


def _coverage_title(record: Mapping[str, Any]) -> str:
    return f"Coverage and retention per slice ({record['stage']}, step {record['step']})"


def write_coverage_reports(directory: str | os.PathLike[str], record: Mapping[str, Any],
                           history: Sequence[Mapping[str, Any]] = ()) -> Path:
    """Write ``coverage.json`` (``record`` plus ``history``), ``coverage.md`` and ``coverage.png``.

    Args:
        directory: created if missing.
        record: ``stage``, ``step``, ``metric``, ``thresholds``, ``slices`` (rows of
            :func:`coverage_rows`) and ``gaps`` (slice names).
        history: earlier evaluations, kept in the JSON.

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "coverage.json").write_text(json.dumps({**record, "history": list(history)}, indent=2))
    (directory / "coverage.md").write_text(coverage_markdown(record))
    plot_retention(record["slices"], directory / "coverage.png", title=_coverage_title(record),
                   thresholds=record["thresholds"])
    return directory


def plot_retention(rows: Sequence[Mapping[str, Any]], path: str | os.PathLike[str], *, title: str = "",
                   thresholds: Mapping[str, float | None] | None = None) -> Path:
    """A PNG bar chart of retention per slice (gaps in red) with the threshold lines."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    from matplotlib.figure import Figure

    thresholds = thresholds or {}
    names = [r["slice"] for r in rows]
    values = [r["retention"] if r["retention"] is not None else 0.0 for r in rows]
    colors = ["#d62728" if r["gap"] else "#2ca02c" for r in rows]
    fig = Figure(figsize=(max(4.0, 1.2 * len(rows) + 2), 3.2), dpi=100)
    ax = fig.subplots()
    bars = ax.bar(names, values, color=colors)
    for bar, r in zip(bars, rows, strict=True):
        label = fmt(r["retention"], ".3f") + (" GAP" if r["gap"] else "")
        ax.annotate(label, (bar.get_x() + bar.get_width() / 2, bar.get_height()), ha="center", va="bottom",
                    fontsize=8)
    scored = [r["retention"] for r in rows if r["retention"] is not None]
    if thresholds.get("min_retention") is not None:
        ax.axhline(thresholds["min_retention"], color="black", linestyle="--", linewidth=1,
                   label=f"min_retention {thresholds['min_retention']:g}")
    if scored and thresholds.get("min_relative_retention") is not None:
        line = thresholds["min_relative_retention"] * max(scored)
        ax.axhline(line, color="gray", linestyle=":", linewidth=1,
                   label=f"{thresholds['min_relative_retention']:g} x best = {line:.3f}")
    if scored and thresholds.get("max_gap_to_best") is not None:
        line = max(scored) - thresholds["max_gap_to_best"]
        ax.axhline(line, color="purple", linestyle="-.", linewidth=1, label=f"best - gap = {line:.3f}")
    ax.set_ylabel("retention (1.0 = teacher)")
    ax.set_ylim(min([0.0, *[v * 1.15 for v in values]]), max([1.05, *[v * 1.15 for v in values]]))
    ax.set_title(title, fontsize=9)
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=7, loc="upper right")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, format="png")
    return path
