"""Loss normalisation across ranks: 2-rank DDP (gloo, CPU) steps with the single-process gradient."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_grads.py"


def _grads(tmp_path: Path, name: str, devices: int, batch: int, accumulate: int) -> dict[str, torch.Tensor]:
    out = tmp_path / f"{name}.safetensors"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), str(devices), str(batch), str(accumulate)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(out)


@pytest.mark.slow
def test_two_ranks_and_accumulation_match_one_big_batch(tmp_path):
    single = _grads(tmp_path, "single", devices=1, batch=8, accumulate=1)
    ddp = _grads(tmp_path, "ddp", devices=2, batch=4, accumulate=1)
    ddp_accumulated = _grads(tmp_path, "ddp_acc", devices=2, batch=2, accumulate=2)
    assert single.keys() == ddp.keys() == ddp_accumulated.keys()
    assert any(g.abs().max() > 1e-4 for g in single.values())
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ddp_accumulated[key], single[key], rtol=1e-5, atol=1e-6)
