"""A synthetic visual question-answering set where the answer depends on one image region.

Each image is a ``grid × grid`` board with coloured shapes in some cells. Questions (several turns
per image) ask about one named cell or about the whole board:

* ``colour_at``   "What colour is the shape at the top left?"            -> "red"          (exact match)
* ``shape_at``    "What shape is at the center?"                          -> "circle"       (exact match)
* ``count``       "How many blue shapes are there?"                       -> "2"            (exact match)
* ``exists``      "Is there a green square?"                              -> "yes" / "no"   (yes/no)
* ``relative``    "Is the red circle left of the blue star?"              -> "yes" / "no"   (yes/no)
* ``choice``      "What colour is the shape at the right? A. red B. ..."  -> "B"            (multiple choice)

A ``choice`` question lists the answer and up to three other colours, shuffled, or with
``shuffle_options=False`` in palette order (so with four colours, the whole palette in one fixed
order, like a printed answer sheet: the letter then names the colour, and a model needs no
copying from the option list).

Training records may also open with a ``describe`` turn ("Describe the board." -> every shape with
its cell, in reading order: "top left red circle. bottom right blue square."). It is a curriculum
for the teacher, not an evaluated type: it gives dense, image-dependent targets on every cell, so
a model trained from scratch starts using the image much sooner (measured in the demo's notes).

Splits use disjoint boards: a validation or test board never appears (as the same arrangement of
coloured shapes, hence the same picture) in an earlier split, so a model cannot score by recalling a
training image. Everything is a pure function of the seed. Records are LLaVA format,
with extra keys per record: ``question_types`` and ``answers`` (one per turn) for evaluation, and
``focus_cells`` (per turn, the ``[row, col]`` cells the question is about) with ``board_grid`` for
saliency grounding (``pipeline.tools.grounding``).
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 180, 60),
    "blue": (50, 80, 230),
    "yellow": (235, 215, 40),
    "purple": (150, 60, 190),
    "white": (245, 245, 245),
}
SHAPES = ("circle", "square", "triangle", "cross")
QUESTION_TYPES = ("colour_at", "shape_at", "count", "exists", "relative", "choice")
BACKGROUND = (30, 30, 30)


def cell_names(grid: int) -> list[list[str]]:
    """Human names of the cells of a square grid (2×2, 3×3: 'top left' .. 'bottom right')."""
    if grid == 2:
        return [["top left", "top right"], ["bottom left", "bottom right"]]
    if grid == 3:
        rows, cols = ["top", "", "bottom"], ["left", "", "right"]
        return [[(f"{r} {c}".strip() or "center") for c in cols] for r in rows]
    return [[f"row {r + 1} column {c + 1}" for c in range(grid)] for r in range(grid)]


@dataclass(frozen=True)
class Item:
    row: int
    col: int
    colour: str
    shape: str


def draw_board(items: list[Item], grid: int, cell_px: int) -> Image.Image:
    img = Image.new("RGB", (grid * cell_px, grid * cell_px), BACKGROUND)
    d = ImageDraw.Draw(img)
    m = max(1, cell_px // 6)
    for it in items:
        x0, y0 = it.col * cell_px + m, it.row * cell_px + m
        x1, y1 = (it.col + 1) * cell_px - m - 1, (it.row + 1) * cell_px - m - 1
        fill = COLOURS[it.colour]
        if it.shape == "circle":
            d.ellipse([x0, y0, x1, y1], fill=fill)
        elif it.shape == "square":
            d.rectangle([x0, y0, x1, y1], fill=fill)
        elif it.shape == "triangle":
            d.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
        else:  # cross
            w = max(1, (x1 - x0) // 3)
            cx, cy = (x0 + x1) // 2, (y0 + y1) // 2
            d.rectangle([cx - w // 2, y0, cx + w // 2, y1], fill=fill)
            d.rectangle([x0, cy - w // 2, x1, cy + w // 2], fill=fill)
    return img


def describe(items: list[Item], grid: int) -> str:
    """Every shape with its cell, in reading order."""
    names = cell_names(grid)
    return ". ".join(f"{names[it.row][it.col]} {it.colour} {it.shape}" for it in sorted(items, key=lambda it: (it.row, it.col))) + "."


def _question(kind: str, items: list[Item], grid: int, rng: random.Random,
              colours: tuple[str, ...] = tuple(COLOURS), shapes: tuple[str, ...] = SHAPES,
              shuffle_options: bool = True) -> tuple[str, str, list[list[int]]]:
    """(question, answer, the cells [row, col] the question is about). The cells are where a model
    should look: the named cell; the cells of the counted colour; the cells of the two shapes
    compared; for exists, the cell of the shape asked about, or none when it is absent."""
    names = cell_names(grid)
    if kind in ("colour_at", "shape_at", "choice"):
        it = rng.choice(items)
        where = names[it.row][it.col]
        cell = [[it.row, it.col]]
        if kind == "colour_at":
            return f"What colour is the shape at the {where}?", it.colour, cell
        if kind == "shape_at":
            return f"What shape is at the {where}?", it.shape, cell
        options = rng.sample([c for c in colours if c != it.colour], min(3, len(colours) - 1)) + [it.colour]
        if shuffle_options:
            rng.shuffle(options)
        else:
            options.sort(key=colours.index)
        letters = "ABCD"[: len(options)]
        listed = " ".join(f"{letters[i]}. {c}" for i, c in enumerate(options))
        return f"What colour is the shape at the {where}? {listed}", letters[options.index(it.colour)], cell
    if kind == "count":
        colour = rng.choice(sorted({it.colour for it in items}) if rng.random() < 0.8 else list(colours))
        cells = [[it.row, it.col] for it in items if it.colour == colour]
        return f"How many {colour} shapes are there?", str(len(cells)), cells
    if kind == "exists":
        if rng.random() < 0.5:
            it = rng.choice(items)
            colour, shape = it.colour, it.shape
        else:
            present = {(it.colour, it.shape) for it in items}
            absent = [(c, s) for c in colours for s in shapes if (c, s) not in present]
            colour, shape = rng.choice(absent)
        cells = [[it.row, it.col] for it in items if it.colour == colour and it.shape == shape]
        return f"Is there a {colour} {shape}?", "yes" if cells else "no", cells
    # relative: two items in different columns
    a, b = rng.sample(items, 2)
    cells = [[a.row, a.col], [b.row, b.col]]
    if a.col == b.col:
        return f"Is the {a.colour} {a.shape} above the {b.colour} {b.shape}?", "yes" if a.row < b.row else "no", cells
    return f"Is the {a.colour} {a.shape} left of the {b.colour} {b.shape}?", "yes" if a.col < b.col else "no", cells


def make_board(rng: random.Random, grid: int, colours: tuple[str, ...] = tuple(COLOURS),
               shapes: tuple[str, ...] = SHAPES) -> list[Item]:
    """Between 2 and grid²-1 shapes; no two identical (colour, shape) pairs, so questions are unambiguous."""
    cells = rng.sample([(r, c) for r in range(grid) for c in range(grid)], rng.randint(2, grid * grid - 1))
    kinds = rng.sample([(c, s) for c in colours for s in shapes], len(cells))
    return [Item(r, c, colour, shape) for (r, c), (colour, shape) in zip(cells, kinds)]


def board_key(items: list[Item]) -> tuple:
    """The arrangement of a board, independent of the order its items were drawn in."""
    return tuple(sorted((it.row, it.col, it.colour, it.shape) for it in items))


def _fresh_board(rng: random.Random, grid: int, colours, shapes, taken: set, split: str, tries: int = 10_000) -> list[Item]:
    for _ in range(tries):
        items = make_board(rng, grid, colours, shapes)
        if board_key(items) not in taken:
            return items
    raise ValueError(f"{split}: no board unseen in the earlier splits after {tries} draws; the board space of "
                     f"grid {grid}, {len(colours)} colours x {len(shapes)} shapes is too small for these split sizes")


def make_record(sample_id: str, image_rel: str, items: list[Item], grid: int, turns: int, rng: random.Random,
                colours: tuple[str, ...] = tuple(COLOURS), shapes: tuple[str, ...] = SHAPES,
                with_description: bool = False, shuffle_options: bool = True) -> dict:
    kinds = (["describe"] if with_description else []) + [rng.choice(QUESTION_TYPES) for _ in range(turns)]
    conversations, answers, focus = [], [], []
    for j, kind in enumerate(kinds):
        if kind == "describe":
            q, a, cells = "Describe the board.", describe(items, grid), [[it.row, it.col] for it in items]
        else:
            q, a, cells = _question(kind, items, grid, rng, colours, shapes, shuffle_options)
        conversations.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + q})
        conversations.append({"from": "gpt", "value": a})
        answers.append(a)
        focus.append(sorted(cells))
    return {"id": sample_id, "image": image_rel, "conversations": conversations, "question_types": kinds,
            "answers": answers, "focus_cells": focus, "board_grid": grid}


def generate(
    out_dir: str | Path,
    seed: int = 0,
    n_train: int = 400,
    n_val: int = 50,
    n_test: int = 100,
    grid: int = 3,
    cell_px: int = 16,
    turns: int = 3,
    n_colours: int = len(COLOURS),
    n_shapes: int = len(SHAPES),
    describe_fraction: float = 0.0,
    shuffle_options: bool = True,
) -> dict[str, Path]:
    """Write images and ``train.json``/``val.json``/``test.json`` under ``out_dir``; return the JSON paths.

    ``n_colours``/``n_shapes`` take the first entries of the palettes; ``describe_fraction`` of the
    training records (never validation or test) open with a ``describe`` turn.
    """
    if not 2 <= grid or not 2 <= n_colours <= len(COLOURS) or not 1 <= n_shapes <= len(SHAPES):
        raise ValueError(f"grid {grid}, n_colours {n_colours}, n_shapes {n_shapes}: need grid >= 2, "
                         f"2 <= n_colours <= {len(COLOURS)}, 1 <= n_shapes <= {len(SHAPES)}")
    if n_colours * n_shapes < grid * grid - 1:
        raise ValueError(f"{n_colours} colours x {n_shapes} shapes cannot fill {grid * grid - 1} cells "
                         "with distinct (colour, shape) pairs")
    if not 0.0 <= describe_fraction <= 1.0:
        raise ValueError(f"describe_fraction must be in [0, 1], got {describe_fraction}")
    colours, shapes = tuple(COLOURS)[:n_colours], SHAPES[:n_shapes]
    out = Path(out_dir)
    (out / "images").mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    paths = {}
    taken: set = set()  # boards of the earlier splits; later splits draw only unseen ones
    for split, n in (("train", n_train), ("val", n_val), ("test", n_test)):
        records, drawn = [], set()
        for i in range(n):
            sid = f"{split}-{i:05d}"
            items = _fresh_board(rng, grid, colours, shapes, taken, split)
            drawn.add(board_key(items))
            rel = f"images/{sid}.png"
            draw_board(items, grid, cell_px).save(out / rel)
            described = split == "train" and describe_fraction > 0 and rng.random() < describe_fraction
            records.append(make_record(sid, rel, items, grid, turns, rng, colours, shapes, described, shuffle_options))
        taken |= drawn
        paths[split] = out / f"{split}.json"
        paths[split].write_text(json.dumps(records, indent=1))
    return paths
