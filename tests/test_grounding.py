"""Saliency grounding (``pipeline.tools.grounding``) and the synthetic set's focus cells it reads."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from pipeline.config import from_dict
from pipeline.data import encode, read_records
from pipeline.processors import load_processor
from pipeline.tools.grounding import focus_mask, format_grounding, grounding, mass_on_focus, plot_grounding
from pipeline.tools.synthetic import COLOURS, generate
from pipeline.tools.tiny import save_tiny_vlm
from stage1_teacher.config import DumpConfig
from stage1_teacher.dump import run as dump


def test_focus_mask_puts_each_token_in_the_cell_its_centre_falls_in():
    m = focus_mask((4, 4), 2, [[0, 1]]).reshape(4, 4)  # 2x2 tokens per cell
    assert m[:2, 2:].all() and m.sum() == 4
    assert focus_mask((2, 2), 2, [[1, 0]]).tolist() == [False, False, True, False]
    m = focus_mask((3, 3), 2, [[1, 1]]).reshape(3, 3)  # centres at 1/3, 1, 5/3 board cells
    assert m.tolist() == [[False, False, False], [False, True, True], [False, True, True]]
    assert not focus_mask((4, 4), 2, []).any()


def test_mass_on_focus_by_hand():
    maps = np.array([[0.1, 0.2, 0.3, 0.4], [1, 1, 1, 1], [0, 0, 0, 0], [2, 0, 0, 2]], np.float32)
    masks = [np.array([1, 0, 0, 1], bool), None, np.array([1, 0, 0, 0], bool), np.array([0, 1, 1, 1], bool)]
    rows = mass_on_focus(maps, masks, [True, True, True, True])
    # turn 1 has no focus, turn 2 no map (all zero); turn 3's map is renormalised
    assert [(j, round(m, 6), b) for j, m, b in rows] == [(0, 0.5, 0.5), (3, 0.5, 0.75)]
    assert mass_on_focus(maps, masks, [False, True, True, True])[0][0] == 3  # a turn that cannot see the image


def test_focus_cells_are_where_the_answer_is_in_the_picture(tmp_path):
    """Independent of the generator's bookkeeping: read each focus cell's colour off the image."""
    paths = generate(tmp_path, seed=3, n_train=30, n_val=2, n_test=2, grid=2, turns=5, n_colours=4, n_shapes=4,
                     describe_fraction=0.5)
    records = json.loads(paths["train"].read_text())
    seen = set()
    for r in records:
        img = np.asarray(Image.open(tmp_path / r["image"]).convert("RGB"))
        cell = img.shape[0] // r["board_grid"]

        def colour(rc):  # the shape's colour: the most common non-background pixel of the cell
            px = img[rc[0] * cell:(rc[0] + 1) * cell, rc[1] * cell:(rc[1] + 1) * cell].reshape(-1, 3)
            px = [tuple(p) for p in px if tuple(p) != (30, 30, 30)]
            best = max(set(px), key=px.count)
            return next(name for name, rgb in COLOURS.items() if rgb == best)

        for kind, answer, cells, turn in zip(r["question_types"], r["answers"], r["focus_cells"], r["conversations"][::2]):
            seen.add(kind)
            if kind == "colour_at":
                assert len(cells) == 1 and colour(cells[0]) == answer
            elif kind == "count":
                assert len(cells) == int(answer) and all(colour(c) in turn["value"] for c in cells)
            elif kind == "exists":
                assert (answer == "yes") == bool(cells)
            elif kind == "relative":
                assert len(cells) == 2
                words = turn["value"].replace("<image>", "").split()  # "Is the <colour> <shape> left of the <colour> ..."
                assert sorted(colour(c) for c in cells) == sorted([words[2], words[-2]])
                if words[2] != words[-2]:  # two colours: which cell is which is read off the picture
                    (ra, ca), (rb, cb) = [next(c for c in cells if colour(c) == w) for w in (words[2], words[-2])]
                    assert (answer == "yes") == ((ra < rb) if "above" in turn["value"] else (ca < cb))
            elif kind == "describe":
                assert len(cells) == answer.count(".")
            else:  # shape_at, choice: the named cell
                assert len(cells) == 1
    assert seen >= {"colour_at", "count", "exists", "relative", "describe", "shape_at", "choice"}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("grounding")
    data = generate(tmp / "data", seed=0, n_train=6, n_val=1, n_test=6, grid=2, turns=3, n_colours=4, n_shapes=4)
    teacher = save_tiny_vlm(tmp / "teacher", "llava", "teacher", seed=0)
    store = tmp / "store"
    dump(from_dict(DumpConfig, {"teacher": {"path": str(teacher)}, "data": {"path": str(data["test"]), "max_length": 256},
                                "output": {"dir": str(store)}, "batch_size": 4,
                                "signals": {"top_k": 4, "calibration_samples": 6, "transitions": {"enabled": False}}}))
    return teacher, data["test"], store


def test_grounding_per_layer_equals_eager_attention_and_the_stored_maps(setup, tmp_path):
    teacher, test_json, store = setup
    result = grounding(teacher, test_json, store, limit=6, max_length=256, batch_size=4)
    chosen = result["chosen_layers"]
    assert chosen and set(result["layers"]) == set(range(2)) and set(result["irs"]) == set(range(2))
    # the stored maps (fp16) of the chosen layer give that layer's figure
    assert result["stored"]["mass"] == pytest.approx(result["layers"][chosen[0]]["mass"], abs=2e-3)

    # an independent computation: eager attention, head mean, instruction mean, normalised over V
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(teacher, attn_implementation="eager").eval()
    processor = load_processor(str(teacher))
    raws = {r["id"]: r for r in json.loads(test_json.read_text())}
    per_layer = {0: [], 1: []}
    base = []
    for rec in read_records(test_json, None, "test"):
        enc = encode(rec, processor, 256)
        raw = raws[rec.sample_id]
        with torch.no_grad():
            att = model(**enc.model_inputs, output_attentions=True).attentions
        vis = torch.as_tensor(enc.visual_positions)
        rows, cols = enc.visual_blocks[0].grid
        for j, turn in enumerate(enc.turns):
            cells = raw["focus_cells"][j]
            if not cells:
                continue
            mask = np.zeros((rows, cols), bool)
            for r, c in cells:  # 32-px board, 2x2 cells: token (i, k) lies in cell (2i // rows, 2k // cols)
                for i in range(rows):
                    for k in range(cols):
                        if 2 * i // rows == r and 2 * k // cols == c:
                            mask[i, k] = True
            mask = torch.as_tensor(mask.reshape(-1))
            base.append(float(mask.float().mean()))
            for layer in per_layer:
                m = att[layer][0].mean(0)[torch.as_tensor(turn.instruction)][:, vis].mean(0)
                per_layer[layer].append(float(m[mask].sum() / m.sum()))
    for layer, masses in per_layer.items():
        assert result["layers"][layer]["mass"] == pytest.approx(np.mean(masses), abs=1e-5)
        assert result["layers"][layer]["n_turns"] == len(masses)
    assert result["layers"][0]["uniform"] == pytest.approx(np.mean(base))

    table = format_grounding(result)
    assert f"| {chosen[0]} (chosen) |" in table and "stored maps" in table
    plot_grounding(result, tmp_path / "g.png")
    assert (tmp_path / "g.png").stat().st_size > 1000


def test_grounding_refuses_data_without_focus_cells(setup, tmp_path):
    teacher, test_json, store = setup
    records = json.loads(test_json.read_text())
    for r in records:
        r.pop("focus_cells")
    bare = test_json.parent / "bare.json"
    bare.write_text(json.dumps(records))
    with pytest.raises(ValueError, match=r"bare\.json: records without focus_cells"):
        grounding(teacher, bare, store)
