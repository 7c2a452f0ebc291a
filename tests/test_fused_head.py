"""The fused output head (``losses.fused_head_loss``) against the same terms on full logits.

The reference is plain autograd through ``hidden @ W.T + b`` and the ``*_loss`` functions (whose own
tests check them against ``torch.nn.functional`` and hand-written formulas): values and gradients
with respect to the hidden states, the head's weight and bias must agree in float64 to 1e-6,
whatever the chunking, with rows shared between terms, padded ids, padding rows, empty terms and a
padded vocabulary (head rows above ``vocab_size`` get no gradient and are no column).
"""

from __future__ import annotations

import pytest
import torch

from stage2_student import losses as L



@pytest.fixture(autouse=True)
def float64():
    """Every tensor of these tests is float64 (restored afterwards: other modules share the process)."""
    before = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(before)

N_ROWS, DIM, VOCAB, HEAD_ROWS, K = 23, 8, 50, 56, 5


def _unique_ids(gen, n, k, vocab, pad_rows=(), pad_slots=1):
    ids = torch.stack([torch.randperm(vocab, generator=gen)[:k] for _ in range(n)])
    ids[:, k - pad_slots:] = L.PAD_ID
    for r in pad_rows:
        ids[r] = L.PAD_ID
    return ids


def _teacher_logprobs(gen, ids):
    logits = torch.randn(ids.shape[0], VOCAB, generator=gen) * 3
    lp = torch.log_softmax(logits, -1).gather(1, ids.clamp_min(0))
    return torch.where(ids >= 0, lp, -torch.inf)


def _setup(seed=0, divergence="forward_kl"):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(N_ROWS, DIM, generator=gen, requires_grad=True)
    weight = (torch.randn(HEAD_ROWS, DIM, generator=gen) * 0.7).requires_grad_()
    bias = (torch.randn(HEAD_ROWS, generator=gen) * 0.1).requires_grad_()
    kw = dict(divergence=divergence, beta=0.3, alpha=0.2)
    # SFT on rows 0..9 (two unlabelled), KD on rows 0..9 too (shared rows), IVA on 10..15,
    # TPA on 16..22, sampled KD on 3..8.
    labels = torch.randint(0, VOCAB, (10,), generator=gen)
    labels[[2, 7]] = -100
    kd_ids = _unique_ids(gen, 10, K, VOCAB, pad_rows=(4,))
    iva_ids = _unique_ids(gen, 6, K, VOCAB)
    tpa_ids = _unique_ids(gen, 7, K, VOCAB, pad_slots=2)
    s_ids = _unique_ids(gen, 6, 4, VOCAB, pad_slots=1)
    counts = torch.where(s_ids >= 0, torch.randint(1, 9, s_ids.shape, generator=gen), 0)
    terms = {
        "sft": (L.sft_term(labels), torch.arange(10), 1.0,
                lambda z: L.sft_loss(z, labels)),
        "kd": (L.kd_term(kd_ids, _teacher_logprobs(gen, kd_ids), **kw), torch.arange(10), 0.7, None),
        "iva": (L.iva_term(iva_ids, _teacher_logprobs(gen, iva_ids), torch.rand(6, generator=gen),
                           torch.tensor([0, 0, 1, 1, 1, 5]), **kw), torch.arange(10, 16), 1.3, None),
        "tpa": (L.tpa_term(tpa_ids, _teacher_logprobs(gen, tpa_ids), torch.randn(7, generator=gen) - 2,
                           torch.tensor([0, 0, 0, 1, 1, 2, 3]), **kw), torch.arange(16, 23), 0.5, None),
        "sampled": (L.sampled_kd_term(s_ids, counts), torch.arange(3, 9), 0.9, None),
    }
    return hidden, weight, bias, terms


def _reference(hidden, weight, bias, terms, vocab_size):
    logits = hidden @ weight[:vocab_size].T + bias[:vocab_size]
    total, values = 0.0, []
    for term, rows, scale, direct in terms.values():
        value = direct(logits[rows]) if direct is not None else term.of_logits(logits[rows])
        values.append(value)
        total = total + scale * value
    return total, torch.stack(values)


def _grads(total, *params):
    return torch.autograd.grad(total, params)


@pytest.mark.parametrize("divergence", L.DIVERGENCES)
@pytest.mark.parametrize("chunk_rows", [1, 4, 64])
def test_fused_head_equals_the_terms_on_full_logits(divergence, chunk_rows):
    hidden, weight, bias, terms = _setup(divergence=divergence)
    want_total, want_values = _reference(hidden, weight, bias, terms, VOCAB)
    want = _grads(want_total, hidden, weight, bias)
    head_terms = [L.HeadTerm(t, rows, scale) for t, rows, scale, _ in terms.values()]
    total, values = L.fused_head_loss(hidden, weight, bias, head_terms, vocab_size=VOCAB, chunk_rows=chunk_rows)
    torch.testing.assert_close(values, want_values.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(total, want_total, rtol=0, atol=1e-6)
    got = _grads(total, hidden, weight, bias)
    for name, g, w in zip(("hidden", "weight", "bias"), got, want):
        torch.testing.assert_close(g, w, rtol=0, atol=1e-6, msg=name)
    assert not values.requires_grad
    # Padded head rows are no token: no gradient reaches them.
    assert bool((got[1][VOCAB:] == 0).all()) and bool((got[2][VOCAB:] == 0).all())


def test_fused_head_scales_by_the_incoming_gradient_and_skips_frozen_parameters():
    hidden, weight, bias, terms = _setup(seed=1)
    weight.requires_grad_(False)
    head_terms = [L.HeadTerm(t, rows, scale) for t, rows, scale, _ in terms.values()]
    total, _ = L.fused_head_loss(hidden, weight, None, head_terms, vocab_size=VOCAB)
    (g,) = torch.autograd.grad(3.0 * total, hidden)
    logits = hidden @ weight[:VOCAB].T
    ref = sum(scale * (d(logits[rows]) if d is not None else t.of_logits(logits[rows]))
              for t, rows, scale, d in terms.values())
    (want,) = torch.autograd.grad(3.0 * ref, hidden)
    torch.testing.assert_close(g, want, rtol=0, atol=1e-6)


def test_fused_head_without_rows_is_a_zero_that_keeps_the_graph():
    hidden, weight, bias, _ = _setup()
    empty = L.kd_term(torch.zeros(0, K, dtype=torch.long), torch.zeros(0, K))
    total, values = L.fused_head_loss(hidden, weight, bias, [L.HeadTerm(empty, torch.zeros(0, dtype=torch.long), 1.0)])
    assert float(total.detach()) == 0.0 and values.tolist() == [0.0]
    total.backward()
    assert float(hidden.grad.abs().sum()) == 0.0 and float(weight.grad.abs().sum()) == 0.0


def test_fused_head_in_float32_keeps_no_vocabulary_wide_tensor_alive():
    """At a real vocabulary the point is memory: the forward holds the gradients ([N, d] and the
    head's [V, d]), never an [N, V] tensor. Checked through the saved tensors' shapes."""
    torch.manual_seed(0)
    n, d, v = 40, 16, 3000
    hidden = torch.randn(n, d, dtype=torch.float32, requires_grad=True)
    weight = torch.randn(v, d, dtype=torch.float32, requires_grad=True)
    ids = torch.randint(0, v, (n, 4))
    term = L.kd_term(ids, torch.full((n, 4), -3.0))
    total, _ = L.fused_head_loss(hidden, weight, None, [L.HeadTerm(term, torch.arange(n), 1.0)], chunk_rows=8)
    saved = [t.shape for t in total.grad_fn.saved_tensors]
    assert sorted(saved) == sorted([torch.Size([n, d]), torch.Size([v, d])])
    ref = term.of_logits((hidden @ weight.T))
    torch.testing.assert_close(total, ref, rtol=1e-5, atol=1e-6)


def test_fused_head_refuses_rows_outside_the_hidden_states():
    hidden, weight, bias, terms = _setup()
    term = terms["kd"][0]
    with pytest.raises(ValueError, match="must index the 23 hidden rows"):
        L.fused_head_loss(hidden, weight, bias, [L.HeadTerm(term, torch.arange(20, 30), 1.0)])
    with pytest.raises(ValueError, match="do not match its ids"):
        L.fused_head_loss(hidden, weight, bias, [L.HeadTerm(term, torch.arange(3), 1.0)])
    with pytest.raises(ValueError, match="vocab_size"):
        L.fused_head_loss(hidden, weight, bias, [], vocab_size=HEAD_ROWS + 1)
