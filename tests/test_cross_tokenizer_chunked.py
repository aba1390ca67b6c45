"""The chunked cross-tokenizer losses against their direct formulation: values and gradients for
any chunk size (1, a few, auto, more than the groups), with padding, ignored groups, groups of
several tokens on both sides, groups spelled by one entry of the side that split them (random
tokenizations of two small vocabularies) and teacher entries at probability 0; the numpy sort
against ``torch.sort``; the gradient when the two parts are weighted apart, and a second backward.
"""

from __future__ import annotations

import pytest
import torch
from crosstok_fixtures import random_pair_batch

from lightning_distill.crosstok import SharedVocab
from lightning_distill.losses import CrossTokenizerKD, ULDLoss
from lightning_distill.losses import cross_tokenizer as ct
from lightning_distill.types import LossInputs, TeacherTargets

VS, VT, SHARED = 40, 56, 29
CHUNKS = [1, 3, 7, None, 10_000]


def _batch(seed: int = 0):
    """Three samples of different lengths (padding), groups of 1-3 student and 1-2 teacher tokens
    (a one-token group on one side is the same shared token on the other, as for the same text),
    and labels with ignored positions inside the text."""
    g = torch.Generator().manual_seed(seed)
    vocab = SharedVocab(torch.randperm(VS, generator=g)[:SHARED], torch.randperm(VT, generator=g)[:SHARED], VS, VT)
    lengths, ts = [18, 11, 15], 18
    s_groups = torch.full((3, ts), -1)
    s_ids = torch.randint(0, VS, (3, ts), generator=g)
    t_rows = []
    for b, length in enumerate(lengths):
        s_list: list[int] = []
        t_groups: list[int] = []
        t_ids: list[int] = []
        group = 0
        while True:
            ns = int(torch.randint(1, 4, (1,), generator=g))
            if len(s_list) + ns > length:
                break
            if ns == 1:
                k = int(torch.randint(0, SHARED, (1,), generator=g))
                s_ids[b, len(s_list)] = vocab.student_ids[k]
                t_ids.append(int(vocab.teacher_ids[k]))
                t_groups.append(group)
            else:
                nt = int(torch.randint(1, 3, (1,), generator=g))
                t_ids += torch.randint(0, VT, (nt,), generator=g).tolist()
                t_groups += [group] * nt
            s_list += [group] * ns
            group += 1
        s_groups[b, : len(s_list)] = torch.tensor(s_list)
        t_rows.append((t_groups, t_ids))
    tt = max(len(r[0]) for r in t_rows)
    t_groups_all = torch.full((3, tt), -1)
    t_ids_all = torch.zeros(3, tt, dtype=torch.long)
    for b, (groups, ids) in enumerate(t_rows):
        t_groups_all[b, : len(groups)] = torch.tensor(groups)
        t_ids_all[b, : len(ids)] = torch.tensor(ids)
    labels = torch.cat([s_ids[:, 1:], torch.full((3, 1), -100)], 1)
    labels = labels.masked_fill(torch.cat([s_groups[:, 1:], torch.full((3, 1), -1)], 1) <= 0, -100)
    labels[0, 4] = labels[2, 7] = -100  # two groups whose head is ignored
    batch = {"input_ids": s_ids, "teacher_input_ids": t_ids_all, "student_groups": s_groups,
             "teacher_groups": t_groups_all, "labels": labels}
    student = torch.randn(3, ts, VS, generator=g) * 2
    teacher = torch.randn(3, tt, VT, generator=g) * 2
    teacher[1, :, -5:] = float("-inf")  # entries at probability 0 (a cache's padding)
    return batch, labels, vocab, student, teacher


def _grad(value: torch.Tensor, leaf: torch.Tensor) -> torch.Tensor:
    (grad,) = torch.autograd.grad(value, leaf)
    return grad


def _spelled_batch():
    """Random tokenizations with groups spelled by one entry of the side that split them."""
    batch, labels, vocab, student, teacher = random_pair_batch(8, samples=4)
    plan = ct._plan(ct.CrossTokenizerBatch.from_batch(batch), labels, -100, vocab)
    assert (plan.s_whole >= 0).sum() >= 2 and (plan.t_whole >= 0).sum() >= 2
    return batch, labels, vocab, student, teacher


@pytest.mark.parametrize("chunk_size", CHUNKS)
@pytest.mark.parametrize(("divergence", "params"), [("forward_kl", {}), ("generalized_jsd", {"beta": 0.3})])
@pytest.mark.parametrize("make", [_batch, _spelled_batch])
def test_chunked_hybrid_equals_the_direct_formulation(chunk_size, divergence, params, make):
    batch, labels, vocab, student, teacher = make()
    cross = ct.CrossTokenizerBatch.from_batch(batch)
    s = student.clone().requires_grad_(True)
    kw = {"divergence": divergence, "temperature": 2.0, "params": params, "uld_weight": 0.7, "labels": labels}
    div, rest, count = ct.cross_tokenizer_kd(s, teacher, cross, vocab, chunk_size=chunk_size, **kw)
    ref_div, ref_rest, ref_count = ct._reference_cross_tokenizer_kd(s, teacher, cross, vocab, **kw)
    assert count.item() == ref_count.item() > 10
    assert 0 < div.item() < 1e3 and 0 < rest.item() < 1e3  # no entry at the log-0 floor dominates
    torch.testing.assert_close(div, ref_div, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(rest, ref_rest, rtol=1e-5, atol=1e-5)
    # The two parts weighted apart (not the ratio forward prepared: backward recomputes), and each alone.
    for a, b in ((0.3, 2.0), (1.0, 0.0), (0.0, 1.0)):
        div, rest, _ = ct.cross_tokenizer_kd(s, teacher, cross, vocab, chunk_size=chunk_size, **kw)
        torch.testing.assert_close(_grad(a * div + b * rest, s), _grad(a * ref_div + b * ref_rest, s),
                                   rtol=1e-4, atol=1e-6)
        ref_div, ref_rest, _ = ct._reference_cross_tokenizer_kd(s, teacher, cross, vocab, **kw)


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_chunked_term_equals_the_direct_formulation_and_reaches_chained_rows(chunk_size):
    batch, labels, vocab, student, teacher = _batch(1)
    s = student.clone().requires_grad_(True)
    term = CrossTokenizerKD(temperature=2.0, chunk_size=chunk_size)
    term._vocab = vocab
    value = term(LossInputs(student_logits=s, labels=labels, teacher=TeacherTargets(logits=teacher), batch=batch))
    div, rest, _ = ct._reference_cross_tokenizer_kd(s, teacher, ct.CrossTokenizerBatch.from_batch(batch), vocab,
                                                    temperature=2.0, labels=labels)
    expected = div * 4.0 + rest
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    grad, grad_expected = _grad(value, s), _grad(expected, s)
    torch.testing.assert_close(grad, grad_expected, rtol=1e-4, atol=1e-6)
    # Rows inside a multi-token group (chained) get gradient (but those of the ignored groups and
    # of a last group without a teacher head); padding gets none.
    groups = batch["student_groups"]
    inner = (groups[:, 1:] == groups[:, :-1]) & (groups[:, 1:] > 0)
    reached = grad[:, :-1][inner].abs().sum(-1) > 0
    assert inner.sum() > 10 and reached.float().mean() > 0.75
    assert (grad[groups < 0] == 0).all()


@pytest.mark.parametrize("chunk_size", CHUNKS)
def test_chunked_uld_equals_the_direct_formulation(chunk_size):
    batch, labels, _, student, teacher = _batch(2)
    cross = ct.CrossTokenizerBatch.from_batch(batch)
    s = student.clone().requires_grad_(True)
    value, count = ct.uld(s, teacher, cross, temperature=1.5, labels=labels, chunk_size=chunk_size)
    expected, ref_count = ct._reference_uld(s, teacher, cross, temperature=1.5, labels=labels)
    assert count.item() == ref_count.item() > 10
    assert value.item() == pytest.approx(expected.item(), rel=1e-5)
    torch.testing.assert_close(_grad(value, s), _grad(expected, s), rtol=1e-5, atol=1e-7)
    term = ULDLoss(temperature=1.5, chunk_size=chunk_size)
    inputs = LossInputs(student_logits=s, labels=labels, teacher=TeacherTargets(logits=teacher), batch=batch)
    assert term(inputs).item() == pytest.approx(expected.item(), rel=1e-5)


def test_a_second_backward_recomputes_the_same_gradient():
    batch, labels, vocab, student, teacher = _batch(3)
    s = student.clone().requires_grad_(True)
    term = CrossTokenizerKD(temperature=1.0, chunk_size=4)
    term._vocab = vocab
    value = term(LossInputs(student_logits=s, labels=labels, teacher=TeacherTargets(logits=teacher), batch=batch))
    value.backward(retain_graph=True)
    first = s.grad.clone()
    value.backward()
    torch.testing.assert_close(s.grad, 2 * first)


def test_the_sort_matches_torch_and_the_sorted_l1_its_gradient():
    g = torch.Generator().manual_seed(4)
    p = torch.randn(5, 33, generator=g).softmax(-1)
    p[0, :4] = 0.0  # ties at 0
    for q in (torch.randn(5, 20, generator=g).softmax(-1), torch.randn(5, 47, generator=g).softmax(-1)):
        for order in (False, True):
            values, indices = ct._sort_ascending(p, order)
            assert torch.equal(values, p.sort(-1).values)
            if order:
                assert torch.equal(p.gather(-1, indices), values)
        a = p.clone().requires_grad_(True)
        b = p.clone().requires_grad_(True)
        value = ct._SortedL1.apply(a, q).sum()
        expected = ct._sorted_l1(b, q).sum()
        assert value.item() == pytest.approx(expected.item(), rel=1e-6)
        value.backward()
        expected.backward()
        rows = p[1:]  # row 0's ties at 0 may pair differently (a subgradient either way)
        assert rows.numel() and torch.equal(a.grad[1:], b.grad[1:])


def test_chunk_size_is_checked():
    with pytest.raises(ValueError, match="chunk_size"):
        CrossTokenizerKD(chunk_size=0)
    with pytest.raises(ValueError, match="chunk_size"):
        ULDLoss(chunk_size=0)
    with pytest.raises(TypeError, match="chunk_size"):
        ULDLoss(chunk_size="8")
    batch, labels, vocab, student, teacher = _batch()
    with pytest.raises(ValueError, match="chunk_size"):
        ct.cross_tokenizer_kd(student, teacher, ct.CrossTokenizerBatch.from_batch(batch), vocab, chunk_size=-1)
