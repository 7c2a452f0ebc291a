"""Stage 2 loss numerics: plain functions of tensors (DESIGN.md section 4).

Sparse teacher targets are compared on the (k+1)-bucket coarsening: the k stored token ids plus one
*tail* bucket holding the rest of the vocabulary (teacher: m_T = 1 - sum exp(teacher_logprobs), exact
because Stage 1 stores log-probs from a full-vocabulary log-softmax; student: 1 - sum p_S(ids)).

Why one file of ~600 lines: every formula of DESIGN §4 (the bucket coarsening, the five
divergences, and the SFT, KD, IVA, TPA and attention terms built on them) reads in one place, in
the order the design gives them, each next to the count its mean divides by (for the global batch
under DDP), and the tests address them as one module (``losses.X``); the tail bucket's own numerics
live in ``pipeline.modeling.sparse``.

Conventions the caller must know
--------------------------------
- Padding: an id of -1 marks an unused slot (rows with fewer than k entries). Padded slots carry no
  mass and never touch vocabulary entry 0. A row whose ids are all -1 is a padding row and is left
  out of every mean.
- Ids within a row are unique (top-k, or the unique ids of a sampled target) and index real tokens of
  the student vocabulary (Stage 2's reader checks the range, DESIGN 5.1).
- Divergences take (t_logp, s_logp, valid) bucket tensors [N, k+1] and return one value per row [N];
  the ``*_loss`` functions return scalars.
- Computation runs in float32 at least (half-precision logits are upcast; float64 stays float64).
- Temperature is fixed at dump time; nothing here takes a temperature.
- Generalised JSD uses the *normalised* convention (see `generalized_jsd`), so that it tends to
  forward KL as beta -> 0 and to reverse KL as beta -> 1. It is 4x the usual JSD at beta = 1/2 and
  differs from TRL's `generalized_jsd_loss` (unnormalised) by the factor 1 / (beta (1 - beta)).

[tail floor note] A tail mass is computed as 1 - (mass of the stored ids), a subtraction from 1. In a
dtype with machine epsilon eps, masses below ~eps are not resolvable, and a sum of stored
probabilities can round to >= 1 (a confident teacher: top-1 log-prob -1e-9 in float32). Both tails
are therefore floored at eps (1.2e-7 in float32, 2.2e-16 in float64): values stay finite (reverse KL
would otherwise be +inf when the teacher's tail rounds to 0), and the gradient through the student
tail, which scales like 1 / m_S times a rounding error of ~eps, stays O(1) instead of exploding.
The floor adds at most eps of mass per row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

from pipeline.modeling.sparse import tail_logprob

PAD_ID = -1
"""Id value of a padded (unused) slot in ``ids``."""

_NEG_INF = float("-inf")


# --------------------------------------------------------------------------------------------------
# Safe reductions
# --------------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over ``mask``; 0 (still attached to the graph) when the mask is empty.

    Args:
        values: [N] any float tensor. Masked-out entries may be inf/NaN; they are never read.
        mask: [N] bool (or 0/1).
    Returns:
        scalar: sum(values[mask]) / max(|mask|, 1).
    """
    mask = mask.to(torch.bool)
    total = torch.where(mask, values, 0.0).sum()
    return total / mask.sum().clamp_min(1)


def weighted_mean(values: Tensor, weights: Tensor) -> Tensor:
    """Weighted mean sum(w v) / sum(w); 0 (still attached to the graph) when all weights are 0.

    Args:
        values: [N] float. Entries with weight 0 may be inf/NaN; they are never read.
        weights: [N] non-negative.
    Returns:
        scalar.
    """
    weights = weights.to(values.dtype)
    used = weights > 0
    total = (torch.where(used, values, 0.0) * weights).sum()
    denom = weights.sum()
    return total / torch.where(denom > 0, denom, torch.ones_like(denom))


def _group_index(group: Tensor | None, n: int, device: torch.device) -> tuple[Tensor, int]:
    """Dense group index [n] in 0..G-1 and G, from arbitrary integer labels (None: one group)."""
    if group is None:
        return torch.zeros(n, dtype=torch.long, device=device), 1 if n else 0
    labels, inverse = torch.unique(group, return_inverse=True)
    return inverse, labels.numel()


def _grouped_weighted_mean(
    values: Tensor, weights: Tensor, inverse: Tensor, n_groups: int
) -> Tensor:
    """Mean over groups of the within-group weighted mean (weights renormalised per group).

        result = mean_g [ sum_{i in g} w_i v_i / sum_{i in g} w_i ]  over groups with sum w > 0

    Shared by IVA (group = sample) and TPA (group = position). ``inverse`` from `_group_index`.
    """
    weights = weights.to(values.dtype)
    used = weights > 0
    w = torch.where(used, weights, 0.0)
    weighted = torch.where(used, values, 0.0) * w
    w_sum = values.new_zeros(n_groups).index_add(0, inverse, w)
    wv_sum = values.new_zeros(n_groups).index_add(0, inverse, weighted)
    has_weight = w_sum > 0
    per_group = wv_sum / torch.where(has_weight, w_sum, torch.ones_like(w_sum))
    return masked_mean(per_group, has_weight)


# --------------------------------------------------------------------------------------------------
# Bucket distributions
# --------------------------------------------------------------------------------------------------


def _compute_dtype(x: Tensor) -> torch.dtype:
    return torch.promote_types(x.dtype, torch.float32)


def _student_logprobs_at(student_logits: Tensor, ids: Tensor) -> tuple[Tensor, Tensor]:
    """Student log-probs at ``ids`` with one logsumexp per row and a gather.

    Args:
        student_logits: [N, V].
        ids: [N, k] int64, PAD_ID (-1) at padded slots.
    Returns:
        logp [N, k] (compute dtype; -inf at padded slots), valid [N, k] bool.
    """
    logits = student_logits.to(_compute_dtype(student_logits))
    valid = ids >= 0
    lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    picked = logits.gather(-1, ids.clamp_min(0)) - lse
    return torch.where(valid, picked, _NEG_INF), valid


def bucket_logprobs(
    student_logits: Tensor, ids: Tensor, teacher_logprobs: Tensor
) -> tuple[Tensor, Tensor, Tensor]:
    """Teacher and student log-probs on the (k+1)-bucket coarsening.

    Bucket i < k is token ids[:, i]; bucket k is the tail (everything else):
        t_logp[:, k] = log(1 - sum_i exp(teacher_logprobs[:, i]))
        s_logp[:, k] = log(1 - sum_i p_S(ids[:, i]))
    both floored at eps of the compute dtype (see [tail floor note]).

    Args:
        student_logits: [N, V], differentiable; upcast to at least float32.
        ids: [N, k] int64 token ids, -1 at padded slots.
        teacher_logprobs: [N, k] exact teacher log-probs of ``ids`` (full-vocabulary log-softmax);
            values at padded slots are ignored. No gradient is taken.
    Returns:
        t_logp [N, k+1], s_logp [N, k+1]: -inf at padded slots.
        valid [N, k+1] bool: False at padded slots; the tail bucket is always valid.
    """
    if ids.shape != teacher_logprobs.shape or ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"shape mismatch: student_logits {tuple(student_logits.shape)}, ids {tuple(ids.shape)}, "
            f"teacher_logprobs {tuple(teacher_logprobs.shape)} (expected [N, V], [N, k], [N, k])"
        )
    return _buckets(*_student_logprobs_at(student_logits, ids), teacher_logprobs)


def _buckets(s_k: Tensor, valid_k: Tensor, teacher_logprobs: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """`bucket_logprobs` from the student's log-probs at the ids (``s_k`` [N, k], -inf at padded
    slots) instead of its logits: all the bucket losses need of the student."""
    t_k = torch.where(valid_k, teacher_logprobs.detach().to(s_k.dtype), _NEG_INF)
    t_logp = torch.cat([t_k, tail_logprob(t_k).unsqueeze(-1)], dim=-1)
    s_logp = torch.cat([s_k, tail_logprob(s_k).unsqueeze(-1)], dim=-1)
    valid = torch.cat([valid_k, torch.ones_like(valid_k[:, :1])], dim=-1)
    return t_logp, s_logp, valid


# --------------------------------------------------------------------------------------------------
# Divergences on bucket distributions: (t_logp, s_logp, valid) [N, B] -> [N]
# --------------------------------------------------------------------------------------------------


def _sanitize(t_logp: Tensor, s_logp: Tensor, valid: Tensor) -> tuple[Tensor, Tensor]:
    # Padded buckets become log-prob 0 in *both* distributions: identical entries contribute exactly
    # 0 to every divergence term below, and no -inf reaches an arithmetic op whose gradient could
    # turn 0 * inf into NaN.
    return torch.where(valid, t_logp, 0.0), torch.where(valid, s_logp, 0.0)


def _kl_terms(p_logp: Tensor, q_logp: Tensor) -> Tensor:
    """Elementwise p (log p - log q), exactly 0 with zero gradient where p = 0 (0 log 0 = 0)."""
    has_mass = p_logp > _NEG_INF
    p = torch.where(has_mass, p_logp, 0.0)
    q = torch.where(has_mass, q_logp, 0.0)
    return torch.where(has_mass, p.exp() * (p - q), 0.0)


def _log_mix(a_logp: Tensor, b_logp: Tensor, w: float) -> Tensor:
    """log(w exp(a) + (1 - w) exp(b)), exact at w = 0 and w = 1, gradient-safe where a = b = -inf."""
    if w == 0.0:
        return b_logp
    if w == 1.0:
        return a_logp
    empty = (a_logp == _NEG_INF) & (b_logp == _NEG_INF)
    a = torch.where(empty, 0.0, a_logp) + math.log(w)
    b = torch.where(empty, 0.0, b_logp) + math.log1p(-w)
    return torch.where(empty, _NEG_INF, torch.logaddexp(a, b))


def _check_unit(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")


def forward_kl(t_logp: Tensor, s_logp: Tensor, valid: Tensor) -> Tensor:
    """KL(T || S) = sum_i T_i (log T_i - log S_i) per row. Shapes: [N, B] x3 -> [N]."""
    t, s = _sanitize(t_logp, s_logp, valid)
    return _kl_terms(t, s).sum(-1)


def reverse_kl(t_logp: Tensor, s_logp: Tensor, valid: Tensor) -> Tensor:
    """KL(S || T) = sum_i S_i (log S_i - log T_i) per row. Shapes: [N, B] x3 -> [N]."""
    t, s = _sanitize(t_logp, s_logp, valid)
    return _kl_terms(s, t).sum(-1)


def generalized_jsd(t_logp: Tensor, s_logp: Tensor, valid: Tensor, beta: float = 0.5) -> Tensor:
    """Normalised generalised Jensen-Shannon divergence per row. Shapes: [N, B] x3 -> [N].

        M = beta T + (1 - beta) S
        JSD_beta = [beta KL(T || M) + (1 - beta) KL(S || M)] / (beta (1 - beta))
                 = KL(T || M) / (1 - beta) + KL(S || M) / beta

    The 1 / (beta (1 - beta)) normalisation makes the limits the KLs: KL(S || M) = O(beta^2) as
    beta -> 0, so JSD -> KL(T || S) (forward); symmetrically JSD -> KL(S || T) (reverse) as beta -> 1.
    beta = 0 and beta = 1 return those KLs exactly. At beta = 1/2 it is 4 x the usual JSD.
    (Same mixture as TRL's generalized_jsd_loss / GKD, Agarwal et al. 2024, without the scale.)
    Accuracy of the KL(S || M) / beta term degrades like eps / beta for beta very close to 0 or 1;
    use exactly 0 or 1 for the pure KLs.
    """
    _check_unit("beta", beta)
    if beta == 0.0:
        return forward_kl(t_logp, s_logp, valid)
    if beta == 1.0:
        return reverse_kl(t_logp, s_logp, valid)
    t, s = _sanitize(t_logp, s_logp, valid)
    m = _log_mix(t, s, beta)
    return _kl_terms(t, m).sum(-1) / (1.0 - beta) + _kl_terms(s, m).sum(-1) / beta


def skew_forward_kl(t_logp: Tensor, s_logp: Tensor, valid: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew forward KL, KL(T || alpha T + (1 - alpha) S) per row (DistiLLM, Ko et al. 2024).

    alpha = 0 is forward KL; alpha = 1 is identically 0. Shapes: [N, B] x3 -> [N].
    """
    _check_unit("alpha", alpha)
    t, s = _sanitize(t_logp, s_logp, valid)
    return _kl_terms(t, _log_mix(t, s, alpha)).sum(-1)


def skew_reverse_kl(t_logp: Tensor, s_logp: Tensor, valid: Tensor, alpha: float = 0.1) -> Tensor:
    """Skew reverse KL, KL(S || alpha S + (1 - alpha) T) per row (DistiLLM, Ko et al. 2024).

    alpha = 0 is reverse KL; alpha = 1 is identically 0. Shapes: [N, B] x3 -> [N].
    """
    _check_unit("alpha", alpha)
    t, s = _sanitize(t_logp, s_logp, valid)
    return _kl_terms(s, _log_mix(s, t, alpha)).sum(-1)


def tvd(t_logp: Tensor, s_logp: Tensor, valid: Tensor) -> Tensor:
    """Total variation distance 0.5 sum_i |T_i - S_i| per row. Shapes: [N, B] x3 -> [N]."""
    t, s = _sanitize(t_logp, s_logp, valid)
    return 0.5 * (t.exp() - s.exp()).abs().sum(-1)


_DIVERGENCE_FNS: dict[str, Callable[..., Tensor]] = {
    "forward_kl": lambda t, s, v, beta, alpha: forward_kl(t, s, v),
    "reverse_kl": lambda t, s, v, beta, alpha: reverse_kl(t, s, v),
    "jsd": lambda t, s, v, beta, alpha: generalized_jsd(t, s, v, beta),
    "skew_forward_kl": lambda t, s, v, beta, alpha: skew_forward_kl(t, s, v, alpha),
    "skew_reverse_kl": lambda t, s, v, beta, alpha: skew_reverse_kl(t, s, v, alpha),
    "tvd": lambda t, s, v, beta, alpha: tvd(t, s, v),
}
DIVERGENCES = tuple(_DIVERGENCE_FNS)
"""Names accepted by `divergence` and the ``*_loss`` functions."""


def _divergence_fn(name: str) -> Callable[..., Tensor]:
    fn = _DIVERGENCE_FNS.get(name)
    if fn is None:
        raise ValueError(f"unknown divergence {name!r}; valid names: {', '.join(DIVERGENCES)}")
    return fn


def divergence(
    name: str,
    t_logp: Tensor,
    s_logp: Tensor,
    valid: Tensor,
    *,
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """Per-row divergence D(T || S) [N] by name (one of DIVERGENCES).

    ``beta`` is used by "jsd" only, ``alpha`` by the skew KLs only.
    """
    return _divergence_fn(name)(t_logp, s_logp, valid, beta, alpha)


def _rows_from(
    s_k: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    name: str,
    beta: float,
    alpha: float,
) -> Tensor:
    """Per-row divergence [N] from the student's log-probs at ``ids`` (``s_k`` [N, k])."""
    t_logp, s_logp, valid = _buckets(s_k, ids >= 0, teacher_logprobs)
    return divergence(name, t_logp, s_logp, valid, beta=beta, alpha=alpha)


# --------------------------------------------------------------------------------------------------
# Sampled target (DESIGN 3.1, Anshumann et al. 2025)
# --------------------------------------------------------------------------------------------------


def sampled_forward_kl(
    student_logits: Tensor,
    ids: Tensor,
    counts: Tensor,
    n_draws: Tensor | int | None = None,
) -> Tensor:
    """Forward KL against an unbiased sampled teacher target, per row.

    Stage 1 drew n ids from p_T with replacement and stored the unique ids with their counts; the
    estimate q_i = c_i / n has E[q_i] = p_T(i). Per row:

        loss = sum_i q_i (log q_i - log p_S(id_i))

    The cross-entropy part -sum_i q_i log p_S(id_i) is linear in q, so it and its gradient
    (p_S - q, over the vocabulary) are unbiased for those of KL(p_T || p_S). The constant
    sum_i q_i log q_i carries no gradient; it is included so that the value is a KL between
    distributions (>= 0, and 0 when p_S equals q on its support), which makes logs comparable with
    the exact forward KL. Its expectation is not -H(p_T), so the *value* is biased upwards by
    roughly (unique ids - 1) / (2 n) even when p_S = p_T. No tail bucket: q sums to 1 over the ids.

    Args:
        student_logits: [N, V], differentiable.
        ids: [N, m] int64 unique drawn ids, -1 at padded slots.
        counts: [N, m] draw counts, 0 at padded slots.
        n_draws: [N] or int, draws per row; None means counts.sum(-1). Rows with n = 0 give 0.
    Returns:
        [N].
    """
    if ids.shape != counts.shape or ids.shape[0] != student_logits.shape[0]:
        raise ValueError(
            f"shape mismatch: student_logits {tuple(student_logits.shape)}, ids {tuple(ids.shape)}, "
            f"counts {tuple(counts.shape)} (expected [N, V], [N, m], [N, m])"
        )
    s_logp, _ = _student_logprobs_at(student_logits, ids)
    return _sampled_rows(s_logp, ids, _draws_per_row(ids, counts, n_draws), counts)


def _draws_per_row(ids: Tensor, counts: Tensor, n_draws: Tensor | int | None) -> Tensor:
    """[N] draws of each row: ``n_draws`` broadcast, or the row's counts summed over its valid slots."""
    if n_draws is None:
        return torch.where(ids >= 0, counts, 0).sum(-1)
    return torch.as_tensor(n_draws, device=ids.device).expand(ids.shape[0])


def _sampled_rows(s_logp: Tensor, ids: Tensor, n: Tensor, counts: Tensor) -> Tensor:
    """`sampled_forward_kl` per row from the student's log-probs at ``ids`` (``s_logp`` [N, m])."""
    counts = torch.where(ids >= 0, counts.to(s_logp.dtype), 0.0)
    q = counts / n.to(s_logp.dtype).clamp_min(1).unsqueeze(-1)
    q_logp = torch.where(q > 0, q.log(), _NEG_INF)
    return _kl_terms(q_logp, s_logp).sum(-1)


def sampled_kd_loss(
    student_logits: Tensor, ids: Tensor, counts: Tensor, n_draws: Tensor | int | None = None
) -> Tensor:
    """Mean of `sampled_forward_kl` over rows with at least one draw (padding rows left out)."""
    return sampled_kd_term(ids, counts, n_draws).of_logits(student_logits)


def sampled_iva_loss(student_logits: Tensor, ids: Tensor, counts: Tensor, weights: Tensor,
                     group: Tensor | None = None) -> Tensor:
    """L_IVA against sampled targets of the visual rows: `iva_loss`'s saliency weighting (per sample,
    renormalised over its rows with a draw) of `sampled_forward_kl` per row. ``counts`` may be
    fractional (a student cell pooled from several teacher cells: their overlap-weighted mean)."""
    return sampled_iva_term(ids, counts, weights, group).of_logits(student_logits)


def sampled_tpa_loss(student_logits: Tensor, ids: Tensor, counts: Tensor, candidate_logprob: Tensor,
                     group: Tensor) -> Tensor:
    """L_TPA against sampled targets of the branch rows: `tpa_loss`'s candidate weighting of
    `sampled_forward_kl` per row."""
    return sampled_tpa_term(ids, counts, candidate_logprob, group).of_logits(student_logits)


# --------------------------------------------------------------------------------------------------
# Loss terms (DESIGN 4)
# --------------------------------------------------------------------------------------------------


def sft_loss(logits: Tensor, labels: Tensor, ignore_index: int = -100) -> Tensor:
    """L_SFT: mean cross-entropy over labelled positions; 0 (attached) when none is labelled.

    Args:
        logits: [..., V] (e.g. [B, T, V]); logits at position t predict labels at t (the caller has
            already shifted).
        labels: [...] int64, ``ignore_index`` where unlabelled.
    Returns:
        scalar.
    """
    flat = logits.reshape(-1, logits.shape[-1]).to(_compute_dtype(logits))
    flat_labels = labels.reshape(-1)
    per_token = F.cross_entropy(flat, flat_labels, ignore_index=ignore_index, reduction="none")
    return masked_mean(per_token, flat_labels != ignore_index)


def kd_loss(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """L_KD: mean over rows (response positions) of D(T || S) on the bucket distributions.

    Args:
        student_logits: [N, V]; ids, teacher_logprobs: [N, k] (see `bucket_logprobs`).
        divergence: one of DIVERGENCES; beta (jsd) and alpha (skew KLs) as in `divergence`.
    Returns:
        scalar; padding rows (all ids -1) are left out; 0 when no row remains.
    """
    return kd_term(ids, teacher_logprobs, divergence, beta, alpha).of_logits(student_logits)


def iva_loss(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    weights: Tensor,
    group: Tensor | None = None,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """L_IVA: saliency-weighted divergence over the stored visual positions.

        L = mean_samples  sum_{v in sample} w~_v D(p_T(.|x<=v) || p_S(.|x<=v)),
        w~_v = w_v / sum_{v' in sample, valid} w_v'

    Args:
        student_logits: [N, V] at visual positions; ids, teacher_logprobs: [N, k].
        weights: [N] non-negative saliency s-bar of each row's position (any scale; renormalised).
        group: [N] sample index of each row (any integer labels); None means one sample.
        divergence, beta, alpha: as in `kd_loss`.
    Returns:
        scalar; samples with no valid row or zero total weight are left out; 0 when none remains.
    """
    return iva_term(ids, teacher_logprobs, weights, group, divergence, beta, alpha).of_logits(student_logits)


def tpa_loss(
    student_logits: Tensor,
    ids: Tensor,
    teacher_logprobs: Tensor,
    candidate_logprob: Tensor,
    group: Tensor,
    divergence: str = "forward_kl",
    beta: float = 0.5,
    alpha: float = 0.1,
) -> Tensor:
    """L_TPA: candidate-weighted divergence of the transition distributions.

        L = sum_t sum_{c in C_t} w_{t,c} D(p_T(.|x<=t, c) || p_S(.|x<=t, c)) / sum_{t,c} w_{t,c},
        w_{t,c} = p_T(c|x<=t) / sum_{c' in C_t} p_T(c'|x<=t)

    Since w is normalised within each position, sum w = number of positions and L is the mean over
    positions of the within-position weighted divergence.

    Args:
        student_logits: [N, V] at branch rows (one row per (t, c)); ids, teacher_logprobs: [N, k'].
        candidate_logprob: [N] teacher log p_T(c|x<=t) of the row's candidate.
        group: [N] position key: equal for the candidates of one position t, distinct across
            positions *and samples* of the batch (e.g. a running position index).
        divergence, beta, alpha: as in `kd_loss`.
    Returns:
        scalar; 0 when no valid row.
    """
    return tpa_term(ids, teacher_logprobs, candidate_logprob, group, divergence, beta, alpha).of_logits(student_logits)


# --------------------------------------------------------------------------------------------------
# Row terms: every loss above as (per-row value of the student's log-probs at a few ids, reduction)
# --------------------------------------------------------------------------------------------------
# [row term note] Each sparse term reads the student only through log p_S(id) at the k ids of each
# of its rows, and is a *linear* reduction (a masked or weighted mean, weights from the teacher) of
# per-row values. So the loss is sum_r c_r v_r(s_r) with constants c_r, and its gradient with respect
# to row r's logits needs row r alone: d/dz_r = c_r sum_i (dv_r/ds_ri)(e_{id_i} - softmax(z_r)).
# `fused_head_loss` uses that to apply the output head in row chunks and take the gradient chunk by
# chunk in the forward pass, so no [N, V] logits tensor exists at any time (the technique of fused
# linear cross-entropy kernels, generalised to the bucket divergences). The functions above
# (`kd_loss`, ...) are the same terms evaluated on given logits: one copy of each formula.


@dataclass
class RowTerm:
    """One loss term as the fused head evaluates it.

    ``ids`` [n, k]: the token ids each row reads (PAD_ID at padded slots). ``values(s_logp, sel)``:
    the per-row values [m] of rows ``sel`` (an index tensor, or None for all rows) from the student's
    log-probs at their ids (``s_logp`` [m, k], -inf at padded slots). ``reduce``: [n] -> scalar, linear
    in its input (a mean whose weights do not depend on the student).
    """

    ids: Tensor
    values: Callable[[Tensor, Tensor | None], Tensor]
    reduce: Callable[[Tensor], Tensor]

    def of_logits(self, student_logits: Tensor) -> Tensor:
        """The term on given logits [n, V]."""
        if student_logits.ndim != 2 or student_logits.shape[0] != self.ids.shape[0]:
            raise ValueError(
                f"shape mismatch: student_logits {tuple(student_logits.shape)}, ids {tuple(self.ids.shape)} "
                "(expected [N, V] and [N, k])"
            )
        s_logp, _ = _student_logprobs_at(student_logits, self.ids)
        return self.reduce(self.values(s_logp, None))


def _pick(x: Tensor, sel: Tensor | None) -> Tensor:
    return x if sel is None else x[sel]


def sft_term(labels: Tensor, ignore_index: int = -100) -> RowTerm:
    """`sft_loss` as a row term: rows [n] read the id of their label (``labels`` [n])."""
    labelled = labels != ignore_index
    ids = torch.where(labelled, labels, PAD_ID).unsqueeze(-1)
    return RowTerm(ids, lambda s, sel: -s[:, 0], lambda v: masked_mean(v, labelled))


def kd_term(ids: Tensor, teacher_logprobs: Tensor, divergence: str = "forward_kl",
            beta: float = 0.5, alpha: float = 0.1) -> RowTerm:
    """`kd_loss` as a row term."""
    _check_targets(ids, teacher_logprobs, "teacher_logprobs")
    _divergence_fn(divergence)  # fail on a bad name before any work
    return RowTerm(
        ids,
        lambda s, sel: _rows_from(s, _pick(ids, sel), _pick(teacher_logprobs, sel), divergence, beta, alpha),
        lambda v: masked_mean(v, (ids >= 0).any(-1)),
    )


def _sampled_values(ids: Tensor, counts: Tensor, n_draws: Tensor | int | None = None):
    """The ``values`` of a row term against a sampled target: `sampled_forward_kl` of rows ``sel``."""
    _check_targets(ids, counts, "counts")
    n = _draws_per_row(ids, counts, n_draws)
    return lambda s, sel: _sampled_rows(s, _pick(ids, sel), _pick(n, sel), _pick(counts, sel))


def _sampled_row_valid(ids: Tensor, counts: Tensor) -> Tensor:
    """[N] rows of a sampled target with at least one draw."""
    return ((ids >= 0) & (counts > 0)).any(-1)


def _topk_values(ids: Tensor, teacher_logprobs: Tensor, divergence: str, beta: float, alpha: float):
    """The ``values`` of a row term against a stored top-k: the bucket divergence of rows ``sel``."""
    _check_targets(ids, teacher_logprobs, "teacher_logprobs")
    _divergence_fn(divergence)  # fail on a bad name before any work
    return lambda s, sel: _rows_from(s, _pick(ids, sel), _pick(teacher_logprobs, sel), divergence, beta, alpha)


def _iva_reduce(row_valid: Tensor, weights: Tensor, group: Tensor | None) -> Callable[[Tensor], Tensor]:
    """IVA's reduction: per sample (``group``), the ``weights``-weighted mean over its valid rows,
    then the mean over samples."""
    inverse, n_groups = _group_index(group, row_valid.shape[0], row_valid.device)
    return lambda v: _grouped_weighted_mean(v, torch.where(row_valid, weights.detach().to(v.dtype), 0.0), inverse, n_groups)


def _tpa_reduce(row_valid: Tensor, candidate_logprob: Tensor, group: Tensor) -> Callable[[Tensor], Tensor]:
    """TPA's reduction: per position (``group``), the mean over its valid rows weighted by
    p_T(c) renormalised over them, then the mean over positions."""
    inverse, n_groups = _group_index(group, row_valid.shape[0], row_valid.device)

    def reduce(v: Tensor) -> Tensor:
        logw = torch.where(row_valid, candidate_logprob.detach().to(v.dtype), _NEG_INF)
        # Shift by the group max before exp (normalised weights are unchanged; nothing underflows).
        gmax = logw.new_full((n_groups,), _NEG_INF).scatter_reduce(0, inverse, logw, "amax")
        w = torch.where(logw > _NEG_INF, logw - gmax[inverse], _NEG_INF).exp()
        return _grouped_weighted_mean(v, w, inverse, n_groups)

    return reduce


def sampled_kd_term(ids: Tensor, counts: Tensor, n_draws: Tensor | int | None = None) -> RowTerm:
    """`sampled_kd_loss` as a row term."""
    values = _sampled_values(ids, counts, n_draws)
    return RowTerm(ids, values, lambda v: masked_mean(v, _sampled_row_valid(ids, counts)))


def iva_term(ids: Tensor, teacher_logprobs: Tensor, weights: Tensor, group: Tensor | None = None,
             divergence: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1) -> RowTerm:
    """`iva_loss` as a row term."""
    values = _topk_values(ids, teacher_logprobs, divergence, beta, alpha)
    return RowTerm(ids, values, _iva_reduce((ids >= 0).any(-1), weights, group))


def sampled_iva_term(ids: Tensor, counts: Tensor, weights: Tensor, group: Tensor | None = None) -> RowTerm:
    """`sampled_iva_loss` as a row term: `iva_term`'s reduction of the sampled forward KL."""
    values = _sampled_values(ids, counts)
    return RowTerm(ids, values, _iva_reduce(_sampled_row_valid(ids, counts), weights, group))


def tpa_term(ids: Tensor, teacher_logprobs: Tensor, candidate_logprob: Tensor, group: Tensor,
             divergence: str = "forward_kl", beta: float = 0.5, alpha: float = 0.1) -> RowTerm:
    """`tpa_loss` as a row term."""
    values = _topk_values(ids, teacher_logprobs, divergence, beta, alpha)
    return RowTerm(ids, values, _tpa_reduce((ids >= 0).any(-1), candidate_logprob, group))


def sampled_tpa_term(ids: Tensor, counts: Tensor, candidate_logprob: Tensor, group: Tensor) -> RowTerm:
    """`sampled_tpa_loss` as a row term: `tpa_term`'s reduction of the sampled forward KL."""
    values = _sampled_values(ids, counts)
    return RowTerm(ids, values, _tpa_reduce(_sampled_row_valid(ids, counts), candidate_logprob, group))


def _check_targets(ids: Tensor, other: Tensor, name: str) -> None:
    if ids.ndim != 2 or ids.shape != other.shape:
        raise ValueError(f"shape mismatch: ids {tuple(ids.shape)}, {name} {tuple(other.shape)} (expected [N, k] both)")


# --------------------------------------------------------------------------------------------------
# The fused head: output projection + every row term, in row chunks
# --------------------------------------------------------------------------------------------------

DEFAULT_HEAD_CHUNK_ROWS = 256


@dataclass
class HeadTerm:
    """A row term placed on the fused head's input: ``rows`` [n] are its rows' indices into the
    hidden states, ``scale`` its weight in the total (the recipe's weight, times the DDP share)."""

    term: RowTerm
    rows: Tensor
    scale: float


def _linear_coefficients(term: RowTerm, dtype: torch.dtype) -> Tensor:
    """c [n] with ``term.reduce(v) == sum(c * v)``: the gradient of the linear reduction."""
    n = term.ids.shape[0]
    v = torch.zeros(n, dtype=dtype, device=term.ids.device, requires_grad=True)
    with torch.enable_grad():
        out = term.reduce(v)
    if not out.requires_grad:  # no row takes part
        return torch.zeros(n, dtype=dtype, device=v.device)
    (c,) = torch.autograd.grad(out, v)
    return c


class _FusedHead(torch.autograd.Function):
    """sum_t scale_t term_t(log_softmax(hidden @ W[:V].T + b[:V])), gradients taken in the forward.

    Returns (total scalar, values [T] of the terms, unscaled and not differentiable). Backward only
    scales the stored gradients by the incoming one ([row term note])."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, terms, vocab_size, chunk_rows):
        want_h, want_w = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        want_b = bias is not None and ctx.needs_input_grad[2]
        n_vocab = weight.shape[0] if vocab_size is None else vocab_size
        w, b = weight[:n_vocab], None if bias is None else bias[:n_vocab]
        dtype = _compute_dtype(hidden)
        device = hidden.device
        grad_h = torch.zeros_like(hidden) if want_h else None
        grad_w = torch.zeros(w.shape, dtype=torch.promote_types(weight.dtype, torch.float32), device=device) if want_w else None
        grad_b = torch.zeros(n_vocab, dtype=grad_w.dtype if grad_w is not None else dtype, device=device) if want_b else None
        coefs = [_linear_coefficients(t.term, dtype) for t in terms]
        values = torch.zeros(len(terms), dtype=dtype, device=device)
        for start in range(0, hidden.shape[0], chunk_rows):
            stop = min(start + chunk_rows, hidden.shape[0])
            h = hidden[start:stop]
            z = F.linear(h, w, b).to(dtype)  # [c, V]: the only vocabulary-wide tensor, one chunk of it
            lse = torch.logsumexp(z, dim=-1)
            g_rows = torch.zeros(stop - start, dtype=dtype, device=device)  # sum_i dL/ds_ri per row
            scatter = []
            for i, (t, c) in enumerate(zip(terms, coefs)):
                sel = ((t.rows >= start) & (t.rows < stop)).nonzero().squeeze(1)
                if sel.numel() == 0:
                    continue
                local, ids = t.rows[sel] - start, t.term.ids[sel]
                valid = ids >= 0
                s = torch.where(valid, z[local[:, None], ids.clamp_min(0)] - lse[local, None], _NEG_INF)
                s = s.detach().requires_grad_()
                with torch.enable_grad():
                    v = t.term.values(s, sel)
                    c_sel = c[sel].to(v.dtype)
                    part = torch.where(c_sel != 0, v * c_sel, 0.0).sum()
                values[i] += part.detach()
                if not part.requires_grad:
                    continue
                (g,) = torch.autograd.grad(part, s)
                g = torch.where(valid, g, 0.0) * t.scale
                g_rows.index_add_(0, local, g.sum(-1))
                scatter.append((local[:, None].expand_as(ids)[valid], ids[valid], g[valid]))
            if not (want_h or want_w or want_b):
                continue
            # d/dz of sum_i g_i log_softmax(z)_{id_i} = scatter(g) - softmax(z) * sum_i g_i, in place on z.
            dz = z.sub_(lse[:, None]).exp_().mul_(-g_rows[:, None])
            for r, col, g in scatter:
                dz.index_put_((r, col), g, accumulate=True)
            dz_w = dz.to(w.dtype)
            if want_h:
                grad_h[start:stop] = (dz_w @ w).to(hidden.dtype)
            if want_w and grad_w.dtype == h.dtype:
                grad_w.addmm_(dz_w.T, h)
            elif want_w:  # half-precision head: accumulate the chunks' products in float32
                grad_w.add_(dz_w.T @ h)
            if want_b:
                grad_b.add_(dz.sum(0))
        ctx.save_for_backward(*(g for g in (grad_h, grad_w, grad_b) if g is not None))
        ctx.have = (want_h, want_w, want_b)
        ctx.full_rows = weight.shape[0]
        total = sum((t.scale * values[i] for i, t in enumerate(terms)), torch.zeros((), dtype=dtype, device=device))
        ctx.mark_non_differentiable(values)
        return total, values

    @staticmethod
    def backward(ctx, grad_total, grad_values):
        saved = list(ctx.saved_tensors)
        grads = [saved.pop(0) if have else None for have in ctx.have]
        grad_h, grad_w, grad_b = (None if g is None else g * grad_total.to(g.dtype) for g in grads)
        if grad_w is not None and grad_w.shape[0] != ctx.full_rows:  # padded head rows: no gradient
            grad_w = F.pad(grad_w, (0, 0, 0, ctx.full_rows - grad_w.shape[0]))
        if grad_b is not None and grad_b.shape[0] != ctx.full_rows:
            grad_b = F.pad(grad_b, (0, ctx.full_rows - grad_b.shape[0]))
        return grad_h, grad_w, grad_b, None, None, None


def fused_head_loss(
    hidden: Tensor,
    weight: Tensor,
    bias: Tensor | None,
    terms: list[HeadTerm],
    vocab_size: int | None = None,
    chunk_rows: int = DEFAULT_HEAD_CHUNK_ROWS,
) -> tuple[Tensor, Tensor]:
    """``sum_t scale_t * term_t`` on the logits ``hidden @ weight[:V].T + bias[:V]``, and each term's
    unscaled value, without materialising those logits ([row term note]).

    Args:
        hidden: [N, d] final hidden states of the rows the terms read (differentiable).
        weight, bias: the output head ([V_rows, d], [V_rows] or None), e.g. from
            ``pipeline.modeling.logits.output_head``.
        terms: the row terms, each with its rows' indices into ``hidden`` and its scale.
        vocab_size: the real tokens; head rows at or above it are padding and are no column of the
            distributions (None: every row).
        chunk_rows: rows per chunk: the float32 working set is one ``chunk_rows x V`` tensor (256 x
            151,936 x 4 B = 156 MB; plus its half-precision copy for the matmuls in bf16). On 2 CPU
            cores at V = 151,936, d = 512, chunks of 128-256 rows ran as fast as 1,024-row ones.
    Returns:
        (total scalar, differentiable; values [T] of the unscaled terms, detached). Values and
        gradients equal those of the terms evaluated on the full logits (``RowTerm.of_logits``),
        which ``tests/test_fused_head.py`` checks in float64.
    """
    if hidden.ndim != 2 or weight.ndim != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden [N, d] and weight [V, d] expected, got {tuple(hidden.shape)} and {tuple(weight.shape)}")
    if vocab_size is not None and not 0 < vocab_size <= weight.shape[0]:
        raise ValueError(f"vocab_size must be in [1, {weight.shape[0]}], got {vocab_size}")
    if chunk_rows < 1:
        raise ValueError(f"chunk_rows must be >= 1, got {chunk_rows}")
    for t in terms:
        if t.rows.shape != t.term.ids.shape[:1]:
            raise ValueError(f"a term's rows {tuple(t.rows.shape)} do not match its ids {tuple(t.term.ids.shape)}")
        if t.rows.numel() and (int(t.rows.min()) < 0 or int(t.rows.max()) >= hidden.shape[0]):
            raise ValueError(f"a term's rows must index the {hidden.shape[0]} hidden rows")
    return _FusedHead.apply(hidden, weight, bias, terms, vocab_size, chunk_rows)


def attention_kl(
    student_attn: Tensor, teacher_saliency: Tensor, mask: Tensor | None = None
) -> Tensor:
    """Optional IVA attention variant: mean over turns of KL(teacher map || student map).

    Both maps are renormalised over the masked visual positions of each row before the KL; the
    student map is the student's own instruction-to-visual attention (DESIGN 3.2), differentiable.

    Args:
        student_attn: [M, P] non-negative, one row per turn, P visual positions (padded).
        teacher_saliency: [M, P] non-negative stored map s_j (any scale).
        mask: [M, P] bool, True at real visual positions; None means all.
    Returns:
        scalar; rows with no position, or zero teacher or student mass, are left out.
    """
    a, t, a_sum, t_sum, row_ok = _attention_masses(student_attn, teacher_saliency, mask)
    dtype = a.dtype
    if mask is None:
        mask = torch.ones_like(student_attn, dtype=torch.bool)
    tiny = torch.finfo(dtype).tiny
    s_logp = a.clamp_min(tiny).log() - a_sum.clamp_min(tiny).log()
    t_logp = t.clamp_min(tiny).log() - t_sum.clamp_min(tiny).log()
    t_logp = torch.where(mask & (t > 0), t_logp, _NEG_INF)
    rows = _kl_terms(t_logp, torch.where(mask, s_logp, 0.0)).sum(-1)
    return masked_mean(rows, row_ok)


def _attention_masses(student_attn: Tensor, teacher_saliency: Tensor, mask: Tensor | None):
    """Masked maps, their sums and the rows `attention_kl` keeps (shared with `attention_count`)."""
    dtype = _compute_dtype(student_attn)
    if mask is None:
        mask = torch.ones_like(student_attn, dtype=torch.bool)
    a = torch.where(mask, student_attn.to(dtype), 0.0)
    t = torch.where(mask, teacher_saliency.detach().to(dtype), 0.0)
    a_sum, t_sum = a.sum(-1, keepdim=True), t.sum(-1, keepdim=True)
    return a, t, a_sum, t_sum, ((a_sum > 0) & (t_sum > 0)).squeeze(-1)


# --------------------------------------------------------------------------------------------------
# Denominators: how many rows (or groups) each term's mean divides by
# --------------------------------------------------------------------------------------------------
# [ddp note] Every term is a mean over rows or groups of one batch, so the mean of a global batch
# split across processes is sum_r n_r * mean_r / sum_r n_r, not the mean of the per-process means.
# The trainer reduces these counts across processes to weigh each process's share exactly
# (``stage2_student.distill.compute_losses``). Each count mirrors its loss's mask; a test checks
# loss(A u B) == (n_A loss(A) + n_B loss(B)) / (n_A + n_B) for every term.


def sft_count(labels: Tensor, ignore_index: int = -100) -> int:
    """Denominator of `sft_loss`: labelled positions."""
    return int((labels != ignore_index).sum())


def kd_count(ids: Tensor) -> int:
    """Denominator of `kd_loss`: rows with at least one stored id."""
    return int((ids >= 0).any(-1).sum())


def sampled_kd_count(ids: Tensor, counts: Tensor) -> int:
    """Denominator of `sampled_kd_loss`: rows with at least one draw."""
    return int(((ids >= 0) & (counts > 0)).any(-1).sum())


def iva_count(ids: Tensor, weights: Tensor, group: Tensor | None = None) -> int:
    """Denominator of `iva_loss`: samples with a valid row of positive weight."""
    used = (ids >= 0).any(-1) & (weights > 0)
    if group is None:
        return int(used.any())
    return int(torch.unique(group[used]).numel())


def tpa_count(ids: Tensor, candidate_logprob: Tensor, group: Tensor) -> int:
    """Denominator of `tpa_loss`: positions with a valid row (its weight is > 0 after the shift by the group max)."""
    used = (ids >= 0).any(-1) & (candidate_logprob > _NEG_INF)
    return int(torch.unique(group[used]).numel())


def _drawn_ids(ids: Tensor, counts: Tensor) -> Tensor:
    """A sampled target's ids with the slots that hold no draw padded: a row is valid when one remains."""
    return torch.where(counts > 0, ids, PAD_ID)


def sampled_iva_count(ids: Tensor, counts: Tensor, weights: Tensor, group: Tensor | None = None) -> int:
    """Denominator of `sampled_iva_loss`: samples with a row of positive weight and a draw."""
    return iva_count(_drawn_ids(ids, counts), weights, group)


def sampled_tpa_count(ids: Tensor, counts: Tensor, candidate_logprob: Tensor, group: Tensor) -> int:
    """Denominator of `sampled_tpa_loss`: positions with a row that has a draw."""
    return tpa_count(_drawn_ids(ids, counts), candidate_logprob, group)


def attention_count(student_attn: Tensor, teacher_saliency: Tensor, mask: Tensor | None = None) -> int:
    """Denominator of `attention_kl`: turns with student and teacher mass."""
    return int(_attention_masses(student_attn, teacher_saliency, mask)[-1].sum())


def total_loss(
    terms: Mapping[str, Tensor | None], weights: Mapping[str, float]
) -> tuple[Tensor, dict[str, float]]:
    """L = sum_name weights[name] * terms[name]  (DESIGN 4: sft + a_KD kd + l_IVA iva + l_TPA tpa).

    The caller passes every weight, including the SFT one (normally 1.0), e.g.
    ``{"sft": 1.0, "kd": a_kd, "iva": l_iva, "tpa": l_tpa}``. A weight of 0 switches a term off: its
    entry in ``terms`` may be None or absent and is not read.

    Returns:
        (total scalar, log) where log maps each active term to its *unweighted* float value, plus
        "total".
    Raises:
        ValueError: a term without a weight, a negative weight, an active term without a value or
            not a scalar, or no active term at all.
    """
    unweighted = sorted(set(terms) - set(weights))
    if unweighted:
        raise ValueError(
            f"loss terms without a weight: {unweighted}; weights given: {sorted(weights)}"
        )
    total: Tensor | None = None
    log: dict[str, float] = {}
    for name, w in weights.items():
        if w < 0:
            raise ValueError(f"loss weight {name!r} must be >= 0, got {w}")
        if w == 0:
            continue
        value = terms.get(name)
        if value is None:
            raise ValueError(f"loss term {name!r} has weight {w} but was not computed")
        if value.dim() != 0:
            raise ValueError(f"loss term {name!r} must be a scalar, got shape {tuple(value.shape)}")
        total = w * value if total is None else total + w * value
        log[name] = float(value.detach())
    if total is None:
        raise ValueError(f"every loss weight is zero: {dict(weights)}")
    log["total"] = float(total.detach())
    return total, log
