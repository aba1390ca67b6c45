"""Samples and batches: fixed blocks (demo), variable rows (your text), packing and collation.

Both datasets serve the same items: ``input_ids``, ``labels``, ``slice`` and ``sample_id``
(and ``attention_mask`` for blocks, made by :class:`collate_rows` for rows), and both have
``slice_index``, ``sample_ids``, ``slice_names``, ``lengths()`` and ``subset(keep)``, which the
data modules' train filters use.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from .splits import sample_id

__all__ = [
    "TextRowDataset",
    "TokenBlockDataset",
    "collate_rows",
    "concat_with_eos",
    "flatten_rows",
    "pack_blocks",
    "rows_per_document",
]

#: One sample before flattening: token ids, labels, sample id.
Row = tuple[np.ndarray, np.ndarray, int]


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

    def lengths(self) -> np.ndarray:
        """Tokens in each block (all ``seq_len``)."""
        return np.full(len(self), self.input_ids.shape[1], dtype=np.int64)

    def subset(self, keep: Tensor) -> TokenBlockDataset:
        """The blocks at positions ``keep``, in that order."""
        return TokenBlockDataset(
            self.input_ids[keep], self.slice_index[keep], self.sample_ids[keep], self.slice_names
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        ids = self.input_ids[index]
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "labels": ids.clone(),
            "slice": self.slice_names[int(self.slice_index[index])],
            "sample_id": int(self.sample_ids[index]),
        }


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


def concat_with_eos(pieces: list[list[int]], eos: int) -> np.ndarray:
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


def pack_blocks(
    ids: list[list[int]],
    labels: list[list[int]],
    seq_len: int,
    slice_name: str,
    stats: dict[str, Any],
    drop_unlabelled: bool,
) -> list[Row]:
    """Concatenate documents' tokens and cut ``seq_len`` blocks; ids hash the block's content.

    Args:
        ids: each document's token ids (already ending with ``eos`` where wanted).
        labels: each document's labels.
        seq_len: tokens per block; the tail is dropped (counted in ``tail_tokens_dropped``).
        slice_name: the slice, part of each sample id.
        stats: counters, updated in place.
        drop_unlabelled: leave out blocks with no label (counted in ``rows_without_labels``).
    """
    if not ids:
        return []
    stream = np.concatenate([np.asarray(x, dtype=np.int32) for x in ids])
    lab = np.concatenate([np.asarray(y, dtype=np.int32) for y in labels])
    n = len(stream) // seq_len
    stats["tail_tokens_dropped"] += int(len(stream) - n * seq_len)
    blocks = stream[: n * seq_len].reshape(n, seq_len)
    lab_blocks = lab[: n * seq_len].reshape(n, seq_len)
    out, seen = [], {}
    for b in range(n):
        content = blocks[b].tobytes()
        k = seen.get(content, 0)  # a block repeated verbatim gets its own id
        seen[content] = k + 1
        sid = sample_id(b"block", slice_name.encode(), content, str(k).encode())
        if drop_unlabelled and (lab_blocks[b] == -100).all():
            stats["rows_without_labels"] += 1
            continue
        out.append((blocks[b], lab_blocks[b], sid))
    return out


def rows_per_document(
    ids: list[list[int]],
    labels: list[list[int]],
    keys: Sequence[bytes],
    sources: Sequence[str],
    seq_len: int,
    truncation: str,
    stats: dict[str, Any],
    drop_unlabelled: bool,
) -> list[Row]:
    """One row per document, cut at ``seq_len``; ids hash the document's content.

    ``ids``, ``labels``, ``stats`` and ``drop_unlabelled`` are as in :func:`pack_blocks`.

    Args:
        keys: each document's content hash (its sample id's source).
        sources: where each document came from, for the error message.
        seq_len: the longest row (longer ones are cut and counted in ``truncated_rows``).
        truncation: ``"truncate"`` (cut and count) or ``"error"``.

    Raises:
        ValueError: on a row longer than ``seq_len`` with ``truncation="error"``.
    """
    out = []
    for x, y, key, source in zip(ids, labels, keys, sources, strict=True):
        if len(x) > seq_len:
            if truncation == "error":
                raise ValueError(
                    f"{source} has {len(x)} tokens, more than seq_len={seq_len}; "
                    "raise data.seq_len, shorten the row, or set data.truncation=truncate "
                    "(rows are cut and counted) or data.packing=true."
                )
            stats["truncated_rows"] += 1
            stats["truncated_tokens"] += len(x) - seq_len
            x, y = x[:seq_len], y[:seq_len]
        if drop_unlabelled and all(v == -100 for v in y):
            stats["rows_without_labels"] += 1  # the prompt fills the whole row
            continue
        out.append(
            (np.asarray(x, dtype=np.int32), np.asarray(y, dtype=np.int32), sample_id(b"row", key))
        )
    return out


def flatten_rows(rows: list[Row], slices: list[int]) -> dict[str, np.ndarray]:
    """The arrays of a :class:`TextRowDataset` (as cached) from rows and their slice indices.

    Raises:
        RuntimeError: if two samples share an id (a 63-bit collision).
    """
    tokens = [r[0] for r in rows]
    labels = [r[1] for r in rows]
    lengths = np.array([len(t) for t in tokens], dtype=np.int64)
    sample_ids = np.array([r[2] for r in rows], dtype=np.int64)
    if len(np.unique(sample_ids)) != len(sample_ids):  # pragma: no cover - 63-bit collision
        raise RuntimeError("two samples got the same id; report this with the data that caused it.")
    return {
        "tokens": np.concatenate(tokens).astype(np.int32) if tokens else np.zeros(0, np.int32),
        "labels": np.concatenate(labels).astype(np.int32) if labels else np.zeros(0, np.int32),
        "offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64),
        "slice_index": np.array(slices, dtype=np.int64),
        "sample_ids": sample_ids,
    }
