"""Prompts for a teacher to answer: the one record every prompt source returns.

A prompt source is any callable returning ``list[Prompt]``; the sources themselves (JSONL files,
Hugging Face datasets, a slice of a data module's training text) build on this type.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Prompt"]


@dataclass(frozen=True)
class Prompt:
    """One prompt for the teacher.

    Attributes:
        text: what the teacher is asked (before any rationale template is applied).
        slice: the slice the prompt belongs to (for per-slice counts and the coverage loop), or
            ``None``.
        reference: a reference answer for the rejection filter of rationales, or ``None``.
    """

    text: str
    slice: str | None = None
    reference: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.text, str):
            raise TypeError(f"Prompt.text must be a string, got {type(self.text).__name__}")
        if not self.text.strip():
            raise ValueError("Prompt.text is empty; drop empty prompts before asking the teacher")
        for name in ("slice", "reference"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise TypeError(
                    f"Prompt.{name} must be a string or None, got {type(value).__name__}"
                )
