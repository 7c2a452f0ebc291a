"""One shard of Stage 0: its records answered turn by turn, written as one JSON file at once.

A shard's file, ``shards/<name>.json``, holds its output records, its skipped records (each with
its reason), and the tokens and seconds the engine spent. It is written atomically when the
shard is complete, so a shard is either there or not: a killed run leaves no half shard, and a
resumed run redoes exactly the shards without a file.

Every input record ends up in one of the two lists (a record with ``n`` answers may have some
conversations in each). Reasons: the data layer's (``malformed_record``, ``missing_image``,
``corrupt_image``, ``image_too_large``, ``image_outside_root``, ``image_tag_mismatch``,
``over_length``) and Stage 0's own, ``TOO_MANY_IMAGES``, ``EMPTY_ANSWER`` and
``IMAGE_TAG_IN_ANSWER`` (an answer that would make the next prompt, or the record itself, show
an image that is not there).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from pipeline.data import BadRecord, Record, SampleError
from pipeline.data.encode import check_image_tags
from pipeline.data.records import IMAGE_TAG, MALFORMED, OVER_LENGTH
from schemas.io import atomic_write_text, writing
from pipeline.generation.config import GenerateConfig
from pipeline.generation.prompts import (
    Request,
    answer_seed,
    human_turns,
    images_asked,
    output_id,
    output_record,
    prompt_turns,
    render,
)

SHARDS_DIR = "shards"
TOO_MANY_IMAGES = "too_many_images"
EMPTY_ANSWER = "empty_answer"
IMAGE_TAG_IN_ANSWER = "image_tag_in_answer"


def shard_path(out_dir: Path, name: str) -> Path:
    return Path(out_dir) / SHARDS_DIR / f"{name}.json"


@dataclass
class Conversation:
    """Answer ``sample`` of one record, built turn by turn."""

    raw: dict
    record: Record
    sample: int
    images: list[Image.Image]
    answers: list[str] = field(default_factory=list)
    finish_reasons: list[str] = field(default_factory=list)
    tokens: int = 0
    failure: tuple[str, str] | None = None  # (reason, detail) once it cannot go on

    @property
    def n_turns(self) -> int:
        return len(human_turns(self.record))


def skip_entry(sample_id, origin: str, reason: str, detail: str, sample: int | None = None, turn: int | None = None) -> dict:
    return {"id": sample_id, "origin": origin, "sample": sample, "turn": turn, "reason": reason, "detail": detail}


def open_record(item: Record | BadRecord, cfg: GenerateConfig) -> tuple[list[Image.Image] | None, dict | None]:
    """(images, None) for a record that can be asked, else (None, its skip entry)."""
    if isinstance(item, BadRecord):
        e = item.error
        return None, skip_entry(e.skip_id, "", e.reason, e.detail)
    try:
        check_image_tags(item)
        if not human_turns(item):
            raise SampleError(item.sample_id, MALFORMED, "no human turn to answer")
        most = cfg.model.max_images_per_prompt
        if len(item.images) > most:
            return None, skip_entry(item.sample_id, item.origin, TOO_MANY_IMAGES,
                                    f"{len(item.images)} images > model.max_images_per_prompt {most}")
        return item.load_images(), None
    except SampleError as e:
        return None, skip_entry(e.skip_id, item.origin, e.reason, e.detail)


def prompt_length(processor, text: str, images: list[Image.Image]) -> int:
    """Tokens of the prompt with its images expanded, as the engine will see them."""
    return int(processor(text=text, images=images or None, return_tensors="np", add_special_tokens=False)["input_ids"].shape[1])


def generate_shard(engine, processor, cfg: GenerateConfig, name: str, items: list, identity: dict) -> dict:
    """Answer the records of one shard and write ``shards/<name>.json``; its counts.

    ``items``: (raw record or None, Record or BadRecord) in input order. ``identity``: the
    provenance every output record carries (model, sampling, engine).
    """
    t0 = time.time()
    skipped, conversations = [], []
    for raw, item in items:
        images, skip = open_record(item, cfg)
        if skip is not None:
            skipped.append(skip)
            continue
        conversations += [Conversation(raw, item, k, images) for k in range(cfg.sampling.n)]

    engine_seconds = 0.0
    for turn in range(max((c.n_turns for c in conversations), default=0)):
        asking, requests, lengths = [], [], {}
        for c in conversations:
            if c.failure is not None or turn >= c.n_turns:
                continue
            turns = prompt_turns(c.record, turn, c.answers, cfg.sampling.history)
            text, shown = render(processor, turns), c.images[: images_asked(turns)]
            key = (c.record.sample_id, text)  # with gold history, the n conversations share each prompt
            if key not in lengths:
                lengths[key] = prompt_length(processor, text, shown)
            if lengths[key] >= cfg.data.max_length:
                c.failure = (OVER_LENGTH, f"turn {turn}: {lengths[key]} prompt tokens leave no room to answer "
                                          f"within data.max_length {cfg.data.max_length}")
                continue
            asking.append(c)
            requests.append(Request(text, shown, answer_seed(cfg.seed, c.record.sample_id, c.sample, turn)))
        started = time.time()
        answers = engine.answer(requests)
        engine_seconds += time.time() - started
        for c, a in zip(asking, answers, strict=True):
            text = a.text.strip()
            c.tokens += a.n_tokens
            if not text:
                c.failure = (EMPTY_ANSWER, f"turn {turn}: the answer is empty (finish reason {a.finish_reason})")
            elif IMAGE_TAG in text:
                c.failure = (IMAGE_TAG_IN_ANSWER, f"turn {turn}: the answer contains {IMAGE_TAG}")
            else:
                c.answers.append(text)
                c.finish_reasons.append(a.finish_reason)

    records = []
    for c in conversations:
        if c.failure is not None:
            reason, detail = c.failure
            skipped.append(skip_entry(output_id(c.raw, c.record, c.sample, cfg.sampling.n), c.record.origin, reason,
                                      detail, c.sample, len(c.answers)))
            continue
        provenance = {**identity, "sample": c.sample, "seed": cfg.seed, "finish_reasons": c.finish_reasons,
                      "source_id": c.record.sample_id}
        records.append(output_record(c.raw, c.record, c.sample, cfg.sampling.n, c.answers, provenance))

    tokens = sum(c.tokens for c in conversations)
    shard = {"name": name, "records": records, "skipped": skipped, "generated_tokens": tokens,
             "engine_seconds": round(engine_seconds, 3), "seconds": round(time.time() - t0, 3)}
    path = shard_path(cfg.output.dir, name)
    with writing(f"shard {name} of output.dir {cfg.output.dir}"):
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(shard, ensure_ascii=False, sort_keys=True) + "\n")
    return {"name": name, "records": len(records), "skipped": len(skipped), "generated_tokens": tokens,
            "engine_seconds": engine_seconds}
