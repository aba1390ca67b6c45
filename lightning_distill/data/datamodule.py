"""``SlicedTextDataModule``: fixed-length token blocks from a sliced corpus, split by document."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import PreTrainedTokenizerFast

from lightning_distill.paths import cache_root
from lightning_distill.validation import check_int

from .base import (
    SPLITS,
    SliceCount,
    SplitDataModule,
    check_fractions,
    check_generated,
    check_slice_names,
    check_split,
    digest,
)
from .blocks import TokenBlockDataset, concat_with_eos
from .corpus import Document, corpus_fingerprint, demo_corpus
from .loaders import ResumableDataLoader
from .splits import assign_splits
from .tokenizer import tokenizer_fingerprint, train_bpe_tokenizer

__all__ = [
    "CORPORA",
    "SPLITS",
    "ResumableDataLoader",
    "SliceCount",
    "SlicedTextDataModule",
    "TokenBlockDataset",
    "assign_splits",
]

#: Corpora that ``SlicedTextDataModule(corpus=...)`` knows by name.
CORPORA: dict[str, Callable[..., list[Document]]] = {"demo": demo_corpus}
#: Bump when the split or blocking rule changes; it is part of :attr:`fingerprint`.
SPLIT_FORMAT_VERSION = 1


class SlicedTextDataModule(SplitDataModule):
    """Causal-LM blocks from a corpus of named slices, with a tokenizer trained on the corpus.

    Pipeline: build the corpus (:func:`~lightning_distill.data.demo_corpus` for ``"demo"``),
    train or load the cached byte-level BPE tokenizer
    (:func:`~lightning_distill.data.train_bpe_tokenizer`), assign every *document* to
    train/val/test with :func:`assign_splits`, then per split and slice concatenate the
    documents (sorted by id, each followed by ``<|endoftext|>``) and cut the stream into
    ``seq_len`` blocks, dropping the tail. Every block belongs to exactly one slice.

    Each sample is a dict: ``input_ids`` and ``labels`` (equal ``LongTensor[seq_len]``; the model
    shifts labels for next-token prediction), ``attention_mask`` (ones), ``slice`` (str) and
    ``sample_id`` (int). A batch has the tensors stacked, ``slice`` as a ``list[str]`` and
    ``sample_id`` as a ``LongTensor``.

    Sample ids number the blocks of a split over *all* slices in a fixed order, before
    ``train_slices`` and ``max_train_samples`` filter the train split, so an id names the same
    block whatever those settings, the seed, the batch size or the shuffling.
    :attr:`data_fingerprint` identifies the blocks (for caches keyed by sample id);
    :attr:`fingerprint` also covers the train filters. :meth:`train_dataloader_for` serves other
    slices of the train split, e.g. all of them to a teacher while the student sees only prose.

    Args:
        corpus: ``"demo"`` or a callable returning ``list[Document]``.
        vocab_size: exact tokenizer and model vocabulary size.
        seq_len: tokens per block.
        batch_size: train batch size.
        eval_batch_size: val/test batch size; ``None`` uses ``batch_size``.
        train_slices: slices the train split keeps (``None``: all); val and test keep all.
        val_fraction: share of each slice's bytes that goes to validation.
        test_fraction: share of each slice's bytes that goes to test.
        max_train_samples: keep at most this many train blocks, evenly strided (for tests).
        num_workers: dataloader worker processes.
        seed: seed of the train shuffle only; it never changes the split.
        cache_dir: tokenizer cache folder; ``None`` uses ``cache_root() / "data"``.
        code_bytes: ``code`` slice budget of the demo corpus.
        prose_bytes: ``prose`` slice budget of the demo corpus (``None``: all of it).
        generated: teacher-written records (a folder of ``shard-*.jsonl``, or a list of them,
            e.g. from ``lightning-distill generate``) added to the *train* split only: each
            record's prompt + completion is a document of its slice, tokenized and blocked like
            the corpus, kept whatever ``train_slices`` says. Their fingerprint is part of
            :attr:`data_fingerprint`; :attr:`generated_lineage` says where they came from.

    Raises:
        ValueError: on an unknown corpus name or an out-of-range setting; an unknown
            ``train_slices`` name is reported when the corpus is first built.
    """

    def __init__(
        self,
        corpus: str | Callable[[], list[Document]] = "demo",
        vocab_size: int = 2048,
        seq_len: int = 128,
        batch_size: int = 16,
        eval_batch_size: int | None = None,
        train_slices: Sequence[str] | str | None = None,
        val_fraction: float = 0.05,
        test_fraction: float = 0.05,
        max_train_samples: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        code_bytes: int = 500_000,
        prose_bytes: int | None = None,
        generated: str | Sequence[str] | None = None,
    ) -> None:
        super().__init__()
        if isinstance(corpus, str) and corpus not in CORPORA:
            raise ValueError(
                f"Unknown corpus {corpus!r}; use one of {sorted(CORPORA)} or pass a callable "
                "returning list[Document]."
            )
        if not isinstance(corpus, str) and not callable(corpus):
            raise ValueError(
                f"corpus={corpus!r} is neither a corpus name nor a callable; use one of "
                f"{sorted(CORPORA)} or a callable returning list[Document]."
            )
        check_int("seq_len", seq_len, low=2)
        check_fractions(val_fraction, test_fraction)
        train_slices = self._serving(
            batch_size, eval_batch_size, num_workers, seed, train_slices, max_train_samples
        )

        self.save_hyperparameters(ignore=[] if isinstance(corpus, str) else ["corpus"])
        self.corpus = corpus
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self._cache_dir = cache_dir
        self.code_bytes = code_bytes
        self.prose_bytes = prose_bytes
        generated = check_generated(generated)
        self.generated = generated
        self._generated: tuple[list[tuple[str, str]], str] | None = None
        self._real_train: TokenBlockDataset | None = None

        self._docs: list[Document] | None = None
        self._slices: list[str] | None = None
        self._tokenizer: PreTrainedTokenizerFast | None = None
        self._splits: dict[str, str] | None = None
        self._datasets: dict[str, TokenBlockDataset] | None = None
        self._full_train: TokenBlockDataset | None = None

    # ------------------------------------------------------------------ properties

    @property
    def cache_dir(self) -> Path:
        """Folder of the tokenizer cache."""
        if self._cache_dir is not None:
            return Path(self._cache_dir).expanduser()
        return cache_root() / "data"

    @property
    def documents(self) -> list[Document]:
        """The corpus, built on first access."""
        self._load_documents()
        assert self._docs is not None
        return self._docs

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The corpus tokenizer (trained, or loaded from cache, on first access)."""
        self._load_tokenizer()
        assert self._tokenizer is not None
        return self._tokenizer

    # ------------------------------------------------------------------ Lightning hooks

    def prepare_data(self) -> None:
        """Build the corpus and train (or load) the tokenizer, filling the disk cache."""
        self._load_tokenizer()

    def setup(self, stage: str | None = None) -> None:
        """Tokenize, split and block the corpus; all splits are built whatever the stage.

        Args:
            stage: Lightning's stage name; ignored.
        """
        if self._datasets is not None:
            return
        docs = self.documents
        backend = self.tokenizer.backend_tokenizer
        encodings = backend.encode_batch([doc.text for doc in docs], add_special_tokens=False)
        token_ids = {doc.id: enc.ids for doc, enc in zip(docs, encodings, strict=True)}
        self._splits = assign_splits(docs, self.val_fraction, self.test_fraction)
        eos = self.tokenizer.eos_token_id
        built = {}
        for split in SPLITS:
            blocks, slice_index = [], []
            for index, name in enumerate(self.slices):
                chosen = sorted(
                    doc.id for doc in docs if doc.slice == name and self._splits[doc.id] == split
                )
                stream = concat_with_eos([token_ids[doc_id] for doc_id in chosen], eos)
                n = len(stream) // self.seq_len
                blocks.append(stream[: n * self.seq_len].reshape(n, self.seq_len))
                slice_index.append(np.full(n, index, dtype=np.int64))
            if split == "train" and self.generated is not None:
                self._real_train_size = sum(len(b) for b in blocks)
                for index, name in enumerate(self.slices):
                    texts = [text for s, text in self._generated_docs()[0] if s == name]
                    if not texts:
                        continue
                    ids = [enc.ids for enc in backend.encode_batch(texts, add_special_tokens=False)]
                    stream = concat_with_eos(ids, eos)
                    n = len(stream) // self.seq_len
                    blocks.append(stream[: n * self.seq_len].reshape(n, self.seq_len))
                    slice_index.append(np.full(n, index, dtype=np.int64))
            input_ids = torch.from_numpy(np.concatenate(blocks))
            slice_ids = torch.from_numpy(np.concatenate(slice_index))
            sample_ids = torch.arange(len(input_ids), dtype=torch.long)
            built[split] = TokenBlockDataset(input_ids, slice_ids, sample_ids, self.slices)
        if self.generated is not None:  # ids of the corpus blocks come first, unchanged
            self._real_train = built["train"].subset(torch.arange(self._real_train_size))
        self._serve(built)

    def train_dataloader_for(
        self,
        slices: Sequence[str] | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
        *,
        generated: bool = True,
    ) -> Any:
        """As the base class; ``generated=False`` serves the corpus blocks only (the demo teacher's).

        Raises:
            ValueError: as the base class.
        """
        if generated or self.generated is None:
            return super().train_dataloader_for(slices, batch_size, seed)
        self.setup()
        full, self._full_train = self._full_train, self._real_train
        try:
            return super().train_dataloader_for(slices, batch_size, seed)
        finally:
            self._full_train = full

    # ------------------------------------------------------------------ generated data

    def _generated_docs(self) -> tuple[list[tuple[str, str]], str]:
        if self._generated is None:
            from lightning_distill.blackbox.loop import generated_documents

            assert self.generated is not None
            self._generated = generated_documents(self.generated, self.slices)
        return self._generated

    @property
    def source_data_fingerprint(self) -> str:
        """:attr:`data_fingerprint` of the corpus alone (without ``generated``): the demo teacher's key."""
        settings = self._data_settings()
        settings.pop("generated", None)
        return digest(settings)

    # ------------------------------------------------------------------ queries

    def document_ids(self, split: str) -> list[str]:
        """Ids of the documents assigned to a split (before ``train_slices`` filtering).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Raises:
            ValueError: on any other split name.
        """
        check_split(split)
        if self._splits is None:
            self._splits = assign_splits(self.documents, self.val_fraction, self.test_fraction)
        return sorted(doc_id for doc_id, where in self._splits.items() if where == split)

    # ------------------------------------------------------------------ internals

    def _load_documents(self) -> None:
        if self._docs is not None:
            return
        if isinstance(self.corpus, str):
            docs = CORPORA[self.corpus](prose_bytes=self.prose_bytes, code_bytes=self.code_bytes)
        else:
            docs = list(self.corpus())
        if not docs:
            raise ValueError(f"Corpus {self.corpus!r} returned no documents; give it some text.")
        seen: set[str] = set()
        for doc in docs:
            if doc.id in seen:
                raise ValueError(f"Document id {doc.id!r} occurs twice; make document ids unique.")
            seen.add(doc.id)
        slices = list(dict.fromkeys(doc.slice for doc in docs))
        check_slice_names("train_slices", self.train_slices or [], slices)
        self._docs, self._slices = docs, slices

    def _load_tokenizer(self) -> None:
        if self._tokenizer is not None:
            return
        texts = [doc.text for doc in self.documents]
        self._tokenizer = train_bpe_tokenizer(texts, self.vocab_size, self.cache_dir)

    def _data_settings(self) -> dict[str, Any]:
        return {
            "format": SPLIT_FORMAT_VERSION,
            "corpus": corpus_fingerprint(self.documents),
            "tokenizer": tokenizer_fingerprint(self.tokenizer),
            "seq_len": self.seq_len,
            "val_fraction": self.val_fraction,
            "test_fraction": self.test_fraction,
            **({"generated": self._generated_docs()[1]} if self.generated is not None else {}),
        }
