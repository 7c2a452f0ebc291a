"""Should vLLM score the response top-k? vLLM's prompt log-probs against the HF path, same model.

DESIGN.md §6: vLLM may produce the response log-probs only where a benchmark shows it faster than
the HF path. Both sides score the same records with the same tiny Qwen2-VL (the ``vllm-teacher``
preset: head_dim 32, as vLLM's CPU attention needs) in float32:

* hf-topk    what vLLM would replace: one teacher-forced forward per batch, the output head on the
             response rows only, top-k from one float32 log-softmax (``Teacher.signals`` with
             transitions off still computes saliency and visual rows; this mode is the response
             top-k alone: ``hidden_at`` + ``topk.row_statistics``).
* hf-dump    ``Teacher.signals`` with transitions off: what a dump computes per batch anyway,
             saliency included (vLLM has no attention output, so this forward runs regardless).
* vllm       ``LLM.generate(prompts, SamplingParams(max_tokens=1, prompt_logprobs=k))`` on the same
             conversations (its own processor call), the engine started and warmed up beforehand.

Each mode scores every record once per round; rounds alternate the modes. Engine start-up is
reported apart. Run in the vLLM venv (``make vllm-setup``):

    .venv-vllm/bin/python bench/vllm_scoring.py [--quick] [--samples 64 --top-k 64]
"""

from __future__ import annotations

import json
import os
import time

from common import Workdir, base_parser, build_shapes_data, environment, stats, table, write_results

import numpy as np  # noqa: E402
import torch  # noqa: E402

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "2")


def main() -> None:
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=48)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--batch-size", type=int, default=8, help="HF batch size (vLLM schedules its own)")
    args = p.parse_args()
    if args.quick:
        args.samples, args.reps = 8, 1
    torch.set_num_threads(max(1, os.cpu_count() or 1))

    from vllm import LLM, SamplingParams

    from pipeline.config import load_config
    from pipeline.data import DataConfig, iter_records
    from pipeline.data.encode import to_messages
    from pipeline.modeling.logits import hidden_at
    from pipeline.tools.tiny import save_tiny_vlm
    from stage1_teacher.config import DumpConfig
    from stage1_teacher.teacher import Teacher
    from stage1_teacher.topk import row_statistics
    from pipeline.data import encode

    with Workdir(args.workdir, "vllm-scoring") as work:
        teacher_dir = save_tiny_vlm(work / "teacher", "qwen2_vl", "vllm-teacher")
        data = build_shapes_data(work / "data", args.samples, turns=2)
        cfg = load_config(DumpConfig, None, [
            f"teacher.path={teacher_dir}", "teacher.dtype=float32", "teacher.device=cpu", f"data.path={data}",
            f"output.dir={work / 'store'}", f"signals.top_k={args.top_k}", "signals.transitions.enabled=false",
            "signals.saliency_layers=[0]",
        ])
        teacher = Teacher(cfg.teacher, cfg.signals)
        records = list(iter_records(DataConfig(path=str(data))))
        encoded = [encode(r, teacher.processor, 1024) for r in records]
        batches = [encoded[i : i + args.batch_size] for i in range(0, len(encoded), args.batch_size)]
        prompts = []
        for r in records:
            images = r.load_images()
            text = teacher.processor.apply_chat_template(to_messages(r), tokenize=False)
            prompts.append({"prompt": text, **({"multi_modal_data": {"image": images}} if images else {})})
        n_resp = sum(len(e.response_positions) for e in encoded)
        n_tokens = sum(e.length for e in encoded)

        t0 = time.perf_counter()
        engine = LLM(model=str(teacher_dir), dtype="float32", max_model_len=1024, max_logprobs=args.top_k,
                     enforce_eager=True, limit_mm_per_prompt={"image": 4}, seed=0)
        start_s = time.perf_counter() - t0
        params = SamplingParams(max_tokens=1, prompt_logprobs=args.top_k)
        engine.generate(prompts[:2], params, use_tqdm=False)  # warm-up

        @torch.inference_mode()
        def hf_topk() -> None:
            for batch in batches:
                inputs = teacher._inputs(batch)
                owner = np.concatenate([np.full(len(e.response_positions), b) for b, e in enumerate(batch)])
                where = np.concatenate([e.response_positions for e in batch])
                with hidden_at(teacher.model, torch.as_tensor(owner), torch.as_tensor(where)) as hidden:
                    teacher.model(**inputs, use_cache=False)
                row_statistics(teacher.head_rows(hidden.rows), args.top_k).top_ids.numpy()

        def hf_dump() -> None:
            for batch in batches:
                teacher.signals(batch, [0])

        def vllm() -> None:
            outs = engine.generate(prompts, params, use_tqdm=False)
            assert len(outs) == len(prompts)

        modes = {"hf-topk": hf_topk, "hf-dump": hf_dump, "vllm": vllm}
        times: dict[str, list[float]] = {m: [] for m in modes}
        hf_topk(), hf_dump()  # warm-up
        for rep in range(args.reps):
            order = list(modes)[rep % 3:] + list(modes)[: rep % 3]
            for m in order:
                t = time.perf_counter()
                modes[m]()
                times[m].append(time.perf_counter() - t)

    med = {m: stats(v)["median"] for m, v in times.items()}
    rows = [[m, f"{med[m]:.2f}", f"{args.samples / med[m]:.1f}", f"{n_tokens / med[m]:.0f}", f"{med['hf-topk'] / med[m]:.2f}"]
            for m in modes]
    print(f"{args.samples} records, {n_tokens} prompt tokens, {n_resp} response rows, top-{args.top_k}; "
          f"vLLM engine start {start_s:.1f} s (not in the table)")
    print(table(["mode", "s per pass (median)", "records/s", "tokens/s", "speed vs hf-topk"], rows))
    path = write_results("vllm_scoring", {
        "args": vars(args), "environment": environment("cpu", "float32"), "records": args.samples,
        "prompt_tokens": n_tokens, "response_rows": n_resp, "engine_start_s": start_s,
        "seconds": {m: stats(v) for m, v in times.items()},
    }, args.out)
    print(f"results: {path}")
    print(json.dumps({m: round(v, 3) for m, v in med.items()}))


if __name__ == "__main__":
    main()
