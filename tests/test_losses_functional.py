"""Property tests of lightning_distill.losses.functional.

Every expected value here is derived independently of the library: closed forms on tiny
hand-made distributions (written with ``math.log``), or a plain-torch float64 reference
written in this file. The library's own helpers are never used to compute an expectation.

Conventions: P is the teacher's distribution, Q the student's.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from lightning_distill.losses import functional as LF

NAMES = [
    "forward_kl",
    "reverse_kl",
    "generalized_jsd",
    "skew_forward_kl",
    "skew_reverse_kl",
    "tvd",
    "logit_mse",
]
# Extra keyword arguments used whenever a divergence is called with its "default" parameters.
KW = {
    "generalized_jsd": {"beta": 0.5},
    "skew_forward_kl": {"alpha": 0.1},
    "skew_reverse_kl": {"alpha": 0.1},
}


def call(name, student, teacher, **kw):
    return getattr(LF, name)(student, teacher, **{**KW.get(name, {}), **kw})


# ------------------------------------------------------------------------------------------
# Independent references.
# ------------------------------------------------------------------------------------------
def h_kl(p, q):
    """KL(p || q) on Python lists, 0 log 0 = 0."""
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q) if pi > 0)


def h_mix(a, b, w):
    return [w * ai + (1 - w) * bi for ai, bi in zip(a, b)]


def h_softmax(z, temperature=1.0):
    m = max(z)
    e = [math.exp((zi - m) / temperature) for zi in z]
    total = sum(e)
    return [x / total for x in e]


def hand(name, p, q, zs=None, zt=None, **kw):
    """Divergence of student Q from teacher P, by hand; zs/zt are the scaled logits (mse)."""
    if name == "forward_kl":
        return h_kl(p, q)
    if name == "reverse_kl":
        return h_kl(q, p)
    if name == "generalized_jsd":
        b = kw.get("beta", 0.5)
        m = h_mix(p, q, b)
        return b * h_kl(p, m) + (1 - b) * h_kl(q, m)
    if name == "skew_forward_kl":
        a = kw.get("alpha", 0.1)
        return h_kl(p, h_mix(p, q, a))
    if name == "skew_reverse_kl":
        a = kw.get("alpha", 0.1)
        return h_kl(q, h_mix(q, p, a))
    if name == "tvd":
        return 0.5 * sum(abs(pi - qi) for pi, qi in zip(p, q))
    if name == "logit_mse":
        return sum((a - b) ** 2 for a, b in zip(zs, zt))
    raise AssertionError(name)


def ref_rows(name, student, teacher, temperature=1.0, **kw):
    """Plain float64 autograd reference, one value per position (no chunking, no masking)."""
    zs = student.double() / temperature
    zt = teacher.double() / temperature
    log_q, log_p = torch.log_softmax(zs, -1), torch.log_softmax(zt, -1)
    q, p = log_q.exp(), log_p.exp()
    if name == "forward_kl":
        return F.kl_div(log_q, log_p, log_target=True, reduction="none").sum(-1)
    if name == "reverse_kl":
        return F.kl_div(log_p, log_q, log_target=True, reduction="none").sum(-1)
    if name == "generalized_jsd":
        b = kw.get("beta", 0.5)
        log_m = (b * p + (1 - b) * q).log()
        return b * (p * (log_p - log_m)).sum(-1) + (1 - b) * (q * (log_q - log_m)).sum(-1)
    if name == "skew_forward_kl":
        a = kw.get("alpha", 0.1)
        return (p * (log_p - (a * p + (1 - a) * q).log())).sum(-1)
    if name == "skew_reverse_kl":
        a = kw.get("alpha", 0.1)
        return (q * (log_q - (a * q + (1 - a) * p).log())).sum(-1)
    if name == "tvd":
        return 0.5 * (q - p).abs().sum(-1)
    if name == "logit_mse":
        return (zs - zt).square().sum(-1)
    raise AssertionError(name)


def logits_of(probs):
    return torch.tensor([[math.log(x) for x in probs]], dtype=torch.float32)


def rand_pair(shape, seed=0, scale=2.0, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    s = (torch.randn(shape, generator=g) * scale).to(dtype)
    t = (torch.randn(shape, generator=g) * scale).to(dtype)
    return s, t


P2, Q2 = [0.5, 0.5], [0.9, 0.1]
P3, Q3 = [0.2, 0.3, 0.5], [0.1, 0.6, 0.3]


# ------------------------------------------------------------------------------------------
# Values.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_zero_on_identical_inputs(name):
    s, _ = rand_pair((3, 4, 9), seed=1)
    assert call(name, s, s.clone()).item() == pytest.approx(0.0, abs=1e-6)
    # Also while the student requires grad (chunked autograd path): zero value, zero gradient.
    leaf = s.clone().requires_grad_(True)
    out = call(name, leaf, s.clone(), chunk_size=2)
    out.backward()
    assert out.item() == pytest.approx(0.0, abs=1e-6)
    assert leaf.grad.abs().max().item() < 1e-6


@pytest.mark.parametrize("name", NAMES)
def test_positive_on_different_inputs(name):
    s, t = rand_pair((3, 4, 9), seed=2)
    assert call(name, s, t).item() > 1e-3
    assert (call(name, s, t, reduction="none") > 0).all()


def test_hand_values_two_token_example():
    # P = (0.5, 0.5) teacher, Q = (0.9, 0.1) student, logits = log-probabilities.
    s, t = logits_of(Q2), logits_of(P2)
    L = math.log
    expected = {
        "forward_kl": 0.5 * L(0.5 / 0.9) + 0.5 * L(0.5 / 0.1),
        "reverse_kl": 0.9 * L(0.9 / 0.5) + 0.1 * L(0.1 / 0.5),
        # M = (0.7, 0.3)
        "generalized_jsd": 0.5 * (0.5 * L(0.5 / 0.7) + 0.5 * L(0.5 / 0.3))
        + 0.5 * (0.9 * L(0.9 / 0.7) + 0.1 * L(0.1 / 0.3)),
        # M = 0.1 P + 0.9 Q = (0.86, 0.14)
        "skew_forward_kl": 0.5 * L(0.5 / 0.86) + 0.5 * L(0.5 / 0.14),
        # M = 0.1 Q + 0.9 P = (0.54, 0.46)
        "skew_reverse_kl": 0.9 * L(0.9 / 0.54) + 0.1 * L(0.1 / 0.46),
        "tvd": 0.4,
        "logit_mse": (L(0.9) - L(0.5)) ** 2 + (L(0.1) - L(0.5)) ** 2,
    }
    assert set(expected) == set(NAMES)
    for name, value in expected.items():
        assert call(name, s, t).item() == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert LF.cross_entropy(s, torch.tensor([0])).item() == pytest.approx(-L(0.9), rel=1e-6)
    assert LF.cross_entropy(s, torch.tensor([1])).item() == pytest.approx(-L(0.1), rel=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("p,q", [(P2, Q2), (Q2, P2), (P3, Q3), ([0.7, 0.2, 0.1], [0.1, 0.2, 0.7])])
def test_hand_values_small_distributions(name, p, q):
    s, t = logits_of(q), logits_of(p)
    zs, zt = s[0].tolist(), t[0].tolist()
    assert call(name, s, t).item() == pytest.approx(hand(name, p, q, zs, zt), rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", ["generalized_jsd", "skew_forward_kl", "skew_reverse_kl"])
@pytest.mark.parametrize("param", [0.25, 0.7])
def test_hand_values_other_mixture_weights(name, param):
    key = "beta" if name == "generalized_jsd" else "alpha"
    s, t = logits_of(Q3), logits_of(P3)
    expected = hand(name, P3, Q3, **{key: param})
    assert call(name, s, t, **{key: param}).item() == pytest.approx(expected, rel=1e-5)


def test_generalized_jsd_beta_quarter_by_hand():
    # M = 0.25 P + 0.75 Q = (0.8, 0.2)
    s, t = logits_of(Q2), logits_of(P2)
    L = math.log
    expected = 0.25 * (0.5 * L(0.5 / 0.8) + 0.5 * L(0.5 / 0.2)) + 0.75 * (
        0.9 * L(0.9 / 0.8) + 0.1 * L(0.1 / 0.2)
    )
    assert LF.generalized_jsd(s, t, beta=0.25).item() == pytest.approx(expected, rel=1e-5)


def test_forward_kl_is_true_kl_not_soft_cross_entropy():
    t = logits_of(P3)
    entropy = -sum(x * math.log(x) for x in P3)
    assert entropy > 0.5
    assert LF.forward_kl(t.clone(), t).item() == pytest.approx(0.0, abs=1e-7)
    # KL = soft cross-entropy - teacher entropy, by hand.
    s = logits_of(Q3)
    soft_ce = -sum(pi * math.log(qi) for pi, qi in zip(P3, Q3))
    assert LF.forward_kl(s, t).item() == pytest.approx(soft_ce - entropy, rel=1e-5)


# ------------------------------------------------------------------------------------------
# Temperature.
# ------------------------------------------------------------------------------------------
def test_temperature_two_explicit_value():
    # softmax(log Q / 2) = sqrt(Q) normalised: sqrt(0.9) = 3 sqrt(0.1), so Q_T = (0.75, 0.25);
    # P = (0.5, 0.5) stays uniform.
    s, t = logits_of(Q2), logits_of(P2)
    L = math.log
    pt, qt = [0.5, 0.5], [0.75, 0.25]
    assert LF.forward_kl(s, t, temperature=2.0).item() == pytest.approx(
        0.5 * L(0.5 / 0.75) + 0.5 * L(0.5 / 0.25), rel=1e-5
    )
    assert LF.reverse_kl(s, t, temperature=2.0).item() == pytest.approx(
        0.75 * L(0.75 / 0.5) + 0.25 * L(0.25 / 0.5), rel=1e-5
    )
    assert LF.tvd(s, t, temperature=2.0).item() == pytest.approx(0.25, rel=1e-5)
    mse = ((L(0.9) - L(0.5)) ** 2 + (L(0.1) - L(0.5)) ** 2) / 4
    assert LF.logit_mse(s, t, temperature=2.0).item() == pytest.approx(mse, rel=1e-5)
    for name in ("generalized_jsd", "skew_forward_kl", "skew_reverse_kl"):
        expected = hand(name, pt, qt, **KW[name])
        assert call(name, s, t, temperature=2.0).item() == pytest.approx(expected, rel=1e-5), name
    assert LF.cross_entropy(s, torch.tensor([1]), temperature=2.0).item() == pytest.approx(
        -L(0.25), rel=1e-5
    )


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("temperature", [0.5, 3.0])
def test_temperature_scales_both_sides(name, temperature):
    zs, zt = [1.5, -0.3, 0.2, 2.0], [0.1, 0.9, -1.2, 0.4]
    p, q = h_softmax(zt, temperature), h_softmax(zs, temperature)
    expected = hand(
        name, p, q, [z / temperature for z in zs], [z / temperature for z in zt], **KW.get(name, {})
    )
    got = call(name, torch.tensor([zs]), torch.tensor([zt]), temperature=temperature).item()
    assert got == pytest.approx(expected, rel=1e-5, abs=1e-7)


@pytest.mark.parametrize("name", NAMES)
def test_large_temperature_makes_divergence_vanish(name):
    s, t = rand_pair((4, 10), seed=3, scale=3.0)
    values = [call(name, s, t, temperature=T).item() for T in (1.0, 10.0, 1e4)]
    assert values[0] > values[1] > 0
    # The KL family and the MSE shrink like 1/T^2, the TVD like 1/T.
    assert values[2] < {"tvd": 1e-3, "logit_mse": 1e-5}.get(name, 1e-6)


def test_large_temperature_cross_entropy_tends_to_log_vocab():
    s, _ = rand_pair((4, 10), seed=3)
    labels = torch.tensor([0, 3, 9, 2])
    assert LF.cross_entropy(s, labels, temperature=1e5).item() == pytest.approx(
        math.log(10), abs=1e-4
    )


@pytest.mark.parametrize("bad", [0, 0.0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_temperature_must_be_positive_and_finite(bad):
    s, t = rand_pair((2, 3))
    for name in NAMES:
        with pytest.raises(ValueError, match="temperature"):
            call(name, s, t, temperature=bad)
    with pytest.raises(ValueError, match="temperature"):
        LF.cross_entropy(s, torch.tensor([0, 1]), temperature=bad)


def test_temperature_type_checked():
    s, t = rand_pair((2, 3))
    with pytest.raises(TypeError):
        LF.forward_kl(s, t, temperature=True)
    with pytest.raises(TypeError):
        LF.forward_kl(s, t, temperature="2")


# ------------------------------------------------------------------------------------------
# Masking and reductions.
# ------------------------------------------------------------------------------------------
def masked_batch(seed=4):
    s, t = rand_pair((2, 5, 7), seed=seed)
    labels = torch.tensor([[1, 2, -100, 4, 0], [-100, -100, 3, 6, -100]])
    return s, t, labels


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [None, 1, 3])
def test_masking_mean_sum_count_none(name, chunk_size):
    s, t, labels = masked_batch()
    valid = labels != -100
    n_valid = int(valid.sum())
    rows = ref_rows(name, s, t, **KW.get(name, {}))  # (2, 5) float64
    kw = {"labels": labels, "chunk_size": chunk_size}

    mean = call(name, s, t, **kw)
    assert mean.dtype == torch.float32 and mean.dim() == 0
    assert mean.item() == pytest.approx(rows[valid].mean().item(), rel=1e-5)

    total, count = call(name, s, t, reduction="sum_and_count", **kw)
    assert int(count) == n_valid == 6
    assert total.item() == pytest.approx(rows[valid].sum().item(), rel=1e-5)

    none = call(name, s, t, reduction="none", **kw)
    assert none.shape == labels.shape
    assert (none[~valid] == 0).all()
    torch.testing.assert_close(none[valid].double(), rows[valid], rtol=1e-5, atol=1e-6)

    # Garbage at masked positions changes nothing.
    s2, t2 = s.clone(), t.clone()
    s2[~valid] = 1e4 * torch.randn_like(s2[~valid])
    t2[~valid] = -1e4 * torch.randn_like(t2[~valid])
    assert call(name, s2, t2, **kw).item() == pytest.approx(mean.item(), rel=1e-6)
    # ... nor does the gradient at unmasked positions, and masked positions get none.
    a = s.clone().requires_grad_(True)
    b = s2.clone().requires_grad_(True)
    call(name, a, t, **kw).backward()
    call(name, b, t2, **kw).backward()
    torch.testing.assert_close(a.grad, b.grad, rtol=0, atol=1e-7)
    assert (b.grad[~valid] == 0).all()


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", [-float("inf"), float("nan")])
def test_non_finite_teacher_rows_at_masked_positions_do_not_leak(name, bad):
    # A padded position whose teacher row is -inf or NaN (e.g. a cache's padding): the value
    # and the gradient at the unmasked positions must not notice.
    s0, t, labels = masked_batch(seed=19)
    valid = labels != -100
    t_bad = t.clone()
    t_bad[~valid] = bad
    rows = ref_rows(name, s0, t, **KW.get(name, {}))
    s = s0.clone().requires_grad_(True)
    out = call(name, s, t_bad, labels=labels, chunk_size=3)
    assert out.item() == pytest.approx(rows[valid].mean().item(), rel=1e-5)
    none = call(name, s0, t_bad, labels=labels, reduction="none")
    assert (none[~valid] == 0).all() and torch.isfinite(none).all()
    out.backward()
    ref_s = s0.double().requires_grad_(True)
    ref_rows(name, ref_s, t, **KW.get(name, {}))[valid].mean().backward()
    torch.testing.assert_close(s.grad[valid].double(), ref_s.grad[valid], rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["forward_kl", "generalized_jsd", "logit_mse"])
def test_non_finite_teacher_rows_at_masked_positions_get_zero_gradient(name):
    s0, t, labels = masked_batch(seed=19)
    valid = labels != -100
    t[~valid] = -float("inf")
    s = s0.clone().requires_grad_(True)
    call(name, s, t, labels=labels).backward()
    assert torch.isfinite(s.grad).all()
    assert (s.grad[~valid] == 0).all()


def test_custom_ignore_index_and_all_masked():
    s, t, labels = masked_batch()
    labels = torch.where(labels == -100, torch.full_like(labels, 5), labels)
    rows = ref_rows("forward_kl", s, t)
    valid = labels != 5
    got = LF.forward_kl(s, t, labels=labels, ignore_index=5)
    assert got.item() == pytest.approx(rows[valid].mean().item(), rel=1e-5)
    everything_masked = torch.full_like(labels, -100)
    total, count = LF.forward_kl(s, t, labels=everything_masked, reduction="sum_and_count")
    assert total.item() == 0.0 and int(count) == 0
    assert LF.forward_kl(s, t, labels=everything_masked).item() == 0.0


def test_without_labels_every_position_counts():
    s, t = rand_pair((3, 4, 6), seed=5)
    total, count = LF.reverse_kl(s, t, reduction="sum_and_count")
    assert int(count) == 12
    assert total.item() == pytest.approx(ref_rows("reverse_kl", s, t).sum().item(), rel=1e-5)
    assert LF.reverse_kl(s, t, reduction="none").shape == (3, 4)


def test_invalid_reduction_and_chunk_size():
    s, t = rand_pair((2, 3))
    with pytest.raises(ValueError, match="reduction"):
        LF.forward_kl(s, t, reduction="sum")
    with pytest.raises(ValueError, match="chunk_size"):
        LF.forward_kl(s, t, chunk_size=0)


# ------------------------------------------------------------------------------------------
# Family-specific properties.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("beta", [0, 0.0, 1, 1.0, -0.5, 1.5])
def test_generalized_jsd_beta_outside_open_interval_raises(beta):
    s, t = rand_pair((2, 3))
    with pytest.raises(ValueError, match="beta") as info:
        LF.generalized_jsd(s, t, beta=beta)
    if beta in (0, 1):
        assert "forward_kl" in str(info.value) and "reverse_kl" in str(info.value)


def test_generalized_jsd_symmetry_and_classic_jsd():
    s, t = rand_pair((5, 8), seed=6)
    a = LF.generalized_jsd(s, t, beta=0.5).item()
    b = LF.generalized_jsd(t, s, beta=0.5).item()
    assert a == pytest.approx(b, rel=1e-6)
    # beta <-> 1 - beta when swapping teacher and student.
    assert LF.generalized_jsd(s, t, beta=0.3).item() == pytest.approx(
        LF.generalized_jsd(t, s, beta=0.7).item(), rel=1e-5
    )
    # Classic JSD = 0.5 KL(P||M) + 0.5 KL(Q||M), M = (P + Q) / 2, in plain float64 torch.
    p, q = torch.softmax(t.double(), -1), torch.softmax(s.double(), -1)
    m = 0.5 * (p + q)
    classic = (0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)).mean()
    assert a == pytest.approx(classic.item(), rel=1e-5)


def test_jsd_bounded_by_log2():
    s, t = rand_pair((64, 5), seed=7, scale=20.0)
    rows = LF.generalized_jsd(s, t, reduction="none")
    assert (rows <= math.log(2) + 1e-6).all() and (rows >= 0).all()
    # Disjoint supports reach the bound.
    s = torch.tensor([[100.0, 0.0]])
    t = torch.tensor([[0.0, 100.0]])
    assert LF.generalized_jsd(s, t).item() == pytest.approx(math.log(2), rel=1e-5)


@pytest.mark.parametrize(
    "skew,plain", [("skew_forward_kl", "forward_kl"), ("skew_reverse_kl", "reverse_kl")]
)
def test_skew_kl_limits(skew, plain):
    s, t = rand_pair((6, 9), seed=8)
    assert call(skew, s, t, alpha=0.0).item() == pytest.approx(call(plain, s, t).item(), rel=1e-6)
    assert call(skew, s, t, alpha=0).item() == pytest.approx(call(plain, s, t).item(), rel=1e-6)
    values = [call(skew, s, t, alpha=a).item() for a in (0.0, 0.1, 0.5, 0.9, 0.99, 0.999)]
    assert all(x > y for x, y in zip(values, values[1:])), values
    assert values[-1] < 1e-3 * values[0]
    for bad in (1, 1.0, 1.5, -0.1):
        with pytest.raises(ValueError, match="alpha"):
            call(skew, s, t, alpha=bad)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tvd_bounded_and_half_l1(seed):
    s, t = rand_pair((16, 6), seed=seed, scale=5.0)
    rows = LF.tvd(s, t, reduction="none")
    assert (rows >= 0).all() and (rows <= 1 + 1e-6).all()
    for i in range(3):
        p = h_softmax(t[i].tolist())
        q = h_softmax(s[i].tolist())
        assert rows[i].item() == pytest.approx(
            0.5 * sum(abs(a - b) for a, b in zip(p, q)), rel=1e-5
        )
    far = LF.tvd(torch.tensor([[50.0, 0.0]]), torch.tensor([[0.0, 50.0]])).item()
    assert far == pytest.approx(1.0, abs=1e-6)


def test_teacher_minus_inf_logits_give_finite_forward_kl():
    # A teacher that masks vocabulary entries with -inf: P has zeros there.
    t = torch.tensor([[0.0, 1.0, -float("inf"), 2.0], [-float("inf"), 0.5, 0.5, -float("inf")]])
    s0 = torch.tensor([[0.3, -0.2, 1.1, 0.4], [1.0, 0.0, -1.0, 2.0]])
    s = s0.clone().requires_grad_(True)
    out = LF.forward_kl(s, t, chunk_size=1)
    out.backward()
    expected = 0.0
    for i in range(2):
        p, q = h_softmax(t[i].tolist()), h_softmax(s0[i].tolist())
        expected += h_kl(p, q) / 2
    assert math.isfinite(out.item())
    assert out.item() == pytest.approx(expected, rel=1e-5)
    assert torch.isfinite(s.grad).all()
    # Gradient of KL(P || softmax(s)) over the mean is (q - p) / N.
    q = torch.softmax(s0.double(), -1)
    p = torch.softmax(t.double(), -1)
    torch.testing.assert_close(s.grad.double(), (q - p) / 2, rtol=0, atol=1e-6)
    # The no-grad and "none" paths agree.
    assert LF.forward_kl(s0, t).item() == pytest.approx(out.item(), rel=1e-6)
    assert torch.isfinite(LF.forward_kl(s0, t, reduction="none")).all()


@pytest.mark.parametrize("name", ["generalized_jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"])
def test_teacher_minus_inf_logits_finite_for_mixtures(name):
    t = torch.tensor([[0.0, 1.0, -float("inf"), 2.0]])
    s = torch.tensor([[0.3, -0.2, 1.1, 0.4]], requires_grad=True)
    out = call(name, s, t)
    out.backward()
    p, q = h_softmax(t[0].tolist()), h_softmax(s[0].tolist())
    assert out.item() == pytest.approx(hand(name, p, q, **KW.get(name, {})), rel=1e-5)
    assert torch.isfinite(s.grad).all()


# ------------------------------------------------------------------------------------------
# Gradients of the chunked autograd path.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("chunk_size", [1, 3, None])
@pytest.mark.parametrize("temperature", [1.0, 2.0])
def test_chunked_gradient_matches_plain_autograd(name, chunk_size, temperature):
    s0, t = rand_pair((2, 5, 7), seed=9)
    _, _, labels = masked_batch()
    valid = labels != -100
    s = s0.clone().requires_grad_(True)
    out = call(name, s, t, temperature=temperature, labels=labels, chunk_size=chunk_size)
    out.backward()

    ref_s = s0.double().requires_grad_(True)
    ref = ref_rows(name, ref_s, t, temperature, **KW.get(name, {}))[valid].mean()
    ref.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-7)
    assert s.grad.dtype == torch.float32
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_chunked_gradient_sum_reduction_and_upstream_scale(name):
    s0, t = rand_pair((9, 6), seed=10)
    s = s0.clone().requires_grad_(True)
    total, count = call(name, s, t, reduction="sum_and_count", chunk_size=2)
    (3.0 * total).backward()
    ref_s = s0.double().requires_grad_(True)
    (3.0 * ref_rows(name, ref_s, t, **KW.get(name, {})).sum()).backward()
    assert int(count) == 9
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_reduction_none_is_differentiable(name):
    s0, t = rand_pair((4, 6), seed=11)
    s = s0.clone().requires_grad_(True)
    rows = call(name, s, t, reduction="none", chunk_size=3)
    assert rows.requires_grad and rows.shape == (4,)
    weights = torch.tensor([1.0, -2.0, 0.5, 3.0])
    (rows * weights).sum().backward()
    ref_s = s0.double().requires_grad_(True)
    (ref_rows(name, ref_s, t, **KW.get(name, {})) * weights.double()).sum().backward()
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_inputs_computed_in_float32(name, dtype):
    s0, t = rand_pair((3, 4, 8), seed=12, dtype=dtype)
    s = s0.clone().requires_grad_(True)
    out = call(name, s, t, chunk_size=5)
    assert out.dtype == torch.float32
    out.backward()
    assert s.grad.dtype == dtype
    ref_s = s0.double().requires_grad_(True)  # the exact half-precision values, in float64
    ref = ref_rows(name, ref_s, t, **KW.get(name, {})).mean()
    ref.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)
    # The gradient is computed in float32 and rounded to the input dtype: within one ulp of it
    # (a single rounding is half an ulp; the chunked buffer is rounded, then scaled by 1/count).
    rtol = 2**-7 if dtype == torch.bfloat16 else 2**-10
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=rtol, atol=1e-7)
    # Mixed: half-precision teacher with a float32 student.
    out32 = call(name, s0.float(), t)
    assert out32.dtype == torch.float32
    assert out32.item() == pytest.approx(ref.item(), rel=1e-5, abs=1e-6)


@pytest.mark.parametrize("name", [*NAMES, "cross_entropy"])
def test_double_backward_raises_clear_error(name):
    s, t = rand_pair((4, 5), seed=13)
    s.requires_grad_(True)
    if name == "cross_entropy":
        out = LF.cross_entropy(s, torch.tensor([0, 1, 2, 3]))
    else:
        out = call(name, s, t)
    out.backward(retain_graph=True)
    first = s.grad.clone()
    with pytest.raises(RuntimeError, match="differentiated twice.*retain_graph"):
        out.backward()
    torch.testing.assert_close(s.grad, first)


def test_no_grad_and_inference_paths_match_grad_path():
    s0, t = rand_pair((7, 5), seed=14)
    with_grad = LF.generalized_jsd(s0.clone().requires_grad_(True), t, chunk_size=2)
    with torch.no_grad():
        no_grad = LF.generalized_jsd(s0.clone().requires_grad_(True), t, chunk_size=2)
    plain = LF.generalized_jsd(s0, t, chunk_size=4)
    assert with_grad.item() == pytest.approx(no_grad.item(), rel=1e-6)
    assert with_grad.item() == pytest.approx(plain.item(), rel=1e-6)
    assert not no_grad.requires_grad


def test_non_leaf_student_gradient_flows_upstream():
    torch.manual_seed(15)
    weight = torch.randn(4, 6, requires_grad=True)
    h = torch.randn(2, 3, 4)
    t = torch.randn(2, 3, 6)
    LF.forward_kl(h @ weight, t, chunk_size=2).backward()
    w_ref = weight.detach().double().requires_grad_(True)
    ref_rows("forward_kl", h.double() @ w_ref, t).mean().backward()
    torch.testing.assert_close(weight.grad.double(), w_ref.grad, rtol=0, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Input validation.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_vocab_mismatch_raises_naming_both_sizes(name):
    s = torch.randn(2, 3, 5)
    t = torch.randn(2, 3, 7)
    with pytest.raises(ValueError) as info:
        call(name, s, t)
    message = str(info.value)
    assert "7" in message and "5" in message
    assert "7 vs 5" in message


@pytest.mark.parametrize("name", NAMES)
def test_labels_shape_mismatch_raises(name):
    s, t = rand_pair((2, 3, 5))
    with pytest.raises(ValueError, match="labels"):
        call(name, s, t, labels=torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="labels"):
        call(name, s, t, labels=torch.zeros(6, dtype=torch.long))


def test_cross_entropy_label_validation():
    s = torch.randn(2, 3, 5)
    with pytest.raises(ValueError, match="labels"):
        LF.cross_entropy(s, torch.zeros(2, 4, dtype=torch.long))
    with pytest.raises(TypeError, match="integer"):
        LF.cross_entropy(s, torch.zeros(2, 3))


# ------------------------------------------------------------------------------------------
# Cross-entropy and top-1 agreement.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("chunk_size", [None, 1, 4])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_cross_entropy_matches_torch(chunk_size, temperature):
    s0, _ = rand_pair((3, 5, 11), seed=16)
    labels = torch.tensor([[1, 2, -100, 4, 0], [10, -100, 3, 6, 9], [-100, -100, -100, 5, 7]])
    s = s0.clone().requires_grad_(True)
    out = LF.cross_entropy(s, labels, temperature=temperature, chunk_size=chunk_size)
    out.backward()
    ref_s = s0.double().requires_grad_(True)
    ref = F.cross_entropy((ref_s / temperature).flatten(0, -2), labels.flatten(), ignore_index=-100)
    ref.backward()
    assert out.item() == pytest.approx(ref.item(), rel=1e-6)
    torch.testing.assert_close(s.grad.double(), ref_s.grad, rtol=0, atol=1e-6)

    total, count = LF.cross_entropy(s0, labels, temperature=temperature, reduction="sum_and_count")
    ref_sum = F.cross_entropy(
        (s0 / temperature).flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="sum"
    )
    assert int(count) == 10
    assert total.item() == pytest.approx(ref_sum.item(), rel=1e-5)
    none = LF.cross_entropy(s0, labels, temperature=temperature, reduction="none")
    ref_none = F.cross_entropy(
        (s0 / temperature).flatten(0, -2), labels.flatten(), ignore_index=-100, reduction="none"
    )
    torch.testing.assert_close(none, ref_none.view(3, 5), rtol=1e-5, atol=1e-6)


def test_cross_entropy_custom_ignore_index():
    s = torch.randn(6, 4, generator=torch.Generator().manual_seed(17))
    labels = torch.tensor([0, 3, 1, 1, 2, 3])
    got = LF.cross_entropy(s, labels, ignore_index=1)
    assert got.item() == pytest.approx(F.cross_entropy(s, labels, ignore_index=1).item(), rel=1e-6)


def test_top1_agreement_by_hand():
    s = torch.tensor([[3.0, 1.0, 0.0], [0.0, 2.0, 1.0], [0.0, 0.0, 5.0], [1.0, 0.0, 0.0]])
    t = torch.tensor([[9.0, 1.0, 0.0], [0.0, 1.0, 2.0], [1.0, 0.0, 7.0], [0.0, 4.0, 0.0]])
    # argmax student (0, 1, 2, 0), teacher (0, 2, 2, 1): agreement on rows 0 and 2.
    assert LF.top1_agreement(s, t).item() == pytest.approx(0.5)
    labels = torch.tensor([5, -100, 5, -100])
    assert LF.top1_agreement(s, t, labels=labels).item() == pytest.approx(1.0)
    total, count = LF.top1_agreement(s, t, labels=labels, reduction="sum_and_count")
    assert total.item() == 2.0 and int(count) == 2
    none = LF.top1_agreement(s, t, labels=torch.tensor([5, 5, -100, 5]), reduction="none")
    assert none.tolist() == [1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ValueError):
        LF.top1_agreement(s, t[:, :2])


# ------------------------------------------------------------------------------------------
# Gradient accumulation: sums and counts split over micro-batches.
# ------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", [*NAMES, "cross_entropy"])
def test_gradient_accumulation_sum_and_count(name):
    g = torch.Generator().manual_seed(18)
    B, L, V = 8, 6, 11
    s0 = torch.randn(B, L, V, generator=g) * 2
    t = torch.randn(B, L, V, generator=g) * 2
    labels = torch.randint(0, V, (B, L), generator=g)
    valid_lengths = [6, 1, 4, 0, 3, 5, 2, 6]  # a different number of valid tokens per sequence
    for i, n in enumerate(valid_lengths):
        labels[i, n:] = -100

    def run(student, sl):
        kw = {"labels": labels[sl], "chunk_size": 5, **KW.get(name, {})}
        if name == "cross_entropy":
            return LF.cross_entropy(
                student[sl], labels[sl], chunk_size=5, reduction="sum_and_count"
            )
        return getattr(LF, name)(student[sl], t[sl], reduction="sum_and_count", **kw)

    full = s0.clone().requires_grad_(True)
    total, count = run(full, slice(None))
    assert int(count) == sum(valid_lengths)
    (total / count).backward()
    if name == "cross_entropy":
        mean = LF.cross_entropy(s0, labels)
    else:
        mean = call(name, s0, t, labels=labels)
    assert (total / count).item() == pytest.approx(mean.item(), rel=1e-6)

    split = s0.clone().requires_grad_(True)
    sum1, count1 = run(split, slice(0, 4))
    sum2, count2 = run(split, slice(4, 8))
    assert int(count1) + int(count2) == int(count)
    assert int(count1) == sum(valid_lengths[:4]) and int(count2) == sum(valid_lengths[4:])
    assert (sum1 + sum2).item() == pytest.approx(total.item(), rel=1e-6)
    ((sum1 + sum2) / (count1 + count2)).backward()
    torch.testing.assert_close(split.grad, full.grad, rtol=0, atol=1e-6)

    # Accumulating micro-batch backward passes into .grad gives the same gradient.
    acc = s0.clone().requires_grad_(True)
    n_total = count1 + count2
    for sl in (slice(0, 4), slice(4, 8)):
        part, _ = run(acc, sl)
        (part / n_total).backward()
    torch.testing.assert_close(acc.grad, full.grad, rtol=0, atol=1e-6)


def test_is_top1_matches_argmax_and_handles_ties_and_padding():
    torch.manual_seed(7)
    logits = torch.randn(4, 6, 50)
    ids = torch.randint(0, 50, (4, 6))
    ids[0] = logits[0].argmax(-1)  # some hits
    assert torch.equal(LF.is_top1(logits, ids), logits.argmax(-1) == ids)
    tied = torch.tensor([[1.0, 3.0, 3.0, 0.0]])
    assert LF.is_top1(tied, torch.tensor([2])).item()  # every tied class is a top-1
    assert not LF.is_top1(tied, torch.tensor([0])).item()
    assert LF.is_top1(tied, torch.tensor([-1])).tolist() == [False]  # padding / ignore_index
    assert LF.is_top1(tied, torch.tensor([-100])).tolist() == [False]
    assert LF.is_top1(tied, torch.tensor([4])).tolist() == [False]  # past the vocabulary (a smaller teacher's)
