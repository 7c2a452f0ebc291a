"""``pipeline verify STORE`` and ``pipeline inspect STORE``: check a teacher store and look inside it.

- :func:`verify` (from :mod:`schemas.signal_checks`) = :func:`schemas.verify.verify_store` (structure:
  versions, checksums, offsets) + :func:`~schemas.signal_checks.verify_signals` (meaning: every
  sample's signals obey DESIGN.md §3; see ``SIGNAL_CHECKS`` there).
- :func:`stats` summarises a store from its manifest and Parquet indexes (no array reads).
- :func:`sample_json` is one sample as plain JSON (ids, position sets, every stored distribution).
- The figures (``--out``) are :func:`pipeline.tools.render.render`.

``main_verify`` / ``main_inspect`` are the CLI adapters: they print to stdout and return the exit code.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import torch

from pipeline.errors import PipelineError
from pipeline.modeling.sparse import tail_mass
from schemas.signal_checks import verify
from schemas.layout import INDEX_NAME, SHARDS_DIR, StoredSample
from schemas.reader import StoreReader
from schemas.signals import sampled_arrays

log = logging.getLogger("pipeline.inspect")


# ---------------------------------------------------------------------------------------------- stats


def stats(store_dir: str | Path) -> dict:
    """Counts, sizes and settings of a store, from its manifest and Parquet indexes (no array reads)."""
    store = Path(store_dir)
    reader = StoreReader(store)
    m = reader.manifest
    rows: dict[str, int] = {}
    for e in m.shards:
        for name, n in e["rows"].items():
            rows[name] = rows.get(name, 0) + int(n)
    lengths: list[np.ndarray] = []
    visual_tokens = image_samples = 0
    for name in reader.shard_sizes():
        t = pq.read_table(store / SHARDS_DIR / name / INDEX_NAME, columns=["length", "visual_blocks"])
        lengths.append(t.column("length").to_numpy().astype(np.int64))
        for text in t.column("visual_blocks").to_pylist():
            blocks = json.loads(text) if text else []
            visual_tokens += sum(int(b["length"]) for b in blocks)
            image_samples += bool(blocks)
    lengths_all = np.concatenate(lengths) if lengths else np.zeros(0, np.int64)
    n = m.n_samples
    sal = m.optional("saliency") or {}
    return {
        "store": str(store),
        "samples": n,
        "image_samples": image_samples,
        "text_only_samples": n - image_samples,
        "skipped": m.n_skipped,
        "skipped_reasons": m.skipped_reasons,
        "shards": len(m.shards),
        "tokens": {
            "total": int(lengths_all.sum()),
            "mean_length": float(lengths_all.mean()) if n else 0.0,
            "max_length": int(lengths_all.max()) if n else 0,
        },
        "response_tokens": rows.get("resp_pos", 0),
        "visual_tokens": visual_tokens,
        "stored_visual_positions": rows.get("vis_pos", 0),
        "transition_rows": rows.get("tpa_pos", 0),
        "sampled_ids": rows.get(sampled_arrays("resp")[1], 0),
        "sampled_ids_visual": rows.get(sampled_arrays("vis")[1], 0),
        "sampled_ids_transitions": rows.get(sampled_arrays("tpa")[1], 0),
        "signal_bytes": {g: v for g, v in m.signal_bytes.items() if isinstance(v, dict)},
        "saliency": {"layers": sal.get("layers"), "irs": sal.get("irs")},
        "settings": m.optional("signals") or {},
        "teacher": m.optional("teacher") or {},
        "tokenizer": m.optional("tokenizer") or {},
    }


def _flatten(d: dict, prefix: str = "") -> list[tuple[str, object]]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _flatten(v, f"{prefix}{k}.")
        else:
            out.append((f"{prefix}{k}", v))
    return out


def format_stats(st: dict) -> str:
    """The printed table of :func:`stats`."""
    tok = st["tokens"]
    skipped = ", ".join(f"{r} {c}" for r, c in st["skipped_reasons"].items()) or "-"
    vis_frac = st["stored_visual_positions"] / st["visual_tokens"] if st["visual_tokens"] else 0.0
    lines = [
        f"store {st['store']}",
        f"  {'samples':<28}{st['samples']}  ({st['image_samples']} with images, {st['text_only_samples']} text-only)",
        f"  {'skipped':<28}{st['skipped']}  ({skipped})",
        f"  {'shards':<28}{st['shards']}",
        f"  {'tokens':<28}{tok['total']}  (mean length {tok['mean_length']:.1f}, max {tok['max_length']})",
        f"  {'response tokens':<28}{st['response_tokens']}",
        f"  {'visual tokens':<28}{st['visual_tokens']}",
        f"  {'stored visual positions':<28}{st['stored_visual_positions']}  ({vis_frac:.1%} of visual tokens)",
        f"  {'transition rows':<28}{st['transition_rows']}",
    ]
    draws = [(rows, st[key]) for rows, key in (("response", "sampled_ids"), ("visual", "sampled_ids_visual"),
                                                ("transitions", "sampled_ids_transitions")) if st[key]]
    if draws:
        lines.append(f"  {'sampled target ids':<28}" + ", ".join(f"{rows} {n}" for rows, n in draws))
    if st["signal_bytes"]:
        lines.append("  bytes per response token (on disk):")
        for g, v in st["signal_bytes"].items():
            lines.append(f"    {g:<26}{v['bytes_per_response_token']:10.1f}  ({v['bytes']} B)")
    lines.append(f"  {'saliency layers':<28}{st['saliency']['layers']}")
    irs = st["saliency"]["irs"]
    if irs:
        chosen = set(st["saliency"]["layers"] or [])
        lines.append("  IRS per layer (* = chosen):")
        for layer, v in sorted(irs.items(), key=lambda kv: int(kv[0])):
            lines.append(f"    {'*' if int(layer) in chosen else ' '} layer {int(layer):>3}  {v:.4f}")
    else:
        lines.append("  IRS table                   none (layers named in the config)")
    lines.append("  settings:")
    for k, v in _flatten({"signals": st["settings"], "teacher": st["teacher"], "tokenizer": st["tokenizer"]}):
        lines.append(f"    {k:<40}{v}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- one sample


def _get(store: Path, reader: StoreReader, sample_id: str) -> StoredSample:
    try:
        return reader.get(sample_id)
    except KeyError:
        raise PipelineError(f"sample {sample_id!r} is not in store {store}") from None


def _block_offsets(blocks: list[dict]) -> list[int]:
    """Start of each visual block inside V (the saliency maps' columns, in block order)."""
    return np.concatenate([[0], np.cumsum([int(b["length"]) for b in blocks])]).astype(int).tolist()


def _attach_draws(rows: list[dict], a: dict, prefix: str) -> None:
    """Each row's sampled target (its unique ids and their counts out of ``draws``), where the store
    keeps one for the rows of ``prefix`` (resp, vis, tpa)."""
    n_name, ids_name, counts_name = sampled_arrays(prefix)
    if n_name not in a:
        return
    ids, counts, end = a[ids_name], a[counts_name], 0
    for row, k in zip(rows, a[n_name].tolist()):
        row["sampled_ids"], row["sampled_counts"] = ids[end:end + k].tolist(), counts[end:end + k].tolist()
        end += k


def sample_json(store_dir: str | Path, sample_id: str) -> dict:
    """One sample as plain JSON: ids, position sets and every stored signal (exact stored values)."""
    store = Path(store_dir)
    s = _get(store, StoreReader(store), sample_id)
    m, a = s.meta, s.arrays
    blocks, turns = m["visual_blocks"], m["turns"]
    resp_pos = a["resp_pos"].tolist()
    response = []
    for r, t in enumerate(resp_pos):
        response.append({"position": t, "ids": a["resp_ids"][r].tolist(), "logprobs": a["resp_logprobs"][r].tolist()})
    _attach_draws(response, a, "resp")
    saliency = []
    n_vis = sum(int(b["length"]) for b in blocks)
    if n_vis:
        maps = a["saliency"].reshape(len(turns), n_vis)
        off = _block_offsets(blocks)
        for j in range(len(turns)):
            images = []
            for i, b in enumerate(blocks):
                rows, cols = (int(x) for x in b["grid"])
                images.append({"image_index": int(b["image_index"]), "grid": [rows, cols],
                               "map": maps[j, off[i]:off[i + 1]].reshape(rows, cols).tolist()})
            saliency.append({"turn": j, "images": images})
    visual = [
        {"position": int(p), "weight": float(w), "ids": i.tolist(), "logprobs": lp.tolist()}
        for p, w, i, lp in zip(a["vis_pos"], a["vis_weight"], a["vis_ids"], a["vis_logprobs"])
    ]
    _attach_draws(visual, a, "vis")
    transitions: list[dict] = []
    if "tpa_pos" in a:
        by_pos: dict[int, dict] = {}
        branches = []  # every candidate, in row order
        for r, t in enumerate(a["tpa_pos"].tolist()):
            if t not in by_pos:
                by_pos[t] = {"position": t, "candidates": []}
                transitions.append(by_pos[t])
            branches.append({
                "id": int(a["tpa_cand"][r]), "logprob": float(a["tpa_cand_logprob"][r]),
                "ids": a["tpa_ids"][r].tolist(), "logprobs": a["tpa_logprobs"][r].tolist(),
            })
            by_pos[t]["candidates"].append(branches[-1])
        _attach_draws(branches, a, "tpa")
    return {
        "sample_id": s.sample_id,
        "length": int(m["length"]),
        "input_ids": [int(x) for x in m["input_ids"]],
        "image_hashes": list(m["image_hashes"]),
        "visual_blocks": [{"image_index": int(b["image_index"]), "start": int(b["start"]), "length": int(b["length"]),
                           "grid": [int(x) for x in b["grid"]]} for b in blocks],
        "turns": [{"instruction": [int(x) for x in t["instruction"]], "response": [int(x) for x in t["response"]]}
                  for t in turns],
        "response": response,
        "saliency": saliency,
        "visual": visual,
        "transitions": transitions,
    }


def format_sample(d: dict) -> str:
    """A short human-readable summary of :func:`sample_json`'s dict."""
    lines = [f"sample {d['sample_id']}: {d['length']} tokens, {len(d['image_hashes'])} images, {len(d['turns'])} turns"]
    for b in d["visual_blocks"]:
        lines.append(f"  image {b['image_index']}: positions {b['start']}..{b['start'] + b['length'] - 1}, "
                     f"grid {b['grid'][0]}x{b['grid'][1]}")
    for j, t in enumerate(d["turns"]):
        lines.append(f"  turn {j}: {len(t['instruction'])} instruction, {len(t['response'])} response positions")
    tails = [float(tail_mass(torch.tensor(r["logprobs"], dtype=torch.float64))) for r in d["response"]]
    mean_tail = sum(tails) / len(tails) if tails else 0.0
    lines.append(f"  response distributions: {len(d['response'])} (mean tail mass {mean_tail:.4f})")
    lines.append(f"  visual distributions: {len(d['visual'])}")
    lines.append(f"  transitions: {sum(len(t['candidates']) for t in d['transitions'])} branch rows at "
                 f"{len(d['transitions'])} positions")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- CLI adapters


def main_verify(store: str) -> int:
    """``pipeline verify STORE``: print each problem and return 1, or print "OK: ..." and return 0."""
    problems = verify(store)
    for p in problems:
        print(p)
    if problems:
        print(f"FAILED: {len(problems)} problem(s) in {store}")
        return 1
    m = StoreReader(store).manifest
    print(f"OK: {m.n_samples} samples in {len(m.shards)} shards")
    return 0


def main_inspect(store: str, sample: str | None, as_json: bool, out: str | None, n: int, image_root: str | None,
                 data: str | None) -> int:
    """``pipeline inspect STORE [--sample ID] [--json] [--out DIR -n N --image-root DIR --data PATH]``.

    Without ``--sample``: the stats table (``--json``: the stats dict). With it: the sample summary
    (``--json``: :func:`sample_json`). With ``--out``: also render PNGs and list them. Bad input
    (unknown sample, broken store) raises PipelineError / StoreFormatError for the CLI to report.
    """
    from pipeline.tools.render import render  # it imports this module (sample access)

    if sample is not None:
        d = sample_json(store, sample)
        print(json.dumps(d) if as_json else format_sample(d))
    else:
        st = stats(store)
        print(json.dumps(st, indent=2) if as_json else format_stats(st))
    if out is not None:
        for p in render(store, out, n_samples=n, image_root=image_root, data_path=data):
            if as_json:
                log.info("wrote %s", p)  # stdout stays one JSON document
            else:
                print(f"wrote {p}")
    return 0
