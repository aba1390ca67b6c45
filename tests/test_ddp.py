"""Loss normalisation across ranks: 2-rank DDP (gloo, CPU) steps with the single-process gradient."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parent / "scripts" / "ddp_grads.py"


def _ddp_grads(tmp_path: Path, *pairs: tuple[int, int]) -> list[dict[str, torch.Tensor]]:
    """Two DDP ranks, one launch: a fit per (batch size, accumulation) pair."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), "2", *(f"{b}:{a}" for b, a in pairs)],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    files = [out / f"b{b}-a{a}.safetensors" for b, a in pairs]
    for file in files:  # each fit really ran on both ranks (the later ones reuse the launch)
        with safe_open(file, "pt") as f:
            assert f.metadata() == {"world_size": "2"}, file
    return [load_file(file) for file in files]


@pytest.mark.slow
def test_two_ranks_and_accumulation_match_one_big_batch(tmp_path, load_script):
    single_out = tmp_path / "single.safetensors"
    load_script("ddp_grads").main(str(single_out), 1, 8, 1)  # the reference: one process, this one
    single = load_file(single_out)
    ddp, ddp_accumulated = _ddp_grads(tmp_path, (4, 1), (2, 2))
    assert single.keys() == ddp.keys() == ddp_accumulated.keys()
    assert any(g.abs().max() > 1e-4 for g in single.values())
    for key in single:
        torch.testing.assert_close(ddp[key], single[key], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(ddp_accumulated[key], single[key], rtol=1e-5, atol=1e-6)
