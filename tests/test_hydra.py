"""Every config in conf/ composes and instantiates; overrides reach the objects."""

from __future__ import annotations

import inspect
from pathlib import Path

import hydra
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from lightning_distill.cli import CONFIG_DIR, _build_losses, _instantiate, _make_trainer
from lightning_distill.losses import LogitKD, LossTerm, TaskLoss

GROUPS = ["data", "teacher", "student", "loss", "trainer", "callbacks", "logger", "experiment"]


def _options(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml"))


def _compose(*overrides: str, tmp_path: Path | None = None):
    extra = [f"output_dir={tmp_path}"] if tmp_path is not None else ["output_dir=/tmp/ld-compose"]
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="distill", overrides=[*overrides, *extra])


def test_config_dir_has_every_group():
    assert (CONFIG_DIR / "distill.yaml").is_file()
    for group in GROUPS:
        assert _options(group), f"conf/{group}/ is empty"


@pytest.mark.parametrize("group,name", [(g, n) for g in GROUPS for n in _options(g)])
def test_every_config_composes_and_resolves(group, name):
    overrides = [f"{group}={name}"]
    if group in ("teacher", "student") and name in ("hf_pretrained", "hf_encoder_pretrained"):
        overrides.append(f"{group}.path=/nonexistent/model")
    if group == "teacher" and name == "served":  # a server: its URL and model name are the user's
        overrides += ["teacher.base_url=http://127.0.0.1:8000/v1", "teacher.model=m"]
    if group == "data" and name not in ("demo", "cross_tokenizer", "demo_sentences"):  # user data: a source, and a size, no tokenizer
        source = {"hf_dataset": "dataset", "teacher_text": "records"}.get(name, "files")
        overrides += [f"data.{source}=/x", "data.tokenizer=/x", "data.vocab_size=320"]
    cfg = _compose(*overrides)
    # Every interpolation resolves (output_dir is given, so no Hydra runtime is needed).
    OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)


@pytest.mark.parametrize("group", ["teacher", "student"])
@pytest.mark.parametrize("name", ["demo", "hf_config", "hf_pretrained"])
def test_model_configs_target_real_callables(group, name):
    cfg = _compose(f"{group}={name}", *([f"{group}.path=/x"] if name == "hf_pretrained" else []))
    node = cfg[group]
    target = hydra.utils.get_object(node._target_)
    kwargs = {k: v for k, v in node.items() if not k.startswith("_")}
    if "datamodule" in inspect.signature(target).parameters:
        kwargs["datamodule"] = None  # the CLI passes the prepared datamodule
    inspect.signature(target).bind(**kwargs)


def test_teacher_none_means_no_teacher():
    assert _instantiate(_compose("teacher=none").teacher) is None


@pytest.mark.parametrize("name", ["hf_config", "demo"])
def test_student_configs_instantiate(name):
    model = _instantiate(_compose(f"student={name}").student)
    assert model.config.vocab_size == 2048
    assert sum(p.numel() for p in model.parameters()) > 0


def test_hf_config_teacher_instantiates():
    model = _instantiate(_compose("teacher=hf_config", "data.vocab_size=128").teacher)
    assert model.get_output_embeddings().weight.shape[0] == 128


@pytest.mark.parametrize("name", _options("loss"))
def test_every_loss_config_instantiates(name):
    losses = _build_losses(_compose(f"loss={name}").loss)
    assert losses and all(isinstance(t, LossTerm) for t in losses.values())
    assert sum(t.weight for t in losses.values()) > 0


@pytest.mark.parametrize("name", _options("trainer"))
def test_every_trainer_config_instantiates(name, tmp_path):
    if name in ("gpu", "fsdp", "deepspeed_zero3"):
        pytest.skip("needs a GPU (the strategy objects of fsdp/deepspeed_zero3: tests/test_engines.py)")
    if name == "ddp":
        cfg = _compose(f"trainer={name}", "trainer.accelerator=cpu", "trainer.devices=2", tmp_path=tmp_path)
    else:
        cfg = _compose(f"trainer={name}", tmp_path=tmp_path)
    trainer = _make_trainer(cfg, tmp_path)
    assert isinstance(trainer, L.Trainer)


@pytest.mark.parametrize("callbacks", _options("callbacks"))
@pytest.mark.parametrize("logger", _options("logger"))
def test_callbacks_and_loggers_instantiate(callbacks, logger, tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    cfg = _compose(f"callbacks={callbacks}", f"logger={logger}", "trainer=smoke", tmp_path=tmp_path)
    trainer = _make_trainer(cfg, tmp_path)
    names = {type(c).__name__ for c in trainer.callbacks}
    if callbacks == "default":
        assert "ModelCheckpoint" in names
        # The learning-rate monitor needs a logger; with logger=none it is dropped, not a crash.
        assert ("LearningRateMonitor" in names) == (logger != "none")
    if logger == "none":
        assert trainer.logger is None
    else:
        assert type(trainer.logger).__name__.lower().startswith(logger)


def test_data_config_instantiates():
    dm = _instantiate(_compose().data)
    assert type(dm).__name__ == "SlicedTextDataModule"
    assert dm.vocab_size == 2048


def test_overrides_reach_the_objects(tmp_path):
    cfg = _compose("loss.kd.temperature=4", "loss.kd.divergence=reverse_kl", "loss.task.weight=0.25",
                   "trainer=smoke", "trainer.max_steps=7", "optimizer.lr=0.123", tmp_path=tmp_path)
    losses = _build_losses(cfg.loss)
    assert isinstance(losses["kd"], LogitKD) and isinstance(losses["task"], TaskLoss)
    assert losses["kd"].temperature == 4.0 and losses["kd"].divergence == "reverse_kl"
    assert losses["task"].weight == 0.25
    assert _make_trainer(cfg, tmp_path).max_steps == 7
    opt = hydra.utils.instantiate(cfg.optimizer)([torch.nn.Parameter(torch.zeros(1))])
    assert opt.param_groups[0]["lr"] == 0.123


def test_student_size_override_reaches_model():
    model = _instantiate(_compose("student=hf_config", "student.hidden_size=48", "student.num_attention_heads=4",
                                  "student.num_key_value_heads=4").student)
    assert model.config.hidden_size == 48


def test_experiment_tiny_overrides_defaults():
    cfg = _compose("experiment=tiny")
    assert cfg.teacher._target_.endswith("causal_lm_from_config")
    assert cfg.data.vocab_size == 320 and cfg.trainer.max_steps == 4


def test_bad_loss_value_fails_with_clear_error():
    cfg = _compose("loss.kd.temperature=0")
    with pytest.raises(Exception, match="temperature must be a finite number > 0"):
        _build_losses(cfg.loss)


def test_hf_pretrained_loads_a_local_model(tmp_path):
    """teacher=hf_pretrained with a local directory: from_pretrained, safetensors, no remote code."""
    source = _instantiate(_compose("teacher=hf_config", "data.vocab_size=96").teacher)
    source.save_pretrained(tmp_path / "teacher")
    assert (tmp_path / "teacher" / "model.safetensors").is_file()
    cfg = _compose("teacher=hf_pretrained", f"teacher.path={tmp_path / 'teacher'}", "teacher.local_files_only=true")
    assert cfg.teacher.trust_remote_code is False
    loaded = _instantiate(cfg.teacher)
    for (name, a), (_, b) in zip(source.state_dict().items(), loaded.state_dict().items()):
        assert torch.equal(a, b), name


@pytest.mark.parametrize("name, kind", [("teacher_cache_sampled", "sampled"), ("teacher_cache_topk", "topk"),
                                        ("teacher_cache_dense", "dense")])
def test_teacher_cache_configs_instantiate_with_the_defaults(name, kind):
    from lightning_distill.callbacks import CoverageSlices, TeacherCache

    cfg = _compose(f"callbacks={name}", "callbacks.teacher_cache.dirpath=/tmp/ld-cache-x")
    callbacks = {k: hydra.utils.instantiate(v) for k, v in cfg.callbacks.items()}
    assert isinstance(callbacks["teacher_cache"], TeacherCache) and callbacks["teacher_cache"].kind == kind
    assert isinstance(callbacks["coverage"], CoverageSlices)  # the defaults stay


def test_teacher_cache_composes_with_a_schedule_and_the_cached_demo():
    cfg = _compose("callbacks=[temperature_cosine,teacher_cache_topk]", "callbacks.teacher_cache.k=64")
    assert {"temperature", "teacher_cache", "coverage"} <= set(cfg.callbacks)
    assert cfg.callbacks.teacher_cache.k == 64
    demo = _compose("experiment=demo_cached")
    assert demo.callbacks.teacher_cache.kind == "sampled" and demo.callbacks.teacher_cache.num_samples == 50
    other = _compose("experiment=demo_cached", "callbacks=teacher_cache_topk")
    assert other.callbacks.teacher_cache.kind == "topk"
