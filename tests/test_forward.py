"""The student's training forward (logits only at the read rows, causal mask alone) against the plain
forward: same loss terms and same gradients, per family, on real store batches."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from test_dump import dump_config, make_dataset

from pipeline.config import from_dict
from pipeline.data.encode import IGNORE_INDEX
from pipeline.tools.tiny import build_tiny_vlm
from pipeline.modeling.branches import forward_with_branches
from pipeline.errors import PipelineError
from pipeline.modeling.logits import hidden_at, logits_at, output_head
from stage1_teacher.dump import run as dump
from stage2_student import losses as L
from stage2_student.config import DistillConfig
from stage2_student.data import StoreDataset
from stage2_student.distill import compute_losses
from stage2_student.forward import SequenceLogits, causal_inputs, row_index


@pytest.fixture(scope="module")
def batches(tmp_path_factory, tiny_teacher_dir, family):
    """Two store batches of 4 samples of different lengths (two-image and text-only samples among them)."""
    root = tmp_path_factory.mktemp("fwd")
    store = root / "store"
    dump(dump_config(tiny_teacher_dir, make_dataset(root / "data", n=8), store))
    student, processor = build_tiny_vlm(family, "student", seed=3)
    return student, list(StoreDataset(store, processor, batch_size=4, seed=1))


def loss_config(**loss) -> DistillConfig:
    return from_dict(DistillConfig, {"student": {"path": "unused"}, "store": {"dir": "unused"}, "output": {"dir": "unused"}, "loss": loss})


def reference_terms(model, batch, cfg) -> dict[str, torch.Tensor]:
    """The terms from a plain forward: full [B, T, V] logits under the padding mask, SFT by torch."""
    logits = model(**batch.model_inputs).logits
    lc, kw = cfg.loss, dict(divergence=cfg.loss.divergence, beta=cfg.loss.beta, alpha=cfg.loss.alpha)
    terms = {}
    if lc.sft:
        terms["sft"] = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch.labels[:, 1:].reshape(-1),
                                       ignore_index=IGNORE_INDEX)
    if lc.kd:
        terms["kd"] = L.kd_loss(logits[batch.kd.batch, batch.kd.pos], batch.kd.ids, batch.kd.logprobs, **kw)
    if lc.iva:
        iva = batch.iva
        terms["iva"] = L.iva_loss(logits[iva.batch, iva.pos], iva.ids, iva.logprobs, iva.weights, group=iva.batch, **kw)
    if lc.tpa:
        tpa = batch.tpa
        _, branch = forward_with_branches(model, batch.model_inputs, tpa.branch_pos, tpa.branch_tok)
        terms["tpa"] = L.tpa_loss(branch[tpa.batch, tpa.row], tpa.ids, tpa.logprobs, tpa.candidate_logprob, tpa.group, **kw)
    return terms


def grads(model, loss) -> dict[str, torch.Tensor]:
    model.zero_grad()
    loss.backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("recipe", [dict(sft=1.0), dict(sft=1.0, kd=1.0, iva=1.0, tpa=0.0), dict(sft=0.0, kd=1.0, iva=0.5, tpa=0.0),
                                    dict(sft=1.0, kd=1.0, iva=1.0, tpa=1.0)],
                         ids=["sft", "sft-kd-iva", "kd-iva", "align-ti"])
def test_losses_and_gradients_match_the_plain_forward(batches, recipe):
    model, data = batches
    cfg = loss_config(**recipe)
    padded = [b for b in data if not bool(b.model_inputs["attention_mask"].all())]
    assert padded, "the batches must hold samples of different lengths, or the mask is never dropped"
    if recipe.get("tpa"):
        assert all(b.tpa.branch_pos.numel() for b in data), "every batch must have branch rows"
    for batch in data:
        loss, terms = compute_losses(model, batch, cfg, None)
        ref = reference_terms(model, batch, cfg)
        assert set(ref) == {k for k in terms if k != "total"} and ref
        for k, v in ref.items():
            assert terms[k] == pytest.approx(v.item(), rel=1e-5, abs=1e-6), k
        got, want = grads(model, loss), grads(model, sum(getattr(cfg.loss, k) * v for k, v in ref.items()))
        assert got.keys() == want.keys()
        for n in want:
            torch.testing.assert_close(got[n], want[n], rtol=1e-4, atol=1e-6, msg=n)


def test_the_forward_computes_only_the_read_rows(batches):
    model, data = batches
    batch = data[0]
    b, t = (batch.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    with logits_at(model, b, t):
        out = model(**causal_inputs(batch.model_inputs)).logits
    assert out.shape == (1, len(b), model.config.text_config.vocab_size)
    assert len(b) < batch.labels.numel() // 4  # the point: most positions are read by no loss
    full = model(**batch.model_inputs).logits
    torch.testing.assert_close(out[0], full[b, t], rtol=1e-4, atol=1e-5)


def test_hidden_at_gives_the_rows_whose_head_product_is_the_logits(batches):
    model, data = batches
    batch = data[0]
    b, t = (batch.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    with hidden_at(model, b, t) as hidden:
        out = model(**causal_inputs(batch.model_inputs)).logits
    assert out.shape[1] == 0  # the head ran on no row
    weight, bias = output_head(model)
    logits = torch.nn.functional.linear(hidden.rows, weight, bias)
    full = model(**batch.model_inputs).logits
    torch.testing.assert_close(logits, full[b, t], rtol=1e-4, atol=1e-5)
    assert hidden.rows.requires_grad  # the graph goes on to the caller's head


def test_output_head_refuses_a_model_that_transforms_its_logits(batches):
    model, _ = batches
    text = model.config.get_text_config()
    text.final_logit_softcapping = 30.0
    try:
        with pytest.raises(PipelineError, match="final_logit_softcapping=30.0"):
            output_head(model)
    finally:
        text.final_logit_softcapping = None


def test_branch_forward_with_seq_rows_matches_the_full_one(batches):
    model, data = batches
    batch = data[0]
    tpa = batch.tpa
    b, t = (batch.labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)
    seq_full, branch_full = forward_with_branches(model, batch.model_inputs, tpa.branch_pos, tpa.branch_tok)
    seq_rows, branch_rows = forward_with_branches(model, batch.model_inputs, tpa.branch_pos, tpa.branch_tok, seq_rows=(b, t))
    valid = tpa.branch_pos >= 0
    torch.testing.assert_close(seq_rows, seq_full[b, t], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(branch_rows[valid], branch_full[valid], rtol=1e-4, atol=1e-5)


def test_causal_inputs_drop_only_a_right_padding_mask():
    ids = torch.ones(3, 4, dtype=torch.long)
    right = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0], [1, 0, 0, 0]])}
    assert "attention_mask" not in causal_inputs(right)
    left = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 1, 1], [1, 1, 1, 1]])}
    assert causal_inputs(left) is left
    holes = {"input_ids": ids, "attention_mask": torch.tensor([[1, 0, 1, 1], [1, 1, 1, 1], [1, 1, 1, 1]])}
    assert causal_inputs(holes) is holes
    empty_row = {"input_ids": ids, "attention_mask": torch.tensor([[1, 1, 1, 1], [0, 0, 0, 0], [1, 1, 1, 1]])}
    assert causal_inputs(empty_row) is empty_row


def test_row_index_maps_each_distinct_pair_to_its_row():
    pairs = [(torch.tensor([1, 0, 1]), torch.tensor([2, 3, 2])), (torch.tensor([0]), torch.tensor([1]))]
    b, t, index = row_index(pairs, (2, 4))
    assert list(zip(b.tolist(), t.tolist())) == [(0, 1), (0, 3), (1, 2)]
    rows = torch.arange(3.0)[:, None].expand(3, 5)
    got = SequenceLogits(rows=rows, index=index).at(torch.tensor([1, 0]), torch.tensor([2, 1]))
    assert got[:, 0].tolist() == [2.0, 0.0]
    with pytest.raises(RuntimeError, match=r"sample 1, position 0"):
        SequenceLogits(rows=rows, index=index).at(torch.tensor([1]), torch.tensor([0]))
    _, _, none = row_index([], (2, 4))
    assert bool((none == -1).all())


def test_logits_at_refuses_a_forward_that_did_not_run_the_head(batches):
    model, _ = batches
    with pytest.raises(RuntimeError, match="saw 0"):
        with logits_at(model, torch.tensor([0]), torch.tensor([0])):
            pass
