"""Where a cache lives: a local folder or any fsspec URL, with atomic writes and checksums.

Layout under the cache root::

    cache.json                                  fingerprint + spec (written first)
    <split>/shards/<build>-r<rank>-<n>.safetensors   targets of a run of samples
    <split>/shards/<build>-r<rank>-<n>.json     its sidecar: sha256, sizes, sample ids
    <split>/index.json                          merged list of shards (+ checksums)
    <split>/sample_index.safetensors            sample id -> (shard, row), sorted by id

A shard counts only once its sidecar exists, and the sidecar is written after the shard, each
atomically (a temporary name then a rename on local disks; object stores publish an object
only when its upload completes). A killed build therefore leaves no shard that is read as
complete, and the next build skips exactly the samples whose sidecars exist.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import uuid
import warnings
from collections.abc import Iterator
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["LOCK_SUFFIX", "CacheStorage", "sha256_bytes"]

#: Lock files (local caches) end with this; they are never data, never listed, never removed.
LOCK_SUFFIX = ".lock"


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CacheStorage:
    """File operations on a cache root given as a local path or an fsspec URL (``s3://``, ``memory://``)."""

    def __init__(self, url: str, **storage_options: Any) -> None:
        self.url = str(url)
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **storage_options)
        self.local = isinstance(self.fs, LocalFileSystem)

    def path(self, *parts: str) -> str:
        return "/".join([self.root.rstrip("/"), *parts])

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self.path(*parts))

    def read_bytes(self, *parts: str) -> bytes:
        return self.fs.cat_file(self.path(*parts))

    def read_json(self, *parts: str) -> Any:
        return json.loads(self.read_bytes(*parts).decode("utf-8"))

    def write_bytes(self, data: bytes, *parts: str) -> None:
        """Write atomically: readers see the old file or the whole new one, never a part."""
        target = self.path(*parts)
        parent = target.rsplit("/", 1)[0]
        self.fs.makedirs(parent, exist_ok=True)
        if self.local:
            tmp = f"{target}.tmp-{uuid.uuid4().hex[:8]}"
            try:
                with open(tmp, "wb") as handle:
                    handle.write(data)
                    handle.flush()
                    os.fsync(handle.fileno())
                os.replace(tmp, target)
            except BaseException:  # disk full, killed: no partial file is left, under any name
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
                raise
        else:
            self.fs.pipe_file(target, data)

    def write_json(self, value: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(value, indent=1, sort_keys=True).encode("utf-8"), *parts)

    def list(self, *parts: str) -> list[str]:
        """Names (not paths) in a folder, lock files left out; empty when it does not exist."""
        folder = self.path(*parts)
        if not self.fs.exists(folder):
            return []
        names = (p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))
        return sorted(n for n in names if not n.endswith(LOCK_SUFFIX))

    def is_file(self) -> bool:
        """Whether the cache root is an existing file (not a folder)."""
        return self.fs.isfile(self.root)

    def has_lock(self, name: str) -> bool:
        """Whether a job has ever taken the lock ``name`` here (its lock file exists)."""
        return self.local and os.path.exists(os.path.join(self.root, f".{name}{LOCK_SUFFIX}"))

    @contextlib.contextmanager
    def lock(self, name: str) -> Iterator[None]:
        """Hold an exclusive lock named ``name`` (``fcntl.flock`` on ``<root>/.<name>.lock``).

        Processes that share a local (or network-mounted) folder take turns; the lock is released
        when the block ends or the process dies. Object stores have no locks: there the block
        runs unlocked (builds of one cache in several jobs at once then duplicate work, which
        the index counts once).
        """
        if not self.local:
            yield
            return
        os.makedirs(self.root, exist_ok=True)
        path = os.path.join(self.root, f".{name}{LOCK_SUFFIX}")
        handle = open(path, "a+b")  # noqa: SIM115
        try:
            try:
                fcntl.flock(handle.fileno(), fcntl.LOCK_EX)
                locked = True
            except OSError as error:  # a file system without locks (some network mounts)
                warnings.warn(f"cannot lock {path} ({error}); building without a lock: do not build this cache "
                              "from two jobs at once.", stacklevel=3)
                locked = False
            yield
        finally:
            if locked:
                fcntl.flock(handle.fileno(), fcntl.LOCK_UN)
            handle.close()

    def remove(self, *parts: str) -> None:
        target = self.path(*parts)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def is_empty(self) -> bool:
        return not self.fs.exists(self.root) or not self.list()
