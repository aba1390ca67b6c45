"""A user error reaches the command line as its message and exit status 2, without a traceback;
LIGHTNING_DISTILL_DEBUG=1 brings the traceback back."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _cli(tmp_path: Path, *overrides: str, debug: bool = False) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("LIGHTNING_DISTILL_DEBUG", "HYDRA_FULL_ERROR")}
    env.update(LIGHTNING_DISTILL_CACHE=str(tmp_path / "cache"), TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    if debug:
        env["LIGHTNING_DISTILL_DEBUG"] = "1"
    return subprocess.run([sys.executable, "-m", "lightning_distill", *overrides, f"output_dir={tmp_path / 'run'}"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)


def test_a_user_error_is_its_message_and_exit_2(tmp_path):
    result = _cli(tmp_path, "experiment=tiny", f"ckpt_path={tmp_path / 'nope.ckpt'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert "FileNotFoundError" in result.stderr and "nope.ckpt" in result.stderr and "no such file" in result.stderr
    assert "LIGHTNING_DISTILL_DEBUG=1" in result.stderr


def test_a_resolver_error_is_its_message_and_exit_2(tmp_path):
    """${ld.vocab_size:...} without a tokenizer: the resolver's own sentence, no traceback."""
    (tmp_path / "a.jsonl").write_text('{"text": "hello"}\n')
    result = _cli(tmp_path, "data=files", f"data.files={tmp_path / 'a.jsonl'}")
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    assert "data.tokenizer, which is not set" in result.stderr


@pytest.mark.slow
def test_the_debug_flag_shows_the_traceback(tmp_path):
    result = _cli(tmp_path, "experiment=tiny", f"ckpt_path={tmp_path / 'nope.ckpt'}", debug=True)
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "nope.ckpt" in result.stderr
