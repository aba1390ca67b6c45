"""lightning-distill: knowledge distillation for PyTorch Lightning.

>>> from lightning_distill import DistillationModule
>>> from lightning_distill.losses import LogitKD, TaskLoss
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from lightning_distill.types import LossInputs, TeacherTargets  # noqa: E402

if TYPE_CHECKING:
    from lightning_distill.module import DistillationModule

__all__ = ["DistillationModule", "LossInputs", "TeacherTargets", "__version__"]


def __getattr__(name: str) -> Any:
    # The module (and with it Lightning) loads on first use, so that the Lightning-free parts
    # (``lightning_distill.cache``, ``losses``, ``models``) import on their own.
    if name == "DistillationModule":
        from lightning_distill.module import DistillationModule

        return DistillationModule
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
