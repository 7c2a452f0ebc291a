"""Stage 2 training step time: offline Align-TI against SFT-only and against online KD.

One training step = forward + backward + gradient clipping + AdamW step, on the same student
(same initial weights; one copy and one optimiser per mode) and the same pre-built batches:

* (a) Align-TI   ``stage2_student.distill.compute_losses`` with sft = kd = iva = tpa = 1: one student
                 forward over the sequence and its TPA branch rows (``forward_with_branches``), then the
                 sparse KD / IVA / TPA losses against the store. No teacher in memory.
* (b) SFT        ``compute_losses`` with kd = iva = tpa = 0: one forward whose head runs only at the
                 labelled positions, under the causal mask alone (``stage2_student.forward``).
* (p) plain SFT  the same loss from the forward a trainer would write: full ``[B, T, V]`` logits under
                 the padding mask, cross-entropy over the labelled positions. (b)/(p) is what
                 ``stage2_student.forward`` saves.
* (g) grouped    (b) on the same samples batched with ``data.length_group`` = all batches of the pass:
                 each batch holds samples of similar length and pads less. Batches differ from
                 (b)'s, so only the per-pass ratio (g)/(b) is meaningful.
* (c) online KD  the teacher in memory: a teacher forward under ``no_grad`` on the same batch producing
                 full logits, the student forward, then SFT + a dense forward KL(p_T || p_S) over the
                 full vocabulary at the response positions (what the store replaces).

Targets: (a)/(b) <= 1.25; (a)/(c) well below 1 when the teacher is much larger than the student.
The teacher is ``common.BENCH_SPEC`` (hidden 512, 8 layers, ~25M text parameters); the student is
the same llava family at hidden 256, 4 layers (~8x fewer text parameters), same image geometry, so
one batch feeds both. The store is dumped by that teacher over the synthetic shapes set with the
default signals except transitions p_min = 0: the teacher is random-init and near-uniform, so no
candidate would reach the default 0.01 (1/vocab ~ 0.002) and there would be no branch rows. With
the default epsilon = 0.05 every response position qualifies, so the branch rows are the most the
defaults allow (K = 4 per position, up to M = 64 positions); a trained teacher selects fewer.

The batches come from ``StoreDataset`` once and are reused; the modes alternate step by step
(``common.interleaved``). Step times are reported as median [p25..p75] over all (round, batch)
steps; ratios are taken per (round, batch), both sides from the same batch back to back. Each
step's process CPU time is recorded too.

CPU runs use one torch thread by default (``--threads``): on the shared 2-core machine, with
another job on one core, two OpenMP threads stall on each other at every op and step times swing
5x (one run: (b) 987..3355 ms p25..p75, (a)/(b) 0.96..1.13 between runs); at one thread the IQR
is a few percent and the CPU time matches the wall time. The ratios compare work, which the
thread count hardly changes.

    python bench/distill_step.py [--quick] [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import copy
import statistics
import time
from dataclasses import replace

from common import (
    BENCH_SPEC,
    Workdir,
    base_parser,
    build_shapes_data,
    build_teacher,
    check_device,
    dump_config,
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

import torch  # noqa: E402  (after common: it sets up sys.path and offline mode)
import torch.nn.functional as F  # noqa: E402
from torch.utils.data import DataLoader  # noqa: E402
from transformers import AutoModelForImageTextToText  # noqa: E402

from pipeline.tools.tiny import build_tiny_vlm  # noqa: E402
from schemas.manifest import read_manifest  # noqa: E402
from stage1_teacher.dump import run as dump  # noqa: E402
from stage2_student import losses as L  # noqa: E402
from stage2_student.config import LossConfig  # noqa: E402
from stage2_student.data import StoreDataset  # noqa: E402
from stage2_student.distill import compute_losses  # noqa: E402

TARGET_A_OVER_B = 1.25

# The student: the teacher's family, tokenizer and image geometry (64x64, patch 8: 64 visual tokens),
# half the width and half the depth.
STUDENT_SPEC = replace(BENCH_SPEC, hidden=256, layers=4, heads=4, kv_heads=2, intermediate=688)


class _Cfg:
    """What ``compute_losses`` reads of a DistillConfig: the loss section."""

    def __init__(self, loss: LossConfig):
        self.loss = loss


def parse_args():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=32, help="synthetic records (multi-turn)")
    p.add_argument("--turns", type=int, default=3, help="question/answer turns per record")
    p.add_argument("--batch-size", type=int, default=8, help="samples per training step (the distill default)")
    p.add_argument("--reps", type=int, default=5, help="timed rounds over all batches per mode (interleaved)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads on CPU, 0 for torch's default; "
                   "see the module docstring for why 1")
    args = p.parse_args()
    if args.quick:
        args.samples, args.reps = min(args.samples, 16), min(args.reps, 2)
    return args


def dense_forward_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(p_T || p_S) over the full vocabulary. Shapes: [N, V] x2 -> scalar."""
    t_logp = F.log_softmax(teacher_logits.float(), dim=-1)
    s_logp = F.log_softmax(student_logits.float(), dim=-1)
    return F.kl_div(s_logp, t_logp, log_target=True, reduction="sum") / max(1, teacher_logits.shape[0])


def quartiles(xs: list[float]) -> dict:
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4, method="inclusive") if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "p25": q[0], "p75": q[2], "n": len(xs)}


def main() -> None:
    args = parse_args()
    check_device(args.device)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    amp_dtype = getattr(torch, args.dtype)

    with Workdir(args.workdir, "distill") as work:
        print(f"building teacher {BENCH_SPEC}, {args.samples} synthetic records and the store in {work}", flush=True)
        teacher_dir = build_teacher(work / "teacher", BENCH_SPEC)
        data = build_shapes_data(work / "data", args.samples, args.turns)
        store = work / "store"
        t0 = time.perf_counter()
        dump(
            dump_config(
                teacher_dir,
                data,
                store,
                {
                    "teacher.device": args.device,
                    "teacher.dtype": args.dtype,
                    "signals.saliency_layers": [BENCH_SPEC.layers // 2],  # skip the IRS calibration
                    "signals.transitions.min_prob": 0.0,
                    "batch_size": 4,
                    "workers": 0,
                },
            )
        )
        dump_s = time.perf_counter() - t0
        manifest = read_manifest(store)

        student, processor = build_tiny_vlm("llava", STUDENT_SPEC, seed=1)
        dataset = StoreDataset(store, processor, batch_size=args.batch_size, seed=0, with_saliency=False)
        batches = [b.to(device) for b in DataLoader(dataset, batch_size=None, num_workers=0)]
        grouped = StoreDataset(store, processor, batch_size=args.batch_size, seed=0, with_saliency=False,
                               length_group=len(batches))
        grouped_batches = [b.to(device) for b in DataLoader(grouped, batch_size=None, num_workers=0)]
        teacher = AutoModelForImageTextToText.from_pretrained(teacher_dir, dtype=amp_dtype).to(device).eval()
        n_params = lambda m: sum(p.numel() for p in m.model.language_model.parameters())  # noqa: E731
        t_params, s_params = n_params(teacher), n_params(student)

        # Shapes of what each step computes.
        n_samples = sum(len(b.sample_ids) for b in batches)
        seq_tokens = sum(int(b.model_inputs["attention_mask"].sum()) for b in batches)
        padded_tokens = sum(int(b.model_inputs["input_ids"].numel()) for b in batches)
        resp_rows = sum(int(b.kd.pos.numel()) for b in batches)
        vis_rows = sum(int(b.iva.pos.numel()) for b in batches)
        branch_rows = sum(int(b.tpa.batch.numel()) for b in batches)
        branch_padded = sum(int(b.tpa.branch_pos.numel()) for b in batches)
        # forward_with_branches puts each sample's branch rows right after its own tokens ([in-row note]).
        in_row_tokens = sum(
            len(b.sample_ids) * int((b.model_inputs["attention_mask"].sum(1) + (b.tpa.branch_pos >= 0).sum(1)).max())
            for b in batches
        )

        # One student copy and one optimiser per mode, the same initial weights.
        students = {m: copy.deepcopy(student).to(device).train() for m in ("a", "b", "p", "g", "c")}
        optims = {m: torch.optim.AdamW(s.parameters(), lr=args.lr) for m, s in students.items()}
        cfg_a = _Cfg(LossConfig(sft=1.0, kd=1.0, iva=1.0, tpa=1.0))
        cfg_b = _Cfg(LossConfig(sft=1.0))
        autocast = lambda: torch.autocast(device.type, dtype=amp_dtype, enabled=args.dtype != "float32")  # noqa: E731
        last_terms: dict[str, dict] = {}

        def finish(mode: str, loss: torch.Tensor) -> None:
            loss.backward()
            torch.nn.utils.clip_grad_norm_(students[mode].parameters(), 1.0)  # distill's default max_grad_norm
            optims[mode].step()
            optims[mode].zero_grad()

        def offline(mode: str, cfg, source=batches):
            def step(i: int) -> None:
                with autocast():
                    loss, terms = compute_losses(students[mode], source[i], cfg, None)
                finish(mode, loss)
                last_terms[mode] = terms

            return step

        def plain(i: int) -> None:
            batch = batches[i]
            with autocast():
                logits = students["p"](**batch.model_inputs).logits
                loss = L.sft_loss(logits[:, :-1], batch.labels[:, 1:])
            finish("p", loss)
            last_terms["p"] = {"sft": float(loss.detach()), "total": float(loss.detach())}

        def online(i: int) -> None:
            batch = batches[i]
            with torch.no_grad():
                t_logits = teacher(**batch.model_inputs).logits  # full [B, T, V], as an online trainer has
            with autocast():
                s_logits = students["c"](**batch.model_inputs).logits
                kd = batch.kd
                sft = L.sft_loss(s_logits[:, :-1], batch.labels[:, 1:])
                kl = dense_forward_kl(t_logits[kd.batch, kd.pos], s_logits[kd.batch, kd.pos])
                loss = sft + kl
            finish("c", loss)
            last_terms["c"] = {"sft": float(sft.detach()), "kd_dense": float(kl.detach()), "total": float(loss.detach())}

        # Process CPU time of every call as well: unlike wall time it barely moves when other work
        # takes the cores (at 1 thread; with more, idle OpenMP threads spin and count too).
        cpu_calls: dict[str, list[float]] = {"a": [], "b": [], "p": [], "g": [], "c": []}

        def cpu_timed(mode: str, fn):
            def run(i: int) -> None:
                t0 = time.process_time()
                fn(i)
                cpu_calls[mode].append(time.process_time() - t0)

            return run

        modes = {m: cpu_timed(m, fn) for m, fn in (("a", offline("a", cfg_a)), ("b", offline("b", cfg_b)), ("p", plain),
                                                    ("g", offline("g", cfg_b, grouped_batches)), ("c", online))}
        print(f"timing {args.reps} rounds of {list(modes)}, alternating step by step over {len(batches)} batches", flush=True)
        load_before = load_average()
        unit_times = interleaved(modes, args.reps, args.device, units=len(batches))
        load_after = load_average()
        n_units = len(batches)  # calls per mode: one warm-up round, then the timed rounds, unit by unit
        unit_cpu = {m: [c[n_units * (r + 1) : n_units * (r + 2)] for r in range(args.reps)] for m, c in cpu_calls.items()}

    times = {m: round_sums(t) for m, t in unit_times.items()}
    step_ms = {m: quartiles([1000 * x for row in t for x in row]) for m, t in unit_times.items()}
    ratio_ab, ratio_ac = unit_ratio(unit_times["a"], unit_times["b"]), unit_ratio(unit_times["a"], unit_times["c"])
    ratio_cb, ratio_pb = unit_ratio(unit_times["c"], unit_times["b"]), unit_ratio(unit_times["p"], unit_times["b"])
    pass_ab, pass_ac = per_rep_ratio(times["a"], times["b"]), per_rep_ratio(times["a"], times["c"])
    pass_cb, pass_pb = per_rep_ratio(times["c"], times["b"]), per_rep_ratio(times["p"], times["b"])
    ratio_bp, ratio_ap = unit_ratio(unit_times["b"], unit_times["p"]), unit_ratio(unit_times["a"], unit_times["p"])
    pass_gb = per_rep_ratio(times["g"], times["b"])
    grouped_tokens = sum(int(b.model_inputs["input_ids"].numel()) for b in grouped_batches)
    cpu_ms = {m: quartiles([1000 * x for row in t for x in row]) for m, t in unit_cpu.items()}
    cpu_ab, cpu_ac = unit_ratio(unit_cpu["a"], unit_cpu["b"]), unit_ratio(unit_cpu["a"], unit_cpu["c"])

    labels = {
        "a": "(a) offline Align-TI (kd=iva=tpa=1)",
        "b": "(b) SFT only",
        "p": "(p) SFT, plain forward (full logits, padding mask)",
        "g": "(g) SFT, length-grouped batches",
        "c": "(c) online KD (teacher fwd + dense KL)",
    }
    over_b = {"a": fmt_quartiles(ratio_ab), "b": "1", "p": fmt_quartiles(ratio_pb), "g": "(other batches)",
              "c": fmt_quartiles(ratio_cb)}
    over_b_pass = {"a": fmt_spread(pass_ab), "b": "1", "p": fmt_spread(pass_pb), "g": fmt_spread(pass_gb), "c": fmt_spread(pass_cb)}
    print()
    print(
        f"student {s_params / 1e6:.1f}M text params, teacher {t_params / 1e6:.1f}M ({t_params / s_params:.1f}x); "
        f"{n_samples} samples in {len(batches)} batches of {args.batch_size}; {args.device} {args.dtype}, "
        f"torch threads {torch.get_num_threads()}; {args.reps} rounds; load average {load_before[0]:.2f} -> {load_after[0]:.2f}"
    )
    print(
        f"per sample: {seq_tokens / n_samples:.1f} sequence tokens ({padded_tokens / n_samples:.1f} padded), "
        f"{resp_rows / n_samples:.1f} response rows, {vis_rows / n_samples:.1f} IVA rows, "
        f"{branch_rows / n_samples:.1f} TPA branch rows ({branch_padded / n_samples:.1f} padded) = "
        f"{branch_rows / seq_tokens:.0%} extra tokens on the sequence; the (a) forward is {in_row_tokens / n_samples:.1f} "
        f"tokens wide, {in_row_tokens / padded_tokens - 1:.1%} over the padded sequence (branches in-row; "
        f"{branch_padded / padded_tokens:.1%} as R columns after T)"
    )
    print(
        table(
            ["mode", "step ms median [p25..p75]", "pass s median [min..max]", "/ (b) per step [p25..p75]",
             "/ (b) per pass [min..max]"],
            [[labels[m], fmt_quartiles(step_ms[m], 0), fmt_spread(stats(times[m]), 2), over_b[m], over_b_pass[m]]
             for m in modes],
        )
    )
    verdict = "meets" if ratio_ab["median"] <= TARGET_A_OVER_B else "MISSES"
    print(f"(a)/(b): {fmt_quartiles(ratio_ab)} per step, {fmt_spread(pass_ab)} per pass: {verdict} the <= {TARGET_A_OVER_B} target")
    print(f"(a)/(c): {fmt_quartiles(ratio_ac)} per step, {fmt_spread(pass_ac)} per pass")
    print(f"(b)/(p): {fmt_quartiles(ratio_bp)} per step: the SFT step with logits at the read rows and no padding "
          "mask, against the plain forward")
    print(f"(a)/(p): {fmt_quartiles(ratio_ap)} per step: Align-TI against the plain SFT forward")
    print(f"(g)/(b): {fmt_spread(pass_gb)} per pass, for {grouped_tokens / padded_tokens:.1%} of (b)'s padded tokens")
    print(
        f"process CPU time per step, ms: (a) {fmt_quartiles(cpu_ms['a'], 0)}, (b) {fmt_quartiles(cpu_ms['b'], 0)}, "
        f"(c) {fmt_quartiles(cpu_ms['c'], 0)}; CPU-time ratios per step (a)/(b) {fmt_quartiles(cpu_ab)}, "
        f"(a)/(c) {fmt_quartiles(cpu_ac)}"
    )
    print("last step's loss terms: " + "; ".join(
        f"{m} " + " ".join(f"{k}={v:.3f}" for k, v in last_terms[m].items()) for m in modes
    ))

    path = write_results(
        "distill_step",
        {
            "env": environment(args.device, args.dtype),
            "args": vars(args),
            "teacher_spec": spec_dict(BENCH_SPEC),
            "student_spec": spec_dict(STUDENT_SPEC),
            "teacher_text_params": t_params,
            "student_text_params": s_params,
            "store_dump_s": dump_s,
            "store_signals": manifest.signals,
            "samples": n_samples,
            "batches": len(batches),
            "sequence_tokens": seq_tokens,
            "padded_tokens": padded_tokens,
            "response_rows": resp_rows,
            "iva_rows": vis_rows,
            "branch_rows": branch_rows,
            "branch_rows_padded": branch_padded,
            "forward_tokens_with_branches_in_row": in_row_tokens,
            "mean_sequence_length": seq_tokens / n_samples,
            "mean_branch_rows_per_sample": branch_rows / n_samples,
            "step_ms": step_ms,
            "seconds_per_pass": {m: stats(t) for m, t in times.items()},
            "unit_seconds": unit_times,
            "unit_cpu_seconds": unit_cpu,
            "cpu_step_ms": cpu_ms,
            "cpu_step_ratio_a_over_b": cpu_ab,
            "cpu_step_ratio_a_over_c": cpu_ac,
            "step_ratio_a_over_b": ratio_ab,
            "step_ratio_a_over_c": ratio_ac,
            "step_ratio_c_over_b": ratio_cb,
            "step_ratio_b_over_plain": ratio_bp,
            "step_ratio_a_over_plain": ratio_ap,
            "pass_ratio_grouped_over_b": pass_gb,
            "grouped_padded_tokens": grouped_tokens,
            "pass_ratio_a_over_b": pass_ab,
            "pass_ratio_a_over_c": pass_ac,
            "pass_ratio_c_over_b": pass_cb,
            "target_a_over_b": TARGET_A_OVER_B,
            "last_loss_terms": last_terms,
            "load_average_before_after_timing": [load_before, load_after],
        },
        args.out,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
