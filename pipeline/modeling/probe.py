"""Instruction-to-visual saliency from a teacher forward that stays on SDPA (DESIGN.md §3.2).

``output_attentions=True`` needs eager attention and keeps ``B·H·T²`` floats per layer (~13 GB per
sample at 28 layers, 28 heads, T = 2048). Instead, the text decoder's attention is switched for the
duration of one forward to ``alignti_probe``: a function that calls transformers' stock SDPA for the
output (the forward is unchanged) and, on the probed layers only, recomputes the scores of the
instruction query rows::

    P[b, h, i, :] = softmax_t( q[b, h, rows_b[i]] · k[b, h, t] * scaling + mask[b, rows_b[i], t] )

over *all* keys ``t`` (so ``P`` is the true attention probability), then keeps the columns of the
visual positions and the mean over heads. Transient memory ``O(B·H·|I|·T)``, kept ``O(B·|I|·|V|)``.
See ``[mask note]`` for how the mask SDPA received is reproduced.

Usage (one forward per capture; positions are those of the forward's query axis, which starts at
position 0, i.e. the cache is empty when the forward begins)::

    rows, cols, turn_rows = sample_indices(enc)          # per sample: I, V, and I_j as rows of I
    with capture(model, layers=[l], rows=[rows], cols=[cols]) as probe:
        out = model(**enc.model_inputs, use_cache=True)
    maps = turn_saliency(probe.block(0), turn_rows)      # [n_turns, |V|], each row sums to 1

[mask note] SDPA gets either ``None`` (it then uses ``is_causal``; the causal restriction
``key <= query`` is rebuilt for the probed rows, exactly as ``sdpa_attention_forward`` decides it),
a boolean mask (True = attend; False becomes ``finfo.min``, which gives probability 0 like ``-inf``
but no NaN on a fully masked row) or an additive float mask (added as eager attention does). The
masks themselves come from transformers' ``sdpa_mask``, registered for ``alignti_probe`` too, so the
probed forward builds the same masks as a plain SDPA forward.
"""

from __future__ import annotations

import contextvars
import itertools
import math
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import NamedTuple

import numpy as np
import torch
from transformers import AttentionInterface, AttentionMaskInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import sdpa_mask

from schemas.signals import sees_image

PROBE_ATTENTION = "alignti_probe"


@dataclass
class SaliencyProbe:
    """What one capture records. ``blocks[l]``: [B, |I|max, |V|max] float32, head-mean attention
    probabilities of layer ``l`` from instruction rows to visual columns, zero where padded."""

    layers: tuple[int, ...]
    rows: list[torch.Tensor]  # per sample: int64 [|I_b|] query positions
    cols: list[torch.Tensor]  # per sample: int64 [|V_b|] key positions
    blocks: dict[int, torch.Tensor] = field(default_factory=dict)
    _modules: dict[int, int] = field(default_factory=dict, repr=False)  # id(self_attn) -> layer

    def block(self, b: int, layers: Sequence[int] | None = None) -> torch.Tensor:
        """Sample ``b``'s block [|I_b|, |V_b|], mean over ``layers`` (default: all probed layers)."""
        layers = self.layers if layers is None else tuple(layers)
        missing = [l for l in layers if l not in self.blocks]
        if missing:
            raise RuntimeError(
                f"no attention recorded for layer(s) {missing}; run exactly one forward of the model "
                f"inside `capture(...)` (probed layers: {list(self.layers)})"
            )
        n_rows, n_cols = len(self.rows[b]), len(self.cols[b])
        return torch.stack([self.blocks[l][b, :n_rows, :n_cols] for l in layers]).mean(0)

    def layer_maps(self, b: int, turn_rows: Sequence[torch.Tensor]) -> dict[int, torch.Tensor]:
        """Per probed layer, sample ``b``'s turn maps [n_turns, |V_b|] (for IRS, layers kept apart)."""
        return {l: turn_saliency(self.block(b, [l]), turn_rows) for l in self.layers}


_ACTIVE: contextvars.ContextVar[SaliencyProbe | None] = contextvars.ContextVar("alignti_probe", default=None)


def text_decoder(model: PreTrainedModel) -> PreTrainedModel:
    """The text decoder (e.g. LlamaModel, Qwen2VLTextModel) of a VLM, or the model itself for an LM."""
    decoder = model.get_decoder()
    n = decoder.config.num_hidden_layers
    if len(decoder.layers) != n:
        raise ValueError(f"{type(decoder).__name__} has {len(decoder.layers)} layers, its config says {n}")
    return decoder


def _padded(index: Sequence[torch.Tensor], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Ragged int index lists to ([B, N] index padded with 0, [B, N] validity); N >= 1."""
    width = max([1, *(len(x) for x in index)])
    out = torch.zeros(len(index), width, dtype=torch.long, device=device)
    valid = torch.zeros(len(index), width, dtype=torch.bool, device=device)
    for b, x in enumerate(index):
        out[b, : len(x)] = torch.as_tensor(x, dtype=torch.long, device=device)
        valid[b, : len(x)] = True
    return out, valid


def instruction_block(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None,
    causal: bool,
    rows: Sequence[torch.Tensor],
    cols: Sequence[torch.Tensor],
) -> torch.Tensor:
    """Head-mean attention probabilities of the ``rows`` queries over the ``cols`` keys.

    query [B, H, Tq, D]; key [B, Hkv, Tk, D] with H a multiple of Hkv (GQA: query head h reads key
    head h // (H / Hkv), as ``repeat_kv`` does); attention_mask None, bool [B|1, 1|H, Tq, Tk] (True =
    attend) or additive float of that shape; ``causal`` adds ``key <= query`` (only with no mask).
    rows/cols: per sample int64 positions. Returns float32 [B, |I|max, |V|max], zero where padded.
    The softmax runs over all Tk keys, so values are the true probabilities (see the module docstring).
    """
    bsz, n_heads, q_len, head_dim = query.shape
    n_kv, kv_len = key.shape[1], key.shape[2]
    if len(rows) != bsz or len(cols) != bsz:
        raise ValueError(f"the probe got rows/cols for {len(rows)}/{len(cols)} samples, the forward has {bsz}")
    if n_heads % n_kv:
        raise ValueError(f"{n_heads} query heads are not a multiple of {n_kv} key/value heads")
    for b in range(bsz):
        if len(rows[b]) and int(torch.as_tensor(rows[b]).max()) >= q_len:
            raise ValueError(f"sample {b}: instruction position {int(max(rows[b]))} >= query length {q_len}")
        if len(cols[b]) and int(torch.as_tensor(cols[b]).max()) >= kv_len:
            raise ValueError(f"sample {b}: visual position {int(max(cols[b]))} >= key length {kv_len}")
    row_idx, row_ok = _padded(rows, query.device)  # [B, I]
    col_idx, col_ok = _padded(cols, query.device)  # [B, V]
    n_rows = row_idx.shape[1]

    q = query.gather(2, row_idx[:, None, :, None].expand(bsz, n_heads, n_rows, head_dim)).float()
    q = q.view(bsz, n_kv, n_heads // n_kv, n_rows, head_dim)  # head h = kv * n_rep + r
    scale = 1.0 / math.sqrt(head_dim) if scaling is None else scaling  # SDPA's default scale
    scores = torch.matmul(q, key.float()[:, :, None].transpose(-1, -2)) * scale
    scores = scores.view(bsz, n_heads, n_rows, kv_len)

    if attention_mask is not None:
        mask = attention_mask.expand(bsz, -1, q_len, kv_len)
        mask = mask.gather(2, row_idx[:, None, :, None].expand(bsz, mask.shape[1], n_rows, kv_len))
        if mask.dtype == torch.bool:
            scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
        else:
            scores = scores + mask.float()
    elif causal:
        allowed = torch.arange(kv_len, device=query.device)[None, None, :] <= row_idx[:, :, None]  # [B, I, Tk]
        scores = scores.masked_fill(~allowed[:, None], torch.finfo(scores.dtype).min)
    # Padding rows get plain zeros: finite softmax, and no NaN can reach a gradient through them.
    scores = torch.where(row_ok[:, None, :, None], scores, 0.0)

    probs = scores.softmax(dim=-1).mean(dim=1)  # [B, I, Tk]
    block = probs.gather(2, col_idx[:, None, :].expand(bsz, n_rows, col_idx.shape[1]))
    return block * (row_ok[:, :, None] & col_ok[:, None, :])


def _probe_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    dropout: float = 0.0,
    scaling: float | None = None,
    is_causal: bool | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """Stock SDPA attention; on a probed layer it also records the instruction-to-visual block."""
    probe = _ACTIVE.get()
    layer = None if probe is None else probe._modules.get(id(module))
    if layer is not None:
        if layer in probe.blocks:
            raise RuntimeError(f"layer {layer} ran twice inside one capture; run one forward per capture")
        # The same decision as sdpa_attention_forward: is_causal only when SDPA gets no mask.
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = query.shape[2] > 1 and attention_mask is None and causal
        probe.blocks[layer] = instruction_block(query, key, attention_mask, scaling, causal, probe.rows, probe.cols)
    return sdpa_attention_forward(
        module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, is_causal=is_causal, **kwargs
    )


AttentionInterface.register(PROBE_ATTENTION, _probe_attention)
# Without a mask function under this name, transformers would build no mask at all
# (masking_utils._preprocess_mask_arguments early-exits for unknown implementations).
AttentionMaskInterface.register(PROBE_ATTENTION, sdpa_mask)


@contextmanager
def capture(
    model: PreTrainedModel,
    layers: Sequence[int],
    rows: Sequence[torch.Tensor],
    cols: Sequence[torch.Tensor],
) -> Iterator[SaliencyProbe]:
    """Record instruction-to-visual attention of text ``layers`` during the next forward of ``model``.

    rows[b] / cols[b]: int64 positions of sample b's instruction tokens I and visual tokens V in the
    batch's sequence (right padding: positions are those of the unpadded sample). Inside, the text
    decoder runs on ``alignti_probe`` (SDPA plus the record); afterwards, also after an exception,
    its attention implementation is what it was before. The vision tower is never probed.
    """
    decoder = text_decoder(model)
    n_layers = decoder.config.num_hidden_layers
    layers = tuple(sorted(set(int(l) for l in layers)))
    if not layers:
        raise ValueError("capture needs at least one layer to probe")
    bad = [l for l in layers if not 0 <= l < n_layers]
    if bad:
        raise ValueError(f"layer(s) {bad} out of range: the text decoder has {n_layers} layers (0..{n_layers - 1})")
    if len(rows) != len(cols):
        raise ValueError(f"rows for {len(rows)} samples but cols for {len(cols)}")
    probe = SaliencyProbe(
        layers=layers,
        rows=[torch.as_tensor(r, dtype=torch.long) for r in rows],
        cols=[torch.as_tensor(c, dtype=torch.long) for c in cols],
        _modules={id(decoder.layers[l].self_attn): l for l in layers},
    )
    previous = decoder.config._attn_implementation
    token = _ACTIVE.set(probe)
    try:
        decoder.set_attn_implementation(PROBE_ATTENTION)
        yield probe
    finally:
        decoder.set_attn_implementation(previous)
        _ACTIVE.reset(token)


def sample_indices(sample) -> tuple[torch.Tensor, torch.Tensor, list[torch.Tensor]]:
    """(rows, cols, turn_rows) of an ``EncodedSample``: all instruction positions I (turn order),
    the visual positions V, and for each turn j the indices of I_j within ``rows``."""
    sizes = [len(t.instruction) for t in sample.turns]
    rows = torch.as_tensor(np.asarray(sample.instruction_positions, dtype=np.int64))
    cols = torch.as_tensor(np.asarray(sample.visual_positions, dtype=np.int64))
    starts = [0, *itertools.accumulate(sizes)]
    turn_rows = [torch.arange(a, a + n) for a, n in zip(starts, sizes)]
    return rows, cols, turn_rows


def turn_saliency(block: torch.Tensor, turn_rows: Sequence[torch.Tensor]) -> torch.Tensor:
    """Per-turn saliency maps from one sample's (layer-mean) block.

    block [|I|, |V|]: head-mean attention from instruction rows to visual columns; turn_rows[j]:
    indices into the block's rows of turn j's instruction I_j. Returns float32 [n_turns, |V|],
    ``s_j = normalize(mean_{i in I_j} block[i])`` (DESIGN.md §3.2), each row summing to 1.
    A turn without information has no map, an all-zero row (never a uniform one): a turn with no
    instruction tokens (a human turn that is only an image), or one none of whose tokens can see a
    visual token (the image comes after the question: causal attention gives it exactly 0).
    With |V| = 0 (text-only sample) the result is [n_turns, 0].
    """
    n_vis = block.shape[1]
    out = torch.zeros((len(turn_rows), n_vis), dtype=torch.float32, device=block.device)
    for j, idx in enumerate(turn_rows):
        if len(idx) == 0 or n_vis == 0:
            continue
        mean = block[torch.as_tensor(idx, dtype=torch.long, device=block.device)].float().mean(0)
        total = mean.sum()
        # A `where`, not an `if`: no device sync per turn (0 / 0 on the unused side is discarded).
        out[j] = torch.where(total > 0, mean / total, torch.zeros_like(mean))
    return out


def turns_see_image(rows: torch.Tensor, cols: torch.Tensor, turn_rows: Sequence[torch.Tensor]) -> list[bool]:
    """Per turn: can any of its instruction tokens attend to a visual token (one before it)? The
    turns for which ``turn_saliency`` can give a map; from positions alone, so equal for every layer."""
    first_visual = int(cols.min()) if len(cols) else None
    return [sees_image(rows[torch.as_tensor(idx, dtype=torch.long)].tolist(), first_visual) for idx in turn_rows]


class IrsItem(NamedTuple):
    """One single-turn item of the IRS calibration set.

    image_key identifies the visual input (e.g. the sample's image hashes joined); grid its geometry
    (e.g. the tuple of per-image grids); vector alpha^l over V; instruction, when given, identifies the
    instruction text: two items with equal instructions are not a pair. Turns of one sample share
    its image_key and differ in instruction.
    """

    image_key: str
    grid: tuple
    vector: torch.Tensor
    instruction: str | None = None


def _pairs(items: Sequence[IrsItem]) -> list[tuple[int, int]]:
    """Item pairs that share an image and differ in instruction; if none, pairs of equal grid shape
    (different images). The fallback is for the whole table, not per item."""

    def differ(a: IrsItem, b: IrsItem) -> bool:
        return a.instruction is None or b.instruction is None or a.instruction != b.instruction

    all_pairs = list(itertools.combinations(range(len(items)), 2))
    same_image = [
        (i, j) for i, j in all_pairs if items[i].image_key == items[j].image_key and differ(items[i], items[j])
    ]
    if same_image:
        return same_image
    return [
        (i, j)
        for i, j in all_pairs
        if items[i].image_key != items[j].image_key
        and tuple(items[i].grid) == tuple(items[j].grid)
        and differ(items[i], items[j])
    ]


def irs_table(per_layer_vectors: Mapping[int, Sequence[IrsItem | tuple]]) -> dict[int, float]:
    """Instruction-Relevance Score per layer: IRS(l) = 1 - mean over pairs of cos(alpha^l(x1), alpha^l(x2)).

    per_layer_vectors[l]: the items (image_key, grid, vector[, instruction]) of layer l, the same items
    in the same order for every layer (vector: that item's head-mean, instruction-mean attention of
    layer l over V, e.g. a row of ``SaliencyProbe.layer_maps``). Pairs: see ``_pairs``. Raises
    ValueError when no pair exists (every item alone with its image and its grid).
    """
    if not per_layer_vectors:
        raise ValueError("IRS needs vectors for at least one layer")
    layers = sorted(per_layer_vectors)
    items = {l: [IrsItem(*x) for x in per_layer_vectors[l]] for l in layers}
    keys = [(x.image_key, tuple(x.grid), x.instruction) for x in items[layers[0]]]
    for l in layers[1:]:
        if [(x.image_key, tuple(x.grid), x.instruction) for x in items[l]] != keys:
            raise ValueError(f"layer {l} has other items than layer {layers[0]}; IRS compares one item set")
    pairs = _pairs(items[layers[0]])
    if not pairs:
        raise ValueError(
            f"no IRS pair among {len(keys)} item(s): no two share an image with different instructions, "
            "and no two different images share a grid shape"
        )
    table = {}
    for l in layers:
        cos = []
        for i, j in pairs:
            a, b = items[l][i].vector.float().flatten(), items[l][j].vector.float().flatten()
            if a.shape != b.shape:
                raise ValueError(f"layer {l}: paired items {i} and {j} have {a.numel()} vs {b.numel()} visual tokens")
            cos.append(torch.nn.functional.cosine_similarity(a, b, dim=0))
        table[l] = 1.0 - float(torch.stack(cos).mean())
    return table


def select_layers(table: Mapping[int, float]) -> list[int]:
    """L* = [argmax_l IRS(l)]; ties go to the shallowest layer (cheapest partial forward)."""
    if not table:
        raise ValueError("the IRS table is empty")
    return [min(table, key=lambda l: (-table[l], l))]
