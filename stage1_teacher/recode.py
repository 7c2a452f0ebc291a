"""Re-store a complete teacher store under another profile (``signals.codec``) without the teacher.

Every sample is read back (decoded) and written again through the codecs of the new profile, shard
by shard with the same names, samples and skip records; the manifest keeps every setting of the
source except ``signals.codec``. Recoding an ``exact`` store gives the arrays a ``compact`` dump of
the same teacher writes (the encoder sees the same exact rows), which is how ``bench/store_bytes.py``
measures a profile's bytes and fidelity at several settings from one teacher run. A store that is
itself lossy (``compact``) can be recoded, but what it dropped does not come back.
"""

from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from schemas.layout import MANIFEST_NAME
from schemas.manifest import Manifest, write_manifest
from schemas.reader import StoreReader
from schemas.signals import META_SCHEMA, saliency_coverage, signal_bytes, store_codecs
from schemas.writer import ShardWriter
from stage1_teacher.config import CodecConfig

# Samples per read: one zarr read per array per block.
BLOCK_SAMPLES = 256
# Entries write_manifest recomputes (the rest of the source manifest is carried over).
_RECOMPUTED = ("format_version", "arrays", "codecs", "shards", "n_samples", "n_skipped", "skipped_reasons",
               "settings_sha256", "signal_bytes")


def recode(src: str | Path, dst: str | Path, codec: CodecConfig) -> Manifest:
    """Write ``dst`` (a new directory) holding ``src``'s samples stored with ``codec``'s profile."""
    src, dst = Path(src), Path(dst)
    if (dst / MANIFEST_NAME).exists() or (dst.exists() and any(dst.iterdir())):
        raise FileExistsError(f"{dst}: the recoded store needs a new, empty directory")
    reader = StoreReader(src)
    m = reader.manifest
    codecs = store_codecs(codec.profile, reader.specs, m.vocab_size, codec.max_kl, codec.logprob_step, codec.max_dropped)
    skipped: dict[str, list] = {}
    for rec in reader.skipped():
        skipped.setdefault(rec.shard, []).append(rec)
    for shard, n in reader.shard_sizes().items():
        with ShardWriter(dst, shard, reader.specs, META_SCHEMA, codecs=codecs) as writer:
            for lo in range(0, n, BLOCK_SAMPLES):
                for s in reader.read_block(shard, lo, min(n, lo + BLOCK_SAMPLES)):
                    writer.add(s.sample_id, s.meta, s.arrays)
            for rec in skipped.get(shard, []):
                writer.add_skipped(rec.sample_id, rec.reason, rec.detail)
    doc = {k: v for k, v in m.items() if k not in _RECOMPUTED}
    doc["signals"] = {**doc.get("signals", {}), "codec": asdict(codec)}
    doc["signal_bytes"] = signal_bytes(dst)
    if "saliency" in doc:
        doc["saliency"] = {**doc["saliency"], **saliency_coverage(dst)}
    return write_manifest(dst, doc, shards=list(reader.shard_sizes()))
