"""Prompts for a teacher to answer: the one record every prompt source returns.

A prompt source is any callable returning ``list[Prompt]``. Two read files:
:func:`prompts_from_jsonl` (JSONL files or globs) and :func:`prompts_from_dataset` (a Hugging Face
``datasets`` dataset, a ``save_to_disk`` folder included); ``conf/prompts/*.yaml`` name them.
"""

from __future__ import annotations

import inspect
import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lightning_distill.validation import check_bool, check_int

__all__ = ["Prompt", "prompts_from_dataset", "prompts_from_jsonl"]


@dataclass(frozen=True)
class Prompt:
    """One prompt for the teacher.

    Attributes:
        text: what the teacher is asked (before any rationale template is applied).
        slice: the slice the prompt belongs to (for per-slice counts and the coverage loop), or
            ``None``.
        reference: a reference answer for the rejection filter of rationales, or ``None``.
    """

    text: str
    slice: str | None = None
    reference: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Prompt.text must be a string, got {type(self.text).__name__}")
        if not self.text.strip():
            raise ValueError("Prompt.text is empty; drop empty prompts before asking the teacher")
        for name in ("slice", "reference"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(
                    f"Prompt.{name} must be a string or None, got {type(value).__name__}"
                )


def prompts_from_jsonl(
    files: str | os.PathLike | Sequence[str | os.PathLike],
    *,
    prompt_field: str = "prompt",
    slice_field: str | None = None,
    reference_field: str | None = None,
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts from JSONL files (one JSON object a line), in file and line order.

    Args:
        files: a path or glob (``prompts/*.jsonl``, ``**`` included), or a list of them.
        prompt_field: the field holding each prompt's text.
        slice_field: the field naming each prompt's slice, or ``None`` (no slices).
        reference_field: the field holding each prompt's reference answer (for the rationale
            filter), or ``None``.
        limit: keep the first ``limit`` prompts (``None``: all).

    Raises:
        FileNotFoundError: a path that does not exist, a folder, or a glob that matches nothing.
        ValueError: a line that is not a JSON object, a field missing from a row (the fields the
            row has are listed), an empty prompt, or no prompts at all.
        TypeError: a field that holds no text.
    """
    from lightning_distill.data.sources import _as_list, _expand

    limit = check_int("limit", limit, low=1, allow_none=True)
    rows: list[tuple[dict[str, Any], str]] = []
    try:
        paths = _expand(_as_list(files))
    except FileNotFoundError as err:  # the data module's message, with this setting's name
        raise FileNotFoundError(str(err).replace("data.files", "prompts.files")) from None
    for path in paths:
        with open(path, encoding="utf-8") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as err:
                    raise ValueError(
                        f"{path}:{lineno} is not valid JSON ({err}); repair that line."
                    ) from err
                if not isinstance(row, dict):
                    raise ValueError(
                        f"{path}:{lineno} is not a JSON object; write one object a line."
                    )
                rows.append((row, f"{path}:{lineno}"))
                if limit is not None and len(rows) >= limit:
                    break
        if limit is not None and len(rows) >= limit:
            break
    where = f"files={_plain_files(files)!r}"
    return _prompts(rows, where, prompt_field, slice_field, reference_field)


def prompts_from_dataset(
    name_or_path: str | os.PathLike,
    *,
    split: str | None = None,
    config: str | None = None,
    prompt_field: str = "prompt",
    slice_field: str | None = None,
    reference_field: str | None = None,
    revision: str | None = None,
    trust_remote_code: bool = False,
    limit: int | None = None,
) -> list[Prompt]:
    """Prompts from a Hugging Face ``datasets`` dataset, in row order.

    Args:
        name_or_path: a folder written by ``save_to_disk`` (``Dataset`` or ``DatasetDict``), a
            folder of data files, or a hub id (``org/name``, where the network allows).
        split: the split to read (``None``: ``train`` if present, else the only split).
        config: the dataset's configuration name.
        prompt_field: the field holding each prompt's text.
        slice_field: the field naming each prompt's slice, or ``None``.
        reference_field: the field holding each prompt's reference answer, or ``None``.
        revision: the revision of a hub dataset.
        trust_remote_code: allow a hub dataset's loading script (off: only for code you have read;
            ``datasets`` 4 and later run no loading scripts, so there it changes nothing).
        limit: keep the first ``limit`` prompts (``None``: all).

    Raises:
        FileNotFoundError: a name that is neither a folder nor a hub id.
        ValueError: an unknown split or field (the available ones are listed), an empty prompt,
            or no prompts at all.
        TypeError: a field that holds no text.
    """
    from lightning_distill.data.sources import _looks_like_hub_id, import_datasets

    limit = check_int("limit", limit, low=1, allow_none=True)
    datasets = import_datasets()
    name = str(name_or_path)
    local = Path(name).expanduser()
    saved = local.is_dir() and any(
        (local / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
    )
    check_bool("trust_remote_code", trust_remote_code)
    # `datasets` >= 4 runs no loading scripts and has no such argument: nothing to allow there
    accepts = "trust_remote_code" in inspect.signature(datasets.load_dataset).parameters
    extra: dict[str, Any] = {"trust_remote_code": True} if trust_remote_code and accepts else {}
    if saved:
        data = datasets.load_from_disk(str(local))
    elif local.exists():
        data = datasets.load_dataset(str(local), config, **extra)
    elif _looks_like_hub_id(name):
        data = datasets.load_dataset(name, config, revision=revision, **extra)
    else:
        raise FileNotFoundError(
            f"dataset {name!r} is neither a folder nor a dataset name; pass a folder written by "
            "save_to_disk, or a hub id such as 'org/name'."
        )
    if isinstance(data, datasets.Dataset):
        if split is not None and split != "train":
            raise ValueError(
                f"split={split!r}: {name!r} is a single dataset without splits; drop split= or "
                "pass split='train'."
            )
        table, where = data, name
    else:
        available = list(data.keys())
        chosen = split
        if chosen is None:
            if "train" in data:
                chosen = "train"
            elif len(available) == 1:
                chosen = available[0]
            else:
                raise ValueError(
                    f"dataset {name!r} has splits {available}; choose one with split=..."
                )
        if chosen not in data:
            raise ValueError(
                f"split={chosen!r} is not a split of {name!r}; its splits are {available}."
            )
        table, where = data[chosen], f"{name}[{chosen}]"
    columns = list(table.column_names)
    for setting, field in (
        ("prompt_field", prompt_field),
        ("slice_field", slice_field),
        ("reference_field", reference_field),
    ):
        if field is not None and field not in columns:
            raise ValueError(
                f"{setting}={field!r} is not a field of {where}; its fields are {columns}. "
                f"Set {setting} to one of them."
            )
    if limit is not None:
        table = table.select(range(min(limit, len(table))))
    wanted = [f for f in (prompt_field, slice_field, reference_field) if f is not None]
    table = table.select_columns(wanted)
    rows = [(row, f"{where} row {i}") for i, row in enumerate(table)]
    return _prompts(rows, where, prompt_field, slice_field, reference_field)


def _prompts(
    rows: list[tuple[dict[str, Any], str]],
    where: str,
    prompt_field: str,
    slice_field: str | None,
    reference_field: str | None,
) -> list[Prompt]:
    if not rows:
        raise ValueError(f"{where} holds no rows; point it at data with prompts in it.")
    out = []
    for row, at in rows:
        for setting, field in (
            ("prompt_field", prompt_field),
            ("slice_field", slice_field),
            ("reference_field", reference_field),
        ):
            if field is not None and field not in row:
                raise ValueError(
                    f"{setting}={field!r} is not a field of {at}; its fields are {sorted(row)}. "
                    f"Set {setting} to one of them."
                )
        text = _text(row[prompt_field], prompt_field, at)
        if text is None or not text.strip():
            raise ValueError(f"{at} has an empty {prompt_field!r}; fill it or drop that row.")
        slice_ = (
            None if slice_field is None else _text(row[slice_field], slice_field, at, number=True)
        )
        ref = (
            None
            if reference_field is None
            else _text(row[reference_field], reference_field, at, number=True)
        )
        out.append(Prompt(text, slice_ or None, ref))
    return out


def _text(value: Any, field: str, at: str, number: bool = False) -> str | None:
    """A field's value as text; numbers (answers, slice ids) are written as text when allowed."""
    if value is None or isinstance(value, str):
        return value
    if number and isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    raise TypeError(
        f"field {field!r} of {at} is a {type(value).__name__}, not text; pick a text field."
    )


def _plain_files(files: Any) -> Any:
    if isinstance(files, str | os.PathLike):
        return str(files)
    return [str(f) for f in files]
