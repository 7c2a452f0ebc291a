"""The teacher's output head runs only on the rows it stores, and what it stores is what a plain
full-logits forward gives (DESIGN.md §3.1, §3.3, §3.4).

``Teacher.signals`` captures hidden states, chooses the visual rows from the saliency maps, and
only then applies the head, in chunks, to response rows, the chosen visual rows and the real
branch rows (``topk.HeadRows``), with one float32 log-softmax per row shared by every statistic
(``topk.row_statistics``). Here each sample's stored signals are rebuilt from a plain forward of
that sample alone (all logits, float64 log-softmax over the real vocabulary, a dense masked top-K
for candidates, plain prefix forwards for branch rows, a float64 inverse CDF for the draws), on a
teacher whose head has padded rows that carry mass, for a 1-D RoPE family and an mRoPE family.
The unit tests check ``row_statistics``' candidate rule (no ``[N, V]`` mask) against a masked top-K,
ties included, and the sampled draws: counts, unbiasedness and independence of chunking. The
sampled targets of every row kind (response, visual, branch) are checked against the reference rows
with each kind's own uniforms.
"""

from __future__ import annotations

import math
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import two_image_record, write_image
from test_branches import prefix_inputs

from pipeline.data.encode import encode
from pipeline.data.records import Record, Turn
from pipeline.tools.tiny import PRESETS, build_tiny_vlm
from stage1_teacher.config import SampledConfig, SignalsConfig, TeacherConfig, TransitionsConfig
from stage1_teacher.teacher import Teacher, sample_seed
from stage1_teacher.topk import HeadRows, row_statistics, sample_counts, select_transitions

PAD_ROWS = 8
SCALE = 30.0  # the head x30: peaked distributions, so p_min, epsilon and the M cap all bite
SEED = 5
SIGNALS = SignalsConfig(
    top_k=8,
    visual_fraction=0.25,
    sampled=SampledConfig(enabled=True, draws=24, rows=["response", "visual", "transitions"]),
    transitions=TransitionsConfig(candidates=3, top_k=5, min_prob=0.02, min_alt_mass=0.05, max_positions=4),
)
ATOL = 1e-5  # float32 log-probs against a float64 reference


def padded_teacher(out: Path, family: str) -> Path:
    """A tiny ``family`` teacher with PAD_ROWS head rows beyond its tokenizer, its head scaled by
    SCALE, and its padded rows copies (x1.05) of the real rows that most often rank in a top-8, so
    that they would be stored if the head were not cut to the tokenizer."""
    model, processor = build_tiny_vlm(family, replace(PRESETS["teacher"], padded_rows=PAD_ROWS), seed=0)
    head = model.get_output_embeddings().weight
    n_tok = len(processor.tokenizer)
    with torch.no_grad():
        head.mul_(SCALE)
        ids = torch.randint(0, n_tok, (1, 64), generator=torch.Generator().manual_seed(0))
        top = model(input_ids=ids).logits[0, :, :n_tok].topk(8, dim=-1).indices
        frequent = torch.bincount(top.flatten(), minlength=n_tok).argsort(descending=True)[:PAD_ROWS]
        head[n_tok:] = 1.05 * head[frequent]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module", params=["llava", "qwen2_vl"])
def setup(request, tmp_path_factory):
    """(teacher, samples): the Teacher on a padded tiny checkpoint, and three encoded samples of
    different lengths (two images in two turns, one image, text only)."""
    root = tmp_path_factory.mktemp(f"rows-{request.param}")
    teacher = Teacher(TeacherConfig(str(padded_teacher(root / "teacher", request.param)), dtype="float32", device="cpu"),
                      SIGNALS, seed=SEED)
    processor = teacher.processor
    img = write_image(root / "c.png", 32, 48, 3)
    records = [
        two_image_record(root, "two"),
        Record("one", [Turn("user", "<image>\nIs there a star in the picture?"), Turn("assistant", "Yes, a red star.")], [img]),
        Record("text", [Turn("user", "Say hello to the shapes."), Turn("assistant", "Hello shapes, all of you.")], []),
    ]
    return teacher, [encode(rec, processor, 1024) for rec in records]


def full_logprobs(teacher: Teacher, enc) -> torch.Tensor:
    """float64 log-softmax over the real vocabulary of a plain forward of one sample, every position."""
    with torch.no_grad():
        logits = teacher.model(**enc.model_inputs).logits[0]
    assert logits.shape[-1] == teacher.vocab_size + PAD_ROWS
    return torch.log_softmax(logits[:, : teacher.vocab_size].double(), dim=-1)


def reference_visual(saliency: np.ndarray, n_vis: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Indices (into the visual positions) and weights of the most salient fraction, in position
    order, ties to the earlier position: written with numpy's lexsort."""
    if n_vis == 0 or not (saliency.sum(1) > 0).any():
        return np.zeros(0, np.int64), np.zeros(0, np.float32)
    mean = saliency[saliency.sum(1) > 0].mean(0)
    n_keep = min(n_vis, math.ceil(fraction * n_vis))
    chosen = np.sort(np.lexsort((np.arange(n_vis), -mean))[:n_keep])
    return chosen, mean[chosen]


def reference_transitions(lp: torch.Tensor, enc, excluded: list[int], cfg: TransitionsConfig):
    """(positions, candidates, their log-probs) per DESIGN.md §3.4, one response row at a time, with
    the gold and excluded ids masked over the whole row before a full sort."""
    rows = []
    for t in enc.response_positions:
        row = lp[t].clone()
        gold = int(enc.input_ids[t + 1])
        # The alternative mass at the precision of the stored log-probs (float32): on this peaked
        # teacher many rows have p(gold) < 6e-8, i.e. alt = 1.0 exactly, and the M cap's rule for
        # equal mass (the earlier position first) then decides, as it does in the teacher.
        alt = float(-torch.expm1(row[gold].float()))
        row[[gold, *excluded]] = -math.inf
        order = torch.sort(row, descending=True, stable=True).indices[: cfg.candidates]
        cands = [(int(c), float(row[c])) for c in order if row[c] >= math.log(cfg.min_prob)]
        if alt >= cfg.min_alt_mass and cands:
            rows.append((int(t), alt, cands))
    kept = sorted(sorted(rows, key=lambda r: -r[1])[: cfg.max_positions], key=lambda r: r[0])  # stable: earlier first
    pos = [t for t, _, cands in kept for _ in cands]
    ids = [c for _, _, cands in kept for c, _ in cands]
    lps = [v for _, _, cands in kept for _, v in cands]
    return np.array(pos, np.int64), np.array(ids, np.int64), np.array(lps)


def reference_draws(lp: torch.Tensor, uniforms: torch.Tensor) -> list[dict[int, int]]:
    """Per row, {id: count} of inverse-CDF draws in float64 (numpy's searchsorted)."""
    out = []
    for row, u in zip(lp.exp().numpy(), uniforms.double().numpy()):
        cdf = np.cumsum(row)
        ids, counts = np.unique(np.searchsorted(cdf, u * cdf[-1], side="right"), return_counts=True)
        out.append(dict(zip(ids.tolist(), counts.tolist())))
    return out


def assert_draws(ids: np.ndarray, counts: np.ndarray, ref_lp: torch.Tensor, seed: int, where: str) -> None:
    """A sample's stored sampled target of one row kind (ids/counts [n, m]) equals the float64
    inverse-CDF draws of ``ref_lp`` [n, V] with the uniforms of a generator seeded by ``seed``, every
    row's counts sum to the draws, and the rows are padded to the sample's widest row only."""
    uniforms = torch.rand((ref_lp.shape[0], SIGNALS.sampled.draws), generator=torch.Generator().manual_seed(seed))
    got = [{int(i): int(c) for i, c in zip(r_ids, r_counts) if c > 0} for r_ids, r_counts in zip(ids, counts)]
    assert len(got) == ref_lp.shape[0], where
    assert got == reference_draws(ref_lp, uniforms), where
    assert all(sum(g.values()) == SIGNALS.sampled.draws for g in got), where
    assert ids.shape[1] == max((len(g) for g in got), default=0), where


def test_signals_equal_a_plain_forward_reference(setup, monkeypatch):
    teacher, samples = setup
    head_rows, head_calls = [], []
    original = HeadRows.__getitem__

    def counted(self, rows):
        logits = original(self, rows)
        head_rows.append(logits.shape[0])
        return logits

    monkeypatch.setattr(HeadRows, "__getitem__", counted)
    hook = teacher.model.get_output_embeddings().register_forward_hook(lambda m, a, out: head_calls.append(out.shape[-2]))
    try:
        layers = [teacher.n_layers - 1]
        stored = teacher.signals(samples, layers)
    finally:
        hook.remove()

    v = teacher.vocab_size
    excluded = teacher.no_candidates.tolist()
    n_rows = n_branch = n_vis_draws = 0
    padded_in_plain_topk = 0
    for enc, sig in zip(samples, stored):
        assert sig.sample_id == enc.sample_id
        lp = full_logprobs(teacher, enc)
        with torch.no_grad():
            plain = teacher.model(**enc.model_inputs).logits[0]
        padded_in_plain_topk += int((plain[enc.response_positions].topk(8, -1).indices >= v).sum())

        # Response rows: the true top-k over the real vocabulary, exact log-probs.
        ref = lp[enc.response_positions]
        np.testing.assert_array_equal(sig.resp_pos, enc.response_positions)
        np.testing.assert_array_equal(sig.resp_ids, ref.topk(SIGNALS.top_k).indices.numpy(), err_msg=enc.sample_id)
        np.testing.assert_allclose(sig.resp_logprobs, ref.topk(SIGNALS.top_k).values.numpy(), rtol=0, atol=ATOL)

        # Visual rows: the most salient fraction of the stored maps, their top-k.
        chosen, weight = reference_visual(sig.saliency, len(enc.visual_positions), SIGNALS.visual_fraction)
        np.testing.assert_array_equal(sig.vis_pos, enc.visual_positions[chosen], err_msg=enc.sample_id)
        np.testing.assert_allclose(sig.vis_weight, weight, rtol=0, atol=1e-7)
        ref_vis = lp[torch.as_tensor(sig.vis_pos, dtype=torch.long)]
        np.testing.assert_array_equal(sig.vis_ids, ref_vis.topk(SIGNALS.top_k).indices.numpy())
        np.testing.assert_allclose(sig.vis_logprobs, ref_vis.topk(SIGNALS.top_k).values.numpy(), rtol=0, atol=ATOL)
        if len(enc.visual_positions):
            assert 0 < len(sig.vis_pos) < len(enc.visual_positions)

        # Candidates: a dense masked top-K, p_min, epsilon and the M cap.
        pos, cand, cand_lp = reference_transitions(lp, enc, excluded, SIGNALS.transitions)
        np.testing.assert_array_equal(sig.tpa_pos, pos, err_msg=enc.sample_id)
        np.testing.assert_array_equal(sig.tpa_cand, cand, err_msg=enc.sample_id)
        np.testing.assert_allclose(sig.tpa_cand_logprob, cand_lp, rtol=0, atol=ATOL)

        # Transition rows: a plain forward over x_0 … x_t, c, its last position.
        branch_lp = []
        for r, (t, c) in enumerate(zip(sig.tpa_pos, sig.tpa_cand)):
            with torch.no_grad():
                last = teacher.model(**prefix_inputs(enc, int(t), int(c))).logits[0, -1, :v]
            branch_lp.append(torch.log_softmax(last.double(), -1))
            branch = branch_lp[-1].topk(SIGNALS.transitions.top_k)
            np.testing.assert_array_equal(sig.tpa_ids[r], branch.indices.numpy(), err_msg=f"{enc.sample_id} row {r}")
            np.testing.assert_allclose(sig.tpa_logprobs[r], branch.values.numpy(), rtol=0, atol=1e-4)

        # Sampled targets of the visual and branch rows: each kind's own uniforms (stream "visual",
        # "transitions"), one row per stored row in stored order, drawn from the plain forward's rows.
        for kind, ref_rows, ids, counts in (
            ("visual", ref_vis, sig.vis_sample_ids, sig.vis_sample_counts),
            ("transitions", torch.stack(branch_lp) if branch_lp else ref_vis[:0], sig.tpa_sample_ids, sig.tpa_sample_counts),
        ):
            assert_draws(ids, counts, ref_rows, sample_seed(SEED, enc.sample_id, kind), f"{enc.sample_id}/{kind}")
        n_vis_draws += len(sig.vis_pos)

        # Sampled target: the draws of the sample's own uniforms, by a float64 inverse CDF.
        assert_draws(sig.sample_ids, sig.sample_counts, ref, sample_seed(SEED, enc.sample_id), enc.sample_id)

        for name in ("resp_ids", "vis_ids", "tpa_ids", "tpa_cand", "sample_ids", "vis_sample_ids", "tpa_sample_ids"):
            ids = getattr(sig, name)
            assert ids.size == 0 or int(ids.max()) < v, (enc.sample_id, name)
        n_rows += len(sig.resp_pos) + len(sig.vis_pos) + len(sig.tpa_pos)
        n_branch += len(sig.tpa_pos)

    assert n_branch > 0 and n_vis_draws > 0 and padded_in_plain_topk > 0  # branch and visual draws exist; the cut to V matters
    # The head saw exactly the stored rows; the model's own head call ran on no row.
    assert sum(head_rows) == n_rows
    assert head_calls and set(head_calls) == {0}


def test_signals_do_not_depend_on_the_batch(setup):
    """A sample's stored signals are the same alone and in a batch (integers equal, floats within
    1e-5): the sampled draws depend on (seed, sample id) only, and no row sees another sample's."""
    teacher, samples = setup
    layers = [teacher.n_layers - 1]
    together = {s.sample_id: s for s in teacher.signals(samples, layers)}
    reordered = {s.sample_id: s for s in teacher.signals(samples[::-1][:2], layers)}
    alone = {s.sample_id: s for s in teacher.signals(samples[1:2], layers)}
    for other in (reordered, alone):
        for sid, sig in other.items():
            ref = together[sid]
            for name in ("resp_ids", "vis_pos", "vis_ids", "sample_ids", "sample_counts", "vis_sample_ids",
                         "vis_sample_counts", "tpa_pos", "tpa_cand", "tpa_ids", "tpa_sample_ids", "tpa_sample_counts"):
                np.testing.assert_array_equal(getattr(sig, name), getattr(ref, name), err_msg=f"{sid}/{name}")
            for name in ("resp_logprobs", "vis_weight", "vis_logprobs", "saliency", "tpa_cand_logprob", "tpa_logprobs"):
                np.testing.assert_allclose(getattr(sig, name), getattr(ref, name), rtol=0, atol=1e-5, err_msg=f"{sid}/{name}")


# ---------------------------------------------------------------- row_statistics, unit level


def masked_topk_reference(lp: torch.Tensor, gold: torch.Tensor, excluded: list[int], k: int):
    """Top-k of each row with gold and excluded ids set to -inf over the whole row (the [N, V] mask)."""
    masked = lp.clone()
    masked[torch.arange(len(gold)), gold] = -math.inf
    masked[:, excluded] = -math.inf
    return torch.topk(masked, k, dim=-1)


def test_candidates_without_a_mask_equal_a_masked_topk():
    g = torch.Generator().manual_seed(0)
    logits = 3 * torch.randn(60, 50, generator=g)
    gold = torch.randint(0, 50, (60,), generator=g)
    gold[:5] = 3  # gold among the excluded ids
    gold[5:10] = logits[5:10].argmax(-1)  # gold the most probable id
    excluded = [3, 7, 7, 11]  # a duplicate counts once
    stats = row_statistics(logits, 6, gold=gold, candidates=4, exclude_ids=torch.tensor(excluded), chunk_rows=7)
    lp = torch.log_softmax(logits.double(), -1)
    ref = masked_topk_reference(lp, gold, excluded, 4)
    torch.testing.assert_close(stats.cand_ids, ref.indices)
    torch.testing.assert_close(stats.cand_logprobs.double(), ref.values, rtol=0, atol=1e-6)
    torch.testing.assert_close(stats.gold_logprob.double(), lp.gather(1, gold[:, None]).squeeze(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(stats.top_ids, lp.topk(6).indices)  # the same pass gives the stored top-k


def test_candidates_with_ties_are_a_valid_topk_of_the_allowed_ids():
    """Ties: logits on a coarse grid, so most rows have equal values across the K-th place. The
    chosen log-probs equal the masked top-K's exactly; the ids are distinct, allowed, in
    non-increasing order, and no allowed id left out is more probable than a chosen one."""
    g = torch.Generator().manual_seed(1)
    logits = torch.randint(0, 4, (200, 30), generator=g).float()
    gold = torch.randint(0, 30, (200,), generator=g)
    excluded = [0, 5]
    stats = row_statistics(logits, 0, gold=gold, candidates=5, exclude_ids=torch.tensor(excluded), chunk_rows=64)
    lp = torch.log_softmax(logits, -1)
    ref = masked_topk_reference(lp, gold, excluded, 5)
    assert torch.equal(stats.cand_logprobs, ref.values)
    ties = 0
    for row, ids, vals, gd in zip(lp, stats.cand_ids, stats.cand_logprobs, gold):
        allowed = set(range(30)) - {int(gd), *excluded}
        assert len(set(ids.tolist())) == 5 and set(ids.tolist()) <= allowed
        assert torch.equal(row[ids], vals) and bool((vals[:-1] >= vals[1:]).all())
        left_out = sorted(allowed - set(ids.tolist()))
        assert float(row[left_out].max()) <= float(vals[-1])
        ties += int(float(row[left_out].max()) == float(vals[-1]))
    assert ties > 100  # the grid does produce ties at the K-th place


def test_fewer_allowed_ids_than_candidates():
    """V = 5, gold and one excluded id: three allowed ids, the fourth slot is empty (-1, -inf) and
    never becomes a transition candidate."""
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0, 4.0]])
    stats = row_statistics(logits, 2, gold=torch.tensor([4]), candidates=4, exclude_ids=torch.tensor([2]))
    assert stats.cand_ids.tolist() == [[3, 1, 0, -1]]
    assert stats.cand_logprobs[0, 3] == -math.inf and bool(torch.isfinite(stats.cand_logprobs[0, :3]).all())
    tr = select_transitions(logits, torch.tensor([4]), candidates=4, min_prob=0.0, min_alt_mass=0.0,
                            exclude_ids=torch.tensor([2]))
    assert tr.cand_ids.tolist() == [3, 1, 0]


def test_draws_are_unbiased_and_never_hit_a_zero_mass_id():
    """Chi-square of 400 rows x 500 draws of one known distribution, with zero-mass ids at both
    ends of the vocabulary and inside it: never drawn; every row's counts sum to the draws."""
    p = torch.tensor([0.0, 0.3, 0.2, 0.0, 0.15, 0.1, 0.1, 0.05, 0.05, 0.03, 0.02, 0.0], dtype=torch.float64)
    logits = p.log().float().expand(400, -1).contiguous()
    ids, counts = sample_counts(logits, 500, torch.Generator().manual_seed(11), chunk_rows=64)
    assert (counts.sum(-1) == 500).all()
    observed = torch.zeros(12, dtype=torch.float64).index_add_(0, ids[counts > 0], counts[counts > 0].double())
    assert observed[p == 0].sum() == 0
    expected = p * 400 * 500
    support = p > 0
    chi2 = float(((observed[support] - expected[support]) ** 2 / expected[support]).sum())
    assert chi2 < 27.88  # chi-square, 8 degrees of freedom, p = 0.0005


def test_draws_do_not_depend_on_chunking_or_on_other_rows():
    g = torch.Generator().manual_seed(4)
    logits = 2 * torch.randn(23, 300, generator=g)
    uniforms = torch.rand((23, 40), generator=g)
    runs = [row_statistics(logits, 3, uniforms=uniforms, chunk_rows=c) for c in (1, 5, 23, 1000)]
    for run in runs[1:]:
        assert torch.equal(run.sample_ids, runs[0].sample_ids) and torch.equal(run.sample_counts, runs[0].sample_counts)
    part = row_statistics(logits[7:12], 3, uniforms=uniforms[7:12])  # the same rows in another "batch"
    assert torch.equal(part.sample_ids, runs[0].sample_ids[7:12]) and torch.equal(part.sample_counts, runs[0].sample_counts[7:12])
    assert (runs[0].sample_counts.sum(-1) == 40).all()


def test_head_rows_are_the_logits_of_the_hidden_rows():
    """HeadRows computes ``hidden @ weight.T + bias`` chunk by chunk: statistics from it equal those
    from the dense logits."""
    g = torch.Generator().manual_seed(2)
    hidden, weight, bias = torch.randn(19, 8, generator=g), torch.randn(40, 8, generator=g), torch.randn(40, generator=g)
    dense = hidden @ weight.T + bias
    a = row_statistics(HeadRows(hidden, weight, bias), 5, temperature=0.7, chunk_rows=4)
    b = row_statistics(dense, 5, temperature=0.7)
    assert torch.equal(a.top_ids, b.top_ids)
    torch.testing.assert_close(a.top_logprobs, b.top_logprobs, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="hidden must be"):
        HeadRows(hidden, weight[:, :4])
