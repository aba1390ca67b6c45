"""``CrossTokenizerDataModule``: the demo corpus in two tokenizations, aligned, for cross-tokenizer KD.

The student and the teacher read the same text in their own tokens. Each document (and the
end-of-text token after it) is tokenized by both tokenizers with character offsets and the tokens
are grouped by common character boundaries (:func:`~lightning_distill.crosstok.align.align_offsets`).
Per split and slice the documents are concatenated as in
:class:`~lightning_distill.data.SlicedTextDataModule` and cut into blocks *between groups*, as
long as both tokenizations fit (``seq_len`` student tokens, ``teacher_seq_len`` teacher tokens),
so a block is the same text for both models and every group lies in one block.

A sample: ``input_ids``, ``attention_mask``, ``labels`` (the student's, padded to ``seq_len``),
``teacher_input_ids``, ``teacher_attention_mask``, ``teacher_labels`` (padded to
``teacher_seq_len``), ``student_groups``/``teacher_groups`` (the group of each token, from 0;
``-1`` at padding), ``bytes`` (UTF-8 bytes of the scored text), ``slice`` and ``sample_id``.
Labels are ``-100`` at padding and on the block's first group, so both models score exactly the
same text: from the end of group 0 to the end of the block (an end-of-text token counts as one
byte). Bits per byte are then comparable between the two models.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset
from transformers import PreTrainedTokenizerBase

from lightning_distill.validation import check_int

from .aligned import Group, check_fast, cut_blocks, document_groups, stack_blocks
from .base import SPLITS
from .corpus import Document
from .datamodule import SlicedTextDataModule
from .splits import assign_splits
from .tokenizer import tokenizer_fingerprint, train_bpe_tokenizer

__all__ = ["CrossTokenizerDataModule", "CrossTokenizerDataset"]

#: Bump when the blocking rule changes; it is part of the data fingerprint.
CROSS_FORMAT_VERSION = 1
_TENSOR_KEYS = ("input_ids", "teacher_input_ids", "student_groups", "teacher_groups")


class CrossTokenizerDataset(Dataset):
    """Blocks of text in two tokenizations with their alignment (see the module docstring).

    Args:
        tensors: ``input_ids`` ``(N, Ls)``, ``teacher_input_ids`` ``(N, Lt)``, ``student_groups``
            ``(N, Ls)``, ``teacher_groups`` ``(N, Lt)`` (``-1`` at padding) and ``bytes`` ``(N,)``.
        slice_index: ``(N,)`` index into ``slice_names``.
        sample_ids: ``(N,)`` ids, unique within the split.
        slice_names: the corpus's slice names.
    """

    def __init__(self, tensors: dict[str, Tensor], slice_index: Tensor, sample_ids: Tensor,
                 slice_names: list[str]) -> None:
        self.tensors = tensors
        self.slice_index = slice_index
        self.sample_ids = sample_ids
        self.slice_names = list(slice_names)

    def __len__(self) -> int:
        return int(self.sample_ids.shape[0])

    def lengths(self) -> np.ndarray:
        """Student tokens in each block (without padding)."""
        return (self.tensors["student_groups"] >= 0).sum(-1).numpy()

    def subset(self, keep: Tensor) -> CrossTokenizerDataset:
        """The blocks at positions ``keep``, in that order."""
        return CrossTokenizerDataset({k: v[keep] for k, v in self.tensors.items()}, self.slice_index[keep],
                                     self.sample_ids[keep], self.slice_names)

    def __getitem__(self, index: int) -> dict[str, Any]:
        t = {k: v[index] for k, v in self.tensors.items()}
        out: dict[str, Any] = {}
        for prefix, ids, groups in (("", "input_ids", "student_groups"), ("teacher_", "teacher_input_ids",
                                                                            "teacher_groups")):
            real = t[groups] >= 0
            out[f"{prefix}input_ids"] = t[ids]
            out[f"{prefix}attention_mask"] = real.long()
            out[f"{prefix}labels"] = t[ids].masked_fill(~real | (t[groups] == 0), -100)
            out[groups] = t[groups]
        out["bytes"] = t["bytes"]
        out["slice"] = self.slice_names[int(self.slice_index[index])]
        out["sample_id"] = int(self.sample_ids[index])
        return out


class CrossTokenizerDataModule(SlicedTextDataModule):
    """The demo corpus for a student and a teacher with different tokenizers (aligned blocks).

    The student's tokenizer is the corpus BPE of ``vocab_size`` (as in
    :class:`~lightning_distill.data.SlicedTextDataModule`) or ``student_tokenizer``; the teacher's
    is the corpus BPE of ``teacher_vocab_size``, or ``teacher_tokenizer`` (any fast Hugging Face
    tokenizer, object or name/path). Splits (by document) and slices are those of the parent class; the blocks differ
    (see the module docstring). :attr:`teacher_datamodule` is the plain data module of the
    teacher's tokenizer (what the demo teacher is trained on).

    Args:
        teacher_vocab_size: size of the teacher's corpus BPE (used without ``teacher_tokenizer``).
        teacher_tokenizer: a fast tokenizer or its name/path; ``None``: the corpus BPE.
        teacher_seq_len: most teacher tokens per block; ``None``: ``seq_len``.
        student_tokenizer: a fast tokenizer or its name/path for the student; ``None``: the corpus
            BPE of ``vocab_size``.
        **kwargs: the arguments of :class:`~lightning_distill.data.SlicedTextDataModule`.

    Raises:
        ValueError: a ``teacher_vocab_size`` below 257 or a ``teacher_seq_len`` below 2, and what
            the parent class refuses.
        TypeError: a ``teacher_tokenizer``/``student_tokenizer`` that is neither a tokenizer nor a
            string, or one without character offsets (not a fast tokenizer).
    """

    def __init__(self, corpus: str | Callable[[], list[Document]] = "demo", vocab_size: int = 1024,
                 seq_len: int = 128, batch_size: int = 16, eval_batch_size: int | None = None,
                 train_slices: Sequence[str] | str | None = None, val_fraction: float = 0.05,
                 test_fraction: float = 0.05, max_train_samples: int | None = None, num_workers: int = 0,
                 seed: int = 0, cache_dir: str | None = None, code_bytes: int = 500_000,
                 prose_bytes: int | None = None, teacher_vocab_size: int = 2048,
                 teacher_tokenizer: Any = None, teacher_seq_len: int | None = None,
                 student_tokenizer: Any = None) -> None:
        super().__init__(corpus, vocab_size, seq_len, batch_size, eval_batch_size, train_slices, val_fraction,
                         test_fraction, max_train_samples, num_workers, seed, cache_dir, code_bytes, prose_bytes)
        check_int("teacher_vocab_size", teacher_vocab_size, low=257)
        check_int("teacher_seq_len", teacher_seq_len, low=2, allow_none=True)
        for name, value in (("teacher_tokenizer", teacher_tokenizer), ("student_tokenizer", student_tokenizer)):
            if value is not None and not isinstance(value, (str, PreTrainedTokenizerBase)):
                raise TypeError(f"{name} must be a Hugging Face tokenizer, a name/path or None, got "
                                f"{type(value).__name__}.")
        self._student_tokenizer_arg = student_tokenizer
        self.teacher_vocab_size = teacher_vocab_size
        self.teacher_seq_len = teacher_seq_len or seq_len
        self._teacher_tokenizer_arg = teacher_tokenizer
        self._teacher_tokenizer: Any = None
        self._teacher_dm: SlicedTextDataModule | None = None
        self.dropped_groups = 0

    @property
    def teacher_tokenizer(self) -> Any:
        """The teacher's tokenizer (trained, loaded or given)."""
        if self._teacher_tokenizer is None:
            self._teacher_tokenizer = self._given_or_trained("teacher_tokenizer", self._teacher_tokenizer_arg,
                                                             self.teacher_vocab_size)
        return self._teacher_tokenizer

    def _load_tokenizer(self) -> None:
        if self._tokenizer is None:
            self._tokenizer = self._given_or_trained("student_tokenizer", self._student_tokenizer_arg,
                                                     self.vocab_size)

    def _given_or_trained(self, name: str, arg: Any, vocab_size: int) -> Any:
        if arg is None:
            return train_bpe_tokenizer([doc.text for doc in self.documents], vocab_size, self.cache_dir)
        if isinstance(arg, str):
            from transformers import AutoTokenizer

            arg = AutoTokenizer.from_pretrained(arg)
        return check_fast(name, arg)

    @property
    def teacher_datamodule(self) -> SlicedTextDataModule:
        """The same corpus and splits in the teacher's corpus BPE, ``teacher_seq_len`` blocks (the demo
        teacher trains on it).

        Raises:
            ValueError: the teacher's tokenizer was given (it is not the corpus BPE).
        """
        if self._teacher_tokenizer_arg is not None:
            raise ValueError("teacher_datamodule exists only for the corpus BPE teacher (teacher_tokenizer=None).")
        if self._teacher_dm is None:
            h = self.hparams
            dm = SlicedTextDataModule(
                self.corpus, self.teacher_vocab_size, self.teacher_seq_len, h.batch_size, h.eval_batch_size,
                None, self.val_fraction, self.test_fraction, None, h.num_workers, h.seed, self._cache_dir,
                self.code_bytes, self.prose_bytes)
            dm.prepare_data()
            dm.setup()
            self._teacher_dm = dm
        return self._teacher_dm

    def prepare_data(self) -> None:
        """Train (or load) both tokenizers."""
        super().prepare_data()
        _ = self.teacher_tokenizer

    def setup(self, stage: str | None = None) -> None:
        """Tokenize, align, split and block the corpus; all splits are built whatever the stage."""
        if self._datasets is not None:
            return
        docs = self.documents
        texts = [doc.text for doc in docs]
        s_enc = self.tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        t_enc = self.teacher_tokenizer.backend_tokenizer.encode_batch(texts, add_special_tokens=False)
        s_eos, t_eos = self.tokenizer.eos_token_id, self.teacher_tokenizer.eos_token_id
        if t_eos is None:
            t_eos = self.teacher_tokenizer.pad_token_id if self.teacher_tokenizer.pad_token_id is not None else 0
        per_doc = {doc.id: document_groups(doc.text, s, t, s_eos, t_eos)
                   for doc, s, t in zip(docs, s_enc, t_enc, strict=True)}
        self._splits = assign_splits(docs, self.val_fraction, self.test_fraction)
        self.dropped_groups = 0
        built = {}
        for split in SPLITS:
            blocks: list[dict[str, Any]] = []
            slice_index: list[int] = []
            for index, name in enumerate(self.slices):
                chosen = sorted(doc.id for doc in docs if doc.slice == name and self._splits[doc.id] == split)
                groups = [g for doc_id in chosen for g in per_doc[doc_id]]
                new = self._cut(groups)
                blocks += new
                slice_index += [index] * len(new)
            tensors = self._stack(blocks)
            built[split] = CrossTokenizerDataset(tensors, torch.tensor(slice_index, dtype=torch.long),
                                                 torch.arange(len(blocks), dtype=torch.long), self.slices)
        self._serve(built)

    def _cut(self, groups: list[Group]) -> list[list[Group]]:
        """Greedy blocks of whole groups within both length limits (at least two groups each)."""
        blocks, dropped = cut_blocks(groups, self.seq_len, self.teacher_seq_len)
        self.dropped_groups += dropped
        return blocks

    def _stack(self, blocks: list[list[Group]]) -> dict[str, Tensor]:
        return stack_blocks(blocks, self.seq_len, self.teacher_seq_len, self.tokenizer.pad_token_id or 0,
                            self.teacher_tokenizer.pad_token_id or 0)

    def _data_settings(self) -> dict[str, Any]:
        return {**super()._data_settings(), "cross_format": CROSS_FORMAT_VERSION,
                "teacher_tokenizer": tokenizer_fingerprint(self.teacher_tokenizer),
                "teacher_seq_len": self.teacher_seq_len}

