"""``TemperatureSchedule``: scheduled KD temperature and loss-term weights.

Expected values are written here from the closed forms (not through ``Schedule.value``), and the
values the loss actually used are recorded from inside the loss terms during real ``Trainer`` fits.
Models are tiny llamas built from configs (no hub access).
"""

from __future__ import annotations

import copy
import csv
import functools
import math
import warnings
from pathlib import Path
from types import SimpleNamespace

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset

from lightning_distill import DistillationModule
from lightning_distill.callbacks import Schedule, TemperatureSchedule
from lightning_distill.cli import CONFIG_DIR, _make_trainer
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import causal_lm_from_config

VOCAB = 48
SEQ = 10


# ------------------------------------------------------------------------------------------
# Helpers
# ------------------------------------------------------------------------------------------
def tiny_llama(seed: int = 0):
    return causal_lm_from_config(
        "llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
        num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, seed=seed,
    )


def tiny_teacher(seed: int = 1):
    model = tiny_llama(seed)
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # peaked distributions, so KD values are not ~0
    return model


class Items(Dataset):
    def __init__(self, items):
        self.items = list(items)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def lm_items(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    return [{"input_ids": ids[i], "attention_mask": torch.ones(SEQ, dtype=torch.long), "labels": ids[i].clone()}
            for i in range(n)]


def loader(items, batch_size: int = 2) -> DataLoader:
    return DataLoader(Items(items), batch_size=batch_size, shuffle=False)


class RecordingKD(LogitKD):
    """A LogitKD that records, for every training call, the temperature, weight and value it used."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.calls: list[tuple[float, float, float]] = []

    def forward(self, inputs):
        value = super().forward(inputs)
        if self.training:
            self.calls.append((self.temperature, self.weight, float(value.detach())))
        return value


class RecordingTask(TaskLoss):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.weights: list[float] = []

    def forward(self, inputs):
        if self.training:
            self.weights.append(self.weight)
        return super().forward(inputs)


def make_module(teacher=True, lr: float = 1e-2, optimizer=torch.optim.AdamW, kd_weight=0.5, task_weight=0.5,
                student_seed: int = 0):
    losses = {"kd": RecordingKD(temperature=2.0, weight=kd_weight), "task": RecordingTask(weight=task_weight)}
    return DistillationModule(tiny_llama(student_seed), tiny_teacher() if teacher else None, losses=losses,
                              optimizer=functools.partial(optimizer, lr=lr))


def make_trainer(**kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0)
    return L.Trainer(**(defaults | kwargs))


def temps(module) -> list[float]:
    return [c[0] for c in module.losses["kd"].calls]


def fake_trainer(callbacks=(), *, total=10, max_epochs=3, global_step=0, current_epoch=0):
    """What the callback reads from a Trainer, for hook-level tests without a fit."""
    return SimpleNamespace(callbacks=list(callbacks), estimated_stepping_batches=total, max_epochs=max_epochs,
                           global_step=global_step, current_epoch=current_epoch)


def start_fit(cb, module, trainer) -> None:
    cb.setup(trainer, module, "fit")
    cb.on_fit_start(trainer, module)


# ------------------------------------------------------------------------------------------
# 1. Shapes against their closed forms
# ------------------------------------------------------------------------------------------
T = 21  # steps 0..20; the last step trained is 20


@pytest.mark.parametrize("t", [0, 1, 5, 10, 13, 19, 20, 25])
def test_shapes_match_closed_forms(t):
    p = min(t, T - 1) / (T - 1)
    expected = {
        "constant": 3.0,
        "linear": 4.0 + (1.0 - 4.0) * p,
        "cosine": 1.0 + (4.0 - 1.0) * (1 + math.cos(math.pi * p)) / 2,
        "exponential": 4.0 * (1.0 / 4.0) ** p,
    }
    assert Schedule("constant", 3.0).value(t, T) == pytest.approx(expected["constant"], abs=1e-12)
    for shape in ("linear", "cosine", "exponential"):
        assert Schedule(shape, 4.0, 1.0).value(t, T) == pytest.approx(expected[shape], rel=1e-12), shape
        # the schedule's own total_steps wins over the one passed in
        assert Schedule(shape, 4.0, 1.0, total_steps=T).value(t, 1000) == pytest.approx(expected[shape], rel=1e-12)


def test_ends_are_exact_and_hold_after_the_last_step():
    for shape in ("linear", "cosine", "exponential"):
        s = Schedule(shape, 0.7, 0.1, total_steps=300)
        assert s.value(0) == 0.7 and s.value(299) == 0.1 and s.value(10_000) == 0.1, shape
        assert 0.1 < s.value(150) < 0.7
    assert Schedule("linear", 4.0, 1.0, total_steps=1).value(0) == 1.0  # one step: the end


@pytest.mark.parametrize("t,k", [(0, 0), (99, 0), (100, 1), (150, 1), (199, 1), (200, 2), (5000, 2)])
def test_step_shape_with_gamma_and_with_end(t, k):
    assert Schedule("step", 4.0, gamma=0.5, milestones=[100, 200]).value(t) == pytest.approx(4.0 * 0.5**k)
    # with `end`: evenly spaced levels from start (k=0) to end (after the last milestone)
    assert Schedule("step", 4.0, end=1.0, milestones=[100, 200]).value(t) == pytest.approx(4.0 + (1.0 - 4.0) * k / 2)
    # from 0 (a term switched on at a milestone)
    assert Schedule("step", 0.0, end=0.5, milestones=[100]).value(t) == (0.5 if k else 0.0)


@pytest.mark.parametrize("t", [0, 1, 3, 4, 5, 9, 14, 20])
def test_warmup_then_each_shape(t):
    W, total = 5, 15  # warm-up 0..4, then the shape over steps 5..14
    warm = 1.0 + (4.0 - 1.0) * t / W
    q = min(max(t - W, 0), total - 1 - W) / (total - 1 - W)
    shapes = {
        "constant": 4.0,
        "linear": 4.0 + (2.0 - 4.0) * q,
        "cosine": 2.0 + (4.0 - 2.0) * (1 + math.cos(math.pi * q)) / 2,
        "exponential": 4.0 * (2.0 / 4.0) ** q,
    }
    for shape, after in shapes.items():
        kwargs = {} if shape == "constant" else {"end": 2.0}
        s = Schedule(shape, 4.0, warmup_steps=W, warmup_start=1.0, total_steps=total, **kwargs)
        assert s.value(t) == pytest.approx(warm if t < W else after, rel=1e-12), shape
    step = Schedule("step", 4.0, gamma=0.5, milestones=[8, 12], warmup_steps=W, warmup_start=1.0)
    assert step.value(t) == pytest.approx(warm if t < W else 4.0 * 0.5 ** sum(m <= t for m in (8, 12)))


def test_warmup_hold_and_corners():
    hold = Schedule("cosine", 4.0, 1.0, warmup_steps=30, warmup_start=4.0, total_steps=300)
    assert [hold.value(t) for t in (0, 15, 29, 30)] == [4.0, 4.0, 4.0, 4.0]
    assert hold.value(299) == 1.0
    assert hold.corners() == {"warmup_start": 4.0, "start": 4.0, "end": 1.0}
    assert hold.breakpoints() == [0, 30, 299]
    step = Schedule("step", 4.0, gamma=0.5, milestones=[10, 20])
    assert step.corners() == {"start": 4.0, "milestone 10": 2.0, "milestone 20": 1.0}
    assert step.breakpoints() == [0, 10, 20]


def test_schedule_from_yaml_like_values():
    from omegaconf import OmegaConf

    s = Schedule.coerce(OmegaConf.create({"shape": "step", "start": 4, "gamma": 0.5, "milestones": [3, 6]}))
    assert s == Schedule("step", 4.0, gamma=0.5, milestones=(3, 6)) and s.value(6) == 1.0
    assert Schedule.coerce(2) == Schedule("constant", 2.0)
    with pytest.raises(ValueError, match=r"unknown key\(s\) \['stop'\]"):
        Schedule.coerce({"shape": "linear", "start": 1.0, "stop": 2.0})


# ------------------------------------------------------------------------------------------
# 2. Validation, with messages that name the bad value
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kwargs,message", [
    (dict(shape="sigmoid", start=1.0), r"shape must be one of .* got 'sigmoid'"),
    (dict(shape="step", start=4.0, gamma=0.5, milestones=[200, 100]), r"strictly increasing, got \[200, 100\]"),
    (dict(shape="step", start=4.0, gamma=0.5, milestones=[5, 5]), r"strictly increasing, got \[5, 5\]"),
    (dict(shape="step", start=4.0, gamma=0.5, milestones=[3, 8], warmup_steps=5, warmup_start=1.0),
     r"after the warm-up \(> warmup_steps=5\), got \[3, 8\]"),
    (dict(shape="step", start=4.0, milestones=[3]), r"exactly one of end .* or gamma"),
    (dict(shape="step", start=4.0, end=1.0, gamma=0.5, milestones=[3]), r"exactly one of end"),
    (dict(shape="step", start=4.0, gamma=0.5), r"needs milestones"),
    (dict(shape="step", start=4.0, gamma=-1.0, milestones=[3]), r"gamma must be a finite number > 0, got -1.0"),
    (dict(shape="linear", start=4.0, gamma=0.5, end=1.0), r"gamma=0.5 is only used by shape='step'"),
    (dict(shape="cosine", start=4.0), r"shape='cosine' needs an end value"),
    (dict(shape="constant", start=4.0, end=1.0), r"constant' takes no end \(got end=1.0"),
    (dict(shape="exponential", start=4.0, end=0.0), r"needs start > 0 and end > 0, got start=4.0, end=0.0"),
    (dict(shape="linear", start=4.0, end=1.0, warmup_steps=3), r"warmup_steps=3 needs warmup_start"),
    (dict(shape="linear", start=4.0, end=1.0, warmup_start=1.0), r"warmup_start=1.0 is given but warmup_steps is 0"),
    (dict(shape="linear", start=4.0, end=1.0, warmup_steps=-1), r"warmup_steps must be >= 0, got -1"),
    (dict(shape="linear", start=4.0, end=1.0, warmup_steps=10, warmup_start=1.0, total_steps=10),
     r"total_steps=10 must be greater than warmup_steps=10"),
    (dict(shape="linear", start=float("nan"), end=1.0), r"start must be a finite number, got nan"),
])
def test_schedule_validation(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Schedule(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(temperature=0.0), r"temperature schedule reaches 0.0 at its start; a temperature must be > 0"),
    (dict(temperature={"shape": "linear", "start": 4.0, "end": -1.0}), r"reaches -1.0 at its end"),
    (dict(temperature={"shape": "cosine", "start": 4.0, "end": 1.0, "warmup_steps": 5, "warmup_start": 0.0}),
     r"reaches 0.0 at its warmup_start"),
    (dict(temperature={"shape": "step", "start": 1.0, "end": 0.0, "milestones": [5]}), r"reaches 0.0 at its milestone 5"),
    (dict(weights={"kd": {"shape": "linear", "start": 0.5, "end": -0.1}}),
     r"weight schedule of term 'kd' reaches -0.1 at its end; a weight must be >= 0"),
    (dict(temperature={"shape": "step", "start": 4.0, "gamma": 0.5, "milestones": [9, 3]}),
     r"temperature: milestones must be strictly increasing, got \[9, 3\]"),
    (dict(temperature=2.0, interval="batch"), r"interval must be one of \('step', 'epoch'\), got 'batch'"),
    (dict(temperature=2.0, total_steps=0), r"total_steps must be >= 1, got 0"),
    (dict(), r"nothing to schedule"),
    (dict(weights={"kd": 0.5}, terms=["kd"]), r"terms=\['kd'\] is given but there is no temperature schedule"),
])
def test_callback_validation_at_construction(kwargs, message):
    with pytest.raises(ValueError, match=message):
        TemperatureSchedule(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    (dict(weights={"distill": 0.5}), r"weights names the loss term 'distill', which does not exist; the module's "
                                     r"terms are: kd, task"),
    (dict(temperature=2.0, terms=["kd", "soft"]), r"terms names the loss term 'soft', which does not exist; "
                                                  r"the module's terms are: kd, task"),
    (dict(temperature=2.0, terms=["task"]), r"loss term 'task' \(RecordingTask\) has no temperature"),
])
def test_unknown_terms_rejected_with_the_existing_names(kwargs, message):
    cb = TemperatureSchedule(**kwargs)
    with pytest.raises(ValueError, match=message):
        cb.setup(fake_trainer([cb]), make_module(), "fit")


def test_temperature_without_any_temperature_term():
    module = DistillationModule(tiny_llama(), None, losses={"task": TaskLoss()})
    cb = TemperatureSchedule(temperature=2.0)
    with pytest.raises(ValueError, match=r"no loss term has a temperature \(terms: task\)"):
        cb.setup(fake_trainer([cb]), module, "fit")


def test_all_zero_weights_rejected_over_the_whole_range():
    # kd is 1 until step 5, then 0; task is 0 until step 8: all zero on steps 5..7.
    cb = TemperatureSchedule(weights={"kd": {"shape": "step", "start": 1.0, "end": 0.0, "milestones": [5]},
                                      "task": {"shape": "step", "start": 0.0, "end": 1.0, "milestones": [8]}})
    with pytest.raises(ValueError, match=r"every loss term zero at step 5 \(kd=0, task=0\)"):
        start_fit(cb, make_module(), fake_trainer([cb], total=20))
    # A fixed term counts too: kd linear 1 -> 0 alone reaches zero at the last step (step 9 of 10).
    only_kd = DistillationModule(tiny_llama(), tiny_teacher(), losses={"kd": LogitKD(weight=1.0)})
    cb = TemperatureSchedule(weights={"kd": {"shape": "linear", "start": 1.0, "end": 0.0}})
    with pytest.raises(ValueError, match=r"every loss term zero at step 9 \(kd=0\)"):
        start_fit(cb, only_kd, fake_trainer([cb], total=10))
    # ... but with the task term at 0.5 it is fine, and so is a hand-over from kd to task.
    for cb in (TemperatureSchedule(weights={"kd": {"shape": "linear", "start": 1.0, "end": 0.0}}),
               TemperatureSchedule(weights={"kd": {"shape": "cosine", "start": 1.0, "end": 0.0},
                                            "task": {"shape": "linear", "start": 0.0, "end": 1.0}})):
        start_fit(cb, make_module(), fake_trainer([cb], total=10))


def test_schedule_length_and_duplicate_callbacks_checked_at_fit_start():
    cb = TemperatureSchedule(temperature={"shape": "linear", "start": 4.0, "end": 1.0, "warmup_steps": 10,
                                          "warmup_start": 1.0})
    with pytest.raises(ValueError, match=r"schedule/temperature: total_steps=8 must be greater than warmup_steps=10"):
        start_fit(cb, make_module(), fake_trainer([cb], total=8))
    cb = TemperatureSchedule(temperature={"shape": "cosine", "start": 4.0, "end": 1.0})
    with pytest.raises(ValueError, match=r"needs total_steps"):
        start_fit(cb, make_module(), fake_trainer([cb], total=float("inf")))
    a, b = TemperatureSchedule(temperature=2.0), TemperatureSchedule(temperature=3.0, weights={"task": 0.5})
    with pytest.raises(ValueError, match="both schedule the temperature"):
        a.setup(fake_trainer([a, b]), make_module(), "fit")


@pytest.mark.slow
def test_bad_term_fails_before_any_step():
    module = make_module()
    before = copy.deepcopy(module.student.state_dict())
    cb = TemperatureSchedule(weights={"kd_loss": 0.5})
    with pytest.raises(ValueError, match="the module's terms are: kd, task"):
        make_trainer(max_steps=2, callbacks=[cb]).fit(module, loader(lm_items(4)))
    assert module.losses["kd"].calls == []
    assert all(torch.equal(v, before[k]) for k, v in module.student.state_dict().items())


# ------------------------------------------------------------------------------------------
# 3. Applying: per step (accumulation), per epoch; the loss actually uses the value
# ------------------------------------------------------------------------------------------
@pytest.mark.slow
def test_per_step_with_accumulation_every_micro_batch_sees_the_step_value():
    module = make_module()
    cb = TemperatureSchedule(temperature={"shape": "linear", "start": 4.0, "end": 1.0})
    trainer = make_trainer(max_steps=3, accumulate_grad_batches=2, callbacks=[cb])
    trainer.fit(module, loader(lm_items(12), batch_size=2))  # 6 micro-batches = 3 optimizer steps
    assert trainer.global_step == 3
    assert temps(module) == [4.0, 4.0, 2.5, 2.5, 1.0, 1.0]


@pytest.mark.slow
@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_per_step_vs_per_epoch(interval):
    module = make_module()
    cb = TemperatureSchedule(temperature={"shape": "linear", "start": 4.0, "end": 1.0}, interval=interval,
                             weights={"kd": {"shape": "step", "start": 0.5, "end": 0.25, "milestones": [2]}})
    trainer = make_trainer(max_epochs=3, callbacks=[cb])
    trainer.fit(module, loader(lm_items(8), batch_size=2))  # 4 steps per epoch, 12 in all
    kd_weights = [c[1] for c in module.losses["kd"].calls]
    if interval == "epoch":  # total = max_epochs = 3, the index is the epoch
        assert temps(module) == [4.0] * 4 + [2.5] * 4 + [1.0] * 4
        assert kd_weights == [0.5] * 8 + [0.25] * 4
    else:  # total = 12 optimizer steps
        assert temps(module) == pytest.approx([4.0 + (1.0 - 4.0) * t / 11 for t in range(12)], rel=1e-12)
        assert kd_weights == [0.5] * 2 + [0.25] * 10


def _kl_sum(student_logits, teacher_logits, temperature):
    """Independent forward KL(teacher || student) at ``temperature``, summed over causal-LM positions."""
    s = student_logits[:, :-1] / temperature  # the last position has no next token
    t = teacher_logits[:, :-1] / temperature
    p = t.softmax(-1)
    return float((p * (t.log_softmax(-1) - s.log_softmax(-1))).sum()), s.shape[0] * s.shape[1]


@pytest.mark.slow
def test_schedule_reaches_the_loss_and_the_log(tmp_path):
    # lr=0: the student does not move, so every step sees the same logits and only the schedule changes.
    module = make_module(lr=0.0, optimizer=torch.optim.SGD)
    cb = TemperatureSchedule(temperature={"shape": "cosine", "start": 4.0, "end": 1.0},
                             weights={"kd": {"shape": "linear", "start": 0.8, "end": 0.2},
                                      "task": {"shape": "linear", "start": 0.2, "end": 0.8}})
    items = lm_items(4, seed=3)
    trainer = make_trainer(max_steps=4, callbacks=[cb], log_every_n_steps=1,
                           logger=CSVLogger(tmp_path, name="csv"))
    trainer.fit(module, loader(items, batch_size=4))  # one batch per epoch, 4 steps

    batch = torch.utils.data.default_collate(items)
    with torch.no_grad():
        s_logits = module.student(input_ids=batch["input_ids"]).logits
        t_logits = module.teacher(input_ids=batch["input_ids"]).logits
        task = F.cross_entropy(s_logits[:, :-1].reshape(-1, VOCAB), batch["input_ids"][:, 1:].reshape(-1))
    expected_t = [1.0 + 3.0 * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(4)]
    expected_w = [0.8 + (0.2 - 0.8) * k / 3 for k in range(4)]

    calls = module.losses["kd"].calls
    assert [c[0] for c in calls] == pytest.approx(expected_t, rel=1e-12)
    assert [c[1] for c in calls] == pytest.approx(expected_w, rel=1e-12)
    for (_, _, value), want_t in zip(calls, expected_t):
        kl, _ = _kl_sum(s_logits, t_logits, want_t)
        assert value == pytest.approx(want_t**2 * kl, rel=1e-4)

    rows = list(csv.DictReader(next(Path(tmp_path).rglob("metrics.csv")).open()))
    logged = {int(r["step"]): r for r in rows if r.get("schedule/temperature")}
    assert sorted(logged) == [0, 1, 2, 3]
    for k in range(4):
        row = logged[k]
        assert float(row["schedule/temperature"]) == pytest.approx(expected_t[k], rel=1e-6)
        assert float(row["schedule/kd.weight"]) == pytest.approx(expected_w[k], rel=1e-6)
        assert float(row["schedule/task.weight"]) == pytest.approx(1.0 - expected_w[k], rel=1e-6)
        kl, count = _kl_sum(s_logits, t_logits, expected_t[k])
        kd_mean = expected_t[k] ** 2 * kl / count
        assert float(row["train/kd"]) == pytest.approx(kd_mean, rel=1e-4)
        want_loss = expected_w[k] * kd_mean + (1.0 - expected_w[k]) * float(task)
        assert float(row["train/loss"]) == pytest.approx(want_loss, rel=1e-4)
    assert module.losses["kd"].temperature == 1.0 and module.losses["task"].weight == pytest.approx(0.8)


@pytest.mark.slow
def test_same_with_cached_teacher_targets_as_with_live_teacher():
    items = lm_items(8, seed=5)
    live = make_module(teacher=True)
    with torch.no_grad():
        cached = live.teacher(input_ids=torch.stack([i["input_ids"] for i in items])).logits
    cached_module = make_module(teacher=False)
    cached_items = [item | {"teacher_targets": cached[i]} for i, item in enumerate(items)]

    def schedule():
        return TemperatureSchedule(temperature={"shape": "exponential", "start": 4.0, "end": 1.0},
                                   weights={"kd": {"shape": "linear", "start": 0.9, "end": 0.4}})

    make_trainer(max_steps=4, callbacks=[schedule()]).fit(live, loader(items))
    make_trainer(max_steps=4, callbacks=[schedule()]).fit(cached_module, loader(cached_items))
    a, b = live.losses["kd"].calls, cached_module.losses["kd"].calls
    assert len(a) == len(b) == 4
    assert [c[:2] for c in a] == [c[:2] for c in b]
    assert [c[0] for c in a] == pytest.approx([4.0 * 0.25 ** (k / 3) for k in range(4)], rel=1e-12)
    assert [c[2] for c in a] == pytest.approx([c[2] for c in b], rel=1e-4)


# ------------------------------------------------------------------------------------------
# 4. Checkpoint state and resume continuity
# ------------------------------------------------------------------------------------------
class CrashAt(Callback):
    def __init__(self, step: int):
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step == self.step:
            raise RuntimeError("simulated crash")


def _resume_schedule(**kwargs):
    return TemperatureSchedule(temperature={"shape": "cosine", "start": 4.0, "end": 1.0},
                               weights={"kd": {"shape": "linear", "start": 0.9, "end": 0.1},
                                        "task": {"shape": "cosine", "start": 0.1, "end": 0.9}}, **kwargs)


def _used(module):
    return [(c[0], c[1]) for c in module.losses["kd"].calls], module.losses["task"].weights


@pytest.mark.slow
def test_resume_continues_exactly_where_the_uninterrupted_run_was(tmp_path):
    N = 3
    items = lm_items(16, seed=8)
    # The uninterrupted run: 2N steps.
    full = make_module()
    make_trainer(max_steps=2 * N, callbacks=[_resume_schedule()]).fit(full, loader(items))
    full_kd, full_task = _used(full)
    assert len(full_kd) == 2 * N and len(set(full_kd)) == 2 * N  # every step has its own values

    # The same run, crashing at step N after a checkpoint at step N.
    first = make_module()
    ckpt = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=N, save_top_k=-1)
    cb = _resume_schedule()
    with pytest.raises(RuntimeError, match="simulated crash"):
        make_trainer(max_steps=2 * N, enable_checkpointing=True, callbacks=[cb, ckpt, CrashAt(N)]).fit(
            first, loader(items))
    path = tmp_path / f"step={N}.ckpt"
    state = torch.load(path, weights_only=True, map_location="cpu")["callbacks"][cb.state_key]
    assert state["interval"] == "step" and state["total_steps"] == 2 * N and state["index"] == N - 1
    assert state["values"]["temperature"] == full_kd[N - 1][0]
    assert state["values"]["kd.weight"] == full_kd[N - 1][1] and state["values"]["task.weight"] == full_task[N - 1]

    # Resume with fresh objects (terms at their config values: T=2, weights 0.5).
    resumed = make_module(student_seed=99)
    trainer = make_trainer(max_steps=2 * N, callbacks=[_resume_schedule()])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(resumed, loader(items), ckpt_path=path)
    assert not [w for w in caught if "TemperatureSchedule" in str(w.message)]  # same schedule: no complaint
    assert trainer.global_step == 2 * N
    first_kd, first_task = _used(first)
    resumed_kd, resumed_task = _used(resumed)
    assert first_kd + resumed_kd == full_kd  # exactly the same floats, step by step
    assert first_task + resumed_task == full_task

    # Resuming with more steps keeps the checkpoint's schedule length (values continue, then hold
    # at the end) and says so; a changed schedule is reported.
    longer = make_module(student_seed=99)
    with pytest.warns(UserWarning, match=r"checkpoint's schedule length 6 \(steps\); the trainer now runs 8"):
        make_trainer(max_steps=2 * N + 2, callbacks=[_resume_schedule()]).fit(longer, loader(items), ckpt_path=path)
    longer_kd, _ = _used(longer)
    assert longer_kd == full_kd[N:] + [full_kd[-1]] * 2
    changed = make_module(student_seed=99)
    other = TemperatureSchedule(temperature={"shape": "linear", "start": 4.0, "end": 1.0},
                                weights={"kd": {"shape": "linear", "start": 0.9, "end": 0.1},
                                         "task": {"shape": "cosine", "start": 0.1, "end": 0.9}})
    with pytest.warns(UserWarning, match=r"differs from the checkpoint's at step 2 \(temperature: "):
        make_trainer(max_steps=2 * N, callbacks=[other]).fit(changed, loader(items), ckpt_path=path)


def test_state_dict_round_trip_and_values_applied_on_train_start():
    module = make_module()
    cb = _resume_schedule()
    trainer = fake_trainer([cb], total=10, global_step=4)
    start_fit(cb, module, trainer)
    cb.on_train_start(trainer, module)
    expected_t = 1.0 + 3.0 * (1 + math.cos(math.pi * 4 / 9)) / 2
    assert module.losses["kd"].temperature == pytest.approx(expected_t, rel=1e-12)
    assert module.losses["kd"].weight == pytest.approx(0.9 + (0.1 - 0.9) * 4 / 9, rel=1e-12)
    state = cb.state_dict()
    assert state["total_steps"] == 10 and state["index"] == 4
    assert set(state["values"]) == {"temperature", "kd.weight", "task.weight"}
    assert all(isinstance(v, float) for v in state["values"].values())
    # A fresh callback loaded from that state applies the same values at the same step.
    fresh_module, fresh = make_module(), _resume_schedule()
    fresh.load_state_dict(copy.deepcopy(state))
    trainer = fake_trainer([fresh], total=10, global_step=4)
    start_fit(fresh, fresh_module, trainer)
    fresh.on_train_start(trainer, fresh_module)
    assert fresh.state_dict() == state
    assert fresh_module.losses["kd"].temperature == module.losses["kd"].temperature


# ------------------------------------------------------------------------------------------
# 5. Hydra configs
# ------------------------------------------------------------------------------------------
CONFIGS = sorted(p.stem for p in (CONFIG_DIR / "callbacks").glob("temperature_*.yaml"))


def test_the_common_shapes_ship_as_configs():
    assert {"temperature_constant", "temperature_linear", "temperature_cosine", "temperature_exponential",
            "temperature_step", "temperature_warmup_cosine"} <= set(CONFIGS)


@pytest.mark.parametrize("name", CONFIGS)
def test_temperature_configs_keep_default_callbacks_and_validate(name, tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="distill", overrides=[f"callbacks={name}", f"output_dir={tmp_path}"])
    trainer = _make_trainer(cfg, tmp_path)
    names = {type(c).__name__ for c in trainer.callbacks}
    assert {"ModelCheckpoint", "LearningRateMonitor", "TemperatureSchedule"} <= names
    cb = next(c for c in trainer.callbacks if isinstance(c, TemperatureSchedule))
    module = make_module()  # kd_task-like terms: kd, task
    start_fit(cb, module, fake_trainer([cb], total=cfg.trainer.max_steps))
    first, last = cb.values_at(0), cb.values_at(cfg.trainer.max_steps - 1)
    shape = name.removeprefix("temperature_")
    if shape == "constant":
        assert first["temperature"] == last["temperature"] == 1.0
    else:
        assert first["temperature"] == 4.0 and last["temperature"] == 1.0
    if shape == "warmup_cosine":
        assert first["kd.weight"] == 0.0 and cb.values_at(30)["kd.weight"] == 0.5


@pytest.mark.slow
def test_cli_run_with_a_temperature_config(tmp_path, monkeypatch):
    from lightning_distill.cli import run

    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "cache"))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="distill", overrides=[
            "experiment=tiny", "callbacks=temperature_cosine", "baseline=false", "export=false",
            f"output_dir={tmp_path / 'run'}"])
    run(cfg)
    rows = list(csv.DictReader(next((tmp_path / "run").rglob("metrics.csv")).open()))
    logged = [float(r["schedule/temperature"]) for r in rows if r.get("schedule/temperature")]
    assert logged == pytest.approx([1.0 + 3.0 * (1 + math.cos(math.pi * k / 3)) / 2 for k in range(4)])


def test_epoch_schedule_with_only_max_steps_asks_for_max_epochs():
    cb = TemperatureSchedule(temperature={"shape": "linear", "start": 4.0, "end": 1.0}, interval="epoch")
    with pytest.raises(ValueError, match=r"an epoch schedule.*give the trainer max_epochs \(max_steps=8") as info:
        make_trainer(max_steps=8, callbacks=[cb]).fit(make_module(), loader(lm_items(8)))
    assert "max_steps/max_epochs" not in str(info.value)
