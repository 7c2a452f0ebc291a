"""Sparse teacher distributions (DESIGN.md §3.1, §3.4): pure functions of logits.

Every probability here comes from a log-softmax over the *full* (real) vocabulary, in float32
whatever the logits' dtype (bf16 has 8 mantissa bits: a bf16 log-softmax is off by ~1e-2 nats), at
the dump temperature ``τ``. Work is chunked over rows so that the float32 copy of the logits stays
bounded (``chunk_rows × V`` floats; 256 × 152064 × 4 B ≈ 156 MB for a Qwen2 vocabulary).

:func:`row_statistics` is the one pass: per row, one float32 log-softmax, and from it everything a
row stores: the top-``k`` ids and log-probs, the gold token's log-prob, the top-``K`` candidates
other than the gold token and the excluded ids, and the sampled target. The rows come either as
logits [N, V] or as :class:`HeadRows` (final hidden states [N, d] and the output head, applied
chunk by chunk, so the teacher's ``[N, V]`` logits never exist whole). :func:`topk_logprobs`,
:func:`sample_counts` and :func:`select_transitions` are thin wrappers over it.

Log-softmax is idempotent (``log_softmax(log_softmax(x)) == log_softmax(x)``) and so is the
temperature's effect on it (``log_softmax(log_softmax(x) / τ) == log_softmax(x / τ)``), so every
function accepts logits or log-probabilities alike.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import dataclass
from typing import Iterator

import torch

DEFAULT_CHUNK_ROWS = 256
DRAW_METHOD = "inverse-cdf-v1"
"""How the sampled target's ids are drawn (:func:`_draw` from per-sample uniforms); recorded in a
store's settings, so a resume never mixes draws of two methods in one store."""
SAMPLED_STREAMS = {"response": "", "visual": "visual", "transitions": "transitions"}
"""The :func:`sample_seed` stream of each row kind's sampled target (the response rows' is the
unnamed one they always had); recorded in a store's settings for the visual and branch rows."""


@dataclass(frozen=True)
class HeadRows:
    """Rows whose logits are not computed yet: ``hidden`` [N, d] final hidden states and the output
    head ``weight`` [V, d] (``bias`` [V] or None), already cut to the real vocabulary's V rows.

    Indexed like a logits tensor (``rows[a:b]`` is ``[b - a, V]`` logits, computed then), so the
    head runs once per chunk of rows and only on the rows asked for.
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: torch.Tensor | None = None

    def __post_init__(self):
        if self.hidden.ndim != 2 or self.weight.ndim != 2 or self.hidden.shape[1] != self.weight.shape[1]:
            raise ValueError(
                f"hidden must be [N, d] and weight [V, d], got {tuple(self.hidden.shape)} and {tuple(self.weight.shape)}"
            )
        if self.bias is not None and self.bias.shape != (self.weight.shape[0],):
            raise ValueError(f"bias must be [V={self.weight.shape[0]}], got {tuple(self.bias.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        return self.hidden.shape[0], self.weight.shape[0]

    @property
    def ndim(self) -> int:
        return 2

    @property
    def device(self) -> torch.device:
        return self.hidden.device

    def __getitem__(self, rows: slice) -> torch.Tensor:
        """The logits of ``rows`` [n, V], in the head's dtype."""
        return torch.nn.functional.linear(self.hidden[rows], self.weight, self.bias)


def sample_seed(seed: int, sample_id: str, stream: str = "") -> int:
    """A per-sample RNG seed that depends only on (seed, sample id) and the named ``stream`` (the
    teacher's sampled targets: :data:`SAMPLED_STREAMS`; the student proposer's draws: "proposer"): stable across
    workers, batches and resumes, and independent between streams."""
    key = f"{stream}:{seed}:{sample_id}" if stream else f"{seed}:{sample_id}"
    return int.from_bytes(hashlib.sha256(key.encode()).digest()[:7], "big")


def _check_2d(logits) -> None:
    if logits.ndim != 2:
        raise ValueError(f"logits must be [N, V], got shape {tuple(logits.shape)}")


def _logprob_chunks(logits, temperature: float, chunk_rows: int) -> Iterator[tuple[slice, torch.Tensor]]:
    """(row slice, float32 log-softmax of ``logits[rows] / temperature``) per chunk of rows.
    ``logits``: a tensor [N, V] or :class:`HeadRows`."""
    _check_2d(logits)
    if not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    n = logits.shape[0]
    for start in range(0, n, chunk_rows):
        rows = slice(start, min(start + chunk_rows, n))
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


@dataclass
class RowStatistics:
    """What :func:`row_statistics` computes for N rows (fields it was not asked for are None)."""

    top_ids: torch.Tensor  # int64 [N, k], by decreasing probability
    top_logprobs: torch.Tensor  # float32 [N, k], exact (full-vocabulary log-softmax)
    gold_logprob: torch.Tensor | None = None  # float32 [N]: log p(gold)
    cand_ids: torch.Tensor | None = None  # int64 [N, K]: top allowed ids, -1 where a row has fewer than K
    cand_logprobs: torch.Tensor | None = None  # float32 [N, K]: their log-probs, -inf where id is -1
    sample_ids: torch.Tensor | None = None  # int64 [N, draws]: unique drawn ids, ascending, padded with -1
    sample_counts: torch.Tensor | None = None  # int32 [N, draws]: their counts (sum = draws), padded with 0
    at_logprobs: torch.Tensor | None = None  # float32 [N, m]: log-probs of given ids (``at_ids``), -inf where -1


def row_statistics(
    logits,
    k: int,
    *,
    temperature: float = 1.0,
    gold: torch.Tensor | None = None,
    candidates: int = 0,
    exclude_ids: torch.Tensor | None = None,
    uniforms: torch.Tensor | None = None,
    at_ids: torch.Tensor | None = None,
    chunk_rows: int = DEFAULT_CHUNK_ROWS,
) -> RowStatistics:
    """Every statistic a stored row needs, from one float32 log-softmax per row.

    logits: [N, V] (any float dtype) or :class:`HeadRows`. ``k`` (0 allowed): top ids kept.
    ``gold`` [N]: the gold next token of each row, for ``gold_logprob`` and the candidates.
    ``candidates`` K > 0 (needs ``gold``): per row the K most probable ids that are neither the
    gold token nor in ``exclude_ids``. ``uniforms`` [N, n_draws] in [0, 1): the sampled target,
    one draw per uniform by inverse CDF (:func:`_draw`), so the draws are a function of the
    uniforms and the row only, whatever the chunking or the other rows. ``at_ids`` [N, m]: the
    log-probs of given ids per row (-1: none; -inf there), e.g. a student's candidates the teacher
    scores (``stage1_teacher.proposer``).

    Candidates without a ``[N, V]`` mask: the banned ids of a row are at most ``1 + n_excluded``
    distinct ids, so the top ``K + 1 + n_excluded`` of the row hold at least K allowed ids, and
    the first K of them in that (descending) order are a top-K of the allowed ids: every allowed
    id outside has a log-prob no larger than theirs. Ties: ids of equal log-prob come in
    ``torch.topk``'s order, as in a top-K over the masked row; which of equal-probability ids is
    taken at the K-th place is not specified (their log-probs are equal either way).
    """
    _check_2d(logits)
    n, v = logits.shape
    if not 0 <= k <= v:
        raise ValueError(f"k must be in [0, V={v}], got {k}")
    if candidates:
        if gold is None:
            raise ValueError("candidates need the gold token of each row")
        if not 1 <= candidates <= v - 1:
            raise ValueError(f"candidates must be in [1, V-1={v - 1}], got {candidates}")
    if gold is not None:
        if gold.shape != (n,):
            raise ValueError(f"gold must be [N={n}], got shape {tuple(gold.shape)}")
        gold = gold.to(logits.device).long()
    if uniforms is not None:
        if uniforms.ndim != 2 or uniforms.shape[0] != n or uniforms.shape[1] < 1:
            raise ValueError(f"uniforms must be [N={n}, draws >= 1], got shape {tuple(uniforms.shape)}")
        uniforms = uniforms.to(logits.device, torch.float32)
    if at_ids is not None:
        if at_ids.ndim != 2 or at_ids.shape[0] != n:
            raise ValueError(f"at_ids must be [N={n}, m], got shape {tuple(at_ids.shape)}")
        at_ids = at_ids.to(logits.device).long()
        if bool(((at_ids < -1) | (at_ids >= v)).any()):
            raise ValueError(f"at_ids must be token ids in [0, {v}) or -1")
    banned = torch.zeros(0, dtype=torch.int64, device=logits.device)
    if exclude_ids is not None:
        banned = torch.unique(exclude_ids.to(logits.device).long())
        banned = banned[(banned >= 0) & (banned < v)]
    width = min(v, candidates + 1 + banned.numel()) if candidates else 0
    top_width = max(k, width)

    out = RowStatistics(
        top_ids=torch.empty((n, k), dtype=torch.int64, device=logits.device),
        top_logprobs=torch.empty((n, k), dtype=torch.float32, device=logits.device),
    )
    if gold is not None:
        out.gold_logprob = torch.empty(n, dtype=torch.float32, device=logits.device)
    if candidates:
        out.cand_ids = torch.empty((n, candidates), dtype=torch.int64, device=logits.device)
        out.cand_logprobs = torch.empty((n, candidates), dtype=torch.float32, device=logits.device)
    if uniforms is not None:  # as wide as the draws: no device sync to find the widest row
        out.sample_ids = torch.full(uniforms.shape, -1, dtype=torch.int64, device=logits.device)
        out.sample_counts = torch.zeros(uniforms.shape, dtype=torch.int32, device=logits.device)
    if at_ids is not None:
        out.at_logprobs = torch.empty(at_ids.shape, dtype=torch.float32, device=logits.device)
    for rows, lp in _logprob_chunks(logits, temperature, chunk_rows):
        if at_ids is not None:
            picked = lp.gather(1, at_ids[rows].clamp_min(0))
            out.at_logprobs[rows] = picked.masked_fill(at_ids[rows] < 0, -math.inf)
        top_lp, top_id = torch.topk(lp, top_width, dim=-1) if top_width else (lp[:, :0], lp[:, :0].long())
        out.top_logprobs[rows], out.top_ids[rows] = top_lp[:, :k], top_id[:, :k]
        if gold is not None:
            out.gold_logprob[rows] = lp.gather(1, gold[rows, None]).squeeze(1)
        if candidates:
            out.cand_ids[rows], out.cand_logprobs[rows] = _allowed_first(
                top_id[:, :width], top_lp[:, :width], gold[rows], banned, candidates
            )
        if uniforms is not None:
            out.sample_ids[rows], out.sample_counts[rows] = _unique_with_counts(_draw(lp, uniforms[rows]))
    return out


def _allowed_first(ids: torch.Tensor, lps: torch.Tensor, gold: torch.Tensor, banned: torch.Tensor, k: int):
    """The first ``k`` entries of each row of ``ids``/``lps`` [n, w] (descending) whose id is neither
    ``gold`` [n] nor in ``banned``; missing entries are id -1, log-prob -inf."""
    bad = (ids == gold[:, None]) | torch.isin(ids, banned)
    order = torch.sort(bad.to(torch.uint8), dim=1, stable=True).indices[:, :k]  # allowed first, in order
    pick_id, pick_lp = ids.gather(1, order), lps.gather(1, order)
    missing = bad.gather(1, order)
    if pick_id.shape[1] < k:  # fewer entries than k in all (a vocabulary smaller than k + banned)
        pad = k - pick_id.shape[1]
        pick_id = torch.nn.functional.pad(pick_id, (0, pad), value=-1)
        pick_lp = torch.nn.functional.pad(pick_lp, (0, pad), value=-math.inf)
        missing = torch.nn.functional.pad(missing, (0, pad), value=True)
    return pick_id.masked_fill(missing, -1), pick_lp.masked_fill(missing, -math.inf)


def _draw(lp: torch.Tensor, uniforms: torch.Tensor) -> torch.Tensor:
    """Ids [n, d] drawn from ``exp(lp)`` [n, V] by inverse CDF: draw j of row i is the first id whose
    cumulative mass exceeds ``uniforms[i, j] × total_i`` (float32 cumulative sums, so the mass
    resolution is ~6e-8 of a row, as in ``torch.multinomial`` on a GPU). An id of zero mass is
    never drawn: its cumulative mass equals its predecessor's."""
    cdf = lp.exp().cumsum_(dim=-1)
    total = cdf[:, -1:]
    # Strictly below the total, so that the search always lands on an id (one with mass).
    u = torch.minimum(uniforms * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, u.contiguous(), right=True)


def topk_logprobs(
    logits: torch.Tensor, k: int, temperature: float = 1.0, chunk_rows: int = DEFAULT_CHUNK_ROWS
) -> tuple[torch.Tensor, torch.Tensor]:
    """The top-``k`` tokens of ``p = softmax(logits / τ)`` with their exact log-probabilities.

    logits: [N, V], any float dtype. Returns ``ids`` [N, k] int64 and ``logprobs`` [N, k] float32,
    sorted by decreasing probability. The log-probs are normalised over all V tokens, so the tail
    mass ``m = 1 − Σ_k p`` is exact (see ``pipeline.modeling.sparse.tail_mass``).
    """
    _check_2d(logits)
    if not 1 <= k <= logits.shape[1]:
        raise ValueError(f"k must be in [1, V={logits.shape[1]}], got {k}")
    stats = row_statistics(logits, k, temperature=temperature, chunk_rows=chunk_rows)
    return stats.top_ids, stats.top_logprobs


def sample_uniforms(n_rows: int, n_draws: int, generator: torch.Generator) -> torch.Tensor:
    """float32 [n_rows, n_draws] uniforms in [0, 1) from ``generator`` (on its device): the draws'
    randomness, consumed row by row."""
    return torch.rand((n_rows, n_draws), generator=generator, device=generator.device)


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

    logits: [N, V]. The result is a function of ``generator``'s state (:func:`sample_uniforms`, then
    inverse CDF), independent of ``chunk_rows``. Returns ``ids`` [N, m] int64 (ascending per row)
    and ``counts`` [N, m] int32, ``m`` the largest number of unique ids in a row; shorter rows are
    padded with id −1 and count 0. Each row's counts sum to ``n_draws``.
    """
    if n_draws < 1:
        raise ValueError(f"n_draws must be >= 1, got {n_draws}")
    _check_2d(logits)
    uniforms = sample_uniforms(logits.shape[0], n_draws, generator)
    stats = row_statistics(logits, 0, temperature=temperature, uniforms=uniforms, chunk_rows=chunk_rows)
    m = int((stats.sample_counts > 0).sum(dim=1).max()) if logits.shape[0] else 0
    return stats.sample_ids[:, :m], stats.sample_counts[:, :m]


def _unique_with_counts(draws: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Row-wise unique values (ascending) and counts of ``draws`` [n, d] (int64 >= 0), [n, d] each,
    padded with -1 / 0."""
    s, _ = torch.sort(draws, dim=-1)
    new = torch.ones_like(s, dtype=torch.bool)
    new[:, 1:] = s[:, 1:] != s[:, :-1]
    group = new.cumsum(dim=-1) - 1  # [n, d]: index of each draw's unique value in its row
    ids = torch.full(s.shape, -1, dtype=torch.int64, device=s.device)
    ids.scatter_(1, group, s)  # all draws of a group carry the same value
    counts = torch.zeros(s.shape, dtype=torch.int32, device=s.device)
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


def choose_transitions(
    gold_logprob: torch.Tensor,
    cand_ids: torch.Tensor,
    cand_logprobs: torch.Tensor,
    positions: torch.Tensor,
    *,
    min_prob: float = 0.01,
    min_alt_mass: float = 0.05,
    max_positions: int = 64,
    proposer_logprobs: torch.Tensor | None = None,
) -> Transitions:
    """The selection of :func:`select_transitions` from one sample's :class:`RowStatistics`
    (``gold_logprob`` [N], ``cand_ids`` / ``cand_logprobs`` [N, K]; small tensors, on any device).

    With candidates another model proposed (``stage1_teacher.proposer``): ``cand_logprobs`` are the
    teacher's (stored, the TPA weights), ``proposer_logprobs`` [N, K] the proposer's, which
    ``min_prob`` applies to; ``gold_logprob`` is whichever model's mass selects the positions."""
    n = gold_logprob.shape[0]
    if cand_ids.shape != cand_logprobs.shape or cand_ids.ndim != 2 or cand_ids.shape[0] != n:
        raise ValueError(f"cand_ids and cand_logprobs must both be [N={n}, K], got "
                         f"{tuple(cand_ids.shape)} and {tuple(cand_logprobs.shape)}")
    if positions.shape != (n,):
        raise ValueError(f"positions must be [N={n}], got shape {tuple(positions.shape)}")
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    device = gold_logprob.device
    positions = positions.to(device)
    log_min_prob = math.log(min_prob) if min_prob > 0 else -math.inf
    alt_mass = -torch.expm1(gold_logprob)  # 1 - p(gold), without cancellation near p(gold) = 1
    gate = cand_logprobs if proposer_logprobs is None else proposer_logprobs.to(device)
    if gate.shape != cand_ids.shape:
        raise ValueError(f"proposer_logprobs must be [N={n}, K={cand_ids.shape[1]}], got {tuple(gate.shape)}")
    keep_cand = (gate >= log_min_prob) & torch.isfinite(gate) & (cand_ids >= 0)  # [N, K]; missing (-1, -inf) never passes
    eligible = (alt_mass >= min_alt_mass) & keep_cand.any(dim=1)
    rows = torch.nonzero(eligible).squeeze(1)
    if rows.numel() > max_positions:
        order = torch.sort(alt_mass[rows], descending=True, stable=True).indices[:max_positions]
        rows = torch.sort(rows[order]).values

    keep = keep_cand[rows]  # [S, K]
    cand_index = torch.arange(rows.numel(), device=device)[:, None].expand_as(keep)[keep]
    return Transitions(
        rows=rows,
        positions=positions[rows].long(),
        alt_mass=alt_mass[rows],
        cand_ids=cand_ids[rows][keep],
        cand_logprobs=cand_logprobs[rows][keep],
        cand_index=cand_index,
    )


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
    kept (ties: earlier row first), returned in position order. :func:`row_statistics` (candidates)
    then :func:`choose_transitions` (the selection).
    """
    _check_2d(logits)
    n = logits.shape[0]
    positions = torch.arange(n, device=logits.device) if positions is None else positions.to(logits.device)
    if positions.shape != (n,):
        raise ValueError(f"positions must be [N={n}], got shape {tuple(positions.shape)}")
    if max_positions < 1:
        raise ValueError(f"max_positions must be >= 1, got {max_positions}")
    if candidates < 1:
        raise ValueError(f"candidates must be in [1, V-1={logits.shape[1] - 1}], got {candidates}")
    stats = row_statistics(logits, 0, temperature=temperature, gold=gold, candidates=candidates,
                           exclude_ids=exclude_ids, chunk_rows=chunk_rows)
    return choose_transitions(stats.gold_logprob, stats.cand_ids, stats.cand_logprobs, positions,
                              min_prob=min_prob, min_alt_mass=min_alt_mass, max_positions=max_positions)
