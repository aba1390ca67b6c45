"""Tests for lightning_distill.data: corpus, tokenizer, data module."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import lightning_distill.data.tokenizer as tok_module
from lightning_distill.data import (
    Document,
    SlicedTextDataModule,
    cache_root,
    corpus_fingerprint,
    demo_corpus,
    train_bpe_tokenizer,
)
from lightning_distill.data.tokenizer import tokenizer_fingerprint

SMALL = {"prose_bytes": 50_000, "code_bytes": 50_000}
PROSE = "The ``with`` statement wraps a block — café, naïve — with methods of a context manager.\n"
CODE = 'def f(x: int) -> str:\n\tif x:\n        return f"{x!r} 😀"  # comment\r\n    return ""\n'


@pytest.fixture(autouse=True)
def _isolated_cache(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("LIGHTNING_DISTILL_CACHE", str(tmp_path))
    return tmp_path


@pytest.fixture(scope="module")
def small_docs() -> list[Document]:
    return demo_corpus(**SMALL)


def make_dm(**overrides) -> SlicedTextDataModule:
    kwargs = {"vocab_size": 512, "seq_len": 32, "batch_size": 4, **SMALL, **overrides}
    return SlicedTextDataModule(**kwargs)


# ---------------------------------------------------------------------------- paths


def test_cache_root_precedence(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert cache_root() == tmp_path
    monkeypatch.delenv("LIGHTNING_DISTILL_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "lightning-distill"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_root() == Path.home() / ".cache" / "lightning-distill"


# ---------------------------------------------------------------------------- corpus


def test_corpus_has_both_slices_and_stable_ids(small_docs: list[Document]) -> None:
    again = demo_corpus(**SMALL)
    assert {doc.slice for doc in small_docs} == {"prose", "code"}
    assert [doc.id for doc in again] == [doc.id for doc in small_docs]
    assert corpus_fingerprint(again) == corpus_fingerprint(small_docs)
    ids = [doc.id for doc in small_docs]
    assert len(set(ids)) == len(ids)
    for doc in small_docs:
        assert doc.id.startswith(f"{doc.slice}/") and doc.text.strip()
        assert "\r\n" not in doc.text
    for name, budget in SMALL.items():
        size = sum(len(d.text.encode()) for d in small_docs if d.slice == name.split("_")[0])
        assert 0.8 * budget < size <= budget


def test_default_corpus_is_balanced_and_skips_tests() -> None:
    from pydoc_data.topics import topics

    docs = demo_corpus()
    prose = [doc for doc in docs if doc.slice == "prose"]
    code = [doc for doc in docs if doc.slice == "code"]
    assert len(prose) == len(topics)
    assert 400_000 < sum(len(doc.text.encode()) for doc in code) <= 500_000
    bad = ("/test/", "/tests/", "site-packages", "pydoc_data", "idlelib", "_sysconfigdata")
    assert not [doc.id for doc in code if any(part in f"{doc.id}/" for part in bad)]
    assert corpus_fingerprint(docs) != corpus_fingerprint(docs[:-1])


def test_corpus_budget_validation() -> None:
    with pytest.raises(ValueError, match="code_bytes=-1"):
        demo_corpus(code_bytes=-1)
    assert {doc.slice for doc in demo_corpus(prose_bytes=10_000, code_bytes=0)} == {"prose"}


# ---------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_and_exact_vocab(small_docs: list[Document], tmp_path: Path) -> None:
    tok = train_bpe_tokenizer([doc.text for doc in small_docs], 1024, tmp_path)
    assert len(tok) == 1024
    assert tok.eos_token == tok.pad_token == "<|endoftext|>" and tok.eos_token_id == 0
    for text in (PROSE, CODE):
        ids = tok(text)["input_ids"]
        assert tok.eos_token_id not in ids  # no special tokens are added
        assert tok.decode(ids) == text
    assert max(tok(small_docs[0].text)["input_ids"]) < 1024


def test_tokenizer_cache_hit(small_docs: list[Document], tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    texts = [doc.text for doc in small_docs]
    first = train_bpe_tokenizer(texts, 768, tmp_path)
    files = list(tmp_path.glob("tokenizer-*/tokenizer.json"))
    assert len(files) == 1
    mtime = files[0].stat().st_mtime_ns

    def no_training(*args, **kwargs):
        raise AssertionError("the cached tokenizer was trained again")

    with monkeypatch.context() as patched:
        patched.setattr(tok_module.trainers, "BpeTrainer", no_training)  # a cache hit never trains
        second = train_bpe_tokenizer(texts, 768, tmp_path)
    assert files[0].stat().st_mtime_ns == mtime  # loaded, not rewritten
    assert tokenizer_fingerprint(second) == tokenizer_fingerprint(first)
    assert second(CODE)["input_ids"] == first(CODE)["input_ids"]
    train_bpe_tokenizer(texts, 1024, tmp_path)  # another vocabulary is another file
    assert len(list(tmp_path.glob("tokenizer-*/tokenizer.json"))) == 2


def test_tokenizer_tops_up_a_small_corpus_and_saves(tmp_path: Path) -> None:
    tok = train_bpe_tokenizer(["hello world, hello tokenizer"], 400, None)
    assert len(tok) == 400
    assert tok.decode(tok(CODE)["input_ids"]) == CODE
    assert not list(tmp_path.glob("tokenizer-*"))  # cache_dir=None writes nothing
    tok.save_pretrained(tmp_path / "export")
    assert (tmp_path / "export" / "tokenizer.json").is_file()
    with pytest.raises(ValueError, match="vocab_size=100"):
        train_bpe_tokenizer(["x"], 100, None)


# ---------------------------------------------------------------------------- data module


def test_blocks_shape_slices_and_unique_ids(tmp_path: Path) -> None:
    dm = make_dm()
    dm.prepare_data()
    dm.setup("fit")
    assert dm.slices == ["prose", "code"]
    assert len(dm.tokenizer) == 512
    assert list(tmp_path.glob("data/tokenizer-*/tokenizer.json"))
    for split in ("train", "val", "test"):
        dataset = dm.dataset(split)
        counts = dm.slice_counts(split)
        assert set(counts) == {"prose", "code"}
        assert all(count.samples > 0 for count in counts.values()), (split, counts)
        assert sum(count.samples for count in counts.values()) == len(dataset)
        assert counts["prose"].tokens == counts["prose"].samples * 32
        sample = dataset[0]
        assert sample["input_ids"].shape == (32,) and sample["input_ids"].dtype == torch.long
        assert torch.equal(sample["labels"], sample["input_ids"])
        assert torch.equal(sample["attention_mask"], torch.ones(32, dtype=torch.long))
        assert {dataset[i]["slice"] for i in range(len(dataset))} == {"prose", "code"}
        ids = dataset.sample_ids.tolist()
        assert len(set(ids)) == len(ids)
        assert int(dataset.input_ids.max()) < 512


def test_splits_disjoint_and_independent_of_seed() -> None:
    a, b = make_dm(seed=0), make_dm(seed=123)
    a.setup()
    b.setup()
    docs = {doc.id for doc in a.documents}
    parts = [set(a.document_ids(split)) for split in ("train", "val", "test")]
    assert set.union(*parts) == docs and sum(map(len, parts)) == len(docs)
    for split in ("train", "val", "test"):
        assert a.document_ids(split) == b.document_ids(split)
        assert torch.equal(a.dataset(split).input_ids, b.dataset(split).input_ids)
    assert a.fingerprint == b.fingerprint
    assert make_dm(seq_len=64).fingerprint != a.fingerprint


def test_train_slices_restricts_train_only() -> None:
    full, prose = make_dm(), make_dm(train_slices=["prose"])
    assert prose.slice_counts("train")["code"].samples == 0
    assert prose.slice_counts("train")["prose"] == full.slice_counts("train")["prose"]
    for split in ("val", "test"):
        assert prose.slice_counts(split)["code"].samples > 0
        assert prose.slice_counts(split) == full.slice_counts(split)
    assert {prose.dataset("train")[i]["slice"] for i in range(8)} == {"prose"}
    # A sample id names the same block whatever train_slices says.
    full_train, prose_train = full.dataset("train"), prose.dataset("train")
    position = {int(sid): i for i, sid in enumerate(full_train.sample_ids)}
    for i in (0, len(prose_train) - 1):
        j = position[int(prose_train.sample_ids[i])]
        assert torch.equal(prose_train.input_ids[i], full_train.input_ids[j])
    assert prose.fingerprint != full.fingerprint
    assert prose.data_fingerprint == full.data_fingerprint
    assert make_dm(train_slices="prose").slice_counts("train")["code"].samples == 0


def test_train_dataloader_for_ignores_train_slices() -> None:
    dm = make_dm(train_slices=["prose"])
    teacher = dm.train_dataloader_for(slices=None, batch_size=8)
    assert teacher.batch_size == 8
    assert len(teacher.dataset) == sum(c.samples for c in make_dm().slice_counts("train").values())
    assert {s for batch in teacher for s in batch["slice"]} == {"prose", "code"}
    code = dm.train_dataloader_for(slices=["code"])
    assert {s for batch in code for s in batch["slice"]} == {"code"}
    with pytest.raises(ValueError, match=r"'poetry'.*\['prose', 'code'\]"):
        dm.train_dataloader_for(slices=["poetry"])


def test_bad_names_raise() -> None:
    with pytest.raises(ValueError, match=r"'poetry'.*\['prose', 'code'\]"):
        make_dm(train_slices=["poetry"]).prepare_data()
    with pytest.raises(ValueError, match=r"'wikipedia'.*demo"):
        SlicedTextDataModule(corpus="wikipedia")
    with pytest.raises(ValueError, match="'validation'"):
        make_dm().slice_counts("validation")
    with pytest.raises(ValueError, match="val_fraction"):
        make_dm(val_fraction=1.5)


def test_dataloader_batches() -> None:
    dm = make_dm(max_train_samples=40, eval_batch_size=7)
    dm.setup("fit")
    assert len(dm.dataset("train")) == 40
    assert set(dm.slice_counts("train")) == {"prose", "code"}
    assert all(count.samples > 0 for count in dm.slice_counts("train").values())
    train = list(dm.train_dataloader())
    assert len(train) == 10
    batch = train[0]
    assert set(batch) == {"input_ids", "attention_mask", "labels", "slice", "sample_id"}
    assert batch["input_ids"].shape == batch["labels"].shape == (4, 32)
    assert batch["input_ids"].dtype == batch["attention_mask"].dtype == torch.long
    assert isinstance(batch["slice"], list) and all(isinstance(s, str) for s in batch["slice"])
    assert batch["sample_id"].dtype == torch.long and batch["sample_id"].shape == (4,)
    seen = torch.cat([b["sample_id"] for b in train])
    assert len(seen.unique()) == 40
    # Same seed, same order; the shuffle does not change the ids.
    again = [b["sample_id"] for b in make_dm(max_train_samples=40).train_dataloader()]
    assert torch.equal(torch.cat(again), seen)
    val = list(dm.val_dataloader())
    assert val[0]["input_ids"].shape[0] == 7
    assert sum(len(b["slice"]) for b in val) == len(dm.dataset("val"))


def test_callable_corpus() -> None:
    docs = [Document(f"s{i % 2}/{i}", f"s{i % 2}", f"text number {i} " * 40) for i in range(40)]
    dm = SlicedTextDataModule(corpus=lambda: docs, vocab_size=300, seq_len=16, batch_size=2)
    assert dm.slices == ["s0", "s1"]
    assert dm.slice_counts("val")["s1"].samples > 0
    dup = [Document("a", "x", "one"), Document("a", "x", "two")]
    with pytest.raises(ValueError, match="'a' occurs twice"):
        SlicedTextDataModule(corpus=lambda: dup).prepare_data()


def test_train_loader_resumes_mid_epoch_and_at_epoch_end() -> None:
    dm = make_dm(max_train_samples=40)
    dm.setup("fit")

    def ids(batches) -> list[list[int]]:
        return [b["sample_id"].tolist() for b in batches]

    reference = dm.train_dataloader()
    epochs = [ids(reference), ids(reference), ids(reference)]
    assert epochs[0] != epochs[1]  # each epoch draws a new order
    for stop_epoch, stop_batch in ((0, 3), (1, 7), (0, 10)):  # (0, 10): saved after the epoch's last batch
        loader = dm.train_dataloader()
        for _ in range(stop_epoch):
            list(loader)
        iterator = iter(loader)
        for _ in range(stop_batch):
            next(iterator)
        state = loader.state_dict()
        assert state["batches"] == stop_batch
        resumed = dm.train_dataloader()  # a new process: a fresh loader, then the checkpoint's state
        resumed.load_state_dict(state)
        rest = ids(resumed)
        if stop_batch == len(loader):
            assert rest == epochs[stop_epoch + 1]
        else:
            assert rest == epochs[stop_epoch][stop_batch:]
            assert ids(resumed) == epochs[stop_epoch + 1]
