"""stage2_student.losses: properties (zero, limits, non-negativity), references
(torch.nn.functional, dense coarsened distributions), padding and empty-mask safety, gradchecks."""

import math

import pytest
import torch
import torch.nn.functional as F

from pipeline.modeling.sparse import log1mexp
from stage2_student import losses as L

D64 = torch.float64
NAMES = L.DIVERGENCES


def _topk_case(n=5, v=11, k=4, seed=0, dtype=D64, same=False):
    """Student logits [n, v], teacher top-k ids and exact log-probs, teacher dense log-probs."""
    g = torch.Generator().manual_seed(seed)
    teacher_logits = torch.randn(n, v, generator=g, dtype=dtype) * 2
    student_logits = (
        teacher_logits.clone() if same else torch.randn(n, v, generator=g, dtype=dtype)
    )
    t_dense = F.log_softmax(teacher_logits, -1)
    t_lp, ids = t_dense.topk(k, dim=-1)
    return student_logits, ids, t_lp, t_dense


def _coarsen(p, ids):
    """Reference coarsening: dense probabilities [n, v] -> bucket probabilities [n, k+1]."""
    picked = p.gather(-1, ids)
    outside = torch.ones_like(p, dtype=torch.bool).scatter(-1, ids, False)
    return torch.cat([picked, (p * outside).sum(-1, keepdim=True)], -1)


def _ref_divergence(name, t, s, beta=0.5, alpha=0.1):
    """Independent reference on probability vectors (all entries > 0)."""
    kl = lambda p, q: (p * (p / q).log()).sum(-1)  # noqa: E731
    if name == "forward_kl":
        return kl(t, s)
    if name == "reverse_kl":
        return kl(s, t)
    if name == "jsd":
        m = beta * t + (1 - beta) * s
        return (beta * kl(t, m) + (1 - beta) * kl(s, m)) / (beta * (1 - beta))
    if name == "skew_forward_kl":
        return kl(t, alpha * t + (1 - alpha) * s)
    if name == "skew_reverse_kl":
        return kl(s, alpha * s + (1 - alpha) * t)
    if name == "tvd":
        return 0.5 * (t - s).abs().sum(-1)
    raise AssertionError(name)


def _div(name, student_logits, ids, t_lp, **kw):
    return L.divergence(name, *L.bucket_logprobs(student_logits, ids, t_lp), **kw)


# ---------------------------------------------------------------- buckets


def test_tail_bucket_matches_dense():
    s_logits, ids, t_lp, t_dense = _topk_case(k=3)
    t_logp, s_logp, valid = L.bucket_logprobs(s_logits, ids, t_lp)
    assert t_logp.shape == s_logp.shape == valid.shape == (5, 4)
    assert valid.all()
    torch.testing.assert_close(t_logp.exp(), _coarsen(t_dense.exp(), ids))
    torch.testing.assert_close(s_logp.exp(), _coarsen(F.softmax(s_logits, -1), ids))
    torch.testing.assert_close(s_logp[:, :-1], F.log_softmax(s_logits, -1).gather(-1, ids))


def test_log1mexp_accurate_at_both_ends():
    x = torch.tensor([-1e-20, -1e-10, -0.5, -0.9, -50.0], dtype=D64)
    expected = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()[:4]] + [-math.exp(-50)],
                            dtype=D64)
    torch.testing.assert_close(log1mexp(x), expected, rtol=1e-14, atol=0)


def test_tiny_tail_is_accurate():
    # Stored ids cover 1 - 1e-10 of the mass.
    p = torch.tensor([[0.7, 0.3 - 1e-10]], dtype=D64)
    t_logp, _, _ = L.bucket_logprobs(torch.zeros(1, 4, dtype=D64), torch.tensor([[0, 1]]), p.log())
    tail = torch.tensor(1e-10, dtype=D64)
    torch.testing.assert_close(t_logp[0, -1].exp(), tail, rtol=1e-5, atol=0)


def test_teacher_covering_all_mass_is_finite():
    # Stored log-probs whose probabilities sum to >= 1 (rounding): tail floored, no NaN anywhere.
    s_logits = torch.randn(2, 6, dtype=torch.float32, requires_grad=True)
    ids = torch.tensor([[0, 1], [2, 3]])
    t_lp = torch.tensor([[math.log(0.5), math.log(0.5000001)], [0.0, -30.0]])
    for name in NAMES:
        rows = _div(name, s_logits, ids, t_lp)
        assert torch.isfinite(rows).all(), name
        (g,) = torch.autograd.grad(rows.sum(), s_logits)
        assert torch.isfinite(g).all(), name
    t_logp, _, _ = L.bucket_logprobs(s_logits, ids, t_lp)
    assert (t_logp[:, -1] <= math.log(2 * torch.finfo(torch.float32).eps)).all()


def test_student_concentrated_on_ids_is_finite():
    # Student tail underflows (all mass on the stored ids): floored, finite values and gradients.
    s_logits = torch.tensor([[50.0, 0.0, -50.0, -50.0]], requires_grad=True)
    ids = torch.tensor([[0, 1]])
    t_lp = torch.log(torch.tensor([[0.6, 0.3]]))
    for name in NAMES:
        rows = _div(name, s_logits, ids, t_lp)
        (g,) = torch.autograd.grad(rows.sum(), s_logits)
        assert torch.isfinite(rows).all() and torch.isfinite(g).all(), name


# ---------------------------------------------------------------- divergences: properties


@pytest.mark.parametrize("name", NAMES)
def test_zero_for_identical_distributions(name):
    s_logits, ids, t_lp, _ = _topk_case(same=True)
    rows = _div(name, s_logits, ids, t_lp)
    torch.testing.assert_close(rows, torch.zeros_like(rows), atol=1e-12, rtol=0)


@pytest.mark.parametrize("name", NAMES)
def test_matches_dense_on_coarsened_distributions(name):
    s_logits, ids, t_lp, t_dense = _topk_case(n=6, v=9, k=3, seed=1)
    t_b = _coarsen(F.softmax(t_dense, -1), ids)
    s_b = _coarsen(F.softmax(s_logits, -1), ids)
    for beta, alpha in [(0.5, 0.1), (0.2, 0.7)]:
        got = _div(name, s_logits, ids, t_lp, beta=beta, alpha=alpha)
        torch.testing.assert_close(got, _ref_divergence(name, t_b, s_b, beta, alpha))


def test_full_vocabulary_equals_torch_kl():
    # k = V: the bucket KLs are the dense KLs.
    g = torch.Generator().manual_seed(2)
    t_logits, s_logits = torch.randn(4, 7, generator=g), torch.randn(4, 7, generator=g)
    t_dense, s_dense = F.log_softmax(t_logits, -1), F.log_softmax(s_logits, -1)
    ids = torch.stack([torch.randperm(7, generator=g) for _ in range(4)])
    t_lp = t_dense.gather(-1, ids)
    fwd = F.kl_div(s_dense, t_dense, reduction="none", log_target=True).sum(-1)
    rev = (s_dense.exp() * (s_dense - t_dense)).sum(-1)
    torch.testing.assert_close(_div("forward_kl", s_logits, ids, t_lp), fwd, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(_div("reverse_kl", s_logits, ids, t_lp), rev, atol=1e-5, rtol=1e-5)


def test_jsd_limits_are_the_kls():
    s_logits, ids, t_lp, _ = _topk_case(seed=3)
    fwd = _div("forward_kl", s_logits, ids, t_lp)
    rev = _div("reverse_kl", s_logits, ids, t_lp)
    torch.testing.assert_close(_div("jsd", s_logits, ids, t_lp, beta=0.0), fwd, atol=0, rtol=0)
    torch.testing.assert_close(_div("jsd", s_logits, ids, t_lp, beta=1.0), rev, atol=0, rtol=0)
    # Continuous at the ends (normalised convention), not only defined there.
    torch.testing.assert_close(_div("jsd", s_logits, ids, t_lp, beta=1e-6), fwd, rtol=1e-4, atol=0)
    near_one = _div("jsd", s_logits, ids, t_lp, beta=1 - 1e-6)
    torch.testing.assert_close(near_one, rev, rtol=1e-4, atol=0)
    # Skew KLs at alpha = 0 are the plain KLs; at alpha = 1 they vanish.
    torch.testing.assert_close(_div("skew_forward_kl", s_logits, ids, t_lp, alpha=0.0), fwd)
    torch.testing.assert_close(_div("skew_reverse_kl", s_logits, ids, t_lp, alpha=0.0), rev)
    zero = _div("skew_forward_kl", s_logits, ids, t_lp, alpha=1.0)
    torch.testing.assert_close(zero, torch.zeros_like(zero))


@pytest.mark.parametrize("name", NAMES)
def test_non_negative_on_random_inputs(name):
    for seed in range(5):
        s_logits, ids, t_lp, _ = _topk_case(n=32, v=50, k=8, seed=seed, dtype=torch.float32)
        ids[::3, 5:] = -1  # some padding
        assert (_div(name, s_logits * 3, ids, t_lp) >= -1e-6).all()


@pytest.mark.parametrize("name", NAMES)
def test_padded_ids_are_ignored(name):
    s_logits, ids, t_lp, _ = _topk_case(n=3, v=8, k=2, seed=4)
    pad_ids = torch.cat([ids, torch.full((3, 3), -1)], -1)
    pad_lp = torch.cat([t_lp, torch.full((3, 3), 123.0)], -1)  # garbage at padded slots
    a = s_logits.clone().requires_grad_()
    b = s_logits.clone().requires_grad_()
    ra = _div(name, a, ids, t_lp)
    rb = _div(name, b, pad_ids, pad_lp)
    torch.testing.assert_close(ra, rb)
    ga, = torch.autograd.grad(ra.sum(), a)
    gb, = torch.autograd.grad(rb.sum(), b)
    torch.testing.assert_close(ga, gb)  # in particular vocabulary entry 0 is untouched by padding


def test_zero_probability_buckets_give_zero_not_nan():
    # Bucket 1: teacher 0, student > 0; bucket 2: both 0 (0 log 0 = 0, finite gradients).
    t = torch.tensor([[0.0, -math.inf, -math.inf]], dtype=D64)
    s = torch.log(torch.tensor([[0.5, 0.5, 0.0]], dtype=D64)).requires_grad_()
    valid = torch.ones(1, 3, dtype=torch.bool)
    for name in ["forward_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]:
        v = L.divergence(name, t, s, valid)
        (g,) = torch.autograd.grad(v.sum(), s)
        assert torch.isfinite(v).all() and torch.isfinite(g).all(), name
    torch.testing.assert_close(L.forward_kl(t, s, valid), torch.tensor([math.log(2)], dtype=D64))
    torch.testing.assert_close(L.tvd(t, s, valid), torch.tensor([0.5], dtype=D64))


def test_unknown_divergence_name():
    t = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="forward_kl.*tvd"):
        L.divergence("kl", t, t, torch.ones(1, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="valid names"):
        L.kd_loss(torch.zeros(1, 3), torch.zeros(1, 1, dtype=torch.long), t[:, :1], divergence="x")
    with pytest.raises(ValueError, match="beta"):
        L.divergence("jsd", t, t, torch.ones(1, 2, dtype=torch.bool), beta=1.5)


# ---------------------------------------------------------------- gradchecks (float64)


@pytest.mark.parametrize("name", NAMES)
def test_gradcheck_divergences(name):
    s_logits, ids, t_lp, _ = _topk_case(n=3, v=6, k=3, seed=5)
    ids[1, 2] = -1
    x = s_logits.clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda z: _div(name, z, ids, t_lp, beta=0.3, alpha=0.2), (x,))


def test_gradcheck_sampled_iva_tpa_attention():
    s_logits, ids, t_lp, _ = _topk_case(n=4, v=6, k=2, seed=6)
    x = s_logits.clone().requires_grad_()
    counts = torch.tensor([[3, 1], [2, 0], [4, 4], [1, 1]])
    ids_s = ids.clone()
    ids_s[1, 1] = -1
    assert torch.autograd.gradcheck(lambda z: L.sampled_forward_kl(z, ids_s, counts), (x,))
    w = torch.tensor([0.1, 0.5, 0.2, 0.2], dtype=D64)
    grp = torch.tensor([0, 0, 1, 1])
    assert torch.autograd.gradcheck(
        lambda z: L.iva_loss(z, ids, t_lp, w, grp, divergence="jsd"), (x,)
    )
    cand = torch.log(torch.tensor([0.2, 0.1, 0.3, 0.05], dtype=D64))
    assert torch.autograd.gradcheck(
        lambda z: L.tpa_loss(z, ids, t_lp, cand, grp, divergence="reverse_kl"), (x,)
    )
    attn = torch.rand(2, 5, dtype=D64, requires_grad=True)
    sal = torch.rand(2, 5, dtype=D64)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    assert torch.autograd.gradcheck(lambda a: L.attention_kl(a, sal, mask), (attn,))


# ---------------------------------------------------------------- sampled target


def test_sampled_kl_zero_when_counts_match_student():
    q = torch.tensor([0.5, 0.3, 0.2], dtype=D64)
    s_logits = torch.log(torch.cat([q, torch.tensor([1e-30], dtype=D64)])).unsqueeze(0)
    ids = torch.tensor([[2, 0, 1, -1]])
    counts = torch.tensor([[2, 5, 3, 0]])
    for n in (None, 10, torch.tensor([10])):
        v = L.sampled_forward_kl(s_logits, ids, counts, n)
        torch.testing.assert_close(v, torch.zeros(1, dtype=D64), atol=1e-12, rtol=0)


def test_sampled_kl_unbiased_gradient():
    # Averaged over many draws, the gradient equals the dense forward-KL gradient p_S - p_T.
    g = torch.Generator().manual_seed(7)
    v, n_rows, n = 6, 20000, 50
    p_t = F.softmax(torch.randn(v, generator=g), -1)
    logits = torch.randn(v, dtype=D64, generator=g, requires_grad=True)
    draws = torch.multinomial(p_t.expand(n_rows, v), n, replacement=True, generator=g)
    counts = torch.zeros(n_rows, v, dtype=torch.long).scatter_add_(1, draws, torch.ones_like(draws))
    ids = torch.arange(v).expand(n_rows, v).clone()
    ids[counts == 0] = -1  # only drawn ids are stored
    loss = L.sampled_kd_loss(logits.expand(n_rows, v), ids, counts, n)
    (grad,) = torch.autograd.grad(loss, logits)
    expected = F.softmax(logits.detach(), -1) - p_t.to(D64)
    torch.testing.assert_close(grad, expected, atol=3e-3, rtol=0)


# ---------------------------------------------------------------- reductions and loss terms


def test_empty_masks_give_zero_with_finite_grad():
    x = torch.randn(4, requires_grad=True)
    for value in [
        L.masked_mean(x, torch.zeros(4, dtype=torch.bool)),
        L.weighted_mean(x, torch.zeros(4)),
        L.masked_mean(x[:0], torch.zeros(0, dtype=torch.bool)),
    ]:
        assert value.item() == 0.0
        (g,) = torch.autograd.grad(value, x, allow_unused=True)
        assert g is None or torch.isfinite(g).all()
    logits = torch.randn(2, 3, 5, requires_grad=True)
    sft = L.sft_loss(logits, torch.full((2, 3), -100))
    sft.backward()
    assert sft.item() == 0.0 and torch.isfinite(logits.grad).all()

    s = torch.randn(3, 5, requires_grad=True)
    pad = torch.full((3, 2), -1)
    lp = torch.zeros(3, 2)
    for value in [
        L.kd_loss(s, pad, lp, divergence="jsd"),
        L.iva_loss(s, pad, lp, torch.ones(3)),
        L.iva_loss(s, torch.tensor([[1, -1]] * 3), lp, torch.zeros(3)),  # all-zero saliency
        L.tpa_loss(s, pad, lp, torch.zeros(3), torch.arange(3)),
        L.tpa_loss(s[:0], pad[:0], lp[:0], torch.zeros(0), torch.zeros(0, dtype=torch.long)),
        L.sampled_kd_loss(s, pad, torch.zeros(3, 2, dtype=torch.long)),
        L.attention_kl(s.exp(), torch.rand(3, 5), torch.zeros(3, 5, dtype=torch.bool)),
    ]:
        assert value.item() == 0.0
        (g,) = torch.autograd.grad(value, s)
        assert torch.isfinite(g).all()


def test_masked_and_weighted_mean_ignore_bad_values_outside():
    x = torch.tensor([1.0, float("nan"), 3.0, float("inf")])
    assert L.masked_mean(x, torch.tensor([True, False, True, False])).item() == 2.0
    assert L.weighted_mean(x, torch.tensor([1.0, 0.0, 3.0, 0.0])).item() == 2.5


def test_sft_loss_equals_cross_entropy():
    g = torch.Generator().manual_seed(8)
    logits = torch.randn(2, 5, 7, generator=g)
    labels = torch.randint(0, 7, (2, 5), generator=g)
    labels[0, :2] = -100
    expected = F.cross_entropy(logits.reshape(-1, 7), labels.reshape(-1), ignore_index=-100)
    torch.testing.assert_close(L.sft_loss(logits, labels), expected)


def test_kd_loss_is_mean_over_non_padding_rows():
    s_logits, ids, t_lp, _ = _topk_case(n=4, seed=9)
    rows = _div("skew_reverse_kl", s_logits, ids, t_lp, alpha=0.3)
    ids[2] = -1
    got = L.kd_loss(s_logits, ids, t_lp, divergence="skew_reverse_kl", alpha=0.3)
    torch.testing.assert_close(got, rows[[0, 1, 3]].mean())


def test_iva_weights_renormalised_per_sample():
    s_logits, ids, t_lp, _ = _topk_case(n=5, seed=10)
    d = _div("forward_kl", s_logits, ids, t_lp)
    w = torch.tensor([1.0, 3.0, 0.5, 0.5, 7.0], dtype=D64)
    group = torch.tensor([4, 4, 9, 9, 9])  # sample labels need not be contiguous
    expected = ((1 * d[0] + 3 * d[1]) / 4 + (0.5 * d[2] + 0.5 * d[3] + 7 * d[4]) / 8) / 2
    torch.testing.assert_close(L.iva_loss(s_logits, ids, t_lp, w, group), expected)
    # Scaling one sample's weights changes nothing; no group means one sample.
    rescaled = torch.where(group == 4, 10 * w, w)
    torch.testing.assert_close(L.iva_loss(s_logits, ids, t_lp, rescaled, group), expected)
    torch.testing.assert_close(L.iva_loss(s_logits, ids, t_lp, w), (w * d).sum() / w.sum())


def test_tpa_weights_normalised_per_position():
    s_logits, ids, t_lp, _ = _topk_case(n=4, seed=11)
    d = _div("jsd", s_logits, ids, t_lp, beta=0.3)
    # Position 0 has candidates with p_T 0.2 and 0.1 -> weights 2/3, 1/3; position 1 has
    # candidates with p_T 0.05 and 0.15 -> weights 1/4, 3/4. L = mean over the two positions.
    cand = torch.log(torch.tensor([0.2, 0.1, 0.05, 0.15], dtype=D64))
    group = torch.tensor([0, 0, 1, 1])
    expected = ((2 / 3 * d[0] + 1 / 3 * d[1]) + (1 / 4 * d[2] + 3 / 4 * d[3])) / 2
    got = L.tpa_loss(s_logits, ids, t_lp, cand, group, divergence="jsd", beta=0.3)
    torch.testing.assert_close(got, expected)
    # Very small candidate log-probs do not underflow (weights are shifted per position).
    got = L.tpa_loss(s_logits, ids, t_lp, cand - 1000, group, divergence="jsd", beta=0.3)
    torch.testing.assert_close(got, expected)


def test_attention_kl():
    sal = torch.tensor([[0.5, 0.25, 0.25, 0.0]], dtype=D64)
    mask = torch.tensor([[True, True, True, False]])
    same = L.attention_kl(sal * 0.3 + torch.tensor([[0, 0, 0, 9.0]], dtype=D64), sal, mask)
    assert abs(same.item()) < 1e-12  # scale and masked-out positions do not matter
    attn = torch.tensor([[0.2, 0.2, 0.4, 0.1]], dtype=D64)
    s = attn[0, :3] / attn[0, :3].sum()
    t = sal[0, :3]
    torch.testing.assert_close(L.attention_kl(attn, sal, mask), (t * (t / s).log()).sum())


def test_total_loss():
    sft, kd = torch.tensor(2.0, requires_grad=True), torch.tensor(0.5, requires_grad=True)
    weights = {"sft": 1.0, "kd": 2.0, "iva": 0.0, "tpa": 0}
    total, log = L.total_loss({"sft": sft, "kd": kd, "iva": None}, weights)
    assert total.item() == 3.0 and log == {"sft": 2.0, "kd": 0.5, "total": 3.0}
    total.backward()
    assert kd.grad.item() == 2.0
    with pytest.raises(ValueError, match="tpa"):
        L.total_loss({"sft": sft}, {"sft": 1.0, "tpa": 0.1})
    with pytest.raises(ValueError, match="without a weight"):
        L.total_loss({"sft": sft, "kd": kd}, {"sft": 1.0})
    with pytest.raises(ValueError, match="zero"):
        L.total_loss({}, {"sft": 0.0})
    with pytest.raises(ValueError, match=">= 0"):
        L.total_loss({"sft": sft}, {"sft": -1.0})


def test_half_precision_logits_are_upcast():
    s_logits, ids, t_lp, _ = _topk_case(dtype=torch.float32, seed=12)
    ref = L.kd_loss(s_logits, ids, t_lp, divergence="reverse_kl")
    got = L.kd_loss(s_logits.bfloat16(), ids, t_lp, divergence="reverse_kl")
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)


# ---------------------------------------------------------------- sampled IVA / TPA


def _sampled_case(n: int, seed: int, v: int = 30, draws: int = 12):
    """Student logits [n, v] and a sampled target per row: ``draws`` ids drawn from a random
    teacher, unique ids with counts, padded with -1 / 0 (row widths differ)."""
    g = torch.Generator().manual_seed(seed)
    s_logits = torch.randn(n, v, generator=g, dtype=D64)
    teacher = torch.softmax(2 * torch.randn(n, v, generator=g, dtype=D64), -1)
    rows = [torch.unique(torch.multinomial(p, draws, replacement=True, generator=g), return_counts=True) for p in teacher]
    width = max(len(u) for u, _ in rows)
    ids = torch.full((n, width), -1, dtype=torch.long)
    counts = torch.zeros((n, width), dtype=torch.long)
    for r, (u, c) in enumerate(rows):
        ids[r, : len(u)], counts[r, : len(u)] = u, c
    return s_logits, ids, counts


def _sampled_kl_by_hand(s_logits, ids, counts) -> torch.Tensor:
    """sum_i q_i (log q_i - log p_S(id_i)), q = counts / draws, per row, with F.log_softmax."""
    s_lp = F.log_softmax(s_logits, -1)
    out = []
    for r in range(len(ids)):
        keep = counts[r] > 0
        q = counts[r][keep].double() / counts[r].sum()
        out.append((q * (q.log() - s_lp[r, ids[r][keep]])).sum())
    return torch.stack(out)


def test_sampled_iva_is_the_saliency_weighted_sampled_kl():
    s_logits, ids, counts = _sampled_case(n=5, seed=21)
    d = _sampled_kl_by_hand(s_logits, ids, counts)
    w = torch.tensor([1.0, 3.0, 0.5, 0.5, 7.0], dtype=D64)
    group = torch.tensor([4, 4, 9, 9, 9])
    expected = ((1 * d[0] + 3 * d[1]) / 4 + (0.5 * d[2] + 0.5 * d[3] + 7 * d[4]) / 8) / 2
    torch.testing.assert_close(L.sampled_iva_loss(s_logits, ids, counts, w, group), expected)
    # A row with no draw leaves its sample's weights renormalised over the others.
    empty_ids, empty_counts = ids.clone(), counts.clone()
    empty_ids[1], empty_counts[1] = -1, 0
    expected_empty = (d[0] + (0.5 * d[2] + 0.5 * d[3] + 7 * d[4]) / 8) / 2
    torch.testing.assert_close(L.sampled_iva_loss(s_logits, empty_ids, empty_counts, w, group), expected_empty)
    assert L.sampled_iva_count(empty_ids, empty_counts, w, group) == 2
    # Fractional counts (a pooled student cell) are the mixture they stand for.
    frac = counts.double() * 0.5
    torch.testing.assert_close(L.sampled_iva_loss(s_logits, ids, frac, w, group), expected)


def test_sampled_tpa_is_the_candidate_weighted_sampled_kl():
    s_logits, ids, counts = _sampled_case(n=4, seed=22)
    d = _sampled_kl_by_hand(s_logits, ids, counts)
    cand = torch.log(torch.tensor([0.2, 0.1, 0.05, 0.15], dtype=D64))
    group = torch.tensor([0, 0, 1, 1])
    expected = ((2 / 3 * d[0] + 1 / 3 * d[1]) + (1 / 4 * d[2] + 3 / 4 * d[3])) / 2
    torch.testing.assert_close(L.sampled_tpa_loss(s_logits, ids, counts, cand, group), expected)
    torch.testing.assert_close(L.sampled_tpa_loss(s_logits, ids, counts, cand - 1000, group), expected)
    assert L.sampled_tpa_count(ids, counts, cand, group) == 2


def test_sampled_iva_and_tpa_terms_through_the_fused_head_equal_the_logits():
    """The sampled IVA and TPA row terms on the fused head (hidden rows, chunked) equal the terms on
    the full logits, value and gradient."""
    g = torch.Generator().manual_seed(23)
    hidden = torch.randn(7, 6, generator=g, dtype=D64, requires_grad=True)
    weight = torch.randn(30, 6, generator=g, dtype=D64)
    _, ids, counts = _sampled_case(n=7, seed=24)
    w = torch.rand(7, generator=g, dtype=D64)
    group = torch.tensor([0, 0, 0, 1, 1, 2, 2])
    cand = torch.log(torch.rand(7, generator=g, dtype=D64))
    terms = [L.sampled_iva_term(ids, counts, w, group), L.sampled_tpa_term(ids, counts, cand, group)]
    rows = torch.arange(7)
    total, values = L.fused_head_loss(hidden, weight, None, [L.HeadTerm(t, rows, 1.0) for t in terms], chunk_rows=3)
    (g_fused,) = torch.autograd.grad(total, hidden)
    logits = hidden @ weight.T
    ref = [L.sampled_iva_loss(logits, ids, counts, w, group), L.sampled_tpa_loss(logits, ids, counts, cand, group)]
    (g_ref,) = torch.autograd.grad(sum(ref), hidden)
    torch.testing.assert_close(values, torch.stack(ref).detach())
    torch.testing.assert_close(g_fused, g_ref)
