"""Student-proposed TPA candidates (``stage1_teacher.proposer``) against an independent computation:
the student's full-logits forward on its own encoding, log-softmax, and a plain sort of each row."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from test_dump import make_dataset

from pipeline.data.records import BadRecord, read_records
from pipeline.errors import PipelineError
from pipeline.modeling.batching import collate_model_inputs
from pipeline.modeling.branches import placeholder_ids
from pipeline.processors import load_processor
from pipeline.tools.tiny import save_tiny_vlm
from stage1_teacher.proposer import StudentProposer, draw_candidates


def test_sampled_proposals_follow_the_allowed_distribution_without_replacement():
    """First draws over many generators match p renormalised over the allowed tokens (chi-square,
    fixed seeds), and no row repeats a token or proposes a banned one."""
    p = torch.tensor([0.05, 0.4, 0.25, 0.15, 0.1, 0.05])
    lp = p.log()[None].expand(4000, 6).contiguous()
    gold = torch.full((4000,), 1)
    gen = torch.Generator().manual_seed(0)
    ids, clp = draw_candidates(lp, gold, 3, torch.tensor([5]), gen)
    assert not bool(((ids == 1) | (ids == 5)).any())
    assert all(len(set(r)) == 3 for r in ids.tolist())
    allowed = torch.tensor([0, 2, 3, 4])
    expect = p[allowed] / p[allowed].sum() * 4000
    seen = torch.stack([(ids[:, 0] == a).sum() for a in allowed]).double()
    chi2 = float(((seen - expect) ** 2 / expect).sum())
    assert chi2 < 16.3  # 3 degrees of freedom, p = 0.001
    torch.testing.assert_close(clp, lp.gather(1, ids))


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("proposer")
    teacher = save_tiny_vlm(root / "teacher", "qwen2_vl", "teacher", seed=0)
    student = save_tiny_vlm(root / "student", "qwen2_vl", "student-pooled", seed=5)
    records = [r for r in read_records(make_dataset(root / "data", n=6)) if not isinstance(r, BadRecord)]
    return teacher, student, records


def _reference(student_dir: Path, encoded, k: int):
    """Full-logits forward of the student, per sample, log-softmax, argsort without gold and placeholders."""
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(student_dir, attn_implementation="eager").eval()
    banned = set(placeholder_ids(model))
    out = []
    for e in encoded:
        with torch.no_grad():
            logits = model(**collate_model_inputs([e.model_inputs], 0)).logits[0]
        lp = torch.log_softmax(logits.double(), -1)
        rows = []
        for t in e.response_positions:
            gold = int(e.input_ids[t + 1])
            order = [int(i) for i in torch.argsort(lp[t], descending=True) if int(i) != gold and int(i) not in banned]
            rows.append(order[:k])
        out.append((np.array(rows, dtype=np.int64).reshape(-1, k), lp))
    return out


def test_student_proposals_equal_the_students_own_top_k(setup):
    teacher, student, records = setup
    teacher_proc = load_processor(teacher)
    proposer = StudentProposer(str(student), teacher_proc, candidates=3, choice="top", temperature=1.0, seed=0)
    from pipeline.data import encode

    mine = [proposer.encode(r, 400) for r in records]
    theirs = [encode(r, teacher_proc, 400) for r in records]
    assert any(len(a.input_ids) != len(b.input_ids) for a, b in zip(mine, theirs))  # another visual grid
    proposals = proposer.propose(mine, theirs)
    for prop, (want, lp), e in zip(proposals, _reference(student, mine, 3), mine):
        np.testing.assert_array_equal(prop.ids, want)
        rows = torch.as_tensor(e.response_positions)
        np.testing.assert_allclose(prop.logprobs, lp[rows[:, None], torch.as_tensor(want)].numpy(), atol=1e-5)
        gold = torch.as_tensor(e.input_ids[e.response_positions + 1])
        np.testing.assert_allclose(prop.gold_logprob, lp[rows, gold].numpy(), atol=1e-5)


def test_draws_pad_when_too_few_tokens_are_allowed():
    lp = torch.log(torch.tensor([[0.5, 0.5, 0.0]]))
    ids, clp = draw_candidates(lp, torch.tensor([0]), 3, torch.tensor([], dtype=torch.long), torch.Generator().manual_seed(0))
    assert ids.tolist() == [[1, -1, -1]]  # the gold 0 is out, and 2 has no mass
    assert float(clp[0, 1]) == -float("inf")


def test_sampled_student_proposals_depend_on_the_sample_alone(setup):
    teacher, student, records = setup
    teacher_proc = load_processor(teacher)
    from pipeline.data import encode

    proposer = StudentProposer(str(student), teacher_proc, candidates=3, choice="sample", temperature=1.0, seed=7)
    mine = [proposer.encode(r, 400) for r in records]
    theirs = [encode(r, teacher_proc, 400) for r in records]
    together = proposer.propose(mine, theirs)
    alone = [proposer.propose([m], [t])[0] for m, t in zip(reversed(mine), reversed(theirs))][::-1]
    for a, b in zip(together, alone):
        np.testing.assert_array_equal(a.ids, b.ids)
        np.testing.assert_allclose(a.logprobs, b.logprobs, atol=1e-6)
    other = StudentProposer(str(student), teacher_proc, candidates=3, choice="sample", temperature=1.0, seed=8)
    assert any(not np.array_equal(a.ids, b.ids) for a, b in zip(together, other.propose(mine, theirs)))


def test_a_student_with_another_tokenizer_is_refused(setup, tmp_path):
    teacher, _, _ = setup
    other = save_tiny_vlm(tmp_path / "llava", "llava", "student")
    with pytest.raises(PipelineError, match="another (tokenizer|chat template) than the teacher"):
        StudentProposer(str(other), load_processor(teacher), candidates=3, choice="top", temperature=1.0, seed=0)


def test_misaligned_samples_are_refused(setup):
    teacher, student, records = setup
    teacher_proc = load_processor(teacher)
    from pipeline.data import encode

    proposer = StudentProposer(str(student), teacher_proc, candidates=2, choice="top", temperature=1.0, seed=0)
    mine = [proposer.encode(records[0], 400)]
    theirs = [encode(records[1], teacher_proc, 400)]
    with pytest.raises(PipelineError, match="reads other response tokens than the teacher"):
        proposer.propose(mine, theirs)


def test_a_dump_with_student_candidates_stores_them_scored_by_the_teacher(setup, tmp_path):
    """End to end (``pipeline run teacher-dump`` with candidates_from): the stored candidates are the
    student's top-K at the positions the student's alternative mass selects, the store names the
    student, and the teacher's rows for them equal plain forwards."""
    import json

    from test_dump import assert_transitions_equal_plain_forward, dump_config

    from schemas import StoreReader
    from schemas.signals import unpack
    from stage1_teacher.dump import run

    teacher, student, _ = setup
    data = make_dataset(tmp_path / "data", n=6)
    out = tmp_path / "store"
    k, m = 2, 4
    run(dump_config(teacher, data, out, **{
        "signals.transitions.candidates_from": str(student),
        "signals.transitions.selection_mass": "student",
        "signals.transitions.candidates": k,
        "signals.transitions.max_positions": m,
    }))
    manifest = json.loads((out / "manifest.json").read_text())
    settings = json.loads((out / "dump.json").read_text())
    assert settings["candidates"]["source"] == "student" and settings["candidates"]["path"] == str(student)
    assert settings["candidates"]["weights_fingerprint"] and settings["candidates"]["selection_mass"] == "student"
    assert manifest["n_samples"] == 6

    reader = StoreReader(out)
    records = {r.sample_id: r for r in read_records(data) if not isinstance(r, BadRecord)}
    student_proc = load_processor(student)
    from pipeline.data import encode

    for sid in ("s00", "s03", "s05"):
        sig = unpack(reader.get(sid))
        mine = encode(records[sid], student_proc, 400)
        want, lp = _reference(student, [mine], k)[0]
        rows = torch.as_tensor(mine.response_positions)
        gold = torch.as_tensor(mine.input_ids[mine.response_positions + 1])
        alt = -torch.expm1(lp[rows, gold])  # the student's alternative mass selects the positions
        chosen = sorted(torch.sort(alt, descending=True, stable=True).indices[:m].tolist())
        expect_pos = np.repeat(sig.resp_pos[chosen], k)
        np.testing.assert_array_equal(sig.tpa_pos, expect_pos)
        np.testing.assert_array_equal(sig.tpa_cand, want[chosen].reshape(-1))
    assert_transitions_equal_plain_forward(out, teacher, data, ("s01", "s03", "s05"))
