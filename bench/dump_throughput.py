"""Teacher-dump throughput against a bare forward of the same model on the same batches.

Modes, timed in interleaved repetitions over the same pre-encoded batches:

* bare    ``model(**collated_inputs, use_cache=False)``: SDPA, full logits, no cache, nothing else.
          The floor: what any teacher pass costs.
* (a)     ``Teacher.signals`` with transitions off: probe on L*, logits kept at response + visual
          positions only, top-k, saliency maps, visual top-k. Target: >= 0.85 of bare throughput.
* (b)     ``Teacher.signals`` with transitions on: (a) plus the KV cache and the branch rows as a
          cache continuation. Its extra cost should track the extra (branch) tokens it computes.

Encoding (tokenizer + image processor) is outside (a) and (b): the batches are encoded once. Then one
end-to-end ``stage1_teacher.dump.run`` (workers=0, settings of (b)) on the same data gives samples/s
including model load, encoding, writing shards and the manifest.

The teacher is random-init, so its distributions are near-uniform and no candidate would pass the
default p_min = 0.01 (1/vocab ~ 0.002): transitions here use p_min = 0 and epsilon = 0, i.e. every
response position is selected with K candidates (up to M per sample), the most branch rows the
defaults allow. A trained teacher selects fewer.

    python bench/dump_throughput.py [--quick] [--device cuda --dtype bfloat16 --samples 512 --batch-size 16]
"""

from __future__ import annotations

import time
from contextlib import ExitStack

from common import (
    BENCH_SPEC,
    Workdir,
    base_parser,
    build_shapes_data,
    build_teacher,
    check_device,
    chunks,
    clocked,
    dump_config,
    encode_file,
    environment,
    fmt_quartiles,
    fmt_spread,
    interleaved,
    load_average,
    per_rep_ratio,
    round_sums,
    spec_dict,
    stats,
    table,
    unit_ratio,
    write_results,
)

# After common: it puts the project root on sys.path and sets offline mode.
import torch  # noqa: E402

import stage1_teacher.shards as shards_module  # noqa: E402
import stage1_teacher.teacher as teacher_module  # noqa: E402
from schemas.writer import ShardWriter  # noqa: E402
from stage1_teacher import executors  # noqa: E402
from pipeline.modeling.batching import collate_model_inputs  # noqa: E402
from stage1_teacher.config import SignalsConfig, TeacherConfig, TransitionsConfig  # noqa: E402
from stage1_teacher.dump import run as dump_run  # noqa: E402
from stage1_teacher.teacher import Teacher  # noqa: E402

TARGET_A = 0.85


def parse_args():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=64, help="synthetic records (multi-turn)")
    p.add_argument("--turns", type=int, default=3, help="question/answer turns per record")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--reps", type=int, default=5, help="timed rounds per mode (interleaved)")
    p.add_argument("--layer", type=int, default=None, help="saliency layer L* (default: the middle layer)")
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--min-prob", type=float, default=0.0, help="transitions p_min (see module docstring)")
    p.add_argument("--min-alt-mass", type=float, default=0.0, help="transitions epsilon")
    p.add_argument("--max-length", type=int, default=2048)
    p.add_argument("--skip-end-to-end", action="store_true", help="do not run dump.run")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, all cores); 1 is steadier when other work shares the CPU")
    args = p.parse_args()
    if args.quick:
        args.samples, args.reps = min(args.samples, 8), min(args.reps, 2)
    return args


def main() -> None:
    args = parse_args()
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    spec = BENCH_SPEC
    layer = spec.layers // 2 if args.layer is None else args.layer
    transitions = TransitionsConfig(min_prob=args.min_prob, min_alt_mass=args.min_alt_mass)
    signals_off = SignalsConfig(
        top_k=args.top_k, saliency_layers=[layer], transitions=TransitionsConfig(enabled=False)
    )
    signals_on = SignalsConfig(top_k=args.top_k, saliency_layers=[layer], transitions=transitions)

    with Workdir(args.workdir, "dump") as work:
        print(f"building teacher {spec} and {args.samples} synthetic records in {work}", flush=True)
        teacher_dir = build_teacher(work / "teacher", spec)
        data = build_shapes_data(work / "data", args.samples, args.turns)

        t0 = time.perf_counter()
        teacher = Teacher(TeacherConfig(str(teacher_dir), dtype=args.dtype, device=args.device), signals_on, seed=0)
        load_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        encoded = encode_file(data, teacher.processor, args.max_length)
        encode_s = time.perf_counter() - t0
        batches = chunks(encoded, args.batch_size)
        device = teacher.device
        collated = [
            {k: v.to(device) for k, v in collate_model_inputs([e.model_inputs for e in b], teacher.pad_id).items()}
            for b in batches
        ]
        n_samples = len(encoded)
        seq_tokens = sum(e.length for e in encoded)
        padded_tokens = sum(int(c["input_ids"].numel()) for c in collated)

        @torch.inference_mode()
        def bare(i: int) -> None:
            teacher.model(**collated[i], use_cache=False)

        # Where (b)'s extra time goes: the branch continuation is timed inside (b) by wrapping the
        # function the teacher calls (in this process only; the wrapper adds two device syncs).
        branch_calls: list[float] = []
        stack = ExitStack()
        stack.enter_context(clocked(teacher_module, "branch_hidden_from_cache", branch_calls, args.device))

        def signals_with(cfg: SignalsConfig):
            def run(i: int) -> list:
                teacher.signals_cfg = cfg
                return teacher.signals(batches[i], [layer])

            return run

        modes = {"bare": bare, "a": signals_with(signals_off), "b": signals_with(signals_on)}

        # Branch rows that (b) computes: real ones, and as run (each batch padded to its widest sample).
        branch_rows = branch_padded = 0
        for i in range(len(batches)):
            counts = [len(s.tpa_pos) for s in signals_with(signals_on)(i)]
            branch_rows += sum(counts)
            branch_padded += max(counts) * len(counts)
        resp_tokens = sum(len(e.response_positions) for e in encoded)
        vis_tokens = sum(len(e.visual_positions) for e in encoded)

        print(f"timing {args.reps} rounds of {list(modes)}, alternating batch by batch over {len(batches)} batches", flush=True)
        load_before = load_average()
        unit_times = interleaved(modes, args.reps, args.device, units=len(batches))
        times = {m: round_sums(t) for m, t in unit_times.items()}
        load_after = load_average()
        # The continuation's calls of the timed rounds (the last ones), summed per round.
        per_round = len(branch_calls) // (args.reps + 1 + 1)  # counting pass + warmup + reps rounds
        timed_calls = branch_calls[len(branch_calls) - per_round * args.reps :]
        branch_s = [sum(timed_calls[r * per_round : (r + 1) * per_round]) for r in range(args.reps)]
        stack.close()

        e2e = None
        if not args.skip_end_to_end:
            cfg = dump_config(
                teacher_dir,
                data,
                work / "store",
                {
                    "teacher.device": args.device,
                    "teacher.dtype": args.dtype,
                    "data.max_length": args.max_length,
                    "signals.top_k": args.top_k,
                    "signals.saliency_layers": [layer],
                    "signals.transitions.min_prob": args.min_prob,
                    "signals.transitions.min_alt_mass": args.min_alt_mass,
                    "batch_size": args.batch_size,
                    "workers": 0,
                },
            )
            del teacher  # one teacher in memory at a time
            # Phases of the real run, clocked from outside (see common.clocked).
            phase = {"shards": [], "encode": [], "signals": [], "pack_write": []}
            with ExitStack() as clocks:
                clocks.enter_context(clocked(executors.InProcessExecutor, "run_shards", phase["shards"], args.device))
                clocks.enter_context(clocked(shards_module, "encode", phase["encode"]))
                clocks.enter_context(clocked(Teacher, "signals", phase["signals"], args.device))
                clocks.enter_context(clocked(shards_module, "pack", phase["pack_write"]))
                clocks.enter_context(clocked(ShardWriter, "add", phase["pack_write"]))
                t0 = time.perf_counter()
                manifest = dump_run(cfg)
                wall = time.perf_counter() - t0
            took = {k: sum(v) for k, v in phase.items()}
            e2e = {
                "wall_s": wall,
                "samples": manifest.n_samples,
                "samples_per_s": manifest.n_samples / wall,
                "shards_phase_s": took["shards"],
                "samples_per_s_shards_phase": manifest.n_samples / took["shards"],
                "encode_s": took["encode"],
                "signals_s": took["signals"],
                "pack_and_add_s": took["pack_write"],
                # shard finalisation (Parquet index, checksums, fsync, rename) and the progress bar
                "shard_other_s": took["shards"] - took["encode"] - took["signals"] - took["pack_write"],
                # processor load, settings + fingerprints, Teacher load, manifest
                "outside_shards_s": wall - took["shards"],
            }

    per_sample = {name: stats([n_samples / t for t in ts]) for name, ts in times.items()}
    per_token = {name: stats([seq_tokens / t for t in ts]) for name, ts in times.items()}
    ratio_a = per_rep_ratio(times["bare"], times["a"])  # throughput ratio = time ratio inverted
    ratio_b = per_rep_ratio(times["bare"], times["b"])
    batch_ratio_a = unit_ratio(unit_times["bare"], unit_times["a"])
    batch_ratio_b = unit_ratio(unit_times["bare"], unit_times["b"])
    cost_b_over_a = per_rep_ratio(times["b"], times["a"])
    batch_cost_b_over_a = unit_ratio(unit_times["b"], unit_times["a"])
    branch_frac = branch_rows / seq_tokens
    branch_frac_padded = branch_padded / padded_tokens
    # (b) - (a) split: the continuation itself, and the rest (KV cache kept, candidate selection, top-k').
    cont = stats(branch_s)
    extra = stats([b - a for a, b in zip(times["a"], times["b"])])

    labels = {
        "bare": "bare forward (full logits)",
        "a": "(a) signals, transitions off",
        "b": "(b) signals, transitions on",
    }
    ratios = {"bare": "1", "a": fmt_spread(ratio_a), "b": fmt_spread(ratio_b)}
    batch_ratios = {"bare": "1", "a": fmt_quartiles(batch_ratio_a), "b": fmt_quartiles(batch_ratio_b)}
    print()
    print(
        f"{n_samples} samples, {seq_tokens} sequence tokens ({seq_tokens / n_samples:.0f}/sample: "
        f"{vis_tokens / n_samples:.0f} visual, {resp_tokens / n_samples:.1f} response), batch {args.batch_size}, "
        f"{args.device} {args.dtype}, torch threads {torch.get_num_threads()}; median [min..max] of {args.reps} rounds; "
        f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}"
    )
    print(
        table(
            ["mode", "s/pass", "samples/s", "seq tokens/s", "throughput / bare", "per batch [p25..p75]"],
            [
                [labels[m], fmt_spread(stats(times[m])), fmt_spread(per_sample[m], 2), fmt_spread(per_token[m], 0),
                 ratios[m], batch_ratios[m]]
                for m in modes
            ],
        )
    )
    verdict = "meets" if batch_ratio_a["median"] >= TARGET_A else "MISSES"
    print(
        f"(a)/bare: {batch_ratio_a['median']:.3f} per batch, {ratio_a['median']:.3f} per round (medians): "
        f"{verdict} the {TARGET_A} target"
    )
    print(
        f"(b) branch rows: {branch_rows} ({branch_rows / n_samples:.1f}/sample) = {branch_frac:.1%} of sequence tokens "
        f"({branch_frac_padded:.1%} as padded in batches); (b)/(a) time per batch {fmt_quartiles(batch_cost_b_over_a)}, "
        f"per round {fmt_spread(cost_b_over_a)} -> cost growth {batch_cost_b_over_a['median'] - 1:+.1%} vs token growth "
        f"{branch_frac:+.1%}"
    )
    print(
        f"(b)-(a) per pass {fmt_spread(extra)} s, of which the branch continuation {fmt_spread(cont)} s "
        f"(bare forward on all sequence tokens: {stats(times['bare'])['median']:.3f} s)"
    )
    if e2e:
        print(
            f"end-to-end dump.run (workers=0, settings of (b)), one run: {e2e['samples']} samples in {e2e['wall_s']:.2f} s "
            f"= {e2e['samples_per_s']:.2f} samples/s ({e2e['samples_per_s_shards_phase']:.2f} samples/s in the shard phase)"
        )
        print(
            f"  shard phase {e2e['shards_phase_s']:.2f} s = encode {e2e['encode_s']:.2f} + signals {e2e['signals_s']:.2f} "
            f"+ pack/add {e2e['pack_and_add_s']:.2f} + finalise {e2e['shard_other_s']:.2f}; outside it "
            f"(processor, fingerprints, teacher load, manifest) {e2e['outside_shards_s']:.2f} s"
        )

    path = write_results(
        "dump_throughput",
        {
            "env": environment(args.device, args.dtype),
            "args": vars(args),
            "spec": spec_dict(spec),
            "saliency_layer": layer,
            "samples": n_samples,
            "batches": len(batches),
            "sequence_tokens": seq_tokens,
            "padded_tokens": padded_tokens,
            "visual_tokens": vis_tokens,
            "response_tokens": resp_tokens,
            "seconds_per_pass": {m: stats(t) for m, t in times.items()},
            "samples_per_s": per_sample,
            "sequence_tokens_per_s": per_token,
            "throughput_ratio_a_over_bare": ratio_a,
            "throughput_ratio_b_over_bare": ratio_b,
            "per_batch_throughput_ratio_a_over_bare": batch_ratio_a,
            "per_batch_throughput_ratio_b_over_bare": batch_ratio_b,
            "unit_seconds": unit_times,
            "time_ratio_b_over_a": cost_b_over_a,
            "per_batch_time_ratio_b_over_a": batch_cost_b_over_a,
            "extra_s_b_minus_a": extra,
            "branch_continuation_s": cont,
            "branch_rows": branch_rows,
            "branch_rows_padded": branch_padded,
            "branch_fraction_of_sequence_tokens": branch_frac,
            "branch_fraction_padded": branch_frac_padded,
            "target_a_over_bare": TARGET_A,
            "end_to_end": e2e,
            "encode_s": encode_s,
            "teacher_load_s": load_s,
            "load_average_before_after_timing": [load_before, load_after],
        },
        args.out,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
