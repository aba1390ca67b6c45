"""Text in two tokenizations, aligned: the groups, blocks and rows of cross-tokenizer batches.

Shared by :class:`~lightning_distill.data.CrossTokenizerDataModule` (the demo corpus) and
:class:`~lightning_distill.data.TextDataModule` with ``teacher_tokenizer=`` (your text).

Each document is tokenized by both (fast) tokenizers without special tokens, with character
offsets, and its tokens are grouped by common character boundaries
(:func:`~lightning_distill.crosstok.align.align_offsets`): a :data:`Group` is
``(student ids, teacher ids, UTF-8 bytes)`` of one span of text, and the document ends with an
end-of-text group (each side's ``eos``, one byte) when both tokenizers have an ``eos``. Samples
are cut *between groups*, within both length limits (``seq_len`` student tokens,
``teacher_seq_len`` teacher tokens), so a sample is the same text for both models. Labels are
``-100`` on a sample's first group (it has no prediction both models make from the same text)
and ``bytes`` counts the UTF-8 bytes of the rest: the scored text, the same for both models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset

from lightning_distill.crosstok.align import align_offsets

__all__ = [
    "AlignedRowDataset",
    "Group",
    "check_fast",
    "collate_aligned",
    "cut_blocks",
    "document_groups",
    "encode_aligned",
    "fit_row",
    "flatten_aligned",
    "stack_blocks",
]

#: One aligned span of text: the student's token ids, the teacher's, and its UTF-8 bytes.
Group = tuple[list[int], list[int], int]

#: The arrays of an :class:`AlignedRowDataset` (as cached), in its constructor's order.
ALIGNED_ARRAYS = (
    "tokens",
    "offsets",
    "teacher_tokens",
    "teacher_offsets",
    "student_groups",
    "teacher_groups",
    "bytes",
    "slice_index",
    "sample_ids",
)


def check_fast(name: str, tokenizer: Any) -> Any:
    """Return ``tokenizer`` if it gives character offsets (a fast Hugging Face tokenizer).

    Raises:
        TypeError: a tokenizer without ``backend_tokenizer`` (a slow one), naming the fix.
    """
    if (
        not getattr(tokenizer, "is_fast", False)
        or getattr(tokenizer, "backend_tokenizer", None) is None
    ):
        raise TypeError(
            f"{name} ({type(tokenizer).__name__}) gives no character offsets (not a fast tokenizer); "
            "cross-tokenizer alignment needs a fast Hugging Face tokenizer: load it with "
            "AutoTokenizer.from_pretrained(..., use_fast=True), or save a tokenizer.json for it."
        )
    return tokenizer


def document_groups(
    text: str, s_enc: Any, t_enc: Any, s_eos: int | None, t_eos: int | None
) -> list[Group]:
    """One document's aligned groups, then its end-of-text group (one byte) if both ``eos`` are set.

    Args:
        text: the document.
        s_enc: the student tokenizer's ``tokenizers.Encoding`` of ``text`` (ids and offsets).
        t_enc: the teacher tokenizer's.
        s_eos: the student's end-of-text id (``None``: no end-of-text group).
        t_eos: the teacher's.
    """
    alignment = align_offsets(s_enc.offsets, t_enc.offsets, len(text))
    count = alignment.num_groups
    s_ids = _by_group(s_enc.ids, alignment.student_groups, count)
    t_ids = _by_group(t_enc.ids, alignment.teacher_groups, count)
    at = _utf8_offsets(text)
    groups = [
        (s, t, at[b] - at[a])
        for s, t, (a, b) in zip(s_ids, t_ids, alignment.spans(), strict=True)
        if s and t
    ]
    if s_eos is None or t_eos is None:
        return groups
    return [*groups, ([s_eos], [t_eos], 1)]


def _by_group(ids: list[int], groups: list[int], count: int) -> list[list[int]]:
    """The token ids of each of ``count`` groups, in token order."""
    where = np.asarray(groups, dtype=np.int64)
    if len(where) and not (where[1:] >= where[:-1]).all():  # offsets out of order: token by token
        out: list[list[int]] = [[] for _ in range(count)]
        for token, g in zip(ids, groups, strict=True):
            out[g].append(token)
        return out
    bounds = np.searchsorted(where, np.arange(count + 1)).tolist()
    ids = list(ids)
    return [ids[bounds[g] : bounds[g + 1]] for g in range(count)]


def _utf8_offsets(text: str) -> list[int]:
    """The UTF-8 byte offset of each character position of ``text`` (``len(text) + 1`` values)."""
    if text.isascii():
        return list(range(len(text) + 1))
    points = np.frombuffer(text.encode("utf-32-le"), dtype=np.uint32)
    sizes = 1 + (points >= 0x80).astype(np.int64) + (points >= 0x800) + (points >= 0x10000)
    return np.concatenate([[0], np.cumsum(sizes)]).tolist()


def encode_aligned(
    texts: Sequence[str],
    student: Any,
    teacher: Any,
    s_eos: int | None,
    t_eos: int | None,
    progress: bool = False,
) -> list[list[Group]]:
    """:func:`document_groups` of each text, tokenized in chunks (one Rust call per chunk and side).

    Args:
        texts: the documents.
        student: the student's fast tokenizer.
        teacher: the teacher's fast tokenizer.
        s_eos: the student's end-of-text id, or ``None``.
        t_eos: the teacher's, or ``None``.
        progress: show a progress bar.
    """
    from tqdm.auto import tqdm

    out: list[list[Group]] = []
    chunk = 1000
    bar = tqdm(
        total=len(texts), desc="Tokenizing (both)", unit="doc", disable=not progress, leave=False
    )
    try:
        for start in range(0, len(texts), chunk):
            part = list(texts[start : start + chunk])
            s_enc = student.backend_tokenizer.encode_batch(part, add_special_tokens=False)
            t_enc = teacher.backend_tokenizer.encode_batch(part, add_special_tokens=False)
            out += [
                document_groups(text, s, t, s_eos, t_eos)
                for text, s, t in zip(part, s_enc, t_enc, strict=True)
            ]
            bar.update(len(part))
    finally:
        bar.close()
    return out


def cut_blocks(
    groups: Sequence[Group], seq_len: int, teacher_seq_len: int
) -> tuple[list[list[Group]], int]:
    """Greedy blocks of whole groups within both length limits (at least two groups each).

    Args:
        groups: the groups of the concatenated documents, in order.
        seq_len: most student tokens per block.
        teacher_seq_len: most teacher tokens per block.

    Returns:
        ``(blocks, dropped)``: the blocks, and how many groups were longer than a block on their
        own (they are dropped and end the block before them).
    """
    blocks: list[list[Group]] = []
    current: list[Group] = []
    ns = nt = dropped = 0
    for group in groups:
        gs, gt = len(group[0]), len(group[1])
        if gs > seq_len or gt > teacher_seq_len:
            dropped += 1  # longer than a block on its own: cannot be aligned in one
            if len(current) >= 2:
                blocks.append(current)
            current, ns, nt = [], 0, 0
            continue
        if ns + gs > seq_len or nt + gt > teacher_seq_len:
            if len(current) >= 2:
                blocks.append(current)
            current, ns, nt = [], 0, 0
        current.append(group)
        ns, nt = ns + gs, nt + gt
    if len(current) >= 2:
        blocks.append(current)
    return blocks, dropped


def fit_row(groups: Sequence[Group], seq_len: int, teacher_seq_len: int) -> list[Group]:
    """The longest run of leading groups within both length limits (a row cut at a group boundary)."""
    ns = nt = 0
    for k, (s, t, _) in enumerate(groups):
        ns, nt = ns + len(s), nt + len(t)
        if ns > seq_len or nt > teacher_seq_len:
            return list(groups[:k])
    return list(groups)


def stack_blocks(
    blocks: Sequence[Sequence[Group]], seq_len: int, teacher_seq_len: int, s_pad: int, t_pad: int
) -> dict[str, Tensor]:
    """Blocks as fixed-width tensors: ``input_ids`` ``(N, seq_len)``, ``teacher_input_ids``
    ``(N, teacher_seq_len)``, ``student_groups``/``teacher_groups`` (``-1`` at padding) and ``bytes``
    ``(N,)`` (the bytes of every group but the first)."""
    n = len(blocks)
    out = {
        "input_ids": torch.full((n, seq_len), s_pad, dtype=torch.long),
        "teacher_input_ids": torch.full((n, teacher_seq_len), t_pad, dtype=torch.long),
        "student_groups": torch.full((n, seq_len), -1, dtype=torch.long),
        "teacher_groups": torch.full((n, teacher_seq_len), -1, dtype=torch.long),
        "bytes": torch.zeros(n, dtype=torch.long),
    }
    for i, block in enumerate(blocks):
        s_ids, t_ids, s_groups, t_groups = _flat(block)
        out["input_ids"][i, : len(s_ids)] = torch.tensor(s_ids)
        out["teacher_input_ids"][i, : len(t_ids)] = torch.tensor(t_ids)
        out["student_groups"][i, : len(s_ids)] = torch.tensor(s_groups)
        out["teacher_groups"][i, : len(t_ids)] = torch.tensor(t_groups)
        out["bytes"][i] = sum(g[2] for g in block[1:])
    return out


def _flat(block: Sequence[Group]) -> tuple[list[int], list[int], list[int], list[int]]:
    """A block's student ids, teacher ids, and the group of each token on either side."""
    s_ids = [t for g in block for t in g[0]]
    t_ids = [t for g in block for t in g[1]]
    s_groups = [k for k, g in enumerate(block) for _ in g[0]]
    t_groups = [k for k, g in enumerate(block) for _ in g[1]]
    return s_ids, t_ids, s_groups, t_groups


def block_content(block: Sequence[Group]) -> bytes:
    """The bytes a sample id hashes: both sides' token ids and where the groups end."""
    s_ids, t_ids, s_groups, t_groups = _flat(block)
    return b"".join(
        np.asarray(x, dtype=np.int64).tobytes()
        for x in (s_ids, [-1], t_ids, [-1], s_groups, t_groups)
    )


def flatten_aligned(
    samples: Sequence[tuple[Sequence[Group], int]], slices: Sequence[int]
) -> dict[str, np.ndarray]:
    """The arrays of an :class:`AlignedRowDataset` (as cached) from ``(groups, sample id)`` samples
    and their slice indices.

    Raises:
        RuntimeError: if two samples share an id (a 63-bit collision).
    """
    flat = [_flat(groups) for groups, _ in samples]
    sample_ids = np.array([sid for _, sid in samples], dtype=np.int64)
    if len(np.unique(sample_ids)) != len(sample_ids):  # pragma: no cover - 63-bit collision
        raise RuntimeError("two samples got the same id; report this with the data that caused it.")

    def cat(k: int) -> np.ndarray:
        return (
            np.concatenate([np.asarray(f[k], dtype=np.int32) for f in flat])
            if flat
            else np.zeros(0, np.int32)
        )

    def bounds(k: int) -> np.ndarray:
        return np.concatenate([[0], np.cumsum([len(f[k]) for f in flat], dtype=np.int64)]).astype(
            np.int64
        )

    return {
        "tokens": cat(0),
        "offsets": bounds(0),
        "teacher_tokens": cat(1),
        "teacher_offsets": bounds(1),
        "student_groups": cat(2),
        "teacher_groups": cat(3),
        "bytes": np.array([sum(g[2] for g in groups[1:]) for groups, _ in samples], dtype=np.int64),
        "slice_index": np.array(slices, dtype=np.int64),
        "sample_ids": sample_ids,
    }


class AlignedRowDataset(Dataset):
    """Samples in two tokenizations with their alignment (variable length; see the module docstring).

    Items: ``input_ids``, ``labels``, ``teacher_input_ids``, ``teacher_labels``,
    ``student_groups``, ``teacher_groups`` (unpadded), ``bytes``, ``slice`` and ``sample_id``;
    :class:`collate_aligned` pads them into a batch.

    Args:
        tokens: flat ``int32`` student ids of all samples; ``offsets`` ``(N + 1,)`` their bounds.
        offsets: sample boundaries into ``tokens`` and ``student_groups``.
        teacher_tokens: flat teacher ids; ``teacher_offsets`` their bounds.
        teacher_offsets: sample boundaries into ``teacher_tokens`` and ``teacher_groups``.
        student_groups: the group of each student token (from 0 in each sample).
        teacher_groups: the group of each teacher token.
        bytes: ``(N,)`` UTF-8 bytes of each sample's scored text.
        slice_index: ``(N,)`` index into ``slice_names``.
        sample_ids: ``(N,)`` 63-bit ids, unique within the split.
        slice_names: the data's slice names.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        teacher_tokens: np.ndarray,
        teacher_offsets: np.ndarray,
        student_groups: np.ndarray,
        teacher_groups: np.ndarray,
        bytes: np.ndarray,
        slice_index: np.ndarray,
        sample_ids: np.ndarray,  # noqa: A002
        slice_names: list[str],
    ) -> None:
        self.tokens, self.offsets = tokens, offsets
        self.teacher_tokens, self.teacher_offsets = teacher_tokens, teacher_offsets
        self.student_groups, self.teacher_groups = student_groups, teacher_groups
        self.bytes = bytes
        self.slice_index = torch.as_tensor(slice_index, dtype=torch.long)
        self.sample_ids = torch.as_tensor(sample_ids, dtype=torch.long)
        self.slice_names = list(slice_names)

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], slice_names: list[str]
    ) -> AlignedRowDataset:
        """The dataset of :func:`flatten_aligned`'s arrays (or those read back from the cache)."""
        return cls(*(arrays[k] for k in ALIGNED_ARRAYS), slice_names)

    def __len__(self) -> int:
        return len(self.sample_ids)

    def lengths(self) -> np.ndarray:
        """Student tokens in each sample."""
        return np.diff(self.offsets)

    def subset(self, keep: Tensor) -> AlignedRowDataset:
        """The samples at positions ``keep``, in that order."""
        idx = keep.numpy()

        def take(flat: np.ndarray, bounds: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            starts, ends = bounds[:-1][idx], bounds[1:][idx]
            pieces = [np.arange(s, e) for s, e in zip(starts, ends)]
            where = np.concatenate(pieces) if pieces else np.zeros(0, dtype=np.int64)
            return where, np.concatenate([[0], np.cumsum(ends - starts)]).astype(np.int64)

        s_where, offsets = take(self.tokens, self.offsets)
        t_where, t_offsets = take(self.teacher_tokens, self.teacher_offsets)
        return AlignedRowDataset(
            self.tokens[s_where],
            offsets,
            self.teacher_tokens[t_where],
            t_offsets,
            self.student_groups[s_where],
            self.teacher_groups[t_where],
            self.bytes[idx],
            self.slice_index[keep].numpy(),
            self.sample_ids[keep].numpy(),
            self.slice_names,
        )

    def __getitem__(self, index: int) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for prefix, tokens, bounds, groups in (
            ("", self.tokens, self.offsets, self.student_groups),
            ("teacher_", self.teacher_tokens, self.teacher_offsets, self.teacher_groups),
        ):
            start, end = int(bounds[index]), int(bounds[index + 1])
            ids = torch.from_numpy(tokens[start:end].astype(np.int64))
            group = torch.from_numpy(groups[start:end].astype(np.int64))
            out[f"{prefix}input_ids"] = ids
            out[f"{prefix}labels"] = ids.masked_fill(group == 0, -100)
            out["student_groups" if not prefix else "teacher_groups"] = group
        out["bytes"] = torch.tensor(int(self.bytes[index]), dtype=torch.long)
        out["slice"] = self.slice_names[int(self.slice_index[index])]
        out["sample_id"] = int(self.sample_ids[index])
        return out


@dataclass(frozen=True)
class collate_aligned:  # noqa: N801 - used like a function; a class so workers can pickle it
    """Pad :class:`AlignedRowDataset` items into a batch, each side to its longest sample.

    Padding: the side's ``pad_id``, label ``-100``, attention mask 0, group ``-1``.

    Attributes:
        pad_id: the student's padding id.
        teacher_pad_id: the teacher's padding id.
    """

    pad_id: int = 0
    teacher_pad_id: int = 0

    def __call__(self, items: list[dict[str, Any]]) -> dict[str, Any]:
        batch: dict[str, Any] = {}
        n = len(items)
        for prefix, groups, pad in (
            ("", "student_groups", self.pad_id),
            ("teacher_", "teacher_groups", self.teacher_pad_id),
        ):
            width = max(len(item[f"{prefix}input_ids"]) for item in items)
            ids = torch.full((n, width), pad, dtype=torch.long)
            labels = torch.full((n, width), -100, dtype=torch.long)
            group = torch.full((n, width), -1, dtype=torch.long)
            for row, item in enumerate(items):
                k = len(item[f"{prefix}input_ids"])
                ids[row, :k] = item[f"{prefix}input_ids"]
                labels[row, :k] = item[f"{prefix}labels"]
                group[row, :k] = item[groups]
            batch[f"{prefix}input_ids"] = ids
            batch[f"{prefix}attention_mask"] = (group >= 0).long()
            batch[f"{prefix}labels"] = labels
            batch[groups] = group
        batch["bytes"] = torch.stack([item["bytes"] for item in items])
        batch["slice"] = [item["slice"] for item in items]
        batch["sample_id"] = torch.tensor([item["sample_id"] for item in items], dtype=torch.long)
        return batch
