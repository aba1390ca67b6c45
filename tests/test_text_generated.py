"""The coverage loop on your own data: `TextDataModule(generated=...)` and `prompts_from_run` for a
`data=files` run. Real files, a real tokenizer, real CLI runs (the slow one)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightning_distill.blackbox import (
    FunctionTeacher,
    TeacherTextDataModule,
    read_records,
    write_records,
)
from lightning_distill.blackbox.loop import prompts_from_run
from lightning_distill.data import TextDataModule, train_bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
WORDS = "alpha beta gamma delta def return import class the of and to in is".split()


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-token byte-level BPE with a chat template, saved like a model's tokenizer."""
    tok = train_bpe_tokenizer([" ".join(WORDS) * 4, "def f(x):\n    return x\n"], 300)
    tok.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


def _text(i: int) -> str:
    lines = [" ".join(WORDS[(i * 7 + k + j) % len(WORDS)] for k in range(6)) for j in range(4)]
    return "\n".join(lines) + f" doc {i}"


def _rows(n: int = 90) -> list[dict]:
    return [
        {
            "text": _text(i),
            "kind": "code" if i % 3 == 0 else "prose",
            "prompt": f"question {i}?",
            "response": f"answer {i} " + _text(i),
        }
        for i in range(n)
    ]


def _jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _dm(tok_dir: Path, files: Path, **kwargs) -> TextDataModule:
    defaults = {
        "files": str(files),
        "slice_field": "kind",
        "tokenizer": str(tok_dir),
        "seq_len": 16,
        "batch_size": 2,
        "progress": False,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
    }
    dm = TextDataModule(**{**defaults, **kwargs})
    dm.setup()
    return dm


def _teacher(prompts, *, n, seed):
    return [[f" teacher says {seed}-{j}: {p[:12]} return beta" for j in range(n)] for p in prompts]


def _records(folder: Path, count: int = 12, slice_name: str = "code", seed: int = 0) -> Path:
    prompts = [f"def helper_{i}(x):" for i in range(count)]
    write_records(
        FunctionTeacher(_teacher, name="echo"),
        prompts,
        folder,
        n=2,
        seed=seed,
        slices=[slice_name] * count,
    )
    return folder


def _ids(dm: TextDataModule, split: str) -> list[int]:
    return dm.dataset(split).sample_ids.tolist()


@pytest.mark.parametrize("packing", [True, False])
def test_records_join_the_train_split_only_and_change_the_fingerprint(tok_dir, tmp_path, packing):
    data = _jsonl(tmp_path / "data.jsonl", _rows())
    gen = _records(tmp_path / "gen")
    base = _dm(tok_dir, data, packing=packing, seq_len=16 if packing else 64)
    dm = _dm(tok_dir, data, packing=packing, seq_len=16 if packing else 64, generated=str(gen))
    for split in ("val", "test"):  # held-out data is the real data, unchanged
        assert _ids(dm, split) == _ids(base, split)
        assert dm.slice_counts(split) == base.slice_counts(split)
    real = _ids(base, "train")
    assert _ids(dm, "train")[: len(real)] == real  # the data's samples keep their ids, first
    counts, before = dm.slice_counts("train"), base.slice_counts("train")
    assert counts["prose"] == before["prose"] and counts["code"].samples > before["code"].samples
    added = dm.stats["generated"]
    assert added["records"] == 24 and added["samples"] == len(dm.dataset("train")) - len(real) > 0
    # prompt + completion, tokenized with the data's tokenizer
    train = dm.dataset("train")
    text = dm.tokenizer.decode(train.tokens[train.offsets[len(real)] :].tolist())
    assert "def helper_" in text and "teacher says 0-" in text
    assert dm.data_fingerprint != base.data_fingerprint and dm.fingerprint != base.fingerprint
    other = _dm(
        tok_dir,
        data,
        packing=packing,
        seq_len=16 if packing else 64,
        generated=[str(_records(tmp_path / "gen2", seed=1))],
    )
    assert other.data_fingerprint not in (dm.data_fingerprint, base.data_fingerprint)
    # a second instance reads the tokenized data (records included) from the cache
    again = _dm(tok_dir, data, packing=packing, seq_len=16 if packing else 64, generated=str(gen))
    assert again.cache_status == "loaded" and _ids(again, "train") == _ids(dm, "train")
    assert again.generated_lineage[0]["records"] == 24


def test_train_slices_keep_the_records_and_rejected_records_are_left_out(tok_dir, tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", _rows())
    gen = _records(tmp_path / "gen", count=6)
    shard = next(gen.glob("shard-*.jsonl"))
    records = [json.loads(line) for line in shard.read_text().splitlines()]
    for i, rec in enumerate(records):
        rec["accepted"] = i % 3 != 0  # as a rationale filter marks them: 4 of 12 rejected
    shard.write_text("".join(json.dumps(r) + "\n" for r in records))
    dm = _dm(tok_dir, data, packing=False, seq_len=64, train_slices=["prose"], generated=str(gen))
    assert dm.stats["generated"]["records"] == 8
    counts = dm.slice_counts("train")
    assert counts["code"].samples == 8 and counts["prose"].samples > 0  # prose + the code records
    rejected = {r["completion"] for r in records if not r["accepted"]}
    train = dm.dataset("train")
    texts = [dm.tokenizer.decode(train[i]["input_ids"].tolist()) for i in range(len(train))]
    assert not any(c in t for c in rejected for t in texts)
    # the data's code documents are filtered out, the records are not
    everything = dm.train_dataloader_for(None, batch_size=1).dataset
    assert len(train) == counts["prose"].samples + 8 < len(everything)


@pytest.mark.parametrize("seed", range(4))
def test_generated_documents_never_enter_val_or_test(tok_dir, tmp_path, seed):
    """Property over split seeds and records that copy held-out documents: val/test stay the data's."""
    rows = _rows(60)
    data = _jsonl(tmp_path / "data.jsonl", rows)
    base = _dm(tok_dir, data, packing=False, seq_len=64, split_seed=seed, dedupe=False)
    copied = {r["text"]: r["kind"] for r in rows[:10]}  # val/test documents among them

    def copy_back(ps, *, n, seed):  # records that repeat documents of the data word for word
        return [[""] * n for _ in ps]

    gen = tmp_path / "gen"
    write_records(
        FunctionTeacher(copy_back, name="copier"),
        list(copied),
        gen,
        n=2,
        slices=list(copied.values()),
    )
    dm = _dm(
        tok_dir, data, packing=False, seq_len=64, split_seed=seed, dedupe=False, generated=str(gen)
    )
    for split in ("val", "test"):
        assert _ids(dm, split) == _ids(base, split)
        assert torch.equal(
            torch.as_tensor(dm.dataset(split).tokens), torch.as_tensor(base.dataset(split).tokens)
        )
    assert (
        len(dm.dataset("train")) == len(base.dataset("train")) + 20
    )  # dedupe=false: every record, own ids
    assert len(set(_ids(dm, "train"))) == len(dm.dataset("train"))
    # with dedupe (the default) a record that repeats a document of the data is dropped
    deduped = _dm(tok_dir, data, packing=False, seq_len=64, split_seed=seed, generated=str(gen))
    assert deduped.stats["generated"]["documents"] == 0
    assert _ids(deduped, "train") == _ids(
        _dm(tok_dir, data, packing=False, seq_len=64, split_seed=seed), "train"
    )


def test_instruct_records_are_pairs_with_the_loss_on_the_completion(tok_dir, tmp_path):
    data = _jsonl(tmp_path / "sft.jsonl", _rows(60))
    gen = _records(tmp_path / "gen", count=5)
    kw = {"prompt_field": "prompt", "response_field": "response", "packing": False, "seq_len": 96}
    base = _dm(tok_dir, data, **kw)
    dm = _dm(tok_dir, data, **kw, generated=str(gen))
    train, n = dm.dataset("train"), len(base.dataset("train"))
    assert len(train) == n + 10
    for i in range(n, len(train)):
        item = train[i]
        labelled = item["labels"] != -100
        prompt_part = dm.tokenizer.decode(item["input_ids"][~labelled].tolist())
        answer = dm.tokenizer.decode(item["labels"][labelled].tolist())
        assert "<user>def helper_" in prompt_part and "<assistant>" in prompt_part
        assert "teacher says" in answer and "helper_" not in answer.split(":")[0]
        assert not labelled[: int((~labelled).sum())].any()  # no prompt token has a label
        assert item["slice"] == "code"


def test_generated_errors(tok_dir, tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", _rows())
    with pytest.raises(FileNotFoundError, match="not a folder of teacher records"):
        _dm(tok_dir, data, generated=str(tmp_path / "missing"))
    with pytest.raises(ValueError, match=r"slice 'poetry'.*\['code', 'prose'\]"):
        _dm(
            tok_dir,
            data,
            generated=str(_records(tmp_path / "poetry", count=2, slice_name="poetry")),
        )
    with pytest.raises(TypeError, match="generated"):
        TextDataModule(files=str(data), tokenizer=str(tok_dir), generated=[3])
    with pytest.raises(ValueError, match=r"add the folder to records instead"):
        TeacherTextDataModule(records=str(tmp_path / "gen"), tokenizer=str(tok_dir), generated="x")


# ---------------------------------------------------------------------------- prompts_from_run


def _fake_run(run: Path, data_config: dict, gaps: list[str]) -> Path:
    """A run directory as `lightning-distill` leaves it: Hydra's config dump and coverage.json."""
    (run / ".hydra").mkdir(parents=True)
    (run / ".hydra" / "config.yaml").write_text(yaml.safe_dump({"data": data_config}))
    slices = [{"slice": s, "gap": s in gaps} for s in ("code", "prose")]
    (run / "coverage.json").write_text(json.dumps({"slices": slices, "gaps": gaps}))
    return run


def test_prompts_from_a_files_run_come_from_its_training_documents(tok_dir, tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", _rows())
    config = {
        "_target_": "lightning_distill.data.TextDataModule",
        "files": str(data),
        "slice_field": "kind",
        "tokenizer": str(tok_dir),
        "seq_len": 16,
        "progress": False,
        "val_fraction": 0.2,
        "test_fraction": 0.2,
        "train_slices": ["prose"],
        "generated": None,
    }
    run = _fake_run(tmp_path / "run", config, ["code"])
    prompts = prompts_from_run(run, per_slice=6, prompt_tokens=5, min_chars=10, seed=1)
    assert len(prompts) == 6 and {p.slice for p in prompts} == {"code"}
    assert prompts == prompts_from_run(run, per_slice=6, prompt_tokens=5, min_chars=10, seed=1)
    dm = _dm(tok_dir, data)
    train = dm.train_documents()
    held_out = [d for d in dm.documents() if d not in train]
    assert held_out and all(d.slice in ("code", "prose") for d in train)
    for p in prompts:
        assert any(p.text in d.text for d in train if d.slice == "code"), p
        assert len(dm.tokenizer(p.text, add_special_tokens=False)["input_ids"]) <= 5
    # every line start of the code slice: all of them are training text
    everything = prompts_from_run(run, per_slice=10_000, prompt_tokens=40, min_chars=10)
    assert len(everything) > 6
    assert all(any(p.text in d.text for d in train if d.slice == "code") for p in everything)
    # instruction data: the slice's training prompts as they are
    pairs = {
        **config,
        "prompt_field": "prompt",
        "response_field": "response",
        "chat_template": None,
    }
    pair_run = _fake_run(tmp_path / "pairs", pairs, ["code"])
    asked = prompts_from_run(pair_run, per_slice=100)
    dm_pairs = _dm(tok_dir, data, prompt_field="prompt", response_field="response")
    train_prompts = {d.prompt for d in dm_pairs.train_documents() if d.slice == "code"}
    assert {p.text for p in asked} == train_prompts and len(asked) == len(train_prompts)
    every_code = {d.prompt for d in dm_pairs.documents() if d.slice == "code"}
    assert train_prompts < every_code  # val/test prompts are left out
    assert len(prompts_from_run(pair_run, per_slice=3)) == 3


# ---------------------------------------------------------------------------- the loop, end to end


def _env(tmp_path: Path) -> dict[str, str]:
    return {
        **{
            k: v
            for k, v in os.environ.items()
            if k not in ("LIGHTNING_DISTILL_DEBUG", "HYDRA_FULL_ERROR")
        },
        "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
        "PYTHONWARNINGS": "ignore",
    }


def _cli(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_distill", *args],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def _model(tok_dir: Path, where: Path) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(where)
    tok.save_pretrained(where)
    return where


@pytest.mark.slow
def test_the_loop_on_your_own_files_end_to_end(tok_dir, tmp_path):
    """data=files run (every slice flagged) -> generate from its student for the gaps -> re-run with
    data.generated: more train samples, the same val/test, the lineage in the card."""
    data = _jsonl(tmp_path / "data.jsonl", _rows(120))
    teacher = _model(tok_dir, tmp_path / "teacher")
    run, again, records = tmp_path / "run", tmp_path / "again", tmp_path / "records"
    common = [
        "data=files",
        f"data.files={data}",
        "data.slice_field=kind",
        "data.seq_len=32",
        "data.batch_size=4",
        "data.val_fraction=0.2",
        "data.test_fraction=0.2",
        "data.progress=false",
        "teacher=hf_pretrained",
        f"teacher.path={teacher}",
        "student=hf_config",
        "trainer=smoke",
        "baseline=false",
        "callbacks=default",
        "callbacks.coverage.min_retention=100",
    ]
    _cli(tmp_path, *common, f"hydra.run.dir={run}")
    assert set(json.loads((run / "coverage.json").read_text())["gaps"]) == {"code", "prose"}
    _cli(
        tmp_path,
        "generate",
        "source=local",
        f"source.path={run / 'student'}",
        "source.max_new_tokens=6",
        "source.progress=false",
        "source.device=cpu",
        f"prompts.run_dir={run}",
        "prompts.per_slice=4",
        "prompts.prompt_tokens=8",
        f"out={records}",
        "terms=test terms",
    )
    written = read_records(records)
    # up to 4 distinct prompts per slice (this small data repeats its lines), one sample each
    assert 4 < len(written) <= 8 and {r["slice"] for r in written} == {"code", "prose"}
    _cli(tmp_path, *common, f"data.generated={records}", f"hydra.run.dir={again}")
    card = json.loads((again / "student" / "distillation_card.json").read_text())
    (lineage,) = card["generated_data"]
    assert lineage["terms"] == "test terms" and lineage["records"] == len(written)
    assert lineage["source_run"]["path"] == str(run.resolve())
    record = json.loads((again / "student" / "distillation.json").read_text())
    assert record["generated_data"][0]["path"] == str(records.resolve())
    before = json.loads((run / "student" / "distillation.json").read_text())
    assert record["data"]["fingerprint"] != before["data"]["fingerprint"]
    # the training data grew by the records; val/test are the same data
    dm = _dm(tok_dir, data, seq_len=32)
    with_records = _dm(tok_dir, data, seq_len=32, generated=str(records))
    assert len(with_records.dataset("train")) > len(dm.dataset("train"))
    for split in ("val", "test"):
        assert _ids(with_records, split) == _ids(dm, split)
    assert record["config"]["data"]["generated"] == str(records)
