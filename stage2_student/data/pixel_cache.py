"""A persistent on-disk cache of the student's preprocessed image tensors (``data.pixel_cache_dir``).

Why: a store keeps no pixels (the student's geometry is its own), so every sample whose images are
not in a process's RAM cache pays an image read, decode, sha256 and the student's image processor.
With a dataset larger than the RAM caches that is every sample of every epoch. This cache keeps the
processor's output tensors on disk after the first time, so later epochs (and later runs of
students with the same processor) read bytes instead.

Layout: ``<root>/<fingerprint>/`` where the fingerprint (:func:`pixel_settings`) covers everything
that can change the tensors or the token count of an image: ``processor.to_dict()`` (the image
processor's resize / normalise / patching settings and processor-level geometry such as LLaVA's
``patch_size``; the chat template left out), the image processor's class (PIL and torch backends
may differ in the last bit), how files are decoded (``pipeline.data.records.IMAGE_DECODING``) and the versions of transformers, Pillow, torch and numpy. Students
whose processors differ in any of these never share a directory. Inside it:

* ``config.json``: those settings and their fingerprint (written once, atomically);
* ``seg-<time>-<pid>-<rand>.pixels``: one writer's tensors, raw bytes appended one entry after
  another (each tensor 64-byte aligned within its entry);
* ``seg-<time>-<pid>-<rand>.index.jsonl``: one JSON line per entry of that ``.pixels`` file: the
  image sha256 (as the store records it), offset, length, the tensors' names, dtypes and shapes,
  the caller's small metadata (the student's token count and grid) and a crc32.

Writers: every process appends to a segment of its own, created on its first write. No locks, no
file with two writers: DataLoader workers (forked or spawned) and concurrent runs are safe. An entry
is its bytes appended to the ``.pixels`` file, then its line appended to the ``.index.jsonl`` file:
the complete line (with its newline) is the commit. A crash between the two leaves bytes no line
points to (never read, counted in the size); a crash within the line leaves a last line without a
newline (never read). There is no fsync: a machine crash may lose bytes a committed line points
to, which is why every line carries the crc32 of its bytes and of its own description, checked on
every read.

Readers: all index files are read when the cache is opened; on a miss, the lines other processes
have committed since then are read (a miss is followed by an image decode anyway). Segments are
read in name (= creation) order and a later entry for a key replaces an earlier one, so an entry
rewritten after damage shadows the damaged one.

Damage: an entry whose line is not a valid entry, which points past the end of its ``.pixels``
file (truncated) or fails its crc32 is ignored with a warning naming the file (and the image
sha256 on a crc failure), and the caller reads and preprocesses the image again and writes a new
entry: a cache does not stop a run for what it can redo. A ``config.json`` that cannot be read or
was written for another fingerprint than its directory's name (a copied or renamed directory) is a
:class:`PixelCacheError` naming the file: entries of another processor configuration must not be
mixed in, and the directory is not ours to delete.

Size: reported when opened (entries, bytes, segments, logged at INFO). With ``max_bytes``, the
``.pixels`` files of the directory are measured before each write and an entry that would take
them past the bound is not written (logged once); nothing is evicted. Concurrent writers may each
overshoot by one entry. In RAM every process holds a small record per entry (266 bytes measured
with 20,000 entries of one layout).

Exactness: the bytes of the processor's output tensors in their own dtype and shape: what ``get``
returns is bit-identical to what was ``put``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import time
import uuid
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import PIL
import torch
import transformers

from pipeline.data.records import IMAGE_DECODING
from pipeline.errors import PipelineError
from schemas.io import atomic_write_text, fingerprint

log = logging.getLogger("stage2.data")

FORMAT = 1
CONFIG_FILE = "config.json"
DATA_SUFFIX = ".pixels"
INDEX_SUFFIX = ".index.jsonl"
_ALIGN = 64
_DTYPES = {
    str(d).removeprefix("torch."): d
    for d in (torch.float32, torch.float16, torch.bfloat16, torch.float64, torch.int64, torch.int32,
              torch.int16, torch.int8, torch.uint8, torch.bool)
}
_SHA256 = re.compile(r"[0-9a-f]{64}")


class PixelCacheError(PipelineError):
    """The pixel cache directory belongs to another processor configuration or cannot be read."""


def pixel_settings(processor) -> dict[str, Any]:
    """Everything that determines the processor's image tensors and token count (the cache's key)."""
    image_processor = type(processor.image_processor)
    return {
        "format": FORMAT,
        "processor": {k: v for k, v in processor.to_dict().items() if k != "chat_template"},
        "image_processor_class": f"{image_processor.__module__}.{image_processor.__qualname__}",
        "image_decoding": IMAGE_DECODING,
        "versions": {"transformers": transformers.__version__, "pillow": PIL.__version__,
                     "torch": torch.__version__, "numpy": np.__version__},
    }


@dataclass(frozen=True)
class _Layout:
    """What one entry's bytes hold: (name, dtype, shape, offset, nbytes) per tensor, and metadata."""

    tensors: tuple[tuple[str, torch.dtype, tuple[int, ...], int, int], ...]
    meta: dict
    text: str  # canonical JSON of the description, covered by the entry's crc32
    end: int  # where the last tensor's bytes end within the entry


@dataclass(frozen=True, slots=True)
class _Entry:
    segment: str  # file name stem
    offset: int
    nbytes: int
    crc32: int
    layout: _Layout


def _canonical(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def _describe(tensors: dict[str, torch.Tensor], meta: dict) -> tuple[dict, int]:
    """The JSON description of ``tensors`` laid out one after another (64-byte aligned) and the
    entry's length in bytes."""
    items, at = [], 0
    for name, t in tensors.items():
        items.append([name, str(t.dtype).removeprefix("torch."), list(t.shape), at])
        at += (t.numel() * t.element_size() + _ALIGN - 1) // _ALIGN * _ALIGN
    return {"tensors": items, "meta": meta}, at


def _parse_layout(desc: Any, nbytes: int) -> _Layout:
    """A checked :class:`_Layout` from an index line's description (ValueError if malformed)."""
    if not isinstance(desc, dict) or not isinstance(desc.get("tensors"), list) or not isinstance(desc.get("meta"), dict):
        raise ValueError("no tensors/meta")
    tensors, end = [], 0
    for item in desc["tensors"]:
        name, dtype, shape, at = item
        if not (isinstance(name, str) and dtype in _DTYPES and isinstance(shape, list)
                and all(isinstance(s, int) and s >= 0 for s in shape) and isinstance(at, int) and at % _ALIGN == 0):
            raise ValueError(f"bad tensor description {item!r}")
        size = int(np.prod(shape, dtype=np.int64)) * _DTYPES[dtype].itemsize
        if at + size > nbytes:
            raise ValueError(f"tensor {name!r} ends past the entry of {nbytes} bytes")
        tensors.append((name, _DTYPES[dtype], tuple(shape), at, size))
        end = max(end, at + size)
    return _Layout(tuple(tensors), desc["meta"], _canonical(desc), end)


def _payload(tensors: dict[str, torch.Tensor], nbytes: int, layout: dict) -> bytearray:
    """The entry's bytes: each tensor's raw bytes at its offset, zero padding between."""
    out = bytearray(nbytes)
    for (name, _, _, at), t in zip(layout["tensors"], tensors.values()):
        raw = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        out[at : at + raw.nbytes] = raw.tobytes()
    return out


def _crc(payload, layout_text: str) -> int:
    return zlib.crc32(layout_text.encode(), zlib.crc32(payload))


class PixelCache:
    """Image tensors by image sha256, for one processor configuration (module docstring).

    Args:
        root: the cache root (``data.pixel_cache_dir``); this processor's entries live in
            ``root/<fingerprint>/``.
        processor: the student's processor.
        max_bytes: bound of the directory's ``.pixels`` files (None: no bound).
    """

    def __init__(self, root: str | os.PathLike, processor, max_bytes: int | None = None) -> None:
        if max_bytes is not None and max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.settings = pixel_settings(processor)
        self.fingerprint = fingerprint(self.settings)
        self.dir = Path(root) / self.fingerprint
        self.max_bytes = max_bytes
        self.dir.mkdir(parents=True, exist_ok=True)
        self._check_config()
        self._entries: dict[str, _Entry] = {}
        self._layouts: dict[str, _Layout] = {}  # interned: most images share a handful of layouts
        self._consumed: dict[str, tuple[int, int]] = {}  # index file -> (bytes read, lines read)
        self._warned: set[str] = set()  # files already warned about
        self._full_logged = False
        self._reset_process_state()
        self.refresh()
        n, size, segments = self.stats()
        log.info("pixel cache %s: %d image(s), %.1f MB in %d segment(s)", self.dir, n, size / 1e6, segments)

    # ------------------------------------------------------------------ process-local state

    def _reset_process_state(self) -> None:
        self._pid = os.getpid()
        self._fds: dict[str, int] = {}  # segment -> read descriptor
        self._writer: tuple[str, int, int, int] | None = None  # (segment, data fd, index fd, data size)
        self._writing = True

    def _own_process(self) -> None:
        """Descriptors and the writer belong to the process that opened them: a forked worker starts
        its own (it never closes or writes through its parent's)."""
        if self._pid != os.getpid():
            self._reset_process_state()

    def __getstate__(self) -> dict:
        state = dict(self.__dict__)
        state.update(_pid=None, _fds={}, _writer=None)
        return state

    # ------------------------------------------------------------------ config

    def _check_config(self) -> None:
        path = self.dir / CONFIG_FILE
        if not path.exists():
            record = {"fingerprint": self.fingerprint, "settings": self.settings}
            atomic_write_text(path, json.dumps(record, indent=2, sort_keys=True, ensure_ascii=False) + "\n")
            return
        try:
            recorded = json.loads(path.read_text())["fingerprint"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise PixelCacheError(f"pixel cache config {path} cannot be read ({e}); delete {self.dir} to rebuild it") from e
        if recorded != self.fingerprint:
            raise PixelCacheError(
                f"pixel cache config {path} was written for processor fingerprint {str(recorded)[:12]}…, but its "
                f"directory is named for {self.fingerprint[:12]}… (a copied or renamed directory); its entries may "
                f"come from another processor configuration: delete {self.dir}"
            )

    # ------------------------------------------------------------------ reading

    def stats(self) -> tuple[int, int, int]:
        """(entries known to this process, bytes of the directory's .pixels files, segments)."""
        sizes = self._data_sizes()
        return len(self._entries), sum(sizes.values()), len(sizes)

    def _data_sizes(self) -> dict[str, int]:
        with os.scandir(self.dir) as it:
            return {e.name[: -len(DATA_SUFFIX)]: e.stat().st_size for e in it if e.name.endswith(DATA_SUFFIX)}

    def _data_size(self, segment: str) -> int | None:
        try:
            return os.stat(self.dir / f"{segment}{DATA_SUFFIX}").st_size
        except FileNotFoundError:
            return None

    def refresh(self) -> None:
        """Read the index lines committed since the last call, in every segment, in name order."""
        for path in sorted(self.dir.glob(f"*{INDEX_SUFFIX}")):
            done, lines = self._consumed.get(path.name, (0, 0))
            try:
                if path.stat().st_size <= done:
                    continue
                with open(path, "rb") as f:
                    f.seek(done)
                    new = f.read()
            except OSError as e:
                self._warn(path, f"cannot be read ({e}); its entries are ignored")
                continue
            complete = new[: new.rfind(b"\n") + 1]  # a line without its newline is not committed
            if not complete:
                continue
            self._consumed[path.name] = (done + len(complete), lines + complete.count(b"\n"))
            segment = path.name[: -len(INDEX_SUFFIX)]
            # Measured after its lines were read: a writer appends an entry's bytes before its line.
            self._add_lines(path, segment, complete.splitlines(), lines, self._data_size(segment))

    def _add_lines(self, path: Path, segment: str, lines: list[bytes], first_line: int, data_size: int | None) -> None:
        bad, past_end = [], 0
        for n, line in enumerate(lines, first_line + 1):
            try:
                key, entry = self._parse_line(segment, line)
            except (ValueError, TypeError, KeyError) as e:
                bad.append(f"line {n}: {e}")
                continue
            if data_size is None or entry.offset + entry.nbytes > data_size:
                past_end += 1
                continue
            self._entries[key] = entry
        if bad:
            self._warn(path, f"{len(bad)} line(s) are not valid entries and are ignored ({bad[0]})")
        if past_end:
            data = self.dir / f"{segment}{DATA_SUFFIX}"
            what = "is missing" if data_size is None else f"has {data_size} bytes"
            self._warn(data, f"{what}, short of {past_end} entry(ies) its index {path.name} points to (truncated); "
                             "those images are preprocessed again")

    def _parse_line(self, segment: str, line: bytes) -> tuple[str, _Entry]:
        rec = json.loads(line)
        key, offset, nbytes, crc = rec["key"], rec["offset"], rec["nbytes"], rec["crc32"]
        if not (isinstance(key, str) and _SHA256.fullmatch(key)):
            raise ValueError(f"key {key!r} is not a sha256")
        if not all(isinstance(x, int) and x >= 0 for x in (offset, nbytes, crc)):
            raise ValueError("offset, nbytes and crc32 must be integers >= 0")
        text = _canonical(rec["layout"])
        layout = self._layouts.get(text)
        if layout is None:
            layout = self._layouts[text] = _parse_layout(rec["layout"], nbytes)
        elif layout.end > nbytes:
            raise ValueError("tensors end past the entry")
        return key, _Entry(segment, offset, nbytes, crc, layout)

    def get(self, key: str) -> tuple[dict[str, torch.Tensor], dict] | None:
        """(tensors by name, metadata) stored for image sha256 ``key``; None if absent or damaged
        (then the caller preprocesses the image again and :meth:`put` s it)."""
        self._own_process()
        entry = self._entries.get(key)
        if entry is None:
            self.refresh()  # other processes may have written it since
            entry = self._entries.get(key)
            if entry is None:
                return None
        buffer = torch.empty(entry.nbytes, dtype=torch.uint8)
        path = self.dir / f"{entry.segment}{DATA_SUFFIX}"
        try:
            got = os.preadv(self._read_fd(entry.segment), [buffer.numpy()], entry.offset)
        except OSError as e:
            return self._damaged(key, path, f"cannot be read ({e})")
        if got != entry.nbytes:
            return self._damaged(key, path, f"ends {entry.nbytes - got} bytes short of the entry at offset {entry.offset}")
        if _crc(buffer.numpy(), entry.layout.text) != entry.crc32:
            return self._damaged(key, path, f"fails its crc32 at offset {entry.offset}")
        tensors = {name: buffer[at : at + size].view(dtype).view(shape)
                   for name, dtype, shape, at, size in entry.layout.tensors}
        return tensors, entry.layout.meta

    def _read_fd(self, segment: str) -> int:
        fd = self._fds.get(segment)
        if fd is None:
            fd = self._fds[segment] = os.open(self.dir / f"{segment}{DATA_SUFFIX}", os.O_RDONLY)
        return fd

    def _damaged(self, key: str, path: Path, why: str) -> None:
        self._entries.pop(key, None)
        self._warn(path, f"entry for image {key[:12]}… {why}; the image is preprocessed again")
        return None

    def _warn(self, path: Path, message: str) -> None:
        """Warn once per file (then debug): a damaged file should not flood the log."""
        level = logging.DEBUG if str(path) in self._warned else logging.WARNING
        self._warned.add(str(path))
        log.log(level, "pixel cache %s: %s", path, message)

    # ------------------------------------------------------------------ writing

    def put(self, key: str, tensors: dict[str, torch.Tensor], meta: dict) -> bool:
        """Append ``tensors`` and ``meta`` (JSON) under image sha256 ``key`` to this process's
        segment; False when not written (size bound reached, or writing failed: logged once)."""
        if not _SHA256.fullmatch(key):
            raise ValueError(f"pixel cache keys are image sha256 hex digests, got {key!r}")
        self._own_process()
        if not self._writing:
            return False
        desc, nbytes = _describe(tensors, meta)
        if self.max_bytes is not None and sum(self._data_sizes().values()) + nbytes > self.max_bytes:
            if not self._full_logged:
                log.info("pixel cache %s reached its bound of %.1f MB: further images are not written",
                         self.dir, self.max_bytes / 1e6)
                self._full_logged = True
            return False
        layout = _parse_layout(json.loads(_canonical(desc)), nbytes)
        payload = _payload(tensors, nbytes, desc)
        try:
            segment, data_fd, index_fd, offset = self._writer or self._open_segment()
            _write_all(data_fd, payload)
            line = {"key": key, "offset": offset, "nbytes": nbytes, "crc32": _crc(payload, layout.text), "layout": desc}
            _write_all(index_fd, (_canonical(line) + "\n").encode())
        except OSError as e:
            self._writing = False
            log.warning("pixel cache %s: writing failed (%s); this process writes no more entries", self.dir, e)
            return False
        self._writer = (segment, data_fd, index_fd, offset + nbytes)
        self._entries[key] = _Entry(segment, offset, nbytes, line["crc32"], self._layouts.setdefault(layout.text, layout))
        return True

    def _open_segment(self) -> tuple[str, int, int, int]:
        segment = f"seg-{time.time_ns():020d}-{os.getpid()}-{uuid.uuid4().hex[:8]}"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND
        data_fd = os.open(self.dir / f"{segment}{DATA_SUFFIX}", flags, 0o644)
        index_fd = os.open(self.dir / f"{segment}{INDEX_SUFFIX}", flags, 0o644)
        return segment, data_fd, index_fd, 0


def _write_all(fd: int, data) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view) :]
