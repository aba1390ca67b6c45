"""Rationales: ask the teacher to reason before a final answer, then read and check that answer.

A :class:`RationaleTemplate` wraps each prompt (``{prompt}`` in its text) so the teacher writes
its reasoning step by step and ends with a line the answer pattern finds (``Answer: <answer>``
for the built-ins). :func:`extract_answer` reads the last such answer from a completion and
:func:`answers_match` compares it with a reference after normalising both (whitespace, case,
numbers such as ``1,000`` / ``1000.0``). ``write_records(..., rationale=, references=)`` stores
the verdict in each record (``template``, ``answer``, ``reference``, ``accepted``), the rejection
filter of STaR and "distilling step-by-step" (``TeacherTextDataModule(accepted_only=True)``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

__all__ = [
    "BUILTIN_TEMPLATES",
    "DEFAULT_ANSWER_PATTERN",
    "RationaleTemplate",
    "answers_match",
    "extract_answer",
    "find_answer",
    "normalize_answer",
    "rationale_template",
]

#: A line ``Answer: <answer>`` (any case, spaces around the colon); group 1 is the answer.
DEFAULT_ANSWER_PATTERN = r"(?im)^[ \t]*\**answer\**[ \t]*:[ \t]*\**[ \t]*(.+?)[ \t]*\**[ \t]*$"

#: The built-in templates, by name.
BUILTIN_TEMPLATES = {
    "steps": (
        "{prompt}\n\n"
        "Think it through step by step and write your reasoning first. Then give the final "
        "answer on its own last line, exactly in the form:\n"
        "Answer: <answer>"
    ),
    "answer_only": (
        "{prompt}\n\nGive only the final answer, on one line, exactly in the form:\nAnswer: <answer>"
    ),
}

_NUMBER = re.compile(r"[+-]?(\d{1,3}(,\d{3})+|\d+)?(\.\d+)?")


@dataclass(frozen=True)
class RationaleTemplate:
    """A named prompt template asking for reasoning and a final answer the pattern can find.

    Attributes:
        name: the template's name, written into every record (``template``).
        template: the text sent to the teacher; ``{prompt}`` (exactly once) stands for the prompt.
            Other braces are kept as they are (no ``str.format``).
        answer_pattern: a regular expression for the final answer; the last match counts, its
            first group (or the whole match if it has none) is the answer.

    Raises:
        TypeError: a field that is not a string.
        ValueError: an empty name, a template without ``{prompt}`` or with it twice, or a pattern
            that does not compile.
    """

    name: str
    template: str
    answer_pattern: str = DEFAULT_ANSWER_PATTERN

    def __post_init__(self) -> None:
        for field in ("name", "template", "answer_pattern"):
            value = getattr(self, field)
            if not isinstance(value, str):
                raise TypeError(
                    f"RationaleTemplate.{field} must be a str, got {type(value).__name__}."
                )
        if not self.name.strip():
            raise ValueError("RationaleTemplate.name is empty; give the template a name.")
        count = self.template.count("{prompt}")
        if count != 1:
            raise ValueError(
                f"RationaleTemplate {self.name!r}: the template holds '{{prompt}}' {count} times; "
                "write it exactly once where the prompt goes."
            )
        try:
            compiled = re.compile(self.answer_pattern)
        except re.error as err:
            raise ValueError(
                f"RationaleTemplate {self.name!r}: answer_pattern {self.answer_pattern!r} is not "
                f"a regular expression ({err})."
            ) from err
        if compiled.groups > 1 and "answer" not in compiled.groupindex:
            raise ValueError(
                f"RationaleTemplate {self.name!r}: answer_pattern has {compiled.groups} groups; use "
                "one group for the answer (or name it (?P<answer>...)), (?:...) for the others."
            )

    @classmethod
    def builtin(cls, name: str) -> RationaleTemplate:
        """A built-in template (:data:`BUILTIN_TEMPLATES`).

        Raises:
            ValueError: an unknown name (the known ones are listed).
        """
        if name not in BUILTIN_TEMPLATES:
            raise ValueError(
                f"unknown rationale template {name!r}; the built-in ones are "
                f"{sorted(BUILTIN_TEMPLATES)}, or pass template='...{{prompt}}...'."
            )
        return cls(name, BUILTIN_TEMPLATES[name])

    def render(self, prompt: str) -> str:
        """The text the teacher is sent for ``prompt``."""
        return self.template.replace("{prompt}", prompt)

    def extract(self, completion: str) -> str | None:
        """The final answer of ``completion`` (:func:`extract_answer` with this pattern)."""
        return extract_answer(completion, self.answer_pattern)

    def to_dict(self) -> dict[str, Any]:
        """The template as plain values (for the records' ``generation``)."""
        return {"name": self.name, "template": self.template, "answer_pattern": self.answer_pattern}


def rationale_template(
    name: str | None = None, template: str | None = None, answer_pattern: str | None = None
) -> RationaleTemplate | None:
    """The template a config names (``conf/rationale/*.yaml``), or ``None`` for no template.

    Args:
        name: a built-in name (``steps``, ``answer_only``), or the name of your ``template``;
            ``None`` with no ``template``: no rationale (the prompt is sent as it is).
        template: your own template text with ``{prompt}``; ``None``: the built-in ``name``.
        answer_pattern: your answer regular expression; ``None``: the built-in one.

    Raises:
        ValueError: an unknown built-in name, a template without a name, or see
            :class:`RationaleTemplate`.
    """
    if template is None:
        if name is None:
            if answer_pattern is not None:
                raise ValueError(
                    "answer_pattern is set but no rationale template is; set name=steps (or your "
                    "own template=...) too."
                )
            return None
        built = RationaleTemplate.builtin(name)
        if answer_pattern is not None:
            built = RationaleTemplate(built.name, built.template, answer_pattern)
        return built
    if name is None:
        raise ValueError("a rationale template= needs a name= (written into every record).")
    return RationaleTemplate(name, template, answer_pattern or DEFAULT_ANSWER_PATTERN)


def find_answer(text: str, pattern: str = DEFAULT_ANSWER_PATTERN) -> re.Match[str] | None:
    """The last match of ``pattern`` in ``text``, or ``None``."""
    last = None
    for last in re.finditer(pattern, text):  # noqa: B007 - the last one counts
        pass
    return last


def extract_answer(text: str, pattern: str = DEFAULT_ANSWER_PATTERN) -> str | None:
    """The final answer of a completion: the last match of ``pattern``, stripped.

    The answer is the group named ``answer`` if there is one, else the first group, else the
    whole match. Compare answers with :func:`answers_match`, which normalises them.

    Args:
        text: the completion.
        pattern: a regular expression (default: a last line ``Answer: <answer>``).

    Returns:
        the answer, or ``None`` when nothing matches (or the match is empty).

    Raises:
        TypeError: ``text`` not a str.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}.")
    match = find_answer(text, pattern)
    if match is None:
        return None
    if "answer" in match.re.groupindex:
        value = match.group("answer")
    else:
        value = match.group(1) if match.re.groups else match.group(0)
    value = (value or "").strip()
    return value or None


def normalize_answer(answer: str) -> str:
    """An answer in the form :func:`answers_match` compares.

    Strips, drops a trailing period, case-folds and collapses white space; a number (thousands
    commas allowed, a leading ``$``) becomes its plain decimal form: ``"1,000"``, ``"1000.0"`` and
    ``"1e3"`` all give ``"1000"``, ``"0.50"`` gives ``"0.5"``.
    """
    text = " ".join(answer.strip().split()).casefold().rstrip(".").strip()
    number = text.removeprefix("$").strip()
    if (_NUMBER.fullmatch(number) and any(c.isdigit() for c in number)) or _is_float(number):
        try:
            value = Decimal(number.replace(",", ""))
        except InvalidOperation:
            return text
        if value.is_finite():
            if value == value.to_integral_value():
                return str(int(value))
            return format(value.normalize(), "f")
    return text


def answers_match(answer: str | None, reference: str | None) -> bool:
    """Whether an extracted answer equals the reference, after :func:`normalize_answer`.

    ``None`` on either side (no answer found, no reference) never matches.
    """
    if answer is None or reference is None:
        return False
    return normalize_answer(answer) == normalize_answer(reference)


def _is_float(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity", "+infinity")
