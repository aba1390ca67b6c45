"""A small OpenAI-compatible server over a Hugging Face causal LM, on loopback, for tests and tries.

It speaks the part of the OpenAI API that teacher-data generation uses, the way vLLM serves it:

* ``GET /v1/models``: the one served model.
* ``POST /v1/chat/completions``: ``messages`` (the tokenizer's chat template when it has one,
  else the contents joined by newlines), ``n``, ``max_tokens`` (or ``max_completion_tokens``),
  ``temperature`` (0: greedy), ``top_p``, ``seed``, ``stop``.
* ``POST /v1/completions``: ``prompt`` (a string, a list of strings, a list of token ids or a
  list of such lists), the same settings plus ``echo``, ``logprobs: k`` (top-k log-probabilities
  of each returned token, the chosen token included, as the raw model distribution) and vLLM's
  ``return_tokens_as_token_ids`` (tokens written ``"token_id:<id>"``). ``echo: true`` with
  ``max_tokens: 0`` returns the prompt's own log-probabilities (the first is ``null``).

Every answer has ``usage`` and each choice a ``finish_reason`` (``stop``: end token or a stop
string, which is cut off; ``length``: ``max_tokens`` reached). Errors are OpenAI-style bodies
``{"error": {"message", "type", "code"}}``: 400 for a bad request, 401 for a wrong or missing key
(when the server has one), 404 for an unknown model or path.

Generation runs one request at a time (a lock around the model). Choice ``j`` of a prompt is
sampled under a seed derived from the request's ``seed``, the prompt's token ids and ``j``, so the
same request with the same seed gives the same text (same hardware and library versions); without
a ``seed`` every request draws a fresh one.

**Fault injection** (tests): ``faults`` is a list of behaviours used by the next requests, one
each, in order; after the list the server serves normally. ``"429"`` (``"429:<s>"`` adds
``Retry-After: <s>``), ``"500"``, ``"503"``, ``"400"``, ``"401"`` answer with that status and an
OpenAI-style error; ``"slow:<s>"`` waits ``s`` seconds and then serves; ``"malformed"`` answers
200 with a body that is not JSON; ``"drop"`` closes the connection without an answer.

From Python::

    with serve(model, tokenizer, model_name="tiny") as server:
        client = openai.OpenAI(base_url=server.base_url, api_key="EMPTY")

From the shell (the key, if any, is read from the environment variable you name)::

    python -m lightning_distill.blackbox.server --model path/to/hf_folder --port 8000
"""

from __future__ import annotations

import argparse
import hashlib
import hmac
import json
import logging
import os
import secrets
import threading
import time
from collections import deque
from collections.abc import Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from lightning_distill.validation import check_int

__all__ = ["FAULTS", "LoopbackServer", "serve"]

log = logging.getLogger(__name__)

FAULTS = ("429", "500", "503", "400", "401", "slow", "malformed", "drop")
MAX_N = 64
MAX_LOGPROBS = 20


class RequestError(Exception):
    """A request the server refuses: HTTP status and an OpenAI-style error."""

    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", code=None):
        super().__init__(message)
        self.status, self.message, self.type, self.code = status, message, type_, code


def _check_fault(fault: Any) -> str:
    if not isinstance(fault, str):
        raise TypeError(f"each fault must be a str, got {fault!r} ({type(fault).__name__}).")
    head, _, arg = fault.partition(":")
    if head not in FAULTS or (head == "slow" and not arg) or (arg and head not in ("slow", "429")):
        raise ValueError(
            f"unknown fault {fault!r}; use one of '429', '429:<seconds>', '500', '503', '400', "
            "'401', 'slow:<seconds>', 'malformed', 'drop'."
        )
    if arg:
        try:
            if float(arg) < 0:
                raise ValueError
        except ValueError:
            raise ValueError(f"fault {fault!r}: {arg!r} is not a number of seconds >= 0.") from None
    return fault


def _derived_seed(seed: int, ids: list[int], j: int) -> int:
    blob = json.dumps([seed, ids, j]).encode("utf-8")
    return int.from_bytes(hashlib.sha256(blob).digest()[:8], "big") % (2**63)


class _Engine:
    """The model, its tokenizer and a lock; turns parsed requests into choices."""

    def __init__(self, model: Any, tokenizer: Any) -> None:
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.lock = threading.Lock()
        self.eos_id = tokenizer.eos_token_id
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.eos_id

    # ------------------------------------------------------------------ prompts

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        tok = self.tokenizer
        if getattr(tok, "chat_template", None):
            text = tok.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
            return list(tok(text, add_special_tokens=False)["input_ids"])
        text = "\n".join(m["content"] for m in messages)
        return list(tok(text)["input_ids"])

    def prompt_ids(self, prompt: str | list[int]) -> list[int]:
        if isinstance(prompt, str):
            return list(self.tokenizer(prompt)["input_ids"])
        return list(prompt)

    def token_str(self, token_id: int, as_ids: bool) -> str:
        if as_ids:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id])

    # ------------------------------------------------------------------ generation

    def sample(
        self,
        ids: list[int],
        *,
        n: int,
        max_tokens: int,
        temperature: float,
        top_p: float,
        seed: int,
        stop: list[str],
    ) -> list[tuple[list[int], str, str]]:
        """``n`` choices for one prompt: (generated ids, text, finish_reason)."""
        import torch
        from transformers import StoppingCriteria, StoppingCriteriaList

        tok = self.tokenizer
        out = []
        if max_tokens == 0:
            return [([], "", "length") for _ in range(n)]
        device = next(self.model.parameters()).device
        width = len(ids)

        class StopStrings(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                text = tok.decode(input_ids[0, width:], skip_special_tokens=True)
                return torch.tensor([any(s in text for s in stop)], device=input_ids.device)

        criteria = StoppingCriteriaList([StopStrings()]) if stop else None
        for j in range(n):
            kwargs: dict[str, Any] = {"do_sample": temperature > 0}
            if temperature > 0:
                kwargs.update(temperature=temperature, top_p=top_p, top_k=0)
            cuda = [device] if device.type == "cuda" else []
            with self.lock, torch.random.fork_rng(devices=cuda), torch.no_grad():
                torch.manual_seed(_derived_seed(seed, ids, j))
                gen = self.model.generate(
                    input_ids=torch.tensor([ids], device=device),
                    attention_mask=torch.ones(1, width, dtype=torch.long, device=device),
                    max_new_tokens=max_tokens,
                    pad_token_id=self.pad_id,
                    eos_token_id=self.eos_id,
                    stopping_criteria=criteria,
                    **kwargs,
                )
            row = gen[0, width:].tolist()
            finish = "length"
            if self.eos_id is not None and self.eos_id in row:
                row = row[: row.index(self.eos_id) + 1]
                finish = "stop"
            text = tok.decode(row, skip_special_tokens=True)
            cut = [text.index(s) for s in stop if s in text]
            if cut:
                text, finish = text[: min(cut)], "stop"
            out.append((row, text, finish))
        return out

    def logprobs(
        self, ids: list[int], start: int, k: int, as_ids: bool, offset0: int
    ) -> dict[str, Any]:
        """Log-probabilities of ``ids[start:]`` under the model (raw distribution, no temperature)."""
        import torch

        device = next(self.model.parameters()).device
        with self.lock, torch.no_grad():
            logits = self.model(input_ids=torch.tensor([ids], device=device)).logits[0]
        logp = torch.log_softmax(logits.float(), dim=-1)
        tokens, token_lp, top_lp, offsets = [], [], [], []
        offset = offset0
        for t in range(start, len(ids)):
            s = self.token_str(ids[t], as_ids)
            tokens.append(s)
            offsets.append(offset)
            offset += len(self.tokenizer.decode([ids[t]]))
            if t == 0:
                token_lp.append(None)
                top_lp.append(None)
                continue
            row = logp[t - 1]
            token_lp.append(float(row[ids[t]]))
            top = {}
            if k > 0:
                values, idx = torch.topk(row, k)
                top = {self.token_str(int(i), as_ids): float(v) for v, i in zip(values, idx)}
            top.setdefault(s, float(row[ids[t]]))
            top_lp.append(top)
        return {
            "tokens": tokens,
            "token_logprobs": token_lp,
            "top_logprobs": top_lp,
            "text_offset": offsets,
        }


# ---------------------------------------------------------------------------- request parsing


def _get_int(body: dict, name: str, default: int | None, low: int, high: int | None = None):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RequestError(400, f"'{name}' must be an integer >= {low}, got {value!r}.", code=name)
    if high is not None and value > high:
        raise RequestError(400, f"'{name}' must be at most {high}, got {value!r}.", code=name)
    return value


def _get_float(body: dict, name: str, default: float, low: float, high: float, low_open=False):
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise RequestError(400, f"'{name}' must be a number, got {value!r}.", code=name)
    if value < low or value > high or (low_open and value == low):
        interval = f"{'(' if low_open else '['}{low}, {high}]"
        raise RequestError(400, f"'{name}' must be in {interval}, got {value!r}.", code=name)
    return float(value)


def _get_bool(body: dict, name: str) -> bool:
    value = body.get(name, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise RequestError(400, f"'{name}' must be true or false, got {value!r}.", code=name)
    return value


def _sampling(body: dict, default_max_tokens: int) -> dict[str, Any]:
    stop = body.get("stop")
    if stop is None:
        stop = []
    elif isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) and s for s in stop):
        raise RequestError(
            400,
            f"'stop' must be a string or a list of non-empty strings, got {stop!r}.",
            code="stop",
        )
    if body.get("stream"):
        raise RequestError(
            400, "streaming is not supported by this server; send 'stream': false.", code="stream"
        )
    max_tokens = body.get("max_tokens")
    if max_tokens is None:
        max_tokens = body.get("max_completion_tokens")
        name = "max_completion_tokens"
    else:
        name = "max_tokens"
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(400, f"'seed' must be an integer, got {seed!r}.", code="seed")
    return {
        "n": _get_int(body, "n", 1, 1, MAX_N),
        "max_tokens": _get_int({name: max_tokens}, name, default_max_tokens, 0),
        "temperature": _get_float(body, "temperature", 1.0, 0.0, 2.0),
        "top_p": _get_float(body, "top_p", 1.0, 0.0, 1.0, low_open=True),
        "seed": secrets.randbits(63) if seed is None else seed,
        "stop": stop,
    }


def _is_ids(x: Any) -> bool:
    return (
        isinstance(x, list)
        and bool(x)
        and all(isinstance(i, int) and not isinstance(i, bool) for i in x)
    )


def _prompts(body: dict) -> list[str | list[int]]:
    prompt = body.get("prompt")
    if isinstance(prompt, str):
        return [prompt]
    if _is_ids(prompt):
        return [prompt]
    if (
        isinstance(prompt, list)
        and prompt
        and all(isinstance(p, str) or _is_ids(p) for p in prompt)
    ):
        return prompt
    raise RequestError(
        400,
        "'prompt' must be a string, a list of strings, a list of token ids or a list of such lists; "
        f"got {json.dumps(prompt)[:80]}.",
        code="prompt",
    )


def _messages(body: dict) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(
            400, "'messages' must be a non-empty list of {role, content}.", code="messages"
        )
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict) or not isinstance(m.get("role"), str):
            raise RequestError(
                400, f"messages[{i}] must be an object with a 'role'.", code="messages"
            )
        content = m.get("content")
        if isinstance(content, list):  # [{"type": "text", "text": ...}, ...]
            parts = [p.get("text") for p in content if isinstance(p, dict)]
            if not all(isinstance(p, str) for p in parts) or len(parts) != len(content):
                raise RequestError(
                    400, f"messages[{i}].content: only text parts are supported.", code="messages"
                )
            content = "".join(parts)
        if not isinstance(content, str):
            raise RequestError(400, f"messages[{i}].content must be a string.", code="messages")
        out.append({"role": m["role"], "content": content})
    return out


# ---------------------------------------------------------------------------- HTTP


class LoopbackServer:
    """A running OpenAI-compatible server (see the module docstring); close it with :meth:`close`.

    Attributes:
        base_url: ``http://<host>:<port>/v1``, what an OpenAI client takes as ``base_url``.
        model_name: the name requests must give as ``model``.
        requests: how many HTTP requests arrived so far (faulted ones included).
        faults: the fault behaviours not used yet.
    """

    def __init__(
        self,
        model: Any,
        tokenizer: Any,
        *,
        model_name: str,
        host: str = "127.0.0.1",
        port: int = 0,
        api_key: str | None = None,
        faults: Iterable[str] | None = None,
    ) -> None:
        if not callable(getattr(model, "generate", None)):
            raise TypeError(
                f"model must have a generate method (a Hugging Face causal LM), got {type(model).__name__}."
            )
        if not isinstance(model_name, str) or not model_name:
            raise TypeError(f"model_name must be a non-empty str, got {model_name!r}.")
        if api_key is not None and (not isinstance(api_key, str) or not api_key):
            raise TypeError("api_key must be a non-empty str or None.")
        port = check_int("port", port, low=0, high=65535)
        self.model_name = model_name
        self._engine = _Engine(model, tokenizer)
        self._api_key = api_key
        self.faults: deque[str] = deque(_check_fault(f) for f in (faults or []))
        self.requests = 0
        self._count_lock = threading.Lock()
        self._ids = 0
        handler = type("Handler", (_Handler,), {"app": self})
        self._httpd = _HTTPServer((host, port), handler)
        self.host, self.port = self._httpd.server_address[:2]
        self.base_url = f"http://{self.host}:{self.port}/v1"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="lightning-distill-server",
            daemon=True,
        )
        self._thread.start()

    def __repr__(self) -> str:  # never the key
        return f"LoopbackServer(base_url={self.base_url!r}, model_name={self.model_name!r})"

    def add_faults(self, faults: Iterable[str]) -> None:
        """Queue more fault behaviours for the next requests."""
        with self._count_lock:
            self.faults.extend(_check_fault(f) for f in faults)

    def close(self) -> None:
        """Stop serving and free the port."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> LoopbackServer:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    # ------------------------------------------------------------------ bookkeeping

    def _arrive(self) -> str | None:
        with self._count_lock:
            self.requests += 1
            return self.faults.popleft() if self.faults else None

    def _next_id(self, prefix: str) -> str:
        with self._count_lock:
            self._ids += 1
            return f"{prefix}-{self._ids}"

    def _authorized(self, header: str | None) -> bool:
        if self._api_key is None:
            return True
        expected = f"Bearer {self._api_key}".encode()
        return hmac.compare_digest((header or "").encode(), expected)

    # ------------------------------------------------------------------ endpoints

    def _check_model(self, body: dict) -> None:
        model = body.get("model")
        if model != self.model_name:
            raise RequestError(
                404,
                f"The model {model!r} does not exist; this server serves {self.model_name!r}.",
                "invalid_request_error",
                "model_not_found",
            )

    def models(self) -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {
                    "id": self.model_name,
                    "object": "model",
                    "created": 0,
                    "owned_by": "lightning-distill",
                }
            ],
        }

    def completions(self, body: dict) -> dict[str, Any]:
        self._check_model(body)
        prompts = _prompts(body)
        settings = _sampling(body, default_max_tokens=16)
        echo = _get_bool(body, "echo")
        as_ids = _get_bool(body, "return_tokens_as_token_ids")
        k = _get_int(body, "logprobs", None, 0, MAX_LOGPROBS)
        if settings["max_tokens"] == 0 and not echo:
            raise RequestError(
                400, "'max_tokens' 0 is allowed only with 'echo': true.", code="max_tokens"
            )
        engine = self._engine
        choices, prompt_total, completion_total = [], 0, 0
        for prompt in prompts:
            ids = engine.prompt_ids(prompt)
            if not ids:
                raise RequestError(
                    400, "a prompt has no tokens; send a non-empty prompt.", code="prompt"
                )
            prompt_text = prompt if isinstance(prompt, str) else engine.tokenizer.decode(ids)
            prompt_total += len(ids)
            for row, text, finish in engine.sample(ids, **settings):
                completion_total += len(row)
                choice: dict[str, Any] = {
                    "index": len(choices),
                    "text": prompt_text + text if echo else text,
                    "logprobs": None,
                    "finish_reason": finish,
                }
                if k is not None:
                    start = 0 if echo else len(ids)
                    offset0 = 0 if echo else len(prompt_text)
                    choice["logprobs"] = engine.logprobs(ids + row, start, k, as_ids, offset0)
                choices.append(choice)
        return {
            "id": self._next_id("cmpl"),
            "object": "text_completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": prompt_total,
                "completion_tokens": completion_total,
                "total_tokens": prompt_total + completion_total,
            },
        }

    def chat_completions(self, body: dict) -> dict[str, Any]:
        self._check_model(body)
        messages = _messages(body)
        settings = _sampling(body, default_max_tokens=256)
        if settings["max_tokens"] == 0:
            raise RequestError(
                400, "'max_tokens' must be >= 1 for chat completions.", code="max_tokens"
            )
        if body.get("logprobs"):
            raise RequestError(
                400,
                "chat log-probabilities are not served here; use /v1/completions.",
                code="logprobs",
            )
        ids = self._engine.chat_ids(messages)
        choices, completion_total = [], 0
        for j, (row, text, finish) in enumerate(self._engine.sample(ids, **settings)):
            completion_total += len(row)
            choices.append(
                {
                    "index": j,
                    "message": {"role": "assistant", "content": text},
                    "logprobs": None,
                    "finish_reason": finish,
                }
            )
        return {
            "id": self._next_id("chatcmpl"),
            "object": "chat.completion",
            "created": int(time.time()),
            "model": self.model_name,
            "choices": choices,
            "usage": {
                "prompt_tokens": len(ids),
                "completion_tokens": completion_total,
                "total_tokens": len(ids) + completion_total,
            },
        }


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        import sys

        err = sys.exc_info()[1]
        if isinstance(err, ConnectionError):  # the client gave up (a timeout): nothing to answer
            log.debug("client %s went away: %s", client_address, err)
            return
        log.exception("error while serving %s", client_address)


_STATUS_ERRORS = {
    "400": (400, "Bad request (injected fault).", "invalid_request_error", None),
    "401": (
        401,
        "Incorrect API key provided (injected fault).",
        "invalid_request_error",
        "invalid_api_key",
    ),
    "429": (429, "Rate limit reached (injected fault).", "rate_limit_error", "rate_limit_exceeded"),
    "500": (500, "Internal server error (injected fault).", "server_error", None),
    "503": (503, "Service unavailable (injected fault).", "server_error", None),
}


class _Handler(BaseHTTPRequestHandler):
    app: LoopbackServer
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # no 40 ms delayed-ACK stall between headers and body
    server_version = "lightning-distill-loopback"

    def log_message(self, format: str, *args: Any) -> None:  # quiet; never headers
        log.debug("%s %s", self.address_string(), format % args)

    def _send(self, status: int, payload: bytes, headers: dict[str, str] | None = None) -> None:
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(payload)))
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.end_headers()
        self.wfile.write(payload)

    def _json(self, status: int, obj: Any, headers: dict[str, str] | None = None) -> None:
        self._send(status, json.dumps(obj).encode("utf-8"), headers)

    def _error(self, err: RequestError, headers: dict[str, str] | None = None) -> None:
        body = {
            "error": {"message": err.message, "type": err.type, "param": None, "code": err.code}
        }
        self._json(err.status, body, headers)

    def _read_body(self) -> bytes:
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _handle(self, method: str) -> None:
        app = self.app
        raw = self._read_body() if method == "POST" else b""
        fault = app._arrive()
        if fault is not None:
            head, _, arg = fault.partition(":")
            if head == "drop":
                self.close_connection = True
                return
            if head == "slow":
                time.sleep(float(arg))
            elif head == "malformed":
                self._send(200, b'{"id": "cmpl-broken", "choices": [')
                return
            else:
                status, message, type_, code = _STATUS_ERRORS[head]
                headers = {"Retry-After": arg} if arg else None
                self._error(RequestError(status, message, type_, code), headers)
                return
        if not app._authorized(self.headers.get("Authorization")):
            self._error(
                RequestError(
                    401,
                    "Incorrect or missing API key; send 'Authorization: Bearer <key>'.",
                    "invalid_request_error",
                    "invalid_api_key",
                )
            )
            return
        path = self.path.split("?", 1)[0].rstrip("/")
        routes = {
            ("GET", "/v1/models"): lambda body: app.models(),
            ("POST", "/v1/completions"): app.completions,
            ("POST", "/v1/chat/completions"): app.chat_completions,
        }
        route = routes.get((method, path))
        try:
            if route is None:
                known = {p for _, p in routes}
                status = 405 if path in known else 404
                raise RequestError(status, f"{method} {path} is not served here.", code="not_found")
            body: dict = {}
            if method == "POST":
                try:
                    body = json.loads(raw or b"null")
                except (json.JSONDecodeError, UnicodeDecodeError) as e:
                    raise RequestError(400, f"the request body is not valid JSON: {e}.") from None
                if not isinstance(body, dict):
                    raise RequestError(400, "the request body must be a JSON object.")
            result = route(body)
        except RequestError as err:
            self._error(err)
            return
        except Exception as e:  # a bug or a model failure: 500, logged here
            log.exception("request failed")
            self._error(
                RequestError(500, f"internal error: {type(e).__name__}: {e}", "server_error")
            )
            return
        self._json(200, result)

    def do_GET(self) -> None:  # noqa: N802 (http.server's names)
        self._handle("GET")

    def do_POST(self) -> None:  # noqa: N802
        self._handle("POST")


def serve(
    model: Any,
    tokenizer: Any,
    *,
    model_name: str,
    host: str = "127.0.0.1",
    port: int = 0,
    api_key: str | None = None,
    faults: Iterable[str] | None = None,
) -> LoopbackServer:
    """Start an OpenAI-compatible server over ``model`` in a background thread.

    Use it as a context manager (``with serve(...) as server:``) or call ``server.close()``.

    Args:
        model: a Hugging Face causal LM (with ``generate``), on its device.
        tokenizer: its tokenizer (its chat template, when it has one, serves the chat endpoint).
        model_name: the name clients must send as ``model``.
        host: the address to bind; keep ``127.0.0.1`` unless you mean to serve other machines.
        port: the port; ``0`` picks a free one (read it from ``server.base_url``).
        api_key: when given, requests must send ``Authorization: Bearer <api_key>`` (else 401).
        faults: fault behaviours for the next requests, in order (see the module docstring).

    Returns:
        The running :class:`LoopbackServer` (``base_url``, ``requests``, ``close()``).

    Raises:
        TypeError: a model without ``generate``, an empty ``model_name`` or ``api_key``.
        ValueError: an unknown fault or a port out of range.
        OSError: the port is taken.
    """
    return LoopbackServer(
        model,
        tokenizer,
        model_name=model_name,
        host=host,
        port=port,
        api_key=api_key,
        faults=faults,
    )


def main(argv: list[str] | None = None) -> None:
    """``python -m lightning_distill.blackbox.server --model <folder>``: serve until Ctrl-C."""
    parser = argparse.ArgumentParser(
        description="Serve a Hugging Face causal LM with an OpenAI-compatible API (for offline tries)."
    )
    parser.add_argument("--model", required=True, help="a folder saved with save_pretrained")
    parser.add_argument(
        "--model-name", default=None, help="the name clients send (default: the folder)"
    )
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key-env",
        default=None,
        help="name of an environment variable holding the key clients must send (none: no key)",
    )
    args = parser.parse_args(argv)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    api_key = None
    if args.api_key_env:
        api_key = os.environ.get(args.api_key_env)
        if not api_key:
            parser.error(f"--api-key-env {args.api_key_env}: that environment variable is not set.")
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model)
    name = args.model_name or args.model
    server = serve(
        model, tokenizer, model_name=name, host=args.host, port=args.port, api_key=api_key
    )
    print(f"Serving {name!r} at {server.base_url} (Ctrl-C to stop)", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        server.close()


if __name__ == "__main__":
    main()
