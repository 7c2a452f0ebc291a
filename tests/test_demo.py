"""`pipeline demo --quick` end to end: every artifact it promises is on disk and consistent."""

from __future__ import annotations

import json

from PIL import Image

from pipeline.tools.cli import RUN_JOBS, main, resolve
from pipeline.config import load_config
from pipeline.tools.demo import QUICK, RECIPES

METHODS = {m: RECIPES[m] for m in QUICK.methods}
from pipeline.tools.inspect_store import verify
from schemas.manifest import read_manifest


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--seeds", "2"]) == 0
    printed = capsys.readouterr().out
    assert "| student | recipe | test accuracy (%) | paired Δ (points) | KL to teacher (test) | top-1 agreement (%) |" in printed

    # data: three splits on disjoint images
    images = {}
    for split in ("train", "val", "test"):
        records = json.loads((out / "data" / f"{split}.json").read_text())
        assert records and all((out / "data" / r["image"]).is_file() for r in records)
        images[split] = {r["image"] for r in records}
    assert not images["train"] & images["test"] and not images["train"] & images["val"]

    # the teacher, its stores, each verified
    assert (out / "runs" / "teacher" / "final" / "model.safetensors").is_file()
    for store in ("bootstrap", "train", "test"):
        assert verify(out / "stores" / store) == [], store

    # students: every size x method x seed trained, exported, evaluated against the teacher store
    summary = json.loads((out / "reports" / "summary.json").read_text())
    assert len(summary["runs"]) == len(QUICK.students) * len(METHODS) * 2
    for run in summary["runs"]:
        name = f"{run['size']}-{run['method']}-s{run['seed']}"
        assert (out / "runs" / name / "final" / "provenance.json").is_file()
        report = json.loads((out / "reports" / f"eval-{name}.json").read_text())
        assert report["accuracy"] == run["accuracy"] and report["agreement"]["forward_kl"] >= 0
    assert {(r["size"], r["method"]) for r in summary["rows"]} == {(s, m) for s in QUICK.students for m in METHODS}
    assert all(r["n_seeds"] == 2 for r in summary["rows"])
    assert (out / "reports" / "summary.md").read_text().startswith("Teacher test accuracy")

    # pictures
    with Image.open(out / "reports" / "accuracy.png") as im:
        assert im.size[0] > 100
    assert list((out / "reports" / "saliency").glob("saliency_*.png"))

    # every step's config reloads with its job's config class
    configs = sorted((out / "configs").glob("*.yaml"))
    job_of = {"dump": "teacher-dump", "train": "distill", "eval": "eval"}
    assert len(configs) == 3 + 1 + 1 + len(summary["runs"]) * 2
    for path in configs:
        job = job_of[path.stem.split("-")[0]]
        load_config(resolve(RUN_JOBS[job].config), path)


def test_demo_quick_trains_students_from_the_exact_and_the_compact_store(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--quick", "--store-profiles", "exact,compact"]) == 0
    assert "| student | recipe | store | test accuracy (%) | paired Δ (points) |" in capsys.readouterr().out
    assert verify(out / "stores" / "train-compact") == []
    assert read_manifest(out / "stores" / "train-compact").signals["codec"]["profile"] == "compact"
    summary = json.loads((out / "reports" / "summary.json").read_text())
    signal_methods = [m for m, w in METHODS.items() if any(v for k, v in w.items() if k != "sft")]
    compact = [r for r in summary["runs"] if r["store"] == "compact"]
    assert sorted((r["size"], r["method"]) for r in compact) == sorted((s, m) for s in QUICK.students for m in signal_methods)
    for run in compact:
        name = f"{run['size']}-{run['method']}-compact-s{run['seed']}"
        provenance = json.loads((out / "runs" / name / "final" / "provenance.json").read_text())
        assert "train-compact" in json.dumps(provenance)
    assert {(r["size"], r["method"], r["store"]) for r in summary["rows"]} == (
        {(s, m, "exact") for s in QUICK.students for m in METHODS} | {(s, m, "compact") for s in QUICK.students for m in signal_methods})
