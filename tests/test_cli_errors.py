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


def test_only_the_frozen_teachers_eval_mode_warning_is_silenced():
    """Lightning's "Found N module(s) in eval mode" is dropped when the N modules are the teacher's."""
    import warnings

    from torch import nn

    from lightning_distill.cli import _FrozenTeacherNote

    def message(n):
        return f"Found {n} module(s) in eval mode at the start of training. This may lead to unexpected behavior"

    module = nn.Module()
    module.student = nn.Sequential(nn.Linear(2, 2))
    module.teacher = nn.Sequential(nn.Linear(2, 2), nn.ReLU()).eval()  # 3 modules, all in eval mode
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _FrozenTeacherNote().on_fit_start(None, module)
        warnings.warn(message(3), stacklevel=1)  # the teacher's: silenced
        warnings.warn(message(4), stacklevel=1)  # something else is in eval mode too: shown
    assert [str(w.message)[:8] for w in seen] == ["Found 4 "]

    module.student.eval()  # a student left in eval mode: nothing is silenced
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        _FrozenTeacherNote().on_fit_start(None, module)
        warnings.warn(message(5), stacklevel=1)
    assert len(seen) == 1


@pytest.mark.slow
def test_wandb_logger_has_no_anonymous_warning(tmp_path, monkeypatch, capfd):
    """logger=wandb: W&B's "The anonymous setting has no effect" does not appear."""
    from hydra import compose, initialize_config_dir

    from lightning_distill.cli import CONFIG_DIR, _make_trainer

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(config_name="distill", overrides=["logger=wandb", "logger.offline=true", "callbacks=none",
                                                        f"output_dir={tmp_path}", "trainer.accelerator=cpu"])
    trainer = _make_trainer(cfg, tmp_path)
    run = trainer.logger.experiment  # wandb.init
    run.finish()
    captured = capfd.readouterr()
    assert "anonymous" not in captured.err + captured.out
