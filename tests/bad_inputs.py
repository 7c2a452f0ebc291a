"""Bad inputs next to good ones, written into a directory: the fixture set of the robustness tests.

``write_bad_inputs(root)`` writes a JSONL data file with its images (``root/images``, the image
root) and every other file its cases need (a FIFO, symlinks out of the image root, a non-UTF-8
.json) and returns a :class:`BadInputs`: the paths, the config overrides the set needs, what each
record must become in every command (``expected``) and the inputs a command must refuse as a whole
(``refusals``).

To add a case, write ``def _case(b: Builder) -> None`` that writes its files with ``b.image(...)``
(or directly under ``b.root``) and adds its records with ``b.record(...)`` / ``b.line(...)``, or a
refusal with ``b.refuse(...)``, and list it in ``CASES`` (before ``_duplicate_across_shards``,
which must stay last). A case that damages something other than the data (a teacher config, a
store chunk) can keep its files and its refusal in the same way.
"""

from __future__ import annotations

import json
import os
import struct
import zlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np
from PIL import Image

DATA_NAME = "data.jsonl"
MALFORMED, MISSING, TOO_LARGE, OUTSIDE = "malformed_record", "missing_image", "image_too_large", "image_outside_root"
QUESTIONS = ("What is shown?", "How many shapes are there?", "Which colour is at the top?")
_UNSET = object()


@dataclass
class Expected:
    """What every command must make of one record of the data file."""

    sample_id: str  # as data-check reports it
    reason: str | None  # None: usable (stored by teacher-dump, trained on by distill)
    skip_id: str | None = None  # the id of its skip record in a store; None: its sample_id
    detail: str = ""  # a part of its detail, e.g. the file or the earlier record it names
    line: int = 0  # its line in the data file

    @property
    def store_id(self) -> str:
        return self.sample_id if self.skip_id is None else self.skip_id


@dataclass
class Refusal:
    """An input that a command must refuse as a whole, with a clear error naming it."""

    path: Path
    message: str  # a part of the error


@dataclass
class BadInputs:
    root: Path
    data: Path  # the JSONL data file
    image_root: Path
    overrides: dict[str, object]  # data.* settings the set is meant to run with
    expected: list[Expected]
    refusals: dict[str, Refusal]

    @property
    def good(self) -> list[Expected]:
        return [e for e in self.expected if e.reason is None]

    @property
    def bad(self) -> list[Expected]:
        return [e for e in self.expected if e.reason is not None]


@dataclass
class Builder:
    root: Path
    lines: list[bytes] = field(default_factory=list)
    expected: list[Expected] = field(default_factory=list)
    refusals: dict[str, Refusal] = field(default_factory=dict)
    overrides: dict[str, object] = field(default_factory=dict)

    @property
    def images(self) -> Path:
        return self.root / "images"

    @property
    def next_origin(self) -> str:
        """Where the next record stands, as the data layer names it."""
        return f"{DATA_NAME}:{len(self.lines) + 1}"

    def image(self, name: str, h: int = 32, w: int = 32, seed: int = 0) -> str:
        """A small random RGB PNG under the image root; its path relative to it."""
        path = self.images / name
        path.parent.mkdir(parents=True, exist_ok=True)
        rng = np.random.default_rng(seed)
        Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
        return name

    def record(self, sample_id: str, image=None, *, reason: str | None = None, detail: str = "",
               skip_id: str | None = None, raw_id=_UNSET) -> None:
        """One LLaVA record: a question (about its images, if any) and an answer. ``raw_id`` is the
        ``id`` written to the file when it is not ``sample_id``."""
        images = [] if image is None else image if isinstance(image, list) else [image]
        obj = {"id": sample_id if raw_id is _UNSET else raw_id}
        if images:
            obj["image"] = image
        tags = "".join("<image>\n" for _ in images)
        question = QUESTIONS[len(self.lines) % len(QUESTIONS)]  # varied: calibration pairs differ in instruction
        obj["conversations"] = [{"from": "human", "value": f"{tags}{question}"}, {"from": "gpt", "value": "shapes"}]
        self.line(json.dumps(obj).encode(), sample_id, reason, detail, skip_id)

    def line(self, raw: bytes, sample_id: str, reason: str | None, detail: str = "", skip_id: str | None = None) -> None:
        """One line of the data file, as bytes."""
        self.lines.append(raw)
        self.expected.append(Expected(sample_id, reason, skip_id, detail, len(self.lines)))

    def refuse(self, name: str, path: Path, message: str) -> None:
        self.refusals[name] = Refusal(path, message)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose header declares ``width x height`` RGB pixels, with almost no pixel data: a
    decompression bomb's header, without the bytes it would expand to."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 64)) + chunk(b"IEND", b"")


def gray16_png(path: Path, value: int = 32768, size: int = 32) -> None:
    """A 16-bit greyscale PNG of one value (8-bit equivalent: value / 257)."""
    Image.fromarray(np.full((size, size), value, dtype=np.uint16)).save(path)


def exif_rotated_jpeg(path: Path, w: int = 48, h: int = 32) -> None:
    """A ``w x h`` JPEG whose EXIF orientation (6: rotate 90 degrees clockwise) makes it ``h x w``."""
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(np.random.default_rng(5).integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path, exif=exif)


# ---------------------------------------------------------------------------------------------- cases


def _duplicate_in_one_shard(b: Builder) -> None:
    """First in the file: the original and its duplicate fall in the first shard."""
    b.record("dup", b.image("dup.png", seed=1))
    b.record("dup", b.image("dup2.png", seed=2), reason=MALFORMED, skip_id=f"dup@{b.next_origin}",
             detail=f"already the id of the record at {DATA_NAME}:1")


def _good_records(b: Builder) -> None:
    b.record("good-0", b.image("g0.png", seed=10))
    b.record("good-1", b.image("g1.png", 32, 48, seed=11))
    b.record("good-text", None)
    b.record("good-two", [b.image("g2.png", seed=12), b.image("sub/g3.png", seed=13)])
    b.record("good-dotdot-inside", "sub/../g0.png")  # `..` that stays inside the image root


def _image_bombs(b: Builder) -> None:
    (b.images / "bomb.png").write_bytes(png_header_only(20000, 20000))  # over Pillow's own guard too
    b.record("bomb", "bomb.png", reason=TOO_LARGE, detail="bomb.png")
    (b.images / "big-header.png").write_bytes(png_header_only(9000, 9000))  # under Pillow's guard
    b.record("big-header", "big-header.png", reason=TOO_LARGE, detail="data.max_image_pixels")


def _big_file(b: Builder) -> None:
    b.overrides["data.max_image_bytes"] = 100_000
    b.record("big-file", b.image("big.png", 256, 256, seed=3), reason=TOO_LARGE, detail="data.max_image_bytes")


def _special_files(b: Builder) -> None:
    b.record("dev-zero", "/dev/zero", reason=OUTSIDE, detail="/dev/zero")
    os.symlink("/dev/zero", b.images / "zero.png")
    b.record("dev-zero-link", "zero.png", reason=OUTSIDE, detail="zero.png")
    os.mkfifo(b.images / "fifo.png")
    b.record("fifo", "fifo.png", reason=MISSING, detail="a FIFO")
    (b.images / "adir.png").mkdir()
    b.record("directory", "adir.png", reason=MISSING, detail="a directory")


def _escaping_paths(b: Builder) -> None:
    outside = b.root / "outside" / "real.png"
    outside.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.zeros((32, 32, 3), dtype=np.uint8)).save(outside)
    b.record("dotdot", "../outside/real.png", reason=OUTSIDE, detail="data.allow_outside_root")
    b.record("absolute", str(outside), reason=OUTSIDE, detail=str(outside))
    os.symlink("../outside/real.png", b.images / "link.png")
    b.record("symlink-out", "link.png", reason=OUTSIDE, detail="link.png")


def _bad_lines(b: Builder) -> None:
    n = len(b.lines) + 1
    latin1 = '{"id": "latin1", "conversations": [{"from": "human", "value": "caf\xe9?"}, {"from": "gpt", "value": "A"}]}'
    b.line(latin1.encode("latin-1"), f"row-{n - 1}", MALFORMED, f"{DATA_NAME}:{n}: not UTF-8")
    b.line(b'{"id": "broken", "conversations": [', f"row-{n}", MALFORMED, f"{DATA_NAME}:{n + 1}: invalid JSON")
    b.record("good-after-bad-lines", b.image("g4.png", seed=14))


def _bad_ids(b: Builder) -> None:
    b.record(f"@{b.next_origin}", b.image("g5.png", seed=15), raw_id="", reason=MALFORMED, detail="empty sample id")
    b.record(f"@{b.next_origin}", "g5.png", raw_id=1.5, reason=MALFORMED, detail="must be a string or an integer, found float")
    b.record("7", "g5.png", raw_id=7)  # an integer id is its decimal string
    b.record("7", "g5.png", reason=MALFORMED, skip_id=f"7@{b.next_origin}", detail="already the id of the record at")
    b.record(f"row-{len(b.lines)}", "g5.png", raw_id=None)  # null: no id, as if absent


def _decoded_right(b: Builder) -> None:
    gray16_png(b.images / "gray16.png")
    b.record("gray16", "gray16.png")
    exif_rotated_jpeg(b.images / "exif.jpg")
    b.record("exif-rotated", "exif.jpg")


def _non_utf8_json(b: Builder) -> None:
    path = b.root / "latin1.json"
    path.write_bytes('[{"id": "x", "conversations": [{"from": "human", "value": "caf\xe9"}]}]'.encode("latin-1"))
    b.refuse("non_utf8_json", path, "not UTF-8")


def _duplicate_across_shards(b: Builder) -> None:
    """Last in the file: the duplicate of the first record falls in a later shard."""
    b.record("dup", "g0.png", reason=MALFORMED, skip_id=f"dup@{b.next_origin}",
             detail=f"already the id of the record at {DATA_NAME}:1")


CASES: list[Callable[[Builder], None]] = [
    _duplicate_in_one_shard,
    _good_records,
    _image_bombs,
    _big_file,
    _special_files,
    _escaping_paths,
    _bad_lines,
    _bad_ids,
    _decoded_right,
    _non_utf8_json,
    _duplicate_across_shards,
]


def write_bad_inputs(root: Path) -> BadInputs:
    b = Builder(Path(root))
    b.images.mkdir(parents=True, exist_ok=True)
    for case in CASES:
        case(b)
    data = b.root / DATA_NAME
    data.write_bytes(b"".join(line + b"\n" for line in b.lines))
    overrides = {"data.image_root": str(b.images), **b.overrides}
    return BadInputs(b.root, data, b.images, overrides, b.expected, b.refusals)
