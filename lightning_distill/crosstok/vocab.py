"""Which tokens two vocabularies share: token strings normalised to the bytes they stand for.

Tokenizers write the same text differently in their vocabularies: byte-level BPEs (GPT-2, Llama 3,
Qwen) map each byte to a printable character (``Ġ`` for a space), SentencePiece writes a space as
``▁`` and unknown bytes as ``<0x0A>``. :func:`token_bytes` undoes these spellings, so two tokens
are shared when they stand for the same bytes; special tokens (``<|endoftext|>``) are shared when
their content is equal. :func:`shared_vocab` builds the mapping once, from the two tokenizers.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

import torch
from torch import Tensor

__all__ = ["SharedVocab", "shared_vocab", "token_bytes"]

_BYTE_FALLBACK = re.compile(r"^<0x([0-9A-Fa-f]{2})>$")


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
        return bytes([int(match.group(1), 16)])
    return token.replace("\u2581", " ").encode("utf-8")


@dataclass(frozen=True)
class SharedVocab:
    """Pairs of ids, one per side, of the entries both vocabularies share.

    Attributes:
        student_ids: ``(K,)`` student ids of the shared entries.
        teacher_ids: ``(K,)`` the teacher's ids of the same entries, in the same order.
        student_size: the student's output size.
        teacher_size: the teacher's output size.
    """

    student_ids: Tensor
    teacher_ids: Tensor
    student_size: int
    teacher_size: int

    @property
    def size(self) -> int:
        return int(self.student_ids.numel())

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


def _keys(tokenizer: Any) -> dict[Any, int]:
    byte_level = _is_byte_level(tokenizer)
    special = {str(t) for t in getattr(tokenizer, "all_special_tokens", [])}
    added = getattr(tokenizer, "get_added_vocab", dict)()
    special |= set(added)
    keys: dict[Any, int] = {}
    for token, index in sorted(tokenizer.get_vocab().items(), key=lambda kv: kv[1]):
        key: Any = ("special", token) if token in special else token_bytes(token, byte_level=byte_level)
        keys.setdefault(key, int(index))  # two spellings of the same bytes: the lowest id is the shared one
    return keys


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
    student, teacher = _keys(student_tokenizer), _keys(teacher_tokenizer)
    pairs = sorted((i, teacher[k]) for k, i in student.items() if k in teacher and i < vs and teacher[k] < vt)
    s_ids = torch.tensor([p[0] for p in pairs], dtype=torch.long)
    t_ids = torch.tensor([p[1] for p in pairs], dtype=torch.long)
    return SharedVocab(s_ids, t_ids, vs, vt)
