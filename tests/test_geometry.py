"""Students whose visual grid is not the teacher's pooled by an integer factor train on its store
(DESIGN.md §5.1): a 4x4 teacher grid with a 3x3 student, and 27x27 (SigLIP-384's 729 tokens) with
13x13 (the paper's 169), end to end through teacher-dump and distill."""

from __future__ import annotations

import json
from dataclasses import replace

import numpy as np
import pytest
from conftest import write_image, write_json
from test_distill import distill_config, losses
from test_dump import dump_config

from pipeline.processors import load_processor
from pipeline.tools.tiny import PRESETS, save_tiny_vlm
from schemas import StoreReader
from schemas.signals import unpack
from stage1_teacher.dump import run as dump
from stage2_student.data import StoreDataset
from stage2_student.distill import run as distill


def small_dataset(root, n: int, side: int):
    records = []
    for i in range(n):
        write_image(root / "img" / f"{i}.png", side, side, seed=i)
        records.append({"id": f"g{i}", "image": f"img/{i}.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat colour is the top left cell?"},
            {"from": "gpt", "value": ["red", "blue", "green"][i % 3]},
            {"from": "human", "value": "And the bottom right one?"},
            {"from": "gpt", "value": "yellow"},
        ]})
    return write_json(root / "data.json", records)


@pytest.mark.parametrize(("teacher_spec", "student_spec", "grids"), [
    (PRESETS["teacher"], replace(PRESETS["student"], image_size=24, patch=8), ((4, 4), (3, 3))),
    pytest.param(replace(PRESETS["teacher"], image_size=54, patch=2), replace(PRESETS["student"], image_size=26, patch=2),
                 ((27, 27), (13, 13)), marks=pytest.mark.slow),
], ids=["4x4-to-3x3", "27x27-to-13x13"])
def test_a_resized_student_grid_trains_on_the_store(tmp_path, teacher_spec, student_spec, grids):
    teacher = save_tiny_vlm(tmp_path / "teacher", "llava", teacher_spec)
    data = small_dataset(tmp_path / "data", n=4, side=teacher_spec.image_size)
    store = tmp_path / "store"
    dump(dump_config(teacher, data, store, **{"data.max_length": 900, "signals.transitions.max_positions": 4}))
    student = save_tiny_vlm(tmp_path / "student", "llava", student_spec, seed=1)
    processor = load_processor(student)
    (t_grid, s_grid) = grids
    reader = StoreReader(store)
    for sample in reader.sample_ids():
        teacher_signals = unpack(reader.get(sample))
        assert [tuple(b["grid"]) for b in teacher_signals.visual_blocks] == [t_grid]
    # One sample's targets on the student grid: mass preserved, rows on the student's visual positions.
    ds = StoreDataset(store, processor, batch_size=1, max_length=900)
    enc, targets = ds.encode_and_remap(reader.get(reader.sample_ids()[0]))
    assert [b.grid for b in enc.visual_blocks] == [s_grid]
    teacher_signals = unpack(reader.get(reader.sample_ids()[0]))
    np.testing.assert_allclose(targets.saliency.sum(1), teacher_signals.saliency.astype(np.float64).sum(1), rtol=1e-5)
    assert set(targets.vis_pos) <= set(enc.visual_positions) and len(targets.vis_pos) > 0
    np.testing.assert_allclose(targets.vis_weight.sum(), teacher_signals.vis_weight.sum(), rtol=1e-5)
    assert (np.exp(targets.vis_logprobs).sum(1) <= 1 + 1e-5).all()
    out = tmp_path / "run"
    distill(distill_config(store, out, {"path": str(student)}, **{"train.steps": 2, "train.batch_size": 2,
                                                                    "data.max_length": 900}))
    logged = losses(out)
    assert len(logged) == 2 and all(np.isfinite(row["iva"]) and np.isfinite(row["kd"]) for row in logged)
    assert json.loads((out / "final" / "provenance.json").read_text())["steps"] == 2


def test_a_turn_that_cannot_see_the_image_has_no_map(tmp_path):
    """The question comes before the image: that turn has no map (stored as zeros), the turn-mean
    weights come from the other turns, the summary counts it, and the store verifies."""
    from pipeline.tools.inspect_store import verify

    teacher = save_tiny_vlm(tmp_path / "teacher", "llava", "teacher")
    write_image(tmp_path / "data" / "img" / "0.png", 32, 32, seed=0)
    write_image(tmp_path / "data" / "img" / "1.png", 32, 32, seed=1)
    after = [{"from": "human", "value": "What colour is the top left cell of this picture? <image>"},
             {"from": "gpt", "value": "red"},
             {"from": "human", "value": "And the bottom right one?"},
             {"from": "gpt", "value": "blue"}]
    only_after = [{"from": "human", "value": "Describe the picture: <image>"}, {"from": "gpt", "value": "a grid"}]
    data = write_json(tmp_path / "data" / "data.json", [
        {"id": "after", "image": "img/0.png", "conversations": after},
        {"id": "only-after", "image": "img/1.png", "conversations": only_after},
        {"id": "before", "image": "img/0.png", "conversations": [
            {"from": "human", "value": "<image>\nWhat is this?"}, {"from": "gpt", "value": "a grid"}]},
    ])
    store = tmp_path / "store"
    manifest = dump(dump_config(teacher, data, store, **{"signals.saliency_layers": [1]}))
    reader = StoreReader(store)
    s = unpack(reader.get("after"))
    np.testing.assert_array_equal(s.saliency[0], 0.0)
    assert abs(float(s.saliency[1].astype(np.float64).sum()) - 1.0) < 2e-2
    cols = np.arange(int(s.visual_blocks[0]["start"]), int(s.visual_blocks[0]["start"]) + int(s.visual_blocks[0]["length"]))
    np.testing.assert_allclose(s.vis_weight, s.saliency[1].astype(np.float32)[np.searchsorted(cols, s.vis_pos)], rtol=1e-3)
    lone = unpack(reader.get("only-after"))
    assert lone.saliency.shape[0] == 1 and not lone.saliency.any() and len(lone.vis_pos) == 0
    assert manifest["saliency"]["turns_without_map"] == 2 and manifest["saliency"]["turns_with_images"] == 4
    assert verify(store) == []
