"""Branch rows (DESIGN.md §3.4) and sparse teacher distributions (§3.1), on tiny models of every family.

Reference for a branch row (t, c): a plain forward of the model over ``x_0 … x_t, c`` with the images
of that prefix, last position. Everything runs in float32; log-probs are compared with atol 1e-5
(observed differences are ~2e-7: only the attention kernel's reduction order differs).
"""

from __future__ import annotations

import copy
import math
from types import SimpleNamespace

import pytest
import torch
from conftest import write_image

from pipeline.data.encode import encode
from pipeline.data.records import Record, Turn
from pipeline.modeling.batching import collate_model_inputs
from pipeline.modeling.branches import (
    branch_hidden_from_cache,
    forward_branches_from_cache,
    forward_with_branches,
    pad_branches,
    sequence_lengths,
    sequence_position_ids,
)
from pipeline.modeling.logits import output_head
from pipeline.modeling.sparse import tail_mass
from stage1_teacher.topk import sample_counts, select_transitions, topk_logprobs

ATOL = 1e-5  # on float32 log-probs


def logp(x: torch.Tensor) -> torch.Tensor:
    return torch.log_softmax(x if x.dtype == torch.float64 else x.float(), dim=-1)


@pytest.fixture(scope="module")
def samples(teacher, tmp_path_factory):
    """Two samples: two images in two turns (T ≈ 90), and one image in one turn (shorter)."""
    _, processor = teacher
    d = tmp_path_factory.mktemp("branch-images")
    a, b, c = write_image(d / "a.png", 32, 48, 1), write_image(d / "b.png", 40, 32, 2), write_image(d / "c.png", 32, 32, 3)
    two = Record(
        "two",
        [
            Turn("user", "<image>\nWhat colour is the shape?"),
            Turn("assistant", "It is red."),
            Turn("user", "And <image> how many?"),
            Turn("assistant", "There are 3 blue shapes."),
        ],
        [a, b],
    )
    one = Record("one", [Turn("user", "<image>\nIs there a star?"), Turn("assistant", "Yes.")], [c])
    return [encode(two, processor, 1024), encode(one, processor, 1024)]


def prefix_inputs(enc, t: int, c: int) -> dict:
    """Processor-style inputs for ``x_0 … x_t, c`` with the images whose blocks lie inside the prefix."""
    mi = enc.model_inputs
    ids = torch.cat([mi["input_ids"][:, : t + 1], torch.tensor([[c]])], dim=1)
    out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    n_img = sum(1 for blk in enc.visual_blocks if blk.start + blk.length <= t + 1)
    if any(blk.start <= t < blk.start + blk.length - 1 for blk in enc.visual_blocks):
        raise ValueError("test bug: t inside an image block")
    if "mm_token_type_ids" in mi:  # Qwen2-VL: pixel rows are the images' patches, in order
        out["mm_token_type_ids"] = torch.cat([mi["mm_token_type_ids"][:, : t + 1], torch.zeros(1, 1, dtype=torch.long)], 1)
        if n_img:
            grid = mi["image_grid_thw"][:n_img]
            out["image_grid_thw"] = grid
            out["pixel_values"] = mi["pixel_values"][: int(grid.prod(-1).sum())]
    elif n_img and mi["pixel_values"].ndim == 5:  # Idefics3: [1, tiles, C, H, W], one tile per block
        out["pixel_values"] = mi["pixel_values"][:, :n_img]
        out["pixel_attention_mask"] = mi["pixel_attention_mask"][:, :n_img]
    elif n_img:  # one image (LLaVA) or one tile (InternVL) per block; tiles are encoded independently
        out["pixel_values"] = mi["pixel_values"][:n_img]
    return out


def reference_branch_logprobs(model, enc, pos, tok) -> torch.Tensor:
    with torch.no_grad():
        return torch.stack([logp(model(**prefix_inputs(enc, int(t), int(c))).logits[0, -1]) for t, c in zip(pos, tok)])


def branches_of(model, enc) -> tuple[torch.Tensor, torch.Tensor]:
    """(t, c) pairs covering the last cell of each image block (for Qwen2-VL one grid wider than tall,
    one taller than wide), the first text token after each block, and a response position of the
    first and of the later turn; per t the teacher's top two non-gold tokens plus one arbitrary token.
    A tiled image's blocks (tiles, then the global image) count as one block here; the last cell of
    its first tile comes after the response positions (so the first pairs keep their roles)."""
    blocks = enc.visual_blocks
    last = [blk for i, blk in enumerate(blocks) if i + 1 == len(blocks) or blocks[i + 1].image_index != blk.image_index]
    ts = [t for blk in last for t in (blk.start + blk.length - 1, blk.start + blk.length)]
    ts += [int(enc.turns[0].response[1]), int(enc.turns[-1].response[-2])]
    ts += [blk.start + blk.length - 1 for i, blk in enumerate(blocks)
           if blk not in last and (i == 0 or blocks[i - 1].image_index != blk.image_index)]
    with torch.no_grad():
        logits = model(**enc.model_inputs).logits[0]
    pos, tok = [], []
    for i, t in enumerate(ts):
        top = torch.topk(logits[t], 3).indices.tolist()
        gold = int(enc.input_ids[t + 1])
        cands = [c for c in top if c != gold][:2] + [40 + 13 * i]
        pos += [t] * len(cands)
        tok += cands
    return torch.tensor(pos), torch.tensor(tok)


def cache_path(model, model_inputs, branch_pos, branch_tok):
    position_ids = sequence_position_ids(model, model_inputs)
    with torch.no_grad():
        out = model(**model_inputs, position_ids=position_ids, use_cache=True)
        cache = out.past_key_values
        length = cache.get_seq_length()
        logits = forward_branches_from_cache(
            model, cache, position_ids, branch_pos, branch_tok, sequence_lengths(model_inputs)
        )
    assert cache.get_seq_length() == length  # branch keys cropped off again
    return out.logits, logits, cache, position_ids


# ---------------------------------------------------------------- branch rows equal plain forwards


@pytest.mark.parametrize("kernel", ["sdpa", "eager"])
def test_branch_rows_equal_plain_forward_on_prefix(teacher, samples, kernel):
    model, _ = teacher
    model.set_attn_implementation(kernel)
    try:
        enc = samples[0]
        pos, tok = branches_of(model, enc)
        ref = reference_branch_logprobs(model, enc, pos, tok)
        with torch.no_grad():
            _, full = forward_with_branches(model, enc.model_inputs, pos, tok)
        _, cached, _, _ = cache_path(model, enc.model_inputs, pos, tok)
    finally:
        model.set_attn_implementation("sdpa")
    assert full.shape == cached.shape == (len(pos), ref.shape[1])
    torch.testing.assert_close(logp(full), ref, rtol=0, atol=ATOL)
    torch.testing.assert_close(logp(cached), ref, rtol=0, atol=ATOL)
    # The check has teeth: different candidates at one t give different distributions.
    assert (ref[0] - ref[1]).abs().max() > 1e-3


def test_mrope_branch_position_follows_text_rule(teacher, samples):
    """Qwen2-VL: after an image block the next text id is start + max(h, w), not pos(t) + 1; and
    a wrong id would change the output (so the equality test above constrains the positions)."""
    model, _ = teacher
    enc = samples[0]
    pos_ids = sequence_position_ids(model, enc.model_inputs)
    blk = [b for b in enc.visual_blocks if b.image_index == 1][-1]  # the second image's (last) block
    after = blk.start + blk.length  # first text token after the second image
    if pos_ids.ndim == 3:
        assert pos_ids.shape == (3, 1, enc.length)
        assert (pos_ids[:, 0, after] == pos_ids[0, 0, blk.start] + max(blk.grid)).all()
        # The last cell's ids plus one, component by component, would be wrong here.
        assert not torch.equal(pos_ids[:, 0, after], pos_ids[:, 0, after - 1] + 1)
    else:
        assert torch.equal(pos_ids[0], torch.arange(enc.length))
    # Misplacing the branch by one position id changes its distribution beyond tolerance.
    t, c = after, 60
    ref = reference_branch_logprobs(model, enc, [t], [c])[0]
    shifted = pos_ids[..., : t + 2].clone()
    shifted[..., t + 1] += 1
    ids = torch.cat([enc.model_inputs["input_ids"][:, : t + 1], torch.tensor([[c]])], 1)
    kw = prefix_inputs(enc, t, c)
    kw.pop("mm_token_type_ids", None)
    with torch.no_grad():
        wrong = logp(model(**{**kw, "input_ids": ids}, position_ids=shifted).logits[0, -1])
    assert (wrong - ref).abs().max() > 10 * ATOL


def test_sequence_logits_unchanged_by_branches(teacher, samples):
    model, _ = teacher
    enc = samples[0]
    pos, tok = branches_of(model, enc)
    with torch.no_grad():
        plain = model(**enc.model_inputs).logits[0]
        seq, _ = forward_with_branches(model, enc.model_inputs, pos, tok)
    assert seq.shape == plain.shape
    torch.testing.assert_close(logp(seq), logp(plain), rtol=0, atol=ATOL)


def test_batch_equals_per_sample(teacher, samples):
    model, processor = teacher
    per_sample = [branches_of(model, enc) for enc in samples]
    per_sample[1] = (per_sample[1][0][:4], per_sample[1][1][:4])  # different branch counts
    assert len(per_sample[0][0]) != len(per_sample[1][0])
    assert samples[0].length != samples[1].length

    batch = collate_model_inputs([enc.model_inputs for enc in samples], processor.tokenizer.pad_token_id)
    bpos, btok = pad_branches(per_sample)
    with torch.no_grad():
        seq_b, full_b = forward_with_branches(model, batch, bpos, btok)
    _, cached_b, _, _ = cache_path(model, batch, bpos, btok)
    assert torch.isfinite(full_b).all() and torch.isfinite(cached_b).all()  # padded rows included

    for b, (enc, (pos, tok)) in enumerate(zip(samples, per_sample)):
        r, t = len(pos), enc.length
        with torch.no_grad():
            seq_1, full_1 = forward_with_branches(model, enc.model_inputs, pos, tok)
        _, cached_1, _, _ = cache_path(model, enc.model_inputs, pos, tok)
        torch.testing.assert_close(logp(seq_b[b, :t]), logp(seq_1), rtol=0, atol=ATOL)
        torch.testing.assert_close(logp(full_b[b, :r]), logp(full_1), rtol=0, atol=ATOL)
        torch.testing.assert_close(logp(cached_b[b, :r]), logp(cached_1), rtol=0, atol=ATOL)
        torch.testing.assert_close(logp(full_1), reference_branch_logprobs(model, enc, pos, tok), rtol=0, atol=ATOL)


def test_cache_path_runs_in_chunks(teacher, samples):
    """The cache is restored after each call, so branches can be fed in several chunks."""
    model, _ = teacher
    enc = samples[0]
    pos, tok = branches_of(model, enc)
    _, whole, cache, position_ids = cache_path(model, enc.model_inputs, pos, tok)
    with torch.no_grad():
        parts = [
            forward_branches_from_cache(model, cache, position_ids, pos[s], tok[s], enc.length)
            for s in (slice(0, 3), slice(3, None))
        ]
    torch.testing.assert_close(logp(torch.cat(parts)), logp(whole), rtol=0, atol=ATOL)


def test_branch_hidden_rows_are_the_real_rows_of_the_cache_path(teacher, samples):
    """``branch_hidden_from_cache`` on a batch with padded branch rows: one hidden row per real
    branch row, in (sample, row) order, whose head product is the logits of
    ``forward_branches_from_cache``; the model's head runs on no row; the cache is left as it was."""
    model, processor = teacher
    per_sample = [branches_of(model, enc) for enc in samples]
    per_sample[1] = (per_sample[1][0][:4], per_sample[1][1][:4])  # fewer rows: sample 1 is padded
    batch = collate_model_inputs([enc.model_inputs for enc in samples], processor.tokenizer.pad_token_id)
    bpos, btok = pad_branches(per_sample)
    _, logits, cache, position_ids = cache_path(model, batch, bpos, btok)
    length = cache.get_seq_length()
    head_rows = []
    hook = model.get_output_embeddings().register_forward_hook(lambda m, a, out: head_rows.append(out.shape[-2]))
    try:
        with torch.no_grad():
            hidden = branch_hidden_from_cache(model, cache, position_ids, bpos, btok, sequence_lengths(batch))
    finally:
        hook.remove()
    assert head_rows == [0] and cache.get_seq_length() == length
    real = [logits[b, : len(p)] for b, (p, _) in enumerate(per_sample)]
    assert hidden.shape == (sum(len(p) for p, _ in per_sample), model.get_output_embeddings().weight.shape[1])
    weight, bias = output_head(model)
    product = torch.nn.functional.linear(hidden, weight, bias)
    torch.testing.assert_close(logp(product), logp(torch.cat(real)), rtol=0, atol=ATOL)
    with torch.no_grad():  # no branch row at all: no forward, no hidden row
        none = branch_hidden_from_cache(model, cache, position_ids, bpos[:, :0], btok[:, :0], sequence_lengths(batch))
    assert none.shape == (0, weight.shape[1])


def test_bad_branches_are_refused(teacher, samples):
    model, _ = teacher
    enc = samples[0]
    with pytest.raises(ValueError, match="inside its sample"):
        forward_with_branches(model, enc.model_inputs, torch.tensor([enc.length]), torch.tensor([5]))
    with pytest.raises(ValueError, match="vision placeholder"):
        forward_with_branches(model, enc.model_inputs, torch.tensor([3]), torch.tensor([model.config.image_token_id]))


# ---------------------------------------------------------------- top-k log-probs


@pytest.mark.parametrize("temperature", [1.0, 2.0, 0.5])
def test_topk_logprobs_are_exact(temperature):
    g = torch.Generator().manual_seed(0)
    logits = 4 * torch.randn(37, 300, generator=g)
    ids, lps = topk_logprobs(logits, k=10, temperature=temperature, chunk_rows=8)  # 5 chunks
    dense = torch.log_softmax(logits.double() / temperature, dim=-1)
    assert ids.dtype == torch.int64 and lps.dtype == torch.float32 and ids.shape == lps.shape == (37, 10)
    torch.testing.assert_close(lps.double(), dense.gather(1, ids), rtol=0, atol=1e-6)
    torch.testing.assert_close(ids, torch.topk(dense, 10).indices)
    outside = dense.exp().scatter(1, ids, 0.0).sum(-1)  # dense mass outside the kept ids
    torch.testing.assert_close(tail_mass(lps).double(), outside, rtol=0, atol=1e-6)
    if temperature != 1.0:  # temperature is applied: differs from the τ = 1 distribution
        assert (lps - topk_logprobs(logits, 10)[1]).abs().max() > 1e-2


def test_topk_logprobs_bf16_computed_in_float32():
    g = torch.Generator().manual_seed(1)
    logits = (6 * torch.randn(5, 1000, generator=g)).bfloat16()
    ids, lps = topk_logprobs(logits, k=8)
    assert lps.dtype == torch.float32
    ref = torch.log_softmax(logits.double(), dim=-1).gather(1, ids)
    torch.testing.assert_close(lps.double(), ref, rtol=0, atol=1e-6)
    # A bf16 log-softmax would be off by far more than that tolerance.
    assert (torch.log_softmax(logits, -1).gather(1, ids).double() - ref).abs().max() > 1e-4


# ---------------------------------------------------------------- sampled target


def test_sample_counts_properties():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(9, 200, generator=g)
    logits[4] = -30.0
    logits[4, 17] = 30.0  # one row with (almost) all mass on one token: a single unique id
    ids, counts = sample_counts(logits, 50, torch.Generator().manual_seed(7), chunk_rows=4)
    assert ids.shape == counts.shape and ids.dtype == torch.int64
    assert (counts.sum(-1) == 50).all()
    real = counts > 0
    assert ((ids >= 0) & (ids < 200))[real].all() and (ids[~real] == -1).all()
    for row, row_real in zip(ids, real):  # unique within a row
        assert row[row_real].unique().numel() == int(row_real.sum())
    assert ids[4, 0] == 17 and counts[4, 0] == 50 and int(real[4].sum()) == 1
    assert ids.shape[1] == int(real.sum(-1).max())  # padded to the row max only
    again = sample_counts(logits, 50, torch.Generator().manual_seed(7), chunk_rows=4)
    assert torch.equal(ids, again[0]) and torch.equal(counts, again[1])
    other = sample_counts(logits, 50, torch.Generator().manual_seed(8), chunk_rows=4)
    assert not torch.equal(counts, other[1]) or not torch.equal(ids, other[0])


def test_sample_counts_frequencies_match_p():
    n = 200_000
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(3, 20, generator=g)
    temperature = 0.7
    p = torch.softmax(logits.double() / temperature, -1)
    ids, counts = sample_counts(logits, n, torch.Generator().manual_seed(3), temperature=temperature)
    freq = torch.zeros(3, 20, dtype=torch.float64).scatter_add_(1, ids.clamp_min(0), counts.double()) / n
    # Binomial std sqrt(p(1-p)/n) <= 0.0011 here; allow 5 std.
    assert (freq - p).abs().max() < 5 * math.sqrt(0.25 / n)


# ---------------------------------------------------------------- transition selection


def _row(vocab: int, gold: int, probs: dict[int, float]) -> torch.Tensor:
    """A probability row with the given entries; the remaining mass spread evenly over the other ids."""
    p = torch.zeros(vocab, dtype=torch.float64)
    rest = [i for i in range(vocab) if i not in probs]
    for i, v in probs.items():
        p[i] = v
    p[rest] = (1.0 - sum(probs.values())) / len(rest)
    assert probs[gold] > 0
    return p


def _hand_made():
    v = 32
    rows = [
        _row(v, 0, {0: 0.97}),  # alt mass 0.03 < eps: not selected
        _row(v, 1, {1: 0.5, 3: 0.3, 5: 0.15}),  # alt 0.5: candidates 3, 5
        _row(v, 2, {2: 0.15, 7: 0.5, 8: 0.1, 9: 0.09, 10: 0.08, 11: 0.07}),  # alt 0.85: K cap drops 11; gold is 2nd
        _row(v, 4, {4: 0.9, 6: 0.06}),  # alt 0.1: candidate 6 only (rest < p_min)
        _row(v, 5, {5: 0.38}),  # alt 0.62 but spread thin (0.02 each): no candidate, not selected
    ]
    probs = torch.stack(rows)
    return probs.log().float(), torch.tensor([0, 1, 2, 4, 5]), torch.tensor([10, 11, 15, 20, 21]), probs


def test_select_transitions_hand_made():
    logits, gold, positions, probs = _hand_made()
    kw = dict(candidates=4, min_prob=0.05, min_alt_mass=0.05)
    tr = select_transitions(logits, gold, positions, max_positions=64, **kw)
    assert tr.rows.tolist() == [1, 2, 3]
    assert tr.positions.tolist() == [11, 15, 20]
    torch.testing.assert_close(tr.alt_mass, torch.tensor([0.5, 0.85, 0.1]), rtol=0, atol=1e-6)
    assert tr.cand_ids.tolist() == [3, 5, 7, 8, 9, 10, 6]
    assert tr.cand_index.tolist() == [0, 0, 1, 1, 1, 1, 2]
    assert tr.cand_positions.tolist() == [11, 11, 15, 15, 15, 15, 20]
    expected = probs[tr.rows[tr.cand_index], tr.cand_ids].log().float()
    torch.testing.assert_close(tr.cand_logprobs, expected, rtol=0, atol=1e-6)
    assert not (tr.cand_ids == gold[tr.rows][tr.cand_index]).any()  # gold is never a candidate

    # M cap keeps the highest alternative mass (rows 2: 0.85 and 1: 0.5), back in position order.
    capped = select_transitions(logits, gold, positions, max_positions=2, **kw)
    assert capped.rows.tolist() == [1, 2] and capped.cand_ids.tolist() == [3, 5, 7, 8, 9, 10]
    # eps threshold: at 0.6 only row 2 (0.85) and row 4 (0.62, no candidates) pass; row 4 is dropped.
    assert select_transitions(logits, gold, positions, max_positions=64, **{**kw, "min_alt_mass": 0.6}).rows.tolist() == [2]
    # p_min filter: at 0.2 only candidates 3 (0.3) and 7 (0.5) are left.
    strict = select_transitions(logits, gold, positions, max_positions=64, **{**kw, "min_prob": 0.2})
    assert strict.rows.tolist() == [1, 2] and strict.cand_ids.tolist() == [3, 7]
    # Excluded ids (e.g. vision placeholders) are never candidates.
    excl = select_transitions(logits, gold, positions, max_positions=64, exclude_ids=torch.tensor([3, 7]), **kw)
    assert excl.cand_ids.tolist() == [5, 8, 9, 10, 11, 6]
    # Logits at a temperature or log-probs: same selection as from probabilities (log-softmax is idempotent).
    shifted = select_transitions(3.0 + logits, gold, positions, max_positions=64, **kw)
    assert torch.equal(shifted.cand_ids, tr.cand_ids)
    torch.testing.assert_close(shifted.cand_logprobs, tr.cand_logprobs, rtol=0, atol=1e-6)


@pytest.fixture()
def one_thread():
    """Tiny float64 matmuls: with a second OpenMP thread on a busy 2-core machine this test took
    8-17 s instead of 0.15 s (the threads wait on each other at every op)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_gradients_equal_those_of_plain_forwards(teacher, samples, one_thread):
    """The gradient of a loss over sequence and branch log-probs through ``forward_with_branches``
    (a batch: in-row layout, padding) equals the gradient of the same loss built from plain
    forwards (each sample alone, and ``x_0 … x_t, c`` per branch row); so does the cache path's,
    whose branch gradients flow through the cached keys and values. In float64, so that atol 1e-5
    on gradients of size ~50 measures the layout, not float32 summation order (~2e-5 there)."""
    model, processor = teacher
    per_sample = [branches_of(model, enc) for enc in samples]
    # After both image blocks and in the text (sample 0), after its image (sample 1): 7 and 3 rows.
    per_sample = [(p[i], t[i]) for (p, t), i in zip(per_sample, ([1, 2, 4, 7, 9, 13, 16], [0, 3, 6]))]
    model = copy.deepcopy(model).double()

    def double(inputs: dict) -> dict:
        return {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}

    samples = [SimpleNamespace(model_inputs=double(e.model_inputs), length=e.length, visual_blocks=e.visual_blocks)
               for e in samples]
    batch = collate_model_inputs([enc.model_inputs for enc in samples], processor.tokenizer.pad_token_id)
    bpos, btok = pad_branches(per_sample)
    params = [p for p in model.parameters() if p.requires_grad]
    gen = torch.Generator().manual_seed(0)
    vocab = model.get_output_embeddings().weight.shape[0]
    u, v = torch.randn(vocab, generator=gen, dtype=torch.float64), torch.randn(vocab, generator=gen, dtype=torch.float64)
    n_rows = sum(enc.length for enc in samples) + sum(len(p) for p, _ in per_sample)

    def loss_of(seq_rows: list[torch.Tensor], branch_rows: list[torch.Tensor]) -> torch.Tensor:
        return (sum((logp(x) @ u).sum() for x in seq_rows) + sum((logp(x) @ v).sum() for x in branch_rows)) / n_rows

    reference = loss_of(
        [model(**enc.model_inputs).logits[0] for enc in samples],
        [model(**prefix_inputs(enc, int(t), int(c))).logits[0, -1:] for enc, (pos, tok) in zip(samples, per_sample)
         for t, c in zip(pos, tok)],
    )
    seq, branch = forward_with_branches(model, batch, bpos, btok)
    in_row = loss_of([seq[b, : enc.length] for b, enc in enumerate(samples)],
                     [branch[b, : len(p)] for b, (p, _) in enumerate(per_sample)])
    position_ids = sequence_position_ids(model, batch)
    out = model(**batch, position_ids=position_ids, use_cache=True)
    cached = forward_branches_from_cache(model, out.past_key_values, position_ids, bpos, btok, sequence_lengths(batch))
    cache_loss = loss_of([out.logits[b, : enc.length] for b, enc in enumerate(samples)],
                         [cached[b, : len(p)] for b, (p, _) in enumerate(per_sample)])

    torch.testing.assert_close(in_row, reference, rtol=0, atol=1e-5)
    want = torch.autograd.grad(reference, params, allow_unused=True)  # (the vision tower's unused top layer)
    for got in (torch.autograd.grad(in_row, params, allow_unused=True),
                torch.autograd.grad(cache_loss, params, allow_unused=True)):
        assert [g is None for g in got] == [w is None for w in want]
        for g, w in zip(got, want):
            if w is not None:
                torch.testing.assert_close(g, w, rtol=0, atol=1e-5)
    assert sum(w is not None for w in want) > len(want) // 2
    assert max(float(w.abs().max()) for w in want if w is not None) > 1e-3  # not trivially ~0
