"""Your tokenizer: loading it, its size and fingerprint, and tokenizing documents into labels.

(The demo's own BPE tokenizer is trained in ``tokenizer.py``.)
"""

from __future__ import annotations

import functools
import hashlib
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from lightning_distill.cache.fingerprint import tokenizer_fingerprint

if TYPE_CHECKING:
    from .sources import TextDocument

__all__ = ["load_tokenizer", "text_tokenizer_fingerprint", "tokenize_documents", "vocab_size_of"]


def load_tokenizer(tokenizer: Any, revision: str | None, trust_remote_code: bool) -> Any:
    """A tokenizer from a folder or hub id; a tokenizer object is returned as it is.

    Raises:
        ValueError: if ``tokenizer`` is unset.
    """
    if tokenizer is None:
        raise ValueError(
            "data.tokenizer is not set; pass a tokenizer folder or hub id (data.tokenizer=...), or a "
            "teacher with a path (teacher=hf_pretrained teacher.path=...), whose tokenizer is the default."
        )
    if not isinstance(tokenizer, str | os.PathLike):
        return tokenizer  # an already-built tokenizer object
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(
        str(tokenizer), revision=revision, trust_remote_code=trust_remote_code
    )


@functools.lru_cache(maxsize=16)
def vocab_size_of(path: str | None) -> int:
    """The vocabulary size a model for ``path``'s tokenizer needs (the ``ld.vocab_size`` resolver).

    A model folder's ``config.json`` ``vocab_size`` wins (it may exceed the tokenizer's length,
    e.g. padded embeddings); otherwise the tokenizer's length.

    Args:
        path: a model or tokenizer folder, or a hub id.

    Raises:
        ValueError: if ``path`` is unset.
    """
    if path is None or str(path) in ("", "None", "null"):
        raise ValueError(
            "data.vocab_size is read from data.tokenizer, which is not set; set data.tokenizer=... "
            "(by default the teacher's: teacher=hf_pretrained teacher.path=...), or give the size "
            "directly with data.vocab_size=N."
        )
    from transformers import AutoConfig

    try:
        config = AutoConfig.from_pretrained(str(path), trust_remote_code=False)
        size = getattr(config, "vocab_size", None)
        if size is None and hasattr(config, "get_text_config"):
            size = getattr(config.get_text_config(), "vocab_size", None)
        if size:
            return int(size)
    except (OSError, ValueError, KeyError):
        pass  # a tokenizer-only folder: its length is the size
    return len(load_tokenizer(str(path), None, False))


def text_tokenizer_fingerprint(tok: Any) -> str:
    """Short digest of any tokenizer, the key of the tokenized text files.

    A fast tokenizer gets :func:`~lightning_distill.cache.fingerprint.tokenizer_fingerprint` (its
    full JSON), the same value the teacher cache keys with. That one refuses a slow tokenizer
    (no ``backend_tokenizer``), which :class:`TextDataModule` may be given; a slow one is keyed by
    its class, size and first 1,000 vocabulary entries instead. Stored keys depend on both
    values: do not change either.
    """
    if getattr(tok, "backend_tokenizer", None) is not None:
        return tokenizer_fingerprint(tok)
    blob = f"{type(tok).__name__}:{len(tok)}:{sorted(tok.get_vocab().items())[:1000]}"
    return hashlib.sha256(blob.encode("utf-8")).hexdigest()[:16]


def tokenize_documents(
    tok: Any,
    docs: Sequence[TextDocument],
    instruct: bool,
    add_special_tokens: bool,
    add_eos: bool,
    progress: bool,
) -> tuple[list[list[int]], list[list[int]]]:
    """Token ids and labels per document, in chunks, with a progress bar.

    Plain text: labels are the ids (``eos`` appended with ``add_eos``). Instruction pairs: see
    :func:`encode_pair`.

    Raises:
        ValueError: on instruction data the chat template cannot render (see :func:`encode_pair`).
    """
    from tqdm.auto import tqdm

    eos = getattr(tok, "eos_token_id", None)
    chunk = 1000
    ids: list[list[int]] = []
    labels: list[list[int]] = []
    bar = tqdm(total=len(docs), desc="Tokenizing", unit="doc", disable=not progress, leave=False)
    try:
        for start in range(0, len(docs), chunk):
            part = docs[start : start + chunk]
            if instruct:
                for doc in part:
                    x, y = encode_pair(tok, doc, add_eos)
                    ids.append(x)
                    labels.append(y)
            else:
                for x in _encode(tok, [d.text for d in part], add_special_tokens):
                    if add_eos and eos is not None and (not x or x[-1] != eos):
                        x.append(eos)
                    ids.append(x)
                    labels.append(x)
            bar.update(len(part))
    finally:
        bar.close()
    return ids, labels


def encode_pair(tok: Any, doc: TextDocument, add_eos: bool) -> tuple[list[int], list[int]]:
    """A prompt/response pair through the chat template; the prompt's labels are ``-100``.

    Raises:
        ValueError: if the tokenizer has no chat template, or the template renders the prompt
            differently with and without the response.
    """
    if not getattr(tok, "chat_template", None):
        raise ValueError(
            "prompt_field/response_field need a chat template, and this tokenizer has none; "
            "pass data.chat_template='<jinja template>' or use a tokenizer that has one."
        )
    user = [{"role": "user", "content": doc.prompt or ""}]
    prompt = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(
        [*user, {"role": "assistant", "content": doc.response}], tokenize=False
    )
    if not full.startswith(prompt):
        raise ValueError(
            "the chat template renders the prompt differently with and without the response, "
            f"so the response tokens cannot be found ({doc.source}); pass data.chat_template= a "
            "template whose generation prompt is a prefix of the full conversation."
        )
    p_ids, r_ids = _encode(tok, [prompt, full[len(prompt) :]], False)
    eos = getattr(tok, "eos_token_id", None)
    if add_eos and eos is not None and (not r_ids or r_ids[-1] != eos):
        r_ids.append(eos)  # the student learns where an answer ends
    return p_ids + r_ids, [-100] * len(p_ids) + r_ids


def _encode(tok: Any, texts: list[str], add_special_tokens: bool) -> list[list[int]]:
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # a fast tokenizer: one (multi-threaded) Rust call for the chunk
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)  # no offsets
        return [enc.ids for enc in encode(texts, add_special_tokens=add_special_tokens)]
    out = tok(
        texts, add_special_tokens=add_special_tokens, return_attention_mask=False, verbose=False
    )
    return [list(x) for x in out["input_ids"]]
