"""Throughput with a ~110M-parameter teacher: teacher forward, cache building, and training.

A Llama-style teacher (V = 32000, hidden 768, 12 layers, MLP 2048, tied embeddings: 110M
parameters, random weights: speed does not depend on what the weights say) and a student cut
from it with ``student_from_teacher`` (layers 0, 4, 8, 11: 53M parameters, fp32). Random token
blocks of ``--seq`` tokens, batches of ``--batch``. For an fp32 and a bf16 teacher it measures,
in tokens per second:

* ``teacher forward``: the frozen teacher's forward pass alone (no grad, eval mode);
* ``cache build``: ``TeacherCache.prepare`` for a ``sampled`` (N = 50) and a ``topk`` (k = 32)
  cache of the whole train split (teacher forward + encoding + writing the shards);
* ``train``: Lightning training steps (KD + task loss, AdamW) with the live teacher, and with
  targets read from those caches; the student-only step (task loss alone, no teacher) of the
  same run is the baseline every row is divided by.

CPU only, one thread by default (``--threads``). Times are the process's CPU time by default
(``--clock process``): with one thread that is what the run takes on an idle core, and it stays
put when other processes share the machine; ``--clock wall`` measures wall time instead.

    python benchmarks/pretrained_teacher.py            # ~110M teacher, a few minutes on one core
    python benchmarks/pretrained_teacher.py --tiny     # a seconds-long check of the script
"""

from __future__ import annotations

import argparse
import functools
import gc
import statistics
import tempfile
import time
from pathlib import Path

import torch

FULL = dict(vocab_size=32000, hidden_size=768, intermediate_size=2048, num_hidden_layers=12, num_attention_heads=12,
            num_key_value_heads=12, max_position_embeddings=1024, tie_word_embeddings=True)
TINY = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=4, max_position_embeddings=128, tie_word_embeddings=True)
CACHES = {"sampled N=50": {"kind": "sampled", "num_samples": 50}, "topk k=32": {"kind": "topk", "k": 32}}


class Blocks(torch.utils.data.Dataset):
    """Random token blocks with stable sample ids."""

    def __init__(self, n: int, seq: int, vocab: int) -> None:
        self.ids = torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, i: int) -> dict:
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i],
                "sample_id": i}


def datamodule(n: int, seq: int, vocab: int, batch: int):
    import lightning as L

    class Data(L.LightningDataModule):
        def train_dataloader(self):
            return torch.utils.data.DataLoader(Blocks(n, seq, vocab), batch_size=batch)

    return Data()


def module(student, teacher, kd: bool = True):
    from lightning_distill import DistillationModule
    from lightning_distill.losses import LogitKD, TaskLoss

    losses = {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)} if kd else {"task": TaskLoss()}
    return DistillationModule(student, teacher if kd else None, losses,
                              optimizer=functools.partial(torch.optim.AdamW, lr=1e-4))


CLOCK = time.process_time


def timed_fit(mod, data, callbacks: list, steps: int, warmup: int) -> float:
    """Seconds per training step: the mean over ``steps`` steps after ``warmup`` steps."""
    import lightning as L

    starts: list[float] = []

    class Timer(L.Callback):
        def on_train_batch_start(self, *args) -> None:
            starts.append(CLOCK())

        def on_train_end(self, *args) -> None:
            starts.append(CLOCK())

    trainer = L.Trainer(max_steps=warmup + steps, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, limit_val_batches=0,
                        num_sanity_val_steps=0, callbacks=[*callbacks, Timer()])
    trainer.fit(mod, data)
    return statistics.mean(b - a for a, b in list(zip(starts, starts[1:]))[warmup:])


def forward_rate(teacher, data, batches: int) -> float:
    """Teacher forward tokens per second over ``batches`` batches (after one warm-up batch)."""
    loader = iter(data.train_dataloader())
    first = next(loader)
    with torch.no_grad():
        teacher(input_ids=first["input_ids"], use_cache=False)
        tokens, started = 0, CLOCK()
        for _ in range(batches):
            batch = next(loader)
            teacher(input_ids=batch["input_ids"], use_cache=False)
            tokens += batch["input_ids"].numel()
    return tokens / (CLOCK() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a small model: checks the script in seconds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--seq", type=int, default=None, help="tokens per block (default 256, tiny 32)")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=None, help="timed training steps (default 3, tiny 5)")
    parser.add_argument("--cache-batches", type=int, default=None, help="batches in the cached split (default 4)")
    parser.add_argument("--clock", choices=["process", "wall"], default="process",
                        help="CPU time of this process (default; robust on a shared machine) or wall time")
    args = parser.parse_args()
    global CLOCK
    CLOCK = time.process_time if args.clock == "process" else time.perf_counter

    import lightning as L

    from lightning_distill.callbacks import TeacherCache
    from lightning_distill.models import causal_lm_from_config, freeze, student_from_teacher

    torch.set_num_threads(args.threads)
    L.seed_everything(0, verbose=False)
    config = TINY if args.tiny else FULL
    seq = args.seq or (32 if args.tiny else 256)
    steps = args.steps or (5 if args.tiny else 3)
    warmup = 1
    n_batches = max(args.cache_batches or 4, warmup + steps)
    data = datamodule(n_batches * args.batch, seq, config["vocab_size"], args.batch)
    n_tokens = n_batches * args.batch * seq

    teacher32 = freeze(causal_lm_from_config("llama", seed=1, **config))
    teachers = {"fp32": teacher32, "bf16": freeze(causal_lm_from_config("llama", seed=1, dtype="bfloat16", **config))}
    keep = [0, 1, 2, 3] if args.tiny else [0, 4, 8, 11]
    make_student = functools.partial(student_from_teacher, teacher32, layers=keep, dtype="float32")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    print(f"teacher: Llama, {count(teacher32) / 1e6:.1f}M parameters (V = {config['vocab_size']}, "
          f"{config['num_hidden_layers']} layers); student: layers {keep} of it, {count(make_student()) / 1e6:.1f}M, "
          f"fp32; blocks of {seq} tokens, batch {args.batch}; {args.threads} thread(s), {args.clock} time; "
          f"torch {torch.__version__}")

    rows: list[tuple[str, str, float]] = []  # (what, teacher dtype, tokens/s)
    for name, teacher in teachers.items():
        rate = forward_rate(teacher, data, batches=min(3, n_batches - 1))
        rows.append(("teacher forward (no grad)", name, rate))
        print(f"  teacher forward {name}: {rate:,.0f} tok/s", flush=True)

    root = Path(tempfile.mkdtemp(prefix="ld-bench-pretrained-"))
    for name, teacher in teachers.items():
        for label, kw in CACHES.items():
            cache = TeacherCache(str(root / f"{name}-{kw['kind']}"), splits=["train"], progress=False,
                                 release_teacher=False, **kw)
            gc.collect()
            mod = module(make_student(), teacher)
            started = CLOCK()
            info = cache.prepare(mod, data)["train"]
            rate = info["positions"] / (CLOCK() - started)
            rows.append((f"cache build, {label} ({info['bytes_per_token']:.0f} B/token)", name, rate))
            print(f"  cache build {label} {name}: {rate:,.0f} tok/s", flush=True)

    train: list[tuple[str, str, float]] = []  # (what, teacher, seconds per step)
    variants = [("student only (task loss, no teacher)", "-", None, None)]
    for name in teachers:
        variants.append(("live teacher (KD + task)", name, name, None))
    for name in teachers:
        for label, kw in CACHES.items():
            variants.append((f"cached {label} (KD + task)", name, name, root / f"{name}-{kw['kind']}"))
    for label, shown, name, cache_dir in variants:
        gc.collect()
        torch.manual_seed(0)
        mod = module(make_student(), teachers[name] if name else None, kd=name is not None)
        callbacks = []
        if cache_dir is not None:
            kw = CACHES[label.removeprefix("cached ").removesuffix(" (KD + task)")]
            callbacks = [TeacherCache(str(cache_dir), splits=["train"], progress=False, release_teacher=False, **kw)]
        seconds = timed_fit(mod, data, callbacks, steps, warmup)
        train.append((label, shown, seconds))
        print(f"  train {label} {shown}: {args.batch * seq / seconds:,.0f} tok/s", flush=True)

    base = train[0][2]
    print(f"\n{n_tokens} tokens in the cached split; training: mean of {steps} steps after {warmup} warm-up.\n")
    print("| what | teacher | tokens/s | / student-only training |")
    print("|---|---|---:|---:|")
    for what, name, rate in rows:
        print(f"| {what} | {name} | {rate:,.0f} | {rate / (args.batch * seq / base):.2f} |")
    for what, name, seconds in train:
        print(f"| train: {what} | {name} | {args.batch * seq / seconds:,.0f} | {base / seconds:.2f} |")


if __name__ == "__main__":
    main()
