"""The examples keep working: each runs as a script, for a few steps."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.mark.slow
def test_drop_in_example_runs_and_distils(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "drop_in.py"), "--steps", "40"], cwd=tmp_path,
                            capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore"})
    assert result.returncode == 0, result.stderr[-4000:]
    accuracy = dict(re.findall(r"^(teacher|student|baseline)\s.*val accuracy (\d\.\d+)", result.stdout, re.M))
    assert set(accuracy) == {"teacher", "student", "baseline"}
    # Seven classes: chance is 0.14. Forty steps already put the distilled student well above it.
    assert float(accuracy["student"]) > 0.3


@pytest.mark.slow
def test_feature_distillation_example_runs_and_exports_the_projector(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "feature_distillation.py"), "--steps", "6"],
                            cwd=tmp_path, capture_output=True, text=True, timeout=600,
                            env={**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-4000:]
    assert "layer pairs (student, teacher): ((1, 2), (2, 4))" in result.stdout
    rows = dict(re.findall(r"^(feature|attention)\s+(\d+\.\d+)\s+\d+\.\d+$", result.stdout, re.M))
    assert set(rows) == {"feature", "attention"} and all(float(v) > 0 for v in rows.values())
    assert "'feature_projector.safetensors'" in result.stdout

def test_embedding_distillation_example_runs_and_copies_the_geometry(tmp_path):
    result = subprocess.run([sys.executable, str(EXAMPLES / "embedding_distillation.py"), "--steps", "30",
                             "--teacher-steps", "30", "--train-per-slice", "400", "--eval-per-slice", "40",
                             "--out", str(tmp_path / "out")], cwd=tmp_path, capture_output=True, text=True,
                            timeout=600, env={**os.environ, "PYTHONWARNINGS": "ignore",
                                              "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr[-4000:]
    rows = dict(re.findall(r"^\| (prose|code)\s+\| 40\s+\| (.*)$", result.stdout, re.M))
    assert set(rows) == {"prose", "code"}, result.stdout[-2000:]
    for cells in rows.values():
        distilled, baseline, untrained = (float(c) for c in cells.split("|")[:3])
        # Thirty steps of distillation already order pairs more like the teacher than the untrained student.
        assert distilled > untrained
    assert (tmp_path / "out" / "coverage.md").is_file()
