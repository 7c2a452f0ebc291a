"""Reading conversation records: LLaVA-format JSON/JSONL and local Hugging Face datasets.

A LLaVA record is ``{"id", "image", "conversations": [{"from": "human", "value": "<image>\\n..."},
{"from": "gpt", "value": "..."}, ...]}``. ``image`` is a path relative to the image root, a list of
paths, or absent (text-only). ``<image>`` tags may stand anywhere in human turns; the i-th tag is
the i-th image. A leading ``{"from": "system"}`` message is allowed.

Hugging Face datasets (offline, local): a directory written by ``save_to_disk`` or an
``imagefolder`` directory (images + ``metadata.jsonl``). Rows need ``conversations`` (a list of
messages or its JSON string); images come from an ``image``/``images`` column (decoded images or
paths) or imagefolder's ``file_name``.

Reading never fails on one bad record: problems surface as :class:`SampleError` when the record is
used (``Record.load_images`` or encoding), so a caller can skip it with its reason.

Images are read under an :class:`ImagePolicy`: only regular files inside the image root (unless
allowed), at most so many bytes and pixels; anything else is skipped with its reason, never read.

Sample ids key a store, so :func:`read_records` makes them unique: the first record with an id keeps
it, and every later one is a bad record whose skip record is keyed ``<id>@<origin>``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import stat
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Iterator, Mapping

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import PipelineError

IMAGE_TAG = "<image>"

# Reasons a sample cannot be used. Short codes: they are what a store's skip table records.
MISSING_IMAGE = "missing_image"
CORRUPT_IMAGE = "corrupt_image"
IMAGE_TAG_MISMATCH = "image_tag_mismatch"
NO_RESPONSE = "no_response"
OVER_LENGTH = "over_length"
MALFORMED = "malformed_record"
TEACHER_ERROR = "teacher_error"  # the teacher's forward failed on this sample alone (Stage 1)
IMAGE_TOO_LARGE = "image_too_large"  # over data.max_image_bytes or data.max_image_pixels
IMAGE_OUTSIDE_ROOT = "image_outside_root"  # the path leaves data.image_root
REASONS = (
    MISSING_IMAGE, CORRUPT_IMAGE, IMAGE_TAG_MISMATCH, NO_RESPONSE, OVER_LENGTH, MALFORMED, TEACHER_ERROR,
    IMAGE_TOO_LARGE, IMAGE_OUTSIDE_ROOT,
)


class SampleError(Exception):
    """One sample cannot be used. ``reason`` is one of ``REASONS``; ``detail`` says exactly why.

    ``skip_id`` is the id its skip record carries in a store: the sample id, except for a record
    whose id an earlier record holds (then ``<id>@<origin>``, see :func:`claim_id`).
    """

    def __init__(self, sample_id: str, reason: str, detail: str, skip_id: str | None = None):
        if reason not in REASONS:
            raise ValueError(f"unknown sample error reason {reason!r}")
        super().__init__(f"sample {sample_id!r}: {reason}: {detail}")
        self.sample_id, self.reason, self.detail = sample_id, reason, detail
        self.skip_id = sample_id if skip_id is None else skip_id

    def __reduce__(self):
        # Rebuilt from its fields when it crosses to another process (a BadRecord handed to a Ray
        # actor): the default rebuilds an exception from its message alone, which __init__ refuses.
        return SampleError, (self.sample_id, self.reason, self.detail, self.skip_id)


class DataSourceError(PipelineError):
    """The data source as a whole is unusable (missing file, not JSON, unknown layout)."""


@dataclass(frozen=True)
class Turn:
    role: str  # "system" | "user" | "assistant"
    text: str


@dataclass(frozen=True)
class ImagePolicy:
    """What an image read may touch: the ``data.*`` keys of the same names (see DataConfig)."""

    max_image_pixels: int = 64_000_000
    max_image_bytes: int = 64 * 2**20
    allow_outside_root: bool = False

    @classmethod
    def from_settings(cls, settings: Mapping) -> "ImagePolicy":
        """The policy of a ``data`` section (a DataConfig's fields, or a store's recorded dataset
        settings); a key that a store predates takes its default."""
        return cls(**{f.name: settings[f.name] for f in fields(cls) if settings.get(f.name) is not None})


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
               (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"))


# How a file's bytes become RGB pixels (``_to_rgb``); part of the key of caches of preprocessed
# pixels, so that a change here is never served pixels decoded the old way.
IMAGE_DECODING = "exif-transposed, 16-bit scaled"


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB as the processors take it: EXIF orientation applied (a phone's portrait photo is stored
    sideways), 16-bit grey scaled to 8 bits (``convert`` would clip every value above 255 to white;
    Pillow already reduces 16-bit RGB to 8 bits itself)."""
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I", "I;16", "I;16L", "I;16B", "I;16N"):
        a = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        im = Image.fromarray(((a * 255 + 32767) // 65535).astype(np.uint8))
    return im.convert("RGB")


@dataclass
class Record:
    """One conversation with its images, as read; nothing validated beyond the structure."""

    sample_id: str
    turns: list[Turn]
    images: list[Path | Image.Image] = field(default_factory=list)
    origin: str = ""  # where it came from, for messages: "data.jsonl:12"
    image_root: Path | None = None  # image paths must stay inside it (None: not checked)
    policy: ImagePolicy = field(default_factory=ImagePolicy)

    def load(self) -> tuple[list[Image.Image], list[str]]:
        """Every image decoded as RGB, with its sha256, reading each file once.

        The hash is of the file's bytes (of the raw pixels for in-memory images). A missing file
        (or one that is not a regular file) raises SampleError(missing_image), an unreadable one
        SampleError(corrupt_image), one over the policy's limits SampleError(image_too_large), a
        path out of the image root SampleError(image_outside_root).
        """
        # Pillow's process-wide guard (a warning above MAX_IMAGE_PIXELS, an error above twice that,
        # when a file is opened) must not refuse what data.max_image_pixels allows: _check_pixels
        # is the limit.
        if Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS < self.policy.max_image_pixels:
            Image.MAX_IMAGE_PIXELS = self.policy.max_image_pixels
        images, hashes = [], []
        for i, src in enumerate(self.images):
            if isinstance(src, Image.Image):
                self._check_pixels(i, src.size, "(in-memory image)")
                try:  # a lazily decoded image (a dataset's bytes) may be truncated or not an image
                    h = hashlib.sha256(f"{src.mode}{src.size}".encode())
                    h.update(src.tobytes())
                    images.append(_to_rgb(src))
                except (OSError, SyntaxError, ValueError) as e:
                    raise SampleError(self.sample_id, CORRUPT_IMAGE, f"image {i} (in-memory) unreadable: {e}") from e
                hashes.append(h.hexdigest())
                continue
            data = self._read_image_file(i, src)
            try:
                with Image.open(io.BytesIO(data)) as im:
                    self._check_pixels(i, im.size, src)  # from the header, before decoding
                    im.load()
                    images.append(_to_rgb(im))
            except Image.DecompressionBombError as e:  # Pillow's own guard, at open: over twice its limit
                raise SampleError(self.sample_id, IMAGE_TOO_LARGE,
                                  f"image {i} is over data.max_image_pixels={self.policy.max_image_pixels}: {src}: {e}") from e
            except (UnidentifiedImageError, OSError, SyntaxError) as e:
                raise SampleError(self.sample_id, CORRUPT_IMAGE, f"image {i} unreadable: {src}: {e}") from e
            hashes.append(hashlib.sha256(data).hexdigest())
        return images, hashes

    def _check_pixels(self, i: int, size: tuple[int, int], src) -> None:
        limit = self.policy.max_image_pixels
        if size[0] * size[1] > limit:
            raise SampleError(self.sample_id, IMAGE_TOO_LARGE,
                              f"image {i} is {size[0]}x{size[1]} pixels, over data.max_image_pixels={limit}: {src}")

    def _read_image_file(self, i: int, src: Path) -> bytes:
        """The bytes of a regular file inside the image root, at most ``max_image_bytes`` of them."""
        real = src.resolve()  # `..` and symlinks resolved: the file that is read is the one checked
        if self.image_root is not None and not self.policy.allow_outside_root:
            root = self.image_root.resolve()
            if not real.is_relative_to(root):
                raise SampleError(self.sample_id, IMAGE_OUTSIDE_ROOT,
                                  f"image {i} is outside the image root {root}: {src} (resolves to {real}); "
                                  "set data.allow_outside_root: true to read it")
        limit = self.policy.max_image_bytes
        try:
            # O_NONBLOCK: a FIFO opens without waiting for a writer (and is refused below).
            fd = os.open(real, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
        except FileNotFoundError:
            raise SampleError(self.sample_id, MISSING_IMAGE, f"image {i} not found: {src}") from None
        except OSError as e:
            raise SampleError(self.sample_id, CORRUPT_IMAGE, f"image {i} unreadable: {src}: {e}") from e
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                kind = next((name for test, name in _FILE_KINDS if test(st.st_mode)), "a special file")
                raise SampleError(self.sample_id, MISSING_IMAGE, f"image {i} is {kind}, not an image file: {src}")
            if st.st_size > limit:
                raise SampleError(self.sample_id, IMAGE_TOO_LARGE,
                                  f"image {i} is {st.st_size} bytes, over data.max_image_bytes={limit}: {src}")
            f = os.fdopen(fd, "rb")
        except BaseException:
            os.close(fd)
            raise
        with f:
            try:
                data = f.read(limit + 1)  # bounded even if the file grows meanwhile
            except OSError as e:
                raise SampleError(self.sample_id, CORRUPT_IMAGE, f"image {i} unreadable: {src}: {e}") from e
        if len(data) > limit:
            raise SampleError(self.sample_id, IMAGE_TOO_LARGE, f"image {i} is over data.max_image_bytes={limit}: {src}")
        return data

    def load_images(self) -> list[Image.Image]:
        """Every image decoded as RGB (see :meth:`load`)."""
        return self.load()[0]


_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def parse_conversations(sample_id: str, conversations) -> list[Turn]:
    """LLaVA ``conversations`` to turns; structural problems raise SampleError(MALFORMED)."""
    if isinstance(conversations, str):
        try:
            conversations = json.loads(conversations)
        except json.JSONDecodeError as e:
            raise SampleError(sample_id, MALFORMED, f"conversations is not valid JSON: {e}") from e
    if not isinstance(conversations, list) or not conversations:
        raise SampleError(sample_id, MALFORMED, "conversations must be a non-empty list")
    turns = []
    for i, msg in enumerate(conversations):
        if not isinstance(msg, dict) or "from" not in msg or "value" not in msg:
            raise SampleError(sample_id, MALFORMED, f"message {i} needs 'from' and 'value'")
        role = _ROLES.get(str(msg["from"]).lower())
        if role is None:
            raise SampleError(sample_id, MALFORMED, f"message {i}: unknown speaker {msg['from']!r}")
        if not isinstance(msg["value"], str):
            raise SampleError(sample_id, MALFORMED, f"message {i}: value must be a string")
        turns.append(Turn(role, msg["value"]))
    body = turns[1:] if turns[0].role == "system" else turns
    for i, t in enumerate(body):
        expected = "user" if i % 2 == 0 else "assistant"
        if t.role != expected:
            raise SampleError(sample_id, MALFORMED, f"turn {i} is from {t.role}, expected {expected} (turns alternate)")
    return turns


def _image_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def record_id(row: Mapping, index: int, origin: str) -> str:
    """The sample id of a raw record: its ``id``, a non-empty string or an integer (read as its
    decimal string); ``row-<index>`` when it has none. Any other id is SampleError(MALFORMED),
    keyed ``@<origin>`` since the record has no usable id."""
    value = row.get("id")
    if value is None:
        return f"row-{index}"
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise SampleError(f"@{origin}", MALFORMED,
                          f"{origin}: sample id must be a string or an integer, found {type(value).__name__} {value!r}")
    if not str(value).strip():
        raise SampleError(f"@{origin}", MALFORMED, f"{origin}: empty sample id {value!r}")
    return str(value)


def record_from_llava(obj: dict, index: int, image_root: Path, origin: str, policy: ImagePolicy = ImagePolicy()) -> Record:
    if not isinstance(obj, dict):
        raise SampleError(f"row-{index}", MALFORMED, f"{origin}: record is not a JSON object")
    sample_id = record_id(obj, index, origin)
    turns = parse_conversations(sample_id, obj.get("conversations"))
    images = []
    for p in _image_list(obj.get("image", obj.get("images"))):
        if not isinstance(p, str) or not p:
            raise SampleError(sample_id, MALFORMED, f"{origin}: image entries must be non-empty paths")
        images.append(image_root / p)
    return Record(sample_id, turns, images, origin, image_root, policy)


def iter_llava_file(path: Path) -> Iterator[tuple[int, object, str]]:
    """(index, record or the SampleError of an unreadable JSONL line, origin) of a LLaVA file.

    JSON is UTF-8 (a BOM is allowed). A JSONL line that is not UTF-8 or not JSON is one bad record;
    a .json file that is not is a DataSourceError naming it."""
    if path.suffix == ".jsonl":
        with path.open("rb") as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                origin = f"{path.name}:{lineno}"
                try:
                    obj = json.loads(line.decode("utf-8-sig" if lineno == 1 else "utf-8"))
                except UnicodeDecodeError as e:
                    obj = SampleError(f"row-{lineno - 1}", MALFORMED, f"{origin}: not UTF-8 text: {e}")
                except json.JSONDecodeError as e:
                    obj = SampleError(f"row-{lineno - 1}", MALFORMED, f"{origin}: invalid JSON: {e}")
                yield lineno - 1, obj, origin
    else:
        try:
            data = json.loads(path.read_bytes().decode("utf-8-sig"))
        except UnicodeDecodeError as e:
            raise DataSourceError(f"{path}: not UTF-8 text ({e}); JSON files must be UTF-8") from e
        except json.JSONDecodeError as e:
            raise DataSourceError(f"{path}: not valid JSON ({e})") from e
        if not isinstance(data, list):
            raise DataSourceError(f"{path}: expected a JSON list of records, found {type(data).__name__}")
        for i, obj in enumerate(data):
            yield i, obj, f"{path.name}[{i}]"


def _iter_hf(path: Path, split: str) -> Iterator[tuple[int, dict, str]]:
    import datasets

    if (path / "dataset_info.json").is_file() or (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        ds = datasets.load_from_disk(str(path))
    elif any((path / m).is_file() for m in ("metadata.jsonl", "metadata.csv")):
        ds = datasets.load_dataset("imagefolder", data_dir=str(path))
    else:
        raise DataSourceError(
            f"{path}: not a dataset directory (expected save_to_disk output or an imagefolder with metadata.jsonl)"
        )
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataSourceError(f"{path}: no split {split!r}; found {sorted(ds)}")
        ds = ds[split]
    for i, row in enumerate(ds):
        yield i, row, f"{path.name}[{i}]"


def _record_from_hf(row: dict, index: int, image_root: Path, origin: str, policy: ImagePolicy = ImagePolicy()) -> Record:
    sample_id = record_id(row, index, origin)
    turns = parse_conversations(sample_id, row.get("conversations"))
    images: list[Path | Image.Image] = []
    for key in ("images", "image"):
        for v in _image_list(row.get(key)):
            if isinstance(v, Image.Image):
                images.append(v)
            elif isinstance(v, dict) and v.get("bytes") is not None:
                if len(v["bytes"]) > policy.max_image_bytes:
                    raise SampleError(sample_id, IMAGE_TOO_LARGE, f"image {len(images)}: {len(v['bytes'])} bytes in "
                                      f"{origin} > data.max_image_bytes {policy.max_image_bytes}")
                try:  # only the header is read here; Record.load decodes under its checks
                    images.append(Image.open(io.BytesIO(v["bytes"])))
                except (OSError, SyntaxError, ValueError) as e:
                    raise SampleError(sample_id, CORRUPT_IMAGE, f"image {len(images)} in {origin} unreadable: {e}") from e
            elif isinstance(v, dict) and v.get("path"):
                images.append(image_root / v["path"])
            elif isinstance(v, str) and v:
                images.append(image_root / v)
    return Record(sample_id, turns, images, origin, image_root, policy)


@dataclass
class BadRecord:
    """A record that could not even be parsed; carries its error for the caller's skip table."""

    error: SampleError


def raw_records(path: Path) -> dict[str, dict]:
    """``{id: record}`` of a LLaVA .json/.jsonl file, for the keys ``read_records`` does not keep;
    read and keyed as ``read_records`` reads them (an id's first record wins; what it reports as
    broken is left out)."""
    out: dict[str, dict] = {}
    for index, row, origin in iter_llava_file(path):
        if isinstance(row, dict):
            try:
                out.setdefault(record_id(row, index, origin), row)
            except SampleError:
                continue
    return out


def read_records(
    path: str | Path, image_root: str | Path | None = None, split: str = "train", policy: ImagePolicy = ImagePolicy()
) -> Iterator[Record | BadRecord]:
    """Yield every record of a LLaVA JSON/JSONL file or a local HF dataset directory, in order.

    Unparseable records are yielded as :class:`BadRecord` (never dropped); a duplicate sample id is
    a bad record too, since stores are keyed by id (see :func:`claim_id`). ``policy`` governs how
    the records' images are read.
    """
    path = Path(path)
    if not path.exists():
        raise DataSourceError(f"data path not found: {path}")
    root = Path(image_root) if image_root is not None else (path.parent if path.is_file() else path)
    if path.is_file():
        if path.suffix not in (".json", ".jsonl"):
            raise DataSourceError(f"{path}: expected a .json or .jsonl LLaVA file, or a dataset directory")
        rows, convert = iter_llava_file(path), record_from_llava
    else:
        rows, convert = _iter_hf(path, split), _record_from_hf
    holders: dict[str, str] = {}
    for index, obj, origin in rows:
        try:
            if isinstance(obj, SampleError):
                raise obj
            item = convert(obj, index, root, origin, policy)
        except SampleError as e:
            item = BadRecord(e)
        yield claim_id(item, origin, holders)


def claim_id(item: Record | BadRecord, origin: str, holders: dict[str, str]) -> Record | BadRecord:
    """``item`` under an id no earlier item of the data holds, and that id claimed in ``holders``
    (id -> origin of its holder).

    The first record with an id keeps it, good or bad. A later good record becomes a bad one
    (MALFORMED, naming the holder); a later bad one keeps its reason. Either is skipped under the
    key ``<id>@<origin>`` (``#n`` added should even that be taken), so every id a dump writes, stored
    or skipped, is unique across its shards: the writer and ``verify`` require it.
    """
    sid = item.sample_id if isinstance(item, Record) else item.error.skip_id
    if sid not in holders:
        holders[sid] = origin
        return item
    key = base = f"{sid}@{origin}"
    n = 1
    while key in holders:
        n += 1
        key = f"{base}#{n}"
    holders[key] = origin
    if isinstance(item, Record):
        detail = f"{origin}: duplicate sample id {sid!r}, already the id of the record at {holders[sid]}"
        return BadRecord(SampleError(sid, MALFORMED, detail, key))
    e = item.error
    return BadRecord(SampleError(e.sample_id, e.reason, e.detail, key))
