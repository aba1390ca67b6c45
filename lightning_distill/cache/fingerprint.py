"""What a teacher cache is a cache *of*: the fingerprint that keys it, and the refusal when it differs.

A cache of teacher targets is only valid for the teacher, tokenizer, data, target kind,
kind parameters and on-disk format it was built with. :func:`cache_fingerprint` writes those
down as plain values (stored in the cache's ``cache.json``); :func:`check_fingerprint` compares
a stored fingerprint with the current one and raises :class:`CacheMismatchError` listing every
component that differs, with the fix. A cache is never used when one differs.

The data component is the data module's own fingerprint when it has one
(:attr:`~lightning_distill.data.SlicedTextDataModule.data_fingerprint`: corpus, tokenizer,
blocking). Independently of it, every cached sample stores a hash of its token ids, checked
against the batch the first time a run reads the sample, so a sample id that now names other tokens is
caught even for data modules without a fingerprint.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch import Tensor

from lightning_distill.models.identity import INFORMATIONAL_FIELDS

__all__ = [
    "COMPONENTS",
    "FORMAT_VERSION",
    "CacheCorruptedError",
    "CacheMismatchError",
    "cache_fingerprint",
    "check_fingerprint",
    "fingerprint_key",
    "token_hash",
    "tokenizer_fingerprint",
]

#: Version of the on-disk layout (file names, tensor names, dtypes). Bump on any change.
FORMAT_VERSION = 2

#: The components of a fingerprint, in the order mismatches are reported.
COMPONENTS = ("teacher", "tokenizer", "data", "kind", "params", "format")

# The teacher fields that identify it: what it computes, never where it was loaded from. Name and
# revision stand in only when the weights were too large to hash (``weights_sha256`` is None).
_TEACHER_FIELDS = ("class", "model_type", "config_sha256", "weights_sha256", "num_parameters", "vocab_size",
                   "dtype")
_TEACHER_FALLBACK_FIELDS = INFORMATIONAL_FIELDS
# A teacher served elsewhere (``ServedTeacher.identity``) is known by its name, where it is served
# and the revision (and weights path) the server reports: all of them compared.
_SERVED_FIELDS = ("source", "model_name", "base_url", "revision", "root")


class CacheMismatchError(ValueError):
    """A teacher cache exists but was built for another teacher, tokenizer, data, kind or format."""


class CacheCorruptedError(RuntimeError):
    """A cache file is damaged (checksum mismatch, missing or unreadable shard)."""


def cache_fingerprint(
    *,
    teacher: Mapping[str, Any] | None,
    tokenizer: str | None,
    data: str | None,
    kind: str,
    params: Mapping[str, Any],
) -> dict[str, Any]:
    """The plain-value fingerprint of a cache (what ``cache.json`` stores under ``fingerprint``).

    Args:
        teacher: the teacher's identity (:func:`~lightning_distill.models.describe_model`, or a
            served teacher's ``ServedTeacher.identity()``: model name, URL, revision).
        tokenizer: tokenizer digest, or ``None`` when the data has no tokenizer.
        data: the data module's fingerprint, or ``None`` (per-sample token hashes still apply).
        kind: ``"dense"``, ``"topk"`` or ``"sampled"``.
        params: the kind's parameters and everything else that changes what is stored.
    """
    ident = None
    if teacher is not None:
        fields = _TEACHER_FIELDS if teacher.get("weights_sha256") else _TEACHER_FIELDS + _TEACHER_FALLBACK_FIELDS
        if teacher.get("source") == "served":
            fields = _SERVED_FIELDS
        ident = {k: teacher.get(k) for k in fields if k in teacher}
    return _plain({
        "teacher": ident,
        "tokenizer": tokenizer,
        "data": data,
        "kind": kind,
        "params": dict(params),
        "format": FORMAT_VERSION,
    })


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """Return a short hex digest of a fast tokenizer's full serialisation.

    The data package keys its tokenized data with it and the teacher cache its targets.

    Args:
        tokenizer: a fast (``tokenizers``-backed) tokenizer.

    Returns:
        16 hex characters; equal tokenizers (vocabulary, merges, special tokens) hash equal.

    Raises:
        AttributeError: a slow tokenizer (no ``backend_tokenizer``).
    """
    data = tokenizer.backend_tokenizer.to_str().encode("utf-8")
    return hashlib.sha256(data).hexdigest()[:16]


def fingerprint_key(fingerprint: Mapping[str, Any]) -> str:
    """16 hex digits that name a fingerprint (the default cache folder name)."""
    blob = json.dumps(_plain(fingerprint), sort_keys=True).encode("utf-8")
    return hashlib.sha256(blob).hexdigest()[:16]


def check_fingerprint(stored: Mapping[str, Any], current: Mapping[str, Any], *, where: str) -> None:
    """Raise :class:`CacheMismatchError` naming every component that differs.

    A component that is a mapping (teacher, params) is shown with only its entries that differ,
    in full.

    Args:
        stored: the fingerprint in the cache's ``cache.json``.
        current: the fingerprint of this run.
        where: the cache location, for the message.
    """
    stored, current = _plain(stored), _plain(current)
    lines = []
    for name in COMPONENTS:
        old, new = stored.get(name), current.get(name)
        if old != new:
            if isinstance(old, dict) and isinstance(new, dict):
                keys = sorted(k for k in old.keys() | new.keys() if old.get(k, _MISSING) != new.get(k, _MISSING))
                old = {k: old[k] for k in keys if k in old}
                new = {k: new[k] for k in keys if k in new}
            lines.append(f"  - {name}: cache has {_text(old)}, this run has {_text(new)}")
    if lines:
        raise CacheMismatchError(
            f"the teacher cache at {where} was built for something else, so it is not used:\n"
            + "\n".join(lines)
            + "\nRebuild it: delete that folder, point TeacherCache(dirpath=...) at a new one, or pass "
            "on_mismatch='rebuild' (Hydra: callbacks.teacher_cache.on_mismatch=rebuild)."
        )


# Two independent 31-bit polynomial hashes mod a Mersenne prime, combined into one int64.
_PRIME = 2**31 - 1


def _weights(length: int, seed: int) -> np.ndarray:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(1, _PRIME, (length,), generator=g, dtype=torch.int64).numpy()


_WEIGHT_CACHE: dict[int, np.ndarray] = {}


def token_hash(ids: Tensor, lengths: Tensor) -> Tensor:
    """A 62-bit hash of each row's first ``lengths[b]`` token ids: ``(B, T)`` -> ``(B,)`` int64 (CPU).

    Equal rows hash equal; a changed, added or removed token changes the hash (collision
    chance about 2**-62 for unrelated rows). Used to check that a sample id still names the
    tokens it named when the cache was built. Computed with NumPy on the host: a batch is a
    few kilobytes, and a dozen NumPy operations cost microseconds where tensor operations
    cost tens of them.
    """
    x = ids.detach().reshape(ids.shape[0], -1).to("cpu", torch.int64).numpy()
    n = lengths.detach().to("cpu", torch.int64).reshape(-1).numpy()
    width = x.shape[1]
    weights = _WEIGHT_CACHE.get(width)
    if weights is None:  # both hashes' weights, (2, T)
        weights = _WEIGHT_CACHE[width] = np.stack([_weights(width, 1), _weights(width, 2)])
    keep = np.arange(width) < n[:, None]
    values = np.where(keep, np.remainder(x + 1, _PRIME), 0)
    # Products stay below 2**62 and sums of up to 2**32 of them are reduced as we go.
    h = np.remainder(np.remainder(values[:, None, :] * weights, _PRIME).sum(-1), _PRIME)  # (B, 2)
    h2 = np.remainder(h[:, 1] + n, _PRIME)
    return torch.from_numpy((h[:, 0] << 31) | h2)


_MISSING = object()


def _text(value: Any) -> str:
    return json.dumps(value, sort_keys=True, default=str)


def _plain(value: Any) -> Any:
    """JSON round trip: tuples become lists, keys strings, so stored and current compare equal."""
    return json.loads(json.dumps(value, sort_keys=True, default=str))
