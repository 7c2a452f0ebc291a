"""`pipeline run eval`: scoring by hand, the turn-by-turn plumbing with a forced generation, agreement
with a teacher store (zero for the teacher itself), and the CLI entry."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest
import torch
from test_dump import dump_config, make_dataset
from transformers import AutoModelForImageTextToText

from pipeline.tools.cli import main
from pipeline.config import load_config
from pipeline.errors import PipelineError
from pipeline.data import DataSourceError
from pipeline.processors import load_processor
from pipeline.tools.synthetic import generate as make_synthetic
from pipeline.tools.tiny import save_tiny_vlm
from stage1_teacher.dump import run as dump
from stage2_student import evaluate as ev
from stage2_student.evaluate import EvalConfig
from stage2_student.scoring import choice_letter, is_correct, normalise, summarise, yes_no, yesno_scores


def eval_config(model: Path, data: Path, out: Path, **over) -> EvalConfig:
    values = {"model": str(model), "data.path": str(data), "output": str(out), "device": "cpu",
              "max_new_tokens": 4, "batch_size": 3, **over}
    return load_config(EvalConfig, None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in values.items()])


# --------------------------------------------------------------------------------------------------
# scoring


def test_normalise_and_extractors():
    assert normalise("  Red. ") == "red" and normalise("3") == "3" and normalise("a.b.") == "a.b"
    assert choice_letter("B. blue") == "B" and choice_letter("the answer is (C)") == "C"
    assert choice_letter("a Blue one") is None  # neither the article nor the B of Blue
    assert yes_no("Yes, there is.") == "yes" and yes_no(" no.") == "no" and yes_no("maybe yes") is None


def test_exact_and_choice():
    assert is_correct("exact", " Red.", "red") and not is_correct("exact", "red circle", "red")
    assert is_correct("choice", "C. green", "C") and is_correct("choice", "C", "C")
    assert not is_correct("choice", "B", "C") and not is_correct("choice", "green", "C")
    with pytest.raises(ValueError, match="unknown answer kind"):
        is_correct("fuzzy", "a", "a")


def test_yesno_accuracy_f1_and_yes_ratio_by_hand():
    golds = ["yes", "yes", "yes", "no", "no", "no"]
    preds = ["Yes.", "no", "yes", "yes", "No", "I think so"]
    # TP = 2 (0, 2), FP = 1 (3), FN = 1 (1); correct = 0, 2, 4 -> 3 of 6; "yes" predicted 3 times.
    s = yesno_scores(preds, golds)
    assert s["n"] == 6 and s["correct"] == 3 and s["accuracy"] == 0.5
    assert s["precision"] == pytest.approx(2 / 3) and s["recall"] == pytest.approx(2 / 3)
    assert s["f1"] == pytest.approx(2 / 3) and s["yes_ratio"] == 0.5
    # All "no": no positive prediction, F1 = 0 (no 0/0).
    assert yesno_scores(["no"] * 3, ["yes", "no", "no"])["f1"] == 0.0


def test_summarise_micro_average_and_per_type():
    preds = [
        {"type": "exists", "kind": "yesno", "gold": "yes", "prediction": "yes", "correct": True},
        {"type": "exists", "kind": "yesno", "gold": "no", "prediction": "yes", "correct": False},
        {"type": "count", "kind": "exact", "gold": "2", "prediction": "2", "correct": True},
        {"type": "count", "kind": "exact", "gold": "1", "prediction": "2", "correct": False},
        {"type": "count", "kind": "exact", "gold": "3", "prediction": "3", "correct": True},
    ]
    s = summarise(preds)
    assert s["n_questions"] == 5 and s["accuracy"] == pytest.approx(3 / 5)  # micro, not (1/2 + 2/3) / 2
    assert s["by_type"]["count"] == {"kind": "exact", "n": 3, "correct": 2, "accuracy": pytest.approx(2 / 3)}
    assert s["by_type"]["exists"]["f1"] == pytest.approx(2 / 3) and s["by_type"]["exists"]["yes_ratio"] == 1.0
    table = ev.format_table({**s, "agreement": None})
    assert [c.strip() for c in table.splitlines()[0].split("|")] == ["type", "n", "accuracy", "f1"]
    assert table.splitlines()[-1].split()[:3] == ["overall", "|", "5"]


# --------------------------------------------------------------------------------------------------
# end to end with a forced generation


@pytest.fixture(scope="module")
def questions(tmp_path_factory) -> Path:
    """The demo's question set: 4 images x 3 turns, with question_types and answers."""
    return make_synthetic(tmp_path_factory.mktemp("qa"), seed=3, n_train=0, n_val=0, n_test=4, turns=3)["test"]


def wrong(kind: str, gold: str) -> str:
    return {"exact": "zebra", "yesno": "no" if gold == "yes" else "yes", "choice": "A" if gold != "A" else "B"}[kind]


def force_generation(monkeypatch, model_dir: Path, data: Path, seen: list[str]):
    """Replace the model's ``generate``: answer question i (in file order) with its gold answer when i
    is even, with a wrong one when odd; check each prompt ends with its own question."""
    from stage2_student.scoring import ANSWER_KIND

    records = json.loads(data.read_text())
    expected = [(r["conversations"][2 * j]["value"].replace("<image>\n", ""), a, ANSWER_KIND[t])
                for r in records for j, (t, a) in enumerate(zip(r["question_types"], r["answers"]))]
    tok = load_processor(model_dir).tokenizer
    eos, pad = tok.convert_tokens_to_ids("<|im_end|>"), tok.pad_token_id
    counter = iter(range(len(expected)))

    def fake_generate(self, input_ids=None, attention_mask=None, **kwargs):
        assert kwargs["generation_config"].do_sample is False
        rows = []
        for ids in input_ids.tolist():
            i = next(counter)
            question, gold, kind = expected[i]
            prompt = tok.decode(ids, skip_special_tokens=False)
            assert prompt.endswith(f"{question}<|im_end|>\n<|im_start|>assistant\n"), (i, prompt[-200:])
            seen.append(prompt)
            answer = gold if i % 2 == 0 else wrong(kind, gold)
            rows.append(ids + tok(answer, add_special_tokens=False)["input_ids"] + [eos])
        width = max(map(len, rows))
        return torch.tensor([r + [pad] * (width - len(r)) for r in rows])

    cls = type(AutoModelForImageTextToText.from_pretrained(model_dir))
    monkeypatch.setattr(cls, "generate", fake_generate)
    return expected


def test_forced_half_right_gives_exactly_half(monkeypatch, tmp_path, tiny_teacher_dir, questions):
    seen: list[str] = []
    expected = force_generation(monkeypatch, tiny_teacher_dir, questions, seen)
    report = ev.run(eval_config(tiny_teacher_dir, questions, tmp_path / "r.json", batch_size=5))
    assert len(expected) == 12 and report["n_questions"] == 12 and report["n_samples"] == 4
    assert report["accuracy"] == 0.5 and report["correct"] == 6
    assert [p["correct"] for p in report["predictions"]] == [i % 2 == 0 for i in range(12)]
    assert [p["prediction"] for p in report["predictions"][::2]] == [g for _, g, _ in expected[::2]]
    # Per-type counts match the file.
    records = json.loads(questions.read_text())
    counts = Counter(t for r in records for t in r["question_types"])
    assert {t: s["n"] for t, s in report["by_type"].items()} == dict(counts)
    assert json.loads((tmp_path / "r.json").read_text())["accuracy"] == 0.5
    # Turn 2's prompt (the second question of the first record) holds turn 1's gold answer, and the
    # third prompt holds both earlier gold answers, in order.
    first = records[0]
    q1, a1, q2, a2 = (first["conversations"][k]["value"] for k in range(4))
    assert a1 in seen[1] and seen[1].index(q1.replace("<image>\n", "")) < seen[1].index(f"assistant\n{a1}<|im_end|>")
    assert f"assistant\n{a1}<|im_end|>" in seen[2] and f"assistant\n{a2}<|im_end|>" in seen[2]
    assert f"assistant\n{a1}<|im_end|>" not in seen[0]


def test_prompt_messages_show_only_the_images_asked_so_far(tmp_path, processor):
    from conftest import two_image_record

    rec = two_image_record(tmp_path)
    first, n1 = ev.prompt_messages(rec, 1)
    second, n2 = ev.prompt_messages(rec, 3)
    assert (n1, n2) == (1, 2)
    assert [m["role"] for m in first] == ["system", "user"]
    assert [m["role"] for m in second] == ["system", "user", "assistant", "user"]
    assert second[2]["content"] == [{"type": "text", "text": "red"}]  # the gold earlier answer
    text = processor.apply_chat_template(second, tokenize=False, add_generation_prompt=True)
    assert text.endswith("<|im_start|>assistant\n") and "the first one" not in text


def test_real_generation_batched_equals_one_at_a_time(tmp_path, tiny_teacher_dir, questions):
    one = ev.run(eval_config(tiny_teacher_dir, questions, tmp_path / "a.json", batch_size=1, limit=2))
    many = ev.run(eval_config(tiny_teacher_dir, questions, tmp_path / "b.json", batch_size=4, limit=2))
    assert one["n_questions"] == 6
    assert [p["prediction"] for p in one["predictions"]] == [p["prediction"] for p in many["predictions"]]


def test_records_without_types_and_bad_records(monkeypatch, tmp_path, tiny_teacher_dir):
    from conftest import write_image, write_json

    write_image(tmp_path / "a.png")
    conv = [{"from": "human", "value": "<image>\nWhat colour?"}, {"from": "gpt", "value": "red"}]
    data = write_json(tmp_path / "q.json", [
        {"id": "plain", "image": "a.png", "conversations": conv},
        {"id": "gone", "image": "none.png", "conversations": conv},
        {"id": "badtypes", "image": "a.png", "conversations": conv, "question_types": ["exists", "count"]},
    ])
    report = ev.run(eval_config(tiny_teacher_dir, data, tmp_path / "r.json"))
    assert list(report["by_type"]) == ["unknown"] and report["by_type"]["unknown"]["n"] == 1
    reasons = {s["id"]: s["reason"] for s in report["skipped"]}
    assert reasons == {"gone": "missing_image", "badtypes": "malformed_record"}
    assert "none.png" in next(s["detail"] for s in report["skipped"] if s["id"] == "gone")


def test_missing_files_are_named(tmp_path, tiny_teacher_dir, questions):
    with pytest.raises(DataSourceError, match="nothing.json"):
        ev.run(eval_config(tiny_teacher_dir, tmp_path / "nothing.json", tmp_path / "r.json"))
    with pytest.raises(FileNotFoundError, match="no-model"):
        ev.run(eval_config(tmp_path / "no-model", questions, tmp_path / "r.json"))


# --------------------------------------------------------------------------------------------------
# agreement with a teacher store


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_teacher_dir) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("eval-store")
    data = make_dataset(root / "data", n=5)  # multi-turn, two images in one sample, one text-only
    out = root / "store"
    # τ_dump = 2: the model's logits must be divided by the store's temperature to agree.
    dump(dump_config(tiny_teacher_dir, data, out, **{"signals.transitions.max_positions": 2, "signals.temperature": 2.0}))
    return data, out


def test_teacher_agrees_with_its_own_store(tmp_path, tiny_teacher_dir, store):
    data, out = store
    report = ev.run(eval_config(tiny_teacher_dir, data, tmp_path / "r.json", store=str(out), **{"data.max_length": 400}))
    agree = report["agreement"]
    assert agree["samples"] == 5 and agree["positions"] > 20 and agree["temperature"] == 2.0
    assert abs(agree["forward_kl"]) < 1e-4 and agree["top1_agreement"] == 1.0
    assert list(report["by_type"]) == ["unknown"]


@pytest.mark.parametrize("preset", ["student", "student-pooled"])
def test_other_student_disagrees(tmp_path, family, store, preset):
    data, out = store
    student = save_tiny_vlm(tmp_path / "student", family, preset, seed=1)
    agree = ev.run(eval_config(student, data, tmp_path / "r.json", store=str(out), **{"data.max_length": 400}, limit=3))["agreement"]
    assert agree["samples"] == 3 and agree["forward_kl"] > 1e-4 and 0.0 <= agree["top1_agreement"] < 1.0


def test_store_without_the_data_is_refused(tmp_path, tiny_teacher_dir, store, questions):
    _, out = store
    with pytest.raises(PipelineError, match="no sample of the question file is in the store"):
        ev.run(eval_config(tiny_teacher_dir, questions, tmp_path / "r.json", store=str(out), limit=1))


# --------------------------------------------------------------------------------------------------
# CLI


def test_cli_writes_the_report(tmp_path, tiny_teacher_dir, questions, capsys):
    cfg = tmp_path / "eval.yaml"
    cfg.write_text(f"model: {tiny_teacher_dir}\ndata:\n  path: {questions}\noutput: {tmp_path / 'out' / 'r.json'}\n")
    assert main(["run", "eval", "--config", str(cfg), "limit=1", "device=cpu", "max_new_tokens=2"]) == 0
    report = json.loads((tmp_path / "out" / "r.json").read_text())
    assert report["n_questions"] == 3 and report["config"]["limit"] == 1 and report["agreement"] is None
    assert "overall" in capsys.readouterr().out
    assert main(["run", "eval", "--config", str(cfg), f"data.path={tmp_path}/none.json"]) == 2
    assert "none.json" in capsys.readouterr().err
