"""Checkpoints in vLLM's weight layout (pipeline/vllm_layout.py): the names vLLM expects, the same
model for transformers, the video processor config the stock Qwen-VL processors need.

vLLM itself is not installed in the main suite's venv: that these checkpoints load and generate in
vLLM is tested in tests/on_vllm/test_vllm_serving.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import write_image
from safetensors import safe_open
from transformers import AutoModelForImageTextToText

from pipeline.data.encode import encode
from pipeline.data.records import Record, Turn
from pipeline.errors import PipelineError
from pipeline.processors import load_processor
from pipeline.tools.cli import main
from pipeline.tools.tiny import build_tiny_vlm, save_tiny_vlm
from pipeline.vllm_layout import export_for_vllm, to_vllm_layout, vllm_key
from stage2_student.student import save_student


def weight_names(directory) -> list[str]:
    names = []
    for path in sorted(directory.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            names += list(f.keys())
    return sorted(names)


def logits(directory, tmp_path):
    model = AutoModelForImageTextToText.from_pretrained(directory, dtype=torch.float32).eval()
    rec = Record("r", [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red")], [write_image(tmp_path / "a.png")])
    sample = encode(rec, load_processor(directory), 512)
    with torch.no_grad():
        return model(**sample.model_inputs).logits


def test_llava_vision_tower_gets_the_vision_model_level():
    assert vllm_key("llava", "vision_tower.embeddings.patch_embedding.weight") == "vision_tower.vision_model.embeddings.patch_embedding.weight"
    assert vllm_key("llava", "model.vision_tower.encoder.layers.0.mlp.fc1.bias") == "model.vision_tower.vision_model.encoder.layers.0.mlp.fc1.bias"
    for kept in ("vision_tower.vision_model.post_layernorm.weight", "language_model.model.embed_tokens.weight",
                 "multi_modal_projector.linear_1.weight", "lm_head.weight"):
        assert vllm_key("llava", kept) == kept
    assert vllm_key("qwen2_vl", "visual.blocks.0.attn.qkv.weight") == "visual.blocks.0.attn.qkv.weight"


def test_exported_llava_has_vllm_names_and_identical_logits(tmp_path):
    src = save_tiny_vlm(tmp_path / "src", "llava", "vllm-student")
    before = weight_names(src)
    assert any(n.startswith("vision_tower.embeddings.") for n in before)  # what transformers 5.19 writes
    dst = export_for_vllm(src, tmp_path / "dst")
    after = weight_names(dst)
    vision = [n for n in after if n.startswith("vision_tower.")]
    assert vision and all(n.startswith("vision_tower.vision_model.") for n in vision)
    assert len(after) == len(before) and weight_names(src) == before  # the source is untouched
    torch.testing.assert_close(logits(dst, tmp_path), logits(src, tmp_path), rtol=0, atol=0)
    # In place, a second time: nothing left to rename.
    assert to_vllm_layout(dst) == {"renamed": 0, "video_config": False}
    assert weight_names(dst) == after


def test_a_saved_student_is_in_vllm_layout_and_loads_as_it_was(tmp_path):
    """``final/`` of a distill run: vLLM's names, and transformers reads back the same model."""
    model, processor = build_tiny_vlm("llava", "vllm-student", seed=3)
    final = save_student(model, processor, tmp_path / "final", {"note": "test"})
    vision = [n for n in weight_names(final) if n.startswith("vision_tower.")]
    assert vision and all(n.startswith("vision_tower.vision_model.") for n in vision)
    rec = Record("r", [Turn("user", "<image>\nWhat colour?"), Turn("assistant", "red")], [write_image(tmp_path / "a.png")])
    with torch.no_grad():
        expected = model(**encode(rec, processor, 512).model_inputs).logits
    torch.testing.assert_close(logits(final, tmp_path), expected, rtol=0, atol=0)


def test_qwen2_vl_keeps_its_names_and_gains_a_video_config(tmp_path):
    src = save_tiny_vlm(tmp_path / "src", "qwen2_vl", "vllm-student")
    video = json.loads((src / "video_preprocessor_config.json").read_text())
    image = json.loads((src / "processor_config.json").read_text())["image_processor"]
    assert video["video_processor_type"] == "Qwen2VLVideoProcessor"
    assert {k: video[k] for k in ("patch_size", "merge_size", "temporal_patch_size", "size")} == {
        k: image[k] for k in ("patch_size", "merge_size", "temporal_patch_size", "size")}
    # A checkpoint saved before the video config was written gains it on export.
    (src / "video_preprocessor_config.json").unlink()
    dst = export_for_vllm(src, tmp_path / "dst")
    assert json.loads((dst / "video_preprocessor_config.json").read_text()) == video
    assert weight_names(dst) == weight_names(src)
    np.testing.assert_array_equal(logits(dst, tmp_path).numpy(), logits(src, tmp_path).numpy())


def test_export_refuses_an_existing_destination_and_a_non_checkpoint(tmp_path):
    src = save_tiny_vlm(tmp_path / "src", "llava", "vllm-student")
    (tmp_path / "taken").mkdir()
    with pytest.raises(PipelineError, match="taken exists"):
        export_for_vllm(src, tmp_path / "taken")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        export_for_vllm(tmp_path / "empty", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_export_vllm_command(tmp_path, capsys):
    src = save_tiny_vlm(tmp_path / "src", "llava", "vllm-student")
    assert main(["export-vllm", "--model", str(src), "--out", str(tmp_path / "dst")]) == 0
    assert any(n.startswith("vision_tower.vision_model.") for n in weight_names(tmp_path / "dst"))
    assert main(["export-vllm", "--model", str(src), "--out", str(tmp_path / "dst")]) == 2
    assert "exists" in capsys.readouterr().err
