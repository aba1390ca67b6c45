"""lightning-distill: knowledge distillation for PyTorch Lightning.

>>> from lightning_distill import DistillationModule
>>> from lightning_distill.losses import LogitKD, TaskLoss
"""

__version__ = "0.1.0"

from lightning_distill.module import DistillationModule  # noqa: E402
from lightning_distill.types import LossInputs, TeacherTargets  # noqa: E402

__all__ = ["DistillationModule", "LossInputs", "TeacherTargets", "__version__"]
