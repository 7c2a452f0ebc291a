"""Bytes on disk: canonical JSON, content hashes, atomic writes (the one atomic writer of the product).

Every file the product writes that a crash must not leave half-written (manifests, settings,
configs, reports, checkpoint pointers) goes through :func:`atomic_write_text`.
"""

from __future__ import annotations

import hashlib
import json
import os
import uuid
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

from schemas.errors import PipelineError


def fingerprint(obj: Any) -> str:
    """sha256 hex of the canonical JSON of `obj` (sorted keys, no whitespace, UTF-8, no NaN)."""
    text = json.dumps(obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False,
                      allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def file_sha256(path: str | os.PathLike) -> str:
    """sha256 hex of a file's bytes, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write_text(path: Path, text: str) -> None:
    """Write `text` to `path` via a temporary file + fsync + os.replace, then fsync the dir."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    _fsync_path(path.parent)


def _dumps(obj: Any) -> str:
    return json.dumps(obj, sort_keys=True, indent=2, ensure_ascii=False, allow_nan=False) + "\n"


@contextmanager
def writing(what: str) -> Iterator[None]:
    """Turn an ``OSError`` raised inside (disk full, a read-only file system, a path under a
    regular file) into a ``PipelineError`` that names ``what`` was being written and the path."""
    try:
        yield
    except OSError as e:
        path = f" {e.filename}" if e.filename else ""
        raise PipelineError(f"{what}: cannot write{path}: {e.strerror or e}") from e


def settings_diff(a: dict, b: dict, a_name: str, b_name: str, prefix: str = "") -> list[str]:
    """``key: <a_name> has X, <b_name> has Y`` for every dotted key whose value differs."""
    out = []
    for k in sorted(set(a) | set(b)):
        key = f"{prefix}{k}"
        if isinstance(a.get(k), dict) and isinstance(b.get(k), dict):
            out += settings_diff(a[k], b[k], a_name, b_name, key + ".")
        elif a.get(k) != b.get(k):
            out.append(f"{key}: {a_name} has {a.get(k)!r}, {b_name} has {b.get(k)!r}")
    return out
