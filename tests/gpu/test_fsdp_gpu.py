"""FSDP (Lightning's FSDPStrategy) and FSDP2 on CUDA: 1 GPU vs the same global batch split across 2 GPUs.

Lightning runs FSDP1 on CUDA only (it refuses ``accelerator="cpu"``, and torch's FSDP1 needs an
accelerator), so these tests are skipped without 2 CUDA devices. FSDP2 on CPU is
``tests/test_engines.py``. Run on a GPU machine with ``pytest tests/gpu -q``.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "engine_grads.py"

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(torch.cuda.device_count() < 2,
                       reason="needs 2 CUDA GPUs: Lightning's FSDPStrategy refuses CPU (FSDP2 on CPU: test_engines.py)"),
]


def _run(tmp_path: Path, name: str, devices: int, batch: int) -> tuple[dict[str, torch.Tensor], dict]:
    out = tmp_path / f"{name}-{devices}"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(SCRIPT), str(out), name, str(devices), str(batch), "gpu"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-4000:]
    return load_file(out / "grads.safetensors"), json.loads((out / "report.json").read_text())


@pytest.mark.parametrize("name", ["fsdp", "fsdp2"])
def test_two_gpus_step_with_the_one_gpu_gradient_and_keep_the_teacher_frozen(tmp_path, name):
    single, _ = _run(tmp_path, "single", devices=1, batch=8)
    sharded, report = _run(tmp_path, name, devices=2, batch=4)
    assert single.keys() == sharded.keys()
    for key in single:  # TF32/reduction order on GPU: a little looser than on CPU
        torch.testing.assert_close(sharded[key], single[key], rtol=1e-3, atol=1e-5)
    assert report["world_size"] == 2
    assert report["teacher_trainable"] == report["teacher_grads"] == report["teacher_in_optimizer"] == 0
    assert report["teacher_optimizer_state"] == 0 and report["student_optimizer_state"] > 0
    assert report["checkpoint_keys_match"] and report["whole_student_matches"]
    if name == "fsdp2":
        assert report["teacher_sharded"] == report["teacher_params"]
