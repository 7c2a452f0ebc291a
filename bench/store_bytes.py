"""Store size: bytes per response token by signal group, as written (compressed) and uncompressed.

Two real dumps (``stage1_teacher.dump.run``, workers=0) of the synthetic shapes set with a tiny
teacher at the default signal settings (top_k 64, transitions K=4 k'=16, visual_fraction 0.25),
one with the sampled target off and one with it on (draws 50). Per group:

* stored    on-disk bytes from the manifest's ``signal_bytes`` (Zarr chunks, zstd; Parquet index)
* raw       the same rows uncompressed: rows written (``shard.json``) x bytes per row (dtype x row shape)

A random-init teacher is near-uniform (p ~ 1/vocab), which is nothing like a trained one: no
candidate reaches p_min = 0.01, and 50 draws give ~48 unique ids. So the teacher's LM head is scaled
by ``--logit-scale`` (default 25: ~12 unique ids of 50 draws, what DESIGN.md 3.1 quotes for a real
teacher). Its gold token is still rarely its top choice, so nearly every response position carries
the 0.05 alternative mass and gets K transition rows: transitions are at their upper bound here.

Bytes per response token depend on the data's visual-to-response ratio (visual top-k and saliency
are per visual token, not per response token); the per-row table lets one rescale to other data.

    python bench/store_bytes.py [--quick] [--samples 400 --logit-scale 25]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from common import (
    Workdir,
    base_parser,
    build_shapes_data,
    check_device,
    dump_config,
    environment,
    spec_dict,
    table,
    write_results,
)

import torch  # noqa: E402

from pipeline.tools.tiny import TinySpec, build_tiny_vlm  # noqa: E402
from schemas.signals import SIGNAL_GROUPS as GROUPS  # noqa: E402
from schemas.signals import array_specs  # noqa: E402

# Small text model (bytes do not depend on its size), the benchmark's visual geometry: 64x64 image,
# patch 8 -> 64 visual tokens per image.
STORE_SPEC = TinySpec(image_size=64, patch=8)
# The array that has one row per "unit" of each group, to report bytes per unit.
UNIT_ROWS = {
    "response_topk": ("resp_pos", "response position"),
    "response_sampled": ("resp_sample_n", "response position"),
    "saliency": ("saliency", "(turn, visual token)"),
    "visual_topk": ("vis_pos", "stored visual position"),
    "transitions": ("tpa_pos", "branch row (t, c)"),
}


def parse_args():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--samples", type=int, default=400, help="synthetic records (multi-turn)")
    p.add_argument("--turns", type=int, default=3)
    p.add_argument("--logit-scale", type=float, default=25.0, help="LM-head scale of the random teacher (see docstring)")
    p.add_argument("--shard-size", type=int, default=256)
    args = p.parse_args()
    if args.quick:
        args.samples = min(args.samples, 32)
    return args


def save_teacher(out: Path, scale: float) -> Path:
    model, processor = build_tiny_vlm("llava", STORE_SPEC)
    with torch.no_grad():
        model.get_output_embeddings().weight.mul_(scale)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def raw_rows(store: Path) -> dict[str, int]:
    rows: dict[str, int] = {}
    for shard in sorted((store / "shards").glob("*/shard.json")):
        for name, n in json.loads(shard.read_text())["rows"].items():
            rows[name] = rows.get(name, 0) + n
    return rows


def dump(teacher: Path, data: Path, out: Path, args, sampled: bool) -> dict:
    cfg = dump_config(
        teacher,
        data,
        out,
        {
            "teacher.device": args.device,
            "teacher.dtype": args.dtype,
            "output.shard_size": args.shard_size,
            "signals.sampled.enabled": sampled,
            "signals.saliency_layers": [STORE_SPEC.layers - 1],
            "workers": 0,
        },
    )
    from stage1_teacher.dump import run

    t0 = time.perf_counter()
    manifest = run(cfg)
    wall = time.perf_counter() - t0
    s = cfg.signals
    specs = array_specs(s.top_k, s.transitions.top_k, sampled=sampled, transitions=s.transitions.enabled)
    rows = raw_rows(out)
    stored = manifest.signal_bytes
    n_resp = stored["response_tokens"]
    groups = {}
    for g, names in GROUPS.items():
        raw = sum(rows.get(n, 0) * specs[n].row_bytes for n in names if n in specs)
        if g not in stored and raw == 0:
            continue
        unit_array, unit = UNIT_ROWS[g]
        units = rows.get(unit_array, 0)
        b = stored.get(g, {}).get("bytes", 0)
        groups[g] = {
            "stored_bytes": b,
            "raw_bytes": raw,
            "stored_per_response_token": b / n_resp,
            "raw_per_response_token": raw / n_resp,
            "units": units,
            "unit": unit,
            "stored_per_unit": b / units if units else None,
            "raw_per_unit": raw / units if units else None,
        }
    groups["index"] = {
        "stored_bytes": stored["index"]["bytes"],
        "raw_bytes": None,
        "stored_per_response_token": stored["index"]["bytes_per_response_token"],
        "raw_per_response_token": None,
        "units": manifest.n_samples,
        "unit": "sample",
        "stored_per_unit": stored["index"]["bytes"] / manifest.n_samples,
        "raw_per_unit": None,
    }
    total_stored = sum(v["stored_bytes"] for v in groups.values())
    total_raw = sum(v["raw_bytes"] or 0 for v in groups.values())
    return {
        "wall_s": wall,
        "samples": manifest.n_samples,
        "response_tokens": n_resp,
        "rows": rows,
        "groups": groups,
        "total_stored_per_response_token": total_stored / n_resp,
        "total_raw_per_response_token_excl_index": total_raw / n_resp,
        "signals": manifest.signals,
    }


def design_formulas(top_k: int = 64, k2: int = 16, K: int = 4, unique: float = 12.0) -> dict:
    """Raw bytes per unit from the dtypes of schemas/signals.py, at the design defaults."""
    return {
        "response_topk per response position": 4 + top_k * (4 + 4),
        "response_sampled per response position (~12 unique ids)": 2 + unique * (4 + 2),
        "transitions per selected position (K rows)": K * (4 + 4 + 4 + k2 * (4 + 4)),
        "visual_topk per stored visual position": 4 + 4 + top_k * (4 + 4),
        "saliency per (turn, visual token)": 2,
    }


def main() -> None:
    args = parse_args()
    check_device(args.device)
    with Workdir(args.workdir, "store") as work:
        teacher = save_teacher(work / "teacher", args.logit_scale)
        data = build_shapes_data(work / "data", args.samples, args.turns)
        runs = {}
        for sampled in (False, True):
            name = "sampled_on" if sampled else "sampled_off"
            print(f"dump {name} ...", flush=True)
            runs[name] = dump(teacher, data, work / name, args, sampled)

    on = runs["sampled_on"]
    rows = on["rows"]
    n_resp, n_samples = on["response_tokens"], on["samples"]
    uniq = rows.get("resp_sample_ids", 0) / max(1, rows.get("resp_sample_n", 1))
    tpa_per_resp = rows.get("tpa_pos", 0) / n_resp
    print()
    print(
        f"{n_samples} samples, {n_resp} response tokens ({n_resp / n_samples:.1f}/sample), "
        f"{rows['saliency'] // max(1, n_samples)} saliency entries/sample, {rows['vis_pos'] / n_samples:.0f} stored "
        f"visual positions/sample; sampled: {uniq:.1f} unique ids/position; transitions: {tpa_per_resp:.2f} branch "
        f"rows/response token; logit scale {args.logit_scale}"
    )
    headers = ["group", "stored B/resp tok", "raw B/resp tok", "raw/stored", "stored B/unit", "raw B/unit", "unit"]
    for name, run in runs.items():
        body = []
        for g, v in run["groups"].items():
            raw, st = v["raw_per_response_token"], v["stored_per_response_token"]
            body.append([
                g,
                f"{st:.1f}",
                "-" if raw is None else f"{raw:.1f}",
                "-" if raw is None or not st else f"{raw / st:.2f}",
                "-" if v["stored_per_unit"] is None else f"{v['stored_per_unit']:.1f}",
                "-" if v["raw_per_unit"] is None else f"{v['raw_per_unit']:.1f}",
                v["unit"],
            ])
        body.append(["total", f"{run['total_stored_per_response_token']:.1f}",
                     f"{run['total_raw_per_response_token_excl_index']:.1f} (excl. index)", "", "", "", ""])
        print(f"\n{name} (dump wall {run['wall_s']:.1f} s)")
        print(table(headers, body))
    formulas = design_formulas()
    print("\nraw bytes per unit at the design defaults (dtypes of schemas/signals.py):")
    for k, v in formulas.items():
        print(f"  {k:<58} {v:g}")
    print(f"  (k=64 top-k per response token alone is {formulas['response_topk per response position']} B; "
          f"a 576-token LLaVA image at rho=0.25 stores 144 visual positions = "
          f"{144 * formulas['visual_topk per stored visual position'] / 1e3:.0f} kB raw per image)")

    path = write_results(
        "store_bytes",
        {
            "env": environment(args.device, args.dtype),
            "args": vars(args),
            "spec": spec_dict(STORE_SPEC),
            "runs": runs,
            "unique_sampled_ids_per_position": uniq,
            "branch_rows_per_response_token": tpa_per_resp,
            "design_raw_bytes_per_unit": formulas,
        },
        args.out,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
