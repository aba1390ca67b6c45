"""Run CoverageSlices at test time on 1 or 2 ranks and save the per-slice sums (rank 0).

    python ddp_coverage.py OUT.json DEVICES

With DEVICES=2 Lightning's DDP launcher re-runs this script once per rank (gloo, CPU); each rank
sees a different half of the samples, so only correctly reduced sums match the 1-rank numbers.
"""

from __future__ import annotations

import functools
import json
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_distill import DistillationModule
from lightning_distill.callbacks import CoverageSlices
from lightning_distill.cli import end_process_group
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import causal_lm_from_config

VOCAB, SEQ = 64, 12
NAMES = ["a", "b", "b", "a", "b", "b", "a", "b"]


def model(seed: int, hidden: int) -> torch.nn.Module:
    return causal_lm_from_config("llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32, seed=seed)


def items() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    out = []
    for i, name in enumerate(NAMES):
        ids = torch.randint(0, VOCAB, (SEQ,), generator=g)
        labels = ids.clone()
        labels[: i + 1] = -100
        out.append({"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": labels, "slice": name})
    return out


def main(out: str, devices: int) -> None:
    module = DistillationModule(model(0, 16), model(1, 32),
                                {"kd": LogitKD(temperature=2.0, weight=0.5), "task": TaskLoss(weight=0.5)},
                                optimizer=functools.partial(torch.optim.SGD, lr=0.0))
    cb = CoverageSlices(slices=["a", "b"], dirpath=out + ".reports")
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb])
    trainer.test(module, DataLoader(items(), batch_size=2, shuffle=False), verbose=False)
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump({"sums": cb.last_sums, "rows": cb.last_rows}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    end_process_group()  # exit cleanly (gloo threads otherwise may abort the process)
