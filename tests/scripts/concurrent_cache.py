"""Build one teacher cache folder from a separate process; the test starts two at once.

    python concurrent_cache.py CACHE_DIR NAME

Both processes wait for each other (a ready file each) before building, and every item of the
dataset takes a moment to load, so the two builds overlap. Writes ``NAME.json`` (samples this
process built, and what its reader sees) in the working folder.
"""

from __future__ import annotations

import functools
import json
import sys
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset

from lightning_distill import DistillationModule
from lightning_distill.callbacks import TeacherCache
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import causal_lm_from_config

VOCAB, SEQ, N = 64, 8, 16


def model(seed: int, hidden: int) -> torch.nn.Module:
    return causal_lm_from_config("llama", vocab_size=VOCAB, hidden_size=hidden, intermediate_size=2 * hidden,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=32, seed=seed)


class SlowBlocks(Dataset):
    def __init__(self) -> None:
        self.ids = torch.randint(0, VOCAB, (N, SEQ), generator=torch.Generator().manual_seed(0))
        self.sample_ids = torch.arange(N) * 5 + 3

    def __len__(self) -> int:
        return N

    def __getitem__(self, i: int) -> dict:
        time.sleep(0.03)  # long enough for the other process to arrive while this one builds
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids,
                "sample_id": int(self.sample_ids[i])}


def main(cache_dir: str, name: str) -> None:
    torch.set_num_threads(1)
    module = DistillationModule(model(0, 16), model(1, 16), {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)},
                                optimizer=functools.partial(torch.optim.SGD, lr=0.1))
    cache = TeacherCache(cache_dir, kind="sampled", num_samples=8, splits=["train"], shard_mb=1e-3, progress=False)
    loader = DataLoader(SlowBlocks(), batch_size=2)
    Path(f"{name}.ready").touch()
    deadline = time.monotonic() + 120
    while len(list(Path().glob("*.ready"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    info = cache.prepare(module, loaders={"train": loader})
    reader = cache.readers["train"]
    targets = reader.read(SlowBlocks().sample_ids, (N, SEQ), "cpu")  # every shard verifies
    Path(f"{name}.json").write_text(json.dumps({"built": info["train"]["built"], "samples": len(reader),
                                                "positions": reader.positions,
                                                "counts": int(targets.sparse.counts.sum())}))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
