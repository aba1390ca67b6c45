"""The loopback OpenAI-compatible server and the OpenAI-compatible teacher source, for real over HTTP."""

from __future__ import annotations

import http.client
import json
import time

import pytest
import torch
from blackbox_fixtures import PROMPTS, tiny_model, tiny_tokenizer

from lightning_distill.blackbox.server import serve

KEY_ENV = "LD_TEST_SERVER_KEY"


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model(tokenizer):
    return tiny_model(tokenizer)


@pytest.fixture
def server(model, tokenizer):
    with serve(model, tokenizer, model_name="tiny") as s:
        yield s


def _request(server, method, path, body=None, *, key=None, raw=None, timeout=10):
    """(status, headers, parsed JSON or raw bytes) of one request."""
    conn = http.client.HTTPConnection(server.host, server.port, timeout=timeout)
    headers = {"Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"Bearer {key}"
    data = raw if raw is not None else (json.dumps(body).encode() if body is not None else None)
    try:
        conn.request(method, "/v1" + path, body=data, headers=headers)
        resp = conn.getresponse()
        payload = resp.read()
        try:
            payload = json.loads(payload)
        except json.JSONDecodeError:
            pass
        return resp.status, dict(resp.headers), payload
    finally:
        conn.close()


def _complete(server, **body):
    status, _, payload = _request(server, "POST", "/completions", {"model": "tiny", **body})
    assert status == 200, payload
    return payload


# ---------------------------------------------------------------------------- server


def test_server_models_completions_n_usage_and_seed(server, tokenizer):
    status, _, models = _request(server, "GET", "/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["tiny"]

    out = _complete(server, prompt=PROMPTS[:2], n=3, max_tokens=5, seed=7)
    assert [c["index"] for c in out["choices"]] == list(range(6))
    prompt_tokens = sum(len(tokenizer(p)["input_ids"]) for p in PROMPTS[:2])
    assert out["usage"]["prompt_tokens"] == prompt_tokens
    for c in out["choices"]:
        assert c["finish_reason"] in ("stop", "length") and c["logprobs"] is None
    # the token count is the server's own (decode/re-encode need not round-trip): check the sum
    assert out["usage"]["total_tokens"] == prompt_tokens + out["usage"]["completion_tokens"]
    completion_tokens = out["usage"]["completion_tokens"]
    assert 6 <= completion_tokens <= 30
    again = _complete(server, prompt=PROMPTS[:2], n=3, max_tokens=5, seed=7)
    other = _complete(server, prompt=PROMPTS[:2], n=3, max_tokens=5, seed=8)
    texts = [c["text"] for c in out["choices"]]
    assert texts == [c["text"] for c in again["choices"]]
    assert texts != [c["text"] for c in other["choices"]]
    assert len(set(texts[:3])) > 1  # the n samples of one prompt differ
    # a prompt alone gives what it gives in a list (seeds derive from the prompt, not its place)
    alone = _complete(server, prompt=PROMPTS[1], n=3, max_tokens=5, seed=7)
    assert [c["text"] for c in alone["choices"]] == texts[3:]


def test_server_chat_uses_the_template_and_greedy_matches_local_generate(server, model, tokenizer):
    messages = [{"role": "user", "content": PROMPTS[0]}]
    status, _, out = _request(
        server,
        "POST",
        "/chat/completions",
        {"model": "tiny", "messages": messages, "max_tokens": 6, "temperature": 0, "n": 2},
    )
    assert status == 200, out
    chat = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(chat, add_special_tokens=False)["input_ids"]
    assert out["usage"]["prompt_tokens"] == len(ids)
    with torch.no_grad():
        gen = model.generate(
            torch.tensor([ids]), max_new_tokens=6, do_sample=False, pad_token_id=0
        )[0, len(ids) :].tolist()
    if tokenizer.eos_token_id in gen:
        gen = gen[: gen.index(tokenizer.eos_token_id) + 1]
    expected = tokenizer.decode(gen, skip_special_tokens=True)
    assert [c["message"]["content"] for c in out["choices"]] == [expected, expected]
    assert out["choices"][0]["message"]["role"] == "assistant"
    assert out["usage"]["completion_tokens"] == 2 * len(gen)


def test_server_stop_string_cuts_the_text(server):
    full = _complete(server, prompt=PROMPTS[0], max_tokens=8, temperature=0)["choices"][0]
    text = full["text"]
    stop = text[2:4] if len(text) >= 4 else None
    if stop is None or not stop.strip():
        pytest.skip("greedy text too short to pick a stop string")
    cut = _complete(server, prompt=PROMPTS[0], max_tokens=8, temperature=0, stop=[stop])
    choice = cut["choices"][0]
    assert choice["text"] == text[: text.index(stop)] and choice["finish_reason"] == "stop"


def test_server_echo_logprobs_equal_the_models_log_softmax(server, model, tokenizer):
    prompt = PROMPTS[2]
    ids = tokenizer(prompt)["input_ids"]
    out = _complete(
        server, prompt=prompt, max_tokens=0, echo=True, logprobs=3, return_tokens_as_token_ids=True
    )
    choice = out["choices"][0]
    assert choice["text"] == prompt and out["usage"]["completion_tokens"] == 0
    lp = choice["logprobs"]
    assert lp["tokens"] == [f"token_id:{i}" for i in ids]  # exact token identity
    assert lp["token_logprobs"][0] is None and lp["top_logprobs"][0] is None
    with torch.no_grad():
        expected = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), dim=-1)
    for t in range(1, len(ids)):
        assert lp["token_logprobs"][t] == pytest.approx(float(expected[t - 1, ids[t]]), abs=1e-5)
        top = torch.topk(expected[t - 1], 3)
        want = {f"token_id:{int(i)}": float(v) for v, i in zip(top.values, top.indices)}
        got = lp["top_logprobs"][t]
        assert set(want) <= set(got) and len(got) <= 4  # top-3 plus the chosen token
        for token, value in want.items():
            assert got[token] == pytest.approx(value, abs=1e-5)
    # text_offset: where each token starts in the text; tokens as strings by default
    plain = _complete(server, prompt=prompt, max_tokens=0, echo=True, logprobs=1)["choices"][0]
    strings = plain["logprobs"]["tokens"]
    assert "".join(strings) == prompt
    offsets = plain["logprobs"]["text_offset"]
    assert [prompt[o : o + len(s)] for o, s in zip(offsets, strings)] == strings


def test_server_logprobs_of_generated_tokens(server, tokenizer):
    out = _complete(
        server, prompt=[tokenizer(PROMPTS[0])["input_ids"]], max_tokens=4, logprobs=0, seed=1
    )
    choice = out["choices"][0]
    lp = choice["logprobs"]
    assert len(lp["tokens"]) == out["usage"]["completion_tokens"]
    assert all(v is not None and v <= 0 for v in lp["token_logprobs"])
    assert all(len(top) == 1 for top in lp["top_logprobs"])  # logprobs=0: the chosen token only
    assert lp["text_offset"][0] == len(PROMPTS[0])


@pytest.mark.parametrize(
    "path,body,status,needle",
    [
        ("/completions", {"model": "other", "prompt": "a"}, 404, "'other' does not exist"),
        ("/completions", {"model": "tiny", "prompt": "a", "n": 0}, 400, "'n'"),
        ("/completions", {"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature"),
        ("/completions", {"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "echo"),
        ("/completions", {"model": "tiny", "prompt": 3}, 400, "'prompt'"),
        ("/completions", {"model": "tiny", "prompt": "a", "stream": True}, 400, "stream"),
        ("/chat/completions", {"model": "tiny", "messages": []}, 400, "messages"),
        ("/embeddings", {"model": "tiny"}, 404, "not served"),
    ],
)
def test_server_bad_requests_get_openai_style_errors(server, path, body, status, needle):
    got, _, payload = _request(server, "POST", path, body)
    assert got == status
    assert (
        set(payload["error"]) >= {"message", "type", "code"}
        and needle in payload["error"]["message"]
    )


def test_server_bad_json_and_api_key(model, tokenizer):
    with serve(model, tokenizer, model_name="tiny", api_key="sekrit-123") as s:
        status, _, payload = _request(s, "GET", "/models")
        assert status == 401 and payload["error"]["code"] == "invalid_api_key"
        assert "sekrit" not in json.dumps(payload)
        assert _request(s, "GET", "/models", key="wrong")[0] == 401
        assert _request(s, "GET", "/models", key="sekrit-123")[0] == 200
        status, _, payload = _request(s, "POST", "/completions", key="sekrit-123", raw=b"{nope")
        assert status == 400 and "not valid JSON" in payload["error"]["message"]
        assert "sekrit" not in repr(s)
        assert s.requests == 4


def test_server_faults_in_order_then_normal_service(model, tokenizer):
    faults = ["429:0.5", "500", "malformed", "drop", "slow:0.3", "400", "401"]
    body = {"model": "tiny", "prompt": "alpha", "max_tokens": 2}
    with serve(model, tokenizer, model_name="tiny", faults=faults) as s:
        status, headers, payload = _request(s, "POST", "/completions", body)
        assert status == 429 and headers["Retry-After"] == "0.5"
        assert payload["error"]["type"] == "rate_limit_error"
        assert _request(s, "POST", "/completions", body)[0] == 500
        status, _, payload = _request(s, "POST", "/completions", body)
        assert status == 200 and isinstance(payload, bytes)  # not JSON
        with pytest.raises((http.client.RemoteDisconnected, ConnectionError)):
            _request(s, "POST", "/completions", body)
        start = time.perf_counter()
        assert _request(s, "POST", "/completions", body)[0] == 200
        assert time.perf_counter() - start >= 0.3
        assert _request(s, "POST", "/completions", body)[0] == 400
        assert _request(s, "POST", "/completions", body)[0] == 401
        assert _request(s, "POST", "/completions", body)[0] == 200
        assert s.requests == 8 and not s.faults
    with pytest.raises(ValueError, match="unknown fault 'teapot'"):
        serve(model, tokenizer, model_name="tiny", faults=["teapot"])
    with pytest.raises(ValueError, match="seconds"):
        serve(model, tokenizer, model_name="tiny", faults=["slow:x"])


# ---------------------------------------------------------------------------- OpenAITeacher


def _teacher(server, **kw):
    from lightning_distill.blackbox import OpenAITeacher

    defaults = {
        "max_tokens": 4,
        "backoff": 0.01,
        "max_backoff": 0.05,
        "timeout": 5.0,
        "progress": False,
    }
    return OpenAITeacher(server.base_url, "tiny", **{**defaults, **kw})


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_teacher_n_samples_seed_and_prompt_order(server, endpoint):
    from lightning_distill.blackbox import TeacherSource

    teacher = _teacher(server, endpoint=endpoint, concurrency=3)
    assert isinstance(teacher, TeacherSource)
    first = teacher.generate(PROMPTS, n=2, seed=5)
    assert [len(s) for s in first] == [2] * len(PROMPTS)
    assert server.requests == len(PROMPTS)  # n in one request per prompt
    # in order: each prompt's answers are what it gets alone, one request at a time
    alone = [
        _teacher(server, endpoint=endpoint, concurrency=1).generate([p], n=2, seed=5)[0]
        for p in PROMPTS
    ]
    assert first == alone
    assert first != teacher.generate(PROMPTS, n=2, seed=6)
    for samples in first:
        assert (
            samples[0].prompt_tokens is not None and samples[0].completion_tokens is None
        )  # n > 1
    one = teacher.generate(PROMPTS[:1], n=1, seed=5)[0][0]
    assert 1 <= one.completion_tokens <= 4
    assert one.finish_reason == ("length" if one.completion_tokens == 4 else "stop")


def test_teacher_fills_missing_choices_with_seeded_single_requests(model, tokenizer, caplog):
    """A server that answers one choice whatever n (llama.cpp) gets one request per missing sample."""
    from lightning_distill.blackbox.server import LoopbackServer

    class OneChoice(LoopbackServer):
        def completions(self, body):
            return super().completions({**body, "n": 1})

    with OneChoice(tokenizer=tokenizer, model=model, model_name="tiny") as s:
        teacher = _teacher(s, endpoint="completions")
        with caplog.at_level("WARNING"):
            out = teacher.generate(PROMPTS[:2], n=3, seed=4)
        assert [len(x) for x in out] == [3, 3] and s.requests == 6
        assert "each missing sample" in caplog.text
        # sample j came from a request with n=1 and seed 4 + j
        for j in range(3):
            single = teacher.generate(PROMPTS[:1], n=1, seed=4 + j)[0][0]
            assert out[0][j] == single


@pytest.mark.parametrize(
    "faults,needle",
    [
        (["429"], "HTTP 429"),
        (["429:0.01", "500"], "HTTP 500"),
        (["503"], "HTTP 503"),
        (["malformed"], "malformed answer: the answer is not JSON"),
        (["drop"], "connection failed"),
        (["slow:4"], "no answer within timeout=2s"),
    ],
)
def test_teacher_retries_transient_failures_then_succeeds(model, tokenizer, faults, needle, caplog):
    with serve(model, tokenizer, model_name="tiny") as clean:
        expected = _teacher(clean, endpoint="completions").generate(PROMPTS[:1], n=1, seed=3)
    with serve(model, tokenizer, model_name="tiny", faults=faults) as s:
        # a timeout only the slow fault exceeds, with room for a loaded machine's normal answers
        teacher = _teacher(s, endpoint="completions", timeout=2.0 if faults[0].startswith("slow") else 60.0)
        with caplog.at_level("WARNING", logger="lightning_distill.blackbox.openai_source"):
            out = teacher.generate(PROMPTS[:1], n=1, seed=3)
        assert out == expected
        assert s.requests == len(faults) + 1
        assert needle in caplog.text and f"retry {len(faults)}/5" in caplog.text


def test_teacher_gives_up_after_max_retries_with_a_clear_error(model, tokenizer):
    from lightning_distill.blackbox import TeacherRequestError

    with serve(model, tokenizer, model_name="tiny", faults=["500"] * 3 + ["slow:1"] * 3) as s:
        teacher = _teacher(s, max_retries=2)
        with pytest.raises(
            TeacherRequestError, match=r"failed 3 time\(s\) \(max_retries=2\); last: HTTP 500"
        ) as info:
            teacher.generate(PROMPTS[:1])
        assert info.value.status == 500 and info.value.attempts == 3 and s.requests == 3
        with pytest.raises(TeacherRequestError, match="no answer within timeout=0.3s"):
            _teacher(s, max_retries=2, timeout=0.3).generate(PROMPTS[:1])


def test_teacher_honours_retry_after(model, tokenizer, caplog):
    with serve(model, tokenizer, model_name="tiny", faults=["429:0.4"]) as s:
        start = time.perf_counter()
        with caplog.at_level("WARNING"):
            _teacher(s, max_backoff=10.0).generate(PROMPTS[:1])
        assert time.perf_counter() - start >= 0.4
        assert "in 0.40s" in caplog.text


@pytest.mark.parametrize(
    "fault,status,needle",
    [
        ("400", 400, "Bad request (injected fault)."),
        ("401", 401, "Check the key; none is sent"),
        (None, 404, "The model 'missing' does not exist"),
    ],
)
def test_teacher_does_not_retry_client_errors(model, tokenizer, fault, status, needle):
    from lightning_distill.blackbox import OpenAITeacher, TeacherRequestError

    with serve(model, tokenizer, model_name="tiny", faults=[fault] if fault else None) as s:
        name = "tiny" if fault else "missing"
        teacher = OpenAITeacher(s.base_url, name, backoff=0.01, progress=False)
        with pytest.raises(TeacherRequestError, match="Not retried") as info:
            teacher.generate(PROMPTS[:1])
        message = str(info.value)
        assert needle in message and s.base_url in message and repr(name) in message
        assert info.value.status == status and s.requests == 1


def test_teacher_settings_are_checked_before_any_request(monkeypatch):
    from lightning_distill.blackbox import OpenAITeacher

    url = "http://127.0.0.1:9/v1"
    monkeypatch.delenv("LD_UNSET_KEY", raising=False)
    with pytest.raises(ValueError, match="LD_UNSET_KEY.*not set.*export LD_UNSET_KEY="):
        OpenAITeacher(url, "m", api_key_env="LD_UNSET_KEY")
    with pytest.raises(ValueError, match="endpoint"):
        OpenAITeacher(url, "m", endpoint="embeddings")
    with pytest.raises(ValueError, match="http"):
        OpenAITeacher("localhost:8000", "m")
    with pytest.raises(ValueError, match="concurrency"):
        OpenAITeacher(url, "m", concurrency=0)
    with pytest.raises(TypeError, match="max_retries"):
        OpenAITeacher(url, "m", max_retries=1.5)
    with pytest.raises(TypeError, match="stop"):
        OpenAITeacher(url, "m", stop="\n")
    with pytest.raises(ValueError, match=r"extra_body sets \['n'\]"):
        OpenAITeacher(url, "m", extra_body={"n": 2, "top_k": 5})
    ident = OpenAITeacher(
        "https://user:tok3n@example.com:8443/v1?api-key=tok3n#x", "m", extra_body={"top_k": 5}
    ).identity()
    assert ident["base_url"] == "https://example.com:8443/v1"
    assert "tok3n" not in json.dumps(ident)
    assert ident["generation"]["extra_body"] == {"top_k": 5}
    # from a Hydra config: ListConfig / DictConfig become plain values
    from omegaconf import OmegaConf

    cfg = OmegaConf.create({"stop": ["\n\n"], "extra_body": {"top_k": 5, "ids": [1, 2]}})
    t = OpenAITeacher(url, "m", stop=cfg.stop, extra_body=cfg.extra_body)
    assert t.identity()["generation"]["stop"] == ["\n\n"]
    assert json.dumps(t.identity()["generation"]["extra_body"]) == '{"top_k": 5, "ids": [1, 2]}'


def test_teacher_without_openai_names_the_extra(monkeypatch):
    import sys

    from lightning_distill.blackbox import OpenAITeacher

    monkeypatch.setitem(sys.modules, "openai", None)  # what a missing package looks like to import
    with pytest.raises(ImportError, match=r"pip install 'lightning-distill\[openai\]'"):
        OpenAITeacher("http://127.0.0.1:9/v1", "m")


def test_write_records_through_the_server_never_leaks_the_key(
    model, tokenizer, tmp_path, monkeypatch, capfd, caplog
):
    """A recognisable key in an env var, a server that checks it, a full write: the key is nowhere."""
    import logging

    from lightning_distill.blackbox import (
        OpenAITeacher,
        TeacherRequestError,
        read_records,
        write_records,
    )

    key = "sk-LEAKCHECK-4b1d-7e57-ca11-deadbeef"
    monkeypatch.setenv(KEY_ENV, key)
    caplog.set_level(logging.DEBUG)  # the client's and httpx's debug logs too
    with serve(model, tokenizer, model_name="tiny", api_key=key, faults=["429", "500"]) as s:
        teacher = OpenAITeacher(
            s.base_url, "tiny", api_key_env=KEY_ENV, max_tokens=4, backoff=0.01, concurrency=2
        )
        stats = write_records(
            teacher, PROMPTS, tmp_path, n=2, seed=1, slices=["a", "b", "a", "b"], shard_size=4
        )
        # the server checks the key: a wrong one is refused, so the right one was sent
        monkeypatch.setenv("LD_WRONG_KEY", "not-the-key")
        with pytest.raises(TeacherRequestError, match="401"):
            OpenAITeacher(s.base_url, "tiny", api_key_env="LD_WRONG_KEY", progress=False).generate(
                ["x"]
            )
    assert stats == {"written": 8, "skipped": 0, "shards": 2}
    records = read_records(tmp_path)
    assert len(records) == 8 and records[0]["teacher"]["source"] == "openai"
    assert records[0]["teacher"]["base_url"] == s.base_url
    assert records[0]["generation"]["n"] == 2 and records[0]["generation"]["endpoint"] == "chat"
    out, err = capfd.readouterr()
    assert "Teacher tiny" in err  # the progress bar did run
    seen = {"stdout": out, "stderr": err, "logs": caplog.text, "repr": repr(teacher)}
    seen["identity"] = json.dumps(teacher.identity())
    assert "retry" in caplog.text  # the retries were logged
    for path in tmp_path.rglob("*"):
        if path.is_file():
            seen[str(path)] = path.read_text(encoding="utf-8", errors="replace")
    for where, text in seen.items():
        assert key not in text, f"the API key leaked into {where}"
        assert key[3:20] not in text, f"part of the API key leaked into {where}"


def test_a_failed_prompt_stops_the_other_requests_retrying(model, tokenizer):
    from lightning_distill.blackbox import TeacherRequestError

    with serve(model, tokenizer, model_name="tiny", faults=["400"] + ["500"] * 30) as s:
        teacher = _teacher(s, concurrency=2, max_retries=20, backoff=0.2, max_backoff=0.2)
        with pytest.raises(TeacherRequestError, match="answered 400"):
            teacher.generate(PROMPTS[:2])
        after = s.requests
        time.sleep(0.6)  # a retry loop left running would send about 6 more requests here
        assert after <= 3 and s.requests - after <= 1


@pytest.mark.slow
def test_server_command_serves_a_saved_model(model, tokenizer, tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    from lightning_distill.blackbox import OpenAITeacher

    model.save_pretrained(tmp_path / "m")
    tokenizer.save_pretrained(tmp_path / "m")
    monkeypatch.setenv(KEY_ENV, "cli-key")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "lightning_distill.blackbox.server",
            "--model",
            str(tmp_path / "m"),
            "--model-name",
            "saved",
            "--port",
            "0",
            "--api-key-env",
            KEY_ENV,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    try:
        line = proc.stdout.readline()
        assert "Serving 'saved' at http://127.0.0.1:" in line, proc.stderr.read()
        url = line.split(" at ")[1].split()[0]
        teacher = OpenAITeacher(url, "saved", api_key_env=KEY_ENV, max_tokens=3, progress=False)
        with serve(model, tokenizer, model_name="tiny") as local:
            expected = _teacher(local, max_tokens=3).generate(PROMPTS[:2], seed=2)
        assert [[c.text for c in s] for s in teacher.generate(PROMPTS[:2], seed=2)] == [
            [c.text for c in s] for s in expected
        ]
    finally:
        proc.terminate()
        proc.wait(timeout=10)
        proc.stdout.close()
        proc.stderr.close()
