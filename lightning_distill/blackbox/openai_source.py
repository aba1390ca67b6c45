"""A teacher behind an OpenAI-compatible HTTP server (vLLM, TGI, SGLang, llama.cpp, a hosted API).

:class:`OpenAITeacher` is a :class:`~lightning_distill.blackbox.sources.TeacherSource` that sends
each prompt as one request to the chat or completions endpoint, through the ``openai`` package
(the optional extra ``lightning-distill[openai]``). What it adds around the client:

* **The key** is read from the environment variable whose *name* you give (``api_key_env``), once,
  at construction; it goes to the client and nowhere else: not into :meth:`~OpenAITeacher.identity`,
  ``repr``, the records, the logs or an error message.
* **Retries** of its own (the client's are switched off): a 429, a 5xx, a 408/409, a timeout, a
  dropped connection or an answer that is not the JSON it should be is tried again after a delay
  drawn uniformly from ``[0, min(max_backoff, backoff * 2**attempt)]`` (exponential backoff with
  full jitter), or after the server's ``Retry-After`` (capped at ``max_backoff``) when it sends
  one. Each retry is logged as a warning. After ``max_retries`` retries the request fails with
  :class:`TeacherRequestError` saying what went wrong how many times. A 400, 401, 403, 404 or 422
  is not retried: the error carries the server's message, the model name and the URL.
* **Concurrency**: up to ``concurrency`` requests in flight (a thread pool); answers come back in
  prompt order.
* **``n`` samples**: one request asks for ``n`` choices with the call's ``seed``. A server that
  returns fewer (llama.cpp answers one) is asked for each missing sample ``j`` in a request of its
  own, with ``n=1`` and seed ``seed + j``; a warning says so once.
"""

from __future__ import annotations

import email.utils
import json
import logging
import os
import random
import threading
import time
import urllib.parse
from collections.abc import Mapping, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from typing import Any

from lightning_distill.blackbox.sources import Completion, check_prompts
from lightning_distill.validation import check_bool, check_choice, check_int, check_number

__all__ = ["OpenAITeacher", "TeacherRequestError", "public_url"]

log = logging.getLogger(__name__)

RETRY_STATUSES = (408, 409, 429)  # and every 5xx
RESERVED_BODY_KEYS = (
    "model",
    "messages",
    "prompt",
    "n",
    "seed",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "stream",
)
INSTALL_HINT = "pip install 'lightning-distill[openai]'"


class TeacherRequestError(RuntimeError):
    """A request to a teacher server failed for good (not retried, or out of retries).

    Attributes:
        status: the HTTP status of the last answer, or ``None`` (timeout, connection, bad body).
        attempts: how many times the request was sent.
    """

    def __init__(self, message: str, *, status: int | None = None, attempts: int = 1) -> None:
        super().__init__(message)
        self.status = status
        self.attempts = attempts


class _Malformed(Exception):
    """The server answered 200 with something that is not a completion."""


class _Cancelled(Exception):
    """Another prompt of the same ``generate`` call failed; stop before the next attempt."""


def public_url(url: str) -> str:
    """``url`` without credentials: user info, query string and fragment removed.

    ``https://user:token@host:8443/v1?key=x`` becomes ``https://host:8443/v1``.
    """
    parts = urllib.parse.urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:  # IPv6
        host = f"[{host}]"
    netloc = host + (f":{parts.port}" if parts.port is not None else "")
    return urllib.parse.urlunsplit((parts.scheme, netloc, parts.path, "", ""))


def _plain(value: Any) -> Any:
    """Mappings and sequences (Hydra's configs included) as dicts and lists, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        return [_plain(v) for v in value]
    return value


def _retry_after(response: Any) -> float | None:
    """Seconds the server asks to wait (``retry-after-ms`` or ``Retry-After``), or ``None``."""
    headers = getattr(response, "headers", None)
    if headers is None:
        return None
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is None:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _server_message(err: Any) -> str:
    body = getattr(err, "body", None)
    if isinstance(body, dict):
        inner = body.get("error", body)
        if isinstance(inner, dict) and inner.get("message"):
            return str(inner["message"])
    return str(getattr(err, "message", err))


class OpenAITeacher:
    """A model behind an OpenAI-compatible server as a :class:`TeacherSource` (see the module docstring).

    Args:
        base_url: the server's API root, e.g. ``http://localhost:8000/v1``.
        model: the model name the server knows (``GET /v1/models``).
        api_key_env: the *name* of the environment variable holding the API key; ``None`` for a
            server without a key (a local vLLM or the loopback server).
        endpoint: ``"chat"`` (``/chat/completions``, each prompt one user message, the server's
            chat template) or ``"completions"`` (``/completions``, the prompt as raw text).
        max_tokens: the most tokens per completion (``finish_reason="length"`` there).
        temperature: sampling temperature (``0``: greedy, where the server supports it).
        top_p: nucleus mass in (0, 1].
        stop: stop strings (the server cuts the completion before them), or ``None``.
        timeout: seconds to wait for one answer before counting it as a timeout.
        max_retries: retries of one request after a retryable failure (0: no retry).
        backoff: the base delay in seconds (the first retry waits up to ``backoff``).
        max_backoff: the longest delay in seconds, also the cap on ``Retry-After``.
        concurrency: requests in flight at once.
        extra_body: more JSON fields for every request (server extensions such as vLLM's
            ``top_k`` or ``repetition_penalty``); not the fields this class sets itself.
        progress: show a tqdm progress bar.

    Raises:
        ImportError: the ``openai`` package is missing.
        TypeError, ValueError: a setting of the wrong kind or out of range; ``api_key_env`` names
            a variable that is not set (checked here, before any request).
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        *,
        api_key_env: str | None = None,
        endpoint: str = "chat",
        max_tokens: int = 256,
        temperature: float = 1.0,
        top_p: float = 1.0,
        stop: list[str] | None = None,
        timeout: float = 60.0,
        max_retries: int = 5,
        backoff: float = 1.0,
        max_backoff: float = 30.0,
        concurrency: int = 8,
        extra_body: dict | None = None,
        progress: bool = True,
    ) -> None:
        if not isinstance(base_url, str):
            raise TypeError(f"base_url must be a str, got {type(base_url).__name__}.")
        parts = urllib.parse.urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(
                f"base_url must be an http(s) URL such as http://localhost:8000/v1, got {public_url(base_url)!r}."
            )
        if not isinstance(model, str) or not model.strip():
            raise TypeError(
                f"model must be a non-empty str (the served model name), got {model!r}."
            )
        self.base_url = public_url(base_url)
        self.model = model
        self.endpoint = check_choice("endpoint", endpoint, ("chat", "completions"))
        self.max_tokens = check_int("max_tokens", max_tokens, low=1)
        self.temperature = check_number("temperature", temperature, low=0.0)
        self.top_p = check_number("top_p", top_p, low=0.0, high=1.0, low_open=True)
        if stop is not None:
            if isinstance(stop, str) or not isinstance(stop, Sequence):
                raise TypeError(
                    f"stop must be a list of str or None, got {type(stop).__name__}; wrap one as [stop]."
                )
            for i, s in enumerate(stop):
                if not isinstance(s, str) or not s:
                    raise TypeError(f"stop[{i}] must be a non-empty str, got {s!r}.")
            stop = list(stop)
        self.stop = stop
        self.timeout = check_number("timeout", timeout, low=0.0, low_open=True)
        self.max_retries = check_int("max_retries", max_retries, low=0)
        self.backoff = check_number("backoff", backoff, low=0.0)
        self.max_backoff = check_number("max_backoff", max_backoff, low=0.0)
        self.concurrency = check_int("concurrency", concurrency, low=1)
        if extra_body is not None and not isinstance(extra_body, Mapping):
            raise TypeError(f"extra_body must be a dict or None, got {type(extra_body).__name__}.")
        extra_body = _plain(extra_body or {})  # a Hydra DictConfig becomes plain JSON values
        clash = sorted(set(extra_body) & set(RESERVED_BODY_KEYS))
        if clash:
            raise ValueError(
                f"extra_body sets {clash}, which OpenAITeacher sets itself; use its arguments "
                "(max_tokens, temperature, top_p, stop) or the generate call's n and seed."
            )
        self.extra_body = extra_body
        self.progress = check_bool("progress", progress)
        if api_key_env is not None and (not isinstance(api_key_env, str) or not api_key_env):
            raise TypeError(
                f"api_key_env must be the name of an environment variable (a str) or None, got {api_key_env!r}."
            )
        self.api_key_env = api_key_env
        key = None
        if api_key_env is not None:
            key = os.environ.get(api_key_env)
            if not key:
                raise ValueError(
                    f"api_key_env={api_key_env!r} names an environment variable that is not set; "
                    f"set it (export {api_key_env}=...) before running, or use api_key_env=None "
                    "for a server without a key."
                )
        try:
            import openai
        except ImportError as e:
            raise ImportError(f"OpenAITeacher needs the openai package: {INSTALL_HINT}") from e
        self._openai = openai
        # the client's own retries are off: this class retries, logs and honours Retry-After
        self._client = openai.OpenAI(
            base_url=base_url, api_key=key or "EMPTY", timeout=self.timeout, max_retries=0
        )
        self._rng = random.Random()
        self._warned: set[str] = set()
        self._warn_lock = threading.Lock()

    def __repr__(self) -> str:  # never the key
        return (
            f"OpenAITeacher(base_url={self.base_url!r}, model={self.model!r}, "
            f"endpoint={self.endpoint!r}, api_key_env={self.api_key_env!r})"
        )

    def settings(self) -> dict[str, Any]:
        """The generation settings, as plain values."""
        return {
            "endpoint": self.endpoint,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "stop": self.stop,
            "extra_body": self.extra_body,
        }

    def identity(self) -> dict[str, Any]:
        """Source kind, model name, the server URL without credentials, endpoint and settings."""
        return {
            "source": "openai",
            "model_name": self.model,
            "base_url": self.base_url,
            "endpoint": self.endpoint,
            "generation": self.settings(),
        }

    # ------------------------------------------------------------------ generation

    def generate(self, prompts: list[str], *, n: int = 1, seed: int = 0) -> list[list[Completion]]:
        """``n`` completions for each prompt, in prompt order.

        Raises:
            TypeError, ValueError: ``prompts`` not a list of str, ``n`` < 1, ``seed`` not an int.
            TeacherRequestError: a request failed for good (see the class docstring).
        """
        prompts = check_prompts(prompts)
        n = check_int("n", n, low=1)
        seed = check_int("seed", seed)
        out: list[list[Completion] | None] = [None] * len(prompts)
        if not prompts:
            return []
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(prompts), desc=f"Teacher {self.model}", unit="prompt")
        pool = ThreadPoolExecutor(
            max_workers=min(self.concurrency, len(prompts)), thread_name_prefix="openai-teacher"
        )
        cancel = threading.Event()
        try:
            futures = {
                pool.submit(self._samples, p, n, seed, cancel): i for i, p in enumerate(prompts)
            }
            pending = set(futures)
            while pending:
                done, pending = wait(pending, return_when=FIRST_EXCEPTION)
                for f in done:
                    out[futures[f]] = f.result()  # raises the first failure
                    if bar is not None:
                        bar.update(1)
        finally:
            cancel.set()  # requests still waiting to retry give up
            pool.shutdown(wait=False, cancel_futures=True)
            if bar is not None:
                bar.close()
        return out  # type: ignore[return-value]

    def _samples(
        self, prompt: str, n: int, seed: int, cancel: threading.Event | None = None
    ) -> list[Completion]:
        samples = self._request(prompt, n, seed, cancel)
        if len(samples) < n:
            self._warn_once(
                "fewer",
                f"{self.base_url} returned {len(samples)} choice(s) when asked for n={n}; asking for "
                "each missing sample in a request of its own (n=1, seed + sample index).",
            )
            for j in range(len(samples), n):
                samples.append(self._request(prompt, 1, seed + j, cancel)[0])
        return samples

    def _warn_once(self, key: str, message: str) -> None:
        with self._warn_lock:
            if key in self._warned:
                return
            self._warned.add(key)
        log.warning(message)

    def _send(self, prompt: str, n: int, seed: int) -> str:
        """One request; the raw body text of a 200 answer."""
        body: dict[str, Any] = {
            "model": self.model,
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "seed": seed,
        }
        if n > 1:
            body["n"] = n
        if self.stop:
            body["stop"] = self.stop
        extra = self.extra_body or None
        if self.endpoint == "chat":
            raw = self._client.chat.completions.with_raw_response.create(
                messages=[{"role": "user", "content": prompt}], extra_body=extra, **body
            )
        else:
            raw = self._client.completions.with_raw_response.create(
                prompt=prompt, extra_body=extra, **body
            )
        return raw.http_response.text

    def _parse(self, text: str, n: int) -> list[Completion]:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise _Malformed(f"the answer is not JSON ({e.msg} at char {e.pos})") from None
        choices = data.get("choices") if isinstance(data, dict) else None
        if not isinstance(choices, list) or not choices:
            raise _Malformed("the answer has no 'choices' list")
        if len(choices) > n:
            raise _Malformed(f"the answer has {len(choices)} choices for n={n}")
        if all(isinstance(c, dict) and isinstance(c.get("index"), int) for c in choices):
            choices = sorted(choices, key=lambda c: c["index"])
        usage = data.get("usage") if isinstance(data.get("usage"), dict) else {}
        prompt_tokens = usage.get("prompt_tokens")
        completion_tokens = usage.get("completion_tokens") if len(choices) == 1 else None
        out = []
        for c in choices:
            if not isinstance(c, dict):
                raise _Malformed("a choice is not an object")
            if self.endpoint == "chat":
                message = c.get("message")
                content = message.get("content") if isinstance(message, dict) else None
            else:
                content = c.get("text")
            if content is None:
                content = ""
            if not isinstance(content, str):
                raise _Malformed("a choice's text is not a string")
            reason = c.get("finish_reason")
            if reason != "length" and reason not in ("stop", "eos"):
                self._warn_once(
                    f"reason:{reason}",
                    f"{self.base_url} gave finish_reason={reason!r}; recorded as 'stop'.",
                )
            out.append(
                Completion(
                    content,
                    "length" if reason == "length" else "stop",
                    prompt_tokens if isinstance(prompt_tokens, int) else None,
                    completion_tokens if isinstance(completion_tokens, int) else None,
                )
            )
        return out

    def _request(
        self, prompt: str, n: int, seed: int, cancel: threading.Event | None = None
    ) -> list[Completion]:
        """One request with retries (see the class docstring)."""
        openai = self._openai
        where = f"{self.base_url} ({self.endpoint} endpoint, model {self.model!r})"
        for attempt in range(self.max_retries + 1):
            if cancel is not None and cancel.is_set():
                raise _Cancelled()
            wait_for = None
            status = None
            try:
                return self._parse(self._send(prompt, n, seed), n)
            except openai.APIStatusError as e:
                status = e.status_code
                message = _server_message(e)
                if status not in RETRY_STATUSES and status < 500:
                    hint = {
                        401: " Check the key"
                        + (
                            f" in ${self.api_key_env}."
                            if self.api_key_env
                            else "; none is sent (api_key_env=None)."
                        ),
                        403: " The key is not allowed to use this model.",
                        404: " Check the model name (GET /v1/models lists them) and the base URL.",
                    }.get(status, "")
                    raise TeacherRequestError(
                        f"{where} answered {status}: {message}{hint} Not retried.",
                        status=status,
                        attempts=attempt + 1,
                    ) from None
                what = f"HTTP {status}: {message.rstrip('.')}"
                wait_for = _retry_after(e.response)
            except openai.APITimeoutError:
                what = f"no answer within timeout={self.timeout:g}s"
            except openai.APIConnectionError as e:
                cause = e.__cause__ or e
                what = f"connection failed ({type(cause).__name__}: {str(cause).rstrip('.')})"
            except _Malformed as e:
                what = f"malformed answer: {e}"
            if attempt == self.max_retries:
                if what.startswith("connection"):
                    fix = (" Check that the server is running and that base_url (host, port, the /v1 "
                           "suffix) reaches it from this machine.")
                elif what.startswith("no answer"):
                    fix = " Raise timeout= for a slow server, or lower max_tokens or concurrency."
                else:
                    fix = " Raise max_retries= or try again later."
                raise TeacherRequestError(
                    f"{where} failed {attempt + 1} time(s) (max_retries={self.max_retries}); "
                    f"last: {what}.{fix}",
                    status=status,
                    attempts=attempt + 1,
                ) from None
            cap = min(self.max_backoff, self.backoff * 2**attempt)
            delay = (
                min(self.max_backoff, wait_for)
                if wait_for is not None
                else self._rng.uniform(0, cap)
            )
            log.warning(
                "%s: %s; retry %d/%d in %.2fs", where, what, attempt + 1, self.max_retries, delay
            )
            if cancel is not None:
                cancel.wait(delay)
            else:
                time.sleep(delay)
        raise AssertionError("unreachable")  # pragma: no cover
