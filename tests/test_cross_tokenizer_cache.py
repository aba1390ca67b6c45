"""A teacher cache of cross-tokenizer targets: the teacher's dense logits over its own tokens.

Held to the live teacher: the cached logits are the live ones rounded to 16 bits (exactly), so
the cross-tokenizer losses and the bits-per-byte sums on cached targets equal those on the live
teacher's logits rounded the same way (exactly) and the live teacher's (within fp16 rounding).
A second run with new objects builds nothing and trains without the teacher; changed teacher
tokens and another teacher tokenizer are refused; top-k/sampled kinds are refused before building.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import lightning as L
import pytest
import torch

from lightning_distill import DistillationModule
from lightning_distill.cache import CacheBuilder, CacheMismatchError
from lightning_distill.callbacks import CoverageSlices, TeacherCache
from lightning_distill.data import CrossTokenizerDataModule
from lightning_distill.losses import CrossTokenizerKD, TaskLoss, ULDLoss
from lightning_distill.models import causal_lm_from_config, freeze
from lightning_distill.types import TeacherTargets

SMALL = {"code_bytes": 12_000, "prose_bytes": 12_000}
VS, VT, SEQ = 300, 420, 32


def _llama(vocab: int, seed: int):
    return causal_lm_from_config("llama", vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=48, seed=seed)


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    return str(tmp_path_factory.mktemp("tok"))


def _data(tok_dir: str, **kwargs) -> CrossTokenizerDataModule:
    settings = {"vocab_size": VS, "teacher_vocab_size": VT, "seq_len": SEQ, "batch_size": 4, "eval_batch_size": 8,
                "max_train_samples": 12, "cache_dir": tok_dir, **SMALL, **kwargs}
    dm = CrossTokenizerDataModule(**settings)
    dm.prepare_data()
    dm.setup()
    return dm


@pytest.fixture(scope="module")
def dm(tok_dir):
    return _data(tok_dir)


def _terms() -> dict:
    return {"kd": CrossTokenizerKD(weight=0.5), "uld": ULDLoss(weight=0.3), "task": TaskLoss(weight=0.2)}


def _module(teacher=True, seed: int = 0) -> DistillationModule:
    return DistillationModule(_llama(VS, seed), freeze(_llama(VT, 1)) if teacher else None, _terms())


def _attach_tokenizers(module: DistillationModule, dm) -> None:
    for term in module.losses.values():
        if hasattr(term, "attach_tokenizers"):
            term.attach_tokenizers(dm.tokenizer, dm.teacher_tokenizer)


def _sums(module: DistillationModule, batch: dict) -> dict[str, float]:
    out = module._shared_step(dict(batch), "val")
    return {name: float(value.detach()) for name, value in out["sums"].items()}


@pytest.fixture(scope="module")
def built(dm, tmp_path_factory):
    """A dense cache of the val split, built by a module with the live teacher."""
    folder = tmp_path_factory.mktemp("xcache") / "cache"
    module = _module()
    _attach_tokenizers(module, dm)
    cache = TeacherCache(str(folder), kind="dense", splits=["val"], progress=False)
    info = cache.prepare(module, dm)
    return folder, cache, module, info


def test_dense_cache_holds_the_teachers_logits_over_its_own_tokens(dm, built):
    folder, cache, module, info = built
    assert info["val"]["built"] == info["val"]["samples"] > 0
    assert json.loads((folder / "val" / "layout.json").read_text()) == {"layout": "teacher_tokens"}
    fingerprint = json.loads((folder / "cache.json").read_text())["fingerprint"]
    assert fingerprint["params"]["space"] == "teacher"
    from lightning_distill.data.tokenizer import tokenizer_fingerprint

    assert fingerprint["params"]["teacher_tokenizer"] == tokenizer_fingerprint(dm.teacher_tokenizer)
    assert cache.config()["space"] == "teacher"
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        live = module.teacher(input_ids=batch["teacher_input_ids"],
                              attention_mask=batch["teacher_attention_mask"]).logits
    cache.attach("val", module, batch)
    cached = batch["teacher_targets"].logits
    assert cached.dtype == torch.float32 and cached.shape == live.shape == (8, SEQ, VT)
    lengths = batch["teacher_attention_mask"].sum(-1)
    assert info["val"]["positions"] > 0 and int(lengths.min()) < SEQ  # some padding to check
    for b, n in enumerate(lengths.tolist()):
        assert torch.equal(cached[b, :n], live[b, :n].half().float())  # 16-bit rounding, nothing else
        assert not cached[b, n:].any()  # past the teacher's tokens: zeros (no group head reads them)


def test_losses_and_bits_per_byte_on_cached_targets_equal_the_live_teachers(dm, built):
    _, cache, module, _ = built
    loader = dm.val_dataloader()
    for batch in list(loader)[:2]:
        live = _sums(module, batch)
        with torch.no_grad():
            rounded = module.teacher(input_ids=batch["teacher_input_ids"],
                                     attention_mask=batch["teacher_attention_mask"]).logits.half().float()
        exact = _sums(module, {**batch, "teacher_targets": TeacherTargets(logits=rounded)})
        cached_batch = dict(batch)
        cache.attach("val", module, cached_batch)
        cached = _sums(module, cached_batch)
        assert cached == exact  # the same float32 values in, the same sums out
        assert cached == pytest.approx(live, rel=2e-3)  # the live teacher, within fp16 rounding
        assert cached["kd"] > 0 and cached["uld"] > 0
        live_eval, cached_eval = module.evaluate_batch(dict(batch)), module.evaluate_batch(cached_batch)
        assert torch.equal(cached_eval["bytes"], live_eval["bytes"])
        assert torch.equal(cached_eval["student_nll"], live_eval["student_nll"])
        torch.testing.assert_close(cached_eval["teacher_nll"], live_eval["teacher_nll"], rtol=1e-3, atol=1e-3)


def test_a_fit_builds_then_a_new_run_reads_the_cache_without_the_teacher(dm, tok_dir, tmp_path):
    folder = str(tmp_path / "cache")

    def fit(module, cache, coverage=None):
        trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                            enable_model_summary=False, callbacks=[cache, *([coverage] if coverage else [])],
                            limit_val_batches=1, limit_test_batches=2, num_sanity_val_steps=0)
        trainer.fit(module, datamodule=dm)
        return trainer

    first = _module()
    cache = TeacherCache(folder, kind="dense", progress=False)
    fit(first, cache)
    assert first.teacher is None  # every split cached: released
    assert all(cache.built[s] == cache.readers[s].describe()["samples"] > 0 for s in ("train", "val", "test"))

    # A second run: new objects, the same folder, no teacher at all.
    second = _module(teacher=False)
    before = {k: v.clone() for k, v in second.student.state_dict().items()}
    again = TeacherCache(folder, kind="dense", progress=False)
    coverage = CoverageSlices(dirpath=str(tmp_path / "cov"))
    with pytest.warns(UserWarning, match="no teacher is attached"):
        trainer = fit(second, again, coverage)
    assert again.built == {"train": 0, "val": 0, "test": 0} and again.space == "teacher"
    assert any(not torch.equal(before[k], v) for k, v in second.student.state_dict().items())  # it trained
    trainer.test(second, datamodule=dm, verbose=False)
    assert "bits per byte" in (tmp_path / "cov" / "coverage.md").read_text()

    # The teacher's bits per byte from the cache are the live teacher's (fp16 rounding aside).
    live = CoverageSlices(dirpath=str(tmp_path / "cov_live"))
    live_module = DistillationModule(second.student, freeze(_llama(VT, 1)), _terms())
    L.Trainer(logger=False, enable_progress_bar=False, enable_model_summary=False, callbacks=[live],
              limit_test_batches=2).test(live_module, datamodule=dm, verbose=False)
    for name in coverage.slices:
        got, want = coverage.last_sums[name], live.last_sums[name]
        assert got["bytes"] == want["bytes"] > 0 and got["tokens"] == want["tokens"]
        assert got["student_nll"] == pytest.approx(want["student_nll"], rel=1e-5)
        assert got["teacher_nll"] == pytest.approx(want["teacher_nll"], rel=1e-3)


def test_changed_teacher_tokens_and_another_teacher_tokenizer_are_refused(dm, built, tok_dir, tmp_path):
    folder, _, _, _ = built
    # The same sample ids holding other teacher tokens: caught on read by the teacher-token hash.
    batch = next(iter(dm.val_dataloader()))
    batch["teacher_input_ids"][1, 3] = (batch["teacher_input_ids"][1, 3] + 1) % VT
    reader = TeacherCache(str(folder), kind="dense", splits=["val"], progress=False)
    module = _module()
    reader.prepare(module, dm)
    with pytest.raises(CacheMismatchError, match=r"sample ids \[\d+\] \(val\) now hold other tokens"):
        reader.attach("val", module, batch)

    # Another teacher tokenizer (a BPE of 400 ids): refused by the fingerprint, naming it.
    other = _data(tok_dir, teacher_vocab_size=400)
    for teacher in (True, False):  # with the teacher (full fingerprint) and without (what the run knows)
        cache = TeacherCache(str(folder), kind="dense", splits=["val"], progress=False)
        with pytest.raises(CacheMismatchError, match=r"params: cache has \{\"teacher_tokenizer\": \"[0-9a-f]+\"\}"):
            cache.prepare(_module(teacher), other)

    # Another teacher_seq_len is other data (the blocks differ): refused by the data fingerprint.
    longer = _data(tok_dir, teacher_seq_len=40)
    with pytest.raises(CacheMismatchError, match=r"- data: cache has"):
        TeacherCache(str(folder), kind="dense", splits=["val"], progress=False).prepare(_module(), longer)

    # A cache in the student's tokens is never taken for one in the teacher's (and the reverse).
    builder = CacheBuilder(str(folder), kind="dense", splits=["val"], progress=False)
    module = DistillationModule(_llama(VS, 0), freeze(_llama(VT, 1)), {"task": TaskLoss()})
    builder.space = "student"
    fingerprint = builder._fingerprint(module, dm.tokenizer, dm.data_fingerprint, {})
    builder.space, builder._teacher_tokenizer = "teacher", "abc"
    assert fingerprint["params"] != builder._fingerprint(module, dm.tokenizer, dm.data_fingerprint, {})["params"]


@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_topk_and_sampled_are_refused_for_cross_tokenizer_runs_before_building(dm, tmp_path, kind):
    cache = TeacherCache(str(tmp_path / "cache"), kind=kind, progress=False)
    with pytest.raises(ValueError, match=rf"^TeacherCache\(kind='{kind}'\) keeps a few .* the loss terms "
                                         r"\['kd', 'uld'\] .*callbacks=teacher_cache_dense\)\. Nothing was built\.$"):
        cache.prepare(_module(), dm)
    assert not (tmp_path / "cache").exists()
    # Only the data in two tokenizations (no cross-tokenizer term): the same, named by the batches.
    module = DistillationModule(_llama(VS, 0), freeze(_llama(VT, 1)), {"task": TaskLoss()})
    with pytest.raises(ValueError, match=r"the batches \(teacher_input_ids\)"):
        TeacherCache(str(tmp_path / "cache"), kind=kind, progress=False).prepare(module, dm)


def test_hidden_states_are_stored_over_the_teachers_tokens(dm, tmp_path):
    module = _module()
    cache = TeacherCache(str(tmp_path / "cache"), kind="dense", hidden_layers=[-1], splits=["val"], progress=False)
    cache.prepare(module, dm)
    batch = next(iter(dm.val_dataloader()))
    with torch.no_grad():
        live = module.teacher(input_ids=batch["teacher_input_ids"], attention_mask=batch["teacher_attention_mask"],
                              output_hidden_states=True).hidden_states[-1]
    cache.attach("val", module, batch)
    (hidden,) = batch["teacher_targets"].hidden_states
    n = int(batch["teacher_attention_mask"][0].sum())
    assert hidden.shape == live.shape and torch.equal(hidden[0, :n], live[0, :n].half().float())


@pytest.mark.slow
def test_cli_demo_cross_tokenizer_with_a_dense_cache_builds_once_then_reuses(tmp_path):
    tiny = ["data.vocab_size=300", "data.teacher_vocab_size=400", "data.seq_len=32", "data.batch_size=4",
            "data.max_train_samples=16", "data.code_bytes=12000", "data.prose_bytes=12000", "teacher.steps=3",
            "teacher.progress=false", "teacher.model.hidden_size=32", "teacher.model.intermediate_size=64",
            "student.hidden_size=16", "student.intermediate_size=32", "trainer=smoke", "trainer.max_steps=3",
            "logger=none", "lr_scheduler.num_warmup_steps=1", "baseline=false", "callbacks=teacher_cache_dense",
            "callbacks.teacher_cache.progress=false"]
    env = {**os.environ, "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    built = []
    for run in ("run1", "run2"):
        result = subprocess.run([sys.executable, "-m", "lightning_distill", "experiment=demo_cross_tokenizer", *tiny,
                                 f"output_dir={tmp_path / run}"], cwd=tmp_path, env=env, capture_output=True,
                                text=True, timeout=600)
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
        assert "student bpb" in result.stdout
        record = json.loads((tmp_path / run / "student" / "distillation.json").read_text())["teacher_cache"]
        assert record["kind"] == "dense" and record["space"] == "teacher"
        assert record["splits"]["train"]["bytes_per_token"] > 0
        built.append({name: split["built_now"] for name, split in record["splits"].items()})
        report = json.loads((tmp_path / run / "report.json").read_text())
        assert report["coverage"]["metric"] == "bits_per_byte"
        assert all(s["teacher_bits_per_byte"] > 0 for s in report["slices"].values())
    assert all(n > 0 for n in built[0].values()) and built[1] == {"train": 0, "val": 0, "test": 0}
    assert len(os.listdir(tmp_path / "cache" / "teacher_targets")) == 1  # one cache, found again
