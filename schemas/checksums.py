"""Sizes and sha256 of a shard's files against its manifest entry (used by the reader and by verify)."""

from __future__ import annotations

from pathlib import Path

from schemas.io import file_sha256
from schemas.layout import SHARD_JSON, SHARDS_DIR, _shard_files


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
