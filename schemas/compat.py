"""Open a teacher store for a consumer, and refuse a student that cannot use it (DESIGN.md §4
temperature, §5.1 reuse).

:func:`open_store` is the one way Stage 2 and the tools open a store: it reads the manifest once
(format version), checks every file's checksum when asked, and with a student's processor makes
every compatibility refusal, once.

A store serves any student whose tokenizer fingerprint and chat template equal the teacher's: then
every text token of a sample is the same id at a position the segment spans can map (``stage2_student.data.remap``).
What is *not* compared, on purpose:

* the embedding matrix size: padded rows (e.g. 152064 vs 151936) are a property of the model, not
  of the tokenizer (``tokenizer_fingerprint`` hashes vocabulary, merges and special tokens only);
  what matters is that every stored id is a real token of the student (`check_ids_in_vocab`);
* the image processor: a student may see the image on another grid; its geometry is mapped per
  sample in ``stage2_student.data.remap`` (any grid by overlap area; another tiling is refused
  naming both layouts).

Temperature is fixed at dump time: training at another one is refused, never approximated.
"""

from __future__ import annotations

import math
import os

from schemas.errors import IncompatibleStudentError
from schemas.fingerprints import chat_template_fingerprint, tokenizer_fingerprint
from schemas.manifest import Manifest
from schemas.reader import StoreReader


def open_store(store_dir: str | os.PathLike, processor=None, temperature: float | None = None,
               verify_checksums: bool = False, cache_bytes: int = 0) -> StoreReader:
    """The reader of a complete store, every refusal made here and once.

    Args:
        processor: the student's processor; when given, the store must serve it (``check_compatible``).
        temperature: the training temperature, checked against the dump's (with ``processor``).
        verify_checksums: check the size and sha256 of every file first.
        cache_bytes: bound of the reader's cache of decoded chunks (0: none).
    """
    reader = StoreReader(store_dir, verify_checksums=verify_checksums, cache_bytes=cache_bytes)
    if processor is not None:
        check_compatible(reader.manifest, processor, temperature)
    return reader


def check_compatible(manifest: Manifest, student_processor, temperature: float | None = None) -> None:
    """Raise IncompatibleStudentError unless the student can train on the store of ``manifest``.

    Checks, in order: tokenizer fingerprint, chat template fingerprint, and (when ``temperature`` is
    given) the training temperature against the dump temperature ``signals.temperature``.
    """
    store_tok = manifest.tokenizer_fingerprint
    student_tok = tokenizer_fingerprint(student_processor.tokenizer)
    if store_tok != student_tok:
        raise IncompatibleStudentError(
            f"the store's teacher tokenizer {store_tok[:12]} vs the student's {student_tok[:12]}; "
            "a store serves only students with the teacher's tokenizer (same vocabulary, merges and "
            "special tokens; padded embedding rows are fine)"
        )
    store_tpl = manifest.chat_template_fingerprint
    student_tpl = chat_template_fingerprint(student_processor)
    if store_tpl != student_tpl:
        raise IncompatibleStudentError(
            f"the store's teacher chat template {store_tpl[:12]} vs the student's {student_tpl[:12]}; "
            "a store serves only students with the teacher's chat template (the token sequences would differ)"
        )
    if temperature is not None:
        dumped = manifest.temperature
        if not math.isclose(float(temperature), dumped, rel_tol=1e-9, abs_tol=0.0):
            raise IncompatibleStudentError(
                f"trained at τ={float(temperature)} but the store was dumped at τ={dumped}; "
                f"re-dump or train at {dumped}"
            )


def check_ids_in_vocab(max_id: int, student_vocab_size: int, where: str = "the store") -> None:
    """Every stored token id must index a row of the student's vocabulary (``0 <= id < size``).

    ``student_vocab_size``: the number of real tokens (``len(tokenizer)``) for the strict check of
    DESIGN 5.1, or the student's output-embedding rows when padded rows may be targeted.
    """
    if max_id >= student_vocab_size:
        raise IncompatibleStudentError(
            f"{where} holds token id {max_id} but the student's vocabulary has {student_vocab_size} tokens "
            f"(ids 0..{student_vocab_size - 1}); every stored id must be a real token of the student"
        )
