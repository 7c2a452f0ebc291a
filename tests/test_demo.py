"""`pipeline demo --quick` end to end: every artifact it promises is on disk and consistent."""

from __future__ import annotations

import json

import pytest
import torch

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


def test_demo_full_profile_miniature(tmp_path, capsys):
    """`pipeline demo --profile full --quick`: every recipe of the ablation, paired seeds, the compact
    store, student-proposed candidates, the learning curve and saliency grounding; a rerun resumes."""
    from safetensors.torch import load_file

    from pipeline.tools.demo import FULL, STUDENT_CANDIDATES, miniature

    out = tmp_path / "demo"
    mini = miniature(FULL)
    assert main(["demo", "--out", str(out), "--profile", "full", "--quick"]) == 0
    assert "| student | recipe | store | test accuracy (%) | paired Δ (points) |" in capsys.readouterr().out
    summary = json.loads((out / "reports" / "summary.json").read_text())
    assert summary["seeds"] == 2
    rows = {(r["size"], r["method"], r["store"]): r for r in summary["rows"]}
    expected = {(s, m, "exact") for s in mini.students for m in RECIPES} | {
        (s, m, "compact") for s in mini.compact_sizes for m in ("kd", "align-ti")}
    assert set(rows) == expected
    # paired: each recipe against KD of the same seed; the compact store against the exact one
    for (size, method, store), row in rows.items():
        if (method, store) == ("kd", "exact"):
            assert "paired" not in row
            continue
        ref = rows[(size, "kd", "exact") if store == "exact" else (size, method, "exact")]
        assert row["paired"]["deltas"] == pytest.approx([a - b for a, b in zip(row["accuracies"], ref["accuracies"])])

    # student-proposed candidates: a store per size from its SFT-only student of seed 0
    for size in mini.students:
        store = out / "stores" / f"train-proposed-{size}"
        assert verify(store) == []
        assert f"{size}-sft-s0" in json.dumps(read_manifest(store).signals["transitions"])
        provenance = json.loads((out / "runs" / f"{size}-{STUDENT_CANDIDATES}-s0" / "final" / "provenance.json").read_text())
        assert str(store) in json.dumps(provenance)

    # learning curve: the first size's KD and Align-TI runs, at every checkpoint; the last is the final student
    curve = summary["learning_curve"]
    assert set(curve) == {f"small-{m}-s0" for m in mini.curve}
    for run, points in curve.items():
        assert [p["step"] for p in points] == [2, 4]
        last = load_file(str(out / "models" / "curve" / f"{run}-000004" / "model.safetensors"))
        final = load_file(str(out / "runs" / run / "final" / "model.safetensors"))
        assert last.keys() == final.keys() and all(torch.equal(last[k], final[k]) for k in last)

    # grounding, pictures
    grounding = json.loads((out / "reports" / "grounding.json").read_text())
    assert grounding["chosen_layers"] and len(grounding["layers"]) == FULL.teacher.layers
    for png in ("accuracy.png", "learning_curve.png", "grounding.png"):
        with Image.open(out / "reports" / png) as im:
            assert im.size[0] > 100, png

    # a rerun resumes: every task is skipped and the table is the same
    capsys.readouterr()
    assert main(["demo", "--out", str(out), "--profile", "full", "--quick"]) == 0
    skipped = capsys.readouterr().err.count("done before, skipped")
    assert skipped == len(summary["runs"]) + 4  # every student, and the 4 checkpoints of the curve
    again = json.loads((out / "reports" / "summary.json").read_text())
    assert again["rows"] == summary["rows"]
