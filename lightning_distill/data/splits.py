"""Which split a document goes to, and the stable ids of samples.

The demo's :func:`assign_splits` fills byte targets in the order of a hash of each document's
*id*; :class:`~lightning_distill.data.TextDataModule`'s :func:`assign_by_content` draws a salted
hash of each document's *content*. :func:`sample_id` turns content into a 63-bit id.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .corpus import Document
    from .sources import TextDocument

__all__ = ["assign_by_content", "assign_splits", "sample_id"]

_ID_MASK = (1 << 63) - 1


def sample_id(*parts: bytes) -> int:
    """A 63-bit id of a sample from the bytes that make it (content, never position)."""
    digest = hashlib.sha256(b"lightning-distill/sample/" + b"\0".join(parts)).digest()
    return int.from_bytes(digest[:8], "little") & _ID_MASK


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


def assign_by_content(
    docs: Sequence[TextDocument], val_fraction: float, test_fraction: float, seed: int
) -> list[str]:
    """Each document's split by a salted hash of its content, or its own split when it has one.

    A slice's split asked for but left empty by the draw takes one of the slice's train documents
    (if train keeps one): the first in the given order, a stable choice.

    Args:
        docs: the documents, in content-hash order.
        val_fraction: expected share of documents in validation.
        test_fraction: expected share of documents in test.
        seed: the salt; another seed draws another split.

    Returns:
        the split name of each document, in order.
    """
    salt = f"lightning-distill/split/{seed}/".encode()
    where = []
    for doc in docs:
        u = int.from_bytes(hashlib.sha256(salt + doc.key).digest()[:8], "little") / 2**64
        where.append(
            "val" if u < val_fraction else "test" if u < val_fraction + test_fraction else "train"
        )
    for name in {d.slice for d in docs}:
        mine = [i for i, d in enumerate(docs) if d.slice == name]
        for split, fraction in (("val", val_fraction), ("test", test_fraction)):
            train = [i for i in mine if where[i] == "train"]
            if fraction > 0 and all(where[i] != split for i in mine) and len(train) > 1:
                where[train[0]] = split
    return where


def _split_key(doc_id: str) -> str:
    return hashlib.sha256(f"lightning-distill/split/{doc_id}".encode()).hexdigest()
