"""A record to model inputs with the position sets of DESIGN.md §2.

The model's own processor and chat template produce the token ids; this module only finds where
things are. How (see also ``[segmentation note]`` below):

1. The conversation becomes chat messages; ``<image>`` tags split a human turn into text and
   image content items, so the template puts each image where its tag was.
2. The template is rendered for the whole conversation and for every prefix of it. Prefix texts
   give the character span of each message; the assistant's label span runs from the end of the
   generation prompt to the end of its message (its end-of-turn token included, trailing
   whitespace not). Each text item of a human message is located inside that message's span, so
   instruction positions are the words of the instruction, not the role header.
3. The rendered text is tokenized once with offsets, *before* image expansion; each image
   placeholder token is then expanded to what the processor made of that image (its
   :class:`ImageLayout`: the image's visual tokens, and for a tiled image the tile separators
   between its blocks). The result must equal the processor's own ``input_ids`` token for token,
   otherwise encoding stops with an error: the processor, never this module, is the authority on ids.

[tiling note] A tiled image (Idefics3 image splitting, InternVL dynamic tiles) is several visual
blocks, one per tile and one for the global image / thumbnail (last), each a square grid of
visual tokens and each its own :class:`VisualBlock` with the image's ``image_index``. Idefics3
puts ``<fake_token_around_image><row_i_col_j>`` (``<global-img>`` for the global image) before
each block, so its blocks are the runs of the image token; InternVL puts all of an image's blocks
in one run between ``<img>`` and ``</img>``, cut into ``image_seq_length`` tokens per tile.
Saliency over an image is over all its blocks' visual tokens (``EncodedSample.visual_positions``).

[segmentation note] Requiring prefix stability (each prefix render is a prefix of the full render)
holds for ChatML, Llama, Vicuna/LLaVA-style templates. Templates that rewrite earlier turns (e.g.
ones that strip reasoning from past answers) are refused with a message instead of guessed at.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from pipeline.errors import PipelineError
from pipeline.data.records import (
    IMAGE_TAG,
    IMAGE_TAG_MISMATCH,
    NO_RESPONSE,
    OVER_LENGTH,
    Record,
    SampleError,
    Turn,
)

IGNORE_INDEX = -100


class TemplateError(PipelineError):
    """The processor's chat template or tokenizer cannot be segmented (a setup problem, not a sample's)."""


@dataclass(frozen=True)
class VisualBlock:
    """One block of visual tokens: positions ``start .. start+length-1``, row-major ``grid``. An
    image is one block, or one per tile and one for its global image when it is tiled ([tiling note])."""

    image_index: int
    start: int
    length: int
    grid: tuple[int, int]  # (rows, cols) of visual tokens; rows * cols == length


@dataclass
class TurnPositions:
    """Turn ``j``: instruction positions ``I_j`` and response positions ``R_j`` (t whose x_{t+1} is labelled)."""

    instruction: np.ndarray  # int64 positions of the human turn's text tokens
    response: np.ndarray  # int64 positions t with labels[t+1] != IGNORE_INDEX


@dataclass
class EncodedSample:
    sample_id: str
    input_ids: np.ndarray  # int64 [T]
    labels: np.ndarray  # int64 [T], IGNORE_INDEX outside assistant spans; labels[t] is the token at t
    visual_blocks: list[VisualBlock]
    turns: list[TurnPositions]
    image_hashes: list[str]
    model_inputs: dict[str, Any] = field(repr=False)  # processor output, batch of one (tensors)

    @property
    def length(self) -> int:
        return int(self.input_ids.shape[0])

    @property
    def visual_positions(self) -> np.ndarray:
        if not self.visual_blocks:
            return np.zeros(0, dtype=np.int64)
        return np.concatenate([np.arange(b.start, b.start + b.length) for b in self.visual_blocks])

    @property
    def instruction_positions(self) -> np.ndarray:
        return np.concatenate([t.instruction for t in self.turns]) if self.turns else np.zeros(0, np.int64)

    @property
    def response_positions(self) -> np.ndarray:
        return np.concatenate([t.response for t in self.turns]) if self.turns else np.zeros(0, np.int64)


def check_image_tags(record: Record) -> None:
    """SampleError(image_tag_mismatch) unless the ``<image>`` tags stand in human turns only and
    there is one per image."""
    n_tags = sum(t.text.count(IMAGE_TAG) for t in record.turns if t.role == "user")
    if any(IMAGE_TAG in t.text for t in record.turns if t.role != "user"):
        raise SampleError(record.sample_id, IMAGE_TAG_MISMATCH, "<image> tag outside a human turn")
    if n_tags != len(record.images):
        raise SampleError(
            record.sample_id,
            IMAGE_TAG_MISMATCH,
            f"{n_tags} <image> tag(s) but {len(record.images)} image(s)",
        )


def message(turn: Turn) -> dict:
    """One chat message with content items: each ``<image>`` tag of a human turn becomes an image item."""
    if turn.role == "assistant":
        return {"role": "assistant", "content": [{"type": "text", "text": turn.text}]}
    content: list[dict] = []
    for i, piece in enumerate(turn.text.split(IMAGE_TAG)):
        if i:
            content.append({"type": "image"})
        if piece:
            content.append({"type": "text", "text": piece})
    return {"role": turn.role, "content": content}


def to_messages(record: Record) -> list[dict]:
    """Chat messages with content items; checks that ``<image>`` tags match the images and that
    there is a non-empty answer."""
    check_image_tags(record)
    for t in record.turns:
        if t.role == "assistant" and not t.text.strip():
            raise SampleError(record.sample_id, NO_RESPONSE, "empty assistant response")
    if not any(t.role == "assistant" for t in record.turns):
        raise SampleError(record.sample_id, NO_RESPONSE, "no assistant turn")
    return [message(t) for t in record.turns]


def _render(processor, messages: list[dict], generation_prompt: bool = False) -> str:
    if not messages:
        return ""
    return processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)


def image_token(processor) -> tuple[str, int]:
    token = getattr(processor, "image_token", None)
    if token is None:
        raise TemplateError(f"{type(processor).__name__} has no image_token; unsupported processor")
    return token, processor.tokenizer.convert_tokens_to_ids(token)


@dataclass(frozen=True)
class ImageLayout:
    """What one image placeholder becomes: ``ids``, its visual tokens (and for a tiled image the
    separators between its blocks), and its visual blocks as (offset into ``ids``, (rows, cols))."""

    ids: tuple[int, ...]
    blocks: tuple[tuple[int, tuple[int, int]], ...]

    @property
    def n_visual(self) -> int:
        return sum(r * c for _, (r, c) in self.blocks)


def image_layouts(processor, inputs, n_visual: int, n_images: int, sample_id: str) -> list[ImageLayout]:
    """Per image, its :class:`ImageLayout`, from the processor's outputs (``inputs``: a batch of one)."""
    if n_images == 0:
        return []
    tiled = next((f for attrs, f in _TILED_LAYOUTS if all(getattr(processor, a, None) is not None for a in attrs)), None)
    if tiled is None:  # one block per image, the image token repeated
        _, img_id = image_token(processor)
        grids = visual_grids(processor, inputs, n_visual, n_images, sample_id)
        return [ImageLayout((img_id,) * (r * c), ((0, (r, c)),)) for r, c in grids]
    layouts = tiled(processor, inputs["input_ids"][0].tolist(), sample_id)
    if len(layouts) != n_images:
        raise TemplateError(f"sample {sample_id!r}: {n_images} image(s) but {len(layouts)} tiled image expansion(s)")
    return layouts


def _runs(ids: list[int], token: int) -> list[tuple[int, int]]:
    """[start, end) of each maximal run of ``token`` in ``ids``."""
    out, start = [], None
    for i, t in enumerate([*ids, None]):
        if t == token and start is None:
            start = i
        elif t != token and start is not None:
            out.append((start, i))
            start = None
    return out


def _square(n: int, per_tile: int, what: str, sample_id: str) -> tuple[int, int]:
    side = math.isqrt(n)
    if n != per_tile or side * side != n:
        raise TemplateError(f"sample {sample_id!r}: a {what} of {n} visual tokens; expected a square grid of "
                            f"{per_tile}; this processor's visual layout is not supported")
    return side, side


def _idefics3_layouts(processor, ids: list[int], sample_id: str) -> list[ImageLayout]:
    """Idefics3: each block is a run of the image token after ``<fake_token_around_image>`` and a
    ``<row_i_col_j>`` tag (a tile) or ``<global-img>`` (the global image, which ends the image)."""
    around, glob = processor.fake_image_token_id, processor.global_image_token_id
    tags = set(processor.row_col_ids)
    layouts, tiles = [], []
    for a, b in _runs(ids, processor.image_token_id):
        if a < 2 or ids[a - 2] != around or (ids[a - 1] != glob and ids[a - 1] not in tags):
            raise TemplateError(f"sample {sample_id!r}: an image block at {a} is not preceded by "
                                "<fake_token_around_image> and a tile tag; this processor's layout is not supported")
        tiles.append((a, b))
        if ids[a - 1] == glob:
            start, end = tiles[0][0] - 2, b + 1
            if end > len(ids) or ids[end - 1] != around:
                raise TemplateError(f"sample {sample_id!r}: the global image block ending at {b} is not closed by "
                                    "<fake_token_around_image>")
            blocks = tuple((s - start, _square(e - s, processor.image_seq_len, "tile", sample_id)) for s, e in tiles)
            layouts.append(ImageLayout(tuple(ids[start:end]), blocks))
            tiles = []
    if tiles:
        raise TemplateError(f"sample {sample_id!r}: image tiles without a global image")
    return layouts


def _internvl_layouts(processor, ids: list[int], sample_id: str) -> list[ImageLayout]:
    """InternVL: one run of the context token per image between ``<img>`` and ``</img>``, made of
    ``image_seq_length`` tokens per tile (tiles first, the thumbnail last)."""
    per_tile = int(processor.image_seq_length)
    layouts = []
    for a, b in _runs(ids, processor.image_token_id):
        if a < 1 or b >= len(ids) or ids[a - 1] != processor.start_image_token_id or ids[b] != processor.end_image_token_id:
            raise TemplateError(f"sample {sample_id!r}: the image tokens at {a}..{b - 1} are not between "
                                f"{processor.start_image_token} and {processor.end_image_token}")
        if (b - a) % per_tile:
            raise TemplateError(f"sample {sample_id!r}: {b - a} image tokens are not whole tiles of {per_tile}")
        grid = _square(per_tile, per_tile, "tile", sample_id)
        blocks = tuple((1 + k * per_tile, grid) for k in range((b - a) // per_tile))
        layouts.append(ImageLayout(tuple(ids[a - 1 : b + 1]), blocks))
    return layouts


# Tiled layouts ([tiling note]), recognised by the processor attributes they are read from.
_TILED_LAYOUTS = (
    (("fake_image_token_id", "global_image_token_id", "row_col_ids", "image_seq_len"), _idefics3_layouts),
    (("start_image_token_id", "end_image_token_id", "image_seq_length"), _internvl_layouts),
)


def visual_grids(processor, inputs, counts_total: int, n_images: int, sample_id: str) -> list[tuple[int, int]]:
    """Per-image (rows, cols) of visual tokens, from the processor's outputs (one block per image)."""
    if n_images == 0:
        return []
    if "image_grid_thw" in inputs:  # Qwen2-VL family: patches merged merge×merge
        merge = int(processor.image_processor.merge_size)
        grids = []
        for t, h, w in inputs["image_grid_thw"].tolist():
            if t != 1:
                raise TemplateError(f"sample {sample_id!r}: temporal grid {t} for an image; expected 1")
            grids.append((h // merge, w // merge))
        return grids
    # Fixed-grid family (LLaVA): every image has the same square grid.
    per_image, rem = divmod(counts_total, n_images)
    side = math.isqrt(per_image)
    if rem or side * side != per_image:
        raise TemplateError(
            f"sample {sample_id!r}: {counts_total} visual tokens for {n_images} image(s) is not a square grid "
            "per image; this processor's visual layout is not supported"
        )
    return [(side, side)] * n_images


def special_token_ids(tok) -> np.ndarray:
    """Ids of every special token: the named ones and added tokens flagged special (vision markers)."""
    ids = set(tok.all_special_ids) | {i for i, t in tok.added_tokens_decoder.items() if t.special}
    return np.asarray(sorted(ids), dtype=np.int64)


def _locate(haystack: str, needle: str, start: int, end: int) -> tuple[int, int] | None:
    """Span of ``needle`` (stripped) in ``haystack[start:end]``; None if the template altered it."""
    needle = needle.strip()
    if not needle:
        return None
    pos = haystack.find(needle, start, end)
    return (pos, pos + len(needle)) if pos >= 0 else None


def encode(record: Record, processor, max_length: int) -> EncodedSample:
    """Tokenize ``record`` with ``processor`` and find its position sets (DESIGN.md §2).

    Raises SampleError for a bad sample (its reason says which), TemplateError for a processor
    whose chat template cannot be segmented.
    """
    messages = to_messages(record)
    images, hashes = record.load()
    tok = processor.tokenizer

    full = _render(processor, messages)
    bounds = []  # character end of each message in `full`
    for k in range(1, len(messages) + 1):
        prefix = _render(processor, messages[:k])
        if not full.startswith(prefix):
            raise TemplateError("chat template is not prefix-stable: rendering a conversation prefix changed earlier text")
        bounds.append(len(prefix))

    # Character spans of instruction words (per user turn) and of labels (per assistant turn).
    instr_spans: list[list[tuple[int, int]]] = []
    label_spans: list[tuple[int, int]] = []
    start = 0
    for k, msg in enumerate(messages):
        end = bounds[k]
        if msg["role"] == "user":
            spans, cursor = [], start
            for item in msg["content"]:
                if item["type"] != "text":
                    continue
                span = _locate(full, item["text"], cursor, end)
                if span is None and item["text"].strip():
                    raise TemplateError(f"instruction text of sample {record.sample_id!r} not found verbatim in the rendered template")
                if span is not None:
                    spans.append(span)
                    cursor = span[1]
            instr_spans.append(spans)
        elif msg["role"] == "assistant":
            gen = _render(processor, messages[:k], generation_prompt=True)
            if not full.startswith(gen) or len(gen) > end:
                raise TemplateError("generation prompt is not a prefix of the assistant turn")
            label_end = len(full[:end].rstrip())
            label_spans.append((len(gen), label_end))
        start = end

    # Tokenize unexpanded text with offsets, then expand image placeholders.
    enc = tok(full, add_special_tokens=False, return_offsets_mapping=True)
    raw_ids, offsets = enc["input_ids"], enc["offset_mapping"]
    img_token, img_id = image_token(processor)
    inputs = processor(text=full, images=images or None, return_tensors="pt", add_special_tokens=False)
    proc_ids = inputs["input_ids"][0].numpy().astype(np.int64)
    n_visual = int((proc_ids == img_id).sum())
    layouts = image_layouts(processor, inputs, n_visual, len(images), record.sample_id)
    counted = sum(lay.n_visual for lay in layouts)
    if counted != n_visual or sum(1 for i in raw_ids if i == img_id) != len(images):
        raise TemplateError(
            f"sample {record.sample_id!r}: {len(images)} image placeholder(s) expand to {n_visual} visual tokens, "
            f"grids say {counted}"
        )

    ids: list[int] = []
    char_of: list[tuple[int, int]] = []
    blocks: list[VisualBlock] = []
    n_seen = 0
    for tid, off in zip(raw_ids, offsets):
        if tid == img_id:
            lay, base = layouts[n_seen], len(ids)
            blocks.extend(VisualBlock(n_seen, base + o, r * c, (r, c)) for o, (r, c) in lay.blocks)
            ids.extend(lay.ids)
            char_of.extend([(-1, -1)] * len(lay.ids))
            n_seen += 1
        else:
            ids.append(tid)
            char_of.append(tuple(off))
    input_ids = np.asarray(ids, dtype=np.int64)
    if input_ids.shape != proc_ids.shape or not np.array_equal(input_ids, proc_ids):
        raise TemplateError(
            f"sample {record.sample_id!r}: segmentation does not reproduce the processor's input_ids "
            f"({len(input_ids)} vs {len(proc_ids)} tokens)"
        )
    if len(input_ids) > max_length:
        raise SampleError(record.sample_id, OVER_LENGTH, f"{len(input_ids)} tokens > max_length {max_length}")

    starts = np.array([c[0] for c in char_of], dtype=np.int64)
    ends = np.array([c[1] for c in char_of], dtype=np.int64)
    special = np.isin(input_ids, special_token_ids(tok)) | (starts < 0)

    def covered(spans: list[tuple[int, int]]) -> np.ndarray:
        hit = np.zeros(len(input_ids), dtype=bool)
        for a, b in spans:  # a token belongs to a span when their character ranges overlap
            hit |= (starts < b) & (ends > a)
        return hit

    labels = np.full(len(input_ids), IGNORE_INDEX, dtype=np.int64)
    turns = []
    for j, (ispans, lspan) in enumerate(zip(instr_spans, label_spans)):
        instr = np.flatnonzero(covered(ispans) & ~special)
        lab = np.flatnonzero(covered([lspan]) & (starts >= 0))
        if lab.size == 0:
            raise SampleError(record.sample_id, NO_RESPONSE, f"turn {j}: response has no tokens")
        labels[lab] = input_ids[lab]
        turns.append(TurnPositions(instruction=instr.astype(np.int64), response=(lab - 1).astype(np.int64)))
    # A trailing human turn without an answer has no response; zip leaves it out of `turns`.

    return EncodedSample(
        sample_id=record.sample_id,
        input_ids=input_ids,
        labels=labels,
        visual_blocks=blocks,
        turns=turns,
        image_hashes=hashes,
        model_inputs=dict(inputs),
    )
