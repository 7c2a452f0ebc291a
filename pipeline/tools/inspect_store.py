"""``pipeline verify STORE`` and ``pipeline inspect STORE``: check a teacher store and look inside it.

- :func:`verify` = :func:`schemas.store.verify_store` (structure: versions, checksums, offsets) +
  :func:`verify_signals` (meaning: every sample's signals obey DESIGN.md §3; see ``SIGNAL_CHECKS``).
- :func:`stats` summarises a store from its manifest and Parquet indexes (no array reads).
- :func:`sample_json` is one sample as plain JSON (ids, position sets, every stored distribution).
- :func:`render` draws PNGs: saliency overlays on the dataset's images, the IRS-per-layer curve and
  histograms of the response distributions' tail mass and entropy.

``main_verify`` / ``main_inspect`` are the CLI adapters: they print to stdout and return the exit code.
"""

from __future__ import annotations

import json
import logging
import math
import re
import textwrap
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq

from pipeline.errors import PipelineError
from schemas.errors import StoreFormatError
from schemas.layout import INDEX_NAME, SHARDS_DIR, StoredSample
from schemas.reader import StoreReader
from schemas.verify import verify_store

log = logging.getLogger("pipeline.inspect")

# Tolerances of the semantic checks.
# Log-probs come from a float32 log-softmax; the largest one of a peaked row rounds to at most ~1e-7
# above 0, so 1e-6 flags only real errors.
LOGPROB_TOL = 1e-6
# sum(exp(top-k log-probs)) <= 1 + MASS_TOL, i.e. the tail mass is non-negative: float32 exp/sum over
# k = 64 terms is off by ~k * 6e-8 ≈ 4e-6; 1e-4 leaves room and still catches a wrong normaliser.
MASS_TOL = 1e-4
# Each turn's saliency map sums to 1 within SALIENCY_SUM_TOL. Stored in float16 (relative rounding
# 2^-11 ≈ 4.9e-4 per entry, so the sum is off by <= 4.9e-4); 2e-2 also admits a map normalised in
# bf16 before the cast (relative 3.9e-3) and still catches an unnormalised or truncated map.
SALIENCY_SUM_TOL = 2e-2
# vis_weight is the turn-mean saliency at the stored position: float32 mean of float16 values.
VIS_WEIGHT_RTOL, VIS_WEIGHT_ATOL = 1e-2, 1e-3
# tpa_cand_logprob is log p_T(c|x<=t), the same number as c's entry in resp_logprobs at t.
CAND_LOGPROB_TOL = 1e-4
# Samples per StoreReader.read_block call: one zarr read per array per block.
BLOCK_SAMPLES = 256
# verify_signals stops collecting after this many problems (a systematic bug repeats on every sample).
MAX_PROBLEMS = 1000
# Response rows read for the histograms of render().
MAX_HISTOGRAM_ROWS = 200_000

SIGNAL_CHECKS = """\
meta: length == len(input_ids); visual blocks inside [0, length), grid rows*cols == length, no overlap;
  turn positions inside [0, length) (response positions t need x_{t+1}: inside [0, length-1))
resp_pos: unique, equal to the union of the turns' response positions
resp_ids/resp_logprobs, vis_ids/vis_logprobs, tpa_ids/tpa_logprobs: one row per position; log-probs
  finite and <= 0, each row sorted descending, sum(exp) <= 1 (tail mass >= 0); ids in
  [0, tokenizer.size) and unique within a row (-1 is padding, only at a row's end)
saliency: n_turns * |V| values (0 for text-only samples), finite, >= 0, each turn's map sums to 1
vis_pos: unique, inside the visual blocks; vis_weight = turn-mean saliency there, one per position
resp_sample_*: resp_sample_n per response position, ids in the vocabulary and unique per position,
  counts >= 1 and summing to signals.sampled.draws per position
tpa_*: positions among resp_pos, at most signals.transitions.max_positions of them, at most
  .candidates candidates each, unique; candidate != gold token input_ids[t+1], in the vocabulary;
  tpa_cand_logprob = the candidate's log-prob in resp_logprobs at t (or below that row's top-k)
"""


# ---------------------------------------------------------------------------------------------- verify


def verify(store_dir: str | Path) -> list[str]:
    """Structural problems (:func:`verify_store`); when there are none, semantic ones (:func:`verify_signals`)."""
    problems = verify_store(store_dir)
    if problems:
        return problems
    return verify_signals(store_dir)


def verify_signals(store_dir: str | Path, max_problems: int = MAX_PROBLEMS) -> list[str]:
    """Semantic problems of every sample (``SIGNAL_CHECKS``), each naming shard, sample and array.

    Assumes the structure is sound (run :func:`verify_store` first). Reads ``BLOCK_SAMPLES`` samples
    per read. Stops after ``max_problems`` problems with a last line saying so.
    """
    store = Path(store_dir)
    reader = StoreReader(store)
    problems: list[str] = []
    ctx = _Context.from_manifest(reader.manifest, problems)
    for shard, n in reader.shard_sizes().items():
        for lo in range(0, n, BLOCK_SAMPLES):
            try:
                block = reader.read_block(shard, lo, min(n, lo + BLOCK_SAMPLES))
            except StoreFormatError as e:
                problems.append(str(e))
                break
            for s in block:
                try:
                    problems += _sample_problems(s, ctx, f"shard {shard!r}, sample {s.sample_id!r}")
                except (KeyError, TypeError, ValueError) as e:
                    problems.append(f"shard {shard!r}, sample {s.sample_id!r}: malformed meta or arrays: {e!r}")
                if len(problems) >= max_problems:
                    return problems[:max_problems] + [
                        f"stopped after {max_problems} problems at sample {s.sample_id!r} of shard {shard!r}; "
                        "later samples were not checked"]
    return problems


class _Context:
    """Store-wide facts the per-sample checks need, from the manifest."""

    def __init__(self, vocab, draws, max_candidates, max_positions):
        self.vocab: int | None = vocab
        self.draws: int | None = draws
        self.max_candidates: int | None = max_candidates
        self.max_positions: int | None = max_positions

    @classmethod
    def from_manifest(cls, m: dict, problems: list[str]) -> "_Context":
        def get(path: str):
            cur = m
            for key in path.split("."):
                if not isinstance(cur, dict) or key not in cur:
                    return None
                cur = cur[key]
            return cur

        vocab = get("tokenizer.size")
        if not isinstance(vocab, int):
            problems.append(f"manifest: no integer tokenizer.size (found {vocab!r}); token ids not range-checked")
            vocab = None
        draws = None
        if "resp_sample_n" in m["arrays"]:
            draws = get("signals.sampled.draws")
            if not isinstance(draws, int):
                problems.append(f"manifest: the store has sampled targets but no integer signals.sampled.draws "
                                f"(found {draws!r}); counts not checked against it")
                draws = None
        cands = positions = None
        if "tpa_pos" in m["arrays"]:
            cands, positions = get("signals.transitions.candidates"), get("signals.transitions.max_positions")
            cands = cands if isinstance(cands, int) else None
            positions = positions if isinstance(positions, int) else None
        return cls(vocab, draws, cands, positions)


def _first(mask: np.ndarray) -> int:
    return int(np.flatnonzero(mask)[0])


def _sample_problems(s: StoredSample, ctx: _Context, where: str) -> list[str]:
    out: list[str] = []
    m, a = s.meta, s.arrays

    def bad(array: str, msg: str) -> None:
        out.append(f"{where}, array {array!r}: {msg}")

    ids = np.asarray(m["input_ids"], dtype=np.int64)
    length = int(m["length"])
    if length != len(ids):
        out.append(f"{where}, meta 'length': {length} but input_ids has {len(ids)} tokens")
        return out  # every position check below depends on it

    # -- position sets (meta)
    blocks = m["visual_blocks"]
    vis_all = [np.zeros(0, np.int64)]
    for b in blocks:
        start, n, (rows, cols) = int(b["start"]), int(b["length"]), b["grid"]
        if rows * cols != n:
            out.append(f"{where}, meta 'visual_blocks': image {b['image_index']}: grid {rows}x{cols} != length {n}")
        if start < 0 or start + n > length:
            out.append(f"{where}, meta 'visual_blocks': image {b['image_index']}: positions [{start}, {start + n}) "
                       f"outside [0, {length})")
        if not 0 <= int(b["image_index"]) < len(m["image_hashes"]):
            out.append(f"{where}, meta 'visual_blocks': image_index {b['image_index']} but the sample has "
                       f"{len(m['image_hashes'])} image hashes")
        vis_all.append(np.arange(start, start + n))
    vis_all = np.concatenate(vis_all)  # V in block order: the saliency maps' column order
    if len(np.unique(vis_all)) != len(vis_all):
        out.append(f"{where}, meta 'visual_blocks': blocks overlap")
    turns = m["turns"]
    resp_union = [np.zeros(0, np.int64)]
    for j, t in enumerate(turns):
        for key, hi in (("instruction", length), ("response", length - 1)):
            pos = np.asarray(t[key], dtype=np.int64)
            if pos.size and (pos.min() < 0 or pos.max() >= hi):
                out.append(f"{where}, meta 'turns': turn {j} {key} position {int(pos[(pos < 0) | (pos >= hi)][0])} "
                           f"outside [0, {hi})")
        resp_union.append(np.asarray(t["response"], dtype=np.int64))
    resp_union = np.sort(np.concatenate(resp_union))

    # -- response distributions
    resp_pos = a["resp_pos"].astype(np.int64)
    if len(np.unique(resp_pos)) != len(resp_pos):
        bad("resp_pos", "positions repeat")
    if not np.array_equal(np.sort(resp_pos), resp_union):
        extra = np.setdiff1d(resp_pos, resp_union)[:5].tolist()
        missing = np.setdiff1d(resp_union, resp_pos)[:5].tolist()
        bad("resp_pos", f"differs from the union of the turns' response positions ({len(resp_pos)} vs "
                        f"{len(resp_union)}; not in turns: {extra}, missing: {missing})")
    out += _topk_problems(where, "resp", a["resp_ids"], a["resp_logprobs"], resp_pos, ctx.vocab)

    # -- saliency
    n_vis, n_turns = len(vis_all), len(turns)
    sal = a["saliency"]
    expected = n_turns * n_vis if n_vis else 0
    smap = None
    if len(sal) != expected:
        bad("saliency", f"{len(sal)} values, expected {expected} (= {n_turns} turns x {n_vis} visual positions)")
    elif expected:
        smap = sal.astype(np.float32).reshape(n_turns, n_vis)
        if not np.isfinite(smap).all() or (smap < 0).any():
            bad("saliency", "values must be finite and >= 0")
        sums = smap.sum(axis=1)
        off = np.abs(sums - 1.0) > SALIENCY_SUM_TOL
        if off.any():
            j = _first(off)
            bad("saliency", f"{int(off.sum())} of {n_turns} turn maps do not sum to 1 within {SALIENCY_SUM_TOL} "
                            f"(first: turn {j}, sum {sums[j]:.4g})")

    # -- visual-position distributions
    vis_pos = a["vis_pos"].astype(np.int64)
    if len(np.unique(vis_pos)) != len(vis_pos):
        bad("vis_pos", "positions repeat")
    outside = ~np.isin(vis_pos, vis_all)
    if outside.any():
        bad("vis_pos", f"{int(outside.sum())} positions outside the visual blocks (first: {int(vis_pos[outside][0])})")
    w = a["vis_weight"]
    if len(w) != len(vis_pos):
        bad("vis_weight", f"{len(w)} rows for {len(vis_pos)} visual positions")
    elif smap is not None and not outside.any():
        col = np.searchsorted(np.sort(vis_all), vis_pos)
        col = np.argsort(vis_all)[col]
        mean = smap.mean(axis=0)[col]
        off = ~np.isclose(w, mean, rtol=VIS_WEIGHT_RTOL, atol=VIS_WEIGHT_ATOL)
        if off.any():
            i = _first(off)
            bad("vis_weight", f"{int(off.sum())} weights differ from the turn-mean saliency (first: position "
                              f"{int(vis_pos[i])}, {float(w[i]):.4g} vs {float(mean[i]):.4g})")
    out += _topk_problems(where, "vis", a["vis_ids"], a["vis_logprobs"], vis_pos, ctx.vocab)

    # -- sampled response targets
    if "resp_sample_n" in a:
        out += _sampled_problems(where, a, len(resp_pos), ctx)

    # -- transitions
    if "tpa_pos" in a:
        out += _transition_problems(where, a, ids, resp_pos, ctx)
    return out


def _topk_problems(where: str, prefix: str, ids: np.ndarray, lps: np.ndarray, positions: np.ndarray,
                   vocab: int | None) -> list[str]:
    """Checks of one top-k group (``<prefix>_ids`` / ``<prefix>_logprobs``), one row per position."""
    out: list[str] = []
    id_name, lp_name = f"{prefix}_ids", f"{prefix}_logprobs"
    if len(ids) != len(positions) or len(lps) != len(positions):
        return [f"{where}, array {id_name!r}/{lp_name!r}: {len(ids)}/{len(lps)} rows for {len(positions)} positions"]
    if not len(ids):
        return out

    def rows(mask_rows: np.ndarray) -> str:
        r = _first(mask_rows)
        return f"{int(mask_rows.sum())} of {len(mask_rows)} rows (first: row {r}, position {int(positions[r])})"

    ids = ids.astype(np.int64)
    pad = ids == -1
    valid = ~pad
    if vocab is not None:
        oov = valid & ((ids < 0) | (ids >= vocab))
    else:
        oov = valid & (ids < 0)
    if oov.any():
        r = oov.any(axis=1)
        out.append(f"{where}, array {id_name!r}: ids outside the vocabulary [0, {vocab}) in {rows(r)}, "
                   f"e.g. {int(ids[oov][0])}")
    srt = np.sort(np.where(valid, ids, -1), axis=1)
    dup = ((srt[:, 1:] == srt[:, :-1]) & (srt[:, 1:] >= 0)).any(axis=1)
    if dup.any():
        out.append(f"{where}, array {id_name!r}: ids repeat within {rows(dup)}")

    lp = lps.astype(np.float64)
    nonfinite = (valid & ~np.isfinite(lp)).any(axis=1)
    if nonfinite.any():
        out.append(f"{where}, array {lp_name!r}: non-finite log-probs in {rows(nonfinite)}")
    positive = (valid & (lp > LOGPROB_TOL)).any(axis=1)
    if positive.any():
        out.append(f"{where}, array {lp_name!r}: log-prob > 0 in {rows(positive)}, e.g. "
                   f"{float(lp[valid & (lp > LOGPROB_TOL)][0]):.4g}")
    lp = np.where(valid & np.isfinite(lp), lp, -np.inf)  # padding sorts last, so a pad mid-row is "unsorted"
    with np.errstate(invalid="ignore"):
        unsorted = (np.diff(lp, axis=1) > LOGPROB_TOL).any(axis=1)
    if unsorted.any():
        out.append(f"{where}, array {lp_name!r}: log-probs not sorted descending in {rows(unsorted)}")
    mass = np.exp(lp).sum(axis=1)
    over = mass > 1.0 + MASS_TOL
    if over.any():
        out.append(f"{where}, array {lp_name!r}: sum(exp(log-probs)) > 1 (negative tail mass) in {rows(over)}, "
                   f"e.g. {float(mass[over][0]):.6g}")
    return out


def _sampled_problems(where: str, a: dict, n_resp: int, ctx: _Context) -> list[str]:
    out: list[str] = []
    n = a["resp_sample_n"].astype(np.int64)
    sids, counts = a["resp_sample_ids"].astype(np.int64), a["resp_sample_counts"].astype(np.int64)
    if len(n) != n_resp:
        return [f"{where}, array 'resp_sample_n': {len(n)} rows for {n_resp} response positions"]
    if (n < 0).any() or int(n.sum()) != len(sids) or len(sids) != len(counts):
        return [f"{where}, array 'resp_sample_n': counts per position sum to {int(n.sum())}, but resp_sample_ids "
                f"has {len(sids)} rows and resp_sample_counts {len(counts)}"]
    group = np.repeat(np.arange(n_resp), n)
    if ctx.vocab is not None and ((sids < 0) | (sids >= ctx.vocab)).any():
        out.append(f"{where}, array 'resp_sample_ids': ids outside the vocabulary [0, {ctx.vocab}), e.g. "
                   f"{int(sids[(sids < 0) | (sids >= ctx.vocab)][0])}")
    order = np.lexsort((sids, group))
    g, i = group[order], sids[order]
    dup = (g[1:] == g[:-1]) & (i[1:] == i[:-1])
    if dup.any():
        out.append(f"{where}, array 'resp_sample_ids': id {int(i[1:][dup][0])} repeats at response row "
                   f"{int(g[1:][dup][0])}")
    if (counts < 1).any():
        out.append(f"{where}, array 'resp_sample_counts': counts must be >= 1")
    if ctx.draws is not None:
        per = np.bincount(group, weights=counts, minlength=n_resp).astype(np.int64)
        off = per != ctx.draws
        if off.any():
            r = _first(off)
            out.append(f"{where}, array 'resp_sample_counts': {int(off.sum())} of {n_resp} positions do not sum to "
                       f"draws = {ctx.draws} (first: response row {r}, sum {int(per[r])})")
    return out


def _transition_problems(where: str, a: dict, input_ids: np.ndarray, resp_pos: np.ndarray,
                         ctx: _Context) -> list[str]:
    out: list[str] = []
    pos = a["tpa_pos"].astype(np.int64)
    cand = a["tpa_cand"].astype(np.int64)
    clp = a["tpa_cand_logprob"].astype(np.float64)
    if not (len(cand) == len(clp) == len(pos)):
        return [f"{where}, array 'tpa_cand'/'tpa_cand_logprob': {len(cand)}/{len(clp)} rows for {len(pos)} "
                "branch rows"]
    out += _topk_problems(where, "tpa", a["tpa_ids"], a["tpa_logprobs"], pos, ctx.vocab)
    if not len(pos):
        return out
    not_resp = ~np.isin(pos, resp_pos)
    if not_resp.any():
        out.append(f"{where}, array 'tpa_pos': {int(not_resp.sum())} branch rows at non-response positions "
                   f"(first: {int(pos[not_resp][0])})")
        return out  # the gold token and response-row checks below need t in resp_pos
    uniq = np.unique(pos)
    if ctx.max_positions is not None and len(uniq) > ctx.max_positions:
        out.append(f"{where}, array 'tpa_pos': {len(uniq)} positions, more than "
                   f"signals.transitions.max_positions = {ctx.max_positions}")
    per_pos = np.unique(pos, return_counts=True)[1]
    if ctx.max_candidates is not None and (per_pos > ctx.max_candidates).any():
        out.append(f"{where}, array 'tpa_pos': up to {int(per_pos.max())} candidates at one position, more than "
                   f"signals.transitions.candidates = {ctx.max_candidates}")
    pairs = np.unique(np.stack([pos, cand], axis=1), axis=0)
    if len(pairs) != len(pos):
        out.append(f"{where}, array 'tpa_cand': a candidate repeats at one position")
    if ctx.vocab is not None and ((cand < 0) | (cand >= ctx.vocab)).any():
        out.append(f"{where}, array 'tpa_cand': ids outside the vocabulary [0, {ctx.vocab}), e.g. "
                   f"{int(cand[(cand < 0) | (cand >= ctx.vocab)][0])}")
    gold = input_ids[pos + 1]
    same = cand == gold
    if same.any():
        r = _first(same)
        out.append(f"{where}, array 'tpa_cand': {int(same.sum())} candidates equal the gold token input_ids[t+1] "
                   f"(first: branch row {r}, position {int(pos[r])}, token {int(cand[r])})")
    if not np.isfinite(clp).all() or (clp > LOGPROB_TOL).any():
        out.append(f"{where}, array 'tpa_cand_logprob': log-probs must be finite and <= 0")
        return out
    # Consistency with the response distribution at t (same forward, same log-softmax).
    row = np.searchsorted(np.sort(resp_pos), pos)
    row = np.argsort(resp_pos)[row]
    r_ids, r_lps = a["resp_ids"][row].astype(np.int64), a["resp_logprobs"][row].astype(np.float64)
    hit = r_ids == cand[:, None]
    in_topk = hit.any(axis=1)
    ref = np.where(in_topk, np.where(hit, r_lps, 0.0).sum(axis=1), np.nan)
    mismatch = in_topk & (np.abs(clp - ref) > CAND_LOGPROB_TOL)
    lowest = np.where(r_ids >= 0, r_lps, np.inf).min(axis=1)
    above = ~in_topk & (clp > lowest + CAND_LOGPROB_TOL)
    wrong = mismatch | above
    if wrong.any():
        r = _first(wrong)
        out.append(f"{where}, array 'tpa_cand_logprob': {int(wrong.sum())} candidate log-probs disagree with "
                   f"resp_logprobs at the same position (first: branch row {r}, position {int(pos[r])}, "
                   f"{clp[r]:.6g} vs {ref[r] if in_topk[r] else lowest[r]:.6g})")
    return out


# ---------------------------------------------------------------------------------------------- stats


def stats(store_dir: str | Path) -> dict:
    """Counts, sizes and settings of a store, from its manifest and Parquet indexes (no array reads)."""
    store = Path(store_dir)
    reader = StoreReader(store)
    m = reader.manifest
    rows: dict[str, int] = {}
    for e in m["shards"]:
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
    n = int(m["n_samples"])
    sal = m.get("saliency") or {}
    return {
        "store": str(store),
        "samples": n,
        "image_samples": image_samples,
        "text_only_samples": n - image_samples,
        "skipped": int(m.get("n_skipped", 0)),
        "skipped_reasons": dict(m.get("skipped_reasons") or {}),
        "shards": len(m["shards"]),
        "tokens": {
            "total": int(lengths_all.sum()),
            "mean_length": float(lengths_all.mean()) if n else 0.0,
            "max_length": int(lengths_all.max()) if n else 0,
        },
        "response_tokens": rows.get("resp_pos", 0),
        "visual_tokens": visual_tokens,
        "stored_visual_positions": rows.get("vis_pos", 0),
        "transition_rows": rows.get("tpa_pos", 0),
        "sampled_ids": rows.get("resp_sample_ids", 0),
        "signal_bytes": {g: v for g, v in (m.get("signal_bytes") or {}).items() if isinstance(v, dict)},
        "saliency": {"layers": sal.get("layers"), "irs": sal.get("irs")},
        "settings": m.get("signals") or {},
        "teacher": m.get("teacher") or {},
        "tokenizer": m.get("tokenizer") or {},
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
    if "resp_sample_n" in a:
        end = 0
        for r, k in enumerate(a["resp_sample_n"].tolist()):
            response[r]["sampled_ids"] = a["resp_sample_ids"][end:end + k].tolist()
            response[r]["sampled_counts"] = a["resp_sample_counts"][end:end + k].tolist()
            end += k
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
    transitions: list[dict] = []
    if "tpa_pos" in a:
        by_pos: dict[int, dict] = {}
        for r, t in enumerate(a["tpa_pos"].tolist()):
            if t not in by_pos:
                by_pos[t] = {"position": t, "candidates": []}
                transitions.append(by_pos[t])
            by_pos[t]["candidates"].append({
                "id": int(a["tpa_cand"][r]), "logprob": float(a["tpa_cand_logprob"][r]),
                "ids": a["tpa_ids"][r].tolist(), "logprobs": a["tpa_logprobs"][r].tolist(),
            })
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
    tails = [max(0.0, 1.0 - sum(math.exp(x) for x in r["logprobs"] if x > -math.inf)) for r in d["response"]]
    mean_tail = sum(tails) / len(tails) if tails else 0.0
    lines.append(f"  response distributions: {len(d['response'])} (mean tail mass {mean_tail:.4f})")
    lines.append(f"  visual distributions: {len(d['visual'])}")
    lines.append(f"  transitions: {sum(len(t['candidates']) for t in d['transitions'])} branch rows at "
                 f"{len(d['transitions'])} positions")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------- render


def overlay(image, saliency_map: np.ndarray, alpha: float = 0.5, cmap: str = "jet") -> np.ndarray:
    """``image`` (PIL) with ``saliency_map`` [rows, cols] as a heat map: uint8 [H, W, 3].

    The map is scaled to [0, its max], upsampled to the image size (nearest: one visual token is
    one visible cell) and alpha-blended over the image through ``cmap``.
    """
    import matplotlib
    from PIL import Image

    img = np.asarray(image.convert("RGB"), dtype=np.float32) / 255.0
    sm = np.asarray(saliency_map, dtype=np.float32)
    top = float(sm.max()) if sm.size else 0.0
    norm = sm / top if top > 0 else np.zeros_like(sm)
    up = np.asarray(Image.fromarray(norm).resize(image.size, Image.Resampling.NEAREST), dtype=np.float32)
    heat = matplotlib.colormaps[cmap](np.clip(up, 0.0, 1.0))[..., :3]
    return np.clip(((1.0 - alpha) * img + alpha * heat) * 255.0 + 0.5, 0, 255).astype(np.uint8)


def _new_figure(width: float, height: float):
    # The object API with the Agg canvas: no pyplot, no global backend, no display.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _safe_name(sample_id: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", sample_id)[:80]


def _instruction_text(record, j: int) -> str:
    from pipeline.data.records import IMAGE_TAG

    users = [t.text for t in record.turns if t.role == "user"]
    text = users[j].replace(IMAGE_TAG, " ") if j < len(users) else f"turn {j}"
    text = " ".join(text.split())
    return textwrap.fill(textwrap.shorten(text, 90, placeholder="..."), 36)


def _render_saliency(s: StoredSample, record, images: list, path: Path) -> None:
    blocks, turns = s.meta["visual_blocks"], s.meta["turns"]
    n_vis = sum(int(b["length"]) for b in blocks)
    maps = s.arrays["saliency"].astype(np.float32).reshape(len(turns), n_vis)
    off = _block_offsets(blocks)
    nrows, ncols = len(blocks), max(1, len(turns))
    fig = _new_figure(3.2 * ncols, 3.4 * nrows + 0.6)
    for i, b in enumerate(blocks):
        rows, cols = (int(x) for x in b["grid"])
        image = images[int(b["image_index"])]
        for j in range(len(turns)):
            ax = fig.add_subplot(nrows, ncols, i * ncols + j + 1)
            ax.imshow(overlay(image, maps[j, off[i]:off[i + 1]].reshape(rows, cols)))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(_instruction_text(record, j), fontsize=8)
            if j == 0:
                ax.set_ylabel(f"image {b['image_index']} ({rows}x{cols})", fontsize=8)
    fig.suptitle(f"saliency per turn: {s.sample_id}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)


def _render_overlays(store: Path, reader: StoreReader, out: Path, n_samples: int, image_root, data_path) -> list[Path]:
    from pipeline.data import BadRecord, SampleError, read_records

    ds = reader.manifest.get("dataset") or {}
    path = data_path or ds.get("path")
    root = image_root if image_root is not None else ds.get("image_root")
    if not path:
        log.warning("the manifest names no dataset and no data path was given; saliency overlays skipped")
        return []
    in_store = set(reader.sample_ids())
    written: list[Path] = []
    try:
        records = read_records(path, root, ds.get("split", "train"))
        for rec in records:
            if len(written) >= n_samples:
                break
            if isinstance(rec, BadRecord) or rec.sample_id not in in_store or not rec.images:
                continue
            s = _get(store, reader, rec.sample_id)
            if not s.meta["visual_blocks"]:
                continue
            try:
                images, hashes = rec.load()
            except SampleError as e:
                log.warning("sample %r: %s; skipped", rec.sample_id, e)
                continue
            if hashes != list(s.meta["image_hashes"]):
                log.warning("sample %r: its images in %s differ from the ones the store was dumped from "
                            "(image hash mismatch); skipped", rec.sample_id, path)
                continue
            target = out / f"saliency_{len(written):02d}_{_safe_name(rec.sample_id)}.png"
            _render_saliency(s, rec, images, target)
            written.append(target)
    except PipelineError as e:  # DataSourceError: the dataset moved or is unreadable
        log.warning("cannot read the dataset %s (%s); saliency overlays skipped. Pass data_path/image_root.", path, e)
    if not written:
        log.warning("no saliency overlay written (no sample with images found in %s)", path)
    return written


def _render_irs(m: dict, path: Path) -> Path | None:
    sal = m.get("saliency") or {}
    irs, layers = sal.get("irs"), sal.get("layers") or []
    if not irs:
        log.info("no IRS table in the manifest (saliency layers %s were named in the config); IRS plot skipped",
                 layers)
        return None
    xs = sorted(int(k) for k in irs)
    ys = [irs[str(x)] for x in xs]
    fig = _new_figure(6, 3.5)
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(xs, ys, marker="o")
    for layer in layers:
        ax.axvline(layer, color="tab:red", linestyle="--")
        if str(layer) in irs:
            ax.plot([layer], [irs[str(layer)]], marker="*", markersize=14, color="tab:red")
    ax.set_xlabel("layer")
    ax.set_ylabel("IRS = 1 - E cos(α(x1), α(x2))")
    ax.set_title(f"Instruction-Relevance Score per layer (chosen: {layers})")
    fig.tight_layout()
    fig.savefig(path)
    return path


def _render_response_hist(reader: StoreReader, path: Path) -> Path | None:
    chunks: list[np.ndarray] = []
    n = 0
    for shard, size in reader.shard_sizes().items():
        for lo in range(0, size, BLOCK_SAMPLES):
            if n >= MAX_HISTOGRAM_ROWS:
                break
            for s in reader.read_block(shard, lo, min(size, lo + BLOCK_SAMPLES)):
                lp = s.arrays["resp_logprobs"].astype(np.float64)
                chunks.append(np.where(s.arrays["resp_ids"] >= 0, lp, -np.inf))
                n += len(lp)
    if not n:
        log.info("no response positions in the store; histogram skipped")
        return None
    lp = np.concatenate(chunks)[:MAX_HISTOGRAM_ROWS]
    p = np.exp(lp)
    tail = np.clip(-np.expm1(np.log(np.clip(p.sum(axis=1), 1e-300, None))), 0.0, 1.0)
    # Entropy of the (k+1)-bucket coarsening (top-k ids + tail): a lower bound on the full entropy.
    with np.errstate(invalid="ignore", divide="ignore"):
        ent = -np.where(p > 0, p * lp, 0.0).sum(axis=1) - np.where(tail > 0, tail * np.log(tail), 0.0)
    fig = _new_figure(10, 3.5)
    ax = fig.add_subplot(1, 2, 1)
    ax.hist(tail, bins=50)
    ax.set_xlabel("tail mass 1 - Σ top-k p_T")
    ax.set_ylabel("response positions")
    ax = fig.add_subplot(1, 2, 2)
    ax.hist(ent, bins=50)
    ax.set_xlabel("entropy of top-k + tail (nats, lower bound)")
    fig.suptitle(f"teacher response distributions ({len(lp)} positions)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path)
    return path


def render(store_dir: str | Path, out_dir: str | Path, n_samples: int = 4, image_root: str | Path | None = None,
           data_path: str | Path | None = None) -> list[Path]:
    """Write PNGs to ``out_dir``; return their paths.

    - ``saliency_NN_<id>.png`` for up to ``n_samples`` samples with images: one panel per (image,
      turn), the turn's map overlaid on the image, the instruction text as the title. Images come
      from the dataset named in the manifest (or ``data_path`` / ``image_root``), matched by sample
      id; a sample whose image hashes differ from the stored ones is skipped with a warning.
    - ``irs.png``: IRS per layer, chosen layer marked (skipped, with a note, when layers were named).
    - ``response_distributions.png``: histograms of tail mass and top-k entropy at response positions.
    """
    store = Path(store_dir)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    reader = StoreReader(store)
    written = _render_overlays(store, reader, out, n_samples, image_root, data_path) if n_samples > 0 else []
    for p in (_render_irs(reader.manifest, out / "irs.png"),
              _render_response_hist(reader, out / "response_distributions.png")):
        if p is not None:
            written.append(p)
    return written


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
    print(f"OK: {m['n_samples']} samples in {len(m['shards'])} shards")
    return 0


def main_inspect(store: str, sample: str | None, as_json: bool, out: str | None, n: int, image_root: str | None,
                 data: str | None) -> int:
    """``pipeline inspect STORE [--sample ID] [--json] [--out DIR -n N --image-root DIR --data PATH]``.

    Without ``--sample``: the stats table (``--json``: the stats dict). With it: the sample summary
    (``--json``: :func:`sample_json`). With ``--out``: also render PNGs and list them. Bad input
    (unknown sample, broken store) raises PipelineError / StoreFormatError for the CLI to report.
    """
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
