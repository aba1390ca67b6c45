"""Teacher-text generation throughput: the OpenAI-compatible path at concurrency 1, 4, 16, and local.

A small random Llama (``--hidden`` wide, ``--layers`` deep, a 300-token BPE) is served by the
loopback server (``lightning_distill.blackbox.serve``) and asked through ``OpenAITeacher`` for
``--prompts`` completions of up to ``--max-tokens`` tokens (``n=1``, temperature 1, the
completions endpoint) with ``concurrency`` 1, 4 and 16. Throughput is completion tokens (the
server's ``usage``) per second of wall time; the ratios are to concurrency 1 of the same server.

What this can and cannot show. The loopback server runs the model under one lock, one request at
a time, on the same CPU cores as the client: a compute-bound server, so more requests in flight
cannot make it generate faster; the ratio measures what the client's concurrency costs or saves
around that (HTTP and JSON overlapping with generation). A real deployment is mostly latency-bound
from the client's side: the network round trip and the server's queue, while a vLLM-style server
batches the requests it has in flight. To show that effect, the second block adds a simulated
latency per request (``--latency`` seconds of waiting in the server before it serves, outside the
model lock, via the ``slow:`` fault); there the client's concurrency overlaps the waits.

Last row: ``LocalHFTeacher`` on the same model and prompts, batched ``generate`` in this process
(``--batch-size`` prompts per call), as tokens per second and as a ratio to the server at
concurrency 1 without latency.

Each number is the median of ``--repeats`` interleaved runs, after one warm-up; torch uses one
thread (the server's and the local model alike).

    python benchmarks/blackbox_throughput.py                 # ~1-2 minutes on 2 cores
    python benchmarks/blackbox_throughput.py --repeats 1     # quick look
"""

from __future__ import annotations

import argparse
import logging
import statistics
import time

import torch

from lightning_distill.blackbox import LocalHFTeacher, OpenAITeacher, serve
from lightning_distill.data.tokenizer import train_bpe_tokenizer
from lightning_distill.models import causal_lm_from_config

WORDS = "alpha beta gamma delta def return import class the of and to in is for while".split()
CONCURRENCY = (1, 4, 16)


def build(hidden: int, layers: int):
    tokenizer = train_bpe_tokenizer([" ".join(WORDS) * 8, "def f(x):\n    return x + 1\n"], 300)
    torch.manual_seed(0)
    model = causal_lm_from_config(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=4,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    ).eval()
    return model, tokenizer


def prompts(count: int) -> list[str]:
    return [" ".join(WORDS[(i + j) % len(WORDS)] for j in range(4 + i % 5)) for i in range(count)]


def served(server, texts, concurrency: int, max_tokens: int, latency: float, seed: int) -> float:
    """Completion tokens per second through the server."""
    teacher = OpenAITeacher(
        server.base_url,
        "bench",
        endpoint="completions",
        max_tokens=max_tokens,
        concurrency=concurrency,
        max_retries=0,
        progress=False,
    )
    if latency > 0:
        server.add_faults([f"slow:{latency}"] * len(texts))
    start = time.perf_counter()
    out = teacher.generate(texts, n=1, seed=seed)
    elapsed = time.perf_counter() - start
    server.faults.clear()
    return sum(s[0].completion_tokens for s in out) / elapsed


def local(model, tokenizer, texts, batch_size: int, max_tokens: int, seed: int) -> float:
    teacher = LocalHFTeacher(
        model, tokenizer, max_new_tokens=max_tokens, batch_size=batch_size, progress=False
    )
    start = time.perf_counter()
    out = teacher.generate(texts, n=1, seed=seed)
    elapsed = time.perf_counter() - start
    return sum(s[0].completion_tokens for s in out) / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--prompts", type=int, default=24)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--latency", type=float, default=0.25)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    logging.getLogger("lightning_distill").setLevel(logging.ERROR)
    model, tokenizer = build(args.hidden, args.layers)
    texts = prompts(args.prompts)
    configs = [(c, 0.0) for c in CONCURRENCY] + [(c, args.latency) for c in CONCURRENCY]
    rates: dict[object, list[float]] = {key: [] for key in [*configs, "local"]}
    with serve(model, tokenizer, model_name="bench") as server:
        served(server, texts[:4], 4, args.max_tokens, 0.0, seed=-1)  # warm-up
        local(model, tokenizer, texts[:4], args.batch_size, args.max_tokens, seed=-1)
        for r in range(args.repeats):
            for c, latency in configs:
                rates[(c, latency)].append(
                    served(server, texts, c, args.max_tokens, latency, seed=r)
                )
            rates["local"].append(
                local(model, tokenizer, texts, args.batch_size, args.max_tokens, seed=r)
            )
    rate = {key: statistics.median(v) for key, v in rates.items()}
    params = sum(p.numel() for p in model.parameters())
    print(
        f"\n{args.prompts} prompts, up to {args.max_tokens} new tokens each, Llama {args.layers}x"
        f"{args.hidden} ({params / 1e6:.2f} M parameters), {args.repeats} repeats, "
        f"{torch.get_num_threads()} torch thread\n"
    )
    print(
        "| teacher | concurrency | added latency / request | completion tokens/s | ÷ concurrency 1 |"
    )
    print("|---|---|---|---|---|")
    for c, latency in configs:
        base = rate[(1, latency)]
        print(
            f"| loopback server via `OpenAITeacher` | {c} | {latency * 1e3:.0f} ms "
            f"| {rate[(c, latency)]:.0f} | {rate[(c, latency)] / base:.2f} |"
        )
    print(
        f"| `LocalHFTeacher`, batch {args.batch_size} | - | - | {rate['local']:.0f} "
        f"| {rate['local'] / rate[(1, 0.0)]:.2f} (÷ server, concurrency 1, no latency) |"
    )


if __name__ == "__main__":
    main()
