"""A generic, versioned shard store: Zarr v3 arrays + Parquet sample index + manifest.

This layer does not know what a signal means. The caller declares array specs
(`ArraySpec(dtype, row_shape)`); every sample contributes a variable number of rows (the leading
dimension) to each array, and the sample's `(start, len)` into each array goes into the index.
Contract: DESIGN.md section 5; conventions: STYLE.md items 7-11.

Layout of a store::

    STORE/
      manifest.json            written LAST, atomically; its presence means the dump is complete
      shards/
        shard-00000/           complete shard (renamed from shard-00000.partial/ when fully written)
          arrays.zarr/         zarr v3 group, one array per spec, shape (rows, *row_shape): the rows of
                               all samples of the shard, concatenated in index order. Inner chunks of
                               `rows_per_chunk` rows, grouped by the sharding codec into files of
                               `chunks_per_file` chunks (so the file count stays low). Each inner
                               chunk is zstd-compressed and carries a CRC32C, so a damaged chunk
                               fails its read (naming shard and array) even without checksums on;
                               so does a missing chunk file that shard.json lists (zarr alone would
                               read it as zeros).
          index.parquet        one row per sample: sample_id, caller meta columns, and per array
                               `<name>.start` / `<name>.len` (int64), contiguous in index order
          skipped.parquet      samples that failed: sample_id, reason (short code), detail
          shard.json           summary: counts, rows per array, specs, {file: {bytes, sha256}}

This module holds the names and records of that layout; ``schemas.writer`` writes a shard,
``schemas.manifest`` the manifest (``schemas.io`` the bytes), ``schemas.reader`` reads a store and
``schemas.verify`` checks one.

"Shard" always means a store shard (a directory, one per worker unit); the zarr sharding codec's
files are called "chunk files".
"""

from __future__ import annotations

import dataclasses
import os
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np

FORMAT_VERSION = "1.0"

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
PARTIAL_SUFFIX = ".partial"
ARRAYS_DIR = "arrays.zarr"
INDEX_NAME = "index.parquet"
SKIPPED_NAME = "skipped.parquet"
SHARD_JSON = "shard.json"

# A teacher store (DESIGN.md §5) adds, beside the manifest: the dump's settings, written when a
# run claims the directory (resume checks against them), and the IRS calibration, kept for resume.
STORE_KIND = "alignti-teacher-store"
SETTINGS_FILE = "dump.json"
CALIBRATION_FILE = "calibration.json"

_ALLOWED_DTYPES = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
}

_ARRAY_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")


def shard_name(index: int) -> str:
    """Conventional shard name for a worker unit: 0 -> 'shard-00000'."""
    return f"shard-{index:05d}"


def _shard_files(shard_dir: Path) -> list[str]:
    """Relative POSIX paths of every file in a shard dir except shard.json, sorted."""
    out = []
    for p in sorted(shard_dir.rglob("*")):
        if p.is_file():
            rel = p.relative_to(shard_dir).as_posix()
            if rel != SHARD_JSON:
                out.append(rel)
    return out


@dataclasses.dataclass(frozen=True)
class ArraySpec:
    """One flat array of a store: rows of shape `row_shape` and numpy dtype name `dtype`."""

    dtype: str
    row_shape: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        try:
            name = np.dtype(self.dtype).name
        except TypeError as e:
            raise ValueError(f"ArraySpec: unknown dtype {self.dtype!r}") from e
        if name not in _ALLOWED_DTYPES:
            raise ValueError(f"ArraySpec: dtype {self.dtype!r} is not one of "
                             f"{sorted(_ALLOWED_DTYPES)}")
        shape = tuple(self.row_shape)
        if not all(isinstance(d, (int, np.integer)) and not isinstance(d, bool) and d > 0
                   for d in shape):
            raise ValueError(f"ArraySpec: row_shape must be positive ints, got {self.row_shape!r}")
        object.__setattr__(self, "dtype", name)
        object.__setattr__(self, "row_shape", tuple(int(d) for d in shape))

    def to_json(self) -> dict:
        return {"dtype": self.dtype, "row_shape": list(self.row_shape)}

    @classmethod
    def from_json(cls, d: dict) -> "ArraySpec":
        return cls(dtype=d["dtype"], row_shape=tuple(d["row_shape"]))

    @property
    def row_bytes(self) -> int:
        return int(np.dtype(self.dtype).itemsize * np.prod(self.row_shape, dtype=np.int64))


@dataclasses.dataclass
class ShardInfo:
    """Summary of a complete shard; the content of shard.json (plus specs/chunking there)."""

    name: str
    n_samples: int
    n_skipped: int
    skipped_reasons: dict[str, int]
    rows: dict[str, int]
    files: dict[str, dict]  # relative path -> {"bytes": int, "sha256": str}

    @property
    def bytes(self) -> int:
        return sum(f["bytes"] for f in self.files.values())


@dataclasses.dataclass
class StoredSample:
    sample_id: str
    meta: dict[str, Any]
    arrays: dict[str, np.ndarray]


@dataclasses.dataclass(frozen=True)
class SkippedRecord:
    shard: str
    sample_id: str
    reason: str
    detail: str


def list_complete_shards(store_dir: str | os.PathLike) -> list[str]:
    """Names of complete shards (renamed from .partial, shard.json present), sorted."""
    shards = Path(store_dir) / SHARDS_DIR
    if not shards.is_dir():
        return []
    return sorted(p.name for p in shards.iterdir()
                  if p.is_dir() and not p.name.endswith(PARTIAL_SUFFIX)
                  and (p / SHARD_JSON).is_file())


def list_partial_shards(store_dir: str | os.PathLike) -> list[str]:
    """Names (without the suffix) of shards left `.partial` by a failed or interrupted writer."""
    shards = Path(store_dir) / SHARDS_DIR
    if not shards.is_dir():
        return []
    return sorted(p.name[: -len(PARTIAL_SUFFIX)] for p in shards.iterdir()
                  if p.is_dir() and p.name.endswith(PARTIAL_SUFFIX))


def remove_partial_shards(store_dir: str | os.PathLike) -> list[str]:
    """Delete every `.partial` shard directory (resume: they are redone). Returns their names.
    Call it only when no writer of this store is running."""
    names = list_partial_shards(store_dir)
    for n in names:
        shutil.rmtree(Path(store_dir) / SHARDS_DIR / (n + PARTIAL_SUFFIX))
    return names
