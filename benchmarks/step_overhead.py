"""Training-step cost of DistillationModule against a hand-written PyTorch loop.

Same models (the demo's teacher and student shapes), same batches, same work per step:
teacher forward under no_grad, student forward, forward KL at T=2 (x T^2) + cross-entropy,
backward, gradient clipping, AdamW step. The module runs in a real ``lightning.Trainer`` with
its default logging and metrics on; the loop is what a careful user would write by hand.

Also measured: a student-only step (task loss, no teacher), so the live teacher's price shows.

Step time is the mean interval from one batch's start to the next (so logging, metrics and
everything else the loop does per step is inside), after ``--warmup`` steps. Each configuration
is run ``--repeats`` times, interleaved, and the median of those means is reported; ratios are
against the hand-written loop measured in the same run. Keep the machine otherwise idle: two
processes with two threads each on two cores slow each other down by far more than 2x.

    python benchmarks/step_overhead.py            # ~2 minutes on 2 cores
    python benchmarks/step_overhead.py --steps 20 --repeats 1   # quick look
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time

import lightning as L
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from lightning_distill import DistillationModule
from lightning_distill.losses import LogitKD, TaskLoss
from lightning_distill.models import causal_lm_from_config

VOCAB, SEQ, BATCH, T = 2048, 128, 16, 2.0
TEACHER = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=3, num_attention_heads=4,
               num_key_value_heads=4, tie_word_embeddings=True)
STUDENT = dict(hidden_size=64, intermediate_size=192, num_hidden_layers=2, num_attention_heads=4,
               num_key_value_heads=4, tie_word_embeddings=True)


class Blocks(Dataset):
    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        ids = self.ids[i]
        return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids, "slice": "x",
                "sample_id": i}


def models():
    common = dict(vocab_size=VOCAB, max_position_embeddings=SEQ)
    teacher = causal_lm_from_config("llama", seed=1, **TEACHER, **common).eval().requires_grad_(False)
    student = causal_lm_from_config("llama", seed=0, **STUDENT, **common)
    return teacher, student


def loader(steps: int) -> DataLoader:
    return DataLoader(Blocks(BATCH * steps), batch_size=BATCH, shuffle=False)


class StepTimer(L.Callback):
    """Batch-start to batch-start intervals: everything the loop does per step is inside."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        self.starts.append(time.perf_counter())

    def on_train_end(self, trainer, module) -> None:
        self.starts.append(time.perf_counter())

    @property
    def times(self) -> list[float]:
        return [b - a for a, b in zip(self.starts, self.starts[1:])]


def run_module(steps: int, with_teacher: bool) -> list[float]:
    teacher, student = models()
    losses = ({"kd": LogitKD("forward_kl", temperature=T, weight=0.5), "task": TaskLoss(weight=0.5)}
              if with_teacher else {"task": TaskLoss()})
    module = DistillationModule(student, teacher if with_teacher else None, losses,
                                optimizer=functools.partial(torch.optim.AdamW, lr=1e-3))
    timer = StepTimer()
    trainer = L.Trainer(max_steps=steps, accelerator="cpu", logger=L.pytorch.loggers.CSVLogger("/tmp/ld-bench"),
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        gradient_clip_val=1.0, limit_val_batches=0, num_sanity_val_steps=0,
                        callbacks=[timer], log_every_n_steps=25)
    trainer.fit(module, loader(steps))
    return timer.times


def run_loop(steps: int) -> list[float]:
    teacher, student = models()
    student.train()
    opt = torch.optim.AdamW(student.parameters(), lr=1e-3)
    starts = []
    for batch in loader(steps):
        starts.append(time.perf_counter())
        ids, labels = batch["input_ids"], batch["labels"]
        with torch.no_grad():
            t_logits = teacher(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
        s_logits = student(input_ids=ids, attention_mask=batch["attention_mask"], use_cache=False).logits
        s = s_logits[:, :-1].reshape(-1, VOCAB)
        t = t_logits[:, :-1].reshape(-1, VOCAB)
        y = labels[:, 1:].reshape(-1)
        kd = F.kl_div(F.log_softmax(s / T, -1), F.log_softmax(t / T, -1), log_target=True,
                      reduction="batchmean") * T * T
        loss = 0.5 * kd + 0.5 * F.cross_entropy(s, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        opt.step()
    starts.append(time.perf_counter())
    return [b - a for a, b in zip(starts, starts[1:])]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    configs = {
        "hand-written loop (teacher + KD + CE)": lambda: run_loop(args.steps),
        "DistillationModule, live teacher": lambda: run_module(args.steps, True),
        "DistillationModule, student only": lambda: run_module(args.steps, False),
    }
    means: dict[str, list[float]] = {name: [] for name in configs}
    for _ in range(args.repeats):
        for name, fn in configs.items():
            means[name].append(statistics.mean(fn()[args.warmup:]))
    best = {name: statistics.median(v) for name, v in means.items()}
    base = best["hand-written loop (teacher + KD + CE)"]
    print(f"\nbatch {BATCH}x{SEQ} tokens, vocab {VOCAB}, {args.steps} steps x {args.repeats} repeats, "
          f"{torch.get_num_threads()} threads\n")
    print("| configuration | ms / step | ÷ hand-written loop |")
    print("|---|---|---|")
    for name, value in best.items():
        print(f"| {name} | {value * 1e3:.1f} | {value / base:.3f} |")
    live, alone = best["DistillationModule, live teacher"], best["DistillationModule, student only"]
    print(f"\nlive-teacher KD step ÷ student-only step: {live / alone:.2f}")


if __name__ == "__main__":
    main()
