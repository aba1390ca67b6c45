"""The divergence registry is the one table: functions, LogitKD, sparse dispatch, configs, docs."""

from __future__ import annotations

import inspect
import math
import re
from pathlib import Path

import pytest
import torch
import yaml

from lightning_distill.losses import LogitKD, LossTerm, TaskLoss, registry
from lightning_distill.losses import functional as LF
from lightning_distill.validation import check_choice, check_int, check_number, check_tensor

ROOT = Path(__file__).resolve().parents[1]


def test_every_entry_has_its_public_functions():
    assert set(LF.DIVERGENCES) == set(registry.REGISTRY)
    for name, entry in registry.REGISTRY.items():
        fn = getattr(LF, name)
        assert fn is LF.DIVERGENCES[name] is LF.divergence(name)
        assert fn.__name__ == name and entry.formula in fn.__doc__
        params = inspect.signature(fn).parameters
        assert list(params)[:2] == ["student_logits", "teacher_logits"]
        if entry.param is not None:
            assert params[entry.param.name].default == entry.param.default
        if entry.sparse:
            assert getattr(LF, f"sparse_{name}") is LF.sparse_divergence(name)
            assert list(inspect.signature(LF.sparse_divergence(name)).parameters)[:2] == ["student_logits", "targets"]
        else:
            assert not hasattr(LF, f"sparse_{name}")
            with pytest.raises(ValueError, match=f"{name} {entry.dense_only}"):
                LF.sparse_divergence(name)
        assert name in LF.__all__


def test_a_parameter_a_divergence_does_not_take_is_refused_by_name():
    s = t = torch.zeros(2, 3)
    with pytest.raises(TypeError, match="forward_kl.*beta"):
        LF.forward_kl(s, t, beta=0.5)
    with pytest.raises(TypeError, match="generalized_jsd.*alpha"):
        LF.generalized_jsd(s, t, alpha=0.5)
    with pytest.raises(ValueError, match="beta=0.5 was given, but divergence='tvd' takes neither"):
        LogitKD("tvd", beta=0.5)
    with pytest.raises(ValueError, match="alpha=0.2 was given.*takes beta"):
        LogitKD("generalized_jsd", alpha=0.2)


@pytest.mark.parametrize("name", ["generalized_jsd", "skew_forward_kl", "skew_reverse_kl"])
def test_logit_kd_checks_the_parameter_with_the_entry(name):
    p = registry.get(name).param
    assert LogitKD(name).params == {p.name: p.default}
    for bad in (p.high, p.high + 0.5, p.low - 0.5, math.nan, math.inf):
        with pytest.raises(ValueError, match=p.name) as info:
            LogitKD(name, **{p.name: bad})
        assert repr(float(bad)) in str(info.value) or str(float(bad)) in str(info.value)
    with pytest.raises(TypeError, match=f"{p.name} must be a number, got '0.5'"):
        LogitKD(name, **{p.name: "0.5"})
    # The same rule as the function: the error of the one is the error of the other.
    with pytest.raises(ValueError) as direct:
        getattr(LF, name)(torch.zeros(1, 2), torch.zeros(1, 2), **{p.name: p.high})
    with pytest.raises(ValueError) as term:
        LogitKD(name, **{p.name: p.high})
    assert str(direct.value) == str(term.value)


def test_terms_declare_what_the_module_asks():
    assert LogitKD().fused_role == "kd" and LogitKD().requires_teacher and not LogitKD().reads_labels
    assert LogitKD(temperature=2.0).fused_role is None
    assert LogitKD("reverse_kl").fused_role is None and LogitKD("reverse_kl").no_neg_inf
    assert LogitKD("logit_mse").no_neg_inf and not LogitKD("tvd").no_neg_inf
    assert TaskLoss().fused_role == "task" and TaskLoss().reads_labels and not TaskLoss().requires_teacher

    class Smoothed(TaskLoss):  # computes something else: never fused
        def forward(self, inputs):
            return super().forward(inputs) * 0.9

    assert Smoothed().fused_role is None and Smoothed().reads_labels
    assert LossTerm().fused_role is None and not LossTerm().no_neg_inf


def test_hydra_loss_configs_name_registry_entries_and_their_parameters():
    arguments = set(inspect.signature(LogitKD).parameters) | {"_target_"}
    seen = set()
    for path in sorted((ROOT / "conf" / "loss").glob("*.yaml")):
        for term in yaml.safe_load(path.read_text()).values():
            if not term["_target_"].endswith("LogitKD"):
                continue
            assert set(term) <= arguments, (path.name, set(term) - arguments)
            entry = registry.get(term.get("divergence", "forward_kl"))
            for key in ("beta", "alpha"):
                if term.get(key) is not None:  # a config may list both as null
                    assert entry.param is not None and entry.param.name == key, (path.name, key)
                    entry.param.check(term[key])
            LogitKD(**{k: v for k, v in term.items() if k != "_target_"})
            seen.add(entry.name)
    assert {"forward_kl", "generalized_jsd", "skew_forward_kl"} <= seen
    # Where kd_task.yaml lists the divergences in a comment, it lists every one.
    listed = re.search(r"divergence: forward_kl\s+#(.*)", (ROOT / "conf/loss/kd_task.yaml").read_text())
    if listed is not None:
        assert {n.strip() for n in listed.group(1).split("|")} == set(registry.REGISTRY) - {"forward_kl"}


def test_the_docs_table_lists_every_entry():
    doc = (ROOT / "docs" / "losses.md").read_text()
    rows = re.findall(r"^\| `(\w+)` \|", doc, flags=re.M)
    assert rows == list(registry.REGISTRY)


def test_validation_helpers_one_exception_type_per_fault():
    assert check_number("x", 2, low=0, low_open=True) == 2.0
    for kind in ("2", None, True, torch.tensor(1.0)):
        with pytest.raises(TypeError, match="x must be a number"):
            check_number("x", kind)
    for value in (0, -1.0, math.nan, math.inf):
        with pytest.raises(ValueError, match=f"x must be a finite number > 0, got {float(value)}"):
            check_number("x", value, low=0, low_open=True)
    with pytest.raises(ValueError, match=r"x must be a finite number in \[0, 1\], got 1.5. Use less."):
        check_number("x", 1.5, low=0, high=1, hint="Use less.")
    assert check_int("n", None, low=1, allow_none=True) is None
    with pytest.raises(TypeError, match="n must be an int or None, got 2.0"):
        check_int("n", 2.0, low=1, allow_none=True)
    with pytest.raises(ValueError, match="n must be >= 1 or None, got 0"):
        check_int("n", 0, low=1, allow_none=True)
    with pytest.raises(ValueError, match=r"mode must be one of \('a', 'b'\), got 'c'"):
        check_choice("mode", "c", ("a", "b"))
    with pytest.raises(TypeError, match="t must be a torch.Tensor, got list"):
        check_tensor("t", [1])


def test_distillation_module_arguments_follow_the_convention():
    from lightning_distill import DistillationModule

    student = torch.nn.Linear(2, 2)
    for kwargs, error, match in (
        ({"vocab_mismatch": "trim"}, ValueError, r"vocab_mismatch must be one of \('error', 'slice'\), got 'trim'"),
        ({"lr_scheduler_interval": "batch"}, ValueError, "lr_scheduler_interval must be one of"),
        ({"metrics_every_n_steps": 0}, ValueError, "metrics_every_n_steps must be >= 1 or None, got 0"),
        ({"metrics_every_n_steps": "5"}, TypeError, "metrics_every_n_steps must be an int or None, got '5'"),
        ({"ignore_index": -100.0}, TypeError, "ignore_index must be an int, got -100.0"),
        ({"losses": {}}, ValueError, "losses must be a non-empty mapping"),
        ({"losses": [TaskLoss()]}, TypeError, "losses must be a mapping.*got list"),
        ({"losses": {"kd": "x"}}, TypeError, "not a LossTerm"),
    ):
        with pytest.raises(error, match=match):
            DistillationModule(student, **kwargs)
    with pytest.raises(ValueError, match="weight must be a finite number >= 0, got -1.0"):
        TaskLoss(weight=-1)
    with pytest.raises(TypeError, match="temperature must be a number, got '2'"):
        LogitKD(temperature="2")
