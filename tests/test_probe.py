"""Saliency probe on SDPA (DESIGN.md §3.2) against eager attention with output_attentions=True.

Tolerances: float32 models; probe blocks and maps must match the eager reference within atol 1e-6
(observed differences are ~1e-8: same scores, SDPA vs eager hidden states differ by rounding only).
"""

from __future__ import annotations

import pytest
import torch
from conftest import two_image_record

from pipeline.data.encode import encode
from pipeline.data.records import Record, Turn
from pipeline.modeling.probe import (
    PROBE_ATTENTION,
    IrsItem,
    capture,
    instruction_block,
    irs_table,
    sample_indices,
    select_layers,
    turn_saliency,
    turns_see_image,
)

ATOL = 1e-6


@pytest.fixture(scope="module")
def samples(teacher, tmp_path_factory):
    """A multi-turn two-image sample, a shorter single-turn one, and one with an image-only turn."""
    _, processor = teacher
    d = tmp_path_factory.mktemp("probe-img")
    long = two_image_record(d, "long")
    a, b = long.images
    short = Record("short", [Turn("user", "<image>\nHow many blue shapes?"), Turn("assistant", "two")], [b])
    empty = Record(
        "empty",
        [Turn("user", "<image>"), Turn("assistant", "red"), Turn("user", "Which colour?"), Turn("assistant", "blue")],
        [a],
    )
    return {r.sample_id: encode(r, processor, 1024) for r in (long, short, empty)}


def eager_attentions(model, inputs) -> list[torch.Tensor]:
    """Per text layer [B, H, T, T] from eager attention; the model is switched back to SDPA after."""
    model.set_attn_implementation("eager")
    try:
        with torch.no_grad():
            out = model(**inputs, output_attentions=True)
    finally:
        model.set_attn_implementation("sdpa")
    assert len(out.attentions) == model.config.text_config.num_hidden_layers
    return [a.float() for a in out.attentions]


def reference_maps(attn: list[torch.Tensor], b: int, enc, layers: list[int]) -> torch.Tensor:
    """s_j straight from the formula, positions from the encoded turns (not from the module)."""
    vis = torch.as_tensor(enc.visual_positions)
    a = torch.stack([attn[l][b] for l in layers]).mean(0).mean(0)  # layer mean, head mean: [T, T]
    maps = []
    for turn in enc.turns:
        s = a[torch.as_tensor(turn.instruction)][:, vis].mean(0)
        maps.append(s / s.sum())
    return torch.stack(maps)


def probe_forward(model, inputs, layers, rows, cols):
    with torch.no_grad(), capture(model, layers, rows, cols) as probe:
        out = model(**inputs, use_cache=True)
    return probe, out


@pytest.mark.parametrize("layers", [[0, 1], [1]], ids=["all-layers", "subset"])
def test_probe_equals_eager_attention(teacher, samples, layers):
    model, _ = teacher
    enc = samples["long"]
    attn = eager_attentions(model, enc.model_inputs)
    rows, cols, turn_rows = sample_indices(enc)
    probe, _ = probe_forward(model, enc.model_inputs, layers, [rows], [cols])
    assert sorted(probe.blocks) == layers  # only the probed layers were materialised
    for l in layers:
        ref_block = attn[l][0].mean(0)[rows][:, cols]
        torch.testing.assert_close(probe.block(0, [l]), ref_block, atol=ATOL, rtol=0)
        layer_map = probe.layer_maps(0, turn_rows)[l]
        torch.testing.assert_close(layer_map, reference_maps(attn, 0, enc, [l]), atol=ATOL, rtol=0)
    maps = turn_saliency(probe.block(0), turn_rows)
    assert maps.shape == (2, len(cols))
    torch.testing.assert_close(maps, reference_maps(attn, 0, enc, layers), atol=ATOL, rtol=0)
    torch.testing.assert_close(maps.sum(1), torch.ones(2), atol=ATOL, rtol=0)
    # the two turns ask about different things: their maps are not the same vector
    assert not torch.allclose(maps[0], maps[1], atol=1e-4)


def test_probe_observes_and_never_changes_the_forward(teacher, samples):
    model, _ = teacher
    enc = samples["long"]
    with torch.no_grad():
        plain = model(**enc.model_inputs, use_cache=True).logits
    rows, cols, _ = sample_indices(enc)
    _, out = probe_forward(model, enc.model_inputs, [0, 1], [rows], [cols])
    torch.testing.assert_close(out.logits, plain, atol=0, rtol=0)


def pad_batch(encs, pad_id: int) -> dict:
    """Right-padded batch of encoded samples (images concatenated in sample order)."""
    width = max(e.length for e in encs)
    out = {}
    for key in ("input_ids", "attention_mask", "mm_token_type_ids"):
        if key in encs[0].model_inputs:
            fill = pad_id if key == "input_ids" else 0
            rows = [torch.nn.functional.pad(e.model_inputs[key], (0, width - e.length), value=fill) for e in encs]
            out[key] = torch.cat(rows)
    for key in ("pixel_values", "image_grid_thw", "pixel_attention_mask"):
        if key in encs[0].model_inputs:
            parts = [e.model_inputs[key] for e in encs]
            if key == "pixel_attention_mask" or parts[0].ndim == 5:  # Idefics3: [1, tiles, ...], pad the tiles
                n = max(p.shape[1] for p in parts)
                parts = [torch.cat([p, p.new_zeros(1, n - p.shape[1], *p.shape[2:])], 1) for p in parts]
            out[key] = torch.cat(parts)
    return out


def test_padded_batch_equals_single_samples(teacher, samples):
    model, processor = teacher
    encs = [samples["long"], samples["short"]]
    assert encs[0].length != encs[1].length
    batch = pad_batch(encs, processor.tokenizer.pad_token_id)
    assert not bool(batch["attention_mask"].all())  # a real padded batch: the mask reaches SDPA as a tensor
    idx = [sample_indices(e) for e in encs]
    with torch.no_grad():
        plain = model(**batch, use_cache=True).logits
    probe, out = probe_forward(model, batch, [0, 1], [i[0] for i in idx], [i[1] for i in idx])
    # every position, padding included: the probed forward builds the same (padding) mask as SDPA
    torch.testing.assert_close(out.logits, plain, atol=0, rtol=0)
    assert probe.blocks[0].shape == (2, max(len(i[0]) for i in idx), max(len(i[1]) for i in idx))
    for b, (enc, (rows, cols, turn_rows)) in enumerate(zip(encs, idx)):
        single, _ = probe_forward(model, enc.model_inputs, [0, 1], [rows], [cols])
        for l in (0, 1):
            torch.testing.assert_close(probe.block(b, [l]), single.block(0, [l]), atol=ATOL, rtol=0)
            # padding cells of the batch block stay zero
            assert probe.blocks[l][b, len(rows) :].abs().sum() == 0
            assert probe.blocks[l][b, :, len(cols) :].abs().sum() == 0
        torch.testing.assert_close(
            turn_saliency(probe.block(b), turn_rows), turn_saliency(single.block(0), turn_rows), atol=ATOL, rtol=0
        )


def test_empty_instruction_turn_has_no_map(teacher, samples):
    """A turn with no instruction tokens has nothing to attend from: no map (zeros), never a uniform one."""
    model, _ = teacher
    enc = samples["empty"]
    rows, cols, turn_rows = sample_indices(enc)
    assert len(turn_rows[0]) == 0 and len(turn_rows[1]) > 0
    probe, _ = probe_forward(model, enc.model_inputs, [1], [rows], [cols])
    maps = turn_saliency(probe.block(0), turn_rows)
    torch.testing.assert_close(maps[0], torch.zeros(len(cols)), atol=0, rtol=0)
    torch.testing.assert_close(maps[1].sum(), torch.tensor(1.0), atol=ATOL, rtol=0)
    assert turns_see_image(rows, cols, turn_rows) == [False, True]


def test_turn_saliency_pure_function():
    block = torch.tensor([[1.0, 3.0, 0.0], [3.0, 1.0, 0.0], [0.0, 0.0, 2.0]])
    maps = turn_saliency(block, [torch.tensor([0, 1]), torch.tensor([2]), torch.tensor([], dtype=torch.long)])
    torch.testing.assert_close(maps, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 1.0], [0.0, 0.0, 0.0]]))
    # Instruction rows that can see no visual token (the image comes later) give a zero row: no map.
    assert turn_saliency(torch.zeros(2, 3), [torch.tensor([0, 1])]).abs().sum() == 0
    assert turn_saliency(torch.zeros(2, 0), [torch.tensor([0, 1])]).shape == (1, 0)  # text-only sample


def test_attention_implementation_is_restored_even_after_an_exception(teacher, samples):
    model, _ = teacher
    enc = samples["short"]
    rows, cols, _ = sample_indices(enc)
    text, vision = model.config.text_config, model.config.vision_config
    model.set_attn_implementation("sdpa")
    with pytest.raises(KeyError, match="boom"):
        with capture(model, [0], [rows], [cols]) as failed:
            assert text._attn_implementation == PROBE_ATTENTION
            assert vision._attn_implementation == "sdpa"  # the vision tower is never probed
            raise KeyError("boom")
    assert (text._attn_implementation, vision._attn_implementation) == ("sdpa", "sdpa")
    # the probe state is gone too: even on the probe attention, an uncaptured forward records nothing
    model.get_decoder().set_attn_implementation(PROBE_ATTENTION)
    try:
        with torch.no_grad():
            model(**enc.model_inputs)
    finally:
        model.get_decoder().set_attn_implementation("sdpa")
    assert failed.blocks == {}
    # no probe is left active: a later capture records exactly once per layer
    probe, _ = probe_forward(model, enc.model_inputs, [0], [rows], [cols])
    assert list(probe.blocks) == [0]
    assert text._attn_implementation == "sdpa"
    # whatever the implementation was, it comes back (the probe itself runs SDPA)
    model.set_attn_implementation("eager")
    try:
        probe_forward(model, enc.model_inputs, [0], [rows], [cols])
        assert (text._attn_implementation, vision._attn_implementation) == ("eager", "eager")
    finally:
        model.set_attn_implementation("sdpa")


def test_probe_errors_are_explicit(teacher, samples):
    model, _ = teacher
    enc = samples["short"]
    rows, cols, _ = sample_indices(enc)
    with pytest.raises(ValueError, match="out of range"):
        with capture(model, [2], [rows], [cols]):
            pass
    with torch.no_grad(), capture(model, [1], [rows], [cols]) as probe:
        pass  # no forward
    with pytest.raises(RuntimeError, match="no attention recorded"):
        probe.block(0)


def full_reference(q, k, mask_add, rows, cols):
    """Head-mean probabilities from the full [B, H, T, T] matrix (GQA by repeat_interleave)."""
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    p = (q @ k.transpose(-1, -2) * q.shape[-1] ** -0.5 + mask_add).softmax(-1).mean(1)
    return [p[b][r][:, c] for b, (r, c) in enumerate(zip(rows, cols))]


def test_instruction_block_mask_kinds_and_gqa():
    """None + causal, boolean and additive float masks give the same true probabilities (GQA 6/2 heads)."""
    g = torch.Generator().manual_seed(0)
    bsz, heads, kv_heads, t, d = 2, 6, 2, 9, 8
    q, k = torch.randn(bsz, heads, t, d, generator=g), torch.randn(bsz, kv_heads, t, d, generator=g)
    causal = torch.tril(torch.ones(t, t, dtype=torch.bool))
    keep = torch.ones(bsz, t, dtype=torch.bool)
    keep[1, 7:] = False  # sample 1 is right-padded to 7 tokens
    bool_mask = causal[None, None] & keep[:, None, None, :]
    float_mask = torch.zeros(bsz, 1, t, t).masked_fill(~bool_mask, torch.finfo(torch.float32).min)
    rows = [torch.tensor([3, 4, 8]), torch.tensor([5, 6])]
    cols = [torch.tensor([0, 1, 2]), torch.tensor([1, 2])]
    ref = full_reference(q, k, float_mask, rows, cols)
    for mask in (bool_mask, float_mask):
        got = instruction_block(q, k, mask, None, False, rows, cols)
        for b in range(bsz):
            torch.testing.assert_close(got[b, : len(rows[b]), : len(cols[b])], ref[b], atol=ATOL, rtol=0)
    # no mask: the causal restriction is rebuilt for the rows (sample 0 has no padding)
    got = instruction_block(q[:1], k[:1], None, None, True, rows[:1], cols[:1])
    torch.testing.assert_close(got[0], ref[0], atol=ATOL, rtol=0)
    # padding rows stay finite and zero even where their (index 0) mask row is all -inf (left padding),
    # and no NaN reaches the gradient through them
    left = torch.zeros(bsz, 1, t, t).masked_fill(~bool_mask, float("-inf"))
    left[1, :, :, 0] = float("-inf")  # sample 1's row 0 sees nothing
    qg = q.clone().requires_grad_(True)
    got = instruction_block(qg, k, left, None, False, [torch.tensor([3, 4, 8]), torch.tensor([5])], cols)
    assert torch.isfinite(got).all() and got[1, 1:].abs().sum() == 0
    got.sum().backward()
    assert torch.isfinite(qg.grad).all()
    # a row beyond the sequence is refused
    with pytest.raises(ValueError, match="query length"):
        instruction_block(q, k, bool_mask, None, False, [torch.tensor([t]), torch.tensor([0])], cols)


# ---- IRS ----


def test_irs_prefers_the_layer_whose_maps_follow_the_instruction():
    same = torch.tensor([0.25, 0.25, 0.25, 0.25])
    left, right = torch.tensor([0.7, 0.1, 0.1, 0.1]), torch.tensor([0.1, 0.1, 0.1, 0.7])
    grid = ((2, 2),)
    table = irs_table(
        {
            0: [IrsItem("img", grid, same, "q1"), IrsItem("img", grid, same, "q2")],
            3: [IrsItem("img", grid, left, "q1"), IrsItem("img", grid, right, "q2")],
        }
    )
    assert table[0] == pytest.approx(0.0, abs=1e-6)
    expected = 1 - float(torch.nn.functional.cosine_similarity(left, right, dim=0))
    assert table[3] == pytest.approx(expected) and table[3] > 0.5
    assert select_layers(table) == [3]


def test_irs_pairs_share_an_image_and_differ_in_instruction():
    a, b, c = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0]), torch.tensor([1.0, 1.0])
    # items 0/1 share an image but ask the same thing (no pair); 0/2 and 1/2 are pairs
    items = [("img", (1, 2), a, "q"), ("img", (1, 2), a, "q"), ("img", (1, 2), c, "other"), ("x", (1, 2), b, "z")]
    table = irs_table({0: items})
    cos = float(torch.nn.functional.cosine_similarity(a, c, dim=0))
    assert table[0] == pytest.approx(1 - cos)  # the image-x item is not paired: same-image pairs exist


def test_irs_falls_back_to_equal_grids_and_fails_without_pairs():
    a, b, c = torch.tensor([1.0, 0.0, 0.0, 0.0]), torch.tensor([0.0, 1.0, 0.0, 0.0]), torch.tensor([1.0, 2.0, 3.0])
    items = [("img1", (2, 2), a), ("img2", (2, 2), b), ("img3", (1, 3), c)]
    assert irs_table({5: items}) == {5: pytest.approx(1.0)}  # only img1/img2 (same grid), orthogonal maps
    with pytest.raises(ValueError, match="no IRS pair"):
        irs_table({5: [("img1", (2, 2), a), ("img3", (1, 3), c)]})
    with pytest.raises(ValueError, match="empty"):
        select_layers({})


def test_irs_from_probe_maps(teacher, samples):
    """End to end: per-layer turn maps of real forwards feed the table; every layer gets a score in [0, 1]."""
    model, _ = teacher
    enc = samples["long"]
    rows, cols, turn_rows = sample_indices(enc)
    probe, _ = probe_forward(model, enc.model_inputs, [0, 1], [rows], [cols])
    grids = tuple(blk.grid for blk in enc.visual_blocks)
    per_layer = {
        l: [IrsItem("|".join(enc.image_hashes), grids, m, f"turn{j}") for j, m in enumerate(maps)]
        for l, maps in probe.layer_maps(0, turn_rows).items()
    }
    table = irs_table(per_layer)
    assert sorted(table) == [0, 1] and all(0.0 <= v <= 1.0 for v in table.values())
    assert select_layers(table)[0] in (0, 1)
