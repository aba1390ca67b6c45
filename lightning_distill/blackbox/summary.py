"""What a folder of teacher records holds, per slice: prompts, records, acceptance, finish reasons.

:func:`summarize` reads the shards of a records folder (:func:`~lightning_distill.blackbox.
read_records`) and counts per slice; :func:`write_summary` writes ``summary.json`` and
``summary.md`` (a markdown table) next to the shards. ``lightning-distill generate`` calls it after
generating.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from lightning_distill.blackbox.writer import read_records, shard_paths

__all__ = ["NO_SLICE", "format_summary", "summarize", "write_summary"]

#: The slice name of records written without one (the data modules' default slice).
NO_SLICE = "all"


def _empty() -> dict[str, Any]:
    return {
        "prompts": 0,
        "records": 0,
        "scored": 0,
        "accepted": 0,
        "acceptance_rate": None,
        "no_answer": 0,
        "finish_reasons": {},
        "completion_tokens": 0,
    }


def summarize(out_dir: str | Path) -> dict[str, Any]:
    """Per-slice counts of the records in ``out_dir``.

    Per slice (records without a slice count as ``"all"``) and in ``"total"``: ``prompts``
    (distinct prompt ids), ``records``, ``scored`` (records with a reference), ``accepted``
    (answer matches the reference), ``acceptance_rate`` (``accepted / scored``, ``None`` when
    nothing was scored), ``no_answer`` (scored records in which no answer was found),
    ``finish_reasons`` (``{"stop": k, "length": m}``) and ``completion_tokens`` (the sum of the
    known counts).

    Args:
        out_dir: a folder written by :func:`~lightning_distill.blackbox.write_records`.

    Returns:
        ``{"records_dir", "shards", "templates", "slices": {name: counts}, "total": counts}``.

    Raises:
        FileNotFoundError: ``out_dir`` is not a folder, or holds no shard.
        ValueError: a shard that is not JSONL (named).
    """
    folder = Path(out_dir)
    if not folder.is_dir():
        raise FileNotFoundError(f"records folder {str(out_dir)!r} does not exist; check the path.")
    if not shard_paths(folder):
        raise FileNotFoundError(
            f"{folder} holds no shard-*.jsonl records; generate some first (write_records)."
        )
    slices: dict[str, dict[str, Any]] = {}
    total = _empty()
    prompt_ids: dict[str, set[str]] = {}
    templates: set[str | None] = set()
    for rec in read_records(folder):
        name = rec.get("slice") or NO_SLICE
        for counts, key in ((slices.setdefault(name, _empty()), name), (total, "\0total")):
            prompt_ids.setdefault(key, set()).add(rec["prompt_id"])
            counts["records"] += 1
            reason = str(rec.get("finish_reason"))
            counts["finish_reasons"][reason] = counts["finish_reasons"].get(reason, 0) + 1
            tokens = (rec.get("usage") or {}).get("completion_tokens")
            counts["completion_tokens"] += int(tokens or 0)
            if rec.get("accepted") is not None:
                counts["scored"] += 1
                counts["accepted"] += bool(rec["accepted"])
                counts["no_answer"] += rec.get("answer") is None
        templates.add(rec.get("template"))
    for key, counts in [*slices.items(), ("\0total", total)]:
        counts["prompts"] = len(prompt_ids[key])
        if counts["scored"]:
            counts["acceptance_rate"] = counts["accepted"] / counts["scored"]
    return {
        "records_dir": str(folder),
        "shards": len(shard_paths(folder)),
        "templates": sorted(t for t in templates if t is not None),
        "slices": dict(sorted(slices.items())),
        "total": total,
    }


def format_summary(summary: dict[str, Any]) -> str:
    """The markdown table of a :func:`summarize` result (one row per slice, then the total)."""
    lines = [
        "| slice | prompts | records | accepted / scored | acceptance | stop | length | completion tokens |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    rows = [*summary["slices"].items(), ("**total**", summary["total"])]
    for name, c in rows:
        rate = "–" if c["acceptance_rate"] is None else f"{100 * c['acceptance_rate']:.1f} %"
        scored = f"{c['accepted']} / {c['scored']}" if c["scored"] else "–"
        reasons = c["finish_reasons"]
        lines.append(
            f"| {name} | {c['prompts']} | {c['records']} | {scored} | {rate} | "
            f"{reasons.get('stop', 0)} | {reasons.get('length', 0)} | {c['completion_tokens']} |"
        )
    head = f"# Teacher records: {summary['records_dir']}\n\n"
    if summary["templates"]:
        head += f"Rationale template: {', '.join(summary['templates'])}.\n\n"
    return head + "\n".join(lines) + "\n"


def write_summary(out_dir: str | Path) -> dict[str, Any]:
    """Write ``summary.json`` and ``summary.md`` into ``out_dir`` (atomically); return the summary.

    Raises:
        FileNotFoundError, ValueError: see :func:`summarize`.
    """
    summary = summarize(out_dir)
    folder = Path(out_dir)
    for name, text in (
        ("summary.json", json.dumps(summary, indent=2) + "\n"),
        ("summary.md", format_summary(summary)),
    ):
        tmp = folder / f"{name}.tmp"
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, folder / name)
    return summary
