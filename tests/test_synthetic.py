"""The synthetic shapes set: deterministic by seed, answers consistent with the drawn board."""

from __future__ import annotations

import hashlib
import json
import random

import numpy as np
import pytest
from PIL import Image

from pipeline.tools.synthetic import COLOURS, QUESTION_TYPES, Item, _question, cell_names, draw_board, generate, make_board


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
        q, a, cells = _question(kind, items, 3, rng)
        at = {(it.row, it.col): it for it in items}
        if kind == "count":
            colour = q.split("How many ")[1].split(" ")[0]
            assert a == str(sum(it.colour == colour for it in items))
            assert sorted(map(tuple, cells)) == sorted((it.row, it.col) for it in items if it.colour == colour)
        elif kind == "colour_at":
            where = q.split("at the ")[1].rstrip("?")
            assert any(names[it.row][it.col] == where and it.colour == a for it in items)
            assert len(cells) == 1 and names[cells[0][0]][cells[0][1]] == where and at[tuple(cells[0])].colour == a
        elif kind == "exists":
            assert a in ("yes", "no") and (a == "yes") == bool(cells)
        elif kind == "choice":
            assert a in "ABCD"


def test_records_are_llava_format(tmp_path):
    paths = generate(tmp_path, seed=0, n_train=3, n_val=1, n_test=1, turns=3)
    rec = json.loads(paths["train"].read_text())[0]
    conv = rec["conversations"]
    assert [m["from"] for m in conv] == ["human", "gpt"] * 3
    assert conv[0]["value"].startswith("<image>\n") and all("<image>" not in m["value"] for m in conv[1:])
    assert len(rec["question_types"]) == len(rec["answers"]) == 3


def test_small_palette_and_description_turns_only_in_train(tmp_path):
    paths = generate(tmp_path, seed=1, n_train=40, n_val=5, n_test=10, grid=2, cell_px=16, turns=2,
                     n_colours=4, n_shapes=3, describe_fraction=0.5)
    train = json.loads(paths["train"].read_text())
    described = [r for r in train if r["question_types"][0] == "describe"]
    assert 5 < len(described) < 35  # about half, deterministic by seed
    for split in ("val", "test"):
        assert all("describe" not in r["question_types"] for r in json.loads(paths[split].read_text()))
    colours, shapes = set(list(COLOURS)[:4]), {"circle", "square", "triangle"}
    names = {n for row in cell_names(2) for n in row}
    for r in described:
        conv = r["conversations"]
        assert conv[0]["value"] == "<image>\nDescribe the board." and len(conv) == 2 * 3
        assert all("<image>" not in m["value"] for m in conv[1:])
        # every "cell colour shape" item of the description is drawn at that cell
        img = np.asarray(Image.open(tmp_path / r["image"]))
        for part in r["answers"][0].rstrip(".").split(". "):
            words = part.split(" ")
            where, colour, shape = " ".join(words[:-2]), words[-2], words[-1]
            assert where in names and colour in colours and shape in shapes, part
            row, col = next((i, j) for i, rw in enumerate(cell_names(2)) for j, n in enumerate(rw) if n == where)
            assert tuple(img[row * 16 + 8, col * 16 + 8]) == COLOURS[colour], (r["id"], part)
    for r in train:
        for q, a, kind in zip(r["conversations"][::2], r["answers"], r["question_types"]):
            if kind == "colour_at":
                assert a in colours
            if kind == "choice":
                assert a in "ABCD"


def test_bad_generator_settings_are_refused(tmp_path):
    with pytest.raises(ValueError, match="cannot fill 8 cells"):
        generate(tmp_path, grid=3, n_colours=2, n_shapes=2)
    with pytest.raises(ValueError, match="describe_fraction"):
        generate(tmp_path, describe_fraction=1.5)


def _boards(path, root):
    """Board arrangements of a split, read back from the pictures (one key per distinct image)."""
    return [hashlib.sha256((root / r["image"]).read_bytes()).hexdigest() for r in json.loads(path.read_text())]


def test_validation_and_test_boards_never_appear_in_an_earlier_split(tmp_path):
    # 2x2 board, 4 colours x 3 shapes: about 6k arrangements, so 600 random training boards would
    # put dozens of test boards in the training set if the splits were drawn independently.
    paths = generate(tmp_path, seed=0, n_train=600, n_val=50, n_test=200, grid=2, n_colours=4, n_shapes=3)
    train, val, test = (set(_boards(paths[s], tmp_path)) for s in ("train", "val", "test"))
    assert len(train) > 500 and len(test) > 150
    assert not train & val and not train & test and not val & test


def test_a_board_space_too_small_for_disjoint_splits_is_refused(tmp_path):
    # 2 colours x 2 shapes on a 2x2 board: 168 arrangements, all used by 2000 training boards
    with pytest.raises(ValueError, match="val: no board unseen in the earlier splits"):
        generate(tmp_path, seed=0, n_train=2000, n_val=5, n_test=5, grid=2, n_colours=2, n_shapes=2)


@pytest.mark.parametrize("n_colours", [4, 6])
def test_unshuffled_options_follow_the_palette_and_the_letter_names_the_colour(n_colours):
    rng = random.Random(2)
    palette = tuple(COLOURS)[:n_colours]
    seen_orders = set()
    for _ in range(100):
        items = make_board(rng, 2, palette, ("circle", "square", "triangle"))
        q, letter, _ = _question("choice", items, 2, rng, palette, ("circle", "square", "triangle"), shuffle_options=False)
        where = q.split("at the ")[1].split("?")[0]
        listed = q.split("? ")[1].split(" ")
        options = dict(zip([w.rstrip(".") for w in listed[0::2]], listed[1::2]))
        assert list(options) == list("ABCD")
        assert [palette.index(c) for c in options.values()] == sorted(palette.index(c) for c in options.values())
        item = next(it for it in items if cell_names(2)[it.row][it.col] == where)
        assert options[letter] == item.colour
        seen_orders.add(tuple(options.values()))
    assert (len(seen_orders) == 1) == (n_colours == 4)  # four colours: the whole palette, always one order
