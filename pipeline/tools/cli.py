"""The ``pipeline`` command: a thin table from command names to functions.

    pipeline run <job> --config FILE.yaml [key.sub=value ...]   # a configured job (overrides win)
    pipeline run <job> --help                                   # every config key, typed and documented
    pipeline verify STORE                                       # exit 1 on any inconsistency
    pipeline inspect STORE [--sample ID --json] [--out DIR]     # statistics, one sample, PNGs
    pipeline tiny --family llava --preset teacher --out DIR     # a tiny VLM checkpoint (tests, demo)
    pipeline export-vllm --model DIR --out DIR                  # a copy of a checkpoint that vLLM loads
    pipeline demo --out DIR [--profile full] [--quick] [--seeds N] [--jobs N] [--store-profiles exact,compact]

Jobs are listed in ``RUN_JOBS`` as ``"module:ConfigClass"`` and ``"module:function"`` strings,
imported only when used so that ``pipeline --help`` stays fast; a test checks every entry resolves.
Other top-level commands live in ``COMMANDS``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

from pipeline.config import ConfigError, describe, load_config, save_config
from pipeline.errors import PipelineError
from pipeline.logs import setup_logging
from schemas.errors import StoreFormatError

log = logging.getLogger("pipeline")


@dataclass(frozen=True)
class Job:
    config: str  # "module:Class"
    function: str  # "module:function", called with the loaded config
    summary: str


RUN_JOBS: dict[str, Job] = {
    "generate": Job(
        "pipeline.generation.config:GenerateConfig",
        "pipeline.generation.generate:run",
        "Stage 0: answer a LLaVA dataset's instructions with a VLM through vLLM (its venv); resumable",
    ),
    "teacher-dump": Job(
        "stage1_teacher.config:DumpConfig",
        "stage1_teacher.dump:run",
        "Stage 1: run the teacher once and write its signals to a versioned store (resumable)",
    ),
    "distill": Job(
        "stage2_student.config:DistillConfig",
        "stage2_student.distill:run",
        "Stage 2: train a student against a teacher store (SFT, KD, IVA, TPA); resumable",
    ),
    "data-check": Job(
        "pipeline.tools.data_check:DataCheckConfig",
        "pipeline.tools.data_check:run",
        "encode a dataset with a model's processor; report usable and skipped samples",
    ),
    "eval": Job(
        "stage2_student.evaluate:EvalConfig",
        "stage2_student.evaluate:run",
        "score a checkpoint's greedy answers on a question file, turn by turn; optionally its agreement with a teacher store",
    ),
}


def resolve(ref: str):
    module, _, name = ref.partition(":")
    return getattr(importlib.import_module(module), name)


def _run(args: argparse.Namespace) -> int:
    job = RUN_JOBS[args.job]
    cls = resolve(job.config)
    if args.help_config:
        print(f"pipeline run {args.job}: {job.summary}\n\nConfig keys (YAML file and/or key.sub=value overrides):\n")
        print(describe(cls))
        return 0
    cfg = load_config(cls, args.config, args.overrides)
    if args.save_config:
        save_config(cfg, args.save_config)
        log.info("resolved config written to %s", args.save_config)
    resolve(job.function)(cfg)
    return 0


def _tiny(args: argparse.Namespace) -> int:
    from pipeline.tools.tiny import save_tiny_vlm

    out = save_tiny_vlm(args.out, args.family, args.preset, args.seed)
    log.info("tiny %s %s written to %s", args.family, args.preset, out)
    return 0


def _export_vllm(args: argparse.Namespace) -> int:
    from pipeline.vllm_layout import export_for_vllm

    out = export_for_vllm(args.model, args.out)
    log.info("%s exported for vLLM to %s", args.model, out)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from pipeline.tools.inspect_store import main_verify

    return main_verify(str(args.store))


def _inspect(args: argparse.Namespace) -> int:
    from pipeline.tools.inspect_store import main_inspect

    return main_inspect(
        str(args.store), args.sample, args.json, None if args.out is None else str(args.out), args.n,
        args.image_root, args.data,
    )


def _demo(args: argparse.Namespace) -> int:
    from pipeline.tools.demo import run_demo

    run_demo(Path(args.out), quick=args.quick, seeds=args.seeds, profile=args.profile, jobs=args.jobs,
             store_profiles=None if args.store_profiles is None else tuple(args.store_profiles.split(",")))
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="pipeline", description="Offline Align-TI distillation for vision-language models.")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    run = sub.add_parser("run", help="run a configured job", description="Run a configured job.", add_help=False)
    run.add_argument("job", choices=sorted(RUN_JOBS), help="; ".join(f"{k}: {v.summary}" for k, v in RUN_JOBS.items()))
    run.add_argument("--config", type=Path, default=None, help="YAML config file")
    run.add_argument("--save-config", type=Path, default=None, help="also write the resolved config here")
    run.add_argument("-h", "--help", dest="help_config", action="store_true", help="list the job's config keys")
    # Overrides (key.sub=value) are the arguments argparse does not know; main() collects them.

    tiny = sub.add_parser("tiny", help="write a tiny VLM checkpoint built from a config (offline)")
    tiny.add_argument("--family", choices=["llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "internvl"], required=True)  # tiny.FAMILIES (a test checks)
    tiny.add_argument("--preset", default="teacher", help="teacher | student | student-pooled | vllm-teacher | vllm-student")
    tiny.add_argument("--seed", type=int, default=0)
    tiny.add_argument("--out", type=Path, required=True)

    export = sub.add_parser("export-vllm", help="copy an HF VLM checkpoint into the weight layout vLLM loads (transformers still loads it)")
    export.add_argument("--model", type=Path, required=True, help="the checkpoint directory")
    export.add_argument("--out", type=Path, required=True, help="a new directory for the copy")

    verify = sub.add_parser("verify", help="check a store: versions, checksums, index/array consistency, signal sanity")
    verify.add_argument("store", type=Path)

    inspect = sub.add_parser("inspect", help="print a store's statistics, one sample's signals, or write PNGs")
    inspect.add_argument("store", type=Path)
    inspect.add_argument("--sample", default=None, help="show this sample's stored signals")
    inspect.add_argument("--json", action="store_true", help="print JSON instead of a table")
    inspect.add_argument("--out", type=Path, default=None, help="write saliency overlays and the IRS curve here")
    inspect.add_argument("-n", type=int, default=4, help="samples to draw overlays for")
    inspect.add_argument("--image-root", default=None, help="override the image root recorded in the store")
    inspect.add_argument("--data", default=None, help="override the dataset path recorded in the store")

    demo = sub.add_parser("demo", help="run the end-to-end demo on the embedded default")
    demo.add_argument("--out", type=Path, default=Path("demo-out"))
    demo.add_argument("--profile", default="default", choices=("default", "full"),
                      help="default: SFT, KD and Align-TI, one seed (about 14 min); full: the Align-TI ablation "
                           "(6 recipes, 3 seeds, the compact store, a learning curve, saliency grounding)")
    demo.add_argument("--quick", action="store_true", help="a miniature of the profile (for tests)")
    demo.add_argument("--seeds", type=int, default=None, help="repeat each training run with this many seeds (default: the profile's)")
    demo.add_argument("--jobs", type=int, default=None,
                      help="student tasks side by side, each a one-thread process (default: the profile's)")
    demo.add_argument("--store-profiles", default=None,
                      help="exact,compact: also train the KD and Align-TI students from the train store recoded compact "
                           "(default: the profile's)")
    return p


COMMANDS: dict[str, Callable[[argparse.Namespace], int]] = {
    "run": _run,
    "tiny": _tiny,
    "export-vllm": _export_vllm,
    "verify": _verify,
    "inspect": _inspect,
    "demo": _demo,
}


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra and (args.command != "run" or any(a.startswith("-") or "=" not in a for a in extra)):
        parser.error(f"unrecognized arguments: {' '.join(extra)} (overrides look like key.sub=value, after `run JOB`)")
    args.overrides = extra
    setup_logging(args.verbose)
    try:
        return COMMANDS[args.command](args)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    except (PipelineError, StoreFormatError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
