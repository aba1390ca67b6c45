"""Teacher targets on disk: computed once, stored compactly, read back by sample id.

* :mod:`~lightning_distill.cache.format`: what a shard stores per kind (dense, top-k,
  sampled), encoding one sample and assembling a batch.
* :mod:`~lightning_distill.cache.writer`: shards per rank, the merged index.
* :mod:`~lightning_distill.cache.reader`: sample ids -> targets, checksums verified.
* :mod:`~lightning_distill.cache.fingerprint`: what the cache is of, and the refusal.
* :mod:`~lightning_distill.cache.storage`: local paths and fsspec URLs, atomic writes.
* :mod:`~lightning_distill.cache.layout`: positions stored per sample, per-sample token hashes.
* :mod:`~lightning_distill.cache.builder`: :class:`CacheBuilder` opens, verifies and builds a
  cache from the teacher, given the rank, the world size and a barrier.

Nothing here imports Lightning or the module. The Lightning side (hooks, the per-batch attach)
is :class:`lightning_distill.callbacks.TeacherCache`.
"""

from lightning_distill.cache.builder import CacheBuilder
from lightning_distill.cache.fingerprint import (
    FORMAT_VERSION,
    CacheCorruptedError,
    CacheMismatchError,
    cache_fingerprint,
    check_fingerprint,
    token_hash,
    tokenizer_fingerprint,
)
from lightning_distill.cache.format import KINDS, CacheSpec, encode_sample
from lightning_distill.cache.reader import SplitReader
from lightning_distill.cache.storage import CacheStorage
from lightning_distill.cache.writer import (
    ShardWriter,
    completed_sample_ids,
    merge_index,
    write_manifest,
)

__all__ = [
    "FORMAT_VERSION",
    "KINDS",
    "CacheBuilder",
    "CacheCorruptedError",
    "CacheMismatchError",
    "CacheSpec",
    "CacheStorage",
    "ShardWriter",
    "SplitReader",
    "cache_fingerprint",
    "check_fingerprint",
    "completed_sample_ids",
    "encode_sample",
    "merge_index",
    "token_hash",
    "tokenizer_fingerprint",
    "write_manifest",
]
