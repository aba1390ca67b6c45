"""Lightning callbacks for distillation runs."""

from lightning_distill.callbacks.coverage import CoverageGapError, CoverageSlices
from lightning_distill.callbacks.temperature import SHAPES, Schedule, TemperatureSchedule

__all__ = ["SHAPES", "CoverageGapError", "CoverageSlices", "Schedule", "TemperatureSchedule"]
