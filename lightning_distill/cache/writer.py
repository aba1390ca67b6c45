"""Writing a cache: shards of whole samples per rank, then one merged index per split."""

from __future__ import annotations

import json
import time
import uuid
import zlib
from typing import Any

import torch
from safetensors.torch import save as save_safetensors
from torch import Tensor

from lightning_distill.cache.fingerprint import FORMAT_VERSION
from lightning_distill.cache.format import CacheSpec
from lightning_distill.cache.storage import CacheStorage, sha256_bytes

__all__ = ["ShardWriter", "completed_sample_ids", "merge_index", "write_manifest"]

MANIFEST = "cache.json"


def write_manifest(storage: CacheStorage, fingerprint: dict[str, Any], spec: CacheSpec, **extra: Any) -> None:
    """``cache.json``: the fingerprint (checked on every open) and the spec (how to read)."""
    from lightning_distill import __version__

    storage.write_json({"format": FORMAT_VERSION, "fingerprint": fingerprint, "spec": spec.to_json(),
                        "library": f"lightning-distill {__version__}",
                        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), **extra}, MANIFEST)


class ShardWriter:
    """Collects encoded samples of one split on one rank and writes them as shards.

    Args:
        storage: the cache root.
        split: ``"train"``, ``"val"``, ``"test"``, ...
        compression: ``"zlib"`` or ``None`` (the spec's ``compression``).
        rank: this process's rank (part of the shard names, so ranks never collide).
        shard_bytes: a shard is written once its samples take this many bytes.
    """

    def __init__(self, storage: CacheStorage, split: str, *, rank: int = 0, shard_bytes: int = 256 * 2**20,
                 compression: str | None = None) -> None:
        if compression not in (None, "zlib"):
            raise ValueError(f"compression={compression!r} is not supported; use 'zlib' or None.")
        self.compression = compression
        self.storage = storage
        self.split = split
        self.prefix = f"{time.strftime('%Y%m%d%H%M%S')}-{uuid.uuid4().hex[:6]}-r{rank:03d}"
        self.shard_bytes = int(shard_bytes)
        self._buffer: list[dict[str, Tensor]] = []
        self._bytes = 0
        self._count = 0
        self._folded: tuple[float, float] | None = None
        self.written: list[dict[str, Any]] = []

    def add(self, sample_id: int, token_hash: int, tensors: dict[str, Tensor]) -> None:
        """Buffer one sample (``tensors`` from :func:`~lightning_distill.cache.format.encode_sample`)."""
        stats = {n: float(t.sum()) for n, t in tensors.items() if n.startswith("stat.")}
        if stats:  # folded mass (see CacheSpec.fold_vocab): summed into the sidecar, not stored per position
            tensors = {n: t for n, t in tensors.items() if not n.startswith("stat.")}
            total, peak = self._folded or (0.0, 0.0)
            self._folded = (total + stats.get("stat.folded_mass", 0.0),
                            max(peak, stats.get("stat.folded_max", 0.0)))
        first = next(t for n, t in tensors.items() if n.startswith("pos."))
        record = {
            "sample.ids": torch.tensor([sample_id], dtype=torch.int64),
            "sample.lengths": torch.tensor([first.shape[0]], dtype=torch.int32),
            "sample.token_hash": torch.tensor([token_hash], dtype=torch.int64),
            **tensors,
        }
        self._buffer.append(record)
        self._bytes += sum(t.numel() * t.element_size() for t in record.values())
        if self._bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered samples as one shard, then its sidecar (both atomically)."""
        if not self._buffer:
            return
        names = self._buffer[0].keys()
        tensors = {name: torch.cat([r[name] for r in self._buffer]).contiguous() for name in names}
        data = save_safetensors(tensors, metadata={"format": str(FORMAT_VERSION), "split": self.split})
        if self.compression == "zlib":
            data = zlib.compress(data, 6)
        file = f"{self.prefix}-{self._count:05d}.safetensors"
        self.storage.write_bytes(data, self.split, "shards", file)
        sidecar = {
            "file": file,
            "sha256": sha256_bytes(data),
            "bytes": len(data),
            "samples": int(tensors["sample.ids"].numel()),
            "positions": int(tensors["sample.lengths"].to(torch.int64).sum()),
            "sample_ids": tensors["sample.ids"].tolist(),
            "lengths": tensors["sample.lengths"].tolist(),
        }
        if self._folded is not None:
            sidecar["folded_mass"] = {"sum": self._folded[0], "max": self._folded[1]}
        self.storage.write_json(sidecar, self.split, "shards", file.replace(".safetensors", ".json"))
        self.written.append(sidecar)
        self._buffer, self._bytes, self._folded = [], 0, None
        self._count += 1


def _sidecars(storage: CacheStorage, split: str) -> list[dict[str, Any]]:
    names = storage.list(split, "shards")
    present = set(names)
    out = []
    for name in names:
        if not name.endswith(".json"):
            continue
        try:
            sidecar = storage.read_json(split, "shards", name)
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue  # a damaged sidecar: its samples are built again
        if sidecar.get("file") in present:  # a deleted shard's samples are built again
            out.append(sidecar)
    return out


def completed_sample_ids(storage: CacheStorage, split: str) -> set[int]:
    """Sample ids of the split that some complete shard already holds."""
    return {sid for sidecar in _sidecars(storage, split) for sid in sidecar["sample_ids"]}


def merge_index(storage: CacheStorage, split: str, *, clean: bool = True) -> dict[str, Any]:
    """Merge every rank's complete shards into ``index.json`` and ``sample_index.safetensors``.

    Each sample counts once: a sample written twice (two builds that overlapped) is read from
    the first shard listing it, and a shard whose every sample an earlier shard holds is left
    out of the index (its files are removed with ``clean``). The index's ``positions`` and
    ``bytes`` are those of the samples and shards it lists.

    Args:
        storage: the cache root.
        split: the split to merge.
        clean: also remove what no sidecar lists (temporary files and shards without a sidecar,
            left by a killed build) and duplicate shards. Only safe while no other process
            writes the split (the caller holds the split's build lock).
    """
    sidecars = _sidecars(storage, split)
    ids, shard_of, row_of, lengths = [], [], [], []
    seen: set[int] = set()
    kept: list[dict[str, Any]] = []
    for sidecar in sidecars:
        rows = [(row, sid) for row, sid in enumerate(sidecar["sample_ids"]) if sid not in seen]
        if not rows:
            continue  # a duplicate of samples already listed
        per_sample = sidecar.get("lengths")
        for row, sample_id in rows:
            seen.add(sample_id)
            ids.append(sample_id)
            shard_of.append(len(kept))
            row_of.append(row)
        if per_sample is not None:
            lengths.append(sum(per_sample[row] for row, _ in rows))
        else:  # a sidecar of an older build: its positions, whole (exact unless it overlaps another)
            lengths.append(sidecar["positions"])
        kept.append(sidecar)
    if clean:
        listed = {s["file"] for s in kept}
        listed |= {f.replace(".safetensors", ".json") for f in listed}
        for name in storage.list(split, "shards"):
            if name not in listed:  # leftovers of a killed build, orphaned sidecars, duplicates
                storage.remove(split, "shards", name)
    order = torch.tensor(ids, dtype=torch.int64).argsort() if ids else torch.zeros(0, dtype=torch.int64)
    table = {
        "sample_id": torch.tensor(ids, dtype=torch.int64)[order],
        "shard": torch.tensor(shard_of, dtype=torch.int32)[order],
        "row": torch.tensor(row_of, dtype=torch.int32)[order],
    }
    storage.write_bytes(save_safetensors(table), split, "sample_index.safetensors")
    index = {
        "format": FORMAT_VERSION,
        "split": split,
        "shards": [{k: s[k] for k in ("file", "sha256", "bytes", "samples", "positions")} for s in kept],
        "samples": len(ids),
        "positions": sum(lengths),
        "bytes": sum(s["bytes"] for s in kept),
    }
    folded = [s["folded_mass"] for s in kept if "folded_mass" in s]
    if folded:
        total = sum(f["sum"] for f in folded)
        index["folded_mass"] = {"sum": total, "max": max(f["max"] for f in folded),
                                "mean": total / max(index["positions"], 1)}
    storage.write_json(index, split, "index.json")
    return index
