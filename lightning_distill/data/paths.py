"""The cache root moved to :mod:`lightning_distill.paths` (shared by the data and the teacher cache)."""

from lightning_distill.paths import CACHE_ENV_VAR, cache_root

__all__ = ["CACHE_ENV_VAR", "cache_root"]
