"""Lightning callbacks for distillation runs."""

from lightning_distill.callbacks.temperature import SHAPES, Schedule, TemperatureSchedule

__all__ = ["SHAPES", "Schedule", "TemperatureSchedule"]
