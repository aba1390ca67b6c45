"""Scheduled soft-target temperature and loss-term weights: :class:`TemperatureSchedule`.

Temperature decides how much of the teacher's "dark knowledge" the student sees; the balance of
the KD and task weights decides how far the student follows the teacher versus the labels. This
callback sets both from :class:`Schedule` values before every training step (or every epoch),
logs them as ``schedule/temperature`` and ``schedule/<term>.weight``, and keeps its state in the
checkpoint so that a resumed run continues with the values the uninterrupted run had.

The step index is **0-based and inclusive at both ends**: the first step trained (``global_step``
0) uses ``start``, the last one (``total_steps - 1``) uses ``end``, and steps past the end keep
``end``. With ``interval="epoch"`` the index is ``current_epoch`` and ``total_steps`` counts epochs.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, fields
from typing import Any, Literal

import lightning as L
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn
from typing_extensions import override

from lightning_distill.validation import check_int, check_number

__all__ = ["SHAPES", "Schedule", "TemperatureSchedule"]

#: The shapes a :class:`Schedule` can take.
SHAPES = ("constant", "linear", "cosine", "exponential", "step")
_NEEDS_TOTAL = ("linear", "cosine", "exponential")
_INTERVALS = ("step", "epoch")


@dataclass(frozen=True)
class Schedule:
    """A value that changes with the step: a pure function ``value(step, total)``.

    With ``W = warmup_steps`` and ``T = total_steps``, the step ``t`` (0-based) gives::

        t <  W:   warmup_start + (start - warmup_start) * t / W           (linear warm-up)
        t >= W:   p = min(1, (t - W) / (T - 1 - W))    (p = 1 when T - 1 - W <= 0)
          constant     start
          linear       start + (end - start) * p
          cosine       end + (start - end) * (1 + cos(pi * p)) / 2
          exponential  start * (end / start) ** p                         (start, end > 0)
          step         start * gamma ** k,  or with ``end``:  start + (end - start) * k / len(milestones)
                       where k = number of milestones <= t (milestones are absolute steps)

    So ``value(0) == start`` (or ``warmup_start``), ``value(W) == start`` and
    ``value(T - 1) == end``: the first and the last step trained use the two ends exactly.

    Every piece is monotone between its ends, so the values a schedule takes lie between its
    :meth:`corners`, and :meth:`breakpoints` are the only steps where a piece starts or ends.

    Args:
        shape: one of ``constant``, ``linear``, ``cosine``, ``exponential``, ``step``.
        start: the value after the warm-up (at step 0 without one).
        end: the value at the last step (``linear``/``cosine``/``exponential``: required;
            ``step``: the value after the last milestone, instead of ``gamma``;
            ``constant``: leave out).
        total_steps: the schedule's length ``T``; default: the callback's ``total_steps``,
            else the trainer's (see :class:`TemperatureSchedule`).
        warmup_steps: steps of linear warm-up from ``warmup_start`` to ``start`` before the shape.
        warmup_start: the value at step 0 when ``warmup_steps > 0`` (required then).
        milestones: ``step`` only: strictly increasing steps (> ``warmup_steps``) where the
            value changes.
        gamma: ``step`` only: the factor applied at each milestone (instead of ``end``).

    Raises:
        ValueError: an unknown shape, a missing or superfluous argument for the shape,
            milestones out of order, ``exponential`` through a value <= 0, a bad step count.
        TypeError: a value that is not a number.

    Example:
        >>> s = Schedule("cosine", start=4.0, end=1.0, total_steps=11)
        >>> [round(s.value(t), 3) for t in (0, 5, 10, 20)]
        [4.0, 2.5, 1.0, 1.0]
        >>> Schedule("step", start=4.0, gamma=0.5, milestones=[100, 200]).value(150)
        2.0
    """

    shape: str
    start: float
    end: float | None = None
    total_steps: int | None = None
    warmup_steps: int = 0
    warmup_start: float | None = None
    milestones: tuple[int, ...] | None = None
    gamma: float | None = None

    def __post_init__(self) -> None:
        def put(name: str, value: Any) -> None:
            object.__setattr__(self, name, value)

        if self.shape not in SHAPES:
            raise ValueError(f"shape must be one of {SHAPES}, got {self.shape!r}.")
        put("start", check_number("start", self.start))
        if self.end is not None:
            put("end", check_number("end", self.end))
        if self.total_steps is not None:
            put("total_steps", check_int("total_steps", self.total_steps, low=1))
        put("warmup_steps", check_int("warmup_steps", self.warmup_steps, low=0))
        if self.warmup_steps and self.warmup_start is None:
            raise ValueError(f"warmup_steps={self.warmup_steps} needs warmup_start (the value at step 0).")
        if not self.warmup_steps and self.warmup_start is not None:
            raise ValueError(f"warmup_start={self.warmup_start} is given but warmup_steps is 0.")
        if self.warmup_start is not None:
            put("warmup_start", check_number("warmup_start", self.warmup_start))
        if self.total_steps is not None and self.shape in _NEEDS_TOTAL and self.total_steps <= self.warmup_steps:
            raise ValueError(f"total_steps={self.total_steps} must be greater than warmup_steps={self.warmup_steps}.")

        if self.shape == "step":
            self._check_step()
        else:
            for name in ("milestones", "gamma"):
                if getattr(self, name) is not None:
                    raise ValueError(f"{name}={getattr(self, name)!r} is only used by shape='step', "
                                     f"not {self.shape!r}.")
        if self.shape == "constant" and self.end is not None and self.end != self.start:
            raise ValueError(f"shape='constant' takes no end (got end={self.end}, start={self.start}); "
                             "use shape='linear' (or another) to go from start to end.")
        if self.shape in _NEEDS_TOTAL and self.end is None:
            raise ValueError(f"shape={self.shape!r} needs an end value (start={self.start}, end=None).")
        if self.shape == "exponential" and (self.start <= 0 or self.end <= 0):
            raise ValueError(f"shape='exponential' interpolates geometrically and needs start > 0 and end > 0, "
                             f"got start={self.start}, end={self.end}.")

    def _check_step(self) -> None:
        milestones = self.milestones
        if milestones is None or isinstance(milestones, (str, bytes)) or not isinstance(milestones, Iterable):
            raise ValueError(f"shape='step' needs milestones (a list of steps), got {milestones!r}.")
        milestones = tuple(milestones)
        if not milestones:
            raise ValueError("shape='step' needs at least one milestone, got [].")
        for m in milestones:
            if isinstance(m, bool) or not isinstance(m, int):
                raise TypeError(f"milestones must be integers (steps), got {list(milestones)}.")
        if any(b <= a for a, b in zip(milestones, milestones[1:])):
            raise ValueError(f"milestones must be strictly increasing, got {list(milestones)}.")
        if milestones[0] <= self.warmup_steps:
            raise ValueError(f"milestones must come after the warm-up (> warmup_steps={self.warmup_steps}), "
                             f"got {list(milestones)}.")
        object.__setattr__(self, "milestones", tuple(int(m) for m in milestones))
        if (self.end is None) == (self.gamma is None):
            raise ValueError(f"shape='step' needs exactly one of end (the last level) or gamma (the factor "
                             f"per milestone), got end={self.end}, gamma={self.gamma}.")
        if self.gamma is not None:
            gamma = check_number("gamma", self.gamma, low=0.0, low_open=True)
            object.__setattr__(self, "gamma", gamma)

    # ---------------------------------------------------------------------------- construction
    @classmethod
    def coerce(cls, value: Schedule | Mapping[str, Any] | float, *, what: str = "schedule") -> Schedule:
        """A :class:`Schedule` from a ``Schedule``, a mapping of its arguments (YAML) or a number.

        A bare number means ``Schedule("constant", number)``.
        """
        if isinstance(value, Schedule):
            return value
        if isinstance(value, Mapping):
            kwargs = {str(k): v for k, v in value.items()}
            known = [f.name for f in fields(cls)]
            unknown = sorted(set(kwargs) - set(known))
            if unknown:
                raise ValueError(f"{what}: unknown key(s) {unknown}; a schedule takes {known}.")
            if "shape" not in kwargs or "start" not in kwargs:
                raise ValueError(f"{what}: a schedule needs at least shape and start, got {kwargs}.")
            if kwargs.get("milestones") is not None and not isinstance(kwargs["milestones"], (str, bytes)):
                kwargs["milestones"] = tuple(kwargs["milestones"])  # ListConfig from YAML
            try:
                return cls(**kwargs)
            except (TypeError, ValueError) as err:
                raise type(err)(f"{what}: {err}") from None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return cls("constant", value)
        raise TypeError(f"{what} must be a Schedule, a mapping of its arguments or a number, "
                        f"got {value!r} ({type(value).__name__}).")

    # ---------------------------------------------------------------------------- values
    @property
    def needs_total(self) -> bool:
        """Whether the value depends on the schedule's length (``linear``/``cosine``/``exponential``)."""
        return self.shape in _NEEDS_TOTAL

    def resolve_total(self, total: int | None) -> int | None:
        """This schedule's own ``total_steps`` if set, else ``total``; ``None`` if not needed."""
        if not self.needs_total:
            return None
        total = self.total_steps if self.total_steps is not None else total
        if total is None:
            raise ValueError(f"shape={self.shape!r} needs total_steps (the length of the schedule); "
                             "set it on the schedule or the callback, or give the trainer max_steps/max_epochs.")
        total = check_int("total_steps", total, low=1)
        if total <= self.warmup_steps:
            raise ValueError(f"total_steps={total} must be greater than warmup_steps={self.warmup_steps}.")
        return total

    def value(self, step: int, total: int | None = None) -> float:
        """The value at ``step`` (0-based) of a schedule ``total`` steps long."""
        if step < 0:
            raise ValueError(f"step must be >= 0, got {step}.")
        if step < self.warmup_steps:
            frac = step / self.warmup_steps
            return self.warmup_start * (1.0 - frac) + self.start * frac
        if self.shape == "constant":
            return self.start
        if self.shape == "step":
            k = sum(1 for m in self.milestones if m <= step)
            if k == 0:
                return self.start
            if self.gamma is not None:
                return self.start * self.gamma**k
            if k == len(self.milestones):
                return self.end
            frac = k / len(self.milestones)
            return self.start * (1.0 - frac) + self.end * frac
        total = self.resolve_total(total)
        span = total - 1 - self.warmup_steps
        p = 1.0 if span <= 0 else min(1.0, (step - self.warmup_steps) / span)
        if p <= 0.0:
            return self.start
        if p >= 1.0:
            return self.end
        if self.shape == "linear":
            return self.start * (1.0 - p) + self.end * p
        if self.shape == "cosine":
            c = 0.5 * (1.0 + math.cos(math.pi * p))
            return self.start * c + self.end * (1.0 - c)
        return self.start * (self.end / self.start) ** p  # exponential

    def corners(self) -> dict[str, float]:
        """The values between which every other value lies, by where they are taken."""
        out = {}
        if self.warmup_steps:
            out["warmup_start"] = self.warmup_start
        out["start"] = self.start
        if self.shape == "step":
            for m in self.milestones:
                out[f"milestone {m}"] = self.value(m)
        elif self.end is not None:
            out["end"] = self.end
        return out

    def breakpoints(self, total: int | None = None) -> list[int]:
        """Steps where a monotone piece begins or ends; between two of them the value is monotone
        (continuous pieces) or constant (``step``), and after the last one it no longer changes."""
        points = {0, self.warmup_steps}
        if self.shape == "step":
            points.update(self.milestones)
        total = self.resolve_total(total)
        if total is not None:
            points.add(total - 1)
        return sorted(points)


def _describe(schedule: Schedule) -> str:
    """``cosine(start=4.0, end=1.0)``: the arguments that differ from their defaults."""
    args = [f"{f.name}={getattr(schedule, f.name)!r}" for f in fields(schedule)
            if f.name in ("start",) or (f.name != "shape" and getattr(schedule, f.name) != f.default)]
    return f"{schedule.shape}({', '.join(args)})"


class TemperatureSchedule(Callback):
    """Schedule the KD temperature and the loss-term weights of a ``DistillationModule``.

    Before every training step (``on_train_batch_start``, so the forward of that step already
    uses it) the callback sets ``temperature`` on the temperature terms and ``weight`` on the
    named terms to their schedule's value at the current step. The temperature is read by the
    term at loss time, so the schedule works the same with a live teacher and with teacher
    targets carried by the batch (a cache). With gradient accumulation every micro-batch of
    one optimizer step sees the same value (the index is ``trainer.global_step``).

    The values are logged every training step as ``schedule/temperature`` and
    ``schedule/<term>.weight``. Validation between training steps uses the last applied values.

    The step index is 0-based and inclusive: the first step trained uses the schedule's
    ``start``, the step ``total_steps - 1`` uses its ``end``; later steps keep ``end``.

    Resuming: the callback's state (the schedule's length, the last step and the values it
    applied) is saved in the checkpoint. On resume the length is taken from the checkpoint
    (unless ``total_steps`` is given), so the run continues with exactly the values the
    uninterrupted run had, even when the trainer now estimates another length; a schedule that
    gives other values than the checkpoint recorded is reported with a warning.

    Args:
        temperature: the temperature schedule: a :class:`Schedule`, a mapping of its arguments
            (YAML), or a number (constant). ``None``: leave temperatures alone.
        weights: ``{term name: schedule}`` for the terms whose weight is scheduled.
        terms: the terms that get the temperature; default: every term with a ``temperature``
            attribute (e.g. every ``LogitKD``).
        interval: ``"step"`` (optimizer steps) or ``"epoch"``; ``warmup_steps``, ``milestones``
            and ``total_steps`` count in this unit.
        total_steps: the length of schedules that do not set their own; default: the trainer's
            ``estimated_stepping_batches`` (``interval="step"``) or ``max_epochs`` (``"epoch"``).
        log: log the values every training step.

    Raises:
        ValueError: (at construction) a temperature <= 0 or a weight < 0 anywhere in a schedule,
            milestones out of order, an unknown ``interval``, nothing to schedule; (at fit start,
            before any step) a term name that does not exist (the message lists those that do),
            a temperature term without a ``temperature``, weights that make every term zero at
            some step, a schedule length shorter than its warm-up, two callbacks scheduling the
            same value.
        TypeError: ``weights`` that is not a mapping, ``terms`` that is not a list of names, a
            schedule that is neither a ``Schedule``, a mapping nor a number, or a module without
            named loss terms (``losses``).

    Example:
        >>> from lightning_distill.callbacks import Schedule, TemperatureSchedule
        >>> cb = TemperatureSchedule(temperature=Schedule("cosine", start=4.0, end=1.0),
        ...                          weights={"kd": {"shape": "linear", "start": 0.7, "end": 0.3},
        ...                                   "task": {"shape": "linear", "start": 0.3, "end": 0.7}})
        >>> trainer = lightning.Trainer(max_steps=300, callbacks=[cb])  # doctest: +SKIP
        >>> trainer.fit(DistillationModule(student, teacher), datamodule)  # doctest: +SKIP
    """

    def __init__(
        self,
        temperature: Schedule | Mapping[str, Any] | float | None = None,
        weights: Mapping[str, Schedule | Mapping[str, Any] | float] | None = None,
        terms: Sequence[str] | None = None,
        interval: Literal["step", "epoch"] = "step",
        total_steps: int | None = None,
        log: bool = True,
    ) -> None:
        super().__init__()
        if interval not in _INTERVALS:
            raise ValueError(f"interval must be one of {_INTERVALS}, got {interval!r}.")
        if total_steps is not None:
            total_steps = check_int("total_steps", total_steps, low=1)
        if weights is not None and not isinstance(weights, Mapping):
            raise TypeError(f"weights must be a mapping {{term name: schedule}}, got {type(weights).__name__}.")
        if terms is not None:
            if isinstance(terms, str) or not isinstance(terms, Iterable) or not all(isinstance(t, str) for t in terms):
                raise TypeError(f"terms must be a list of term names, got {terms!r}.")
            terms = tuple(terms)
            if not terms:
                raise ValueError("terms is empty; leave it out to schedule every term that has a temperature.")
            if temperature is None:
                raise ValueError(f"terms={list(terms)} is given but there is no temperature schedule.")
        self.temperature = None if temperature is None else Schedule.coerce(temperature, what="temperature")
        self.weights = {str(name): Schedule.coerce(s, what=f"weights[{name!r}]")
                        for name, s in (weights or {}).items()}
        if self.temperature is None and not self.weights:
            raise ValueError("TemperatureSchedule has nothing to schedule: give temperature=... and/or weights=....")
        if self.temperature is not None:
            for where, v in self.temperature.corners().items():
                if v <= 0:
                    raise ValueError(f"the temperature schedule reaches {v} at its {where}; a temperature "
                                     f"must be > 0 ({_describe(self.temperature)}).")
        for name, schedule in self.weights.items():
            for where, v in schedule.corners().items():
                if v < 0:
                    raise ValueError(f"the weight schedule of term {name!r} reaches {v} at its {where}; a "
                                     f"weight must be >= 0 ({_describe(schedule)}).")
        self.terms = terms
        self.interval = interval
        self.total_steps = total_steps
        self.log = bool(log)

        self._temperature_terms: tuple[str, ...] = ()
        self._total: int | None = None           # the resolved length
        self._last_index: int | None = None      # the schedule index last applied
        self._last_values: dict[str, float] = {}
        self._loaded: dict[str, Any] | None = None

    @property
    @override
    def state_key(self) -> str:
        return self._generate_state_key(
            temperature_terms=None if self.temperature is None else (self.terms or "auto"),
            weights=tuple(sorted(self.weights)),
        )

    # ---------------------------------------------------------------------------- checks
    @staticmethod
    def _losses(pl_module: L.LightningModule) -> Mapping[str, Any]:
        losses = getattr(pl_module, "losses", None)
        if not isinstance(losses, (Mapping, nn.ModuleDict)):
            raise TypeError(f"TemperatureSchedule needs a module with named loss terms in `losses` (a "
                            f"DistillationModule), got {type(pl_module).__name__}.")
        return losses

    @override
    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        losses = self._losses(pl_module)
        existing = ", ".join(losses) or "none"
        for name in self.weights:
            if name not in losses:
                raise ValueError(f"weights names the loss term {name!r}, which does not exist; the module's "
                                 f"terms are: {existing}.")
        if self.temperature is not None:
            if self.terms is None:
                found = tuple(n for n, t in losses.items() if hasattr(t, "temperature"))
                if not found:
                    raise ValueError(f"a temperature schedule was given but no loss term has a temperature "
                                     f"(terms: {existing}); add a LogitKD term or drop the temperature.")
                self._temperature_terms = found
            else:
                for name in self.terms:
                    if name not in losses:
                        raise ValueError(f"terms names the loss term {name!r}, which does not exist; the "
                                         f"module's terms are: {existing}.")
                    if not hasattr(losses[name], "temperature"):
                        raise ValueError(f"loss term {name!r} ({type(losses[name]).__name__}) has no "
                                         "temperature; pass terms=[...] with LogitKD terms only.")
                self._temperature_terms = self.terms
        self._check_other_schedules(trainer)

    def _check_other_schedules(self, trainer: L.Trainer) -> None:
        for other in trainer.callbacks:
            if other is self or not isinstance(other, TemperatureSchedule):
                continue
            if self.temperature is not None and other.temperature is not None:
                raise ValueError("two TemperatureSchedule callbacks both schedule the temperature; use one "
                                 "(with terms=[...]) per run.")
            shared = sorted(set(self.weights) & set(other.weights))
            if shared:
                raise ValueError(f"two TemperatureSchedule callbacks both schedule the weight of {shared}; "
                                 "give each term's weight one schedule.")

    def _schedules(self) -> dict[str, Schedule]:
        """``{log name: schedule}``: ``temperature`` and ``<term>.weight``."""
        out = {} if self.temperature is None else {"temperature": self.temperature}
        out.update({f"{name}.weight": s for name, s in self.weights.items()})
        return out

    def _trainer_total(self, trainer: L.Trainer) -> int | None:
        if self.interval == "epoch":
            epochs = trainer.max_epochs
            return int(epochs) if epochs is not None and epochs > 0 else None
        steps = trainer.estimated_stepping_batches
        return int(steps) if steps is not None and math.isfinite(steps) and steps > 0 else None

    def _resolve_total(self, trainer: L.Trainer, *, warn: bool = False) -> None:
        if self.total_steps is not None:
            total = self.total_steps
        elif self._loaded is not None and self._loaded.get("total_steps") is not None:
            total = int(self._loaded["total_steps"])
            now = self._trainer_total(trainer)
            if warn and now is not None and now != total:
                rank_zero_warn(
                    f"TemperatureSchedule: resuming with the checkpoint's schedule length {total} "
                    f"({self.interval}s); the trainer now runs {now}. Pass total_steps={now} to stretch the "
                    "schedule over the new length instead (the values then jump).", category=UserWarning)
        else:
            total = self._trainer_total(trainer)
        for name, schedule in self._schedules().items():
            try:
                schedule.resolve_total(total)
            except ValueError as err:
                if self.interval == "epoch" and total is None:
                    raise ValueError(
                        f"schedule/{name}: shape={schedule.shape!r} needs its length in epochs, and an epoch "
                        f"schedule (interval='epoch') counts epochs: give the trainer max_epochs (max_steps="
                        f"{trainer.max_steps} does not say how many epochs), or set total_steps (in epochs)."
                    ) from None
                raise ValueError(f"schedule/{name}: {err}") from None
        self._total = total

    def _check_not_all_zero(self, pl_module: L.LightningModule) -> None:
        """Every term's weight zero at once would leave no loss: check the whole range up front.

        Each weight schedule is monotone between its breakpoints (warm-up end, milestones, last
        step) and non-negative; a strictly monotone piece is zero at most at one of its ends, a
        flat one everywhere or nowhere. So all weights can be zero together inside an interval
        between two consecutive breakpoints (of all schedules) only if they all are at its left
        end: checking the breakpoints covers every step.
        """
        if not self.weights:
            return
        losses = self._losses(pl_module)
        points = sorted({p for s in self.weights.values() for p in s.breakpoints(self._total)})
        for step in points:
            values = {name: (self.weights[name].value(step, self._total) if name in self.weights
                             else float(term.weight)) for name, term in losses.items()}
            if all(v == 0 for v in values.values()):
                shown = ", ".join(f"{n}={v:g}" for n, v in values.items())
                raise ValueError(f"the weight schedules make every loss term zero at {self.interval} {step} "
                                 f"({shown}); keep at least one weight > 0 at every {self.interval}.")

    # ---------------------------------------------------------------------------- applying
    def _index(self, trainer: L.Trainer) -> int:
        return int(trainer.current_epoch if self.interval == "epoch" else trainer.global_step)

    def values_at(self, index: int) -> dict[str, float]:
        """``{log name: value}`` at schedule index ``index`` (after the fit has started)."""
        return {name: s.value(index, self._total) for name, s in self._schedules().items()}

    def _apply(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, float]:
        index = self._index(trainer)
        values = self.values_at(index)
        losses = self._losses(pl_module)
        if "temperature" in values:
            for name in self._temperature_terms:
                losses[name].temperature = values["temperature"]
        for name in self.weights:
            losses[name].weight = values[f"{name}.weight"]
        self._last_index = index
        self._last_values = values
        return values

    @override
    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._resolve_total(trainer)
        self._check_not_all_zero(pl_module)

    @override
    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Some strategies restore callback states after on_fit_start: resolve (and check) again.
        self._resolve_total(trainer, warn=True)
        self._check_not_all_zero(pl_module)
        loaded, self._loaded = self._loaded, None
        if loaded is not None and loaded.get("index") is not None and loaded.get("values"):
            now = self.values_at(int(loaded["index"]))
            changed = {k: (v, now.get(k)) for k, v in loaded["values"].items()
                       if k not in now or not math.isclose(v, now[k], rel_tol=1e-12, abs_tol=1e-12)}
            if changed or loaded.get("interval", self.interval) != self.interval:
                detail = ", ".join(f"{k}: {a} then, {b} now" for k, (a, b) in changed.items())
                rank_zero_warn(
                    f"TemperatureSchedule: the schedule differs from the checkpoint's at "
                    f"{loaded.get('interval')} {loaded['index']} ({detail or 'interval changed'}); the resumed "
                    "run will not continue the interrupted one exactly.", category=UserWarning)
        self._apply(trainer, pl_module)

    @override
    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        values = self._apply(trainer, pl_module)
        if self.log:
            for name, value in values.items():
                pl_module.log(f"schedule/{name}", value, on_step=True, on_epoch=False, batch_size=1)

    # ---------------------------------------------------------------------------- state
    @override
    def state_dict(self) -> dict[str, Any]:
        return {
            "interval": self.interval,
            "total_steps": self._total,
            "index": self._last_index,
            "values": dict(self._last_values),
            "schedules": {name: _describe(s) for name, s in self._schedules().items()},
        }

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._loaded = dict(state_dict)
        if state_dict.get("interval", self.interval) != self.interval:
            warnings.warn(f"TemperatureSchedule: the checkpoint's interval is {state_dict.get('interval')!r}, "
                          f"this callback's is {self.interval!r}.", UserWarning, stacklevel=2)

    def __repr__(self) -> str:
        parts = [f"{n}={_describe(s)}" for n, s in self._schedules().items()]
        return f"{type(self).__name__}({', '.join(parts)}, interval={self.interval!r})"
