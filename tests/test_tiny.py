"""Tiny VLMs: built from configs, saved and reloaded offline, shared tokenizer, pooled grids."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import BLOCKS_PER_IMAGE, write_image
from transformers import AutoModelForImageTextToText

from pipeline.data.encode import encode
from pipeline.data.records import Record, Turn
from pipeline.processors import load_processor
from pipeline.tools.tiny import build_tiny_vlm, build_tokenizer, save_tiny_vlm


def test_tokenizer_is_deterministic_and_lossless():
    a, b = build_tokenizer(), build_tokenizer()
    assert a.get_vocab() == b.get_vocab()
    text = "<|im_start|>user\nWhat colour is the shape at the top left?<|im_end|>\n"
    assert a.decode(a(text, add_special_tokens=False)["input_ids"]) == text


def test_round_trip_same_logits_and_ids(tiny_teacher_dir, family, tmp_path):
    """save_pretrained -> from_pretrained (offline) gives the same processor ids and logits."""
    model, processor = build_tiny_vlm(family, "teacher", seed=0)
    reloaded = AutoModelForImageTextToText.from_pretrained(tiny_teacher_dir).eval()
    proc2 = load_processor(tiny_teacher_dir)
    rec = Record("r", [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red")], [write_image(tmp_path / "a.png")])
    e1, e2 = encode(rec, processor, 512), encode(rec, proc2, 512)
    np.testing.assert_array_equal(e1.input_ids, e2.input_ids)
    with torch.no_grad():
        l1 = model(**e1.model_inputs).logits
        l2 = reloaded(**e2.model_inputs).logits
    torch.testing.assert_close(l1, l2, rtol=0, atol=0)
    assert type(reloaded).__name__ == type(model).__name__


def test_students_share_the_teacher_tokenizer_and_generate(family, tmp_path):
    _, teacher_proc = build_tiny_vlm(family, "teacher")
    student, student_proc = build_tiny_vlm(family, "student", seed=1)
    assert teacher_proc.tokenizer.get_vocab() == student_proc.tokenizer.get_vocab()
    assert teacher_proc.chat_template == student_proc.chat_template
    n_teacher = sum(p.numel() for p in build_tiny_vlm(family, "teacher")[0].parameters())
    assert sum(p.numel() for p in student.parameters()) < n_teacher
    rec = Record("g", [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red")], [write_image(tmp_path / "a.png")])
    enc = encode(rec, student_proc, 512)
    prompt = {k: v for k, v in enc.model_inputs.items()}
    out = student.generate(**prompt, max_new_tokens=3, do_sample=False)
    assert out.shape[1] == enc.length + 3 or out[0, -1].item() == student.generation_config.eos_token_id


def test_pooled_student_grid_is_the_teacher_grid_divided(family, tmp_path):
    img = write_image(tmp_path / "a.png", 32, 32)
    rec = Record("p", [Turn("user", "<image>\nQ"), Turn("assistant", "A")], [img])
    grids = {}
    for preset in ("teacher", "student-pooled"):
        _, proc = build_tiny_vlm(family, preset)
        grids[preset] = [blk.grid for blk in encode(rec, proc, 512).visual_blocks]  # tiled: one per tile
    assert len(grids["teacher"]) == len(grids["student-pooled"]) == BLOCKS_PER_IMAGE[family]  # tiled alike
    for t, s in zip(grids["teacher"], grids["student-pooled"]):
        assert (t[0] // 2, t[1] // 2) == s and t[0] % 2 == 0


def test_unknown_family_and_preset():
    with pytest.raises(ValueError, match="unknown tiny family"):
        build_tiny_vlm("gpt", "teacher")
    with pytest.raises(ValueError, match="unknown tiny preset"):
        build_tiny_vlm("llava", "huge")


@pytest.mark.parametrize(
    "family, stock",
    [("qwen2_vl", "Qwen2VLProcessor"), ("qwen2_5_vl", "Qwen2_5_VLProcessor"), ("qwen3_vl", "Qwen3VLProcessor")],
)
def test_saved_processor_is_readable_by_stock_class_name(tmp_path, family, stock):
    import json

    d = save_tiny_vlm(tmp_path / "q", family, "student")
    assert json.loads((d / "processor_config.json").read_text())["processor_class"] == stock
    assert stock in [c.__name__ for c in type(load_processor(d)).__mro__[1:]]  # image-only subclass of the stock class
    assert (d / "model.safetensors").is_file() and not list(d.glob("*.bin"))
