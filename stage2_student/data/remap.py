"""Teacher positions -> student positions: one sample's teacher signals on the student's sequence.

:func:`remap` moves one sample's teacher signals onto the student's own encoding of the same
conversation, through the segment spans (text tokens one-to-one, image blocks block to block, any
student grid mapped by overlap area; see ``[geometry note]``), giving its :class:`StudentTargets`.

[geometry note] A student image block of grid ``(r, c)`` covers the same picture as the teacher's
block of grid ``(R, C)``. On each axis, student cell ``i`` spans ``[i·R/r, (i+1)·R/r)`` in teacher-cell
units, so it overlaps teacher cell ``a`` over a length ``A[i, a]`` (``_axis_overlap``; every teacher
cell's length 1 is shared out among the student cells, so each column of ``A`` sums to 1); the area
of teacher cell ``(a, b)`` inside student cell ``(i, j)`` is ``W = A_r[i, a] · A_c[j, b]``.

* saliency: ``s'_j[i, j'] = Σ_{a,b} W · s_j[a, b]``, so each turn's map keeps its total (1). Integer
  pooling (``R = fr·r``, ``C = fc·c``) is the special case ``W ∈ {0, 1}``: the area sum over
  ``fr × fc`` cells (27×27 → 13×13, the paper's 729 → 169, is not integer and shares the boundary
  cells between neighbours).
* visual-position distributions, stored only at the teacher's most salient cells: a student cell's
  target is the overlap-weighted mixture of the stored teacher cells ``S`` it overlaps,
  ``q(id) = Σ_{v∈S} W_v p_v(id) / Σ_{v∈S} W_v``, with ``p_v(id) = 0`` when ``id`` is not in cell
  ``v``'s top-k (its mass stays in ``v``'s tail, hence in ``q``'s tail ``1 − Σ q``); the ``k`` most
  probable ids of the union are kept (the rest joins the tail). Its weight is ``Σ_{v∈S} W_v w_v``
  (``w_v`` = the stored turn-mean saliency): the area-weighted saliency restricted to stored cells.
  For integer pooling ``W_v = 1``: the plain mean of the covered stored cells, weight their sum.
* sampled visual targets (``signals.sampled.rows`` with ``visual``): the same cells, positions and
  weights; a student cell's counts are the overlap-weighted mean ``Σ_{v∈S} W_v c_v(id) / Σ_{v∈S} W_v``
  over the union of the cells' drawn ids (every id kept). Every stored row has ``draws`` draws, so
  the counts still sum to ``draws`` and ``counts / draws`` is unbiased for the mixture ``q`` above
  (with its zero-filled tails: a drawn id is any id, not only a top-k one). Equal grids copy them.
  What is approximated (docs/geometry.md): the teacher never saw the student's cell, so the mixture of
  its per-cell predictions stands in for ``p_T`` there; a teacher cell that was not stored (outside
  the top fraction ρ) contributes neither to ``q`` nor to the weight, so ``q`` is the mixture over the
  stored part of the cell only, and a student cell that overlaps no stored cell has no target; the
  zero-fill biases ids that are in some cells' top-k but not others' down by at most the other
  cells' tail mass, and no mass is invented (``Σ q ≤ 1``). Equal grids are the identity (stored
  values copied, not recomputed).

Tiled layouts (several blocks per image: anyres crops, image splits) map block to block, tile by
tile, when both sides tile alike (the same number of blocks per image); otherwise the sample is
refused, naming both layouts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from pipeline.data import EncodedSample
from schemas import StoreFormatError
from schemas.signals import SampleSignals
from schemas.errors import IncompatibleStudentError
from stage2_student.losses import PAD_ID


@dataclass
class StudentTargets:
    """One sample's teacher signals on the student's sequence (positions index the student's tokens).

    Row counts: R response positions, P stored visual rows, J turns, V student visual positions,
    M branch rows (one per (t, c)). Ids are padded with -1 (log-probs -inf) where a pooled cell's
    union has fewer than k ids.
    """

    sample_id: str
    labels: np.ndarray  # int64 [T]: the student's labels (token at t, IGNORE_INDEX outside answers)
    resp_pos: np.ndarray  # int64 [R]
    resp_ids: np.ndarray  # int64 [R, k]
    resp_logprobs: np.ndarray  # float32 [R, k]
    vis_pos: np.ndarray  # int64 [P]
    vis_weight: np.ndarray  # float32 [P]
    vis_ids: np.ndarray  # int64 [P, k]
    vis_logprobs: np.ndarray  # float32 [P, k]
    saliency: np.ndarray  # float32 [J, V]: s_j over the student's visual positions (V = 0: text only)
    sample_ids: np.ndarray | None = None  # int64 [R, m], -1 padded     (sampled target)
    sample_counts: np.ndarray | None = None  # int64 [R, m], 0 padded
    vis_sample_ids: np.ndarray | None = None  # int64 [P, m], -1 padded (sampled target of the visual rows)
    vis_sample_counts: np.ndarray | None = None  # float32 [P, m], 0 padded; fractional on a pooled cell
    tpa_pos: np.ndarray | None = None  # int64 [M]                     (transitions)
    tpa_cand: np.ndarray | None = None  # int64 [M]
    tpa_cand_logprob: np.ndarray | None = None  # float32 [M]
    tpa_ids: np.ndarray | None = None  # int64 [M, k']
    tpa_logprobs: np.ndarray | None = None  # float32 [M, k']
    tpa_sample_ids: np.ndarray | None = None  # int64 [M, m], -1 padded (sampled target of the branch rows)
    tpa_sample_counts: np.ndarray | None = None  # int64 [M, m], 0 padded


def _segments(ids: np.ndarray, blocks: list[tuple[int, int]]) -> list[np.ndarray]:
    """Positions of the text runs around the visual blocks ``[(start, length), ...]`` (len(blocks) + 1)."""
    out, cursor = [], 0
    for start, length in blocks:
        out.append(np.arange(cursor, start))
        cursor = start + length
    out.append(np.arange(cursor, len(ids)))
    return out


def _equal(a: np.ndarray, b: np.ndarray) -> bool:
    """Same shape and values (``np.array_equal`` without its overhead, for 1-D int arrays)."""
    return a.shape == b.shape and bool((a == b).all())


def _text_mask(n: int, blocks: list[tuple[int, int]]) -> np.ndarray:
    """bool [n]: True at the positions of a sequence of ``n`` tokens outside the visual blocks."""
    text = np.ones(n, dtype=bool)
    for start, length in blocks:
        text[start : start + length] = False
    return text


def _text_mismatch(where: str, t_ids, s_ids, t_blocks, s_blocks) -> IncompatibleStudentError:
    """The error for text that differs: the first text segment and token where it does."""
    for j, (tp, sp) in enumerate(zip(_segments(t_ids, t_blocks), _segments(s_ids, s_blocks))):
        a, b = t_ids[tp], s_ids[sp]
        if len(a) != len(b) or not np.array_equal(a, b):
            n = min(len(a), len(b))
            diff = np.flatnonzero(a[:n] != b[:n])
            at = int(diff[0]) if len(diff) else n
            seen = (f"teacher token {int(a[at]) if at < len(a) else 'end'} vs student token "
                    f"{int(b[at]) if at < len(b) else 'end'}")
            return IncompatibleStudentError(
                f"{where}: the text tokens differ between the teacher's sequence and the student's "
                f"(text segment {j}, token {at}: {seen}); the tokenizer or chat template differs"
            )
    raise AssertionError(f"{where}: _text_mismatch called on equal text")


def _axis_overlap(n_teacher: int, n_student: int) -> np.ndarray:
    """float64 [n_student, n_teacher]: the length of teacher cell ``a`` inside student cell ``i`` on
    one axis, in teacher-cell units ([geometry note]); each column sums to 1. Computed on integers
    (coordinates times ``n_student``), so integer pooling gives exact zeros and ones."""
    t_lo = np.arange(n_teacher) * n_student  # teacher cell a: [a·s, (a+1)·s)
    s_lo = np.arange(n_student) * n_teacher  # student cell i: [i·t, (i+1)·t)
    lo = np.maximum(s_lo[:, None], t_lo[None, :])
    hi = np.minimum(s_lo[:, None] + n_teacher, t_lo[None, :] + n_student)
    return np.clip(hi - lo, 0, None) / n_student


def _resample_sum(x: np.ndarray, teacher: tuple[int, int], student: tuple[int, int]) -> np.ndarray:
    """[..., R*C] row-major cells -> [..., r*c]: each student cell sums the teacher cells it overlaps,
    weighted by the overlap area (mass preserving; an area sum for integer pooling)."""
    (R, C), (r, c) = teacher, student
    lead = x.shape[:-1]
    grid = x.astype(np.float64).reshape(-1, R, C)
    y = np.einsum("ia,nab,jb->nij", _axis_overlap(R, r), grid, _axis_overlap(C, c))
    return y.reshape(*lead, r * c).astype(np.float32)


def _union_mean(ids: np.ndarray, logprobs: np.ndarray, k: int,
                weights: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of n sparse distributions (rows of ids/logprobs [n, k]) over the union of their ids.

    ``weights`` [n] (default: equal): each row's share, normalised to sum to 1. A row's missing id
    counts as 0; the k most probable ids are kept (ties: smaller id first), padded with -1 / -inf.
    See [geometry note].
    """
    n = ids.shape[0]
    flat_ids, flat_lp = ids.reshape(-1), logprobs.reshape(-1).astype(np.float64)
    row_w = np.ones(n) if weights is None else np.asarray(weights, dtype=np.float64)
    flat_w = np.repeat(row_w, ids.shape[1])
    valid = flat_ids >= 0
    uniq, inverse = np.unique(flat_ids[valid], return_inverse=True)
    mass = np.bincount(inverse, weights=np.exp(flat_lp[valid]) * flat_w[valid], minlength=len(uniq)) / row_w.sum()
    keep = np.lexsort((uniq, -mass))[:k]
    out_ids = np.full(k, PAD_ID, dtype=np.int64)
    out_lp = np.full(k, -np.inf, dtype=np.float32)
    out_ids[: len(keep)] = uniq[keep]
    with np.errstate(divide="ignore"):
        out_lp[: len(keep)] = np.log(mass[keep])
    return out_ids, out_lp


def _sampled_union(ids: np.ndarray, counts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of n sampled targets (rows of unique ids / counts [n, m], -1 / 0 padded) over the
    union of their ids: (ids [u] ascending, float64 counts [u]); a row's missing id counts 0.
    ``weights`` [n] (the overlap areas) need not sum to 1. See [geometry note]."""
    valid = (ids >= 0) & (counts > 0)
    flat_w = np.broadcast_to(np.asarray(weights, np.float64)[:, None], ids.shape)[valid]
    uniq, inverse = np.unique(ids[valid], return_inverse=True)
    mean = np.bincount(inverse, weights=counts[valid] * flat_w, minlength=len(uniq)) / np.sum(weights)
    return uniq, mean


def _pad_sampled(rows: list[tuple[np.ndarray, np.ndarray]]) -> tuple[np.ndarray, np.ndarray]:
    """Rows of (ids [u_i], counts [u_i]) as (ids [n, max u] -1 padded, float32 counts 0 padded)."""
    width = max((len(i) for i, _ in rows), default=0)
    ids = np.full((len(rows), width), PAD_ID, dtype=np.int64)
    counts = np.zeros((len(rows), width), dtype=np.float32)
    for r, (i, c) in enumerate(rows):
        ids[r, : len(i)], counts[r, : len(c)] = i, c
    return ids, counts


def _remap_visual(teacher: SampleSignals, geometry: list, n_turns: int, k: int, where: str):
    """Visual signals block to block (equal grids copied, other grids by overlap area, [geometry note]):
    saliency [J, V_student], and the stored rows' positions, weights, ids and log-probs, and their
    sampled targets' ids and counts (None when the store has none)."""
    sampled = teacher.vis_sample_ids is not None
    sal_parts, vis_rows = [], []  # per block: saliency [J, r*c]; (pos, weight, ids, logprobs)
    sampled_rows: list[tuple[np.ndarray, np.ndarray]] = []  # per student row: (ids [u], counts [u])
    t_offset = covered = 0
    for t_start, t_len, (R, C), (r, c), s_start in geometry:
        block_sal = teacher.saliency[:, t_offset : t_offset + t_len]
        t_offset += t_len
        in_block = (teacher.vis_pos >= t_start) & (teacher.vis_pos < t_start + t_len)
        rows = np.flatnonzero(in_block)
        covered += len(rows)
        cells = teacher.vis_pos[rows] - t_start
        if (R, C) == (r, c):  # identity: copy the stored values
            sal_parts.append(block_sal.astype(np.float32))
            vis_rows.append((s_start + cells, teacher.vis_weight[rows], teacher.vis_ids[rows], teacher.vis_logprobs[rows]))
            if sampled:
                sampled_rows += [(i[c > 0], c[c > 0]) for i, c in zip(teacher.vis_sample_ids[rows], teacher.vis_sample_counts[rows])]
            continue
        sal_parts.append(_resample_sum(block_sal, (R, C), (r, c)))
        # Every (student cell, stored teacher row) pair that overlaps, with its overlap area.
        a_r, a_c = _axis_overlap(R, r), _axis_overlap(C, c)
        target, member, area = [], [], []
        for row, cell in zip(rows.tolist(), cells.tolist()):
            for i in np.flatnonzero(a_r[:, cell // C]).tolist():
                for j in np.flatnonzero(a_c[:, cell % C]).tolist():
                    target.append(i * c + j)
                    member.append(row)
                    area.append(a_r[i, cell // C] * a_c[j, cell % C])
        target, member, area = np.asarray(target, np.int64), np.asarray(member, np.int64), np.asarray(area)
        cell_ids, group = np.unique(target, return_inverse=True)
        ids = np.empty((len(cell_ids), k), dtype=np.int64)
        lps = np.empty((len(cell_ids), k), dtype=np.float32)
        weights = np.zeros(len(cell_ids), dtype=np.float64)
        for g in range(len(cell_ids)):
            pick = group == g
            members, w = member[pick], area[pick]
            ids[g], lps[g] = _union_mean(teacher.vis_ids[members], teacher.vis_logprobs[members], k, w)
            weights[g] = (w * teacher.vis_weight[members].astype(np.float64)).sum()
            if sampled:
                sampled_rows.append(_sampled_union(teacher.vis_sample_ids[members], teacher.vis_sample_counts[members], w))
        vis_rows.append((s_start + cell_ids, weights.astype(np.float32), ids, lps))
    if covered != len(teacher.vis_pos):
        raise StoreFormatError(f"{where}: a stored visual position lies outside every image block")
    saliency = np.concatenate(sal_parts, axis=1) if sal_parts else np.zeros((n_turns, 0), np.float32)
    sampled_out = _pad_sampled(sampled_rows) if sampled else (None, None)
    if len(vis_rows) == 1:
        return (saliency, *vis_rows[0], *sampled_out)
    if vis_rows:
        return (saliency, *(np.concatenate(x) for x in zip(*vis_rows)), *sampled_out)
    return (saliency, np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, k), np.int64),
            np.zeros((0, k), np.float32), *sampled_out)


def _layout(blocks) -> str:
    """An image layout for messages: per image, its blocks' grids ("image 0: 4x4 + 2x2; image 1: 4x4")."""
    per_image: dict[int, list[str]] = {}
    for index, grid in blocks:
        per_image.setdefault(int(index), []).append("x".join(str(int(g)) for g in grid))
    return "; ".join(f"image {i}: {' + '.join(g)}" for i, g in per_image.items()) or "no image"


def remap(teacher: SampleSignals, student: EncodedSample) -> StudentTargets:
    """The teacher's signals of one sample, moved onto the student's encoding of it.

    Every non-visual token must be equal and in the same order in both sequences; image blocks
    correspond in order. Response and branch positions are text and map one-to-one; visual
    signals map block to block: equal grids are copied, any other student grid takes the teacher
    cells it overlaps, weighted by overlap area ([geometry note]); a different tiling raises
    IncompatibleStudentError naming both layouts and the sample.
    """
    sid = teacher.sample_id
    where = f"sample {sid!r}"
    t_blocks = [(int(b["start"]), int(b["length"])) for b in teacher.visual_blocks]
    s_blocks = [(b.start, b.length) for b in student.visual_blocks]
    t_tiles = [int(b["image_index"]) for b in teacher.visual_blocks]
    s_tiles = [int(b.image_index) for b in student.visual_blocks]
    if t_tiles != s_tiles:  # tiled layouts map tile by tile only when both sides tile alike
        t_layout = _layout((b["image_index"], b["grid"]) for b in teacher.visual_blocks)
        s_layout = _layout((b.image_index, b.grid) for b in student.visual_blocks)
        raise IncompatibleStudentError(
            f"{where}: the teacher's sequence has {len(t_blocks)} image block(s) ({t_layout}), the student's "
            f"{len(s_blocks)} ({s_layout}); a store maps onto a student block by block, tile by tile, so both "
            "must tile each image alike (the processor or chat template differs)"
        )

    # Text: the tokens outside the image blocks, equal and in the same order in both sequences.
    t_ids, s_ids = np.asarray(teacher.input_ids), np.asarray(student.input_ids)
    t_text = _text_mask(len(t_ids), t_blocks)
    if t_blocks == s_blocks and _equal(t_ids, s_ids):  # same layout (equal grids): identity
        pos_map = np.where(t_text, np.arange(len(t_ids)), -1)
    else:
        tp, sp = np.flatnonzero(t_text), np.flatnonzero(_text_mask(len(s_ids), s_blocks))
        if not _equal(t_ids[tp], s_ids[sp]):
            raise _text_mismatch(where, t_ids, s_ids, t_blocks, s_blocks)
        pos_map = np.full(len(t_ids), -1, dtype=np.int64)  # teacher text position -> student position
        pos_map[tp] = sp

    def text_positions(pos: np.ndarray, what: str) -> np.ndarray:
        pos = np.asarray(pos, dtype=np.int64)
        if len(pos) and (pos.min() < 0 or pos.max() >= len(t_ids)):
            raise StoreFormatError(f"{where}: stored {what} position outside the sequence of {len(t_ids)} tokens")
        out = pos_map[pos]
        if (out < 0).any():
            bad = int(pos[np.flatnonzero(out < 0)[0]])
            raise StoreFormatError(f"{where}: stored {what} position {bad} is a visual token, expected text")
        return out

    resp_pos = text_positions(teacher.resp_pos, "response")
    if not _equal(resp_pos, student.response_positions):
        raise IncompatibleStudentError(
            f"{where}: the teacher's response positions do not map onto the student's "
            f"({len(resp_pos)} vs {len(student.response_positions)} positions); the chat template differs"
        )

    # Visual: block to block.
    n_turns = len(student.turns)
    if t_blocks and teacher.saliency.shape[0] != n_turns:
        raise IncompatibleStudentError(
            f"{where}: the store has saliency maps for {teacher.saliency.shape[0]} turn(s), the student's "
            f"encoding has {n_turns}; the chat template differs"
        )
    k = teacher.vis_ids.shape[1]
    geometry = []  # per block: (teacher start, length, teacher grid, student grid, student start)
    for b, (tb, sb) in enumerate(zip(teacher.visual_blocks, student.visual_blocks)):
        (R, C), (r, c) = tuple(int(x) for x in tb["grid"]), tuple(int(x) for x in sb.grid)
        t_start, t_len = int(tb["start"]), int(tb["length"])
        if R * C != t_len:
            raise StoreFormatError(f"{where}: visual block {b}: grid {R}x{C} but {t_len} visual tokens")
        if r * c != sb.length:
            raise IncompatibleStudentError(f"{where}: visual block {b}: the student's grid {r}x{c} but {sb.length} visual tokens")
        geometry.append((t_start, t_len, (R, C), (r, c), sb.start))
    vis_pos = teacher.vis_pos
    if (all(tg == sg and ts == ss for ts, _, tg, sg, ss in geometry)
            and (len(vis_pos) < 2 or (vis_pos[1:] >= vis_pos[:-1]).all())):
        # Every image where it was, with the teacher's grid (the stored rows are in position
        # order, as Stage 1 writes them): the block-by-block identity below, in one step.
        if len(vis_pos) and (vis_pos[0] < 0 or vis_pos[-1] >= len(t_ids) or t_text[vis_pos].any()):
            raise StoreFormatError(f"{where}: a stored visual position lies outside every image block")
        saliency = teacher.saliency.astype(np.float32) if t_blocks else np.zeros((n_turns, 0), np.float32)
        vis_weight, vis_ids, vis_lp = teacher.vis_weight, teacher.vis_ids, teacher.vis_logprobs
        vis_sample_ids, vis_sample_counts = teacher.vis_sample_ids, teacher.vis_sample_counts
    else:
        saliency, vis_pos, vis_weight, vis_ids, vis_lp, vis_sample_ids, vis_sample_counts = _remap_visual(
            teacher, geometry, n_turns, k, where)

    return StudentTargets(
        sample_id=sid,
        labels=np.asarray(student.labels, dtype=np.int64),
        resp_pos=resp_pos,
        resp_ids=np.asarray(teacher.resp_ids, dtype=np.int64),
        resp_logprobs=np.asarray(teacher.resp_logprobs, dtype=np.float32),
        vis_pos=vis_pos.astype(np.int64, copy=False),
        vis_weight=vis_weight.astype(np.float32, copy=False),
        vis_ids=vis_ids.astype(np.int64, copy=False),
        vis_logprobs=vis_lp.astype(np.float32, copy=False),
        saliency=saliency,
        sample_ids=teacher.sample_ids,
        sample_counts=teacher.sample_counts,
        tpa_pos=None if teacher.tpa_pos is None else text_positions(teacher.tpa_pos, "branch"),
        tpa_cand=teacher.tpa_cand,
        tpa_cand_logprob=None if teacher.tpa_cand_logprob is None else np.asarray(teacher.tpa_cand_logprob, np.float32),
        tpa_ids=teacher.tpa_ids,
        tpa_logprobs=None if teacher.tpa_logprobs is None else np.asarray(teacher.tpa_logprobs, np.float32),
        vis_sample_ids=vis_sample_ids,
        vis_sample_counts=None if vis_sample_counts is None else np.asarray(vis_sample_counts, np.float32),
        tpa_sample_ids=teacher.tpa_sample_ids,
        tpa_sample_counts=teacher.tpa_sample_counts,
    )
