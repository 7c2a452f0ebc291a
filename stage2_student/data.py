"""Store + images -> student batches (DESIGN.md §2, §3, §4, §5.1, §6).

Three pieces, top to bottom:

1. :func:`remap` moves one sample's teacher signals onto the student's own encoding of the same
   conversation, through the segment spans (text tokens one-to-one, image blocks block to block,
   integer pooling of the visual grid allowed; see ``[pooling note]``).
2. :func:`epoch_order` / :func:`epoch_samples`: the data order, a pure function of
   (seed, epoch, shard sizes, block size, window), so resume state is (epoch, batch index).
3. :class:`StoreDataset`: reads blocks of consecutive samples (one read per array, through the
   reader's cache of decoded chunks), builds each sample's student encoding from the teacher's
   stored ids (``stage2_student.reencode``: only the image blocks are re-expanded, images are
   preprocessed once per process), remaps, and yields :class:`StudentBatch` es whose flat target
   rows are ready for ``stage2_student.losses``.

[order note] The order of one epoch, exactly:

* Blocks: shards are taken in sorted name order and cut into blocks of ``block_size`` consecutive
  samples, ``[0, b), [b, 2b), ...`` (a shard's last block may be shorter). The blocks are sorted by
  ``sha256("block/{seed}/{epoch}/{shard}/{start}")`` (:func:`epoch_order`): a seeded random
  permutation that depends on nothing else (no library RNG stream, no worker count).
* Windows: consecutive runs of ``window_blocks`` blocks of that order (the last may be shorter).
  The samples of one window are sorted by ``sha256("sample/{seed}/{epoch}/{shard}/{index}")``
  (:func:`epoch_samples`). So a batch mixes samples of up to ``window_blocks`` shards, yet a window
  is read as ``window_blocks`` sequential block reads (cf. mosaicml streaming's block-wise shuffle).
* Length groups (optional, ``length_group`` = g >= 2 batches): the sequence is cut into runs of
  ``g * batch_size`` samples from the epoch's start, and each run is stably sorted by (window,
  longest teacher sequence first), the length being the store index's ``length`` column
  (:func:`epoch_samples`). Windows keep their order, so the reading pattern is unchanged; the
  samples of one batch have similar lengths and their right padding shrinks (LLaVA-style
  length grouping, within a run of g batches rather than the whole epoch).
* Batches: consecutive runs of ``batch_size`` samples of that sequence, numbered 0, 1, ... (the
  last is shorter unless ``drop_last``). A batch may straddle two windows, never two length groups.
* Who yields what: with ``world_size`` ranks, global batch ``i`` belongs to rank ``i % world_size``.
  Resuming at ``(epoch, b)`` skips the first ``b`` batches of the rank; the rest go round-robin to
  its DataLoader workers (the first to worker 0). The DataLoader collects from its workers
  round-robin, so a rank sees its batches in increasing order whatever ``num_workers`` is, and
  ``(epoch, b)`` alone resumes it.

A worker reads (and keeps until its batches leave that window) only the blocks that hold samples
of its own batches; with N workers a block may be read by up to N of them (each worker decodes a
store chunk once while it stays in its cache). With ``repeat`` the epochs follow one another in
one stream: this rank's batches from ``start`` on, epoch after epoch, dealt round-robin to the
workers as one sequence (so an epoch need not start at worker 0), which is how the DataLoader
collects them; ``(epoch, b)`` still resumes it.

[pooling note] When the student's grid ``(r, c)`` is the teacher's ``(R, C)`` pooled by integer
factors ``fr = R / r``, ``fc = C / c``, student cell ``(i, j)`` covers teacher cells
``(i*fr .. i*fr+fr-1, j*fc .. j*fc+fc-1)``:

* saliency: area sum over the covered cells, so each turn's map keeps its total (1);
* visual-position distributions, stored only at the teacher's most salient cells: the student
  cell's target is the mean over the stored covered cells ``S`` of their top-k distributions,
  ``q(id) = (1/|S|) Σ_{v∈S} p_v(id)``, with ``p_v(id) = 0`` when ``id`` is not in cell ``v``'s
  top-k (its mass stays in ``v``'s tail, hence in ``q``'s tail ``1 − Σ q``); the ``k`` most
  probable ids of the union are kept (the rest joins the tail). The weight is ``Σ_{v∈S} w_v``
  (``w_v`` = the stored turn-mean saliency), i.e. the area sum restricted to stored cells.
  Approximation: the teacher never saw a merged token, so this mixture of its per-cell
  predictions stands in for ``p_T`` at the student's cell; the zero-fill biases ids that are in
  some cells' top-k but not others' down by at most the other cells' tail mass / |S|, and no mass
  is invented (``Σ q ≤ 1``). Equal grids are the identity (stored values copied, not recomputed).
"""

from __future__ import annotations

import hashlib
import math
import os
from dataclasses import dataclass, fields
from itertools import islice
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import IterableDataset, get_worker_info

from pipeline.data import EncodedSample, Record, read_records
from pipeline.data.encode import IGNORE_INDEX
from schemas import StoredSample, StoreFormatError, StoreReader
from schemas.signals import SampleSignals, unpack
from pipeline.modeling.batching import collate_model_inputs, pad_token_id
from pipeline.modeling.branches import pad_branches
from pipeline.modeling.probe import sample_indices
from schemas.compat import check_ids_in_vocab, open_store
from schemas.errors import IncompatibleStudentError
from stage2_student.losses import PAD_ID
from stage2_student.pixel_cache import PixelCache
from stage2_student.reencode import ENCODING_MODES, EncodingMode, StudentDataError, StudentEncoder

__all__ = [
    "IvaRows",
    "KdRows",
    "SaliencyRows",
    "StoreDataset",
    "StudentBatch",
    "StudentDataError",
    "StudentTargets",
    "TpaRows",
    "batches_per_epoch",
    "collate",
    "epoch_order",
    "epoch_samples",
    "remap",
]


# ----------------------------------------------------------------------------------------------
# 1. remap: teacher positions -> student positions


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
    tpa_pos: np.ndarray | None = None  # int64 [M]                     (transitions)
    tpa_cand: np.ndarray | None = None  # int64 [M]
    tpa_cand_logprob: np.ndarray | None = None  # float32 [M]
    tpa_ids: np.ndarray | None = None  # int64 [M, k']
    tpa_logprobs: np.ndarray | None = None  # float32 [M, k']


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


def _pool_sum(x: np.ndarray, grid: tuple[int, int], factor: tuple[int, int]) -> np.ndarray:
    """[..., R*C] row-major cells -> [..., r*c]: area sum over fr x fc cells."""
    (rows, cols), (fr, fc) = grid, factor
    lead = x.shape[:-1]
    y = x.astype(np.float64).reshape(*lead, rows // fr, fr, cols // fc, fc).sum(axis=(-3, -1))
    return y.reshape(*lead, (rows // fr) * (cols // fc)).astype(np.float32)


def _union_mean(ids: np.ndarray, logprobs: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Mean of n sparse distributions (rows of ids/logprobs [n, k]) over the union of their ids.

    A row's missing id counts as 0; the k most probable ids are kept (ties: smaller id first),
    padded with -1 / -inf. See [pooling note].
    """
    flat_ids, flat_lp = ids.reshape(-1), logprobs.reshape(-1).astype(np.float64)
    valid = flat_ids >= 0
    uniq, inverse = np.unique(flat_ids[valid], return_inverse=True)
    mass = np.bincount(inverse, weights=np.exp(flat_lp[valid]), minlength=len(uniq)) / ids.shape[0]
    keep = np.lexsort((uniq, -mass))[:k]
    out_ids = np.full(k, PAD_ID, dtype=np.int64)
    out_lp = np.full(k, -np.inf, dtype=np.float32)
    out_ids[: len(keep)] = uniq[keep]
    with np.errstate(divide="ignore"):
        out_lp[: len(keep)] = np.log(mass[keep])
    return out_ids, out_lp


def _remap_visual(teacher: SampleSignals, geometry: list, n_turns: int, k: int, where: str):
    """Visual signals block to block (equal grids copied, pooled grids per [pooling note]):
    saliency [J, V_student], and the stored rows' positions, weights, ids and log-probs."""
    sal_parts, vis_rows = [], []  # per block: saliency [J, r*c]; (pos, weight, ids, logprobs)
    t_offset = covered = 0
    for t_start, t_len, (R, C), (r, c), s_start in geometry:
        fr, fc = R // r, C // c
        block_sal = teacher.saliency[:, t_offset : t_offset + t_len]
        t_offset += t_len
        in_block = (teacher.vis_pos >= t_start) & (teacher.vis_pos < t_start + t_len)
        rows = np.flatnonzero(in_block)
        covered += len(rows)
        cells = teacher.vis_pos[rows] - t_start
        if fr == fc == 1:  # identity: copy the stored values
            sal_parts.append(block_sal.astype(np.float32))
            vis_rows.append((s_start + cells, teacher.vis_weight[rows], teacher.vis_ids[rows], teacher.vis_logprobs[rows]))
            continue
        sal_parts.append(_pool_sum(block_sal, (R, C), (fr, fc)))
        target = (cells // C // fr) * c + (cells % C) // fc  # student cell of each stored row
        cell_ids, group = np.unique(target, return_inverse=True)
        ids = np.empty((len(cell_ids), k), dtype=np.int64)
        lps = np.empty((len(cell_ids), k), dtype=np.float32)
        weights = np.zeros(len(cell_ids), dtype=np.float64)
        for g in range(len(cell_ids)):
            members = rows[group == g]
            ids[g], lps[g] = _union_mean(teacher.vis_ids[members], teacher.vis_logprobs[members], k)
            weights[g] = teacher.vis_weight[members].astype(np.float64).sum()
        vis_rows.append((s_start + cell_ids, weights.astype(np.float32), ids, lps))
    if covered != len(teacher.vis_pos):
        raise StoreFormatError(f"{where}: a stored visual position lies outside every image block")
    saliency = np.concatenate(sal_parts, axis=1) if sal_parts else np.zeros((n_turns, 0), np.float32)
    if len(vis_rows) == 1:
        return (saliency, *vis_rows[0])
    if vis_rows:
        return (saliency, *(np.concatenate(x) for x in zip(*vis_rows)))
    return (saliency, np.zeros(0, np.int64), np.zeros(0, np.float32), np.zeros((0, k), np.int64),
            np.zeros((0, k), np.float32))


def remap(teacher: SampleSignals, student: EncodedSample) -> StudentTargets:
    """The teacher's signals of one sample, moved onto the student's encoding of it.

    Every non-visual token must be equal and in the same order in both sequences; image blocks
    correspond in order. Response and branch positions are text and map one-to-one; visual
    signals map block to block: equal grids are copied, integer-pooled grids are area-summed /
    averaged ([pooling note]); anything else raises IncompatibleStudentError naming both
    geometries and the sample.
    """
    sid = teacher.sample_id
    where = f"sample {sid!r}"
    t_blocks = [(int(b["start"]), int(b["length"])) for b in teacher.visual_blocks]
    s_blocks = [(b.start, b.length) for b in student.visual_blocks]
    if len(t_blocks) != len(s_blocks):
        raise IncompatibleStudentError(
            f"{where}: the teacher's sequence has {len(t_blocks)} image block(s), the student's "
            f"{len(s_blocks)}; the processor or chat template differs"
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
            raise StoreFormatError(f"{where}: image {b}: grid {R}x{C} but {t_len} visual tokens")
        if R % r or C % c:
            raise IncompatibleStudentError(
                f"{where}: image {b}: the teacher's visual grid {R}x{C} vs the student's {r}x{c}; "
                "a student grid must be the teacher's pooled by an integer factor in each direction"
            )
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
    else:
        saliency, vis_pos, vis_weight, vis_ids, vis_lp = _remap_visual(teacher, geometry, n_turns, k, where)

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
    )


# ----------------------------------------------------------------------------------------------
# 2. order: a pure function of (seed, epoch, shard sizes, block size, window; lengths when grouped)


def _key(*parts) -> bytes:
    return hashlib.sha256("/".join(str(p) for p in parts).encode()).digest()


def _check_order_args(seed: int, epoch: int, shard_sizes: dict[str, int], block_size: int) -> None:
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be >= 0, got seed={seed}, epoch={epoch}")
    if block_size < 1:
        raise ValueError(f"block_size must be >= 1, got {block_size}")
    bad = {n: s for n, s in shard_sizes.items() if s < 0}
    if bad:
        raise ValueError(f"shard sizes must be >= 0: {bad}")


def epoch_order(seed: int, epoch: int, shard_sizes: dict[str, int], block_size: int) -> list[tuple[str, int, int]]:
    """The blocks ``(shard, start, stop)`` of one epoch in reading order ([order note], first bullet).

    Each shard (sorted by name) is cut into runs of ``block_size`` consecutive samples; the runs are
    sorted by ``sha256(f"block/{seed}/{epoch}/{shard}/{start}")``. Pure: no state, no library RNG.
    """
    _check_order_args(seed, epoch, shard_sizes, block_size)
    blocks = [
        (name, start, min(start + block_size, int(shard_sizes[name])))
        for name in sorted(shard_sizes)
        for start in range(0, int(shard_sizes[name]), block_size)
    ]
    return sorted(blocks, key=lambda b: _key("block", seed, epoch, b[0], b[1]))


def _window_samples(seed: int, epoch: int, blocks: list[tuple[str, int, int]], first_block: int) -> list[tuple[int, str, int]]:
    """(block number, shard, index) of the samples of consecutive blocks, in their shuffled order."""
    items = [(first_block + i, shard, idx) for i, (shard, a, b) in enumerate(blocks) for idx in range(a, b)]
    return sorted(items, key=lambda it: _key("sample", seed, epoch, it[1], it[2]))


def epoch_samples(
    seed: int, epoch: int, shard_sizes: dict[str, int], block_size: int, window_blocks: int,
    lengths: dict[str, np.ndarray] | None = None, group: int = 0,
) -> list[tuple[str, int]]:
    """Every sample ``(shard, index)`` of one epoch, in training order ([order note]: blocks, windows
    and, with ``group`` > 0 samples per run and the per-sample ``lengths`` of each shard, length groups)."""
    plan = _EpochPlan(seed, epoch, shard_sizes, block_size, window_blocks, lengths, group)
    n = int(plan.window_start[-1])
    return [(shard, idx) for _, shard, idx in plan.samples(0, n)]


def batches_per_epoch(shard_sizes: dict[str, int], batch_size: int, drop_last: bool = False) -> int:
    """Global batches in one epoch (all ranks together)."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = sum(int(s) for s in shard_sizes.values())
    return n // batch_size if drop_last else math.ceil(n / batch_size)


class _EpochPlan:
    """Random access to the batches of one epoch without materialising the whole sample order.

    ``group`` > 0: runs of that many samples (from the epoch's start) are sorted by (window, -length)
    with ``lengths[shard][index]``; the last sorted run is kept (batches only move forward)."""

    def __init__(self, seed: int, epoch: int, shard_sizes: dict[str, int], block_size: int, window_blocks: int,
                 lengths: dict[str, np.ndarray] | None = None, group: int = 0):
        if window_blocks < 1:
            raise ValueError(f"window_blocks must be >= 1, got {window_blocks}")
        if group < 0 or (group and lengths is None):
            raise ValueError(f"length groups need group >= 1 and the sample lengths, got group={group}")
        self.seed, self.epoch, self.window_blocks = seed, epoch, window_blocks
        self.lengths, self.group = lengths, group
        self._groups: dict[int, list[tuple[int, str, int]]] = {}
        self.blocks = epoch_order(seed, epoch, shard_sizes, block_size)
        self.n_windows = math.ceil(len(self.blocks) / window_blocks)
        sizes = [sum(b - a for _, a, b in self.blocks[w * window_blocks : (w + 1) * window_blocks]) for w in range(self.n_windows)]
        self.window_start = np.concatenate([[0], np.cumsum(sizes, dtype=np.int64)])  # [n_windows + 1]
        self._cache: dict[int, list[tuple[int, str, int]]] = {}

    def window(self, w: int) -> list[tuple[int, str, int]]:
        if w not in self._cache:
            self._cache = {k: v for k, v in self._cache.items() if k >= w - 1}  # batches only move forward
            first = w * self.window_blocks
            self._cache[w] = _window_samples(self.seed, self.epoch, self.blocks[first : first + self.window_blocks], first)
        return self._cache[w]

    def samples(self, lo: int, hi: int) -> list[tuple[int, str, int]]:
        """(block number, shard, index) of epoch samples [lo, hi)."""
        if not self.group:
            return self._shuffled(lo, hi)
        out = []
        while lo < hi:
            g = lo // self.group
            if g not in self._groups:
                self._groups = {k: v for k, v in self._groups.items() if k >= g - 1}  # batches only move forward
                start = g * self.group
                run = self._shuffled(start, min(start + self.group, int(self.window_start[-1])))
                self._groups[g] = sorted(run, key=lambda it: (it[0] // self.window_blocks, -int(self.lengths[it[1]][it[2]])))
            take = min(hi, (g + 1) * self.group)
            out += self._groups[g][lo - g * self.group : take - g * self.group]
            lo = take
        return out

    def _shuffled(self, lo: int, hi: int) -> list[tuple[int, str, int]]:
        """Samples [lo, hi) of the epoch before length grouping (blocks and windows shuffled)."""
        out = []
        w = int(np.searchsorted(self.window_start, lo, side="right")) - 1
        while lo < hi:
            base, end = int(self.window_start[w]), int(self.window_start[w + 1])
            take = min(hi, end)
            out += self.window(w)[lo - base : take - base]
            lo, w = take, w + 1
        return out


# ----------------------------------------------------------------------------------------------
# 3. batches


def _apply(x, fn):
    """``fn`` on every tensor of ``x`` (a tensor, a row group, a dict of tensors, or anything else, kept)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, _Rows):
        return type(x)(**{f.name: _apply(getattr(x, f.name), fn) for f in fields(x)})
    if isinstance(x, dict):
        return {k: _apply(v, fn) for k, v in x.items()}
    if isinstance(x, list):
        return [_apply(v, fn) for v in x]
    return x


class _Rows:
    """Tensor fields moved / pinned together (DataLoader ``pin_memory`` and accelerate call these)."""

    def to(self, device, non_blocking: bool = False):
        return _apply(self, lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self):
        return _apply(self, lambda t: t.pin_memory())


@dataclass
class KdRows(_Rows):
    """Response positions, N rows: row n is sample ``batch[n]`` at position ``pos[n]``.

    ``seq_logits[batch, pos]`` [N, V] are the student logits for ``kd_loss(ids, logprobs)``.
    """

    batch: torch.Tensor  # int64 [N]
    pos: torch.Tensor  # int64 [N]
    ids: torch.Tensor  # int64 [N, k]
    logprobs: torch.Tensor  # float32 [N, k]
    sampled_ids: torch.Tensor | None = None  # int64 [N, m], -1 padded  (sampled_kd_loss)
    sampled_counts: torch.Tensor | None = None  # int64 [N, m], 0 padded


@dataclass
class IvaRows(_Rows):
    """Stored visual positions, P rows; ``iva_loss(seq_logits[batch, pos], ids, logprobs, weights, group=batch)``."""

    batch: torch.Tensor  # int64 [P] (also the IVA group: one group per sample)
    pos: torch.Tensor  # int64 [P]
    ids: torch.Tensor  # int64 [P, k], -1 padded
    logprobs: torch.Tensor  # float32 [P, k], -inf padded
    weights: torch.Tensor  # float32 [P]


@dataclass
class TpaRows(_Rows):
    """Branch rows. ``forward_with_branches(model, model_inputs, branch_pos, branch_tok)`` gives
    ``branch_logits`` [B, R, V]; ``branch_logits[batch, row]`` [M, V] pairs with the targets for
    ``tpa_loss(.., ids, logprobs, candidate_logprob, group)``."""

    branch_pos: torch.Tensor  # int64 [B, R], -1 padded
    branch_tok: torch.Tensor  # int64 [B, R], -1 padded
    batch: torch.Tensor  # int64 [M]
    row: torch.Tensor  # int64 [M]: index into the sample's branch rows
    ids: torch.Tensor  # int64 [M, k']
    logprobs: torch.Tensor  # float32 [M, k']
    candidate_logprob: torch.Tensor  # float32 [M]
    group: torch.Tensor  # int64 [M]: one id per (sample, position), unique within the batch


@dataclass
class SaliencyRows(_Rows):
    """For the optional attention variant, per sample b (lists of length B), in the form of
    ``pipeline.modeling.probe.capture(model, layers, rows, cols)`` (see ``probe.sample_indices``):
    ``capture`` gives the student's block [|I_b|, |V_b|]; ``block[turn_rows[b][j]].mean(0)`` against
    ``maps[b][j]`` is one row of ``attention_kl``."""

    rows: list  # [B] of int64 [|I_b|]: the student's instruction positions, turn by turn
    cols: list  # [B] of int64 [|V_b|]: the student's visual positions, block by block
    turn_rows: list  # [B] of [J_b] of int64: indices into rows[b] of turn j's positions I_j
    maps: list  # [B] of float32 [J_b, |V_b|]: the teacher's s_j on the student's V (rows sum to 1)


@dataclass
class StudentBatch(_Rows):
    """A collated batch of B samples, right-padded to T tokens."""

    sample_ids: list[str]
    model_inputs: dict  # collate_model_inputs: input_ids [B, T], attention_mask [B, T], images
    labels: torch.Tensor  # int64 [B, T]: the token at t (unshifted, HF style), IGNORE_INDEX elsewhere
    kd: KdRows
    iva: IvaRows
    saliency: SaliencyRows | None  # None unless asked for (``with_saliency``)
    tpa: TpaRows | None  # None when the store has no transition statistics
    position: tuple[int, int]  # (epoch, global batch index) of this batch


def _pad_rows(arrays: list[np.ndarray], fill, dtype) -> np.ndarray:
    """Stack 2-D arrays [n_i, w_i] into [sum n_i, max w_i], padding columns with ``fill``."""
    width = max((a.shape[1] for a in arrays), default=0)
    out = np.full((sum(a.shape[0] for a in arrays), width), fill, dtype=dtype)
    row = 0
    for a in arrays:
        out[row : row + a.shape[0], : a.shape[1]] = a
        row += a.shape[0]
    return out


def collate(encoded: list[EncodedSample], targets: list[StudentTargets], pad_id: int,
            position: tuple[int, int] = (0, 0), with_saliency: bool = True) -> StudentBatch:
    """Batch B samples: model inputs via ``collate_model_inputs``, flat target rows with their
    (batch index, position) layout (see the row classes)."""
    t = torch.as_tensor
    model_inputs = collate_model_inputs([e.model_inputs for e in encoded], pad_id)
    length = model_inputs["input_ids"].shape[1]
    labels = np.full((len(targets), length), IGNORE_INDEX, dtype=np.int64)
    for b, tg in enumerate(targets):
        labels[b, : len(tg.labels)] = tg.labels

    def batch_index(counts: list[int]) -> torch.Tensor:
        return t(np.repeat(np.arange(len(counts)), counts), dtype=torch.int64)

    sampled = targets[0].sample_ids is not None
    kd = KdRows(
        batch=batch_index([len(tg.resp_pos) for tg in targets]),
        pos=t(np.concatenate([tg.resp_pos for tg in targets])),
        ids=t(np.concatenate([tg.resp_ids for tg in targets])),
        logprobs=t(np.concatenate([tg.resp_logprobs for tg in targets])),
        sampled_ids=t(_pad_rows([tg.sample_ids for tg in targets], PAD_ID, np.int64)) if sampled else None,
        sampled_counts=t(_pad_rows([tg.sample_counts for tg in targets], 0, np.int64)) if sampled else None,
    )
    iva = IvaRows(
        batch=batch_index([len(tg.vis_pos) for tg in targets]),
        pos=t(np.concatenate([tg.vis_pos for tg in targets])),
        ids=t(np.concatenate([tg.vis_ids for tg in targets])),
        logprobs=t(np.concatenate([tg.vis_logprobs for tg in targets])),
        weights=t(np.concatenate([tg.vis_weight for tg in targets])),
    )
    sal = None
    if with_saliency:
        indices = [sample_indices(e) for e in encoded]
        sal = SaliencyRows(
            rows=[rows for rows, _, _ in indices],
            cols=[cols for _, cols, _ in indices],
            turn_rows=[turn_rows for _, _, turn_rows in indices],
            maps=[t(tg.saliency) for tg in targets],
        )
    tpa = None
    if targets[0].tpa_pos is not None:
        branch_pos, branch_tok = pad_branches([(t(tg.tpa_pos), t(tg.tpa_cand)) for tg in targets])
        groups, offset = [], 0
        for tg in targets:  # one group per distinct position t of a sample
            uniq, inv = np.unique(tg.tpa_pos, return_inverse=True)
            groups.append(inv.reshape(-1) + offset)
            offset += len(uniq)
        tpa = TpaRows(
            branch_pos=branch_pos,
            branch_tok=branch_tok,
            batch=batch_index([len(tg.tpa_pos) for tg in targets]),
            row=t(np.concatenate([np.arange(len(tg.tpa_pos)) for tg in targets]).astype(np.int64)),
            ids=t(np.concatenate([tg.tpa_ids for tg in targets])),
            logprobs=t(np.concatenate([tg.tpa_logprobs for tg in targets])),
            candidate_logprob=t(np.concatenate([tg.tpa_cand_logprob for tg in targets])),
            group=t(np.concatenate(groups).astype(np.int64)),
        )
    return StudentBatch(
        sample_ids=[tg.sample_id for tg in targets],
        model_inputs=model_inputs,
        labels=t(labels),
        kd=kd,
        iva=iva,
        saliency=sal,
        tpa=tpa,
        position=position,
    )


def packed(batch: StudentBatch) -> StudentBatch:
    """The same batch with every tensor a view into one buffer (64-byte aligned slots).

    For the trip from a DataLoader worker to the trainer: torch moves each tensor's storage into
    shared memory on its own (one shared-memory file each, and the receiver maps each one), which
    for a batch of ~20 small tensors cost more than building it (measured: bench/loader.py);
    one buffer makes it one file and one mapping."""
    tensors: dict[int, torch.Tensor] = {}
    _apply(batch, lambda t: tensors.setdefault(id(t), t))
    slots, size = {}, 0
    for key, t in tensors.items():
        slots[key] = size
        size += (t.numel() * t.element_size() + 63) // 64 * 64
    buffer = torch.empty(size, dtype=torch.uint8)
    views = {}
    for key, t in tensors.items():
        start = slots[key]
        view = buffer[start : start + t.numel() * t.element_size()].view(t.dtype).view(t.shape)
        view.copy_(t)
        views[key] = view
    return _apply(batch, lambda t: views[id(t)])


def _max_stored_id(s: SampleSignals) -> int:
    arrays = [s.resp_ids, s.vis_ids, s.sample_ids, s.tpa_cand, s.tpa_ids]
    return max((int(a.max()) for a in arrays if a is not None and a.size), default=-1)


class StoreDataset(IterableDataset):
    """Student batches from a teacher store and the images it was dumped from ([order note]).

    Iterating yields this rank's batches of one epoch from a resume point on: ``ds.start =
    (epoch, b)`` skips the first ``b`` batches this rank yields in that epoch (so a trainer's own
    count of batches done is the resume state); :meth:`set_epoch` is ``start = (epoch, 0)``. With
    ``repeat``, iteration goes on into the next epochs, endlessly, so one DataLoader (and its worker
    processes, with their caches) serves a whole run. Use with ``DataLoader(ds, batch_size=None,
    num_workers=N)``: workers split the batches, none is duplicated, and the yield order does not
    depend on N. ``batches_this_rank`` batches per epoch; ``batch.position`` is (epoch, global index).

    Each sample's student encoding is built from the teacher's stored token ids with the visual
    blocks re-expanded for the student (``stage2_student.reencode``, [fast path note]); images are
    preprocessed once per process and kept in a bounded cache, and decoded store chunks are kept in
    the reader's bounded cache (``schemas.store.StoreReader``). Both caches are per process: with N
    DataLoader workers the memory bound is N times the sizes below. With ``pixel_cache_dir``,
    preprocessed images are also kept on disk, shared by every process and run with the same
    processor settings (``stage2_student.pixel_cache``), so an epoch after the first reads no image
    file even when the RAM caches cannot hold the data.

    Args:
        store_dir: the teacher store.
        processor: the student's processor (``open_store`` checks that the store serves it).
        batch_size: samples per batch.
        seed: data-order seed.
        start: (epoch, batches of that epoch this rank has already yielded); (0, 0) for a fresh run.
        data_path, image_root, split: the records and images; default: the manifest's dataset
            entry (with its ``limit``). Records are matched to stored samples by id.
        max_length: longest student sequence; default: the manifest's ``dataset.max_length``.
        temperature: the training temperature, refused if it is not the dump temperature.
        vocab_size: ids must be below this; default ``len(processor.tokenizer)`` (real tokens only).
        block_size, window_blocks: see [order note].
        length_group: sort runs of this many batches by teacher sequence length, longest first, so
            that a batch pads less ([order note]); 0 or 1: off.
        drop_last: drop the last, short batch of an epoch.
        rank, world_size: this process's share under DDP (global batch i goes to rank i % world_size;
            ranks get equal counts only when world_size divides ``n_batches``).
        verify_checksums: check every file's size and sha256 before reading.
        with_saliency: also yield the saliency rows (the optional attention variant of IVA).
        repeat: go on with the next epoch after the last batch of one, without end.
        encoding: ``auto`` (the store fast path where the processor allows it, else the processor),
            ``processor`` (re-encode every sample with the chat template, tokenizer and processor),
            ``check`` (both, refusing any difference); see ``stage2_student.reencode``.
        image_cache_mb: per-process bound of the cache of preprocessed images (by image sha256).
        read_cache_mb: per-process bound of the cache of decoded store chunks.
        pixel_cache_dir: root of the on-disk cache of preprocessed images (None: none).
        pixel_cache_max_gb: bound of this processor's pixel cache directory (None: no bound).
        reader: the store already opened by ``open_store(store_dir, processor, temperature, ...)``,
            which made every refusal (then ``verify_checksums`` and ``read_cache_mb`` were its
            business); None: open it here, the same way.
    """

    def __init__(
        self,
        store_dir: str | Path,
        processor,
        batch_size: int,
        seed: int = 0,
        start: tuple[int, int] = (0, 0),
        data_path: str | Path | None = None,
        image_root: str | Path | None = None,
        split: str | None = None,
        max_length: int | None = None,
        temperature: float | None = None,
        vocab_size: int | None = None,
        block_size: int = 64,
        window_blocks: int = 8,
        length_group: int = 0,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        verify_checksums: bool = False,
        with_saliency: bool = True,
        repeat: bool = False,
        encoding: EncodingMode = "auto",
        image_cache_mb: float = 256,
        read_cache_mb: float = 128,
        pixel_cache_dir: str | Path | None = None,
        pixel_cache_max_gb: float | None = None,
        reader: StoreReader | None = None,
    ) -> None:
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if encoding not in ENCODING_MODES:
            raise ValueError(f"encoding must be one of {ENCODING_MODES}, got {encoding!r}")
        if image_cache_mb < 0 or read_cache_mb < 0:
            raise ValueError(f"cache sizes must be >= 0 MB, got image_cache_mb={image_cache_mb}, read_cache_mb={read_cache_mb}")
        self.store_dir = Path(store_dir)
        self.read_cache_bytes = int(read_cache_mb * 2**20)
        if reader is None:
            reader = open_store(self.store_dir, processor, temperature, verify_checksums, self.read_cache_bytes)
        self.manifest = reader.manifest
        self.processor = processor
        tok = processor.tokenizer
        self.pad_id = pad_token_id(tok)
        self.vocab_size = len(tok) if vocab_size is None else int(vocab_size)
        self.max_length = self.manifest.max_length if max_length is None else int(max_length)
        self.batch_size, self.seed, self.drop_last = batch_size, seed, drop_last
        self.block_size, self.window_blocks = block_size, window_blocks
        self.rank, self.world_size, self.with_saliency = rank, world_size, with_saliency
        self.repeat = repeat
        self.shard_sizes = reader.shard_sizes()
        self.n_batches = batches_per_epoch(self.shard_sizes, batch_size, drop_last)  # global, all ranks
        self.batches_this_rank = len(range(rank, self.n_batches, world_size))
        _check_order_args(seed, 0, self.shard_sizes, block_size)  # now rather than in a worker
        if window_blocks < 1:
            raise ValueError(f"window_blocks must be >= 1, got {window_blocks}")
        if length_group < 0:
            raise ValueError(f"length_group must be >= 0 batches, got {length_group}")
        self.group = batch_size * length_group if length_group > 1 else 0
        self.lengths = reader.index_column("length") if self.group else None
        self.start = start
        self.records = self._read_records(reader, data_path, image_root, split)
        pixels = None
        if pixel_cache_dir is not None:
            max_bytes = None if pixel_cache_max_gb is None else int(pixel_cache_max_gb * 2**30)
            pixels = PixelCache(pixel_cache_dir, processor, max_bytes)
        self.encoder = StudentEncoder(processor, self.max_length, encoding, int(image_cache_mb * 2**20), self.data_path,
                                      pixel_cache=pixels)
        self._reader, self._reader_pid = reader, os.getpid()
        self._ids_checked: set[str] = set()  # samples whose stored ids were checked against the vocabulary

    def __getstate__(self) -> dict:
        # Pickled for a spawned worker: zarr handles stay behind (each process opens its own).
        state = dict(self.__dict__)
        state["_reader"], state["_reader_pid"] = None, None
        return state

    def _store_reader(self) -> StoreReader:
        """This process's reader: zarr handles are never shared across processes (a forked worker
        opens its own; the encoder and its image cache are plain objects and are inherited)."""
        if self._reader is None or self._reader_pid != os.getpid():
            self._reader = StoreReader(self.store_dir, cache_bytes=self.read_cache_bytes)
            self._reader_pid = os.getpid()
        return self._reader

    def _read_records(self, reader: StoreReader, data_path, image_root, split) -> dict[str, Record]:
        dataset = self.manifest.dataset
        if data_path is None:
            data_path, limit = dataset["path"], dataset.get("limit")
            image_root = dataset.get("image_root") if image_root is None else image_root
        else:
            limit = None
        split = dataset.get("split", "train") if split is None else split
        wanted = set(reader.sample_ids())
        records = {}
        for rec in islice(read_records(data_path, image_root, split), limit):
            if isinstance(rec, Record) and rec.sample_id in wanted:
                records[rec.sample_id] = rec
        missing = sorted(wanted - set(records))
        if missing:
            raise StudentDataError(
                f"{len(missing)} stored sample(s) have no usable record in {data_path}, e.g. sample "
                f"{missing[0]!r}; the data is not the one the store {self.store_dir} was dumped from"
            )
        self.data_path = Path(data_path)
        return records

    @property
    def start(self) -> tuple[int, int]:
        """(epoch, batches of it already yielded by this rank): where the next iteration starts."""
        return self.epoch, self.start_batch

    @start.setter
    def start(self, value: tuple[int, int]) -> None:
        epoch, batch = (int(v) for v in value)
        if epoch < 0 or not 0 <= batch <= self.batches_this_rank:
            raise ValueError(f"start (epoch, batch) = ({epoch}, {batch}) out of range: an epoch has "
                             f"{self.batches_this_rank} batches for rank {self.rank}")
        self.epoch, self.start_batch = epoch, batch

    def set_epoch(self, epoch: int) -> None:
        """Iterate epoch ``epoch`` from its first batch next time."""
        self.start = (epoch, 0)

    def batch_indices(self, worker: int = 0, num_workers: int = 1) -> list[int]:
        """Global batch indices of the start epoch that this rank's worker yields, in order ([order note])."""
        return [i for epoch, i in self._worker_batches(worker, num_workers, repeat=False)]

    def _worker_batches(self, worker: int, num_workers: int, repeat: bool):
        """(epoch, global batch index) that this rank's worker yields, in order: this rank's batches
        from ``start`` on (to the end of that epoch, or on through the next epochs with ``repeat``)
        form one stream, dealt round-robin to the workers from worker 0 on, as the DataLoader
        collects them."""
        mine = range(self.rank, self.n_batches, self.world_size)
        epoch, first, dealt = self.epoch, self.start_batch, 0
        while True:
            remaining = mine[first:]
            for i in remaining[(worker - dealt) % num_workers :: num_workers]:
                yield epoch, i
            if not repeat or not mine:
                return
            dealt += len(remaining)
            epoch, first = epoch + 1, 0

    def __iter__(self):
        info = get_worker_info()
        worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        reader = self._store_reader()
        plan = None
        blocks: dict[int, list[StoredSample]] = {}
        for epoch, i in self._worker_batches(worker, num_workers, self.repeat):
            if plan is None or plan.epoch != epoch:
                plan = _EpochPlan(self.seed, epoch, self.shard_sizes, self.block_size, self.window_blocks,
                                  self.lengths, self.group)
                n_samples = int(plan.window_start[-1])
                blocks = {}
            items = plan.samples(i * self.batch_size, min((i + 1) * self.batch_size, n_samples))
            # Batches only move forward through the windows: blocks of earlier windows are done.
            window = min(block for block, _, _ in items) // self.window_blocks
            blocks = {k: v for k, v in blocks.items() if k // self.window_blocks >= window}
            encoded, targets = [], []
            for block, shard, idx in items:
                if block not in blocks:
                    _, start, stop = plan.blocks[block]
                    blocks[block] = reader.read_block(shard, start, stop)
                stored = blocks[block][idx - plan.blocks[block][1]]
                enc, tg = self.encode_and_remap(stored)
                encoded.append(enc)
                targets.append(tg)
            batch = collate(encoded, targets, self.pad_id, position=(epoch, i), with_saliency=self.with_saliency)
            yield batch if info is None else packed(batch)

    def encode_and_remap(self, stored: StoredSample) -> tuple[EncodedSample, StudentTargets]:
        """The student's encoding of one stored sample (``self.encoder``) and its remapped signals."""
        teacher = unpack(stored)
        sid = teacher.sample_id
        if sid not in self._ids_checked:  # the store does not change: once per sample and process
            check_ids_in_vocab(_max_stored_id(teacher), self.vocab_size, where=f"sample {sid!r} of the store")
            self._ids_checked.add(sid)
        enc = self.encoder(teacher, self.records[sid])
        return enc, remap(teacher, enc)
