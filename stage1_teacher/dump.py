"""``pipeline run teacher-dump``: run the teacher once and write a complete, verified store.

Top to bottom: read the records, plan shards, check the store's settings (resume or refuse),
calibrate the saliency layer (IRS), run every incomplete shard (in-process or on Ray actors),
write the manifest last, print a summary.

Resume: settings go to ``dump.json`` before any shard is written. A re-run with equal settings
keeps complete shards, deletes partial ones and redoes them; with different settings it refuses
and names the settings that differ, unless no shard was begun (a run that failed early: nothing
was computed with the old settings, so the corrected ones replace them). Shard contents do not
depend on the worker count, the batch size or the order shards run in, so a resumed store equals
an uninterrupted one sample for sample.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from pathlib import Path

from pipeline import __version__
from pipeline.config import to_dict
from pipeline.data import BadRecord, iter_records
from pipeline.errors import PipelineError
from pipeline.locks import LOCK_NAME, output_lock
from pipeline.modeling.logits import real_vocab_size
from pipeline.modeling.probe import select_layers
from pipeline.processors import load_processor
from schemas.fingerprints import (
    ModelIdentity,
    chat_template_fingerprint,
    dataset_fingerprint,
    processor_fingerprint,
    tokenizer_fingerprint,
)
from schemas.io import atomic_write_text, settings_diff, writing
from schemas.layout import (
    CALIBRATION_FILE,
    MANIFEST_NAME,
    SETTINGS_FILE,
    STORE_KIND,
    list_complete_shards,
    list_partial_shards,
    remove_partial_shards,
    shard_name,
)
from schemas.manifest import (
    Manifest,
    read_calibration,
    read_json_file,
    read_manifest,
    write_calibration,
    write_manifest,
)
from schemas.signals import array_specs, saliency_coverage, signal_bytes, store_codecs
from stage1_teacher.config import CodecConfig, DumpConfig
from stage1_teacher.executors import make_executor
from stage1_teacher.proposer import candidates_provenance
from stage1_teacher.topk import DRAW_METHOD, SAMPLED_STREAMS

log = logging.getLogger("stage1.dump")

class StoreMismatchError(PipelineError):
    """An existing store was written with other settings; mixing would corrupt it."""


def store_settings(cfg: DumpConfig, teacher: ModelIdentity, processor) -> dict:
    """Everything that determines the store's contents (and nothing that does not, like workers)."""
    n_tokens = real_vocab_size(processor.tokenizer, teacher.head_rows, f"teacher {teacher.path}")
    return {
        "kind": STORE_KIND,
        "teacher": {
            "path": teacher.path,
            "model_type": teacher.model_type,
            "config_fingerprint": teacher.config_fingerprint,
            "weights_fingerprint": teacher.weights_fingerprint(),
            "dtype": cfg.teacher.dtype,
            "text_layers": teacher.text_layers,
        },
        "tokenizer": {"fingerprint": tokenizer_fingerprint(processor.tokenizer), "size": len(processor.tokenizer)},
        # Distributions are over the tokenizer's tokens; the head's padded rows are masked (§3.1).
        "vocabulary": {"tokens": n_tokens, "head_rows": teacher.head_rows, "masked_rows": teacher.head_rows - n_tokens},
        "chat_template_fingerprint": chat_template_fingerprint(processor),
        "chat_template": processor.chat_template,
        "processor_fingerprint": processor_fingerprint(processor),
        "dataset": {**to_dict(cfg.data), "fingerprint": dataset_fingerprint(cfg.data.path)},
        "signals": to_dict(cfg.signals),
        "shard_size": cfg.output.shard_size,
        "seed": cfg.seed,
    } | _candidates(cfg) | _draws(cfg)


def _draws(cfg: DumpConfig) -> dict:
    """The sampled targets' draw method, when they are stored: an older store (draws by another
    method, no entry) is refused on resume instead of mixing the two in one store. Visual and branch
    rows draw from their own seed streams (``topk.sample_seed``), recorded by name when they have
    draws; a store of response draws only keeps the settings it always had, so it still resumes
    (the rows themselves are ``signals.sampled.rows``, which a resume compares too)."""
    kinds = cfg.signals.sampled.kinds()
    if not kinds:
        return {}
    streams = {kind: SAMPLED_STREAMS[kind] for kind in kinds if kind != "response"}
    return {"sampled_draws": DRAW_METHOD} | ({"sampled_streams": streams} if streams else {})


def _candidates(cfg: DumpConfig) -> dict:
    """Where the TPA candidates come from, recorded only when a student proposes them (a store of
    the teacher's own candidates keeps the settings it always had, so older stores still resume)."""
    tc = cfg.signals.transitions
    return {"candidates": candidates_provenance(tc)} if tc.enabled and tc.candidates_from is not None else {}


def _own_file(name: str) -> bool:
    """A file a run of this job leaves in a directory before it is a store: the run's own lock, the
    temporary of an interrupted atomic write of dump.json, a write probe."""
    return name == LOCK_NAME or (name.startswith(f".{SETTINGS_FILE}.") and name.endswith(".tmp")) or name.startswith(".write-probe-")


def check_or_claim_store(store: Path, settings: dict) -> None:
    """Write the settings to a new store, or check them against an existing one.

    Other settings are refused once a shard was begun: mixing would corrupt the store. Before
    that (a first run that failed early: a missing data path, no IRS pair to calibrate on) no
    signal was computed with them, so a corrected re-run replaces them, and the calibration too.
    """
    path = store / SETTINGS_FILE
    if store.exists() and not store.is_dir():
        raise PipelineError(f"output.dir {store} exists and is not a directory")
    if path.is_file():
        existing = read_json_file(path)
        if isinstance(existing, dict) and isinstance(existing.get("signals"), dict):
            # a store begun before profiles existed was written exact (the default)
            existing["signals"].setdefault("codec", to_dict(CodecConfig()))
            # one begun before sampled rows could be chosen drew them for the response rows only
            if isinstance(existing["signals"].get("sampled"), dict):
                existing["signals"]["sampled"].setdefault("rows", ["response"])
        diff = settings_diff(existing, settings, "store", "this run") if isinstance(existing, dict) else [
            f"{SETTINGS_FILE}: not a JSON object"]
        if not diff:
            return
        if list_complete_shards(store) or list_partial_shards(store) or (store / MANIFEST_NAME).exists():
            raise StoreMismatchError(
                f"{store} was written with other settings; refusing to mix. Use another output.dir, or delete "
                "the store to start over. Differences:\n  " + "\n  ".join(diff)
            )
        log.warning("%s holds the settings of a run that wrote no shard; replacing them:\n  %s", path, "\n  ".join(diff))
        with writing(f"output.dir {store}"):
            (store / CALIBRATION_FILE).unlink(missing_ok=True)
    elif store.exists() and any(not _own_file(p.name) for p in store.iterdir()):
        raise StoreMismatchError(f"{store} exists, is not empty and is not a teacher store (no {SETTINGS_FILE})")
    with writing(f"output.dir {store}"):
        store.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True))


def check_writable(store: Path) -> None:
    """Refuse an output directory that cannot take files (read-only, full) before any work."""
    with writing(f"output.dir {store}"):
        probe = store / f".write-probe-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()


def run(cfg: DumpConfig) -> dict:
    # One writer per store: a second dump on this directory is refused, naming the running one.
    with output_lock(cfg.output.dir, "teacher-dump"):
        return _run(cfg)


def _run(cfg: DumpConfig) -> dict:
    t0 = time.time()
    store = Path(cfg.output.dir)
    # The teacher's config is read once, and its processor loaded once per process (an in-process
    # executor's teacher takes this one; a Ray actor loads its own).
    teacher = ModelIdentity.read(cfg.teacher.path)
    processor = load_processor(cfg.teacher.path, teacher.model_type)
    cfg.signals.check_vocabulary(len(processor.tokenizer), cfg.teacher.path)
    settings = store_settings(cfg, teacher, processor)
    check_or_claim_store(store, settings)
    if (store / MANIFEST_NAME).is_file():
        manifest = read_manifest(store)
        log.info("%s is complete (%d samples); nothing to do", store, manifest.n_samples)
        return manifest
    check_writable(store)

    records = list(iter_records(cfg.data))
    n_shards = max(1, math.ceil(len(records) / cfg.output.shard_size))
    shards = {
        shard_name(i): records[i * cfg.output.shard_size : (i + 1) * cfg.output.shard_size] for i in range(n_shards)
    }
    removed = remove_partial_shards(store)
    if removed:
        log.info("removed %d partial shard(s) of an interrupted run: %s", len(removed), ", ".join(removed))
    done = set(list_complete_shards(store))
    todo = {name: recs for name, recs in shards.items() if name not in done}
    log.info(
        "%d records in %d shard(s); %d complete, %d to do", len(records), n_shards, len(done & set(shards)), len(todo)
    )

    specs = array_specs(
        cfg.signals.top_k,
        cfg.signals.transitions.top_k,
        sampled=cfg.signals.sampled.enabled,
        transitions=cfg.signals.transitions.enabled,
        sampled_rows=cfg.signals.sampled.rows,
    )
    codec = cfg.signals.codec
    codecs = store_codecs(codec.profile, specs, settings["vocabulary"]["tokens"], codec.max_kl, codec.logprob_step,
                          codec.max_dropped)
    with make_executor(cfg, processor) as executor:
        layers, irs = calibrate(cfg, store, executor, records)
        executor.run_shards(todo, specs, layers, n_samples=sum(len(r) for r in todo.values()), codecs=codecs)

    stats = signal_bytes(store)
    manifest = write_manifest(
        store,
        {
            **settings,
            "pipeline_version": __version__,
            "saliency": {"layers": layers, "irs": {str(k): v for k, v in irs.items()} if irs else None,
                         **saliency_coverage(store)},
            "signal_bytes": stats,
            "created_unix": int(time.time()),
        },
        shards=list(shards),
    )
    wall = time.time() - t0
    print_summary(store, manifest, stats, wall)
    return manifest


def calibrate(cfg: DumpConfig, store: Path, executor, records) -> tuple[list[int], dict[int, float] | None]:
    """The saliency layers: named in the config, or argmax IRS (computed once, kept for resume)."""
    if cfg.signals.saliency_layers != "auto":
        return list(cfg.signals.saliency_layers), None
    path = store / CALIBRATION_FILE
    saved = read_calibration(store)  # refuses a file edited since the calibration
    if saved is not None:
        log.info("calibration from %s: layers %s", path.name, saved[0])
        return saved
    done = list_complete_shards(store)
    if done:  # a new calibration may pick other layers than the complete shards were computed with
        raise StoreMismatchError(
            f"{path} is missing, but {len(done)} complete shard(s) were computed with the saliency layers it "
            "recorded; calibrating again could mix layers in one store. Restore it, or delete the store to start over"
        )
    usable = [r for r in records if not isinstance(r, BadRecord) and r.images]
    subset = usable[: cfg.signals.calibration_samples]
    if not subset:
        raise PipelineError(
            "saliency_layers=auto needs samples with images to calibrate on; none found. Name the layers instead "
            "(signals.saliency_layers=[...])"
        )
    log.info("calibrating saliency layers (IRS) on %d samples", len(subset))
    irs = executor.calibrate(subset)
    layers = select_layers(irs)
    write_calibration(store, layers, irs)
    log.info("IRS per layer: %s -> layers %s", ", ".join(f"{k}:{v:.4f}" for k, v in sorted(irs.items())), layers)
    return layers, irs


def print_summary(store: Path, manifest: Manifest, stats: dict, wall: float) -> None:
    lines = [
        f"teacher-dump complete: {store}",
        f"  samples written  {manifest.n_samples}",
        f"  samples skipped  {manifest.n_skipped} {manifest.skipped_reasons or ''}",
        f"  response tokens  {stats['response_tokens']}",
        f"  saliency layers  {manifest.saliency_layers}",
        f"  turns without a saliency map  {manifest.turns_without_map} of {manifest.turns_with_images} "
        "with images (the image comes after the question: no IVA weight)",
        "  bytes per response token:",
    ]
    for g, v in stats.items():
        if isinstance(v, dict):
            lines.append(f"    {g:<18} {v['bytes_per_response_token']:10.1f}  ({v['bytes'] / 1e6:.2f} MB)")
    lines.append(f"  wall time        {wall:.1f} s")
    print("\n".join(lines))

