"""The on-disk tokenized-data cache: one folder per data fingerprint, safetensors + ``meta.json``."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from .aligned import AlignedRowDataset
from .base import SPLITS
from .blocks import TextRowDataset

__all__ = ["read_splits", "write_splits"]

#: The arrays of each split's ``<split>.safetensors``, in :class:`TextRowDataset`'s order.
ARRAYS = ("tokens", "labels", "offsets", "slice_index", "sample_ids")


def write_splits(
    folder: Path, arrays: dict[str, dict[str, np.ndarray]], meta: dict[str, Any]
) -> None:
    """Write every split and ``meta.json`` into a temporary folder, then rename it into place.

    Args:
        folder: the cache folder to create (left alone if another process made it first).
        arrays: split name -> the :data:`ARRAYS` of that split.
        meta: written as ``meta.json``; must hold ``slices``.
    """
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


def read_splits(folder: Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """``meta.json`` and each split's dataset from a folder :func:`write_splits` made: a
    :class:`TextRowDataset`, or an :class:`AlignedRowDataset` where ``meta["aligned"]``."""
    from safetensors.numpy import load_file

    meta = json.loads((folder / "meta.json").read_text())
    loaded: dict[str, Any] = {}
    for split in SPLITS:
        arrays = load_file(str(folder / f"{split}.safetensors"))
        if meta.get("aligned"):  # two tokenizations (TextDataModule's teacher_tokenizer)
            loaded[split] = AlignedRowDataset.from_arrays(arrays, meta["slices"])
        else:
            loaded[split] = TextRowDataset(*(arrays[k] for k in ARRAYS), meta["slices"])
    return meta, loaded
