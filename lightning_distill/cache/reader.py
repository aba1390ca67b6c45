"""Reading a cache: sample ids -> the teacher targets of a batch, checksums verified."""

from __future__ import annotations

import zlib
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from safetensors.torch import load as load_safetensors
from torch import Tensor

from lightning_distill.cache.fingerprint import CacheCorruptedError, CacheMismatchError, token_hash
from lightning_distill.cache.format import CacheSpec, LoadedShard, assemble
from lightning_distill.cache.storage import CacheStorage, sha256_bytes
from lightning_distill.types import TeacherTargets

__all__ = ["SplitReader"]


class SplitReader:
    """The cached targets of one split.

    Shards are loaded whole on first use, their sha256 checked against the index, and the
    ``max_shards_in_memory`` most recently used ones kept. Lookups go through the sorted
    sample-id table, so a batch in any order and of any size finds its samples.

    Args:
        storage: the cache root.
        split: the split to read.
        spec: the cache's spec (from ``cache.json``).
        max_shards_in_memory: shards kept loaded (least recently used dropped first).

    Raises:
        CacheCorruptedError: the index or the sample table is missing or unreadable.
    """

    def __init__(self, storage: CacheStorage, split: str, spec: CacheSpec, *, max_shards_in_memory: int = 8) -> None:
        self.storage = storage
        self.split = split
        self.spec = spec
        self.max_shards_in_memory = max(1, int(max_shards_in_memory))
        try:
            self.index = storage.read_json(split, "index.json")
            table = load_safetensors(storage.read_bytes(split, "sample_index.safetensors"))
        except FileNotFoundError as error:
            raise CacheCorruptedError(
                f"the cache at {storage.url} has no complete index for split {split!r} ({error}); "
                "run the build again (it resumes)."
            ) from None
        except Exception as error:  # not JSON / not safetensors (safetensors raises its own error types)
            raise CacheCorruptedError(
                f"the index of split {split!r} in the cache at {storage.url} cannot be read ({type(error).__name__}: "
                f"{str(error)[:120]}); it is damaged or not a cache file. Delete the folder {storage.path(split)} "
                "and run the build again."
            ) from None
        # The sorted id table and each id's shard and row, as NumPy (a batch's lookup is NumPy).
        self._table, self._shard_of, self._row_of = (table[k].numpy() for k in ("sample_id", "shard", "row"))
        self._shards: OrderedDict[int, LoadedShard] = OrderedDict()
        self._hash_checked = bytearray(len(self._table))  # 1: this sample's tokens were checked

    def __len__(self) -> int:
        return len(self._table)

    @property
    def positions(self) -> int:
        return int(self.index["positions"])

    @property
    def bytes(self) -> int:
        return int(self.index["bytes"])

    def _locate(self, sample_ids: Tensor) -> tuple[np.ndarray, np.ndarray]:
        """``searchsorted`` into the id table; returns (where, found) as NumPy arrays (a batch's
        lookup is a few microseconds of NumPy, not a dozen tensor operations)."""
        ids = sample_ids.to("cpu", torch.int64).reshape(-1).numpy()
        table = self._table
        if not len(table):
            return np.zeros(len(ids), dtype=np.int64), np.zeros(len(ids), dtype=bool)
        where = np.minimum(np.searchsorted(table, ids), len(table) - 1)
        return where, table[where] == ids

    def absent_shards(self) -> list[str]:
        """Shards the index lists that are not in storage (deleted after damage): rebuilt by a build."""
        present = set(self.storage.list(self.split, "shards"))
        return [entry["file"] for entry in self.index["shards"] if entry["file"] not in present]

    def missing(self, sample_ids: Tensor) -> Tensor:
        """The ids among ``sample_ids`` the cache does not hold."""
        ids = sample_ids.to("cpu", torch.int64).reshape(-1)
        _, found = self._locate(ids)
        return ids[torch.from_numpy(~found)]

    def _shard(self, number: int) -> LoadedShard:
        shard = self._shards.get(number)
        if shard is not None:
            self._shards.move_to_end(number)
            return shard
        entry = self.index["shards"][number]
        where = f"{self.storage.path(self.split, 'shards', entry['file'])}"
        fix = ("Delete that file (and nothing else): the next run with this cache rebuilds just its "
               "samples.")
        try:
            data = self.storage.read_bytes(self.split, "shards", entry["file"])
        except FileNotFoundError:
            raise CacheCorruptedError(f"cache shard {where} is missing. {fix}") from None
        if sha256_bytes(data) != entry["sha256"]:
            raise CacheCorruptedError(
                f"cache shard {where} is corrupted: its sha256 does not match the index "
                f"(a flipped or truncated byte). {fix}"
            )
        try:
            if self.spec.compression == "zlib":
                data = zlib.decompress(data)
            shard = LoadedShard(load_safetensors(data))
        except Exception as error:  # safetensors raises its own error types
            raise CacheCorruptedError(f"cache shard {where} cannot be read ({error}). {fix}") from None
        self._shards[number] = shard
        while len(self._shards) > self.max_shards_in_memory:
            self._shards.popitem(last=False)
        return shard

    def read(
        self,
        sample_ids: Tensor,
        position_shape: tuple[int, ...],
        device: torch.device | str,
        *,
        input_ids: Tensor | None = None,
        token_hashes: Callable[[Tensor], Tensor] | None = None,
    ) -> TeacherTargets:
        """The targets of a batch, shaped like its positions ``(B, T)``.

        Args:
            sample_ids: ``(B,)`` the batch's stable sample ids.
            position_shape: ``(B, T)`` (or ``(B,)``), the shape of the student's logits
                without the vocabulary.
            device: where the targets go.
            input_ids: ``(B, T)`` the batch's token ids; when given, each sample's stored token
                hash is checked against them (the first time this reader serves the sample).
            token_hashes: instead of ``input_ids``: ``lengths -> (B,)`` hashes, called with each
                sample's stored positions when a sample is checked (encoder-decoder and
                classifier caches hash the whole model input).

        Raises:
            CacheMismatchError: a sample id the cache lacks, a sample whose tokens changed, or a
                sample with more stored positions than the batch has.
            CacheCorruptedError: a damaged shard.
        """
        ids = sample_ids.to("cpu", torch.int64).reshape(-1)
        where, found = self._locate(ids)
        if not found.all():
            absent = ids[torch.from_numpy(~found)][:5].tolist()
            raise CacheMismatchError(
                f"the teacher cache at {self.storage.url} has no targets for sample ids {absent} of split "
                f"{self.split!r}; the data serves samples the cache was not built for. Rebuild (resume) the "
                "cache for this data: it builds only the missing samples."
            )
        where_list = where.tolist()
        shards, rows = self._shard_of[where].tolist(), self._row_of[where].tolist()
        pieces, lengths, runs = [], [], []  # one batched read per run of consecutive same-shard samples
        start = 0
        for end in range(1, len(shards) + 1):
            if end == len(shards) or shards[end] != shards[start]:
                shard = self._shard(shards[start])
                pieces.append(shard.take(rows[start:end]))
                lengths += shard.lengths_of(rows[start:end])
                runs.append((shard, rows[start:end]))
                start = end
        width = 1
        for n in position_shape[1:]:
            width *= n
        if max(lengths) > width:
            bad = lengths.index(max(lengths))
            raise CacheMismatchError(
                f"sample {ids[bad].item()} ({self.split}) has {lengths[bad]} cached positions but the batch "
                f"has {width}; the data's sequence length changed since the cache was built. Rebuild the cache."
            )
        if (input_ids is not None or token_hashes is not None) and not all(self._hash_checked[w] for w in where_list):
            # Each sample's tokens are checked the first time this process reads it (data does not
            # change under a running job), so later epochs skip the hash and its device sync.
            stored = np.concatenate([shard.tensors["sample.token_hash"].numpy()[r] for shard, r in runs])
            current = (token_hashes(torch.tensor(lengths)) if token_hashes is not None
                       else token_hash(input_ids.reshape(len(ids), -1), torch.tensor(lengths))).numpy()
            changed = np.flatnonzero(stored != current)
            if len(changed):
                raise CacheMismatchError(
                    f"sample ids {ids.numpy()[changed][:5].tolist()} ({self.split}) now hold other tokens than when the "
                    f"teacher cache at {self.storage.url} was built: the data changed under the same ids. "
                    "Rebuild the cache (delete it or pass on_mismatch='rebuild')."
                )
            for w in where_list:
                self._hash_checked[w] = 1
        return assemble(self.spec, pieces, lengths, tuple(position_shape), torch.device(device))

    def describe(self) -> dict[str, Any]:
        positions = max(self.positions, 1)
        out = {"samples": len(self), "positions": self.positions, "bytes": self.bytes,
               "bytes_per_token": self.bytes / positions, "shards": len(self.index["shards"])}
        if "folded_mass" in self.index:  # teacher probability past the student's vocabulary, per position
            out["folded_mass"] = dict(self.index["folded_mass"])
        return out
