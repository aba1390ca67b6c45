"""Black-box distillation: have a teacher write text, record it, train on it.

Built so far: the teacher-source interface (:class:`TeacherSource`, :class:`Completion`), a
local Hugging Face source (:class:`LocalHFTeacher`), a wrapper for any callable
(:class:`FunctionTeacher`), the resumable record writer (:func:`write_records`) and the coverage
loop's prompts (:func:`prompts_from_run`; ``lightning-distill generate``). See
``docs/blackbox.md`` for the record format and what is still to come.
"""

from lightning_distill.blackbox.loop import prompts_from_run
from lightning_distill.blackbox.prompts import Prompt
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
    "Prompt",
    "TeacherSource",
    "prompt_id",
    "prompts_from_run",
    "read_records",
    "shard_paths",
    "write_records",
]
