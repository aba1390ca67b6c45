"""Training on teacher text: records written by ``write_records`` as student batches.

:class:`TeacherTextDataModule` is :class:`~lightning_distill.data.TextDataModule`'s instruction
path fed from record shards: each record becomes a prompt/response pair (the record's original
``prompt`` and the teacher's ``completion``), tokenized with the *student's* tokenizer and its chat
template (plain concatenation where it has none), with ``-100`` on every prompt position, so the
loss is taken on the teacher's text only. With ``TaskLoss`` that is sequence-level KD; a live or
cached teacher with the same tokenizer adds ``LogitKD`` (hybrid). Batches, caching, packing, the
``slice`` key and the sample ids are ``TextDataModule``'s; the split is by prompt, so the samples
of one prompt never straddle train/val/test.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_distill.blackbox.rationale import DEFAULT_ANSWER_PATTERN, find_answer
from lightning_distill.blackbox.writer import SHARD_GLOB, iter_jsonl
from lightning_distill.data.encode import _encode
from lightning_distill.data.sources import DEFAULT_SLICE, TextDocument, _as_list, _expand, plain
from lightning_distill.data.splits import assign_by_content
from lightning_distill.data.text import TextDataModule
from lightning_distill.validation import check_bool, check_choice, check_int

__all__ = ["TARGETS", "TeacherTextDataModule", "read_record_files"]

log = logging.getLogger(__name__)

#: What the student is trained to write: the whole completion, or only its final answer line.
TARGETS = ("full", "answer")


def read_record_files(records: Any) -> list[tuple[dict[str, Any], str]]:
    """Every record of ``records`` with where it came from (``"path:line"``), in file order.

    Args:
        records: a records folder (its ``shard-*.jsonl``), a JSONL file, a glob, or a list of them.

    Raises:
        FileNotFoundError: a path that does not exist, a glob that matches nothing, a folder
            without shards.
        ValueError: a line that is not a JSON object.
    """
    paths: list[Path] = []
    for entry in _as_list(records):
        folder = Path(os.path.expanduser(entry))
        if folder.is_dir():
            shards = sorted(folder.glob(SHARD_GLOB))
            if not shards:
                raise FileNotFoundError(
                    f"data.records folder {entry!r} holds no {SHARD_GLOB} files; point it at a "
                    "folder written by write_records / lightning-distill generate."
                )
            paths.extend(shards)
        else:
            try:
                paths.extend(_expand([entry]))
            except FileNotFoundError as err:
                raise FileNotFoundError(str(err).replace("data.files", "data.records")) from None
    return [(rec, f"{path}:{lineno}") for path in dict.fromkeys(paths) for rec, lineno in iter_jsonl(path)]


class _RecordSource:
    """Reads records into prompt/response documents (``TextDataModule.source``'s duck type)."""

    def __init__(self, module: TeacherTextDataModule) -> None:
        self.m = module

    def describe(self) -> str:
        return f"records={plain(self.m.records)!r}"

    def read(self) -> list[TextDocument]:
        m = self.m
        rows = read_record_files(m.records)
        where = self.describe()
        if not rows:
            raise ValueError(f"{where} holds no records; generate some first.")
        for rec, at in rows:
            missing = [f for f in ("prompt", "completion") if f not in rec]
            if missing:
                raise ValueError(
                    f"{at} has no {missing} field; its fields are {sorted(rec)}. data.records "
                    "takes records written by write_records (prompt, completion, ...)."
                )
        stats = m.record_stats
        stats["records"] = len(rows)
        if not m.keep_truncated:
            kept = [(r, at) for r, at in rows if r.get("finish_reason") != "length"]
            stats["truncated_dropped"] = len(rows) - len(kept)
            if not kept:
                raise ValueError(
                    f"every record of {where} was cut at the teacher's token limit "
                    "(finish_reason='length'); generate with a larger max_new_tokens, or set "
                    "data.keep_truncated=true to train on them anyway."
                )
            if stats["truncated_dropped"]:
                log.warning(
                    "Left out %d of %d records the teacher did not finish (finish_reason='length'); "
                    "data.keep_truncated=true keeps them.",
                    stats["truncated_dropped"],
                    len(rows),
                )
            rows = kept
        if m.accepted_only:
            scored = [(r, at) for r, at in rows if r.get("accepted") is not None]
            if not scored:
                raise ValueError(
                    f"accepted_only=true, but no record of {where} was checked against a "
                    "reference (no 'accepted' value); write the records with references "
                    "(prompts.reference_field=...), or set data.accepted_only=false."
                )
            rows = [(r, at) for r, at in scored if r["accepted"] is True]
            rate = len(rows) / len(scored)
            stats.update(scored=len(scored), accepted=len(rows), acceptance_rate=rate)
            if not rows:
                raise ValueError(
                    f"accepted_only=true leaves no record of {where}: 0 of {len(scored)} checked "
                    f"answers match their reference (acceptance rate {100 * rate:.1f} %); check the "
                    "answer pattern and the references, or set data.accepted_only=false."
                )
            log.info(
                "accepted_only: kept %d of %d checked records (acceptance rate %.1f %%).",
                len(rows),
                len(scored),
                100 * rate,
            )
        if m.target == "answer":
            kept = []
            for rec, at in rows:
                match = find_answer(rec["completion"] or "", _pattern(m.answer_pattern, rec))
                if match is not None and match.group(0).strip():
                    kept.append(({**rec, "completion": match.group(0).strip()}, at))
            stats["no_answer"] = len(rows) - len(kept)
            if not kept:
                raise ValueError(
                    f"target=answer, but no completion of {where} has a final answer the answer "
                    "pattern finds; set data.answer_pattern to the form the teacher used, or use "
                    "data.target=full."
                )
            if stats["no_answer"]:
                log.warning(
                    "target=answer: %d of %d records have no final answer and were left out.",
                    stats["no_answer"],
                    len(rows),
                )
            rows = kept
        if m.max_samples_per_prompt is not None:
            by_prompt: dict[str, list[tuple[dict[str, Any], str]]] = {}
            for rec, at in rows:
                by_prompt.setdefault(str(rec["prompt"]), []).append((rec, at))
            rows = []
            for group in by_prompt.values():
                group.sort(key=lambda item: int(item[0].get("sample_index") or 0))
                rows.extend(group[: m.max_samples_per_prompt])
        docs = []
        for rec, at in rows:
            for field in ("prompt", "completion"):
                if rec[field] is not None and not isinstance(rec[field], str):
                    raise TypeError(f"{at}: {field!r} is a {type(rec[field]).__name__}, not text.")
            slice_ = rec.get("slice")
            docs.append(
                TextDocument(
                    None,
                    rec["prompt"],
                    rec["completion"],
                    str(slice_) if slice_ else DEFAULT_SLICE,
                    at,
                )
            )
        stats["samples"] = len(docs)
        return docs


def _pattern(answer_pattern: str | None, rec: dict[str, Any]) -> str:
    if answer_pattern is not None:
        return answer_pattern
    rationale = (rec.get("generation") or {}).get("rationale") or {}
    return rationale.get("answer_pattern") or DEFAULT_ANSWER_PATTERN


class TeacherTextDataModule(TextDataModule):
    """Teacher-written records as student batches: loss on the teacher's completion only.

    Each record (``write_records`` / ``lightning-distill generate``) becomes one sample: its
    original ``prompt`` as the user turn and its ``completion`` as the answer, rendered with the
    student tokenizer's chat template (with none, the prompt tokens then the completion tokens,
    concatenated), then ``eos``. ``labels`` are ``-100`` on every prompt position. Everything else
    is :class:`~lightning_distill.data.TextDataModule` (rows or packing, truncation, dedupe,
    caching, ``slice`` and ``sample_id`` in every batch), except the split: by a hash of the
    *prompt*, so every sample of a prompt lands in the same split.

    Args:
        records: a records folder (its ``shard-*.jsonl``), JSONL files or globs, or a list of them.
        tokenizer: the student's tokenizer (folder, hub id or object).
        vocab_size: the student's vocabulary size (checked against the tokenizer).
        target: ``"full"``: train on the whole completion (reasoning + answer); ``"answer"``:
            only on its final answer line (the last match of the answer pattern; records without
            one are left out and counted).
        accepted_only: keep only records whose answer matched their reference (rejection
            sampling); an error if none was checked or none matched (it names the rate).
        max_samples_per_prompt: keep at most this many samples of each prompt (lowest
            ``sample_index`` first, after the other filters); ``None``: all.
        keep_truncated: also train on completions the teacher did not finish
            (``finish_reason="length"``); by default they are left out (and counted), since the
            ``eos`` that ends every sample would teach the student to stop mid-answer.
        answer_pattern: the final-answer regular expression for ``target="answer"``; ``None``:
            the records' template's pattern, else a last line ``Answer: ...``.
        chat_template: a Jinja template overriding (or supplying) the tokenizer's.
        seq_len, packing, truncation, add_special_tokens, add_eos, dedupe, batch_size,
            eval_batch_size, val_fraction, test_fraction, split_seed, train_slices,
            max_train_samples, num_workers, seed, cache_dir, progress, revision,
            trust_remote_code: as for :class:`~lightning_distill.data.TextDataModule`
            (``add_special_tokens`` applies to the prompt when there is no chat template).
        generated: refused (``ValueError``): list more records folders in ``records``.

    Raises:
        TypeError, ValueError: a setting of the wrong kind or out of range; ``generated`` set.
            Data problems (no
            records, fields missing, filters that leave nothing) are raised by
            :meth:`prepare_data` / :meth:`setup`, before training.
    """

    def __init__(
        self,
        records: str | os.PathLike | Sequence[str | os.PathLike],
        tokenizer: Any = None,
        vocab_size: int | None = None,
        target: str = "full",
        accepted_only: bool = False,
        max_samples_per_prompt: int | None = None,
        keep_truncated: bool = False,
        answer_pattern: str | None = None,
        chat_template: str | None = None,
        seq_len: int = 1024,
        packing: bool = False,
        truncation: str = "truncate",
        add_special_tokens: bool = True,
        add_eos: bool = True,
        dedupe: bool = True,
        batch_size: int = 8,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        split_seed: int = 0,
        train_slices: Sequence[str] | str | None = None,
        max_train_samples: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | Path | None = None,
        progress: bool = True,
        revision: str | None = None,
        trust_remote_code: bool = False,
        generated: Any = None,
    ) -> None:
        if generated is not None:
            raise ValueError(
                f"generated={generated!r}: TeacherTextDataModule's data is already teacher-written "
                "records; add the folder to records instead (data.records=[<records>, <more records>]). "
                "generated= is for TextDataModule and the demo's data."
            )
        if records is None or (not isinstance(records, str | os.PathLike | Sequence)):
            raise TypeError(
                f"records must be a folder, file or glob (or a list of them), got {type(records).__name__}."
            )
        # plain values only: they go into checkpoints as hyperparameters
        records = plain(records)
        tokenizer = str(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer
        cache_dir = str(cache_dir) if cache_dir is not None else None
        check_choice("target", target, TARGETS)
        check_bool("accepted_only", accepted_only)
        check_int("max_samples_per_prompt", max_samples_per_prompt, low=1, allow_none=True)
        check_bool("keep_truncated", keep_truncated)
        if answer_pattern is not None and not isinstance(answer_pattern, str):
            raise TypeError(
                f"answer_pattern must be a str or None, got {type(answer_pattern).__name__}."
            )
        super().__init__(
            files=records,
            tokenizer=tokenizer,
            vocab_size=vocab_size,
            prompt_field="prompt",
            response_field="completion",
            chat_template=chat_template,
            seq_len=seq_len,
            packing=packing,
            truncation=truncation,
            add_special_tokens=add_special_tokens,
            add_eos=add_eos,
            dedupe=dedupe,
            batch_size=batch_size,
            eval_batch_size=eval_batch_size,
            val_fraction=val_fraction,
            test_fraction=test_fraction,
            split_seed=split_seed,
            train_slices=train_slices,
            max_train_samples=max_train_samples,
            num_workers=num_workers,
            seed=seed,
            cache_dir=cache_dir,
            progress=progress,
            revision=revision,
            trust_remote_code=trust_remote_code,
        )
        # This class's own arguments as the hyperparameters (not the TextDataModule ones it sets)
        self.hparams.clear()
        self.save_hyperparameters(
            ignore=[]
            if tokenizer is None or isinstance(tokenizer, str | os.PathLike)
            else ["tokenizer"]
        )
        self.records = records
        self.target, self.accepted_only = target, bool(accepted_only)
        self.max_samples_per_prompt = max_samples_per_prompt
        self.keep_truncated = bool(keep_truncated)
        self.answer_pattern = answer_pattern
        #: What reading the records kept: ``records``, ``samples``, ``truncated_dropped``, and
        #: with the filters ``scored``/``accepted``/``acceptance_rate`` and ``no_answer``.
        self.record_stats: dict[str, Any] = {}

    @property
    def source(self) -> Any:  # type: ignore[override]
        """The records, read into prompt/response documents after the filters."""
        return _RecordSource(self)

    @property
    def chat(self) -> bool:
        """Whether prompts go through the tokenizer's chat template (else plain concatenation)."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def _data_settings(self) -> dict[str, Any]:
        settings = super()._data_settings()
        settings.setdefault("teacher_text", {"split_by": "prompt", "chat": self.chat})
        return settings

    def _assign(self, docs: list[TextDocument]) -> list[str]:
        """Split by prompt: one stand-in document per prompt draws the split for all its samples."""
        stand_ins: dict[str, TextDocument] = {}
        for d in docs:
            stand_ins.setdefault(
                d.prompt or "", TextDocument(None, d.prompt, "", d.slice, d.source)
            )
        ordered = sorted(stand_ins.values(), key=lambda d: d.key)
        where = assign_by_content(ordered, self.val_fraction, self.test_fraction, self.split_seed)
        split_of = {d.prompt: w for d, w in zip(ordered, where, strict=True)}
        return [split_of[d.prompt or ""] for d in docs]

    def _tokenize(self, docs: list[TextDocument]) -> tuple[list[list[int]], list[list[int]]]:
        """The chat template's rendering where the tokenizer has one, else prompt + completion."""
        if self.chat:
            return super()._tokenize(docs)
        tok = self.tokenizer
        eos = getattr(tok, "eos_token_id", None)
        prompts = _encode(tok, [d.prompt or "" for d in docs], self.add_special_tokens)
        answers = _encode(tok, [d.response or "" for d in docs], False)
        ids, labels = [], []
        for p, r in zip(prompts, answers, strict=True):
            if self.add_eos and eos is not None and (not r or r[-1] != eos):
                r.append(eos)
            ids.append(p + r)
            labels.append([-100] * len(p) + r)
        return ids, labels
