"""Cross-tokenizer distillation: alignment, shared vocabulary, ULD and the hybrid loss, the
two-tokenization data module, bits per byte in the reports, and a real fit.

Reference values are computed here from first principles (``log_softmax``, sorting, plain sums),
and the hybrid is held to :class:`LogitKD` where both must agree exactly (identical tokenizers).
"""

from __future__ import annotations

import json
import math
import os
import random
import subprocess
import sys
import sysconfig
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightning_distill import DistillationModule
from lightning_distill.alignment import align_labels
from lightning_distill.callbacks import CoverageSlices
from lightning_distill.crosstok import (
    SharedVocab,
    align_offsets,
    align_text,
    clean_ends,
    shared_vocab,
    token_bytes,
)
from lightning_distill.data import CrossTokenizerDataModule, demo_corpus, train_bpe_tokenizer
from lightning_distill.losses import CrossTokenizerKD, LogitKD, TaskLoss, ULDLoss
from lightning_distill.losses.cross_tokenizer import CrossTokenizerBatch, cross_tokenizer_kd, uld
from lightning_distill.models import causal_lm_from_config
from lightning_distill.reporting import SliceStats, coverage_rows, format_slice_table, retention
from lightning_distill.teacher import check_model_vocabs
from lightning_distill.types import LossInputs, TeacherTargets

SMALL = {"code_bytes": 12_000, "prose_bytes": 12_000}


@pytest.fixture(scope="module")
def corpus_texts() -> list[str]:
    return [doc.text for doc in demo_corpus(**SMALL)]


@pytest.fixture(scope="module")
def tokenizers(corpus_texts, tmp_path_factory):
    root = tmp_path_factory.mktemp("tok")
    return train_bpe_tokenizer(corpus_texts, 300, root), train_bpe_tokenizer(corpus_texts, 420, root)


def _sample_texts(corpus_texts: list[str]) -> list[str]:
    rng = random.Random(0)
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    sources = [corpus_texts[rng.randrange(len(corpus_texts))] for _ in range(6)]
    sources += [(stdlib / name).read_text(encoding="utf-8") for name in ("textwrap.py", "unicodedata.py")
                if (stdlib / name).is_file()]
    out = ["", "a", "  two  spaces\n\n\ttab", "naïve café — 日本語のテキスト 😀👍🏽 x", "\u00e9\u0301 Ω≈ç√ ∫˜µ≤"]
    for text in sources:
        start = rng.randrange(max(1, len(text) - 400))
        out.append(text[start:start + rng.randrange(50, 400)])
    return out


# ---------------------------------------------------------------------- alignment
def test_alignment_groups_reproduce_the_text_and_decode_alike(tokenizers, corpus_texts):
    student, teacher = tokenizers
    for text in _sample_texts(corpus_texts):
        s_ids, t_ids, al = align_text(text, student, teacher)
        spans = al.spans()
        assert "".join(text[a:b] for a, b in spans) == text
        assert al.student_groups == sorted(al.student_groups) and al.teacher_groups == sorted(al.teacher_groups)
        if not text:
            continue
        for g, (a, b) in enumerate(spans):
            s_group = [i for i, k in zip(s_ids, al.student_groups, strict=True) if k == g]
            t_group = [i for i, k in zip(t_ids, al.teacher_groups, strict=True) if k == g]
            assert s_group and t_group, (text, g)
            # The two tokenizations of a group stand for exactly the group's characters.
            assert student.decode(s_group) == teacher.decode(t_group) == text[a:b]


def test_a_character_split_over_two_tokens_is_no_boundary():
    # Byte-level tokens of one multi-byte character report the same span: (0, 1) twice.
    assert clean_ends([(0, 1), (0, 1), (1, 3)]) == {1, 3}
    al = align_offsets([(0, 1), (0, 1), (1, 3)], [(0, 2), (2, 3)], 3)
    assert al.ends == [3] and al.student_groups == [0, 0, 0] and al.teacher_groups == [0, 0]
    al = align_offsets([(0, 1), (1, 2), (2, 3)], [(0, 2), (2, 3)], 3)
    assert al.ends == [2, 3] and al.student_groups == [0, 0, 1] and al.teacher_groups == [0, 1]


def test_offsets_outside_the_text_are_refused():
    with pytest.raises(ValueError, match=r"student token offsets \(0, 9\) lie outside the text's 3"):
        align_offsets([(0, 9)], [(0, 3)], 3)


def test_shared_vocab_reads_byte_level_and_sentencepiece_spellings(tokenizers):
    assert token_bytes("Ġworld", byte_level=True) == b" world" == token_bytes("\u2581world", byte_level=False)
    assert token_bytes("<0x0A>", byte_level=False) == b"\n" == token_bytes("Ċ", byte_level=True)
    student, teacher = tokenizers
    vocab = shared_vocab(student, teacher)
    s_vocab = {i: t for t, i in student.get_vocab().items()}
    t_vocab = {i: t for t, i in teacher.get_vocab().items()}
    pairs = list(zip(vocab.student_ids.tolist(), vocab.teacher_ids.tolist(), strict=True))
    assert len(pairs) > 257 and all(s_vocab[s] == t_vocab[t] for s, t in pairs)  # same spelling here
    same = shared_vocab(student, student)
    assert torch.equal(same.student_ids, torch.arange(300)) and torch.equal(same.teacher_ids, torch.arange(300))


def test_an_ordinary_entry_is_shared_before_a_byte_fallback_one(tokenizers):
    """Llama-2-style SentencePiece: "<0x41>" (a low id) and "A" (a higher id, what the model emits) both
    spell b"A": the ordinary one is paired; "<0x0A>", the only newline spelling there, still pairs."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    entries = ["<unk>", "<0x0A>", "<0x41>", "<0x42>", "\u2581", "A", "\u2581the", "t", "h", "e"]
    backend = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(entries)}, merges=[], byte_fallback=True,
                                   unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    llama_like = PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>")
    byte_level = tokenizers[0]
    vocab = shared_vocab(llama_like, byte_level)
    pairs = dict(zip(vocab.student_ids.tolist(), vocab.teacher_ids.tolist(), strict=True))
    theirs = byte_level.get_vocab()
    assert pairs[entries.index("A")] == theirs["A"] and entries.index("<0x41>") not in pairs
    assert pairs[entries.index("<0x0A>")] == theirs["Ċ"]  # "\n": only the byte-fallback spells it here
    assert pairs[entries.index("<0x42>")] == theirs["B"]
    spelling = vocab.spellings[0]
    assert spelling.canon[entries.index("<0x41>")] == entries.index("A")  # one id per spelling of b"A"


# ---------------------------------------------------------------------- losses
def _identical_batch(tokenizer, texts: list[str], length: int):
    """A batch of ``texts`` in one tokenizer, as the cross-tokenizer data module lays it out."""
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    groups = torch.full((len(texts), length), -1)
    for row, text in enumerate(texts):
        s_ids, _, al = align_text(text, tokenizer, tokenizer)
        n = min(length, len(s_ids))
        ids[row, :n] = torch.tensor(s_ids[:n])
        groups[row, :n] = torch.tensor(al.student_groups[:n])
    labels = ids.masked_fill((groups < 0) | (groups == 0), -100)
    batch = {"input_ids": ids, "teacher_input_ids": ids, "student_groups": groups, "teacher_groups": groups,
             "labels": labels}
    return batch, align_labels(labels, batch, shift_labels=True)


@pytest.mark.parametrize(("divergence", "params"), [("forward_kl", {}), ("reverse_kl", {}), ("tvd", {}),
                                                    ("generalized_jsd", {"beta": 0.3}),
                                                    ("skew_forward_kl", {"alpha": 0.1})])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_hybrid_equals_the_plain_logit_loss_for_identical_tokenizers(tokenizers, divergence, params, temperature):
    tok = tokenizers[0]
    batch, labels = _identical_batch(tok, ["The quick brown fox, naïve.", "def f(x):\n    return x  # ok"], 14)
    g = torch.Generator().manual_seed(1)
    s = torch.randn(2, 14, 300, generator=g, requires_grad=True)
    t = torch.randn(2, 14, 300, generator=g) * 2
    inputs = LossInputs(student_logits=s, labels=labels, teacher=TeacherTargets(logits=t), batch=batch)
    term = CrossTokenizerKD(divergence, temperature=temperature, student_tokenizer=tok, teacher_tokenizer=tok,
                            **params)
    plain = LogitKD(divergence, temperature=temperature, **params)
    value, expected = term(inputs), plain(inputs)
    assert all(term._vocab.spellings)  # whole-group spellings are looked up (none besides the token itself)
    grad, = torch.autograd.grad(value, s)
    grad_expected, = torch.autograd.grad(expected, s)
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-4, atol=1e-6)


def _reference_uld(p: torch.Tensor, q: torch.Tensor) -> float:
    width = max(len(p), len(q))
    ps = sorted(p.tolist(), reverse=True) + [0.0] * (width - len(p))
    qs = sorted(q.tolist(), reverse=True) + [0.0] * (width - len(q))
    return sum(abs(a - b) for a, b in zip(ps, qs, strict=True))


def test_uld_is_zero_for_a_permutation_and_the_sorted_l1_otherwise(tokenizers):
    batch, labels = _identical_batch(tokenizers[0], ["abc def ghi", "x = 1"], 8)
    cross = CrossTokenizerBatch.from_batch(batch)
    g = torch.Generator().manual_seed(2)
    s = torch.randn(2, 8, 50, generator=g, dtype=torch.float64)
    # The teacher: the same distributions over a permuted, larger vocabulary (extra entries at 0).
    perm = torch.randperm(50, generator=g)
    t = torch.cat([s[..., perm], torch.full((2, 8, 30), float("-inf"), dtype=torch.float64)], -1)
    value, count = uld(s, t, cross, labels=labels)
    assert count.item() > 0 and abs(value.item()) < 1e-5
    other = torch.randn(2, 8, 70, generator=g, dtype=torch.float64)
    value, count = uld(s, other, cross, temperature=2.0, labels=labels)
    # Group heads of an identical tokenization: every position whose shifted label counts.
    rows = [(b, j) for b in range(2) for j in range(8) if labels[b, j] != -100]
    expected = sum(_reference_uld(F.softmax(s[b, j] / 2, -1), F.softmax(other[b, j] / 2, -1)) for b, j in rows)
    assert count.item() == len(rows) and value.item() == pytest.approx(expected, rel=1e-5)


def test_gradients_reach_the_student_only_and_every_token_of_a_merged_group(tokenizers):
    student, teacher = tokenizers
    text = "internationalization, naïvely: 日本"
    s_ids, t_ids, al = align_text(text, student, teacher)
    assert len(s_ids) > len(t_ids)  # the smaller vocabulary splits more: groups of several tokens
    batch = {"input_ids": torch.tensor([s_ids]), "teacher_input_ids": torch.tensor([t_ids]),
             "student_groups": torch.tensor([al.student_groups]), "teacher_groups": torch.tensor([al.teacher_groups])}
    s = torch.randn(1, len(s_ids), 300, requires_grad=True)
    t = torch.randn(1, len(t_ids), 420, requires_grad=True)
    labels = align_labels(torch.tensor([s_ids]), batch, shift_labels=True)
    term = CrossTokenizerKD(student_tokenizer=student, teacher_tokenizer=teacher)
    value = term(LossInputs(student_logits=s, labels=labels, teacher=TeacherTargets(logits=t), batch=batch))
    value.backward()
    assert torch.isfinite(value) and value.item() > 0
    assert t.grad is None  # the teacher is a constant
    groups = al.student_groups
    # A position that predicts a token inside a multi-token group gets gradient through the chain.
    inner = [j - 1 for j in range(1, len(groups)) if groups[j] == groups[j - 1] and groups[j] > 0]
    assert inner and all(s.grad[0, j].abs().sum() > 0 for j in inner)
    assert torch.isfinite(s.grad).all()


def test_hybrid_parts_on_different_tokenizers_are_finite_and_positive(tokenizers):
    student, teacher = tokenizers
    s_ids, t_ids, al = align_text("for line in open(path):\n    print(line)", student, teacher)
    cross = CrossTokenizerBatch(torch.tensor([s_ids]), torch.tensor([t_ids]), torch.tensor([al.student_groups]),
                                torch.tensor([al.teacher_groups]))
    div, rest, count = cross_tokenizer_kd(torch.randn(1, len(s_ids), 300), torch.randn(1, len(t_ids), 420), cross,
                                          shared_vocab(student, teacher))
    assert count.item() == al.num_groups - 1
    assert div.item() > 0 and rest.item() > 0  # the teacher's 120 extra entries meet ULD


def test_cross_terms_check_their_arguments():
    with pytest.raises(ValueError, match="logit_mse"):
        CrossTokenizerKD("logit_mse")
    with pytest.raises(ValueError, match="uld_weight"):
        CrossTokenizerKD(uld_weight=-1.0)
    with pytest.raises(TypeError, match="uld_weight"):
        CrossTokenizerKD(uld_weight="1")
    with pytest.raises(ValueError, match="temperature"):
        ULDLoss(temperature=0.0)
    assert CrossTokenizerKD().cross_tokenizer and ULDLoss().requires_teacher
    assert CrossTokenizerKD().fused_role is None and not LogitKD().cross_tokenizer
    with pytest.raises(RuntimeError, match="both tokenizers"):
        CrossTokenizerKD().shared_vocab(10, 12)
    assert SharedVocab.identity(4).size == 4


# ---------------------------------------------------------------------- data
def test_blocks_hold_the_same_text_in_both_tokenizations(tmp_path):
    dm = CrossTokenizerDataModule(vocab_size=300, teacher_vocab_size=420, seq_len=32, batch_size=4,
                                  cache_dir=str(tmp_path), **SMALL)
    dm.prepare_data()
    dm.setup()
    batch = next(iter(dm.val_dataloader()))
    assert batch["input_ids"].shape == (4, 32) and batch["teacher_input_ids"].shape == (4, 32)
    for i in range(4):
        s_mask, t_mask = batch["attention_mask"][i] == 1, batch["teacher_attention_mask"][i] == 1
        s_ids, t_ids = batch["input_ids"][i][s_mask], batch["teacher_input_ids"][i][t_mask]
        assert dm.tokenizer.decode(s_ids) == dm.teacher_tokenizer.decode(t_ids)
        s_groups, t_groups = batch["student_groups"][i][s_mask], batch["teacher_groups"][i][t_mask]
        assert s_groups.max() == t_groups.max() and (batch["student_groups"][i][~s_mask] == -1).all()
        # Both score the text after group 0; bytes count it (an end-of-text token is one byte).
        scored = s_ids[s_groups > 0]
        eos = int((scored == dm.tokenizer.eos_token_id).sum())
        text = dm.tokenizer.decode(scored[scored != dm.tokenizer.eos_token_id])
        assert batch["bytes"][i].item() == len(text.encode("utf-8")) + eos
        labels = batch["labels"][i]
        assert (labels[s_mask][s_groups == 0] == -100).all() and (labels[~s_mask] == -100).all()
        assert torch.equal(labels[s_mask][s_groups > 0], scored)
    assert dm.data_fingerprint != dm.teacher_datamodule.data_fingerprint
    assert len(dm.teacher_tokenizer) == 420 and len(dm.tokenizer) == 300


# ---------------------------------------------------------------------- reporting
def test_bits_per_byte_retention_and_table():
    stats = SliceStats(samples=2, tokens=100, student_nll=90.0, teacher_nll=60.0, bytes=300.0)
    assert stats.student_bits_per_byte == pytest.approx(90.0 / math.log(2) / 300)
    assert stats.retention == pytest.approx(2 ** (stats.teacher_bits_per_byte - stats.student_bits_per_byte))
    assert retention("bits_per_byte", tokens=100, student_nll=90.0, teacher_nll=60.0, bytes=300.0) == \
        pytest.approx(math.exp(-30.0 / 300))
    base = SliceStats(samples=2, tokens=100, student_nll=120.0, bytes=300.0)
    table = format_slice_table({"prose": stats}, {"prose": base})
    assert "teacher bpb" in table and "no-teacher bpb" in table and "ppl" not in table
    assert f"{2 ** (base.student_bits_per_byte - stats.student_bits_per_byte):.3f}" in table
    # Same tokenizer (no bytes): the perplexity path as before.
    plain = SliceStats(samples=2, tokens=100, student_nll=90.0, teacher_nll=60.0)
    assert plain.retention == pytest.approx(math.exp(-0.3)) and "teacher ppl" in format_slice_table({"a": plain})
    rows = coverage_rows({"a": {"samples": 2, "tokens": 100, "student_nll": 90.0, "teacher_nll": 60.0,
                                "bytes": 300.0}})
    assert rows[0]["student_metric"] == pytest.approx(stats.student_bits_per_byte)


def test_vocab_mismatch_message_points_to_the_cross_tokenizer_loss():
    student, teacher = _llama(300, 0), _llama(420, 1)
    with pytest.raises(ValueError, match=r"loss=cross_tokenizer.*CrossTokenizerDataModule\(teacher_tokenizer=") as info:
        check_model_vocabs(student, teacher, "error")
    assert "(300)" in str(info.value) and "(420)" in str(info.value)


def test_a_same_vocabulary_term_on_a_cross_batch_is_refused(tokenizers):
    batch, _ = _identical_batch(tokenizers[0], ["abc def"], 6)
    module = DistillationModule(_llama(300, 0), _llama(300, 1), {"kd": LogitKD()})
    with pytest.raises(ValueError, match=r"\['kd'\].*loss=cross_tokenizer"):
        module.training_step(batch, 0)
    plain = {k: batch[k] for k in ("input_ids", "labels")}
    module = DistillationModule(_llama(300, 0), _llama(300, 1), {"kd": CrossTokenizerKD()})
    with pytest.raises(ValueError, match="CrossTokenizerDataModule"):
        module.training_step(plain, 0)


# ---------------------------------------------------------------------- a real fit
def _llama(vocab: int, seed: int):
    return causal_lm_from_config("llama", vocab_size=vocab, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=32, seed=seed)


def test_fit_with_two_tokenizers_reports_bits_per_byte(tmp_path):
    torch.manual_seed(0)
    dm = CrossTokenizerDataModule(vocab_size=300, teacher_vocab_size=420, seq_len=32, batch_size=4, eval_batch_size=16,
                                  max_train_samples=16, cache_dir=str(tmp_path / "tok"), **SMALL)
    student, teacher = _llama(300, 0), _llama(420, 1)
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    module = DistillationModule(student, teacher, {"kd": CrossTokenizerKD(weight=0.5), "task": TaskLoss(weight=0.5)})
    coverage = CoverageSlices(dirpath=str(tmp_path / "cov"))
    trainer = L.Trainer(max_steps=3, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False, callbacks=[coverage], limit_val_batches=1, limit_test_batches=2,
                        num_sanity_val_steps=0)
    trainer.fit(module, datamodule=dm)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    trainer.test(module, datamodule=dm, verbose=False)
    report = (tmp_path / "cov" / "coverage.md").read_text()
    assert "bits per byte" in report and "teacher bpb" in report
    sums = coverage.last_sums
    for name, row in zip(coverage.slices, coverage.last_rows, strict=True):
        s = sums[name]
        assert s["bytes"] > s["tokens"] > 0  # a BPE token holds more than one byte on average
        assert row["student_metric"] == pytest.approx(s["student_nll"] / math.log(2) / s["bytes"])
        assert row["teacher_metric"] == pytest.approx(s["teacher_nll"] / math.log(2) / s["bytes"])
        assert row["agreement"] is None


@pytest.mark.slow
def test_cli_demo_cross_tokenizer_reports_bits_per_byte_and_the_baseline(tmp_path):
    out_dir = tmp_path / "run"
    tiny = ["data.vocab_size=300", "data.teacher_vocab_size=400", "data.seq_len=32", "data.batch_size=4",
            "data.max_train_samples=32", "data.code_bytes=12000", "data.prose_bytes=12000", "teacher.steps=3",
            "teacher.progress=false", "teacher.model.hidden_size=32", "teacher.model.intermediate_size=64",
            "student.hidden_size=16", "student.intermediate_size=32", "trainer=smoke", "trainer.max_steps=4", "logger=none",
            "lr_scheduler.num_warmup_steps=1"]
    env = {**os.environ, "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache"), "TOKENIZERS_PARALLELISM": "false",
           "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, "-m", "lightning_distill", "experiment=demo_cross_tokenizer", *tiny,
                             f"output_dir={out_dir}"], cwd=tmp_path, env=env, capture_output=True, text=True,
                            timeout=1200)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-5000:]
    assert "student bpb" in result.stdout and "no-teacher bpb" in result.stdout
    report = json.loads((out_dir / "report.json").read_text())
    for name in ("prose", "code"):
        stats, base = report["slices"][name], report["baseline"][name]
        assert stats["bytes"] == base["bytes"] > 0
        assert 0 < stats["student_bits_per_byte"] and 0 < stats["teacher_bits_per_byte"]
    assert "bits per byte" in (out_dir / "coverage.md").read_text()
    assert report["coverage"]["metric"] == "bits_per_byte"
    assert report["coverage"]["slices"][0]["teacher_metric"] == pytest.approx(
        report["slices"][report["coverage"]["slices"][0]["slice"]]["teacher_bits_per_byte"])


def test_a_sparse_teacher_cache_refuses_cross_tokenizer_terms_before_building(tmp_path):
    from lightning_distill.cache import CacheBuilder

    # Dense caches store cross-tokenizer targets (tests/test_cross_tokenizer_cache.py); the default
    # kind (sampled) cannot, and says so before anything is written.
    module = DistillationModule(_llama(300, 0), _llama(420, 1), {"kd": CrossTokenizerKD()})
    with pytest.raises(ValueError, match=r"kind='sampled'.*\['kd'\].*callbacks=teacher_cache_dense"):
        CacheBuilder(str(tmp_path / "cache")).build(module, {})
    assert not (tmp_path / "cache").exists()


def test_the_data_module_takes_both_models_own_tokenizers(tokenizers, tmp_path):
    student, teacher = tokenizers
    dm = CrossTokenizerDataModule(vocab_size=999, teacher_vocab_size=999, seq_len=24, batch_size=2,
                                  student_tokenizer=student, teacher_tokenizer=teacher, cache_dir=str(tmp_path), **SMALL)
    assert dm.tokenizer is student and dm.teacher_tokenizer is teacher
    batch = next(iter(dm.test_dataloader()))
    assert int(batch["input_ids"].max()) < 300 and int(batch["teacher_input_ids"].max()) < 420
    with pytest.raises(ValueError, match="only for the corpus BPE teacher"):
        _ = dm.teacher_datamodule
    with pytest.raises(TypeError, match="student_tokenizer must be a Hugging Face tokenizer"):
        CrossTokenizerDataModule(student_tokenizer=3)


@pytest.mark.slow
def test_example_runs_and_prints_bits_per_byte(tmp_path):
    example = Path(__file__).resolve().parent.parent / "examples" / "cross_tokenizer.py"
    env = {**os.environ, "LIGHTNING_DISTILL_CACHE": str(tmp_path / "cache"), "PYTHONWARNINGS": "ignore"}
    result = subprocess.run([sys.executable, str(example), "--small", "--steps", "10", "--teacher-steps", "10"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "teacher bpb" in result.stdout and "no-teacher bpb" in result.stdout
    assert result.stdout.count(" bpb, teacher ") == 2  # one line per slice
