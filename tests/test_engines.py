"""Lightning's sharded engines (docs/scale.md): the trainer configs, DeepSpeed missing, FSDP's
auto-wrap policy, a bf16 teacher next to an fp32 student, and FSDP2 on CPU (gloo, 2 ranks)."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import hydra
import hydra.errors
import lightning as L
import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from lightning_distill import DistillationModule
from lightning_distill.cli import CONFIG_DIR, _make_trainer
from lightning_distill.engines import (
    MissingPackageError,
    TransformerBlocks,
    check_strategy_available,
)
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import causal_lm_from_config, freeze

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "tests" / "scripts" / "engine_grads.py"
HAS_DEEPSPEED = __import__("importlib").util.find_spec("deepspeed") is not None


def _compose(*overrides: str):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose(config_name="distill", overrides=[*overrides, "output_dir=/tmp/ld-compose"])


def _llama(seed: int, hidden: int, dtype: str | None = None, layers: int = 1) -> torch.nn.Module:
    return causal_lm_from_config("llama", vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32, seed=seed, dtype=dtype)


# ---------------------------------------------------------------- configs


def test_fsdp_config_builds_lightnings_fsdp_strategy():
    cfg = _compose("trainer=fsdp")
    assert cfg.trainer.accelerator == "gpu" and cfg.trainer.precision == "bf16-mixed"
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert type(strategy) is FSDPStrategy
    assert strategy.sharding_strategy.name == "FULL_SHARD"
    assert strategy.kwargs["use_orig_params"] is True
    assert isinstance(strategy.kwargs["auto_wrap_policy"], TransformerBlocks)
    assert strategy._state_dict_type == "full"


@pytest.mark.parametrize("name", ["model_parallel", "fsdp2"])
def test_fsdp2_config_builds_model_parallel_strategy_and_a_trainer_on_cpu(name, tmp_path):
    cfg = _compose(f"trainer={name}", "trainer.accelerator=cpu", "trainer.devices=2")
    strategy = hydra.utils.instantiate(cfg.trainer.strategy)
    assert type(strategy) is ModelParallelStrategy
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 1)
    trainer = _make_trainer(cfg, tmp_path)
    assert isinstance(trainer.strategy, ModelParallelStrategy) and trainer.num_devices == 2


def test_fsdp_on_cpu_is_refused_by_lightning():
    """Why FSDP1 is GPU-only here: Lightning refuses it on CPU (and torch's FSDP1 needs an accelerator)."""
    cfg = _compose("trainer=fsdp", "trainer.accelerator=cpu", "trainer.devices=2")
    with pytest.raises(hydra.errors.InstantiationException) as info:
        hydra.utils.instantiate(cfg.trainer, logger=False)
    assert isinstance(info.value.__cause__, ValueError) and "requires a GPU accelerator" in str(info.value.__cause__)


@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed: the missing-package error cannot happen")
def test_deepspeed_config_without_deepspeed_is_one_clear_error():
    cfg = _compose("trainer=deepspeed_zero3")
    assert cfg.trainer.strategy.stage == 3
    with pytest.raises(MissingPackageError) as info:
        check_strategy_available(cfg.trainer)
    assert str(info.value) == (
        "trainer.strategy='lightning.pytorch.strategies.DeepSpeedStrategy' needs the 'deepspeed' package, which "
        "is not installed; run `pip install deepspeed` (on a CUDA machine), or pick another engine "
        "(trainer=fsdp, trainer=ddp).")
    check_strategy_available(_compose("trainer=fsdp").trainer)  # the others need nothing more
    check_strategy_available(_compose("trainer=ddp").trainer)


@pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs the deepspeed package (GPU machines)")
def test_deepspeed_config_builds_a_stage_3_strategy():
    strategy = hydra.utils.instantiate(_compose("trainer=deepspeed_zero3").trainer.strategy)
    assert isinstance(strategy, DeepSpeedStrategy) and strategy.config["zero_optimization"]["stage"] == 3


@pytest.mark.slow
@pytest.mark.skipif(HAS_DEEPSPEED, reason="deepspeed is installed")
def test_cli_with_deepspeed_missing_stops_before_any_work(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LIGHTNING_DISTILL_DEBUG", "HYDRA_FULL_ERROR")}
    env.update(LIGHTNING_DISTILL_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    result = subprocess.run([sys.executable, "-m", "lightning_distill", "experiment=tiny", "trainer=deepspeed_zero3",
                             f"output_dir={tmp_path / 'run'}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr
    assert "MissingPackageError: " in result.stderr and "`pip install deepspeed`" in result.stderr
    assert not (tmp_path / "cache" / "data").exists()  # nothing tokenized, no model built


# ---------------------------------------------------------------- FSDP auto-wrap policy


def test_transformer_blocks_policy_wraps_student_and_teacher_blocks_only():
    module = DistillationModule(_llama(0, 16, layers=2), freeze(_llama(1, 32, layers=3)))
    policy, wrapped = TransformerBlocks(), []

    def walk(m: torch.nn.Module, name: str) -> None:  # FSDP's order: a parent (recurse=True) before its children
        assert policy(m, recurse=True, nonwrapped_numel=0)
        for child_name, child in m.named_children():
            walk(child, f"{name}.{child_name}" if name else child_name)
        if m is not module and policy(m, recurse=False, nonwrapped_numel=0):
            wrapped.append(name)

    walk(module, "")
    assert wrapped == [f"student.model.layers.{i}" for i in range(2)] + [f"teacher.model.layers.{i}" for i in range(3)] + ["teacher"]
    assert TransformerBlocks(extra=["Linear"])(torch.nn.Linear(2, 2), recurse=False, nonwrapped_numel=6)
    with pytest.raises(TypeError, match=r"extra must be a list of block class names, e.g. \['GPT2Block'\], got 'GPT2Block'"):
        TransformerBlocks(extra="GPT2Block")


# ---------------------------------------------------------------- teacher in lower precision


def _items() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(8):
        ids = torch.randint(0, 64, (12,), generator=g)
        labels = ids.clone()
        labels[: i + 1] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


def _fit(teacher_dtype: str | None) -> tuple[list[float], DistillationModule, L.Trainer]:
    torch.manual_seed(0)
    teacher = freeze(_llama(1, 32, dtype=teacher_dtype))
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)  # a peaked teacher, so KD has signal
    module = DistillationModule(_llama(0, 16), teacher,
                                {"kd": LogitKD(temperature=2.0, weight=0.5), "task": TaskLoss(weight=0.5)})
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(trainer.callback_metrics["train/loss"]))

    trainer = L.Trainer(accelerator="cpu", max_steps=4, logger=False, enable_checkpointing=False, callbacks=[Record()],
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=0)
    trainer.fit(module, DataLoader(_items(), batch_size=4))
    return losses, module, trainer


@pytest.mark.slow
def test_bf16_teacher_with_fp32_student_trains_close_to_fp32_teacher():
    torch.set_num_threads(1)
    fp32, _, _ = _fit(None)
    bf16, module, trainer = _fit("bfloat16")
    assert next(module.teacher.parameters()).dtype == torch.bfloat16
    assert next(module.student.parameters()).dtype == torch.float32
    assert all(torch.isfinite(torch.tensor(bf16))) and len(bf16) == 4
    # bf16 keeps ~3 significant digits of the teacher's logits: the losses agree to about 1%.
    torch.testing.assert_close(torch.tensor(bf16), torch.tensor(fp32), rtol=2e-2, atol=0.0)
    assert bf16 != fp32  # the teacher really ran in bf16
    teacher = list(module.teacher.parameters())
    assert all(not p.requires_grad and p.grad is None for p in teacher)
    assert not any(p in trainer.optimizers[0].state for p in teacher)
    assert len(trainer.optimizers[0].state) == len(list(module.student.parameters()))


def test_bf16_teacher_logits_reach_the_losses_as_float32():
    teacher = freeze(_llama(1, 32, dtype="bfloat16"))
    module = DistillationModule(_llama(0, 16), teacher)
    out = module._shared_step(_items()[0] | {k: v[None] for k, v in _items()[0].items()}, "val")
    assert out["loss_inputs"].teacher.logits.dtype == torch.float32
    assert out["targets"].logits.dtype == torch.bfloat16  # as the teacher gave them
    assert torch.isfinite(out["weighted"])


# ---------------------------------------------------------------- FSDP2 on CPU (gloo)


def _fsdp2(tmp_path: Path, *pairs: tuple[int, int]) -> list[tuple[dict[str, torch.Tensor], dict]]:
    """FSDP2 on two CPU ranks, one launch: a fit per (batch size, accumulation) pair."""
    out = tmp_path / "fsdp2"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), "fsdp2", "2", *(f"{b}:{a}" for b, a in pairs),
                             "cpu"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    folders = [out / f"b{b}-a{a}" for b, a in pairs]
    return [(load_file(f / "grads.safetensors"), json.loads((f / "report.json").read_text())) for f in folders]


@pytest.mark.slow
def test_fsdp2_two_ranks_shard_both_models_and_step_with_the_single_process_gradient(tmp_path, load_script):
    load_script("engine_grads").main(tmp_path / "single", "single", 1, 8, "cpu")  # the reference, in this process
    single = load_file(tmp_path / "single" / "grads.safetensors")
    single_report = json.loads((tmp_path / "single" / "report.json").read_text())
    (sharded, report), (accumulated, accumulated_report) = _fsdp2(tmp_path, (4, 1), (2, 2))
    assert single.keys() == sharded.keys() == accumulated.keys() and len(single) == 12
    assert any(g.abs().max() > 1e-4 for g in single.values())
    for key in single:  # the step-wide token mean over ranks and micro-batches (StepMean on DTensor shards)
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(accumulated[key], single[key], rtol=1e-5, atol=1e-6)
    assert single_report["world_size"] == 1
    for r in (report, accumulated_report):  # the second fit reuses the launch: still two ranks, sharded
        assert r["world_size"] == 2
        assert r["student_sharded"] == 12  # every student parameter a DTensor shard
        assert r["teacher_sharded"] == r["teacher_params"] == 12  # the teacher wrapped too, kept sharded
    for r in (single_report, report, accumulated_report):
        assert r["teacher_trainable"] == r["teacher_grads"] == r["teacher_in_optimizer"] == 0
        assert r["teacher_optimizer_state"] == 0 and r["student_optimizer_state"] == 12
        assert r["teacher_training"] is False
        assert r["checkpoint_keys_match"] and r["whole_student_matches"]  # keys name the plain student


def test_the_torchrun_and_srun_commands_in_the_docs_compose():
    text = re.sub(r"\\\n\s*", " ", (REPO / "docs" / "scale.md").read_text())
    commands = re.findall(r"^(?:torchrun|srun) .*-m lightning_distill (.*)$", text, flags=re.M)
    assert len(commands) == 2
    env = {"SLURM_NNODES": "2", "SLURM_NTASKS_PER_NODE": "8", "SLURM_JOB_ID": "7"}
    for command in commands:
        overrides = [re.sub(r"\$(\w+)", lambda m: env[m.group(1)], w) for w in shlex.split(command)]
        cfg = _compose(*[o for o in overrides if not o.startswith("hydra.")])
        assert (cfg.trainer.num_nodes, cfg.trainer.devices) == (2, 8)
        assert cfg.teacher.dtype == "bfloat16" and "FSDPStrategy" in cfg.trainer.strategy._target_


@pytest.mark.slow
def test_cli_fits_tests_and_exports_under_fsdp2_on_two_cpu_ranks(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("LIGHTNING_DISTILL_DEBUG", "HYDRA_FULL_ERROR")}
    env.update(LIGHTNING_DISTILL_CACHE=str(tmp_path / "cache"), OMP_NUM_THREADS="1", PYTHONWARNINGS="ignore",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    run = tmp_path / "run"
    result = subprocess.run([sys.executable, "-m", "lightning_distill", "experiment=tiny", "trainer=model_parallel",
                             "trainer.accelerator=cpu", "trainer.max_steps=4", "trainer.val_check_interval=2",
                             "trainer.limit_val_batches=1", "baseline=false", f"output_dir={run}"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    card = json.loads((run / "student" / "distillation_card.json").read_text())
    exported = load_file(run / "student" / "model.safetensors")  # whole tensors, not one rank's shards
    # described as the plain models (not FSDP's subclasses); the teacher fingerprinted before sharding
    assert card["teacher"]["class"] == card["student"]["class"] == "transformers.models.llama.modeling_llama.LlamaForCausalLM"
    assert card["teacher"]["weights_sha256"] and card["student"]["num_parameters"] == sum(
        t.numel() for t in exported.values())
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(run / "student")
    assert exported["model.embed_tokens.weight"].shape == (config.vocab_size, config.hidden_size)
    assert all(torch.isfinite(t).all() for t in exported.values())
