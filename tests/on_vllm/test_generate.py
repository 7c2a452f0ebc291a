"""Stage 0 end to end on a real vLLM engine (tiny Qwen2-VL, CPU): every record answered or reported,
provenance written, own-history turns answered from the model's own answers with their seeds, a
run killed and resumed on two Ray workers equal to an uninterrupted one in-process, and the output
read by teacher-dump (the sequence-level KD workflow).

Engines: one in this process for the module; the killed run starts one in its own process, the
resumed run one per Ray actor. Not exercised here: GPUs, tensor parallelism (model.
tensor_parallel_size is passed to vLLM and sizes each actor's GPUs, untested without GPUs).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import write_image
from vllm_engines import MAX_MODEL_LEN

import vllm
from pipeline.config import load_config, save_config
from pipeline.data.records import Record, parse_conversations
from pipeline.processors import load_processor
from pipeline.tools.tiny import save_tiny_vlm
from schemas import StoreReader
from schemas.fingerprints import weights_fingerprint
from pipeline.generation.config import GenerateConfig
from pipeline.generation.engine import Engine
from pipeline.generation.generate import run
from pipeline.generation.prompts import Request, answer_seed, images_asked, prompt_turns, render
from stage1_teacher.config import DumpConfig
from stage1_teacher.dump import run as dump

ROOT = Path(__file__).resolve().parents[2]
N = 2  # answers per record


def make_dataset(root: Path) -> Path:
    """Good records in shards 0-3 (shard_size 2) with bad ones among them, as JSONL."""
    for i in range(6):
        write_image(root / "img" / f"{i}.png", 32, 32 + 16 * (i % 2), seed=i)
    q = lambda text: {"from": "human", "value": text}  # noqa: E731
    a = lambda text: {"from": "gpt", "value": text}  # noqa: E731
    lines = [
        {"id": "one-turn", "image": "img/0.png", "conversations": [q("<image>\nWhat colour is the shape?"), a("red")]},
        {"id": "two-turns", "image": ["img/1.png", "img/2.png"], "conversations": [
            {"from": "system", "value": "You are a helpful assistant."},
            q("<image>\nHow many shapes are there?"), a("3"), q("Compare with <image> please."), a("the blue one")]},
        {"id": "missing", "image": "img/none.png", "conversations": [q("<image>\nQ?"), a("A")]},
        {"id": "text-only", "conversations": [q("Say yes or no."), a("yes"), q("And now?")]},
        {"id": "gated", "image": "img/4.png", "conversations": [q("<image>\nIs there a red circle?"), a("no")]},
        {"id": "too-long", "conversations": [q("red " * (MAX_MODEL_LEN + 10)), a("A")]},
        {"id": "tag-mismatch", "image": "img/5.png", "conversations": [q("No tag here."), a("A")]},
        {"id": 42, "image": "img/3.png", "conversations": [q("<image>\nWhich shape is left of the star?"), a("circle")]},
    ]
    text = "".join(json.dumps(r) + "\n" for r in lines[:6]) + "{not json\n" + "".join(json.dumps(r) + "\n" for r in lines[6:])
    (root / "data.jsonl").write_text(text)
    return root / "data.jsonl"


def config(model: Path, data: Path, out: Path, **over) -> GenerateConfig:
    values = {"model.path": str(model), "model.dtype": "float32", "model.enforce_eager": True,
              "model.max_images_per_prompt": 2, "data.path": str(data), "data.max_length": MAX_MODEL_LEN,
              "output.dir": str(out), "output.shard_size": 2, "sampling.n": N, "sampling.temperature": 1.0,
              "sampling.top_p": 0.9, "sampling.max_new_tokens": 8, "sampling.history": "own", "seed": 3, **over}
    return load_config(GenerateConfig, None, [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in values.items()])


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("generate")
    return save_tiny_vlm(root / "model", "qwen2_vl", "vllm-teacher"), make_dataset(root / "data"), root


@pytest.fixture(scope="module")
def engine(setup):
    model, data, root = setup
    engine = Engine(config(model, data, root / "unused"))
    yield engine
    engine.close()


@pytest.fixture(scope="module")
def uninterrupted(setup, engine) -> Path:
    model, data, root = setup
    out = root / "uninterrupted"
    run(config(model, data, out), engine=engine)
    return out


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_every_record_is_answered_or_reported_with_provenance(setup, uninterrupted):
    model, data, _ = setup
    generated, skipped = lines(uninterrupted / "generated.jsonl"), lines(uninterrupted / "skipped.jsonl")
    reasons = {s["id"]: s["reason"] for s in skipped if s["sample"] is None}
    assert reasons == {"missing": "missing_image", "row-6": "malformed_record", "tag-mismatch": "image_tag_mismatch"}
    too_long = [s for s in skipped if s["id"].startswith("too-long")]
    assert sorted(s["id"] for s in too_long) == ["too-long#0", "too-long#1"] and {s["reason"] for s in too_long} == {"over_length"}
    # Nothing lost: each conversation of each usable record is in the output, or skipped with its reason
    # (a random tiny model may end an answer at once: empty_answer).
    expected = {f"{sid}#{k}" for sid in ("one-turn", "two-turns", "text-only", "gated", "42") for k in range(N)}
    conversation_skips = {s["id"]: s["reason"] for s in skipped if s["sample"] is not None and not s["id"].startswith("too-long")}
    assert set(conversation_skips.values()) <= {"empty_answer"}
    answered = {r["id"] for r in generated}
    assert len(answered) == len(generated) and not answered & set(conversation_skips)
    assert answered | set(conversation_skips) == expected
    assert len(generated) >= len(expected) - 2
    inputs = {str(r["id"]): r for r in lines_of_valid_json(data)}
    identity = {"path": str(model.resolve()), "model_type": "qwen2_vl", "weights_fingerprint": weights_fingerprint(model)}
    for r in generated:
        source = inputs[r["generation"]["source_id"]]
        assert r["image"] == source.get("image") if "image" in source else "image" not in r
        humans = [t for t in source["conversations"] if t["from"] == "human"]
        assert [t["value"] for t in r["conversations"] if t["from"] == "human"] == [h["value"] for h in humans]
        assert [t["from"] for t in r["conversations"] if t["from"] != "system"] == ["human", "gpt"] * len(humans)
        g = r["generation"]
        assert g["model"] == identity and g["engine"] == {"name": "vllm", "version": vllm.__version__}
        assert g["sampling"] == {"n": N, "temperature": 1.0, "top_p": 0.9, "max_new_tokens": 8, "history": "own"}
        assert g["seed"] == 3 and f"{g['source_id']}#{g['sample']}" == r["id"]
        assert len(g["finish_reasons"]) == len(humans) and set(g["finish_reasons"]) <= {"stop", "length"}
    provenance = json.loads((uninterrupted / "provenance.json").read_text())
    assert provenance["counts"] == {"input_records": 9, "output_records": len(generated), "skipped": len(skipped),
                                    "skipped_reasons": provenance["counts"]["skipped_reasons"]}
    assert provenance["model"]["weights_fingerprint"] == identity["weights_fingerprint"]
    assert provenance["throughput"]["generated_tokens"] > 0
    print(f"generation throughput (CPU, one engine, tiny Qwen2-VL): {provenance['throughput']}")


def lines_of_valid_json(path: Path) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            out.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return out


def test_own_history_answers_are_the_engines_draws_on_the_models_own_turns(setup, engine, uninterrupted):
    """Re-ask each turn of a two-turn conversation from the record as written (the model's first
    answer in the history) with that turn's seed: the engine draws the recorded answer again."""
    model, data, root = setup
    processor = load_processor(model)
    record = next(r for r in lines(uninterrupted / "generated.jsonl") if r["id"].startswith("two-turns"))
    turns = [t["value"] for t in record["conversations"] if t["from"] == "gpt"]
    source = Record("two-turns", parse_conversations("two-turns", record["conversations"]),
                    [data.parent / p for p in record["image"]])
    images = source.load_images()
    requests = []
    for turn in range(2):
        asked = prompt_turns(source, turn, turns, "own")
        requests.append(Request(render(processor, asked), images[: images_asked(asked)],
                                answer_seed(3, "two-turns", record["generation"]["sample"], turn)))
    # The second prompt holds the model's own first answer, not the dataset's ("3").
    assert f"<|im_start|>assistant\n{turns[0]}<|im_end|>" in requests[1].text
    assert "<|im_start|>assistant\n3<|im_end|>" not in requests[1].text
    assert [a.text.strip() for a in engine.answer(requests)] == turns


# `pipeline run ...` whose reading of one image (argv[1]) waits on a FIFO (argv[2]) that no one writes.
_WAIT_ON_IMAGE = """
import sys
from pipeline.data.records import Record
from pipeline.tools.cli import main

target, gate = sys.argv[1:3]
load = Record.load

def load_or_wait(self):
    if any(str(p) == target for p in self.images):
        open(gate).close()
    return load(self)

Record.load = load_or_wait
sys.exit(main(sys.argv[3:]))
"""


def test_killed_then_resumed_on_two_ray_workers_equals_uninterrupted(setup, uninterrupted, tmp_path):
    """SIGKILL a real `pipeline run generate` while it waits on the image of a record in its third
    shard, then resume with two Ray workers: the same answers as the uninterrupted run."""
    model, data, _ = setup
    gate = tmp_path / "gate"
    os.mkfifo(gate)
    out = tmp_path / "killed"
    cfg = config(model, data, out)
    save_config(cfg, tmp_path / "generate.yaml")
    target = data.parent / "img" / "4.png"  # record "gated", the first of shard 2
    proc = subprocess.Popen([sys.executable, "-c", _WAIT_ON_IMAGE, str(target), str(gate), "run", "generate",
                             "--config", str(tmp_path / "generate.yaml")],
                            cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True)
    try:
        deadline = time.time() + 480
        while not (out / "shards" / "shard-00001.json").exists():
            assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
            assert time.time() < deadline, "generate never reached the blocking record"
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["shard-00000.json", "shard-00001.json"]
    assert not (out / "generated.jsonl").exists() and not (out / "provenance.json").exists()

    run(config(model, data, out, workers=2))
    assert (out / "generated.jsonl").read_text() == (uninterrupted / "generated.jsonl").read_text()
    assert (out / "skipped.jsonl").read_text() == (uninterrupted / "skipped.jsonl").read_text()
    counts = [json.loads((d / "provenance.json").read_text())["counts"] for d in (out, uninterrupted)]
    assert counts[0] == counts[1]


def test_teacher_dump_scores_the_generated_answers(setup, uninterrupted, tmp_path):
    """Sequence-level KD: the answers become the responses that teacher-dump scores."""
    model, data, _ = setup
    overrides = {"teacher.path": str(model), "teacher.dtype": "float32", "data.path": str(uninterrupted / "generated.jsonl"),
                 "data.image_root": str(data.parent), "data.max_length": MAX_MODEL_LEN, "output.dir": str(tmp_path / "store"),
                 "signals.top_k": 4, "signals.saliency_layers": [1], "signals.transitions.enabled": False}
    dump(load_config(DumpConfig, None, [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in overrides.items()]))
    reader = StoreReader(tmp_path / "store")
    generated = lines(uninterrupted / "generated.jsonl")
    stored = set(reader.sample_ids()) | {s.sample_id for s in reader.skipped()}
    assert stored == {r["id"] for r in generated}
    assert len(reader.sample_ids()) >= len(generated) - 1  # an answer of only special tokens would be skipped there
