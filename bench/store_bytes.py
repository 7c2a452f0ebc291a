"""Store size and fidelity: bytes per response token by signal group for each store profile (exact,
compact), and how far the compact store's decoded targets are from the exact ones.

One real dump (``stage1_teacher.dump.run``, workers=0, profile exact) of a random-init teacher, then
that store recoded (``stage1_teacher.recode``, no teacher; it writes what a compact dump writes) at
the compact profile's defaults and at a grid of compact settings, for the curve of bytes against
fidelity. Per group:

* stored    on-disk bytes from the manifest's ``signal_bytes`` (Zarr chunks, zstd; Parquet index)
* raw       the decoded rows uncompressed: rows (``shard.json``) x bytes per row (dtype x row shape)

Fidelity, per row of each sparse distribution (response, visual, transition), against the exact store:

* kl        KL(exact k+1 buckets || decoded), the decoded row completed over the vocabulary
            (``schemas.codecs.completion_kl``): what truncation and quantisation lose together
* kl_q      KL on the decoded row's own buckets (the exact row coarsened to them): quantisation only,
            what the losses see
* tail_err  |tail derived from the decoded log-probs (as Stage 2 does) - exact mass outside the kept ids|

Shapes. ``demo``: the synthetic shapes set, 64 visual tokens, vocab 512. ``real``: LLaVA-style, one
576-token image (24 x 24) per sample, a single turn whose answer has ~``--response-tokens`` tokens,
and a 151,936-token vocabulary (the tiny BPE tokenizer plus added tokens, built in memory; the
head is random, so ids spread over the whole vocabulary and bit-packing gets no help from frequent
ids, which a real teacher would give).

A random-init teacher is near-uniform (p ~ 1/vocab), which is nothing like a trained one: no
candidate reaches p_min = 0.01, and 50 draws give ~48 unique ids. So the teacher's LM head is scaled
by ``--logit-scale`` (default 25 at vocab 512: ~12 unique ids of 50 draws, what DESIGN.md 3.1 quotes
for a real teacher; 50 at the real vocabulary: response rows then have a mean entropy of ~1.5 nats,
top-1 probability ~0.6 and top-64 mass ~0.993, the range of a trained LLM on ordinary text; 100
gives 0.5 nats and top-1 0.8, a teacher on data it fits well). Its gold token is still rarely its top choice, so nearly every response position
carries the 0.05 alternative mass and gets K transition rows: transitions are at their upper bound.
How many ids a compact row keeps depends on how peaked the teacher is, so the compact bytes here
are for this teacher's peakedness; the per-unit columns and ``kept ids`` let one rescale.

A random-init teacher, even scaled, is not a trained one: ``--store DIR`` measures an existing exact
store instead (the demo's ``stores/train``, a trained teacher's), recodes it at the compact
defaults and the curve, and projects the compact bytes to ids of ``--project-vocab`` tokens (the
ids a row keeps, at ⌈log₂ V⌉ bits each; everything else as measured).

    python bench/store_bytes.py [--quick] [--shape demo|real] [--samples N --logit-scale S] [--sampled]
    python bench/store_bytes.py --store DEMO_OUT/stores/train [--project-vocab 151936]
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
from common import (
    Workdir,
    base_parser,
    build_shapes_data,
    check_device,
    dump_config,
    environment,
    save_teacher_scaled,
    spec_dict,
    table,
    write_results,
)


from pipeline.tools.tiny import LLAVA_IMAGE, TinySpec, build_llava, build_tiny_vlm, build_tokenizer  # noqa: E402
from schemas.codecs import DECODED_TAIL_FLOOR, completion_kl, id_bits  # noqa: E402
from schemas.reader import StoreReader  # noqa: E402
from schemas.signals import SIGNAL_GROUPS as GROUPS  # noqa: E402
from schemas.signals import TOPK_SIGNALS  # noqa: E402
from stage1_teacher.config import CodecConfig  # noqa: E402
from stage1_teacher.recode import recode  # noqa: E402

# Small text model (bytes do not depend on its size). demo: the benchmark's visual geometry, 64x64
# image, patch 8 -> 64 visual tokens; real: 96x96, patch 4 -> 576 visual tokens (LLaVA-1.5's 24x24).
SHAPES = {
    "demo": {"spec": TinySpec(image_size=64, patch=8), "vocab": 512, "logit_scale": 25.0, "samples": 400},
    "real": {"spec": TinySpec(image_size=96, patch=4, max_positions=2048), "vocab": 151_936, "logit_scale": 50.0,
             "samples": 32},
}
# The array that has one row per "unit" of each group, to report bytes per unit.
UNIT_ROWS = {
    "response_topk": ("resp_pos", "response position"),
    "response_sampled": ("resp_sample_n", "response position"),
    "saliency": ("saliency", "(turn, visual token)"),
    "visual_topk": ("vis_pos", "stored visual position"),
    "transitions": ("tpa_pos", "branch row (t, c)"),
}
# Compact settings of the curve: (max_kl, max_dropped, logprob_step). The KL rule charges the ids a row
# drops as if spread over the vocabulary; the coverage rule (max_dropped) is the usual "top-p" cut,
# whose loss shows in kl but not in kl_q.
CURVE = [(0.0, 0.0, 1 / 16), (3e-4, 0.0, 1 / 16), (1e-3, 0.0, 1 / 16), (3e-3, 0.0, 1 / 16), (1e-2, 0.0, 1 / 16),
         (3e-3, 0.0, 1 / 8), (0.0, 1e-3, 1 / 16), (0.0, 1e-2, 1 / 16), (0.0, 3e-2, 1 / 16), (0.0, 1e-1, 1 / 16),
         (0.0, 1e-2, 1 / 8)]


def parse_args():
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shape", choices=sorted(SHAPES), default="demo", help="data and vocabulary shape (see docstring)")
    p.add_argument("--samples", type=int, default=None, help="records (default: 400 demo, 48 real)")
    p.add_argument("--turns", type=int, default=3, help="demo: turns per record")
    p.add_argument("--response-tokens", type=int, default=230, help="real: tokens of each answer")
    p.add_argument("--logit-scale", type=float, default=None, help="LM-head scale of the random teacher (see docstring)")
    p.add_argument("--shard-size", type=int, default=256)
    p.add_argument("--sampled", action="store_true", help="also store the sampled response target")
    p.add_argument("--no-curve", action="store_true", help="skip the recoded curve")
    p.add_argument("--store", type=Path, default=None,
                   help="measure this existing exact store (e.g. a trained teacher's: the demo's stores/train) "
                        "instead of dumping a random-init teacher; --shape only names the results file")
    p.add_argument("--project-vocab", type=int, default=151_936,
                   help="with --store: also project the compact bytes to ids of this vocabulary (bits per kept id)")
    args = p.parse_args()
    shape = SHAPES[args.shape]
    args.samples = args.samples or shape["samples"]
    args.logit_scale = args.logit_scale if args.logit_scale is not None else shape["logit_scale"]
    if args.quick:
        args.samples = min(args.samples, 8 if args.shape == "real" else 32)
    return args


def save_teacher(out: Path, shape: str, scale: float) -> Path:
    spec, vocab = SHAPES[shape]["spec"], SHAPES[shape]["vocab"]
    if vocab == 512:
        model, processor = build_tiny_vlm("llava", spec)
    else:  # the tiny BPE tokenizer plus added tokens up to the real vocabulary's size
        tok = build_tokenizer(512)
        tok.add_tokens([f"<extra_{i}>" for i in range(vocab - len(tok))])
        model, processor = build_llava(spec, tok)
    return save_teacher_scaled(model, processor, out, scale)


def build_real_data(out: Path, n: int, response_tokens: int, tokenizer) -> Path:
    """n records: one random-noise image, one question, an answer of ``response_tokens`` tokens."""
    from PIL import Image

    rng = np.random.default_rng(0)
    words = "the red blue green circle square triangle star at top left right bottom center of a is and".split()
    (out / "img").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        img = out / "img" / f"{i}.png"
        Image.fromarray(rng.integers(0, 256, (96, 96, 3), dtype=np.uint8)).save(img)
        answer: list[str] = []
        while len(tokenizer(" ".join(answer))["input_ids"]) < response_tokens:
            answer.append(str(rng.choice(words)))
        records.append({"id": f"r{i}", "image": str(img), "conversations": [
            {"from": "human", "value": f"{LLAVA_IMAGE}\nDescribe the picture."},
            {"from": "gpt", "value": " ".join(answer)}]})
    path = out / "train.json"
    path.write_text(json.dumps(records))
    return path


def raw_rows(store: Path) -> dict[str, int]:
    rows: dict[str, int] = {}
    for shard in sorted((store / "shards").glob("*/shard.json")):
        for name, n in json.loads(shard.read_text())["rows"].items():
            rows[name] = rows.get(name, 0) + n
    return rows


def decoded_rows(store: Path) -> dict[str, int]:
    """Rows of each decoded array (a codec stores a signal's rows as one run of bytes per sample)."""
    reader, rows = StoreReader(store), {}
    for shard, n in reader.shard_sizes().items():
        for s in reader.read_block(shard, 0, n):
            for name, a in s.arrays.items():
                rows[name] = rows.get(name, 0) + len(a)
    return rows


def byte_groups(store: Path, manifest) -> dict:
    """Stored and raw bytes per signal group, per response token and per unit."""
    specs = StoreReader(store).specs
    rows = decoded_rows(store)
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
        groups[g] = {"stored_bytes": b, "raw_bytes": raw, "stored_per_response_token": b / n_resp,
                     "raw_per_response_token": raw / n_resp, "units": units, "unit": unit,
                     "stored_per_unit": b / units if units else None, "raw_per_unit": raw / units if units else None}
    groups["index"] = {"stored_bytes": stored["index"]["bytes"], "raw_bytes": None,
                       "stored_per_response_token": stored["index"]["bytes_per_response_token"],
                       "raw_per_response_token": None, "units": manifest.n_samples, "unit": "sample",
                       "stored_per_unit": stored["index"]["bytes"] / manifest.n_samples, "raw_per_unit": None}
    total_stored = sum(v["stored_bytes"] for v in groups.values())
    total_raw = sum(v["raw_bytes"] or 0 for v in groups.values())
    return {"samples": manifest.n_samples, "response_tokens": n_resp, "rows": rows, "groups": groups,
            "total_stored_per_response_token": total_stored / n_resp,
            "total_raw_per_response_token_excl_index": total_raw / n_resp}


def dump(teacher: Path, data: Path, out: Path, args, profile: str) -> dict:
    cfg = dump_config(
        teacher,
        data,
        out,
        {
            "teacher.device": args.device,
            "teacher.dtype": args.dtype,
            "output.shard_size": args.shard_size,
            "signals.sampled.enabled": args.sampled,
            "signals.saliency_layers": [SHAPES[args.shape]["spec"].layers - 1],
            "signals.codec.profile": profile,
            "batch_size": 2 if args.shape == "real" else 4,
            "workers": 0,
        },
    )
    from stage1_teacher.dump import run

    t0 = time.perf_counter()
    manifest = run(cfg)
    return {"wall_s": time.perf_counter() - t0, "signals": manifest.signals, **byte_groups(out, manifest)}


def _bucket_kl(e_ids, e_lp, d_ids, d_lp) -> np.ndarray:
    """KL on the decoded row's buckets: the exact row coarsened to the decoded ids + their tail."""
    p = np.where(e_ids >= 0, np.exp(e_lp.astype(np.float64)), 0.0)
    q = np.where(d_ids >= 0, np.exp(d_lp.astype(np.float64)), 0.0)
    kept = (e_ids[:, :, None] == d_ids[:, None, :]) & (d_ids[:, None, :] >= 0)
    p_at = (kept * p[:, :, None]).sum(axis=1)  # exact prob of each decoded id
    pt, qt = np.maximum(1 - p_at.sum(1), 0), np.maximum(1 - q.sum(1), DECODED_TAIL_FLOOR)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p_at > 0, p_at * np.log(p_at / q), 0.0).sum(1) + np.where(pt > 0, pt * np.log(pt / qt), 0.0)
    return np.maximum(terms, 0.0)


def fidelity(exact_store: Path, store: Path) -> dict:
    """Per sparse signal: rows, kept ids, and kl / kl_q / tail_err (mean, max) against the exact store."""
    ex, st = StoreReader(exact_store), StoreReader(store)
    vocab = ex.manifest.vocab_size
    acc: dict[str, dict[str, list]] = {x: {"kl": [], "kl_q": [], "tail_err": [], "kept": []} for x in TOPK_SIGNALS}
    for shard, n in ex.shard_sizes().items():
        for a, b in zip(ex.read_block(shard, 0, n), st.read_block(shard, 0, n)):
            assert a.sample_id == b.sample_id
            for x, (ids, lps) in TOPK_SIGNALS.items():
                if ids not in a.arrays or not len(a.arrays[ids]):
                    continue
                e_ids, e_lp = a.arrays[ids].astype(np.int64), a.arrays[lps]
                d_ids, d_lp = b.arrays[ids].astype(np.int64), b.arrays[lps]
                acc[x]["kl"].append(completion_kl(e_ids, e_lp, d_ids, d_lp, vocab))
                acc[x]["kl_q"].append(_bucket_kl(e_ids, e_lp, d_ids, d_lp))
                kept = (e_ids[:, :, None] == d_ids[:, None, :]).any(2) & (e_ids >= 0)
                exact_tail = 1 - np.where(kept, np.exp(e_lp.astype(np.float64)), 0).sum(1)
                derived = 1 - np.where(d_ids >= 0, np.exp(d_lp.astype(np.float64)), 0).sum(1)
                acc[x]["tail_err"].append(np.abs(derived - exact_tail))
                acc[x]["kept"].append((d_ids >= 0).sum(1))
    out = {}
    for x, d in acc.items():
        if not d["kl"]:
            continue
        cat = {k: np.concatenate(v) for k, v in d.items()}
        out[x] = {"rows": int(len(cat["kl"])), "kept_ids_mean": float(cat["kept"].mean()),
                  **{f"{k}_{f}": float(getattr(np, f)(cat[k])) for k in ("kl", "kl_q", "tail_err") for f in ("mean", "max")}}
    allkl = np.concatenate([np.concatenate(d["kl"]) for d in acc.values() if d["kl"]])
    allq = np.concatenate([np.concatenate(d["kl_q"]) for d in acc.values() if d["kl_q"]])
    out["all"] = {"rows": int(len(allkl)), "kl_mean": float(allkl.mean()), "kl_max": float(allkl.max()),
                  "kl_q_mean": float(allq.mean()), "kl_q_max": float(allq.max())}
    return out


def print_bytes(name: str, run: dict) -> None:
    headers = ["group", "stored B/resp tok", "raw B/resp tok", "raw/stored", "stored B/unit", "raw B/unit", "unit"]
    body = []
    for g, v in run["groups"].items():
        raw, st = v["raw_per_response_token"], v["stored_per_response_token"]
        body.append([g, f"{st:.1f}", "-" if raw is None else f"{raw:.1f}", "-" if raw is None or not st else f"{raw / st:.2f}",
                     "-" if v["stored_per_unit"] is None else f"{v['stored_per_unit']:.1f}",
                     "-" if v["raw_per_unit"] is None else f"{v['raw_per_unit']:.1f}", v["unit"]])
    body.append(["total", f"{run['total_stored_per_response_token']:.1f}",
                 f"{run['total_raw_per_response_token_excl_index']:.1f} (excl. index)", "", "", "", ""])
    wall = (f" (dump wall {run['wall_s']:.1f} s)" if "wall_s" in run else
            f" (recoded in {run['recode_s']:.1f} s)" if "recode_s" in run else " (as given)")
    print(f"\n{name}{wall}")
    print(table(headers, body))


def print_fidelity(name: str, fid: dict) -> None:
    headers = ["signal", "rows", "kept ids", "kl mean", "kl max", "kl_q mean", "kl_q max", "tail_err mean", "tail_err max"]
    body = [[x, v["rows"], f"{v['kept_ids_mean']:.2f}", f"{v['kl_mean']:.2e}", f"{v['kl_max']:.2e}", f"{v['kl_q_mean']:.2e}",
             f"{v['kl_q_max']:.2e}", f"{v['tail_err_mean']:.1e}", f"{v['tail_err_max']:.1e}"]
            for x, v in fid.items() if x != "all"]
    print(f"\nfidelity of {name} vs exact (nats; all rows: kl mean {fid['all']['kl_mean']:.2e}, max {fid['all']['kl_max']:.2e})")
    print(table(headers, body))


def projected(run: dict, fid: dict, vocab_from: int, vocab_to: int) -> float:
    """Bytes per response token of a compact store if its ids named tokens of ``vocab_to`` instead
    of ``vocab_from``: each kept id costs ceil(log2 V) bits (``topk-packed-v1``); everything else stays."""
    extra_bits = id_bits(vocab_to) - id_bits(vocab_from)
    kept = sum(v["rows"] * v["kept_ids_mean"] for x, v in fid.items() if x != "all")
    return run["total_stored_per_response_token"] + kept * extra_bits / 8 / run["response_tokens"]


def main() -> None:
    args = parse_args()
    check_device(args.device)
    with Workdir(args.workdir, "store") as work:
        if args.store is not None:  # a store someone dumped: measure it as it is
            from schemas.manifest import read_manifest

            exact = args.store
            m = read_manifest(exact)
            if m.signals.get("codec", {}).get("profile", "exact") != "exact":
                raise SystemExit(f"--store {exact}: not an exact store (profile {m.signals['codec']['profile']})")
            runs = {"exact": {"signals": m.signals, **byte_groups(exact, m)}}
        else:
            exact = work / "exact"
            teacher = save_teacher(work / "teacher", args.shape, args.logit_scale)
            if args.shape == "real":
                from transformers import AutoProcessor

                tokenizer = AutoProcessor.from_pretrained(teacher).tokenizer
                data = build_real_data(work / "data", args.samples, args.response_tokens, tokenizer)
            else:
                data = build_shapes_data(work / "data", args.samples, args.turns)
            print("dump exact ...", flush=True)
            runs = {"exact": dump(teacher, data, exact, args, "exact")}
        # compact: the exact store recoded at the profile's defaults, which writes the arrays a compact
        # dump writes (tests/test_codecs.py) without running the teacher twice
        t0 = time.perf_counter()
        m = recode(exact, work / "compact", CodecConfig(profile="compact"))
        runs["compact"] = {"recode_s": time.perf_counter() - t0, "signals": m.signals, **byte_groups(work / "compact", m)}
        fid = {"compact": fidelity(exact, work / "compact")}
        vocab = m.vocab_size
        if args.store is not None and args.project_vocab != vocab:
            runs["compact"]["projected_per_response_token"] = {
                str(args.project_vocab): projected(runs["compact"], fid["compact"], vocab, args.project_vocab)}
        curve = []
        if not args.no_curve:
            for max_kl, max_dropped, step in CURVE:
                out = work / f"recoded-{max_kl:g}-{max_dropped:g}-{step:g}"
                t0 = time.perf_counter()
                m = recode(exact, out, CodecConfig(profile="compact", max_kl=max_kl, logprob_step=step,
                                                   max_dropped=max_dropped))
                b = byte_groups(out, m)
                f = fidelity(exact, out)
                curve.append({"max_kl": max_kl, "max_dropped": max_dropped, "logprob_step": step,
                              "recode_s": time.perf_counter() - t0,
                              "total_stored_per_response_token": b["total_stored_per_response_token"],
                              "groups": {g: v["stored_per_response_token"] for g, v in b["groups"].items()},
                              "fidelity": f})
                print(f"recoded max_kl={max_kl:g} max_dropped={max_dropped:g} step={step:g}: "
                      f"{b['total_stored_per_response_token']:.1f} B/resp tok, "
                      f"kl mean {f['all']['kl_mean']:.2e}", flush=True)

    ex = runs["exact"]
    rows, n_resp, n_samples = ex["rows"], ex["response_tokens"], ex["samples"]
    uniq = rows.get("resp_sample_ids", 0) / max(1, rows.get("resp_sample_n", 1))
    tpa_per_resp = rows.get("tpa_pos", 0) / n_resp
    print()
    print(f"shape {args.shape}: {n_samples} samples, {n_resp} response tokens ({n_resp / n_samples:.1f}/sample), "
          f"{rows['saliency'] // max(1, n_samples)} saliency entries/sample, {rows['vis_pos'] / n_samples:.0f} stored "
          f"visual positions/sample; transitions: {tpa_per_resp:.2f} branch rows/response token; "
          + (f"logit scale {args.logit_scale}" if args.store is None else "a given store") + (f"; sampled: {uniq:.1f} unique ids/position" if args.sampled else ""))
    if args.store is not None:
        print(f"store {args.store} (vocabulary {vocab})")
    for name, run in runs.items():
        print_bytes(name, run)
        if name != "exact":
            print_fidelity(name, fid[name])
        for v, b in run.get("projected_per_response_token", {}).items():
            print(f"projected to a {int(v):,}-token vocabulary (ids at {id_bits(int(v))} bits, same kept ids): "
                  f"{b:.1f} B per response token")
    if curve:
        headers = ["max_kl", "max_dropped", "step", "B/resp tok", "response", "visual", "transitions", "kl mean", "kl max",
                   "kl_q mean", "resp kl mean", "resp kept", "vis kept", "tpa kept"]
        body = [[f"{c['max_kl']:g}", f"{c['max_dropped']:g}", f"{c['logprob_step']:g}",
                 f"{c['total_stored_per_response_token']:.1f}",
                 f"{c['groups'].get('response_topk', 0):.1f}", f"{c['groups'].get('visual_topk', 0):.1f}",
                 f"{c['groups'].get('transitions', 0):.1f}", f"{c['fidelity']['all']['kl_mean']:.2e}",
                 f"{c['fidelity']['all']['kl_max']:.2e}", f"{c['fidelity']['all']['kl_q_mean']:.2e}",
                 f"{c['fidelity']['resp']['kl_mean']:.2e}", f"{c['fidelity']['resp']['kept_ids_mean']:.1f}",
                 f"{c['fidelity'].get('vis', {}).get('kept_ids_mean', 0):.1f}",
                 f"{c['fidelity'].get('tpa', {}).get('kept_ids_mean', 0):.1f}"] for c in curve]
        print("\ncurve: the exact store recoded at compact settings (bytes per response token, all signals + index)")
        print(table(headers, body))

    path = write_results(
        "store_bytes_store" if args.store is not None else f"store_bytes_{args.shape}" if args.shape != "demo" else "store_bytes",
        {"env": environment(args.device, args.dtype), "args": vars(args), "spec": spec_dict(SHAPES[args.shape]["spec"]),
         "runs": runs, "fidelity": fid, "curve": curve, "branch_rows_per_response_token": tpa_per_resp,
         "unique_sampled_ids_per_position": uniq if args.sampled else None},
        args.out,
    )
    print(f"results: {path}")


if __name__ == "__main__":
    main()
