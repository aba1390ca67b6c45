"""Settings and helpers shared by the whole test suite."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType

import pytest

# One intra-op thread: the models here are tiny, so a second thread only adds start-up and
# spin-waiting, and the runs a test starts (CLI subprocesses, two DDP ranks) inherit it, so they
# never ask for more threads than the 2 cores CI has. Set before torch loads; an explicit value wins.
for _var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ.setdefault(_var, "1")
if "torch" in sys.modules:  # loaded before this file (a plugin): apply it there too
    sys.modules["torch"].set_num_threads(int(os.environ["OMP_NUM_THREADS"]))

SCRIPTS = Path(__file__).resolve().parent / "scripts"


def _load_script(name: str) -> ModuleType:
    """Import ``tests/scripts/<name>.py`` as a module, to call its ``main`` in this process.

    A one-process reference run then costs no new interpreter (importing torch and Lightning
    again); the multi-process runs it is compared with still run the script as a program.

    Args:
        name: the script's file name without ``.py``.

    Returns:
        The loaded module (its ``if __name__ == "__main__"`` block does not run).
    """
    spec = importlib.util.spec_from_file_location(f"_tests_script_{name}", SCRIPTS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def load_script():
    """The loader of ``tests/scripts/`` modules (see ``_load_script``)."""
    return _load_script
