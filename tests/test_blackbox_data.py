"""Training on teacher text: TeacherTextDataModule (masking, targets, filters, split by prompt),
real fits through DistillationModule (sequence-level KD, hybrid with LogitKD) and the CLI."""

from __future__ import annotations

import functools
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_distill.blackbox import (
    FunctionTeacher,
    Prompt,
    RationaleTemplate,
    TeacherTextDataModule,
    write_records,
)
from lightning_distill.data import train_bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent
# role names in lower case: the prompts use upper-case letters, the completions digits and signs
TEMPLATE = (
    "{% for m in messages %}[{{ m['role'] }}]{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}[assistant]{% endif %}"
)
PROMPT_CHARS = "ABCDEFGHIJKLM?"
COMPLETION_CHARS = "0123456789+-*="


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "cache"))
    torch.set_num_threads(1)


def _corpus() -> list[str]:
    rng = random.Random(0)
    texts = ["".join(rng.choice(PROMPT_CHARS + " ") for _ in range(400)) for _ in range(3)]
    texts += ["".join(rng.choice(COMPLETION_CHARS + " ") for _ in range(400)) for _ in range(3)]
    return [*texts, "Answer: 12\nWhat is 3 + 4? so [user] [assistant]\n"]


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The same 320-token BPE saved twice: with a chat template and without one."""
    out = {}
    for name, template in (("chat", TEMPLATE), ("plain", None)):
        tok = train_bpe_tokenizer(_corpus(), 320)
        if template:
            tok.chat_template = template
        path = tmp_path_factory.mktemp(name)
        tok.save_pretrained(path)
        out[name] = path
    return out


def _words(rng: random.Random, chars: str, n: int) -> str:
    return " ".join("".join(rng.choice(chars) for _ in range(rng.randint(1, 6))) for _ in range(n))


def _random_records(folder: Path, seed: int, prompts: int = 24, n: int = 2) -> Path:
    rng = random.Random(seed)
    texts = [_words(rng, PROMPT_CHARS, rng.randint(1, 12)) for _ in range(prompts)]
    texts = list(dict.fromkeys(texts))

    def teacher(ps, *, n, seed):
        return [[_words(rng, COMPLETION_CHARS, rng.randint(1, 15)) for _ in range(n)] for _ in ps]

    slices = ["x" if i % 3 else "y" for i in range(len(texts))]
    write_records(FunctionTeacher(teacher), texts, folder, n=n, slices=slices, shard_size=10)
    return folder


def _dm(tok: Path, records, **kw) -> TeacherTextDataModule:
    defaults = {
        "tokenizer": str(tok),
        "seq_len": 64,
        "batch_size": 2,
        "progress": False,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
    }
    return TeacherTextDataModule(records, **{**defaults, **kw})


def _items(dm: TeacherTextDataModule):
    for split in ("train", "val", "test"):
        ds = dm.dataset(split)
        for i in range(len(ds)):
            yield split, ds[i]


def _labelled_text(dm, item) -> str:
    ids, labels = item["input_ids"], item["labels"]
    return dm.tokenizer.decode(ids[labels != -100], skip_special_tokens=True)


# ---------------------------------------------------------------------------- masking property


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("packing", [False, True])
@pytest.mark.parametrize("template", ["chat", "plain"])
def test_no_prompt_token_ever_has_a_label(tokenizers, tmp_path, seed, packing, template):
    records = _random_records(tmp_path / "rec", seed)
    dm = _dm(tokenizers[template], str(records), packing=packing, seq_len=24 if packing else 256)
    eos = dm.tokenizer.eos_token_id
    seen = labelled = 0
    for _, item in _items(dm):
        ids, labels = item["input_ids"].tolist(), item["labels"].tolist()
        for tok_id, label in zip(ids, labels, strict=True):
            piece = dm.tokenizer.decode([tok_id])
            if label != -100:
                assert label == tok_id
                labelled += 1
                # a labelled token is the teacher's text (or eos / the template's newline)
                assert not any(c in PROMPT_CHARS for c in piece), (piece, template, packing)
                assert "[" not in piece and "]" not in piece
            elif tok_id != eos:
                # every token of the teacher's text is labelled
                assert not any(c in COMPLETION_CHARS for c in piece), (piece, template, packing)
            seen += 1
    assert labelled > 0 and seen > labelled
    if not packing:  # rows: the labelled part is exactly the completion (+ the template's "\n")
        completions = {
            json.loads(line)["completion"]
            for shard in records.glob("shard-*.jsonl")
            for line in shard.read_text().splitlines()
        }
        for _, item in _items(dm):
            text = _labelled_text(dm, item)
            assert (text[:-1] if template == "chat" else text) in completions
            assert item["input_ids"][-1] == eos


def test_batches_carry_slices_and_the_split_is_by_prompt(tokenizers, tmp_path):
    records = _random_records(tmp_path / "rec", 5, prompts=40, n=4)
    dm = _dm(tokenizers["plain"], str(records), val_fraction=0.25, test_fraction=0.25)
    split_of: dict[str, set[str]] = {}
    for split, item in _items(dm):
        ids, labels = item["input_ids"], item["labels"]
        prompt = dm.tokenizer.decode(ids[labels == -100])
        split_of.setdefault(prompt, set()).add(split)
    assert len(split_of) == 40 and all(len(s) == 1 for s in split_of.values())
    assert {s for v in split_of.values() for s in v} == {"train", "val", "test"}
    assert set(dm.slices) == {"x", "y"}
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "slice", "sample_id"}
    assert set(batch["slice"]) <= {"x", "y"}
    capped = _dm(
        tokenizers["plain"],
        str(records),
        max_samples_per_prompt=2,
        val_fraction=0.25,
        test_fraction=0.25,
    )
    total = sum(
        c.samples for s in ("train", "val", "test") for c in capped.slice_counts(s).values()
    )
    assert total == 80 and capped.record_stats == {
        "records": 160,
        "truncated_dropped": 0,
        "samples": 80,
    }
    assert capped.data_fingerprint != dm.data_fingerprint


# ---------------------------------------------------------------------------- rationales


def _solver(prompts, *, n, seed):
    """Reasons, then answers: right for even numbers, wrong for odd ones; the first sample of
    question 10 has no answer line."""
    out = []
    for p in prompts:
        i = int(p.split()[2])
        answer = 2 * i if i % 2 == 0 else 2 * i + 1
        samples = [f"{i} + {i} = {answer}\nso it is {answer}\nAnswer: {answer}" for _ in range(n)]
        if i == 10:
            samples[0] = "I do not know"
        out.append(samples)
    return out


def _rationale_records(folder: Path) -> Path:
    prompts = [
        Prompt(f"What is {i} + {i}?", "even" if i % 2 == 0 else "odd", str(2 * i))
        for i in range(1, 25)
    ]
    write_records(
        FunctionTeacher(_solver), prompts, folder, n=2, rationale=RationaleTemplate.builtin("steps")
    )
    return folder


def test_answer_target_trains_on_the_final_line_only(tokenizers, tmp_path):
    records = _rationale_records(tmp_path / "rec")
    full = _dm(tokenizers["plain"], str(records))
    answer = _dm(tokenizers["plain"], str(records), target="answer")
    full_texts = {_labelled_text(full, item) for _, item in _items(full)}
    answer_texts = {_labelled_text(answer, item) for _, item in _items(answer)}
    assert "4 + 4 = 8\nso it is 8\nAnswer: 8" in full_texts
    assert answer_texts == {f"Answer: {2 * i if i % 2 == 0 else 2 * i + 1}" for i in range(1, 25)}
    # the prompt is the record's original prompt, not the template the teacher saw
    item = next(item for _, item in _items(answer))
    assert answer.tokenizer.decode(item["input_ids"][item["labels"] == -100]).startswith("What is")
    assert "step by step" not in answer.tokenizer.decode(item["input_ids"])
    assert answer.record_stats["no_answer"] == 1 and "I do not know" in {
        _labelled_text(full, item) for _, item in _items(full)
    }


def test_accepted_only_keeps_matching_answers_and_names_the_rate(tokenizers, tmp_path):
    records = _rationale_records(tmp_path / "rec")
    dm = _dm(tokenizers["plain"], str(records), accepted_only=True)
    prompts = {
        dm.tokenizer.decode(item["input_ids"][item["labels"] == -100]) for _, item in _items(dm)
    }
    assert prompts == {f"What is {i} + {i}?" for i in range(2, 25, 2)}  # even ones only
    # 12 even questions x 2 samples, less question 10's unanswered sample, of 48 checked
    assert dm.record_stats["accepted"] == 23 and dm.record_stats["scored"] == 48
    assert set(dm.slices) == {"even"}

    wrong = tmp_path / "wrong"
    odd = [Prompt(f"What is {i} + {i}?", reference=str(2 * i)) for i in (1, 3, 5)]
    write_records(
        FunctionTeacher(_solver), odd, wrong, rationale=RationaleTemplate.builtin("steps")
    )
    with pytest.raises(ValueError, match=r"0 of 3 checked answers match .*acceptance rate 0.0 %"):
        _dm(tokenizers["plain"], str(wrong), accepted_only=True).setup()
    plain = tmp_path / "plain"
    write_records(FunctionTeacher(_solver), ["What is 2 + 2?"], plain)
    with pytest.raises(ValueError, match="no record of .* was checked against a reference"):
        _dm(tokenizers["plain"], str(plain), accepted_only=True).setup()


def test_unfinished_completions_are_left_out_unless_kept(tokenizers, tmp_path):
    def teacher(ps, *, n, seed):
        return [
            [
                {"text": f"12 + {i}", "finish_reason": "length" if i % 2 else "stop"}
                for i in range(n)
            ]
            for _ in ps
        ]

    write_records(
        FunctionTeacher(teacher), [f"What is {i}?" for i in range(20)], tmp_path / "rec", n=2
    )
    dm = _dm(tokenizers["plain"], str(tmp_path / "rec"))
    assert {_labelled_text(dm, item) for _, item in _items(dm)} == {"12 + 0"}
    assert dm.record_stats["truncated_dropped"] == 20
    kept = _dm(tokenizers["plain"], str(tmp_path / "rec"), keep_truncated=True)
    assert {_labelled_text(kept, item) for _, item in _items(kept)} == {"12 + 0", "12 + 1"}
    only_cut = tmp_path / "cut"
    write_records(
        FunctionTeacher(lambda ps, n, seed: [[{"text": "1", "finish_reason": "length"}]] * len(ps)),
        ["a"],
        only_cut,
    )
    with pytest.raises(ValueError, match="was cut at the teacher's token limit"):
        _dm(tokenizers["plain"], str(only_cut)).setup()


def test_bad_records_and_settings(tokenizers, tmp_path):
    with pytest.raises(ValueError, match=r"target must be one of \('full', 'answer'\)"):
        _dm(tokenizers["plain"], "x", target="trace")
    with pytest.raises(ValueError, match="max_samples_per_prompt"):
        _dm(tokenizers["plain"], "x", max_samples_per_prompt=0)
    with pytest.raises(FileNotFoundError, match="data.records entry .* does not exist"):
        _dm(tokenizers["plain"], str(tmp_path / "none.jsonl")).setup()
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no shard-"):
        _dm(tokenizers["plain"], str(tmp_path / "empty")).setup()
    (tmp_path / "other.jsonl").write_text(json.dumps({"question": "a", "completion": "b"}) + "\n")
    with pytest.raises(
        ValueError, match=r"has no \['prompt'\] field; its fields are \['completion', 'question'\]"
    ):
        _dm(tokenizers["plain"], str(tmp_path / "other.jsonl")).setup()
    records = _rationale_records(tmp_path / "rec")
    with pytest.raises(ValueError, match="no completion of .* has a final answer"):
        _dm(
            tokenizers["plain"], str(records), target="answer", answer_pattern=r"#### (\d+)"
        ).setup()


# ---------------------------------------------------------------------------- real fits


def _lm(vocab: int, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(
        LlamaConfig(
            vocab_size=vocab,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=2,
            max_position_embeddings=64,
        )
    )


def _fit(dm, teacher, losses, coverage_dir: Path):
    import lightning as L

    from lightning_distill import DistillationModule
    from lightning_distill.callbacks import CoverageSlices

    module = DistillationModule(
        _lm(320, 0), teacher, losses, optimizer=functools.partial(torch.optim.AdamW, lr=1e-2)
    )
    before = [p.detach().clone() for p in module.student.parameters()]
    trainer = L.Trainer(
        max_steps=4,
        val_check_interval=4,
        limit_val_batches=2,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[CoverageSlices(dirpath=str(coverage_dir))],
        accelerator="cpu",
    )
    trainer.fit(module, datamodule=dm)
    changed = any(not torch.equal(a, b) for a, b in zip(before, module.student.parameters()))
    return trainer, changed


def test_sequence_level_kd_and_hybrid_fit_report_per_slice(tokenizers, tmp_path):
    from lightning_distill.losses import LogitKD, TaskLoss

    records = _rationale_records(tmp_path / "rec")
    dm = _dm(tokenizers["chat"], str(records), val_fraction=0.25, test_fraction=0.1)
    trainer, changed = _fit(dm, None, {"task": TaskLoss()}, tmp_path / "cov_seq")
    assert changed and torch.isfinite(trainer.callback_metrics["val/task"])
    coverage = json.loads((tmp_path / "cov_seq" / "coverage.json").read_text())
    assert {s["slice"] for s in coverage["slices"]} == {"even", "odd"}

    hybrid = _dm(tokenizers["chat"], str(records), val_fraction=0.25, test_fraction=0.1)
    losses = {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)}
    trainer, changed = _fit(hybrid, _lm(320, 1), losses, tmp_path / "cov_hybrid")
    assert changed
    assert (
        torch.isfinite(trainer.callback_metrics["val/kd"])
        and trainer.callback_metrics["val/kd"] > 0
    )
    coverage = json.loads((tmp_path / "cov_hybrid" / "coverage.json").read_text())
    assert {s["slice"] for s in coverage["slices"]} == {"even", "odd"}


@pytest.mark.slow
def test_cli_trains_a_student_on_teacher_records(tokenizers, tmp_path):
    records = _rationale_records(tmp_path / "rec")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "lightning_distill",
        "data=teacher_text",
        f"data.records={records}",
        f"data.tokenizer={tokenizers['chat']}",
        "data.seq_len=64",
        "data.batch_size=4",
        "data.val_fraction=0.25",
        "data.test_fraction=0.2",
        "data.progress=false",
        "data.accepted_only=true",
        "teacher=none",
        "loss=task_only",
        "student=hf_config",
        "trainer=smoke",
        f"output_dir={out}",
    ]
    env = {
        **os.environ,
        "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
        "PYTHONWARNINGS": "ignore",
    }
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    record = json.loads((out / "student" / "distillation.json").read_text())
    assert record["config"]["student"]["vocab_size"] == 320  # from the student tokenizer
    assert (out / "student" / "tokenizer.json").is_file()
    checkpoint = torch.load(next(out.rglob("last.ckpt")), weights_only=True)
    hparams = checkpoint["datamodule_hyper_parameters"]
    assert hparams["records"] == str(records) and hparams["accepted_only"] is True
    assert "files" not in hparams
