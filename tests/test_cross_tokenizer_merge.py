"""The hybrid loss's group entry takes every entry that spells the whole group.

When one side reads a group as one token ("ab") and the other as several ("a" + "b") while its
vocabulary also has "ab", the "ab" entry of the second side is the same event as the group (the
text goes on with "ab"). It must join the group entry on that side too, or the shared "ab" entry
holds 0 on one side (moved to the group) and ``p("ab")`` on the other: forward or reverse KL then
meets a log-0 floor (about 1e38 per group). Expected values are written out here by hand from the
merged distributions; the chunked computation is held to the direct one on random tokenizations.
"""

from __future__ import annotations

import math

import pytest
import torch
from crosstok_fixtures import random_pair_batch

from lightning_distill.crosstok import SharedVocab, shared_vocab
from lightning_distill.data import demo_corpus, train_bpe_tokenizer
from lightning_distill.losses import CrossTokenizerKD
from lightning_distill.losses import cross_tokenizer as ct
from lightning_distill.types import LossInputs, TeacherTargets

DIVERGENCES = [("forward_kl", {}), ("reverse_kl", {}), ("tvd", {}), ("generalized_jsd", {"beta": 0.3}),
               ("skew_forward_kl", {"alpha": 0.1})]

# Student ids: 0 "x", 1 "a", 2 "b", 3 "ab", 4 "z" (its own). Teacher ids: 0 "ab", 1 "x", 2 "b", 3 "a", 4 "y" (its own).
S_STRINGS, T_STRINGS = ["x", "a", "b", "ab", "z"], ["ab", "x", "b", "a", "y"]
VOCAB = SharedVocab(torch.tensor([0, 1, 2, 3]), torch.tensor([1, 3, 2, 0]), 5, 5,
                    tuple(s.encode() for s in S_STRINGS), tuple(t.encode() for t in T_STRINGS))


def _kl(p: list[float], q: list[float]) -> float:
    return sum(a * math.log(a / b) for a, b in zip(p, q, strict=True) if a > 0)


def _hand(p_shared: list[float], q_shared: list[float], divergence: str) -> float:
    """The divergence between the teacher's ``p`` and the student's ``q`` over the shared entries
    and the group entry (each renormalised), written out."""
    p = [v / sum(p_shared) for v in p_shared]
    q = [v / sum(q_shared) for v in q_shared]
    if divergence == "forward_kl":
        return _kl(p, q)
    assert divergence == "reverse_kl"
    return _kl(q, p)


def _value_and_grad(student, teacher, cross, divergence, vocab=VOCAB, **kw):
    """(div, rest) of the chunked loss and of the direct formulation, and the gradient of div + rest."""
    out = []
    for fn in (ct.cross_tokenizer_kd, ct._reference_cross_tokenizer_kd):
        s = student.clone().requires_grad_(True)
        div, rest, _ = fn(s, teacher, cross, vocab, divergence=divergence, **kw)
        (grad,) = torch.autograd.grad(div + rest, s)
        out.append((div.item(), rest.item(), grad))
    return out


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_a_student_token_spelling_the_teachers_split_group(divergence):
    # "x" + "ab": the student reads "ab" as one token, the teacher as "a" + "b" though it has "ab".
    cross = ct.CrossTokenizerBatch(torch.tensor([[0, 3]]), torch.tensor([[1, 3, 2]]), torch.tensor([[0, 1]]),
                                   torch.tensor([[0, 1, 1]]))
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(1, 2, 5, generator=g, dtype=torch.float64), torch.randn(1, 3, 5, generator=g)
    q = student[0, 0].softmax(-1).tolist()  # the student's head: x a b ab z
    p = teacher[0, 0].double().softmax(-1).tolist()  # the teacher's head: ab x b a y
    chain = teacher[0, 1].double().softmax(-1)[2].item()  # p_t(b | a)
    # Shared entries x, a, b, ab, then the group. The student's "ab" is its group (one token); the
    # teacher's group is "a" then "b", plus its own "ab", and the rest of "a" stays at "a".
    q_shared = [q[0], q[1], q[2], 0.0, q[3]]
    p_shared = [p[1], p[3] * (1 - chain), p[2], 0.0, p[3] * chain + p[0]]
    expected = _hand(p_shared, q_shared, divergence)
    for div, rest, grad in _value_and_grad(student.float(), teacher, cross, divergence):
        assert div == pytest.approx(expected, rel=1e-5)
        assert rest == pytest.approx(abs(q[4] - p[4]), rel=1e-5)  # ULD: "z" against "y"
        assert torch.isfinite(grad).all()
    # Before the fix the teacher kept p_t("ab") at the shared "ab" entry: a floor term of ~1e38.
    assert expected < 10


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl"])
def test_a_teacher_token_spelling_the_students_split_group(divergence):
    # The same text, the sides swapped: the teacher reads "ab", the student "a" + "b" (and has "ab").
    cross = ct.CrossTokenizerBatch(torch.tensor([[0, 1, 2]]), torch.tensor([[1, 0]]), torch.tensor([[0, 1, 1]]),
                                   torch.tensor([[0, 1]]))
    g = torch.Generator().manual_seed(1)
    student = torch.randn(1, 3, 5, generator=g, dtype=torch.float64)
    teacher = torch.randn(1, 2, 5, generator=g)
    p = teacher[0, 0].double().softmax(-1).tolist()
    s = student.clone().requires_grad_(True)
    q_row = s[0, 0].softmax(-1)
    chain = s[0, 1].softmax(-1)[2]  # p_s(b | a): the gradient reaches the student's position inside the group
    q_shared = torch.stack([q_row[0], q_row[1] * (1 - chain), q_row[2], q_row.new_zeros(()),
                            q_row[1] * chain + q_row[3]])
    p_shared = [p[1], p[3], p[2], 0.0, p[0]]
    expected = _hand(p_shared, q_shared.tolist(), divergence)
    # The same, differentiable, for the gradient (float64).
    pn = torch.tensor(p_shared, dtype=torch.float64) / sum(p_shared)
    qn = q_shared / q_shared.sum()
    keep = (pn > 0) if divergence == "forward_kl" else (qn > 0)
    a, b = (pn, qn) if divergence == "forward_kl" else (qn, pn)
    uld = (q_row[4] - p[4]).abs()  # the ULD part: the student's "z" against the teacher's "y"
    (grad_expected,) = torch.autograd.grad((a[keep] * (a[keep].log() - b[keep].log())).sum() + uld, s)
    for div, rest, grad in _value_and_grad(student.float(), teacher, cross, divergence):
        assert div == pytest.approx(expected, rel=1e-5)
        assert rest == pytest.approx(abs(q_row[4].item() - p[4]), rel=1e-5)
        torch.testing.assert_close(grad.double(), grad_expected, rtol=1e-4, atol=1e-6)
        assert grad[0, 1].abs().sum() > 0
    assert expected < 10


def test_whole_group_ids_on_both_sides():
    # Groups: "x" | "ab" (student "ab", teacher "a"+"b") | "ab" (student "a"+"b", teacher "ab") | "b" | "xa"
    # (student "x"+"a", teacher "x"+"a": neither vocabulary has "xa").
    cross = ct.CrossTokenizerBatch(torch.tensor([[0, 3, 1, 2, 2, 0, 1]]), torch.tensor([[1, 3, 2, 0, 2, 1, 3]]),
                                   torch.tensor([[0, 1, 2, 2, 3, 4, 4]]), torch.tensor([[0, 1, 1, 2, 3, 4, 4]]))
    ls, lt = torch.zeros(1, 7, 5), torch.zeros(1, 7, 5)
    _, s, t = ct.group_heads(cross, ls, lt, vocab=VOCAB)
    assert s.whole.tolist() == [-1, 3, -1, -1] and t.whole.tolist() == [0, -1, -1, -1]
    plan = ct._plan(cross, None, -100, VOCAB)
    assert plan.s_whole.tolist() == [-1, 3, -1, -1] and plan.t_whole.tolist() == [0, -1, -1, -1]
    # Without the spellings nothing is looked up (a map built by hand from ids alone).
    bare = SharedVocab(VOCAB.student_ids, VOCAB.teacher_ids, 5, 5)
    assert ct._plan(cross, None, -100, bare).s_whole is None
    # Another id with the same bytes as a one-token group's token (two spellings) joins the group.
    twice = SharedVocab(VOCAB.student_ids, VOCAB.teacher_ids, 6, 5, (*VOCAB.student_keys, b"x"), VOCAB.teacher_keys)
    cross2 = ct.CrossTokenizerBatch(torch.tensor([[0, 5]]), torch.tensor([[1, 1]]), torch.tensor([[0, 1]]),
                                    torch.tensor([[0, 1]]))
    assert ct._plan(cross2, None, -100, twice).s_whole.tolist() == [0]
    with pytest.raises(ValueError, match="student_keys has 5 entries but the student size is 6"):
        SharedVocab(VOCAB.student_ids, VOCAB.teacher_ids, 6, 5, VOCAB.student_keys, VOCAB.teacher_keys)


@pytest.mark.parametrize(("divergence", "params"), DIVERGENCES)
def test_no_term_is_infinite_on_random_tokenizations(divergence, params):
    found = [0, 0]
    for seed in range(12):
        batch, labels, vocab, student, teacher = random_pair_batch(seed, zero_teacher=False)
        cross = ct.CrossTokenizerBatch.from_batch(batch)
        plan = ct._plan(cross, labels, -100, vocab)
        found[0] += 0 if plan.s_whole is None else int((plan.s_whole >= 0).sum())
        found[1] += 0 if plan.t_whole is None else int((plan.t_whole >= 0).sum())
        temperature = (1.0, 2.0)[seed % 2]
        s = student.clone().requires_grad_(True)
        term = CrossTokenizerKD(divergence, temperature=temperature, **params)
        term._vocab = vocab
        value = term(LossInputs(student_logits=s, labels=labels, teacher=TeacherTargets(logits=teacher), batch=batch))
        (grad,) = torch.autograd.grad(value, s)
        # A few nats per group at most (random logits); a log-0 floor term would be ~1e38.
        assert torch.isfinite(value) and 0 < value.item() < 20 * plan.size, (seed, temperature)
        assert torch.isfinite(grad).all() and grad.abs().max() < 100
    assert found[0] >= 5 and found[1] >= 5  # groups spelled by one entry of the side that split them


def test_real_tokenizers_spell_their_ids(tmp_path):
    texts = [d.text for d in demo_corpus(code_bytes=6000, prose_bytes=6000)]
    student, teacher = train_bpe_tokenizer(texts, 280, tmp_path), train_bpe_tokenizer(texts, 360, tmp_path)
    vocab = shared_vocab(student, teacher)
    s_spelling, t_spelling = vocab.spellings
    assert len(s_spelling.keys) == 280 and len(t_spelling.keys) == 360
    text = "naïve café: def f(x):\n    return x  # 日本"
    for tok, spelling in ((student, s_spelling), (teacher, t_spelling)):
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert b"".join(spelling.keys[i] for i in ids) == text.encode()  # a group's text: its tokens' bytes
    assert s_spelling.keys[student.eos_token_id] == ("special", student.eos_token)
    for s_id, t_id in zip(vocab.student_ids.tolist(), vocab.teacher_ids.tolist(), strict=True):
        assert s_spelling.keys[s_id] == t_spelling.keys[t_id]
    # A token of the larger vocabulary that the smaller one writes in two tokens; read with the
    # larger vocabulary on both sides, one side as that token, the other as the two pieces.
    t_id = next(i for i in range(280, 360)
                if len(student(teacher.decode([i]), add_special_tokens=False)["input_ids"]) == 2)
    pieces = student.convert_ids_to_tokens(student(teacher.decode([t_id]), add_special_tokens=False)["input_ids"])
    split = teacher.convert_tokens_to_ids(pieces)
    cross = ct.CrossTokenizerBatch(torch.tensor([[0, t_id]]), torch.tensor([[0, *split]]), torch.tensor([[0, 1]]),
                                   torch.tensor([[0, 1, 1]]))
    same = shared_vocab(teacher, teacher)
    plan = ct._plan(cross, None, -100, same)
    assert plan.s_whole is None and plan.t_whole.tolist() == [t_id]
    g = torch.Generator().manual_seed(0)
    div, _, _ = ct.cross_tokenizer_kd(torch.randn(1, 2, 360, generator=g), torch.randn(1, 3, 360, generator=g),
                                      cross, same)
    assert 0 < div.item() < 10
