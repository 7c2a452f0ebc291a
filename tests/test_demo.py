"""`pipeline demo --quick` end to end: every artifact it promises is on disk and consistent."""

from __future__ import annotations

import json

from pipeline.cli import main
from pipeline.config import load_config
from pipeline.data_check import DataCheckConfig


def test_demo_quick(tmp_path):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick"]) == 0
    for split in ("train", "val", "test"):
        records = json.loads((out / "data" / f"{split}.json").read_text())
        assert records and all((out / "data" / r["image"]).is_file() for r in records)
    train = {r["image"] for r in json.loads((out / "data" / "train.json").read_text())}
    test = {r["image"] for r in json.loads((out / "data" / "test.json").read_text())}
    assert not train & test  # disjoint images
    for name in ("teacher", "student", "student-pooled"):
        assert (out / "models" / name / "model.safetensors").is_file()
    cfg = load_config(DataCheckConfig, out / "configs" / "data-check.yaml")
    assert cfg.model == str(out / "models" / "teacher")
    report = json.loads((out / "reports" / "data-check.json").read_text())
    assert report["samples_ok"] == 40 and report["samples_skipped"] == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["train_samples_ok"] == 40
