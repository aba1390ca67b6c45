"""A callback for the SIGKILL resume test: records every training step, and kills its own process.

Added to a CLI run with ``+callbacks.probe._target_=resume_probe.ResumeProbe`` (this folder on
``PYTHONPATH``). Each finished training step appends one JSON line to ``log`` (flushed and synced, so
a SIGKILL loses none): the step, the batch's sample ids, and a checksum of the teacher targets the
batch carried (a teacher cache's read). With ``kill_at_step=N`` the process sends itself SIGKILL at
the start of the batch that would make step ``N + 1``: a real kill, with no Python cleanup.
"""

from __future__ import annotations

import dataclasses
import json
import os
import signal
from collections.abc import Mapping
from typing import Any

import lightning as L
import torch


def _checksum(value: Any) -> float:
    if isinstance(value, torch.Tensor):
        return float(value.detach().double().sum())
    if dataclasses.is_dataclass(value):
        return sum(_checksum(getattr(value, f.name)) for f in dataclasses.fields(value))
    if isinstance(value, Mapping):
        return sum(_checksum(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_checksum(v) for v in value)
    return 0.0


class ResumeProbe(L.Callback):
    """Append one JSON line per training step to ``log``; SIGKILL this process at ``kill_at_step``.

    Args:
        log: the JSONL file to append to.
        kill_at_step: kill before training step ``kill_at_step + 1`` (``None``: never).
    """

    def __init__(self, log: str, kill_at_step: int | None = None) -> None:
        self.path, self.kill_at_step = log, kill_at_step
        torch.set_num_threads(1)

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        if self.kill_at_step is not None and trainer.global_step == self.kill_at_step:
            os.kill(os.getpid(), signal.SIGKILL)

    def on_train_batch_end(
        self,
        trainer: L.Trainer,
        pl_module: L.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
    ) -> None:
        loss = outputs["loss"] if isinstance(outputs, Mapping) else outputs
        row = {
            "step": trainer.global_step,
            "batch_idx": batch_idx,
            "epoch": trainer.current_epoch,
            "sample_ids": [int(i) for i in batch["sample_id"]],
            "targets": _checksum(batch.get("teacher_targets")),
            "loss": float(loss),
        }
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")
            f.flush()
            os.fsync(f.fileno())
