"""Lightning callbacks for distillation runs."""

from lightning_distill.callbacks.coverage import CoverageGapError, CoverageSlices
from lightning_distill.callbacks.teacher_cache import TeacherCache
from lightning_distill.callbacks.temperature import SHAPES, Schedule, TemperatureSchedule

__all__ = ["SHAPES", "CoverageGapError", "CoverageSlices", "Schedule", "TeacherCache", "TemperatureSchedule"]
