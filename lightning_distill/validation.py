"""Argument checks with one exception type per fault, shared by the library.

* A value of the wrong kind (a string where a number goes, a bool where an int goes, a float
  where a tensor goes) raises :class:`TypeError`.
* A value of the right kind that is not allowed (out of range, NaN or inf, not one of the
  choices) raises :class:`ValueError`.

Every message names the argument, shows the bad value and says what is allowed, e.g.
``temperature must be a finite number > 0, got -1.0.``
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

__all__ = ["check_bool", "check_choice", "check_int", "check_number", "check_tensor"]


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if low is not None and high is not None:
        return f"in {'(' if low_open else '['}{low:g}, {high:g}{')' if high_open else ']'}"
    if low is not None:
        return f"{'>' if low_open else '>='} {low:g}"
    if high is not None:
        return f"{'<' if high_open else '<='} {high:g}"
    return ""


def check_number(
    name: str,
    value: Any,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    allow_none: bool = False,
    hint: str = "",
) -> float | None:
    """``value`` as a float: a finite real number inside the given bounds (or ``None`` when ``allow_none``).

    Args:
        name: the argument's name, for the message.
        value: what the caller passed.
        low, high: bounds (``None``: unbounded on that side).
        low_open, high_open: exclude the bound itself.
        allow_none: ``None`` is allowed (and returned).
        hint: a sentence appended to the message of a bad value (e.g. what to use instead).

    Raises:
        TypeError: ``value`` is not a real number (a bool counts as not a number).
        ValueError: NaN, inf, or outside the bounds.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        what = "a number or None" if allow_none else "a number"
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__}).")
    value = float(value)
    outside = (not math.isfinite(value)
               or (low is not None and (value < low or (low_open and value == low)))
               or (high is not None and (value > high or (high_open and value == high))))
    if outside:
        allowed = " ".join(x for x in ("a finite number", _interval(low, high, low_open, high_open)) if x)
        allowed += " or None" if allow_none else ""
        raise ValueError(f"{name} must be {allowed}, got {value}.{' ' + hint if hint else ''}")
    return value


def check_int(
    name: str,
    value: Any,
    *,
    low: int | None = None,
    high: int | None = None,
    allow_none: bool = False,
    hint: str = "",
) -> int | None:
    """``value`` as an int in ``[low, high]`` (or ``None`` when ``allow_none``).

    Args:
        name: the argument's name, for the message.
        value: what the caller passed.
        low, high: inclusive bounds (``None``: unbounded on that side).
        allow_none: ``None`` is allowed (and returned).
        hint: a sentence appended to the message of a bad value.

    Raises:
        TypeError: not an int (a bool or a float counts as not an int).
        ValueError: outside ``[low, high]``.
    """
    if value is None and allow_none:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        what = "an int or None" if allow_none else "an int"
        raise TypeError(f"{name} must be {what}, got {value!r} ({type(value).__name__}).")
    if (low is not None and value < low) or (high is not None and value > high):
        if low is not None and high is not None:
            allowed = f"an int in [{low}, {high}]"
        else:
            allowed = f">= {low}" if low is not None else f"<= {high}"
        allowed += " or None" if allow_none else ""
        raise ValueError(f"{name} must be {allowed}, got {value}.{' ' + hint if hint else ''}")
    return int(value)


def check_bool(name: str, value: Any) -> bool:
    """``value`` if it is a bool.

    Raises:
        TypeError: anything else (``0``/``1`` and ``"true"`` count as not a bool).
    """
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be true or false (a bool), got {value!r} ({type(value).__name__}).")
    return value


def check_choice(name: str, value: Any, choices: Iterable[Any], *, hint: str = "") -> Any:
    """``value`` if it is one of ``choices``.

    Raises:
        ValueError: not one of ``choices`` (whatever its kind: a choice is a value).
    """
    choices = tuple(choices)
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}.{' ' + hint if hint else ''}")
    return value


def check_tensor(name: str, value: Any, *, what: str = "a torch.Tensor") -> Any:
    """``value`` if it is a :class:`torch.Tensor`.

    Raises:
        TypeError: anything else.
    """
    from torch import Tensor  # local: keeps this module importable without torch's start-up cost

    if not isinstance(value, Tensor):
        raise TypeError(f"{name} must be {what}, got {type(value).__name__}.")
    return value
