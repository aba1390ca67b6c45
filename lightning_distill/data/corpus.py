"""The demo corpus: text every Python installation already has, in two slices.

``prose``
    The English reference prose that ``help()`` shows for language topics, from
    ``pydoc_data.topics.topics`` (79 topics, about 466 KB on CPython 3.11).
``code``
    The standard library's own ``.py`` sources under ``sysconfig.get_paths()["stdlib"]``.

Both slices are cut to a byte budget by the same deterministic rule (:func:`_select`): candidates
are visited in the order of a hash of their id, each one that still fits the remaining budget
and is no larger than a tenth of it is taken. Hash order rather than path order spreads the
subset across the whole library instead of the first few modules alphabetically, and the
per-document cap stops one large file (``_pydecimal.py`` is 229 KB) from filling a slice.

The result depends only on the Python version's files, not on the machine, the clock or any
seed. Folders that are tests, vendored packages, generated tables, or that Linux distributions
split out or patch (``tkinter``, ``lib2to3``, ``distutils``, ``_sysconfigdata*``...) are skipped
so that the ``code`` slice is the same on python.org, pyenv, conda and Debian builds of a version.
"""

from __future__ import annotations

import hashlib
import os
import sysconfig
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

__all__ = ["Document", "corpus_fingerprint", "demo_corpus"]

#: Folders (any path component) whose ``.py`` files never enter the ``code`` slice.
EXCLUDED_DIRS = frozenset(
    {
        "__pycache__",
        "site-packages",
        "dist-packages",
        "lib-dynload",
        "test",
        "tests",
        "idle_test",
        "idlelib",
        "pydoc_data",  # the prose slice itself
        "encodings",  # mostly generated codec tables
        "ensurepip",
        "distutils",
        "lib2to3",
        "tkinter",
        "turtledemo",
        "venv",
    }
)
#: File names skipped because distributions patch or generate them per machine.
EXCLUDED_FILES = frozenset(
    {"site.py", "sysconfig.py", "sitecustomize.py", "turtle.py", "_distutils_system_mod.py"}
)
EXCLUDED_PREFIXES = ("_sysconfigdata", "config-")

#: No single document may take more than this fraction of a slice's byte budget.
MAX_DOC_FRACTION = 0.1


@dataclass(frozen=True)
class Document:
    """One unit of text; splits never cut through a document.

    Attributes:
        id: stable, unique name such as ``"prose/formatstrings"`` or ``"code/json/decoder.py"``.
        slice: the part of the corpus it belongs to (``"prose"`` or ``"code"`` in the demo).
        text: the document's text, with ``\\n`` line endings.
    """

    id: str
    slice: str
    text: str


def demo_corpus(prose_bytes: int | None = None, code_bytes: int = 500_000) -> list[Document]:
    """Build the two-slice demo corpus from the running Python's own files.

    Args:
        prose_bytes: UTF-8 byte budget of the ``prose`` slice; ``None`` takes every topic.
        code_bytes: UTF-8 byte budget of the ``code`` slice; ``0`` builds a prose-only corpus.

    Returns:
        The documents, ``prose`` first, each slice sorted by id.

    Raises:
        ValueError: if a budget is negative.
        RuntimeError: if ``pydoc_data`` or the standard library sources are missing.
    """
    for name, value in (("prose_bytes", prose_bytes), ("code_bytes", code_bytes)):
        if value is not None and value < 0:
            raise ValueError(f"{name}={value} is negative; pass a byte budget >= 0.")
    return _prose_documents(prose_bytes) + _code_documents(code_bytes)


def corpus_fingerprint(docs: Iterable[Document]) -> str:
    """Return a short hex digest of the documents' ids, slices and texts, in order.

    Args:
        docs: the documents.

    Returns:
        16 hex characters of a SHA-256 over every field, each prefixed with its length.
    """
    digest = hashlib.sha256()
    for doc in docs:
        for field in (doc.id, doc.slice, doc.text):
            data = field.encode("utf-8")
            digest.update(len(data).to_bytes(8, "little"))
            digest.update(data)
    return digest.hexdigest()[:16]


def _prose_documents(budget: int | None) -> list[Document]:
    try:
        from pydoc_data.topics import topics
    except ImportError as err:  # pragma: no cover - every CPython ships it
        raise RuntimeError(
            "pydoc_data.topics is not importable in this Python; install the standard "
            "library's documentation data or use a corpus that does not need it."
        ) from err
    candidates = {f"prose/{name}": text.replace("\r\n", "\n") for name, text in topics.items()}
    if budget is None:
        ids = list(candidates)
    else:
        ids = _select(candidates, budget)
    return [Document(doc_id, "prose", candidates[doc_id]) for doc_id in sorted(ids)]


def _code_documents(budget: int) -> list[Document]:
    if budget == 0:
        return []
    root = Path(sysconfig.get_paths()["stdlib"])
    if not root.is_dir():
        raise RuntimeError(
            f"The standard library sources are not at {root}; pass code_bytes=0 to build a "
            "prose-only corpus."
        )
    texts: dict[str, str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        rel_dir = Path(dirpath).relative_to(root)
        # Prune in place so that site-packages and the test suite are never even listed.
        dirnames[:] = sorted(
            d for d in dirnames if d not in EXCLUDED_DIRS and not d.startswith(EXCLUDED_PREFIXES)
        )
        for name in filenames:
            if not name.endswith(".py") or name in EXCLUDED_FILES:
                continue
            if name.startswith(EXCLUDED_PREFIXES):  # e.g. the machine's _sysconfigdata
                continue
            try:
                text = (Path(dirpath) / name).read_bytes().decode("utf-8")
            except (OSError, UnicodeDecodeError):
                continue
            text = text.replace("\r\n", "\n")
            if text.strip():
                texts[f"code/{(rel_dir / name).as_posix()}"] = text
    ids = _select(texts, budget)
    return [Document(doc_id, "code", texts[doc_id]) for doc_id in sorted(ids)]


def _select(texts: dict[str, str], budget: int) -> list[str]:
    """First-fit selection in hash order under a byte budget and a per-document cap.

    Args:
        texts: candidate id -> text.
        budget: total UTF-8 bytes allowed.

    Returns:
        The selected ids, in visiting order.
    """
    cap = max(1, int(budget * MAX_DOC_FRACTION))
    remaining = budget
    chosen: list[str] = []
    for doc_id in sorted(texts, key=_hash_key):
        size = len(texts[doc_id].encode("utf-8"))
        if size <= min(cap, remaining):
            chosen.append(doc_id)
            remaining -= size
    return chosen


def _hash_key(doc_id: str) -> str:
    return hashlib.sha256(f"lightning-distill/select/{doc_id}".encode()).hexdigest()
