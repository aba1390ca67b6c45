"""Write teacher records slowly from a separate process; the test kills it with SIGKILL mid-run.

    python blackbox_writer.py OUT_DIR DELAY_SECONDS

A deterministic function teacher answers 12 prompts, 3 samples each, in shards of 6 records
(2 prompts per call), sleeping ``DELAY_SECONDS`` before each call.
"""

from __future__ import annotations

import sys
import time

from lightning_distill.blackbox import FunctionTeacher, write_records

PROMPTS = [f"prompt number {i}: say something" for i in range(12)]
SLICES = ["code" if i % 3 == 0 else "prose" for i in range(12)]
N, SEED, SHARD = 3, 7, 6


def make_teacher(delay: float) -> FunctionTeacher:
    def answer(prompts: list[str], *, n: int, seed: int) -> list[list[str]]:
        time.sleep(delay)
        return [[f"{p} -> answer {j} (seed {seed})" for j in range(n)] for p in prompts]

    return FunctionTeacher(answer, name="slow-echo")


def main(out_dir: str, delay: float) -> None:
    write_records(
        make_teacher(delay), PROMPTS, out_dir, n=N, seed=SEED, slices=SLICES, shard_size=SHARD
    )


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]))
