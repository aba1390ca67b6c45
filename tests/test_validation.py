"""The argument checks of validation.py, and the convention they give every public constructor:
a value of the wrong kind is a TypeError, a value of the right kind that is not allowed is a ValueError."""

from __future__ import annotations

import math

import pytest
import torch

from lightning_distill import DistillationModule
from lightning_distill.blackbox import OpenAITeacher
from lightning_distill.callbacks import CoverageSlices, TeacherCache, TemperatureSchedule
from lightning_distill.callbacks.temperature import Schedule
from lightning_distill.data import CrossTokenizerDataModule, SlicedTextDataModule, TextDataModule
from lightning_distill.losses import (
    AttentionTransfer,
    CrossTokenizerKD,
    EmbeddingKD,
    FeatureKD,
    LogitKD,
    RKDAngle,
    RKDDistance,
    TaskLoss,
    ULDLoss,
)
from lightning_distill.models import causal_lm_from_config, student_from_teacher
from lightning_distill.validation import check_bool, check_choice, check_int, check_number

NOT_NUMBERS = ["1", b"1", None, [1.0], {"x": 1}, True, False, torch.tensor(1.0)]
NOT_FINITE = [math.nan, math.inf, -math.inf]


# ----------------------------------------------------------------------------- the helpers
@pytest.mark.parametrize("value", NOT_NUMBERS)
def test_a_number_refuses_every_other_kind(value):
    with pytest.raises(TypeError, match=r"x must be a number, got .*\("):
        check_number("x", value)


@pytest.mark.parametrize("value", NOT_FINITE)
def test_a_number_is_finite(value):
    with pytest.raises(ValueError, match="x must be a finite number, got"):
        check_number("x", value)


@pytest.mark.parametrize("low, high, low_open, high_open", [
    (0.0, 1.0, False, False), (0.0, 1.0, True, True), (0.0, None, True, False), (None, 2.0, False, True),
    (-1.0, 1.0, False, True),
])
def test_a_number_inside_its_bounds_passes_and_outside_fails(low, high, low_open, high_open):
    probes = [-2.0, -1.0, -0.5, 0.0, 0.25, 1.0, 1.5, 2.0, 3.0, 7]
    for value in probes:
        inside = ((low is None or value > low or (value == low and not low_open))
                  and (high is None or value < high or (value == high and not high_open)))
        kwargs = dict(low=low, high=high, low_open=low_open, high_open=high_open)
        if inside:
            out = check_number("x", value, **kwargs)
            assert out == value and type(out) is float
        else:
            with pytest.raises(ValueError, match=f"got {float(value)}"):
                check_number("x", value, **kwargs)


def test_none_is_a_number_only_when_allowed():
    assert check_number("x", None, allow_none=True) is None
    assert check_int("n", None, allow_none=True) is None
    with pytest.raises(TypeError, match="x must be a number or None"):
        check_number("x", "1", allow_none=True)
    with pytest.raises(ValueError, match=r"x must be a finite number >= 0 or None, got -1.0. Use more."):
        check_number("x", -1, low=0.0, allow_none=True, hint="Use more.")


@pytest.mark.parametrize("value", [True, False, 1.0, 2.5, "3", None, math.nan, torch.tensor(3)])
def test_an_int_is_an_int_not_a_bool_float_or_string(value):
    with pytest.raises(TypeError, match=r"n must be an int, got"):
        check_int("n", value)


def test_int_bounds_are_inclusive():
    for value in range(-3, 8):
        if 0 <= value <= 4:
            assert check_int("n", value, low=0, high=4) == value
        else:
            with pytest.raises(ValueError, match=rf"n must be an int in \[0, 4\], got {value}"):
                check_int("n", value, low=0, high=4)
    with pytest.raises(ValueError, match="n must be <= 4, got 5"):
        check_int("n", 5, high=4)
    assert check_int("n", 10**12, low=1) == 10**12


@pytest.mark.parametrize("value", [0, 1, "true", "yes", None, 1.0])
def test_a_bool_is_only_true_or_false(value):
    with pytest.raises(TypeError, match="flag must be true or false"):
        check_bool("flag", value)
    assert check_bool("flag", True) is True and check_bool("flag", False) is False


def test_a_choice_is_a_value_whatever_its_kind():
    assert check_choice("mode", "a", ("a", "b")) == "a"
    for value in ("c", 1, None, "A"):
        with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\)"):
            check_choice("mode", value, ("a", "b"))


# ----------------------------------------------------------------------------- the convention
VOCAB = 32


def _teacher():
    return causal_lm_from_config("llama", vocab_size=VOCAB, seed=0, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=4, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32)


def _text(**kw):
    return TextDataModule(files="unused.jsonl", tokenizer="unused", **kw)


CONSTRUCTORS = {
    "LogitKD.temperature": lambda v: LogitKD(temperature=v),
    "LogitKD.weight": lambda v: LogitKD(weight=v),
    "TaskLoss.weight": lambda v: TaskLoss(weight=v),
    "FeatureKD.student_dim": lambda v: FeatureKD(student_dim=v),
    "AttentionTransfer.value_weight": lambda v: AttentionTransfer(value_weight=v),
    "RKDDistance.delta": lambda v: RKDDistance(delta=v),
    "RKDAngle.weight": lambda v: RKDAngle(weight=v),
    "EmbeddingKD.student_dim": lambda v: EmbeddingKD(student_dim=v, teacher_dim=8),
    "CoverageSlices.max_samples_per_slice": lambda v: CoverageSlices(metric="similarity", max_samples_per_slice=v),
    "DistillationModule.metrics_every_n_steps": lambda v: DistillationModule(torch.nn.Linear(2, 2),
                                                                             metrics_every_n_steps=v),
    "Schedule.start": lambda v: Schedule("linear", start=v, end=1.0, total_steps=10),
    "Schedule.total_steps": lambda v: Schedule("linear", start=2.0, end=1.0, total_steps=v),
    "TemperatureSchedule.total_steps": lambda v: TemperatureSchedule(
        temperature={"shape": "linear", "start": 2.0, "end": 1.0}, total_steps=v),
    "CoverageSlices.min_relative_retention": lambda v: CoverageSlices(min_relative_retention=v),
    "TeacherCache.k": lambda v: TeacherCache("/tmp/unused", k=v),
    "TeacherCache.sample_temperature": lambda v: TeacherCache("/tmp/unused", sample_temperature=v),
    "TextDataModule.seq_len": lambda v: _text(seq_len=v),
    "TextDataModule.val_fraction": lambda v: _text(val_fraction=v),
    "SlicedTextDataModule.batch_size": lambda v: SlicedTextDataModule(batch_size=v),
    "SlicedTextDataModule.test_fraction": lambda v: SlicedTextDataModule(test_fraction=v),
    "student_from_teacher.intermediate_size": lambda v: student_from_teacher(_teacher(), intermediate_size=v),
    "student_from_teacher.k": lambda v: student_from_teacher(_teacher(), layers="first_k", k=v),
    "OpenAITeacher.timeout": lambda v: OpenAITeacher("http://127.0.0.1:1/v1", "m", timeout=v),
    "OpenAITeacher.concurrency": lambda v: OpenAITeacher("http://127.0.0.1:1/v1", "m", concurrency=v),
    "CrossTokenizerKD.uld_weight": lambda v: CrossTokenizerKD(uld_weight=v),
    "ULDLoss.temperature": lambda v: ULDLoss(temperature=v),
    "CrossTokenizerDataModule.teacher_seq_len": lambda v: CrossTokenizerDataModule(teacher_seq_len=v),
}
#: An out-of-range value of the right kind for each argument above.
OUT_OF_RANGE = {
    "LogitKD.temperature": -1.0, "LogitKD.weight": -1.0, "TaskLoss.weight": math.nan,
    "RKDDistance.delta": 0.0, "RKDAngle.weight": -2.0, "EmbeddingKD.student_dim": 0,
    "CoverageSlices.max_samples_per_slice": 2,
    "DistillationModule.metrics_every_n_steps": 0, "Schedule.start": math.inf, "Schedule.total_steps": 0,
    "TemperatureSchedule.total_steps": 0, "CoverageSlices.min_relative_retention": 1.5, "TeacherCache.k": 0,
    "TeacherCache.sample_temperature": 0.0, "TextDataModule.seq_len": 1, "TextDataModule.val_fraction": 1.0,
    "SlicedTextDataModule.batch_size": 0, "SlicedTextDataModule.test_fraction": -0.1,
    "student_from_teacher.intermediate_size": 64, "student_from_teacher.k": 9,
    "OpenAITeacher.timeout": 0.0, "OpenAITeacher.concurrency": 0,
    "FeatureKD.student_dim": 0, "AttentionTransfer.value_weight": -1.0,
    "CrossTokenizerKD.uld_weight": -1.0, "ULDLoss.temperature": 0.0, "CrossTokenizerDataModule.teacher_seq_len": 1,
}


@pytest.mark.parametrize("where", sorted(CONSTRUCTORS))
def test_a_string_where_a_number_goes_is_a_type_error(where):
    with pytest.raises(TypeError, match=rf"{where.split('.')[-1]} must be .*'3'"):
        CONSTRUCTORS[where]("3")


@pytest.mark.parametrize("where", sorted(CONSTRUCTORS))
def test_an_out_of_range_number_is_a_value_error(where):
    value = OUT_OF_RANGE[where]
    with pytest.raises(ValueError, match=rf"{where.split('.')[-1]}.*{value}"):
        CONSTRUCTORS[where](value)
