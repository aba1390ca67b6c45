"""Run CoverageSlices(metric="similarity") at test time on 1 or 2 ranks; save the rows (rank 0).

    python ddp_similarity.py OUT.json DEVICES

With DEVICES=2 Lightning's DDP launcher re-runs this script once per rank (gloo, CPU); each rank
embeds a different half of the samples, so only a correct gather of the embeddings gives the
1-rank agreement (Spearman over pairs does not depend on the order of the samples).
"""

from __future__ import annotations

import json
import sys

import lightning as L
import torch
from torch.utils.data import DataLoader

from lightning_distill import DistillationModule
from lightning_distill.callbacks import CoverageSlices
from lightning_distill.cli import end_process_group
from lightning_distill.losses import EmbeddingKD
from lightning_distill.models import Pooling, encoder_from_config

VOCAB, SEQ = 50, 10


def encoder(seed: int, width: int) -> torch.nn.Module:
    return encoder_from_config("bert", vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                               num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=SEQ, seed=seed)


def items() -> list[dict]:
    g = torch.Generator().manual_seed(0)
    return [{"input_ids": torch.randint(1, VOCAB, (SEQ,), generator=g), "attention_mask": torch.ones(SEQ, dtype=torch.long),
             "slice": "ab"[i % 3 == 0]} for i in range(24)]


def main(out: str, devices: int) -> None:
    module = DistillationModule(encoder(0, 16), encoder(1, 32),
                                {"emb": EmbeddingKD(student_dim=16, teacher_dim=32)},
                                student_logits_fn=Pooling(), teacher_logits_fn=Pooling())
    cb = CoverageSlices(slices=["a", "b"], metric="similarity", min_retention=None, dirpath=out + ".reports")
    trainer = L.Trainer(accelerator="cpu", devices=devices, strategy="ddp" if devices > 1 else "auto",
                        logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[cb])
    trainer.test(module, DataLoader(items(), batch_size=3, shuffle=False), verbose=False)
    if trainer.global_rank == 0:
        with open(out, "w") as f:
            json.dump({"rows": cb.last_rows}, f)


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
    end_process_group()  # exit cleanly (gloo threads otherwise may abort the process)
