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

With ``teacher_tokenizer`` (a teacher whose tokenizer differs from the student's), each sample
holds both tokenizations of the same text, aligned (:mod:`lightning_distill.data.aligned`), and
batches carry the keys of :class:`~lightning_distill.data.CrossTokenizerDataModule`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import time
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from lightning_distill.cache.fingerprint import tokenizer_fingerprint
from lightning_distill.paths import cache_root

from ..validation import check_int
from .aligned import (
    Group,
    block_content,
    check_fast,
    collate_aligned,
    cut_blocks,
    encode_aligned,
    fit_row,
    flatten_aligned,
)
from .base import SPLITS, SplitDataModule, check_fractions, check_generated, check_slice_names
from .blocks import TextRowDataset, collate_rows, flatten_rows, pack_blocks, rows_per_document
from .encode import load_tokenizer, text_tokenizer_fingerprint, tokenize_documents, vocab_size_of
from .sources import TextDocument, TextSource, plain
from .splits import assign_by_content, sample_id
from .store import read_splits, write_splits

__all__ = ["TextDataModule", "TextDocument", "TextRowDataset", "collate_rows", "vocab_size_of"]

log = logging.getLogger(__name__)

#: Bump when tokenization, splitting or the cache layout changes; part of the fingerprint.
TEXT_FORMAT_VERSION = 1
#: Bump when the samples of two tokenizations change (``teacher_tokenizer``); in their fingerprint.
ALIGNED_FORMAT_VERSION = 1


class TextDataModule(SplitDataModule):
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
        generated: teacher-written records (a folder of ``shard-*.jsonl``, or a list of them,
            e.g. from ``lightning-distill generate``) added to the *train* split only, each as a
            document of its record's slice: prompt + completion as text (plain text), or a
            prompt/response pair with the loss on the completion only (instruction data).
            Records marked ``"accepted": false`` are left out; the student's train split keeps
            them whatever ``train_slices`` says; with ``dedupe`` one that repeats a document
            (or an earlier record) is dropped. They are part of :attr:`data_fingerprint`;
            :attr:`generated_lineage` says where they came from.
        teacher_tokenizer: the teacher's tokenizer (a folder or hub id, or a fast tokenizer
            object) when it differs from the student's (``tokenizer``): samples then carry both
            tokenizations, aligned by character offsets and cut between aligned groups, with
            the batch keys of :class:`~lightning_distill.data.CrossTokenizerDataModule`
            (``docs/cross_tokenizer.md``); plain text only. ``None``: one tokenizer.
        teacher_seq_len: with ``teacher_tokenizer``, the most teacher tokens per sample
            (``None``: ``seq_len``).

    Raises:
        ValueError: on a missing or doubled source, a field setting that cannot work, or an
            out-of-range setting; data problems (missing file or field, empty data, a row too
            long with ``truncation="error"``) are reported by :meth:`prepare_data` / :meth:`setup`.
            ``teacher_tokenizer`` with instruction data.
        TypeError: a ``teacher_tokenizer`` that is not a name/path or a fast tokenizer (a slow
            student ``tokenizer`` with it: at :meth:`setup`).
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
        generated: str | Sequence[str] | None = None,
        teacher_tokenizer: Any = None,
        teacher_seq_len: int | None = None,
    ) -> None:
        super().__init__()
        # Plain values only (no DictConfig, no Path): they go into checkpoints as hyperparameters.
        files = plain(files) if files is not None else None
        generated = check_generated(plain(generated) if generated is not None else None)
        splits = plain(splits) if splits is not None else None
        tokenizer = str(tokenizer) if isinstance(tokenizer, os.PathLike) else tokenizer
        if isinstance(teacher_tokenizer, os.PathLike):
            teacher_tokenizer = str(teacher_tokenizer)
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
        check_int("seq_len", seq_len, low=2)
        check_int("teacher_seq_len", teacher_seq_len, low=2, allow_none=True)
        if teacher_tokenizer is not None:
            _check_teacher_tokenizer(teacher_tokenizer, prompt_field)
        check_fractions(val_fraction, test_fraction)
        train_slices = self._serving(
            batch_size, eval_batch_size, num_workers, seed, train_slices, max_train_samples
        )

        self.save_hyperparameters(
            ignore=[
                name
                for name, value in (("tokenizer", tokenizer), ("teacher_tokenizer", teacher_tokenizer))
                if value is not None and not isinstance(value, str)
            ]
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
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.split_seed = split_seed
        self._cache_dir = cache_dir
        self.progress = progress
        self.revision, self.trust_remote_code = revision, trust_remote_code
        self.generated = generated
        self._generated: tuple[list[tuple[str, str, str]], str] | None = None
        self._teacher_tokenizer_arg = teacher_tokenizer
        self.teacher_seq_len = teacher_seq_len or seq_len
        self._teacher_tokenizer: Any = None

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
    def aligned(self) -> bool:
        """Whether samples carry two tokenizations (``teacher_tokenizer`` is set)."""
        return self._teacher_tokenizer_arg is not None

    @property
    def cache_dir(self) -> Path:
        """Folder of the tokenized-data cache."""
        if self._cache_dir is not None:
            return Path(self._cache_dir).expanduser()
        return cache_root() / "data" / "text"

    @property
    def source(self) -> TextSource:
        """Where the documents are read from, and which fields hold what."""
        return TextSource(
            files=self.files,
            dataset=self.dataset_name,
            config=self.config,
            split=self.split,
            splits=self.splits,
            text_field=self.text_field,
            slice_field=self.slice_field,
            prompt_field=self.prompt_field,
            response_field=self.response_field,
            hf_cache=self.cache_dir / "hf",
            progress=self.progress,
            revision=self.revision,
        )

    @property
    def tokenizer(self) -> Any:
        """The tokenizer (loaded on first access); the CLI exports it with the student."""
        if self._tokenizer is None:
            tok = load_tokenizer(self._tokenizer_arg, self.revision, self.trust_remote_code)
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
            if self.aligned:
                check_fast("tokenizer (the student's)", tok)
            self._tokenizer = tok
        return self._tokenizer

    @property
    def teacher_tokenizer(self) -> Any:
        """The teacher's tokenizer (loaded on first access), or ``None`` without ``teacher_tokenizer``.

        Raises:
            ValueError: it cannot be loaded (a missing folder, an unknown name, code to trust).
            TypeError: it is not a fast tokenizer (no character offsets).
        """
        if self._teacher_tokenizer is None and self.aligned:
            arg = self._teacher_tokenizer_arg
            try:
                tok = load_tokenizer(arg, self.revision, self.trust_remote_code)
            except (OSError, ValueError) as err:
                raise ValueError(
                    f"data.teacher_tokenizer={arg!r} cannot be loaded ({err}). Pass the teacher's "
                    "tokenizer folder or hub id (usually the teacher's path, data.teacher_tokenizer="
                    "${teacher.path}); data.trust_remote_code=true only for tokenizer code you have read."
                ) from err
            self._teacher_tokenizer = check_fast("data.teacher_tokenizer", tok)
        return self._teacher_tokenizer

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
            meta, loaded = read_splits(folder)
        except Exception as err:  # a damaged cache folder: it is only a cache, rebuild it
            log.warning(
                "The tokenized-data cache %s is unreadable (%s); rebuilding it.", folder, err
            )
            shutil.rmtree(folder, ignore_errors=True)
            self._build(folder)
            meta, loaded = read_splits(folder)
        self.stats = meta["stats"]
        self._report(self.stats)
        if self.generated is not None:  # the teacher-written samples come last in train
            self._real_train_size = len(loaded["train"]) - int(self.stats["generated"]["samples"])
        self._serve(loaded)

    def documents(self) -> list[TextDocument]:
        """The documents after reading, checking and dropping empty ones (before dedupe)."""
        self._load_documents()
        assert self._docs is not None
        return list(self._docs)

    # ------------------------------------------------------------------ reading

    def _load_documents(self) -> None:
        if self._docs is not None:
            return
        source = self.source
        docs = source.read()
        empty = sum(1 for d in docs if d.empty)
        docs = [d for d in docs if not d.empty]
        where = source.describe()
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
            check_slice_names("train_slices", self.train_slices, slices)
        self._docs, self._slices = docs, slices
        self.stats["empty_documents"] = empty

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
            "tokenizer": text_tokenizer_fingerprint(tok),
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
            **({"generated": self._generated_records()[1]} if self.generated is not None else {}),
            **(self._aligned_settings() if self.aligned else {}),
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
        if self.aligned:  # each document as aligned groups of both tokenizations; no labels apart
            ids, labels = self._align(docs), []
            tokens_in = sum(len(g[0]) for groups in ids for g in groups)
        else:
            ids, labels = self._tokenize(docs)
            tokens_in = sum(len(x) for x in ids)
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
            "tokens_in": int(tokens_in),
            "empty_slices": [],
            **({"dropped_groups": 0} if self.aligned else {}),
        }
        groups: dict[tuple[str, str], list[int]] = {}
        for i, doc in enumerate(docs):
            groups.setdefault((assignment[i], doc.slice), []).append(i)
        for split in SPLITS:
            rows, row_slice = [], []
            for s_index, name in enumerate(slices):
                chosen = groups.get((split, name), [])
                made = self._samples(chosen, docs, ids, labels, name, stats)
                if chosen and not made:
                    stats["empty_slices"].append(f"{split}/{name}")
                rows.extend(made)
                row_slice.extend([s_index] * len(made))
            if split == "train" and self.generated is not None:
                made, made_slice = self._generated_samples(docs, stats)
                rows.extend(made)
                row_slice.extend(made_slice)
            arrays[split] = (flatten_aligned if self.aligned else flatten_rows)(rows, row_slice)
        stats["seconds"] = round(time.perf_counter() - started, 3)
        stats["documents_per_split"] = {
            s: sum(1 for i in range(len(docs)) if assignment[i] == s) for s in SPLITS
        }
        meta = {
            "format": TEXT_FORMAT_VERSION,
            **({"aligned": True} if self.aligned else {}),
            "slices": slices,
            "stats": stats,
            "settings": self._data_settings(),
            "source": plain(self.files)
            if self.files is not None
            else {
                "dataset": self.dataset_name,
                "config": self.config,
                "split": self.split,
                "splits": self.splits,
            },
        }
        write_splits(folder, arrays, meta)
        self.cache_status = "built"
        log.info(
            "Tokenized %d documents (%d tokens) in %.2f s; cached in %s",
            len(docs),
            stats["tokens_in"],
            stats["seconds"],
            folder,
        )

    def _assign(self, docs: list[TextDocument]) -> list[str]:
        """Each document's split (a subclass may group documents, e.g. by prompt)."""
        if self.splits is not None:
            return [d.split or "train" for d in docs]
        return assign_by_content(docs, self.val_fraction, self.test_fraction, self.split_seed)

    def _tokenize(self, docs: list[TextDocument]) -> tuple[list[list[int]], list[list[int]]]:
        """Token ids and labels of each document (a subclass may encode differently)."""
        return tokenize_documents(
            self.tokenizer,
            docs,
            self.instruct,
            self.add_special_tokens,
            self.add_eos,
            self.progress,
        )

    def train_documents(self) -> list[TextDocument]:
        """The documents of the train split (after dedupe), as :meth:`setup` assigns them; no records.

        For prompts cut from the training text only (the coverage loop), never val/test text.
        """
        docs = sorted(self.documents(), key=_order)
        if self.dedupe:
            unique: dict[bytes, TextDocument] = {}
            for doc in docs:
                unique.setdefault(doc.key, doc)
            docs = list(unique.values())
        assignment = self._assign(docs)
        return [d for d, where in zip(docs, assignment, strict=True) if where == "train"]

    # ------------------------------------------------------------------ teacher-written records

    def _generated_records(self) -> tuple[list[tuple[str, str, str]], str]:
        if self._generated is None:
            from lightning_distill.blackbox.loop import generated_records

            assert self.generated is not None
            self._generated = generated_records(self.generated, self.slices)
        return self._generated

    def _generated_samples(
        self, docs: list[TextDocument], stats: dict[str, Any]
    ) -> tuple[list[tuple[np.ndarray, np.ndarray, int]], list[int]]:
        """The train samples of the records (``generated``), slice by slice, and their slice indices.

        Tokenized like the data's documents, packed or one row each, but apart from them, so the
        data's samples keep their ids; the records' sample ids are in a namespace of their own.
        """
        records, _ = self._generated_records()
        seen = {d.key for d in docs} if self.dedupe else set()
        gen_docs, keys, repeats = [], [], {}
        for name, prompt, completion in records:
            where = f"{name} record {len(gen_docs)} of data.generated"
            doc = (
                TextDocument(None, prompt, completion, name, where)
                if self.instruct
                else TextDocument(prompt + completion, None, None, name, where)
            )
            if self.dedupe and doc.key in seen:
                continue
            seen.add(doc.key)
            k = repeats.get(doc.key, 0)  # without dedupe, a repeated record gets its own id
            repeats[doc.key] = k + 1
            gen_docs.append(doc)
            keys.append(hashlib.sha256(b"generated\0" + doc.key + str(k).encode()).digest())
        if self.aligned:
            ids, labels = (self._align(gen_docs) if gen_docs else []), []
        else:
            ids, labels = self._tokenize(gen_docs) if gen_docs else ([], [])
        rows: list[tuple[np.ndarray, np.ndarray, int]] = []
        row_slice: list[int] = []
        counts: dict[str, int] = {}
        for s_index, name in enumerate(self.slices):
            chosen = [i for i, d in enumerate(gen_docs) if d.slice == name]
            if not chosen:
                continue
            if self.aligned:  # ids apart from the data's samples: a namespace of their own
                made = self._aligned_samples(  # type: ignore[assignment]
                    chosen, gen_docs, ids, name, stats, keys, b"generated-"  # type: ignore[arg-type]
                )
            elif self.packing:
                made = pack_blocks(
                    [ids[i] for i in chosen],
                    [labels[i] for i in chosen],
                    self.seq_len,
                    name,
                    stats,
                    drop_unlabelled=self.instruct,
                )
                # ids apart from the data's blocks: a namespace of their own
                made = [(x, y, sample_id(b"generated", str(sid).encode())) for x, y, sid in made]
            else:
                made = rows_per_document(
                    [ids[i] for i in chosen],
                    [labels[i] for i in chosen],
                    [keys[i] for i in chosen],
                    [gen_docs[i].source for i in chosen],
                    self.seq_len,
                    self.truncation,
                    stats,
                    drop_unlabelled=self.instruct,
                )
            rows.extend(made)
            row_slice.extend([s_index] * len(made))
            counts[name] = len(made)
        stats["generated"] = {
            "records": len(records),
            "documents": len(gen_docs),
            "duplicates_dropped": len(records) - len(gen_docs),
            "samples": len(rows),
            "samples_per_slice": counts,
        }
        return rows, row_slice

    def _samples(
        self,
        chosen: list[int],
        docs: list[TextDocument],
        ids: list[list[int]],
        labels: list[list[int]],
        name: str,
        stats: dict[str, Any],
    ) -> list[tuple[np.ndarray, np.ndarray, int]]:
        """The samples of the documents ``chosen`` (of one split and slice): blocks or rows."""
        if self.aligned:
            return self._aligned_samples(chosen, docs, ids, name, stats)  # type: ignore[arg-type,return-value]
        x = [ids[i] for i in chosen]
        y = [labels[i] for i in chosen]
        if self.packing:
            return pack_blocks(x, y, self.seq_len, name, stats, drop_unlabelled=self.instruct)
        return rows_per_document(
            x,
            y,
            [docs[i].key for i in chosen],
            [docs[i].source for i in chosen],
            self.seq_len,
            self.truncation,
            stats,
            drop_unlabelled=self.instruct,
        )

    # ------------------------------------------------------------------ two tokenizations

    def _aligned_settings(self) -> dict[str, Any]:
        """What the second tokenization adds to :attr:`data_fingerprint`."""
        return {
            "aligned_format": ALIGNED_FORMAT_VERSION,
            "teacher_tokenizer": tokenizer_fingerprint(self.teacher_tokenizer),
            "teacher_seq_len": self.teacher_seq_len,
        }

    def _eos_pair(self) -> tuple[int | None, int | None]:
        """Both tokenizers' ``eos`` ids (with ``add_eos``), or ``(None, None)`` if either has none."""
        if not self.add_eos:
            return None, None
        s_eos = getattr(self.tokenizer, "eos_token_id", None)
        t_eos = getattr(self.teacher_tokenizer, "eos_token_id", None)
        if s_eos is None or t_eos is None:
            who = "student's (data.tokenizer)" if s_eos is None else "teacher's (data.teacher_tokenizer)"
            warnings.warn(
                f"the {who} tokenizer has no eos token, so documents end without an end-of-text "
                "token on either side (both must have one to align it); set data.add_eos=false "
                "to silence this, or give that tokenizer an eos_token.",
                stacklevel=3,
            )
            return None, None
        return int(s_eos), int(t_eos)

    def _align(self, docs: list[TextDocument]) -> list[list[Group]]:
        """Each document's aligned groups of both tokenizations (then an end-of-text group)."""
        s_eos, t_eos = self._eos_pair()
        return encode_aligned(
            [d.text or "" for d in docs],
            self.tokenizer,
            self.teacher_tokenizer,
            s_eos,
            t_eos,
            self.progress,
        )

    def _aligned_samples(
        self,
        chosen: list[int],
        docs: list[TextDocument],
        groups: list[list[Group]],
        name: str,
        stats: dict[str, Any],
        keys: list[bytes] | None = None,
        prefix: bytes = b"",
    ) -> list[tuple[list[Group], int]]:
        """Blocks (``packing``) or rows of aligned groups, cut between groups within both limits.

        Row ids hash ``keys[i]`` (default: each document's content key); ``prefix`` starts every
        id's namespace (the teacher-written records' ``b"generated-"``).

        Raises:
            ValueError: a row longer than either limit with ``truncation="error"``.
        """
        if self.packing:
            stream = [g for i in chosen for g in groups[i]]
            blocks, dropped = cut_blocks(stream, self.seq_len, self.teacher_seq_len)
            stats["dropped_groups"] += dropped
            out, seen = [], {}
            for block in blocks:
                content = block_content(block)
                k = seen.get(content, 0)  # a block repeated verbatim gets its own id
                seen[content] = k + 1
                sid = sample_id(prefix + b"aligned-block", name.encode(), content, str(k).encode())
                out.append((block, sid))
            return out
        rows = []
        for i in chosen:
            kept = fit_row(groups[i], self.seq_len, self.teacher_seq_len)
            if len(kept) < len(groups[i]):
                n_s = sum(len(g[0]) for g in groups[i])
                n_t = sum(len(g[1]) for g in groups[i])
                if self.truncation == "error":
                    raise ValueError(
                        f"{docs[i].source} has {n_s} student / {n_t} teacher tokens, more than "
                        f"seq_len={self.seq_len} / teacher_seq_len={self.teacher_seq_len}; raise "
                        "data.seq_len / data.teacher_seq_len, shorten the row, or set "
                        "data.truncation=truncate (rows are cut and counted) or data.packing=true."
                    )
                stats["truncated_rows"] += 1
                stats["truncated_tokens"] += n_s - sum(len(g[0]) for g in kept)
            if len(kept) < 2:  # group 0 is never scored: nothing to train on
                stats["rows_without_labels"] += 1
                continue
            key = docs[i].key if keys is None else keys[i]
            rows.append((kept, sample_id(prefix + b"aligned-row", key)))
        return rows

    def _report(self, stats: dict[str, Any]) -> None:
        if stats.get("duplicates_dropped"):
            log.info("Dropped %d duplicate documents (dedupe=true).", stats["duplicates_dropped"])
        limit = f"seq_len={self.seq_len}"
        if self.aligned:
            limit += f" (or teacher_seq_len={self.teacher_seq_len} teacher tokens)"
        if stats.get("truncated_rows"):
            warnings.warn(
                f"{stats['truncated_rows']} of {stats['documents']} rows were longer than "
                f"{limit} and were truncated ({stats['truncated_tokens']} tokens cut); "
                "raise data.seq_len, use data.packing=true, or data.truncation=error to refuse them.",
                stacklevel=2,
            )
        if stats.get("dropped_groups"):
            warnings.warn(
                f"{stats['dropped_groups']} aligned groups (text the two tokenizers only split at "
                f"the same place after more than {limit}) were left out; raise data.seq_len / "
                "data.teacher_seq_len.",
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
            why = (
                "one aligned group only: its first group is never scored"
                if self.aligned
                else f"a prompt that fills seq_len={self.seq_len}"
            )
            warnings.warn(
                f"{stats['rows_without_labels']} samples had no token to train on ({why}) and were "
                "left out; raise data.seq_len.",
                stacklevel=2,
            )

    def _collate_fn(self) -> collate_rows | collate_aligned:
        """Right-pad rows with the tokenizer's pad (else ``eos``, else 0) id."""
        if self.aligned:
            return collate_aligned(_pad_id(self.tokenizer), _pad_id(self.teacher_tokenizer))
        return collate_rows(_pad_id(self.tokenizer))


def _pad_id(tok: Any) -> int:
    pad = getattr(tok, "pad_token_id", None)
    if pad is None:
        pad = getattr(tok, "eos_token_id", None) or 0
    return int(pad)


def _check_teacher_tokenizer(teacher_tokenizer: Any, prompt_field: str | None) -> None:
    """Refuse a ``teacher_tokenizer`` of the wrong kind, or with data it cannot align.

    Raises:
        TypeError: neither a name/path nor a tokenizer object; a tokenizer without offsets.
        ValueError: instruction data (``prompt_field``).
    """
    if not isinstance(teacher_tokenizer, str):
        if not callable(getattr(teacher_tokenizer, "convert_ids_to_tokens", None)):
            raise TypeError(
                "teacher_tokenizer must be a tokenizer folder or hub id, or a Hugging Face tokenizer "
                f"object, got {type(teacher_tokenizer).__name__}."
            )
        check_fast("teacher_tokenizer", teacher_tokenizer)
    if prompt_field is not None:
        raise ValueError(
            "teacher_tokenizer (two tokenizations) works on plain text only, not on prompt/response "
            "pairs: each tokenizer's chat template renders a different text, which cannot be "
            "aligned. Put each conversation, rendered once, in one text field (data=files "
            "data.text_field=...), or distil instruction data with a teacher of the same tokenizer."
        )



def _order(doc: TextDocument) -> tuple[bytes, str, str]:
    return doc.key, doc.slice, doc.split or ""
