"""Drop-in distillation for an existing Lightning project.

The first half is an ordinary Lightning project, written without lightning-distill: a
DataModule of 64-byte snippets of real text (pydoc's prose and six standard-library
packages, seven classes) and a LightningModule that trains a byte-level CNN to tell which
source a snippet came from. It trains a large model the usual way.

The second half is all it takes to distil that model into one ~10x smaller: wrap the two
``nn.Module`` s in a ``DistillationModule`` and hand the *same* DataModule and Trainer to
``fit``. The project's batches are ``(inputs, target)`` tuples; nothing about them changes.

    python examples/drop_in.py                 # ~1 minute on 2 cores
    python examples/drop_in.py --steps 30      # quick check
"""

from __future__ import annotations

import argparse
import functools
import pydoc_data.topics
import random
import sysconfig
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from lightning_distill import DistillationModule
from lightning_distill.losses import LogitKD, TaskLoss

SNIPPET = 64
SOURCES = ["prose", "email", "json", "asyncio", "unittest", "xml", "logging"]


# ----------------------------------------------------------------------------------------------
# An ordinary Lightning project.
# ----------------------------------------------------------------------------------------------
class SnippetData(L.LightningDataModule):
    """64-byte snippets labelled with their source; yields (bytes, label) tuples."""

    def __init__(self, per_class: int = 600, batch_size: int = 64) -> None:
        super().__init__()
        self.per_class, self.batch_size = per_class, batch_size

    def _texts(self, source: str) -> str:
        if source == "prose":
            return "\n".join(pydoc_data.topics.topics[k] for k in sorted(pydoc_data.topics.topics))
        root = Path(sysconfig.get_paths()["stdlib"]) / source
        return "\n".join(p.read_text(errors="replace") for p in sorted(root.rglob("*.py"))
                         if "test" not in p.parts)

    def setup(self, stage: str | None = None) -> None:
        rng = random.Random(0)
        xs, ys = [], []
        for label, source in enumerate(SOURCES):
            data = self._texts(source).encode()
            for _ in range(self.per_class):
                start = rng.randrange(len(data) - SNIPPET)
                xs.append(list(data[start:start + SNIPPET]))
                ys.append(label)
        order = list(range(len(xs)))
        rng.shuffle(order)
        x = torch.tensor([xs[i] for i in order])
        y = torch.tensor([ys[i] for i in order])
        cut = int(0.85 * len(x))
        self.train, self.val = TensorDataset(x[:cut], y[:cut]), TensorDataset(x[cut:], y[cut:])

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train, batch_size=self.batch_size, shuffle=True, drop_last=True)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val, batch_size=256)


class ByteCNN(nn.Module):
    def __init__(self, width: int, classes: int = len(SOURCES)) -> None:
        super().__init__()
        self.embed = nn.Embedding(256, width)
        self.conv = nn.Sequential(nn.Conv1d(width, width, 5, padding=2), nn.GELU(),
                                  nn.Conv1d(width, width, 5, padding=2), nn.GELU())
        self.head = nn.Linear(width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(self.embed(x).transpose(1, 2))
        return self.head(h.max(dim=-1).values)


class Classifier(L.LightningModule):
    def __init__(self, model: nn.Module, lr: float = 3e-3) -> None:
        super().__init__()
        self.model, self.lr = model, lr

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.model(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val/acc", (self.model(x).argmax(-1) == y).float().mean())

    def configure_optimizers(self):
        return torch.optim.AdamW(self.parameters(), lr=self.lr)


def accuracy(model: nn.Module, loader: DataLoader) -> float:
    model.eval()
    with torch.no_grad():
        hits = sum((model(x).argmax(-1) == y).sum().item() for x, y in loader)
    return hits / len(loader.dataset)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    L.seed_everything(0, verbose=False)
    data = SnippetData()
    data.setup()

    def trainer() -> L.Trainer:
        return L.Trainer(max_steps=args.steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         limit_val_batches=0)

    teacher = ByteCNN(width=128)
    trainer().fit(Classifier(teacher), data)  # the project's usual training

    # ------------------------------------------------------------------------------------------
    # Distillation: these lines are the whole change.
    # ------------------------------------------------------------------------------------------
    student = ByteCNN(width=32)
    distill = DistillationModule(
        student=student, teacher=teacher,
        losses={"kd": LogitKD("forward_kl", temperature=2.0, weight=0.7), "task": TaskLoss(weight=0.3)},
        optimizer=functools.partial(torch.optim.AdamW, lr=3e-3),
    )
    trainer().fit(distill, data)

    # For comparison: the same small model trained the usual way, without the teacher.
    L.seed_everything(0, verbose=False)
    alone = ByteCNN(width=32)
    trainer().fit(Classifier(alone), data)

    size = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    val = data.val_dataloader()
    print(f"teacher  {size(teacher):>8,} params  val accuracy {accuracy(teacher, val):.3f}")
    print(f"student  {size(student):>8,} params  val accuracy {accuracy(student, val):.3f}  (distilled)")
    print(f"baseline {size(alone):>8,} params  val accuracy {accuracy(alone, val):.3f}  (no teacher)")


if __name__ == "__main__":
    main()
