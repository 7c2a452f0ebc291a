"""A record's human turns asked one by one, and the LLaVA record its answers make (no engine here).

* Turn by turn: the prompt of human turn ``j`` is the conversation up to and including it, rendered
  with the model's chat template and generation prompt, with the images whose ``<image>`` tags
  stand in the turns asked so far. Earlier turns carry the dataset's answers (``history: gold``:
  each turn answered on its own, as an eval asks it) or the model's own earlier answers
  (``history: own``: one self-consistent conversation, as the model would hold it).
* ``n`` answers per record are ``n`` conversations, each its own chain of turns; answer ``k`` of
  turn ``j`` is drawn with a seed that depends only on (run seed, record id, k, j)
  (:func:`answer_seed`), so that neither the shard, the worker, the batch nor a resume changes it.
* The output record is the input record (every key kept: id, images, anything else) with its
  conversation replaced: each human turn followed by the model's answer, and a ``generation`` key
  with its provenance.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

from PIL import Image

from pipeline.data.encode import message
from pipeline.data.records import IMAGE_TAG, Record, Turn

SPEAKERS = {"system": "system", "user": "human", "assistant": "gpt"}  # LLaVA's names for our roles


@dataclass(frozen=True)
class Request:
    """One prompt for the engine: rendered text, its images, the seed of its draws."""

    text: str
    images: list[Image.Image]
    seed: int


@dataclass(frozen=True)
class Answer:
    """What the engine drew for one request."""

    text: str
    finish_reason: str  # "stop" (an end-of-turn token) or "length" (sampling.max_new_tokens)
    n_tokens: int


def human_turns(record: Record) -> list[int]:
    """Indices into ``record.turns`` of its human turns, the ones a model answers."""
    return [i for i, t in enumerate(record.turns) if t.role == "user"]


def prompt_turns(record: Record, turn: int, answers: list[str], history: str) -> list[Turn]:
    """The turns that ask human turn number ``turn``: all turns before it, with the dataset's
    answers (``history="gold"``) or ``answers``, the model's own to the earlier turns (``"own"``)."""
    end = human_turns(record)[turn]
    asked, answered = [], 0
    for t in record.turns[: end + 1]:
        if t.role == "assistant":
            asked.append(Turn("assistant", answers[answered]) if history == "own" else t)
            answered += 1
        else:
            asked.append(t)
    return asked


def images_asked(turns: list[Turn]) -> int:
    """How many of the record's images these turns show (the i-th ``<image>`` tag is the i-th image)."""
    return sum(t.text.count(IMAGE_TAG) for t in turns if t.role == "user")


def render(processor, turns: list[Turn]) -> str:
    """The prompt text: the chat template with the generation prompt, image tags as image items."""
    return processor.apply_chat_template([message(t) for t in turns], tokenize=False, add_generation_prompt=True)


def answer_seed(seed: int, sample_id: str, sample: int, turn: int) -> int:
    """The seed of answer ``sample`` to human turn ``turn`` of record ``sample_id`` (63 bits)."""
    digest = hashlib.sha256(json.dumps([seed, sample_id, sample, turn]).encode()).digest()
    return int.from_bytes(digest[:8], "big") >> 1


def output_id(raw: dict | None, record: Record, sample: int, n: int):
    """The output record's id: the input's own (its type kept) when there is one answer per record,
    else ``<id>#<k>``, so that the ``n`` conversations of a record keep distinct ids."""
    if n == 1:
        return raw["id"] if raw is not None and "id" in raw else record.sample_id
    return f"{record.sample_id}#{sample}"


def output_record(raw: dict, record: Record, sample: int, n: int, answers: list[str], provenance: dict) -> dict:
    """The LLaVA record of one conversation: ``raw`` with each human turn followed by its answer."""
    if len(answers) != len(human_turns(record)):
        raise ValueError(f"{record.sample_id}: {len(answers)} answers for {len(human_turns(record))} human turns")
    conversations, answered = [], 0
    for t in record.turns:
        if t.role == "assistant":
            continue
        conversations.append({"from": SPEAKERS[t.role], "value": t.text})
        if t.role == "user":
            conversations.append({"from": SPEAKERS["assistant"], "value": answers[answered]})
            answered += 1
    return {**raw, "id": output_id(raw, record, sample, n), "conversations": conversations, "generation": provenance}
