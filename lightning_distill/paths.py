"""Where lightning-distill keeps what it can rebuild: tokenizers, teacher outputs, downloads."""

from __future__ import annotations

import os
from pathlib import Path

__all__ = ["CACHE_ENV_VAR", "cache_root"]

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
