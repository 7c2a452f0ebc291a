"""``pipeline demo``: the whole product on the embedded default, in one output folder.

1. ``data/``            the synthetic shapes VQA set (train/val/test on disjoint boards)
2. ``runs/teacher``     a tiny teacher trained with distill's SFT-only recipe. Distill reads its data
                        order from a store; the teacher's own store is the one it makes later, so the
                        untrained teacher first writes a minimal ``stores/bootstrap`` (index only:
                        top-1, no transitions) that serves the SFT run as data order.
3. ``stores/train``     the trained teacher's signals on the training split (the store students use),
   ``stores/test``      and on the test split (for the students' agreement with the teacher)
4. ``runs/<size>-<method>-s<seed>``  students of two sizes (one with the teacher's visual grid pooled
                        2×2), each trained with SFT-only, vanilla KD and Align-TI from the one store
   (``--store-profiles exact,compact``: also ``stores/train-compact``, the train store recoded to the
   compact profile, and KD and Align-TI students from it, ``runs/<size>-<method>-compact-s<seed>``,
   same seeds: does the compact store train the same students?)
5. ``reports/``         every evaluation as JSON, ``summary.md``/``summary.json`` with the table,
                        ``accuracy.png`` (accuracy by method and size), ``saliency/`` overlays
6. ``configs/``         the config of every step, to rerun any of them with ``pipeline run``
"""

from __future__ import annotations

import json
import logging
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.config import from_dict, save_config
from pipeline.tools.synthetic import generate
from pipeline.tools.tiny import TinySpec, save_tiny_vlm

log = logging.getLogger("pipeline.tools.demo")

FAMILY = "llava"
METHODS = {  # one recipe, three sets of weights (DESIGN.md §4)
    "sft": {"sft": 1.0, "kd": 0.0, "iva": 0.0, "tpa": 0.0},
    "kd": {"sft": 1.0, "kd": 1.0, "iva": 0.0, "tpa": 0.0},
    "align-ti": {"sft": 1.0, "kd": 1.0, "iva": 1.0, "tpa": 1.0},
}


@dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one demo run (full: the README's table; quick: tests)."""

    n_train: int
    n_val: int
    n_test: int
    teacher: TinySpec
    students: dict[str, TinySpec]
    teacher_steps: int
    student_steps: int
    batch_size: int = 32  # the teacher's
    student_batch_size: int = 8  # more, smaller steps: the students learn more within the same time
    teacher_lr: float = 1e-3
    student_lr: float = 3e-3
    turns: int = 3
    grid: int = 2  # board cells per side (16 px each)
    n_colours: int = 4
    n_shapes: int = 4
    describe_fraction: float = 0.5  # training records that open with a "describe the board" turn
    shuffle_options: bool = False  # choice questions list the palette in one fixed order
    freeze: tuple[str, ...] = ("model.vision_tower",)  # every model keeps its random vision encoder as initialised
    dump_batch: int = 16
    workers: int = 0
    methods: tuple[str, ...] = tuple(METHODS)
    extra: dict = field(default_factory=dict)


# A 2x2 board of 16-px cells is a 32-px image; patch 8 gives the teacher a 4x4 visual grid (2x2 tokens per cell).
_TEACHER = TinySpec(hidden=64, layers=4, heads=4, kv_heads=2, intermediate=128, vision_hidden=64, vision_layers=2,
                    vision_heads=2, image_size=32, patch=8)
_STUDENTS = {
    # the teacher's 4x4 visual grid
    "small": TinySpec(hidden=64, layers=2, heads=4, kv_heads=2, intermediate=128, vision_hidden=32, vision_layers=1,
                      vision_heads=2, image_size=32, patch=8),
    # the teacher's grid pooled 2x2 (2x2, one visual token per board cell), and a narrower model
    "tiny-pooled": TinySpec(hidden=48, layers=2, heads=4, kv_heads=2, intermediate=96, vision_hidden=32, vision_layers=1,
                            vision_heads=2, image_size=32, patch=16),
}
FULL = Profile(n_train=4000, n_val=50, n_test=200, teacher=_TEACHER, students=_STUDENTS, teacher_steps=2500,
               student_steps=1000, turns=5)
QUICK = replace(FULL, n_train=24, n_val=4, n_test=6, teacher_steps=3, student_steps=2, batch_size=4, student_batch_size=4,
                turns=2)


def _load(cls, values: dict):
    return from_dict(cls, values)


def _step(out: Path, name: str, cls, values: dict, fn):
    """Run one job from its config, saving the config first so the step can be rerun alone."""
    cfg = _load(cls, values)
    save_config(cfg, out / "configs" / f"{name}.yaml")
    t0 = time.time()
    result = fn(cfg)
    log.info("%s done in %.1f s", name, time.time() - t0)
    return result


STORE_PROFILES = ("exact", "compact")


def run_demo(out: Path, quick: bool = False, seeds: int = 1, store_profiles: tuple[str, ...] = ("exact",)) -> dict:
    from stage1_teacher.config import DumpConfig
    from stage1_teacher.dump import run as dump
    from stage2_student.config import DistillConfig
    from stage2_student.distill import run as distill
    from stage2_student.evaluate import EvalConfig
    from stage2_student.evaluate import run as evaluate

    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    unknown = [p for p in store_profiles if p not in STORE_PROFILES]
    if unknown or "exact" not in store_profiles:
        raise ValueError(f"--store-profiles must include exact and name only {', '.join(STORE_PROFILES)}; "
                         f"got {', '.join(store_profiles)}")
    profile = QUICK if quick else FULL
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()

    log.info("[1/6] synthetic shapes VQA data: %d train / %d val / %d test images", profile.n_train, profile.n_val, profile.n_test)
    data = generate(out / "data", seed=0, n_train=profile.n_train, n_val=profile.n_val, n_test=profile.n_test,
                    turns=profile.turns, grid=profile.grid, n_colours=profile.n_colours, n_shapes=profile.n_shapes,
                    describe_fraction=profile.describe_fraction, shuffle_options=profile.shuffle_options)
    max_length = 512

    log.info("[2/6] teacher: SFT-only distill run on a bootstrap store")
    teacher_init = save_tiny_vlm(out / "models" / "teacher-init", FAMILY, profile.teacher, seed=0)
    minimal = {"top_k": 1, "saliency_layers": [0], "visual_fraction": 0.0, "transitions": {"enabled": False}}
    _step(out, "dump-bootstrap", DumpConfig, {
        "teacher": {"path": str(teacher_init)}, "data": {"path": str(data["train"]), "max_length": max_length},
        "output": {"dir": str(out / "stores" / "bootstrap"), "shard_size": 512}, "signals": minimal,
        "batch_size": profile.dump_batch,
    }, dump)
    _step(out, "train-teacher", DistillConfig, {
        "student": {"path": str(teacher_init)}, "store": {"dir": str(out / "stores" / "bootstrap")},
        "output": {"dir": str(out / "runs" / "teacher")}, "seed": 0,
        "train": {"steps": profile.teacher_steps, "batch_size": profile.batch_size, "lr": profile.teacher_lr,
                  "warmup_steps": min(30, profile.teacher_steps // 10), "freeze": list(profile.freeze)},
        "loss": {"sft": 1.0}, "data": {"max_length": max_length, "num_workers": 1},
    }, distill)
    teacher = out / "runs" / "teacher" / "final"

    log.info("[3/6] teacher evaluation and teacher stores (train for distillation, test for agreement)")
    reports = out / "reports"
    teacher_eval = _step(out, "eval-teacher", EvalConfig, {
        "model": str(teacher), "data": {"path": str(data["test"]), "max_length": max_length},
        "output": str(reports / "eval-teacher.json"), "max_new_tokens": 6, "batch_size": 32,
    }, evaluate)
    signals = {"top_k": 32, "calibration_samples": 64 if not quick else 4, "visual_fraction": 0.25,
               "transitions": {"candidates": 4, "top_k": 16, "max_positions": 16}}
    for split in ("train", "test"):
        _step(out, f"dump-{split}", DumpConfig, {
            "teacher": {"path": str(teacher)}, "data": {"path": str(data[split]), "max_length": max_length},
            "output": {"dir": str(out / "stores" / split), "shard_size": 512}, "signals": signals,
            "batch_size": profile.dump_batch, "workers": profile.workers,
        }, dump)

    train_stores = {"exact": out / "stores" / "train"}
    if "compact" in store_profiles:
        # the same signals at the compact profile's defaults (what a compact dump writes; no teacher run)
        from stage1_teacher.config import CodecConfig
        from stage1_teacher.recode import recode

        train_stores["compact"] = out / "stores" / "train-compact"
        recode(train_stores["exact"], train_stores["compact"], CodecConfig(profile="compact"))

    log.info("[4/6] students: %s x %s x %d seed(s), stores %s", list(profile.students), list(profile.methods), seeds,
             list(train_stores))
    results = []
    for size, spec in profile.students.items():
        for seed in range(seeds):
            init = save_tiny_vlm(out / "models" / f"{size}-init-s{seed}", FAMILY, spec, seed=100 + seed)
            for store, method in [(st, m) for st in train_stores for m in profile.methods]:
                if store != "exact" and not any(w for k, w in METHODS[method].items() if k != "sft"):
                    continue  # SFT-only reads no teacher signal: the same run on every store
                name = f"{size}-{method}-s{seed}" if store == "exact" else f"{size}-{method}-{store}-s{seed}"
                _step(out, f"train-{name}", DistillConfig, {
                    "student": {"path": str(init)}, "store": {"dir": str(train_stores[store])},
                    "output": {"dir": str(out / "runs" / name)}, "seed": seed,
                    "train": {"steps": profile.student_steps, "batch_size": profile.student_batch_size,
                              "lr": profile.student_lr, "warmup_steps": min(20, profile.student_steps // 10),
                              "freeze": list(profile.freeze)},
                    "loss": METHODS[method], "data": {"max_length": max_length, "num_workers": 1},
                }, distill)
                report = _step(out, f"eval-{name}", EvalConfig, {
                    "model": str(out / "runs" / name / "final"),
                    "data": {"path": str(data["test"]), "max_length": max_length},
                    "store": str(out / "stores" / "test"), "output": str(reports / f"eval-{name}.json"),
                    "max_new_tokens": 6, "batch_size": 32,
                }, evaluate)
                results.append({"size": size, "method": method, "store": store, "seed": seed,
                                "accuracy": report["accuracy"],
                                "kl_to_teacher": report["agreement"]["forward_kl"],
                                "top1_agreement": report["agreement"]["top1_agreement"],
                                "by_type": {k: v["accuracy"] for k, v in report["by_type"].items()}})

    log.info("[5/6] report")
    summary = summarise(results, teacher_eval, profile, seeds, time.time() - t_start)
    (reports / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    table = format_table(summary)
    (reports / "summary.md").write_text(table + "\n")
    plot_accuracy(summary, reports / "accuracy.png")

    log.info("[6/6] saliency overlays of the teacher store")
    from pipeline.tools.render import render

    render(str(out / "stores" / "train"), str(reports / "saliency"), n_samples=4)
    print(table)
    print(f"\nEverything is in {out}: data/, models/, runs/, stores/, reports/, configs/ "
          f"({summary['wall_time_s'] / 60:.1f} min)")
    return summary


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict], teacher_eval: dict, profile: Profile, seeds: int, wall: float) -> dict:
    rows = []
    stores = list(dict.fromkeys(r.get("store", "exact") for r in results))
    for size in profile.students:
        for method, store in [(m, st) for m in profile.methods for st in stores]:
            runs = [r for r in results if r["size"] == size and r["method"] == method and r.get("store", "exact") == store]
            if not runs:
                continue
            acc, acc_sd = _mean_sd([r["accuracy"] for r in runs])
            kl, kl_sd = _mean_sd([r["kl_to_teacher"] for r in runs])
            rows.append({"size": size, "method": method, "store": store, "n_seeds": len(runs), "accuracy": acc,
                         "accuracy_sd": acc_sd,
                         "kl_to_teacher": kl, "kl_to_teacher_sd": kl_sd,
                         "accuracies": [r["accuracy"] for r in runs]})
    return {
        "teacher_accuracy": teacher_eval["accuracy"],
        "teacher_by_type": {k: v["accuracy"] for k, v in teacher_eval["by_type"].items()},
        "rows": rows,
        "runs": results,
        "seeds": seeds,
        "profile": {"n_train": profile.n_train, "n_test": profile.n_test, "teacher_steps": profile.teacher_steps,
                    "student_steps": profile.student_steps, "batch_size": profile.batch_size,
                    "student_batch_size": profile.student_batch_size},
        "wall_time_s": wall,
    }


def format_table(summary: dict) -> str:
    lines = [
        f"Teacher test accuracy: {100 * summary['teacher_accuracy']:.1f}%  "
        f"(seeds per student cell: {summary['seeds']}; mean ± sd)",
        "",
        "| student | method | test accuracy (%) | KL to teacher (test) |",
        "|---|---|---|---|",
    ]
    several = len({r.get("store", "exact") for r in summary["rows"]}) > 1
    if several:  # a store column: the same students from the exact and the compact store
        lines[2:4] = ["| student | method | store | test accuracy (%) | KL to teacher (test) |", "|---|---|---|---|---|"]
    for r in summary["rows"]:
        store = f" {r['store']} |" if several else ""
        lines.append(f"| {r['size']} | {r['method']} |{store} {100 * r['accuracy']:.1f} ± {100 * r['accuracy_sd']:.1f} "
                     f"| {r['kl_to_teacher']:.3f} ± {r['kl_to_teacher_sd']:.3f} |")
    return "\n".join(lines)


def plot_accuracy(summary: dict, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sizes = list(dict.fromkeys(r["size"] for r in summary["rows"]))
    methods = list(dict.fromkeys(r["method"] for r in summary["rows"]))
    fig = Figure(figsize=(6.5, 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    width = 0.8 / len(methods)
    for i, method in enumerate(methods):
        rows = [next(r for r in summary["rows"] if r["size"] == s and r["method"] == method and r.get("store", "exact") == "exact")
                for s in sizes]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(sizes))]
        ax.bar(xs, [100 * r["accuracy"] for r in rows], width, yerr=[100 * r["accuracy_sd"] for r in rows],
               capsize=3, label=method)
    ax.axhline(100 * summary["teacher_accuracy"], color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"students by method ({summary['seeds']} seed(s), mean ± sd)")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
