"""Batching processor outputs for a forward: one table of which keys are padded (and with what) and
which are concatenated, one pad-token rule. Both stages and the evaluator batch through here.

A processor returns each sample as a batch of one: per-token ``[1, T]`` tensors (``input_ids``,
``attention_mask``, ``mm_token_type_ids``) and image tensors flattened over the sample's images
(``pixel_values``, ``image_grid_thw``, ``image_sizes``). A batch pads the per-token tensors to the
longest sample, on the right for teacher-forced forwards (Stage 1, Stage 2, agreement) and on the
left for generation, and concatenates the image tensors in sample order (the families take images
flattened over the batch).

[per-sample images note] Idefics3 returns ``pixel_values`` [1, N, C, H, W] and
``pixel_attention_mask`` [1, N, H, W]: the sample's N images (tiles included) on their own axis,
padded to a common size. A batch pads that axis to the largest N with all-zero images (mask 0),
which the model drops before its vision tower, and H, W to the largest size (as its image processor
pads within a sample), then concatenates along the batch axis.
"""

from __future__ import annotations

from typing import Literal

import torch

# Per-token tensors and their pad value (None: the pad token id).
PADDED_KEYS = {"input_ids": None, "attention_mask": 0, "mm_token_type_ids": 0}
# Image tensors, concatenated over the batch in sample order.
CONCAT_KEYS = ("pixel_values", "image_grid_thw", "image_sizes", "pixel_attention_mask")
# Image tensors with a per-sample image axis (dim 1), padded with zeros before the concatenation
# ([per-sample images note]): key -> number of dimensions that marks that layout.
PER_SAMPLE_IMAGE_KEYS = {"pixel_values": 5, "pixel_attention_mask": 4}


def pad_token_id(tokenizer) -> int:
    """The id that pads ``input_ids``: the tokenizer's pad token, else its end-of-sequence token."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def collate_model_inputs(samples: list[dict], pad_id: int, side: Literal["right", "left"] = "right") -> dict:
    """Batch processor outputs (each a batch of one): per-token tensors padded on ``side``, image
    tensors concatenated.

    ``input_ids`` are padded with ``pad_id``, ``attention_mask`` and ``mm_token_type_ids`` with 0
    (a sample without them counts as all ones and all zeros). The batch always has an
    ``attention_mask``: 1 on every real token.
    """
    if side not in ("right", "left"):
        raise ValueError(f"side must be 'right' or 'left', got {side!r}")
    keys = set().union(*(s.keys() for s in samples))
    unknown = keys - set(PADDED_KEYS) - set(CONCAT_KEYS)
    if unknown:
        raise ValueError(f"cannot batch processor outputs {sorted(unknown)}")
    if any(s["input_ids"].shape[0] != 1 for s in samples):
        raise ValueError("collate_model_inputs takes samples of batch size 1")
    length = max(s["input_ids"].shape[1] for s in samples)
    out: dict[str, torch.Tensor] = {}
    for key, fill in PADDED_KEYS.items():
        if key not in keys and key != "attention_mask":
            continue
        fill = pad_id if fill is None else fill
        rows = []
        for s in samples:
            x = s.get(key)
            if x is None:
                x = torch.ones_like(s["input_ids"]) if key == "attention_mask" else torch.zeros_like(s["input_ids"])
            gap = length - x.shape[1]
            rows.append(torch.nn.functional.pad(x, (0, gap) if side == "right" else (gap, 0), value=fill))
        out[key] = torch.cat(rows)
    for key in CONCAT_KEYS:
        parts = [s[key] for s in samples if key in s]
        if parts and parts[0].ndim == PER_SAMPLE_IMAGE_KEYS.get(key):
            parts = _pad_image_axis(parts)
        if parts:
            out[key] = torch.cat(parts)
    return out


def _pad_image_axis(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """[1, N_b, ..., H_b, W_b] per sample -> the same padded with zeros to the largest N, H and W."""
    n = max(p.shape[1] for p in parts)
    h, w = max(p.shape[-2] for p in parts), max(p.shape[-1] for p in parts)
    out = []
    for p in parts:
        if p.shape[0] != 1:
            raise ValueError(f"per-sample image tensors must have batch size 1, got shape {tuple(p.shape)}")
        pad = [0, w - p.shape[-1], 0, h - p.shape[-2]] + [0, 0] * (p.ndim - 4) + [0, n - p.shape[1]]
        out.append(torch.nn.functional.pad(p, pad) if any(pad) else p)
    return out
