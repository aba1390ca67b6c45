"""Export a distilled student with a record of how it was made."""

from __future__ import annotations

import datetime as _dt
import json
import platform
from pathlib import Path
from typing import Any

from torch import nn

from lightning_distill import __version__
from lightning_distill.models.adapters import is_hf_model
from lightning_distill.models.identity import describe_model

__all__ = ["RECORD_NAME", "export_student", "versions"]

#: File written beside the exported weights.
RECORD_NAME = "distillation.json"


def versions() -> dict[str, str]:
    """Versions of the packages that shaped the student."""
    import lightning
    import torch
    import transformers

    return {"lightning_distill": __version__, "torch": torch.__version__, "lightning": lightning.__version__,
            "transformers": transformers.__version__, "python": platform.python_version()}


def export_student(student: nn.Module, directory: str | Path, *, tokenizer: Any = None,
                   record: dict[str, Any] | None = None) -> Path:
    """Save ``student`` (and ``tokenizer``) to ``directory`` with a ``distillation.json`` record.

    Hugging Face models are written with ``save_pretrained`` (safetensors), so
    ``AutoModelForCausalLM.from_pretrained(directory)`` loads them back; other modules are
    written as ``model.safetensors`` (load with ``safetensors.torch.load_model``). Nothing is
    pickled.

    Returns:
        The directory.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if is_hf_model(student):
        student.save_pretrained(directory, safe_serialization=True)
    else:
        from safetensors.torch import save_model

        save_model(student, str(directory / "model.safetensors"))
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    full_record = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "student": describe_model(student),
        "versions": versions(),
        **(record or {}),
    }
    (directory / RECORD_NAME).write_text(json.dumps(full_record, indent=2, default=str))
    return directory
