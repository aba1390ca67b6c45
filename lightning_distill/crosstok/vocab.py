"""Which tokens two vocabularies share: token strings normalised to the bytes they stand for.

Tokenizers write the same text differently in their vocabularies: byte-level BPEs (GPT-2, Llama 3,
Qwen) map each byte to a printable character (``Ġ`` for a space), SentencePiece writes a space as
``▁`` and unknown bytes as ``<0x0A>``. :func:`token_bytes` undoes these spellings, so two tokens
are shared when they stand for the same bytes; special tokens (``<|endoftext|>``) are shared when
their content is equal. :func:`shared_vocab` builds the mapping once, from the two tokenizers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from functools import cached_property, lru_cache
from typing import Any

import torch
from torch import Tensor

__all__ = ["FallbackBytes", "SharedVocab", "Spelling", "shared_vocab", "token_bytes"]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


class FallbackBytes(bytes):
    """The bytes of a SentencePiece byte-fallback entry (``<0x41>``): equal to (and hashed as) the same
    bytes, so it is shared with any spelling of them, but a vocabulary's ordinary entry of the same
    bytes (``A``) is preferred as the shared id, since that is the one the model emits."""


@lru_cache(maxsize=1)
def _byte_decoder() -> dict[str, int]:
    """GPT-2's printable character for each byte, inverted (character -> byte)."""
    printable = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(
        range(ord("®"), ord("ÿ") + 1))
    chars = printable[:]
    n = 0
    for b in range(256):
        if b not in printable:
            printable.append(b)
            chars.append(256 + n)
            n += 1
    return {chr(c): b for b, c in zip(printable, chars, strict=True)}


def _is_byte_level(tokenizer: Any) -> bool:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    return backend is not None and "ByteLevel" in repr(getattr(backend, "decoder", None))


def token_bytes(token: str, *, byte_level: bool) -> bytes:
    """The bytes a vocabulary entry stands for.

    Args:
        token: the entry as the vocabulary writes it.
        byte_level: the vocabulary is a byte-level BPE (each character stands for one byte).
    """
    if byte_level:
        table = _byte_decoder()
        if all(ch in table for ch in token):
            return bytes(table[ch] for ch in token)
        return token.encode("utf-8")
    match = _BYTE_FALLBACK.match(token)
    if match:
        return FallbackBytes([int(match.group(1), 16)])
    return token.replace("\u2581", " ").encode("utf-8")


@dataclass(frozen=True)
class Spelling:
    """What each id of one vocabulary spells, to find the id that spells a given text.

    Attributes:
        keys: per id, the bytes it stands for, ``("special", content)`` for a special token, or
            ``None`` (an id past the tokenizer's entries).
        lookup: key -> the id the shared map pairs for that key: the lowest ordinary id with it, else
            the lowest byte-fallback id (:class:`FallbackBytes`).
        canon: ``(V,)`` per id, that id for its key (the id itself when it has none).
    """

    keys: tuple[Any, ...]
    lookup: dict[Any, int]
    canon: Tensor

    @classmethod
    def from_keys(cls, keys: tuple[Any, ...]) -> Spelling:
        """The lookup tables of ``keys`` (one per id)."""
        lookup: dict[Any, int] = {}
        canon = list(range(len(keys)))
        # Ordinary entries first: Llama-2's "<0x41>" (a low id) only spells "A" when "A" (a higher id,
        # the one the model emits) is missing.
        order = sorted(range(len(keys)), key=lambda i: isinstance(keys[i], FallbackBytes))
        for index in order:
            if keys[index] is not None:
                lookup.setdefault(keys[index], index)
        for index, key in enumerate(keys):
            if key is not None:
                canon[index] = lookup[key]
        return cls(keys, lookup, torch.tensor(canon, dtype=torch.long))


@dataclass(frozen=True)
class SharedVocab:
    """Pairs of ids, one per side, of the entries both vocabularies share.

    Attributes:
        student_ids: ``(K,)`` student ids of the shared entries.
        teacher_ids: ``(K,)`` the teacher's ids of the same entries, in the same order.
        student_size: the student's output size.
        teacher_size: the teacher's output size.
        student_keys: per student id (``student_size`` of them), what it spells: bytes,
            ``("special", content)`` or ``None``; :func:`shared_vocab` fills it. ``None``: not
            known (then no id is taken for another spelling of a group's text, see
            :mod:`lightning_distill.losses.cross_tokenizer`).
        teacher_keys: the same for the teacher's ids.
    """

    student_ids: Tensor
    teacher_ids: Tensor
    student_size: int
    teacher_size: int
    student_keys: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)
    teacher_keys: tuple[Any, ...] | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        for who, keys, size in (("student", self.student_keys, self.student_size),
                                ("teacher", self.teacher_keys, self.teacher_size)):
            if keys is not None and len(keys) != size:
                raise ValueError(f"{who}_keys has {len(keys)} entries but the {who} size is {size}; give one "
                                 "key per id (None for an id without one).")

    @property
    def size(self) -> int:
        return int(self.student_ids.numel())

    @cached_property
    def spellings(self) -> tuple[Spelling | None, Spelling | None]:
        """``(student, teacher)`` :class:`Spelling` tables (``None`` where the keys are not known), built once."""
        return tuple(None if keys is None else Spelling.from_keys(tuple(keys))  # type: ignore[return-value]
                     for keys in (self.student_keys, self.teacher_keys))

    def unshared(self, device: torch.device | str = "cpu") -> tuple[Tensor, Tensor]:
        """``(student ids, teacher ids)`` of the entries only one vocabulary has."""
        s_only = torch.ones(self.student_size, dtype=torch.bool)
        s_only[self.student_ids] = False
        t_only = torch.ones(self.teacher_size, dtype=torch.bool)
        t_only[self.teacher_ids] = False
        return s_only.nonzero().flatten().to(device), t_only.nonzero().flatten().to(device)

    @classmethod
    def identity(cls, vocab_size: int) -> SharedVocab:
        """The mapping of a vocabulary with itself."""
        ids = torch.arange(vocab_size)
        return cls(ids, ids.clone(), vocab_size, vocab_size)


def _id_keys(tokenizer: Any, size: int) -> tuple[Any, ...]:
    """Per id below ``size``, what it spells: its bytes, ``("special", content)``, or ``None``."""
    byte_level = _is_byte_level(tokenizer)
    special = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    added = getattr(tokenizer, "get_added_vocab", dict)()
    special |= set(added)
    keys: list[Any] = [None] * size
    for token, index in tokenizer.get_vocab().items():
        if 0 <= int(index) < size:
            keys[int(index)] = ("special", token) if token in special else token_bytes(token, byte_level=byte_level)
    return tuple(keys)


def shared_vocab(student_tokenizer: Any, teacher_tokenizer: Any, *, student_size: int | None = None,
                 teacher_size: int | None = None) -> SharedVocab:
    """The entries two tokenizers share (equal bytes, or equal special-token content).

    Args:
        student_tokenizer: the student's tokenizer (``get_vocab()``).
        teacher_tokenizer: the teacher's tokenizer.
        student_size: the student's output size (default ``len(student_tokenizer)``); ids at or
            past it are dropped (a model may have fewer rows than the tokenizer has entries).
        teacher_size: the same for the teacher.

    Raises:
        TypeError: a tokenizer without ``get_vocab()``.
    """
    for who, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        if not callable(getattr(tok, "get_vocab", None)):
            raise TypeError(f"the {who} tokenizer ({type(tok).__name__}) has no get_vocab(); pass a "
                            "Hugging Face tokenizer.")
    vs = int(student_size if student_size is not None else len(student_tokenizer))
    vt = int(teacher_size if teacher_size is not None else len(teacher_tokenizer))
    s_keys, t_keys = _id_keys(student_tokenizer, vs), _id_keys(teacher_tokenizer, vt)
    # Two spellings of the same bytes: the lowest ordinary id is the shared one (Spelling.from_keys).
    student, teacher = Spelling.from_keys(s_keys).lookup, Spelling.from_keys(t_keys).lookup
    pairs = sorted((i, teacher[k]) for k, i in student.items() if k in teacher)
    s_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    t_ids = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return SharedVocab(s_ids, t_ids, vs, vt, s_keys, t_keys)
