"""``manifest.json``: written last and atomically by :func:`write_manifest`, loaded and checked by
:func:`read_manifest` into the one typed :class:`Manifest`.

Every reader of a manifest goes through :class:`Manifest`: the store's own entries (format version,
arrays, shards, counts) are checked when it is read; the teacher store's entries (DESIGN.md §5:
teacher identity, tokenizer and chat template fingerprints, dump settings, saliency layers) are
typed properties, each checked when first used, so a generic store (tests, tools) still opens and a
missing teacher entry is refused naming its key.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from pathlib import Path
from typing import Any, Iterable

from schemas.codecs import CODECS_KEY, StoreCodecs
from schemas.errors import StoreFormatError
from schemas.io import _dumps, atomic_write_text, file_sha256, fingerprint, writing
from schemas.layout import (
    CALIBRATION_FILE,
    FORMAT_VERSION,
    MANIFEST_NAME,
    SHARD_JSON,
    SHARDS_DIR,
    list_complete_shards,
    list_partial_shards,
)

_RESERVED_MANIFEST_KEYS = ("format_version", "arrays", "shards", "n_samples", "n_skipped",
                           "skipped_reasons", "settings_sha256")
# Written by write_manifest too, but hashed with the settings: the codecs say how to decode the
# arrays, so an edited codec parameter (a quantisation step) is refused like an edited setting.
_WRITTEN_KEYS = (*_RESERVED_MANIFEST_KEYS, CODECS_KEY)


def _sha256_or_none(doc: dict) -> str | None:
    """``fingerprint(doc)``, or None for a document that cannot be hashed (a NaN typed into a file)."""
    try:
        return fingerprint(doc)
    except ValueError:
        return None


def _settings_sha256(doc: dict) -> str | None:
    """sha256 of the caller's entries of a manifest (all but the reserved ones)."""
    return _sha256_or_none({k: v for k, v in doc.items() if k not in _RESERVED_MANIFEST_KEYS})


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
                   shards: Iterable[str] | None = None) -> Manifest:
    """Write `manifest.json` last and atomically; return what was written.

    `manifest` holds the caller's entries (teacher identity, fingerprints, settings), passed
    through untouched. Added: `settings_sha256` (of those entries; `read_manifest` checks it, so
    an edited setting, a temperature or the saliency layers, is refused), `format_version`,
    `arrays` (name -> spec), `shards` (per shard: name, n_samples, n_skipped, skipped_reasons,
    rows, bytes, files {path: {bytes, sha256}}, shard_json {bytes, sha256}), and totals
    `n_samples`, `n_skipped`, `skipped_reasons`.
    `shards` selects shard names (default: every complete shard). Refused while `.partial` shards
    exist, or when shards disagree on the array specs.
    """
    store = Path(store_dir)
    clash = [k for k in _WRITTEN_KEYS if k in manifest]
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
    codecs: list | None = None
    arrays_from = None
    entries = []
    reasons: Counter = Counter()
    for name in names:
        d = _read_shard_json(store, name)
        if arrays is None:
            arrays, codecs, arrays_from = d["arrays"], d.get(CODECS_KEY), name
        elif d["arrays"] != arrays:
            raise StoreFormatError(f"{store}: shard {name!r} has arrays {d['arrays']}, but shard "
                                   f"{arrays_from!r} has {arrays}")
        elif d.get(CODECS_KEY) != codecs:
            raise StoreFormatError(f"{store}: shard {name!r} has codecs {d.get(CODECS_KEY)}, but shard "
                                   f"{arrays_from!r} has {codecs}")
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

    out = {**manifest, **({CODECS_KEY: codecs} if codecs else {})}
    out.update({
        "settings_sha256": _settings_sha256(out),
        "format_version": FORMAT_VERSION,
        "arrays": arrays or {},
        "shards": entries,
        "n_samples": sum(e["n_samples"] for e in entries),
        "n_skipped": sum(e["n_skipped"] for e in entries),
        "skipped_reasons": dict(sorted(reasons.items())),
    })
    with writing(str(store / MANIFEST_NAME)):  # a full disk: the complete shards stay, for a re-run
        atomic_write_text(store / MANIFEST_NAME, _dumps(out))
    return Manifest(store / MANIFEST_NAME, out)


class Manifest(dict):
    """A store's ``manifest.json``: the document itself (a ``dict``, as written, so it serialises and
    hashes like the file) plus typed, checked properties for everything the product reads from it.

    Code reads the properties (or :meth:`value`, which refuses a missing key naming it);
    :meth:`optional` serves tools that report a missing entry instead of refusing.
    """

    def __init__(self, path: Path, doc: dict) -> None:
        super().__init__(doc)
        self.path = Path(path)

    def value(self, *keys: str) -> Any:
        """``self[k0][k1]...``; a missing key is a format problem of the store, named as such."""
        value: Any = self
        for i, k in enumerate(keys):
            if not isinstance(value, dict) or k not in value:
                raise StoreFormatError(f"store manifest {self.path} has no {'.'.join(keys[: i + 1])!r}; "
                                       "not a teacher store of this format")
            value = value[k]
        return value

    def optional(self, *keys: str) -> Any:
        """``self[k0][k1]...``, or None where a key is missing (for tools that report, not refuse)."""
        value: Any = self
        for k in keys:
            if not isinstance(value, dict) or k not in value:
                return None
            value = value[k]
        return value

    # -- the store's own entries (checked by read_manifest) --
    @property
    def n_samples(self) -> int:
        return int(self["n_samples"])

    @property
    def n_skipped(self) -> int:
        return int(self.get("n_skipped", 0))

    @property
    def skipped_reasons(self) -> dict[str, int]:
        return dict(self.get("skipped_reasons") or {})

    @property
    def shards(self) -> list[dict]:
        return list(self["shards"])

    @property
    def array_names(self) -> list[str]:
        """The arrays on disk (with codecs, their stored arrays; see :attr:`decoded_arrays`)."""
        return list(self["arrays"])

    @property
    def codecs(self) -> StoreCodecs:
        """How the arrays are stored (none: as they are); a codec this version does not know is refused."""
        return StoreCodecs.from_json(self.get(CODECS_KEY), str(self.path))

    @property
    def decoded_arrays(self) -> list[str]:
        """The arrays every reader sees (``StoreReader`` decodes the stored ones)."""
        return list(self.codecs.decoded_specs({n: None for n in self["arrays"]}))

    # -- the teacher store's entries (DESIGN.md §5) --
    @property
    def tokenizer_fingerprint(self) -> str:
        return str(self.value("tokenizer", "fingerprint"))

    @property
    def chat_template_fingerprint(self) -> str:
        return str(self.value("chat_template_fingerprint"))

    @property
    def chat_template(self) -> str | None:
        return self.value("chat_template")

    @property
    def vocab_size(self) -> int:
        """Real tokens of the teacher's tokenizer: every stored id is below it (padded head rows masked)."""
        return int(self.value("tokenizer", "size"))

    @property
    def teacher(self) -> dict:
        """Teacher identity: path, model_type, config and weights fingerprints, dtype, text_layers."""
        return dict(self.value("teacher"))

    @property
    def teacher_text_layers(self) -> int:
        return int(self.value("teacher", "text_layers"))

    @property
    def dataset(self) -> dict:
        """The dump's data settings (path, image_root, split, max_length) and the data fingerprint."""
        return dict(self.value("dataset"))

    @property
    def max_length(self) -> int:
        return int(self.value("dataset", "max_length"))

    @property
    def signals(self) -> dict:
        """Every dump setting of the signals (``SignalsConfig`` as a dict)."""
        return dict(self.value("signals"))

    @property
    def temperature(self) -> float:
        return float(self.value("signals", "temperature"))

    @property
    def sampled_rows(self) -> list[str]:
        """The row kinds with a sampled target (``signals.sampled.rows``; a store dumped before that
        key existed has them for its response rows only): [] when the store has none."""
        if not self.value("signals", "sampled", "enabled"):
            return []
        rows = self.optional("signals", "sampled", "rows")
        return ["response"] if rows is None else [str(r) for r in rows]

    @property
    def has_sampled(self) -> bool:
        """The response rows have a sampled target (the KD one)."""
        return "response" in self.sampled_rows

    @property
    def has_transitions(self) -> bool:
        return bool(self.value("signals", "transitions", "enabled"))

    @property
    def saliency_layers(self) -> list[int]:
        return [int(x) for x in self.value("saliency", "layers")]

    @property
    def irs(self) -> dict[int, float] | None:
        """The IRS table of the calibration (layer -> score), or None when the layers were named."""
        table = self.value("saliency", "irs")
        return None if table is None else {int(k): float(v) for k, v in table.items()}

    @property
    def turns_with_images(self) -> int:
        return int(self.value("saliency", "turns_with_images"))

    @property
    def turns_without_map(self) -> int:
        """Turns of samples with images that cannot see a visual token: no saliency map, no IVA weight."""
        return int(self.value("saliency", "turns_without_map"))

    @property
    def signal_bytes(self) -> dict:
        return dict(self.get("signal_bytes") or {})


def read_manifest(store_dir: str | os.PathLike) -> Manifest:
    """Load and check `manifest.json` (presence, JSON, format version, required keys, and the
    checksum of its settings where it has one)."""
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
    # Stores written before the checksum existed have none and read as before.
    if "settings_sha256" in m and m["settings_sha256"] != _settings_sha256(m):
        raise StoreFormatError(f"{path}: the settings it records were edited after the dump "
                               "(settings_sha256 does not match them); the shards hold what the "
                               "recorded settings produced, so restore the manifest or dump again")
    return Manifest(path, m)


def read_json_file(path: Path) -> Any:
    """A JSON file of the store beside the manifest; unreadable is a format problem naming it."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise StoreFormatError(f"{path}: unreadable: {e}") from e


def write_calibration(store_dir: str | os.PathLike, layers: list[int], irs: dict[int, float]) -> None:
    """``calibration.json``: the IRS table and the chosen saliency layers, with a checksum, so a
    resume that would compute new shards with other layers than the complete ones can refuse."""
    doc = {"layers": list(layers), "irs": {str(k): v for k, v in irs.items()}}
    path = Path(store_dir) / CALIBRATION_FILE
    with writing(str(path)):
        atomic_write_text(path, _dumps({**doc, "sha256": fingerprint(doc)}))


def read_calibration(store_dir: str | os.PathLike) -> tuple[list[int], dict[int, float]] | None:
    """(layers, IRS table) from ``calibration.json``, or None when there is none. A file whose
    checksum does not match (edited since the calibration) is refused naming it; files written
    before the checksum existed have none and are read as they are."""
    path = Path(store_dir) / CALIBRATION_FILE
    if not path.is_file():
        return None
    doc = read_json_file(path)
    try:
        layers = [int(x) for x in doc["layers"]]
        irs = {int(k): float(v) for k, v in doc["irs"].items()}
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        raise StoreFormatError(f"{path}: not a calibration record (layers, irs): {e!r}") from e
    if "sha256" in doc and doc["sha256"] != _sha256_or_none({"layers": doc["layers"], "irs": doc["irs"]}):
        raise StoreFormatError(f"{path}: edited after the calibration (its sha256 does not match); "
                               "complete shards were computed with the layers it recorded. Restore "
                               "it, or delete the store to start over")
    return layers, irs
