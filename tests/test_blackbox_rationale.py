"""Black-box distillation: prompt sources, rationale templates, answer checks, per-slice summaries."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from lightning_distill.blackbox import (
    FunctionTeacher,
    Prompt,
    RationaleTemplate,
    answers_match,
    extract_answer,
    prompts_from_dataset,
    prompts_from_jsonl,
    rationale_template,
    read_records,
    summarize,
    write_records,
    write_summary,
)
from lightning_distill.blackbox.rationale import normalize_answer
from lightning_distill.cli import CONFIG_DIR


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


QUESTIONS = [
    {"q": f"What is {i} + {i}?", "topic": "add" if i % 2 else "double", "ans": 2 * i}
    for i in range(1, 9)
]


# ---------------------------------------------------------------------------- prompt sources


def test_prompts_from_jsonl_globs_fields_and_limit(tmp_path):
    _jsonl(tmp_path / "a.jsonl", QUESTIONS[:5])
    _jsonl(tmp_path / "b.jsonl", QUESTIONS[5:])
    got = prompts_from_jsonl(
        str(tmp_path / "*.jsonl"), prompt_field="q", slice_field="topic", reference_field="ans"
    )
    assert got[0] == Prompt("What is 1 + 1?", "add", "2")  # a numeric reference becomes text
    assert [p.text for p in got] == [r["q"] for r in QUESTIONS]
    assert prompts_from_jsonl([tmp_path / "b.jsonl"], prompt_field="q") == [
        Prompt(r["q"]) for r in QUESTIONS[5:]
    ]
    assert len(prompts_from_jsonl(str(tmp_path / "*.jsonl"), prompt_field="q", limit=6)) == 6


def test_prompts_from_jsonl_errors_name_the_problem(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", QUESTIONS)
    with pytest.raises(
        ValueError,
        match=r"prompt_field='prompt' is not a field of .*a.jsonl:1; its fields are \['ans', 'q', 'topic'\]",
    ):
        prompts_from_jsonl(path)
    with pytest.raises(ValueError, match="reference_field='answer' is not a field"):
        prompts_from_jsonl(path, prompt_field="q", reference_field="answer")
    with pytest.raises(FileNotFoundError, match="prompts.files entry .* does not exist"):
        prompts_from_jsonl(tmp_path / "missing.jsonl")
    with pytest.raises(FileNotFoundError, match="matches no file"):
        prompts_from_jsonl(str(tmp_path / "*.json"))
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="holds no rows"):
        prompts_from_jsonl(tmp_path / "empty.jsonl")
    _jsonl(tmp_path / "blank.jsonl", [{"prompt": "  "}])
    with pytest.raises(ValueError, match=r"blank.jsonl:1 has an empty 'prompt'"):
        prompts_from_jsonl(tmp_path / "blank.jsonl")
    _jsonl(tmp_path / "num.jsonl", [{"prompt": 3}])
    with pytest.raises(TypeError, match="field 'prompt' of .*num.jsonl:1 is a int"):
        prompts_from_jsonl(tmp_path / "num.jsonl")


def test_prompts_from_a_saved_dataset(tmp_path):
    import datasets

    table = datasets.Dataset.from_list(QUESTIONS)
    datasets.DatasetDict({"train": table, "test": table.select(range(2))}).save_to_disk(
        tmp_path / "dd"
    )
    table.save_to_disk(tmp_path / "single")
    got = prompts_from_dataset(
        tmp_path / "dd", split="test", prompt_field="q", slice_field="topic", reference_field="ans"
    )
    assert got == [Prompt("What is 1 + 1?", "add", "2"), Prompt("What is 2 + 2?", "double", "4")]
    assert len(prompts_from_dataset(tmp_path / "dd", prompt_field="q")) == 8  # train by default
    assert len(prompts_from_dataset(str(tmp_path / "single"), prompt_field="q", limit=3)) == 3
    with pytest.raises(
        ValueError, match=r"split='val' is not a split of .*; its splits are \['train', 'test'\]"
    ):
        prompts_from_dataset(tmp_path / "dd", split="val", prompt_field="q")
    with pytest.raises(
        ValueError,
        match=r"slice_field='kind' is not a field of .*\[train\]; its fields are \['q', 'topic', 'ans'\]",
    ):
        prompts_from_dataset(tmp_path / "dd", prompt_field="q", slice_field="kind")
    with pytest.raises(FileNotFoundError, match="neither a folder nor a dataset name"):
        prompts_from_dataset(str(tmp_path / "no" / "such" / "thing"), prompt_field="q")


def test_prompt_and_rationale_configs_instantiate(tmp_path):
    path = _jsonl(tmp_path / "a.jsonl", QUESTIONS)
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "prompts"), version_base="1.3"):
        cfg = compose(
            config_name="jsonl", overrides=[f"files={path}", "prompt_field=q", "slice_field=topic"]
        )
    assert instantiate(cfg)[1] == Prompt("What is 2 + 2?", "double")
    with initialize_config_dir(config_dir=str(CONFIG_DIR / "rationale"), version_base="1.3"):
        assert instantiate(compose(config_name="none")) is None
        steps = instantiate(compose(config_name="steps"))
        mine = instantiate(
            compose(config_name="steps", overrides=["name=mine", "template='Q: {prompt}'"])
        )
    assert isinstance(steps, RationaleTemplate) and steps.name == "steps"
    assert mine.render("2+2?") == "Q: 2+2?"


# ---------------------------------------------------------------------------- rationales


def test_extract_answer_takes_the_last_match_and_normalises():
    text = "Step 1: 2 + 2 = 4.\nAnswer: 5\nWait, I was wrong.\n**Answer:** 1,000.\n"
    assert extract_answer(text) == "1,000."
    assert answers_match(extract_answer(text), "1000") and answers_match("1000.0", "1,000")
    assert answers_match(" PARIS ", "paris") and not answers_match("Paris", "Rome")
    assert not answers_match(None, "x") and not answers_match("x", None)
    assert extract_answer("no final line here") is None
    assert extract_answer("The result is #### 12", r"####\s*(\S+)") == "12"
    assert extract_answer("x=3; x=7", r"x=\d") == "x=7"  # no group: the whole match
    assert [normalize_answer(a) for a in ("0.50", "$2,500", "-3.0", "1e3")] == [
        "0.5",
        "2500",
        "-3",
        "1000",
    ]


def test_templates_builtin_custom_and_bad():
    steps = RationaleTemplate.builtin("steps")
    sent = steps.render("What is {x}?")  # braces in the prompt are kept
    assert (
        sent.startswith("What is {x}?")
        and "step by step" in sent
        and sent.endswith("Answer: <answer>")
    )
    assert rationale_template("answer_only").name == "answer_only"
    assert rationale_template() is None
    custom = rationale_template("json", '{"q": "{prompt}"}', r'"a": "(.*?)"')
    assert custom.render("hi") == '{"q": "hi"}' and custom.extract('{"a": "7"}') == "7"
    with pytest.raises(
        ValueError,
        match=r"unknown rationale template 'stpes'; the built-in ones are \['answer_only', 'steps'\]",
    ):
        rationale_template("stpes")
    with pytest.raises(ValueError, match=r"holds '\{prompt\}' 0 times"):
        RationaleTemplate("t", "no placeholder")
    with pytest.raises(ValueError, match="is not a regular expression"):
        RationaleTemplate("t", "{prompt}", "(")
    with pytest.raises(ValueError, match="needs a name"):
        rationale_template(template="{prompt}")


def _solver(prompts, *, n, seed):
    """A teacher that reasons, then answers: right for even questions, wrong for odd ones."""
    out = []
    for p in prompts:
        i = int(re.search(r"What is (\d+)", p).group(1))
        answer = 2 * i if i % 2 == 0 else 2 * i + 1
        text = (
            f"{i} plus {i} is {answer}.\nAnswer: {answer:,}" if "step by step" in p else str(answer)
        )
        out.append(
            [
                {
                    "text": text,
                    "completion_tokens": 7,
                    "finish_reason": "stop" if j == 0 else "length",
                }
                for j in range(n)
            ]
        )
    return out


def test_records_keep_the_prompt_score_the_answer_and_summarize(tmp_path):
    prompts = [
        Prompt(r["q"], r["topic"], str(r["ans"]) if r["ans"] < 12 else None) for r in QUESTIONS
    ]
    sent: list[str] = []

    def teacher(ps, *, n, seed):
        sent.extend(ps)
        return _solver(ps, n=n, seed=seed)

    steps = RationaleTemplate.builtin("steps")
    stats = write_records(FunctionTeacher(teacher), prompts, tmp_path, n=2, rationale=steps)
    assert stats["written"] == 16
    assert sent[0] == steps.render(QUESTIONS[0]["q"])  # the teacher saw the template
    records = read_records(tmp_path)
    by = {(r["prompt"], r["sample_index"]): r for r in records}
    two = by[("What is 2 + 2?", 0)]  # the record keeps the original prompt
    assert (two["template"], two["answer"], two["reference"], two["accepted"]) == (
        "steps",
        "4",
        "4",
        True,
    )
    assert by[("What is 3 + 3?", 1)]["accepted"] is False
    assert (
        by[("What is 8 + 8?", 0)]["reference"] is None
        and by[("What is 8 + 8?", 0)]["accepted"] is None
    )
    assert two["generation"]["rationale"] == steps.to_dict()

    summary = write_summary(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    add, double = summary["slices"]["add"], summary["slices"]["double"]
    # references for questions 1-5: add (odd) 1, 3, 5 answered wrong, 7 unscored;
    # double (even) 2, 4 answered right, 6 and 8 unscored
    assert (add["prompts"], add["records"], add["scored"], add["accepted"]) == (4, 8, 6, 0)
    assert add["acceptance_rate"] == 0.0
    assert (double["scored"], double["accepted"], double["acceptance_rate"]) == (4, 4, 1.0)
    assert (
        double["finish_reasons"] == {"stop": 4, "length": 4} and double["completion_tokens"] == 56
    )
    assert summary["total"]["acceptance_rate"] == pytest.approx(4 / 10)
    table = (tmp_path / "summary.md").read_text()
    assert "| add | 4 | 8 | 0 / 6 | 0.0 % | 4 | 4 | 56 |" in table
    assert "| **total** | 8 | 16 | 4 / 10 | 40.0 % |" in table
    assert summarize(tmp_path) == summary  # summary files are not records

    # another template into the same folder is refused; a rerun with the same one skips all
    with pytest.raises(ValueError, match="rationale template 'steps', not 'answer_only'"):
        write_records(
            FunctionTeacher(teacher),
            prompts,
            tmp_path,
            n=2,
            rationale=rationale_template("answer_only"),
        )
    assert (
        write_records(FunctionTeacher(teacher), prompts, tmp_path, n=2, rationale=steps)["skipped"]
        == 16
    )
    reworded = RationaleTemplate("steps", "{prompt}\nReason first.")
    with pytest.raises(ValueError, match=r"template 'steps' \(another text or answer pattern\)"):
        write_records(FunctionTeacher(teacher), prompts, tmp_path, n=2, rationale=reworded)


def test_plain_records_are_unchanged_and_bad_scoring_input(tmp_path):
    write_records(FunctionTeacher(_solver), ["What is 1 + 1?"], tmp_path / "plain")
    assert "accepted" not in read_records(tmp_path / "plain")[0]
    assert summarize(tmp_path / "plain")["total"]["acceptance_rate"] is None
    # references without a template: the default `Answer:` line is read
    write_records(FunctionTeacher(_solver), ["What is 2 + 2?"], tmp_path / "refs", references=["4"])
    rec = read_records(tmp_path / "refs")[0]
    assert (rec["template"], rec["answer"], rec["accepted"]) == (
        None,
        None,
        False,
    )  # the plain teacher wrote "4"
    with pytest.raises(ValueError, match="references has 1 entries for 2 prompts"):
        write_records(FunctionTeacher(_solver), ["a", "b"], tmp_path / "x", references=["1"])
    with pytest.raises(ValueError, match="leave slices= and references= unset"):
        write_records(FunctionTeacher(_solver), [Prompt("a")], tmp_path / "x", slices=["s"])
    with pytest.raises(TypeError, match="rationale must be a RationaleTemplate"):
        write_records(FunctionTeacher(_solver), ["a"], tmp_path / "x", rationale="steps")
    with pytest.raises(FileNotFoundError, match="does not exist"):  # refused before any write
        summarize(tmp_path / "x")
    (tmp_path / "x").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no shard"):
        summarize(tmp_path / "x")
