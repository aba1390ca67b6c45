"""TextDataModule: users' own text from files and Hugging Face datasets, through Python and the CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from lightning_distill.data import TextDataModule, train_bpe_tokenizer

REPO = Path(__file__).resolve().parent.parent
TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
WORDS = "alpha beta gamma delta def return import class the of and to in is".split()


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path / "cache"))
    return tmp_path


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 300-token byte-level BPE with a chat template, saved like a model's tokenizer."""
    tok = train_bpe_tokenizer([" ".join(WORDS) * 4, "def f(x):\n    return x\n"], 300)
    tok.chat_template = TEMPLATE
    path = tmp_path_factory.mktemp("tok")
    tok.save_pretrained(path)
    return path


def _text(i: int) -> str:
    return " ".join(WORDS[(i * 7 + k) % len(WORDS)] for k in range(5 + i % 11)) + f" doc {i}"


def _rows(n: int = 60) -> list[dict]:
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


def _dm(tok_dir: Path, **kwargs) -> TextDataModule:
    defaults = {
        "tokenizer": str(tok_dir),
        "seq_len": 16,
        "batch_size": 2,
        "progress": False,
        "val_fraction": 0.1,
        "test_fraction": 0.1,
    }
    return TextDataModule(**{**defaults, **kwargs})


def _all_ids(dm: TextDataModule) -> dict[str, set[int]]:
    return {s: set(dm.dataset(s).sample_ids.tolist()) for s in ("train", "val", "test")}


# ---------------------------------------------------------------------------- sources


def test_jsonl_with_slice_field_gives_demo_batch_format(tok_dir, tmp_path):
    dm = _dm(tok_dir, files=str(_jsonl(tmp_path / "a.jsonl", _rows())), slice_field="kind")
    dm.setup("fit")
    assert dm.slices == ["code", "prose"] and dm.cache_status == "built"
    batch = next(iter(dm.train_dataloader()))
    assert set(batch) == {"input_ids", "attention_mask", "labels", "slice", "sample_id"}
    assert batch["input_ids"].shape == (2, 16) and batch["input_ids"].dtype == torch.long
    assert torch.equal(batch["labels"], batch["input_ids"]) and batch["attention_mask"].all()
    assert all(s in ("code", "prose") for s in batch["slice"])
    assert batch["sample_id"].dtype == torch.long and (batch["sample_id"] >= 0).all()
    for split in ("train", "val", "test"):  # every slice shows up in every split
        assert all(c.samples > 0 for c in dm.slice_counts(split).values())
    assert len(dm.data_fingerprint) == 16 and dm.fingerprint != dm.data_fingerprint
    assert dm.tokenizer.decode(dm.dataset("train")[0]["input_ids"]).strip()


@pytest.mark.parametrize("kind", ["parquet", "csv"])
def test_parquet_and_csv_read_like_jsonl(tok_dir, tmp_path, kind):
    import datasets

    rows = _rows(30)
    path = tmp_path / f"a.{kind}"
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(path)) if kind == "parquet" else table.to_csv(str(path), index=False)
    jsonl = _dm(tok_dir, files=str(_jsonl(tmp_path / "a.jsonl", rows)), packing=False)
    other = _dm(tok_dir, files=str(path), packing=False)
    assert other.data_fingerprint == jsonl.data_fingerprint  # same content, same samples
    assert _all_ids(other) == _all_ids(jsonl)


def test_text_files_glob_and_slice_mapping(tok_dir, tmp_path):
    for i in range(8):
        (tmp_path / "docs").mkdir(exist_ok=True)
        (tmp_path / "docs" / f"d{i}.md").write_text(_text(i) * 3)
        (tmp_path / "src" / "pkg").mkdir(parents=True, exist_ok=True)
        (tmp_path / "src" / "pkg" / f"m{i}.py").write_text(
            f"def f{i}(x):\n    return x + {i}\n" * 3
        )
    dm = _dm(
        tok_dir, files={"prose": str(tmp_path / "docs/*.md"), "code": str(tmp_path / "src/**/*.py")}
    )
    assert dm.slices == ["code", "prose"]
    assert len(dm.documents()) == 16
    one = _dm(tok_dir, files=str(tmp_path / "docs/*.md"))
    assert one.slices == ["all"] and len(one.documents()) == 8
    _jsonl(tmp_path / "docs" / "x.jsonl", _rows(5))
    _jsonl(tmp_path / "docs" / "y.jsonl", _rows(7)[2:])
    mixed = _dm(tok_dir, files=[str(tmp_path / "docs/*.jsonl"), str(tmp_path / "docs/d1.md")])
    assert (
        len(mixed.documents()) == 11
    )  # 5 + 5 rows (3 repeat, dropped only when tokenizing) + 1 file
    mixed.setup()
    assert mixed.stats["duplicates_dropped"] == 3


def test_saved_hf_dataset_folder_and_own_splits(tok_dir, tmp_path):
    import datasets

    rows = _rows(40)
    dd = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_list(rows[:30]),
            "validation": datasets.Dataset.from_list(rows[30:35]),
            "test": datasets.Dataset.from_list(rows[35:]),
        }
    )
    dd.save_to_disk(str(tmp_path / "ds"))
    split_by_doc = _dm(tok_dir, dataset=str(tmp_path / "ds"), slice_field="kind")
    assert len(split_by_doc.documents()) == 30  # the train split, then split by document
    own = _dm(
        tok_dir,
        dataset=str(tmp_path / "ds"),
        packing=False,
        splits={"train": "train", "val": "validation", "test": "test"},
    )
    assert [len(own.dataset(s)) for s in ("train", "val", "test")] == [30, 5, 5]
    with pytest.raises(
        ValueError, match=r"'valid' is not a split .* \['train', 'validation', 'test'\]"
    ):
        _dm(
            tok_dir, dataset=str(tmp_path / "ds"), splits={"train": "train", "val": "valid"}
        ).setup()


# ---------------------------------------------------------------------------- bad input


def test_missing_field_lists_the_fields(tok_dir, tmp_path):
    dm = _dm(tok_dir, files=str(_jsonl(tmp_path / "a.jsonl", _rows(5))), text_field="body")
    with pytest.raises(
        ValueError,
        match=r"text_field='body' is not a field .* \['text', 'kind', 'prompt', 'response'\]",
    ):
        dm.setup()
    dm = _dm(tok_dir, files=str(tmp_path / "a.jsonl"), slice_field="source")
    with pytest.raises(ValueError, match="slice_field='source' is not a field"):
        dm.setup()


def test_missing_file_and_glob_without_match(tok_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="'nope.jsonl' does not exist"):
        _dm(tok_dir, files="nope.jsonl").setup()
    with pytest.raises(FileNotFoundError, match="matches no file"):
        _dm(tok_dir, files=str(tmp_path / "*.parquet")).setup()
    with pytest.raises(ValueError, match="exactly one source"):
        _dm(tok_dir)


def test_empty_dataset_is_one_clear_error(tok_dir, tmp_path):
    rows = [{"text": "   "}, {"text": ""}, {"text": None}]
    with pytest.raises(ValueError, match=r"holds no documents \(3 rows, all empty\)"):
        _dm(tok_dir, files=str(_jsonl(tmp_path / "e.jsonl", rows))).setup()


def test_single_valued_slice_field_warns(tok_dir, tmp_path):
    rows = [{**r, "kind": "prose"} for r in _rows(10)]
    dm = _dm(tok_dir, files=str(_jsonl(tmp_path / "a.jsonl", rows)), slice_field="kind")
    with pytest.warns(UserWarning, match="one value only"):
        assert dm.slices == ["prose"]


def test_no_tokenizer_says_how_to_set_it(tmp_path):
    dm = TextDataModule(files=str(_jsonl(tmp_path / "a.jsonl", _rows(5))))
    with pytest.raises(ValueError, match="data.tokenizer is not set"):
        dm.setup()


# ---------------------------------------------------------------------------- packing, rows, truncation


def test_packing_fills_blocks_rows_pad_and_count_truncation(tok_dir, tmp_path, caplog):
    path = str(_jsonl(tmp_path / "a.jsonl", _rows()))
    packed = _dm(tok_dir, files=path)
    packed.setup()
    lengths = packed.dataset("train").lengths()
    assert (lengths == 16).all()
    rows = _dm(tok_dir, files=path, packing=False, seq_len=24)
    with pytest.warns(
        UserWarning, match=r"\d+ of 60 rows were longer than seq_len=24 and were truncated"
    ):
        rows.setup()
    assert rows.stats["truncated_rows"] > 0 and rows.dataset("train").lengths().max() == 24
    assert len(rows.dataset("train")) + len(rows.dataset("val")) + len(rows.dataset("test")) == 60
    batch = rows._loader(rows.dataset("train"), 8, shuffle=False).__iter__().__next__()
    short = batch["attention_mask"].sum(1) < batch["input_ids"].shape[1]
    assert short.any()  # right padding, masked, no loss on it
    for b in torch.nonzero(short).flatten().tolist():
        n = int(batch["attention_mask"][b].sum())
        assert batch["attention_mask"][b, :n].all() and (batch["labels"][b, n:] == -100).all()


def test_truncation_error_names_the_row(tok_dir, tmp_path):
    rows = _rows(10) + [{"text": "alpha " * 200, "kind": "x", "prompt": "", "response": ""}]
    dm = _dm(
        tok_dir,
        files=str(_jsonl(tmp_path / "a.jsonl", rows)),
        packing=False,
        seq_len=128,
        truncation="error",
    )
    with pytest.raises(ValueError, match=r"a.jsonl row 10 has \d+ tokens, more than seq_len=128"):
        dm.setup()


def test_instruct_masks_prompt_with_minus_100(tok_dir, tmp_path):
    dm = _dm(
        tok_dir,
        files=str(_jsonl(tmp_path / "a.jsonl", _rows(20))),
        prompt_field="prompt",
        response_field="response",
        packing=False,
        seq_len=256,
    )
    dm.setup()
    item = dm.dataset("train")[0]
    labels, ids = item["labels"], item["input_ids"]
    n_prompt = int((labels == -100).sum())
    assert n_prompt > 0 and (labels[:n_prompt] == -100).all()
    assert torch.equal(labels[n_prompt:], ids[n_prompt:])
    prompt_text = dm.tokenizer.decode(ids[:n_prompt])
    assert prompt_text.startswith("<user>question") and prompt_text.endswith("<assistant>")
    assert dm.tokenizer.decode(ids[n_prompt:]).startswith("answer")
    assert int(ids[-1]) == dm.tokenizer.eos_token_id


def test_instruct_without_chat_template_says_so(tmp_path):
    tok = train_bpe_tokenizer(["alpha beta"], 260)
    tok.save_pretrained(tmp_path / "plain")
    dm = _dm(
        tmp_path / "plain",
        files=str(_jsonl(tmp_path / "a.jsonl", _rows(5))),
        prompt_field="prompt",
        response_field="response",
    )
    with pytest.raises(ValueError, match="need a chat template"):
        dm.setup()


# ---------------------------------------------------------------------------- ids, splits, cache


@pytest.mark.parametrize("packing", [True, False])
def test_ids_and_splits_stable_across_reorder_and_subset(tok_dir, tmp_path, packing):
    rows = _rows()
    base = _dm(tok_dir, files=str(_jsonl(tmp_path / "a.jsonl", rows)), packing=packing, seq_len=64)
    shuffled = _dm(
        tok_dir, files=str(_jsonl(tmp_path / "b.jsonl", rows[::-1])), packing=packing, seq_len=64
    )
    assert shuffled.data_fingerprint == base.data_fingerprint
    assert _all_ids(shuffled) == _all_ids(base)
    if not packing:  # one row per document: a subset keeps its documents' ids and splits
        subset = _dm(
            tok_dir, files=str(_jsonl(tmp_path / "c.jsonl", rows[:40])), packing=False, seq_len=64
        )
        for split, ids in _all_ids(subset).items():
            assert ids <= _all_ids(base)[split]
    other_seed = _dm(
        tok_dir, files=str(tmp_path / "a.jsonl"), packing=packing, seq_len=64, split_seed=1
    )
    assert _all_ids(other_seed)["val"] != _all_ids(base)["val"]


def test_duplicates_dropped_and_max_train_samples_keeps_ids(tok_dir, tmp_path):
    rows = _rows(30)
    dm = _dm(
        tok_dir,
        files=str(_jsonl(tmp_path / "a.jsonl", rows + rows[:10])),
        packing=False,
        seq_len=64,
    )
    dm.setup()
    assert dm.stats["duplicates_dropped"] == 10 and dm.stats["documents"] == 30
    capped = _dm(
        tok_dir, files=str(tmp_path / "a.jsonl"), packing=False, seq_len=64, max_train_samples=5
    )
    assert capped.data_fingerprint == dm.data_fingerprint != capped.fingerprint
    assert set(capped.dataset("train").sample_ids.tolist()) <= _all_ids(dm)["train"]
    assert len(capped.dataset("train")) == 5


def test_second_instance_reads_the_cache(tok_dir, tmp_path):
    path = str(_jsonl(tmp_path / "a.jsonl", _rows()))
    first = _dm(tok_dir, files=path)
    first.prepare_data()
    first.setup()
    folder = first.cache_dir / first.data_fingerprint
    stamp = (folder / "train.safetensors").stat().st_mtime_ns
    assert first.cache_status == "built" and (folder / "meta.json").is_file()
    second = _dm(tok_dir, files=path)
    second.prepare_data()
    second.setup()
    assert second.cache_status == "loaded"
    assert (folder / "train.safetensors").stat().st_mtime_ns == stamp
    assert torch.equal(second.dataset("train").sample_ids, first.dataset("train").sample_ids)
    assert sorted(p.suffix for p in folder.iterdir()) == [
        ".json",
        ".safetensors",
        ".safetensors",
        ".safetensors",
    ]
    (folder / "val.safetensors").write_bytes(b"damaged")  # a damaged cache is rebuilt, not trusted
    third = _dm(tok_dir, files=path)
    third.setup()
    assert third.cache_status == "built" and len(third.dataset("val")) == len(first.dataset("val"))
    changed = _dm(tok_dir, files=path, seq_len=32)
    assert changed.data_fingerprint != first.data_fingerprint


def test_num_workers_loader_and_train_slices(tok_dir, tmp_path):
    dm = _dm(
        tok_dir,
        files=str(_jsonl(tmp_path / "a.jsonl", _rows())),
        slice_field="kind",
        num_workers=2,
        train_slices="prose",
    )
    dm.setup()
    batches = list(dm.train_dataloader())
    assert batches and all(s == "prose" for b in batches for s in b["slice"])
    assert {s for b in dm.val_dataloader() for s in b["slice"]} == {"code", "prose"}
    with pytest.raises(ValueError, match=r"Unknown train_slices \['poetry'\]"):
        _dm(
            tok_dir, files=str(tmp_path / "a.jsonl"), slice_field="kind", train_slices=["poetry"]
        ).setup()


def test_train_loader_resumes_mid_epoch_like_the_demo(tok_dir, tmp_path):
    """Padded rows too: a fresh loader given the saved state serves the rest of the epoch."""
    dm = _dm(tok_dir, files=str(_jsonl(tmp_path / "a.jsonl", _rows())), packing=False, seq_len=64)
    dm.setup()
    epoch = [b["sample_id"].tolist() for b in dm.train_dataloader()]
    loader = dm.train_dataloader()
    iterator = iter(loader)
    first = [next(iterator)["input_ids"] for _ in range(3)]
    resumed = dm.train_dataloader()
    resumed.load_state_dict(loader.state_dict())
    rest = list(resumed)
    assert [b["sample_id"].tolist() for b in rest] == epoch[3:]
    assert rest[0]["input_ids"].shape[1] <= 64 and first[0].shape[0] == 2


def test_vocab_size_check_and_resolver(tok_dir, tmp_path):
    from lightning_distill.data.text import vocab_size_of

    assert vocab_size_of(str(tok_dir)) == 300
    with pytest.raises(ValueError, match="data.tokenizer, which is not set"):
        vocab_size_of(None)
    dm = _dm(tok_dir, files=str(_jsonl(tmp_path / "a.jsonl", _rows(5))), vocab_size=200)
    with pytest.raises(ValueError, match="300 tokens but data.vocab_size=200"):
        dm.setup()


# ---------------------------------------------------------------------------- CLI


def _teacher(tok_dir: Path, where: Path, layers: int = 1) -> Path:
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(tok_dir)
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    LlamaForCausalLM(config).save_pretrained(where)
    tok.save_pretrained(where)
    return where


def _cli_env(tmp_path: Path) -> dict[str, str]:
    """The environment of a CLI run in a test: its own cache root, offline, this checkout."""
    return {
        **os.environ,
        "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "PYTHONPATH": str(REPO),
        "PYTHONWARNINGS": "ignore",
    }


@pytest.mark.slow
def test_cli_distils_on_a_jsonl_file_with_slices(tok_dir, tmp_path):
    data = _jsonl(tmp_path / "data.jsonl", _rows(120))
    teacher = _teacher(tok_dir, tmp_path / "teacher")
    out = tmp_path / "run"
    cmd = [
        sys.executable,
        "-m",
        "lightning_distill",
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
        f"output_dir={out}",
    ]
    env = _cli_env(tmp_path)
    result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    report = json.loads((out / "report.json").read_text())
    assert set(report["slices"]) == {"code", "prose"}
    assert all(s["tokens"] > 0 for s in report["slices"].values())
    card = json.loads((out / "student" / "distillation_card.json").read_text())
    assert (
        len(card["data"]["data_fingerprint"]) == 16
        and (out / "student" / "tokenizer.json").is_file()
    )
    record = json.loads((out / "student" / "distillation.json").read_text())
    # The student's vocabulary came from the teacher's config (the ld.vocab_size resolver).
    assert record["config"]["student"]["vocab_size"] == 300
    checkpoint = torch.load(next(out.rglob("last.ckpt")), weights_only=True)  # plain values only
    assert checkpoint["datamodule_hyper_parameters"]["slice_field"] == "kind"


@pytest.mark.slow
def test_your_teacher_your_data_end_to_end_and_the_second_run(tok_dir, tmp_path):
    """The README's "Your own teacher and data": a model folder with its own tokenizer, a JSONL file
    with a slice field, a student cut from the teacher, a teacher cache, the per-slice report; the
    second identical run reuses the cache (0 samples built), and the exported student generates."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    data = _jsonl(tmp_path / "train.jsonl", _rows(120))
    teacher = _teacher(tok_dir, tmp_path / "my-teacher", layers=4)
    env = _cli_env(tmp_path)

    def run(out: Path) -> dict:
        cmd = [
            sys.executable, "-m", "lightning_distill",
            "teacher=hf_pretrained", f"teacher.path={teacher}",
            "student=from_teacher", "student.layers=every_other",
            "data=files", f"data.files={data}", "data.slice_field=kind", "data.seq_len=32",
            "data.batch_size=4", "data.val_fraction=0.2", "data.test_fraction=0.2", "data.progress=false",
            "callbacks=teacher_cache_topk", "callbacks.teacher_cache.k=8",
            "trainer=smoke", "baseline=false", f"output_dir={out}",
        ]  # fmt: skip
        result = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        return json.loads((out / "student" / "distillation.json").read_text())

    first = run(tmp_path / "run1")
    report = json.loads((tmp_path / "run1" / "report.json").read_text())
    assert set(report["slices"]) == {"code", "prose"}  # the per-slice report on the user's slices
    assert all(s["tokens"] > 0 for s in report["slices"].values()), report["slices"]
    derived = first["student"]["derived_from_teacher"]
    assert derived["layers"] == [0, 2]  # every other of the teacher's 4 layers, recorded
    assert derived["teacher"] == str(teacher) and first["student"]["name_or_path"] is None
    built = {name: split["built_now"] for name, split in first["teacher_cache"]["splits"].items()}
    assert set(built) == {"train", "val", "test"} and all(n > 0 for n in built.values())

    second = run(tmp_path / "run2")  # a new process: the same teacher loaded again from its folder
    assert second["teacher_cache"]["dirpath"] == first["teacher_cache"]["dirpath"]
    assert all(split["built_now"] == 0 for split in second["teacher_cache"]["splits"].values())

    exported = tmp_path / "run2" / "student"
    student = AutoModelForCausalLM.from_pretrained(exported)
    tok = AutoTokenizer.from_pretrained(exported)
    assert student.config.num_hidden_layers == 2 and len(tok) == student.config.vocab_size
    prompt = tok("alpha beta", return_tensors="pt")
    generated = student.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tok.eos_token_id)
    assert generated.shape[1] == prompt["input_ids"].shape[1] + 5


def test_user_data_without_a_tokenizer_fails_with_one_message(tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf
    from omegaconf.errors import InterpolationResolutionError

    from lightning_distill.cli import CONFIG_DIR

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="distill",
            overrides=[
                "data=files",
                "data.files=a.jsonl",
                "teacher=hf_config",
                "student=hf_config",
            ],
        )
    with pytest.raises(InterpolationResolutionError, match="data.tokenizer, which is not set"):
        OmegaConf.to_container(cfg.student, resolve=True)


def test_data_configs_compose_with_a_pretrained_teacher(tok_dir, tmp_path):
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from lightning_distill.cli import CONFIG_DIR, _instantiate

    teacher = _teacher(tok_dir, tmp_path / "teacher")
    data = _jsonl(tmp_path / "a.jsonl", _rows(30))
    for name in ("files", "instruct"):
        with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
            cfg = compose(
                config_name="distill",
                overrides=[
                    f"data={name}",
                    f"data.files={data}",
                    "teacher=hf_pretrained",
                    f"teacher.path={teacher}",
                    "student=hf_config",
                    f"output_dir={tmp_path}",
                ],
            )
        resolved = OmegaConf.to_container(cfg, resolve=True, throw_on_missing=True)
        assert resolved["data"]["tokenizer"] == str(teacher)
        assert resolved["student"]["vocab_size"] == resolved["data"]["vocab_size"] == 300
        dm = _instantiate(cfg.data)
        assert dm.instruct == (name == "instruct") and len(dm.documents()) == 30
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            config_name="distill",
            overrides=[
                "data=files",
                f"data.files={{a: {data}, b: [{data}]}}",
                f"data.tokenizer={tok_dir}",
            ],
        )
    dm = _instantiate(cfg.data)
    assert dm.hparams.files == {"a": str(data), "b": [str(data)]} and type(dm.hparams.files) is dict


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


@pytest.mark.slow
def test_teacher_cache_and_coverage_work_unchanged_on_padded_rows(tok_dir, tmp_path):
    import functools

    import lightning as L

    from lightning_distill import DistillationModule
    from lightning_distill.callbacks import CoverageSlices, TeacherCache
    from lightning_distill.losses import LogitKD, TaskLoss

    path = str(_jsonl(tmp_path / "a.jsonl", _rows()))
    built = []
    for attempt in range(
        2
    ):  # the second run, with a new data module, reads the teacher cache by id
        dm = _dm(
            tok_dir,
            files=path,
            slice_field="kind",
            packing=False,
            seq_len=48,
            batch_size=4,
            val_fraction=0.2,
            test_fraction=0.1,
        )
        module = DistillationModule(
            _lm(300, 0),
            _lm(300, 1),
            {"kd": LogitKD(weight=0.5), "task": TaskLoss(weight=0.5)},
            optimizer=functools.partial(torch.optim.AdamW, lr=1e-3),
        )
        cache = TeacherCache(
            str(tmp_path / "tcache"), kind="topk", k=4, splits=["train", "val"], progress=False
        )
        coverage = CoverageSlices(dirpath=str(tmp_path / f"cov{attempt}"))
        trainer = L.Trainer(
            max_steps=3,
            val_check_interval=3,
            limit_val_batches=2,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[cache, coverage],
            accelerator="cpu",
        )
        trainer.fit(module, datamodule=dm)
        built.append(dict(cache.built))
        assert {row["slice"] for row in coverage.last_rows} == {"code", "prose"}
    assert built[0]["train"] == len(dm.dataset("train")) and built[1] == {"train": 0, "val": 0}
