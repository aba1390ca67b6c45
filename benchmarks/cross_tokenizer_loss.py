"""Time and peak memory of the cross-tokenizer losses against LogitKD on the same shapes.

Forward + backward of each loss on random logits and a synthetic alignment (student groups of
1-3 tokens, teacher groups of 1-2, as two BPEs of the same text give; about 15% of the student's
vocabulary is its own; each id spells its own string, so the loss looks up every multi-token
group's text, and none is one entry, as on the demo's BPE pair), in two cases:

* ``demo``: the demo's shapes, batch 16 x 128 student tokens, vocabularies 1,024 (student) and
  2,048 (teacher);
* ``large``: vocabularies 32,000 and 50,000 (20,000 shared), batch 4 x 256.

Variants: ``LogitKD`` (forward KL, the student's logits against a teacher of the student's shape:
the same-tokenizer step this is compared with, and the baseline of every ratio), the direct
formulation the library had before (``_reference_*``: log-softmax of every position, all head
rows at once, ``torch.sort``), and the chunked one (``CrossTokenizerKD`` / ``ULDLoss``, auto
chunk size and ``chunk_size=4``).

Time: process CPU time of forward + backward with one torch thread (so that other load on a
shared machine counts little), all variants in one interpreter with the default allocator,
interleaved round by round, best of ``--repeats`` rounds after an untimed one. Memory: each variant runs in a fresh
interpreter, as in ``kd_loss_memory.py``: after a warm-up and once the inputs exist, the
resident-set high-water mark is reset (``/proc/self/clear_refs``), the loss runs forward +
backward, and the peak above the inputs is ``VmHWM - VmRSS`` (it includes the student-logits
gradient the loss leaves in ``.grad``); shown in MiB and as a multiple of that gradient's size.

Last, a training step of the demo's models (``DistillationModule.training_step`` + backward,
no optimizer, CPU time with one thread): the same student with one tokenizer and ``LogitKD``
against two tokenizers (the teacher's vocabulary of 2,048) and the hybrid, before and chunked.

Usage::

    python benchmarks/cross_tokenizer_loss.py                 # both cases and the step table (about 6 minutes)
    python benchmarks/cross_tokenizer_loss.py --cases demo
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from kd_loss_memory import (  # the same peak-memory probes (run as a script from here)
    _reset_hwm,
    _status_kib,
)

MIB = 2**20
CASES = {
    # name: (batch, student tokens, student vocabulary, teacher vocabulary, shared entries)
    "demo": (16, 128, 1024, 2048, 870),
    "large": (4, 256, 32000, 50000, 20000),
}
VARIANTS = {
    "logit_kd": "LogitKD forward_kl (same shapes, one tokenizer)",
    "reference_hybrid": "hybrid, direct formulation (before)",
    "hybrid": "CrossTokenizerKD (chunked, auto)",
    "hybrid_chunk4": "CrossTokenizerKD(chunk_size=4)",
    "reference_uld": "ULD, direct formulation (before)",
    "uld": "ULDLoss (chunked, auto)",
}


def make_inputs(case: str, seed: int = 0):
    """Random logits, a synthetic alignment and a shared-vocabulary map for ``case``."""
    import torch

    from lightning_distill.crosstok.vocab import SharedVocab

    batch, length, vs, vt, shared = CASES[case]
    g = torch.Generator().manual_seed(seed)
    s_shared, t_shared = (
        torch.randperm(vs, generator=g)[:shared],
        torch.randperm(vt, generator=g)[:shared],
    )
    # Spellings (what each id stands for), so that the loss looks up each multi-token group's text
    # as with real tokenizers; no group's text is one entry here (none was on the demo's BPE pair).
    s_keys = [f"s{i}|".encode() for i in range(vs)]
    t_keys = [f"t{i}|".encode() for i in range(vt)]
    for k, (i, j) in enumerate(zip(s_shared.tolist(), t_shared.tolist(), strict=True)):
        s_keys[i] = t_keys[j] = f"k{k}|".encode()
    vocab = SharedVocab(s_shared, t_shared, vs, vt, tuple(s_keys), tuple(t_keys))
    s_groups = torch.full((batch, length), -1)
    s_ids = torch.randint(0, vs, (batch, length), generator=g)
    t_rows: list[tuple[list[int], list[int]]] = []
    for b in range(batch):
        s_list: list[int] = []
        t_groups_row: list[int] = []
        t_ids_row: list[int] = []
        group = 0
        while True:
            ns = 1 + int(torch.rand(1, generator=g) < 0.35) + int(torch.rand(1, generator=g) < 0.1)
            nt = 1 + int(torch.rand(1, generator=g) < 0.12)
            if len(s_list) + ns > length - (b % 3) * 5:  # some padding at the end of some rows
                break
            if ns == 1:  # a one-token group: the same shared token on both sides (same text)
                k = int(torch.randint(0, shared, (1,), generator=g))
                s_ids[b, len(s_list)] = vocab.student_ids[k]
                t_ids_row.append(int(vocab.teacher_ids[k]))
                nt = 1
            else:
                t_ids_row += torch.randint(0, vt, (nt,), generator=g).tolist()
            s_list += [group] * ns
            t_groups_row += [group] * nt
            group += 1
        s_groups[b, : len(s_list)] = torch.tensor(s_list)
        t_rows.append((t_groups_row, t_ids_row))
    t_len = max(len(r[0]) for r in t_rows)
    t_groups = torch.full((batch, t_len), -1)
    t_ids = torch.zeros(batch, t_len, dtype=torch.long)
    for b, (groups_row, ids_row) in enumerate(t_rows):
        t_groups[b, : len(groups_row)] = torch.tensor(groups_row)
        t_ids[b, : len(ids_row)] = torch.tensor(ids_row)
    labels = torch.cat([s_ids[:, 1:], torch.full((batch, 1), -100)], 1)
    labels = labels.masked_fill(
        torch.cat([s_groups[:, 1:], torch.full((batch, 1), -1)], 1) <= 0, -100
    )
    data = {
        "input_ids": s_ids,
        "teacher_input_ids": t_ids,
        "student_groups": s_groups,
        "teacher_groups": t_groups,
        "labels": labels,
    }
    student = torch.randn(batch, length, vs, generator=g) * 2
    teacher = torch.randn(batch, t_len, vt, generator=g) * 2
    same_teacher = torch.randn(batch, length, vs, generator=g) * 2
    return data, labels, vocab, student, teacher, same_teacher


def loss_fn(variant: str, data, labels, vocab, temperature: float):
    """``fn(student, teacher, same_teacher) -> scalar loss`` for ``variant``."""
    from lightning_distill.losses import CrossTokenizerKD, LogitKD, ULDLoss
    from lightning_distill.losses import cross_tokenizer as ct
    from lightning_distill.types import LossInputs, TeacherTargets

    cross = ct.CrossTokenizerBatch.from_batch(data)

    def term_fn(term):
        if isinstance(term, CrossTokenizerKD):
            term._vocab = vocab

        def fn(s, t, same):
            target = (
                same if isinstance(term, LogitKD) and not isinstance(term, CrossTokenizerKD) else t
            )
            inputs = LossInputs(
                student_logits=s, labels=labels, teacher=TeacherTargets(logits=target), batch=data
            )
            return term(inputs)

        return fn

    if variant == "logit_kd":
        return term_fn(LogitKD(temperature=temperature))
    if variant == "hybrid":
        return term_fn(CrossTokenizerKD(temperature=temperature))
    if variant == "hybrid_chunk4":
        return term_fn(CrossTokenizerKD(temperature=temperature, chunk_size=4))
    if variant == "uld":
        return term_fn(ULDLoss(temperature=temperature))
    if variant == "reference_hybrid":

        def fn(s, t, same):
            div, rest, _ = ct._reference_cross_tokenizer_kd(
                s, t, cross, vocab, temperature=temperature, labels=labels
            )
            return div * temperature**2 + rest

        return fn
    if variant == "reference_uld":
        return lambda s, t, same: ct._reference_uld(
            s, t, cross, temperature=temperature, labels=labels
        )[0]
    raise ValueError(f"unknown variant {variant!r}; choose from {list(VARIANTS)}")


def _once(fn, s, t, same) -> float:
    s.grad = None
    value = fn(s, t, same)
    value.backward()
    return float(value)


def time_worker(args: argparse.Namespace) -> dict:
    """CPU seconds per variant, the variants interleaved round by round (load that comes and goes
    on a shared machine hits them alike), best round each; one untimed round first."""
    import torch

    torch.set_num_threads(1)
    data, labels, vocab, student, teacher, same = make_inputs(args.case)
    s = student.requires_grad_(True)
    fns = {v: loss_fn(v, data, labels, vocab, args.temperature) for v in args.worker.split(",")}
    times: dict[str, list[float]] = {v: [] for v in fns}
    values = {}
    for _ in range(args.repeats + 1):
        for variant, fn in fns.items():
            start = time.process_time()
            values[variant] = _once(fn, s, teacher, same)
            times[variant].append(time.process_time() - start)
    return {v: {"seconds": min(times[v][1:]), "value": values[v]} for v in fns}


def memory_worker(args: argparse.Namespace) -> dict:
    """Peak working memory of one variant above its inputs (run in a fresh interpreter)."""
    import gc

    import torch

    torch.set_num_threads(1)
    data, labels, vocab, student, teacher, same = make_inputs(args.case)
    # Warm-up on the first sample only (library and allocator start-up is not counted).
    small = {k: v[:1] for k, v in data.items()}
    warm = loss_fn(args.worker, small, labels[:1], vocab, args.temperature)
    _once(warm, student[:1].clone().requires_grad_(True), teacher[:1], same[:1])
    fn = loss_fn(args.worker, data, labels, vocab, args.temperature)
    s = student.requires_grad_(True)
    gc.collect()
    before = _status_kib("VmRSS")
    exact = _reset_hwm()
    _once(fn, s, teacher, same)
    peak = (_status_kib("VmHWM") - before) * 1024
    return {
        "peak_bytes": peak,
        "grad_bytes": s.numel() * 4,
        "method": "VmHWM after clear_refs" if exact else "VmHWM since start",
    }


def step_table(args: argparse.Namespace) -> dict:
    """A training step of the demo's models (``DistillationModule.training_step`` + backward, no
    optimizer): one tokenizer with ``LogitKD`` against two with the hybrid, before and chunked."""
    import warnings

    import torch

    from lightning_distill import DistillationModule
    from lightning_distill.losses import CrossTokenizerKD, LogitKD, TaskLoss
    from lightning_distill.losses import cross_tokenizer as ct
    from lightning_distill.models import causal_lm_from_config

    warnings.filterwarnings("ignore")  # training_step outside a Trainer: self.log warns
    torch.set_num_threads(1)
    data, labels, vocab, *_ = make_inputs("demo")
    arch = {"num_attention_heads": 4, "num_key_value_heads": 4, "tie_word_embeddings": True}
    teacher_arch = {"hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 3, **arch}
    student_arch = {"hidden_size": 64, "intermediate_size": 192, "num_hidden_layers": 2, **arch}
    t = args.temperature

    class Before(CrossTokenizerKD):
        def forward(self, inputs):
            cross = ct.CrossTokenizerBatch.from_batch(inputs.batch)
            div, rest, _ = ct._reference_cross_tokenizer_kd(
                inputs.student_logits,
                inputs.teacher.logits,
                cross,
                vocab,
                temperature=t,
                labels=inputs.labels,
            )
            return div * t**2 + rest

    def module(teacher_vocab: int, kd) -> DistillationModule:
        common = {"max_position_embeddings": 128}
        teacher = causal_lm_from_config(
            "llama", seed=1, vocab_size=teacher_vocab, **teacher_arch, **common
        )
        student = causal_lm_from_config("llama", seed=0, vocab_size=1024, **student_arch, **common)
        kd._vocab = vocab
        return DistillationModule(
            student, teacher.eval().requires_grad_(False), {"kd": kd, "task": TaskLoss(0.5)}
        )

    mask = (data["student_groups"] >= 0).long()
    step_labels = torch.where(mask > 0, data["input_ids"], -100)
    same = {"input_ids": data["input_ids"], "attention_mask": mask, "labels": step_labels}
    cross = {
        **data,
        "attention_mask": mask,
        "labels": step_labels,
        "teacher_attention_mask": (data["teacher_groups"] >= 0).long(),
    }
    variants = {
        "one tokenizer, LogitKD (teacher V=1024)": (
            module(1024, LogitKD(weight=0.5, temperature=t)),
            same,
        ),
        "two tokenizers, hybrid before (teacher V=2048)": (
            module(2048, Before(weight=0.5, temperature=t)),
            cross,
        ),
        "two tokenizers, CrossTokenizerKD (teacher V=2048)": (
            module(2048, CrossTokenizerKD(weight=0.5, temperature=t)),
            cross,
        ),
    }
    times: dict[str, list[float]] = {k: [] for k in variants}
    for _ in range(args.repeats + 1):
        for name, (m, batch) in variants.items():
            m.student.zero_grad(set_to_none=True)
            start = time.process_time()
            out = m.training_step(batch, 0)
            (out["loss"] if isinstance(out, dict) else out).backward()
            times[name].append(time.process_time() - start)
    best = {k: min(v[1:]) for k, v in times.items()}
    base = next(iter(best.values()))
    print(
        "\nstep: the demo's models, batch 16 x 128 student tokens, training_step + backward (CPU, 1 thread)\n"
    )
    print("| configuration | ms / step | ÷ one-tokenizer step |")
    print("|---|---:|---:|")
    for name, seconds in best.items():
        print(f"| {name} | {seconds * 1000:.1f} | {seconds / base:.2f} |")
    return best


def _spawn(variant: str, case: str, args: argparse.Namespace, measure: str) -> dict:
    env = dict(os.environ)
    if measure == "memory":
        # Fixed glibc mmap threshold: every large buffer is its own mapping, returned when freed,
        # so that RSS follows the live tensors. (Not for the times: it makes every large
        # allocation a fresh mapping, which the default allocator avoids.)
        env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
        env.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
        env.setdefault("MALLOC_ARENA_MAX", "2")
    root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        variant,
        "--case",
        case,
        "--temperature",
        str(args.temperature),
        "--repeats",
        str(args.repeats),
        "--measure",
        measure,
    ]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"variant {variant} ({case}) failed (exit {proc.returncode}):\n{proc.stderr}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument(
        "--repeats", type=int, default=5, help="timed runs per variant; the best is shown"
    )
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument(
        "--no-step", dest="step", action="store_false", help="skip the training-step table"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--case", default="demo", help=argparse.SUPPRESS)
    parser.add_argument("--measure", default="memory", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker is not None:
        print(json.dumps(time_worker(args) if args.measure == "time" else memory_worker(args)))
        return
    results = {}
    for case in args.cases:
        b, length, vs, vt, shared = CASES[case]
        timed = _spawn(",".join(args.variants), case, args, "time")
        rows = {v: {**_spawn(v, case, args, "memory"), **timed[v]} for v in args.variants}
        results[case] = rows
        base = rows.get("logit_kd")
        grad_mib = next(iter(rows.values()))["grad_bytes"] / MIB
        print(
            f"\n{case}: B={b}, student tokens {length}, Vs={vs}, Vt={vt}, shared {shared}; "
            f"T={args.temperature}; student-logits gradient {grad_mib:.0f} MiB; "
            f"{next(iter(rows.values()))['method']}\n"
        )
        print(
            "| variant | ms (CPU, 1 thread) | × LogitKD time | peak above inputs (MiB) | × gradient size |"
            " × LogitKD memory |"
        )
        print("|---|---:|---:|---:|---:|---:|")
        for variant, row in rows.items():
            t_ratio = f"{row['seconds'] / base['seconds']:.2f}" if base else "-"
            m_ratio = (
                f"{row['peak_bytes'] / base['peak_bytes']:.2f}"
                if base and base["peak_bytes"] > 0
                else "-"
            )
            print(
                f"| {VARIANTS[variant]} | {row['seconds'] * 1000:.1f} | {t_ratio} | {row['peak_bytes'] / MIB:.0f} |"
                f" {row['peak_bytes'] / row['grad_bytes']:.2f} | {m_ratio} |"
            )
        for a, b_ in (("reference_hybrid", "hybrid"), ("reference_uld", "uld")):
            if a in rows and b_ in rows:
                print(
                    f"\n{VARIANTS[b_]} ÷ {VARIANTS[a]}: time {rows[b_]['seconds'] / rows[a]['seconds']:.2f}, "
                    f"memory {rows[b_]['peak_bytes'] / max(rows[a]['peak_bytes'], 1):.2f}; values "
                    f"{rows[b_]['value']:.6g} vs {rows[a]['value']:.6g}"
                )
    if args.step:
        results["step"] = step_table(args)
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
