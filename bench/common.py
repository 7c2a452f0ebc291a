"""Shared pieces of the benchmark scripts: the benchmark teacher, data, timing, memory, results.

Benchmarks are scripts, not tests. The machine they run on is shared and noisy, so every script
reports *ratios measured side by side in one run*: the modes being compared are timed in
interleaved repetitions (A B C, B C A, C A B, ...), and each report gives the median with the
min..max spread over repetitions. A ratio is computed per repetition (both sides from the same
round) and then summarised, so a slow moment hits both sides of one ratio instead of one mode.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import re
import statistics
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
ROOT = BENCH_DIR.parent
RESULTS_DIR = BENCH_DIR / "results"

# Run from anywhere (`python bench/x.py`): the project root must be importable, and nothing may
# reach for the hub (the models are built locally).
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))
for _var in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_PROGRESS_BARS"):
    os.environ.setdefault(_var, "1")  # inherited by subprocesses and Ray actors too

import torch  # noqa: E402

from pipeline.tools.tiny import TinySpec, build_tiny_vlm  # noqa: E402

# ----------------------------------------------------------------------------------------------
# the benchmark teacher and data

# Big enough that the decoder's matmuls dominate per-batch Python overhead on CPU (about 25M
# text parameters), small enough that a default run takes minutes on 2 cores. 64x64 image, patch 8:
# an 8x8 grid, 64 visual tokens per image.
BENCH_SPEC = TinySpec(
    hidden=512,
    layers=8,
    heads=8,
    kv_heads=4,
    intermediate=1376,
    vision_hidden=128,
    vision_layers=2,
    vision_heads=4,
    image_size=64,
    patch=8,
    max_positions=4096,
)


def spec_dict(spec: TinySpec) -> dict:
    return {k: getattr(spec, k) for k in spec.__dataclass_fields__}


def save_teacher_scaled(model, processor, out: Path, logit_scale: float) -> Path:
    """Save a teacher (model + processor) at ``out`` with its output head multiplied by
    ``logit_scale``, so a random-init model's distributions are as peaked as a trained teacher's
    (see store_bytes.py)."""
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(logit_scale)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def build_teacher(out: Path, spec: TinySpec = BENCH_SPEC, family: str = "llava", logit_scale: float = 1.0) -> Path:
    """A random-init tiny VLM checkpoint at ``out``, its head scaled by ``logit_scale``."""
    return save_teacher_scaled(*build_tiny_vlm(family, spec), out, logit_scale)


def build_shapes_data(out: Path, n: int, turns: int, seed: int = 0) -> Path:
    """The synthetic shapes VQA set (multi-turn): ``n`` training records; returns the JSON path."""
    from pipeline.tools.synthetic import generate

    return generate(out, seed=seed, n_train=n, n_val=0, n_test=0, turns=turns)["train"]


def encode_file(path: Path, processor, max_length: int) -> list:
    """Every usable record of ``path`` encoded (a benchmark wants no bad samples: it raises on one)."""
    from pipeline.data import BadRecord, encode, read_records

    out = []
    for rec in read_records(str(path)):
        if isinstance(rec, BadRecord):
            raise RuntimeError(f"benchmark data has a bad record: {rec.error}")
        out.append(encode(rec, processor, max_length))
    return out


def dump_config(teacher: Path, data: Path, out: Path, overrides: dict):
    """A DumpConfig with ``key=value`` overrides, loaded the way the CLI loads one."""
    from pipeline.config import load_config
    from stage1_teacher.config import DumpConfig

    items = {"teacher.path": str(teacher), "data.path": str(data), "output.dir": str(out), **overrides}
    return load_config(DumpConfig, None, [f"{k}={v if isinstance(v, str) else json.dumps(v)}" for k, v in items.items()])


def chunks(items: Sequence, size: int) -> list[list]:
    return [list(items[i : i + size]) for i in range(0, len(items), size)]


# ----------------------------------------------------------------------------------------------
# command line


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer samples and repetitions")
    p.add_argument("--device", default="cpu", choices=("cpu", "cuda"), help="where the teacher runs")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"), help="teacher dtype")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default: bench/results/<script>.json)")
    p.add_argument("--workdir", type=Path, default=None, help="keep models/data/stores here (default: a temp dir, removed)")
    return p


def check_device(device: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda, but torch sees no GPU")


# ----------------------------------------------------------------------------------------------
# timing


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def timed(fn: Callable[[], object], device: str) -> float:
    """Seconds of one call of ``fn``, the device synchronised on both sides."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def interleaved(
    modes: dict[str, Callable[[int], object]], reps: int, device: str, units: int = 1, warmup: int = 1
) -> dict[str, list[list[float]]]:
    """Seconds of every call: ``result[mode][round][unit]``, ``reps`` rounds over units 0..units-1.

    The modes alternate *unit by unit* (mode order rotating with the unit and the round), so a burst
    of load from another process lands on all modes alike instead of on one mode's whole pass.
    ``warmup`` untimed rounds first (allocator, oneDNN/cuBLAS plans, lazy inits).
    """
    names = list(modes)
    for _ in range(warmup):
        for u in range(units):
            for name in names:
                modes[name](u)
    sync(device)
    times: dict[str, list[list[float]]] = {n: [] for n in names}
    for r in range(reps):
        for name in names:
            times[name].append([0.0] * units)
        for u in range(units):
            k = (r + u) % len(names)
            for name in names[k:] + names[:k]:
                times[name][r][u] = timed(lambda: modes[name](u), device)
    return times


def round_sums(unit_times: list[list[float]]) -> list[float]:
    """Per round, the sum over units: the time of one whole pass."""
    return [sum(row) for row in unit_times]


def unit_ratio(num: list[list[float]], den: list[list[float]]) -> dict:
    """Median and quartiles of num/den over every (round, unit) pair: each pair ran back to back, so
    a load burst that hits one call of one mode is an outlier here instead of inflating a whole pass."""
    xs = sorted(a / b for rn, rd in zip(num, den) for a, b in zip(rn, rd))
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "n": len(xs)}


def fmt_quartiles(s: dict, digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['p25']:.{digits}f}..{s['p75']:.{digits}f}]"


@contextmanager
def clocked(owner: object, attr: str, calls: list[float], device: str = "cpu") -> Iterator[None]:
    """Time every call of ``owner.attr`` (a module function or a class's method) into ``calls``.

    For breaking a run down by phase without touching the code under test: the attribute is
    replaced by a timing wrapper in this process only, and restored on exit.
    """
    original = getattr(owner, attr)

    @functools.wraps(original)
    def wrapper(*args, **kwargs):
        sync(device)
        t0 = time.perf_counter()
        try:
            return original(*args, **kwargs)
        finally:
            sync(device)
            calls.append(time.perf_counter() - t0)

    setattr(owner, attr, wrapper)
    try:
        yield
    finally:
        setattr(owner, attr, original)


def load_average() -> tuple[float, float, float]:
    """1/5/15-minute load averages: recorded with results, since other work on the machine skews them."""
    return os.getloadavg()


def stats(xs: Sequence[float]) -> dict:
    """Median and spread of repeated measurements."""
    xs = list(xs)
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs), "values": xs}


def per_rep_ratio(num: Sequence[float], den: Sequence[float]) -> dict:
    """stats of num[i] / den[i]: each ratio from one round, so both sides saw the same machine state."""
    return stats([a / b for a, b in zip(num, den)])


def fmt_spread(s: dict, digits: int = 3) -> str:
    return f"{s['median']:.{digits}f} [{s['min']:.{digits}f}..{s['max']:.{digits}f}]"


# ----------------------------------------------------------------------------------------------
# memory (CPU: the peak RSS of this process; reset with /proc/self/clear_refs so earlier peaks,
# e.g. loading the model, do not count; torch's allocations are invisible to tracemalloc)


def rss_kb() -> int:
    return _status_kb("VmRSS")


def reset_peak_rss() -> bool:
    """Reset this process's peak RSS (Linux >= 4.0); False when the kernel refuses."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_rss_kb() -> int:
    """Peak RSS since start or the last reset (VmHWM; what getrusage's ru_maxrss reports on Linux)."""
    return _status_kb("VmHWM")


def _status_kb(field: str) -> int:
    text = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", text, re.M).group(1))


# ----------------------------------------------------------------------------------------------
# output


def environment(device: str, dtype: str) -> dict:
    env = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": device,
        "dtype": dtype,
        "time_unix": int(time.time()),
        "load_average": load_average(),
    }
    import transformers

    env["transformers"] = transformers.__version__
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name(0)
    return env


def write_results(script: str, payload: dict, out: Path | None = None) -> Path:
    """``bench/results/<script>.json`` (or ``out``), JSON with sorted keys."""
    path = out or RESULTS_DIR / f"{script}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=2, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)
    return path


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A plain left-aligned text table."""
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    line = lambda r: "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip()  # noqa: E731
    return "\n".join([line(cells[0]), line(["-" * w for w in widths])] + [line(r) for r in cells[1:]])


class Workdir:
    """``--workdir`` if given (kept), else a temporary directory removed on exit."""

    def __init__(self, path: Path | None, prefix: str):
        import tempfile

        self._tmp = None if path else tempfile.TemporaryDirectory(prefix=f"bench-{prefix}-")
        self.path = Path(path) if path else Path(self._tmp.name)
        self.path.mkdir(parents=True, exist_ok=True)

    def __enter__(self) -> Path:
        return self.path

    def __exit__(self, *exc) -> None:
        if self._tmp is not None:
            self._tmp.cleanup()
