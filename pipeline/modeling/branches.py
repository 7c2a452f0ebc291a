"""Branch rows: transition distributions ``p(· | x≤t, c)`` without one forward per candidate (DESIGN.md §3.4).

A *branch row* for ``(t, c)`` is token ``c`` appended after the sequence, with the position id a
token right after ``x_t`` would have and an attention row that sees ``x_0 … x_t`` and itself only;
no ordinary token sees it. The model's output at that row is ``p(· | x≤t, c)``, exactly what a plain
forward over ``x_0 … x_t, c`` gives at its last position. Two ways to run them:

* :func:`forward_with_branches` — one forward over the sequence and its branch rows together
  (Stage 2's student: the candidates are known before the forward; layout in [in-row note]).
* :func:`forward_branches_from_cache` — continue from the KV cache of an ordinary forward over the
  sequence, feeding only the branch rows (Stage 1's teacher: the candidates are chosen from that
  forward's own output, and the branches then cost only their own tokens);
  :func:`branch_hidden_from_cache` is the same continuation returning the final hidden states of
  the real branch rows only, so the teacher applies the head to no padded row.

Both build their token and position rows with :func:`_branch_rows`, so they cannot drift apart.
``logits.logits_at`` makes a forward's output head run only at given (sample, position) pairs;
``forward_with_branches(..., seq_rows=...)`` uses it for the sequence rows a loss reads.

Batches: a sample's inputs are right-padded to the batch's longest sequence (``pipeline.modeling.batching.collate_model_inputs``)
and its branch rows to the largest branch count, padded rows marked by ``branch_pos == -1``
(:func:`pad_branches`). A padded branch row sees only itself, so it stays finite; its logits are
meaningless. Branches only ever see ``x_0 … x_t`` with ``t`` inside the sample, so padding keys are
never visible to them.

[in-row note] In :func:`forward_with_branches` a sample's branch rows sit in its own row right
after its ``len_b`` tokens (in its right padding first), not in R columns appended after the
batch's longest sequence: the forward is ``max_b(len_b + R_b)`` tokens wide instead of ``T + R``
(on ``bench/distill_step.py``'s batches 18.6% instead of 21.7% over the padded sequence; forward +
backward 0.963x the time of the ``T + R`` layout there). Continuing from the KV cache of a plain
forward over the sequence (as Stage 1 does; gradients flow through the cached keys and values)
was measured on the same setup and not kept: with the batch's padding mask it took 1.3-1.6% more
time than one forward; without it (exact for right padding under a causal mask) 2% less, but
dropping the mask speeds an SFT-only forward by the same 2%, so the cost of the branch rows over
SFT stayed at 1.27x either way.

[transformers 5.x mask note] A 4-D ``attention_mask`` is passed to the attention kernel as given:
``masking_utils._preprocess_mask_arguments`` returns any 4-D tensor untouched (no causal or padding
mask is built over it). Its meaning depends on the kernel: ``sdpa`` hands it to
``torch.nn.functional.scaled_dot_product_attention`` (bool, True = may attend, shape
``[B, 1, q, kv]``); ``eager`` *adds* it to the scores, so it must be a float mask (0 / dtype min).
Flash-attention kernels take no dense mask and are refused here.

[mRoPE note] Qwen2-VL's text model takes position ids ``[3, B, L]`` (temporal, height, width) as
given; ``[4, B, L]`` would carry text positions first, used only to detect packed sequences when
no mask is passed. The sequence's real ids come from ``Qwen2VLModel.get_rope_index`` (text tokens:
all three components equal and counting on from the previous segment; an image block of
``h × w`` merged cells occupies ``start … start + max(h, w) − 1``, and the text after it starts at
``start + max(h, w)``). A token after ``x_t`` follows the text rule: all three components equal to
the largest id used so far plus one, i.e. ``pos(t) + 1`` when ``x_t`` is text. When ``position_ids``
are given the model never calls ``get_rope_index`` itself and its cached ``rope_deltas`` are unused.
Qwen2.5-VL and Qwen3-VL build their ids the same way for images (Qwen2.5-VL spaces only video
frames in time; Qwen3-VL separates video frames by timestamps), so the same rule holds; Qwen3-VL
only distributes the three components over the rotary frequencies differently (interleaved
T H W T H W … instead of contiguous sections), which is inside the model. Its "deepstack" adds
vision features to the hidden states at the image-token positions after the first decoder layers;
a branch token is never an image token, so branch rows get none, as in a plain forward.
"""

from __future__ import annotations

import contextlib

import torch

from pipeline.modeling.logits import hidden_at, logits_at

# Position-id layouts by model type (``config.model_type``); another family must be added explicitly.
ROPE_1D_MODEL_TYPES = ("llava", "idefics3", "internvl")
MROPE_MODEL_TYPES = ("qwen2_vl", "qwen2_5_vl", "qwen3_vl")
# Config attributes naming tokens that the wrapper replaces by vision features: never a branch token.
_PLACEHOLDER_ATTRS = {"llava": ("image_token_id",), "qwen2_vl": ("image_token_id", "video_token_id"),
                      "qwen2_5_vl": ("image_token_id", "video_token_id"), "qwen3_vl": ("image_token_id", "video_token_id"),
                      "idefics3": ("image_token_id",), "internvl": ("image_token_id",)}
# Inputs the model gets from us (explicit ids, mask, positions) rather than from the processor.
_REPLACED_KEYS = ("input_ids", "attention_mask", "mm_token_type_ids", "position_ids")
_MASK_KERNELS = ("sdpa", "eager")


def _model_type(model) -> str:
    model_type = model.config.model_type
    if model_type not in ROPE_1D_MODEL_TYPES + MROPE_MODEL_TYPES:
        raise ValueError(
            f"branch rows are not implemented for model type {model_type!r}; "
            f"supported: {list(ROPE_1D_MODEL_TYPES + MROPE_MODEL_TYPES)}"
        )
    return model_type


def pad_branches(
    per_sample: list[tuple[torch.Tensor, torch.Tensor]],
) -> tuple[torch.Tensor, torch.Tensor]:
    """[(branch_pos [R_b], branch_tok [R_b]), ...] -> (branch_pos [B, R], branch_tok [B, R]), padded with -1."""
    width = max((len(p) for p, _ in per_sample), default=0)
    pos = torch.full((len(per_sample), width), -1, dtype=torch.int64)
    tok = torch.full((len(per_sample), width), -1, dtype=torch.int64)
    for b, (p, t) in enumerate(per_sample):
        if len(p) != len(t):
            raise ValueError(f"sample {b}: {len(p)} branch positions but {len(t)} branch tokens")
        pos[b, : len(p)] = torch.as_tensor(p, dtype=torch.int64)
        tok[b, : len(t)] = torch.as_tensor(t, dtype=torch.int64)
    return pos, tok


def sequence_lengths(model_inputs: dict) -> torch.Tensor:
    """int64 [B]: real tokens per row, from the 2-D ``attention_mask`` (checked to be right-padded)."""
    ids = model_inputs["input_ids"]
    mask = model_inputs.get("attention_mask")  # absent: nothing is padded
    if mask is None:
        return torch.full((ids.shape[0],), ids.shape[1], dtype=torch.int64, device=ids.device)
    if mask.ndim != 2:
        raise ValueError(f"attention_mask must be the processor's 2-D padding mask, got shape {tuple(mask.shape)}")
    lens = mask.long().sum(dim=1)
    right_padded = torch.arange(mask.shape[1], device=mask.device)[None, :] < lens[:, None]
    if not torch.equal(mask.bool(), right_padded):
        raise ValueError("branch rows need right-padded sequences (attention_mask 1…1 0…0 per row)")
    return lens


def sequence_position_ids(model, model_inputs: dict) -> torch.Tensor:
    """The position ids the model uses for its sequence: [B, T] (1-D RoPE) or [3, B, T] (mRoPE).

    Passed explicitly to the ordinary forward of :func:`forward_branches_from_cache`'s caller, so the
    cache and the branch rows are built on the same ids.
    """
    ids = model_inputs["input_ids"]
    lens = sequence_lengths(model_inputs)
    batch, length = ids.shape
    text = torch.arange(length, device=ids.device)[None, :].expand(batch, length)
    if _model_type(model) in ROPE_1D_MODEL_TYPES:
        return text  # what the text model itself uses without a cache; right padding leaves it exact
    if "mm_token_type_ids" not in model_inputs:
        if "image_grid_thw" in model_inputs:
            raise ValueError("Qwen2-VL inputs with images need the processor's mm_token_type_ids")
        return text[None].expand(3, batch, length)  # text only: the model's own default
    mask = (torch.arange(length, device=ids.device)[None, :] < lens[:, None]).long()
    position_ids, _ = model.model.get_rope_index(
        ids,
        model_inputs["mm_token_type_ids"],
        image_grid_thw=model_inputs.get("image_grid_thw"),  # absent: a text-only batch
        attention_mask=mask,
    )
    return position_ids


def _next_text_positions(position_ids: torch.Tensor) -> torch.Tensor:
    """[B, T]: the position id of a text token placed right after ``x_t`` (see [mRoPE note]).

    Largest id over components and over ``x_0 … x_t``, plus one: ``pos(t) + 1`` after text, and the
    id ``get_rope_index`` gives the text after an image block when ``x_t`` is its last cell.
    """
    flat = position_ids if position_ids.ndim == 2 else position_ids.amax(dim=0)
    return flat.cummax(dim=-1).values + 1


def placeholder_ids(model) -> list[int]:
    """Token ids a branch row may not hold (image/video placeholders and vision markers)."""
    return [int(getattr(model.config, attr)) for attr in _PLACEHOLDER_ATTRS[_model_type(model)]]


def _filler_token(model) -> int:
    """A harmless token for rows whose output is unused (the smallest id that is no placeholder)."""
    placeholders = placeholder_ids(model)
    return min(set(range(len(placeholders) + 1)) - set(placeholders))


def _branch_rows(
    model,
    position_ids: torch.Tensor,
    seq_lens: torch.Tensor,
    branch_pos: torch.Tensor,
    branch_tok: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The branch rows of a batch, checked: (token ids [B, R], position ids [B, R] | [3, B, R]).

    A branch row attends to the sequence up to and including ``branch_pos[b, r]`` and to itself
    (each caller lays that out for its own key layout). Padded rows (``branch_pos == -1``) hold a
    harmless token at position 0.
    """
    batch, length = position_ids.shape[-2:]
    if branch_pos.ndim != 2 or branch_pos.shape != branch_tok.shape or branch_pos.shape[0] != batch:
        raise ValueError(
            f"branch_pos and branch_tok must both be [B={batch}, R], got {tuple(branch_pos.shape)} "
            f"and {tuple(branch_tok.shape)}"
        )
    device = position_ids.device
    branch_pos, branch_tok = branch_pos.to(device).long(), branch_tok.to(device).long()
    n_rows = branch_pos.shape[1]
    valid = branch_pos >= 0
    if (branch_pos < -1).any() or (branch_pos >= seq_lens.to(device)[:, None]).any():
        raise ValueError("branch_pos must be a position inside its sample (0 <= t < length), or -1 for padding")
    vocab = model.get_output_embeddings().weight.shape[0]
    placeholders = placeholder_ids(model)
    real_tok = branch_tok[valid]
    if ((real_tok < 0) | (real_tok >= vocab)).any():
        raise ValueError(f"branch_tok must be token ids in [0, {vocab})")
    if torch.isin(real_tok, torch.tensor(placeholders, device=device)).any():
        raise ValueError(f"branch_tok contains a vision placeholder token {placeholders}; it cannot be a branch token")
    tokens = torch.where(valid, branch_tok, _filler_token(model))

    positions = _next_text_positions(position_ids).gather(1, branch_pos.clamp_min(0))
    positions = torch.where(valid, positions, 0)
    if position_ids.ndim == 3:  # mRoPE: a text token has three equal components
        positions = positions[None].expand(position_ids.shape[0], batch, n_rows)
    return tokens, positions


def _kernel_mask(model, allowed: torch.Tensor) -> torch.Tensor:
    """A bool [B, 1, q, kv] mask (True = may attend) in the form the model's attention kernel uses as given."""
    kernel = model.config.get_text_config()._attn_implementation
    if kernel == "sdpa":
        return allowed
    if kernel == "eager":
        dtype = model.dtype
        return torch.zeros(allowed.shape, dtype=dtype, device=allowed.device).masked_fill(
            ~allowed, torch.finfo(dtype).min
        )
    raise ValueError(f"branch rows need a dense 4-D attention mask; attention kernel {kernel!r} takes none (use one of {_MASK_KERNELS})")


def _as_batch(branch_pos, branch_tok) -> tuple[torch.Tensor, torch.Tensor, bool]:
    branch_pos, branch_tok = torch.as_tensor(branch_pos), torch.as_tensor(branch_tok)
    single = branch_pos.ndim == 1
    if single:
        branch_pos, branch_tok = branch_pos[None], branch_tok[None]
    return branch_pos, branch_tok, single


def forward_with_branches(
    model, model_inputs: dict, branch_pos: torch.Tensor, branch_tok: torch.Tensor,
    seq_rows: tuple[torch.Tensor, torch.Tensor] | None = None,
    hidden: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward over the sequence and its branch rows (sequence logits are unchanged by the branches).

    model_inputs: the processor's outputs for a batch (``input_ids`` [B, T], right-padded
    ``attention_mask``, images as usual). branch_pos, branch_tok: [B, R] (padding: pos −1), or [R]
    when B = 1. Returns ``seq_logits`` [B, T, V] and ``branch_logits`` [B, R, V] ([T, V] and [R, V]
    for 1-D branch inputs): ``branch_logits[b, r]`` are the logits of ``p(· | x≤t, c)`` with
    ``t = branch_pos[b, r]``, ``c = branch_tok[b, r]``. Gradients flow (no ``no_grad`` here).
    With ``seq_rows`` = (batch, pos) index tensors [N], the head runs only on those sequence
    positions and the branch rows (``logits.logits_at``), and ``seq_logits`` is [N, V], row i for
    ``(batch[i], pos[i])``. With ``hidden=True`` as well, the head runs on no row and the two
    results are the final hidden states ([N, d] and [B, R, d]) instead of logits, for a caller that
    applies the head itself (``stage2_student.losses.fused_head_loss``).

    Layout ([in-row note]): sample b's branch rows take the places right after its own
    ``len_b`` tokens, i.e. its right padding first, so the forward is ``max_b(len_b + R_b)`` wide
    instead of ``T + R``. ``seq_logits[b, t]`` for ``t >= len_b`` (padding) and the logits of
    padded branch entries are finite and meaningless.
    """
    branch_pos, branch_tok, single = _as_batch(branch_pos, branch_tok)
    inner = getattr(model, "module", model)  # DDP and similar wrappers: read the model, call the wrapper
    ids = model_inputs["input_ids"]
    if single and ids.shape[0] != 1:
        raise ValueError(f"1-D branch_pos needs a batch of one, got batch {ids.shape[0]}")
    batch, length = ids.shape
    device = ids.device
    seq_pos = sequence_position_ids(inner, model_inputs)
    lens = sequence_lengths(model_inputs)
    tokens, positions = _branch_rows(inner, seq_pos, lens, branch_pos, branch_tok)

    # Where each branch row goes: after its sample's tokens, valid rows in order.
    valid = branch_pos.to(device) >= 0
    slot = torch.where(valid, lens[:, None] + valid.long().cumsum(1) - 1, 0)  # [B, R]
    width = max(length, int((lens + valid.sum(1)).max()))
    sample = torch.arange(batch, device=device)[:, None].expand_as(slot)
    at_b, at_q = sample[valid], slot[valid]

    input_ids = torch.nn.functional.pad(ids, (0, width - length), value=_filler_token(inner))
    input_ids[at_b, at_q] = tokens[valid]
    position_ids = torch.nn.functional.pad(seq_pos, (0, width - length), value=0)
    position_ids[..., at_b, at_q] = positions[..., valid]
    # Query q of row b sees: keys <= q if q is one of its tokens; keys <= t and itself if q holds
    # the branch (t, c); only itself otherwise (padding: finite, unused).
    last_key = torch.full((batch, width), -1, dtype=torch.long, device=device)
    last_key[at_b, at_q] = branch_pos.to(device).long()[valid]
    q = torch.arange(width, device=device)
    last_key = torch.where(q[None, :] < lens[:, None], q[None, :], last_key)  # own tokens: causal
    allowed = (q[None, None, :] <= last_key[:, :, None]) | torch.eye(width, dtype=torch.bool, device=device)[None]

    extra = {k: v for k, v in model_inputs.items() if k not in _REPLACED_KEYS}
    if hidden and seq_rows is None:
        raise ValueError("hidden=True needs seq_rows: the sequence rows whose hidden states to return")
    rows = contextlib.nullcontext()
    if seq_rows is not None:
        at = hidden_at if hidden else logits_at
        rows = at(model, torch.cat([seq_rows[0].to(device), sample.reshape(-1)]),
                  torch.cat([seq_rows[1].to(device), slot.reshape(-1)]))
    with rows as captured:
        out = model(
            input_ids=input_ids,
            attention_mask=_kernel_mask(inner, allowed[:, None]),  # [B, 1, W, W]
            position_ids=position_ids,
            use_cache=False,
            **extra,
        )
    if seq_rows is None:
        seq_logits, branch_logits = out.logits[:, :length], out.logits[sample, slot]
        return (seq_logits[0], branch_logits[0]) if single else (seq_logits, branch_logits)
    n = len(seq_rows[0])
    picked = captured.rows if hidden else out.logits[0]
    seq_logits, branch_logits = picked[:n], picked[n:].view(*slot.shape, -1)
    return (seq_logits, branch_logits[0]) if single else (seq_logits, branch_logits)


def _continue_from_cache(model, past_key_values, position_ids, branch_pos, branch_tok, seq_lens, rows=None):
    """The forward of the branch rows over the cache (see :func:`forward_branches_from_cache`).

    Returns ``(result, tokens, single)``: ``result`` is the model's output, or, with ``rows`` (a
    factory ``rows(valid)`` of a context manager entered around the forward; ``valid`` [B, R]
    marks the real rows), what that context yields; None when there is no branch row. ``tokens``
    [B, R] are the branch rows' ids, ``single`` whether the inputs were 1-D."""
    branch_pos, branch_tok, single = _as_batch(branch_pos, branch_tok)
    length = past_key_values.get_seq_length()
    if position_ids.shape[-1] != length:
        raise ValueError(f"position_ids cover {position_ids.shape[-1]} tokens but the cache holds {length}")
    seq_lens = torch.as_tensor(seq_lens, device=position_ids.device).reshape(-1)
    tokens, positions = _branch_rows(model, position_ids, seq_lens, branch_pos, branch_tok)
    batch, n_rows = tokens.shape
    if n_rows == 0:
        return None, tokens, single
    # Keys: [T cached sequence keys, R branch keys]; branch r sees x_0 … x_t and itself.
    branch_pos = branch_pos.to(tokens.device)
    sees_seq = torch.arange(length, device=tokens.device)[None, None, :] <= branch_pos[:, :, None]
    sees_self = torch.eye(n_rows, dtype=torch.bool, device=tokens.device)[None].expand(batch, n_rows, n_rows)
    with (rows(branch_pos >= 0) if rows is not None else contextlib.nullcontext()) as captured:
        out = model(
            input_ids=tokens,
            attention_mask=_kernel_mask(model, torch.cat([sees_seq, sees_self], dim=-1)[:, None]),  # [B, 1, R, T + R]
            position_ids=positions,
            past_key_values=past_key_values,
            use_cache=True,
        )
    past_key_values.crop(-n_rows)
    return (out if captured is None else captured), tokens, single


def forward_branches_from_cache(
    model,
    past_key_values,
    position_ids: torch.Tensor,
    branch_pos: torch.Tensor,
    branch_tok: torch.Tensor,
    seq_lens: torch.Tensor | int,
) -> torch.Tensor:
    """Branch logits from the KV cache of an ordinary forward over the sequence; costs only the branch tokens.

    past_key_values: the ``DynamicCache`` of ``model(**model_inputs, position_ids=position_ids,
    use_cache=True)`` over the (right-padded) batch, holding T keys per layer. position_ids: that
    forward's ids, from :func:`sequence_position_ids` ([B, T] or [3, B, T]). branch_pos, branch_tok:
    [B, R] (padding: pos −1) or [R] when B = 1. seq_lens: [B] real lengths (or an int when B = 1).
    Returns ``branch_logits`` [B, R, V] ([R, V] for 1-D inputs).

    The branch keys are appended to the cache for the forward and cropped off afterwards, so the
    cache is as it was and branches can be run in several chunks. :func:`branch_hidden_from_cache`
    is the same forward with the head left to the caller, on the real rows only.
    """
    out, tokens, single = _continue_from_cache(model, past_key_values, position_ids, branch_pos, branch_tok, seq_lens)
    if out is None:
        vocab = model.get_output_embeddings().weight.shape[0]
        empty = torch.zeros((tokens.shape[0], 0, vocab), dtype=model.dtype, device=tokens.device)
        return empty[0] if single else empty
    return out.logits[0] if single else out.logits


def branch_hidden_from_cache(
    model,
    past_key_values,
    position_ids: torch.Tensor,
    branch_pos: torch.Tensor,
    branch_tok: torch.Tensor,
    seq_lens: torch.Tensor | int,
) -> torch.Tensor:
    """The forward of :func:`forward_branches_from_cache`, but the output head runs on no row
    (``logits.hidden_at``): returns the final hidden states [N, d] of the N real branch rows
    (``branch_pos >= 0``) in (sample, row) order, for the caller to apply the head to (padded
    rows of a batch never reach the head). Same arguments; the cache is left as it was."""
    def real_rows(valid):
        b, r = torch.nonzero(valid, as_tuple=True)
        return hidden_at(model, b, r)

    captured, tokens, _ = _continue_from_cache(model, past_key_values, position_ids, branch_pos, branch_tok,
                                               seq_lens, rows=real_rows)
    if captured is None:
        hidden = model.get_output_embeddings().weight.shape[1]
        return torch.zeros((0, hidden), dtype=model.dtype, device=tokens.device)
    return captured.rows
