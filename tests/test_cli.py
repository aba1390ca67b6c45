"""The `lightning-distill` command, end to end: console script, Hydra flags, and a built wheel."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TINY = ["experiment=tiny", "baseline=false"]


def _env(tmp_path: Path) -> dict[str, str]:
    return {**os.environ, "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false",
            "WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}


def _run(cmd: list[str], tmp_path: Path, cwd: Path | None = None, timeout: int = 300):
    result = subprocess.run(cmd, cwd=cwd or tmp_path, env=_env(tmp_path), capture_output=True, text=True,
                            timeout=timeout)
    assert result.returncode == 0, f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_help_lists_config_groups(tmp_path):
    out = _run([str(BIN / "lightning-distill"), "--help"], tmp_path).stdout
    for group in ("teacher", "student", "loss", "data", "trainer", "callbacks", "logger", "experiment"):
        assert f"{group}:" in out


def test_cfg_job_prints_composed_config_with_overrides(tmp_path):
    out = _run([sys.executable, "-m", "lightning_distill", "--cfg", "job", "loss.kd.temperature=4"], tmp_path).stdout
    assert "temperature: 4" in out and "_target_: lightning_distill.losses.LogitKD" in out


@pytest.mark.slow
def test_console_script_runs_tiny_job(tmp_path):
    out_dir = tmp_path / "run"
    result = _run([str(BIN / "lightning-distill"), *TINY, "baseline=true", f"output_dir={out_dir}"], tmp_path)
    assert "student ppl" in result.stdout and "no-teacher ppl" in result.stdout
    report = json.loads((out_dir / "report.json").read_text())
    assert set(report["slices"]) == {"prose", "code"}
    for stats in report["slices"].values():
        assert stats["tokens"] > 0 and stats["teacher_perplexity"] > 1 and stats["student_perplexity"] > 1
    assert set(report["baseline"]) == {"prose", "code"}
    student = out_dir / "student"
    assert (student / "model.safetensors").is_file() and (student / "tokenizer.json").is_file()
    record = json.loads((student / "distillation.json").read_text())
    assert record["teacher"]["weights_sha256"] and record["losses"]["kd"]["divergence"] == "forward_kl"
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(student)
    tok = AutoTokenizer.from_pretrained(student)
    assert model.config.vocab_size == len(tok) == 320
    metrics = (out_dir / "csv").rglob("metrics.csv")
    header = next(metrics).read_text().splitlines()[0]
    for key in ("train/loss", "train/kd", "train/task", "val/loss", "val/agreement", "val/kl"):
        assert key in header


@pytest.mark.slow
def test_multirun_makes_one_dir_per_job(tmp_path):
    _run([str(BIN / "lightning-distill"), "-m", *TINY, "export=false", "loss.kd.temperature=1,2",
          "hydra.sweep.dir=" + str(tmp_path / "sweep"), "output_dir=${hydra:runtime.output_dir}"], tmp_path)
    jobs = sorted(p.name for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())
    assert jobs == ["0", "1"]
    for job in jobs:
        assert (tmp_path / "sweep" / job / "report.json").is_file()


@pytest.mark.slow
def test_bad_override_fails_before_training(tmp_path):
    result = subprocess.run([str(BIN / "lightning-distill"), *TINY, "loss.kd.divergence=kl_forward",
                             f"output_dir={tmp_path / 'run'}"], cwd=tmp_path, env=_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "unknown divergence 'kl_forward'" in result.stderr + result.stdout


@pytest.mark.slow
def test_wheel_in_fresh_venv_has_configs_and_command(tmp_path):
    """Build a wheel (not editable), install it into a new virtual environment, run the command.

    The new environment gets the dependencies by pointing a .pth file at this environment's
    site-packages (no network in tests); lightning_distill itself and its configs come only from
    the wheel, and the command runs from a directory outside the repository.
    """
    dist = tmp_path / "dist"
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(dist), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(dist.glob("lightning_distill-*.whl"))
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = next((venv / "lib").glob("python*/site-packages"))
    deps = Path(sysconfig.get_paths()["purelib"])
    (site / "_deps.pth").write_text(str(deps) + "\n")
    subprocess.run([sys.executable, "-m", "pip", "--python", str(venv / "bin" / "python"), "install",
                    "--no-deps", "-q", str(wheel)], check=True, capture_output=True, timeout=300)
    py = venv / "bin" / "python"
    where = _run([str(py), "-c", "import lightning_distill, lightning_distill.cli as c; "
                  "print(lightning_distill.__file__); print(c.CONFIG_DIR)"], tmp_path).stdout.split()
    assert str(site) in where[0] and str(REPO) not in where[0]
    assert where[1].startswith(str(site)) and (Path(where[1]) / "loss" / "kd_task.yaml").is_file()
    out_dir = tmp_path / "wheel-run"
    result = _run([str(venv / "bin" / "lightning-distill"), *TINY, f"output_dir={out_dir}"], tmp_path)
    assert "student ppl" in result.stdout
    assert (out_dir / "student" / "distillation.json").is_file()


_STOP_AT = '''
import lightning as L


class StopAt(L.Callback):
    """Raise KeyboardInterrupt (as Ctrl-C would) once the fit reaches ``step``."""

    def __init__(self, step):
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            raise KeyboardInterrupt


class StopInside(L.Callback):
    """Raise KeyboardInterrupt in the middle of step ``step``: after its forward drew dropout masks,
    before its backward (the step is cut short and redone after the resume)."""

    def __init__(self, step):
        self.step = step

    def on_before_backward(self, trainer, pl_module, loss):
        if trainer.global_step == self.step and trainer.ckpt_path is None:  # not again in the resumed run
            raise KeyboardInterrupt
'''


def test_missing_checkpoint_fails_before_any_work(tmp_path):
    result = subprocess.run([sys.executable, "-m", "lightning_distill", *TINY, f"output_dir={tmp_path / 'run'}",
                             f"ckpt_path={tmp_path / 'nope.ckpt'}"], cwd=tmp_path, env=_env(tmp_path),
                            capture_output=True, text=True, timeout=300)
    assert result.returncode != 0
    assert "nope.ckpt" in result.stderr and "no such file" in result.stderr
    assert not (tmp_path / "run").exists()  # nothing was built or written


@pytest.mark.slow
@pytest.mark.parametrize("where", ["between_steps", "inside_a_dropout_step"])
def test_interrupted_run_resumes_to_the_same_result(tmp_path, where):
    """Ctrl-C at step 3 of 8, resume with the printed command: same weights and reports as one run.
    Inside a step of a student with dropout, the redone step draws the masks the cut one drew."""
    import shlex

    from safetensors.torch import load_file

    (tmp_path / "stop_at.py").write_text(_STOP_AT)
    env = _env(tmp_path) | {"PYTHONPATH": os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")])}
    common = [*TINY, "callbacks=default", "~callbacks.lr_monitor", "trainer.max_steps=8", "trainer.val_check_interval=4",
              "callbacks.coverage.min_retention=null", "data.max_train_samples=24"]  # 6 batches: a second epoch
    if where == "inside_a_dropout_step":
        common += ["+student.attention_dropout=0.3"]
    whole = tmp_path / "whole"
    _run([sys.executable, "-m", "lightning_distill", *common, f"output_dir={whole}"], tmp_path)

    cut = tmp_path / "cut"
    stop = [f"+callbacks.stop._target_=stop_at.{'StopAt' if where == 'between_steps' else 'StopInside'}",
            "+callbacks.stop.step=3"]
    first = subprocess.run([str(BIN / "lightning-distill"), *common, *stop, f"output_dir={cut}"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 130, first.stderr[-3000:]
    assert (cut / "checkpoints" / "interrupted.ckpt").is_file() or list(cut.rglob("interrupted.ckpt"))
    command = first.stderr.split("Resume with:")[1].strip().splitlines()[0]
    assert "'ckpt_path=\"" in command and "interrupted.ckpt" in command
    argv = shlex.split(command)
    assert argv[0] == "lightning-distill"
    second = subprocess.run([str(BIN / "lightning-distill"), *argv[1:]], cwd=tmp_path, env=env,
                            capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr[-3000:]
    assert "Resuming from" in second.stdout

    a, b = load_file(whole / "student" / "model.safetensors"), load_file(cut / "student" / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch_close(a[key], b[key], key)
    ra, rb = (json.loads((d / "report.json").read_text()) for d in (whole, cut))
    for name in ra["slices"]:
        assert rb["slices"][name]["student_perplexity"] == pytest.approx(ra["slices"][name]["student_perplexity"],
                                                                         rel=1e-4)
    train_a = {r["slice"]: r["train_tokens"] for r in ra["coverage"]["slices"]}
    train_b = {r["slice"]: r["train_tokens"] for r in rb["coverage"]["slices"]}
    assert train_a == train_b and sum(train_a.values()) > 0


def torch_close(x, y, name):
    import torch

    assert torch.allclose(x, y, rtol=1e-4, atol=1e-6), f"{name}: max diff {(x - y).abs().max()}"


def test_ckpt_path_last_quoting_and_resume_command(tmp_path):
    import shlex

    from hydra import compose, initialize_config_dir

    from lightning_distill.checkpoint import resolve_ckpt_path, resume_command
    from lightning_distill.cli import CONFIG_DIR

    run = tmp_path / "run"
    with pytest.raises(FileNotFoundError, match=r"ckpt_path='last': no checkpoint"):
        resolve_ckpt_path("last", run)
    folder = run / "csv" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    older, newer = folder / "epoch=0-step=3.ckpt", folder / "epoch=0-step=6.ckpt"
    older.write_bytes(b"a")
    newer.write_bytes(b"b")
    os.utime(older, (1, 1))
    (folder / "last.ckpt").symlink_to(newer.name)
    assert Path(resolve_ckpt_path("last", run)).resolve() == newer.resolve()
    assert resolve_ckpt_path(str(older), run) == str(older)
    assert resolve_ckpt_path(None, run) is None

    # The printed command survives the shell and Hydra's override parser, '=' in the name included.
    command = resume_command(["experiment=tiny", "ckpt_path=old.ckpt"], run, newer)
    assert f"'ckpt_path=\"{newer}\"'" in command and "old.ckpt" not in command
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose("distill", overrides=shlex.split(command)[1:])
    assert cfg.ckpt_path == str(newer) and cfg.output_dir == str(run)
