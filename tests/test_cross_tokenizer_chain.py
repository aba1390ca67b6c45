"""The hybrid loss's ``1 - c`` for a chain ``c`` that rounds to 1 in float32.

A side that splits a group ("a" + "b") keeps ``p(a) * (1 - c)`` at its first token's entry, with
``c = p(b | a)``. A confident model (``b`` some 17 nats or more above the rest of the row, at the
temperature) has ``c == 1.0`` in float32, and ``1 - c`` taken from ``c`` is exactly 0: the other
side's mass at "a" then meets a log-0 floor in forward KL (the student split the group) or
reverse KL (the teacher did), a term of about ``p * 3.4e38``. The loss takes ``1 - c`` from the
row's other entries instead. Expected values are derived here in float64, ``1 - c`` as the sum of
the row's other probabilities (which float64 does not round away either).
"""

from __future__ import annotations

import math

import pytest
import torch
from crosstok_fixtures import random_pair_batch

from lightning_distill.crosstok import SharedVocab
from lightning_distill.losses import CrossTokenizerKD
from lightning_distill.losses import cross_tokenizer as ct
from lightning_distill.types import LossInputs, TeacherTargets

DIVERGENCES = [("forward_kl", {}), ("reverse_kl", {}), ("tvd", {}), ("generalized_jsd", {"beta": 0.3}),
               ("skew_forward_kl", {"alpha": 0.1}), ("skew_reverse_kl", {"alpha": 0.1})]

# Student ids: 0 "x", 1 "a", 2 "b", 3 "z" (its own), 4 "ab". Teacher ids: 0 "ab", 1 "x", 2 "a", 3 "b", 4 "y" (its own).
VOCAB = SharedVocab(torch.tensor([0, 1, 2, 4]), torch.tensor([1, 2, 3, 0]), 5, 5,
                    (b"x", b"a", b"b", b"z", b"ab"), (b"ab", b"x", b"a", b"b", b"y"))


def _case(split: str, gap: float, temperature: float, seed: int):
    """The text "x" then the group "ab": the ``split`` side reads it "a" + "b" with "b" ``gap``
    nats (at the temperature) above the row's other entries, the other side reads "ab"."""
    g = torch.Generator().manual_seed(seed)
    student = torch.randn(1, 3, 5, generator=g, dtype=torch.float64)
    teacher = torch.randn(1, 3, 5, generator=g, dtype=torch.float64)
    if split == "student":
        cross = ct.CrossTokenizerBatch(torch.tensor([[0, 1, 2]]), torch.tensor([[1, 0, 0]]),
                                       torch.tensor([[0, 1, 1]]), torch.tensor([[0, 1, -1]]))
        row, b = student[0, 1], 2
    else:
        cross = ct.CrossTokenizerBatch(torch.tensor([[0, 4, 0]]), torch.tensor([[1, 2, 3]]),
                                       torch.tensor([[0, 1, -1]]), torch.tensor([[0, 1, 1]]))
        row, b = teacher[0, 1], 3
    row.mul_(0.1)
    row[b] = row.max() + gap * temperature
    return cross, student, teacher


def _expected(split: str, student: torch.Tensor, teacher: torch.Tensor, divergence: str, temperature: float):
    """``(divergence, ULD)`` in float64, differentiable in ``student``; each side's merged
    shared entries x, a, b, ab, then the group (its "ab" entry is the group on both sides)."""

    def heads(z: torch.Tensor, order: list[int], split_here: bool, b: int):
        p = (z[0, 0] / temperature).softmax(-1)
        if not split_here:  # the group is the side's one token "ab"
            x, a, bb, ab = (p[i] for i in order)
            return torch.stack([x, a, bb, ab.new_zeros(()), ab])
        row = (z[0, 1] / temperature).softmax(-1)
        chain, rest = row[b], torch.cat([row[:b], row[b + 1:]]).sum()  # rest = 1 - chain, not rounded away
        x, a, bb, ab = (p[i] for i in order)
        return torch.stack([x, a * rest, bb, ab.new_zeros(()), a * chain + ab])

    q = heads(student, [0, 1, 2, 4], split == "student", 2)
    p = heads(teacher, [1, 2, 3, 0], split == "teacher", 3)
    uld = ((student[0, 0] / temperature).softmax(-1)[3] - (teacher[0, 0] / temperature).softmax(-1)[4]).abs()
    p, q = p / p.sum(), q / q.sum()
    a, c = (p, q) if divergence == "forward_kl" else (q, p)
    keep = a > 0
    return (a[keep] * (a[keep].log() - c[keep].log())).sum(), uld


@pytest.mark.parametrize("temperature", [1.0, 2.5])
@pytest.mark.parametrize("gap", [20.0, 30.0, 60.0, 100.0])
@pytest.mark.parametrize(("split", "divergence"), [("student", "forward_kl"), ("teacher", "reverse_kl"),
                                                   ("student", "reverse_kl"), ("teacher", "forward_kl")])
def test_a_confident_chain_gives_the_first_tokens_entry_its_true_mass(split, divergence, gap, temperature):
    cross, student, teacher = _case(split, gap, temperature, seed=int(gap))
    s = student.clone().requires_grad_(True)
    div64, uld64 = _expected(split, s, teacher, divergence, temperature)
    (grad64,) = torch.autograd.grad(div64 + uld64, s)
    # The case is the one float32 gets wrong when 1 - c is taken from c.
    row = (student if split == "student" else teacher)[0, 1].float() / temperature
    assert row.softmax(-1).max().item() == 1.0 and row.log_softmax(-1).max().item() == 0.0
    for fn in (ct.cross_tokenizer_kd, ct._reference_cross_tokenizer_kd):
        s32 = student.float().requires_grad_(True)
        div, rest, count = fn(s32, teacher.float(), cross, VOCAB, divergence=divergence, temperature=temperature)
        (grad,) = torch.autograd.grad(div + rest, s32)
        assert count.item() == 1
        assert div.item() == pytest.approx(div64.item(), rel=1e-5, abs=1e-6), fn.__name__
        assert rest.item() == pytest.approx(uld64.item(), rel=1e-5, abs=1e-7)
        torch.testing.assert_close(grad.double(), grad64, rtol=1e-4, atol=1e-6)
    if (split, divergence) in (("student", "forward_kl"), ("teacher", "reverse_kl")):
        # The other side's mass at "a" against "a, then not b": about gap nats, not a floor term.
        assert 1 < div64.item() < 2 * gap


def test_the_chain_helpers_in_float32_against_float64():
    # Rows from a flat one to one whose token is 120 nats above the rest (q below float32's range).
    g = torch.Generator().manual_seed(3)
    z = torch.randn(9, 50, generator=g, dtype=torch.float64)
    ids = torch.randint(0, 50, (9,), generator=g)
    for i, gap in enumerate([-5.0, 0.0, 1.0, 3.0, 10.0, 17.0, 30.0, 60.0, 120.0]):
        z[i, ids[i]] = z[i].max() + gap
    logp = z.log_softmax(-1)
    rest = logp.scatter(-1, ids.unsqueeze(-1), -math.inf).logsumexp(-1)  # log(1 - p), float64
    nats = torch.log(-torch.log1p(-rest.exp()))  # log(-log p), from q = 1 - p
    found, found_rest, _ = ct._chain_rows(logp.float(), ids)
    torch.testing.assert_close(found.double(), nats, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(found_rest.double(), rest, rtol=1e-5, atol=1e-5)
    # A group of several rows: log(1 - c) with c = prod p, against float64.
    slot = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3])
    chain = ct._group_logsumexp(found, slot, 5)
    assert chain[4].item() == ct._LOG_FLOOR  # a group without chained rows
    log_c = torch.zeros(4, dtype=torch.float64).index_add(0, slot, logp.gather(-1, ids.unsqueeze(-1)).squeeze(-1))
    big = torch.log1p(-log_c.exp())
    small = torch.log(-torch.expm1(log_c))
    log1m = ct._log1m_chain(chain)
    torch.testing.assert_close(log1m[:2].double(), big[:2], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(log1m[2].double(), small[2], rtol=1e-5, atol=1e-6)
    assert log1m[3].item() == pytest.approx(float(rest[7].logaddexp(rest[8])), rel=1e-5)  # 1 - c ~ q7 + q8
    assert log1m[4].item() == ct._LOG_FLOOR


def _confident_chains(logits: torch.Tensor, ids: torch.Tensor, groups: torch.Tensor, gap: float) -> torch.Tensor:
    """``logits`` with each token inside a multi-token group ``gap`` above the rest of the row
    that predicts it (a model sure of how a word goes on)."""
    out = logits.clone()
    b, j = ((groups[:, 1:] == groups[:, :-1]) & (groups[:, 1:] >= 0)).nonzero(as_tuple=True)
    out[b, j, ids[b, j + 1]] = out[b, j].max(-1).values + gap
    return out


@pytest.mark.parametrize(("divergence", "params"), DIVERGENCES)
def test_very_confident_models_on_random_tokenizations_stay_finite(divergence, params):
    # Logits x 50 (rows 100+ nats apart) and every chained token 30 nats above its row at the
    # temperature (chains of exactly 1 in float32), on both sides or on one side against a plain
    # one (whose mass at the confident side's first tokens a floor term would weigh).
    for seed in range(6):
        batch, labels, vocab, student, teacher = random_pair_batch(seed, zero_teacher=False)
        temperature = (1.0, 2.0)[seed % 2]
        sides = [(True, True), (True, False), (False, True)][seed % 3]
        if sides[0]:
            student = _confident_chains(student * 50, batch["input_ids"], batch["student_groups"], 30 * temperature)
        if sides[1]:
            teacher = _confident_chains(teacher * 50, batch["teacher_input_ids"], batch["teacher_groups"],
                                        30 * temperature)
        cross = ct.CrossTokenizerBatch.from_batch(batch)
        plan = ct._plan(cross, labels, -100, vocab)
        s = student.clone().requires_grad_(True)
        term = CrossTokenizerKD(divergence, temperature=temperature, **params)
        term._vocab = vocab
        value = term(LossInputs(student_logits=s, labels=labels, teacher=TeacherTargets(logits=teacher), batch=batch))
        (grad,) = torch.autograd.grad(value, s)
        # Hundreds of nats per group at most at these logits; a log-0 floor term would be ~1e38.
        assert torch.isfinite(value) and 0 < value.item() < 1e4 * plan.size, (seed, value.item())
        assert torch.isfinite(grad).all()
        div, rest, _ = ct._reference_cross_tokenizer_kd(s, teacher, cross, vocab, divergence=divergence,
                                                        temperature=temperature, params=params, labels=labels)
        ref = div * temperature**2 + rest
        assert value.item() == pytest.approx(ref.item(), rel=1e-4)
        torch.testing.assert_close(grad, torch.autograd.grad(ref, s)[0], rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("split", ["student", "teacher"])
def test_a_chain_of_exactly_one_keeps_the_floor_without_nan(split):
    # Every other entry of the chained row at -inf: c is exactly 1 and the first token's entry
    # holds 0 for real (a log-0 term where the other side has mass there, as for LogitKD with a
    # probability of 0); no NaN, and the chunked gradient is the direct one's.
    cross, student, teacher = _case(split, 20.0, 1.0, seed=0)
    row, b = (student[0, 1], 2) if split == "student" else (teacher[0, 1], 3)
    row[torch.arange(5) != b] = -math.inf
    floor_side = "forward_kl" if split == "student" else "reverse_kl"
    for divergence in ("forward_kl", "reverse_kl", "tvd"):
        found = []
        for fn in (ct.cross_tokenizer_kd, ct._reference_cross_tokenizer_kd):
            s = student.float().requires_grad_(True)
            div, rest, _ = fn(s, teacher.float(), cross, VOCAB, divergence=divergence)
            (grad,) = torch.autograd.grad(div + rest, s)
            assert torch.isfinite(grad).all()
            found.append((div.item(), grad))
        assert found[0][0] == pytest.approx(found[1][0], rel=1e-6)
        torch.testing.assert_close(found[0][1], found[1][1])
        assert (found[0][0] > 1e30) == (divergence == floor_side)
