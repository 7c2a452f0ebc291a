"""Stage 0 without an engine: prompts asked turn by turn (gold or own history), the LLaVA records the
answers make, the seeds of the draws, bad records and the output directory's refusals. The engine
side (vLLM) is tested in tests/on_vllm/test_generate.py."""

from __future__ import annotations

import copy as copy_module
import json

import pytest
from conftest import write_image, write_json

from pipeline.config import load_config
from pipeline.data import BadRecord, SampleError
from pipeline.data.records import Record, Turn
from pipeline.errors import PipelineError
from pipeline.processors import load_processor
from pipeline.tools.cli import main
from pipeline.tools.tiny import save_tiny_vlm
from pipeline.generation.config import GenerateConfig
from pipeline.generation.generate import OutputMismatchError, check_or_claim_output, read_items
from pipeline.generation.prompts import answer_seed, images_asked, output_record, prompt_turns, render
from pipeline.generation.shards import TOO_MANY_IMAGES, open_record, shard_path

RECORD = Record("r1", [
    Turn("system", "You are a helpful assistant."),
    Turn("user", "<image>\nWhat colour is the shape?"), Turn("assistant", "red"),
    Turn("user", "Compare with <image> please."), Turn("assistant", "the first one"),
    Turn("user", "How many shapes are there?"),
], ["a.png", "b.png"])


def config(tmp_path, **over) -> GenerateConfig:
    values = {"model.path": str(tmp_path / "model"), "data.path": str(tmp_path / "data.json"),
              "output.dir": str(tmp_path / "out"), **over}
    return load_config(GenerateConfig, None, [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()])


def test_gold_history_keeps_the_dataset_answers_and_own_takes_the_models():
    first = prompt_turns(RECORD, 0, [], "gold")
    assert first == RECORD.turns[:2] and images_asked(first) == 1
    gold = prompt_turns(RECORD, 2, ["A0", "A1"], "gold")
    own = prompt_turns(RECORD, 2, ["A0", "A1"], "own")
    assert gold == RECORD.turns
    assert [t.text for t in own if t.role == "assistant"] == ["A0", "A1"]
    assert [t for t in own if t.role != "assistant"] == [t for t in RECORD.turns if t.role != "assistant"]
    assert images_asked(own) == 2


def test_render_asks_the_last_turn_with_the_chat_template(tmp_path):
    processor = load_processor(save_tiny_vlm(tmp_path / "m", "qwen2_vl", "vllm-student"))
    text = render(processor, prompt_turns(RECORD, 1, ["my own answer"], "own"))
    assert text.startswith("<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n")
    assert text.endswith("Compare with <|vision_start|><|image_pad|><|vision_end|> please.<|im_end|>\n<|im_start|>assistant\n")
    assert "my own answer" in text and "red" not in text
    assert text.count("<|image_pad|>") == 2


def test_output_record_keeps_the_input_and_answers_every_human_turn():
    raw = {"id": 7, "image": ["a.png", "b.png"], "question_types": ["colour"], "conversations": "replaced"}
    record = Record("7", RECORD.turns, RECORD.images)
    out = output_record(raw, record, 0, 1, ["A0", "A1", "A2"], {"p": 1})
    assert out["id"] == 7 and out["image"] == ["a.png", "b.png"] and out["question_types"] == ["colour"]
    assert out["generation"] == {"p": 1}
    assert out["conversations"] == [
        {"from": "system", "value": "You are a helpful assistant."},
        {"from": "human", "value": "<image>\nWhat colour is the shape?"}, {"from": "gpt", "value": "A0"},
        {"from": "human", "value": "Compare with <image> please."}, {"from": "gpt", "value": "A1"},
        {"from": "human", "value": "How many shapes are there?"}, {"from": "gpt", "value": "A2"},
    ]
    assert output_record(raw, record, 1, 2, ["A0", "A1", "A2"], {})["id"] == "7#1"
    assert output_record({"image": "a.png"}, record, 0, 1, ["A0", "A1", "A2"], {})["id"] == "7"  # read as row id
    with pytest.raises(ValueError, match="2 answers for 3 human turns"):
        output_record(raw, record, 0, 1, ["A0", "A1"], {})


def test_answer_seeds_depend_on_seed_record_sample_and_turn_only():
    seeds = {answer_seed(s, i, k, t) for s in (0, 1) for i in ("a", "b") for k in (0, 1) for t in (0, 1)}
    assert len(seeds) == 16 and all(0 <= x < 2**63 for x in seeds)
    assert answer_seed(3, "a", 1, 2) == answer_seed(3, "a", 1, 2)


def test_bad_records_get_their_reason(tmp_path):
    write_image(tmp_path / "a.png")
    write_json(tmp_path / "data.json", [
        {"id": "ok", "image": "a.png", "conversations": [{"from": "human", "value": "<image>\nQ?"}]},
        {"id": "three", "image": ["a.png"] * 3, "conversations": [{"from": "human", "value": "<image><image><image>"}]},
        {"id": "tags", "image": "a.png", "conversations": [{"from": "human", "value": "no tag"}]},
        {"id": "missing", "image": "none.png", "conversations": [{"from": "human", "value": "<image>"}]},
        {"id": "system-only", "conversations": [{"from": "system", "value": "hello"}]},
        {"id": "ok", "conversations": [{"from": "human", "value": "a second record with id ok"}]},
        {"id": "broken", "conversations": [{"from": "robot", "value": "?"}]},
    ])
    cfg = config(tmp_path, **{"model.max_images_per_prompt": 2})
    items = read_items(cfg)
    assert [raw["id"] for raw, _ in items] == ["ok", "three", "tags", "missing", "system-only", "ok", "broken"]
    results = [open_record(item, cfg) for _, item in items]
    assert results[0][1] is None and len(results[0][0]) == 1
    reasons = {skip["id"]: skip["reason"] for _, skip in results[1:]}
    assert reasons == {"three": TOO_MANY_IMAGES, "tags": "image_tag_mismatch", "missing": "missing_image",
                       "system-only": "malformed_record", "ok@data.json[5]": "malformed_record", "broken": "malformed_record"}


def test_a_bad_record_crosses_to_another_process_whole():
    """Shards go to Ray actors with their bad records: a SampleError is rebuilt from its fields."""
    bad = BadRecord(SampleError("a", "missing_image", "image 0 not found: x.png", skip_id="a@data.json:3"))
    copy = copy_module.deepcopy(bad)  # through __reduce__, as Ray's serialisation goes
    assert (copy.error.sample_id, copy.error.reason, copy.error.detail, copy.error.skip_id) == (
        "a", "missing_image", "image 0 not found: x.png", "a@data.json:3")


def test_generate_reads_llava_files_only(tmp_path):
    (tmp_path / "dataset").mkdir()
    with pytest.raises(PipelineError, match="generate reads a LLaVA .json or .jsonl file"):
        read_items(config(tmp_path, **{"data.path": str(tmp_path / "dataset")}))


def test_the_output_directory_is_claimed_once_and_other_settings_refused(tmp_path):
    out = tmp_path / "out"
    check_or_claim_output(out, {"seed": 0})
    check_or_claim_output(out, {"seed": 1})  # no shard yet: the corrected settings replace them
    assert json.loads((out / "generate.json").read_text()) == {"seed": 1}
    shard_path(out, "shard-00000").parent.mkdir()
    shard_path(out, "shard-00000").write_text("{}")
    with pytest.raises(OutputMismatchError, match="seed: output has 1, this run has 2"):
        check_or_claim_output(out, {"seed": 2})
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "file.txt").write_text("x")
    with pytest.raises(OutputMismatchError, match="not a generate output"):
        check_or_claim_output(tmp_path / "other", {"seed": 0})


def test_without_vllm_the_command_says_where_it_runs(tmp_path, capsys):
    try:
        import vllm  # noqa: F401
    except ImportError:
        pass
    else:
        pytest.fail("the main suite's venv must not have vLLM (tests/on_vllm run in .venv-vllm)")
    save_tiny_vlm(tmp_path / "model", "llava", "vllm-student")
    write_json(tmp_path / "data.json", [{"id": "a", "conversations": [{"from": "human", "value": "Q?"}]}])
    argv = ["run", "generate", f"model.path={tmp_path / 'model'}", f"data.path={tmp_path / 'data.json'}", f"output.dir={tmp_path / 'out'}"]
    assert main(argv) == 2
    assert "make vllm-setup" in capsys.readouterr().err
