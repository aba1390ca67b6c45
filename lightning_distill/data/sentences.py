"""The demo corpus cut into sentences, one sample each: data for embedding models.

:func:`sentence_pools` cuts the demo corpus (:func:`~lightning_distill.data.corpus.demo_corpus`)
into English sentences (slice ``prose``) and source lines (slice ``code``), deduplicated.
:class:`SentenceDataModule` serves them as a :class:`~lightning_distill.data.text.TextDataModule`
with one row per sentence (no packing, no end-of-text token), a byte-level BPE trained on them,
and the split by content hash; batches carry ``input_ids``, ``attention_mask``, ``slice`` and
``sample_id`` (and ``labels``, which embedding terms do not read). ``data=demo_sentences``,
``experiment=demo_embedding`` (docs/relation.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import random
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path

from lightning_distill.data.text import TextDataModule
from lightning_distill.paths import cache_root
from lightning_distill.validation import check_int

__all__ = ["SLICES", "SentenceDataModule", "sentence_pools"]

#: The slices of the demo sentences.
SLICES = ("prose", "code")
_FORMAT = 1


def sentence_pools(code_bytes: int = 300_000) -> dict[str, list[str]]:
    """The demo corpus's prose sentences (40–240 characters, mostly letters) and code lines
    (25–120 characters, stripped), deduplicated and sorted: ``{"prose": [...], "code": [...]}``.

    Args:
        code_bytes: bytes of standard-library source read for the ``code`` slice.
    """
    from lightning_distill.data.corpus import demo_corpus

    pools: dict[str, set[str]] = {name: set() for name in SLICES}
    for doc in demo_corpus(code_bytes=code_bytes):
        if doc.slice == "prose":
            parts = re.split(r"(?<=[.!?])\s+", re.sub(r"\s+", " ", doc.text))
            pools["prose"].update(
                p
                for p in parts
                if 40 <= len(p) <= 240 and sum(c.isalpha() for c in p) > 0.7 * len(p)
            )
        else:
            pools["code"].update(
                s for line in doc.text.splitlines() if 25 <= len(s := line.strip()) <= 120
            )
    return {name: sorted(pool) for name, pool in pools.items()}


class SentenceDataModule(TextDataModule):
    """The demo corpus's sentences and code lines, one sample each, for embedding distillation.

    Up to ``max_per_slice`` items of each slice (a seeded draw from :func:`sentence_pools`) are
    written once to ``<cache>/sentences-<key>.jsonl`` and read from there as a
    :class:`~lightning_distill.data.text.TextDataModule` (``packing=False``, ``add_eos=False``,
    ``slice_field="slice"``); the tokenizer is a byte-level BPE of ``vocab_size`` tokens trained
    on those items (cached). Validation and test take ``val_fraction`` / ``test_fraction`` of
    the items by a hash of their text.

    Args:
        vocab_size: tokens of the BPE (at least 257).
        seq_len: the longest row in tokens; longer items are truncated (and counted).
        max_per_slice: items drawn per slice.
        code_bytes: bytes of standard-library source read for the ``code`` slice.
        batch_size, eval_batch_size, val_fraction, test_fraction, split_seed, train_slices,
            max_train_samples, num_workers, seed, progress: as :class:`TextDataModule`'s.
        cache_dir: where the items, the tokenizer and the tokenized rows are kept (``None``:
            ``<cache root>/data``).

    Raises:
        ValueError: an out-of-range setting.
    """

    def __init__(
        self,
        vocab_size: int = 2048,
        seq_len: int = 96,
        max_per_slice: int = 2400,
        code_bytes: int = 300_000,
        batch_size: int = 64,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.08,
        test_fraction: float = 0.08,
        split_seed: int = 0,
        train_slices: Sequence[str] | str | None = None,
        max_train_samples: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        cache_dir: str | None = None,
        progress: bool = True,
    ) -> None:
        from lightning_distill.data.tokenizer import train_bpe_tokenizer

        check_int("max_per_slice", max_per_slice, low=1)
        check_int("code_bytes", code_bytes, low=1)
        folder = Path(cache_dir).expanduser() if cache_dir is not None else cache_root() / "data"
        path = _write_items(folder, max_per_slice, code_bytes)
        texts = [json.loads(line)["text"] for line in path.read_text().splitlines()]
        tokenizer = train_bpe_tokenizer(texts, vocab_size, folder)
        super().__init__(
            files=str(path), tokenizer=tokenizer, vocab_size=vocab_size, text_field="text", slice_field="slice",
            seq_len=seq_len, packing=False, add_special_tokens=False, add_eos=False, dedupe=True,
            batch_size=batch_size, eval_batch_size=eval_batch_size, val_fraction=val_fraction,
            test_fraction=test_fraction, split_seed=split_seed, train_slices=train_slices,
            max_train_samples=max_train_samples, num_workers=num_workers, seed=seed,
            cache_dir=str(folder / "text"), progress=progress,
        )  # fmt: skip
        self.max_per_slice, self.code_bytes = max_per_slice, code_bytes


def _write_items(folder: Path, max_per_slice: int, code_bytes: int) -> Path:
    """``<folder>/sentences-<key>.jsonl`` (``{"text", "slice"}`` per line), written once, atomically."""
    settings = {
        "max_per_slice": max_per_slice,
        "code_bytes": code_bytes,
        "python": platform.python_version(),
        "format": _FORMAT,
    }
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:16]
    path = folder / f"sentences-{key}.jsonl"
    if path.is_file():
        return path
    rng = random.Random(0)
    rows = []
    for name, pool in sentence_pools(code_bytes).items():
        rng.shuffle(pool)
        rows += [{"text": text, "slice": name} for text in pool[:max_per_slice]]
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-sentences-", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.writelines(json.dumps(row) + "\n" for row in rows)
    os.replace(tmp, path)
    return path
