"""The tail bucket of a sparse distribution: the mass outside a set of stored ids, from their
log-probs. One copy, used by the teacher's checks and tests (exact mass), the losses (floored
log-mass, differentiable) and the tools (histograms).

``m = 1 − Σ_i exp(logp_i)`` is computed as ``−expm1(logsumexp(logp))`` in log space: no
cancellation when the stored ids carry almost all the mass (``log1mexp``, Maechler 2012).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

_LN2 = math.log(2.0)


def log1mexp(x: Tensor) -> Tensor:
    """log(1 - exp(x)) for x < 0, accurate over the whole range (Maechler 2012, "Accurately
    Computing log(1 - exp(-|a|))"): log(-expm1(x)) near 0, log1p(-exp(x)) far from it.

    Both branches only ever see inputs in their own range, so neither produces inf/NaN gradients
    that a `where` would multiply by 0. At x = 0 the result is -inf (callers clamp first).
    """
    near_zero = x > -_LN2
    a = torch.log(-torch.expm1(torch.where(near_zero, x, -_LN2)))
    b = torch.log1p(-torch.exp(torch.where(near_zero, -_LN2, x)))
    return torch.where(near_zero, a, b)


def tail_logprob(logp_k: Tensor) -> Tensor:
    """Log of the mass outside the stored ids, floored at the eps of ``logp_k``'s dtype so that
    it and its gradient stay finite (the losses' tail bucket; ``stage2_student.losses`` [tail floor note]).

    Args:
        logp_k: [..., k] log-probs of the stored ids, -inf at padded slots.
    Returns:
        [...] log(max(1 - sum exp(logp_k), ~eps)); 0 for a row with no stored id.
    """
    eps = torch.finfo(logp_k.dtype).eps
    covered = torch.logsumexp(logp_k, dim=-1)
    # Clamp before log1mexp so it is never evaluated at 0 (whose gradient is infinite).
    return log1mexp(covered.clamp(max=math.log1p(-eps)))


def tail_mass(logprobs: Tensor) -> Tensor:
    """``1 − Σ exp(logprobs)`` over the last dim in float32 or wider, exact (no floor); 0 where
    rounding makes the stored mass reach 1. [..., k] -> [...]."""
    x = logprobs if logprobs.dtype == torch.float64 else logprobs.float()
    return -torch.expm1(torch.logsumexp(x, dim=-1).clamp(max=0.0))
