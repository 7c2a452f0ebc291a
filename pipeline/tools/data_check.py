"""``pipeline run data-check``: encode every sample with a model's processor and report.

It is the dry run of a dump: the same reading and encoding, no model forward. It tells how many
samples are usable, why the others are not, and how long sequences are.
"""

from __future__ import annotations

import json
import logging
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.config import check
from pipeline.data import DataConfig, SampleError, iter_encoded
from pipeline.logs import progress
from pipeline.processors import load_processor

log = logging.getLogger("pipeline.tools.data_check")


@dataclass
class DataCheckConfig:
    model: str
    """Checkpoint directory whose processor and chat template encode the data (the teacher's)."""
    data: DataConfig
    """Where the conversations are."""
    report: str | None = None
    """Write a JSON report (counts, length statistics, every skipped sample with its reason) here."""

    def __post_init__(self):
        check(bool(self.model), "model", "must name a checkpoint directory")


def run(cfg: DataCheckConfig) -> dict:
    processor = load_processor(cfg.model)
    lengths, visual, response, skipped = [], [], [], []
    for item in progress(iter_encoded(cfg.data, processor), desc="encoding", unit="sample"):
        if isinstance(item, SampleError):
            skipped.append({"sample_id": item.sample_id, "reason": item.reason, "detail": item.detail})
            continue
        lengths.append(item.length)
        visual.append(int(sum(b.length for b in item.visual_blocks)))
        response.append(int(item.response_positions.size))
    report = {
        "samples_ok": len(lengths),
        "samples_skipped": len(skipped),
        "skipped_by_reason": dict(Counter(s["reason"] for s in skipped)),
        "tokens": _stats(lengths),
        "visual_tokens": _stats(visual),
        "response_tokens": _stats(response),
        "skipped": skipped,
    }
    log.info(
        "%d usable, %d skipped %s; tokens/sample mean %.1f max %d",
        report["samples_ok"],
        report["samples_skipped"],
        report["skipped_by_reason"] or "",
        report["tokens"]["mean"],
        report["tokens"]["max"],
    )
    for s in skipped[:20]:
        log.warning("skipped %s: %s: %s", s["sample_id"], s["reason"], s["detail"])
    if cfg.report:
        Path(cfg.report).parent.mkdir(parents=True, exist_ok=True)
        Path(cfg.report).write_text(json.dumps(report, indent=2, sort_keys=True))
        log.info("report written to %s", cfg.report)
    return report


def _stats(values: list[int]) -> dict:
    if not values:
        return {"mean": 0.0, "max": 0, "total": 0}
    a = np.asarray(values)
    return {"mean": float(a.mean()), "max": int(a.max()), "total": int(a.sum())}
