"""Peak working memory (and time) of the KD loss: naive full-tensor ops vs the chunked functions.

For each variant, forward + backward of the loss is run on full student logits (a float32
leaf tensor that requires grad, shape ``(N, V)``) and teacher logits of the same shape. What
is measured is the PEAK WORKING MEMORY ABOVE THE INPUTS: everything the loss allocates on top
of the two logits tensors, including the student-logits gradient it leaves in ``.grad``. It is
reported in MiB and as a ratio to the size of that gradient (``N * V * 4`` bytes).

Method:

* CUDA (when available and ``--device`` is not ``cpu``): ``torch.cuda.max_memory_allocated``
  after ``reset_peak_memory_stats``, minus ``memory_allocated`` once the inputs exist.
* CPU (Linux): every variant runs in a fresh interpreter (``subprocess`` with
  ``sys.executable``). The worker runs the variant once on a small slice (so that library,
  thread-pool and allocator start-up is not counted), allocates the inputs, reads ``VmRSS``
  from ``/proc/self/status``, resets the resident-set high-water mark by writing ``5`` to
  ``/proc/self/clear_refs``, runs forward + backward, and reports ``VmHWM - VmRSS_before``.
  glibc is pinned to a fixed mmap threshold (``MALLOC_MMAP_THRESHOLD_``), so every large
  buffer is its own mapping that goes back to the kernel when freed: the warm-up leaves no
  freed-but-resident heap behind for the measured run to reuse (which would hide memory),
  and RSS tracks the live tensors. Without a writable ``clear_refs`` the worker falls back
  to the high-water mark since start, which also includes the warm-up and the allocation of
  the inputs (an upper bound; it is flagged in the output).
* The method is checked on known cases in the same run: doing nothing (expect ~0x), and
  allocating and filling one extra ``(N, V)`` float32 tensor (expect ~1.0x).

Wall time: the same forward + backward, timed in the same process: the measured run plus
``--time-repeats`` more (default 1), best of them (the first run also pays the page faults of
fresh memory). On a shared machine the times are noisy; the memory is not.

Usage::

    python benchmarks/kd_loss_memory.py                   # V=32000, N=8192 (~1 GiB per tensor)
    python benchmarks/kd_loss_memory.py --tokens 1024     # quick run
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

MIB = 2**20

# Each entry: variant -> (the naive variant it is compared with, description).
VARIANTS: dict[str, tuple[str | None, str]] = {
    "calib_noop": (None, "method check: nothing (expect ~0x)"),
    "calib_one_tensor": (None, "method check: one extra (N, V) float32 tensor (expect ~1.0x)"),
    "naive_forward_kl": (
        "naive_forward_kl",
        "F.kl_div(log_softmax(s/T), log_softmax(t/T), log_target, batchmean)",
    ),
    "chunked_forward_kl": ("naive_forward_kl", "functional.forward_kl (chunked)"),
    "naive_generalized_jsd": (
        "naive_generalized_jsd",
        "JSD(beta=0.5) from full log_softmax / logsumexp / kl_div",
    ),
    "chunked_generalized_jsd": ("naive_generalized_jsd", "functional.generalized_jsd (chunked)"),
    "naive_cross_entropy": ("naive_cross_entropy", "F.cross_entropy(s, labels)"),
    "chunked_cross_entropy": ("naive_cross_entropy", "functional.cross_entropy (chunked)"),
}
DEFAULT_VARIANTS = list(VARIANTS)


# ------------------------------------------------------------------------------------------
# Worker side: one variant, in its own process.
# ------------------------------------------------------------------------------------------
def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def _reset_hwm() -> bool:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _loss_fn(variant: str, temperature: float, chunk_size: int | None, beta: float = 0.5):
    import torch
    import torch.nn.functional as F

    from lightning_distill.losses import functional as LF

    T = temperature

    def naive_forward_kl(s, t, labels):
        return F.kl_div(
            F.log_softmax(s / T, -1),
            F.log_softmax(t / T, -1),
            log_target=True,
            reduction="batchmean",
        )

    def naive_generalized_jsd(s, t, labels):
        # As a straightforward GKD implementation writes it (e.g. TRL's generalized_jsd_loss).
        log_q = F.log_softmax(s / T, -1)
        log_p = F.log_softmax(t / T, -1)
        log_m = torch.logsumexp(
            torch.stack([log_q + math.log(1 - beta), log_p + math.log(beta)]), dim=0
        )
        kl_teacher = F.kl_div(log_m, log_p, reduction="batchmean", log_target=True)
        kl_student = F.kl_div(log_m, log_q, reduction="batchmean", log_target=True)
        return beta * kl_teacher + (1 - beta) * kl_student

    table = {
        "naive_forward_kl": naive_forward_kl,
        "chunked_forward_kl": lambda s, t, labels: LF.forward_kl(
            s, t, temperature=T, chunk_size=chunk_size
        ),
        "naive_generalized_jsd": naive_generalized_jsd,
        "chunked_generalized_jsd": lambda s, t, labels: LF.generalized_jsd(
            s, t, beta=beta, temperature=T, chunk_size=chunk_size
        ),
        "naive_cross_entropy": lambda s, t, labels: F.cross_entropy(s, labels),
        "chunked_cross_entropy": lambda s, t, labels: LF.cross_entropy(
            s, labels, chunk_size=chunk_size
        ),
    }
    return table[variant]


def _run_once(variant: str, s, t, labels, fn):
    """Forward + backward of one variant; returns what must stay alive until measured."""
    import torch

    if variant == "calib_noop":
        return None
    if variant == "calib_one_tensor":
        extra = torch.empty_like(s)
        extra.fill_(1.0)
        return extra
    s.grad = None
    loss = fn(s, t, labels)
    loss.backward()
    return loss.detach()


def worker(args: argparse.Namespace) -> dict:
    import torch

    torch.manual_seed(0)
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    n, v = args.tokens, args.vocab
    fn = (
        None
        if args.worker.startswith("calib_")
        else _loss_fn(args.worker, args.temperature, args.chunk_size)
    )

    def inputs(rows: int):
        s = torch.randn(rows, v, device=device).requires_grad_(True)
        t = torch.randn(rows, v, device=device)
        labels = torch.randint(0, v, (rows,), device=device)
        return s, t, labels

    # Warm-up on a small slice: library, kernel and thread-pool initialisation is not counted.
    warm = inputs(min(n, 64))
    _run_once(args.worker, *warm, fn)
    del warm

    s, t, labels = inputs(n)
    if device.type == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        keep = _run_once(args.worker, s, t, labels, fn)
        torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        peak = torch.cuda.max_memory_allocated() - before
        method = "cuda.max_memory_allocated"
    else:
        import gc

        gc.collect()
        before_kib = _status_kib("VmRSS")
        exact = _reset_hwm()
        start = time.perf_counter()
        keep = _run_once(args.worker, s, t, labels, fn)
        elapsed = time.perf_counter() - start
        peak = (_status_kib("VmHWM") - before_kib) * 1024
        method = "VmHWM after clear_refs" if exact else "VmHWM since start (fallback, upper bound)"
    del keep
    # More timed repetitions (not measured for memory); the time reported is the best one.
    times = [elapsed]
    for _ in range(args.time_repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        keep = _run_once(args.worker, s, t, labels, fn)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
        del keep
    return {
        "variant": args.worker,
        "peak_bytes": peak,
        "seconds": min(times),
        "seconds_measured_run": elapsed,
        "method": method,
    }


# ------------------------------------------------------------------------------------------
# Driver side.
# ------------------------------------------------------------------------------------------
def _spawn(variant: str, args: argparse.Namespace) -> dict:
    env = dict(os.environ)
    # Fixed glibc mmap threshold: large buffers are mmapped and unmapped on free, never kept
    # in the heap (the dynamic threshold would otherwise rise after the warm-up frees).
    env.setdefault("MALLOC_MMAP_THRESHOLD_", str(128 * 1024))
    env.setdefault("MALLOC_TRIM_THRESHOLD_", str(128 * 1024))
    env.setdefault("MALLOC_ARENA_MAX", "2")
    repo_root = str(Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = repo_root + (
        os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else ""
    )
    cmd = [
        sys.executable,
        str(Path(__file__).resolve()),
        "--worker",
        variant,
        "--vocab",
        str(args.vocab),
        "--tokens",
        str(args.tokens),
        "--temperature",
        str(args.temperature),
        "--device",
        args.device,
        "--time-repeats",
        str(args.time_repeats),
    ]
    if args.threads is not None:
        cmd += ["--threads", str(args.threads)]
    if args.chunk_size is not None:
        cmd += ["--chunk-size", str(args.chunk_size)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"variant {variant} failed (exit {proc.returncode}):\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _default_device() -> str:
    try:
        import torch

        return "cuda" if torch.cuda.is_available() else "cpu"
    except ImportError:  # pragma: no cover
        return "cpu"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vocab", type=int, default=32000, help="V, the vocabulary size")
    parser.add_argument("--tokens", type=int, default=8192, help="N, the number of positions")
    parser.add_argument("--temperature", type=float, default=2.0)
    parser.add_argument(
        "--chunk-size",
        type=int,
        default=None,
        help="positions per chunk of the chunked functions (default: library default)",
    )
    parser.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    parser.add_argument(
        "--time-repeats",
        type=int,
        default=1,
        help="extra timed runs per variant after the measured one; the best time is shown",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch.set_num_threads in each worker (default: torch's default). On a "
        "shared, oversubscribed CPU, 1 avoids OpenMP barrier stalls that slow the "
        "many small ops of the chunked variants far more than the naive ones",
    )
    parser.add_argument("--variants", nargs="+", default=DEFAULT_VARIANTS, choices=list(VARIANTS))
    parser.add_argument("--json", type=Path, default=None, help="also write the results here")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.device = args.device or _default_device()

    if args.worker is not None:
        print(json.dumps(worker(args)))
        return

    grad_bytes = args.tokens * args.vocab * 4
    print(
        f"# KD loss peak working memory above the inputs: N={args.tokens}, V={args.vocab}, "
        f"T={args.temperature}, device={args.device}"
    )
    print(
        f"# student-logits gradient: {grad_bytes / MIB:.0f} MiB; chunk size: "
        f"{args.chunk_size if args.chunk_size is not None else 'library default'}; threads: "
        f"{args.threads if args.threads is not None else 'torch default'}"
    )
    results = {}
    for variant in args.variants:
        results[variant] = _spawn(variant, args)
        r = results[variant]
        print(f"#   {variant}: {r['peak_bytes'] / MIB:.0f} MiB, {r['seconds']:.2f} s", flush=True)
    methods = {r["method"] for r in results.values()}
    print(f"# method: {', '.join(sorted(methods))}; each variant in a fresh process\n")

    print(
        "| variant | peak above inputs (MiB) | ratio to grad size | ratio to naive "
        "| time (s) | time ratio to naive |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for variant, r in results.items():
        base_name = VARIANTS[variant][0]
        base = results.get(base_name) if base_name else None
        mem_ratio = (
            f"{r['peak_bytes'] / base['peak_bytes']:.2f}x"
            if base and base["peak_bytes"] > 0
            else "-"
        )
        time_ratio = (
            f"{r['seconds'] / base['seconds']:.2f}x" if base and base["seconds"] > 0 else "-"
        )
        print(
            f"| {variant} | {r['peak_bytes'] / MIB:.0f} | {r['peak_bytes'] / grad_bytes:.2f}x "
            f"| {mem_ratio} | {r['seconds']:.2f} | {time_ratio} |"
        )
    print()
    for variant in results:
        print(f"- {variant}: {VARIANTS[variant][1]}")
    if args.json is not None:
        args.json.write_text(
            json.dumps(
                {
                    "args": {k: v for k, v in vars(args).items() if k != "json"},
                    "grad_bytes": grad_bytes,
                    "results": results,
                },
                indent=2,
            )
        )


if __name__ == "__main__":
    main()
