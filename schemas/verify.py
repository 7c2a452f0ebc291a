"""Structural verification of a store: every problem found, as a list of messages naming the shard,
file or sample (the signals' own semantics are checked by ``schemas.signal_checks``).
"""

from __future__ import annotations

import os
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq

from schemas.checksums import _checksum_problems
from schemas.errors import StoreFormatError
from schemas.io import settings_diff
from schemas.layout import CALIBRATION_FILE, MANIFEST_NAME, PARTIAL_SUFFIX, SETTINGS_FILE, SHARD_JSON, SHARDS_DIR, SKIPPED_NAME, ArraySpec, list_complete_shards, list_partial_shards
from schemas.manifest import Manifest, read_calibration, read_json_file, read_manifest
from schemas.reader import _ShardIndex


def verify_store(store_dir: str | os.PathLike) -> list[str]:
    """Every problem found in a store (empty list: OK). Checks the manifest and its version;
    each listed shard exists and is complete; sizes and sha256 of every file; no unlisted files or
    shards; index columns, sample counts, offsets tiling each array; arrays' dtypes and row shapes
    against the manifest's specs; skipped counts; sample ids unique across shards; a teacher
    store's ``dump.json`` and ``calibration.json``, when present, against the manifest."""
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
            sh = _ShardIndex(store, entry, specs, check_files=False)  # missing files: reported above
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
    return problems + _side_file_problems(store, m)


def _side_file_problems(store: Path, m: Manifest) -> list[str]:
    """``dump.json`` (the settings a resume checks) and ``calibration.json`` (the layers it reuses)
    must say what the manifest says; either may be absent (a generic store, named layers)."""
    problems: list[str] = []
    path = store / SETTINGS_FILE
    if path.is_file():
        try:
            settings = read_json_file(path)
            if not isinstance(settings, dict):
                raise StoreFormatError(f"{path}: expected a JSON object, found {type(settings).__name__}")
            recorded = {k: m.get(k) for k in settings}
            problems += [f"{path}: {d}" for d in settings_diff(settings, recorded, SETTINGS_FILE, MANIFEST_NAME)]
        except StoreFormatError as e:
            problems.append(str(e))
    try:
        calibration = read_calibration(store)
    except StoreFormatError as e:
        return problems + [str(e)]
    if calibration is not None:
        layers, irs = calibration
        recorded = m.optional("saliency") or {}
        table = recorded.get("irs") or {}
        if layers != recorded.get("layers") or irs != {int(k): v for k, v in table.items()}:
            problems.append(f"{store / CALIBRATION_FILE}: layers {layers} and the IRS table differ from "
                            f"the manifest's saliency entry (layers {recorded.get('layers')})")
    return problems
