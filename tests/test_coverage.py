"""``CoverageSlices``: per-slice numbers against plain-torch values, retention, gap alarms, reports.

Expected values are computed here with ``F.log_softmax`` / ``F.cross_entropy`` / ``argmax`` on the
models' own logits, never with the library's loss functions.
"""

from __future__ import annotations

import functools
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_distill import DistillationModule
from lightning_distill.callbacks import CoverageGapError, CoverageSlices
from lightning_distill.callbacks.coverage import (
    coverage_rows,
    format_coverage_table,
    plot_retention,
    retention,
)
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import causal_lm_from_config

VOCAB, SEQ = 64, 12
SLICES = ["a", "b", "a", "b", "b", "a", "b", "b"]
BIN = Path(sys.executable).parent


def tiny_llama(seed: int, hidden: int = 16) -> nn.Module:
    return causal_lm_from_config("llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32, seed=seed)


class Items(Dataset):
    def __init__(self, items):
        self.items = items

    def __len__(self):
        return len(self.items)

    def __getitem__(self, i):
        return self.items[i]


def lm_items() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, name in enumerate(SLICES):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: i % 3] = -100  # uneven valid counts
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "slice": name})
    return out


def make_module() -> DistillationModule:
    teacher = tiny_llama(1, 32)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(10)
    return DistillationModule(tiny_llama(0), teacher,
                              {"kd": LogitKD(temperature=2.0, weight=0.5), "task": TaskLoss(weight=0.5)},
                              optimizer=functools.partial(torch.optim.SGD, lr=0.0))


def trainer(tmp_path: Path, callbacks, **kwargs) -> L.Trainer:
    defaults = dict(accelerator="cpu", devices=1, logger=False, enable_progress_bar=False,
                    enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                    default_root_dir=str(tmp_path))
    return L.Trainer(callbacks=callbacks, **(defaults | kwargs))


def expected_lm(module: DistillationModule, items: list[dict]) -> dict[str, dict[str, float]]:
    """Per-slice sums by hand: shifted labels, NLL, top-1 agreement, KL(t || s) at T = 1."""
    sums: dict[str, dict[str, float]] = {}
    with torch.no_grad():
        for item in items:
            ids = item["input_ids"][None]
            s = module.student(input_ids=ids).logits[0, :-1].double()
            t = module.teacher(input_ids=ids).logits[0, :-1].double()
            y = item["labels"][1:]
            m = y != -100
            log_s, log_t = F.log_softmax(s, -1), F.log_softmax(t, -1)
            e = sums.setdefault(item["slice"], dict.fromkeys(("tokens", "s_nll", "t_nll", "agree", "kl"), 0.0))
            e["tokens"] += float(m.sum())
            e["s_nll"] += float(-log_s[m].gather(-1, y[m][:, None]).sum())
            e["t_nll"] += float(-log_t[m].gather(-1, y[m][:, None]).sum())
            e["agree"] += float((s.argmax(-1) == t.argmax(-1))[m].sum())
            e["kl"] += float((log_t.exp() * (log_t - log_s)).sum(-1)[m].sum())
    return sums


# ------------------------------------------------------------------------------ pure functions
def test_retention_definitions_for_both_metric_kinds():
    # perplexity: teacher ppl / student ppl = exp((teacher_nll - student_nll) / tokens)
    r = retention("perplexity", tokens=10, student_nll=30.0, teacher_nll=20.0)
    assert r == pytest.approx(math.exp(20 / 10) / math.exp(30 / 10))
    assert retention("perplexity", tokens=10, student_nll=20.0, teacher_nll=20.0) == pytest.approx(1.0)
    # accuracy: student accuracy / teacher accuracy
    assert retention("accuracy", tokens=10, correct=3, teacher_correct=6) == pytest.approx(0.5)
    assert retention("accuracy", tokens=10, correct=6, teacher_correct=6) == pytest.approx(1.0)
    # both: smaller is worse, 1.0 = as good as the teacher; undefined cases are None
    assert retention("perplexity", tokens=0, student_nll=0.0, teacher_nll=0.0) is None
    assert retention("perplexity", tokens=5, student_nll=1.0, teacher_nll=None) is None
    assert retention("accuracy", tokens=5, correct=1, teacher_correct=0) is None
    with pytest.raises(ValueError, match="'bleu'"):
        retention("bleu", tokens=1)


def _sums(tokens, s_nll, t_nll):
    return {"samples": 1, "tokens": tokens, "student_nll": s_nll, "teacher_nll": t_nll, "agreement": 0.0,
            "kl": 0.0, "correct": 0.0, "teacher_correct": 0.0}


def test_gap_rules_absolute_relative_and_distance_to_best():
    # retentions: a = exp(-0.5) = 0.607, b = exp(-1.5) = 0.223
    per_slice = {"a": _sums(10, 15.0, 10.0), "b": _sums(10, 25.0, 10.0)}
    train = {"a": {"samples": 3, "tokens": 30}}
    rows = coverage_rows(per_slice, train, min_retention=0.5)
    assert [r["gap"] for r in rows] == [False, True] and "min_retention 0.5" in rows[1]["gap_reason"]
    assert rows[0]["train_tokens"] == 30 and rows[1]["train_tokens"] == 0
    rows = coverage_rows(per_slice, min_relative_retention=0.5)  # 0.223 < 0.5 * 0.607
    assert [r["gap"] for r in rows] == [False, True] and "x best" in rows[1]["gap_reason"]
    assert not any(r["gap"] for r in coverage_rows(per_slice, min_relative_retention=0.3))
    rows = coverage_rows(per_slice, max_gap_to_best=0.3)
    assert [r["gap"] for r in rows] == [False, True]
    assert not any(r["gap"] for r in coverage_rows(per_slice, max_gap_to_best=0.4))
    table = format_coverage_table(coverage_rows(per_slice, train, min_retention=0.5))
    assert "train tokens" in table and "GAP" in table.splitlines()[3] and "GAP" not in table.splitlines()[2]


@pytest.mark.parametrize("kwargs,message", [
    ({"metric": "bleu"}, "'bleu'"),
    ({"on_gap": "explode"}, "'explode'"),
    ({"min_retention": -1}, "-1"),
    ({"min_relative_retention": 1.5}, "1.5"),
    ({"slices": ["a", "a"]}, "'a', 'a'"),
    ({"slices": []}, r"\[\]"),
    ({"slice_key": ""}, "''"),
    ({"dataloader_names": []}, "dataloader_names"),
    ({"slices": ["a"], "dataloader_names": ["z"]}, "'z'"),
])
def test_bad_arguments_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CoverageSlices(**kwargs)


@pytest.mark.parametrize("kwargs,message", [
    ({"max_gap_to_best": "x"}, "'x'"),
    ({"slice_fn": 3}, "3"),
    ({"count_training": 1}, "count_training"),
])
def test_arguments_of_the_wrong_kind_are_type_errors(kwargs, message):
    with pytest.raises(TypeError, match=message):
        CoverageSlices(**kwargs)


def test_png_is_a_valid_image(tmp_path):
    rows = coverage_rows({"a": _sums(10, 15.0, 10.0), "b": _sums(10, 25.0, 10.0)}, min_retention=0.5)
    path = plot_retention(rows, tmp_path / "c.png", title="t", thresholds={"min_retention": 0.5})
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    import matplotlib.image

    image = matplotlib.image.imread(path)
    assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 100


# ------------------------------------------------------------------------------ with a Trainer
def test_per_slice_numbers_match_hand_computed_values(tmp_path):
    module, items = make_module(), lm_items()
    cb = CoverageSlices(slices=["a", "b"], min_retention=None, min_relative_retention=None)
    trainer(tmp_path, [cb]).test(module, DataLoader(Items(items), batch_size=3), verbose=False)
    expected = expected_lm(module, items)
    rows = {r["slice"]: r for r in cb.last_rows}
    assert set(rows) == {"a", "b"}
    for name, e in expected.items():
        r = rows[name]
        assert r["tokens"] == e["tokens"] and r["samples"] == SLICES.count(name)
        assert r["student_metric"] == pytest.approx(math.exp(e["s_nll"] / e["tokens"]), rel=1e-5)
        assert r["teacher_metric"] == pytest.approx(math.exp(e["t_nll"] / e["tokens"]), rel=1e-5)
        assert r["retention"] == pytest.approx(math.exp((e["t_nll"] - e["s_nll"]) / e["tokens"]), rel=1e-5)
        assert r["agreement"] == pytest.approx(e["agree"] / e["tokens"], abs=1e-9)
        assert r["kl"] == pytest.approx(e["kl"] / e["tokens"], rel=1e-4)
    report = json.loads((tmp_path / "coverage.json").read_text())
    assert report["stage"] == "test" and [s["slice"] for s in report["slices"]] == ["a", "b"]
    assert (tmp_path / "coverage.png").read_bytes()[:4] == b"\x89PNG"
    assert "| a " in (tmp_path / "coverage.md").read_text()


def test_unknown_slice_names_it_and_the_known_ones(tmp_path):
    cb = CoverageSlices(slices=["a"])
    with pytest.raises(ValueError, match=r"unknown slice\(s\) \['b'\].*\['a'\]"):
        trainer(tmp_path, [cb]).test(make_module(), DataLoader(Items(lm_items()), batch_size=4), verbose=False)


def test_slice_fn_instead_of_a_key(tmp_path):
    items = [{k: v for k, v in item.items() if k != "slice"} | {"group": int(item["slice"] == "b")}
             for item in lm_items()]
    cb = CoverageSlices(slices=["zero", "one"], slice_fn=lambda batch: ["one" if g else "zero" for g in batch["group"]],
                        min_relative_retention=None)
    trainer(tmp_path, [cb]).test(make_module(), DataLoader(Items(items), batch_size=4), verbose=False)
    assert {r["slice"]: r["samples"] for r in cb.last_rows} == {"zero": 3, "one": 5}


@pytest.mark.slow
def test_training_coverage_counts_label_positions_and_survives_state_dict(tmp_path):
    items = lm_items()
    cb = CoverageSlices(min_relative_retention=None, slices=["a", "b"])
    t = trainer(tmp_path, [cb], max_steps=2, limit_val_batches=1, val_check_interval=2)
    data = DataLoader(Items(items), batch_size=4)
    t.fit(make_module(), data, data)
    expected = {n: sum(int((it["labels"][1:] != -100).sum()) for it in items if it["slice"] == n) for n in "ab"}
    assert {r["slice"]: r["train_tokens"] for r in cb.last_rows} == expected
    assert cb.last_stage == "val"
    state = cb.state_dict()
    json.dumps(state)  # plain values only
    restored = CoverageSlices(slices=["a", "b"])
    restored.load_state_dict(state)
    assert {n: v["tokens"] for n, v in restored.train_coverage().items()} == expected


class Classifier(nn.Module):
    def __init__(self, seed: int, scale: float = 1.0):
        super().__init__()
        torch.manual_seed(seed)
        self.lin = nn.Linear(6, 4)
        with torch.no_grad():
            self.lin.weight.mul_(scale)

    def forward(self, x):
        return self.lin(x)


def test_accuracy_retention_with_named_dataloaders(tmp_path):
    g = torch.Generator().manual_seed(3)
    sets = {name: (torch.randn(12, 6, generator=g), torch.randint(0, 4, (12,), generator=g)) for name in ("x", "y")}
    student, teacher = Classifier(0), Classifier(1, 5.0)
    module = DistillationModule(student, teacher, {"kd": LogitKD(weight=1.0)},
                                optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    cb = CoverageSlices(dataloader_names=["x", "y"], metric="accuracy", min_relative_retention=None)
    loaders = [DataLoader(TensorDataset(*sets[n]), batch_size=5) for n in ("x", "y")]
    trainer(tmp_path, [cb]).validate(module, loaders, verbose=False)
    rows = {r["slice"]: r for r in cb.last_rows}
    with torch.no_grad():
        for name, (x, y) in sets.items():
            s_acc = float((student(x).argmax(-1) == y).float().mean())
            t_acc = float((teacher(x).argmax(-1) == y).float().mean())
            assert rows[name]["tokens"] == 12
            assert rows[name]["student_metric"] == pytest.approx(s_acc)
            assert rows[name]["teacher_metric"] == pytest.approx(t_acc)
            assert rows[name]["retention"] == pytest.approx(s_acc / t_acc if t_acc else None)


def test_gap_warns_then_errors_after_writing_reports(tmp_path):
    data = DataLoader(Items(lm_items()), batch_size=4)
    warn = CoverageSlices(slices=["a", "b"], min_retention=2.0, min_relative_retention=None)  # never 2x the teacher
    with pytest.warns(UserWarning, match="coverage gap on slice 'a'"):
        trainer(tmp_path / "warn", [warn]).test(make_module(), data, verbose=False)
    assert [r["gap"] for r in warn.last_rows] == [True, True]
    error = CoverageSlices(slices=["a", "b"], min_retention=2.0, min_relative_retention=None, on_gap="error")
    with pytest.raises(CoverageGapError, match=r"\['a', 'b'\]"):
        trainer(tmp_path / "err", [error]).test(make_module(), data, verbose=False)
    for name in ("coverage.json", "coverage.md", "coverage.png"):
        assert (tmp_path / "err" / name).is_file()
    assert json.loads((tmp_path / "err" / "coverage.json").read_text())["gaps"] == ["a", "b"]
    assert "GAP" in (tmp_path / "err" / "coverage.md").read_text()


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_cli_error_mode_exits_non_zero_after_saving_everything(tmp_path):
    out = tmp_path / "run"
    result = subprocess.run([str(BIN / "lightning-distill"), "experiment=tiny", "baseline=false", "callbacks=coverage",
                             "callbacks.coverage.on_gap=error", "callbacks.coverage.min_retention=2.0",
                             f"output_dir={out}"], cwd=tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                            timeout=300)
    assert result.returncode != 0
    assert "CoverageGapError" in result.stderr + result.stdout
    assert "GAP" in result.stdout  # the table is printed before the run fails
    for name in ("coverage.json", "coverage.md", "coverage.png", "report.json"):
        assert (out / name).is_file(), name
    assert (out / "student" / "model.safetensors").is_file()
    card = json.loads((out / "student" / "distillation_card.json").read_text())
    assert {s["slice"] for s in card["data"]["slices"] if s["gap"]} == {"prose", "code"}


@pytest.mark.slow
def test_two_ranks_give_the_same_per_slice_numbers_as_one(tmp_path, load_script):
    script = Path(__file__).resolve().parent / "scripts" / "ddp_coverage.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    results = {}
    for devices in (1, 2):
        out = tmp_path / f"cov{devices}.json"
        if devices == 1:  # the reference: one process, this one
            load_script("ddp_coverage").main(str(out), 1)
        else:
            run = subprocess.run([sys.executable, str(script), str(out), str(devices)], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stderr[-4000:]
        results[devices] = json.loads(out.read_text())
    one, two = results[1]["sums"], results[2]["sums"]
    assert one.keys() == two.keys() == {"a", "b"}
    assert one["a"]["samples"] == 3 and one["b"]["samples"] == 5
    for name in one:
        for field, value in one[name].items():
            assert two[name][field] == pytest.approx(value, rel=1e-6, abs=1e-6), (name, field)
    for r1, r2 in zip(results[1]["rows"], results[2]["rows"], strict=True):
        assert r2["retention"] == pytest.approx(r1["retention"], rel=1e-6)


def test_named_eval_loaders_with_other_slice_names_in_training_batches(tmp_path):
    # Training batches name slices 'a'/'b'; the eval loaders are named 'x'/'y'.
    data = DataLoader(Items(lm_items()), batch_size=4)
    cb = CoverageSlices(dataloader_names=["x", "y"], min_retention=None, min_relative_retention=None)
    with pytest.warns(UserWarning, match=r"training batches name slice\(s\) \['a', 'b'\]"):
        trainer(tmp_path, [cb], max_steps=2, limit_val_batches=1).fit(make_module(), data, [data, data])
    assert [r["slice"] for r in cb.last_rows] == ["x", "y"]


def test_unknown_slice_in_a_training_batch_is_named_as_such(tmp_path):
    data = DataLoader(Items(lm_items()), batch_size=4)
    cb = CoverageSlices(slices=["a"], min_retention=None, min_relative_retention=None)
    with pytest.raises(ValueError, match=r"unknown slice\(s\) \['b'\] in a training batch"):
        trainer(tmp_path, [cb], max_steps=2).fit(make_module(), data)


def test_one_forward_per_eval_batch_and_a_single_slice(tmp_path):
    """The step's own forward feeds the callback: each model runs once per batch, as without it."""
    calls = {"student": 0, "teacher": 0}

    def counted(module: DistillationModule) -> DistillationModule:
        for name in calls:
            getattr(module, name).register_forward_hook(lambda *_, n=name: calls.__setitem__(n, calls[n] + 1))
        return module

    items = [{**item, "slice": "all"} for item in lm_items()]
    data = DataLoader(Items(items), batch_size=3)  # 3 batches
    trainer(tmp_path / "plain", []).test(counted(make_module()), data, verbose=False)
    assert calls == {"student": 3, "teacher": 3}
    calls.update(student=0, teacher=0)
    cb = CoverageSlices(slices=["all"], min_retention=None)  # one slice: a 1-element state
    module = counted(make_module())
    trainer(tmp_path, [cb]).test(module, data, verbose=False)
    assert calls == {"student": 3, "teacher": 3}
    (row,) = cb.last_rows
    e = expected_lm(module, items)["all"]
    assert row["samples"] == len(items) and row["tokens"] == e["tokens"]
    assert row["retention"] == pytest.approx(math.exp((e["t_nll"] - e["s_nll"]) / e["tokens"]), rel=1e-5)
