#!/usr/bin/env python3
"""Set up and run lightning-distill from a fresh checkout, with nothing but Python.

    python3 dev.py demo [hydra overrides...]   # the demo: distil a teacher, print the table
    python3 dev.py test [pytest args...]       # the test suite (what CI runs), one pytest-xdist worker per core

The first call creates ``.venv/`` and installs the project into it (CPU build of PyTorch
unless a GPU is visible, then the package with its dev extra); later calls reuse it and only
reinstall when ``pyproject.toml`` changes. The set-up prints one line; pip's full output goes
to ``.venv/setup.log`` and is printed only when the set-up fails. Only the standard library is used
here.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = Path(os.environ.get("LIGHTNING_DISTILL_VENV", ROOT / ".venv"))
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PY = BIN / ("python.exe" if os.name == "nt" else "python")
# The CPU build of PyTorch: a plain `pip install torch` on Linux pulls a multi-GB CUDA build.
TORCH = os.environ.get("LIGHTNING_DISTILL_TORCH", "torch==2.13.0")
CPU_INDEX = "https://download.pytorch.org/whl/cpu"


LOG = VENV / "setup.log"  # pip's full output; printed only when the set-up fails


def _pip(*args: str) -> None:
    with LOG.open("a") as log:
        log.write(f"$ pip install {' '.join(args)}\n")
        log.flush()
        subprocess.run([str(PY), "-m", "pip", "install", "--disable-pip-version-check", *args], check=True,
                       stdout=log, stderr=subprocess.STDOUT)


def _has_gpu() -> bool:
    return shutil.which("nvidia-smi") is not None


def _install_torch() -> None:
    if subprocess.run([str(PY), "-c", "import torch"], capture_output=True).returncode == 0:
        return
    if _has_gpu():
        _pip(TORCH)
        return
    try:  # a local CPU wheel or a mirror that serves the +cpu build
        _pip("--only-binary=:all:", TORCH if "+" in TORCH else f"{TORCH}+cpu")
    except subprocess.CalledProcessError:
        _pip("--index-url", CPU_INDEX, "--extra-index-url", "https://pypi.org/simple", TORCH)


def setup() -> None:
    """Create the virtual environment and install the project, if not already current."""
    stamp = VENV / ".lightning-distill-installed"
    want = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if stamp.is_file() and stamp.read_text() == want and PY.exists():
        return
    print(f"[dev.py] setting up {VENV.name} (first run only; log in {LOG})...", flush=True)
    try:
        if not PY.exists():
            venv.EnvBuilder(with_pip=True).create(VENV)
        LOG.write_text("")
        _install_torch()
        _pip("-e", f"{ROOT}[dev]")
    except (subprocess.CalledProcessError, OSError) as error:
        if LOG.is_file():
            sys.stderr.write(LOG.read_text())
        sys.exit(f"[dev.py] setting up {VENV} failed ({error}); the log above is also in {LOG}")
    stamp.write_text(want)


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in {"demo", "test", "setup"}:
        print(__doc__)
        return 2
    command, rest = argv[0], argv[1:]
    setup()
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    if command == "setup":
        return 0
    if command == "demo":
        return subprocess.run([str(BIN / "lightning-distill"), *rest], env=env).returncode
    pytest = [str(PY), "-m", "pytest", *_workers(rest), *rest]
    return subprocess.run(pytest, cwd=ROOT, env=env).returncode


def _workers(args: list[str]) -> list[str]:
    """pytest-xdist options: one worker per CPU core (at most 4), each taking whole test files.

    Nothing when the arguments choose for themselves (``-n``, ``--dist``, ``-p no:xdist``) or on one core.
    Whole files per worker keep each file's module-scoped fixtures built once.
    """
    chosen = ("-n", "--numprocesses", "--dist")
    if any(a.startswith(chosen) or a.endswith("no:xdist") for a in args):
        return []
    # The cores this process may use (a container may allow fewer than the machine has).
    if hasattr(os, "sched_getaffinity"):
        cores = min(len(os.sched_getaffinity(0)), 4)
    else:
        cores = min(os.cpu_count() or 1, 4)
    return ["-n", str(cores), "--dist", "loadfile"] if cores > 1 else []


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
