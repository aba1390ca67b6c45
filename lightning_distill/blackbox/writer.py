"""Write a teacher's completions as JSONL records: one per (prompt, sample), atomic shards, resumable.

Layout of ``out_dir``::

    shard-00000.jsonl   one JSON record a line; each shard is written whole (temp file, fsync,
    shard-00001.jsonl   os.replace), so a killed run leaves only complete shards behind
    ...

Load them with ``datasets.load_dataset("json", data_files=str(out_dir / "shard-*.jsonl"))``.
A rerun into the same folder reads the shards there and asks the teacher only for the
(prompt_id, sample_index) pairs not yet written. One writer per folder at a time.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from lightning_distill.blackbox.prompts import Prompt
from lightning_distill.blackbox.rationale import (
    DEFAULT_ANSWER_PATTERN,
    RationaleTemplate,
    answers_match,
    extract_answer,
)
from lightning_distill.blackbox.sources import TeacherSource, check_prompts
from lightning_distill.validation import check_int

__all__ = ["RECORD_FORMAT_VERSION", "prompt_id", "read_records", "shard_paths", "write_records"]

RECORD_FORMAT_VERSION = 1
SHARD_GLOB = "shard-*.jsonl"


def prompt_id(prompt: str) -> str:
    """The stable id of a prompt: sha256 of its UTF-8 text, 16 hex digits."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16]


def shard_paths(out_dir: str | Path) -> list[Path]:
    """The finished shards of ``out_dir``, in order."""
    return sorted(Path(out_dir).glob(SHARD_GLOB))


def read_records(out_dir: str | Path) -> list[dict[str, Any]]:
    """Every record of every finished shard of ``out_dir``, in shard order.

    Raises:
        ValueError: a line that is not a JSON object (the shard is named).
    """
    return [rec for path in shard_paths(out_dir) for rec, _ in iter_jsonl(path)]


def iter_jsonl(path: str | Path) -> Iterator[tuple[dict[str, Any], int]]:
    """The JSON objects of one records file with their line numbers (blank lines skipped).

    Raises:
        ValueError: a line that is not valid JSON or not a JSON object, named ``path:line``.
    """
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno} is not valid JSON ({e}); remove or repair that shard.") from e
            if not isinstance(rec, dict):
                raise ValueError(f"{path}:{lineno} is not a JSON object; remove or repair that shard.")
            yield rec, lineno


def _write_shard(path: Path, records: list[dict[str, Any]]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for rec in records:
            f.write(json.dumps(rec, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    try:  # make the rename itself durable
        fd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError:
        pass


def _per_prompt(name: str, values: Any, count: int) -> list[str | None] | None:
    """``values`` (one str or ``None`` per prompt) as a list, or ``None``."""
    if values is None:
        return None
    if isinstance(values, str) or not isinstance(values, Sequence):
        raise TypeError(
            f"{name} must be a list of str (one per prompt) or None, got {type(values).__name__}."
        )
    values = list(values)
    if len(values) != count:
        raise ValueError(
            f"{name} has {len(values)} entries for {count} prompts; give one per prompt."
        )
    for i, v in enumerate(values):
        if v is not None and not isinstance(v, str):
            raise TypeError(f"{name}[{i}] must be a str or None, got {type(v).__name__}.")
    return values


def write_records(
    source: TeacherSource,
    prompts: Sequence[str],
    out_dir: str | Path,
    *,
    n: int = 1,
    seed: int = 0,
    slices: Sequence[str | None] | None = None,
    shard_size: int = 256,
    references: Sequence[str | None] | None = None,
    rationale: RationaleTemplate | None = None,
) -> dict[str, int]:
    """Have ``source`` answer ``prompts`` (``n`` samples each) and append the records to ``out_dir``.

    Each record holds: ``format_version``, ``prompt_id`` (:func:`prompt_id`), ``sample_index``,
    ``slice``, ``prompt``, ``completion``, ``finish_reason``, ``usage`` (``prompt_tokens``,
    ``completion_tokens``), ``teacher`` (``source.identity()`` without its ``"generation"`` entry),
    ``generation`` (the source's settings plus ``n`` and ``seed``) and ``created_at`` (UTC, ISO 8601).

    Prompts are sent to the source in groups of about ``shard_size / n`` prompts; each group's
    records become one new shard. A prompt repeated in ``prompts`` is answered once (its first
    slice is kept). Pairs already in ``out_dir`` are skipped, so a rerun after a crash completes
    the set without duplicates; stale ``*.tmp`` files of a killed run are removed.

    Rationales (``docs/blackbox.md``): with ``rationale``, the teacher is sent
    ``rationale.render(prompt)`` while the record keeps the original ``prompt``, and
    ``generation["rationale"]`` holds the template. With ``rationale`` or ``references``, each
    record also holds ``template`` (its name, or ``None``), ``answer`` (the extracted final answer,
    or ``None``), ``reference`` and ``accepted`` (the answer matches the reference; ``None``
    without a reference). Without either, records are as before.

    Args:
        source: a :class:`~lightning_distill.blackbox.sources.TeacherSource`.
        prompts: the prompts: strings, or :class:`~lightning_distill.blackbox.prompts.Prompt` s
            (their ``slice`` and ``reference`` are used; then leave ``slices``/``references`` unset).
        out_dir: the output folder (created if missing).
        n: samples per prompt.
        seed: passed to ``source.generate``.
        slices: one slice name (or ``None``) per prompt, or ``None`` for no slices.
        shard_size: records per shard (about; a group of prompts is never split).
        references: one reference answer (or ``None``) per prompt, for ``accepted``.
        rationale: a :class:`~lightning_distill.blackbox.rationale.RationaleTemplate`, or ``None``.

    Returns:
        ``{"written": new records, "skipped": pairs already present, "shards": new shards}``.

    Raises:
        TypeError, ValueError: bad arguments; a source that does not return ``n`` completions per
            prompt; existing records of the same prompt id with a different prompt text, or
            written with another rationale template.
    """
    if not callable(getattr(source, "generate", None)) or not callable(
        getattr(source, "identity", None)
    ):
        raise TypeError(
            f"source must have generate() and identity() (a TeacherSource), got {type(source).__name__}."
        )
    if isinstance(prompts, Sequence) and any(isinstance(p, Prompt) for p in prompts):
        if slices is not None or references is not None:
            raise ValueError(
                "prompts are Prompt objects, which carry their slice and reference; leave "
                "slices= and references= unset."
            )
        if not all(isinstance(p, Prompt) for p in prompts):
            raise TypeError("prompts mixes Prompt objects and other values; pass one kind.")
        slices = [p.slice for p in prompts]
        references = (
            [p.reference for p in prompts]
            if any(p.reference is not None for p in prompts)
            else None
        )
        prompts = [p.text for p in prompts]
    if rationale is not None and not isinstance(rationale, RationaleTemplate):
        raise TypeError(
            f"rationale must be a RationaleTemplate or None, got {type(rationale).__name__}."
        )
    prompts = check_prompts(prompts)
    n = check_int("n", n, low=1)
    seed = check_int("seed", seed)
    shard_size = check_int("shard_size", shard_size, low=1)
    slices = _per_prompt("slices", slices, len(prompts))
    references = _per_prompt("references", references, len(prompts))
    scoring = rationale is not None or references is not None
    template = rationale.name if rationale is not None else None
    wanted = rationale.to_dict() if rationale is not None else None
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob("shard-*.jsonl.tmp"):
        stale.unlink()

    done: set[tuple[str, int]] = set()
    known: dict[str, str] = {}
    for rec in read_records(out):
        done.add((rec["prompt_id"], int(rec["sample_index"])))
        known.setdefault(rec["prompt_id"], rec["prompt"])
        had = (rec.get("generation") or {}).get("rationale")
        if had != wanted:
            named = had.get("name") if isinstance(had, dict) else None
            raise ValueError(
                f"{out} holds records written with rationale template {named!r}"
                + (" (another text or answer pattern)" if named == template else "")
                + f", not {template!r}; write to another folder (one template per folder)."
            )

    # unique prompts in order, with their slice and the sample indices still missing
    todo: list[tuple[str, str, str | None, list[int]]] = []
    reference_of: dict[str, str | None] = {}
    seen: set[str] = set()
    skipped = 0
    for i, p in enumerate(prompts):
        pid = prompt_id(p)
        if pid in seen:
            continue
        if pid in known and known[pid] != p:
            raise ValueError(
                f"prompt {i} has id {pid}, which {out} already holds for a different prompt text; "
                "write these prompts to another folder."
            )
        seen.add(pid)
        reference_of[pid] = references[i] if references is not None else None
        missing = [j for j in range(n) if (pid, j) not in done]
        skipped += n - len(missing)
        if missing:
            todo.append((pid, p, slices[i] if slices is not None else None, missing))

    identity = dict(source.identity())
    generation = {**dict(identity.pop("generation", None) or {}), "n": n, "seed": seed}
    if rationale is not None:
        generation["rationale"] = rationale.to_dict()
    pattern = rationale.answer_pattern if rationale is not None else DEFAULT_ANSWER_PATTERN
    next_shard = len(shard_paths(out))
    existing = {p.name for p in shard_paths(out)}
    per_call = max(1, shard_size // n)
    written = shards = 0
    for start in range(0, len(todo), per_call):
        group = todo[start : start + per_call]
        sent = [rationale.render(p) if rationale else p for _, p, _, _ in group]
        answers = source.generate(sent, n=n, seed=seed)
        if len(answers) != len(group):
            raise ValueError(
                f"source returned {len(answers)} answers for {len(group)} prompts; expected one per prompt."
            )
        now = _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
        records = []
        for (pid, prompt, slice_, missing), samples in zip(group, answers):
            if len(samples) != n:
                raise ValueError(
                    f"source returned {len(samples)} completions for prompt {pid}; expected n={n}."
                )
            for j in missing:
                c = samples[j]
                records.append(
                    {
                        "format_version": RECORD_FORMAT_VERSION,
                        "prompt_id": pid,
                        "sample_index": j,
                        "slice": slice_,
                        "prompt": prompt,
                        "completion": c.text,
                        "finish_reason": c.finish_reason,
                        "usage": {
                            "prompt_tokens": c.prompt_tokens,
                            "completion_tokens": c.completion_tokens,
                        },
                        "teacher": identity,
                        "generation": generation,
                        "created_at": now,
                    }
                )
                if scoring:
                    ref = reference_of[pid]
                    answer = extract_answer(c.text, pattern)
                    records[-1].update(
                        template=template,
                        answer=answer,
                        reference=ref,
                        accepted=None if ref is None else answers_match(answer, ref),
                    )
        while f"shard-{next_shard:05d}.jsonl" in existing:
            next_shard += 1
        _write_shard(out / f"shard-{next_shard:05d}.jsonl", records)
        existing.add(f"shard-{next_shard:05d}.jsonl")
        next_shard += 1
        written += len(records)
        shards += 1
    return {"written": written, "skipped": skipped, "shards": shards}
