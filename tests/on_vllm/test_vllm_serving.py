"""Students that vLLM serves: a LLaVA student's `final/`, as Stage 2 saves it (`save_student`), loads
in vLLM; vLLM's prompt log-probs equal the transformers forward of the same checkpoint, and its
greedy answer equals transformers' greedy answer.

Without the export in `save_student` (pipeline/vllm_layout.py) vLLM 0.32 refuses this checkpoint:
"There is no module or parameter named 'vision_tower.embeddings'". The Qwen2-VL side (the
processor's video config) is exercised by test_vllm_oracle.py, whose teacher vLLM serves.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_image
from transformers import AutoModelForImageTextToText
from vllm import SamplingParams
from vllm_engines import prompt_topk, start_engine

from pipeline.data.encode import encode, to_messages
from pipeline.data.records import Record, Turn
from pipeline.processors import load_processor
from pipeline.tools.tiny import build_tiny_vlm
from stage2_student.student import save_student

TOP_K = 8
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def final(tmp_path_factory):
    model, processor = build_tiny_vlm("llava", "vllm-student", seed=3)
    return save_student(model, processor, tmp_path_factory.mktemp("run") / "final", {"note": "test"})


@pytest.fixture(scope="module")
def engine(final):
    return start_engine(final, max_logprobs=TOP_K, images=1)


@pytest.fixture(scope="module")
def record(tmp_path_factory):
    image = write_image(tmp_path_factory.mktemp("img") / "a.png", 32, 32, seed=5)
    return Record("r", [Turn("user", "<image>\nWhat colour is the shape at the top left?"),
                        Turn("assistant", "The shape at the top left is red.")], [image])


def test_vllm_prompt_logprobs_equal_the_transformers_forward(final, engine, record):
    processor = load_processor(final)
    model = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32).eval()
    sample = encode(record, processor, 512)
    with torch.no_grad():
        logp = torch.log_softmax(model(**sample.model_inputs).logits[0].float(), -1)
    text = processor.apply_chat_template(to_messages(record), tokenize=False)
    (out,) = engine.generate({"prompt": text, "multi_modal_data": {"image": record.load_images()[0]}},
                             SamplingParams(max_tokens=1, prompt_logprobs=TOP_K), use_tqdm=False)
    np.testing.assert_array_equal(np.asarray(out.prompt_token_ids), sample.input_ids)
    ids, logprobs = prompt_topk(out, TOP_K)
    ref = logp[:-1].topk(TOP_K)  # row p predicts token p + 1: vLLM's prompt position p + 1
    np.testing.assert_array_equal(np.asarray(ids), ref.indices.numpy())
    np.testing.assert_allclose(np.asarray(logprobs), ref.values.numpy(), rtol=0, atol=1e-5)


def test_vllm_greedy_answer_equals_transformers_greedy(final, engine, record):
    processor = load_processor(final)
    model = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32).eval()
    text = processor.apply_chat_template(to_messages(record)[:1], tokenize=False, add_generation_prompt=True)
    images = record.load_images()
    inputs = processor(text=text, images=images, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        hf = model.generate(**inputs, max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS, do_sample=False)
    hf_tokens = hf[0, inputs["input_ids"].shape[1]:].tolist()
    (out,) = engine.generate({"prompt": text, "multi_modal_data": {"image": images[0]}},
                             SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0.0), use_tqdm=False)
    assert list(out.outputs[0].token_ids) == hf_tokens
