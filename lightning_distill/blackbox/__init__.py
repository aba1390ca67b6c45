"""Black-box distillation: have a teacher write text, record it, train on it.

Built so far: the teacher-source interface (:class:`TeacherSource`, :class:`Completion`), a
local Hugging Face source (:class:`LocalHFTeacher`), a wrapper for any callable
(:class:`FunctionTeacher`), a teacher behind an OpenAI-compatible server (:class:`OpenAITeacher`),
a loopback OpenAI-compatible server for tests and offline tries (:func:`serve`) and the resumable
record writer (:func:`write_records`). See ``docs/blackbox.md`` for the record format and what is
still to come.
"""

from lightning_distill.blackbox.openai_source import OpenAITeacher, TeacherRequestError
from lightning_distill.blackbox.prompts import Prompt
from lightning_distill.blackbox.sources import (
    Completion,
    FunctionTeacher,
    LocalHFTeacher,
    TeacherSource,
)
from lightning_distill.blackbox.writer import prompt_id, read_records, shard_paths, write_records

# the server is imported on first use, so `python -m lightning_distill.blackbox.server` runs it fresh
_LAZY = {"LoopbackServer", "serve"}


def __getattr__(name: str):
    if name in _LAZY:
        from lightning_distill.blackbox import server

        return getattr(server, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = [
    "Completion",
    "FunctionTeacher",
    "LocalHFTeacher",
    "LoopbackServer",
    "OpenAITeacher",
    "Prompt",
    "TeacherRequestError",
    "TeacherSource",
    "prompt_id",
    "read_records",
    "serve",
    "shard_paths",
    "write_records",
]
