"""The synthetic shapes set: deterministic by seed, answers consistent with the drawn board."""

from __future__ import annotations

import json
import random

import numpy as np
from PIL import Image

from pipeline.synthetic import COLOURS, QUESTION_TYPES, Item, _question, cell_names, draw_board, generate, make_board


def test_deterministic_by_seed(tmp_path):
    a = generate(tmp_path / "a", seed=3, n_train=5, n_val=2, n_test=2)
    b = generate(tmp_path / "b", seed=3, n_train=5, n_val=2, n_test=2)
    for split in a:
        assert a[split].read_text() == b[split].read_text()
    img_a = np.asarray(Image.open(tmp_path / "a" / "images" / "train-00000.png"))
    img_b = np.asarray(Image.open(tmp_path / "b" / "images" / "train-00000.png"))
    assert np.array_equal(img_a, img_b)
    c = generate(tmp_path / "c", seed=4, n_train=5, n_val=2, n_test=2)
    assert c["train"].read_text() != a["train"].read_text()


def test_drawn_colour_is_at_the_named_cell():
    items = [Item(0, 0, "red", "square"), Item(2, 2, "blue", "circle")]
    img = np.asarray(draw_board(items, 3, 16))
    assert tuple(img[8, 8]) == COLOURS["red"] and tuple(img[40, 40]) == COLOURS["blue"]
    assert tuple(img[24, 24]) != COLOURS["red"]  # empty center


def test_answers_follow_the_board():
    rng = random.Random(0)
    names = cell_names(3)
    for _ in range(200):
        items = make_board(rng, 3)
        kind = rng.choice(QUESTION_TYPES)
        q, a = _question(kind, items, 3, rng)
        if kind == "count":
            colour = q.split("How many ")[1].split(" ")[0]
            assert a == str(sum(it.colour == colour for it in items))
        elif kind == "colour_at":
            where = q.split("at the ")[1].rstrip("?")
            assert any(names[it.row][it.col] == where and it.colour == a for it in items)
        elif kind == "exists":
            assert a in ("yes", "no")
        elif kind == "choice":
            assert a in "ABCD"


def test_records_are_llava_format(tmp_path):
    paths = generate(tmp_path, seed=0, n_train=3, n_val=1, n_test=1, turns=3)
    rec = json.loads(paths["train"].read_text())[0]
    conv = rec["conversations"]
    assert [m["from"] for m in conv] == ["human", "gpt"] * 3
    assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in m["value"] for m in conv[1:])
    assert len(rec["question_types"]) == len(rec["answers"]) == 3
