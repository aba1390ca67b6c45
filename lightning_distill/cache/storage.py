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

import hashlib
import json
import os
import uuid
from typing import Any

import fsspec
from fsspec.implementations.local import LocalFileSystem

__all__ = ["CacheStorage", "sha256_bytes"]


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
            with open(tmp, "wb") as handle:
                handle.write(data)
                handle.flush()
                os.fsync(handle.fileno())
            os.replace(tmp, target)
        else:
            self.fs.pipe_file(target, data)

    def write_json(self, value: Any, *parts: str) -> None:
        self.write_bytes(json.dumps(value, indent=1, sort_keys=True).encode("utf-8"), *parts)

    def list(self, *parts: str) -> list[str]:
        """Names (not paths) in a folder; empty when it does not exist."""
        folder = self.path(*parts)
        if not self.fs.exists(folder):
            return []
        return sorted(p.rstrip("/").rsplit("/", 1)[-1] for p in self.fs.ls(folder, detail=False))

    def remove(self, *parts: str) -> None:
        target = self.path(*parts)
        if self.fs.exists(target):
            self.fs.rm(target, recursive=True)

    def is_empty(self) -> bool:
        return not self.fs.exists(self.root) or not self.list()
