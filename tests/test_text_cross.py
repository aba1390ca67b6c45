"""TextDataModule(teacher_tokenizer=...): your files in two tokenizations, aligned, for a teacher and a
student whose tokenizers differ (the batches of CrossTokenizerDataModule), from Python and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_distill.data import TextDataModule, train_bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent
KEYS = {
    "input_ids", "attention_mask", "labels", "teacher_input_ids", "teacher_attention_mask", "teacher_labels",
    "student_groups", "teacher_groups", "bytes", "slice", "sample_id",
}  # fmt: skip
PIECES = [
    "The naïve café served crème brûlée",
    "東京の天気は晴れです",
    "emoji 😀🚀 and ß",
    "def area(r):\n    return 3.14159 * r ** 2\n",
    "for line in open(path):\n\tprint(line.rstrip())",
    "Grüße aus Zürich — ça va?",
]


def _text(i: int) -> str:
    return " ".join(PIECES[(i + k) % len(PIECES)] for k in range(1 + i % 4)) + f" #{i}"


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def toks(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Two byte-level BPEs (300 and 500 tokens) trained on the same text, saved like models' tokenizers."""
    texts = [_text(i) for i in range(40)]
    out = []
    for size in (300, 500):
        path = tmp_path_factory.mktemp(f"tok{size}")
        train_bpe_tokenizer(texts, size).save_pretrained(path)
        out.append(path)
    return out[0], out[1]


def _jsonl(path: Path, n: int = 60) -> Path:
    rows = [{"text": _text(i), "kind": "code" if i % 3 == 0 else "prose"} for i in range(n)]
    path.write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8"
    )
    return path


def _dm(toks, **kwargs) -> TextDataModule:
    student, teacher = toks
    defaults = {
        "tokenizer": _plain(student), "teacher_tokenizer": _plain(teacher), "seq_len": 32, "teacher_seq_len": 24,
        "batch_size": 4, "progress": False, "val_fraction": 0.15, "test_fraction": 0.15,
    }  # fmt: skip
    return TextDataModule(**{**defaults, **kwargs})


def _plain(tok):
    return str(tok) if isinstance(tok, Path) else tok


def _batches(dm: TextDataModule, split: str) -> list[dict]:
    loader = {"train": dm.train_dataloader, "val": dm.val_dataloader, "test": dm.test_dataloader}[
        split
    ]
    return list(loader())


# ---------------------------------------------------------------------------- the property


@pytest.mark.parametrize("packing", [True, False])
def test_both_tokenizations_of_a_sample_are_the_same_text(toks, tmp_path, packing):
    """Per sample: groups cover it (from 0, in order, >= 1 token of each side); the scored student
    tokens and the scored teacher tokens decode to the same text, group by group; ``bytes`` is that
    text's UTF-8 size (an end-of-text token counts one byte); labels are the ids after group 0."""
    dm = _dm(toks, files=str(_jsonl(tmp_path / "u.jsonl")), slice_field="kind", packing=packing)
    dm.setup()
    s_tok, t_tok = dm.tokenizer, dm.teacher_tokenizer
    s_eos, t_eos = s_tok.eos_token_id, t_tok.eos_token_id
    seen = eos_groups = multi = 0
    for split in ("train", "val", "test"):
        for batch in _batches(dm, split):
            assert set(batch) == KEYS
            for i in range(len(batch["sample_id"])):
                s_real, t_real = (
                    batch["attention_mask"][i].bool(),
                    batch["teacher_attention_mask"][i].bool(),
                )
                s_ids, t_ids = batch["input_ids"][i][s_real], batch["teacher_input_ids"][i][t_real]
                s_g, t_g = batch["student_groups"][i][s_real], batch["teacher_groups"][i][t_real]
                assert len(s_ids) <= 32 and len(t_ids) <= 24  # both limits
                assert (batch["student_groups"][i][~s_real] == -1).all()
                count = int(s_g.max()) + 1
                assert count >= 2 and int(t_g.max()) + 1 == count
                for g in (s_g, t_g):  # from 0, non-decreasing, every group present
                    assert (
                        g[0] == 0 and (g.diff() >= 0).all() and set(g.tolist()) == set(range(count))
                    )
                text, eos = "", 0
                for k in range(1, count):
                    s_k, t_k = s_ids[s_g == k].tolist(), t_ids[t_g == k].tolist()
                    multi += len(s_k) != len(t_k)
                    if s_k == [s_eos]:
                        assert t_k == [t_eos]
                        eos += 1
                        continue
                    piece = s_tok.decode(s_k, clean_up_tokenization_spaces=False)
                    assert piece == t_tok.decode(t_k, clean_up_tokenization_spaces=False) and piece
                    text += piece
                assert int(batch["bytes"][i]) == len(text.encode("utf-8")) + eos
                # Both sides score exactly groups 1.. (the same text), nothing at padding or group 0.
                assert torch.equal(batch["labels"][i][s_real], s_ids.masked_fill(s_g == 0, -100))
                assert torch.equal(
                    batch["teacher_labels"][i][t_real], t_ids.masked_fill(t_g == 0, -100)
                )
                assert (batch["labels"][i][~s_real] == -100).all()
                seen += 1
                eos_groups += eos
    assert seen > 10 and multi > 0  # groups of several tokens on one side (the tokenizers differ)
    assert eos_groups > 0 if packing else True


def test_one_tokenizer_for_both_gives_the_same_ids_and_one_token_groups(toks, tmp_path):
    """The sanity property: the same tokenizer on both sides gives teacher ids == student ids and,
    on ASCII text, one token per group."""
    rows = [
        {"text": f"def f{i}(x):\n    return x + {i}  # the sum of x and {i}"} for i in range(40)
    ]
    path = tmp_path / "a.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dm = _dm((toks[0], toks[0]), files=str(path), teacher_seq_len=32)
    for split in ("train", "val", "test"):
        for batch in _batches(dm, split):
            assert torch.equal(batch["teacher_input_ids"], batch["input_ids"])
            assert torch.equal(batch["teacher_groups"], batch["student_groups"])
            assert torch.equal(batch["teacher_labels"], batch["labels"])
            for groups, mask in zip(batch["student_groups"], batch["attention_mask"], strict=True):
                n = int(mask.sum())
                assert torch.equal(groups[:n], torch.arange(n))


# ---------------------------------------------------------------------------- files, cache, rows


def test_jsonl_and_text_files_with_a_slice_mapping_and_the_second_run_reads_the_cache(
    toks, tmp_path
):
    (tmp_path / "notes").mkdir()
    for i in range(10):
        (tmp_path / "notes" / f"n{i}.txt").write_text(_text(i) * 3, encoding="utf-8")
    files = {
        "rows": str(_jsonl(tmp_path / "r.jsonl", 40)),
        "notes": str(tmp_path / "notes" / "*.txt"),
    }
    first = _dm(toks, files=files, cache_dir=str(tmp_path / "data"))
    first.setup()
    assert first.cache_status == "built" and first.slices == ["notes", "rows"]
    folder = tmp_path / "data" / first.data_fingerprint
    assert json.loads((folder / "meta.json").read_text())["aligned"] is True
    assert not list(folder.glob("*.pkl")) and (folder / "train.safetensors").is_file()
    second = _dm(toks, files=files, cache_dir=str(tmp_path / "data"))
    second.setup()
    assert second.cache_status == "loaded" and second.data_fingerprint == first.data_fingerprint
    for split in ("train", "val", "test"):
        a, b = _batches(first, split), _batches(second, split)
        assert len(a) == len(b) > 0
        for x, y in zip(a, b, strict=True):
            assert x["slice"] == y["slice"]
            assert all(torch.equal(x[k], y[k]) for k in KEYS - {"slice"})
    counts = first.slice_counts("train")
    assert set(counts) == {"notes", "rows"} and all(c.samples > 0 for c in counts.values())
    # Sample ids are content hashes: the same in a module built from the files in another order.
    flipped = _dm(
        toks, files=dict(reversed(list(files.items()))), cache_dir=str(tmp_path / "other")
    )
    assert set(flipped.dataset("train").sample_ids.tolist()) == set(
        first.dataset("train").sample_ids.tolist()
    )


def test_a_saved_hugging_face_dataset_gives_the_same_samples_as_its_jsonl(toks, tmp_path):
    import datasets

    path = _jsonl(tmp_path / "a.jsonl", 30)
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    from_files = _dm(toks, files=str(path), slice_field="kind")
    from_dataset = _dm(toks, dataset=str(tmp_path / "saved"), slice_field="kind")
    assert (
        from_dataset.data_fingerprint == from_files.data_fingerprint
    )  # same content, same samples
    batch = next(iter(from_dataset.val_dataloader()))
    assert set(batch) == KEYS and batch["bytes"].gt(0).all()


@pytest.mark.parametrize("packing", [True, False])
def test_teacher_written_records_join_the_train_split_in_both_tokenizations(
    toks, tmp_path, packing
):
    from lightning_distill.blackbox import FunctionTeacher, write_records

    def teacher(prompts, *, n, seed):
        return [[f" la réponse {j}: 東京 {p}" for j in range(n)] for p in prompts]

    gen = tmp_path / "gen"
    write_records(FunctionTeacher(teacher, name="echo"), [f"question {i}?" for i in range(8)], gen, n=2,
                  seed=0, slices=["code"] * 8)  # fmt: skip
    files = str(_jsonl(tmp_path / "a.jsonl"))
    base = _dm(toks, files=files, slice_field="kind", packing=packing)
    dm = _dm(toks, files=files, slice_field="kind", packing=packing, generated=str(gen))
    for split in ("val", "test"):  # held-out data is the data's, unchanged
        assert dm.dataset(split).sample_ids.tolist() == base.dataset(split).sample_ids.tolist()
    real = base.dataset("train").sample_ids.tolist()
    train = dm.dataset("train")
    assert train.sample_ids.tolist()[: len(real)] == real and len(train) > len(real)
    assert dm.stats["generated"]["records"] == 16 and dm.data_fingerprint != base.data_fingerprint
    s_tok, t_tok = dm.tokenizer, dm.teacher_tokenizer
    texts = []
    for i in range(len(real), len(train)):  # the records' samples: the same text on both sides
        item = train[i]
        s_text = s_tok.decode(
            item["input_ids"][item["student_groups"] > 0], skip_special_tokens=True
        )
        t_text = t_tok.decode(
            item["teacher_input_ids"][item["teacher_groups"] > 0], skip_special_tokens=True
        )
        assert s_text == t_text
        texts.append(s_tok.decode(item["input_ids"]))
    assert "la réponse" in "".join(texts) and "question 3?" in "".join(texts)


def test_the_fingerprint_names_the_teacher_tokenizer_and_its_length(toks, tmp_path):
    files = str(_jsonl(tmp_path / "a.jsonl", 20))
    base = _dm(toks, files=files).data_fingerprint
    assert _dm(toks, files=files, teacher_seq_len=20).data_fingerprint != base
    assert _dm((toks[0], toks[0]), files=files).data_fingerprint != base
    plain = _dm(toks, files=files, teacher_tokenizer=None)  # one tokenizer: today's samples
    assert plain.data_fingerprint != base and not plain.aligned and plain.teacher_tokenizer is None
    assert set(next(iter(plain.train_dataloader()))) == {
        "input_ids",
        "attention_mask",
        "labels",
        "slice",
        "sample_id",
    }


def test_rows_are_cut_between_groups_within_both_limits(toks, tmp_path):
    files = str(_jsonl(tmp_path / "a.jsonl"))
    dm = _dm(toks, files=files, packing=False, seq_len=20, teacher_seq_len=12)
    dm.setup()
    assert dm.stats["truncated_rows"] > 0 and dm.stats["truncated_tokens"] > 0  # counted, warned
    data = dm.dataset("train")
    assert (data.lengths() <= 20).all() and (
        torch.from_numpy(data.teacher_offsets).diff() <= 12
    ).all()
    ids = data.sample_ids.tolist()
    assert len(set(ids)) == len(ids)
    with pytest.raises(
        ValueError, match=r"student / \d+ teacher tokens, more than seq_len=20 / teacher_seq_len=12"
    ):
        _dm(
            toks,
            files=files,
            packing=False,
            seq_len=20,
            teacher_seq_len=12,
            truncation="error",
            cache_dir=str(tmp_path / "err"),
        ).setup()


def test_bad_teacher_tokenizers_get_one_clear_error(toks, tmp_path):
    from crosstok_fixtures import slow_tokenizer  # a slow (Python) tokenizer: no offsets

    files = str(_jsonl(tmp_path / "a.jsonl", 10))
    with pytest.raises(
        TypeError, match=r"teacher_tokenizer \(CharTokenizer\) gives no character offsets.*use_fast"
    ):
        _dm(toks, files=files, teacher_tokenizer=slow_tokenizer())
    slow_student = _dm(toks, files=files, tokenizer=slow_tokenizer())
    with pytest.raises(
        TypeError, match=r"student's\) \(CharTokenizer\) gives no character offsets"
    ):
        slow_student.setup()
    with pytest.raises(TypeError, match="teacher_tokenizer must be a tokenizer folder or hub id"):
        _dm(toks, files=files, teacher_tokenizer=3)
    with pytest.raises(
        ValueError,
        match=r"teacher_tokenizer='/no/such/tokenizer' cannot be loaded.*\$\{teacher.path\}",
    ):
        _dm(toks, files=files, teacher_tokenizer="/no/such/tokenizer").setup()
    with pytest.raises(ValueError, match="plain text only, not on prompt/response pairs"):
        _dm(toks, files=files, prompt_field="p", response_field="r")


def test_a_tokenizer_without_eos_is_handled(toks, tmp_path):
    """No end-of-text group when one side has no eos (warned); the samples are still aligned."""
    from transformers import AutoTokenizer

    teacher = AutoTokenizer.from_pretrained(toks[1])
    teacher.eos_token = None
    dm = _dm((toks[0], teacher), files=str(_jsonl(tmp_path / "a.jsonl")))
    with pytest.warns(UserWarning, match="has no eos token"):
        dm.setup()
    eos = dm.tokenizer.eos_token_id
    batch = next(iter(dm.train_dataloader()))
    assert not (batch["input_ids"][batch["attention_mask"].bool()] == eos).any()
    assert (batch["student_groups"].amax(-1) == batch["teacher_groups"].amax(-1)).all()


# ---------------------------------------------------------------------------- training on it


def _llama(vocab: int, seed: int):
    from lightning_distill.models import causal_lm_from_config

    return causal_lm_from_config("llama", vocab_size=vocab, hidden_size=16, intermediate_size=32,
                                 num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                 max_position_embeddings=64, seed=seed)  # fmt: skip


def test_a_fit_on_your_files_reports_bits_per_byte(toks, tmp_path):
    import lightning as L

    from lightning_distill import DistillationModule
    from lightning_distill.callbacks import CoverageSlices
    from lightning_distill.losses import CrossTokenizerKD, TaskLoss

    torch.manual_seed(0)
    dm = _dm(toks, files=str(_jsonl(tmp_path / "a.jsonl")), slice_field="kind", eval_batch_size=16)
    module = DistillationModule(_llama(300, 0), _llama(500, 1),
                                {"kd": CrossTokenizerKD(weight=0.5), "task": TaskLoss(weight=0.5)})  # fmt: skip
    coverage = CoverageSlices(dirpath=str(tmp_path / "cov"))
    trainer = L.Trainer(max_steps=2, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[coverage], limit_val_batches=1,
                        num_sanity_val_steps=0)  # fmt: skip
    trainer.fit(module, datamodule=dm)
    trainer.test(module, datamodule=dm, verbose=False)
    assert "bits per byte" in (tmp_path / "cov" / "coverage.md").read_text()
    for name, row in zip(coverage.slices, coverage.last_rows, strict=True):
        s = coverage.last_sums[name]
        assert s["bytes"] > s["tokens"] > 0
        assert row["student_metric"] == pytest.approx(s["student_nll"] / math.log(2) / s["bytes"])
        assert row["teacher_metric"] == pytest.approx(s["teacher_nll"] / math.log(2) / s["bytes"])


def test_a_teacher_seq_len_past_the_teacher_s_positions_is_refused_before_a_step(toks, tmp_path):
    import lightning as L

    from lightning_distill import DistillationModule
    from lightning_distill.losses import ULDLoss
    from lightning_distill.models import causal_lm_from_config

    teacher = causal_lm_from_config("llama", vocab_size=500, hidden_size=16, intermediate_size=32,
                                    num_hidden_layers=1, num_attention_heads=2, num_key_value_heads=2,
                                    max_position_embeddings=16, seed=1)  # fmt: skip
    module = DistillationModule(_llama(300, 0), teacher, {"kd": ULDLoss()})
    dm = _dm(toks, files=str(_jsonl(tmp_path / "a.jsonl")))  # seq_len 32, teacher_seq_len 24
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)  # fmt: skip
    with pytest.raises(ValueError, match=r"data teacher_seq_len=24 is longer than the teacher takes \(16 positions.*"
                       r"\(data\.teacher_seq_len=16\)"):  # fmt: skip
        trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 0


# ---------------------------------------------------------------------------- the command line


def _model(tok_dir: Path, where: Path, seed: int) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64)  # fmt: skip
    LlamaForCausalLM(config).save_pretrained(where)
    tok.save_pretrained(where)
    return where


@pytest.mark.slow
def test_cli_distils_between_two_saved_models_with_different_tokenizers(toks, tmp_path):
    """Two saved causal LMs (BPE 500 teacher, BPE 300 student), a JSONL file: loss=cross_tokenizer runs,
    the report is in bits per byte, and the exported student carries the student's tokenizer. With the
    dense teacher cache (teacher token space) a second run reads it and builds nothing."""
    teacher = _model(toks[1], tmp_path / "teacher", 1)
    student = _model(toks[0], tmp_path / "student", 0)
    data = _jsonl(tmp_path / "data.jsonl", 80)
    out = tmp_path / "run"
    cached = ["callbacks=teacher_cache_dense", "callbacks.teacher_cache.progress=false"]
    cmd = [
        sys.executable, "-m", "lightning_distill",
        "teacher=hf_pretrained", f"teacher.path={teacher}", "student=hf_pretrained", f"student.path={student}",
        "data=files", f"data.files={data}", "data.slice_field=kind", f"data.teacher_tokenizer={teacher}",
        "data.seq_len=32", "data.teacher_seq_len=24", "data.batch_size=4", "data.progress=false",
        "data.val_fraction=0.15", "data.test_fraction=0.15",
        "loss=cross_tokenizer", "trainer=smoke", "trainer.max_steps=3", "logger=none", "baseline=false",
        *cached, f"output_dir={out}",
    ]  # fmt: skip
    env = {
        **os.environ, "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache"), "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO), "PYTHONWARNINGS": "ignore",
    }  # fmt: skip
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "student bpb" in result.stdout
    report = json.loads((out / "report.json").read_text())
    assert set(report["slices"]) == {"code", "prose"}
    for stats in report["slices"].values():
        assert (
            stats["bytes"] > 0
            and stats["student_bits_per_byte"] > 0
            and stats["teacher_bits_per_byte"] > 0
        )
    assert report["coverage"]["metric"] == "bits_per_byte"
    assert "bits per byte" in (out / "coverage.md").read_text()
    record = json.loads((out / "student" / "distillation.json").read_text())
    assert record["config"]["data"]["tokenizer"] == str(student)  # the default: the student's own
    exported = json.loads((out / "student" / "tokenizer.json").read_text())
    assert (
        len(exported["model"]["vocab"]) == 300 and (out / "student" / "model.safetensors").is_file()
    )
    built = [{name: s["built_now"] for name, s in record["teacher_cache"]["splits"].items()}]
    assert record["teacher_cache"]["space"] == "teacher" and all(n > 0 for n in built[0].values())
    again = tmp_path / "run2"
    result = subprocess.run([*cmd[:-1], f"output_dir={again}"], cwd=tmp_path, env=env, capture_output=True,
                            text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    record = json.loads((again / "student" / "distillation.json").read_text())
    assert {name: s["built_now"] for name, s in record["teacher_cache"]["splits"].items()} == {
        "train": 0, "val": 0, "test": 0}  # fmt: skip
    assert len(os.listdir(tmp_path / "cache" / "teacher_targets")) == 1


def test_each_model_is_checked_against_the_length_it_reads():
    """check_data_positions (DistillationModule.setup and +build_cache_only): with two tokenizers the
    teacher is held to teacher_seq_len, the student to seq_len; with one, both to seq_len."""
    from types import SimpleNamespace

    from transformers import LlamaConfig, LlamaForCausalLM

    from lightning_distill.models.adapters import check_data_positions

    def llama(positions: int):
        return LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                            num_attention_heads=2, max_position_embeddings=positions))

    student, teacher = llama(64), llama(32)
    check_data_positions(student, teacher, SimpleNamespace(seq_len=48, teacher_seq_len=24))  # each fits its own
    with pytest.raises(ValueError, match=r"data teacher_seq_len=40 is longer than the teacher .*data\.teacher_seq_len=32"):
        check_data_positions(student, teacher, SimpleNamespace(seq_len=16, teacher_seq_len=40))
    with pytest.raises(ValueError, match=r"data seq_len=48 is longer than the teacher .*data\.seq_len=32"):
        check_data_positions(student, teacher, SimpleNamespace(seq_len=48, teacher_seq_len=None))
    check_data_positions(student, teacher, SimpleNamespace(seq_len=None))  # no length: nothing to check
