"""Where lightning-distill keeps what it can rebuild: tokenizers, teacher outputs, downloads."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

__all__ = ["CACHE_ENV_VAR", "NotWritableError", "cache_root", "check_writable"]

#: Environment variable that overrides the cache root (tests point it at a temporary folder).
CACHE_ENV_VAR = "LIGHTNING_DISTILL_CACHE"


def cache_root() -> Path:
    """Return the root folder of lightning-distill's on-disk caches.

    The first of these that is set wins:

    1. ``$LIGHTNING_DISTILL_CACHE``;
    2. ``$XDG_CACHE_HOME/lightning-distill``;
    3. ``~/.cache/lightning-distill``.

    The folder is not created here; whoever writes into it creates what it needs. Everything
    below it can be deleted at any time and is rebuilt on the next run.

    Returns:
        The cache root, with ``~`` expanded.
    """
    override = os.environ.get(CACHE_ENV_VAR)
    if override:
        return Path(override).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    if xdg:
        return Path(xdg).expanduser() / "lightning-distill"
    return Path.home() / ".cache" / "lightning-distill"


class NotWritableError(PermissionError):
    """A folder this run must write into cannot be written (permissions, a read-only disk, a file in the way)."""


def check_writable(folder: Any, setting: str, fix: str) -> Path:
    """Create ``folder`` if needed and prove that a file can be written there (a probe, removed again).

    Called before any work, so that an unwritable output or cache folder fails at once rather
    than after training. Root ignores permissions, so the probe write (not ``os.access``) decides.

    Args:
        folder: the folder.
        setting: how the user set it, for the message (``"output_dir"``, ``"TeacherCache(dirpath)"``).
        fix: the sentence that says what to do instead.

    Returns:
        The folder as a ``Path`` (``~`` expanded).

    Raises:
        NotWritableError: the folder cannot be created, or a file cannot be written in it.
    """
    path = Path(folder).expanduser()
    try:
        path.mkdir(parents=True, exist_ok=True)
        # Named like a lock file, which a cache folder's listings skip (another rank may list it now).
        handle, probe = tempfile.mkstemp(prefix=".write-check-", suffix=".lock", dir=path)
        os.close(handle)
        os.unlink(probe)
    except OSError as error:
        reason = error.strerror or type(error).__name__
        raise NotWritableError(
            f"{setting}={str(folder)!r} is not writable ({reason}); {fix}"
        ) from None
    return path
