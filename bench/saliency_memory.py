"""Saliency at long context: the fused probe on SDPA against eager ``output_attentions=True``.

One sample of about ``--length`` tokens (default 2048): an image (64 visual tokens) and a human turn
padded out with instruction text, so almost every position is an instruction row. Three modes, the
last two computing the same per-turn saliency map on the same layer L*:

* plain   an SDPA forward without any saliency: the floor, so ``fused - plain`` is the probe's own cost.
* fused   ``pipeline.modeling.probe.capture`` around that SDPA forward: only layer L*'s instruction rows
          are scored (float32, softmax over all keys), nothing else is materialised.
* eager   the model loaded with ``attn_implementation="eager"``, ``output_attentions=True``: every
          layer's full ``[B, H, T, T]`` attention is kept and returned; the map is read from L*.

All run with ``logits_to_keep=1`` so the LM head is not part of the comparison.

Memory: each mode's first forward in its own fresh subprocess (``--rounds`` per mode, the order
rotating), so modes never share a peak. CPU: the process's peak RSS during that forward (reset just
before it through ``/proc/self/clear_refs``) minus its RSS before it. CUDA:
``torch.cuda.max_memory_allocated`` minus the allocation before it.
Time: all three modes in one process, ``--reps`` interleaved rounds of warm forwards; ratios per round.
The fused and eager maps are compared (max abs difference) to check they measure the same thing.

    python bench/saliency_memory.py [--quick] [--device cuda --dtype bfloat16 --length 4096]
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from common import (
    BENCH_SPEC,
    Workdir,
    base_parser,
    build_shapes_data,
    build_teacher,
    check_device,
    environment,
    fmt_spread,
    interleaved,
    peak_rss_kb,
    per_rep_ratio,
    reset_peak_rss,
    round_sums,
    rss_kb,
    spec_dict,
    stats,
    sync,
    table,
    timed,
    write_results,
)

import torch  # noqa: E402

MODES = ("plain", "fused", "eager")
SENTENCE = "Describe the shape at the top left of the image and tell me its colour. "


def parse_args():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--length", type=int, default=2048, help="target sequence length T")
    p.add_argument("--layer", type=int, default=None, help="saliency layer L* (default: the middle layer)")
    p.add_argument("--rounds", type=int, default=2, help="memory: fresh subprocesses per mode (interleaved)")
    p.add_argument("--reps", type=int, default=5, help="time: interleaved rounds of warm forwards in one process")
    p.add_argument("--threads", type=int, default=None,
                   help="torch CPU threads (default: torch's, all cores); 1 is steadier when other work shares the CPU")
    # internal: one measurement in a fresh process
    p.add_argument("--child", choices=MODES, help=argparse_suppress())
    p.add_argument("--model", type=Path, help=argparse_suppress())
    p.add_argument("--data", type=Path, help=argparse_suppress())
    p.add_argument("--result", type=Path, help=argparse_suppress())
    args = p.parse_args()
    if args.quick:
        args.rounds, args.reps = 1, 2
    return args


def argparse_suppress():
    import argparse

    return argparse.SUPPRESS


# ----------------------------------------------------------------------------------------------
# the sample


def long_record(data_json: Path, processor, target: int) -> tuple[Path, int]:
    """Rewrite the one record of ``data_json`` into a single turn of about ``target`` tokens."""
    from pipeline.data import encode, read_records

    rec = json.loads(data_json.read_text())[0]

    def length(text: str) -> int:
        rec["conversations"] = [
            {"from": "human", "value": "<image>\n" + text},
            {"from": "gpt", "value": "red"},
        ]
        rec.pop("question_types", None), rec.pop("answers", None)
        data_json.write_text(json.dumps([rec]))
        return next(encode(r, processor, 1 << 20) for r in read_records(str(data_json))).length

    base, one = length(""), length(SENTENCE)
    text = SENTENCE * max(0, (target - base) // max(1, one - base))
    n = length(text)
    while n < target:  # top up a word at a time (about 1.5 tokens each)
        text += "red "
        n = length(text)
    return data_json, n


# ----------------------------------------------------------------------------------------------
# the measured call, and the memory child (one mode, one fresh process)


def load(model_dir: Path, data: Path, mode: str, device: str, dtype: str):
    """(encoded sample, saliency) for ``mode``: ``saliency(layer)`` runs one forward and returns the
    turn maps [n_turns, |V|] of ``layer`` (an empty tensor for ``plain``)."""
    from transformers import AutoModelForImageTextToText

    from pipeline.data import encode, read_records
    from pipeline.processors import load_processor
    from pipeline.modeling.probe import capture, sample_indices, turn_saliency

    kernel = "eager" if mode == "eager" else "sdpa"
    model = AutoModelForImageTextToText.from_pretrained(model_dir, dtype=getattr(torch, dtype), attn_implementation=kernel)
    model = model.to(device).eval()
    processor = load_processor(model_dir)
    enc = encode(next(iter(read_records(str(data)))), processor, 1 << 20)
    inputs = {k: v.to(device) for k, v in enc.model_inputs.items()}
    rows, cols, turn_rows = sample_indices(enc)

    @torch.inference_mode()
    def saliency(layer: int) -> torch.Tensor:
        if mode == "plain":
            model(**inputs, use_cache=False, logits_to_keep=1)
            return torch.zeros(0)
        if mode == "fused":
            with capture(model, [layer], [rows], [cols]) as probe:
                model(**inputs, use_cache=False, logits_to_keep=1)
                block = probe.block(0)
        else:
            out = model(**inputs, use_cache=False, logits_to_keep=1, output_attentions=True)
            att = out.attentions[layer][0].float().mean(0)  # [T, T], head mean
            block = att[rows.to(att.device)][:, cols.to(att.device)]
        return turn_saliency(block, turn_rows)

    return enc, saliency


def child(args) -> None:
    """Peak memory of the first forward of ``args.child`` in this fresh process."""
    enc, saliency = load(args.model, args.data, args.child, args.device, args.dtype)
    cuda = args.device == "cuda"
    sync(args.device)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        if not reset_peak_rss():
            raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs not writable)")
        before = rss_kb() * 1024
    seconds = timed(lambda: saliency(args.layer), args.device)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_kb() * 1024
    args.result.write_text(
        json.dumps(
            {
                "mode": args.child,
                "before_bytes": before,
                "peak_bytes": peak,
                "peak_delta_bytes": peak - before,
                "first_s": seconds,
            }
        )
    )


# ----------------------------------------------------------------------------------------------
# parent


def main() -> None:
    args = parse_args()
    check_device(args.device)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.child:
        return child(args)
    spec = BENCH_SPEC
    if args.length > spec.max_positions:
        raise SystemExit(f"--length {args.length} > the benchmark teacher's max_positions {spec.max_positions}")
    layer = spec.layers // 2 if args.layer is None else args.layer
    from pipeline.processors import load_processor

    with Workdir(args.workdir, "saliency") as work:
        teacher_dir = build_teacher(work / "teacher", spec)
        data, length = long_record(build_shapes_data(work / "data", 1, turns=1), load_processor(teacher_dir), args.length)
        print(f"one sample of T = {length} tokens; layer {layer}; memory: {args.rounds} subprocess(es) per mode", flush=True)
        results: dict[str, list[dict]] = {m: [] for m in MODES}
        for r in range(args.rounds):
            for mode in MODES[r % len(MODES) :] + MODES[: r % len(MODES)]:
                out = work / f"{mode}-{r}.json"
                cmd = [
                    sys.executable, __file__, "--child", mode, "--model", str(teacher_dir), "--data", str(data),
                    "--result", str(out), "--layer", str(layer),
                    "--device", args.device, "--dtype", args.dtype,
                ] + (["--threads", str(args.threads)] if args.threads else [])
                subprocess.run(cmd, check=True)
                results[mode].append(json.loads(out.read_text()))

        # Time: all modes in this process, interleaved rounds (both models hold the same weights).
        print(f"time: {args.reps} interleaved rounds in one process", flush=True)
        loaded = {m: load(teacher_dir, data, m, args.device, args.dtype) for m in MODES}
        enc = loaded["fused"][0]
        maps = {m: loaded[m][1](layer) for m in ("fused", "eager")}
        unit_times = interleaved({m: (lambda u, f=loaded[m][1]: f(layer)) for m in MODES}, args.reps, args.device)
        times = {m: round_sums(t) for m, t in unit_times.items()}
        del loaded

    map_diff = float((maps["fused"] - maps["eager"]).abs().max())
    summary = {}
    for m in MODES:
        summary[m] = {
            "seconds": stats(times[m]),
            "first_s": stats([res["first_s"] for res in results[m]]),
            "peak_delta_mib": stats([res["peak_delta_bytes"] / 2**20 for res in results[m]]),
            "peak_mib": stats([res["peak_bytes"] / 2**20 for res in results[m]]),
            "before_mib": stats([res["before_bytes"] / 2**20 for res in results[m]]),
        }
    n_i, n_v, t = len(enc.instruction_positions), len(enc.visual_positions), enc.length
    elem = torch.finfo(getattr(torch, args.dtype)).bits // 8
    # Analytic sizes of what each mode must hold (see the module docstring): eager keeps every
    # layer's attention; the probe holds float32 scores of the instruction rows over all T keys on
    # one layer (the softmax needs whole rows), a few such buffers at once.
    analytic = {
        "eager_attentions_mib": spec.layers * spec.heads * t * t * elem / 2**20,
        "probe_scores_one_buffer_mib": spec.heads * n_i * t * 4 / 2**20,
        "design_example_eager_gib": 28 * 28 * 2048 * 2048 * 4 / 2**30,
    }
    med = {m: {k: summary[m][k]["median"] for k in ("peak_delta_mib", "seconds")} for m in MODES}
    mem_ratio = med["eager"]["peak_delta_mib"] / med["fused"]["peak_delta_mib"]
    time_ratio = per_rep_ratio(times["eager"], times["fused"])
    fused_over_plain = per_rep_ratio(times["fused"], times["plain"])
    probe_cost = {k: med["fused"][k] - med["plain"][k] for k in ("peak_delta_mib", "seconds")}
    eager_cost = {k: med["eager"][k] - med["plain"][k] for k in ("peak_delta_mib", "seconds")}

    unit = "GPU allocated" if args.device == "cuda" else "RSS"
    print()
    print(
        f"T = {t} ({n_i} instruction, {n_v} visual tokens), layer {layer}, {spec.layers} layers x {spec.heads} heads, "
        f"{args.device} {args.dtype}, torch threads {torch.get_num_threads()}; median [min..max]"
    )
    print(
        table(
            ["mode", "s/forward (warm, interleaved)", "s (first, own process)", f"peak {unit} over baseline, MiB", f"baseline {unit}, MiB"],
            [
                [m, fmt_spread(summary[m]["seconds"]), fmt_spread(summary[m]["first_s"]),
                 fmt_spread(summary[m]["peak_delta_mib"], 0), fmt_spread(summary[m]["before_mib"], 0)]
                for m in MODES
            ],
        )
    )
    print(
        f"eager / fused: peak memory x{mem_ratio:.2f}, time x{fmt_spread(time_ratio, 2)}; "
        f"fused / plain time x{fmt_spread(fused_over_plain, 2)}; max |map difference| {map_diff:.2e}"
    )
    print(
        f"over the plain SDPA forward: fused +{probe_cost['peak_delta_mib']:.0f} MiB, +{probe_cost['seconds']:.3f} s; "
        f"eager +{eager_cost['peak_delta_mib']:.0f} MiB, +{eager_cost['seconds']:.3f} s "
        f"(saliency's own memory: eager / fused x{eager_cost['peak_delta_mib'] / max(probe_cost['peak_delta_mib'], 1e-9):.1f})"
    )
    print(
        f"analytic: eager keeps {analytic['eager_attentions_mib']:.0f} MiB of attentions ({spec.layers} layers); "
        f"one probe score buffer (H x |I| x T float32) is {analytic['probe_scores_one_buffer_mib']:.0f} MiB"
    )

    path = write_results(
        "saliency_memory",
        {
            "env": environment(args.device, args.dtype),
            "args": {k: v for k, v in vars(args).items() if k not in ("child", "model", "data", "result")},
            "spec": spec_dict(spec),
            "layer": layer,
            "length": t,
            "n_instruction": n_i,
            "n_visual": n_v,
            "summary": summary,
            "eager_over_fused_peak_memory": mem_ratio,
            "eager_over_fused_time": time_ratio,
            "fused_over_plain_time": fused_over_plain,
            "fused_minus_plain": probe_cost,
            "eager_minus_plain": eager_cost,
            "max_abs_map_difference": map_diff,
            "analytic": analytic,
            "memory_runs": results,
        },
        args.out,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
