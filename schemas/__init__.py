"""schemas: the teacher store's format, the ground floor (DESIGN.md section 5; docs/architecture.md).

    errors        the product's error roots (PipelineError, StoreFormatError, IncompatibleStudentError)
    io            canonical JSON, sha256, the atomic writer
    layout        directory and file names, ArraySpec, shard records, shard listing
    meta_columns  per-sample metadata in Parquet columns
    codecs        how arrays are stored: StoreCodecs, TopkCodec (the compact profile), completion_kl
    writer        ShardWriter: one shard, written once, renamed when complete (encodes through codecs)
    manifest      manifest.json: write_manifest, read_manifest, the typed Manifest
    checksums     sizes and sha256 of a shard's files
    reader        StoreReader: samples and blocks of samples (decoded), with a chunk cache
    verify        structural verification of a store
    signals       what the teacher stores: array layout, SampleSignals, pack/unpack
    fingerprints  identities recorded in a manifest (tokenizer, chat template, processor, model, data)
    compat        open_store; refusals of a student that cannot use a store

Nothing here imports from the floors above (``pipeline``, the stages, the tools).
"""

from schemas.compat import check_compatible, check_ids_in_vocab, open_store
from schemas.errors import IncompatibleStudentError, PipelineError, StoreFormatError
from schemas.io import atomic_write_text, file_sha256, fingerprint
from schemas.layout import (
    FORMAT_VERSION,
    ArraySpec,
    ShardInfo,
    SkippedRecord,
    StoredSample,
    list_complete_shards,
    list_partial_shards,
    remove_partial_shards,
    shard_name,
)
from schemas.manifest import Manifest, read_manifest, write_manifest
from schemas.meta_columns import json_field
from schemas.reader import StoreReader
from schemas.verify import verify_store
from schemas.writer import ShardWriter

__all__ = [
    "FORMAT_VERSION",
    "ArraySpec",
    "IncompatibleStudentError",
    "Manifest",
    "PipelineError",
    "ShardInfo",
    "ShardWriter",
    "SkippedRecord",
    "StoredSample",
    "StoreFormatError",
    "StoreReader",
    "atomic_write_text",
    "check_compatible",
    "check_ids_in_vocab",
    "file_sha256",
    "fingerprint",
    "json_field",
    "list_complete_shards",
    "list_partial_shards",
    "open_store",
    "read_manifest",
    "remove_partial_shards",
    "shard_name",
    "verify_store",
    "write_manifest",
]
