"""Black-box distillation, first part: teacher sources and the resumable record writer."""

from __future__ import annotations

import copy
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from lightning_distill.blackbox import (
    Completion,
    FunctionTeacher,
    LocalHFTeacher,
    TeacherSource,
    prompt_id,
    read_records,
    shard_paths,
    write_records,
)
from lightning_distill.data.tokenizer import train_bpe_tokenizer
from lightning_distill.models import causal_lm_from_config

SCRIPTS = Path(__file__).parent / "scripts"
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
WORDS = "alpha beta gamma delta def return import class the of and to in is".split()
PROMPTS = ["alpha beta gamma", "def f(x): return", "the class of delta is", "import gamma"]


@pytest.fixture(scope="module")
def tokenizer():
    """A 300-token byte-level BPE with a chat template, trained offline."""
    tok = train_bpe_tokenizer([" ".join(WORDS) * 4, "def f(x):\n    return x\n"], 300)
    tok.chat_template = TEMPLATE
    return tok


@pytest.fixture(scope="module")
def model(tokenizer):
    torch.set_num_threads(1)
    return causal_lm_from_config(
        "llama",
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def _teacher(model, tokenizer, **kw) -> LocalHFTeacher:
    defaults = {"max_new_tokens": 6, "batch_size": 3, "seed": 0, "progress": False}
    return LocalHFTeacher(model, tokenizer, **{**defaults, **kw})


def _echo(prompts, *, n, seed):
    return [[f"{p} | {j} | {seed}" for j in range(n)] for p in prompts]


# ---------------------------------------------------------------------------- local source


def test_local_teacher_same_seed_same_generations_n_per_prompt(model, tokenizer):
    teacher = _teacher(model, tokenizer)
    assert isinstance(teacher, TeacherSource)
    first = teacher.generate(PROMPTS, n=3, seed=11)
    again = teacher.generate(PROMPTS, n=3, seed=11)
    other = teacher.generate(PROMPTS, n=3, seed=12)
    assert [len(s) for s in first] == [3] * len(PROMPTS)
    assert first == again
    assert [[c.text for c in s] for s in first] != [[c.text for c in s] for s in other]
    # samples of one prompt differ from each other (random init, temperature 1, 6 tokens of 300)
    assert len({c.text for c in first[0]}) > 1
    for samples, prompt in zip(first, PROMPTS):
        chat = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
        )
        expected_prompt = len(tokenizer(chat, add_special_tokens=False)["input_ids"])
        for c in samples:
            assert (
                c.prompt_tokens == expected_prompt
            )  # left padding not counted, chat template applied
            assert 1 <= c.completion_tokens <= 6
            assert c.finish_reason == ("length" if c.completion_tokens == 6 else "stop")
            assert isinstance(c.text, str)


def test_local_teacher_batching_is_left_padded_greedy_matches_single(model, tokenizer):
    """Greedy decoding: a prompt batched with longer ones gives what it gives alone."""
    batched = _teacher(model, tokenizer, do_sample=False, batch_size=4).generate(PROMPTS, n=1)
    single = [
        _teacher(model, tokenizer, do_sample=False, batch_size=1).generate([p], n=1)[0]
        for p in PROMPTS
    ]
    assert [s[0].text for s in batched] == [s[0].text for s in single]


def test_local_teacher_without_chat_template_leaves_rng_alone(model, tokenizer):
    plain = copy.deepcopy(tokenizer)
    plain.chat_template = None
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    out = _teacher(model, plain).generate(PROMPTS[:2], n=2, seed=1)
    assert torch.equal(torch.rand(3), expected_next)  # the caller's random stream is untouched
    assert [c.prompt_tokens for c in out[1]] == [len(plain(PROMPTS[1])["input_ids"])] * 2
    assert _teacher(model, plain).identity()["generation"]["chat_template"] is False


def test_local_teacher_identity_and_bad_settings(model, tokenizer):
    ident = _teacher(model, tokenizer, temperature=0.7).identity()
    json.dumps(ident)  # plain values
    assert ident["source"] == "local_hf"
    assert len(ident["model"]["weights_sha256"]) == 16
    assert (
        ident["generation"]["temperature"] == 0.7 and ident["generation"]["chat_template"] is True
    )
    with pytest.raises(ValueError, match="temperature"):
        _teacher(model, tokenizer, temperature=0.0)
    with pytest.raises(ValueError, match="top_p"):
        _teacher(model, tokenizer, top_p=1.5)
    with pytest.raises(TypeError, match="prompts"):
        _teacher(model, tokenizer).generate("one prompt")
    with pytest.raises(TypeError, match="generate"):
        LocalHFTeacher(object(), tokenizer)


def test_function_teacher_checks_its_answers():
    t = FunctionTeacher(_echo, name="echo", identity={"url": "http://host:8000/v1"})
    assert t.identity() == {
        "source": "function",
        "model_name": "echo",
        "url": "http://host:8000/v1",
    }
    out = t.generate(["a", "b"], n=2, seed=5)
    assert out[1][1] == Completion("b | 1 | 5")
    with pytest.raises(ValueError, match="expected n=3"):
        FunctionTeacher(lambda p, n, seed: [["x"] for _ in p]).generate(["a"], n=3)
    with pytest.raises(ValueError, match="one per prompt"):
        FunctionTeacher(lambda p, n, seed: []).generate(["a"], n=1)
    with pytest.raises(ValueError, match="finish_reason"):
        FunctionTeacher(lambda p, n, seed: [[{"text": "x", "finish_reason": "eos"}]]).generate(
            ["a"]
        )


# ---------------------------------------------------------------------------- writer


def test_records_fields_and_datasets_load(model, tokenizer, tmp_path):
    from datasets import load_dataset

    teacher = _teacher(model, tokenizer)
    slices = ["prose", "code", "prose", "code"]
    stats = write_records(teacher, PROMPTS, tmp_path, n=2, seed=3, slices=slices, shard_size=4)
    assert stats == {"written": 8, "skipped": 0, "shards": 2}
    records = read_records(tmp_path)
    assert {(r["prompt_id"], r["sample_index"]) for r in records} == {
        (prompt_id(p), j) for p in PROMPTS for j in range(2)
    }
    r = records[0]
    assert set(r) == {
        "format_version",
        "prompt_id",
        "sample_index",
        "slice",
        "prompt",
        "completion",
        "finish_reason",
        "usage",
        "teacher",
        "generation",
        "created_at",
    }
    assert r["prompt_id"] == prompt_id(PROMPTS[0]) and len(r["prompt_id"]) == 16
    assert r["slice"] == "prose" and r["finish_reason"] in ("stop", "length")
    assert r["teacher"]["model"]["weights_sha256"] == teacher.identity()["model"]["weights_sha256"]
    assert "generation" not in r["teacher"]
    assert r["generation"] == {**teacher.settings(), "n": 2, "seed": 3}
    assert r["created_at"].endswith("+00:00")
    # the records are the source's own completions
    by_key = {(x["prompt_id"], x["sample_index"]): x["completion"] for x in records}
    expected = teacher.generate(PROMPTS[:2], n=2, seed=3)  # first group: 2 prompts per shard of 4
    assert by_key[(prompt_id(PROMPTS[1]), 1)] == expected[1][1].text

    ds = load_dataset(
        "json",
        data_files=[str(p) for p in shard_paths(tmp_path)],
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert len(ds) == 8 and ds[0]["prompt"] == PROMPTS[0] and ds[3]["slice"] == "code"

    # a rerun writes nothing new; a larger n adds only the new sample indices
    assert write_records(teacher, PROMPTS, tmp_path, n=2, seed=3, slices=slices) == {
        "written": 0,
        "skipped": 8,
        "shards": 0,
    }
    assert write_records(teacher, PROMPTS, tmp_path, n=3, seed=3, slices=slices)["written"] == 4
    assert len(read_records(tmp_path)) == 12


def test_writer_bad_input(tmp_path):
    t = FunctionTeacher(_echo)
    with pytest.raises(ValueError, match="slices has 1 entries for 2 prompts"):
        write_records(t, ["a", "b"], tmp_path, slices=["x"])
    with pytest.raises(ValueError, match="n must be >= 1"):
        write_records(t, ["a"], tmp_path, n=0)
    with pytest.raises(TypeError, match="TeacherSource"):
        write_records(object(), ["a"], tmp_path)
    assert shard_paths(tmp_path) == []
    # duplicate prompts are answered once
    assert write_records(t, ["a", "a", "b"], tmp_path)["written"] == 2


def _pairs(out_dir: Path) -> list[tuple[str, int]]:
    return sorted((r["prompt_id"], r["sample_index"]) for r in read_records(out_dir))


def _run_script(out_dir: Path, delay: float) -> subprocess.Popen:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(
            [str(Path(__file__).parents[1]), os.environ.get("PYTHONPATH", "")]
        ),
    }
    return subprocess.Popen(
        [sys.executable, str(SCRIPTS / "blackbox_writer.py"), str(out_dir), str(delay)], env=env
    )


def test_resume_after_sigkill_gives_the_uninterrupted_set(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    assert _run_script(whole, 0.0).wait(timeout=120) == 0
    proc = _run_script(killed, 0.4)
    deadline = time.monotonic() + 120
    while len(shard_paths(killed)) < 2 and time.monotonic() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    partial = _pairs(killed)
    assert 0 < len(partial) < len(_pairs(whole))  # killed mid-run
    (killed / "shard-00099.jsonl.tmp").write_text(
        '{"prompt_id": "half a rec'
    )  # as if killed mid-write
    assert _run_script(killed, 0.0).wait(timeout=120) == 0
    resumed = _pairs(killed)
    assert len(resumed) == len(set(resumed)) == 36
    assert resumed == _pairs(whole)
    assert not list(killed.glob("*.tmp"))
