"""Property tests of the sparse-target divergences in lightning_distill.losses.functional.

Expected values are derived independently of the library: hand computations with ``math``, or
plain float64 torch over the full distributions, coarse-grained here by summing the
probabilities outside the targets' ids. The library's helpers never build an expectation.

Conventions: P is the teacher's distribution, Q the student's; "coarse" means the K + 1
outcomes of sparse targets (the ids, then one bucket for every other id).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_distill.losses import functional as LF
from lightning_distill.types import SparseTargets

NAMES = ["forward_kl", "reverse_kl", "generalized_jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]
KW = {
    "generalized_jsd": {"beta": 0.3},
    "skew_forward_kl": {"alpha": 0.2},
    "skew_reverse_kl": {"alpha": 0.2},
}
NEG_INF = -math.inf


def sparse(name, student, targets, **kw):
    return getattr(LF, f"sparse_{name}")(student, targets, **{**KW.get(name, {}), **kw})


# ------------------------------------------------------------------------------------------
# Independent float64 references.
# ------------------------------------------------------------------------------------------
def xlogy(x, y):
    """x * log y with 0 * log(anything) = 0, and no NaN in its gradient at x = 0."""
    pos = x > 0
    return torch.where(
        pos, x * torch.log(torch.where(pos, y, torch.ones_like(y))), torch.zeros_like(x)
    )


def kl(a, b):
    return (xlogy(a, a) - xlogy(a, b)).sum(-1)


def ref_div(name, p, q, beta=None, alpha=None):
    """Divergence of Q from P, per row, on probability vectors (any number of outcomes)."""
    if name == "forward_kl":
        return kl(p, q)
    if name == "reverse_kl":
        return kl(q, p)
    if name == "generalized_jsd":
        m = beta * p + (1 - beta) * q
        return beta * kl(p, m) + (1 - beta) * kl(q, m)
    if name == "skew_forward_kl":
        return kl(p, alpha * p + (1 - alpha) * q)
    if name == "skew_reverse_kl":
        return kl(q, alpha * q + (1 - alpha) * p)
    if name == "tvd":
        return 0.5 * (p - q).abs().sum(-1)
    raise AssertionError(name)


def set_mask_of(ids, vocab):
    """(n, V) bool: which ids each row's targets name (padding -1 ignored)."""
    mask = torch.zeros(ids.shape[0], vocab, dtype=torch.bool)
    for r, row in enumerate(ids.tolist()):
        for i in row:
            if i >= 0:
                mask[r, i] = True
    return mask


def coarse(probs, ids):
    """Full distributions (n, V) -> (n, K + 1): mass at each real id (0 at padding), then the
    mass of every other id (summed over them, not 1 - head)."""
    valid = ids >= 0
    head = torch.where(
        valid, probs.gather(-1, ids.clamp_min(0)), torch.zeros((), dtype=probs.dtype)
    )
    rest = (probs * ~set_mask_of(ids, probs.shape[-1])).sum(-1, keepdim=True)
    return torch.cat([head, rest], -1)


def uniform_tail_teacher(logprobs, ids, tail, vocab, temperature):
    """The top-k teacher at T with its tail spread evenly over the ids outside, by hand."""
    rows = []
    for lp_row, id_row, t_row in zip(
        logprobs.double().tolist(), ids.tolist(), tail.double().tolist()
    ):
        real = [lp for lp, i in zip(lp_row, id_row) if i >= 0]
        outside = vocab - len(real)
        head = [math.exp(lp / temperature) if i >= 0 else 0.0 for lp, i in zip(lp_row, id_row)]
        rest = outside * (math.exp(t_row) / outside) ** (1 / temperature)
        total = sum(head) + rest
        rows.append([h / total for h in head] + [rest / total])
    return torch.tensor(rows, dtype=torch.float64)


def importance_teacher(logprobs, ids, counts, temperature, sample_temperature):
    """Self-normalised importance weights c_i exp(l_i (1/T - 1/T_s)), by hand; rest 0."""
    rows = []
    for lp_row, id_row, c_row in zip(
        logprobs.double().tolist(), ids.tolist(), counts.double().tolist()
    ):
        w = [
            c * math.exp(lp * (1 / temperature - 1 / sample_temperature)) if i >= 0 else 0.0
            for lp, i, c in zip(lp_row, id_row, c_row)
        ]
        total = sum(w)
        rows.append([x / total for x in w] + [0.0])
    return torch.tensor(rows, dtype=torch.float64)


def ref_coarse_rows(name, student, p_coarse, ids, temperature):
    """Float64 autograd reference: the divergence between p_coarse and the student's softmax
    coarse-grained onto the same outcomes."""
    q = torch.softmax(student.double() / temperature, -1)
    return ref_div(name, p_coarse, coarse(q, ids), **KW.get(name, {}))


def ref_dense_rows(name, student, teacher, temperature):
    p = torch.softmax(teacher.double() / temperature, -1)
    q = torch.softmax(student.double() / temperature, -1)
    return ref_div(name, p, q, **KW.get(name, {}))


# ------------------------------------------------------------------------------------------
# Targets built from teacher logits (plain torch).
# ------------------------------------------------------------------------------------------
GARBAGE = 123.0  # what padding entries hold in logprobs: must never matter


def logits_pair(n, vocab, seed, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, vocab, generator=g) * scale, torch.randn(n, vocab, generator=g) * scale


def topk_targets(teacher, k, *, seed=0, tail=True, pad_row=None):
    """The k most likely ids per row in a shuffled order; ``pad_row`` keeps only k - 2 of them,
    with the padding (-1) in the middle of the row."""
    vocab = teacher.shape[-1]
    lp = teacher.double().log_softmax(-1)
    top = lp.topk(k, -1).indices
    g = torch.Generator().manual_seed(seed)
    ids = top.gather(-1, torch.rand(top.shape, generator=g).argsort(-1))
    if pad_row is not None:
        ids[pad_row, 1] = -1
        ids[pad_row, k - 2] = -1
    valid = ids >= 0
    logprobs = torch.where(
        valid, lp.gather(-1, ids.clamp_min(0)), torch.tensor(GARBAGE, dtype=torch.float64)
    )
    rest = (lp.exp() * ~set_mask_of(ids, vocab)).sum(-1)
    return SparseTargets(
        kind="topk",
        ids=ids,
        logprobs=logprobs.float(),
        vocab_size=vocab,
        tail_logprob=rest.log().float() if tail else None,
    )


def full_vocab_targets(teacher, *, seed=0, extra_padding=2):
    """Top-k with K = V (every id, shuffled) plus padding columns: the exact dense teacher."""
    n, vocab = teacher.shape
    g = torch.Generator().manual_seed(seed)
    ids = torch.rand(n, vocab, generator=g).argsort(-1)
    ids = torch.cat([ids[:, :3], torch.full((n, extra_padding), -1), ids[:, 3:]], -1)
    lp = teacher.double().log_softmax(-1)
    logprobs = torch.where(
        ids >= 0, lp.gather(-1, ids.clamp_min(0)), torch.tensor(GARBAGE, dtype=torch.float64)
    )
    return SparseTargets(
        kind="topk",
        ids=ids,
        logprobs=logprobs.float(),
        vocab_size=vocab,
        tail_logprob=torch.full((n,), NEG_INF),
    )


def sampled_targets(teacher, num_samples, *, seed=0, sample_temperature=1.0, compact=True):
    """Draws from softmax(teacher / T_s) as a cache stores them: distinct ids, counts, the
    teacher's log-probabilities at temperature 1; rows padded with id -1 (count 0)."""
    n, vocab = teacher.shape
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(teacher.double() / sample_temperature, -1)
    draws = torch.multinomial(probs.float(), num_samples, replacement=True, generator=g)
    counts_full = torch.zeros(n, vocab).scatter_add_(-1, draws, torch.ones(draws.shape))
    lp = teacher.double().log_softmax(-1).float()
    if not compact:  # one column per id, padding at the ids never drawn
        ids = torch.where(counts_full > 0, torch.arange(vocab).expand(n, vocab), -1)
        return SparseTargets(
            kind="sampled",
            ids=ids,
            logprobs=torch.where(ids >= 0, lp, GARBAGE),
            vocab_size=vocab,
            counts=counts_full,
            num_samples=num_samples,
            sample_temperature=sample_temperature,
        )
    width = int((counts_full > 0).sum(-1).max())
    ids = torch.full((n, width), -1)
    counts = torch.zeros(n, width)
    logprobs = torch.full((n, width), GARBAGE)
    for r in range(n):
        drawn = (counts_full[r] > 0).nonzero().squeeze(-1)
        ids[r, : len(drawn)] = drawn
        counts[r, : len(drawn)] = counts_full[r, drawn]
        logprobs[r, : len(drawn)] = lp[r, drawn]
    return SparseTargets(
        kind="sampled",
        ids=ids,
        logprobs=logprobs,
        vocab_size=vocab,
        counts=counts,
        num_samples=num_samples,
        sample_temperature=sample_temperature,
    )


def sampled_by_hand():
    """Two positions over V = 6: counts (3, 1) and (2, 1, 1) of N = 4 draws, with padding."""
    ids = torch.tensor([[4, -1, 1, -1], [0, 2, -1, 5]])
    counts = torch.tensor([[3.0, 0.0, 1.0, 0.0], [2.0, 1.0, 0.0, 1.0]])
    logprobs = torch.tensor(
        [
            [math.log(0.5), GARBAGE, math.log(0.2), -GARBAGE],
            [math.log(0.4), math.log(0.1), float("nan"), math.log(0.3)],
        ]
    )
    return ids, counts, logprobs


MASK_LABELS = torch.tensor([[1, -100, 3, 4], [-100, 0, 2, -100]])


# ------------------------------------------------------------------------------------------
# sparse_target_logprobs.
# ------------------------------------------------------------------------------------------
def test_topk_at_temperature_one_returns_the_stored_values():
    _, t = logits_pair(5, 9, seed=1)
    targets = topk_targets(t, 4, pad_row=2)
    ids, log_p, log_p_rest, valid = LF.sparse_target_logprobs(targets, 1.0)
    assert torch.equal(valid, targets.ids >= 0)
    assert torch.equal(log_p[valid], targets.logprobs[valid])
    assert torch.equal(log_p_rest, targets.tail_logprob)
    assert log_p.dtype == log_p_rest.dtype == torch.float32
    # Padding: a large finite negative log-probability, and an id of the same row.
    assert torch.isfinite(log_p).all() and (log_p[~valid] <= -1e3).all()
    assert torch.equal(ids[valid], targets.ids[valid])
    for r in range(5):
        real = set(targets.ids[r][valid[r]].tolist())
        assert set(ids[r].tolist()) == real


def test_rows_without_entries_point_padding_at_id_zero():
    ids = torch.tensor([[-1, -1, -1], [-1, 3, -1]])
    targets = SparseTargets(
        "topk", ids, torch.zeros(2, 3), vocab_size=5, tail_logprob=torch.tensor([0.0, -1.0])
    )
    safe, log_p, log_p_rest, valid = LF.sparse_target_logprobs(targets, 2.0)
    assert safe.tolist() == [[0, 0, 0], [3, 3, 3]]
    # The empty row: everything in the rest bucket.
    assert log_p_rest[0].item() == 0.0 and (log_p[0] <= -1e3).all()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.0, 4.0])
@pytest.mark.parametrize("kind", ["topk", "topk_no_tail", "sampled"])
def test_coarse_distribution_sums_to_one(temperature, kind):
    _, t = logits_pair(6, 12, seed=2)
    if kind == "sampled":
        targets = sampled_targets(t, 20, seed=3, sample_temperature=1.5)
    else:
        targets = topk_targets(t, 5, tail=kind == "topk", pad_row=1)
    _, log_p, log_p_rest, valid = LF.sparse_target_logprobs(targets, temperature)
    total = log_p.double().exp().sum(-1) + log_p_rest.double().exp()
    torch.testing.assert_close(total, torch.ones(6, dtype=torch.float64), rtol=0, atol=2e-6)
    assert torch.isfinite(log_p).all() and torch.isfinite(log_p_rest).all()
    if kind != "topk":
        assert (log_p_rest.exp() == 0).all()


def test_uniform_tail_by_hand():
    # V = 5, ids {3, 0} with p = (0.5, 0.3), tail 0.2 spread over 3 ids. At T = 2 the weights
    # are sqrt(0.5), sqrt(0.3) and 3 * sqrt(0.2 / 3).
    targets = SparseTargets(
        "topk",
        torch.tensor([[3, 0]]),
        torch.tensor([[math.log(0.5), math.log(0.3)]]),
        vocab_size=5,
        tail_logprob=torch.tensor([math.log(0.2)]),
    )
    weights = [math.sqrt(0.5), math.sqrt(0.3), 3 * math.sqrt(0.2 / 3)]
    expected = [w / sum(weights) for w in weights]
    _, log_p, log_p_rest, _ = LF.sparse_target_logprobs(targets, 2.0)
    got = [*log_p[0].exp().tolist(), log_p_rest.exp().item()]
    assert got == pytest.approx(expected, rel=1e-6)
    # At T = 1/2: squares.
    weights = [0.25, 0.09, 3 * (0.2 / 3) ** 2]
    _, log_p, log_p_rest, _ = LF.sparse_target_logprobs(targets, 0.5)
    got = [*log_p[0].exp().tolist(), log_p_rest.exp().item()]
    assert got == pytest.approx([w / sum(weights) for w in weights], rel=1e-6)


@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_uniform_tail_against_hand_formula_and_power_mean_bound(temperature):
    _, t = logits_pair(6, 15, seed=4, scale=2.5)
    targets = topk_targets(t, 4, pad_row=3)
    expected = uniform_tail_teacher(
        targets.logprobs, targets.ids, targets.tail_logprob, 15, temperature
    )
    _, log_p, log_p_rest, _ = LF.sparse_target_logprobs(targets, temperature)
    got = torch.cat([log_p.exp(), log_p_rest.exp().unsqueeze(-1)], -1).double()
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-7)
    # Against the true teacher at T coarse-grained: the uniform tail has too much mass for
    # T > 1 and too little for T < 1 (power-mean inequality; the tails here are not flat).
    true = coarse(torch.softmax(t.double() / temperature, -1), targets.ids)
    if temperature > 1:
        assert (got[:, -1] > true[:, -1]).all()
    else:
        assert (got[:, -1] < true[:, -1]).all()


def test_topk_without_tail_renormalises_the_head():
    targets = SparseTargets(
        "topk",
        torch.tensor([[2, -1, 7]]),
        torch.tensor([[math.log(0.3), 5.0, math.log(0.1)]]),
        vocab_size=8,
    )
    for temperature, (a, b) in [(1.0, (0.3, 0.1)), (2.0, (math.sqrt(0.3), math.sqrt(0.1)))]:
        _, log_p, log_p_rest, valid = LF.sparse_target_logprobs(targets, temperature)
        assert log_p[0, [0, 2]].exp().tolist() == pytest.approx(
            [a / (a + b), b / (a + b)], rel=1e-6
        )
        assert log_p_rest.exp().item() == 0.0 and log_p[0, 1].exp().item() == 0.0


@pytest.mark.parametrize("sample_temperature", [1.0, 2.0])
def test_sampled_at_sample_temperature_is_counts_over_n(sample_temperature):
    ids, counts, logprobs = sampled_by_hand()
    targets = SparseTargets(
        "sampled",
        ids,
        logprobs,
        vocab_size=6,
        counts=counts,
        num_samples=4,
        sample_temperature=sample_temperature,
    )
    _, log_p, log_p_rest, valid = LF.sparse_target_logprobs(targets, sample_temperature)
    expected = torch.tensor([[3, 0, 1, 0], [2, 1, 0, 1]], dtype=torch.float64) / 4
    torch.testing.assert_close(log_p.double().exp(), expected, rtol=1e-6, atol=0)
    assert (log_p_rest.exp() == 0).all()
    assert torch.isfinite(log_p).all()


@pytest.mark.parametrize("temperature,sample_temperature", [(2.0, 1.0), (1.0, 2.0), (0.7, 1.3)])
def test_sampled_self_normalised_weights_by_hand(temperature, sample_temperature):
    ids, counts, logprobs = sampled_by_hand()
    targets = SparseTargets(
        "sampled",
        ids,
        logprobs,
        vocab_size=6,
        counts=counts,
        num_samples=4,
        sample_temperature=sample_temperature,
    )
    _, log_p, _, _ = LF.sparse_target_logprobs(targets, temperature)
    c = 1 / temperature - 1 / sample_temperature
    for row, entries in enumerate(
        [[(3, 0.5, 0), (1, 0.2, 2)], [(2, 0.4, 0), (1, 0.1, 1), (1, 0.3, 3)]]
    ):
        weights = [n * p**c for n, p, _ in entries]
        for (_, _, col), w in zip(entries, weights):
            assert log_p[row, col].exp().item() == pytest.approx(w / sum(weights), rel=1e-5)


def test_sparse_target_logprobs_keeps_leading_shape():
    _, t = logits_pair(6, 10, seed=5)
    targets = topk_targets(t, 3)
    shaped = SparseTargets(
        "topk",
        targets.ids.view(2, 3, 3),
        targets.logprobs.view(2, 3, 3),
        10,
        tail_logprob=targets.tail_logprob.view(2, 3),
    )
    ids, log_p, log_p_rest, valid = LF.sparse_target_logprobs(shaped, 2.0)
    assert ids.shape == log_p.shape == valid.shape == (2, 3, 3) and log_p_rest.shape == (2, 3)
    assert ids.dtype == torch.int64


# ------------------------------------------------------------------------------------------
# Top-k with K = V: the dense divergences exactly.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [0.5, 1.0, 2.5])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_full_vocabulary_topk_equals_dense(name, temperature, chunk_size):
    s0, t = logits_pair(8, 7, seed=6)
    s0, t = s0.view(2, 4, 7), t.view(2, 4, 7)
    targets = full_vocab_targets(t.view(8, 7))
    targets = SparseTargets(
        "topk",
        targets.ids.view(2, 4, -1),
        targets.logprobs.view(2, 4, -1),
        7,
        tail_logprob=targets.tail_logprob.view(2, 4),
    )
    valid = MASK_LABELS != -100
    kw = {"temperature": temperature, "labels": MASK_LABELS, "chunk_size": chunk_size}
    ref_s = s0.double().requires_grad_(True)
    ref = ref_dense_rows(name, ref_s, t, temperature)
    ref[valid].mean().backward()

    s = s0.clone().requires_grad_(True)
    out = sparse(name, s, targets, **kw)
    out.backward()
    assert out.dtype == torch.float32 and out.dim() == 0
    assert out.item() == pytest.approx(ref[valid].mean().item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=0, atol=1e-6)
    # ... and the dense function of the same name.
    dense_s = s0.clone().requires_grad_(True)
    dense = getattr(LF, name)(dense_s, t, **{**KW.get(name, {}), **kw})
    dense.backward()
    assert out.item() == pytest.approx(dense.item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(s.grad, dense_s.grad, rtol=0, atol=1e-6)

    total, count = sparse(name, s0, targets, reduction="sum_and_count", **kw)
    assert int(count) == 5
    assert total.item() == pytest.approx(ref[valid].sum().item(), rel=1e-5, abs=1e-7)
    none = sparse(name, s0, targets, reduction="none", **kw)
    assert none.shape == (2, 4) and (none[~valid] == 0).all()
    torch.testing.assert_close(none[valid].double(), ref[valid].detach(), rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Top-k with K < V: the coarse-grained divergence.
# ------------------------------------------------------------------------------------------
def test_forward_kl_is_the_coarse_grained_kl_by_hand():
    # P = (0.5, 0.2, 0.2, 0.1), Q = (0.25, 0.25, 0.25, 0.25); targets: ids {0, 2}, rest {1, 3}.
    # Coarse: P~ = (0.5, 0.2, 0.3), Q~ = (0.25, 0.25, 0.5).
    p = [0.5, 0.2, 0.2, 0.1]
    student = torch.zeros(1, 4)
    targets = SparseTargets(
        "topk",
        torch.tensor([[0, 2]]),
        torch.tensor([[math.log(0.5), math.log(0.2)]]),
        vocab_size=4,
        tail_logprob=torch.tensor([math.log(0.3)]),
    )
    L = math.log
    coarse_kl = 0.5 * L(0.5 / 0.25) + 0.2 * L(0.2 / 0.25) + 0.3 * L(0.3 / 0.5)
    dense_kl = sum(pi * L(pi / 0.25) for pi in p)
    got = LF.sparse_forward_kl(student, targets).item()
    assert got == pytest.approx(coarse_kl, rel=1e-6)
    assert got < dense_kl
    # Gradient: q - P^, P^ = (0.5, 0.25 * 0.3 / 0.5, 0.2, 0.25 * 0.3 / 0.5).
    s = student.clone().requires_grad_(True)
    LF.sparse_forward_kl(s, targets).backward()
    assert s.grad[0].tolist() == pytest.approx(
        [0.25 - 0.5, 0.25 - 0.15, 0.25 - 0.2, 0.25 - 0.15], abs=1e-6
    )


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_partial_topk_forward_kl_is_a_lower_bound_of_dense(seed):
    s, t = logits_pair(16, 20, seed=10 + seed, scale=3.0)
    targets = topk_targets(t, 5, pad_row=4)
    expected = ref_coarse_rows(
        "forward_kl", s, coarse(torch.softmax(t.double(), -1), targets.ids), targets.ids, 1.0
    )
    rows = LF.sparse_forward_kl(s, targets, reduction="none")
    torch.testing.assert_close(rows.double(), expected, rtol=1e-5, atol=1e-6)
    dense = ref_dense_rows("forward_kl", s, t, 1.0)
    assert (rows.double() <= dense + 1e-6).all()
    assert (rows.double() < dense).any()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [1.0, 0.5, 2.0])
@pytest.mark.parametrize("tail", [True, False])
def test_partial_topk_matches_coarse_reference(name, temperature, tail):
    s0, t = logits_pair(8, 13, seed=20)
    targets = topk_targets(t, 4, tail=tail, pad_row=5)
    labels = MASK_LABELS.reshape(-1)
    valid = labels != -100
    if name == "reverse_kl" and not tail:
        with pytest.raises(ValueError, match="tail"):
            sparse(name, s0, targets)
        return
    if not tail:
        p_head = torch.where(
            targets.ids >= 0,
            (targets.logprobs.double() / temperature).exp(),
            torch.zeros(()).double(),
        )
        p_coarse = torch.cat(
            [p_head / p_head.sum(-1, keepdim=True), torch.zeros(8, 1, dtype=torch.float64)], -1
        )
    elif temperature == 1.0:
        p_coarse = coarse(torch.softmax(t.double(), -1), targets.ids)
    else:
        p_coarse = uniform_tail_teacher(
            targets.logprobs, targets.ids, targets.tail_logprob, 13, temperature
        )
    ref_s = s0.double().requires_grad_(True)
    ref = ref_coarse_rows(name, ref_s, p_coarse, targets.ids, temperature)
    ref[valid].mean().backward()
    for chunk_size in (None, 2):
        s = s0.clone().requires_grad_(True)
        out = sparse(
            name, s, targets, temperature=temperature, labels=labels, chunk_size=chunk_size
        )
        out.backward()
        assert out.item() == pytest.approx(ref[valid].mean().item(), rel=1e-5, abs=1e-7)
        torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_reduction_none_is_differentiable(name):
    s0, t = logits_pair(5, 9, seed=21)
    targets = topk_targets(t, 3, pad_row=0)
    p_coarse = coarse(torch.softmax(t.double(), -1), targets.ids)
    s = s0.clone().requires_grad_(True)
    rows = sparse(name, s, targets, reduction="none", chunk_size=2)
    assert rows.requires_grad and rows.shape == (5,)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0, 0.25])
    (rows * weights).sum().backward()
    ref_s = s0.double().requires_grad_(True)
    (ref_coarse_rows(name, ref_s, p_coarse, targets.ids, 1.0) * weights.double()).sum().backward()
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd", "tvd"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_student_computed_in_float32(name, dtype):
    s32, t = logits_pair(6, 10, seed=22)
    s0 = s32.to(dtype)
    targets = topk_targets(t, 4)
    p_coarse = coarse(torch.softmax(t.double(), -1), targets.ids)
    s = s0.clone().requires_grad_(True)
    out = sparse(name, s, targets, chunk_size=4)
    out.backward()
    assert out.dtype == torch.float32 and s.grad.dtype == dtype
    ref_s = s0.double().requires_grad_(True)
    ref = ref_coarse_rows(name, ref_s, p_coarse, targets.ids, 1.0).mean()
    ref.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    rtol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=rtol, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Sampled targets.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_estimator_is_unbiased_at_the_sample_temperature(temperature):
    rows, vocab, draws_per_position, repeats = 3, 10, 50, 2000
    s, t = logits_pair(rows, vocab, seed=30, scale=1.5)
    teacher = t.repeat(repeats, 1)
    targets = sampled_targets(
        teacher, draws_per_position, seed=31, sample_temperature=temperature, compact=False
    )
    student = s.repeat(repeats, 1).requires_grad_(True)
    total, count = LF.sparse_forward_kl(
        student, targets, temperature=temperature, reduction="sum_and_count"
    )
    total.backward()
    assert int(count) == rows * repeats
    mean_grad = student.grad.double().view(repeats, rows, vocab).mean(0)

    p = torch.softmax(t.double() / temperature, -1)
    q = torch.softmax(s.double() / temperature, -1)
    dense_grad = (q - p) / temperature
    # Each draw's gradient is (q - c / N) / T, with Var(c_i / N) = p_i (1 - p_i) / N: the mean of
    # R draws is off by sqrt(sum_i p_i (1 - p_i) / (N R)) / T (rms, per row). Allow 5 of that.
    rms = ((p * (1 - p)).sum(-1) / (draws_per_position * repeats)).sqrt() / temperature
    err = (mean_grad - dense_grad).norm(dim=-1)
    assert (err < 5 * rms).all(), (err, rms)
    assert (5 * rms / dense_grad.norm(dim=-1) < 0.05).all()  # the bound is a < 5% relative error

    if temperature == 1.0:
        # Value: sum_i (c_i / N) (log p_i - log q_i): unbiased, per-draw variance
        # Var_p(log p/q) / N.
        values = (
            LF.sparse_forward_kl(student.detach(), targets, reduction="none")
            .double()
            .view(repeats, rows)
        )
        log_ratio = p.log() - q.log()
        dense_kl = (p * log_ratio).sum(-1)
        var = (p * log_ratio.square()).sum(-1) - dense_kl.square()
        sd = (var / (draws_per_position * repeats)).sqrt()
        assert ((values.mean(0) - dense_kl).abs() < 5 * sd).all()
        # The plug-in coarse KL, sum_i p~_i log(p~_i / q_i), is biased upwards by ~(#ids - 1) / 2N.
        p_tilde = targets.counts.double() / draws_per_position
        plug_in = (
            (xlogy(p_tilde, p_tilde) - xlogy(p_tilde, q.repeat(repeats, 1)))
            .sum(-1)
            .view(repeats, rows)
        )
        assert ((plug_in.mean(0) - dense_kl) > 5 * sd).all()


def test_sampled_forward_kl_value_and_gradient_by_hand():
    # T = 1 drawn at T_s = 2: weights c_i p_i^(1 - 1/2), value sum_i w_i (log p_i - log q_i).
    ids, counts, logprobs = sampled_by_hand()
    targets = SparseTargets(
        "sampled", ids, logprobs, vocab_size=6, counts=counts, num_samples=4, sample_temperature=2.0
    )
    s0 = torch.tensor([[0.1, -0.3, 0.7, 0.0, 1.2, -1.0], [0.5, 0.2, -0.4, 0.9, 0.0, 0.3]])
    w = importance_teacher(logprobs, ids, counts, 1.0, 2.0)
    q = torch.softmax(s0.double(), -1)
    expected = []
    for r in range(2):
        expected.append(
            sum(
                w[r, k].item() * (logprobs[r, k].item() - math.log(q[r, ids[r, k]].item()))
                for k in range(4)
                if ids[r, k] >= 0
            )
        )
    rows = LF.sparse_forward_kl(s0, targets, reduction="none")
    assert rows.tolist() == pytest.approx(expected, rel=1e-5)
    s = s0.clone().requires_grad_(True)
    LF.sparse_forward_kl(s, targets, reduction="sum_and_count")[0].backward()
    p_hat = torch.zeros(2, 6, dtype=torch.float64)
    for r in range(2):
        for k in range(4):
            if ids[r, k] >= 0:
                p_hat[r, ids[r, k]] = w[r, k]
    torch.testing.assert_close(s.grad.double(), q - p_hat, rtol=0, atol=1e-6)


def test_sampled_forward_kl_is_zero_when_the_student_is_the_teacher():
    _, t = logits_pair(6, 12, seed=32)
    targets = sampled_targets(t, 16, seed=33)
    s = t.clone().requires_grad_(True)
    rows = LF.sparse_forward_kl(s, targets, reduction="none")
    assert rows.abs().max().item() < 1e-6


@pytest.mark.parametrize("name", ["generalized_jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_sampled_divergences_against_importance_weights(name, temperature):
    s0, t = logits_pair(8, 11, seed=34)
    targets = sampled_targets(t, 12, seed=35, sample_temperature=1.5)
    p_coarse = importance_teacher(targets.logprobs, targets.ids, targets.counts, temperature, 1.5)
    labels = MASK_LABELS.reshape(-1)
    valid = labels != -100
    ref_s = s0.double().requires_grad_(True)
    ref = ref_coarse_rows(name, ref_s, p_coarse, targets.ids, temperature)
    ref[valid].mean().backward()
    s = s0.clone().requires_grad_(True)
    out = sparse(name, s, targets, temperature=temperature, labels=labels, chunk_size=3)
    out.backward()
    assert out.item() == pytest.approx(ref[valid].mean().item(), rel=1e-5, abs=1e-7)
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Padding, empty rows, masked rows.
# ------------------------------------------------------------------------------------------
def with_extra_padding(targets, seed=0):
    """The same targets with three more padding columns (garbage values) spliced in."""
    n, k = targets.ids.shape
    g = torch.Generator().manual_seed(seed)
    junk = torch.tensor([float("nan"), float("inf"), -float("inf")]).expand(n, 3)

    def splice(x, fill):
        return torch.cat([x[:, :1], fill, x[:, 1:]], -1)

    return SparseTargets(
        kind=targets.kind,
        ids=splice(targets.ids, torch.full((n, 3), -1)),
        logprobs=splice(targets.logprobs, junk),
        vocab_size=targets.vocab_size,
        tail_logprob=targets.tail_logprob,
        counts=None
        if targets.counts is None
        else splice(targets.counts, torch.randint(0, 9, (n, 3), generator=g).float()),
        num_samples=targets.num_samples,
        sample_temperature=targets.sample_temperature,
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("kind", ["topk", "sampled"])
def test_padding_entries_never_change_results(name, kind):
    s0, t = logits_pair(8, 10, seed=40)
    if kind == "sampled":
        if name == "reverse_kl":
            return
        targets = sampled_targets(t, 8, seed=41, sample_temperature=1.3)
    else:
        targets = topk_targets(t, 4, pad_row=2)
    padded = with_extra_padding(targets)
    for temperature in (1.0, 2.0):
        a, b = s0.clone().requires_grad_(True), s0.clone().requires_grad_(True)
        out_a = sparse(name, a, targets, temperature=temperature, chunk_size=3)
        out_b = sparse(name, b, padded, temperature=temperature, chunk_size=3)
        out_a.backward()
        out_b.backward()
        assert out_b.item() == pytest.approx(out_a.item(), rel=1e-6, abs=1e-8)
        torch.testing.assert_close(b.grad, a.grad, rtol=0, atol=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_rows_without_entries_contribute_zero(name):
    # A position with no entry and no tail (a padded position): one outcome, the whole
    # vocabulary, on both sides, so the divergence and its gradient are 0 there.
    s0, t = logits_pair(4, 8, seed=42)
    targets = topk_targets(t, 3)
    ids = targets.ids.clone()
    ids[1] = -1
    # reverse_kl needs a tail; the row's tail then holds everything (log 1 = 0), as a cache pads.
    tail = targets.tail_logprob.clone() if name == "reverse_kl" else None
    if tail is not None:
        tail[1] = 0.0
    targets = SparseTargets("topk", ids, targets.logprobs, 8, tail_logprob=tail)
    s = s0.clone().requires_grad_(True)
    rows = sparse(name, s, targets, reduction="none")
    assert rows[1].item() == pytest.approx(0.0, abs=1e-6)
    rows.sum().backward()
    assert s.grad[1].abs().max().item() < 1e-6


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [float("inf"), -float("inf"), float("nan")])
def test_non_finite_masked_rows_do_not_leak(name, bad):
    s0, t = logits_pair(8, 10, seed=43)
    targets = topk_targets(t, 4, pad_row=0)
    labels = MASK_LABELS.reshape(-1)
    valid = labels != -100
    s_bad = s0.clone()
    s_bad[~valid] = bad
    logprobs, tail = targets.logprobs.clone(), targets.tail_logprob.clone()
    logprobs[~valid] = float("nan")
    tail[~valid] = bad
    bad_targets = SparseTargets("topk", targets.ids, logprobs, 10, tail_logprob=tail)
    for chunk_size in (None, 3):
        clean = s0.clone().requires_grad_(True)
        dirty = s_bad.clone().requires_grad_(True)
        ref = sparse(name, clean, targets, labels=labels, chunk_size=chunk_size)
        out = sparse(name, dirty, bad_targets, labels=labels, chunk_size=chunk_size)
        ref.backward()
        out.backward()
        assert math.isfinite(out.item()) and out.item() == pytest.approx(ref.item(), rel=1e-6)
        assert torch.isfinite(dirty.grad).all() and (dirty.grad[~valid] == 0).all()
        torch.testing.assert_close(dirty.grad, clean.grad, rtol=0, atol=1e-7)
        none = sparse(name, s_bad, bad_targets, labels=labels, reduction="none")
        assert torch.isfinite(none).all() and (none[~valid] == 0).all()


def test_all_masked_and_custom_ignore_index():
    s, t = logits_pair(4, 6, seed=44)
    targets = topk_targets(t, 2)
    total, count = LF.sparse_forward_kl(
        s, targets, labels=torch.full((4,), -100), reduction="sum_and_count"
    )
    assert total.item() == 0.0 and int(count) == 0
    labels = torch.tensor([5, 1, 5, 2])
    expected = ref_coarse_rows(
        "forward_kl", s, coarse(torch.softmax(t.double(), -1), targets.ids), targets.ids, 1.0
    )
    got = LF.sparse_forward_kl(s, targets, labels=labels, ignore_index=5)
    assert got.item() == pytest.approx(expected[[1, 3]].mean().item(), rel=1e-5)


# ------------------------------------------------------------------------------------------
# Errors.
# ------------------------------------------------------------------------------------------
def test_reverse_kl_on_sampled_targets_raises():
    s, t = logits_pair(4, 6, seed=50)
    targets = sampled_targets(t, 5, seed=51)
    for call in (
        lambda: LF.sparse_reverse_kl(s, targets),
        lambda: LF.sparse_skew_reverse_kl(s, targets, alpha=0.0),
    ):
        with pytest.raises(ValueError) as info:
            call()
        message = str(info.value)
        assert "sampled" in message
        assert "forward_kl" in message and "generalized_jsd" in message and "topk" in message
    # With alpha > 0 the mixture keeps the student's own mass: finite.
    assert math.isfinite(LF.sparse_skew_reverse_kl(s, targets, alpha=0.1).item())


def test_divergence_lookup():
    assert set(LF.SPARSE_DIVERGENCES) == set(NAMES) == set(LF.DIVERGENCES) - {"logit_mse"}
    for name in NAMES:
        assert LF.sparse_divergence(name) is getattr(LF, f"sparse_{name}")
        assert LF.SPARSE_DIVERGENCES[name] is getattr(LF, f"sparse_{name}")
    with pytest.raises(ValueError, match="logit_mse.*dense teacher logits.*kind=dense") as info:
        LF.sparse_divergence("logit_mse")
    assert "forward_kl" in str(info.value)
    with pytest.raises(ValueError, match="unknown divergence 'kl'") as info:
        LF.sparse_divergence("kl")
    assert "generalized_jsd" in str(info.value) and "tvd" in str(info.value)
    for name in LF.__all__:
        assert hasattr(LF, name)


def test_ids_outside_the_vocabulary_raise_naming_the_id_and_vocab():
    s = torch.zeros(2, 6)
    targets = SparseTargets(
        "topk",
        torch.tensor([[0, 7], [2, -1]]),
        torch.zeros(2, 2),
        vocab_size=8,
        tail_logprob=torch.zeros(2),
    )
    for name in NAMES:
        with pytest.raises(ValueError) as info:
            sparse(name, s, targets)
        assert "7" in str(info.value) and "6" in str(info.value)
    with pytest.raises(ValueError, match="7"):
        LF.fused_forward_kl_and_ce(s, targets, torch.zeros(2, dtype=torch.long))
    declared = SparseTargets("topk", torch.tensor([[0, 5]]), torch.zeros(1, 2), vocab_size=4)
    with pytest.raises(ValueError, match="vocab_size=4"):
        LF.sparse_forward_kl(torch.zeros(1, 6), declared)


def test_repeated_ids_raise():
    targets = SparseTargets("topk", torch.tensor([[1, 3, 1]]), torch.zeros(1, 3), vocab_size=5)
    with pytest.raises(ValueError, match="repeat"):
        LF.sparse_forward_kl(torch.zeros(1, 5), targets)
    padded_twice = SparseTargets(
        "topk", torch.tensor([[1, -1, -1]]), torch.zeros(1, 3), vocab_size=5
    )
    assert math.isfinite(LF.sparse_forward_kl(torch.zeros(1, 5), padded_twice).item())


def test_shape_mismatches_raise():
    s = torch.zeros(2, 3, 6)
    good = SparseTargets("topk", torch.tensor([0, 1]).repeat(2, 3, 1), torch.zeros(2, 3, 2), 6)
    assert math.isfinite(LF.sparse_forward_kl(s, good).item())
    with pytest.raises(ValueError, match=r"\(2, 4, 2\).*\(2, 3\)"):
        LF.sparse_forward_kl(
            s,
            SparseTargets("topk", torch.zeros(2, 4, 2, dtype=torch.long), torch.zeros(2, 4, 2), 6),
        )
    with pytest.raises(ValueError, match="logprobs"):
        LF.sparse_forward_kl(s, SparseTargets("topk", good.ids, torch.zeros(2, 3, 3), 6))
    with pytest.raises(ValueError, match="tail_logprob"):
        LF.sparse_forward_kl(
            s, SparseTargets("topk", good.ids, good.logprobs, 6, tail_logprob=torch.zeros(3))
        )
    with pytest.raises(ValueError, match="counts"):
        LF.sparse_forward_kl(s, SparseTargets("sampled", good.ids, good.logprobs, 6))
    with pytest.raises(ValueError, match="kind"):
        LF.sparse_forward_kl(s, SparseTargets("dense", good.ids, good.logprobs, 6))
    with pytest.raises(TypeError, match="integer"):
        LF.sparse_forward_kl(s, SparseTargets("topk", good.ids.float(), good.logprobs, 6))
    with pytest.raises(TypeError, match="SparseTargets"):
        LF.sparse_forward_kl(s, torch.zeros(2, 3, 6))
    with pytest.raises(ValueError, match="labels"):
        LF.sparse_forward_kl(s, good, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="reduction"):
        LF.sparse_forward_kl(s, good, reduction="sum")


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf")])
def test_bad_temperature_raises_naming_it(bad):
    _, t = logits_pair(2, 5, seed=52)
    targets = topk_targets(t, 2)
    for name in NAMES:
        with pytest.raises(ValueError, match=f"temperature.*{bad}"):
            sparse(name, torch.zeros(2, 5), targets, temperature=bad)
    with pytest.raises(ValueError, match=f"temperature.*{bad}"):
        LF.sparse_target_logprobs(targets, bad)
    with pytest.raises(TypeError):
        LF.sparse_target_logprobs(targets, "2")


def test_bad_mixture_parameters_raise():
    _, t = logits_pair(2, 5, seed=53)
    targets = topk_targets(t, 2)
    with pytest.raises(ValueError, match="beta"):
        LF.sparse_generalized_jsd(torch.zeros(2, 5), targets, beta=1.0)
    with pytest.raises(ValueError, match="alpha"):
        LF.sparse_skew_forward_kl(torch.zeros(2, 5), targets, alpha=1.0)


# ------------------------------------------------------------------------------------------
# fused_forward_kl_and_ce.
# ------------------------------------------------------------------------------------------
def fused_case(kind, seed=60):
    s0, t = logits_pair(8, 12, seed=seed)
    labels = torch.tensor([3, -100, 0, 11, 5, -100, 7, 2])
    if kind == "dense":
        return s0, t, labels
    if kind == "topk":
        return s0, topk_targets(t, 4, pad_row=2), labels
    targets = sampled_targets(t, 10, seed=seed + 1)
    ids, counts = targets.ids.clone(), targets.counts.clone()
    ids[4], counts[4] = -1, 0.0  # a position without entries but with a label: CE only
    return (
        s0,
        SparseTargets("sampled", ids, targets.logprobs, 12, counts=counts, num_samples=10),
        labels,
    )


def separate(s, teacher, labels, chunk_size=None):
    kd_fn = LF.forward_kl if isinstance(teacher, torch.Tensor) else LF.sparse_forward_kl
    kd, count = kd_fn(s, teacher, labels=labels, reduction="sum_and_count", chunk_size=chunk_size)
    ce, _ = LF.cross_entropy(s, labels, reduction="sum_and_count", chunk_size=chunk_size)
    return kd, ce, count


@pytest.mark.parametrize("kind", ["dense", "topk", "sampled"])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_fused_matches_separate_losses(kind, chunk_size):
    s0, teacher, labels = fused_case(kind)
    fused_s = s0.clone().requires_grad_(True)
    kd, ce, count = LF.fused_forward_kl_and_ce(fused_s, teacher, labels, chunk_size=chunk_size)
    (0.7 * kd + 1.3 * ce).backward()
    ref_s = s0.clone().requires_grad_(True)
    kd_ref, ce_ref, count_ref = separate(ref_s, teacher, labels)
    (0.7 * kd_ref + 1.3 * ce_ref).backward()
    assert int(count) == int(count_ref) == 6
    assert kd.item() == pytest.approx(kd_ref.item(), rel=1e-6)
    assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-6)
    ce_torch = F.cross_entropy(s0.double(), labels, ignore_index=-100, reduction="sum")
    assert ce.item() == pytest.approx(ce_torch.item(), rel=1e-6)
    torch.testing.assert_close(fused_s.grad, ref_s.grad, rtol=0, atol=1e-6)
    assert (fused_s.grad[labels == -100] == 0).all()
    # No-grad path: same values.
    with torch.no_grad():
        kd_ng, ce_ng, _ = LF.fused_forward_kl_and_ce(s0, teacher, labels, chunk_size=chunk_size)
    assert kd_ng.item() == pytest.approx(kd.item(), rel=1e-6)
    assert ce_ng.item() == pytest.approx(ce.item(), rel=1e-6)


@pytest.mark.parametrize("kind", ["dense", "topk"])
@pytest.mark.parametrize("weights", [(1.0, 0.0), (0.0, 1.0)])
def test_fused_one_output_alone(kind, weights):
    s0, teacher, labels = fused_case(kind, seed=61)
    fused_s = s0.clone().requires_grad_(True)
    kd, ce, _ = LF.fused_forward_kl_and_ce(fused_s, teacher, labels)
    (kd if weights[0] else ce).backward()
    ref_s = s0.clone().requires_grad_(True)
    kd_ref, ce_ref, _ = separate(ref_s, teacher, labels)
    (kd_ref if weights[0] else ce_ref).backward()
    torch.testing.assert_close(fused_s.grad, ref_s.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["dense", "topk", "sampled"])
def test_fused_non_finite_masked_rows(kind):
    s0, teacher, labels = fused_case(kind, seed=62)
    masked = labels == -100
    s_bad = s0.clone()
    s_bad[masked] = torch.tensor([float("nan"), float("inf")]).repeat(6)
    if kind == "dense":
        teacher_bad = teacher.clone()
        teacher_bad[masked] = -float("inf")
    else:
        logprobs = teacher.logprobs.clone()
        logprobs[masked] = float("nan")
        teacher_bad = SparseTargets(
            teacher.kind,
            teacher.ids,
            logprobs,
            12,
            tail_logprob=teacher.tail_logprob,
            counts=teacher.counts,
            num_samples=teacher.num_samples,
        )
    clean = s0.clone().requires_grad_(True)
    dirty = s_bad.clone().requires_grad_(True)
    out_clean = LF.fused_forward_kl_and_ce(clean, teacher, labels, chunk_size=3)
    out_dirty = LF.fused_forward_kl_and_ce(dirty, teacher_bad, labels, chunk_size=3)
    (out_clean[0] + out_clean[1]).backward()
    (out_dirty[0] + out_dirty[1]).backward()
    for a, b in zip(out_clean, out_dirty):
        assert b.item() == pytest.approx(a.item(), rel=1e-6)
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[masked] == 0).all()
    torch.testing.assert_close(dirty.grad, clean.grad, rtol=0, atol=1e-7)


def cached_sampled_case(seed, stored="entropy"):
    """Sampled targets as TeacherCache writes them (``verified``: draws first, count >= 1, then
    padding; with the teacher's entropy, its log-probs at the ids, or neither), with an empty
    row that has a label; and the same targets unverified, which take the general path."""
    s0, t = logits_pair(8, 12, seed=seed)
    labels = torch.tensor([3, -100, 0, 11, 5, -100, 7, 2])
    base = sampled_targets(t, 10, seed=seed + 1)
    ids, counts = base.ids.clone(), base.counts.clone()
    ids[4], counts[4] = -1, 0.0
    log_p = t.double().log_softmax(-1)
    entropy = -(log_p.exp() * log_p).sum(-1).float()

    def make(verified):
        return SparseTargets("sampled", ids.clone(), base.logprobs.clone() if stored == "logprobs" else None, 12,
                             counts=counts.clone(), num_samples=10, verified=verified,
                             entropy=entropy if stored == "entropy" else None)

    return s0, make(True), make(False), labels


@pytest.mark.parametrize("stored", ["entropy", "logprobs", None])
@pytest.mark.parametrize("chunk_size", [None, 3])
def test_fused_on_cache_written_sampled_targets(chunk_size, stored):
    """The fast path (no exp/log of the counts, no student q at the ids) equals the general one."""
    s0, fast, general, labels = cached_sampled_case(seed=64, stored=stored)
    a = s0.clone().requires_grad_(True)
    kd, ce, _ = LF.fused_forward_kl_and_ce(a, fast, labels, chunk_size=chunk_size)
    (0.7 * kd + 1.3 * ce).backward()
    b = s0.clone().requires_grad_(True)
    kd_ref, ce_ref, _ = separate(b, general, labels)
    (0.7 * kd_ref + 1.3 * ce_ref).backward()
    assert kd.item() == pytest.approx(kd_ref.item(), rel=1e-5)
    assert ce.item() == pytest.approx(ce_ref.item(), rel=1e-6)
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-6)
    # The empty row (4) gets the task gradient only: q - onehot(label).
    q = s0[4].softmax(-1)
    torch.testing.assert_close(a.grad[4], 1.3 * (q - F.one_hot(labels[4], 12).float()), rtol=0, atol=1e-6)
    if stored == "entropy":  # the unbiased KL: -H(p) - sum_k (c_k / N) log q_k over the unmasked rows
        mask = labels != -100
        p_hat = torch.zeros(8, 12).scatter_add_(-1, fast.ids.clamp_min(0), fast.counts) / 10
        expected = (-fast.entropy.double() - (p_hat.double() * s0.double().log_softmax(-1)).sum(-1))[mask].sum()
        assert kd.item() == pytest.approx(expected.item(), rel=1e-5)
    # The inputs are left as they were (the counts are float32 already: no in-place division).
    _, again, _, _ = cached_sampled_case(seed=64, stored=stored)
    assert torch.equal(fast.counts, again.counts) and torch.equal(fast.ids, again.ids)
    with torch.no_grad():
        kd_ng, ce_ng, _ = LF.fused_forward_kl_and_ce(s0, fast, labels, chunk_size=chunk_size)
    assert kd_ng.item() == pytest.approx(kd.item(), rel=1e-6)
    # A student that rules out token 0 (logit -inf) in the empty row: still finite (padding
    # never reads a log q of -inf times p = 0).
    ruled_out = s0.clone()
    ruled_out[4, 0] = -float("inf")
    kd_inf, ce_inf, _ = LF.fused_forward_kl_and_ce(ruled_out, fast, labels, chunk_size=chunk_size)
    assert torch.isfinite(kd_inf) and torch.isfinite(ce_inf)


def test_fused_on_cache_written_sampled_targets_ignores_masked_rows():
    s0, fast, _, labels = cached_sampled_case(seed=65)
    masked = labels == -100
    s_bad = s0.clone()
    s_bad[masked] = torch.tensor([float("nan"), -float("inf")]).repeat(6)
    dirty_targets = SparseTargets("sampled", fast.ids, None, 12, counts=fast.counts.clone(), num_samples=10,
                                  entropy=fast.entropy.clone(), verified=True)
    dirty_targets.entropy[masked] = float("nan")
    clean, dirty = s0.clone().requires_grad_(True), s_bad.clone().requires_grad_(True)
    out_clean = LF.fused_forward_kl_and_ce(clean, fast, labels, chunk_size=3)
    out_dirty = LF.fused_forward_kl_and_ce(dirty, dirty_targets, labels, chunk_size=3)
    (out_clean[0] + out_clean[1]).backward()
    (out_dirty[0] + out_dirty[1]).backward()
    for a, b in zip(out_clean, out_dirty):
        assert b.item() == pytest.approx(a.item(), rel=1e-6)
    assert torch.isfinite(dirty.grad).all() and (dirty.grad[masked] == 0).all()
    torch.testing.assert_close(dirty.grad, clean.grad, rtol=0, atol=1e-7)


def test_fused_half_precision_and_leading_shape():
    s0, teacher, labels = fused_case("topk", seed=63)
    s_half = s0.to(torch.bfloat16).view(2, 4, 12)
    targets = SparseTargets(
        "topk",
        teacher.ids.view(2, 4, -1),
        teacher.logprobs.view(2, 4, -1),
        12,
        tail_logprob=teacher.tail_logprob.view(2, 4),
    )
    s = s_half.clone().requires_grad_(True)
    kd, ce, count = LF.fused_forward_kl_and_ce(s, targets, labels.view(2, 4))
    (kd + ce).backward()
    assert (
        kd.dtype == ce.dtype == torch.float32
        and s.grad.dtype == torch.bfloat16
        and s.grad.shape == (2, 4, 12)
    )
    ref_s = s_half.float().clone().requires_grad_(True)
    kd_ref, ce_ref, _ = separate(ref_s, targets, labels.view(2, 4))
    (kd_ref + ce_ref).backward()
    assert kd.item() == pytest.approx(kd_ref.item(), rel=1e-6)
    torch.testing.assert_close(s.grad.float(), ref_s.grad, rtol=2**-7, atol=1e-6)


@pytest.mark.parametrize("kind", ["dense", "sampled"])
def test_fused_double_backward_raises(kind):
    s0, teacher, labels = fused_case(kind, seed=64)
    s = s0.clone().requires_grad_(True)
    kd, ce, _ = LF.fused_forward_kl_and_ce(s, teacher, labels)
    loss = kd + ce
    loss.backward(retain_graph=True)
    first = s.grad.clone()
    with pytest.raises(RuntimeError, match="differentiated twice.*retain_graph"):
        loss.backward()
    torch.testing.assert_close(s.grad, first)


def test_fused_input_validation():
    s0, teacher, labels = fused_case("dense", seed=65)
    with pytest.raises(ValueError, match="5 vs 12"):
        LF.fused_forward_kl_and_ce(s0, teacher[:, :5], labels)
    with pytest.raises(TypeError, match="integer"):
        LF.fused_forward_kl_and_ce(s0, teacher, labels.float())
    with pytest.raises(ValueError, match="labels"):
        LF.fused_forward_kl_and_ce(s0, teacher, labels[:4])
    with pytest.raises(TypeError, match="SparseTargets"):
        LF.fused_forward_kl_and_ce(s0, teacher.tolist(), labels)


def test_sampled_targets_without_logprobs_work_at_their_temperature_only():
    """A cache built with store_logprobs=False: same gradient as with them at T_s, refused elsewhere."""
    g = torch.Generator().manual_seed(3)
    student = torch.randn(4, 7, generator=g)
    ids = torch.tensor([[0, 2, -1], [1, 3, 5], [6, -1, -1], [0, 1, 2]])
    counts = torch.tensor([[3.0, 2.0, 0.0], [1.0, 1.0, 3.0], [5.0, 0.0, 0.0], [2.0, 2.0, 1.0]])
    logprobs = torch.randn(4, 3, generator=g) - 2.0
    with_lp = SparseTargets("sampled", ids, logprobs, 7, counts=counts, num_samples=5)
    without = SparseTargets("sampled", ids, None, 7, counts=counts, num_samples=5)
    grads = []
    for targets in (with_lp, without):
        z = student.clone().requires_grad_(True)
        LF.sparse_forward_kl(z, targets).backward()
        grads.append(z.grad)
    # Gradient q - counts/N, written out by hand.
    q = student.softmax(-1)
    p_hat = torch.zeros(4, 7).scatter_add_(-1, ids.clamp_min(0), counts / 5)
    torch.testing.assert_close(grads[1], (q - p_hat) / 4)
    torch.testing.assert_close(grads[0], grads[1])
    with pytest.raises(ValueError, match="without log-probabilities.*temperature=2.*store_logprobs=True"):
        LF.sparse_forward_kl(student, without, temperature=2.0)


def test_sampled_value_with_the_teacher_entropy_is_unbiased_without_logprobs():
    """-H(p) - sum counts/N log q averages to the dense KL; the plug-in value does not."""
    g = torch.Generator().manual_seed(11)
    teacher = torch.randn(6, 40, generator=g) * 1.5
    student = torch.randn(6, 40, generator=g)
    p = teacher.softmax(-1)
    entropy = -(p * p.log()).sum(-1)
    dense = float(LF.forward_kl(student, teacher))
    n, draws = 20, 1000
    with_h, plug_in = [], []
    for _ in range(draws):
        sample = torch.multinomial(p, n, replacement=True, generator=g)
        ordered = sample.sort(-1).values
        ids = torch.full((6, n), -1)
        counts = torch.zeros(6, n)
        for r in range(6):
            u, c = ordered[r].unique(return_counts=True)
            ids[r, : len(u)], counts[r, : len(u)] = u, c.float()
        base = SparseTargets("sampled", ids, None, 40, counts=counts, num_samples=n)
        with_h.append(float(LF.sparse_forward_kl(student, SparseTargets(
            "sampled", ids, None, 40, counts=counts, num_samples=n, entropy=entropy))))
        plug_in.append(float(LF.sparse_forward_kl(student, base)))
    mean = sum(with_h) / draws
    spread = (sum((v - mean) ** 2 for v in with_h) / (draws - 1)) ** 0.5 / draws**0.5
    assert abs(mean - dense) < 5 * spread + 1e-4
    assert sum(plug_in) / draws - dense > 10 * spread  # the plug-in value overstates the KL
