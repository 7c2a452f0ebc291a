"""The student's encoding of a stored sample, built from the teacher's stored token ids.

Stage 2 needs, per sample, what ``pipeline.data.encode`` gives for the *student's* processor: token
ids, labels, visual blocks, turn position sets and model inputs. Re-running the chat template and the
tokenizer for that is wasted work: a store serves only students whose tokenizer and chat template
equal the teacher's (``schemas.compat.check_compatible``), so every text token of the student's sequence is
the teacher's, in the same order. Only the visual blocks differ (a pooled grid, another geometry).
:class:`StudentEncoder` therefore ([fast path note]):

1. takes the teacher's stored ids, visual blocks and turns (Parquet index, DESIGN.md §5);
2. preprocesses each image with the student's processor *alone* (``processor(text=<image token>,
   images=[image])``), which gives its pixel tensors and what its placeholder expands to (an
   ``ImageLayout``: the visual tokens, a tiled image's separators, the blocks with their grids),
   and keeps the result in an LRU cache keyed by the image's sha256 (bounded by bytes, one per process);
3. replaces each teacher image (its blocks, and for a tiled image the separators around and
   between them) by the student's expansion, shifts the stored text positions (instruction,
   response) by the images before them, and sets ``labels[t + 1]`` for every response position t,
   which is what ``encode`` does (its labelled tokens are exactly the response positions + 1).

[fast path note] Where it applies: processors whose images are preprocessed independently of each
other, so the outputs of a multi-image sample are the per-image outputs concatenated in order
(``FAST_PATH_PROCESSORS``: LLaVA's fixed grid, the patches of Qwen2-VL, Qwen2.5-VL and Qwen3-VL
(which share one image processor), InternVL's tiles, and Idefics3's tiles, concatenated on its
per-sample image axis, see ``pipeline.modeling.batching``; LLaVA-NeXT, which pads patches across a batch, is not one of
them), and whose per-token outputs are the ids, the mask and ``mm_token_type_ids`` (built with the
processor's own ``create_mm_token_type_ids``). Any other processor is re-encoded with ``encode``
(``mode="auto"``, logged once). ``mode="check"`` runs both and refuses any difference, naming the
sample and the field; tests check equality for every family, multi-image and multi-turn records,
equal and pooled grids.

[tiled image note] A tiled image's expansion is text (e.g. ``<fake_token_around_image>
<row_1_col_1>`` or ``<img>``), then its blocks with separators between them, then text (e.g.
``</img>``). The stored blocks of image i give where its blocks were; the text before its first
block and after its last must be the student's (else the processors differ, refused by name), and
the whole span is replaced by the student's expansion. When both tile alike the separators are
equal too; when they do not, the student's blocks differ from the teacher's, and ``remap`` refuses.

Images are read (and their sha256 compared with the store's) the first time a sample is encoded in
a process, and again whenever one of its images has left the cache; a sample whose images are all
cached is not read again in that process.

With a pixel cache directory (``stage2_student.data.pixel_cache``, ``data.pixel_cache_dir``), an image
missing from the RAM cache is looked up there before it is read, and every image preprocessed is
written there. A sample whose images are all in it is not read at all, in any process or run: the
entries hold the tensors of the file whose sha256 the store records (checked when they were
written), so training sees the dumped image, and a file changed since then goes unnoticed until
its entry is gone.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, fields
from itertools import chain
from typing import Literal, get_args

import numpy as np
import torch
from transformers import (
    Idefics3Processor,
    InternVLProcessor,
    LlavaProcessor,
    Qwen2_5_VLProcessor,
    Qwen2VLProcessor,
    Qwen3VLProcessor,
)

from pipeline.data import EncodedSample, Record, SampleError, VisualBlock, encode
from pipeline.data.encode import IGNORE_INDEX, ImageLayout, TurnPositions, image_layouts, image_token
from pipeline.data.records import OVER_LENGTH
from pipeline.errors import PipelineError
from pipeline.modeling.batching import PER_SAMPLE_IMAGE_KEYS
from schemas import StoreFormatError
from schemas.signals import SampleSignals
from schemas.reader import LRUBytes
from schemas.errors import IncompatibleStudentError
from stage2_student.data.pixel_cache import PixelCache

log = logging.getLogger("stage2.data")

# Processors whose multi-image outputs are their single-image outputs concatenated ([fast path note]).
FAST_PATH_PROCESSORS = (LlavaProcessor, Qwen2VLProcessor, Qwen2_5_VLProcessor, Qwen3VLProcessor, Idefics3Processor,
                        InternVLProcessor)
# Per-token outputs the fast path builds itself; a processor returning any other one is re-encoded.
_TOKEN_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids")

EncodingMode = Literal["auto", "processor", "check"]
ENCODING_MODES = get_args(EncodingMode)


class StudentDataError(PipelineError):
    """The data (records, images) no longer matches what the store was dumped from."""


def check_image_hashes(sample_id: str, found: list[str], stored: list[str], data_path) -> None:
    """The images read now must be the ones the store was dumped from (sha256 of the file bytes)."""
    if list(found) == list(stored):
        return
    i = next((j for j, (a, b) in enumerate(zip(found, stored)) if a != b), min(len(found), len(stored)))
    now = found[i][:12] if i < len(found) else "none"
    then = stored[i][:12] if i < len(stored) else "none"
    raise StudentDataError(
        f"sample {sample_id!r}: image {i} has sha256 {now}… but the store was dumped from {then}…; the image "
        f"changed since the dump (data {data_path}); restore it or re-dump"
    )


@dataclass(frozen=True)
class StudentImage:
    """One image as the student's processor sees it: what its placeholder expands to and its input tensors."""

    layout: ImageLayout
    tensors: dict[str, torch.Tensor]  # the processor's image outputs for this image alone
    nbytes: int

    @classmethod
    def of(cls, layout: ImageLayout, tensors: dict[str, torch.Tensor]) -> StudentImage:
        return cls(layout, tensors, sum(t.numel() * t.element_size() for t in tensors.values()))

    @property
    def n_tokens(self) -> int:
        return self.layout.n_visual

    def pixel_cache_meta(self) -> dict:
        """What a pixel cache entry keeps beside the tensors."""
        return {"n_tokens": self.n_tokens, "ids": list(self.layout.ids),
                "blocks": [[o, r, c] for o, (r, c) in self.layout.blocks]}

    @staticmethod
    def layout_from_meta(meta: dict, image_token_id: int) -> ImageLayout:
        """The layout a pixel cache entry recorded (entries written before tiled images: one block)."""
        if "ids" not in meta:
            rows, cols = (int(g) for g in meta["grid"])
            return ImageLayout((image_token_id,) * int(meta["n_tokens"]), ((0, (rows, cols)),))
        return ImageLayout(tuple(int(i) for i in meta["ids"]),
                           tuple((int(o), (int(r), int(c))) for o, r, c in meta["blocks"]))


def fast_path_problem(processor) -> str | None:
    """Why the fast path cannot serve ``processor`` (None: it can)."""
    if not isinstance(processor, FAST_PATH_PROCESSORS):
        names = ", ".join(c.__name__ for c in FAST_PATH_PROCESSORS)
        return f"{type(processor).__name__} is not one of the processors the fast path supports ({names})"
    keys = processor(text="a", return_tensors="pt", add_special_tokens=False).keys()
    other = sorted(set(keys) - set(_TOKEN_KEYS))
    if other:
        return f"{type(processor).__name__} returns per-token inputs {other} that the fast path does not build"
    return None


class StudentEncoder:
    """Encodes stored samples for one student processor (holds the image cache: one per process).

    Args:
        processor: the student's processor (already checked with ``check_compatible``).
        max_length: longest student sequence; a longer one is a StudentDataError naming the sample.
        mode: ``auto`` (fast path where it applies, else ``encode``), ``processor`` (always
            ``encode``: the chat template, tokenizer and processor on every sample), ``check``
            (both, refusing any difference; for a processor family new to the fast path).
        image_cache_bytes: bound of the per-process image cache (preprocessed tensors).
        data_path: named in error messages.
        pixel_cache: the on-disk cache of preprocessed images for this processor (None: none);
            used by the fast path only.
    """

    def __init__(self, processor, max_length: int, mode: EncodingMode = "auto", image_cache_bytes: int = 256 << 20,
                 data_path=None, pixel_cache: PixelCache | None = None) -> None:
        if mode not in ENCODING_MODES:
            raise ValueError(f"encoding mode must be one of {ENCODING_MODES}, got {mode!r}")
        self.processor, self.max_length, self.data_path = processor, int(max_length), data_path
        self.problem = None if mode == "processor" else fast_path_problem(processor)
        if mode == "check" and self.problem:
            raise IncompatibleStudentError(f"encoding mode 'check' needs the fast path, but {self.problem}")
        self.fast = mode != "processor" and self.problem is None
        self.check = mode == "check"
        if mode == "auto" and self.problem:
            log.info("re-encoding every sample with the student's processor: %s", self.problem)
        if pixel_cache is not None and not self.fast:
            log.info("the pixel cache %s is not used: the processor re-encodes every sample", pixel_cache.dir)
        self.pixels = pixel_cache if self.fast else None
        self.cache = LRUBytes(image_cache_bytes)  # image sha256 -> StudentImage
        self._verified: set[str] = set()  # samples whose image files were checked against the store
        if self.fast:
            self.image_token, self.image_token_id = image_token(processor)
            keys = processor(text="a", return_tensors="pt", add_special_tokens=False).keys()
            self._token_types = "mm_token_type_ids" in keys

    def __call__(self, teacher: SampleSignals, record: Record) -> EncodedSample:
        if not self.fast:
            return self.with_processor(teacher, record)
        enc = self.from_store(teacher, record)
        if self.check:
            assert_same_encoding(enc, self.with_processor(teacher, record))
        return enc

    def _cannot_encode(self, e: SampleError) -> StudentDataError:
        return StudentDataError(f"the student's processor cannot encode {e} (data {self.data_path})")

    def with_processor(self, teacher: SampleSignals, record: Record) -> EncodedSample:
        """The old path: chat template, tokenizer and processor on the record (``pipeline.data.encode``)."""
        try:
            enc = encode(record, self.processor, self.max_length)
        except SampleError as e:
            raise self._cannot_encode(e) from e
        check_image_hashes(teacher.sample_id, enc.image_hashes, teacher.image_hashes, self.data_path)
        return enc

    def from_store(self, teacher: SampleSignals, record: Record) -> EncodedSample:
        """The fast path ([fast path note]): the teacher's ids with the images re-expanded."""
        sid = teacher.sample_id
        blocks, turns = _stored_layout(teacher)
        images = self._images(teacher, record)
        groups = _blocks_by_image(sid, blocks, len(images))
        t_ids, img_id = teacher.input_ids, self.image_token_id
        pieces, s_blocks, ends, deltas = [], [], [], []
        cursor = length = 0  # in the teacher's sequence / the student's
        for i, (group, image) in enumerate(zip(groups, images)):
            lay = image.layout
            (first, _), (last, (rows, cols)) = lay.blocks[0], lay.blocks[-1]
            before, after = lay.ids[:first], lay.ids[last + rows * cols :]  # [tiled image note]
            start, end = group[0][0] - len(before), group[-1][0] + group[-1][1] + len(after)
            if start < cursor or end > len(t_ids):
                raise StoreFormatError(f"sample {sid!r}: stored visual blocks of image {i} [{start}, {end}) "
                                       f"overlap another image or leave the sequence of {len(t_ids)} tokens")
            if any(n and not (t_ids[b : b + n] == img_id).all() for b, n in group):
                raise IncompatibleStudentError(
                    f"sample {sid!r}: image {i}: the teacher's visual tokens are not the student's image token "
                    f"{self.image_token!r} (id {img_id}); the processors differ"
                )
            if (tuple(t_ids[start : group[0][0]].tolist()) != before
                    or tuple(t_ids[end - len(after) : end].tolist()) != after):
                raise IncompatibleStudentError(
                    f"sample {sid!r}: image {i}: the tokens around the teacher's visual blocks are not the ones "
                    "the student's processor puts around an image; the processors differ"
                )
            text = t_ids[cursor:start]
            s_start = length + len(text)
            s_blocks += [VisualBlock(i, s_start + o, r * c, (r, c)) for o, (r, c) in lay.blocks]
            pieces += [text, np.asarray(lay.ids, dtype=np.int64)]
            length, cursor = s_start + len(lay.ids), end
            ends.append(cursor)
            deltas.append(len(lay.ids) - (end - start))
        ids = np.concatenate(pieces + [t_ids[cursor:]]) if groups else np.array(t_ids, dtype=np.int64)
        if len(ids) > self.max_length:
            raise self._cannot_encode(SampleError(sid, OVER_LENGTH, f"{len(ids)} tokens > max_length {self.max_length}"))

        # Stored text positions (instruction, response) of every turn at once: shifted by the
        # change in length of the visual blocks before them.
        lists = [x for turn in turns for x in turn]  # instruction 0, response 0, instruction 1, ...
        flat = np.array(list(chain.from_iterable(lists)), dtype=np.int64)
        if len(flat) and (flat.min() < 0 or flat.max() >= len(t_ids)):
            raise StoreFormatError(f"sample {sid!r}: a stored turn position lies outside the sequence of {len(t_ids)} tokens")
        if any(deltas):
            shift = np.concatenate([[0], np.cumsum(deltas, dtype=np.int64)])
            flat = flat + shift[np.searchsorted(np.asarray(ends, dtype=np.int64), flat, side="right")]
        parts, at = [], 0
        for x in lists:
            parts.append(flat[at : at + len(x)])
            at += len(x)
        s_turns = [TurnPositions(instruction=parts[2 * j], response=parts[2 * j + 1]) for j in range(len(turns))]
        labels = np.full(len(ids), IGNORE_INDEX, dtype=np.int64)
        if s_turns:
            labelled = np.concatenate([t.response for t in s_turns]) + 1
            labels[labelled] = ids[labelled]

        input_ids = torch.from_numpy(ids)[None]
        inputs = {"input_ids": input_ids, "attention_mask": torch.ones_like(input_ids)}
        if self._token_types:
            inputs["mm_token_type_ids"] = torch.tensor(self.processor.create_mm_token_type_ids([ids]), dtype=torch.int64)
        for key in (images[0].tensors if images else ()):
            inputs[key] = _join_images(key, [im.tensors[key] for im in images])
        return EncodedSample(
            sample_id=sid,
            input_ids=ids,
            labels=labels,
            visual_blocks=s_blocks,
            turns=s_turns,
            image_hashes=list(teacher.image_hashes),
            model_inputs=inputs,
        )

    def _images(self, teacher: SampleSignals, record: Record) -> list[StudentImage]:
        """The sample's images for the student, from the caches, or read, checked and preprocessed.

        Served without reading the files: a sample already read in this process whose images are
        all in the RAM cache, or any sample whose images are all in the RAM cache or the pixel cache."""
        sid, stored = teacher.sample_id, teacher.image_hashes
        cached = [self._cached(h) for h in stored]
        if (sid in self._verified or self.pixels is not None) and all(c is not None for c in cached):
            return cached
        try:
            images, hashes = record.load()
        except SampleError as e:
            raise self._cannot_encode(e) from e
        check_image_hashes(sid, hashes, stored, self.data_path)
        out = [item if item is not None else self._preprocess_and_keep(sid, h, image)
               for item, h, image in zip(cached, hashes, images)]
        self._verified.add(sid)
        return out

    def _cached(self, sha256: str) -> StudentImage | None:
        """The image from the RAM cache, else from the pixel cache (then kept in RAM too)."""
        item = self.cache.get(sha256)
        if item is None and self.pixels is not None:
            found = self.pixels.get(sha256)
            if found is not None:
                tensors, meta = found
                item = StudentImage.of(StudentImage.layout_from_meta(meta, self.image_token_id), tensors)
                self.cache.put(sha256, item, item.nbytes)
        return item

    def _preprocess_and_keep(self, sid: str, sha256: str, image) -> StudentImage:
        """Preprocess an image and keep it in the RAM cache and the pixel cache."""
        item = self._preprocess(sid, image)
        self.cache.put(sha256, item, item.nbytes)
        if self.pixels is not None:
            self.pixels.put(sha256, item.tensors, item.pixel_cache_meta())
        return item

    def _preprocess(self, sid: str, image) -> StudentImage:
        out = self.processor(text=self.image_token, images=[image], return_tensors="pt", add_special_tokens=False)
        n = int((out["input_ids"][0] == self.image_token_id).sum())
        (layout,) = image_layouts(self.processor, out, n, 1, sid)
        if layout.n_visual != n or layout.ids != tuple(out["input_ids"][0].tolist()):
            raise StoreFormatError(f"sample {sid!r}: the student's processor expands an image to {n} visual tokens "
                                   f"but its layout says {layout.n_visual} in {len(layout.ids)} tokens")
        return StudentImage.of(layout, {k: v for k, v in out.items() if k not in _TOKEN_KEYS})


def _join_images(key: str, parts: list[torch.Tensor]) -> torch.Tensor:
    """One sample's image tensor from its images' (Idefics3's per-sample image axis: concatenated
    there, each padded to the largest height and width, as its processor pads within a sample)."""
    if len(parts) == 1:
        return parts[0]
    if parts[0].ndim != PER_SAMPLE_IMAGE_KEYS.get(key):
        return torch.cat(parts)
    h, w = max(p.shape[-2] for p in parts), max(p.shape[-1] for p in parts)
    return torch.cat([torch.nn.functional.pad(p, (0, w - p.shape[-1], 0, h - p.shape[-2])) for p in parts], dim=1)


def _blocks_by_image(sid: str, blocks: list[tuple[int, int, int]], n_images: int) -> list[list[tuple[int, int]]]:
    """The stored (start, length) blocks grouped by image, images in order ([tiled image note])."""
    groups: list[list[tuple[int, int]]] = []
    for image, start, n in blocks:
        if image == len(groups):
            groups.append([])
        elif image != len(groups) - 1:
            raise StoreFormatError(f"sample {sid!r}: stored visual blocks are not in image order (image {image} "
                                   f"after image {len(groups) - 1})")
        if groups[-1] and start < groups[-1][-1][0] + groups[-1][-1][1]:
            raise StoreFormatError(f"sample {sid!r}: stored visual blocks of image {image} overlap")
        groups[-1].append((start, n))
    if len(groups) != n_images:
        raise StoreFormatError(f"sample {sid!r}: the store has visual blocks for {len(groups)} image(s), the "
                               f"sample has {n_images} image(s)")
    return groups


def _stored_layout(teacher: SampleSignals) -> tuple[list[tuple[int, int, int]], list[tuple[list, list]]]:
    """(image index, start, length) of each stored visual block and (instruction, response) of each
    stored turn; refuses, naming the sample and the key, when the index lacks them."""
    sid = teacher.sample_id
    try:
        blocks = [(int(b["image_index"]), int(b["start"]), int(b["length"])) for b in teacher.visual_blocks]
        turns = [(t["instruction"], t["response"]) for t in teacher.turns]
    except (KeyError, TypeError) as e:
        raise StoreFormatError(
            f"sample {sid!r}: the store's index lacks {e} in its visual_blocks/turns metadata; the student's "
            "sequence cannot be built from it (re-dump with this version of the pipeline)"
        ) from e
    return blocks, turns


def assert_same_encoding(fast: EncodedSample, slow: EncodedSample) -> None:
    """Refuse any difference between the fast path's encoding and ``encode``'s, naming the field."""
    where = f"sample {slow.sample_id!r}"
    for f in fields(EncodedSample):
        a, b = getattr(fast, f.name), getattr(slow, f.name)
        if f.name == "model_inputs":
            same = a.keys() == b.keys() and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)
        elif f.name == "turns":
            same = len(a) == len(b) and all(
                np.array_equal(x.instruction, y.instruction) and np.array_equal(x.response, y.response)
                and x.instruction.dtype == y.instruction.dtype and x.response.dtype == y.response.dtype
                for x, y in zip(a, b)
            )
        elif isinstance(a, np.ndarray):
            same = a.dtype == b.dtype and np.array_equal(a, b)
        else:
            same = a == b
        if not same:
            raise IncompatibleStudentError(
                f"{where}: the store fast path and the student's processor disagree on {f.name}; "
                "train with encoding 'processor' and report the processor family"
            )
