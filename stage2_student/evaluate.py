"""``pipeline run eval``: answer accuracy of a checkpoint on a question file, and agreement with a teacher store.

Top to bottom: read the question file, build one prompt per answered turn, generate greedily in
left-padded batches, score, then (with ``store``) compare the model's next-token distributions with
the teacher's stored ones, and write one JSON report.

* Turn by turn: the prompt of turn ``j`` is the conversation up to and including human turn ``j``,
  earlier turns answered with the *gold* answers (not the model's own), rendered with the model's
  chat template and generation prompt. So every turn is scored on its own, as in LLaVA-style evals.
* Scoring (``stage2_student.scoring``: ``ANSWER_KIND`` maps a question type to a kind): ``exact``
  (normalised equality), ``choice`` (the first standalone A-D letter), ``yesno`` (the first word;
  accuracy, and F1 with "yes" as the positive class plus the yes-ratio, as POPE reports). A record
  without ``question_types`` counts under type ``unknown`` with exact match. Overall accuracy is the
  micro-average over every scored question.
* Agreement: over the response positions of the samples in both the file and the store, the mean
  forward KL on the stored (k+1)-bucket coarsening (``losses.bucket_logprobs`` + ``losses.forward_kl``,
  the training loss's own numerics) at the dump temperature, and the rate at which the model's argmax
  equals the teacher's top id. Positions go through ``data.remap``, so a pooled student works.

Questions that cannot be asked (missing image, over-length prompt, malformed record) are listed in
the report with their reason, never dropped silently.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Iterator, Literal

import numpy as np
import torch
from transformers import AutoModelForImageTextToText, GenerationConfig

from pipeline.config import check, to_dict
from pipeline.data import BadRecord, DataSourceError, ImagePolicy, Record, SampleError, encode, read_records
from pipeline.data.encode import to_messages
from pipeline.devices import resolve_device
from pipeline.data.records import IMAGE_TAG, MALFORMED, OVER_LENGTH, raw_records
from pipeline.errors import PipelineError
from pipeline.logs import progress
from pipeline.processors import load_processor
from schemas.signals import unpack
from pipeline.modeling.batching import collate_model_inputs, pad_token_id
from pipeline.modeling.branches import sequence_position_ids
from pipeline.modeling.logits import kept_rows, real_vocab_size
from schemas.compat import check_ids_in_vocab, open_store
from schemas.io import atomic_write_text
from stage2_student.data import StudentDataError, remap
from stage2_student.losses import bucket_logprobs, forward_kl
from stage2_student.scoring import ANSWER_KIND, UNKNOWN_TYPE, format_table, is_correct, summarise

log = logging.getLogger("stage2.eval")


# ----------------------------------------------------------------------------------------------
# config


@dataclass
class EvalDataConfig:
    path: str
    """LLaVA-format question file (.json or .jsonl); records may carry `question_types` and `answers` (one per turn)."""
    image_root: str | None = None
    """Directory that image paths are relative to; default: the question file's directory."""
    max_length: int = 2048
    """Longest prompt (after image expansion) in tokens; longer questions are skipped as over_length."""
    allow_outside_root: bool = False
    """Read image paths that leave image_root (absolute paths, `..`, symlinks pointing out); by default such a question is skipped as image_outside_root."""

    def __post_init__(self):
        check(bool(self.path), "path", "must name a question file")
        check(self.max_length >= 8, "max_length", f"must be >= 8, got {self.max_length}")


@dataclass
class EvalConfig:
    model: str
    """Checkpoint directory (model + processor), e.g. a distilled student's final/."""
    data: EvalDataConfig
    """The questions and their images."""
    output: str
    """Write the JSON report (per-type scores, every prediction, agreement) here."""
    store: str | None = None
    """A teacher store: also report the agreement (forward KL, top-1) with the teacher on the samples in both."""
    limit: int | None = None
    """Evaluate only the first N records of the file; null: all."""
    max_new_tokens: int = 16
    """Longest generated answer, in tokens (greedy decoding)."""
    batch_size: int = 8
    """Prompts per generation batch (left-padded); also samples per agreement forward."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the model runs: `auto` is cuda when a GPU is visible. Weights are float32."""

    def __post_init__(self):
        check(bool(self.model), "model", "must name a checkpoint directory")
        check(bool(self.output), "output", "must name the report file")
        check(self.store is None or bool(self.store), "store", "must name a store directory or be null")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 or null, got {self.limit}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")


# ----------------------------------------------------------------------------------------------
# questions and prompts


@dataclass
class Question:
    """Turn ``turn`` of sample ``sample_id``: its prompt (gold earlier answers) and gold answer."""

    sample_id: str
    turn: int
    qtype: str
    kind: str
    gold: str
    prompt: str  # the rendered chat text, image placeholders unexpanded
    inputs: dict = field(repr=False)  # processor output for the prompt, batch of one


def answered_turns(record: Record) -> list[int]:
    """Indices into ``record.turns`` of the human turns that have an answer after them."""
    return [i for i, t in enumerate(record.turns[:-1]) if t.role == "user" and record.turns[i + 1].role == "assistant"]


def turn_labels(record: Record, raw: dict) -> list[tuple[str, str, str]]:
    """(type, kind, gold answer) per answered turn, from ``question_types``/``answers`` or the gpt turns.

    Raises SampleError(MALFORMED) when those lists do not have one entry per answered turn.
    """
    turns = answered_turns(record)
    golds = [record.turns[i + 1].text for i in turns]
    if "answers" in raw:
        answers = raw["answers"]
        if not isinstance(answers, list) or len(answers) != len(turns):
            raise SampleError(record.sample_id, MALFORMED, f"'answers' must list one answer per turn ({len(turns)})")
        if not all(isinstance(a, (str, int)) and not isinstance(a, bool) for a in answers):
            raise SampleError(record.sample_id, MALFORMED, "'answers' must be strings (or integers)")
        golds = [str(a) for a in answers]
    types = raw.get("question_types")
    if types is None:
        types = [UNKNOWN_TYPE] * len(turns)
    elif not isinstance(types, list) or len(types) != len(turns) or not all(isinstance(t, str) for t in types):
        raise SampleError(record.sample_id, MALFORMED, f"'question_types' must list one type name per turn ({len(turns)})")
    # A type the synthetic set does not define is scored by exact match under its own name.
    return [(t, ANSWER_KIND.get(t, "exact"), g) for t, g in zip(types, golds)]


def prompt_messages(record: Record, turn_index: int) -> tuple[list[dict], int]:
    """Chat messages that ask the human turn at ``record.turns[turn_index]``, and how many images they use.

    Earlier turns keep their gold answers. The images are those whose ``<image>`` tags stand in
    the turns asked so far (a later turn's image is not shown early).
    """
    asked = record.turns[: turn_index + 2]  # up to the gold answer of this turn, dropped below
    n_images = sum(t.text.count(IMAGE_TAG) for t in asked if t.role == "user")
    messages = to_messages(Record(record.sample_id, asked, record.images[:n_images], record.origin))
    return messages[:-1], n_images


def iter_questions(records: list[Record], raws: dict[str, dict], processor, max_length: int,
                   skipped: list[dict]) -> Iterator[Question]:
    """Every answered turn of every record as a Question; what cannot be asked goes to ``skipped``."""
    for record in records:
        try:
            labels = turn_labels(record, raws.get(record.sample_id, {}))
            images = record.load_images()
        except SampleError as e:
            skipped.append({"id": record.sample_id, "turn": None, "reason": e.reason, "detail": e.detail})
            continue
        for j, (turn_index, (qtype, kind, gold)) in enumerate(zip(answered_turns(record), labels)):
            try:
                messages, n_images = prompt_messages(record, turn_index)
                text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
                inputs = processor(text=text, images=images[:n_images] or None, return_tensors="pt",
                                   add_special_tokens=False)
                length = int(inputs["input_ids"].shape[1])
                if length > max_length:
                    raise SampleError(record.sample_id, OVER_LENGTH, f"turn {j}: {length} prompt tokens > max_length {max_length}")
            except SampleError as e:
                skipped.append({"id": record.sample_id, "turn": j, "reason": e.reason, "detail": e.detail})
                continue
            yield Question(record.sample_id, j, qtype, kind, gold, text, dict(inputs))


# ----------------------------------------------------------------------------------------------
# generation

def _stop_ids(model, tokenizer) -> list[int]:
    eos = model.generation_config.eos_token_id
    eos = [eos] if isinstance(eos, int) else list(eos or [])
    if tokenizer.eos_token_id is not None and tokenizer.eos_token_id not in eos:
        eos.append(tokenizer.eos_token_id)
    return eos


@torch.inference_mode()
def generate_answers(model, processor, questions: list[Question], max_new_tokens: int, device: torch.device) -> list[str]:
    """Greedy answers to one batch of questions (left-padded), decoded up to the first stop token."""
    tok = processor.tokenizer
    pad_id = pad_token_id(tok)
    stops = _stop_ids(model, tok)
    inputs = {k: v.to(device) for k, v in collate_model_inputs([q.inputs for q in questions], pad_id, side="left").items()}
    # An explicit config: greedy whatever sampling defaults the checkpoint ships with.
    gen = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, num_beams=1,
                           eos_token_id=stops, pad_token_id=pad_id)
    out = model.generate(**inputs, generation_config=gen)
    new = out[:, inputs["input_ids"].shape[1]:].tolist()
    answers = []
    for row in new:
        end = next((i for i, t in enumerate(row) if t in stops or t == pad_id), len(row))
        answers.append(tok.decode(row[:end], skip_special_tokens=True).strip())
    return answers


# ----------------------------------------------------------------------------------------------
# agreement with a teacher store


@torch.inference_mode()
def agreement(model, processor, records: list[Record], store_dir: str | Path, max_length: int,
              batch_size: int, device: torch.device) -> dict:
    """Mean forward KL (stored (k+1)-bucket coarsening, dump temperature) and top-1 agreement between
    the teacher's stored response distributions and ``model``'s, over the samples in both."""
    reader = open_store(store_dir, processor)
    tau = reader.manifest.temperature
    stored = set(reader.sample_ids())
    common = [r for r in records if r.sample_id in stored]
    if not common:
        raise PipelineError(f"no sample of the question file is in the store {store_dir}; agreement needs the data it was dumped from")
    tok = processor.tokenizer
    pad_id = pad_token_id(tok)
    # The model's distributions over its real tokens, the support of the stored ones (§3.1).
    vocab = real_vocab_size(tok, model.get_output_embeddings().weight.shape[0], "the evaluated model")
    kl_sum, agree, positions, samples, skipped = 0.0, 0, 0, 0, []
    batches = [common[i : i + batch_size] for i in range(0, len(common), batch_size)]
    for batch in progress(batches, desc="agreement", unit="batch"):
        encoded, targets = [], []
        for record in batch:
            teacher = unpack(reader.get(record.sample_id))
            if teacher.resp_ids.size:
                check_ids_in_vocab(int(teacher.resp_ids.max()), len(tok), where=f"sample {record.sample_id!r} of the store")
            try:
                enc = encode(record, processor, max_length)
            except SampleError as e:
                skipped.append({"id": e.sample_id, "reason": e.reason, "detail": e.detail})
                continue
            if list(enc.image_hashes) != list(teacher.image_hashes):
                raise StudentDataError(
                    f"sample {record.sample_id!r}: its images differ from those the store {store_dir} was dumped from"
                )
            encoded.append(enc)
            targets.append(remap(teacher, enc))
        if not encoded:
            continue
        inputs = {k: v.to(device) for k, v in collate_model_inputs([e.model_inputs for e in encoded], pad_id).items()}
        # Logits only at response positions (union over the batch), as the dump computed them.
        keep, column = kept_rows([t.resp_pos for t in targets], inputs["input_ids"].shape[1])
        logits = model(**inputs, position_ids=sequence_position_ids(model, inputs),
                       logits_to_keep=torch.as_tensor(keep, device=device)).logits[..., :vocab]
        rows = torch.cat([logits[b, torch.as_tensor(column[t.resp_pos], device=device)] for b, t in enumerate(targets)])
        ids = torch.as_tensor(np.concatenate([t.resp_ids for t in targets]), device=device)
        lps = torch.as_tensor(np.concatenate([t.resp_logprobs for t in targets]), device=device)
        t_logp, s_logp, valid = bucket_logprobs(rows.float() / tau, ids, lps)
        kl = forward_kl(t_logp, s_logp, valid)
        used = valid[:, :-1].any(-1)  # a row with no stored id is padding
        kl_sum += float(kl[used].double().sum())
        agree += int((rows.argmax(-1) == ids[:, 0])[used].sum())
        positions += int(used.sum())
        samples += len(encoded)
    if positions == 0:
        raise PipelineError(f"no response position to compare with the store {store_dir} (every common sample was skipped)")
    return {
        "store": str(store_dir),
        "temperature": tau,
        "samples": samples,
        "positions": positions,
        "forward_kl": kl_sum / positions,
        "top1_agreement": agree / positions,
        "skipped": skipped,
    }


# ----------------------------------------------------------------------------------------------
# the command


def read_question_file(path: str | Path, image_root: str | None, limit: int | None, policy: ImagePolicy = ImagePolicy()
                       ) -> tuple[list[Record], dict[str, dict], list[dict]]:
    """(records, raw records by id, skipped) of the first ``limit`` records of a LLaVA file; their
    images read under ``policy``."""
    path = Path(path)
    if path.exists() and not (path.is_file() and path.suffix in (".json", ".jsonl")):
        raise DataSourceError(f"{path}: eval reads a LLaVA .json or .jsonl question file")
    records, skipped = [], []
    for rec in islice(read_records(path, image_root, policy=policy), limit):  # raises for a missing file, naming it
        if isinstance(rec, BadRecord):
            skipped.append({"id": rec.error.sample_id, "turn": None, "reason": rec.error.reason, "detail": rec.error.detail})
        else:
            records.append(rec)
    return records, raw_records(path), skipped


def _write_json(path: Path, obj: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True))


def run(cfg: EvalConfig) -> dict:
    device = resolve_device(cfg.device)
    records, raws, skipped = read_question_file(cfg.data.path, cfg.data.image_root, cfg.limit,
                                                ImagePolicy.from_settings(vars(cfg.data)))
    processor = load_processor(cfg.model)  # a missing checkpoint directory is named here
    model = AutoModelForImageTextToText.from_pretrained(cfg.model, dtype=torch.float32, trust_remote_code=False)
    model.to(device).eval()

    def answer(batch: list[Question]) -> list[dict]:
        answers = generate_answers(model, processor, batch, cfg.max_new_tokens, device)
        return [
            {"id": q.sample_id, "turn": q.turn, "type": q.qtype, "kind": q.kind, "gold": q.gold,
             "prediction": a, "correct": is_correct(q.kind, a, q.gold)}
            for q, a in zip(batch, answers)
        ]

    total = sum(len(answered_turns(r)) for r in records)
    questions = iter_questions(records, raws, processor, cfg.data.max_length, skipped)
    predictions: list[dict] = []
    batch: list[Question] = []
    for q in progress(questions, total=total, desc="eval", unit="question"):
        batch.append(q)
        if len(batch) == cfg.batch_size:
            predictions += answer(batch)
            batch = []
    if batch:
        predictions += answer(batch)
    for s in skipped[:20]:
        log.warning("skipped %s turn %s: %s: %s", s["id"], s["turn"], s["reason"], s["detail"])
    if not predictions:
        raise PipelineError(f"no question of {cfg.data.path} could be evaluated ({len(skipped)} skipped)")

    report = {
        "model": cfg.model,
        "data": cfg.data.path,
        "n_samples": len({p["id"] for p in predictions}),
        **summarise(predictions),
        "agreement": None,
        "skipped": skipped,
        "predictions": predictions,
        "config": to_dict(cfg),
    }
    if cfg.store is not None:
        report["agreement"] = agreement(model, processor, records, cfg.store, cfg.data.max_length, cfg.batch_size, device)
    _write_json(Path(cfg.output), report)
    print(format_table(report))
    log.info("report written to %s", cfg.output)
    return report
