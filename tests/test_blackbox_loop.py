"""The coverage loop: prompts from a run's coverage report, `lightning-distill generate`, teacher-written
train data (`data.generated`) and its lineage in the distillation card. Real tiny runs, real files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_distill.blackbox import FunctionTeacher, read_records, write_records
from lightning_distill.blackbox.loop import generated_lineage, load_run_config, prompts_from_run
from lightning_distill.data import SlicedTextDataModule

REPO = Path(__file__).resolve().parent.parent
TINY_DATA = {
    "vocab_size": 320,
    "seq_len": 32,
    "batch_size": 4,
    "code_bytes": 40000,
    "prose_bytes": 40000,
}
# a tiny run (random tiny teacher, 4 steps) whose coverage report flags every slice
RUN = [
    "experiment=tiny",
    "baseline=false",
    "callbacks=default",
    "callbacks.coverage.min_retention=100",
    "data.train_slices=[prose]",
]


def _env(cache: Path) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("LIGHTNING_DISTILL_DEBUG", "HYDRA_FULL_ERROR")
    }
    env.update(
        LIGHTNING_DISTILL_CACHE=str(cache),
        TOKENIZERS_PARALLELISM="false",
        HF_HUB_OFFLINE="1",
        PYTHONWARNINGS="ignore",
        PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])),
    )
    return env


def _cli(cache: Path, *args: str, ok: bool = True) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "lightning_distill", *args],
        cwd=cache.parent,
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    if ok:
        assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A real tiny `lightning-distill` run: coverage.json, .hydra/config.yaml, the exported student."""
    root = tmp_path_factory.mktemp("loop")
    _cli(root / "cache", *RUN, f"hydra.run.dir={root / 'run'}")
    return root / "run"


@pytest.fixture(scope="module")
def cache(run_dir):
    return run_dir.parent / "cache"


def _datamodule(cache: Path, **kw) -> SlicedTextDataModule:
    dm = SlicedTextDataModule(**{**TINY_DATA, "cache_dir": str(cache / "data"), **kw})
    dm.setup()
    return dm


# ---------------------------------------------------------------------------- prompts_from_run


def test_prompts_from_run_cut_the_flagged_slices_training_text(run_dir, cache):
    coverage = json.loads((run_dir / "coverage.json").read_text())
    assert coverage["gaps"] == ["prose", "code"]
    prompts = prompts_from_run(run_dir, per_slice=5, prompt_tokens=12, seed=3)
    assert [p.slice for p in prompts] == ["prose"] * 5 + ["code"] * 5
    assert prompts == prompts_from_run(run_dir, per_slice=5, prompt_tokens=12, seed=3)  # seeded
    assert prompts != prompts_from_run(run_dir, per_slice=5, prompt_tokens=12, seed=4)
    dm = _datamodule(cache)
    train = {d.id for d in dm.documents if d.id in set(dm.document_ids("train"))}
    held_out = [d.text for d in dm.documents if d.id not in train]
    train_text = [d.text for d in dm.documents if d.id in train]
    for p in prompts:
        assert any(p.text in t for t in train_text), p  # a train document holds it ...
        assert len(dm.tokenizer(p.text, add_special_tokens=False)["input_ids"]) <= 12
    code = prompts_from_run(run_dir, slices="code", per_slice=40, prompt_tokens=24)
    assert {p.slice for p in code} == {"code"} and len(code) == 40
    # ... and long prompts are not val/test text
    assert sum(any(p.text in t for t in held_out) for p in code) < 4


def test_prompts_from_run_errors(run_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="CoverageSlices"):
        prompts_from_run(tmp_path)
    with pytest.raises(ValueError, match=r"unknown slice\(s\) \['poetry'\].*\['prose', 'code'\]"):
        prompts_from_run(run_dir, slices=["poetry"])
    with pytest.raises(ValueError, match="per_slice"):
        prompts_from_run(run_dir, per_slice=0)
    no_gap = tmp_path / "no_gap"
    shutil.copytree(run_dir, no_gap, ignore=shutil.ignore_patterns("csv", "student"))
    report = json.loads((no_gap / "coverage.json").read_text())
    (no_gap / "coverage.json").write_text(json.dumps({**report, "gaps": []}))
    with pytest.raises(ValueError, match=r"flags no coverage gap.*slices=\["):
        prompts_from_run(no_gap)
    assert prompts_from_run(no_gap, slices=["code"], per_slice=2)  # chosen slices still work
    shutil.rmtree(no_gap / ".hydra")
    with pytest.raises(FileNotFoundError, match="config.yaml nor student/distillation.json"):
        prompts_from_run(no_gap, slices=["code"])


def test_run_config_is_read_from_the_hydra_dump_or_the_student_record(run_dir, tmp_path):
    dumped = load_run_config(run_dir)
    assert dumped["data"]["train_slices"] == ["prose"] and dumped["data"]["vocab_size"] == 320
    copy = tmp_path / "copy"
    shutil.copytree(run_dir / "student", copy / "student")
    assert load_run_config(copy)["data"] == dumped["data"]


# ---------------------------------------------------------------------------- data.generated


def _echo_code(prompts, *, n, seed):
    return [
        [f"\n    return {j} + len({p.split()[0]!r})  # teacher {seed}\n" for j in range(n)]
        for p in prompts
    ]


def _write(folder: Path, slice_name: str = "code", count: int = 60, **kw) -> Path:
    prompts = [f"def helper_{i}(x):" for i in range(count)]
    write_records(
        FunctionTeacher(_echo_code, name="echo"),
        prompts,
        folder,
        n=2,
        seed=kw.pop("seed", 0),
        slices=[slice_name] * count,
        **kw,
    )
    return folder


def test_generated_records_join_the_train_split_only(cache, tmp_path):
    folder = _write(tmp_path / "gen")
    base = _datamodule(cache, train_slices=["prose"])
    dm = _datamodule(cache, train_slices=["prose"], generated=str(folder))
    full = _datamodule(cache)
    for split in ("val", "test"):  # held-out data is the real data, unchanged
        assert torch.equal(dm.dataset(split).input_ids, base.dataset(split).input_ids)
    counts, base_counts = dm.slice_counts("train"), base.slice_counts("train")
    assert counts["prose"] == base_counts["prose"] and base_counts["code"].samples == 0
    assert 0 < counts["code"].samples < full.slice_counts("train")["code"].samples
    text = dm.tokenizer.decode(
        dm.dataset("train").input_ids[dm.dataset("train").slice_index == 1].flatten()
    )
    assert (
        "def helper_" in text and "# teacher 0" in text
    )  # prompt + completion, the data's tokenizer
    # the corpus blocks keep their sample ids; the generated ones come after them
    real = base.dataset("train").sample_ids
    assert torch.equal(dm.dataset("train").sample_ids[: len(real)], real)
    assert dm.data_fingerprint != base.data_fingerprint and dm.fingerprint != base.fingerprint
    assert dm.source_data_fingerprint == base.data_fingerprint == base.source_data_fingerprint
    again = _write(tmp_path / "gen2", seed=1)  # other completions: another fingerprint
    assert (
        _datamodule(cache, generated=[str(again)]).data_fingerprint
        != _datamodule(cache, generated=[str(folder)]).data_fingerprint
    )
    # the teacher's loader serves the corpus only
    teacher_loader = dm.train_dataloader_for(slices=None, generated=False)
    assert len(teacher_loader.dataset) == len(full.dataset("train"))


def test_generated_data_errors(cache, tmp_path):
    with pytest.raises(FileNotFoundError, match="not a folder of teacher records"):
        _datamodule(cache, generated=str(tmp_path / "missing"))
    wrong = _write(tmp_path / "poetry", slice_name="poetry", count=3)
    with pytest.raises(ValueError, match="slice 'poetry'.*\\['prose', 'code'\\]"):
        _datamodule(cache, generated=str(wrong))
    with pytest.raises(TypeError, match="generated"):
        SlicedTextDataModule(**TINY_DATA, generated=[3])


def test_lineage_counts_acceptance_and_skips_rejected(cache, tmp_path):
    folder = _write(tmp_path / "gen", count=4)
    shard = next(folder.glob("shard-*.jsonl"))
    records = [json.loads(line) for line in shard.read_text().splitlines()]
    for i, rec in enumerate(records):
        rec["accepted"] = i % 4 != 0  # as a rationale filter marks them
    shard.write_text("".join(json.dumps(r) + "\n" for r in records))
    (entry,) = generated_lineage(folder)
    assert entry["records"] == 8 and entry["slices"]["code"] == {
        "records": 8,
        "prompts": 4,
        "accepted": 6,
        "acceptance": 0.75,
    }
    assert entry["teacher"]["model_name"] == "echo" and entry["generation"]["n"] == 2
    dm = _datamodule(cache, generated=str(folder))
    assert len(dm._generated_docs()[0]) == 6


# ---------------------------------------------------------------------------- the generate command


def test_generate_writes_records_and_lineage_then_resumes(run_dir, cache, tmp_path):
    out = tmp_path / "records"
    args = [
        "generate",
        "source=demo",
        f"prompts.run_dir={run_dir}",
        "prompts.per_slice=3",
        "prompts.slices=[code]",
        "source.max_new_tokens=5",
        "source.progress=false",
        "n=2",
        f"out={out}",
        "terms=test terms v1",
    ]
    first = _cli(cache, *args)
    assert f"data.generated={out}" in first.stdout
    records = read_records(out)
    assert len(records) == 6 and {r["slice"] for r in records} == {"code"}
    assert all(r["usage"]["completion_tokens"] <= 5 for r in records)
    lineage = json.loads((out / "generation.json").read_text())
    assert lineage["terms"] == "test terms v1" and lineage["slices"]["code"]["records"] == 6
    assert lineage["source_run"]["path"] == str(run_dir.resolve()) and lineage["source_run"]["gaps"]
    assert (
        lineage["teacher"]["model"]["weights_sha256"]
        and lineage["generation"]["max_new_tokens"] == 5
    )
    assert lineage["last_call"] == {"written": 6, "skipped": 0, "shards": 1}
    assert (out / ".hydra" / "config.yaml").is_file()
    _cli(cache, *args)  # rerun: everything is there already
    assert read_records(out) == records
    assert json.loads((out / "generation.json").read_text())["last_call"] == {
        "written": 0,
        "skipped": 6,
        "shards": 0,
    }
    more = _cli(
        cache, *args[:-2], "n=3", f"out={out}", "terms=test terms v1"
    )  # one more sample each
    assert "Wrote 3 records (6 already there)" in more.stdout and len(read_records(out)) == 9


@pytest.mark.slow
def test_generate_killed_with_sigkill_then_rerun_equals_an_uninterrupted_one(
    run_dir, cache, tmp_path
):
    """A real kill mid-generation (after 2 of 6 shards): the rerun writes only the rest, and the
    records equal an uninterrupted run's (same (prompt, sample) pairs once each, same texts)."""
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    args = [
        "generate",
        "source=demo",
        f"prompts.run_dir={run_dir}",
        "prompts.per_slice=6",
        "source.max_new_tokens=4",
        "source.progress=false",
        "n=2",
        "shard_size=4",
    ]
    _cli(cache, *args, f"out={whole}")
    killer = [
        sys.executable,
        str(REPO / "tests" / "scripts" / "cli_kill_after_shards.py"),
        "records",
        "2",
    ]
    killed = subprocess.run(
        [*killer, *args, f"out={cut}"],
        cwd=cache.parent,
        env=_env(cache),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert killed.returncode == -9, killed.stderr[-3000:]  # SIGKILL
    assert len(read_records(cut)) == 8 and not (cut / "generation.json").exists()
    again = _cli(cache, *args, f"out={cut}")
    assert "Wrote 16 records (8 already there)" in again.stdout

    def pairs(folder):
        records = read_records(folder)
        keys = [(r["prompt_id"], r["sample_index"]) for r in records]
        assert len(keys) == len(set(keys))  # each (prompt, sample) once
        return {k: (r["slice"], r["prompt"], r["completion"]) for k, r in zip(keys, records)}

    a, b = pairs(whole), pairs(cut)
    assert len(a) == 24 and b == a


def test_generate_from_a_local_model_folder(run_dir, cache, tmp_path):
    out = tmp_path / "local"
    _cli(
        cache,
        "generate",
        "source=local",
        f"source.path={run_dir / 'student'}",
        "source.max_new_tokens=4",
        "source.progress=false",
        "source.device=cpu",
        f"prompts.run_dir={run_dir}",
        "prompts.per_slice=2",
        f"out={out}",
    )
    records = read_records(out)
    assert len(records) == 4 and {r["slice"] for r in records} == {"prose", "code"}
    assert records[0]["teacher"]["model_name"] == str(run_dir / "student")


def test_generate_errors_exit_2_and_never_save_a_key(run_dir, cache, tmp_path):
    missing = _cli(
        cache,
        "generate",
        f"prompts.run_dir={tmp_path / 'nothing'}",
        f"out={tmp_path / 'a'}",
        ok=False,
    )
    assert missing.returncode == 2 and "Traceback" not in missing.stderr
    assert "coverage.json does not exist" in missing.stderr
    key = "sk-test-DO-NOT-SAVE-4242"
    leaked = _cli(
        cache,
        "generate",
        f"+source.api_key={key}",
        f"prompts.run_dir={run_dir}",
        f"out={tmp_path / 'c'}",
        ok=False,
    )
    assert leaked.returncode == 2 and "source.api_key holds a credential" in leaked.stderr
    assert "api_key_env" in leaked.stderr
    assert (tmp_path / "c").is_dir()  # Hydra made the job's folder; nothing in it holds the key
    for path in (tmp_path / "c").rglob("*"):
        assert not path.is_file() or key not in path.read_text(errors="ignore"), path


# ---------------------------------------------------------------------------- the loop, end to end


@pytest.mark.slow
def test_the_loop_end_to_end_card_records_the_lineage(run_dir, cache, tmp_path):
    """run (gap) -> generate for the gap -> re-distil on prose + teacher-written code -> card lineage."""
    out = tmp_path / "records"
    _cli(
        cache,
        "generate",
        "source=demo",
        f"prompts.run_dir={run_dir}",
        "prompts.slices=[code]",
        "prompts.per_slice=40",
        "prompts.prompt_tokens=16",
        "source.max_new_tokens=24",
        "source.progress=false",
        f"out={out}",
        "terms=https://example.org/terms",
    )
    again = tmp_path / "again"
    # 4 steps of 16 blocks from every train block: the student meets some teacher-written code
    more = ["data.batch_size=16", "data.max_train_samples=null"]
    _cli(cache, *RUN, *more, f"data.generated={out}", f"hydra.run.dir={again}")
    coverage = json.loads((again / "coverage.json").read_text())
    code = next(r for r in coverage["slices"] if r["slice"] == "code")
    assert (
        code["train_tokens"] > 0
    )  # the student now saw (teacher-written) code; it saw none before
    before = json.loads((run_dir / "coverage.json").read_text())
    assert next(r for r in before["slices"] if r["slice"] == "code")["train_tokens"] == 0
    card = json.loads((again / "student" / "distillation_card.json").read_text())
    (lineage,) = card["generated_data"]
    assert (
        lineage["terms"] == "https://example.org/terms"
        and lineage["slices"]["code"]["records"] == 40
    )
    assert lineage["source_run"]["path"] == str(run_dir.resolve())
    assert (
        lineage["teacher"]["model"]["weights_sha256"]
        and lineage["generation"]["max_new_tokens"] == 24
    )
    assert (
        "teacher-written training data" in (again / "student" / "distillation_card.md").read_text()
    )
    record = json.loads((again / "student" / "distillation.json").read_text())
    assert record["generated_data"][0]["path"] == str(out.resolve())
    assert (
        record["data"]["fingerprint"]
        != json.loads((run_dir / "student" / "distillation.json").read_text())["data"][
            "fingerprint"
        ]
    )


@pytest.mark.slow
def test_a_served_teacher_key_never_reaches_a_file_log_card_or_wandb_run(run_dir, cache, tmp_path):
    """The whole black-box path with a key: `generate source=openai` against a loopback server that
    checks it, then a distillation on the records with the card and an offline W&B run. The key is in
    none of the files written (records, lineage, summary, Hydra dumps, card, W&B files) nor in any
    output of either process."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lightning_distill.blackbox import serve

    key = "sk-LEAKCHECK-7f3a9c2e5b1d"
    model = AutoModelForCausalLM.from_pretrained(run_dir / "student")
    tokenizer = AutoTokenizer.from_pretrained(run_dir / "student")
    records, train = tmp_path / "records", tmp_path / "train"
    env_key = {"LD_TEST_TEACHER_KEY": key}
    with serve(model, tokenizer, model_name="loop-teacher", api_key=key) as server:
        gen = _cli_env(cache, env_key, "generate", "source=openai", f"source.base_url={server.base_url}",
                       "source.model=loop-teacher", "source.api_key_env=LD_TEST_TEACHER_KEY",
                       "source.endpoint=completions", "source.max_tokens=6", "source.progress=false",
                       f"prompts.run_dir={run_dir}", "prompts.per_slice=2", "prompts.slices=[code]",
                       f"out={records}", "terms=loopback test terms")
        assert server.requests >= 2  # the server checked the key on every request
    assert len(read_records(records)) == 2
    fit = _cli_env(cache, {**env_key, "WANDB_MODE": "offline", "WANDB_DIR": str(train)}, *RUN,
                   f"data.generated={records}", "logger=wandb", "logger.offline=true", f"hydra.run.dir={train}")
    card = json.loads((train / "student" / "distillation_card.json").read_text())
    assert card["generated_data"][0]["terms"] == "loopback test terms"
    assert list(train.rglob("*.wandb")), "no W&B run was written"
    outputs = gen.stdout + gen.stderr + fit.stdout + fit.stderr
    assert key not in outputs
    files = [p for root in (records, train) for p in root.rglob("*") if p.is_file()]
    assert len(files) > 10
    leaked = [str(p) for p in files if key.encode() in p.read_bytes()]
    assert not leaked, leaked


def _cli_env(cache: Path, extra: dict[str, str], *args: str) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-m", "lightning_distill", *args], cwd=cache.parent,
                            env={**_env(cache), **extra}, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, f"{args}:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    return result


def test_generate_with_jsonl_prompts_and_a_rationale_template_scores_and_summarises(run_dir, cache, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"question": f"What is {i} + {i}?", "topic": "math", "answer": str(2 * i)} for i in range(3)]
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "rationale"
    _cli(cache, "generate", "source=local", f"source.path={run_dir / 'student'}", "source.max_new_tokens=4",
         "source.progress=false", "source.device=cpu", "prompts=jsonl", f"prompts.files={prompts}",
         "prompts.prompt_field=question", "prompts.slice_field=topic", "prompts.reference_field=answer",
         "rationale=steps", f"out={out}")
    records = read_records(out)
    assert len(records) == 3 and {r["slice"] for r in records} == {"math"}
    assert {r["prompt"] for r in records} == {r["question"] for r in rows}  # the original prompt is kept
    assert all(r["template"] == "steps" and r["reference"] is not None and "accepted" in r for r in records)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["slices"]["math"]["scored"] == 3 and (out / "summary.md").is_file()
