"""TextDataModule throughput: tokenizing a ~15 MB JSONL, packed vs one row per document, and a rerun.

The JSONL is built offline from what every Python has: the standard library's ``.py`` sources
(slice ``code``) and pydoc's reference topics (slice ``prose``), one document per line, until it
reaches ``--mb`` megabytes. The tokenizer is a byte-level BPE (``--vocab`` tokens) trained on a
1 MB sample and saved with ``save_pretrained``, as a model's tokenizer would be. Each measurement
is a fresh ``TextDataModule`` running ``prepare_data()`` + ``setup()``:

* ``read``: reading the JSONL with ``datasets`` the first time (its Arrow conversion), alone;
* ``packed`` / ``rows``: a cold build (tokenize, split, pack or truncate, write safetensors);
  the JSONL is then already in ``datasets``' Arrow cache, so this is our pipeline's cost;
* ``rerun``: a new instance with the same settings, which finds the tokenized cache.

    python benchmarks/text_data.py            # ~1 minute on 2 cores
"""

from __future__ import annotations

import argparse
import json
import os
import sysconfig
import tempfile
import time
from pathlib import Path


def build_jsonl(path: Path, megabytes: float) -> int:
    from pydoc_data.topics import topics

    budget = int(megabytes * 2**20)
    written = 0
    with path.open("w", encoding="utf-8") as out:
        for name, text in sorted(topics.items()):
            line = json.dumps({"text": text, "kind": "prose", "id": f"prose/{name}"}) + "\n"
            out.write(line)
            written += len(line.encode())
        for file in sorted(Path(sysconfig.get_paths()["stdlib"]).rglob("*.py")):
            if written >= budget:
                break
            if "site-packages" in file.parts:
                continue
            try:
                text = file.read_text(encoding="utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            line = json.dumps({"text": text, "kind": "code", "id": f"code/{file.name}"}) + "\n"
            out.write(line)
            written += len(line.encode())
    return written


def timed(**kwargs):
    from lightning_distill.data import TextDataModule

    start = time.perf_counter()
    dm = TextDataModule(**kwargs)
    dm.prepare_data()
    dm.setup()
    return dm, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=float, default=15.0)
    parser.add_argument("--vocab", type=int, default=8192)
    parser.add_argument("--seq-len", type=int, default=512)
    args = parser.parse_args()
    import torch

    torch.set_num_threads(2)
    root = Path(tempfile.mkdtemp(prefix="ld-text-bench-"))
    os.environ["LIGHTNING_DISTILL_CACHE"] = str(root / "cache")
    from lightning_distill.data import TextDataModule, train_bpe_tokenizer

    data = root / "corpus.jsonl"
    size = build_jsonl(data, args.mb)
    sample = [json.loads(line)["text"] for line in data.read_text().splitlines()[::20]]
    tok = train_bpe_tokenizer(sample[: max(1, len(sample))], args.vocab)
    tok.save_pretrained(root / "tok")
    common = {
        "files": str(data),
        "tokenizer": str(root / "tok"),
        "slice_field": "kind",
        "seq_len": args.seq_len,
        "progress": False,
    }

    start = time.perf_counter()
    docs = TextDataModule(**common).documents()
    read = time.perf_counter() - start
    print(f"corpus: {size / 2**20:.1f} MiB, {len(docs)} documents; tokenizer: {len(tok)} tokens")
    print("| run | seconds | MB/s | tokens | tokens/s | samples (train) | notes |")
    print("|---|---:|---:|---:|---:|---:|---|")
    print(
        f"| read JSONL (datasets, first time) | {read:.2f} | {size / 2**20 / read:.1f} | | | | Arrow conversion |"
    )
    for name, extra in (("packed", {"packing": True}), ("rows", {"packing": False})):
        dm, seconds = timed(**common, **extra)
        tokens = dm.stats["tokens_in"]
        note = (
            f"{dm.stats['truncated_rows']} rows truncated"
            if not extra["packing"]
            else f"{dm.stats['tail_tokens_dropped']} tail tokens dropped"
        )
        print(
            f"| {name}, cold | {seconds:.2f} | {size / 2**20 / seconds:.1f} | {tokens} | "
            f"{tokens / seconds:,.0f} | {len(dm.dataset('train'))} | {note} |"
        )
        again, rerun = timed(**common, **extra)
        assert again.cache_status == "loaded"
        print(
            f"| {name}, rerun (cached) | {rerun:.2f} | {size / 2**20 / rerun:.1f} | | | "
            f"{len(again.dataset('train'))} | ÷ cold = {rerun / seconds:.2f} |"
        )
    print(f"(files under {root}; delete it when done)")


if __name__ == "__main__":
    main()
