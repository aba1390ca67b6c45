"""Build a teacher cache inside a 1- or 2-rank fit (gloo, CPU), then train two steps from it.

    python ddp_cache.py CACHE_DIR DEVICES

With DEVICES=2 Lightning's DDP launcher re-runs this script once per rank; each rank builds
half of the samples into its own shards, rank 0 merges the index.
"""

from __future__ import annotations

import functools
import json
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from lightning_distill import DistillationModule
from lightning_distill.callbacks import TeacherCache
from lightning_distill.cli import end_process_group
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import causal_lm_from_config

VOCAB, SEQ, N = 80, 10, 20


def model(seed: int, hidden: int) -> torch.nn.Module:
    return causal_lm_from_config("llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32, seed=seed)


class Blocks(Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (N, SEQ), generator=torch.Generator().manual_seed(0))
        self.sample_ids = torch.arange(N) * 7 + 5

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
                "sample_id": int(self.sample_ids[i])}


class Data(L.LightningDataModule):
    def train_dataloader(self) -> DataLoader:
        return DataLoader(Blocks(), batch_size=2, shuffle=True, generator=torch.Generator().manual_seed(0))


def module() -> DistillationModule:
    return DistillationModule(model(0, 16), model(1, 24),
                              {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)},
                              optimizer=functools.partial(torch.optim.SGD, lr=0.1))


def cache(path: str) -> TeacherCache:
    return TeacherCache(path, kind="sampled", num_samples=12, splits=["train"], shard_mb=1e-3, progress=False)


def main(path: str, devices: int) -> None:
    cb = cache(path)
    mod = module()
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto", max_steps=2,
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, limit_val_batches=0, callbacks=[cb])
    trainer.fit(mod, Data())
    summary = {"rank": trainer.global_rank, "built": cb.built["train"], "teacher_released": mod.teacher is None,
               "loss_finite": bool(torch.isfinite(trainer.callback_metrics.get("train/loss", torch.tensor(0.0))))}
    with open(f"{path}.rank{trainer.global_rank}.json", "w") as f:
        json.dump(summary, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    end_process_group()  # exit cleanly (gloo threads otherwise may abort the process)
