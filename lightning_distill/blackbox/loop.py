"""The coverage loop: prompts for the slices a run fell short on, and what the teacher wrote for them.

1. ``lightning-distill experiment=demo_prose_only`` writes ``coverage.json``; it flags ``code``.
2. :func:`prompts_from_run` reads that report and the run's saved config, rebuilds the run's data
   module and cuts prompts from the flagged slices' *training* documents (never val/test text);
   ``lightning-distill generate prompts=from_run prompts.run_dir=<run>`` has a teacher answer them.
3. ``data.generated=<records folder>`` adds the teacher-written documents to the train split of
   the next run (:func:`generated_documents`, :func:`generated_lineage`).
"""

from __future__ import annotations

import hashlib
import json
import random
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from lightning_distill.blackbox.prompts import Prompt
from lightning_distill.blackbox.writer import read_records, shard_paths
from lightning_distill.validation import check_int

__all__ = [
    "LINEAGE_NAME",
    "generated_documents",
    "generated_lineage",
    "generated_records",
    "load_run_config",
    "prompts_from_run",
]

#: The lineage file ``lightning-distill generate`` writes into a records folder.
LINEAGE_NAME = "generation.json"


def load_run_config(run_dir: str | Path) -> dict[str, Any]:
    """The config a ``lightning-distill`` run was composed to, as plain values.

    Read from ``<run_dir>/.hydra/config.yaml`` (Hydra's dump, when the run directory is Hydra's
    output directory) or else ``<run_dir>/student/distillation.json`` (the exported student's
    record, written wherever ``output_dir`` pointed).

    Raises:
        FileNotFoundError: neither file exists.
    """
    from omegaconf import OmegaConf

    import lightning_distill.cli  # noqa: F401 - registers the ld.* resolvers

    run_dir = Path(run_dir)
    dumped = run_dir / ".hydra" / "config.yaml"
    if dumped.is_file():
        cfg = OmegaConf.load(dumped)
        cfg.output_dir = str(run_dir)  # ${hydra:runtime.output_dir} resolves only inside that run
        return OmegaConf.to_container(cfg, resolve=True)  # type: ignore[return-value]
    record = run_dir / "student" / "distillation.json"
    if record.is_file():
        config = json.loads(record.read_text()).get("config")
        if isinstance(config, dict):
            return config
    raise FileNotFoundError(
        f"{run_dir} holds neither .hydra/config.yaml nor student/distillation.json, so its data "
        "config is unknown; point at the directory of a `lightning-distill` run (run it with "
        "hydra.run.dir=<dir>, or with export=true, the default)."
    )


def _coverage(run_dir: Path) -> dict[str, Any]:
    path = run_dir / "coverage.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} does not exist; it is written by `lightning-distill` runs with the CoverageSlices "
            "callback (callbacks=default, the default), in the run directory. Run the distillation "
            "first and pass its directory as run_dir."
        )
    return json.loads(path.read_text())


def prompts_from_run(
    run_dir: str | Path,
    *,
    slices: Sequence[str] | str | None = None,
    per_slice: int = 64,
    prompt_tokens: int = 64,
    min_chars: int = 40,
    seed: int = 0,
) -> list[Prompt]:
    """Prompts cut from the training documents of the slices a run's coverage report flags.

    Each prompt starts at the beginning of a non-blank line of a *train* document of the slice
    (never val or test text) and holds the next ``prompt_tokens`` tokens of the run's tokenizer.
    Start lines are drawn without replacement by ``seed``, spread over the slice's documents;
    repeated texts are dropped, so a small slice can give fewer than ``per_slice`` prompts.
    The run's data is the demo's (``SlicedTextDataModule``) or your own (``TextDataModule``, its
    files read again from their saved paths); for instruction data (prompt/response pairs) the
    prompts are the slice's training prompts as they are (``prompt_tokens`` and ``min_chars`` do
    not apply), drawn by ``seed``.

    Args:
        run_dir: a ``lightning-distill`` run directory (with ``coverage.json``).
        slices: the slices to draw from; ``None``: the gaps of ``coverage.json``.
        per_slice: prompts per slice.
        prompt_tokens: tokens per prompt.
        min_chars: a start line needs at least this many characters of text after it.
        seed: the draw.

    Returns:
        ``Prompt(text, slice=...)`` s, slice by slice.

    Raises:
        FileNotFoundError: no ``coverage.json`` or no saved config in ``run_dir``.
        ValueError: no slice flagged and none given; an unknown slice name; a slice with no
            training text.
        TypeError: the run's data module has no documents to cut prompts from.
    """
    run_dir = Path(run_dir)
    per_slice = check_int("per_slice", per_slice, low=1)
    prompt_tokens = check_int("prompt_tokens", prompt_tokens, low=1)
    min_chars = check_int("min_chars", min_chars, low=1)
    seed = check_int("seed", seed)
    coverage = _coverage(run_dir)
    known = [row["slice"] for row in coverage.get("slices") or []]
    if slices is None:
        chosen = list(coverage.get("gaps") or [])
        if not chosen:
            raise ValueError(
                f"{run_dir / 'coverage.json'} flags no coverage gap (slices {known}); pass "
                "slices=[<name>] (prompts.slices=[...] on the command line) to draw prompts for "
                "chosen slices anyway."
            )
    else:
        chosen = [slices] if isinstance(slices, str) else [str(s) for s in slices]
        unknown = [s for s in chosen if s not in known]
        if unknown:
            raise ValueError(f"unknown slice(s) {unknown}; {run_dir} has slices {known}.")
    datamodule = _run_datamodule(run_dir)
    from lightning_distill.data.text import TextDataModule

    if isinstance(datamodule, TextDataModule):
        train_docs = datamodule.train_documents()
        if datamodule.instruct:  # the slice's training prompts, as they are
            return _training_prompts(train_docs, chosen, per_slice, seed, run_dir)
        texts = {name: [d.text or "" for d in train_docs if d.slice == name] for name in chosen}
    elif hasattr(datamodule, "document_ids") and isinstance(
        getattr(type(datamodule), "documents", None), property
    ):
        datamodule.prepare_data()
        train_ids = set(datamodule.document_ids("train"))
        texts = {
            name: [d.text for d in datamodule.documents if d.slice == name and d.id in train_ids]
            for name in chosen
        }
    else:
        raise TypeError(
            f"prompts_from_run cuts prompts from documents; {type(datamodule).__name__} does not "
            "list them per split (SlicedTextDataModule and TextDataModule do). Use prompts from a "
            "JSONL file instead."
        )
    tokenizer = datamodule.tokenizer
    prompts: list[Prompt] = []
    for name in chosen:
        starts = [
            (text, i)
            for text in texts[name]
            for i in _line_starts(text)
            if text[i:].strip() and len(text) - i >= min_chars and text[i] != "\n"
        ]
        if not starts:
            raise ValueError(
                f"slice {name!r} has no training text of at least {min_chars} characters in {run_dir}'s "
                "data; lower min_chars or pick another slice."
            )
        rng = random.Random(f"{seed}/{name}")
        rng.shuffle(starts)
        seen: set[str] = set()
        for doc_text, start in starts:
            window = doc_text[start : start + 16 * prompt_tokens]
            ids = tokenizer(window, add_special_tokens=False)["input_ids"][:prompt_tokens]
            text = tokenizer.decode(ids)
            if not text.strip() or text in seen:
                continue
            seen.add(text)
            prompts.append(Prompt(text, slice=name))
            if len(seen) == per_slice:
                break
    return prompts


def _training_prompts(
    docs: Sequence[Any], chosen: list[str], per_slice: int, seed: int, run_dir: Path
) -> list[Prompt]:
    """Up to ``per_slice`` distinct training prompts of each chosen slice, drawn by ``seed``."""
    prompts: list[Prompt] = []
    for name in chosen:
        texts = list(
            dict.fromkeys(d.prompt for d in docs if d.slice == name and (d.prompt or "").strip())
        )
        if not texts:
            raise ValueError(
                f"slice {name!r} has no training prompt in {run_dir}'s data; pick another slice."
            )
        random.Random(f"{seed}/{name}").shuffle(texts)
        prompts.extend(Prompt(text, slice=name) for text in texts[:per_slice])
    return prompts


def _line_starts(text: str) -> list[int]:
    starts = [0]
    pos = text.find("\n")
    while pos != -1 and pos + 1 < len(text):
        starts.append(pos + 1)
        pos = text.find("\n", pos + 1)
    return starts


def _run_datamodule(run_dir: Path) -> Any:
    """The run's data module (not prepared), rebuilt from its config, without generated data and train filters."""
    import hydra

    config = load_run_config(run_dir)
    data = dict(config.get("data") or {})
    if "_target_" not in data:
        raise ValueError(
            f"the config of {run_dir} has no data._target_; it is not a lightning-distill run."
        )
    data.pop("generated", None)  # prompts come from the real training text only
    data["train_slices"] = None
    return hydra.utils.instantiate(data)


# ---------------------------------------------------------------------------- generated data


def _folders(generated: str | Path | Sequence[str | Path]) -> list[Path]:
    if isinstance(generated, str | Path):
        generated = [generated]
    if not isinstance(generated, Sequence):
        raise TypeError(
            f"generated must be a records folder or a list of them, got {type(generated).__name__}."
        )
    folders = []
    for item in generated:
        if not isinstance(item, str | Path):
            raise TypeError(f"generated holds {type(item).__name__}; give records folders (paths).")
        path = Path(item).expanduser()
        if not path.is_dir() or not shard_paths(path):
            raise FileNotFoundError(
                f"generated={str(item)!r} is not a folder of teacher records (shard-*.jsonl); write "
                "one with `lightning-distill generate out=<folder>` or write_records()."
            )
        folders.append(path)
    return folders


def generated_records(
    generated: str | Path | Sequence[str | Path], slices: Sequence[str]
) -> tuple[list[tuple[str, str, str]], str]:
    """The teacher-written (slice, prompt, completion) triples of records folders and their fingerprint.

    A record with ``"accepted": false`` (from a rationale filter) is left out. Records come in a
    fixed order (folder, then ``prompt_id``, then ``sample_index``), whatever the shard layout.

    Args:
        generated: a records folder or a list of them.
        slices: the slice names the data has; every record's slice must be one of them.

    Returns:
        ``([(slice, prompt, completion), ...], fingerprint)``: the fingerprint hashes slice,
        prompt and completion of every record used.

    Raises:
        FileNotFoundError: a folder with no records.
        ValueError: a record without a slice or with a slice the data does not have.
        TypeError: ``generated`` is not a path or a list of paths.
    """
    out: list[tuple[str, str, str]] = []
    digest = hashlib.sha256()
    for folder in _folders(generated):
        records = sorted(
            read_records(folder), key=lambda r: (r["prompt_id"], int(r["sample_index"]))
        )
        for rec in records:
            if rec.get("accepted") is False:
                continue
            name = rec.get("slice")
            if name is None:
                raise ValueError(
                    f"a record of {folder} (prompt {rec['prompt_id']}) has no slice; the train split "
                    "needs one per document. Write the records from prompts with slices."
                )
            if name not in slices:
                raise ValueError(
                    f"a record of {folder} has slice {name!r}, which this data does not have "
                    f"(slices {list(slices)}); generate for this data's slices."
                )
            out.append((name, rec["prompt"], rec["completion"]))
            for part in (name, rec["prompt"], rec["completion"]):
                digest.update(part.encode("utf-8") + b"\x1f")
    return out, digest.hexdigest()[:16]


def generated_documents(
    generated: str | Path | Sequence[str | Path], slices: Sequence[str]
) -> tuple[list[tuple[str, str]], str]:
    """The teacher-written documents of records folders and their fingerprint.

    One document per record of :func:`generated_records`: its prompt followed by its completion.

    Args:
        generated: a records folder or a list of them.
        slices: the slice names the data has; every record's slice must be one of them.

    Returns:
        ``([(slice, text), ...], fingerprint)``, the fingerprint of :func:`generated_records`.

    Raises:
        FileNotFoundError, ValueError, TypeError: as :func:`generated_records`.
    """
    records, fingerprint = generated_records(generated, slices)
    return [(name, prompt + completion) for name, prompt, completion in records], fingerprint


def generated_lineage(generated: str | Path | Sequence[str | Path]) -> list[dict[str, Any]]:
    """What a distillation card records about each records folder of ``generated``.

    Per folder: its path, the number of records and, per slice, records, prompts and accepted
    records (when a filter marked them); the teacher identity and generation settings of its
    records; and, from ``generation.json`` when ``lightning-distill generate`` wrote it, the
    source run and the ``terms`` of the teacher's provider.

    Raises:
        FileNotFoundError, TypeError: as :func:`generated_documents`.
    """
    out = []
    for folder in _folders(generated):
        records = read_records(folder)
        per_slice: dict[str, dict[str, Any]] = {}
        teachers: list[Any] = []
        settings: list[Any] = []
        for rec in records:
            entry = per_slice.setdefault(str(rec.get("slice")), {"records": 0, "prompts": set()})
            entry["records"] += 1
            entry["prompts"].add(rec["prompt_id"])
            if "accepted" in rec:
                entry["accepted"] = entry.get("accepted", 0) + int(bool(rec["accepted"]))
            for seen, value in ((teachers, rec.get("teacher")), (settings, rec.get("generation"))):
                if value not in seen:
                    seen.append(value)
        for entry in per_slice.values():
            entry["prompts"] = len(entry["prompts"])
            if "accepted" in entry:
                entry["acceptance"] = round(entry["accepted"] / entry["records"], 4)
        lineage_file = folder / LINEAGE_NAME
        lineage = json.loads(lineage_file.read_text()) if lineage_file.is_file() else {}
        out.append(
            {
                "path": str(folder.resolve()),
                "records": len(records),
                "slices": per_slice,
                "teacher": teachers[0] if len(teachers) == 1 else teachers,
                "generation": settings[0] if len(settings) == 1 else settings,
                "source_run": lineage.get("source_run"),
                "terms": lineage.get("terms"),
                "created_at": lineage.get("created_at"),
            }
        )
    return out
