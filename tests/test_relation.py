"""Relation-based and embedding distillation: RKD, similarity-preserving, EmbeddingKD, pooling, the
similarity agreement and ``CoverageSlices(metric="similarity")``.

Expected values are derived here by hand or with plain Python (lists, ``math``), never with the
library's own functions.
"""

from __future__ import annotations

import copy
import json
import math

import lightning as L
import pytest
import torch
from torch.utils.data import DataLoader

from lightning_distill import DistillationModule
from lightning_distill.callbacks import CoverageGapError, CoverageSlices
from lightning_distill.checkpoint import rebuild_terms
from lightning_distill.losses import (
    EmbeddingKD,
    LogitKD,
    RKDAngle,
    RKDDistance,
    SimilarityPreserving,
)
from lightning_distill.losses.relation import (
    rkd_angle,
    rkd_distance,
    similarity_preserving,
)
from lightning_distill.models import Pooling, encoder_from_config
from lightning_distill.reporting import coverage_rows, format_coverage_table
from lightning_distill.similarity import rank_with_ties, similarity_agreement, spearman
from lightning_distill.types import LossInputs, TeacherTargets

VOCAB, SEQ = 50, 10


def _encoder(width: int, seed: int):
    return encoder_from_config("bert", vocab_size=VOCAB, hidden_size=width, intermediate_size=2 * width,
                               num_hidden_layers=1, num_attention_heads=2, max_position_embeddings=SEQ, seed=seed)


def _rotation(d_in: int, d_out: int, seed: int = 0) -> torch.Tensor:
    """A (d_in, d_out) matrix with orthonormal rows (d_out >= d_in): preserves lengths and angles."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d_out, d_in, generator=g, dtype=torch.float64))
    return q.T


def _teacher_embeddings(n: int = 12, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


# ---------------------------------------------------------------------- the relation functions
def test_rkd_distance_is_zero_for_a_scaled_rotated_translated_copy_and_positive_otherwise():
    t = _teacher_embeddings()
    s = 3.5 * t @ _rotation(6, 9) + 2.0  # another width, scale, rotation, translation
    assert float(rkd_distance(s, t)) == pytest.approx(0.0, abs=1e-6)
    noisy = s + 0.5 * _teacher_embeddings(seed=1) @ _rotation(6, 9, seed=1)
    assert float(rkd_distance(noisy, t)) > 1e-3


def test_rkd_distance_by_hand():
    # Teacher points 0, 1, 3: pair distances (1, 3, 2), mean 2 -> (.5, 1.5, 1). Student 0, 2, 3:
    # (2, 3, 1), mean 2 -> (1, 1.5, .5). Differences (.5, 0, .5), all < 1: smooth-L1 = d²/2 -> mean 1/12.
    t = torch.tensor([[0.0], [1.0], [3.0]])
    s = torch.tensor([[0.0], [2.0], [3.0]])
    assert float(rkd_distance(s, t)) == pytest.approx(1 / 12, rel=1e-6)


def test_rkd_angle_is_zero_for_a_scaled_translated_copy_and_matches_a_hand_computation():
    t = _teacher_embeddings(n=7)
    assert float(rkd_angle(-0.2 * t + 5.0, t)) == pytest.approx(0.0, abs=1e-6)
    assert float(rkd_angle(t @ _rotation(6, 8), t)) == pytest.approx(0.0, abs=1e-6)
    assert float(rkd_angle(t + _teacher_embeddings(n=7, seed=1), t)) > 1e-3
    # A right isosceles triangle (angles 90, 45, 45) against an equilateral one (60, 60, 60): cosines
    # (0, .7071, .7071) vs .5 each, each vertex seen from two orders of its neighbours.
    right = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    equi = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.5, math.sqrt(3) / 2]])
    diffs = [0.5, 0.5 - math.sqrt(0.5), 0.5 - math.sqrt(0.5)]
    expected = sum(0.5 * d * d for d in diffs) / 3
    assert float(rkd_angle(equi, right)) == pytest.approx(expected, rel=1e-5)


def test_similarity_preserving_is_zero_for_a_scaled_copy_and_matches_a_hand_computation():
    t = _teacher_embeddings()
    assert float(similarity_preserving(4.0 * t, t)) == pytest.approx(0.0, abs=1e-7)
    assert float(similarity_preserving(t @ _rotation(6, 10), t)) == pytest.approx(0.0, abs=1e-6)
    # Teacher rows e1, e2: G = I. Student rows (1, 0), (1, 1): G = [[1, 1], [1, 2]], rows normalised
    # (1, 1)/sqrt2 and (1, 2)/sqrt5. Squared Frobenius distance to I over b² = 4.
    t2 = torch.eye(2)
    s2 = torch.tensor([[1.0, 0.0], [1.0, 1.0]])
    a, b, c = 1 / math.sqrt(2), 1 / math.sqrt(5), 2 / math.sqrt(5)
    expected = ((a - 1) ** 2 + a**2 + b**2 + (c - 1) ** 2) / 4
    assert float(similarity_preserving(s2, t2)) == pytest.approx(expected, rel=1e-6)


def test_relation_functions_refuse_embeddings_of_different_samples():
    with pytest.raises(ValueError, match="same samples"):
        rkd_distance(torch.zeros(4, 3), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="Pooling"):
        similarity_preserving(torch.zeros(4, 3, 2), torch.zeros(4, 3))


# ---------------------------------------------------------------------- the terms
def _inputs(s: torch.Tensor, t: torch.Tensor) -> LossInputs:
    return LossInputs(student_logits=s, labels=None, teacher=TeacherTargets(embeddings=t), student_embeddings=s)


@pytest.mark.parametrize("term", [RKDDistance(), RKDAngle(), SimilarityPreserving()])
def test_relation_terms_return_the_batch_mean_times_the_batch_size(term):
    t = _teacher_embeddings(n=9).float()
    s = torch.randn(9, 4)
    fn = {RKDDistance: rkd_distance, RKDAngle: rkd_angle, SimilarityPreserving: similarity_preserving}[type(term)]
    assert float(term(_inputs(s, t))) == pytest.approx(9 * float(fn(s, t)), rel=1e-6)
    assert term.requires_teacher and term.reads_embeddings and not term.reads_labels


def test_embedding_kd_values_and_projector_checks():
    t = torch.randn(5, 4)
    assert float(EmbeddingKD("mse")(_inputs(t.clone(), t))) == pytest.approx(0.0, abs=1e-7)
    assert float(EmbeddingKD("cosine")(_inputs(3 * t, t))) == pytest.approx(0.0, abs=1e-5)
    s = torch.randn(5, 4)
    expected = sum(sum((s[i, j] - t[i, j]).item() ** 2 for j in range(4)) / 4 for i in range(5))
    assert float(EmbeddingKD("mse")(_inputs(s, t))) == pytest.approx(expected, rel=1e-5)
    with pytest.raises(ValueError, match="student_dim=3, teacher_dim=4"):
        EmbeddingKD()(_inputs(torch.randn(5, 3), t))
    with pytest.raises(ValueError, match="give both"):  # the missing width is read from a model, if it can be
        EmbeddingKD(student_dim=3).bind(torch.nn.Linear(2, 3), torch.nn.Linear(2, 4))
    with pytest.raises(ValueError, match="projector"):
        EmbeddingKD(student_dim=3, teacher_dim=4, projector_export="keep")
    with pytest.raises(TypeError, match="student_dim"):
        EmbeddingKD(student_dim=3.0, teacher_dim=4)
    with pytest.raises(ValueError, match="loss"):
        EmbeddingKD("l1")
    with pytest.raises(ValueError, match="delta"):
        RKDDistance(delta=0.0)


def test_embedding_terms_do_not_mix_with_logit_terms():
    with pytest.raises(ValueError, match="embeddings"):
        DistillationModule(_encoder(16, 0), _encoder(16, 1), {"emb": EmbeddingKD(), "kd": LogitKD()})


def test_a_teacher_cache_is_refused_for_embedding_terms():
    module = _module(_encoder(16, 0), _encoder(16, 1), {"rkd": RKDDistance()})
    with pytest.raises(ValueError, match=r"\['rkd'\] read embeddings.*live teacher"):
        module.use_cached_targets()  # what TeacherCache calls at setup


def test_embedding_kd_config_rebuilds_from_a_checkpoint_record():
    term = EmbeddingKD("cosine", weight=0.5, student_dim=8, teacher_dim=16, projector_export="save")
    rebuilt = rebuild_terms({"emb": term.config(), "rkd": RKDDistance(delta=0.5).config()})
    assert rebuilt is not None and rebuilt["emb"].config() == term.config()
    assert rebuilt["emb"].projector_layer.weight.shape == (16, 8)


# ---------------------------------------------------------------------- pooling
def test_pooling_modes_by_hand():
    hidden = torch.arange(2 * 3 * 2, dtype=torch.float32).reshape(2, 3, 2)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    out = type("Out", (), {"last_hidden_state": hidden})()
    assert torch.equal(Pooling("mean")(out, {"attention_mask": mask}), torch.tensor([[1.0, 2.0], [6.0, 7.0]]))
    assert torch.equal(Pooling("cls")(out, {"attention_mask": mask}), hidden[:, 0])
    assert torch.equal(Pooling("max")(out, {"attention_mask": mask}), torch.tensor([[2.0, 3.0], [6.0, 7.0]]))
    assert torch.equal(Pooling("last")(out, {"attention_mask": mask}), torch.tensor([[2.0, 3.0], [6.0, 7.0]]))
    assert torch.equal(Pooling("mean")(hidden), hidden.mean(1))  # no mask: every position
    ready = torch.randn(2, 5)
    assert torch.equal(Pooling()({"sentence_embedding": ready}), ready)
    normed = Pooling(normalize=True)(ready)
    assert torch.allclose(normed.norm(dim=-1), torch.ones(2))
    with pytest.raises(ValueError, match="mode"):
        Pooling("sum")
    with pytest.raises(TypeError, match="token states"):
        Pooling()({"logits": torch.zeros(2)})


# ---------------------------------------------------------------------- the agreement
def _spearman_by_hand(a: list[float], b: list[float]) -> float:
    def ranks(x):
        order = sorted(range(len(x)), key=lambda i: x[i])
        r = [0.0] * len(x)
        i = 0
        while i < len(order):
            j = i
            while j + 1 < len(order) and x[order[j + 1]] == x[order[i]]:
                j += 1
            for k in range(i, j + 1):
                r[order[k]] = (i + j) / 2
            i = j + 1
        return r

    ra, rb = ranks(a), ranks(b)
    ma, mb = sum(ra) / len(ra), sum(rb) / len(rb)
    cov = sum((x - ma) * (y - mb) for x, y in zip(ra, rb, strict=True))
    return cov / math.sqrt(sum((x - ma) ** 2 for x in ra) * sum((y - mb) ** 2 for y in rb))


def test_ranks_with_ties_and_spearman_against_a_plain_python_computation():
    assert rank_with_ties(torch.tensor([3.0, 1.0, 3.0, 2.0])).tolist() == [2.5, 0.0, 2.5, 1.0]
    g = torch.Generator().manual_seed(0)
    a = torch.randint(0, 5, (40,), generator=g).double()  # many ties
    b = (a + torch.randint(0, 3, (40,), generator=g)).double()
    assert spearman(a, b) == pytest.approx(_spearman_by_hand(a.tolist(), b.tolist()), rel=1e-12)
    assert spearman(a, torch.ones(40)) is None


def test_similarity_agreement_is_one_for_the_same_geometry_and_matches_pairwise_cosines():
    t = _teacher_embeddings(n=10)
    assert similarity_agreement(2.0 * t @ _rotation(6, 11), t) == pytest.approx(1.0, abs=1e-12)
    s = torch.randn(10, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)

    def cosines(x):
        rows = x.tolist()
        out = []
        for i in range(len(rows)):
            for j in range(i + 1, len(rows)):
                dot = sum(p * q for p, q in zip(rows[i], rows[j], strict=True))
                out.append(dot / math.sqrt(sum(p * p for p in rows[i]) * sum(q * q for q in rows[j])))
        return out

    assert similarity_agreement(s, t) == pytest.approx(_spearman_by_hand(cosines(s), cosines(t)), rel=1e-9)
    assert similarity_agreement(s[:2], t[:2]) is None


# ---------------------------------------------------------------------- the module
def _batches(n: int = 32, batch_size: int = 8, seed: int = 0, high: int = VOCAB):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, high, (n, SEQ), generator=g)
    lengths = torch.randint(4, SEQ + 1, (n,), generator=g)
    mask = (torch.arange(SEQ) < lengths[:, None]).long()
    rows = [{"input_ids": ids[i] * mask[i], "attention_mask": mask[i], "slice": "ab"[i % 2]} for i in range(n)]
    return DataLoader(rows, batch_size=batch_size)


def _module(student, teacher, losses):
    return DistillationModule(student, teacher, losses, student_logits_fn=Pooling(), teacher_logits_fn=Pooling())


def test_the_step_counts_samples_and_the_projector_trains_but_not_the_teacher():
    student, teacher = _encoder(16, 0), _encoder(32, 1)
    emb = EmbeddingKD("cosine", student_dim=16, teacher_dim=32)
    module = _module(student, teacher, {"emb": emb, "rkd": RKDDistance()})
    student.eval()  # no dropout: the same forward twice
    batch = next(iter(_batches()))
    out = module._shared_step(batch, "train")
    assert int(out["count"]) == 8 and out["labels"] is None
    s = Pooling()(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
    with torch.no_grad():
        t = Pooling()(teacher(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
    assert float(out["sums"]["rkd"].detach()) == pytest.approx(8 * float(rkd_distance(s, t)), rel=1e-5)
    loss = module.training_step(batch, 0)
    loss.backward()
    assert emb.projector_layer.weight.grad is not None and emb.projector_layer.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in teacher.parameters())
    params = {id(p) for p in module.configure_optimizers().param_groups[0]["params"]}
    assert id(emb.projector_layer.weight) in params
    assert not params & {id(p) for p in teacher.parameters()}


def test_precomputed_teacher_embeddings_in_the_batch_need_no_teacher():
    student = _encoder(16, 0).eval()
    module = _module(student, None, {"sp": SimilarityPreserving()})
    batch = next(iter(_batches()))
    s = Pooling()(student(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]), batch)
    target = torch.randn(8, 5)
    out = module._shared_step({**batch, "teacher_targets": target}, "train")
    assert float(out["sums"]["sp"].detach()) == pytest.approx(8 * float(similarity_preserving(s, target)), rel=1e-5)


def test_export_saves_the_projector_only_when_asked(tmp_path):
    from safetensors.torch import load_file

    from lightning_distill.export import export_student
    from lightning_distill.losses.feature_terms import export_modules

    saved = EmbeddingKD(student_dim=4, teacher_dim=6, projector_export="save")
    extras = export_modules({"emb": saved, "drop": EmbeddingKD(student_dim=4, teacher_dim=6), "rkd": RKDDistance()})
    assert set(extras) == {"emb_projector"}
    export_student(torch.nn.Linear(4, 4), tmp_path, extras=extras)
    assert torch.equal(load_file(str(tmp_path / "emb_projector.safetensors"))["weight"], saved.projector_layer.weight)
    assert not (tmp_path / "drop_projector.safetensors").exists()


def _trainer(tmp_path, **kwargs):
    return L.Trainer(logger=False, enable_checkpointing=False, enable_progress_bar=False,
                     enable_model_summary=False, default_root_dir=tmp_path, accelerator="cpu", **kwargs)


def test_a_tiny_fit_brings_the_encoder_student_closer_to_the_teacher(tmp_path):
    torch.manual_seed(0)
    teacher, student = _encoder(32, 1), _encoder(16, 0)
    module = _module(student, teacher, {"emb": EmbeddingKD("cosine", student_dim=16, teacher_dim=32),
                                        "rkd": RKDDistance(), "sp": SimilarityPreserving(weight=10.0)})
    module.optimizer_factory = lambda p: torch.optim.AdamW(p, lr=3e-3)
    coverage = CoverageSlices(slices=["a", "b"], metric="similarity", min_retention=None, dirpath=tmp_path)
    trainer = _trainer(tmp_path, max_epochs=8, callbacks=[coverage], num_sanity_val_steps=0, inference_mode=False,
                       check_val_every_n_epoch=8)
    data = _batches(n=48, batch_size=12)  # the geometry of the samples it trained on
    before = trainer.validate(module, data, verbose=False)[0]
    agreement_before = {r["slice"]: r["retention"] for r in coverage.last_rows}
    trainer.fit(module, data, data)
    after = trainer.validate(module, data, verbose=False)[0]
    agreement_after = {r["slice"]: r["retention"] for r in coverage.last_rows}
    assert after["val/loss"] < 0.7 * before["val/loss"]
    assert all(agreement_after[s] > agreement_before[s] for s in "ab"), (agreement_before, agreement_after)
    assert trainer.global_step == 8 * 4


def test_coverage_flags_the_slice_whose_geometry_disagrees(tmp_path):
    teacher = _encoder(16, 1)
    student = copy.deepcopy(teacher)
    with torch.no_grad():  # the student forgets the teacher's embeddings of the ids that slice "b" uses
        student.embeddings.word_embeddings.weight[25:] = torch.randn(VOCAB - 25, 16)
    rows = []
    g = torch.Generator().manual_seed(0)
    for i in range(24):
        name, low, high = ("a", 1, 25) if i % 2 == 0 else ("b", 25, VOCAB)
        rows.append({"input_ids": torch.randint(low, high, (SEQ,), generator=g),
                     "attention_mask": torch.ones(SEQ, dtype=torch.long), "slice": name})
    module = _module(student, teacher, {"emb": EmbeddingKD(), "rkd": RKDDistance()})
    coverage = CoverageSlices(slices=["a", "b"], metric="similarity", min_retention=0.9, on_gap="error",
                              dirpath=tmp_path)
    with pytest.raises(CoverageGapError, match=r"\['b'\]"):
        _trainer(tmp_path, callbacks=[coverage]).test(module, DataLoader(rows, batch_size=5), verbose=False)
    by_slice = {r["slice"]: r for r in coverage.last_rows}
    assert by_slice["a"]["retention"] == pytest.approx(1.0, abs=1e-9) and not by_slice["a"]["gap"]
    assert by_slice["b"]["retention"] < 0.9 and by_slice["b"]["gap"]
    assert by_slice["b"]["pairs"] == 12 * 11 // 2 and by_slice["b"]["samples"] == 12
    record = json.loads((tmp_path / "coverage.json").read_text())
    assert record["metric"] == "similarity" and record["gaps"] == ["b"]
    assert "similarity agreement (Spearman)" in (tmp_path / "coverage.md").read_text()


def test_the_similarity_metric_needs_embedding_terms(tmp_path):
    from lightning_distill.models import causal_lm_from_config

    lm = causal_lm_from_config("llama", vocab_size=VOCAB, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2)
    module = DistillationModule(lm, copy.deepcopy(lm))
    coverage = CoverageSlices(slices=["a", "b"], metric="similarity", dirpath=tmp_path)
    with pytest.raises(ValueError, match="needs embeddings"):
        _trainer(tmp_path, callbacks=[coverage]).test(module, _batches(n=8), verbose=False)


def test_similarity_rows_and_table_from_sums():
    per_slice = {"a": {"samples": 10, "tokens": 10, "student_nll": 0.0, "similarity": 0.8, "pairs": 45},
                 "b": {"samples": 10, "tokens": 10, "student_nll": 0.0, "similarity": 0.2, "pairs": 45}}
    rows = coverage_rows(per_slice, metric="similarity", min_retention=0.5)
    assert [r["gap"] for r in rows] == [False, True]
    assert "retention 0.200 < min_retention 0.5" in rows[1]["gap_reason"]
    table = format_coverage_table(rows, "similarity")
    assert "| b " in table and "0.200" in table and "GAP" in table


def test_a_checkpoint_keeps_the_projector_and_load_rebuilds_it(tmp_path):
    student, teacher = _encoder(16, 0), _encoder(32, 1)
    module = _module(student, teacher, {"emb": EmbeddingKD(student_dim=16, teacher_dim=32, projector_export="save")})
    trainer = _trainer(tmp_path, max_steps=2, limit_val_batches=0)
    trainer.fit(module, _batches(n=16))
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    state = torch.load(tmp_path / "last.ckpt", weights_only=True)["state_dict"]
    assert "losses.emb.projector_layer.weight" in state and not any(k.startswith("teacher.") for k in state)
    loaded = DistillationModule.load_from_checkpoint(tmp_path / "last.ckpt", student=_encoder(16, 5),
                                                     teacher=_encoder(32, 1), student_logits_fn=Pooling(),
                                                     teacher_logits_fn=Pooling())
    assert loaded.losses["emb"].config() == module.losses["emb"].config()
    assert torch.equal(loaded.losses["emb"].projector_layer.weight, module.losses["emb"].projector_layer.weight)


@pytest.mark.slow
def test_two_ranks_give_the_same_similarity_agreement_as_one(tmp_path, load_script):
    import os
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parent / "scripts" / "ddp_similarity.py"
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "OMP_NUM_THREADS": "1"}
    rows = {}
    for devices in (1, 2):
        out = tmp_path / f"sim{devices}.json"
        if devices == 1:  # the reference: one process, this one
            load_script("ddp_similarity").main(str(out), 1)
        else:
            run = subprocess.run([sys.executable, str(script), str(out), str(devices)], cwd=tmp_path, env=env,
                                 capture_output=True, text=True, timeout=300)
            assert run.returncode == 0, run.stderr[-4000:]
        rows[devices] = {r["slice"]: r for r in json.loads(out.read_text())["rows"]}
    assert rows[1]["a"]["samples"] == 16 and rows[1]["b"]["samples"] == 8
    for name in ("a", "b"):
        assert rows[2][name]["samples"] == rows[1][name]["samples"]
        assert rows[2][name]["pairs"] == rows[1][name]["pairs"]
        assert rows[2][name]["retention"] == pytest.approx(rows[1][name]["retention"], abs=1e-6)
