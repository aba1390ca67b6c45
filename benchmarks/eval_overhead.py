"""Cost of per-slice evaluation: a validation epoch with ``CoverageSlices`` against one without.

The module's validation step returns the per-sample sums of its own forward, and
``CoverageSlices`` adds them up per slice: with the callback, a batch still runs the student and
the live teacher once. For reference, the earlier design (the callback ran both models again
through ``evaluate_batch``) is reproduced by turning the module's per-sample sums off, so that the
callback falls back to its own forward.

Same models and batches as ``step_overhead.py`` (the demo's shapes, a live teacher, KD + CE).
Two numbers per configuration, each the median over ``--repeats`` interleaved runs:

* *ms / batch*: the mean interval from one validation batch's start to the next (the step, the
  callback's per-batch work and the logging are inside);
* *epoch s*: validation epoch start to end, including the callback's reports at the end
  (``coverage.json/md/png``, the bookkeeping that does not grow with the data).

    python benchmarks/eval_overhead.py               # ~1 minute on 2 cores
    python benchmarks/eval_overhead.py --batches 10 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time

import lightning as L
import torch
from step_overhead import BATCH, SEQ, VOCAB, loader, models

from lightning_distill import DistillationModule
from lightning_distill.callbacks import CoverageSlices
from lightning_distill.losses import LogitKD, TaskLoss


class EvalTimer(L.Callback):
    """Validation batch-start intervals and the epoch's wall time (put it last in the list)."""

    def __init__(self) -> None:
        self.starts: list[float] = []
        self.epoch: list[float] = []

    def on_validation_epoch_start(self, trainer, module) -> None:
        self.epoch = [time.perf_counter()]

    def on_validation_batch_start(self, trainer, module, batch, batch_idx, dataloader_idx=0) -> None:
        self.starts.append(time.perf_counter())

    def on_validation_epoch_end(self, trainer, module) -> None:
        now = time.perf_counter()
        self.starts.append(now)
        self.epoch.append(now)


class DoubleForward(CoverageSlices):
    """The earlier path: the module's step returns nothing, the callback scores the batch again."""

    def setup(self, trainer, pl_module, stage) -> None:
        super().setup(trainer, pl_module, stage)
        pl_module.eval_sample_sums = False


def run(batches: int, callback: str, directory: str) -> tuple[float, float]:
    teacher, student = models()
    module = DistillationModule(student, teacher, {"kd": LogitKD("forward_kl", temperature=2.0, weight=0.5),
                                                   "task": TaskLoss(weight=0.5)})
    timer = EvalTimer()
    kwargs = dict(slices=["x"], min_retention=None, dirpath=directory)
    extra = {"none": [], "CoverageSlices": [CoverageSlices(**kwargs)], "double": [DoubleForward(**kwargs)]}[callback]
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[*extra, timer])
    trainer.validate(module, loader(batches), verbose=False)
    intervals = [b - a for a, b in zip(timer.starts, timer.starts[1:])]
    return statistics.mean(intervals[1:]), timer.epoch[1] - timer.epoch[0]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batches", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configs = {
        "without CoverageSlices": "none",
        "with CoverageSlices (one forward)": "CoverageSlices",
        "with CoverageSlices, earlier double forward": "double",
    }
    per_batch: dict[str, list[float]] = {name: [] for name in configs}
    per_epoch: dict[str, list[float]] = {name: [] for name in configs}
    with tempfile.TemporaryDirectory() as directory:
        run(2, "CoverageSlices", directory)  # warm-up: imports, matplotlib's first figure
        for _ in range(args.repeats):
            for name, kind in configs.items():
                batch, epoch = run(args.batches, kind, directory)
                per_batch[name].append(batch)
                per_epoch[name].append(epoch)
    batch = {name: statistics.median(v) for name, v in per_batch.items()}
    epoch = {name: statistics.median(v) for name, v in per_epoch.items()}
    base_batch, base_epoch = batch["without CoverageSlices"], epoch["without CoverageSlices"]
    print(f"\nvalidation: {args.batches} batches of {BATCH}x{SEQ} tokens, vocab {VOCAB}, live teacher, "
          f"{args.repeats} repeats, {torch.get_num_threads()} threads\n")
    print("| configuration | ms / batch | ÷ without | epoch s | ÷ without |")
    print("|---|---|---|---|---|")
    for name in configs:
        print(f"| {name} | {batch[name] * 1e3:.1f} | {batch[name] / base_batch:.3f} | {epoch[name]:.2f} "
              f"| {epoch[name] / base_epoch:.3f} |")


if __name__ == "__main__":
    main()
