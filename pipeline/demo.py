"""``pipeline demo``: the whole product on the embedded default, in one output folder.

Steps, each leaving its artifacts (and the config that reproduces it) under ``out``:

1. ``data/``      the synthetic shapes VQA set (train/val/test on disjoint images)
2. ``models/``    tiny teacher and student checkpoints built from configs (offline)
3. ``configs/``   the job configs; ``reports/data-check.json`` from ``pipeline run data-check``
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from pipeline.config import save_config
from pipeline.data import DataConfig
from pipeline.data_check import DataCheckConfig
from pipeline.data_check import run as run_data_check
from pipeline.synthetic import generate
from pipeline.tiny import save_tiny_vlm

log = logging.getLogger("pipeline.demo")

FAMILY = "llava"
MODELS = ("teacher", "student", "student-pooled")


def run_demo(out: Path, quick: bool = False, seeds: int = 1) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    sizes = dict(n_train=40, n_val=10, n_test=10) if quick else dict(n_train=400, n_val=50, n_test=100)
    log.info("1/3 generating the synthetic shapes set (%s)", sizes)
    data = generate(out / "data", seed=0, **sizes)

    log.info("2/3 building tiny %s models: %s", FAMILY, ", ".join(MODELS))
    models = {name: save_tiny_vlm(out / "models" / name, FAMILY, name, seed=0) for name in MODELS}

    log.info("3/3 checking the training data against the teacher's processor")
    check_cfg = DataCheckConfig(
        model=str(models["teacher"]),
        data=DataConfig(path=str(data["train"])),
        report=str(out / "reports" / "data-check.json"),
    )
    save_config(check_cfg, out / "configs" / "data-check.yaml")
    report = run_data_check(check_cfg)

    summary = {
        "data": {k: str(v) for k, v in data.items()},
        "models": {k: str(v) for k, v in models.items()},
        "train_samples_ok": report["samples_ok"],
        "train_samples_skipped": report["samples_skipped"],
        "seeds": seeds,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    print(f"\nDemo artifacts in {out}:")
    print(f"  data        {out / 'data'}  (train {report['samples_ok']} usable, {report['samples_skipped']} skipped)")
    print(f"  models      {', '.join(MODELS)}")
    print(f"  configs     {out / 'configs'}  (rerun: pipeline run data-check --config {out / 'configs' / 'data-check.yaml'})")
    return summary
