"""The data order: a pure function of (seed, epoch, shard sizes, block size, window; lengths when
grouped), so resume state is (epoch, batch index).

:func:`epoch_order` / :func:`epoch_samples` give the order, :func:`batches_per_epoch` its length;
``_EpochPlan`` gives ``StoreDataset`` (``stage2_student.data.dataset``) random access to the
batches of one epoch.

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
* Ranks in step (``pad_ranks``, as ``distill`` uses them): a DDP step takes one batch from each
  rank, global batches ``sW .. sW + W - 1`` at step s: the consecutive samples of one batch of
  ``W * batch_size``, so W processes at batch B see what one process sees at batch W·B. Each rank
  yields ``ceil(n_batches / W)`` batches per epoch; those past the epoch's last are *fillers*
  (copies of the last batch, ``batch.filler``) that the trainer weighs 0, so that no rank runs
  into the next epoch while another finishes this one.

A worker reads (and keeps until its batches leave that window) only the blocks that hold samples
of its own batches; with N workers a block may be read by up to N of them (each worker decodes a
store chunk once while it stays in its cache). With ``repeat`` the epochs follow one another in
one stream: this rank's batches from ``start`` on, epoch after epoch, dealt round-robin to the
workers as one sequence (so an epoch need not start at worker 0), which is how the DataLoader
collects them; ``(epoch, b)`` still resumes it.
"""

from __future__ import annotations

import hashlib
import math

import numpy as np


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
