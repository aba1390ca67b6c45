"""The divergences, one entry each: the single table the rest of the package reads.

An entry names a divergence and holds its per-row formula (:mod:`~lightning_distill.losses.formulas`),
its closed-form gradient if it has one, its parameter (``beta``, ``alpha``) with the default and
the allowed range, and whether a sparse (top-k / sampled teacher cache) form exists. From this
table come the public functions (``functional.forward_kl``, ``functional.sparse_forward_kl``, ...),
``functional.DIVERGENCES`` / ``SPARSE_DIVERGENCES``, :class:`~lightning_distill.losses.LogitKD`'s
argument checks, the sparse dispatch of a cached teacher, and the module's refusal of a teacher's
``-inf`` where a divergence cannot take one. Adding a divergence is one :class:`Divergence` in
:data:`REGISTRY` plus its tests (see ``docs/losses.md``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from lightning_distill.losses import formulas as F
from lightning_distill.losses.formulas import GradFn, RowFn
from lightning_distill.validation import check_number

__all__ = ["REGISTRY", "Divergence", "Param", "get", "make_public", "no_neg_inf_names"]


@dataclass(frozen=True)
class Param:
    """A divergence's one real parameter.

    Attributes:
        name: the keyword (``beta``, ``alpha``).
        default: its value when not given.
        low, high: the allowed range's ends; ``low_open`` / ``high_open`` exclude them.
        hint_low, hint_high: said with a value at or below ``low`` / at or above ``high``.
    """

    name: str
    default: float
    low: float
    high: float
    low_open: bool = False
    high_open: bool = False
    hint_low: str = ""
    hint_high: str = ""

    def check(self, value: Any) -> float:
        """``value`` as a float inside the range.

        Raises:
            TypeError: not a number.
            ValueError: NaN, inf or outside the range (the message says why the ends are excluded).
        """
        hint = ""
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            hint = self.hint_low if value <= self.low else self.hint_high if value >= self.high else ""
        return check_number(self.name, value, low=self.low, high=self.high, low_open=self.low_open,
                            high_open=self.high_open, hint=hint)


@dataclass(frozen=True)
class Divergence:
    """One divergence between the teacher's distribution P and the student's Q.

    Attributes:
        name: the config name (``LogitKD(divergence=name)``), also the public function's name.
        rows: the per-row formula; with ``param`` set, a factory ``rows(value) -> row function``.
        formula: the formula in words, for docstrings and ``docs/losses.md``.
        summary: one line for the public function's docstring.
        closed_form: the formula's closed-form gradient (dense), or ``None`` (local autograd).
        param: the parameter, or ``None``.
        sparse: whether a sparse form exists (the formula applied to the coarse K + 1 outcomes of
            top-k / sampled targets). A divergence of raw logits (``logit_mse``) has none.
        dense_only: why there is no sparse form (completes "<name> ... and needs dense teacher
            logits").
        sparse_forward_kl: the sparse form is forward KL: closed-form coarse gradient (-p) and
            the sampled targets' unbiased value (their KL offset).
        needs_teacher_mass: ``(param value) -> bool``: the sparse form is infinite where the
            teacher has no mass off its ids (sampled targets, top-k without a tail).
        no_neg_inf: a teacher logit of ``-inf`` makes the value infinite (the module refuses it).
    """

    name: str
    rows: Callable[..., Any]
    formula: str
    summary: str
    closed_form: GradFn | None = None
    param: Param | None = None
    sparse: bool = True
    dense_only: str = ""
    sparse_forward_kl: bool = False
    needs_teacher_mass: Callable[[float | None], bool] | None = None
    no_neg_inf: bool = False

    def params(self, given: dict[str, Any], *, caller: str) -> dict[str, float]:
        """The checked parameter ``{name: value}`` (``{}`` for none) from keyword arguments.

        Raises:
            TypeError: a keyword this divergence does not take (as Python says for a function).
            ValueError / TypeError: a bad value (see :meth:`Param.check`).
        """
        for key in given:
            if self.param is None or key != self.param.name:
                raise TypeError(f"{caller}() got an unexpected keyword argument {key!r}")
        if self.param is None:
            return {}
        return {self.param.name: self.param.check(given.get(self.param.name, self.param.default))}

    def row_fn(self, params: dict[str, float]) -> RowFn:
        """The row function at these (checked) parameter values."""
        return self.rows(params[self.param.name]) if self.param is not None else self.rows


def _always(value: float | None) -> bool:
    return True


def _at_zero(value: float | None) -> bool:
    return value == 0.0


_BETA = Param(
    "beta", 0.5, 0.0, 1.0, low_open=True, high_open=True,
    hint_low="generalized_jsd vanishes at beta=0; use forward_kl (or reverse_kl) for a KL objective.",
    hint_high="generalized_jsd vanishes at beta=1; use reverse_kl (or forward_kl) for a KL objective.",
)
_ALPHA_HINT = ("alpha=0 is the plain KL and alpha=1 makes the divergence identically zero; DistiLLM uses "
               "alpha=0.1.")
_ALPHA = Param("alpha", 0.1, 0.0, 1.0, high_open=True, hint_low=_ALPHA_HINT, hint_high=_ALPHA_HINT)

#: The divergences by name, in the order the docs list them.
REGISTRY: dict[str, Divergence] = {d.name: d for d in (
    Divergence(
        "forward_kl", F._forward_kl_rows, "KL(P || Q) = sum_v p_v (log p_v - log q_v)",
        "the true KL, zero when the two agree (Hinton-style distillation without the teacher-entropy "
        "constant that soft cross-entropy carries: same gradients, the value is a divergence).",
        closed_form=F._forward_kl_grad, sparse_forward_kl=True,
    ),
    Divergence(
        "reverse_kl", F._reverse_kl_rows, "KL(Q || P) = sum_v q_v (log q_v - log p_v)",
        "mode-seeking, as in MiniLLM.",
        closed_form=F._reverse_kl_grad, needs_teacher_mass=_always, no_neg_inf=True,
    ),
    Divergence(
        "generalized_jsd", F._gjsd_rows,
        "beta KL(P || M) + (1 - beta) KL(Q || M), M = beta P + (1 - beta) Q",
        "the generalized Jensen-Shannon divergence of GKD (Agarwal et al. 2024, Eq. 1). beta lies "
        "strictly inside (0, 1): at either end the divergence is identically zero (use forward_kl "
        "or reverse_kl for the KL ends of the family).",
        param=_BETA,
    ),
    Divergence(
        "skew_forward_kl", F._skew_forward_rows, "KL(P || alpha P + (1 - alpha) Q)",
        "the skew KL of DistiLLM (Ko et al. 2024); alpha in [0, 1), alpha=0 is forward_kl.",
        param=_ALPHA,
    ),
    Divergence(
        "skew_reverse_kl", F._skew_reverse_rows, "KL(Q || (1 - alpha) P + alpha Q)",
        "the skew reverse KL of DistiLLM (Ko et al. 2024); alpha in [0, 1), alpha=0 is reverse_kl "
        "(finite on any sparse targets for alpha > 0).",
        param=_ALPHA, needs_teacher_mass=_at_zero,
    ),
    Divergence(
        "tvd", F._tvd_rows, "0.5 sum_v |p_v - q_v|",
        "total variation distance, in [0, 1] per position.",
    ),
    Divergence(
        "logit_mse", F._mse_rows, "sum_v (s_v / T - t_v / T)^2",
        "squared error between the (temperature-scaled) logits, summed over the vocabulary.",
        closed_form=F._mse_grad, sparse=False, dense_only="compares raw logits", no_neg_inf=True,
    ),
)}


def get(name: str) -> Divergence:
    """The entry ``name``.

    Raises:
        ValueError: an unknown name (the message lists the known ones).
    """
    try:
        return REGISTRY[name]
    except (KeyError, TypeError):
        raise ValueError(f"unknown divergence {name!r}; choose one of {sorted(REGISTRY)}.") from None


def no_neg_inf_names() -> tuple[str, ...]:
    """The divergences whose value a teacher logit of ``-inf`` makes infinite."""
    return tuple(name for name, d in REGISTRY.items() if d.no_neg_inf)


def make_public(entry: Divergence, name: str, target: str, doc: str,
                compute: Callable[..., Any], module: str) -> Callable[..., Any]:
    """A public function ``name(student_logits, <target>, *, [param], temperature, labels, ...)``.

    ``compute(entry, params, student_logits, target, **keywords)`` does the work once the
    parameter is checked; the signature (for ``help()`` and IDEs) and the docstring are the
    entry's. The dense and the sparse functions are made by this one helper.
    """
    kw = inspect.Parameter.KEYWORD_ONLY
    parameters = [inspect.Parameter("student_logits", inspect.Parameter.POSITIONAL_OR_KEYWORD),
                  inspect.Parameter(target, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    if entry.param is not None:
        parameters.append(inspect.Parameter(entry.param.name, kw, default=entry.param.default))
    parameters += [inspect.Parameter(k, kw, default=v) for k, v in (
        ("temperature", 1.0), ("labels", None), ("ignore_index", -100), ("reduction", "mean"),
        ("chunk_size", None))]
    signature = inspect.Signature(parameters)

    # Plain keyword arguments, no Signature.bind: this runs on every step (tens of microseconds
    # saved per call). The second argument keeps its name for callers that pass it by keyword.
    def run(student_logits, targets, temperature, labels, ignore_index, reduction, chunk_size, param):
        return compute(entry, entry.params(param, caller=name), student_logits, targets,
                       temperature=temperature, labels=labels, ignore_index=ignore_index,
                       reduction=reduction, chunk_size=chunk_size)

    if target == "teacher_logits":
        def public(student_logits, teacher_logits, *, temperature=1.0, labels=None, ignore_index=-100,
                   reduction="mean", chunk_size=None, **param):
            return run(student_logits, teacher_logits, temperature, labels, ignore_index, reduction,
                       chunk_size, param)
    elif target == "targets":
        def public(student_logits, targets, *, temperature=1.0, labels=None, ignore_index=-100,
                   reduction="mean", chunk_size=None, **param):
            return run(student_logits, targets, temperature, labels, ignore_index, reduction, chunk_size,
                       param)
    else:  # pragma: no cover - internal
        raise ValueError(f"target must be 'teacher_logits' or 'targets', got {target!r}.")

    public.__signature__ = signature  # type: ignore[attr-defined]
    public.__name__ = public.__qualname__ = name
    public.__module__ = module
    public.__doc__ = doc
    return public
