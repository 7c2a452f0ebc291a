"""``pipeline run generate`` (Stage 0): answer a LLaVA dataset's instructions with a VLM through vLLM.

Top to bottom: check the output directory's settings (resume or refuse), read the records, plan
shards, answer every shard without a file (in-process or on Ray actors, one engine each), then
merge the shards into ``generated.jsonl`` and ``skipped.jsonl`` and write ``provenance.json`` last.

Output directory::

    generate.json       the settings that determine the answers, written before any shard
    shards/<name>.json  one shard: its output records, its skipped records, tokens and seconds
    generated.jsonl     LLaVA records, in input order: ids and images kept, human turns answered,
                        a "generation" key with the provenance of each (model, sampling, seed)
    skipped.jsonl       every record, or conversation, that could not be answered, with its reason
    provenance.json     written last: the settings, counts, throughput

Resume: a re-run with equal settings keeps complete shards and answers the others; with other
settings it refuses, naming them, once a shard was written. Each answer's draws depend only on the
seed, the record's id, the answer's index and the turn, so a resumed run, or one on other workers,
writes the same answers (tests/on_vllm/test_generate.py). One writer per directory (``pipeline.locks``).

Workflows (README): sequence-level KD (the teacher answers; ``teacher-dump`` scores these answers)
and on-policy rounds (a student answers; the teacher scores the student's answers with every
signal; the student trains on them; repeat).
"""

from __future__ import annotations

import json
import logging
import math
import time
from itertools import islice
from pathlib import Path

from pipeline import __version__
from pipeline.config import to_dict
from pipeline.data import DataSourceError, ImagePolicy, read_records
from pipeline.data.records import iter_llava_file
from pipeline.errors import PipelineError
from pipeline.locks import LOCK_NAME, output_lock
from schemas.fingerprints import ModelIdentity, dataset_fingerprint
from schemas.io import atomic_write_text, settings_diff, writing
from schemas.layout import shard_name
from schemas.manifest import read_json_file
from pipeline.generation.config import GenerateConfig
from pipeline.generation.engine import engine_version
from pipeline.generation.executors import make_executor
from pipeline.generation.shards import SHARDS_DIR, shard_path

log = logging.getLogger("stage0.generate")

SETTINGS_FILE = "generate.json"
GENERATED_FILE = "generated.jsonl"
SKIPPED_FILE = "skipped.jsonl"
PROVENANCE_FILE = "provenance.json"
OUTPUT_KIND = "alignti-generated-llava"


class OutputMismatchError(PipelineError):
    """The output directory holds answers drawn with other settings; mixing them would be wrong."""


def run_settings(cfg: GenerateConfig, model: ModelIdentity) -> dict:
    """Everything that determines the answers (and nothing that does not: workers, GPU memory)."""
    return {
        "kind": OUTPUT_KIND,
        "model": {
            "path": model.path,
            "model_type": model.model_type,
            "config_fingerprint": model.config_fingerprint,
            "weights_fingerprint": model.weights_fingerprint(),
            "dtype": cfg.model.dtype,
            "max_images_per_prompt": cfg.model.max_images_per_prompt,
        },
        "dataset": {**to_dict(cfg.data), "fingerprint": dataset_fingerprint(cfg.data.path)},
        "sampling": to_dict(cfg.sampling),
        "seed": cfg.seed,
        "shard_size": cfg.output.shard_size,
        "engine": {"name": "vllm", "version": engine_version()},
    }


def record_identity(settings: dict) -> dict:
    """The provenance every output record carries: which model drew it, how, with which engine."""
    model = settings["model"]
    return {"model": {k: model[k] for k in ("path", "model_type", "weights_fingerprint")},
            "sampling": settings["sampling"], "engine": settings["engine"]}


def check_or_claim_output(out: Path, settings: dict) -> None:
    """Write the settings to a new output directory, or check them against an existing one
    (other settings are refused once a shard was written; before that, they are replaced)."""
    path = out / SETTINGS_FILE
    if out.exists() and not out.is_dir():
        raise PipelineError(f"output.dir {out} exists and is not a directory")
    if path.is_file():
        existing = read_json_file(path)
        diff = settings_diff(existing, settings, "output", "this run") if isinstance(existing, dict) else [
            f"{SETTINGS_FILE}: not a JSON object"]
        if not diff:
            return
        if any((out / SHARDS_DIR).glob("*.json")) or (out / PROVENANCE_FILE).exists():
            raise OutputMismatchError(
                f"{out} holds answers drawn with other settings; refusing to mix. Use another output.dir, or delete "
                "it to start over. Differences:\n  " + "\n  ".join(diff))
        log.warning("%s holds the settings of a run that wrote no shard; replacing them:\n  %s", path, "\n  ".join(diff))
    elif out.exists() and any(p.name != LOCK_NAME for p in out.iterdir()):
        raise OutputMismatchError(f"{out} exists, is not empty and is not a generate output (no {SETTINGS_FILE})")
    with writing(f"output.dir {out}"):
        out.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(settings, indent=2, sort_keys=True) + "\n")


def read_items(cfg: GenerateConfig) -> list[tuple[dict | None, object]]:
    """(raw record or None, Record or BadRecord) of every input record, in order.

    Generation keeps each record's own keys, so it reads LLaVA .json/.jsonl files, whose raw records
    it holds beside the parsed ones (one raw row per record ``read_records`` yields)."""
    path = Path(cfg.data.path)
    if path.is_dir() or path.suffix not in (".json", ".jsonl"):
        raise DataSourceError(f"data.path {path}: generate reads a LLaVA .json or .jsonl file")
    policy = ImagePolicy.from_settings(vars(cfg.data))
    records = read_records(path, cfg.data.image_root, cfg.data.split, policy)
    raws = (row if isinstance(row, dict) else None for _, row, _ in iter_llava_file(path))
    return list(islice(zip(raws, records, strict=True), cfg.data.limit))


def run(cfg: GenerateConfig, engine=None) -> dict:
    """Answer every record; the provenance written. ``engine``: an ``Engine`` already started on
    ``cfg.model`` for ``workers=0`` to use (tests, notebooks); by default the run starts its own."""
    if engine is not None and cfg.workers:
        raise ValueError(f"an engine is for workers=0 (this process); workers={cfg.workers} start their own")
    with output_lock(cfg.output.dir, "generate"):
        return _run(cfg, engine)


def _run(cfg: GenerateConfig, engine) -> dict:
    t0 = time.time()
    out = Path(cfg.output.dir)
    model = ModelIdentity.read(cfg.model.path)
    settings = run_settings(cfg, model)
    check_or_claim_output(out, settings)
    if (out / PROVENANCE_FILE).is_file():
        log.info("%s is complete; nothing to do", out)
        return read_json_file(out / PROVENANCE_FILE)

    items = read_items(cfg)
    size = cfg.output.shard_size
    shards = {shard_name(i): items[i * size: (i + 1) * size] for i in range(max(1, math.ceil(len(items) / size)))}
    todo = {name: part for name, part in shards.items() if not shard_path(out, name).is_file()}
    log.info("%d records in %d shard(s); %d complete, %d to do", len(items), len(shards), len(shards) - len(todo), len(todo))
    if todo:
        with make_executor(cfg, engine) as executor:
            executor.run_shards(todo, record_identity(settings))

    generated, skipped, tokens, engine_seconds = [], [], 0, 0.0
    for name in shards:
        shard = read_json_file(shard_path(out, name))
        generated += shard["records"]
        skipped += shard["skipped"]
        tokens += shard["generated_tokens"]
        engine_seconds += shard["engine_seconds"]
    with writing(f"output.dir {out}"):
        atomic_write_text(out / GENERATED_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in generated))
        atomic_write_text(out / SKIPPED_FILE, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in skipped))
    reasons: dict[str, int] = {}
    for s in skipped:
        reasons[s["reason"]] = reasons.get(s["reason"], 0) + 1
    provenance = {
        **settings,
        "pipeline_version": __version__,
        "counts": {"input_records": len(items), "output_records": len(generated), "skipped": len(skipped),
                   "skipped_reasons": dict(sorted(reasons.items()))},
        # Summed over shards (of this run and of the runs it resumed); with several workers the
        # engines ran at once, so this is tokens per second of one engine, on average.
        "throughput": {"generated_tokens": tokens, "engine_seconds": round(engine_seconds, 3),
                       "tokens_per_second_per_engine": round(tokens / engine_seconds, 1) if engine_seconds else None},
        "created_unix": int(time.time()),
    }
    with writing(f"output.dir {out}"):
        atomic_write_text(out / PROVENANCE_FILE, json.dumps(provenance, indent=2, sort_keys=True) + "\n")
    log.info("%s: %d records answered (%d output records), %d skipped %s; %d tokens at %s tokens/s per engine; %.1f s",
             out, len(items), len(generated), len(skipped), reasons or "", tokens,
             provenance["throughput"]["tokens_per_second_per_engine"], time.time() - t0)
    return provenance
