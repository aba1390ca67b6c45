"""Black-box distillation: have a teacher write text, record it, train on it.

Built so far: the teacher-source interface (:class:`TeacherSource`, :class:`Completion`), a
local Hugging Face source (:class:`LocalHFTeacher`), a wrapper for any callable
(:class:`FunctionTeacher`), the resumable record writer (:func:`write_records`), prompt sources
(``prompts.py``), rationale templates and answer checks (``rationale.py``), per-slice summaries
(``summary.py``) and training on teacher text (:class:`TeacherTextDataModule`). See
``docs/blackbox.md`` for the record format and what is still to come.
"""

from lightning_distill.blackbox.prompts import Prompt, prompts_from_dataset, prompts_from_jsonl
from lightning_distill.blackbox.rationale import (
    RationaleTemplate,
    answers_match,
    extract_answer,
    rationale_template,
)
from lightning_distill.blackbox.sources import (
    Completion,
    FunctionTeacher,
    LocalHFTeacher,
    TeacherSource,
)
from lightning_distill.blackbox.summary import summarize, write_summary
from lightning_distill.blackbox.writer import prompt_id, read_records, shard_paths, write_records

__all__ = [
    "Completion",
    "TeacherTextDataModule",
    "FunctionTeacher",
    "LocalHFTeacher",
    "Prompt",
    "RationaleTemplate",
    "TeacherSource",
    "answers_match",
    "extract_answer",
    "prompt_id",
    "prompts_from_dataset",
    "prompts_from_jsonl",
    "rationale_template",
    "read_records",
    "shard_paths",
    "summarize",
    "write_records",
    "write_summary",
]


def __getattr__(name: str):
    # TeacherTextDataModule imports Lightning: loaded on first use, not with the package
    if name == "TeacherTextDataModule":
        from lightning_distill.blackbox.data import TeacherTextDataModule

        return TeacherTextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
