"""``SlicedTextDataModule``: fixed-length token blocks from a sliced corpus, split by document."""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset
from transformers import PreTrainedTokenizerFast

from lightning_distill.paths import cache_root

from .corpus import Document, corpus_fingerprint, demo_corpus
from .tokenizer import tokenizer_fingerprint, train_bpe_tokenizer

__all__ = [
    "CORPORA",
    "SPLITS",
    "SliceCount",
    "SlicedTextDataModule",
    "TokenBlockDataset",
    "assign_splits",
]

log = logging.getLogger(__name__)

#: Corpora that ``SlicedTextDataModule(corpus=...)`` knows by name.
CORPORA: dict[str, Callable[..., list[Document]]] = {"demo": demo_corpus}
#: The split names, in the order the data module builds them.
SPLITS = ("train", "val", "test")
#: Bump when the split or blocking rule changes; it is part of :attr:`fingerprint`.
SPLIT_FORMAT_VERSION = 1


class SliceCount(NamedTuple):
    """Size of one slice within one split.

    Attributes:
        samples: number of ``seq_len`` blocks.
        tokens: tokens in those blocks (``samples * seq_len``).
    """

    samples: int
    tokens: int


class TokenBlockDataset(Dataset):
    """Fixed-length token blocks, each tagged with its slice and a stable sample id.

    Args:
        input_ids: ``(N, seq_len)`` int64 token ids.
        slice_index: ``(N,)`` index into ``slice_names`` for each block.
        sample_ids: ``(N,)`` ids, unique within the split.
        slice_names: the corpus's slice names.
    """

    def __init__(
        self, input_ids: Tensor, slice_index: Tensor, sample_ids: Tensor, slice_names: list[str]
    ) -> None:
        self.input_ids = input_ids
        self.slice_index = slice_index
        self.sample_ids = sample_ids
        self.slice_names = list(slice_names)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.input_ids[index]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids.clone(),
            "slice": self.slice_names[int(self.slice_index[index])],
            "sample_id": int(self.sample_ids[index]),
        }


class SlicedTextDataModule(L.LightningDataModule):
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
        _check_int("seq_len", seq_len, 2)
        _check_int("batch_size", batch_size, 1)
        _check_int("num_workers", num_workers, 0)
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
        if isinstance(train_slices, str):  # a Hydra override such as train_slices=prose
            train_slices = [train_slices]
        if train_slices is not None:
            train_slices = list(train_slices)
            if not train_slices:
                raise ValueError(
                    "train_slices=[] selects no training data; pass None to train on all slices."
                )

        self.save_hyperparameters(ignore=[] if isinstance(corpus, str) else ["corpus"])
        self.corpus = corpus
        self.vocab_size = vocab_size
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_slices = train_slices
        self.val_fraction = val_fraction
        self.test_fraction = test_fraction
        self.max_train_samples = max_train_samples
        self.num_workers = num_workers
        self.seed = seed
        self._cache_dir = cache_dir
        self.code_bytes = code_bytes
        self.prose_bytes = prose_bytes

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
        self._load_corpus()
        assert self._docs is not None
        return self._docs

    @property
    def slices(self) -> list[str]:
        """Slice names, in the order they first occur in the corpus."""
        self._load_corpus()
        assert self._slices is not None
        return list(self._slices)

    @property
    def tokenizer(self) -> PreTrainedTokenizerFast:
        """The corpus tokenizer (trained, or loaded from cache, on first access)."""
        self._load_tokenizer()
        assert self._tokenizer is not None
        return self._tokenizer

    @property
    def data_fingerprint(self) -> str:
        """Short hex digest of what the blocks are: corpus, tokenizer, ``seq_len``, split rule.

        It ignores ``train_slices`` and ``max_train_samples``, which only choose *which* train
        blocks are served: a (split, ``sample_id``) pair names the same block for every data
        module with this fingerprint, so it keys caches of per-block results (a teacher trained
        on all slices, cached teacher outputs).
        """
        return _digest(self._data_settings())

    @property
    def fingerprint(self) -> str:
        """Short hex digest of everything that decides which samples each split serves.

        :attr:`data_fingerprint` plus ``train_slices`` and ``max_train_samples``.
        """
        settings = {
            **self._data_settings(),
            "train_slices": sorted(self.train_slices) if self.train_slices else None,
            "max_train_samples": self.max_train_samples,
        }
        return _digest(settings)

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
        self._datasets = {}
        for split in SPLITS:
            blocks, slice_index = [], []
            for index, name in enumerate(self.slices):
                chosen = sorted(
                    doc.id for doc in docs if doc.slice == name and self._splits[doc.id] == split
                )
                stream = _concat([token_ids[doc_id] for doc_id in chosen], eos)
                n = len(stream) // self.seq_len
                blocks.append(stream[: n * self.seq_len].reshape(n, self.seq_len))
                slice_index.append(np.full(n, index, dtype=np.int64))
            input_ids = torch.from_numpy(np.concatenate(blocks))
            slice_ids = torch.from_numpy(np.concatenate(slice_index))
            sample_ids = torch.arange(len(input_ids), dtype=torch.long)
            dataset = TokenBlockDataset(input_ids, slice_ids, sample_ids, self.slices)
            if split == "train":
                self._full_train = dataset
                dataset = self._train_subset(self.train_slices)
            self._datasets[split] = dataset
        for split in SPLITS:
            log.info("%s split: %s", split, dict(self.slice_counts(split)))

    def train_dataloader(self) -> DataLoader:
        """Shuffled (seeded by ``seed``) batches of ``train_slices``, last partial batch dropped.

        Raises:
            ValueError: if the train split holds fewer samples than one batch.
        """
        return self._train_loader(self.dataset("train"), self.batch_size, self.seed)

    def train_dataloader_for(
        self,
        slices: Sequence[str] | None = None,
        batch_size: int | None = None,
        seed: int | None = None,
    ) -> DataLoader:
        """Train batches of chosen slices, whatever ``train_slices`` says (e.g. for a teacher).

        ``max_train_samples`` applies as in :meth:`train_dataloader`; sample ids are the same.

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
        if batch_size is not None:
            _check_int("batch_size", batch_size, 1)
        self.setup()
        return self._train_loader(
            self._train_subset(None if slices is None else list(slices)),
            self.batch_size if batch_size is None else batch_size,
            self.seed if seed is None else seed,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in sample-id order."""
        return self._loader(self.dataset("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in sample-id order."""
        return self._loader(self.dataset("test"), self.eval_batch_size, shuffle=False)

    # ------------------------------------------------------------------ queries

    def dataset(self, split: str) -> TokenBlockDataset:
        """Return one split's dataset, running :meth:`setup` first if needed.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Raises:
            ValueError: on any other split name.
        """
        _check_split(split)
        self.setup()
        assert self._datasets is not None
        return self._datasets[split]

    def slice_counts(self, split: str) -> dict[str, SliceCount]:
        """Blocks and tokens per slice in one split (slices absent from it count zero).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Raises:
            ValueError: on any other split name.
        """
        dataset = self.dataset(split)
        counts = torch.bincount(dataset.slice_index, minlength=len(dataset.slice_names)).tolist()
        return {
            name: SliceCount(count, count * self.seq_len)
            for name, count in zip(dataset.slice_names, counts, strict=True)
        }

    def document_ids(self, split: str) -> list[str]:
        """Ids of the documents assigned to a split (before ``train_slices`` filtering).

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Raises:
            ValueError: on any other split name.
        """
        _check_split(split)
        if self._splits is None:
            self._splits = assign_splits(self.documents, self.val_fraction, self.test_fraction)
        return sorted(doc_id for doc_id, where in self._splits.items() if where == split)

    # ------------------------------------------------------------------ internals

    def _load_corpus(self) -> None:
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
        _check_slice_names("train_slices", self.train_slices or [], slices)
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
        }

    def _train_subset(self, slices: list[str] | None) -> TokenBlockDataset:
        full = self._full_train
        assert full is not None
        keep = torch.arange(len(full))
        if slices is not None:
            wanted = torch.tensor([self.slices.index(name) for name in slices])
            keep = keep[torch.isin(full.slice_index, wanted)]
        if self.max_train_samples is not None and len(keep) > self.max_train_samples:
            # Evenly strided, so the slice mix of the full split survives the cap.
            cap = self.max_train_samples
            keep = keep[(torch.arange(cap) * len(keep)) // cap]
        return TokenBlockDataset(
            full.input_ids[keep], full.slice_index[keep], full.sample_ids[keep], full.slice_names
        )

    def _train_loader(self, dataset: TokenBlockDataset, batch_size: int, seed: int) -> DataLoader:
        if len(dataset) < batch_size:
            raise ValueError(
                f"The train split has {len(dataset)} samples, fewer than batch_size="
                f"{batch_size}; lower batch_size or use a larger corpus."
            )
        generator = torch.Generator().manual_seed(seed)
        return self._loader(dataset, batch_size, shuffle=True, generator=generator, resumable=True)

    def _loader(
        self, dataset: Dataset, batch_size: int, shuffle: bool, resumable: bool = False, **kwargs: Any
    ) -> DataLoader:
        if self.num_workers > 0:
            # Workers never tokenize; say so, or `tokenizers` warns in every forked worker.
            os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        return (ResumableDataLoader if resumable else DataLoader)(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            drop_last=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            **kwargs,
        )


def assign_splits(
    docs: Sequence[Document], val_fraction: float, test_fraction: float
) -> dict[str, str]:
    """Assign each document to ``"train"``, ``"val"`` or ``"test"``, by a hash of its id.

    Within each slice, documents are visited in the order of a salted SHA-256 of their id; a
    document goes to val (else test) if it still fits that split's byte target
    (``fraction * slice bytes``), and otherwise to train. Byte targets rather than a
    per-document coin flip keep the splits near the requested sizes although document sizes
    vary 300-fold (a coin flip over 79 prose topics could put 15 % of the prose, or none, in
    val), and filling without overshoot gives each eval split several documents rather than one
    large one. A split with a positive fraction that would stay empty takes the slice's smallest
    train document, as long as train keeps one. The result depends only on the documents, never
    on a seed or on their order.

    Args:
        docs: the corpus.
        val_fraction: target share of each slice's bytes for validation.
        test_fraction: target share of each slice's bytes for test.

    Returns:
        document id -> split name.
    """
    assignment: dict[str, str] = {}
    targets = {"val": val_fraction, "test": test_fraction}
    for name in dict.fromkeys(doc.slice for doc in docs):
        ordered = sorted((doc for doc in docs if doc.slice == name), key=lambda d: _split_key(d.id))
        sizes = {doc.id: len(doc.text.encode("utf-8")) for doc in ordered}
        total = sum(sizes.values())
        filled = dict.fromkeys(targets, 0)
        for doc in ordered:
            where = "train"
            for split, fraction in targets.items():
                if fraction > 0 and filled[split] + sizes[doc.id] <= fraction * total:
                    where = split
                    filled[split] += sizes[doc.id]
                    break
            assignment[doc.id] = where
        for split, fraction in targets.items():
            train = [doc.id for doc in ordered if assignment[doc.id] == "train"]
            if fraction > 0 and filled[split] == 0 and len(train) > 1:
                assignment[min(train, key=lambda doc_id: sizes[doc_id])] = split
    return assignment


def _split_key(doc_id: str) -> str:
    return hashlib.sha256(f"lightning-distill/split/{doc_id}".encode()).hexdigest()


def _concat(pieces: list[list[int]], eos: int) -> np.ndarray:
    """Concatenate token lists, each followed by ``eos``, into one int64 array."""
    total = sum(len(piece) + 1 for piece in pieces)
    stream = np.empty(total, dtype=np.int64)
    offset = 0
    for piece in pieces:
        stream[offset : offset + len(piece)] = piece
        offset += len(piece)
        stream[offset] = eos
        offset += 1
    return stream


def _digest(settings: dict[str, Any]) -> str:
    blob = json.dumps(settings, sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def _check_int(name: str, value: int, minimum: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"{name}={value!r} is invalid; pass an integer >= {minimum}.")


def _check_slice_names(what: str, names: list[str], known: list[str]) -> None:
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"Unknown {what} {unknown}; this corpus has slices {known}.")


def _check_split(split: str) -> None:
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {list(SPLITS)}.")


class ResumableDataLoader(DataLoader):
    """A ``DataLoader`` whose place in the epoch is kept in checkpoints (Lightning's stateful loader).

    ``state_dict()`` holds the shuffle generator's state at the start of the current epoch and the
    number of batches served since; after ``load_state_dict`` the next epoch draws the same order
    and skips the batches already trained on, so a resumed fit sees the batches an uninterrupted
    one would. The order is the plain ``DataLoader``'s (same generator, same draws).
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._epoch_state: Tensor | None = None
        self._served = 0
        self._skip = 0

    def __iter__(self):  # type: ignore[override]
        generator = self.generator
        if self._skip and self._skip >= len(self):
            # Saved after the epoch's last batch: make that epoch's draws (the iterator's seed, then
            # the sampler run to its end), then start the next epoch.
            super().__iter__()
            for _ in self.batch_sampler:
                pass
            self._skip = 0
        skip, self._skip = self._skip, 0
        self._epoch_state = generator.get_state() if generator is not None else None
        self._served = skip
        iterator = super().__iter__()
        for _ in range(skip):
            next(iterator)
        return _Counted(iterator, self)

    def state_dict(self) -> dict[str, Any]:
        """The epoch's generator state and the batches served since its start."""
        return {"generator": self._epoch_state, "batches": int(self._served)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Continue the saved epoch at the next ``iter()``."""
        state = state_dict.get("generator")
        if state is not None and self.generator is not None:
            self.generator.set_state(state)
        self._skip = int(state_dict.get("batches", 0))

    def rewind_to(self, batches: int) -> None:
        """Count only ``batches`` as served (a step cut short by an interrupt is not trained on)."""
        self._served = min(self._served, int(batches))


class _Counted:
    """An iterator that counts the batches its loader served."""

    def __init__(self, iterator: Any, owner: ResumableDataLoader) -> None:
        self._iterator, self._owner = iterator, owner

    def __iter__(self) -> _Counted:
        return self

    def __next__(self) -> Any:
        batch = next(self._iterator)
        self._owner._served += 1
        return batch

    def __len__(self) -> int:
        return len(self._iterator)
