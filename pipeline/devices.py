"""Where a model runs: the ``device`` and ``dtype`` settings of every job, resolved in one place."""

from __future__ import annotations

import torch

from pipeline.errors import PipelineError


def resolve_device(device: str, key: str = "device") -> torch.device:
    """``auto`` is cuda when a GPU is visible, else cpu; ``cuda`` without a visible GPU is refused,
    naming the config ``key``."""
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise PipelineError(f"{key}=cuda but no GPU is visible to this process")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    """``auto`` is bfloat16 on a GPU and float32 elsewhere; otherwise the named torch dtype."""
    if dtype == "auto":
        dtype = "bfloat16" if device.type == "cuda" else "float32"
    return getattr(torch, dtype)
