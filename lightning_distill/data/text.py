"""``TextDataModule``: your own text (files or a Hugging Face dataset), tokenized once, cached.

Sources (exactly one):

- ``files``: a path, a glob (``data/*.jsonl``, ``src/**/*.py``) or a list of them; or a mapping
  slice name -> files (``{"prose": "docs/*.md", "code": "src/**/*.py"}``). ``.jsonl`` / ``.json``
  (one object per line), ``.parquet`` and ``.csv`` / ``.tsv`` are read with ``datasets``, one row
  = one document; any other file is plain text, one file = one document.
- ``dataset``: a Hugging Face dataset, a folder written by ``save_to_disk`` or anything
  ``datasets.load_dataset`` takes (a hub id where the network allows, with ``config``).

Each document is plain text (``text_field``) or an instruction pair (``prompt_field`` +
``response_field``), rendered with the tokenizer's chat template and trained on the response
only (prompt positions are ``-100`` in ``labels``). Documents are split into train/val/test by a
salted hash of their content (or the dataset's own splits, ``splits=``), deduplicated, and
tokenized into fixed ``seq_len`` blocks (``packing=True``) or one row per document, truncated
at ``seq_len`` (counted and logged, or refused with ``truncation="error"``).

Batches are exactly those of :class:`~lightning_distill.data.SlicedTextDataModule`:
``input_ids``, ``attention_mask``, ``labels`` (``LongTensor[B, T]``, right-padded), ``slice``
(``list[str]``) and ``sample_id`` (``LongTensor[B]``). Sample ids are 63-bit hashes of content,
so they name the same sample whatever the file order, a subset, the shuffle or the machine:
cached teacher targets stay valid. The tokenized splits are cached on disk as safetensors + JSON
under ``<cache_root>/data/text/<data_fingerprint>/``.
"""

from __future__ import annotations

import contextlib
import functools
import glob
import hashlib
import json
import logging
import os
import shutil
import tempfile
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from lightning_distill.paths import cache_root

from .datamodule import SPLITS, SliceCount

__all__ = ["TextDataModule", "TextDocument", "TextRowDataset", "collate_rows", "vocab_size_of"]

log = logging.getLogger(__name__)

#: Bump when tokenization, splitting or the cache layout changes; part of the fingerprint.
TEXT_FORMAT_VERSION = 1
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
_ID_MASK = (1 << 63) - 1


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


def _sample_id(*parts: bytes) -> int:
    digest = hashlib.sha256(b"lightning-distill/sample/" + b"\0".join(parts)).digest()
    return int.from_bytes(digest[:8], "little") & _ID_MASK


def _import_datasets() -> Any:
    try:
        import datasets
    except ImportError as err:  # pragma: no cover - installed with the `data` extra
        raise ImportError(
            "TextDataModule reads JSONL/Parquet/CSV files and Hugging Face datasets with the "
            "`datasets` package, which is not installed; run `pip install lightning-distill[data]`."
        ) from err
    return datasets


def _load_tokenizer(tokenizer: Any, revision: str | None, trust_remote_code: bool) -> Any:
    if tokenizer is None:
        raise ValueError(
            "data.tokenizer is not set; pass a tokenizer folder or hub id (data.tokenizer=...), or a "
            "teacher with a path (teacher=hf_pretrained teacher.path=...), whose tokenizer is the default."
        )
    if not isinstance(tokenizer, str | os.PathLike):
        return tokenizer  # an already-built tokenizer object
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(tokenizer), revision=revision, trust_remote_code=trust_remote_code
    )


@functools.lru_cache(maxsize=16)
def vocab_size_of(path: str | None) -> int:
    """The vocabulary size a model for ``path``'s tokenizer needs (the ``ld.vocab_size`` resolver).

    A model folder's ``config.json`` ``vocab_size`` wins (it may exceed the tokenizer's length,
    e.g. padded embeddings); otherwise the tokenizer's length.

    Args:
        path: a model or tokenizer folder, or a hub id.

    Raises:
        ValueError: if ``path`` is unset.
    """
    if path is None or str(path) in ("", "None", "null"):
        raise ValueError(
            "data.vocab_size is read from data.tokenizer, which is not set; set data.tokenizer=... "
            "(by default the teacher's: teacher=hf_pretrained teacher.path=...), or give the size "
            "directly with data.vocab_size=N."
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        size = getattr(config, "vocab_size", None)
        if size is None and hasattr(config, "get_text_config"):
            size = getattr(config.get_text_config(), "vocab_size", None)
        if size:
            return int(size)
    except (OSError, ValueError, KeyError):
        pass  # a tokenizer-only folder: its length is the size
    return len(_load_tokenizer(str(path), None, False))


class TextRowDataset(Dataset):
    """Token rows (variable length) with labels, slice and stable sample id.

    Args:
        tokens: flat ``int32`` token ids of all rows.
        labels: flat ``int32`` labels (``-100`` where no loss is taken).
        offsets: ``(N + 1,)`` row boundaries into ``tokens``.
        slice_index: ``(N,)`` index into ``slice_names``.
        sample_ids: ``(N,)`` 63-bit ids, unique within the split.
        slice_names: the data's slice names.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        labels: np.ndarray,
        offsets: np.ndarray,
        slice_index: np.ndarray,
        sample_ids: np.ndarray,
        slice_names: list[str],
    ) -> None:
        self.tokens, self.labels, self.offsets = tokens, labels, offsets
        self.slice_index = torch.as_tensor(slice_index, dtype=torch.long)
        self.sample_ids = torch.as_tensor(sample_ids, dtype=torch.long)
        self.slice_names = list(slice_names)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def lengths(self) -> np.ndarray:
        """Tokens in each row."""
        return np.diff(self.offsets)

    def subset(self, keep: Tensor) -> TextRowDataset:
        """The rows at positions ``keep``, in that order."""
        idx = keep.numpy()
        starts, ends = self.offsets[:-1][idx], self.offsets[1:][idx]
        pieces = [np.arange(s, e) for s, e in zip(starts, ends)]
        flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
        offsets = np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)
        return TextRowDataset(
            self.tokens[flat],
            self.labels[flat],
            offsets,
            self.slice_index[keep].numpy(),
            self.sample_ids[keep].numpy(),
            self.slice_names,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        start, end = int(self.offsets[index]), int(self.offsets[index + 1])
        return {
            "input_ids": torch.from_numpy(self.tokens[start:end].astype(np.int64)),
            "labels": torch.from_numpy(self.labels[start:end].astype(np.int64)),
            "slice": self.slice_names[int(self.slice_index[index])],
            "sample_id": int(self.sample_ids[index]),
        }


@dataclass(frozen=True)
class collate_rows:  # noqa: N801 - used like a function; a class so workers can pickle it
    """Stack rows into a batch, right-padding to the longest row with ``pad_id`` (labels ``-100``).

    Attributes:
        pad_id: token id written at padded positions (masked by ``attention_mask``).
    """

    pad_id: int = 0

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        width = max(len(item["input_ids"]) for item in items)
        input_ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), -100, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            input_ids[row, :n] = item["input_ids"]
            labels[row, :n] = item["labels"]
            mask[row, :n] = 1
        return {
            "input_ids": input_ids,
            "attention_mask": mask,
            "labels": labels,
            "slice": [item["slice"] for item in items],
            "sample_id": torch.tensor([item["sample_id"] for item in items], dtype=torch.long),
        }


class TextDataModule(L.LightningDataModule):
    """Your text, from files or a Hugging Face dataset, as causal-LM batches with slices and ids.

    See the module docstring and ``docs/data.md``. Pipeline: read the documents (:meth:`documents`),
    check the fields, drop empty and duplicate documents, assign each one to a split by a hash of
    its content, tokenize (progress bar), pack or truncate, and write the splits to the cache;
    a later run with the same content, tokenizer and settings reads them back instead.

    Args:
        files: a path or glob, a list of them, or a mapping slice name -> path(s)/glob(s).
        dataset: a Hugging Face dataset: a ``save_to_disk`` folder, or a ``load_dataset`` name.
        config: the dataset's configuration name (``load_dataset(dataset, config)``).
        split: the dataset split to read and split by document (``None``: ``train`` if present,
            else the only split).
        splits: use the dataset's own splits instead: ``{"train": "train", "val": "validation",
            "test": "test"}`` (missing keys stay empty).
        tokenizer: a tokenizer folder or hub id, or a tokenizer object (by default in the CLI the
            teacher's path).
        vocab_size: the model vocabulary this data is for; checked against the tokenizer
            (``None``: the tokenizer's length).
        text_field: the field holding each document's text.
        slice_field: the field naming each document's slice (``None``: one slice, or the keys
            of a ``files`` mapping).
        prompt_field: the prompt field of instruction data (with ``response_field``).
        response_field: the response field; the loss is taken on response tokens only.
        chat_template: a Jinja chat template overriding the tokenizer's (instruction data).
        seq_len: tokens per block (packing) or the maximum row length.
        packing: ``True``: concatenate each split's documents per slice (``eos`` between them)
            and cut ``seq_len`` blocks; ``False``: one row per document, padded per batch.
        truncation: ``"truncate"`` (cut rows at ``seq_len`` and log how many) or ``"error"``.
        add_special_tokens: let the tokenizer add its special tokens (e.g. BOS) to each text.
        add_eos: end each plain-text document with the tokenizer's ``eos`` token.
        dedupe: drop documents whose content repeats an earlier one.
        batch_size: train batch size.
        eval_batch_size: val/test batch size; ``None`` uses ``batch_size``.
        val_fraction: expected share of documents in validation.
        test_fraction: expected share of documents in test.
        split_seed: salt of the document split; change it to draw another split.
        train_slices: slices the train split keeps (``None``: all); val and test keep all.
        max_train_samples: keep at most this many train samples, evenly strided.
        num_workers: dataloader worker processes.
        seed: seed of the train shuffle.
        cache_dir: tokenized-data cache; ``None``: ``<cache_root>/data/text``.
        progress: show a progress bar while tokenizing.
        revision: revision of a hub dataset or tokenizer.
        trust_remote_code: allow a hub tokenizer's own code (off: only for code you have read).

    Raises:
        ValueError: on a missing or doubled source, a field setting that cannot work, or an
            out-of-range setting; data problems (missing file or field, empty data, a row too
            long with ``truncation="error"``) are reported by :meth:`prepare_data` / :meth:`setup`.
    """

    def __init__(
        self,
        files: str | Sequence[str] | Mapping[str, str | Sequence[str]] | None = None,
        dataset: str | None = None,
        config: str | None = None,
        split: str | None = None,
        splits: Mapping[str, str] | None = None,
        tokenizer: Any = None,
        vocab_size: int | None = None,
        text_field: str = "text",
        slice_field: str | None = None,
        prompt_field: str | None = None,
        response_field: str | None = None,
        chat_template: str | None = None,
        seq_len: int = 512,
        packing: bool = True,
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
    ) -> None:
        super().__init__()
        # Plain values only (no DictConfig, no Path): they go into checkpoints as hyperparameters.
        files = _plain(files) if files is not None else None
        splits = _plain(splits) if splits is not None else None
        tokenizer = str(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer
        cache_dir = str(cache_dir) if cache_dir is not None else None
        if (files is None) == (dataset is None):
            raise ValueError(
                "TextDataModule needs exactly one source: files=... (paths, globs, or a mapping "
                f"slice -> files) or dataset=... (a Hugging Face dataset); got files={files!r}, "
                f"dataset={dataset!r}."
            )
        if isinstance(files, Mapping) and slice_field is not None:
            raise ValueError(
                f"files is a mapping slice -> files and slice_field={slice_field!r} is set; use one "
                "way to name slices (drop slice_field, or pass a plain list of files)."
            )
        if (prompt_field is None) != (response_field is None):
            raise ValueError(
                f"prompt_field={prompt_field!r} and response_field={response_field!r}: instruction "
                "data needs both (or neither, for plain text in text_field)."
            )
        if splits is not None:
            if dataset is None:
                raise ValueError("splits= names a dataset's own splits; it needs dataset=...")
            unknown = [k for k in splits if k not in SPLITS]
            if unknown:
                raise ValueError(f"splits has keys {unknown}; use {list(SPLITS)}.")
            if "train" not in splits:
                raise ValueError(f"splits={dict(splits)} has no 'train' entry; add train: <split>.")
        if truncation not in ("truncate", "error"):
            raise ValueError(f"truncation={truncation!r}; use 'truncate' or 'error'.")
        for name, value, minimum in (
            ("seq_len", seq_len, 2),
            ("batch_size", batch_size, 1),
            ("num_workers", num_workers, 0),
        ):
            _check_int(name, value, minimum)
        if eval_batch_size is not None:
            _check_int("eval_batch_size", eval_batch_size, 1)
        if max_train_samples is not None:
            _check_int("max_train_samples", max_train_samples, 1)
        for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
            if not 0.0 <= value < 1.0:
                raise ValueError(f"{name}={value} is outside [0, 1); pass a fraction such as 0.05.")
        if val_fraction + test_fraction >= 1.0:
            raise ValueError(
                f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves nothing to "
                "train on; keep their sum below 1."
            )
        if isinstance(train_slices, str):
            train_slices = [train_slices]
        if train_slices is not None:
            train_slices = [str(name) for name in train_slices]
            if not train_slices:
                raise ValueError("train_slices=[] selects no training data; pass None for all.")

        self.save_hyperparameters(
            ignore=[] if tokenizer is None or isinstance(tokenizer, str) else ["tokenizer"]
        )
        self.files = files
        self.dataset_name = dataset
        self.config, self.split, self.splits = config, split, dict(splits) if splits else None
        self._tokenizer_arg = tokenizer
        self.vocab_size = vocab_size
        self.text_field, self.slice_field = text_field, slice_field
        self.prompt_field, self.response_field = prompt_field, response_field
        self.chat_template = chat_template
        self.seq_len, self.packing, self.truncation = seq_len, bool(packing), truncation
        self.add_special_tokens, self.add_eos, self.dedupe = add_special_tokens, add_eos, dedupe
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.val_fraction, self.test_fraction, self.split_seed = (
            val_fraction,
            test_fraction,
            split_seed,
        )
        self.train_slices = train_slices
        self.max_train_samples = max_train_samples
        self.num_workers, self.seed = num_workers, seed
        self._cache_dir = cache_dir
        self.progress = progress
        self.revision, self.trust_remote_code = revision, trust_remote_code

        self._tokenizer: Any = None
        self._docs: list[TextDocument] | None = None
        self._slices: list[str] | None = None
        self._settings: dict[str, Any] | None = None
        self._datasets: dict[str, TextRowDataset] | None = None
        self._full_train: TextRowDataset | None = None
        self.stats: dict[str, Any] = {}
        #: ``"built"`` or ``"loaded"`` once :meth:`setup` ran: whether tokenization ran.
        self.cache_status: str | None = None

    # ------------------------------------------------------------------ properties

    @property
    def instruct(self) -> bool:
        """Whether documents are prompt/response pairs."""
        return self.prompt_field is not None

    @property
    def cache_dir(self) -> Path:
        """Folder of the tokenized-data cache."""
        if self._cache_dir is not None:
            return Path(self._cache_dir).expanduser()
        return cache_root() / "data" / "text"

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first access); the CLI exports it with the student."""
        if self._tokenizer is None:
            tok = _load_tokenizer(self._tokenizer_arg, self.revision, self.trust_remote_code)
            if self.chat_template is not None:
                tok.chat_template = self.chat_template
            if self.vocab_size is not None and len(tok) > self.vocab_size:
                raise ValueError(
                    f"the tokenizer has {len(tok)} tokens but data.vocab_size={self.vocab_size}; "
                    "ids past the model's vocabulary cannot be scored. Use the model's tokenizer, "
                    f"or set vocab_size >= {len(tok)}."
                )
            limit = getattr(tok, "model_max_length", None)
            if isinstance(limit, int) and limit < 1_000_000 and self.seq_len > limit:
                warnings.warn(
                    f"seq_len={self.seq_len} exceeds the tokenizer's model_max_length={limit}; "
                    "the model may not handle rows that long (lower data.seq_len).",
                    stacklevel=2,
                )
            self._tokenizer = tok
        return self._tokenizer

    @property
    def slices(self) -> list[str]:
        """Slice names (sorted), read from the data on first access."""
        self._load_documents()
        assert self._slices is not None
        return list(self._slices)

    @property
    def data_fingerprint(self) -> str:
        """Short hex digest of what the samples are: content, tokenizer, tokenization, split rule.

        It ignores ``train_slices``, ``max_train_samples``, batch sizes, workers and the shuffle
        seed, so a (split, ``sample_id``) pair names the same sample for every data module with
        this fingerprint; it keys the tokenized-data cache and teacher caches.
        """
        return _digest(self._data_settings())

    @property
    def fingerprint(self) -> str:
        """:attr:`data_fingerprint` plus ``train_slices`` and ``max_train_samples``."""
        return _digest(
            {
                **self._data_settings(),
                "train_slices": sorted(self.train_slices) if self.train_slices else None,
                "max_train_samples": self.max_train_samples,
            }
        )

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Read, tokenize and cache the data (rank 0 under DDP); a no-op when cached."""
        key = self.data_fingerprint
        if not (self.cache_dir / key / "meta.json").is_file():
            self._build(self.cache_dir / key)

    def setup(self, stage: str | None = None) -> None:
        """Load the tokenized splits from the cache (building it first if needed).

        Args:
            stage: Lightning's stage name; ignored (every split is loaded).
        """
        if self._datasets is not None:
            return
        folder = self.cache_dir / self.data_fingerprint
        if not (folder / "meta.json").is_file():
            self._build(folder)
        elif self.cache_status is None:
            self.cache_status = "loaded"
            log.info("Tokenized data read from the cache %s", folder)
        try:
            meta, loaded = _read_cache(folder)
        except Exception as err:  # a damaged cache folder: it is only a cache, rebuild it
            log.warning(
                "The tokenized-data cache %s is unreadable (%s); rebuilding it.", folder, err
            )
            shutil.rmtree(folder, ignore_errors=True)
            self._build(folder)
            meta, loaded = _read_cache(folder)
        self.stats = meta["stats"]
        self._report(self.stats)
        self._datasets = {}
        for split in SPLITS:
            dataset = loaded[split]
            if split == "train":
                self._full_train = dataset
                dataset = self._train_subset(self.train_slices)
            self._datasets[split] = dataset
        for split in SPLITS:
            log.info("%s split: %s", split, dict(self.slice_counts(split)))

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded by ``seed``) batches of ``train_slices``, last partial batch dropped."""
        return self._train_loader(self.dataset("train"), self.batch_size, self.seed)

    def train_dataloader_for(
        self,
        slices: Sequence[str] | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> DataLoader:
        """Train batches of chosen slices, whatever ``train_slices`` says (e.g. for a teacher).

        Args:
            slices: slices to serve; ``None`` serves all of them.
            batch_size: batch size; ``None`` uses ``batch_size``.
            seed: shuffle seed; ``None`` uses ``seed``.

        Raises:
            ValueError: on an unknown slice name, or fewer samples than one batch.
        """
        if isinstance(slices, str):
            slices = [slices]
        if slices is not None:
            _check_slice_names("slices", list(slices), self.slices)
        self.setup()
        return self._train_loader(
            self._train_subset(None if slices is None else list(slices)),
            batch_size or self.batch_size,
            self.seed if seed is None else seed,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed order."""
        return self._loader(self.dataset("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed order."""
        return self._loader(self.dataset("test"), self.eval_batch_size, shuffle=False)

    # ------------------------------------------------------------------ queries

    def dataset(self, split: str) -> TextRowDataset:
        """One split's dataset, running :meth:`setup` first if needed.

        Raises:
            ValueError: on a split name other than train/val/test.
        """
        if split not in SPLITS:
            raise ValueError(f"Unknown split {split!r}; use one of {list(SPLITS)}.")
        self.setup()
        assert self._datasets is not None
        return self._datasets[split]

    def slice_counts(self, split: str) -> dict[str, SliceCount]:
        """Samples and tokens (without padding) per slice in one split."""
        dataset = self.dataset(split)
        lengths = torch.from_numpy(dataset.lengths().astype(np.int64))
        n = len(dataset.slice_names)
        counts = torch.bincount(dataset.slice_index, minlength=n).tolist()
        tokens = torch.bincount(dataset.slice_index, weights=lengths.double(), minlength=n).tolist()
        return {
            name: SliceCount(c, int(t))
            for name, c, t in zip(dataset.slice_names, counts, tokens, strict=True)
        }

    def documents(self) -> list[TextDocument]:
        """The documents after reading, checking and dropping empty ones (before dedupe)."""
        self._load_documents()
        assert self._docs is not None
        return list(self._docs)

    # ------------------------------------------------------------------ reading

    def _load_documents(self) -> None:
        if self._docs is not None:
            return
        docs = self._read_files() if self.files is not None else self._read_dataset()
        empty = sum(1 for d in docs if _is_empty(d))
        docs = [d for d in docs if not _is_empty(d)]
        where = self._describe_source()
        if not docs:
            raise ValueError(
                f"{where} holds no documents"
                + (f" ({empty} rows, all empty)" if empty else "")
                + "; point data.files / data.dataset at data with text in it."
            )
        if empty:
            log.warning("Skipped %d empty documents of %s.", empty, where)
        slices = sorted({d.slice for d in docs})
        if self.slice_field is not None and len(slices) == 1:
            warnings.warn(
                f"slice_field={self.slice_field!r} has one value only ({slices[0]!r}) in {where}; "
                "the per-slice report will have one row. Check the field, or drop slice_field.",
                stacklevel=2,
            )
        if self.train_slices:
            _check_slice_names("train_slices", self.train_slices, slices)
        self._docs, self._slices = docs, slices
        self.stats["empty_documents"] = empty

    def _describe_source(self) -> str:
        if self.files is not None:
            return f"files={_plain(self.files)!r}"
        return f"dataset={self.dataset_name!r}" + (f" (split {self.split!r})" if self.split else "")

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
        datasets = _import_datasets()
        kwargs: dict[str, Any] = {"delimiter": "\t"} if suffix == ".tsv" else {}
        with _quiet_datasets(not self.progress):
            table = datasets.load_dataset(
                STRUCTURED[suffix],
                data_files=[str(p) for p in paths],
                split="train",
                cache_dir=str(self.cache_dir / "hf"),
                **kwargs,
            )
        where = (
            str(paths[0]) if len(paths) == 1 else f"the {len(paths)} {suffix} files {paths[0]}..."
        )
        return self._rows(table, where, slice_name)

    def _read_dataset(self) -> list[TextDocument]:
        datasets = _import_datasets()
        name = str(self.dataset_name)
        local = Path(name).expanduser()
        saved = local.is_dir() and any(
            (local / f).is_file() for f in ("dataset_info.json", "state.json", "dataset_dict.json")
        )
        if saved:  # written by save_to_disk
            data = datasets.load_from_disk(str(local))
        elif local.exists():  # a folder of data files
            data = datasets.load_dataset(
                str(local), self.config, cache_dir=str(self.cache_dir / "hf")
            )
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

    # ------------------------------------------------------------------ building

    def _data_settings(self) -> dict[str, Any]:
        if self._settings is not None:
            return self._settings
        content = hashlib.sha256()
        for doc in sorted(self.documents(), key=_order):
            content.update(doc.key)
            content.update(f"\0{doc.slice}\0{doc.split}\n".encode())
        tok = self.tokenizer
        self._settings = {
            "format": TEXT_FORMAT_VERSION,
            "content": content.hexdigest()[:16],
            "tokenizer": _tokenizer_fingerprint(tok),
            "chat_template": getattr(tok, "chat_template", None) if self.instruct else None,
            "instruct": self.instruct,
            "seq_len": self.seq_len,
            "packing": self.packing,
            "truncation": self.truncation,
            "add_special_tokens": self.add_special_tokens,
            "add_eos": self.add_eos,
            "dedupe": self.dedupe,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            "split_seed": self.split_seed,
            "own_splits": self.splits is not None,
        }
        return self._settings

    def _build(self, folder: Path) -> None:
        started = time.perf_counter()
        docs = sorted(self.documents(), key=_order)
        duplicates = 0
        if self.dedupe:
            unique: dict[bytes, TextDocument] = {}
            for doc in docs:
                if doc.key in unique:
                    duplicates += 1
                else:
                    unique[doc.key] = doc
            docs = list(unique.values())
        assignment = self._assign(docs)
        ids, labels = self._tokenize(docs)
        slices = self.slices
        arrays: dict[str, dict[str, np.ndarray]] = {}
        stats: dict[str, Any] = {
            "documents": len(docs),
            "duplicates_dropped": duplicates,
            "empty_documents": self.stats.get("empty_documents", 0),
            "truncated_rows": 0,
            "truncated_tokens": 0,
            "rows_without_labels": 0,
            "tail_tokens_dropped": 0,
            "tokens_in": int(sum(len(x) for x in ids)),
            "empty_slices": [],
        }
        groups: dict[tuple[str, str], list[int]] = {}
        for i, doc in enumerate(docs):
            groups.setdefault((assignment[i], doc.slice), []).append(i)
        for split in SPLITS:
            rows_tok, rows_lab, row_slice, row_ids = [], [], [], []
            for s_index, name in enumerate(slices):
                chosen = groups.get((split, name), [])
                if self.packing:
                    made = self._pack(chosen, ids, labels, name, stats)
                else:
                    made = self._one_row_each(chosen, docs, ids, labels, stats)
                if chosen and not made:
                    stats["empty_slices"].append(f"{split}/{name}")
                for tok, lab, sid in made:
                    rows_tok.append(tok)
                    rows_lab.append(lab)
                    row_ids.append(sid)
                    row_slice.append(s_index)
            arrays[split] = _flatten(rows_tok, rows_lab, row_slice, row_ids)
        stats["seconds"] = round(time.perf_counter() - started, 3)
        stats["documents_per_split"] = {
            s: sum(1 for i in range(len(docs)) if assignment[i] == s) for s in SPLITS
        }
        meta = {
            "format": TEXT_FORMAT_VERSION,
            "slices": slices,
            "stats": stats,
            "settings": self._data_settings(),
            "source": _plain(self.files)
            if self.files is not None
            else {
                "dataset": self.dataset_name,
                "config": self.config,
                "split": self.split,
                "splits": self.splits,
            },
        }
        _write_cache(folder, arrays, meta)
        self.cache_status = "built"
        log.info(
            "Tokenized %d documents (%d tokens) in %.2f s; cached in %s",
            len(docs),
            stats["tokens_in"],
            stats["seconds"],
            folder,
        )

    def _assign(self, docs: list[TextDocument]) -> list[str]:
        """Each document's split: its own, or by a salted hash of its content."""
        if self.splits is not None:
            return [d.split or "train" for d in docs]
        salt = f"lightning-distill/split/{self.split_seed}/".encode()
        where = []
        for doc in docs:
            u = int.from_bytes(hashlib.sha256(salt + doc.key).digest()[:8], "little") / 2**64
            where.append(
                "val"
                if u < self.val_fraction
                else "test"
                if u < self.val_fraction + self.test_fraction
                else "train"
            )
        # A slice's split asked for but left empty by the draw takes one of the slice's train
        # documents (if train keeps one): the first in content-hash order, a stable choice.
        for name in {d.slice for d in docs}:
            mine = [i for i, d in enumerate(docs) if d.slice == name]
            for split, fraction in (("val", self.val_fraction), ("test", self.test_fraction)):
                train = [i for i in mine if where[i] == "train"]
                if fraction > 0 and all(where[i] != split for i in mine) and len(train) > 1:
                    where[train[0]] = split
        return where

    def _tokenize(self, docs: list[TextDocument]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and labels per document, in chunks, with a progress bar."""
        from tqdm.auto import tqdm

        tok = self.tokenizer
        eos = getattr(tok, "eos_token_id", None)
        chunk = 1000
        ids: list[list[int]] = []
        labels: list[list[int]] = []
        bar = tqdm(
            total=len(docs), desc="Tokenizing", unit="doc", disable=not self.progress, leave=False
        )
        try:
            for start in range(0, len(docs), chunk):
                part = docs[start : start + chunk]
                if self.instruct:
                    for doc in part:
                        x, y = self._encode_pair(doc)
                        ids.append(x)
                        labels.append(y)
                else:
                    for x in _encode(tok, [d.text for d in part], self.add_special_tokens):
                        if self.add_eos and eos is not None and (not x or x[-1] != eos):
                            x.append(eos)
                        ids.append(x)
                        labels.append(x)
                bar.update(len(part))
        finally:
            bar.close()
        return ids, labels

    def _encode_pair(self, doc: TextDocument) -> tuple[list[int], list[int]]:
        tok = self.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ValueError(
                "prompt_field/response_field need a chat template, and this tokenizer has none; "
                "pass data.chat_template='<jinja template>' or use a tokenizer that has one."
            )
        user = [{"role": "user", "content": doc.prompt or ""}]
        prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
        full = tok.apply_chat_template(
            [*user, {"role": "assistant", "content": doc.response}], tokenize=False
        )
        if not full.startswith(prompt):
            raise ValueError(
                "the chat template renders the prompt differently with and without the response, "
                f"so the response tokens cannot be found ({doc.source}); pass data.chat_template= a "
                "template whose generation prompt is a prefix of the full conversation."
            )
        p_ids, r_ids = _encode(tok, [prompt, full[len(prompt) :]], False)
        eos = getattr(tok, "eos_token_id", None)
        if self.add_eos and eos is not None and (not r_ids or r_ids[-1] != eos):
            r_ids.append(eos)  # the student learns where an answer ends
        return p_ids + r_ids, [-100] * len(p_ids) + r_ids

    def _pack(
        self,
        chosen: list[int],
        ids: list[list[int]],
        labels: list[list[int]],
        name: str,
        stats: dict[str, Any],
    ) -> list[tuple[np.ndarray, np.ndarray, int]]:
        if not chosen:
            return []
        stream = np.concatenate([np.asarray(ids[i], dtype=np.int32) for i in chosen])
        lab = np.concatenate([np.asarray(labels[i], dtype=np.int32) for i in chosen])
        n = len(stream) // self.seq_len
        stats["tail_tokens_dropped"] += int(len(stream) - n * self.seq_len)
        blocks = stream[: n * self.seq_len].reshape(n, self.seq_len)
        lab_blocks = lab[: n * self.seq_len].reshape(n, self.seq_len)
        out, seen = [], {}
        for b in range(n):
            content = blocks[b].tobytes()
            k = seen.get(content, 0)  # a block repeated verbatim gets its own id
            seen[content] = k + 1
            sid = _sample_id(b"block", name.encode(), content, str(k).encode())
            if self.instruct and (lab_blocks[b] == -100).all():
                stats["rows_without_labels"] += 1
                continue
            out.append((blocks[b], lab_blocks[b], sid))
        return out

    def _one_row_each(
        self,
        chosen: list[int],
        docs: list[TextDocument],
        ids: list[list[int]],
        labels: list[list[int]],
        stats: dict[str, Any],
    ) -> list[tuple[np.ndarray, np.ndarray, int]]:
        out = []
        for i in chosen:
            x, y = ids[i], labels[i]
            if len(x) > self.seq_len:
                if self.truncation == "error":
                    raise ValueError(
                        f"{docs[i].source} has {len(x)} tokens, more than seq_len={self.seq_len}; "
                        "raise data.seq_len, shorten the row, or set data.truncation=truncate "
                        "(rows are cut and counted) or data.packing=true."
                    )
                stats["truncated_rows"] += 1
                stats["truncated_tokens"] += len(x) - self.seq_len
                x, y = x[: self.seq_len], y[: self.seq_len]
            if self.instruct and all(v == -100 for v in y):
                stats["rows_without_labels"] += 1  # the prompt fills the whole row
                continue
            out.append(
                (
                    np.asarray(x, dtype=np.int32),
                    np.asarray(y, dtype=np.int32),
                    _sample_id(b"row", docs[i].key),
                )
            )
        return out

    def _report(self, stats: dict[str, Any]) -> None:
        if stats.get("duplicates_dropped"):
            log.info("Dropped %d duplicate documents (dedupe=true).", stats["duplicates_dropped"])
        if stats.get("truncated_rows"):
            warnings.warn(
                f"{stats['truncated_rows']} of {stats['documents']} rows were longer than "
                f"seq_len={self.seq_len} and were truncated ({stats['truncated_tokens']} tokens cut); "
                "raise data.seq_len, use data.packing=true, or data.truncation=error to refuse them.",
                stacklevel=2,
            )
        if stats.get("empty_slices"):
            warnings.warn(
                f"{stats['empty_slices']} (split/slice) have documents but no sample: their text is "
                f"shorter than one seq_len={self.seq_len} block; raise data.val_fraction / "
                "data.test_fraction, lower data.seq_len, or use data.packing=false.",
                stacklevel=2,
            )
        if stats.get("rows_without_labels"):
            warnings.warn(
                f"{stats['rows_without_labels']} samples had no token to train on (a prompt that "
                f"fills seq_len={self.seq_len}) and were left out; raise data.seq_len.",
                stacklevel=2,
            )

    # ------------------------------------------------------------------ loaders

    def _train_subset(self, slices: list[str] | None) -> TextRowDataset:
        full = self._full_train
        assert full is not None
        keep = torch.arange(len(full))
        if slices is not None:
            wanted = torch.tensor([full.slice_names.index(name) for name in slices])
            keep = keep[torch.isin(full.slice_index, wanted)]
        if self.max_train_samples is not None and len(keep) > self.max_train_samples:
            cap = self.max_train_samples
            keep = keep[(torch.arange(cap) * len(keep)) // cap]
        return full.subset(keep)

    def _train_loader(self, dataset: TextRowDataset, batch_size: int, seed: int) -> DataLoader:
        if len(dataset) < batch_size:
            raise ValueError(
                f"The train split has {len(dataset)} samples, fewer than batch_size={batch_size}; "
                "lower data.batch_size, lower data.seq_len, or add data."
            )
        generator = torch.Generator().manual_seed(seed)
        return self._loader(dataset, batch_size, shuffle=True, generator=generator)

    def _loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool, **kwargs: Any
    ) -> DataLoader:
        if self.num_workers > 0:
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        tok = self.tokenizer
        pad = getattr(tok, "pad_token_id", None)
        if pad is None:
            pad = getattr(tok, "eos_token_id", None) or 0
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=collate_rows(int(pad)),
            **kwargs,
        )


# ---------------------------------------------------------------------------------- helpers


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


def _encode(tok: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: one (multi-threaded) Rust call for the chunk
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets
        return [enc.ids for enc in encode(texts, add_special_tokens=add_special_tokens)]
    out = tok(
        texts, add_special_tokens=add_special_tokens, return_attention_mask=False, verbose=False
    )
    return [list(x) for x in out["input_ids"]]


def _tokenizer_fingerprint(tok: Any) -> str:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:
        blob = backend.to_str()
    else:
        blob = f"{type(tok).__name__}:{len(tok)}:{sorted(tok.get_vocab().items())[:1000]}"
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def _flatten(
    tokens: list[np.ndarray], labels: list[np.ndarray], slices: list[int], ids: list[int]
) -> dict[str, np.ndarray]:
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    sample_ids = np.array(ids, dtype=np.int64)
    if len(np.unique(sample_ids)) != len(sample_ids):  # pragma: no cover - 63-bit collision
        raise RuntimeError("two samples got the same id; report this with the data that caused it.")
    return {
        "tokens": np.concatenate(tokens).astype(np.int32) if tokens else np.zeros(0, np.int32),
        "labels": np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "slice_index": np.array(slices, dtype=np.int64),
        "sample_ids": sample_ids,
    }


def _write_cache(
    folder: Path, arrays: dict[str, dict[str, np.ndarray]], meta: dict[str, Any]
) -> None:
    """Write every split and ``meta.json`` into a temporary folder, then rename it into place."""
    from safetensors.numpy import save_file

    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{folder.name}."))
    try:
        for split, data in arrays.items():
            save_file(data, str(tmp / f"{split}.safetensors"))
        (tmp / "meta.json").write_text(json.dumps(meta, indent=2, default=str))
        try:
            os.replace(tmp, folder)
        except OSError:  # another process finished first: theirs is the same data
            if not (folder / "meta.json").is_file():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(folder: Path) -> tuple[dict[str, Any], dict[str, TextRowDataset]]:
    from safetensors.numpy import load_file

    meta = json.loads((folder / "meta.json").read_text())
    loaded = {}
    for split in SPLITS:
        arrays = load_file(str(folder / f"{split}.safetensors"))
        keys = ("tokens", "labels", "offsets", "slice_index", "sample_ids")
        loaded[split] = TextRowDataset(*(arrays[k] for k in keys), meta["slices"])
    return meta, loaded


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


def _order(doc: TextDocument) -> tuple[bytes, str, str]:
    return doc.key, doc.slice, doc.split or ""


def _is_empty(doc: TextDocument) -> bool:
    if doc.text is not None:
        return not doc.text.strip()
    return not (doc.response or "").strip()


def _looks_like_hub_id(name: str) -> bool:
    parts = name.split("/")
    return (
        1 <= len(parts) <= 2
        and all(p and not p.startswith(".") for p in parts)
        and not name.startswith(("~", "/"))
    )


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, str | os.PathLike):
        return str(value)
    if isinstance(value, Sequence):
        return [_plain(v) for v in value]
    return value


def _digest(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _check_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; pass an integer >= {minimum}.")


def _check_slice_names(what: str, names: list[str], known: list[str]) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"Unknown {what} {unknown}; this data has slices {known}.")
