"""Token alignment between two tokenizations of the same text, by character offsets.

Two tokenizers split a text at different places. Where both put a token boundary at the same
character, the text before it is the same for both models, so their predictions of what comes
next are conditioned on the same text and can be compared. :func:`align_offsets` groups the
tokens into spans that end on such common boundaries: group ``g`` covers the characters
``[ends[g - 1], ends[g])`` and holds one or more tokens of each side.

A boundary after a token is *clean* when the next token starts at or after its end: byte-level
tokenizers split a multi-byte character over two tokens that both report the character's span
(overlapping offsets), and no boundary exists inside that character.
"""

from __future__ import annotations

import bisect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Alignment", "align_offsets", "align_text", "clean_ends"]

Offsets = Sequence[tuple[int, int]]


@dataclass(frozen=True)
class Alignment:
    """Tokens of two tokenizations grouped into spans that end on common character boundaries.

    Attributes:
        student_groups: the group of each student token (non-decreasing, starting at 0).
        teacher_groups: the group of each teacher token.
        ends: the end character of each group; group ``g`` covers ``[ends[g - 1], ends[g])``
            (group 0 starts at 0); the last end is the text's length.
    """

    student_groups: list[int]
    teacher_groups: list[int]
    ends: list[int]

    @property
    def num_groups(self) -> int:
        return len(self.ends)

    def spans(self) -> list[tuple[int, int]]:
        """``(start, end)`` characters of each group."""
        return list(zip([0, *self.ends[:-1]], self.ends, strict=True))


def clean_ends(offsets: Offsets) -> set[int]:
    """The character positions after which a tokenization has a clean boundary.

    Args:
        offsets: ``(start, end)`` characters of each token, in order.

    Returns:
        The ends of the tokens whose successor starts at or after their end (and the last end).
    """
    ends: set[int] = set()
    for i, (_, end) in enumerate(offsets):
        if end <= 0:
            continue
        if i + 1 == len(offsets) or offsets[i + 1][0] >= end:
            ends.add(int(end))
    return ends


def align_offsets(student: Offsets, teacher: Offsets, length: int) -> Alignment:
    """Group two tokenizations of one text (``length`` characters) by common boundaries.

    Every group holds at least one token of each side when both tokenizations cover the text up
    to ``length``; tokens past the last common boundary join the last group.

    Args:
        student: ``(start, end)`` character offsets of the student's tokens.
        teacher: the same for the teacher's tokens.
        length: the text's length in characters.

    Raises:
        ValueError: a negative ``length``, or offsets outside ``[0, length]``.
    """
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length}.")
    for who, offsets in (("student", student), ("teacher", teacher)):
        for start, end in offsets:
            if not 0 <= start <= end <= length:
                raise ValueError(f"{who} token offsets ({start}, {end}) lie outside the text's {length} "
                                 "characters; pass the offsets of this text (return_offsets_mapping=True).")
    common = sorted((clean_ends(student) & clean_ends(teacher)) - {0})
    if not common or common[-1] != length:
        common.append(length)

    def groups(offsets: Offsets) -> list[int]:
        last = len(common) - 1
        return [min(bisect.bisect_left(common, end), last) for _, end in offsets]

    return Alignment(groups(student), groups(teacher), common)


def align_text(text: str, student_tokenizer: Any, teacher_tokenizer: Any) -> tuple[list[int], list[int], Alignment]:
    """Tokenize ``text`` with both (fast) tokenizers, without special tokens, and align them.

    Returns:
        ``(student_ids, teacher_ids, alignment)``.

    Raises:
        TypeError: a tokenizer without offsets (not a fast tokenizer).
    """
    encoded = []
    for who, tok in (("student", student_tokenizer), ("teacher", teacher_tokenizer)):
        if not getattr(tok, "is_fast", False):
            raise TypeError(f"the {who} tokenizer ({type(tok).__name__}) gives no character offsets; "
                            "cross-tokenizer alignment needs a fast tokenizer (use_fast=True).")
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
        encoded.append((list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]))
    (s_ids, s_off), (t_ids, t_off) = encoded
    return s_ids, t_ids, align_offsets(s_off, t_off, len(text))
