"""Reads a complete store: :class:`StoreReader` (samples, blocks of consecutive samples, index
columns, skip tables) over lazily opened, checked shard indexes, with a bounded cache of decoded
chunks (:class:`LRUBytes`).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from schemas.checksums import _checksum_problems
from schemas.codecs import CodecError
from schemas.errors import StoreFormatError
from schemas.layout import (
    ARRAYS_DIR,
    INDEX_NAME,
    MANIFEST_NAME,
    SHARDS_DIR,
    SKIPPED_NAME,
    ArraySpec,
    SkippedRecord,
    StoredSample,
)
from schemas.manifest import read_manifest
from schemas.meta_columns import _is_json_field, _reserved_column


class _ShardIndex:
    """A loaded, checked shard: index table, offsets per array, and the open zarr arrays."""

    def __init__(self, store: Path, entry: dict, specs: dict[str, ArraySpec],
                 check_files: bool = True) -> None:
        """`check_files`: refuse a missing file the manifest lists (verify, which reports every
        file of the shard itself, turns it off)."""
        name = entry["name"]
        self.name = name
        self.dir = store / SHARDS_DIR / name
        self.where = where = f"{store}: shard {name!r}"
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
        self.chunk_files: dict[str, tuple[int, dict[int, str]]] = {}
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
            # Rows per chunk file, and chunk file index -> its path, for the files the manifest
            # lists. One it does not list was never written (zarr skips a chunk that is all fill
            # value), so reading zeros there is right.
            per, tail = int((arr.shards or arr.chunks)[0]), (0,) * (arr.ndim - 1)
            keys = {f: f"{ARRAYS_DIR}/{n}/{arr.metadata.encode_chunk_key((f, *tail))}"
                    for f in range(-(-arr.shape[0] // per))}
            self.chunk_files[n] = (per, {f: k for f, k in keys.items() if k in entry["files"]})
        # Zarr reads a missing chunk file as its fill value (zeros), which would pass for data: every
        # file the manifest lists must be here (a stat each, no hashing; `read_block` checks again
        # the chunk files each read needs, for files deleted after this open).
        missing = sorted(rel for rel in entry["files"] if not (self.dir / rel).is_file()) if check_files else []
        if missing:
            raise StoreFormatError(f"{where}: {_missing_file(missing[0])}"
                                   + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
        self.sample_ids: list[str] = table.column("sample_id").to_pylist()
        meta_names = [f.name for f in table.schema if not _reserved_column(f.name)]
        self.meta = table.select(meta_names)
        self.json_cols = {f.name for f in self.meta.schema if _is_json_field(f)}

    def check_chunk_files(self, name: str, lo: int, hi: int) -> None:
        """Refuse rows [lo, hi) of array `name` if a chunk file holding them, listed in the
        manifest, is gone (zarr would return its fill value)."""
        per, listed = self.chunk_files[name]
        for f in range(lo // per, (hi - 1) // per + 1):
            rel = listed.get(f)
            if rel is not None and not (self.dir / rel).is_file():
                raise StoreFormatError(f"{self.where}: {_missing_file(rel)}")

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


def _missing_file(rel: str) -> str:
    """The message for a missing file of a shard, naming its array when it is one of its chunk files."""
    parts = rel.split("/")
    if len(parts) > 2 and parts[0] == ARRAYS_DIR and parts[2] == "c":
        return (f"{ARRAYS_DIR}/{parts[1]}: chunk file {rel} is missing (listed in the manifest); "
                "its rows cannot be read")
    return f"file {rel} is missing (listed in the manifest)"


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


# Cache key tag of a sample's decoded arrays (beside (shard, array, chunk) keys of stored chunks).
_DECODED = "<decoded>"


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
            self.stored_specs = {n: ArraySpec.from_json(s) for n, s in self.manifest["arrays"].items()}
        except (KeyError, TypeError, ValueError) as e:
            raise StoreFormatError(f"{self.store_dir / MANIFEST_NAME}: bad 'arrays' entry: "
                                   f"{e}") from e
        # Arrays stored with a codec are decoded by read_block; `specs` are the arrays readers see.
        self.codecs = self.manifest.codecs
        self.specs = self.codecs.decoded_specs(self.stored_specs)
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
            self._shards[name] = _ShardIndex(self.store_dir, self._entries[name], self.stored_specs)
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
        block (its rows are contiguous). Returned arrays are views into that block's buffers, or,
        for arrays stored with a codec, the sample's decoded arrays."""
        sh = self._shard(shard_name)
        n = len(sh.sample_ids)
        if not (0 <= start_idx <= stop_idx <= n):
            raise IndexError(f"shard {shard_name!r}: block [{start_idx}, {stop_idx}) outside "
                             f"[0, {n})")
        if start_idx == stop_idx:
            return []
        # Arrays stored with a codec: with a cache, each sample's decoded arrays are kept (decoding
        # costs more than slicing), and a block whose samples are all there reads none of them.
        coded = self.codecs.stored_names
        count = stop_idx - start_idx
        decoded: list[dict | None] = [None] * count
        if coded and self._cache.max_bytes:
            decoded = [self._cache.get((shard_name, _DECODED, i)) for i in range(start_idx, stop_idx)]
        skip = coded if all(d is not None for d in decoded) else set()
        per_array: dict[str, list[np.ndarray]] = {}
        for a, arr in sh.arrays.items():
            if a in skip:
                continue
            starts = sh.starts[a][start_idx:stop_idx]
            lens = sh.lens[a][start_idx:stop_idx]
            lo, hi = int(starts[0]), int(starts[-1] + lens[-1])
            if hi > lo:
                sh.check_chunk_files(a, lo, hi)
            try:
                block = self._rows(shard_name, a, arr, lo, hi)
            except Exception as e:  # a corrupt chunk surfaces as a codec error of any type
                raise StoreFormatError(f"{self.store_dir}: shard {shard_name!r}: "
                                       f"{ARRAYS_DIR}/{a} rows [{lo}, {hi}) unreadable: {e}") from e
            rel = starts - lo
            per_array[a] = [block[s:s + ln] for s, ln in zip(rel.tolist(), lens.tolist())]
        todo = [j for j in range(count) if decoded[j] is None] if coded else []
        if todo:  # the samples not in the cache, decoded together
            try:
                fresh = self.codecs.decode_many({a: [per_array[a][j] for j in todo] for a in coded})
            except CodecError as e:
                sid = sh.sample_ids[start_idx + todo[e.sample or 0]]
                raise StoreFormatError(f"{self.store_dir}: shard {shard_name!r}: sample {sid!r}: {ARRAYS_DIR}: "
                                       f"{e}; the stored arrays do not decode") from e
            for j, d in zip(todo, fresh):
                if self._cache.max_bytes:
                    # its own copy (not a view that keeps the whole block's arrays alive), read-only:
                    # shared by every later read of the sample
                    d = {k: v.copy() for k, v in d.items()}
                    for v in d.values():
                        v.flags.writeable = False
                    self._cache.put((shard_name, _DECODED, start_idx + j), d, sum(v.nbytes for v in d.values()))
                decoded[j] = d
        metas = sh.meta_rows(start_idx, stop_idx)
        out = []
        for j in range(count):
            arrays = {a: per_array[a][j] for a in sh.arrays if a not in coded}
            out.append(StoredSample(sample_id=sh.sample_ids[start_idx + j], meta=metas[j],
                                    arrays=arrays | (decoded[j] or {})))
        return out

    def _rows(self, shard_name: str, name: str, arr, lo: int, hi: int) -> np.ndarray:
        """Rows [lo, hi) of one array: straight from zarr, or (with a cache) cut from whole decoded
        inner chunks, each decoded once while it stays in the cache. Zarr decodes a whole inner
        chunk (about DEFAULT_CHUNK_BYTES) for any read inside it, and a read costs about 1 ms of
        call overhead however few its rows, so a block of samples that needs a few KB of each array
        pays for the chunk; the cache pays it once per chunk."""
        spec = self.stored_specs[name]
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
