"""Sparse teacher distributions (DESIGN.md §3.1, §3.4): pure functions of logits.

Every probability here comes from a log-softmax over the *full* vocabulary, in float32 whatever
the logits' dtype (bf16 has 8 mantissa bits: a bf16 log-softmax is off by ~1e-2 nats), at the dump
temperature ``τ``. Work is chunked over rows so that the float32 copy of the logits stays bounded
(``chunk_rows × V`` floats; 256 × 152064 × 4 B ≈ 156 MB for a Qwen2 vocabulary).

Log-softmax is idempotent (``log_softmax(log_softmax(x)) == log_softmax(x)``) and so is the
temperature's effect on it (``log_softmax(log_softmax(x) / τ) == log_softmax(x / τ)``), so every
function accepts logits or log-probabilities alike.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator

import torch

DEFAULT_CHUNK_ROWS = 256


def _check_2d(logits: torch.Tensor) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")


def _logprob_chunks(
    logits: torch.Tensor, temperature: float, chunk_rows: int
) -> Iterator[tuple[slice, torch.Tensor]]:
    """(row slice, float32 log-softmax of ``logits[rows] / temperature``) per chunk of rows."""
    _check_2d(logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    for start in range(0, logits.shape[0], chunk_rows):
        rows = slice(start, min(start + chunk_rows, logits.shape[0]))
        x = logits[rows].float()
        if temperature != 1.0:
            x = x / temperature
        yield rows, torch.log_softmax(x, dim=-1)


def log_softmax_f32(logits: torch.Tensor, temperature: float = 1.0, chunk_rows: int = DEFAULT_CHUNK_ROWS) -> torch.Tensor:
    """Dense float32 ``log_softmax(logits / temperature)`` [N, V], chunked over rows."""
    out = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
    for rows, lp in _logprob_chunks(logits, temperature, chunk_rows):
        out[rows] = lp
    return out


def topk_logprobs(
    logits: torch.Tensor, k: int, temperature: float = 1.0, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` tokens of ``p = softmax(logits / τ)`` with their exact log-probabilities.

    logits: [N, V], any float dtype. Returns ``ids`` [N, k] int64 and ``logprobs`` [N, k] float32,
    sorted by decreasing probability. The log-probs are normalised over all V tokens, so the tail
    mass ``m = 1 − Σ_k p`` is exact (see ``pipeline.modeling.sparse.tail_mass``).
    """
    _check_2d(logits)
    n, v = logits.shape
    if not 1 <= k <= v:
        raise ValueError(f"k must be in [1, V={v}], got {k}")
    ids = torch.empty((n, k), dtype=torch.int64, device=logits.device)
    lps = torch.empty((n, k), dtype=torch.float32, device=logits.device)
    for rows, lp in _logprob_chunks(logits, temperature, chunk_rows):
        lps[rows], ids[rows] = torch.topk(lp, k, dim=-1)
    return ids, lps


def sample_counts(
    logits: torch.Tensor,
    n_draws: int,
    generator: torch.Generator,
    temperature: float = 1.0,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The unbiased sampled target (Anshumann et al., ACL 2025, "Sparse Logit Sampling").

    Draws ``n_draws`` ids per row from ``p = softmax(logits / τ)`` with replacement; ``counts / n_draws``
    is an unbiased estimate of ``p`` (hence of the forward-KL gradient).

    logits: [N, V]. ``generator`` lives on ``logits.device``; the result is a function of its state.
    Returns ``ids`` [N, m] int64 (ascending per row) and ``counts`` [N, m] int32, ``m`` the largest
    number of unique ids in a row; shorter rows are padded with id −1 and count 0. Each row's counts
    sum to ``n_draws``.
    """
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    chunks: list[tuple[torch.Tensor, torch.Tensor]] = []
    for _, lp in _logprob_chunks(logits, temperature, chunk_rows):
        draws = torch.multinomial(lp.exp(), n_draws, replacement=True, generator=generator)
        chunks.append(_unique_with_counts(draws))
    m = max((ids.shape[1] for ids, _ in chunks), default=0)
    n = logits.shape[0]
    ids = torch.full((n, m), -1, dtype=torch.int64, device=logits.device)
    counts = torch.zeros((n, m), dtype=torch.int32, device=logits.device)
    start = 0
    for cid, ccount in chunks:
        rows = slice(start, start + cid.shape[0])
        ids[rows, : cid.shape[1]] = cid
        counts[rows, : cid.shape[1]] = ccount
        start = rows.stop
    return ids, counts


def _unique_with_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise unique values and counts of ``draws`` [n, d] (int64 >= 0), padded with -1 / 0."""
    s, _ = torch.sort(draws, dim=-1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    group = new.cumsum(dim=-1) - 1  # [n, d]: index of each draw's unique value in its row
    m = int(new.sum(dim=-1).max()) if s.numel() else 0
    ids = torch.full((s.shape[0], m), -1, dtype=torch.int64, device=s.device)
    ids.scatter_(1, group, s)  # all draws of a group carry the same value
    counts = torch.zeros((s.shape[0], m), dtype=torch.int32, device=s.device)
    counts.scatter_add_(1, group, torch.ones_like(s, dtype=torch.int32))
    return ids, counts


@dataclass
class Transitions:
    """Selected response positions and their candidate tokens (DESIGN.md §3.4).

    ``S`` selected positions, ``C`` candidates in all (1 to K per position), flat and grouped by
    position in position order; candidates of one position by decreasing probability.
    """

    rows: torch.Tensor  # int64 [S]: indices into the N input rows, ascending
    positions: torch.Tensor  # int64 [S]: sequence positions t of those rows
    alt_mass: torch.Tensor  # float32 [S]: 1 - p_T(gold | x<=t)
    cand_ids: torch.Tensor  # int64 [C]: candidate tokens c (never the gold token)
    cand_logprobs: torch.Tensor  # float32 [C]: log p_T(c | x<=t), exact (full-vocabulary log-softmax)
    cand_index: torch.Tensor  # int64 [C]: which selected position (0..S-1) each candidate belongs to

    @property
    def cand_positions(self) -> torch.Tensor:
        """int64 [C]: the sequence position t of each candidate: the ``branch_pos`` of its branch row."""
        return self.positions[self.cand_index]


def select_transitions(
    logits: torch.Tensor,
    gold: torch.Tensor,
    positions: torch.Tensor | None = None,
    *,
    candidates: int = 4,
    min_prob: float = 0.01,
    min_alt_mass: float = 0.05,
    max_positions: int = 64,
    temperature: float = 1.0,
    exclude_ids: torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> Transitions:
    """Choose where to branch and on which tokens (DESIGN.md §3.4).

    logits: [N, V] teacher logits (or log-probs) at the N response positions of one sample.
    gold: [N] the gold next token ``x_{t+1}`` of each row. positions: [N] the sequence position t of
    each row (default ``arange(N)``). exclude_ids: tokens that may never be candidates (e.g. vision
    placeholder tokens, which a branch row cannot hold).

    A row is kept when ``1 − p(gold) >= min_alt_mass`` and at least one of its top-``candidates``
    non-gold tokens has ``p >= min_prob`` (a position without candidates would only waste one of the
    ``max_positions`` slots). Of those, the ``max_positions`` with the highest alternative mass are
    kept (ties: earlier row first), returned in position order.
    """
    _check_2d(logits)
    n = logits.shape[0]
    if gold.shape != (n,):
        raise ValueError(f"gold must be [N={n}], got shape {tuple(gold.shape)}")
    positions = torch.arange(n, device=logits.device) if positions is None else positions.to(logits.device)
    if positions.shape != (n,):
        raise ValueError(f"positions must be [N={n}], got shape {tuple(positions.shape)}")
    if candidates < 1 or candidates + 1 > logits.shape[1]:
        raise ValueError(f"candidates must be in [1, V-1={logits.shape[1] - 1}], got {candidates}")
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    gold = gold.to(logits.device)
    log_min_prob = math.log(min_prob) if min_prob > 0 else -math.inf

    gold_lp = torch.empty(n, dtype=torch.float32, device=logits.device)
    top_lp = torch.empty((n, candidates), dtype=torch.float32, device=logits.device)
    top_id = torch.empty((n, candidates), dtype=torch.int64, device=logits.device)
    for rows, lp in _logprob_chunks(logits, temperature, chunk_rows):
        g = gold[rows, None]
        gold_lp[rows] = lp.gather(1, g).squeeze(1)
        # The gold token and excluded ids can never be candidates: drop them before the top-K.
        banned = torch.zeros_like(lp, dtype=torch.bool).scatter_(1, g, True)
        if exclude_ids is not None:
            banned[:, exclude_ids.to(lp.device)] = True
        top_lp[rows], top_id[rows] = torch.topk(lp.masked_fill(banned, -float("inf")), candidates, dim=-1)

    alt_mass = -torch.expm1(gold_lp)  # 1 - p(gold), without cancellation near p(gold) = 1
    keep_cand = (top_lp >= log_min_prob) & torch.isfinite(top_lp)  # [N, K]; banned (-inf) never passes
    eligible = (alt_mass >= min_alt_mass) & keep_cand.any(dim=1)
    rows = torch.nonzero(eligible).squeeze(1)
    if rows.numel() > max_positions:
        order = torch.sort(alt_mass[rows], descending=True, stable=True).indices[:max_positions]
        rows = torch.sort(rows[order]).values

    keep = keep_cand[rows]  # [S, K]
    cand_index = torch.arange(rows.numel(), device=logits.device)[:, None].expand_as(keep)[keep]
    return Transitions(
        rows=rows,
        positions=positions[rows].long(),
        alt_mass=alt_mass[rows],
        cand_ids=top_id[rows][keep],
        cand_logprobs=top_lp[rows][keep],
        cand_index=cand_index,
    )
