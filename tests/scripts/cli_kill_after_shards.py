"""Run the ``lightning-distill`` command, SIGKILLing its own process after the N-th shard it writes.

    python cli_kill_after_shards.py cache N [overrides ...]      # teacher cache shards
    python cli_kill_after_shards.py records N generate [...]     # black-box record shards

A shard counts once written in full (a cache shard with its sidecar; a records shard renamed into
place); after the N-th the process sends itself SIGKILL: a real kill, no Python cleanup, mid-run.
"""

from __future__ import annotations

import os
import signal
import sys

from lightning_distill import cli
from lightning_distill.blackbox import writer as records_writer
from lightning_distill.cache.writer import ShardWriter

_written = 0


def _count(limit: int) -> None:
    global _written
    _written += 1
    if _written >= limit:
        os.kill(os.getpid(), signal.SIGKILL)


def main(kind: str, limit: int) -> None:
    if kind == "cache":
        flush = ShardWriter.flush

        def flush_then_count(self: ShardWriter) -> None:
            before = len(self.written)
            flush(self)
            if len(self.written) > before:
                _count(limit)

        ShardWriter.flush = flush_then_count
    elif kind == "records":
        write_shard = records_writer._write_shard

        def write_then_count(path, records) -> None:
            write_shard(path, records)
            _count(limit)

        records_writer._write_shard = write_then_count
    else:
        raise SystemExit(f"unknown kind {kind!r}: cache or records")
    cli.main()


if __name__ == "__main__":
    kind, limit = sys.argv[1], int(sys.argv[2])
    sys.argv = [sys.argv[0], *sys.argv[3:]]
    main(kind, limit)
