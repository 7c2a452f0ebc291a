"""Real vocabularies (DESIGN.md §3.1): padded output rows are never tokens.

A teacher whose head has 8 rows beyond the tokenizer, scaled x40 so the padded rows carry real
mass, is dumped with every signal on: no stored id is a padding row, the stored log-probs equal a
log-softmax over the real rows of a plain forward, the store verifies, and Align-TI trains on it
(students with and without their own padding). Stage 2's losses over the real columns equal
those of a student whose head has no padded rows at all.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForImageTextToText
from test_distill import distill_config, losses
from test_dump import dump_config, make_dataset

from pipeline.config import from_dict
from pipeline.data import encode, read_records
from pipeline.errors import PipelineError
from pipeline.modeling.batching import collate_model_inputs
from pipeline.modeling.branches import sequence_position_ids
from pipeline.processors import load_processor
from pipeline.tools.inspect_store import verify
from pipeline.tools.tiny import PRESETS, build_tiny_vlm
from schemas import StoreReader
from schemas.signals import unpack
from stage1_teacher.dump import run as dump
from stage2_student.config import DistillConfig
from stage2_student.data import StoreDataset
from stage2_student.distill import compute_losses, run as distill

PAD_ROWS = 8


def save_padded(out: Path, preset: str, padded_rows: int, scale: float = 1.0, seed: int = 0) -> Path:
    """A tiny llava with ``padded_rows`` head rows beyond its tokenizer, the head scaled by ``scale``.

    A random head's padded rows rarely reach the top-k (a random model's top ids barely change from
    position to position), so they are made to carry mass: each copies, x1.05, one of the real rows
    that most often ranks in the top 16 of a forward over random tokens."""
    model, processor = build_tiny_vlm("llava", replace(PRESETS[preset], padded_rows=padded_rows), seed=seed)
    head = model.get_output_embeddings().weight
    n_tok = len(processor.tokenizer)
    with torch.no_grad():
        head.mul_(scale)
        if padded_rows:
            ids = torch.randint(0, n_tok, (1, 64), generator=torch.Generator().manual_seed(seed))
            top = model(input_ids=ids).logits[0, :, :n_tok].topk(16, dim=-1).indices
            frequent = torch.bincount(top.flatten(), minlength=n_tok).argsort(descending=True)[:padded_rows]
            head[n_tok:] = 1.05 * head[frequent]
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def padded(tmp_path_factory):
    """(teacher dir, data, store) of a teacher with PAD_ROWS padded head rows, scaled x40."""
    root = tmp_path_factory.mktemp("vocab")
    teacher = save_padded(root / "teacher", "teacher", PAD_ROWS, scale=40.0)
    data = make_dataset(root / "data", n=6)
    store = root / "store"
    dump(dump_config(teacher, data, store, **{"signals.transitions.candidates": 4,
                                                "signals.transitions.max_positions": 8}))
    return teacher, data, store


def test_padded_rows_carry_mass_in_a_plain_forward(padded):
    """Without the mask the padded rows would be stored: they are in the plain top-k."""
    teacher, data, _ = padded
    model = AutoModelForImageTextToText.from_pretrained(teacher).eval()
    processor = load_processor(teacher)
    n_tok = len(processor.tokenizer)
    assert model.get_output_embeddings().weight.shape[0] == n_tok + PAD_ROWS
    rec = next(r for r in read_records(data) if r.sample_id == "s00")
    enc = encode(rec, processor, 400)
    with torch.no_grad():
        logits = model(**enc.model_inputs).logits[0]
    positions = torch.as_tensor(np.concatenate([enc.response_positions, enc.visual_positions]))
    top = logits[positions].topk(16, dim=-1).indices  # k of the dump config
    assert int((top >= n_tok).sum()) > 0


def test_no_stored_id_is_a_padding_row_and_logprobs_are_over_real_rows(padded):
    teacher, data, store = padded
    processor = load_processor(teacher)
    n_tok = len(processor.tokenizer)
    model = AutoModelForImageTextToText.from_pretrained(teacher).eval()
    reader = StoreReader(store)
    m = reader.manifest
    assert m["vocabulary"] == {"tokens": n_tok, "head_rows": n_tok + PAD_ROWS, "masked_rows": PAD_ROWS}
    records = {r.sample_id: r for r in read_records(data)}
    n_branch = 0
    for sid in reader.sample_ids():
        s = unpack(reader.get(sid))
        for name in ("resp_ids", "vis_ids", "tpa_ids", "tpa_cand", "sample_ids"):
            ids = getattr(s, name)
            assert ids is not None and (ids.size == 0 or int(ids.max()) < n_tok), (sid, name)
        n_branch += len(s.tpa_pos)
        # The stored response log-probs against a plain forward's log-softmax over the real rows.
        enc = encode(records[sid], processor, 400)
        inputs = collate_model_inputs([enc.model_inputs], processor.tokenizer.pad_token_id)
        with torch.no_grad():
            logits = model(**inputs, position_ids=sequence_position_ids(model, inputs)).logits[0]
        real = torch.log_softmax(logits[:, :n_tok].double(), dim=-1)
        expected = real[torch.as_tensor(s.resp_pos)].gather(-1, torch.as_tensor(s.resp_ids, dtype=torch.long))
        np.testing.assert_allclose(s.resp_logprobs, expected.numpy(), rtol=0, atol=1e-5)
    assert n_branch > 0
    assert verify(store) == []


def test_align_ti_trains_on_the_padded_store(padded, tmp_path):
    """Students with no padding and with another padding than the teacher's train on the store."""
    _, _, store = padded
    for name, rows in (("plain", 0), ("padded3", 3)):
        student = save_padded(tmp_path / f"{name}-init", "student", rows, seed=1)
        out = tmp_path / name
        distill(distill_config(store, out, {"path": str(student)}, **{"train.steps": 3}))
        logged = losses(out)
        assert len(logged) == 3 and all(np.isfinite(row[k]) for row in logged for k in ("kd", "iva", "tpa"))


def test_a_tokenizer_larger_than_the_head_is_refused(padded, tmp_path):
    teacher, data, _ = padded
    small = tmp_path / "small-head"
    small.mkdir()
    for f in teacher.iterdir():
        (small / f.name).write_bytes(f.read_bytes())
    config = json.loads((small / "config.json").read_text())
    n_tok = len(load_processor(teacher).tokenizer)
    config["text_config"]["vocab_size"] = n_tok - 4
    (small / "config.json").write_text(json.dumps(config))
    with pytest.raises(PipelineError, match=rf"tokenizer has {n_tok} tokens but the model's output head only {n_tok - 4} rows"):
        dump(dump_config(small, data, tmp_path / "store"))
    assert not (tmp_path / "store" / "shards").exists()


def test_student_losses_over_real_columns_equal_a_student_without_padding(padded):
    """compute_losses(vocab_size=V) on a padded head equals compute_losses on the same weights with
    the padded rows removed: the padded columns take no part in any term, nor in its gradient."""
    _, _, store = padded
    padded_model, processor = build_tiny_vlm("llava", replace(PRESETS["student"], padded_rows=5), seed=2)
    plain_model, _ = build_tiny_vlm("llava", PRESETS["student"], seed=2)
    n_tok = len(processor.tokenizer)
    state = padded_model.state_dict()
    trimmed = {k: (v[:n_tok] if v.shape and v.shape[0] == n_tok + 5 else v) for k, v in state.items()}
    plain_model.load_state_dict(trimmed)
    padded_model.double(), plain_model.double()
    batch = next(iter(StoreDataset(store, processor, batch_size=3, seed=0)))
    batch.model_inputs["pixel_values"] = batch.model_inputs["pixel_values"].double()
    cfg = from_dict(DistillConfig, {"student": {"path": "unused"}, "store": {"dir": "unused"}, "output": {"dir": "unused"},
                                    "loss": {"sft": 1.0, "kd": 1.0, "iva": 1.0, "tpa": 1.0}})
    loss_a, terms_a = compute_losses(padded_model, batch, cfg, None, vocab_size=n_tok)
    loss_b, terms_b = compute_losses(plain_model, batch, cfg, None)
    assert set(terms_a) == set(terms_b)
    for k in terms_a:
        assert terms_a[k] == pytest.approx(terms_b[k], rel=1e-9, abs=1e-12), k
    loss_a.backward(), loss_b.backward()
    head_a = padded_model.get_output_embeddings().weight.grad
    head_b = plain_model.get_output_embeddings().weight.grad
    torch.testing.assert_close(head_a[:n_tok], head_b, rtol=1e-9, atol=1e-12)
    assert float(head_a[n_tok:].abs().max()) == 0.0
