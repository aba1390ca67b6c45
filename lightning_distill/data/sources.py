"""Reading your documents: files, globs and slice mappings, or a Hugging Face dataset.

``.jsonl`` / ``.json`` (one object per line), ``.parquet`` and ``.csv`` / ``.tsv`` are read with
``datasets``, one row = one document; any other file is plain text, one file = one document.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import os
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["DEFAULT_SLICE", "STRUCTURED", "TextDocument", "TextSource"]

#: Extension -> ``datasets`` builder; every other file is read as one plain-text document.
STRUCTURED = {
    ".jsonl": "json",
    ".json": "json",
    ".parquet": "parquet",
    ".csv": "csv",
    ".tsv": "csv",
}
#: Slice name used when the data has no slices.
DEFAULT_SLICE = "all"


@dataclass(frozen=True)
class TextDocument:
    """One document before tokenization."""

    text: str | None  # plain text, or None for an instruction pair
    prompt: str | None
    response: str | None
    slice: str
    source: str  # where it came from, for messages: "data/a.jsonl row 3"
    split: str | None = None  # the dataset's own split, when splits= is used

    @functools.cached_property
    def key(self) -> bytes:
        """SHA-256 of the content (not the slice, the source or the position)."""
        parts = [self.text] if self.text is not None else [self.prompt, self.response]
        return hashlib.sha256(json.dumps(parts, ensure_ascii=False).encode("utf-8")).digest()

    @property
    def empty(self) -> bool:
        """Whether the text (or the response of a pair) is blank."""
        if self.text is not None:
            return not self.text.strip()
        return not (self.response or "").strip()


@dataclass(frozen=True)
class TextSource:
    """Where the documents are and which fields hold what (``TextDataModule``'s reading settings).

    Attributes:
        files: plain (see ``plain``) files setting: path/glob, list, or slice -> path(s)/glob(s).
        dataset: a ``save_to_disk`` folder, a folder of data files or a hub id.
        config: the dataset's configuration name.
        split: the dataset split to read.
        splits: our split -> the dataset's split, to keep the dataset's own splits.
        text_field: the text field.
        slice_field: the field naming each document's slice.
        prompt_field: the prompt field of instruction data.
        response_field: the response field of instruction data.
        hf_cache: ``datasets``' cache folder for local files.
        progress: show ``datasets``' progress bars.
        revision: revision of a hub dataset.
    """

    files: Any
    dataset: str | None
    config: str | None
    split: str | None
    splits: dict[str, str] | None
    text_field: str
    slice_field: str | None
    prompt_field: str | None
    response_field: str | None
    hf_cache: Path
    progress: bool
    revision: str | None

    @property
    def instruct(self) -> bool:
        """Whether documents are prompt/response pairs."""
        return self.prompt_field is not None

    def describe(self) -> str:
        """The source as the user wrote it, for messages."""
        if self.files is not None:
            return f"files={plain(self.files)!r}"
        return f"dataset={self.dataset!r}" + (f" (split {self.split!r})" if self.split else "")

    def read(self) -> list[TextDocument]:
        """Every document of the source, empty ones included, in file/row order.

        Raises:
            FileNotFoundError: on a missing file, a pattern that matches nothing, or a dataset
                that is neither a folder nor a hub id.
            ValueError: on a missing field or split, a row without a slice, or non-UTF-8 text.
            TypeError: on a field that holds no text.
        """
        return self._read_files() if self.files is not None else self._read_dataset()

    def _read_files(self) -> list[TextDocument]:
        if isinstance(self.files, Mapping):
            groups = {str(name): _as_list(patterns) for name, patterns in self.files.items()}
        else:
            groups = {None: _as_list(self.files)}
        docs: list[TextDocument] = []
        for slice_name, patterns in groups.items():
            structured: dict[str, list[Path]] = {}
            for path in _expand(patterns):
                suffix = path.suffix.lower()
                if suffix in STRUCTURED:
                    structured.setdefault(suffix, []).append(path)
                else:
                    docs.append(self._read_text_file(path, slice_name))
            for suffix, paths in structured.items():
                docs.extend(self._read_table(suffix, paths, slice_name))
        return docs

    def _read_text_file(self, path: Path, slice_name: str | None) -> TextDocument:
        if self.instruct or self.slice_field is not None:
            raise ValueError(
                f"{path} is plain text (one file = one document), which has no fields for "
                "prompt_field/response_field/slice_field; use JSONL, Parquet or CSV files."
            )
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as err:
            raise ValueError(f"{path} is not UTF-8 text; convert it or leave it out.") from err
        return TextDocument(text, None, None, slice_name or DEFAULT_SLICE, str(path))

    def _read_table(
        self, suffix: str, paths: list[Path], slice_name: str | None
    ) -> list[TextDocument]:
        """All files of one format in one ``load_dataset`` call (one call per file is ~50x slower)."""
        paths = [p for p in paths if p.stat().st_size]  # an empty file holds no rows (datasets trips on it)
        if not paths:
            return []
        datasets = import_datasets()
        kwargs: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
        with _quiet_datasets(not self.progress):
            table = datasets.load_dataset(
                STRUCTURED[suffix],
                data_files=[str(p) for p in paths],
                split="train",
                cache_dir=str(self.hf_cache),
                **kwargs,
            )
        where = (
            str(paths[0]) if len(paths) == 1 else f"the {len(paths)} {suffix} files {paths[0]}..."
        )
        return self._rows(table, where, slice_name)

    def _read_dataset(self) -> list[TextDocument]:
        datasets = import_datasets()
        name = str(self.dataset)
        local = Path(name).expanduser()
        saved = local.is_dir() and any(
            (local / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
        )
        if saved:  # written by save_to_disk
            data = datasets.load_from_disk(str(local))
        elif local.exists():  # a folder of data files
            data = datasets.load_dataset(str(local), self.config, cache_dir=str(self.hf_cache))
        elif _looks_like_hub_id(name):
            data = datasets.load_dataset(name, self.config, revision=self.revision)
        else:
            raise FileNotFoundError(
                f"dataset={name!r} is neither a folder nor a dataset name; pass a folder written "
                "by save_to_disk, or a hub id such as 'org/name'."
            )
        if isinstance(data, datasets.Dataset):
            data = datasets.DatasetDict({self.split or "train": data})
        available = list(data.keys())
        if self.splits is not None:
            docs = []
            for ours, theirs in self.splits.items():
                if theirs not in data:
                    raise ValueError(
                        f"splits.{ours}={theirs!r} is not a split of dataset={name!r}; its splits are "
                        f"{available}."
                    )
                docs.extend(self._rows(data[theirs], f"{name}[{theirs}]", None, split=ours))
            return docs
        chosen = self.split
        if chosen is None:
            if "train" in data:
                chosen = "train"
            elif len(available) == 1:
                chosen = available[0]
            else:
                raise ValueError(
                    f"dataset={name!r} has splits {available}; choose one with data.split=..., or "
                    "map them with data.splits={train: ..., val: ..., test: ...}."
                )
        if chosen not in data:
            raise ValueError(
                f"split={chosen!r} is not a split of dataset={name!r}; its splits are {available}."
            )
        return self._rows(data[chosen], f"{name}[{chosen}]", None)

    def _rows(
        self, table: Any, where: str, slice_name: str | None, split: str | None = None
    ) -> list[TextDocument]:
        """Documents from a ``datasets.Dataset``'s columns, after checking the fields exist."""
        columns = list(table.column_names)
        needed = (
            {"text_field": self.text_field}
            if not self.instruct
            else {"prompt_field": self.prompt_field, "response_field": self.response_field}
        )
        if self.slice_field is not None:
            needed["slice_field"] = self.slice_field
        for setting, field in needed.items():
            if field not in columns:
                raise ValueError(
                    f"{setting}={field!r} is not a field of {where}; its fields are {columns}. "
                    f"Set data.{setting} to one of them."
                )
        n = len(table)
        slices = (
            [_slice_value(v, where, i) for i, v in enumerate(table[self.slice_field])]
            if self.slice_field is not None
            else [slice_name or DEFAULT_SLICE] * n
        )
        if self.instruct:
            prompts = _strings(table[self.prompt_field], self.prompt_field, where)
            responses = _strings(table[self.response_field], self.response_field, where)
            return [
                TextDocument(None, p, r, s, f"{where} row {i}", split)
                for i, (p, r, s) in enumerate(zip(prompts, responses, slices))
            ]
        texts = _strings(table[self.text_field], self.text_field, where)
        return [
            TextDocument(t, None, None, s, f"{where} row {i}", split)
            for i, (t, s) in enumerate(zip(texts, slices))
        ]


def import_datasets() -> Any:
    """The ``datasets`` package.

    Raises:
        ImportError: with the install command, if it is missing.
    """
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - installed with the `data` extra
        raise ImportError(
            "TextDataModule reads JSONL/Parquet/CSV files and Hugging Face datasets with the "
            "`datasets` package, which is not installed; run `pip install lightning-distill[data]`."
        ) from err
    return datasets


def plain(value: Any) -> Any:
    """Mappings, sequences and paths as plain dicts, lists and strings (for hyperparameters)."""
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, str | os.PathLike):
        return str(value)
    if isinstance(value, Sequence):
        return [plain(v) for v in value]
    return value


@contextlib.contextmanager
def _quiet_datasets(quiet: bool) -> Iterator[None]:
    """Hide ``datasets``' own progress bars while reading, when ours are off."""
    from datasets.utils import logging as ds_logging

    turn_off = quiet and ds_logging.is_progress_bar_enabled()
    if turn_off:
        ds_logging.disable_progress_bar()
    try:
        yield
    finally:
        if turn_off:
            ds_logging.enable_progress_bar()


def _as_list(patterns: Any) -> list[str]:
    if isinstance(patterns, str | os.PathLike):
        return [str(patterns)]
    if isinstance(patterns, Sequence):
        return [str(p) for p in patterns]
    raise TypeError(
        f"files entries must be paths, globs or lists of them, got {type(patterns).__name__}."
    )


def _expand(patterns: list[str]) -> list[Path]:
    paths: list[Path] = []
    for pattern in patterns:
        expanded = os.path.expanduser(pattern)
        if glob.has_magic(expanded):
            found = sorted(p for p in glob.glob(expanded, recursive=True) if os.path.isfile(p))
            if not found:
                raise FileNotFoundError(
                    f"data.files pattern {pattern!r} matches no file (from {os.getcwd()}); check the "
                    "path, or quote it so the shell does not expand it."
                )
            paths.extend(Path(p) for p in found)
        elif os.path.isfile(expanded):
            paths.append(Path(expanded))
        elif os.path.isdir(expanded):
            raise FileNotFoundError(
                f"data.files entry {pattern!r} is a folder; give a glob such as '{pattern}/**/*.jsonl'."
            )
        else:
            raise FileNotFoundError(
                f"data.files entry {pattern!r} does not exist (from {os.getcwd()}); check the path."
            )
    return list(dict.fromkeys(paths))


def _strings(values: list[Any], field: str, where: str) -> list[str | None]:
    out: list[str | None] = []
    for i, v in enumerate(values):
        if v is not None and not isinstance(v, str):
            raise TypeError(
                f"field {field!r} of {where} row {i} is a {type(v).__name__}, not text; pick a text field."
            )
        out.append(v)
    return out


def _slice_value(value: Any, where: str, row: int) -> str:
    if value is None or (isinstance(value, str) and not value):
        raise ValueError(
            f"{where} row {row} has no slice value; fill the slice field in every row."
        )
    return str(value)


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (
        1 <= len(parts) <= 2
        and all(p and not p.startswith(".") for p in parts)
        and not name.startswith(("~", "/"))
    )
