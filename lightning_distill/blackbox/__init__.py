"""Black-box distillation: have a teacher write text, record it, train on it.

Teacher sources (:class:`TeacherSource`, :class:`Completion`): a local Hugging Face model
(:class:`LocalHFTeacher`), any callable (:class:`FunctionTeacher`), a teacher behind an
OpenAI-compatible server (:class:`OpenAITeacher`), and a loopback OpenAI-compatible server for tests
and offline tries (:func:`serve`). The resumable record writer (:func:`write_records`), prompt
sources (``prompts.py``), rationale templates and answer checks (``rationale.py``), per-slice
summaries (``summary.py``), training on teacher text (:class:`TeacherTextDataModule`) and a
served teacher's top-k log-probabilities as a teacher cache (:class:`ServedTeacher`); the coverage
loop's prompts (:func:`prompts_from_run`; ``lightning-distill generate``). See ``docs/blackbox.md``.
"""

from lightning_distill.blackbox.loop import prompts_from_run
from lightning_distill.blackbox.openai_source import OpenAITeacher, TeacherRequestError
from lightning_distill.blackbox.prompts import Prompt, prompts_from_dataset, prompts_from_jsonl
from lightning_distill.blackbox.rationale import (
    RationaleTemplate,
    answers_match,
    extract_answer,
    rationale_template,
)
from lightning_distill.blackbox.served import ServedTeacher, TokenMismatchError
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
    "FunctionTeacher",
    "LocalHFTeacher",
    "LoopbackServer",
    "OpenAITeacher",
    "Prompt",
    "RationaleTemplate",
    "ServedTeacher",
    "TeacherRequestError",
    "TeacherSource",
    "TeacherTextDataModule",
    "TokenMismatchError",
    "answers_match",
    "extract_answer",
    "prompt_id",
    "prompts_from_dataset",
    "prompts_from_jsonl",
    "prompts_from_run",
    "rationale_template",
    "read_records",
    "serve",
    "shard_paths",
    "summarize",
    "write_records",
    "write_summary",
]


def __getattr__(name: str):
    # loaded on first use, not with the package: the server (so `python -m
    # lightning_distill.blackbox.server` runs it fresh) and TeacherTextDataModule (imports Lightning)
    if name in ("LoopbackServer", "serve"):
        from lightning_distill.blackbox import server

        return getattr(server, name)
    if name == "TeacherTextDataModule":
        from lightning_distill.blackbox.data import TeacherTextDataModule

        return TeacherTextDataModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
