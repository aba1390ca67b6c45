"""Export a distilled student with a record of how it was made."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from lightning_distill import __version__
from lightning_distill.models.adapters import is_hf_model, unwrap_model
from lightning_distill.models.identity import describe_model
from lightning_distill.reporting import fmt

__all__ = ["CARD_NAME", "RECORD_NAME", "card_markdown", "distillation_card", "export_student", "versions", "write_card"]

#: File written beside the exported weights.
RECORD_NAME = "distillation.json"
#: The distillation card (governance summary), written beside the weights as JSON and Markdown.
CARD_NAME = "distillation_card"


def versions() -> dict[str, str]:
    """Versions of the packages that shaped the student."""
    import lightning
    import torch
    import transformers

    return {"lightning_distill": __version__, "torch": torch.__version__, "lightning": lightning.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def export_student(student: nn.Module, directory: str | Path, *, tokenizer: Any = None,
                   record: dict[str, Any] | None = None, card: dict[str, Any] | None = None,
                   extras: Mapping[str, nn.Module] | None = None) -> Path:
    """Save ``student`` (and ``tokenizer``) to ``directory`` with a ``distillation.json`` record.

    Hugging Face models are written with ``save_pretrained`` (safetensors), so
    ``AutoModelForCausalLM.from_pretrained(directory)`` loads them back; other modules are
    written as ``model.safetensors`` (load with ``safetensors.torch.load_model``). Nothing is
    pickled.

    With ``card`` (see :func:`distillation_card`), also writes ``distillation_card.json`` and
    ``distillation_card.md``.

    With ``extras`` (``{name: module}``: modules trained with the student that it does not
    contain, e.g. a feature projector kept with ``FeatureKD(projector_export="save")``; see
    ``losses.feature_terms.export_modules``), also writes ``<name>.safetensors`` and
    ``<name>.json`` (class, shapes) for each, listed under ``extras`` in ``distillation.json``.

    A compiled or DDP-wrapped student is saved as the model behind the wrapper, so the files
    load into the plain model class (a peft model is saved by peft, as its adapter).

    Returns:
        The directory.
    """
    student = unwrap_model(student, peft=False)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_hf_model(student):
        student.save_pretrained(directory, safe_serialization=True)
    else:
        from safetensors.torch import save_model

        save_model(student, str(directory / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    full_record = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "student": describe_model(student),
        "versions": versions(),
        **(record or {}),
    }
    if extras:
        full_record["extras"] = {name: _save_extra(directory, name, module) for name, module in extras.items()}
    (directory / RECORD_NAME).write_text(json.dumps(full_record, indent=2, default=str))
    if card is not None:
        write_card(directory, card)
    return directory


def _save_extra(directory: Path, name: str, module: nn.Module) -> dict[str, Any]:
    """Write one extra module as ``<name>.safetensors`` + ``<name>.json``; return its description."""
    from safetensors.torch import save_model

    module = unwrap_model(module)
    info: dict[str, Any] = {
        "weights": f"{name}.safetensors",
        "class": f"{type(module).__module__}.{type(module).__qualname__}",
        "shapes": {k: list(v.shape) for k, v in module.state_dict().items()},
    }
    if isinstance(module, nn.Linear):
        info.update(in_features=module.in_features, out_features=module.out_features, bias=module.bias is not None)
    save_model(module, str(directory / f"{name}.safetensors"))
    (directory / f"{name}.json").write_text(json.dumps(info, indent=2))
    return info


def distillation_card(*, student: nn.Module, teacher: dict[str, Any] | None, data: dict[str, Any],
                      slices: list[dict[str, Any]], losses: dict[str, Any], schedule: Any = None,
                      coverage: dict[str, Any] | None = None,
                      cache: str | dict[str, Any] = "live",
                      generated: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    """The distillation card: the fixed record that makes a distilled model governable.

    Args:
        student: the distilled student (described by class, size and weight fingerprint).
        teacher: the teacher's identity (``DistillationModule.teacher_identity``).
        data: data identity, e.g. ``{"fingerprint": ..., "data_fingerprint": ..., "train_slices": ...}``.
        slices: one row per slice: training coverage, teacher/student metric, retention, gap.
        losses: ``{term: config}``.
        schedule: schedule callbacks' configs (e.g. ``TemperatureSchedule``), or ``None``.
        coverage: the coverage settings (metric, thresholds) and the gaps found.
        cache: where teacher targets came from: ``"live"`` (the frozen teacher at every step) or
            the teacher cache's description (``TeacherCache.config()``: kind, parameters,
            location, fingerprint, bytes per token per split).
        generated: the lineage of teacher-written training records, one entry per records folder
            (``blackbox.loop.generated_lineage``: teacher, settings, counts and acceptance per
            slice, source run, ``terms``), or ``None`` when the data has none.
    """
    return {
        "card_version": 1,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "teacher": teacher,
        "student": describe_model(student),
        "data": {**data, "slices": slices},
        "coverage": coverage,
        "losses": losses,
        "schedule": schedule,
        "cache": cache,
        **({"generated_data": generated} if generated else {}),
        "versions": versions(),
    }


def _cache_line(cache: Any) -> str:
    if not isinstance(cache, dict):
        return str(cache)
    splits = cache.get("splits") or {}
    per_token = ", ".join(f"{n} {v.get('bytes_per_token', 0):.1f} B/token" for n, v in splits.items())
    return (f"cached, kind {cache.get('kind')} {cache.get('params')}, fingerprint `{cache.get('fingerprint')}`"
            + (f" ({per_token})" if per_token else ""))


def _derived_line(derived: dict[str, Any]) -> str:
    mlp = (f", MLP {derived.get('teacher_intermediate_size')} -> {derived['intermediate_size']} "
           f"({derived.get('mlp_selection')} neurons)" if derived.get("intermediate_size") else "")
    return f"layers {derived.get('layers')} of {derived.get('teacher_layers')}{mlp}"


def _projector_lines(losses: dict[str, Any]) -> list[str]:
    """One line per term with a projector choice (feature, embedding): saved beside the student, or dropped."""
    return [f"- projector of `{name}`: "
            + (f"saved beside the student (`{name}_projector.safetensors`, when the widths differ)"
               if config["projector_export"] == "save" else "dropped at export (the student alone)")
            for name, config in losses.items() if isinstance(config, dict) and "projector_export" in config]


def _generated_line(entry: dict[str, Any]) -> str:
    teacher = entry.get("teacher") or {}
    name = teacher.get("model_name") if isinstance(teacher, dict) else "several teachers"
    slices = ", ".join(f"{s} {v.get('records')}" + (f" (accepted {v['acceptance']:.0%})" if "acceptance" in v else "")
                       for s, v in (entry.get("slices") or {}).items())
    run = (entry.get("source_run") or {}).get("path")
    return (f"- teacher-written training data: `{entry.get('path')}`: {entry.get('records')} records ({slices}) "
            f"by {name}" + (f", for the gaps of run `{run}`" if run else "")
            + f"; terms: {entry.get('terms') or 'not given'}")


def card_markdown(card: dict[str, Any]) -> str:
    """A short human-readable version of a distillation card."""
    teacher = card.get("teacher") or {}
    student = card.get("student") or {}
    data = card.get("data") or {}
    coverage = card.get("coverage") or {}
    lines = ["# Distillation card", "",
             f"- created: {card.get('created')}",
             f"- teacher: {teacher.get('name_or_path') or teacher.get('class')} "
             f"({fmt(teacher.get('num_parameters'), ',')} parameters, weights sha256 "
             f"`{fmt(teacher.get('weights_sha256'))[:16]}`)",
             f"- student: {student.get('class')} ({fmt(student.get('num_parameters'), ',')} parameters, "
             f"weights sha256 `{fmt(student.get('weights_sha256'))[:16]}`)",
             *([f"- student cut from the teacher: {_derived_line(student['derived_from_teacher'])}"]
               if student.get("derived_from_teacher") else []),
             f"- data: fingerprint `{data.get('fingerprint')}`, trained on slices "
             f"{data.get('train_slices') or 'all'}",
             "- losses: " + ", ".join(f"{n} ({', '.join(f'{k}={v}' for k, v in c.items())})"
                                       for n, c in (card.get("losses") or {}).items()),
             *_projector_lines(card.get("losses") or {}),
             *([f"- embeddings: `Pooling(mode={card['pooling'].get('mode')!r}, normalize="
                f"{card['pooling'].get('normalize')})` over the student's token states"] if card.get("pooling") else []),
             f"- schedule: {json.dumps(card.get('schedule')) if card.get('schedule') else 'none'}",
             f"- teacher targets: {_cache_line(card.get('cache'))}",
             *[_generated_line(g) for g in card.get("generated_data") or []],
             "- versions: " + ", ".join(f"{k} {v}" for k, v in (card.get("versions") or {}).items()),
             "", "## Slices: coverage and retention", ""]
    rows = data.get("slices") or []
    if coverage and coverage.get("metric") == "similarity":  # embedding models: no per-token metric
        lines += ["| slice | train samples | pairs | similarity agreement (Spearman) | gap |", "|---|---|---|---|---|"]
        lines += [f"| {r.get('slice')} | {fmt(r.get('train_samples'))} | {fmt(r.get('pairs'))} "
                  f"| {fmt(r.get('retention'), '.3f')} | {'GAP' if r.get('gap') else ''} |" for r in rows]
    else:
        lines += ["| slice | train tokens | teacher | student | retention | gap |", "|---|---|---|---|---|---|"]
        lines += [f"| {r.get('slice')} | {fmt(r.get('train_tokens'))} | {fmt(r.get('teacher_metric'), '.3f')} "
                  f"| {fmt(r.get('student_metric'), '.3f')} | {fmt(r.get('retention'), '.3f')} "
                  f"| {'GAP' if r.get('gap') else ''} |" for r in rows]
    if coverage:
        gaps = coverage.get("gaps") or []
        lines += ["", f"Metric: {coverage.get('metric')}; thresholds: {coverage.get('thresholds')}. "
                  + (f"**Coverage gaps: {', '.join(gaps)}.**" if gaps else "No coverage gap.")]
    return "\n".join(lines) + "\n"


def write_card(directory: str | Path, card: dict[str, Any]) -> Path:
    """Write ``distillation_card.json`` and ``distillation_card.md`` into ``directory``."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"{CARD_NAME}.json").write_text(json.dumps(card, indent=2, default=str))
    (directory / f"{CARD_NAME}.md").write_text(card_markdown(card))
    return directory / f"{CARD_NAME}.json"
