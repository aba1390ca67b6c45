"""Run one optimizer step of DistillationModule and save the gradients it stepped with.

    python ddp_grads.py OUT_DIR DEVICES BATCH_SIZE:ACCUMULATE [BATCH_SIZE:ACCUMULATE ...]

One fit per ``BATCH_SIZE:ACCUMULATE`` pair, each saving ``OUT_DIR/b<BATCH_SIZE>-a<ACCUMULATE>.safetensors``.
With DEVICES=2 Lightning's DDP launcher re-runs this script once per rank (gloo, CPU); the later fits
reuse those ranks and their process group (no second launch). The eight sequences have different
numbers of valid tokens, so a per-rank or per-micro-batch mean would give different gradients from
the step-wide mean.
"""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file
from torch.utils.data import DataLoader

from lightning_distill import DistillationModule
from lightning_distill.cli import end_process_group
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import causal_lm_from_config

VOCAB, SEQ = 64, 12


def model(seed: int, hidden: int) -> torch.nn.Module:
    return causal_lm_from_config("llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32, seed=seed)


def items() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(8):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: i + 1] = -100  # 1..8 masked positions: uneven valid counts
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels})
    return out


class RecordingSGD(torch.optim.SGD):
    """lr=0 SGD that keeps a copy of the gradients it was asked to step with."""

    def __init__(self, params):
        super().__init__(params, lr=0.0)
        self.seen: list[torch.Tensor] = []

    def step(self, closure=None):
        loss = super().step(closure)
        self.seen = [p.grad.detach().clone() for g in self.param_groups for p in g["params"]]
        return loss


def main(out: str, devices: int, batch_size: int, accumulate: int) -> None:
    """One fit of one optimizer step; rank 0 saves the gradients to ``out``."""
    teacher = model(1, 32)
    with torch.no_grad():
        teacher.lm_head.weight.mul_(20)  # a peaked teacher, so KD has signal
    module = DistillationModule(model(0, 16), teacher,
                                {"kd": LogitKD(temperature=2.0, weight=0.5), "task": TaskLoss(weight=0.5)},
                                optimizer=functools.partial(RecordingSGD))
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        max_steps=1, accumulate_grad_batches=accumulate, logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, limit_val_batches=0)
    trainer.fit(module, DataLoader(items(), batch_size=batch_size, shuffle=False))
    if trainer.global_rank == 0:
        seen = trainer.optimizers[0].seen
        save_file({f"g{i}": g.contiguous() for i, g in enumerate(seen)}, out,
                  metadata={"world_size": str(trainer.world_size)})


def output(folder: str, batch_size: int, accumulate: int) -> Path:
    """Where the fit with ``batch_size`` and ``accumulate`` saves its gradients."""
    return Path(folder) / f"b{batch_size}-a{accumulate}.safetensors"


if __name__ == "__main__":
    Path(sys.argv[1]).mkdir(parents=True, exist_ok=True)
    for pair in sys.argv[3:]:
        batch, acc = (int(v) for v in pair.split(":"))
        main(str(output(sys.argv[1], batch, acc)), int(sys.argv[2]), batch, acc)
    end_process_group()  # exit cleanly (gloo threads otherwise may abort the process)
