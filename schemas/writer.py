"""Writes one shard of a store (see ``schemas.layout`` for the layout): zarr arrays, the Parquet index,
the skip table and ``shard.json``, renamed from ``.partial`` when complete.
"""

from __future__ import annotations

import dataclasses
import os
import shutil
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from zarr.codecs import Crc32cCodec, ZstdCodec

from schemas.codecs import CODECS_KEY, StoreCodecs
from schemas.io import _dumps, _fsync_path, atomic_write_text, file_sha256
from schemas.layout import (
    ARRAYS_DIR,
    FORMAT_VERSION,
    INDEX_NAME,
    PARTIAL_SUFFIX,
    SHARD_JSON,
    SHARDS_DIR,
    SKIPPED_NAME,
    ArraySpec,
    ShardInfo,
    _ARRAY_NAME_RE,
    _SHARD_NAME_RE,
    _shard_files,
)
from schemas.meta_columns import _is_json_field, _json_text, _kind_field, _merge_kinds, _reserved_column, _value_kind

# Inner chunks hold about this many uncompressed bytes when rows_per_chunk is not given: large
# enough that a block of consecutive samples is one or two chunk reads, small enough that a single
# get() does not decompress much more than it needs.
DEFAULT_CHUNK_BYTES = 1 << 20
# Chunks per chunk file: 32 x 1 MiB keeps a shard of ~1 GiB of logits to ~32 files per array;
# the writer buffers at most one chunk file per array in memory.
DEFAULT_CHUNKS_PER_FILE = 32
# Inner-chunk codec chain after the bytes serializer: zstd, then a CRC32C of the compressed bytes.
CHUNK_COMPRESSORS = (ZstdCodec(), Crc32cCodec())


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
        codecs: StoreCodecs | None = None,
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
            codecs: how arrays are stored (``schemas.codecs``); ``add`` takes the decoded arrays of
                ``specs`` and stores what the codecs make of them. None: every array as it is.
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
        self.codecs = codecs or StoreCodecs()
        self.decoded_specs = dict(sorted(specs.items()))
        # The arrays on disk: the decoded ones, or what their codecs store them as.
        self.specs = dict(sorted(self.codecs.stored_specs(self.decoded_specs).items()))
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
            if n not in self.decoded_specs:
                raise ValueError(f"{where}: array {n!r} is not declared (declared: "
                                 f"{sorted(self.decoded_specs)})")
            spec = self.decoded_specs[n]
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
        if self.codecs:
            try:
                arrays = self.codecs.encode(arrays)
            except ValueError as e:
                raise ValueError(f"{where}: {e}") from e

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
            **({CODECS_KEY: self.codecs.to_json()} if self.codecs else {}),
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
