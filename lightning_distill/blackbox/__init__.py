"""Black-box distillation: have a teacher write text, record it, train on it.

Built so far: the teacher-source interface (:class:`TeacherSource`, :class:`Completion`), a
local Hugging Face source (:class:`LocalHFTeacher`), a wrapper for any callable
(:class:`FunctionTeacher`), a teacher behind an OpenAI-compatible server (:class:`OpenAITeacher`),
a loopback OpenAI-compatible server for tests and offline tries (:func:`serve`), the resumable
record writer (:func:`write_records`) and a served teacher's top-k log-probabilities as a teacher
cache (:class:`ServedTeacher`). See ``docs/blackbox.md`` for the record format and what is
still to come.
"""

from lightning_distill.blackbox.openai_source import OpenAITeacher, TeacherRequestError
from lightning_distill.blackbox.prompts import Prompt
from lightning_distill.blackbox.served import ServedTeacher, TokenMismatchError
from lightning_distill.blackbox.server import LoopbackServer, serve
from lightning_distill.blackbox.sources import (
    Completion,
    FunctionTeacher,
    LocalHFTeacher,
    TeacherSource,
)
from lightning_distill.blackbox.writer import prompt_id, read_records, shard_paths, write_records

__all__ = [
    "Completion",
    "FunctionTeacher",
    "LocalHFTeacher",
    "LoopbackServer",
    "OpenAITeacher",
    "Prompt",
    "ServedTeacher",
    "TeacherRequestError",
    "TeacherSource",
    "TokenMismatchError",
    "prompt_id",
    "read_records",
    "serve",
    "shard_paths",
    "write_records",
]
