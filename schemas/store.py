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
                               fails its read (naming shard and array) even without checksums on.
          index.parquet        one row per sample: sample_id, caller meta columns, and per array
                               `<name>.start` / `<name>.len` (int64), contiguous in index order
          skipped.parquet      samples that failed: sample_id, reason (short code), detail
          shard.json           summary: counts, rows per array, specs, {file: {bytes, sha256}}

Meta columns (caller's per-sample dict) are stored as:
    str -> string; bool -> bool; int -> int64; float (or ints mixed with floats) -> float64;
    a list of ints, or lists of lists of ints (any fixed depth) -> list<int64> / list<list<int64>>;
    anything else (dicts, lists holding non-ints, ...) -> a JSON string column whose Arrow field
    carries metadata {"alignti.encoding": "json"}; the reader decodes it back.
    None is a null in any column. Types are inferred per shard; pass `meta_schema` to pin them
    (so all shards agree, e.g. list<int32> for token ids). In a pinned schema, mark a JSON column
    with `json_field(name)`.

"Shard" below always means a store shard (a directory, one per worker unit); the zarr sharding
codec's files are called "chunk files".
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import re
import shutil
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from schemas.errors import StoreFormatError

FORMAT_VERSION = "1.0"

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"
PARTIAL_SUFFIX = ".partial"
ARRAYS_DIR = "arrays.zarr"
INDEX_NAME = "index.parquet"
SKIPPED_NAME = "skipped.parquet"
SHARD_JSON = "shard.json"

JSON_ENCODING_KEY = b"alignti.encoding"
JSON_ENCODING_VALUE = b"json"

# Inner chunks hold about this many uncompressed bytes when rows_per_chunk is not given: large
# enough that a block of consecutive samples is one or two chunk reads, small enough that a single
# get() does not decompress much more than it needs.
DEFAULT_CHUNK_BYTES = 1 << 20
# Chunks per chunk file: 32 x 1 MiB keeps a shard of ~1 GiB of logits to ~32 files per array;
# the writer buffers at most one chunk file per array in memory.
DEFAULT_CHUNKS_PER_FILE = 32

_ALLOWED_DTYPES = {
    "bool", "int8", "int16", "int32", "int64", "uint8", "uint16", "uint32", "uint64",
    "float16", "float32", "float64",
}
# Inner-chunk codec chain after the bytes serializer: zstd, then a CRC32C of the compressed bytes.
CHUNK_COMPRESSORS = (ZstdCodec(), Crc32cCodec())

_ARRAY_NAME_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
_SHARD_NAME_RE = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_-]*$")
_RESERVED_MANIFEST_KEYS = ("format_version", "arrays", "shards", "n_samples", "n_skipped",
                           "skipped_reasons")




# ----------------------------------------------------------------------------------------------
# helpers


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


def shard_name(index: int) -> str:
    """Conventional shard name for a worker unit: 0 -> 'shard-00000'."""
    return f"shard-{index:05d}"


def json_field(name: str) -> pa.Field:
    """A meta column stored as JSON text (for a pinned `meta_schema`)."""
    return pa.field(name, pa.string(), metadata={JSON_ENCODING_KEY: JSON_ENCODING_VALUE})


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


def _shard_files(shard_dir: Path) -> list[str]:
    """Relative POSIX paths of every file in a shard dir except shard.json, sorted."""
    out = []
    for p in sorted(shard_dir.rglob("*")):
        if p.is_file():
            rel = p.relative_to(shard_dir).as_posix()
            if rel != SHARD_JSON:
                out.append(rel)
    return out


# ----------------------------------------------------------------------------------------------
# specs and records


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


# ----------------------------------------------------------------------------------------------
# meta column type inference

# A kind is one of: None (only nulls so far), "bool", "int", "float", "str", "json",
# or ("ints", depth, exact): nested lists of ints `depth` deep; exact=False when only empty
# lists were seen at the bottom, so the depth is a lower bound.


def _int_list_kind(v: list) -> tuple | None:
    """('ints', depth, exact) if v is a (nested) list of ints of one depth, else None."""
    if len(v) == 0:
        return ("ints", 1, False)
    kinds = set()
    child: tuple | None = None
    for x in v:
        if isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_)):
            kinds.add("leaf")
        elif isinstance(x, list):
            k = _int_list_kind(x)
            if k is None:
                return None
            kinds.add("list")
            child = k if child is None else _merge_int_lists(child, k)
            if child is None:
                return None
        else:
            return None
    if kinds == {"leaf"}:
        return ("ints", 1, True)
    if kinds == {"list"}:
        assert child is not None
        return ("ints", child[1] + 1, child[2])
    return None


def _merge_int_lists(a: tuple, b: tuple) -> tuple | None:
    _, da, ea = a
    _, db, eb = b
    if ea and eb:
        return a if da == db else None
    if ea:
        return a if db <= da else None
    if eb:
        return b if da <= db else None
    return ("ints", max(da, db), False)


def _value_kind(v: Any):
    if v is None:
        return None
    if isinstance(v, (bool, np.bool_)):
        return "bool"
    if isinstance(v, (int, np.integer)):
        return "int"
    if isinstance(v, (float, np.floating)):
        return "float"
    if isinstance(v, str):
        return "str"
    if isinstance(v, list):
        k = _int_list_kind(v)
        return k if k is not None else "json"
    return "json"


def _merge_kinds(a, b):
    """Merged kind, or raise ValueError when the two cannot share a column."""
    if a is None:
        return b
    if b is None or a == b:
        return a
    if {a, b} == {"int", "float"}:
        return "float"
    if isinstance(a, tuple) and isinstance(b, tuple):
        m = _merge_int_lists(a, b)
        if m is not None:
            return m
    raise ValueError(f"{_kind_name(b)} does not fit the column's earlier {_kind_name(a)}")


def _kind_name(k) -> str:
    if isinstance(k, tuple):
        return "list[" * k[1] + "int" + "]" * k[1]
    if k == "json":
        return "nested value (JSON)"
    return str(k)


def _kind_field(name: str, k) -> pa.Field:
    if k is None:
        return pa.field(name, pa.null())
    if k == "json":
        return json_field(name)
    if isinstance(k, tuple):
        t: pa.DataType = pa.int64()
        for _ in range(k[1]):
            t = pa.list_(t)
        return pa.field(name, t)
    return pa.field(name, {"bool": pa.bool_(), "int": pa.int64(), "float": pa.float64(),
                           "str": pa.string()}[k])


def _is_json_field(field: pa.Field) -> bool:
    return bool(field.metadata) and field.metadata.get(JSON_ENCODING_KEY) == JSON_ENCODING_VALUE


def _to_jsonable(v: Any) -> Any:
    if isinstance(v, np.ndarray):
        return v.tolist()
    if isinstance(v, np.generic):
        return v.item()
    raise TypeError(f"value of type {type(v).__name__} is not JSON-serialisable")


def _json_text(v: Any) -> str | None:
    if v is None:
        return None
    return json.dumps(v, sort_keys=True, ensure_ascii=False, allow_nan=False,
                      default=_to_jsonable)


def _reserved_column(name: str) -> bool:
    return name == "sample_id" or name.endswith(".start") or name.endswith(".len")


# ----------------------------------------------------------------------------------------------
# writer


class ShardWriter:
    """Writes one shard of a store; a context manager. One writer per shard, one worker per writer.

    Files go to `shards/<name>.partial/`; `close()` (or a clean `__exit__`) flushes the arrays,
    writes index.parquet, skipped.parquet and shard.json (checksums computed after writing),
    fsyncs, and renames the directory to `shards/<name>/`. On an exception inside `with` the
    `.partial` directory is left for `remove_partial_shards` to clean up. A stale `.partial`
    directory of the same name (a crashed earlier attempt of this worker unit) is removed on open.

    Rows are buffered in memory and written to zarr one whole chunk file at a time (aligned to
    `rows_per_chunk * chunks_per_file` rows); only the last, partial chunk file of each array is
    written at close. Nothing is rewritten per sample.
    """

    def __init__(
        self,
        store_dir: str | os.PathLike,
        shard_name: str,
        specs: dict[str, ArraySpec],
        meta_schema: pa.Schema | None = None,
        rows_per_chunk: int | None = None,
        chunks_per_file: int = DEFAULT_CHUNKS_PER_FILE,
    ) -> None:
        """
        Args:
            store_dir: the store directory (created if missing).
            shard_name: e.g. `shard_name(i)`; letters, digits, `_` and `-`.
            specs: array name -> ArraySpec. Names are identifiers (`[A-Za-z_][A-Za-z0-9_]*`).
            meta_schema: optional Arrow schema pinning the meta columns (without sample_id and
                offsets); every sample's meta dict must then have exactly these keys.
            rows_per_chunk: rows per zarr inner chunk, for every array; None picks, per array,
                about DEFAULT_CHUNK_BYTES of uncompressed data.
            chunks_per_file: inner chunks per chunk file (zarr sharding codec).
        """
        if not _SHARD_NAME_RE.match(shard_name) or shard_name.endswith(PARTIAL_SUFFIX):
            raise ValueError(f"shard name {shard_name!r}: use letters, digits, '_' and '-'")
        for name, spec in specs.items():
            if not _ARRAY_NAME_RE.match(name):
                raise ValueError(f"array name {name!r}: must match {_ARRAY_NAME_RE.pattern}")
            if not isinstance(spec, ArraySpec):
                raise TypeError(f"array {name!r}: spec must be an ArraySpec, got {type(spec)}")
        if rows_per_chunk is not None and rows_per_chunk < 1:
            raise ValueError(f"rows_per_chunk must be >= 1, got {rows_per_chunk}")
        if chunks_per_file < 1:
            raise ValueError(f"chunks_per_file must be >= 1, got {chunks_per_file}")
        if meta_schema is not None:
            for field in meta_schema:
                if _reserved_column(field.name):
                    raise ValueError(f"meta_schema column {field.name!r} clashes with the "
                                     "index's own columns (sample_id, <array>.start/.len)")

        self.store_dir = Path(store_dir)
        self.name = shard_name
        self.specs = dict(sorted(specs.items()))
        self.meta_schema = meta_schema
        self.chunks_per_file = chunks_per_file
        self.rows_per_chunk = {
            n: rows_per_chunk if rows_per_chunk is not None
            else max(1, DEFAULT_CHUNK_BYTES // max(1, s.row_bytes))
            for n, s in self.specs.items()
        }

        shards = self.store_dir / SHARDS_DIR
        self.final_dir = shards / shard_name
        self.partial_dir = shards / (shard_name + PARTIAL_SUFFIX)
        if self.final_dir.exists():
            raise FileExistsError(f"{self.final_dir}: shard {shard_name!r} is already complete; "
                                  "skip it (list_complete_shards) instead of rewriting it")
        shards.mkdir(parents=True, exist_ok=True)
        if self.partial_dir.exists():
            shutil.rmtree(self.partial_dir)
        self.partial_dir.mkdir()

        group = zarr.open_group(store=str(self.partial_dir / ARRAYS_DIR), mode="w")
        self._arrays = {}
        for n, s in self.specs.items():
            rpc = self.rows_per_chunk[n]
            self._arrays[n] = group.create_array(
                n, shape=(0, *s.row_shape), dtype=s.dtype,
                chunks=(rpc, *s.row_shape), shards=(rpc * chunks_per_file, *s.row_shape),
                compressors=CHUNK_COMPRESSORS,
            )
        self._pending: dict[str, list[np.ndarray]] = {n: [] for n in self.specs}
        self._pending_rows = {n: 0 for n in self.specs}
        self._written_rows = {n: 0 for n in self.specs}  # rows already in zarr
        self._total_rows = {n: 0 for n in self.specs}  # rows added (written + pending)

        self._ids: list[str] = []
        self._seen: set[str] = set()
        self._offsets: dict[str, tuple[list[int], list[int]]] = {n: ([], []) for n in self.specs}
        self._meta_keys: list[str] | None = (
            list(meta_schema.names) if meta_schema is not None else None)
        self._meta_cols: dict[str, list] = {k: [] for k in (self._meta_keys or [])}
        self._meta_kinds: dict[str, Any] = {}
        self._skipped: list[tuple[str, str, str]] = []
        self._closed = False
        self.info: ShardInfo | None = None

    # -- context manager

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.close()
        else:
            self._closed = True  # leave the .partial dir; never finalise a failed shard

    # -- adding

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"shard {self.name!r}: writer is closed")

    def _check_new_id(self, sample_id: str) -> None:
        if not isinstance(sample_id, str) or not sample_id:
            raise ValueError(f"shard {self.name!r}: sample_id must be a non-empty str, "
                             f"got {sample_id!r}")
        if sample_id in self._seen:
            raise ValueError(f"shard {self.name!r}: duplicate sample id {sample_id!r}")

    def add(self, sample_id: str, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
        """Add one sample. Arrays not given contribute 0 rows. Nothing is cast: the dtype and
        row shape must equal the spec."""
        self._check_open()
        self._check_new_id(sample_id)
        where = f"shard {self.name!r}, sample {sample_id!r}"

        for n, a in arrays.items():
            if n not in self.specs:
                raise ValueError(f"{where}: array {n!r} is not declared (declared: "
                                 f"{sorted(self.specs)})")
            spec = self.specs[n]
            if not isinstance(a, np.ndarray):
                raise TypeError(f"{where}, array {n!r}: expected a numpy array, "
                                f"found {type(a).__name__}")
            if a.dtype != np.dtype(spec.dtype):
                raise ValueError(f"{where}, array {n!r}: expected dtype {spec.dtype}, "
                                 f"found {a.dtype.name}")
            if a.ndim != 1 + len(spec.row_shape) or tuple(a.shape[1:]) != spec.row_shape:
                raise ValueError(f"{where}, array {n!r}: expected shape (rows, "
                                 f"{', '.join(map(str, spec.row_shape))}) i.e. row shape "
                                 f"{spec.row_shape}, found shape {tuple(a.shape)}")

        row = self._check_meta(where, meta)

        # Everything validated: record the sample.
        self._ids.append(sample_id)
        self._seen.add(sample_id)
        for k, v in row.items():
            self._meta_cols[k].append(v)
        for n in self.specs:
            a = arrays.get(n)
            length = 0 if a is None else int(a.shape[0])
            starts, lens = self._offsets[n]
            starts.append(self._total_rows[n])
            lens.append(length)
            self._total_rows[n] += length
            if length:
                # Copy: the caller may reuse its buffer after add() returns.
                self._pending[n].append(np.array(a, copy=True, order="C"))
                self._pending_rows[n] += length
                self._flush(n, final=False)

    def _check_meta(self, where: str, meta: dict[str, Any]) -> dict[str, Any]:
        if not isinstance(meta, dict):
            raise TypeError(f"{where}: meta must be a dict, found {type(meta).__name__}")
        for k in meta:
            if not isinstance(k, str):
                raise TypeError(f"{where}: meta key {k!r} is not a str")
            if _reserved_column(k):
                raise ValueError(f"{where}: meta key {k!r} clashes with the index's own columns "
                                 "(sample_id, <array>.start/.len)")
        if self._meta_keys is None:  # first sample defines the columns
            self._meta_keys = list(meta)
            self._meta_cols = {k: [] for k in self._meta_keys}
        if set(meta) != set(self._meta_keys):
            missing = sorted(set(self._meta_keys) - set(meta))
            extra = sorted(set(meta) - set(self._meta_keys))
            raise ValueError(f"{where}: meta keys differ from the shard's columns "
                             f"(missing {missing}, unexpected {extra})")
        row = {}
        if self.meta_schema is not None:
            for field in self.meta_schema:
                v = meta[field.name]
                if _is_json_field(field):
                    v = _json_text(v)
                try:
                    pa.array([v], type=field.type)
                except (pa.ArrowException, TypeError, ValueError) as e:
                    raise ValueError(f"{where}, meta {field.name!r}: value does not fit "
                                     f"{field.type}: {e}") from e
                row[field.name] = v
            return row
        new_kinds = {}
        for k in self._meta_keys:
            v = meta[k]
            try:
                new_kinds[k] = _merge_kinds(self._meta_kinds.get(k), _value_kind(v))
                if new_kinds[k] == "json":
                    _json_text(v)  # fail now, naming the sample, rather than at close
            except (ValueError, TypeError) as e:
                raise ValueError(f"{where}, meta {k!r}: {e}; pin the type with meta_schema "
                                 "(json_field for JSON)") from e
            row[k] = v
        self._meta_kinds.update(new_kinds)
        return row

    def add_skipped(self, sample_id: str, reason: str, detail: str = "") -> None:
        """Record a sample that could not be processed (`reason`: a short code such as
        'missing_image'; `detail`: the message)."""
        self._check_open()
        self._check_new_id(sample_id)
        if not isinstance(reason, str) or not reason or any(c.isspace() for c in reason):
            raise ValueError(f"shard {self.name!r}, sample {sample_id!r}: skip reason must be a "
                             f"short code without spaces, got {reason!r}")
        self._seen.add(sample_id)
        self._skipped.append((sample_id, reason, str(detail)))

    # -- writing

    def _flush(self, n: str, final: bool) -> None:
        """Write pending rows of array `n`: whole chunk files only, or everything if `final`."""
        unit = self.rows_per_chunk[n] * self.chunks_per_file
        pending = self._pending_rows[n]
        nrows = pending if final else (pending // unit) * unit
        if nrows == 0:
            return
        data = np.concatenate(self._pending[n], axis=0)
        block, rest = data[:nrows], data[nrows:]
        arr = self._arrays[n]
        old = self._written_rows[n]
        arr.resize((old + nrows, *self.specs[n].row_shape))
        arr[old:old + nrows] = block
        self._written_rows[n] = old + nrows
        self._pending[n] = [rest] if len(rest) else []
        self._pending_rows[n] = len(rest)

    def _meta_fields(self) -> list[pa.Field]:
        if self.meta_schema is not None:
            return list(self.meta_schema)
        return [_kind_field(k, self._meta_kinds.get(k)) for k in (self._meta_keys or [])]

    def _index_table(self) -> pa.Table:
        fields = [pa.field("sample_id", pa.string())]
        cols: list[pa.Array] = [pa.array(self._ids, type=pa.string())]
        for field in self._meta_fields():
            values = self._meta_cols[field.name]
            if _is_json_field(field) and self.meta_schema is None:
                values = [_json_text(v) for v in values]  # pinned schemas encode in add()
            fields.append(field)
            cols.append(pa.array(values, type=field.type))
        for n in self.specs:
            starts, lens = self._offsets[n]
            fields += [pa.field(f"{n}.start", pa.int64()), pa.field(f"{n}.len", pa.int64())]
            cols += [pa.array(starts, type=pa.int64()), pa.array(lens, type=pa.int64())]
        schema = pa.schema(fields, metadata={b"alignti.format_version": FORMAT_VERSION.encode(),
                                             b"alignti.shard": self.name.encode()})
        return pa.Table.from_arrays(cols, schema=schema)

    def close(self) -> ShardInfo:
        """Flush, write index/skipped/shard.json, rename `.partial` -> final. Returns ShardInfo."""
        if self.info is not None:
            return self.info
        self._check_open()
        self._closed = True
        for n in self.specs:
            self._flush(n, final=True)
            if self._written_rows[n] != self._total_rows[n]:  # internal invariant, not user data
                raise RuntimeError(f"shard {self.name!r}, array {n!r}: wrote "
                                   f"{self._written_rows[n]} rows, expected {self._total_rows[n]}")

        pq.write_table(self._index_table(), self.partial_dir / INDEX_NAME, compression="zstd")
        ids, reasons, details = (list(c) for c in zip(*self._skipped)) if self._skipped \
            else ([], [], [])
        skipped = pa.table({"sample_id": pa.array(ids, pa.string()),
                            "reason": pa.array(reasons, pa.string()),
                            "detail": pa.array(details, pa.string())})
        pq.write_table(skipped, self.partial_dir / SKIPPED_NAME, compression="zstd")

        # Checksums after everything else is on disk; fsync each file and directory so the
        # rename below never publishes a shard whose data is still only in the page cache.
        files = {}
        for rel in _shard_files(self.partial_dir):
            p = self.partial_dir / rel
            _fsync_path(p)
            files[rel] = {"bytes": p.stat().st_size, "sha256": file_sha256(p)}
        info = ShardInfo(
            name=self.name,
            n_samples=len(self._ids),
            n_skipped=len(self._skipped),
            skipped_reasons=dict(sorted(Counter(r for _, r, _ in self._skipped).items())),
            rows=dict(self._total_rows),
            files=files,
        )
        summary = {
            "format_version": FORMAT_VERSION,
            **dataclasses.asdict(info),
            "bytes": info.bytes,
            "arrays": {n: s.to_json() for n, s in self.specs.items()},
            "rows_per_chunk": dict(self.rows_per_chunk),
            "chunks_per_file": self.chunks_per_file,
        }
        atomic_write_text(self.partial_dir / SHARD_JSON, _dumps(summary))
        for d in sorted({p.parent for p in self.partial_dir.rglob("*")} | {self.partial_dir}):
            _fsync_path(d)
        os.replace(self.partial_dir, self.final_dir)
        _fsync_path(self.final_dir.parent)
        self.info = info
        return info


# ----------------------------------------------------------------------------------------------
# shard listing / resume


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


# ----------------------------------------------------------------------------------------------
# manifest


def _read_shard_json(store_dir: Path, name: str) -> dict:
    path = store_dir / SHARDS_DIR / name / SHARD_JSON
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError as e:
        raise StoreFormatError(f"{path}: shard {name!r} has no {SHARD_JSON}") from e
    except (OSError, ValueError) as e:
        raise StoreFormatError(f"{path}: unreadable {SHARD_JSON}: {e}") from e
    if not isinstance(d, dict) or d.get("format_version") != FORMAT_VERSION:
        found = d.get("format_version") if isinstance(d, dict) else type(d).__name__
        raise StoreFormatError(f"{path}: expected format {FORMAT_VERSION}, found {found}")
    return d


def write_manifest(store_dir: str | os.PathLike, manifest: dict,
                   shards: Iterable[str] | None = None) -> dict:
    """Write `manifest.json` last and atomically; return what was written.

    `manifest` holds the caller's entries (teacher identity, fingerprints, settings), passed
    through untouched. Added: `format_version`, `arrays` (name -> spec), `shards` (per shard:
    name, n_samples, n_skipped, skipped_reasons, rows, bytes, files {path: {bytes, sha256}},
    shard_json {bytes, sha256}), and totals `n_samples`, `n_skipped`, `skipped_reasons`.
    `shards` selects shard names (default: every complete shard). Refused while `.partial` shards
    exist, or when shards disagree on the array specs.
    """
    store = Path(store_dir)
    clash = [k for k in _RESERVED_MANIFEST_KEYS if k in manifest]
    if clash:
        raise ValueError(f"manifest entries {clash} are written by write_manifest; remove them")
    partial = list_partial_shards(store)
    if partial:
        raise StoreFormatError(f"{store}: partial shards {partial} exist; finish them or "
                               "remove_partial_shards() before writing the manifest")
    names = list_complete_shards(store) if shards is None else list(shards)
    if len(set(names)) != len(names):
        raise ValueError(f"{store}: shard names repeat in {names}")

    arrays: dict | None = None
    arrays_from = None
    entries = []
    reasons: Counter = Counter()
    for name in names:
        d = _read_shard_json(store, name)
        if arrays is None:
            arrays, arrays_from = d["arrays"], name
        elif d["arrays"] != arrays:
            raise StoreFormatError(f"{store}: shard {name!r} has arrays {d['arrays']}, but shard "
                                   f"{arrays_from!r} has {arrays}")
        sj = store / SHARDS_DIR / name / SHARD_JSON
        entries.append({
            "name": name,
            "n_samples": d["n_samples"],
            "n_skipped": d["n_skipped"],
            "skipped_reasons": d["skipped_reasons"],
            "rows": d["rows"],
            "bytes": d["bytes"],
            "files": d["files"],
            "shard_json": {"bytes": sj.stat().st_size, "sha256": file_sha256(sj)},
        })
        reasons.update(d["skipped_reasons"])

    out = dict(manifest)
    out.update({
        "format_version": FORMAT_VERSION,
        "arrays": arrays or {},
        "shards": entries,
        "n_samples": sum(e["n_samples"] for e in entries),
        "n_skipped": sum(e["n_skipped"] for e in entries),
        "skipped_reasons": dict(sorted(reasons.items())),
    })
    atomic_write_text(store / MANIFEST_NAME, _dumps(out))
    return out


def read_manifest(store_dir: str | os.PathLike) -> dict:
    """Load and check `manifest.json` (presence, JSON, format version, required keys)."""
    path = Path(store_dir) / MANIFEST_NAME
    if not path.is_file():
        raise StoreFormatError(f"{path}: no {MANIFEST_NAME}; the dump is incomplete (the manifest "
                               "is written last) or this is not a store")
    try:
        m = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoreFormatError(f"{path}: unreadable manifest: {e}") from e
    if not isinstance(m, dict):
        raise StoreFormatError(f"{path}: expected a JSON object, found {type(m).__name__}")
    found = m.get("format_version")
    if found != FORMAT_VERSION:
        raise StoreFormatError(f"{path}: expected format {FORMAT_VERSION}, found {found}")
    for key, typ in (("arrays", dict), ("shards", list), ("n_samples", int)):
        if not isinstance(m.get(key), typ):
            raise StoreFormatError(f"{path}: key {key!r}: expected {typ.__name__}, "
                                   f"found {type(m.get(key)).__name__}")
    return m


# ----------------------------------------------------------------------------------------------
# reading and verification


def _check_file(shard_dir: Path, shard: str, rel: str, expected: dict) -> str | None:
    p = shard_dir / rel
    if not p.is_file():
        return f"shard {shard!r}: file {rel} is missing"
    size = p.stat().st_size
    if size != expected["bytes"]:
        return f"shard {shard!r}: file {rel}: expected {expected['bytes']} bytes, found {size}"
    digest = file_sha256(p)
    if digest != expected["sha256"]:
        return (f"shard {shard!r}: file {rel}: sha256 mismatch (expected {expected['sha256']}, "
                f"found {digest})")
    return None


def _checksum_problems(store: Path, entry: dict) -> list[str]:
    """Size/checksum problems of every file of one shard listed in the manifest, plus extras."""
    name = entry["name"]
    shard_dir = store / SHARDS_DIR / name
    problems = []
    for rel, exp in sorted({**entry["files"], SHARD_JSON: entry["shard_json"]}.items()):
        p = _check_file(shard_dir, name, rel, exp)
        if p:
            problems.append(p)
    extra = sorted(set(_shard_files(shard_dir)) - set(entry["files"]))
    for rel in extra:
        problems.append(f"shard {name!r}: file {rel} is not listed in the manifest")
    return problems


class _ShardIndex:
    """A loaded, checked shard: index table, offsets per array, and the open zarr arrays."""

    def __init__(self, store: Path, entry: dict, specs: dict[str, ArraySpec]) -> None:
        name = entry["name"]
        self.name = name
        self.dir = store / SHARDS_DIR / name
        where = f"{store}: shard {name!r}"
        index_path = self.dir / INDEX_NAME
        try:
            table = pq.read_table(index_path)
        except (OSError, pa.ArrowException) as e:
            raise StoreFormatError(f"{where}: {INDEX_NAME} unreadable: {e}") from e
        _check_index_schema(where, table.schema, specs)
        if table.num_rows != entry["n_samples"]:
            raise StoreFormatError(f"{where}: {INDEX_NAME}: expected {entry['n_samples']} samples "
                                   f"(manifest), found {table.num_rows}")
        try:
            group = zarr.open_group(store=str(self.dir / ARRAYS_DIR), mode="r")
        except Exception as e:  # zarr raises several types for a missing/bad group
            raise StoreFormatError(f"{where}: {ARRAYS_DIR} unreadable: {e}") from e
        self.arrays = {}
        self.starts: dict[str, np.ndarray] = {}
        self.lens: dict[str, np.ndarray] = {}
        for n, spec in specs.items():
            try:
                arr = group[n]
            except KeyError as e:
                raise StoreFormatError(f"{where}: {ARRAYS_DIR}: array {n!r} is missing") from e
            problem = _array_problem(arr, spec, entry["rows"].get(n))
            if problem:
                raise StoreFormatError(f"{where}: {ARRAYS_DIR}/{n}: {problem}")
            starts = table.column(f"{n}.start").to_numpy()
            lens = table.column(f"{n}.len").to_numpy()
            problem = _offsets_problem(table.column("sample_id").to_pylist(), starts, lens,
                                       arr.shape[0])
            if problem:
                raise StoreFormatError(f"{where}: {INDEX_NAME}, array {n!r}: {problem}")
            self.arrays[n], self.starts[n], self.lens[n] = arr, starts, lens
        self.sample_ids: list[str] = table.column("sample_id").to_pylist()
        meta_names = [f.name for f in table.schema if not _reserved_column(f.name)]
        self.meta = table.select(meta_names)
        self.json_cols = {f.name for f in self.meta.schema if _is_json_field(f)}

    def meta_rows(self, start: int, stop: int) -> list[dict]:
        table = self.meta.slice(start, stop - start)
        columns = {}
        for name in table.column_names:
            values = table.column(name).to_pylist()
            if name in self.json_cols:  # one JSON document per column, not one per row
                values = json.loads("[" + ",".join("null" if v is None else v for v in values) + "]")
            columns[name] = values
        if not columns:
            return [{} for _ in range(stop - start)]
        return [dict(zip(columns, row)) for row in zip(*columns.values())]


def _check_index_schema(where: str, schema: pa.Schema, specs: dict[str, ArraySpec]) -> None:
    def need(col: str, typ: pa.DataType) -> None:
        idx = schema.get_field_index(col)
        if idx < 0:
            raise StoreFormatError(f"{where}: {INDEX_NAME}: column {col!r} is missing")
        if schema.field(idx).type != typ:
            raise StoreFormatError(f"{where}: {INDEX_NAME}: column {col!r}: expected {typ}, "
                                   f"found {schema.field(idx).type}")

    need("sample_id", pa.string())
    for n in specs:
        need(f"{n}.start", pa.int64())
        need(f"{n}.len", pa.int64())


def _array_problem(arr, spec: ArraySpec, rows: int | None) -> str | None:
    if arr.dtype != np.dtype(spec.dtype):
        return f"expected dtype {spec.dtype}, found {arr.dtype}"
    if tuple(arr.shape[1:]) != spec.row_shape:
        return f"expected row shape {spec.row_shape}, found {tuple(arr.shape[1:])}"
    if rows is not None and arr.shape[0] != rows:
        return f"expected {rows} rows (manifest), found {arr.shape[0]}"
    return None


def _offsets_problem(ids: list[str], starts: np.ndarray, lens: np.ndarray,
                     rows: int) -> str | None:
    """Offsets must tile [0, rows) in index order: start_0 = 0, start_{i+1} = start_i + len_i."""
    if len(starts) == 0:
        return None if rows == 0 else f"no samples but the array has {rows} rows"
    bad = np.flatnonzero(lens < 0)
    if len(bad):
        i = int(bad[0])
        return f"sample {ids[i]!r}: negative length {int(lens[i])}"
    expected = np.concatenate([[0], np.cumsum(lens)[:-1]])
    bad = np.flatnonzero(starts != expected)
    if len(bad):
        i = int(bad[0])
        return (f"sample {ids[i]!r}: start {int(starts[i])} does not follow the previous sample "
                f"(expected {int(expected[i])}); offsets must be contiguous and non-overlapping")
    total = int(lens.sum())
    if total != rows:
        return f"lengths sum to {total}, but the array has {rows} rows"
    return None


class LRUBytes:
    """A least-recently-used cache bounded by the bytes its values declare (0 bytes: keeps nothing)."""

    def __init__(self, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"cache size must be >= 0 bytes, got {max_bytes}")
        self.max_bytes = int(max_bytes)
        self.bytes = 0
        self._items: dict[Any, tuple[Any, int]] = {}  # insertion order = recency order

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: Any) -> Any:
        item = self._items.pop(key, None)
        if item is None:
            return None
        self._items[key] = item  # most recent last
        return item[0]

    def put(self, key: Any, value: Any, nbytes: int) -> None:
        """Keep ``value`` (unless it alone exceeds the bound), dropping the least recent to fit."""
        if nbytes > self.max_bytes:
            return
        old = self._items.pop(key, None)
        if old is not None:
            self.bytes -= old[1]
        self._items[key] = (value, nbytes)
        self.bytes += nbytes
        while self.bytes > self.max_bytes:
            _, dropped = self._items.pop(next(iter(self._items)))
            self.bytes -= dropped


class StoreReader:
    """Reads a complete store. Checks the manifest's format version on open; with
    `verify_checksums`, checks the size and sha256 of every file first. Shard indexes are opened
    (and their offsets checked against the arrays) lazily, on first use."""

    def __init__(self, store_dir: str | os.PathLike, verify_checksums: bool = False,
                 cache_bytes: int = 0) -> None:
        """`cache_bytes`: bound of the cache of decoded inner chunks (0: none; every read goes
        to zarr). A chunk larger than the bound is never cached."""
        self.store_dir = Path(store_dir)
        self._cache = LRUBytes(cache_bytes)
        self.manifest = read_manifest(self.store_dir)
        try:
            self.specs = {n: ArraySpec.from_json(s) for n, s in self.manifest["arrays"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise StoreFormatError(f"{self.store_dir / MANIFEST_NAME}: bad 'arrays' entry: "
                                   f"{e}") from e
        self._entries = {e["name"]: e for e in self.manifest["shards"]}
        for name in self._entries:
            if not (self.store_dir / SHARDS_DIR / name).is_dir():
                raise StoreFormatError(f"{self.store_dir}: shard {name!r} listed in the manifest "
                                       "is missing")
        if verify_checksums:
            for entry in self._entries.values():
                problems = _checksum_problems(self.store_dir, entry)
                if problems:
                    raise StoreFormatError(f"{self.store_dir}: " + "; ".join(problems))
        self._shards: dict[str, _ShardIndex] = {}
        self._where: dict[str, tuple[str, int]] | None = None

    def _shard(self, name: str) -> _ShardIndex:
        if name not in self._entries:
            raise KeyError(f"{self.store_dir}: no shard {name!r}")
        if name not in self._shards:
            self._shards[name] = _ShardIndex(self.store_dir, self._entries[name], self.specs)
        return self._shards[name]

    def __len__(self) -> int:
        return int(self.manifest["n_samples"])

    def shard_sizes(self) -> dict[str, int]:
        """Shard name -> number of samples, in manifest order (from the manifest, no I/O)."""
        return {n: int(e["n_samples"]) for n, e in self._entries.items()}

    def sample_ids(self) -> list[str]:
        """All sample ids, shard by shard in manifest order, index order within a shard."""
        return [sid for n in self._entries for sid in self._shard(n).sample_ids]

    def index_column(self, name: str) -> dict[str, np.ndarray]:
        """Shard name -> one per-sample metadata column of its index (e.g. ``length``), in index order."""
        out = {}
        for n in self._entries:
            meta = self._shard(n).meta
            if name not in meta.column_names:
                raise StoreFormatError(f"{self.store_dir}: shard {n!r}: the index has no column {name!r} "
                                       f"(columns: {meta.column_names})")
            out[n] = meta.column(name).to_numpy()
        return out

    def _locate(self, sample_id: str) -> tuple[str, int]:
        if self._where is None:
            where: dict[str, tuple[str, int]] = {}
            for n in self._entries:
                for i, sid in enumerate(self._shard(n).sample_ids):
                    if sid in where:
                        raise StoreFormatError(f"{self.store_dir}: sample {sid!r} appears in "
                                               f"shard {where[sid][0]!r} and shard {n!r}")
                    where[sid] = (n, i)
            self._where = where
        try:
            return self._where[sample_id]
        except KeyError:
            raise KeyError(f"{self.store_dir}: no sample {sample_id!r}") from None

    def shard_of(self, sample_id: str) -> str:
        return self._locate(sample_id)[0]

    def get(self, sample_id: str) -> StoredSample:
        name, i = self._locate(sample_id)
        return self.read_block(name, i, i + 1)[0]

    def read_block(self, shard_name: str, start_idx: int, stop_idx: int) -> list[StoredSample]:
        """Samples [start_idx, stop_idx) of a shard, with ONE zarr read per array for the whole
        block (its rows are contiguous). Returned arrays are views into that block's buffers."""
        sh = self._shard(shard_name)
        n = len(sh.sample_ids)
        if not (0 <= start_idx <= stop_idx <= n):
            raise IndexError(f"shard {shard_name!r}: block [{start_idx}, {stop_idx}) outside "
                             f"[0, {n})")
        if start_idx == stop_idx:
            return []
        per_array: dict[str, list[np.ndarray]] = {}
        for a, arr in sh.arrays.items():
            starts = sh.starts[a][start_idx:stop_idx]
            lens = sh.lens[a][start_idx:stop_idx]
            lo, hi = int(starts[0]), int(starts[-1] + lens[-1])
            try:
                block = self._rows(shard_name, a, arr, lo, hi)
            except Exception as e:  # a corrupt chunk surfaces as a codec error of any type
                raise StoreFormatError(f"{self.store_dir}: shard {shard_name!r}: "
                                       f"{ARRAYS_DIR}/{a} rows [{lo}, {hi}) unreadable: {e}") from e
            rel = starts - lo
            per_array[a] = [block[s:s + ln] for s, ln in zip(rel.tolist(), lens.tolist())]
        metas = sh.meta_rows(start_idx, stop_idx)
        return [
            StoredSample(sample_id=sh.sample_ids[start_idx + j], meta=metas[j],
                         arrays={a: per_array[a][j] for a in sh.arrays})
            for j in range(stop_idx - start_idx)
        ]

    def _rows(self, shard_name: str, name: str, arr, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of one array: straight from zarr, or (with a cache) cut from whole decoded
        inner chunks, each decoded once while it stays in the cache. Zarr decodes a whole inner
        chunk (about DEFAULT_CHUNK_BYTES) for any read inside it, and a read costs about 1 ms of
        call overhead however few its rows, so a block of samples that needs a few KB of each array
        pays for the chunk; the cache pays it once per chunk."""
        spec = self.specs[name]
        if hi <= lo:
            return np.empty((0, *spec.row_shape), dtype=spec.dtype)
        if not self._cache.max_bytes:
            return arr[lo:hi]
        per = int(arr.chunks[0])
        if per * spec.row_bytes > self._cache.max_bytes:  # would never stay: read just the rows
            return arr[lo:hi]
        parts = []
        for c in range(lo // per, (hi - 1) // per + 1):
            key = (shard_name, name, c)
            rows = self._cache.get(key)
            if rows is None:
                rows = arr[c * per : min((c + 1) * per, arr.shape[0])]
                rows.flags.writeable = False  # shared by every block cut from it
                self._cache.put(key, rows, rows.nbytes)
            parts.append(rows[max(lo - c * per, 0) : hi - c * per])
        return parts[0] if len(parts) == 1 else np.concatenate(parts)

    def skipped(self) -> list[SkippedRecord]:
        """Every skipped-sample record of the store, shard by shard."""
        out = []
        for name in self._entries:
            path = self.store_dir / SHARDS_DIR / name / SKIPPED_NAME
            try:
                t = pq.read_table(path)
                rows = t.select(["sample_id", "reason", "detail"]).to_pylist()
            except (OSError, KeyError, pa.ArrowException) as e:
                raise StoreFormatError(f"{self.store_dir}: shard {name!r}: {SKIPPED_NAME} "
                                       f"unreadable: {e}") from e
            out += [SkippedRecord(name, r["sample_id"], r["reason"], r["detail"]) for r in rows]
        return out


def verify_store(store_dir: str | os.PathLike) -> list[str]:
    """Every problem found in a store (empty list: OK). Checks the manifest and its version;
    each listed shard exists and is complete; sizes and sha256 of every file; no unlisted files or
    shards; index columns, sample counts, offsets tiling each array; arrays' dtypes and row shapes
    against the manifest's specs; skipped counts; sample ids unique across shards."""
    store = Path(store_dir)
    try:
        m = read_manifest(store)
    except StoreFormatError as e:
        return [str(e)]
    problems: list[str] = []
    try:
        specs = {n: ArraySpec.from_json(s) for n, s in m["arrays"].items()}
    except (KeyError, TypeError, ValueError) as e:
        return [f"{store / MANIFEST_NAME}: bad 'arrays' entry: {e}"]

    listed = [e.get("name") for e in m["shards"]]
    for name in sorted(set(list_complete_shards(store)) - set(listed)):
        problems.append(f"shard {name!r}: present on disk but not listed in the manifest")
    for name in list_partial_shards(store):
        problems.append(f"shard {name!r}: a {PARTIAL_SUFFIX} directory is left over")

    seen: dict[str, str] = {}  # stored sample id -> first shard holding it
    skipped_in: dict[str, str] = {}  # skipped sample id -> shard
    n_total = n_skipped_total = 0
    for entry in m["shards"]:
        name = entry.get("name")
        shard_dir = store / SHARDS_DIR / str(name)
        if not shard_dir.is_dir():
            extra = (f" (only {name}{PARTIAL_SUFFIX} exists: incomplete)"
                     if (store / SHARDS_DIR / f"{name}{PARTIAL_SUFFIX}").is_dir() else "")
            problems.append(f"shard {name!r}: listed in the manifest but missing{extra}")
            continue
        if not (shard_dir / SHARD_JSON).is_file():
            problems.append(f"shard {name!r}: no {SHARD_JSON} (incomplete shard)")
            continue
        try:
            problems += _checksum_problems(store, entry)
            n_total += int(entry["n_samples"])
            n_skipped_total += int(entry["n_skipped"])
        except (KeyError, TypeError) as e:
            problems.append(f"shard {name!r}: manifest entry lacks {e}")
            continue

        try:
            sh = _ShardIndex(store, entry, specs)
        except StoreFormatError as e:
            problems.append(str(e))
            sh = None
        except (KeyError, TypeError, ValueError) as e:
            problems.append(f"shard {name!r}: malformed manifest entry or index: {e!r}")
            sh = None
        if sh is not None:
            for sid in sh.sample_ids:
                if sid in seen:
                    problems.append(f"shard {name!r}: sample {sid!r} also in shard {seen[sid]!r}")
                seen.setdefault(sid, name)

        try:
            sk = pq.read_table(shard_dir / SKIPPED_NAME)
            if sk.num_rows != entry["n_skipped"]:
                problems.append(f"shard {name!r}: {SKIPPED_NAME}: expected {entry['n_skipped']} "
                                f"records (manifest), found {sk.num_rows}")
            for sid in sk.column("sample_id").to_pylist():
                skipped_in.setdefault(sid, name)
        except (OSError, KeyError, pa.ArrowException) as e:
            problems.append(f"shard {name!r}: {SKIPPED_NAME} unreadable: {e}")

    for sid, name in skipped_in.items():
        if sid in seen:
            problems.append(f"shard {name!r}: skipped sample {sid!r} is also stored in shard "
                            f"{seen[sid]!r}")
    if n_total != m["n_samples"]:
        problems.append(f"{store / MANIFEST_NAME}: n_samples {m['n_samples']} but shards sum to "
                        f"{n_total}")
    if n_skipped_total != m.get("n_skipped"):
        problems.append(f"{store / MANIFEST_NAME}: n_skipped {m.get('n_skipped')} but shards sum "
                        f"to {n_skipped_total}")
    return problems
