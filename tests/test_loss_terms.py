"""Tests of the nn.Module loss terms (LogitKD, TaskLoss) against independent references."""

from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F

from lightning_distill.losses import LogitKD, LossTerm, TaskLoss
from lightning_distill.losses import functional as LF
from lightning_distill.types import LossInputs, TeacherTargets

ALL_DIVERGENCES = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "logit_mse",
]


def make_inputs(seed=0, with_teacher=True):
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(2, 4, 6, generator=g) * 2
    t = torch.randn(2, 4, 6, generator=g) * 2
    labels = torch.tensor([[1, 5, -100, 0], [-100, 2, 3, -100]])
    teacher = TeacherTargets(logits=t) if with_teacher else None
    return LossInputs(student_logits=s, labels=labels, teacher=teacher)


def ref_forward_kl_rows(s, t, temperature):
    """KL(P || Q) per position, in plain float64 torch."""
    log_q = torch.log_softmax(s.double() / temperature, -1)
    log_p = torch.log_softmax(t.double() / temperature, -1)
    return (log_p.exp() * (log_p - log_q)).sum(-1)


@pytest.mark.parametrize("temperature", [1.0, 2.0, 4.0])
def test_logit_kd_scale_by_t2(temperature):
    inputs = make_inputs()
    valid = inputs.labels != -100
    scaled = LogitKD("forward_kl", temperature=temperature, scale_by_t2=True)(inputs)
    plain = LogitKD("forward_kl", temperature=temperature, scale_by_t2=False)(inputs)
    ref = ref_forward_kl_rows(inputs.student_logits, inputs.teacher.logits, temperature)[
        valid
    ].sum()
    assert plain.item() == pytest.approx(ref.item(), rel=1e-5)
    assert scaled.item() == pytest.approx(temperature**2 * ref.item(), rel=1e-5)


def test_logit_kd_default_scales_by_t2():
    assert LogitKD().scale_by_t2 is True


@pytest.mark.parametrize("divergence", ALL_DIVERGENCES)
def test_logit_kd_returns_sum_over_valid_positions(divergence):
    inputs = make_inputs(seed=1)
    term = LogitKD(divergence, temperature=1.5, scale_by_t2=False)
    total = term(inputs)
    mean = getattr(LF, divergence)(
        inputs.student_logits,
        inputs.teacher.logits,
        temperature=1.5,
        labels=inputs.labels,
        **term.params,
    )
    count = int((inputs.labels != -100).sum())
    assert count == 5
    assert total.dim() == 0 and total.dtype == torch.float32
    assert total.item() == pytest.approx(mean.item() * count, rel=1e-5)


def test_logit_kd_gradient_matches_reference():
    inputs = make_inputs(seed=2)
    s0 = inputs.student_logits
    s = s0.clone().requires_grad_(True)
    inputs.student_logits = s
    LogitKD("forward_kl", temperature=2.0, chunk_size=1)(inputs).backward()
    ref_s = s0.double().requires_grad_(True)
    valid = inputs.labels != -100
    (4.0 * ref_forward_kl_rows(ref_s, inputs.teacher.logits, 2.0)[valid].sum()).backward()
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=0, atol=1e-6)


def test_logit_kd_uses_ignore_index_of_inputs():
    inputs = make_inputs(seed=3)
    labels = torch.tensor([[1, 5, 7, 0], [7, 2, 3, 7]])
    inputs.labels = labels
    inputs.ignore_index = 7
    total = LogitKD(scale_by_t2=False)(inputs)
    ref = ref_forward_kl_rows(inputs.student_logits, inputs.teacher.logits, 1.0)[labels != 7].sum()
    assert total.item() == pytest.approx(ref.item(), rel=1e-5)


def test_unknown_divergence_lists_known_names():
    with pytest.raises(ValueError, match="kl_forward") as info:
        LogitKD("kl_forward")
    for name in ALL_DIVERGENCES:
        assert name in str(info.value)


@pytest.mark.parametrize(
    "divergence,kwargs",
    [
        ("forward_kl", {"beta": 0.5}),
        ("reverse_kl", {"alpha": 0.1}),
        ("tvd", {"beta": 0.3}),
        ("generalized_jsd", {"alpha": 0.1}),
        ("skew_forward_kl", {"beta": 0.5}),
    ],
)
def test_parameter_given_to_divergence_without_it_raises(divergence, kwargs):
    with pytest.raises(ValueError, match=next(iter(kwargs))):
        LogitKD(divergence, **kwargs)


@pytest.mark.parametrize(
    "divergence,kwargs",
    [
        ("generalized_jsd", {"beta": 0.0}),
        ("generalized_jsd", {"beta": 1.0}),
        ("skew_forward_kl", {"alpha": 1.0}),
        ("skew_reverse_kl", {"alpha": -0.1}),
    ],
)
def test_parameter_out_of_range_rejected_at_construction(divergence, kwargs):
    with pytest.raises(ValueError):
        LogitKD(divergence, **kwargs)


def test_parameter_defaults_and_values_reach_the_function():
    assert LogitKD("generalized_jsd").params == {"beta": 0.5}
    assert LogitKD("skew_reverse_kl").params == {"alpha": 0.1}
    assert LogitKD("forward_kl").params == {}
    # beta=0.25 by hand on P=(0.5, 0.5), Q=(0.9, 0.1): M = (0.8, 0.2).
    L = math.log
    s = torch.tensor([[L(0.9), L(0.1)]])
    t = torch.tensor([[L(0.5), L(0.5)]])
    inputs = LossInputs(
        student_logits=s, labels=torch.tensor([0]), teacher=TeacherTargets(logits=t)
    )
    expected = 0.25 * (0.5 * L(0.5 / 0.8) + 0.5 * L(0.5 / 0.2)) + 0.75 * (
        0.9 * L(0.9 / 0.8) + 0.1 * L(0.1 / 0.2)
    )
    got = LogitKD("generalized_jsd", beta=0.25)(inputs)
    assert got.item() == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_logit_kd_temperature_setter_rejects(bad):
    with pytest.raises(ValueError, match="temperature"):
        LogitKD(temperature=bad)
    term = LogitKD(temperature=2.0)
    with pytest.raises(ValueError, match="temperature"):
        term.temperature = bad
    assert term.temperature == 2.0


def test_logit_kd_temperature_setter_types_and_schedule():
    term = LogitKD(temperature=2)
    assert term.temperature == 2.0 and isinstance(term.temperature, float)
    with pytest.raises(TypeError):
        term.temperature = True
    with pytest.raises(TypeError):
        term.temperature = "3"
    # A schedule changes the temperature between steps; the next call reads it.
    inputs = make_inputs(seed=4)
    term.scale_by_t2 = False
    term.temperature = 3.0
    valid = inputs.labels != -100
    ref = ref_forward_kl_rows(inputs.student_logits, inputs.teacher.logits, 3.0)[valid].sum()
    assert term(inputs).item() == pytest.approx(ref.item(), rel=1e-5)


@pytest.mark.parametrize("term_cls", [TaskLoss, LogitKD])
def test_weight_validation(term_cls):
    with pytest.raises(ValueError, match="weight"):
        term_cls(weight=-0.5)
    with pytest.raises(ValueError, match="weight"):
        term_cls(weight=float("nan"))
    with pytest.raises(TypeError):
        term_cls(weight="1")
    term = term_cls(weight=0)
    assert term.weight == 0.0
    term.weight = 2
    assert term.weight == 2.0 and isinstance(term.weight, float)
    with pytest.raises(ValueError, match="weight"):
        term.weight = -1


@pytest.mark.parametrize("ignore_index", [-100, 3])
def test_task_loss_equals_torch_cross_entropy_sum(ignore_index):
    inputs = make_inputs(seed=5, with_teacher=False)
    labels = torch.tensor([[1, 5, ignore_index, 0], [ignore_index, 2, 4, ignore_index]])
    inputs.labels = labels
    inputs.ignore_index = ignore_index
    s0 = inputs.student_logits
    s = s0.clone().requires_grad_(True)
    inputs.student_logits = s
    total = TaskLoss()(inputs)
    ref_s = s0.double().requires_grad_(True)
    ref = F.cross_entropy(
        ref_s.flatten(0, 1), labels.flatten(), ignore_index=ignore_index, reduction="sum"
    )
    assert total.item() == pytest.approx(ref.item(), rel=1e-6)
    total.backward()
    ref.backward()
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=0, atol=1e-6)


def test_task_loss_does_not_need_teacher():
    assert TaskLoss.requires_teacher is False
    assert LogitKD.requires_teacher is True
    assert isinstance(TaskLoss(), LossTerm) and isinstance(LogitKD(), LossTerm)


def test_config_returns_plain_values():
    cfg = LogitKD("skew_forward_kl", temperature=2, weight=0.5, alpha=0.2).config()
    assert cfg == {
        "type": "LogitKD",
        "weight": 0.5,
        "divergence": "skew_forward_kl",
        "temperature": 2.0,
        "scale_by_t2": True,
        "alpha": 0.2,
    }
    assert json.loads(json.dumps(cfg)) == cfg
    for value in cfg.values():
        assert type(value) in (str, float, bool, int)
    task = TaskLoss(weight=0.3).config()
    assert task == {"type": "TaskLoss", "weight": 0.3}
    assert json.loads(json.dumps(task)) == task


def test_repr():
    assert repr(TaskLoss(weight=0.5)) == "TaskLoss(weight=0.5)"
    assert repr(LogitKD("generalized_jsd", temperature=2.0, beta=0.5)) == (
        "LogitKD(divergence='generalized_jsd', temperature=2.0, weight=1.0, scale_by_t2=True, beta=0.5)"
    )


def test_logit_kd_without_teacher_logits_raises():
    term = LogitKD()
    with pytest.raises(RuntimeError, match="teacher logits"):
        term(make_inputs(with_teacher=False))
    inputs = make_inputs()
    inputs.teacher = TeacherTargets(logits=None)
    with pytest.raises(RuntimeError, match="teacher logits"):
        term(inputs)


def test_logit_kd_vocab_mismatch_raises():
    inputs = make_inputs()
    inputs.teacher = TeacherTargets(logits=torch.randn(2, 4, 9))
    with pytest.raises(ValueError, match="9 vs 6"):
        LogitKD()(inputs)
