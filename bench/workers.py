"""Ray scaling: ``stage1_teacher.dump.run`` with 1 worker against 2 workers (CPU actors).

The same teacher, dataset and shard layout (``--samples`` records in shards of ``--shard-size``,
default 4 shards so 2 workers get 2 each). Every dump runs in a fresh subprocess with
``OMP_NUM_THREADS=1`` (inherited by Ray's actors), so each actor computes on one thread and the
comparison is 1 core against 2. Configurations alternate (1, 2, 2, 1, ...) over ``--rounds``.

Reported per dump:

* shards   seconds inside ``executor.run_shards`` after every actor is up and has loaded the teacher
           (the bench wraps that method in its own subprocess): the steady-state throughput
* total    the whole ``dump.run`` wall time, including ``ray.init``, actor start and teacher load

Speed-up = shards time with 1 worker / with 2 workers, per round. Two workers need both cores, so
the shard phase's CPU is accounted: "worker cores" = the workers' CPU seconds / wall seconds (2.0 is
two fully busy actors), "other cores" = what the rest of the machine used meanwhile (this dump's
driver and Ray daemons, and any other process). A speed-up short of 2 with "other cores" near 1 means
the machine was not free, not that the dump does not scale. ``--with-inprocess`` adds
workers=0 (no Ray) with 1 thread and with all threads, as a reference for what Ray costs and for
one process using both cores itself.

    python bench/workers.py [--quick] [--device cuda --dtype bfloat16]   (GPU: one actor per GPU)
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from common import (
    BENCH_SPEC,
    Workdir,
    base_parser,
    build_shapes_data,
    build_teacher,
    check_device,
    dump_config,
    environment,
    fmt_spread,
    per_rep_ratio,
    spec_dict,
    stats,
    table,
    write_results,
)


def parse_args():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--shard-size", type=int, default=12)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3, help="dumps per configuration (alternating)")
    p.add_argument("--min-prob", type=float, default=0.0, help="transitions p_min (random teacher: see dump_throughput.py)")
    p.add_argument("--min-alt-mass", type=float, default=0.0, help="transitions epsilon")
    p.add_argument("--with-inprocess", action="store_true", help="also workers=0 with 1 thread and with all threads")
    # internal: one dump in a fresh process
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--workers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--teacher", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--data", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.samples, args.shard_size, args.rounds = min(args.samples, 16), min(args.shard_size, 4), 1
    return args


# ----------------------------------------------------------------------------------------------
# child


def _torch_threads(_actor=None) -> int:
    """torch's intra-op threads where this runs (in an actor: through ``__ray_call__``)."""
    import torch

    return torch.get_num_threads()


def _cpu_seconds(_actor=None) -> float:
    """CPU seconds this process has used, all threads (in an actor: through ``__ray_call__``)."""
    return time.process_time()


def _machine_busy_seconds() -> float:
    """CPU seconds all processes on the machine have used since boot (/proc/stat, all cores)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / os.sysconf("SC_CLK_TCK")


def child(args) -> None:
    import torch

    from stage1_teacher import executors
    from stage1_teacher.dump import run

    phases: dict = {}

    def timed_ray(orig):
        def run_shards(self, todo, specs, layers, n_samples):
            import ray

            t0 = time.perf_counter()
            ray.get([a.__ray_ready__.remote() for a in self.actors])  # every actor has built its Teacher
            phases["wait_actors_s"] = time.perf_counter() - t0
            phases["actor_threads"] = ray.get([a.__ray_call__.remote(_torch_threads) for a in self.actors])
            # Who got the CPU during the shard phase: each actor's own CPU seconds, and the machine's
            # (everything: this dump's driver and Ray daemons, and anyone else's work).
            cpu0 = ray.get([a.__ray_call__.remote(_cpu_seconds) for a in self.actors])
            busy0 = _machine_busy_seconds()
            t0 = time.perf_counter()
            orig(self, todo, specs, layers, n_samples)
            phases["shards_s"] = time.perf_counter() - t0
            busy1 = _machine_busy_seconds()
            cpu1 = ray.get([a.__ray_call__.remote(_cpu_seconds) for a in self.actors])
            phases["worker_cpu_s"] = [b - a for a, b in zip(cpu0, cpu1)]
            phases["machine_busy_s"] = busy1 - busy0

        return run_shards

    def timed_inprocess(orig):
        def run_shards(self, todo, specs, layers, n_samples):
            phases["actor_threads"] = [torch.get_num_threads()]
            cpu0, busy0 = time.process_time(), _machine_busy_seconds()
            t0 = time.perf_counter()
            orig(self, todo, specs, layers, n_samples)
            phases["shards_s"] = time.perf_counter() - t0
            phases["worker_cpu_s"] = [time.process_time() - cpu0]
            phases["machine_busy_s"] = _machine_busy_seconds() - busy0

        return run_shards

    executors.RayExecutor.run_shards = timed_ray(executors.RayExecutor.run_shards)
    executors.InProcessExecutor.run_shards = timed_inprocess(executors.InProcessExecutor.run_shards)
    cfg = dump_config(
        args.teacher,
        args.data,
        args.store,
        {
            "teacher.device": args.device,
            "teacher.dtype": args.dtype,
            "output.shard_size": args.shard_size,
            "signals.saliency_layers": [BENCH_SPEC.layers // 2],
            "signals.transitions.min_prob": args.min_prob,
            "signals.transitions.min_alt_mass": args.min_alt_mass,
            "batch_size": args.batch_size,
            "workers": args.workers,
        },
    )
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    manifest = run(cfg)
    total = time.perf_counter() - t0
    args.result.write_text(
        json.dumps(
            {
                **phases,
                "total_s": total,
                "samples": manifest.n_samples,
                "shards": len(manifest.shards),
                # 1-minute load average (all processes on the machine, Ray's own included) around the run
                "load_average_1min": [load_before, os.getloadavg()[0]],
            }
        )
    )


# ----------------------------------------------------------------------------------------------
# parent


def main() -> None:
    args = parse_args()
    check_device(args.device)
    if args.child:
        return child(args)
    # name -> (workers, environment overrides)
    one_thread = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    configs = {"ray 1 worker": (1, one_thread), "ray 2 workers": (2, one_thread)}
    if args.with_inprocess:
        configs |= {"in-process, 1 thread": (0, one_thread), f"in-process, {os.cpu_count()} threads": (0, {})}
    names = list(configs)

    with Workdir(args.workdir, "workers") as work:
        teacher = build_teacher(work / "teacher", BENCH_SPEC)
        data = build_shapes_data(work / "data", args.samples, args.turns)
        results: dict[str, list[dict]] = {n: [] for n in names}
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                workers, env_over = configs[name]
                tag = f"{r}-{name.replace(' ', '_').replace(',', '')}"
                out = work / f"{tag}.json"
                env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "MKL_NUM_THREADS")} | env_over
                cmd = [
                    sys.executable, __file__, "--child", "--workers", str(workers), "--teacher", str(teacher),
                    "--data", str(data), "--store", str(work / f"store-{tag}"), "--result", str(out),
                    "--shard-size", str(args.shard_size), "--batch-size", str(args.batch_size),
                    "--min-prob", str(args.min_prob), "--min-alt-mass", str(args.min_alt_mass),
                    "--device", args.device, "--dtype", args.dtype,
                ]
                print(f"round {r}: {name} ...", flush=True)
                proc = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                if proc.returncode:
                    raise SystemExit(f"{name} failed:\n{proc.stderr[-4000:]}")
                results[name].append(json.loads(out.read_text()))

    n = results[names[0]][0]["samples"]
    shards = results[names[0]][0]["shards"]
    summary = {}
    for name in names:
        rs = results[name]
        summary[name] = {
            "shards_s": stats([x["shards_s"] for x in rs]),
            "samples_per_s": stats([x["samples"] / x["shards_s"] for x in rs]),
            "total_s": stats([x["total_s"] for x in rs]),
            "samples_per_s_end_to_end": stats([x["samples"] / x["total_s"] for x in rs]),
            "threads_per_worker": rs[0]["actor_threads"],
            "load_average_1min_after": [x["load_average_1min"][1] for x in rs],
            # cores' worth of CPU the workers got, and that everything else on the machine took
            "worker_cores": stats([sum(x["worker_cpu_s"]) / x["shards_s"] for x in rs]),
            "other_cores": stats([(x["machine_busy_s"] - sum(x["worker_cpu_s"])) / x["shards_s"] for x in rs]),
        }
    speedup = per_rep_ratio([x["shards_s"] for x in results["ray 1 worker"]], [x["shards_s"] for x in results["ray 2 workers"]])
    speedup_total = per_rep_ratio([x["total_s"] for x in results["ray 1 worker"]], [x["total_s"] for x in results["ray 2 workers"]])

    print()
    print(f"{n} samples in {shards} shards of {args.shard_size}, batch {args.batch_size}, {args.device} {args.dtype}; "
          f"median [min..max] of {args.rounds} dump(s) per configuration")
    print(
        table(
            ["configuration", "threads/worker", "shards s", "samples/s (shards)", "total s", "samples/s (total)",
             "worker cores", "other cores"],
            [
                [name, ",".join(map(str, summary[name]["threads_per_worker"])), fmt_spread(summary[name]["shards_s"], 2),
                 fmt_spread(summary[name]["samples_per_s"], 2), fmt_spread(summary[name]["total_s"], 1),
                 fmt_spread(summary[name]["samples_per_s_end_to_end"], 2),
                 fmt_spread(summary[name]["worker_cores"], 2), fmt_spread(summary[name]["other_cores"], 2)]
                for name in names
            ],
        )
    )
    print(f"speed-up 2 workers / 1 worker: shards {fmt_spread(speedup, 2)}, end to end {fmt_spread(speedup_total, 2)} "
          f"(ideal 2.00 on {os.cpu_count()} cores)")

    path = write_results(
        "workers",
        {
            "env": environment(args.device, args.dtype),
            "args": {k: v for k, v in vars(args).items() if k not in ("child", "workers", "teacher", "data", "store", "result")},
            "spec": spec_dict(BENCH_SPEC),
            "samples": n,
            "shards": shards,
            "summary": summary,
            "speedup_shards": speedup,
            "speedup_end_to_end": speedup_total,
            "runs": results,
        },
        args.out,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
