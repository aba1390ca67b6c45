"""A teacher served on other machines as a white-box teacher: its top-k prompt log-probabilities.

:class:`ServedTeacher` reads, for each training sample, the teacher's top-k log-probabilities at
every position from an OpenAI-compatible ``/v1/completions`` endpoint that serves prompt
log-probabilities the way vLLM does (``echo: true`` with ``logprobs: k``), and
:class:`~lightning_distill.cache.CacheBuilder` (``TeacherCache(kind="topk", served=...)``) stores
them as an ordinary ``topk`` teacher cache, tail bucket included. Training then reads that cache
as it reads one a local teacher built: no teacher in memory, white-box KD from a teacher that
runs elsewhere.

One request per sample: the sample's token ids as the prompt (vLLM takes a list of ints;
``prompt="text"`` sends the decoded text instead), ``echo: true``, ``logprobs: k``,
``max_tokens: 1`` (the one generated token is not kept: its top-k is the distribution at the
sample's last position), ``temperature: 1``, ``top_p: 1`` (the raw distribution) and vLLM's
``return_tokens_as_token_ids``, so tokens come back as ``"token_id:<id>"`` and no two ids share a
key. HTTP, retries (429/5xx/timeouts, backoff with jitter, ``Retry-After``), the key from a named
environment variable and concurrency are :class:`~lightning_distill.blackbox.OpenAITeacher`'s.

Token identity is checked, never assumed: before the first sample, the text of one sample is
tokenized by the server and by the student's tokenizer and the ids must agree position by
position; every answer's prompt tokens must be the sample's ids; the top-k width must be ``k``
and every id inside the student's vocabulary. A difference is one :class:`TokenMismatchError`
naming the sample, the position, both tokens and the fix.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass
from typing import Any

import numpy as np

from lightning_distill.blackbox.openai_source import OpenAITeacher, _Malformed
from lightning_distill.validation import check_bool, check_choice, check_int

__all__ = ["PromptLogprobs", "ServedTeacher", "TokenMismatchError"]

log = logging.getLogger(__name__)

_ID_PREFIX = "token_id:"
FIX = (
    "KD on a served teacher's log-probabilities needs the student to use the teacher's tokenizer: "
    "serve a teacher with the student's tokenizer (or give the student the teacher's), or distil "
    "across tokenizers instead (train on the teacher's text, or a cross-tokenizer loss)."
)


class TokenMismatchError(ValueError):
    """The served teacher's tokens are not the student's (another tokenizer, or another split)."""


@dataclass
class PromptLogprobs:
    """One sample's answer: per position ``t`` the teacher's distribution over token ``t + 1``.

    Attributes:
        top_ids: ``(L, k)`` int64, the ``k`` most likely ids, most likely first.
        top_logprobs: ``(L, k)`` float64, their log-probabilities.
        next_logprobs: ``(L,)`` float64, the log-probability of the sample's own next token
            (``nan`` at the last position, which has none).
    """

    top_ids: np.ndarray
    top_logprobs: np.ndarray
    next_logprobs: np.ndarray


class _Client(OpenAITeacher):
    """OpenAITeacher's client, retries and error messages, for prompt log-probability requests.

    ``_request(payload, 1, 0)`` sends ``payload`` (``("models",)`` or ``("logprobs", prompt, k,
    as_ids)``) with the parent's retry loop; :meth:`_send` and :meth:`_parse` are the two steps
    the loop calls.
    """

    def _send(self, payload: Any, n: int, seed: int) -> str:
        if payload[0] == "models":
            return self._client.models.with_raw_response.list().http_response.text
        _, prompt, k, as_ids = payload
        extra = {**self.extra_body, **({"return_tokens_as_token_ids": True} if as_ids else {})}
        raw = self._client.completions.with_raw_response.create(
            model=self.model,
            prompt=prompt,
            max_tokens=1,
            echo=True,
            logprobs=k,
            temperature=1.0,
            top_p=1.0,
            extra_body=extra or None,
        )
        return raw.http_response.text

    def _parse(self, text: str, n: int) -> Any:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise _Malformed(f"the answer is not JSON ({e.msg} at char {e.pos})") from None
        if not isinstance(data, dict):
            raise _Malformed("the answer is not a JSON object")
        if "choices" not in data:  # the model list
            if not isinstance(data.get("data"), list):
                raise _Malformed("the model list has no 'data' list")
            return data
        choices = data.get("choices")
        if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
            raise _Malformed("the answer does not have exactly one choice")
        lp = choices[0].get("logprobs")
        if not isinstance(lp, dict) or not all(
            isinstance(lp.get(key), list) for key in ("tokens", "token_logprobs", "top_logprobs")
        ):
            raise _Malformed(
                "the choice has no logprobs with 'tokens', 'token_logprobs' and 'top_logprobs' lists"
            )
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        return lp, usage


class ServedTeacher:
    """A teacher behind an OpenAI-compatible server, read as top-k log-probabilities (module docstring).

    Pass it to ``TeacherCache(kind="topk", k=..., served=...)`` (or ``CacheBuilder``); from the
    command line ``teacher=served callbacks=teacher_cache_topk``. It runs no model here: the
    distillation module has no teacher, the cache callback builds the cache by asking the server.

    Args:
        base_url: the server's API root, e.g. ``http://gpu-host:8000/v1``.
        model: the served model name (``GET /v1/models``).
        api_key_env: the *name* of the environment variable holding the key, or ``None``.
        top_k: log-probabilities per position; ``None``: the cache's ``k``. When given it must
            equal the cache's ``k``. vLLM serves at most ``--max-logprobs`` (default 20).
        prompt: ``"ids"`` (default: the sample's token ids, exact; vLLM accepts them) or
            ``"text"`` (its text decoded by the student's tokenizer, for servers that take only
            text; every sample's server tokens must then equal its ids).
        revision: the served weights' revision (e.g. the commit you deployed), part of the cache's
            identity; ``None``: what the server reports, if anything.
        tokenizer: the student's tokenizer, used when the data module has none.
        concurrency: requests in flight at once.
        timeout: seconds to wait for one answer.
        max_retries: retries of one request after a retryable failure.
        backoff: base delay of the first retry, in seconds (exponential, full jitter).
        max_backoff: the longest delay, also the cap on ``Retry-After``.
        return_token_ids: send vLLM's ``return_tokens_as_token_ids`` (tokens come back as ids);
            ``False`` for a server that refuses the field: tokens are then strings, mapped to ids
            through the tokenizer (refused where a string names several ids).
        extra_body: more JSON fields for every request (server extensions).

    Raises:
        ImportError: the ``openai`` package is missing.
        TypeError, ValueError: a setting of the wrong kind or out of range (named, with the fix).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        top_k: int | None = None,
        prompt: str = "ids",
        revision: str | None = None,
        tokenizer: Any = None,
        concurrency: int = 8,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        return_token_ids: bool = True,
        extra_body: dict | None = None,
    ) -> None:
        self.top_k = check_int("top_k", top_k, low=1, allow_none=True)
        self.prompt = check_choice("prompt", prompt, ("ids", "text"))
        if revision is not None and (not isinstance(revision, str) or not revision):
            raise TypeError(f"revision must be a non-empty str or None, got {revision!r}.")
        self.revision = revision
        self.tokenizer = tokenizer
        self.return_token_ids = check_bool("return_token_ids", return_token_ids)
        self._client = _Client(
            base_url,
            model,
            api_key_env=api_key_env,
            endpoint="completions",
            timeout=timeout,
            max_retries=max_retries,
            backoff=backoff,
            max_backoff=max_backoff,
            concurrency=concurrency,
            extra_body=extra_body,
            progress=False,
        )
        self.base_url = self._client.base_url
        self.model = model
        self.concurrency = self._client.concurrency
        self._identity: dict[str, Any] | None = None
        self._by_string: dict[str, int | None] | None = None
        self._table_lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return (
            f"ServedTeacher(base_url={self.base_url!r}, model={self.model!r}, top_k={self.top_k}, "
            f"prompt={self.prompt!r})"
        )

    # ------------------------------------------------------------------ identity
    def identity(self) -> dict[str, Any]:
        """What names the teacher in the cache's fingerprint: ``source: "served"``, the model name,
        the URL without credentials, and the revision (given, else reported by ``GET /v1/models``)
        and ``root`` (the weights' path, vLLM) when the server lists them. Asks the server once.

        Raises:
            TeacherRequestError: the server cannot be reached or refuses the key.
            ValueError: the server does not serve ``model``.
        """
        if self._identity is None:
            listed = self._client._request(("models",), 1, 0)
            entries = [e for e in listed["data"] if isinstance(e, dict)]
            entry = next((e for e in entries if e.get("id") == self.model), None)
            if entry is None:
                names = [e.get("id") for e in entries]
                raise ValueError(
                    f"{self.base_url} does not serve model {self.model!r}; it serves {names}. "
                    "Set model= (Hydra: teacher.model=...) to one of them."
                )
            ident: dict[str, Any] = {
                "source": "served",
                "model_name": self.model,
                "base_url": self.base_url,
            }
            revision = self.revision or entry.get("revision")
            if revision:
                ident["revision"] = str(revision)
            if entry.get("root"):
                ident["root"] = str(entry["root"])
            self._identity = ident
        return dict(self._identity)

    # ------------------------------------------------------------------ requests
    def _ask(self, prompt: str | list[int], k: int) -> tuple[dict, dict]:
        return self._client._request(("logprobs", prompt, k, self.return_token_ids), 1, 0)

    def _token_id(self, token: Any, tokenizer: Any, where: str) -> int:
        """A returned token as an id: ``"token_id:<id>"``, else a string mapped through the tokenizer."""
        if isinstance(token, str) and token.startswith(_ID_PREFIX):
            try:
                return int(token[len(_ID_PREFIX) :])
            except ValueError:
                pass
        if not isinstance(token, str):
            raise _bad_answer(self, f"{where}: token {token!r} is not a string")
        with self._table_lock:  # built once, by the first thread that needs it
            if self._by_string is None:
                table: dict[str, int | None] = {}
                for i in range(len(tokenizer)):
                    s = tokenizer.decode([i], clean_up_tokenization_spaces=False)
                    table[s] = None if s in table else i  # None: several ids decode to this string
                self._by_string = table
        found = self._by_string.get(token, "missing")
        if found is None or found == "missing":
            what = (
                "names several ids" if found is None else "is no token of the student's tokenizer"
            )
            raise TokenMismatchError(
                f"{where}: the server returned token {token!r}, which {what}. Serve with token ids "
                "(vLLM: the request field return_tokens_as_token_ids, which ServedTeacher sends unless "
                "return_token_ids=False). " + FIX
            )
        return int(found)

    def check_tokenizer(self, tokenizer: Any, ids: Sequence[int], *, k: int, sample: str) -> None:
        """Refuse a server whose tokenizer is not the student's: the text of ``ids`` tokenized by the
        server and by ``tokenizer`` must give the same ids, position by position (one request).

        Raises:
            TokenMismatchError: they differ (naming the sample, the position, both tokens, the fix).
        """
        text = tokenizer.decode(list(ids), clean_up_tokenization_spaces=False)
        mine = list(tokenizer(text)["input_ids"])
        lp, usage = self._ask(text, k)
        theirs = self._prompt_tokens(lp, usage, tokenizer, f"{sample} (tokenizer check)")
        _compare(
            mine,
            theirs,
            tokenizer,
            self,
            f"{sample}: its text, tokenized by the server and by the student's tokenizer,",
        )

    def _prompt_tokens(self, lp: dict, usage: dict, tokenizer: Any, where: str) -> list[int]:
        count = usage.get("prompt_tokens")
        tokens = lp["tokens"]
        if not isinstance(count, int) or not 0 < count <= len(tokens):
            count = len(tokens) - 1  # max_tokens=1: the last token is the generated one
        return [self._token_id(t, tokenizer, where) for t in tokens[:count]]

    def sample_logprobs(
        self, ids: Sequence[int], *, k: int, tokenizer: Any, vocab_size: int, sample: str
    ) -> PromptLogprobs:
        """The served teacher's top-``k`` log-probabilities at each of the ``len(ids)`` positions.

        Raises:
            TokenMismatchError: the server's prompt tokens are not ``ids``, or a top-k id is past
                ``vocab_size``.
            ValueError: the server returned fewer than ``k`` log-probabilities at a position.
            TeacherRequestError: the request failed for good.
        """
        ids = [int(i) for i in ids]
        length = len(ids)
        prompt: str | list[int] = ids
        if self.prompt == "text":
            prompt = tokenizer.decode(ids, clean_up_tokenization_spaces=False)
        lp, usage = self._ask(prompt, k)
        theirs = self._prompt_tokens(lp, usage, tokenizer, sample)
        _compare(
            ids,
            theirs,
            tokenizer,
            self,
            f"{sample}: the server's prompt tokens and the sample's ids",
        )
        tops = lp["top_logprobs"]
        if len(tops) < length + 1:
            raise _bad_answer(
                self,
                f"{sample}: {len(tops)} top_logprobs entries for {length} prompt "
                "tokens and one generated token",
            )
        top_ids = np.zeros((length, k), dtype=np.int64)
        top_lp = np.zeros((length, k), dtype=np.float64)
        next_lp = np.full(length, np.nan)
        for t in range(length):
            entry = tops[t + 1]  # entry t + 1 scores token t + 1: the distribution at position t
            if not isinstance(entry, dict):
                raise _bad_answer(self, f"{sample}: top_logprobs[{t + 1}] is not an object")
            pairs = sorted(
                ((float(v), self._token_id(s, tokenizer, sample)) for s, v in entry.items()),
                key=lambda p: -p[0],
            )
            if len(pairs) < k:
                raise ValueError(
                    f"{self.base_url} returned {len(pairs)} log-probabilities at position {t} of "
                    f"{sample} for logprobs={k}; lower the cache's k (callbacks.teacher_cache.k) to what "
                    "the server serves, or raise its limit (vLLM: --max-logprobs)."
                )
            pairs = pairs[:k]
            top_ids[t] = [p[1] for p in pairs]
            top_lp[t] = [p[0] for p in pairs]
            if t + 1 < length:
                value = lp["token_logprobs"][t + 1]
                next_lp[t] = float(value) if value is not None else np.nan
        bad = int(top_ids.max(initial=0))
        if top_ids.min(initial=0) < 0 or bad >= vocab_size:
            t = int(np.argwhere((top_ids >= vocab_size) | (top_ids < 0))[0][0])
            raise TokenMismatchError(
                f"{self.base_url} ({self.model}) gave id {bad} among the top-{k} at position {t} of "
                f"{sample}, past the student's {vocab_size} ids. " + FIX
            )
        if not np.isfinite(top_lp).all() or (top_lp > 1e-4).any():
            raise _bad_answer(
                self, f"{sample}: top-k log-probabilities that are not finite and <= 0"
            )
        return PromptLogprobs(top_ids, top_lp, next_lp)

    def many_logprobs(
        self,
        samples: Sequence[Sequence[int]],
        *,
        k: int,
        tokenizer: Any,
        vocab_size: int,
        names: Sequence[str],
    ) -> list[PromptLogprobs]:
        """:meth:`sample_logprobs` of several samples, ``concurrency`` requests at a time, in order."""
        if not samples:
            return []
        out: list[PromptLogprobs | None] = [None] * len(samples)
        pool = ThreadPoolExecutor(
            max_workers=min(self.concurrency, len(samples)), thread_name_prefix="served-teacher"
        )
        try:
            futures = {
                pool.submit(
                    self.sample_logprobs,
                    ids,
                    k=k,
                    tokenizer=tokenizer,
                    vocab_size=vocab_size,
                    sample=name,
                ): i
                for i, (ids, name) in enumerate(zip(samples, names))
            }
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    out[futures[f]] = f.result()  # raises the first failure
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        return out  # type: ignore[return-value]


def _bad_answer(teacher: ServedTeacher, what: str) -> ValueError:
    return ValueError(
        f"{teacher.base_url} ({teacher.model}) did not answer with prompt log-probabilities as vLLM serves "
        f"them ({what}). The server must support /v1/completions with echo=true and logprobs=k "
        "(vLLM does; see docs/blackbox.md)."
    )


def _compare(
    mine: list[int], theirs: list[int], tokenizer: Any, teacher: ServedTeacher, what: str
) -> None:
    if mine == theirs:
        return
    t = next(
        (i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), min(len(mine), len(theirs))
    )

    def show(seq: list[int], whose: str) -> str:
        if t >= len(seq):
            return f"nothing (it ends after {len(seq)} tokens)"
        text = tokenizer.decode([seq[t]], clean_up_tokenization_spaces=False)
        return f"id {seq[t]} ({text!r}{whose})"

    raise TokenMismatchError(
        f"the served teacher {teacher.model!r} at {teacher.base_url} does not share the student's tokens: "
        f"{what} differ at position {t}: the student has {show(mine, '')}, the server "
        f"{show(theirs, ' in the student tokenizer')}. " + FIX
    )
