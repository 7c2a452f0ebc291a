"""One shard of a dump: its records in, one complete shard directory out.

A shard is the unit of work, of ownership (one worker writes it, start to finish) and of resume.
Used identically by the in-process executor and by each Ray actor.
"""

from __future__ import annotations

import logging
from typing import Callable

from pipeline.data import BadRecord, Record, SampleError, encode
from pipeline.data.records import TEACHER_ERROR
from pipeline.errors import PipelineError
from schemas.io import writing
from schemas.codecs import StoreCodecs
from schemas.signals import META_SCHEMA, pack
from schemas.layout import ArraySpec, ShardInfo
from schemas.writer import ShardWriter

log = logging.getLogger("stage1.shards")

# progress(samples_done, tokens_done) after each batch
ProgressFn = Callable[[int, int], None]


def dump_shard(
    teacher,
    store_dir: str,
    shard: str,
    records: list[Record | BadRecord],
    specs: dict[str, ArraySpec],
    max_length: int,
    batch_size: int,
    layers: list[int],
    progress: ProgressFn | None = None,
    codecs: StoreCodecs | None = None,
) -> ShardInfo:
    """Encode, run the teacher in batches, and write ``shard``; bad samples go to its skip table.

    Sample order in the shard is record order. A batch whose forward fails is retried one sample at
    a time so that only the sample that fails is skipped (reason ``teacher_error``). A write that
    fails (a full disk) stops the dump naming the shard; it stays ``.partial``, redone on resume.
    ``codecs``: how the store's arrays are stored (its profile; None: as they are).
    """
    with writing(f"shard {shard} of {store_dir}"), ShardWriter(store_dir, shard, specs, META_SCHEMA,
                                                                            codecs=codecs) as writer:
        pending: list = []  # encoded samples and skip records, in record order

        student: dict = {}  # with a proposer (candidates_from): each sample's encoding by the student's processor

        def flush() -> None:
            encoded = [p for p in pending if not isinstance(p, SampleError)]
            results = _signals_or_per_sample(teacher, encoded, layers, student or None)
            for item in pending:
                if isinstance(item, SampleError):
                    writer.add_skipped(item.skip_id, item.reason, item.detail)
                    continue
                sig = results[item.sample_id]
                if isinstance(sig, SampleError):
                    writer.add_skipped(sig.sample_id, sig.reason, sig.detail)
                else:
                    meta, arrays = pack(sig, specs)
                    writer.add(sig.sample_id, meta, arrays)
            if progress is not None:
                progress(len(pending), sum(e.length for e in encoded))
            pending.clear()
            student.clear()

        n_encoded = 0
        proposer = getattr(teacher, "proposer", None)
        for rec in records:
            if isinstance(rec, BadRecord):
                pending.append(rec.error)
                continue
            try:
                enc = encode(rec, teacher.processor, max_length)
                if proposer is not None:  # the student reads the record through its own processor
                    student[enc.sample_id] = proposer.encode(rec, max_length)
                pending.append(enc)
                n_encoded += 1
            except SampleError as e:
                pending.append(e)
            if n_encoded == batch_size:
                flush()
                n_encoded = 0
        if pending:
            flush()
    return writer.info  # set by the clean __exit__, which finalised the shard


def _signals_or_per_sample(teacher, encoded: list, layers: list[int], student: dict | None = None) -> dict:
    if not encoded:
        return {}
    try:
        extra = {} if student is None else {"student": student}
        return {s.sample_id: s for s in teacher.signals(encoded, layers, **extra)}
    except PipelineError:  # a setting is wrong, not a sample: stop the dump
        raise
    except Exception as batch_error:  # noqa: BLE001 - isolate the failing sample, then report it
        if len(encoded) == 1:
            log.warning("teacher failed on sample %s: %r", encoded[0].sample_id, batch_error, exc_info=True)
            return {encoded[0].sample_id: SampleError(encoded[0].sample_id, TEACHER_ERROR, repr(batch_error))}
        log.warning("teacher failed on a batch of %d (%r); retrying one by one", len(encoded), batch_error)
        out = {}
        for e in encoded:
            out |= _signals_or_per_sample(teacher, [e], layers, student)
        return out
