"""Run the ``lightning-distill`` command, SIGKILLing its own process after the N-th cache shard.

    python cli_kill_after_shards.py N [overrides ...]

Each shard the teacher cache writes (the shard, then its sidecar) counts once written in full; after
the N-th the process sends itself SIGKILL: a real kill, no Python cleanup, mid-build.
"""

from __future__ import annotations

import os
import signal
import sys

from lightning_distill import cli
from lightning_distill.cache.writer import ShardWriter

_flush = ShardWriter.flush
_written = 0


def _flush_then_maybe_kill(self: ShardWriter) -> None:
    global _written
    before = len(self.written)
    _flush(self)
    _written += len(self.written) - before
    if _written >= LIMIT:
        os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    LIMIT = int(sys.argv[1])
    ShardWriter.flush = _flush_then_maybe_kill
    sys.argv = [sys.argv[0], *sys.argv[2:]]
    cli.main()
