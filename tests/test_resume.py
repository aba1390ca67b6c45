"""Resuming exactly after a real interruption: the process is killed with SIGKILL mid-epoch.

The run with the kill and the uninterrupted run must agree on everything a user reads: the
per-step ``train/loss`` and schedule values in the CSV logs, the teacher cache's reads per step,
the training coverage per slice and the final per-slice metrics (docs/resume.md).
"""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
SCRIPTS = Path(__file__).resolve().parent / "scripts"

# 24 training samples in batches of 4: 6 steps per epoch; 8 steps cross into a second epoch.
# A checkpoint every 3 steps; the kill comes at the start of step 6 (steps 4 and 5 trained, not saved).
COMMON = [
    "experiment=tiny",
    "baseline=false",
    "export=false",
    "trainer.max_steps=8",
    "trainer.deterministic=true",
    "data.max_train_samples=24",
    "~callbacks.lr_monitor",
    "callbacks.coverage.min_retention=null",
    "callbacks.checkpoint.every_n_train_steps=3",
    "callbacks.checkpoint.save_top_k=-1",
    "callbacks.temperature.weights={kd:{shape:linear,start:0.2,end:0.8}}",
    "+callbacks.probe._target_=resume_probe.ResumeProbe",
]
KILL_AT = 5
SETUPS = {
    # The teacher's targets read from a teacher cache (top-k) by sample id.
    "cached": [
        "callbacks=[default,teacher_cache,temperature_linear]",
        "trainer.val_check_interval=4",
        "callbacks.teacher_cache.progress=false",
        "callbacks.teacher_cache.kind=topk",
        "callbacks.teacher_cache.k=8",
    ],
    # A live teacher, a student with dropout, and validation right after the checkpoint's step:
    # the random draws continue where they stopped, whatever validation drew.
    "live_dropout": [
        "callbacks=[default,temperature_linear]",
        "+student.attention_dropout=0.3",
        "trainer.val_check_interval=3",
    ],
}


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **os.environ,
        "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache"),
        "TOKENIZERS_PARALLELISM": "false",
        "WANDB_MODE": "offline",
        "HF_HUB_OFFLINE": "1",
        "PYTHONWARNINGS": "ignore",
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "CUBLAS_WORKSPACE_CONFIG": ":4096:8",
        "PYTHONPATH": os.pathsep.join([str(SCRIPTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
    }


def _run(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "lightning_distill", *COMMON, *overrides],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _steps(log: Path) -> dict[int, dict]:
    """The probe's rows by step; a step trained twice (before the kill, after the resume) keeps the last."""
    rows = [json.loads(line) for line in log.read_text().splitlines()]
    return {r["step"]: r for r in rows}


def _csv_series(run: Path) -> dict[str, dict[int, float]]:
    """Every logged value by (key, step) over all CSV versions of a run (later versions win)."""
    out: dict[str, dict[int, float]] = {}
    for path in sorted(
        (run / "csv").rglob("metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1])
    ):
        with path.open() as f:
            for row in csv.DictReader(f):
                for key, value in row.items():
                    if key not in ("step", "epoch") and value not in ("", None):
                        out.setdefault(key, {})[int(row["step"])] = float(value)
    return out


@pytest.mark.slow
@pytest.mark.parametrize("setup", sorted(SETUPS))
def test_sigkill_mid_epoch_then_resume_equals_the_uninterrupted_run(tmp_path, setup):
    def _cli(tmp_path, *overrides):
        return _run(tmp_path, *SETUPS[setup], *overrides)

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = _cli(tmp_path, f"output_dir={whole}", f"+callbacks.probe.log={tmp_path / 'whole.jsonl'}")
    assert done.returncode == 0, done.stderr[-4000:]

    killed = _cli(
        tmp_path,
        f"output_dir={cut}",
        f"+callbacks.probe.log={tmp_path / 'cut.jsonl'}",
        f"+callbacks.probe.kill_at_step={KILL_AT}",
    )
    # SIGKILL: no handler runs, no interrupted.ckpt
    assert killed.returncode == -9, killed.stderr[-4000:]
    assert not list(cut.rglob("interrupted.ckpt"))
    before = _steps(tmp_path / "cut.jsonl")
    # Killed mid-epoch, two steps after the step-3 checkpoint.
    assert sorted(before) == [1, 2, 3, 4, 5]
    resumed = _cli(
        tmp_path,
        f"output_dir={cut}",
        "ckpt_path=last",
        f"+callbacks.probe.log={tmp_path / 'cut.jsonl'}",
    )
    assert resumed.returncode == 0, resumed.stderr[-4000:]
    assert "Resuming from" in resumed.stdout and "last.ckpt" in resumed.stdout  # -> step3.ckpt

    # Cache reads, batch order and loss per step: the same steps, the same samples, the same targets.
    a, b = _steps(tmp_path / "whole.jsonl"), _steps(tmp_path / "cut.jsonl")
    assert sorted(a) == sorted(b) == list(range(1, 9))
    for step in a:
        assert b[step]["sample_ids"] == a[step]["sample_ids"], step
        assert b[step]["targets"] == a[step]["targets"], step
        assert (a[step]["targets"] != 0) == (setup == "cached"), step
        assert b[step]["loss"] == a[step]["loss"], step
    # The steps trained before the kill and again after the resume got the same batches too.
    for step in (4, 5):
        assert before[step]["sample_ids"] == a[step]["sample_ids"]

    # The CSV logs: train/loss every step, the schedule values, validation.
    sa, sb = _csv_series(whole), _csv_series(cut)
    # The resumed fit logs to a new CSV version, from the first step after the checkpoint (step
    # indices are 0-based there); the killed run's rows for steps 4 and 5 stay in the old version.
    newest = max(
        (cut / "csv").rglob("metrics.csv"), key=lambda p: int(p.parent.name.split("_")[-1])
    )
    with newest.open() as f:
        logged = sorted({int(r["step"]) for r in csv.DictReader(f) if r.get("train/loss")})
    assert logged == list(range(3, 8))
    for key in ("train/loss", "schedule/temperature", "schedule/kd.weight"):
        assert key in sa and sorted(sa[key]) == list(range(8)), (key, sorted(sa.get(key, {})))
        assert sb[key] == sa[key], key
    assert {k for k in sa if k.startswith("val/")} == {k for k in sb if k.startswith("val/")}
    for key in (k for k in sa if k.startswith("val/")):
        assert sb[key] == sa[key], key

    # Training coverage per slice and the final per-slice metrics.
    ca, cb = (json.loads((d / "coverage.json").read_text()) for d in (whole, cut))
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (whole, cut))
    train_a = {r["slice"]: (r["train_samples"], r["train_tokens"]) for r in ca["slices"]}
    train_b = {r["slice"]: (r["train_samples"], r["train_tokens"]) for r in cb["slices"]}
    assert train_a == train_b and sum(s for s, _ in train_a.values()) == 8 * 4
    assert ca["slices"] == cb["slices"]
    assert ra["slices"] == rb["slices"]


CACHE = [
    "experiment=tiny",
    "callbacks=teacher_cache_topk",
    "callbacks.teacher_cache.k=8",
    "callbacks.teacher_cache.progress=false",
    "callbacks.teacher_cache.shard_mb=0.01",
    "+build_cache_only=true",
]


def _cache_contents(folder: Path) -> dict[str, dict[int, dict[str, list]]]:
    """Per split, each sample id's stored tensors (as lists), read from the shards the index lists."""
    import zlib

    from safetensors.torch import load as load_safetensors

    out: dict[str, dict[int, dict[str, list]]] = {}
    for split in ("train", "val", "test"):
        index = json.loads((folder / split / "index.json").read_text())
        samples: dict[int, dict[str, list]] = {}
        for shard in index["shards"]:
            raw = (folder / split / "shards" / shard["file"]).read_bytes()
            tensors = load_safetensors(zlib.decompress(raw))
            starts = [0, *tensors["sample.lengths"].cumsum(0).tolist()]
            for i, sid in enumerate(tensors["sample.ids"].tolist()):
                assert sid not in samples, f"{split}: sample {sid} listed twice"
                samples[sid] = {
                    name: t[starts[i] : starts[i + 1]].tolist()
                    for name, t in tensors.items()
                    if name.startswith("pos.")
                }
        assert len(samples) == index["samples"]
        out[split] = samples
    return out


@pytest.mark.slow
def test_sigkill_mid_cache_build_then_rerun_equals_an_uninterrupted_build(tmp_path):
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    done = _cli_cache(tmp_path, [sys.executable, "-m", "lightning_distill"], whole)
    assert done.returncode == 0, done.stderr[-4000:]
    killer = [sys.executable, str(SCRIPTS / "cli_kill_after_shards.py"), "cache", "3"]
    killed = _cli_cache(tmp_path, killer, cut)
    assert killed.returncode == -9, killed.stderr[-4000:]
    assert not (cut / "train" / "index.json").exists()  # killed before the train split was complete
    partial = list((cut / "train" / "shards").glob("*.json"))
    assert len(partial) == 3
    again = _cli_cache(tmp_path, [sys.executable, "-m", "lightning_distill"], cut)
    assert again.returncode == 0, again.stderr[-4000:]

    a, b = _cache_contents(whole), _cache_contents(cut)
    for split in a:
        assert sorted(a[split]) == sorted(b[split]) and a[split], split
        assert b[split] == a[split], split
    built = json.loads((cut / "train" / "index.json").read_text())
    # The rerun built only what the kill left unbuilt: the three shards written before it are kept.
    kept = [json.loads(p.read_text()) for p in partial]
    assert {s["file"] for s in kept} <= {s["file"] for s in built["shards"]}
    total, before = built["samples"], sum(s["samples"] for s in kept)
    assert 0 < before < total and f"| train | {total} | {total - before} |" in again.stdout


def _cli_cache(tmp_path: Path, program: list[str], folder: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [
            *program,
            *CACHE,
            f"callbacks.teacher_cache.dirpath={folder}",
            f"output_dir={tmp_path / 'out'}",
        ],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )


def _uneven_items(n: int = 8, seq: int = 8, vocab: int = 32) -> list[dict]:
    """Sequences whose label tails are masked by different amounts: each batch has its own token count."""
    import torch

    g = torch.Generator().manual_seed(0)
    items = []
    for i in range(n):
        ids = torch.randint(0, vocab, (seq,), generator=g)
        labels = ids.clone()
        labels[seq - 1 - (i % seq) :] = -100
        items.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return items


def test_resume_from_a_mid_epoch_checkpoint_gives_the_same_weights(tmp_path):
    """StepMean's C (the first step's token count) is kept: with batches of different token counts a
    resumed fit rescales its gradients exactly as the uninterrupted one (bit for bit)."""
    import functools

    import lightning as L
    import torch
    from lightning.pytorch.callbacks import ModelCheckpoint

    from lightning_distill import DistillationModule
    from lightning_distill.data.loaders import ResumableDataLoader
    from lightning_distill.losses import LogitKD, TaskLoss
    from lightning_distill.models import causal_lm_from_config

    torch.set_num_threads(1)

    def module() -> DistillationModule:
        def lm(seed: int):
            return causal_lm_from_config(
                "llama",
                vocab_size=32,
                hidden_size=16,
                intermediate_size=32,
                num_hidden_layers=1,
                num_attention_heads=2,
                num_key_value_heads=2,
                max_position_embeddings=16,
                seed=seed,
            )

        return DistillationModule(
            lm(0),
            lm(1),
            {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)},
            optimizer=functools.partial(torch.optim.AdamW, lr=1e-2),
        )

    def fit(max_steps: int, callbacks=(), ckpt_path=None) -> DistillationModule:
        mod = module()
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            num_sanity_val_steps=0,
            max_steps=max_steps,
            deterministic=True,
            callbacks=list(callbacks),
            enable_checkpointing=bool(callbacks),
        )
        trainer.fit(mod, ResumableDataLoader(_uneven_items(), batch_size=2), ckpt_path=ckpt_path)
        return mod

    saver = ModelCheckpoint(
        dirpath=tmp_path,
        filename="step{step}",
        every_n_train_steps=2,
        save_top_k=-1,
        auto_insert_metric_name=False,
    )
    whole = fit(4, [saver])
    resumed = fit(4, ckpt_path=tmp_path / "step2.ckpt")
    a, b = whole.student.state_dict(), resumed.student.state_dict()
    assert [k for k in a if not torch.equal(a[k], b[k])] == []
