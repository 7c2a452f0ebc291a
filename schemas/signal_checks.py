"""The semantic checks of a teacher store's signals: what every stored sample must mean (DESIGN.md §3).

- :func:`verify` = :func:`schemas.verify.verify_store` (structure: versions, checksums, offsets) +
  :func:`verify_signals` (meaning: every sample's signals obey DESIGN.md §3; see ``SIGNAL_CHECKS``).

They check the layout of :mod:`schemas.signals` as read back by :class:`schemas.reader.StoreReader`;
the tolerances below say how far float32 / float16 rounding may move a stored number.
``pipeline verify STORE`` prints their result.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from schemas.errors import StoreFormatError
from schemas.layout import StoredSample
from schemas.manifest import Manifest
from schemas.reader import StoreReader
from schemas.signals import SAMPLED_ROWS, sampled_arrays, turn_sees_image
from schemas.verify import verify_store

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

SIGNAL_CHECKS = """\
meta: length == len(input_ids); visual blocks inside [0, length), grid rows*cols == length, no overlap;
  turn positions inside [0, length) (response positions t need x_{t+1}: inside [0, length-1))
resp_pos: unique, equal to the union of the turns' response positions
resp_ids/resp_logprobs, vis_ids/vis_logprobs, tpa_ids/tpa_logprobs: one row per position; log-probs
  finite and <= 0, each row sorted descending, sum(exp) <= 1 (tail mass >= 0); ids in
  [0, tokenizer.size) and unique within a row (-1 is padding, only at a row's end)
saliency: n_turns * |V| values (0 for text-only samples), finite, >= 0, each turn's map sums to 1;
  a turn that cannot see a visual token (its instructions all before the image) has no map: all zeros
vis_pos: unique, inside the visual blocks; vis_weight = turn-mean saliency there (over the turns
  that have a map), one per position; none when no turn has a map
resp_sample_*, vis_sample_*, tpa_sample_*: one <x>_sample_n per response position / stored visual
  position / branch row, ids in the vocabulary and unique per row, counts >= 1 and summing to
  signals.sampled.draws per row
tpa_*: positions among resp_pos, at most signals.transitions.max_positions of them, at most
  .candidates candidates each, unique; candidate != gold token input_ids[t+1], in the vocabulary;
  tpa_cand_logprob = the candidate's log-prob in resp_logprobs at t (or below that row's top-k),
  within the codec's log-prob error on a compact store
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

    def __init__(self, vocab, draws, max_candidates, max_positions, cand_tol=CAND_LOGPROB_TOL):
        self.vocab: int | None = vocab
        # tpa_cand_logprob is exact; resp_logprobs as decoded (a compact store quantises them)
        self.cand_tol: float = cand_tol
        self.draws: int | None = draws
        self.max_candidates: int | None = max_candidates
        self.max_positions: int | None = max_positions

    @classmethod
    def from_manifest(cls, m: Manifest, problems: list[str]) -> "_Context":
        def get(path: str):
            return m.optional(*path.split("."))

        vocab = get("tokenizer.size")
        if not isinstance(vocab, int):
            problems.append(f"manifest: no integer tokenizer.size (found {vocab!r}); token ids not range-checked")
            vocab = None
        draws = None
        if any(sampled_arrays(prefix)[0] in m.decoded_arrays for prefix in SAMPLED_ROWS.values()):
            draws = get("signals.sampled.draws")
            if not isinstance(draws, int):
                problems.append(f"manifest: the store has sampled targets but no integer signals.sampled.draws "
                                f"(found {draws!r}); counts not checked against it")
                draws = None
        cands = positions = None
        if "tpa_pos" in m.decoded_arrays:
            cands, positions = get("signals.transitions.candidates"), get("signals.transitions.max_positions")
            cands = cands if isinstance(cands, int) else None
            positions = positions if isinstance(positions, int) else None
        cand_tol = CAND_LOGPROB_TOL + m.codecs.logprob_error("resp_logprobs")
        return cls(vocab, draws, cands, positions, cand_tol)


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
        # A turn none of whose instruction tokens comes after a visual token cannot see the image:
        # it has no map (an all-zero row, never a uniform one); every other turn's map sums to 1.
        sees = np.array([turn_sees_image(t["instruction"], blocks) for t in turns], dtype=bool)
        off = sees & (np.abs(sums - 1.0) > SALIENCY_SUM_TOL)
        if off.any():
            j = _first(off)
            bad("saliency", f"{int(off.sum())} of {n_turns} turn maps do not sum to 1 within {SALIENCY_SUM_TOL} "
                            f"(first: turn {j}, sum {sums[j]:.4g})")
        stray = ~sees & (sums != 0)
        if stray.any():
            j = _first(stray)
            bad("saliency", f"turn {j} cannot see any visual token but has a map (sum {sums[j]:.4g}); "
                            "a turn without information must have no map (all zeros)")
        smap = smap[sees]

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
    elif smap is not None and len(smap) == 0 and len(vis_pos):
        bad("vis_pos", f"{len(vis_pos)} stored visual positions but no turn has a saliency map to choose them by")
    elif smap is not None and len(smap) and not outside.any():
        col = np.searchsorted(np.sort(vis_all), vis_pos)
        col = np.argsort(vis_all)[col]
        mean = smap.mean(axis=0)[col]  # over the turns that have a map
        off = ~np.isclose(w, mean, rtol=VIS_WEIGHT_RTOL, atol=VIS_WEIGHT_ATOL)
        if off.any():
            i = _first(off)
            bad("vis_weight", f"{int(off.sum())} weights differ from the turn-mean saliency (first: position "
                              f"{int(vis_pos[i])}, {float(w[i]):.4g} vs {float(mean[i]):.4g})")
    out += _topk_problems(where, "vis", a["vis_ids"], a["vis_logprobs"], vis_pos, ctx.vocab)

    # -- transitions
    if "tpa_pos" in a:
        out += _transition_problems(where, a, ids, resp_pos, ctx)

    # -- sampled targets: one per response position, stored visual position, branch row
    rows_of = {"resp": (len(resp_pos), "response"), "vis": (len(vis_pos), "visual"),
               "tpa": (len(a["tpa_pos"]) if "tpa_pos" in a else 0, "branch")}
    for prefix in SAMPLED_ROWS.values():
        if sampled_arrays(prefix)[0] in a:
            out += _sampled_problems(where, a, prefix, *rows_of[prefix], ctx)
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


def _sampled_problems(where: str, a: dict, prefix: str, n_rows: int, kind: str, ctx: _Context) -> list[str]:
    """Checks of one row kind's sampled target (``<prefix>_sample_n/_ids/_counts``), ``n_rows`` rows
    of that ``kind`` (response, visual, branch)."""
    out: list[str] = []
    n_name, ids_name, counts_name = sampled_arrays(prefix)
    n = a[n_name].astype(np.int64)
    sids, counts = a[ids_name].astype(np.int64), a[counts_name].astype(np.int64)
    if len(n) != n_rows:
        return [f"{where}, array {n_name!r}: {len(n)} rows for {n_rows} {kind} rows"]
    if (n < 0).any() or int(n.sum()) != len(sids) or len(sids) != len(counts):
        return [f"{where}, array {n_name!r}: counts per row sum to {int(n.sum())}, but {ids_name} "
                f"has {len(sids)} rows and {counts_name} {len(counts)}"]
    group = np.repeat(np.arange(n_rows), n)
    if ctx.vocab is not None and ((sids < 0) | (sids >= ctx.vocab)).any():
        out.append(f"{where}, array {ids_name!r}: ids outside the vocabulary [0, {ctx.vocab}), e.g. "
                   f"{int(sids[(sids < 0) | (sids >= ctx.vocab)][0])}")
    order = np.lexsort((sids, group))
    g, i = group[order], sids[order]
    dup = (g[1:] == g[:-1]) & (i[1:] == i[:-1])
    if dup.any():
        out.append(f"{where}, array {ids_name!r}: id {int(i[1:][dup][0])} repeats at {kind} row "
                   f"{int(g[1:][dup][0])}")
    if (counts < 1).any():
        out.append(f"{where}, array {counts_name!r}: counts must be >= 1")
    if ctx.draws is not None:
        per = np.bincount(group, weights=counts, minlength=n_rows).astype(np.int64)
        off = per != ctx.draws
        if off.any():
            r = _first(off)
            out.append(f"{where}, array {counts_name!r}: {int(off.sum())} of {n_rows} {kind} rows do not sum to "
                       f"draws = {ctx.draws} (first: {kind} row {r}, sum {int(per[r])})")
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
    mismatch = in_topk & (np.abs(clp - ref) > ctx.cand_tol)
    lowest = np.where(r_ids >= 0, r_lps, np.inf).min(axis=1)
    above = ~in_topk & (clp > lowest + ctx.cand_tol)
    wrong = mismatch | above
    if wrong.any():
        r = _first(wrong)
        out.append(f"{where}, array 'tpa_cand_logprob': {int(wrong.sum())} candidate log-probs disagree with "
                   f"resp_logprobs at the same position (first: branch row {r}, position {int(pos[r])}, "
                   f"{clp[r]:.6g} vs {ref[r] if in_topk[r] else lowest[r]:.6g})")
    return out
