"""Scoring of generated answers: plain functions of strings (``pipeline run eval``).

A question's *type* (``question_types`` in a record) names what it asks; its *kind* says how an
answer is scored: ``exact`` (normalised equality), ``choice`` (the first standalone A-D letter),
``yesno`` (the first word; accuracy, and F1 with "yes" as the positive class plus the yes-ratio,
as POPE reports). ``ANSWER_KIND`` maps the types this product knows (those of the demo's synthetic
set, which takes its table from here) to kinds; any other type is scored by exact match.
"""

from __future__ import annotations

import re

UNKNOWN_TYPE = "unknown"
KINDS = ("exact", "choice", "yesno")
ANSWER_KIND = {  # how each known question type is scored
    "colour_at": "exact",
    "shape_at": "exact",
    "count": "exact",
    "exists": "yesno",
    "relative": "yesno",
    "choice": "choice",
    "describe": "exact",
}

_CHOICE = re.compile(r"\b([A-D])\b")


def normalise(text: str) -> str:
    """Strip, lower-case, drop one trailing period: ``" Red. "`` -> ``"red"``."""
    text = text.strip().lower()
    return text[:-1].rstrip() if text.endswith(".") else text


def choice_letter(text: str) -> str | None:
    """The first standalone capital A-D in ``text`` (``"B. blue"`` -> ``"B"``); None if there is none.

    Standalone, so the article in "a red one" and the B of "Blue" are not read as choices.
    """
    m = _CHOICE.search(text.strip())
    return m.group(1) if m else None


def yes_no(text: str) -> str | None:
    """``"yes"`` or ``"no"`` when the normalised text's first word is one of them, else None."""
    words = re.findall(r"[a-z]+", normalise(text))
    return words[0] if words and words[0] in ("yes", "no") else None


def is_correct(kind: str, prediction: str, gold: str) -> bool:
    """Score one answer; ``kind`` is one of KINDS."""
    if kind == "exact":
        return normalise(prediction) == normalise(gold)
    if kind == "choice":
        letter = choice_letter(prediction)
        return letter is not None and letter == choice_letter(gold)
    if kind == "yesno":
        answer = yes_no(prediction)
        return answer is not None and answer == yes_no(gold)
    raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS}")


def yesno_scores(predictions: list[str], golds: list[str]) -> dict:
    """POPE's numbers, "yes" the positive class: accuracy, precision, recall, F1, yes-ratio.

    A prediction that is neither yes nor no counts as a negative (and as wrong); precision, recall
    and F1 are 0 where their denominators are.
    """
    pred = [yes_no(p) for p in predictions]
    gold = [yes_no(g) for g in golds]
    n = len(pred)
    tp = sum(p == "yes" and g == "yes" for p, g in zip(pred, gold))
    fp = sum(p == "yes" and g != "yes" for p, g in zip(pred, gold))
    fn = sum(p != "yes" and g == "yes" for p, g in zip(pred, gold))
    correct = sum(p is not None and p == g for p, g in zip(pred, gold))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {
        "n": n,
        "correct": correct,
        "accuracy": correct / n if n else 0.0,
        "precision": precision,
        "recall": recall,
        "f1": f1,
        "yes_ratio": sum(p == "yes" for p in pred) / n if n else 0.0,
    }


def summarise(predictions: list[dict]) -> dict:
    """Per-type and overall scores of scored predictions (dicts with type, kind, gold, prediction, correct)."""
    by_type: dict[str, dict] = {}
    for qtype in sorted({p["type"] for p in predictions}):
        items = [p for p in predictions if p["type"] == qtype]
        kind = items[0]["kind"]
        if kind == "yesno":
            scores = yesno_scores([p["prediction"] for p in items], [p["gold"] for p in items])
        else:
            correct = sum(p["correct"] for p in items)
            scores = {"n": len(items), "correct": correct, "accuracy": correct / len(items)}
        by_type[qtype] = {"kind": kind, **scores}
    n = len(predictions)
    correct = sum(p["correct"] for p in predictions)
    return {"n_questions": n, "correct": correct, "accuracy": correct / n if n else 0.0, "by_type": by_type}


def format_table(report: dict) -> str:
    """type | n | accuracy | f1, one row per type, then the overall row (and the agreement, if any)."""
    rows = [("type", "n", "accuracy", "f1")]
    for qtype, s in report["by_type"].items():
        rows.append((qtype, str(s["n"]), f"{s['accuracy']:.4f}", f"{s['f1']:.4f}" if "f1" in s else "-"))
    rows.append(("overall", str(report["n_questions"]), f"{report['accuracy']:.4f}", "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = [" | ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "-+-".join("-" * w for w in widths))
    agree = report.get("agreement")
    if agree:
        lines.append(
            f"agreement with {agree['store']}: forward KL {agree['forward_kl']:.6f}, "
            f"top-1 {agree['top1_agreement']:.4f} ({agree['positions']} positions, {agree['samples']} samples)"
        )
    return "\n".join(lines)
