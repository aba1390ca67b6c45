"""What both data modules share: settings checks, fingerprints, the train filters and the loaders.

:class:`SplitDataModule` serves three built splits (``train``/``val``/``test``) of a dataset with
``slice_index``, ``sample_ids``, ``slice_names``, ``lengths()`` and ``subset(keep)`` (a
:class:`~lightning_distill.data.blocks.TokenBlockDataset` or
:class:`~lightning_distill.data.blocks.TextRowDataset`): the ``train_slices`` and
``max_train_samples`` filters, the seeded resumable train loader, the val/test loaders, per-slice
counts and the two fingerprints. A subclass builds the splits and says what its data is
(:meth:`SplitDataModule._data_settings`).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Sequence
from typing import Any, NamedTuple

import lightning as L
import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ..validation import check_int, check_number
from .loaders import ResumableDataLoader

__all__ = ["SPLITS", "SliceCount", "SplitDataModule"]

log = logging.getLogger(__name__)

#: The split names, in the order the data modules build them.
SPLITS = ("train", "val", "test")


class SliceCount(NamedTuple):
    """Size of one slice within one split.

    Attributes:
        samples: number of samples (blocks or rows).
        tokens: tokens in those samples, without padding.
    """

    samples: int
    tokens: int


class SplitDataModule(L.LightningDataModule):
    """Train/val/test splits with slices and sample ids, served as seeded batches.

    A subclass calls :meth:`_serving` in its ``__init__`` (it checks and stores the batch and
    filter settings), builds the full splits in ``setup`` and hands them to :meth:`_serve`, and
    defines :meth:`_data_settings` and :meth:`_load_documents`.
    """

    batch_size: int
    eval_batch_size: int
    train_slices: list[str] | None
    max_train_samples: int | None
    num_workers: int
    seed: int
    _datasets: dict[str, Any] | None = None
    _slices: list[str] | None = None
    _full_train: Any = None
    #: Teacher-written records folder(s) added to the train split (``None``: none).
    generated: str | list[str] | None = None
    #: With ``generated``: how many samples of the full train split come from the data itself
    #: (they come first; the teacher-written ones follow).
    _real_train_size: int | None = None

    # ------------------------------------------------------------------ fingerprints

    @property
    def data_fingerprint(self) -> str:
        """Short hex digest of what the samples are (see the subclass); keys caches by sample id.

        It ignores ``train_slices``, ``max_train_samples``, batch sizes, workers and the shuffle
        seed, which only choose *which* train samples are served: a (split, ``sample_id``) pair
        names the same sample for every data module with this fingerprint.
        """
        return digest(self._data_settings())

    @property
    def fingerprint(self) -> str:
        """:attr:`data_fingerprint` plus ``train_slices`` and ``max_train_samples``."""
        return digest(
            {
                **self._data_settings(),
                "train_slices": sorted(self.train_slices) if self.train_slices else None,
                "max_train_samples": self.max_train_samples,
            }
        )

    def _data_settings(self) -> dict[str, Any]:
        raise NotImplementedError

    @property
    def slices(self) -> list[str]:
        """Slice names, read from the data on first access (demo: corpus order; text: sorted)."""
        self._load_documents()
        assert self._slices is not None
        return list(self._slices)

    def _load_documents(self) -> None:
        """Read the documents and set ``_slices`` (once)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ loaders

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
            check_slice_names("slices", list(slices), self.slices)
        if batch_size is not None:
            check_int("batch_size", batch_size, low=1)
        self.setup()
        return self._train_loader(
            self._train_subset(None if slices is None else list(slices)),
            self.batch_size if batch_size is None else batch_size,
            self.seed if seed is None else seed,
        )

    def val_dataloader(self) -> DataLoader:
        """Validation batches in a fixed (sample) order."""
        return self._loader(self.dataset("val"), self.eval_batch_size, shuffle=False)

    def test_dataloader(self) -> DataLoader:
        """Test batches in a fixed (sample) order."""
        return self._loader(self.dataset("test"), self.eval_batch_size, shuffle=False)

    # ------------------------------------------------------------------ queries

    def dataset(self, split: str) -> Any:
        """One split's dataset, running :meth:`setup` first if needed.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Raises:
            ValueError: on any other split name.
        """
        check_split(split)
        self.setup()
        assert self._datasets is not None
        return self._datasets[split]

    def slice_counts(self, split: str) -> dict[str, SliceCount]:
        """Samples and tokens (without padding) per slice in one split; absent slices count zero.

        Args:
            split: ``"train"``, ``"val"`` or ``"test"``.

        Raises:
            ValueError: on any other split name.
        """
        dataset = self.dataset(split)
        lengths = torch.from_numpy(np.asarray(dataset.lengths(), dtype=np.int64))
        n = len(dataset.slice_names)
        counts = torch.bincount(dataset.slice_index, minlength=n).tolist()
        tokens = torch.bincount(dataset.slice_index, weights=lengths.double(), minlength=n).tolist()
        return {
            name: SliceCount(c, int(t))
            for name, c, t in zip(dataset.slice_names, counts, tokens, strict=True)
        }

    # ------------------------------------------------------------------ internals

    def _serving(
        self,
        batch_size: int,
        eval_batch_size: int | None,
        num_workers: int,
        seed: int,
        train_slices: Sequence[str] | str | None,
        max_train_samples: int | None,
    ) -> list[str] | None:
        """Check and store the settings of what is served; returns ``train_slices`` as a list.

        Raises:
            ValueError: on an out-of-range size or an empty ``train_slices``.
        """
        check_int("batch_size", batch_size, low=1)
        check_int("num_workers", num_workers, low=0)
        if eval_batch_size is not None:
            check_int("eval_batch_size", eval_batch_size, low=1)
        if max_train_samples is not None:
            check_int("max_train_samples", max_train_samples, low=1)
        if isinstance(train_slices, str):  # a Hydra override such as train_slices=prose
            train_slices = [train_slices]
        if train_slices is not None:
            train_slices = [str(name) for name in train_slices]
            if not train_slices:
                raise ValueError(
                    "train_slices=[] selects no training data; pass None to train on all slices."
                )
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.train_slices = train_slices
        self.max_train_samples = max_train_samples
        self.num_workers, self.seed = num_workers, seed
        return train_slices

    def _serve(self, datasets: dict[str, Any]) -> None:
        """Serve the full splits: train filtered by ``train_slices`` / ``max_train_samples``."""
        self._datasets = {}
        for split in SPLITS:
            dataset = datasets[split]
            if split == "train":
                self._full_train = dataset
                dataset = self._train_subset(self.train_slices)
            self._datasets[split] = dataset
        for split in SPLITS:
            log.info("%s split: %s", split, dict(self.slice_counts(split)))

    @property
    def generated_lineage(self) -> list[dict[str, Any]] | None:
        """Where the teacher-written train samples came from (for the distillation card), or ``None``."""
        if self.generated is None:
            return None
        from lightning_distill.blackbox.loop import generated_lineage

        return generated_lineage(self.generated)

    def _train_subset(self, slices: list[str] | None) -> Any:
        """The full train split filtered by ``slices`` and ``max_train_samples``.

        The student's split (``slices == train_slices``) keeps every teacher-written sample
        (``generated``), whatever its slice.
        """
        full = self._full_train
        assert full is not None
        keep = torch.arange(len(full))
        if slices is not None:
            wanted = torch.tensor([full.slice_names.index(name) for name in slices])
            chosen = torch.isin(full.slice_index, wanted)
            if self._real_train_size is not None and slices == self.train_slices:
                chosen |= keep >= self._real_train_size
            keep = keep[chosen]
        if self.max_train_samples is not None and len(keep) > self.max_train_samples:
            # Evenly strided, so the slice mix of the full split survives the cap.
            cap = self.max_train_samples
            keep = keep[(torch.arange(cap) * len(keep)) // cap]
        return full.subset(keep)

    def _train_loader(self, dataset: Dataset, batch_size: int, seed: int) -> DataLoader:
        if len(dataset) < batch_size:  # type: ignore[arg-type]
            raise ValueError(
                f"The train split has {len(dataset)} samples, fewer than batch_size={batch_size}; "  # type: ignore[arg-type]
                "lower data.batch_size, lower data.seq_len, or add data."
            )
        generator = torch.Generator().manual_seed(seed)
        return self._loader(dataset, batch_size, shuffle=True, generator=generator, resumable=True)

    def _collate_fn(self) -> Any:
        """The batch collation; ``None``: the ``DataLoader``'s default (stacking)."""
        return None

    def _loader(
        self,
        dataset: Dataset,
        batch_size: int,
        shuffle: bool,
        resumable: bool = False,
        **kwargs: Any,
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
            collate_fn=self._collate_fn(),
            **kwargs,
        )


def digest(settings: dict[str, Any]) -> str:
    """Short hex digest of a JSON-able settings dict (key order does not matter)."""
    blob = json.dumps(settings, sort_keys=True, default=str).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def check_generated(generated: Any) -> str | list[str] | None:
    """``generated`` as plain values: a records folder, a list of them, or ``None``.

    Raises:
        TypeError: anything else.
    """
    if isinstance(generated, os.PathLike):
        generated = os.fspath(generated)
    if generated is None or isinstance(generated, str):
        return generated
    if not isinstance(generated, Sequence) or not all(
        isinstance(g, str | os.PathLike) for g in generated
    ):
        raise TypeError(f"generated must be a records folder or a list of them, got {generated!r}.")
    return [os.fspath(g) for g in generated] or None


def check_fractions(val_fraction: float, test_fraction: float) -> None:
    """Refuse eval fractions outside ``[0, 1)`` or that leave nothing to train on.

    Raises:
        TypeError: a fraction that is not a number.
        ValueError: naming the bad fraction.
    """
    for name, value in (("val_fraction", val_fraction), ("test_fraction", test_fraction)):
        check_number(name, value, low=0.0, high=1.0, high_open=True, hint="Pass a fraction such as 0.05.")
    if val_fraction + test_fraction >= 1.0:
        raise ValueError(
            f"val_fraction + test_fraction = {val_fraction + test_fraction} leaves nothing to "
            "train on; keep their sum below 1."
        )


def check_slice_names(what: str, names: list[str], known: list[str]) -> None:
    """Refuse slice names the data does not have.

    Raises:
        ValueError: naming the unknown slices and the known ones.
    """
    unknown = [name for name in names if name not in known]
    if unknown:
        example = f" (e.g. {what}=[{known[0]}])" if known else ""
        raise ValueError(f"Unknown {what} {unknown}; this data has slices {known}. Use names from that list{example}.")


def check_split(split: str) -> None:
    """Refuse a split name other than train/val/test.

    Raises:
        ValueError: naming the bad split.
    """
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; use one of {list(SPLITS)}.")
