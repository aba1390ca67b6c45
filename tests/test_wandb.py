"""Weights & Biases for real, offline: run the tiny job with ``logger=wandb`` and read back the run.

The offline run directory holds ``run-<id>.wandb``, a LevelDB-style log of protobuf records
(wandb's own transaction log, written by wandb-core), and ``files/media/table/...`` for tables.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

BIN = Path(sys.executable).parent


def wandb_records(path: Path):
    """Protobuf ``Record``s of a ``.wandb`` file: 7-byte file header, 32 KiB blocks, chunked records."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:8]
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:  # zero padding at the end of a block
            pos += left
            continue
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST chunk
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


@pytest.mark.slow
def test_offline_wandb_run_has_config_slice_tables_and_student_artifact(tmp_path):
    out = tmp_path / "run"
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(tmp_path), "WANDB_SILENT": "true",
           "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([str(BIN / "lightning-distill"), "experiment=tiny", "baseline=false", "callbacks=coverage",
                             "logger=wandb", "logger.offline=true", f"output_dir={out}"], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    run_dir = next((out / "wandb").glob("offline-run-*"))
    records = list(wandb_records(next(run_dir.glob("run-*.wandb"))))

    config_keys = {u.key for r in records if r.WhichOneof("record_type") == "config" for u in r.config.update}
    assert {"data", "teacher", "student", "loss", "trainer", "callbacks"} <= config_keys  # the resolved config

    history_keys = {item.key or item.nested_key[0] for r in records
                    if r.WhichOneof("record_type") == "history" for item in r.history.item}
    # (the tiny run's 2 validation batches hold only prose; the test set has both slices)
    for key in ("coverage/prose/retention", "coverage/prose/gap", "coverage/gaps", "test_coverage/code/retention",
                "test_coverage/code/gap", "test_coverage/code/train_tokens", "coverage/test_table",
                "coverage/val_table"):
        assert key in history_keys, sorted(history_keys)
    assert any(k.startswith("coverage/test_retention") for k in history_keys)  # the bar chart

    tables = sorted((run_dir / "files" / "media" / "table" / "coverage").glob("test_table_*.table.json"))
    table = json.loads(tables[-1].read_text())
    assert "retention" in table["columns"] and "train_tokens" in table["columns"]
    assert {row[table["columns"].index("slice")] for row in table["data"]} == {"prose", "code"}

    artifacts = [r.artifact for r in records if r.WhichOneof("record_type") == "artifact" and r.artifact.type == "model"]
    assert len(artifacts) == 1 and artifacts[0].name.startswith("student-")
    metadata = json.loads(artifacts[0].metadata)
    card = json.loads((out / "student" / "distillation_card.json").read_text())
    assert metadata["teacher"]["weights_sha256"] == card["teacher"]["weights_sha256"]
    assert metadata["data"]["fingerprint"] and metadata["losses"]["kd"]["divergence"] == "forward_kl"
    assert {s["slice"] for s in metadata["data"]["slices"]} == {"prose", "code"}
    assert all("retention" in s and "train_tokens" in s for s in metadata["data"]["slices"])
    assert metadata["cache"] == "live" and metadata["versions"]["torch"]
    manifest_paths = {e.path for a in artifacts for e in a.manifest.contents}
    assert {"model.safetensors", "distillation_card.json"} <= manifest_paths
