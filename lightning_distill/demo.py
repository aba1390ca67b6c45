"""The demo's teacher: trained once on every slice of the demo corpus, then reused.

The first ``lightning-distill`` run trains a small causal LM (progress bar) and stores it with
``save_pretrained`` under ``<cache root>/teachers/<key>``, where the key hashes the model
config, the training settings and the data (corpus, tokenizer, block length). Later runs load
it in a second. Delete that directory to retrain.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lightning_distill.paths import cache_root

__all__ = ["demo_teacher", "teacher_cache_dir"]

log = logging.getLogger("lightning_distill")

_FORMAT = 1


def teacher_cache_dir(model: dict[str, Any], training: dict[str, Any], data_fingerprint: str,
                      cache_dir: str | Path | None = None) -> Path:
    """Where the demo teacher for these settings lives."""
    blob = json.dumps({"model": model, "training": training, "data": data_fingerprint, "format": _FORMAT},
                      sort_keys=True, default=str)
    key = hashlib.sha256(blob.encode()).hexdigest()[:16]
    root = Path(cache_dir) if cache_dir is not None else cache_root() / "teachers"
    return root / key


def demo_teacher(model: dict[str, Any], *, datamodule: Any, steps: int = 600, lr: float = 3e-3,
                 batch_size: int = 16, seed: int = 1, cache_dir: str | None = None,
                 progress: bool = True) -> nn.Module:
    """Load the demo teacher from the cache, training it first if it is not there.

    Args:
        model: ``causal_lm_from_config`` arguments (``model_type``, sizes, ``vocab_size``).
        datamodule: a prepared :class:`~lightning_distill.data.SlicedTextDataModule`; the teacher
            trains on *all* its slices, whatever the student's ``train_slices``.
        steps, lr, batch_size, seed: the teacher's training run.
        cache_dir: where teachers are stored (default: ``<cache root>/teachers``).
        progress: show a progress bar while training.

    Returns:
        The teacher, in eval mode.
    """
    from transformers import AutoModelForCausalLM

    if steps < 1:
        raise ValueError(f"teacher steps must be >= 1, got {steps}.")
    if hasattr(type(datamodule), "teacher_datamodule"):  # cross-tokenizer data: the teacher's own tokens
        datamodule = datamodule.teacher_datamodule
    model = dict(model)
    training = {"steps": steps, "lr": lr, "batch_size": batch_size, "seed": seed}
    # keyed by the corpus alone: teacher-written train data (data.generated) does not retrain it
    data_fingerprint = getattr(datamodule, "source_data_fingerprint", None) or datamodule.data_fingerprint
    target = teacher_cache_dir(model, training, data_fingerprint, cache_dir)
    if (target / "config.json").is_file():
        log.info("Loading the demo teacher from %s", target)
        return AutoModelForCausalLM.from_pretrained(target).eval()

    print(f"Training the demo teacher once ({steps} steps); it will be stored in {target}")
    teacher = _train(model, datamodule, steps=steps, lr=lr, batch_size=batch_size, seed=seed,
                     progress=progress)
    store_teacher(teacher, target, {"model": model, "training": training, "data": data_fingerprint})
    return teacher.eval()


def store_teacher(teacher: nn.Module, target: Path, record: dict[str, Any]) -> None:
    """Save a trained demo teacher at ``target`` (``save_pretrained`` + ``training.json`` = ``record``),
    atomically: the folder appears whole or not at all, so a half-written teacher is never loaded. Another
    job that stored it first wins (its copy is the same teacher)."""
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
    try:
        teacher.save_pretrained(tmp, safe_serialization=True)
        (tmp / "training.json").write_text(json.dumps(record, indent=2))
        os.replace(tmp, target)
    except OSError:
        if not (target / "config.json").is_file():
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _train(model_cfg: dict[str, Any], datamodule: Any, *, steps: int, lr: float, batch_size: int,
           seed: int, progress: bool) -> nn.Module:
    import functools

    import lightning as L
    import transformers

    from lightning_distill.losses import TaskLoss
    from lightning_distill.models.hf import causal_lm_from_config
    from lightning_distill.module import DistillationModule

    model_type = model_cfg.pop("model_type", "llama")
    teacher = causal_lm_from_config(model_type, seed=seed, **model_cfg)
    module = DistillationModule(
        teacher, None, {"task": TaskLoss()},
        optimizer=functools.partial(torch.optim.AdamW, lr=lr, weight_decay=0.01, betas=(0.9, 0.98)),
        lr_scheduler=functools.partial(transformers.get_cosine_schedule_with_warmup,
                                       num_warmup_steps=min(50, steps // 10)),
    )
    trainer = L.Trainer(
        max_steps=steps, max_epochs=-1, accelerator="auto", devices=1, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=progress,
        gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0,
    )
    with _seeded(seed):
        corpus_only = {"generated": False} if hasattr(type(datamodule), "source_data_fingerprint") \
            and getattr(datamodule, "generated", None) else {}  # the demo data serves its corpus alone
        trainer.fit(module, train_dataloaders=datamodule.train_dataloader_for(slices=None, batch_size=batch_size,
                                                                              **corpus_only))
    return teacher.cpu()


class _seeded:
    """Fork the global RNGs so training the teacher leaves the caller's seed stream alone."""

    def __init__(self, seed: int) -> None:
        self.seed = seed
        self._fork = torch.random.fork_rng(devices=[])

    def __enter__(self) -> None:
        self._fork.__enter__()
        torch.manual_seed(self.seed)

    def __exit__(self, *exc: Any) -> None:
        self._fork.__exit__(*exc)
