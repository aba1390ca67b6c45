"""Teacher cache on the demo: bytes per token, step cost, epoch cost, quality, temperature error.

Everything runs on the demo (``conf/``: demo teacher, demo student, the demo corpus; V = 2048,
batches of 16 x 128 tokens) and every number is a ratio against a baseline measured in the
same run:

* ``bytes``: bytes per token of the train split for dense, top-k (k = 8, 32, 64) and sampled
  (N = 16, 50) caches, and each against dense;
* ``step``: a training step with cached targets (KD + task loss at T = 1) / a student-only
  step (task loss alone), same student and batches; also dense and top-k caches, the live
  teacher, and sampled at T = 2 (no shared softmax there). Cached steps are timed once every
  sample was read (what every epoch after the first costs) and, for sampled, also in the first
  epoch (each sample's token hash checked on its first read);
* ``epoch``: one epoch over the train split once the cache exists (what every epoch after
  the first costs) / the same epoch with the live teacher;
* ``quality``: the demo at equal steps (300) with targets from each kind, evaluated against
  the live teacher on the test split: KL(teacher || student) per token, student perplexity,
  top-1 agreement per slice;
* ``temperature``: how far sparse KD is from dense KD when training at T != 1 on cached
  targets (relative error of the forward-KL value, cosine of the student-logit gradients),
  on test batches with the live-KD student from ``quality`` (or a fresh one).

Keep the machine otherwise idle (two processes on two cores slow each other down).

    python benchmarks/teacher_cache.py                         # everything, ~18 minutes
    python benchmarks/teacher_cache.py --parts bytes step      # ~7 minutes
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

KINDS = {
    "dense": {"kind": "dense"},
    "topk8": {"kind": "topk", "k": 8},
    "topk32": {"kind": "topk", "k": 32},
    "topk64": {"kind": "topk", "k": 64},
    "sampled16": {"kind": "sampled", "num_samples": 16},
    "sampled50": {"kind": "sampled", "num_samples": 50},
    "sampled50+logprobs": {"kind": "sampled", "num_samples": 50, "store_logprobs": True},
    "sampled50 uncompressed": {"kind": "sampled", "num_samples": 50, "compression": None},
    "topk32 uncompressed": {"kind": "topk", "k": 32, "compression": None},
}


def compose(*overrides: str):
    from hydra import compose as hydra_compose
    from hydra import initialize_config_dir

    from lightning_distill.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return hydra_compose(config_name="distill", overrides=[*overrides, "output_dir=/tmp/ld-bench-cache"])


class Demo:
    """The demo's data module, teacher and a student factory, built once."""

    def __init__(self) -> None:
        from lightning_distill.cli import _instantiate

        self.cfg = compose()
        self.data = _instantiate(self.cfg.data)
        self.data.prepare_data()
        self.data.setup("fit")
        self.teacher = _instantiate(self.cfg.teacher, datamodule=self.data)

    def student(self):
        from lightning_distill.cli import _instantiate

        return _instantiate(self.cfg.student)

    def module(self, losses: dict, teacher: bool = True):
        from lightning_distill import DistillationModule

        return DistillationModule(self.student(), self.teacher if teacher else None, losses,
                                  optimizer=functools.partial(torch.optim.AdamW, lr=3e-3))


def losses(temperature: float = 1.0, kd: bool = True) -> dict:
    from lightning_distill.losses import LogitKD, TaskLoss

    if not kd:
        return {"task": TaskLoss(weight=1.0)}
    return {"kd": LogitKD("forward_kl", temperature=temperature, weight=0.5), "task": TaskLoss(weight=0.5)}


def cache(root: Path, name: str, splits=("train",)):
    from lightning_distill.callbacks import TeacherCache

    return TeacherCache(str(root / name), splits=list(splits), progress=False, release_teacher=False, **KINDS[name])


# ------------------------------------------------------------------------------------ bytes
def part_bytes(demo: Demo, root: Path) -> list[str]:
    rows = []
    for name in KINDS:
        cb = cache(root, name)
        started = time.perf_counter()
        info = cb.prepare(demo.module(losses()), demo.data)["train"]
        rows.append((name, cb.spec.params(), info, time.perf_counter() - started))
    dense = rows[0][2]["bytes_per_token"]
    out = [f"Train split: {rows[0][2]['samples']} samples, {rows[0][2]['positions']} tokens, V = "
           f"{demo.data.vocab_size}\n", "| kind | params | bytes/token | / dense | cache MiB | build s |",
           "|---|---|---:|---:|---:|---:|"]
    for name, params, info, seconds in rows:
        shown = {k: v for k, v in params.items()
                 if k not in ("hidden_layers", "dtype", "seed", "sample_temperature", "store_logprobs")}
        if params.get("store_logprobs"):
            shown["logprobs"] = True
        if KINDS[name].get("compression", "zlib") is None:
            shown["compression"] = None
        out.append(f"| {name} | {shown or ''} | {info['bytes_per_token']:.1f} | {info['bytes_per_token'] / dense:.4f} "
                   f"| {info['bytes'] / 2**20:.1f} | {seconds:.0f} |")
    return out


# ------------------------------------------------------------------------------------ steps
class StepTimer:
    def __init__(self) -> None:
        import lightning as L

        class _T(L.Callback):
            def __init__(cb) -> None:
                cb.starts: list[float] = []

            def on_train_batch_start(cb, *args) -> None:
                cb.starts.append(time.perf_counter())

            def on_train_end(cb, *args) -> None:
                cb.starts.append(time.perf_counter())

        self.callback = _T()

    def times(self, skip: int) -> list[float]:
        s = self.callback.starts
        return [b - a for a, b in zip(s, s[1:])][skip:]


def _fit(module, demo: Demo, callbacks: list, *, max_steps: int = -1, max_epochs: int = -1) -> StepTimer:
    import lightning as L

    timer = StepTimer()
    trainer = L.Trainer(max_steps=max_steps, max_epochs=max_epochs, accelerator="cpu", logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        limit_val_batches=0, num_sanity_val_steps=0, gradient_clip_val=1.0,
                        callbacks=[*callbacks, timer.callback], log_every_n_steps=25)
    trainer.fit(module, demo.data)
    return timer


# label: (KD term, cache kind or None (live teacher / none), temperature, epoch). "first": the
# run's first read of every sample (its token hash is checked); "later": what every later
# epoch (and run of the same process) costs.
STEP_VARIANTS = {
    "student only (task loss)": (False, None, 1.0, "first"),
    "cached sampled N=50, T=1": (True, "sampled50", 1.0, "later"),
    "cached sampled N=50, T=1, first epoch": (True, "sampled50", 1.0, "first"),
    "cached top-k 32, T=1": (True, "topk32", 1.0, "later"),
    "cached dense, T=1": (True, "dense", 1.0, "later"),
    "cached sampled N=50 (+logprobs), T=2": (True, "sampled50+logprobs", 2.0, "later"),
    "live teacher, T=1": (True, None, 1.0, "first"),
}


def _seen_cache(demo: Demo, root: Path, kind: str, module) -> object:
    """A cache callback whose reader has served every train sample once (as in epoch 2)."""
    callback = cache(root, kind)
    callback.prepare(module, demo.data, splits=["train"])
    for batch in demo.data.train_dataloader():
        callback.attach("train", module, batch)
    return callback


def part_step(demo: Demo, root: Path, steps: int, repeats: int) -> list[str]:
    for name in ("sampled50", "sampled50+logprobs", "topk32", "dense"):
        cache(root, name).prepare(demo.module(losses()), demo.data)
    results: dict[str, list[float]] = {k: [] for k in STEP_VARIANTS}
    warmup = 10
    _fit(demo.module(losses(kd=False), teacher=False), demo, [], max_steps=warmup)  # the process's first fit is slow
    for repeat in range(repeats):
        # Every other repeat runs the variants in reverse order, so slow drifts of the machine
        # (and what a variant leaves behind for the next) fall on every variant alike.
        order = list(STEP_VARIANTS) if repeat % 2 == 0 else list(reversed(STEP_VARIANTS))
        for label in order:
            kd, kind, temperature, epoch = STEP_VARIANTS[label]
            gc.collect()
            torch.manual_seed(0)
            module = demo.module(losses(temperature, kd=kd), teacher=kd)
            if kind is None:
                callbacks = []
            else:
                callbacks = [cache(root, kind) if epoch == "first" else _seen_cache(demo, root, kind, module)]
            gc.collect()
            timer = _fit(module, demo, callbacks, max_steps=steps + warmup)
            results[label].append(statistics.mean(timer.times(warmup)))
    base = results["student only (task loss)"]
    out = [f"{repeats} repeats of every variant (variants in alternating order); each run: the mean of {steps} "
           f"steps after {warmup} warm-up; batch 16 x 128, V = 2048. Cached runs read a cache whose every sample "
           "was already served once (later epochs) unless marked first epoch. The ratio is the median over "
           "repeats of (variant / student-only of the same repeat), which a slow drift of the machine "
           "leaves alone:\n",
           "| step | ms (median) | / student-only | per repeat |", "|---|---:|---:|---|"]
    for label, values in results.items():
        ratios = [v / b for v, b in zip(values, base, strict=True)]
        runs = " ".join(f"{r:.3f}" for r in ratios)
        out.append(f"| {label} | {statistics.median(values) * 1e3:.1f} | {statistics.median(ratios):.3f} | {runs} |")
    return out


def part_epoch(demo: Demo, root: Path) -> list[str]:
    cache(root, "sampled50").prepare(demo.module(losses()), demo.data)
    rows = []
    for label, kind in (("live teacher", None), ("cached sampled N=50", "sampled50")):
        torch.manual_seed(0)
        module = demo.module(losses())
        started = time.perf_counter()
        timer = _fit(module, demo, [cache(root, kind)] if kind else [], max_epochs=1)
        rows.append((label, time.perf_counter() - started, len(timer.times(0))))
    live = rows[0][1]
    out = ["One epoch over the train split (the cache already built), KD + task at T=1:\n",
           "| epoch | steps | seconds | / live |", "|---|---:|---:|---:|"]
    for label, seconds, n in rows:
        out.append(f"| {label} | {n} | {seconds:.1f} | {seconds / live:.3f} |")
    return out


# ------------------------------------------------------------------------------------ quality
QUALITY = ["live", "dense", "topk8", "topk32", "sampled16", "sampled50"]


def part_quality(root: Path, steps: int) -> tuple[list[str], str | None]:
    from omegaconf import open_dict

    from lightning_distill.cli import run

    results, student_dir = {}, None
    for name in QUALITY:
        overrides = [f"trainer.max_steps={steps}", "baseline=false", f"export={'true' if name == 'live' else 'false'}",
                     "+trainer.enable_progress_bar=false", "logger=none", f"output_dir={root / ('q-' + name)}"]
        if name != "live":
            kind = KINDS[name]
            cb = "teacher_cache_" + kind["kind"]
            overrides += [f"callbacks={cb}", f"callbacks.teacher_cache.dirpath={root / name}",
                          "callbacks.teacher_cache.splits=[train]"]  # val/test: the live teacher scores
            overrides += [f"callbacks.teacher_cache.{k}={v}" for k, v in kind.items() if k != "kind"]
        cfg = compose(*overrides)
        with open_dict(cfg):
            for key in [k for k in cfg.callbacks if k not in ("teacher_cache",)]:
                del cfg.callbacks[key]
        report = run(cfg)
        results[name] = report["slices"]
        if name == "live":
            student_dir = report.get("student_dir")
    slices = list(next(iter(results.values())))
    out = [f"Demo, {steps} steps, T=1, KD + task; test split scored against the live teacher:\n",
           "| slice | targets | KL(t‖s) | student ppl | top-1 agree |", "|---|---|---:|---:|---:|"]
    for s in slices:
        for name, stats in results.items():
            st = stats[s]
            out.append(f"| {s} | {name} | {st['mean_kl']:.4f} | {st['student_perplexity']:.2f} | "
                       f"{st['agreement_rate']:.4f} |")
    return out, student_dir


# ------------------------------------------------------------------------------------ temperature
def part_temperature(demo: Demo, student_dir: str | None, batches: int = 4) -> list[str]:
    from lightning_distill.cache.format import CacheSpec, LoadedShard, assemble, encode_sample
    from lightning_distill.losses import functional as LF

    if student_dir:
        from transformers import AutoModelForCausalLM

        student = AutoModelForCausalLM.from_pretrained(student_dir).eval()
        origin = "the live-KD student after the quality runs"
    else:
        student = demo.student().eval()
        origin = "an untrained student (run with --parts quality for a trained one)"
    loader = demo.data.test_dataloader()
    taken = [b for _, b in zip(range(batches), loader)]
    rows = []
    for name in ("topk8", "topk32", "topk64", "sampled16", "sampled50"):
        params = KINDS[name]
        spec = CacheSpec(kind=params["kind"], vocab_size=demo.data.vocab_size, k=params.get("k"),
                         num_samples=params.get("num_samples"))
        for temperature in (1.0, 2.0, 4.0):
            dense_values, sparse_values, dots, norms_d, norms_s = [], [], 0.0, 0.0, 0.0
            for batch in taken:
                ids = batch["input_ids"]
                with torch.no_grad():
                    t_logits = demo.teacher(input_ids=ids).logits.float()
                    s_logits = student(input_ids=ids).logits.float()
                labels = torch.nn.functional.pad(ids[:, 1:], (0, 1), value=-100)
                pieces = []
                for b in range(ids.shape[0]):
                    enc = encode_sample(spec, t_logits[b], labels[b], ignore_index=-100, split="test",
                                        sample_id=int(batch["sample_id"][b]))
                    shard = LoadedShard({"sample.ids": torch.tensor([0]), "sample.token_hash": torch.tensor([0]),
                                         "sample.lengths": torch.tensor([ids.shape[1]], dtype=torch.int32), **enc})
                    pieces.append(shard.take([0]))
                lengths = [ids.shape[1]] * ids.shape[0]
                sparse = assemble(spec, pieces, lengths, tuple(ids.shape), torch.device("cpu")).sparse
                zd = s_logits.clone().requires_grad_(True)
                dense = LF.forward_kl(zd, t_logits, temperature=temperature, labels=labels)
                dense.backward()
                zs = s_logits.clone().requires_grad_(True)
                approx = LF.sparse_forward_kl(zs, sparse, temperature=temperature, labels=labels)
                approx.backward()
                dense_values.append(float(dense))
                sparse_values.append(float(approx))
                dots += float((zd.grad * zs.grad).sum())
                norms_d += float(zd.grad.square().sum())
                norms_s += float(zs.grad.square().sum())
            d, s = statistics.mean(dense_values), statistics.mean(sparse_values)
            rows.append((name, temperature, d, s, (s - d) / d, dots / (norms_d * norms_s) ** 0.5))
    out = [f"Forward KL on {batches} test batches, student = {origin}: sparse targets vs dense logits at "
           "training temperature T (the cache is built at T=1):\n",
           "| targets | T | dense KL | sparse KL | relative error | gradient cosine |", "|---|---:|---:|---:|---:|---:|"]
    for name, t, d, s, rel, cos in rows:
        out.append(f"| {name} | {t:g} | {d:.4f} | {s:.4f} | {rel:+.3f} | {cos:.4f} |")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", default=["bytes", "step", "epoch", "quality", "temperature"],
                        choices=["bytes", "step", "epoch", "quality", "temperature"])
    parser.add_argument("--steps", type=int, default=100, help="timed steps per step-cost run")
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--quality-steps", type=int, default=300)
    parser.add_argument("--json", type=Path, default=None)
    args = parser.parse_args()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import warnings

    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)
    sections: dict[str, list[str]] = {}
    student_dir = None

    def done(name: str, lines: list[str]) -> None:  # print (and save) each part as it finishes
        sections[name] = lines
        print(f"\n## {name}\n\n" + "\n".join(lines), flush=True)
        if args.json:
            args.json.write_text(json.dumps(sections, indent=2))

    with tempfile.TemporaryDirectory(prefix="ld-cache-bench-") as tmp:
        root = Path(tmp)
        demo = Demo()
        if "bytes" in args.parts:
            done("bytes", part_bytes(demo, root))
        if "step" in args.parts:
            done("step", part_step(demo, root, args.steps, args.repeats))
        if "epoch" in args.parts:
            done("epoch", part_epoch(demo, root))
        if "quality" in args.parts:
            lines, student_dir = part_quality(root, args.quality_steps)
            done("quality", lines)
        if "temperature" in args.parts:
            done("temperature", part_temperature(demo, student_dir))
    print("\n\n".join(f"## {name}\n\n" + "\n".join(lines) for name, lines in sections.items()))


if __name__ == "__main__":
    main()
