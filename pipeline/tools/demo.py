"""``pipeline demo``: the whole product on the embedded default, in one output folder.

1. ``data/``            the synthetic shapes VQA set (train/val/test on disjoint boards; every turn
                        records the board cells it is about)
2. ``runs/teacher``     a tiny teacher trained with distill's SFT-only recipe. Distill reads its data
                        order from a store; the teacher's own store is the one it makes later, so the
                        untrained teacher first writes a minimal ``stores/bootstrap`` (index only:
                        top-1, no transitions) that serves the SFT run as data order.
3. ``stores/train``     the trained teacher's signals on the training split (the store students use),
   ``stores/test``      and on the test split (for the students' agreement with the teacher)
4. ``runs/<size>-<recipe>-s<seed>``  students of two sizes (one with the teacher's visual grid pooled
                        2×2), each trained with every recipe of the profile from the one store, the
                        same seed giving the same data order to every recipe (paired comparisons).
   ``stores/train-compact`` (store profile ``compact``): the train store recoded to the compact
                        codec, and KD and Align-TI students from it, ``runs/<size>-<recipe>-compact-s<seed>``.
   ``stores/train-proposed-<size>`` (recipe ``align-ti+sc``): the teacher's signals with TPA
                        candidates proposed by that size's SFT-only student of seed 0.
5. ``reports/``         every evaluation as JSON; ``summary.md``/``summary.json`` (the tables:
                        accuracy by recipe, paired differences, by question type), ``accuracy.png``,
                        ``learning_curve.png`` (profile full), ``grounding.md``/``grounding.png``
                        (saliency mass on the cells each question is about, per layer), ``saliency/``
6. ``configs/``         the config of every step, to rerun any of them with ``pipeline run``;
   ``logs/``            with ``jobs`` > 1, each task's output

Profiles: ``default`` (about 14 min on 2 cores: SFT-only, KD and Align-TI, one seed) and ``full``
(every recipe of the Align-TI ablation, 3 seeds, longer students, a learning curve, the compact
store; two tasks at a time). ``--quick`` shrinks either to a miniature for tests. Running the same
command again resumes: finished steps are skipped.
"""

from __future__ import annotations

import json
import logging
import shutil
import statistics
import time
from dataclasses import dataclass, field, replace
from pathlib import Path

from pipeline.config import from_dict, save_config
from pipeline.tools.jobs import Task, run_tasks
from pipeline.tools.synthetic import generate
from pipeline.tools.tiny import TinySpec, save_tiny_vlm

log = logging.getLogger("pipeline.tools.demo")

FAMILY = "llava"
KD = {"sft": 1.0, "kd": 1.0, "iva": 0.0, "tpa": 0.0}
RECIPES = {  # one recipe, different weights (DESIGN.md §4): the Align-TI ablation
    "sft": {"sft": 1.0, "kd": 0.0, "iva": 0.0, "tpa": 0.0},
    "kd": KD,
    "kd+iva": {**KD, "iva": 1.0},
    "kd+tpa": {**KD, "tpa": 1.0},
    "align-ti": {**KD, "iva": 1.0, "tpa": 1.0},
    "align-ti+sc": {**KD, "iva": 1.0, "tpa": 1.0},  # TPA candidates proposed by the student (sft, seed 0)
}
STUDENT_CANDIDATES = "align-ti+sc"
COMPACT_RECIPES = ("kd", "align-ti")  # what the compact store is judged on
STORE_PROFILES = ("exact", "compact")


@dataclass(frozen=True)
class Profile:
    """Sizes and budgets of one demo run."""

    n_train: int
    n_val: int
    n_test: int
    teacher: TinySpec
    students: dict[str, TinySpec]
    teacher_steps: int
    student_steps: int
    batch_size: int = 32  # the teacher's
    student_batch_size: int = 8
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
    workers: int = 0  # the teacher dump's Ray actors (0: in-process)
    methods: tuple[str, ...] = ("sft", "kd", "align-ti")
    seeds: int = 1
    store_profiles: tuple[str, ...] = ("exact",)
    compact_sizes: tuple[str, ...] = ()  # sizes trained from the compact store too (empty: every size)
    jobs: int = 1  # student tasks side by side (each a one-thread process when > 1)
    curve: tuple[str, ...] = ()  # recipes of the first size whose seed-0 run is evaluated along the way
    curve_points: int = 8
    grounding: bool = True
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
DEFAULT = Profile(n_train=4000, n_val=50, n_test=200, teacher=_TEACHER, students=_STUDENTS, teacher_steps=2500,
                  student_steps=1000, turns=5)
FULL = replace(DEFAULT, methods=tuple(RECIPES), seeds=3, store_profiles=STORE_PROFILES, compact_sizes=("small",),
               student_steps=2500, student_batch_size=16, jobs=2, curve=("kd", "align-ti"))
PROFILES = {"default": DEFAULT, "full": FULL}


def miniature(profile: Profile) -> Profile:
    """The same pipeline in seconds (``--quick``): tiny splits and budgets, steps in-process."""
    return replace(profile, n_train=24, n_val=4, n_test=6, teacher_steps=3, student_steps=4, batch_size=4,
                   student_batch_size=4, turns=2, seeds=min(profile.seeds, 2), jobs=1,
                   curve_points=min(profile.curve_points, 2))


QUICK = miniature(DEFAULT)


def _load(cls, values: dict):
    return from_dict(cls, values)


def _config(out: Path, name: str, cls, values: dict) -> Path:
    """Check a step's config and save it under ``configs/``, so the step can be rerun alone."""
    path = out / "configs" / f"{name}.yaml"
    save_config(_load(cls, values), path)
    return path


def _step(out: Path, name: str, cls, values: dict, fn):
    """Run one job in this process from its config, saving the config first."""
    cfg = _load(cls, values)
    save_config(cfg, out / "configs" / f"{name}.yaml")
    t0 = time.time()
    result = fn(cfg)
    log.info("%s done in %.1f s", name, time.time() - t0)
    return result


def _done(*paths: Path):
    return lambda: all(p.exists() for p in paths)


def _run_name(size: str, recipe: str, store: str, seed: int) -> str:
    return f"{size}-{recipe}-s{seed}" if store == "exact" else f"{size}-{recipe}-{store}-s{seed}"


def run_demo(out: Path, quick: bool = False, seeds: int | None = None, store_profiles: tuple[str, ...] | None = None,
             profile: str = "default", jobs: int | None = None) -> dict:
    from stage1_teacher.config import DumpConfig
    from stage1_teacher.dump import run as dump
    from stage2_student.config import DistillConfig
    from stage2_student.evaluate import EvalConfig
    from stage2_student.evaluate import run as evaluate

    if profile not in PROFILES:
        raise ValueError(f"--profile must be one of {', '.join(PROFILES)}, got {profile!r}")
    prof = miniature(PROFILES[profile]) if quick else PROFILES[profile]
    seeds = prof.seeds if seeds is None else seeds
    store_profiles = prof.store_profiles if store_profiles is None else tuple(store_profiles)
    jobs = prof.jobs if jobs is None else jobs
    if seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {seeds}")
    if jobs < 1:
        raise ValueError(f"--jobs must be >= 1, got {jobs}")
    unknown = [p for p in store_profiles if p not in STORE_PROFILES]
    if unknown or "exact" not in store_profiles:
        raise ValueError(f"--store-profiles must include exact and name only {', '.join(STORE_PROFILES)}; "
                         f"got {', '.join(store_profiles)}")
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    timings: dict[str, float] = {}

    log.info("[1/7] synthetic shapes VQA data: %d train / %d val / %d test images", prof.n_train, prof.n_val, prof.n_test)
    data = generate(out / "data", seed=0, n_train=prof.n_train, n_val=prof.n_val, n_test=prof.n_test,
                    turns=prof.turns, grid=prof.grid, n_colours=prof.n_colours, n_shapes=prof.n_shapes,
                    describe_fraction=prof.describe_fraction, shuffle_options=prof.shuffle_options)
    max_length = 512

    log.info("[2/7] teacher: SFT-only distill run on a bootstrap store")
    t0 = time.time()
    teacher_init = save_tiny_vlm(out / "models" / "teacher-init", FAMILY, prof.teacher, seed=0)
    teacher = out / "runs" / "teacher" / "final"
    minimal = {"top_k": 1, "saliency_layers": [0], "visual_fraction": 0.0, "transitions": {"enabled": False}}
    if not (teacher / "provenance.json").exists():
        _step(out, "dump-bootstrap", DumpConfig, {
            "teacher": {"path": str(teacher_init)}, "data": {"path": str(data["train"]), "max_length": max_length},
            "output": {"dir": str(out / "stores" / "bootstrap"), "shard_size": 512}, "signals": minimal,
            "batch_size": prof.dump_batch,
        }, dump)
        from stage2_student.distill import run as distill

        _step(out, "train-teacher", DistillConfig, {
            "student": {"path": str(teacher_init)}, "store": {"dir": str(out / "stores" / "bootstrap")},
            "output": {"dir": str(out / "runs" / "teacher")}, "seed": 0,
            "train": {"steps": prof.teacher_steps, "batch_size": prof.batch_size, "lr": prof.teacher_lr,
                      "warmup_steps": min(30, prof.teacher_steps // 10), "freeze": list(prof.freeze)},
            "loss": {"sft": 1.0}, "data": {"max_length": max_length, "num_workers": 1},
        }, distill)
    timings["teacher"] = time.time() - t0

    log.info("[3/7] teacher evaluation and teacher stores (train for distillation, test for agreement)")
    t0 = time.time()
    reports = out / "reports"
    teacher_report = reports / "eval-teacher.json"
    if teacher_report.exists():
        teacher_eval = json.loads(teacher_report.read_text())
    else:
        teacher_eval = _step(out, "eval-teacher", EvalConfig, {
            "model": str(teacher), "data": {"path": str(data["test"]), "max_length": max_length},
            "output": str(teacher_report), "max_new_tokens": 6, "batch_size": 32,
        }, evaluate)
    signals = {"top_k": 32, "calibration_samples": 64 if not quick else 4, "visual_fraction": 0.25,
               "transitions": {"candidates": 4, "top_k": 16, "max_positions": 16}}

    def dump_values(split: str, store: str, sig: dict) -> dict:
        return {"teacher": {"path": str(teacher)}, "data": {"path": str(data[split]), "max_length": max_length},
                "output": {"dir": str(out / "stores" / store), "shard_size": 512}, "signals": sig,
                "batch_size": prof.dump_batch, "workers": prof.workers}

    for split in ("train", "test"):  # a complete store resumes as a no-op
        _step(out, f"dump-{split}", DumpConfig, dump_values(split, split, signals), dump)

    train_stores = {"exact": out / "stores" / "train"}
    if "compact" in store_profiles:
        # the same signals at the compact profile's defaults (what a compact dump writes; no teacher run)
        from schemas.layout import MANIFEST_NAME
        from stage1_teacher.config import CodecConfig
        from stage1_teacher.recode import recode

        train_stores["compact"] = out / "stores" / "train-compact"
        if not (train_stores["compact"] / MANIFEST_NAME).exists():
            shutil.rmtree(train_stores["compact"], ignore_errors=True)  # an interrupted recode starts over
            recode(train_stores["exact"], train_stores["compact"], CodecConfig(profile="compact"))
    timings["stores"] = time.time() - t0

    sizes = list(prof.students)
    methods = [m for m in prof.methods if m in RECIPES]
    if len(methods) != len(prof.methods):
        raise ValueError(f"unknown recipe(s) {sorted(set(prof.methods) - set(RECIPES))}; known: {', '.join(RECIPES)}")
    log.info("[4/7] students: %s x %s x %d seed(s), stores %s, %d at a time", sizes, methods, seeds,
             list(train_stores), jobs)
    t0 = time.time()
    results: list[dict] = []
    tasks: list[Task] = []
    curve_runs = [_run_name(sizes[0], r, "exact", 0) for r in prof.curve if r in methods]
    curve_every = max(1, prof.student_steps // prof.curve_points)

    def student_task(size: str, recipe: str, store: str, seed: int, store_dir: Path, needs: tuple[str, ...] = ()) -> Task:
        name = _run_name(size, recipe, store, seed)
        init = out / "models" / f"{size}-init-s{seed}"
        train = {"steps": prof.student_steps, "batch_size": prof.student_batch_size, "lr": prof.student_lr,
                 "warmup_steps": min(20, prof.student_steps // 10), "freeze": list(prof.freeze)}
        if name in curve_runs:
            train["checkpoint_every"] = curve_every
        train_cfg = _config(out, f"train-{name}", DistillConfig, {
            "student": {"path": str(init)}, "store": {"dir": str(store_dir)},
            "output": {"dir": str(out / "runs" / name)}, "seed": seed, "train": train,
            "loss": RECIPES[recipe], "data": {"max_length": max_length, "num_workers": 1},
        })
        report = reports / f"eval-{name}.json"
        eval_cfg = _config(out, f"eval-{name}", EvalConfig, {
            "model": str(out / "runs" / name / "final"), "data": {"path": str(data["test"]), "max_length": max_length},
            "store": str(out / "stores" / "test"), "output": str(report), "max_new_tokens": 6, "batch_size": 32,
        })

        def collect() -> None:
            r = json.loads(report.read_text())
            results.append({"size": size, "method": recipe, "store": store, "seed": seed, "accuracy": r["accuracy"],
                            "kl_to_teacher": r["agreement"]["forward_kl"],
                            "top1_agreement": r["agreement"]["top1_agreement"],
                            "by_type": {k: v["accuracy"] for k, v in r["by_type"].items()}})

        return Task(name, [("distill", train_cfg), ("eval", eval_cfg)], needs,
                    _done(out / "runs" / name / "final" / "provenance.json", report), collect)

    for seed in range(seeds):
        for size in sizes:
            save_tiny_vlm(out / "models" / f"{size}-init-s{seed}", FAMILY, prof.students[size], seed=100 + seed)
    for size in sizes:
        if STUDENT_CANDIDATES in methods:
            sft0 = _run_name(size, "sft", "exact", 0)
            if "sft" not in methods:
                raise ValueError(f"recipe {STUDENT_CANDIDATES} needs the sft recipe (its student proposes the candidates)")
            store = f"train-proposed-{size}"
            proposed = {**signals, "transitions": {**signals["transitions"],
                                                   "candidates_from": str(out / "runs" / sft0 / "final")}}
            cfg = _config(out, f"dump-{store}", DumpConfig, dump_values("train", store, proposed))
            tasks.append(Task(f"dump-{store}", [("teacher-dump", cfg)], (sft0,)))
    for seed in range(seeds):
        for size in sizes:
            for recipe in methods:
                if recipe == STUDENT_CANDIDATES:
                    store = f"train-proposed-{size}"
                    tasks.append(student_task(size, recipe, "exact", seed, out / "stores" / store, (f"dump-{store}",)))
                else:
                    tasks.append(student_task(size, recipe, "exact", seed, train_stores["exact"]))
            if "compact" in train_stores and (not prof.compact_sizes or size in prof.compact_sizes):
                for recipe in [r for r in COMPACT_RECIPES if r in methods]:
                    tasks.append(student_task(size, recipe, "compact", seed, train_stores["compact"]))
    # the proposing students first, so the proposed stores are ready early
    tasks.sort(key=lambda t: 0 if t.name.endswith("-sft-s0") else 1)
    task_seconds = run_tasks(tasks, jobs, out / "logs")
    timings["students"] = time.time() - t0

    curve = None
    if curve_runs:
        log.info("[5/7] learning curve: %s evaluated every %d steps", ", ".join(curve_runs), curve_every)
        t0 = time.time()
        curve = learning_curve(out, curve_runs, data["test"], max_length, jobs)
        timings["curve"] = time.time() - t0

    grounding_result = None
    if prof.grounding:
        log.info("[6/7] saliency grounding of the teacher on the test split, per layer")
        from pipeline.tools.grounding import grounding, write_grounding

        t0 = time.time()
        grounding_result = grounding(teacher, data["test"], out / "stores" / "test", limit=prof.n_test,
                                     max_length=max_length)
        write_grounding(grounding_result, reports)
        timings["grounding"] = time.time() - t0

    log.info("[7/7] report")
    summary = summarise(results, teacher_eval, prof, seeds, time.time() - t_start, methods)
    summary["timings_s"] = timings
    summary["task_seconds"] = task_seconds
    summary["jobs"] = jobs
    if curve is not None:
        summary["learning_curve"] = curve
        plot_curve(curve, summary["teacher_accuracy"], reports / "learning_curve.png")
    if grounding_result is not None:
        summary["grounding"] = {"chosen_layers": grounding_result.get("chosen_layers"),
                                "layers": {l: {k: v[k] for k in ("mass", "uniform")} for l, v in grounding_result["layers"].items()}}
    (reports / "summary.json").write_text(json.dumps(summary, indent=2, sort_keys=True))
    table = format_table(summary)
    (reports / "summary.md").write_text(table + "\n")
    plot_accuracy(summary, reports / "accuracy.png")

    from pipeline.tools.render import render

    render(str(out / "stores" / "train"), str(reports / "saliency"), n_samples=4)
    print(table)
    print(f"\nEverything is in {out}: data/, models/, runs/, stores/, reports/, configs/ "
          f"({summary['wall_time_s'] / 60:.1f} min)")
    return summary


def learning_curve(out: Path, runs: list[str], test_data: Path, max_length: int, jobs: int) -> dict:
    """Test accuracy of each run at each of its checkpoints (exported as students, then evaluated)."""
    from stage2_student.checkpoint import LATEST
    from stage2_student.evaluate import EvalConfig
    from stage2_student.student import student_at_checkpoint

    tasks, points = [], {}
    for run in runs:
        ckpts = sorted(p for p in (out / "runs" / run / "checkpoints").iterdir() if p.is_dir() and p.name != LATEST)
        for ck in ckpts:
            step = int(ck.name.split("-")[-1])
            model = out / "models" / "curve" / f"{run}-{step:06d}"
            if not (model / "provenance.json").exists():
                student_at_checkpoint(out / "runs" / run, ck, model)
            report = out / "reports" / "curve" / f"eval-{run}-{step:06d}.json"
            cfg = _config(out, f"eval-curve-{run}-{step:06d}", EvalConfig, {
                "model": str(model), "data": {"path": str(test_data), "max_length": max_length},
                "output": str(report), "max_new_tokens": 6, "batch_size": 32,
            })
            tasks.append(Task(f"curve-{run}-{step:06d}", [("eval", cfg)], (), _done(report)))
            points.setdefault(run, []).append((step, report))
    run_tasks(tasks, jobs, out / "logs")
    return {run: [{"step": step, "accuracy": json.loads(r.read_text())["accuracy"]} for step, r in pts]
            for run, pts in points.items()}


def _mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(results: list[dict], teacher_eval: dict, profile: Profile, seeds: int, wall: float,
              methods: list[str] | None = None) -> dict:
    """Rows per (size, recipe, store) with mean ± sd over seeds and the paired difference per seed:
    against vanilla KD of the same seed for the exact store, against the same recipe on the exact
    store for another store."""
    methods = list(profile.methods) if methods is None else methods
    rows = []
    stores = list(dict.fromkeys(r.get("store", "exact") for r in results))
    by_key = {(r["size"], r["method"], r.get("store", "exact"), r["seed"]): r for r in results}
    for size in profile.students:
        for method, store in [(m, st) for m in methods for st in stores]:
            runs = sorted((r for r in results if r["size"] == size and r["method"] == method and r.get("store", "exact") == store),
                          key=lambda r: r["seed"])
            if not runs:
                continue
            row = {"size": size, "method": method, "store": store, "n_seeds": len(runs),
                   "accuracies": [r["accuracy"] for r in runs], "seeds": [r["seed"] for r in runs]}
            for key in ("accuracy", "kl_to_teacher", "top1_agreement"):
                vals = [r[key] for r in runs if key in r]
                if vals:
                    row[key], row[f"{key}_sd"] = _mean_sd(vals)
            types = sorted({t for r in runs for t in r.get("by_type", {})})
            row["by_type"] = {t: statistics.fmean(r["by_type"][t] for r in runs if t in r.get("by_type", {})) for t in types}
            base = ("kd", "exact") if store == "exact" else (method, "exact")
            if (method, store) != base:
                pairs = [(r["accuracy"], by_key[(size, *base, r["seed"])]["accuracy"]) for r in runs
                         if (size, *base, r["seed"]) in by_key]
                if pairs:
                    deltas = [a - b for a, b in pairs]
                    row["paired"] = {"vs": f"{base[0]} ({base[1]})", "deltas": deltas, "mean": statistics.fmean(deltas),
                                     "sd": statistics.stdev(deltas) if len(deltas) > 1 else 0.0,
                                     "better": sum(d > 0 for d in deltas), "n": len(deltas)}
            rows.append(row)
    return {
        "teacher_accuracy": teacher_eval["accuracy"],
        "teacher_by_type": {k: v["accuracy"] for k, v in teacher_eval["by_type"].items()},
        "rows": rows,
        "runs": sorted(results, key=lambda r: (r["size"], r["method"], r.get("store", "exact"), r["seed"])),
        "seeds": seeds,
        "profile": {"n_train": profile.n_train, "n_test": profile.n_test, "teacher_steps": profile.teacher_steps,
                    "student_steps": profile.student_steps, "batch_size": profile.batch_size,
                    "student_batch_size": profile.student_batch_size, "student_lr": profile.student_lr},
        "wall_time_s": wall,
    }


def format_table(summary: dict) -> str:
    several = len({r.get("store", "exact") for r in summary["rows"]}) > 1
    store_h, store_sep = (" store |", "---|") if several else ("", "")
    lines = [
        f"Teacher test accuracy: {100 * summary['teacher_accuracy']:.1f}%  "
        f"(seeds per student cell: {summary['seeds']}; mean ± sd over seeds; paired: the same seed's "
        "student of the reference recipe, same initial weights and data order)",
        "",
        f"| student | recipe |{store_h} test accuracy (%) | paired Δ (points) | KL to teacher (test) | top-1 agreement (%) |",
        f"|---|---|{store_sep}---|---|---|---|",
    ]
    for r in summary["rows"]:
        store = f" {r['store']} |" if several else ""
        p = r.get("paired")
        reference = (r["method"], r.get("store", "exact")) == ("kd", "exact")
        paired = (f"{100 * p['mean']:+.1f} ± {100 * p['sd']:.1f} vs {p['vs']}, {p['better']}/{p['n']} seeds up"
                  if p else "reference" if reference else "-")
        top1 = (f"{100 * r['top1_agreement']:.1f} ± {100 * r['top1_agreement_sd']:.1f}" if "top1_agreement" in r else "-")
        lines.append(f"| {r['size']} | {r['method']} |{store} {100 * r['accuracy']:.1f} ± {100 * r['accuracy_sd']:.1f} "
                     f"| {paired} | {r['kl_to_teacher']:.3f} ± {r['kl_to_teacher_sd']:.3f} | {top1} |")
    types = sorted(summary.get("teacher_by_type", {}))
    if types:
        lines += ["", "Accuracy by question type (%, mean over seeds):", "",
                  f"| student | recipe |{store_h} " + " | ".join(types) + " |",
                  f"|---|---|{store_sep}" + "---|" * len(types),
                  f"| teacher | |{' |' if several else ''} "
                  + " | ".join(f"{100 * summary['teacher_by_type'][t]:.1f}" for t in types) + " |"]
        for r in summary["rows"]:
            store = f" {r['store']} |" if several else ""
            lines.append(f"| {r['size']} | {r['method']} |{store} "
                         + " | ".join(f"{100 * r['by_type'][t]:.1f}" if t in r.get("by_type", {}) else "-" for t in types) + " |")
    return "\n".join(lines)


def plot_accuracy(summary: dict, path: Path) -> None:
    """Accuracy by recipe and size (bars: mean, dots: seeds, dashed: the teacher), and below, each
    recipe's paired difference to vanilla KD per seed."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    exact = [r for r in summary["rows"] if r.get("store", "exact") == "exact"]
    sizes = list(dict.fromkeys(r["size"] for r in exact))
    methods = list(dict.fromkeys(r["method"] for r in exact))
    paired = any("paired" in r for r in exact)
    fig = Figure(figsize=(max(6.5, 1.2 * len(methods) * len(sizes)), 6.4 if paired else 3.8))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(211 if paired else 111)
    width = 0.8 / len(methods)
    colours = {m: f"C{i}" for i, m in enumerate(methods)}
    for i, method in enumerate(methods):
        rows = [next((r for r in exact if r["size"] == s and r["method"] == method), None) for s in sizes]
        xs = [j + (i - (len(methods) - 1) / 2) * width for j in range(len(sizes))]
        ax.bar([x for x, r in zip(xs, rows) if r], [100 * r["accuracy"] for r in rows if r], width,
               yerr=[100 * r["accuracy_sd"] for r in rows if r], capsize=3, label=method, color=colours[method], alpha=0.8)
        for x, r in zip(xs, rows):
            if r:
                ax.scatter([x] * len(r["accuracies"]), [100 * a for a in r["accuracies"]], s=8, color="black", zorder=3)
    ax.axhline(100 * summary["teacher_accuracy"], color="black", linestyle="--", linewidth=1, label="teacher")
    ax.set_xticks(range(len(sizes)), sizes)
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.set_title(f"students by recipe ({summary['seeds']} seed(s): bars mean ± sd, dots seeds)", fontsize=10)
    ax.legend(loc="lower right", fontsize=7, ncol=2)
    if paired:
        ax = fig.add_subplot(212)
        for i, method in enumerate(methods):
            for j, s in enumerate(sizes):
                r = next((r for r in exact if r["size"] == s and r["method"] == method and "paired" in r), None)
                if r is None:
                    continue
                x = j + (i - (len(methods) - 1) / 2) * width
                ax.bar(x, 100 * r["paired"]["mean"], width, color=colours[method], alpha=0.8)
                ax.scatter([x] * r["paired"]["n"], [100 * d for d in r["paired"]["deltas"]], s=8, color="black", zorder=3)
        ax.axhline(0, color="black", linewidth=0.8)
        ax.set_xticks(range(len(sizes)), sizes)
        ax.set_ylabel("Δ vs KD, same seed (points)")
        ax.set_title("paired difference to vanilla KD (bars: mean, dots: seeds)", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)


def plot_curve(curve: dict, teacher_accuracy: float, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(6, 3.6))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(111)
    for run, points in curve.items():
        ax.plot([p["step"] for p in points], [100 * p["accuracy"] for p in points], marker="o", label=run)
    ax.axhline(100 * teacher_accuracy, color="black", linestyle="--", linewidth=1, label="teacher")
    ax.axhline(100 * teacher_accuracy - 10, color="grey", linestyle=":", linewidth=1, label="teacher - 10 points")
    ax.set_xlabel("training step (cosine schedule of the full run)")
    ax.set_ylabel("test accuracy (%)")
    ax.set_ylim(0, 100)
    ax.legend(fontsize=8, loc="lower right")
    ax.set_title("students along their run", fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
