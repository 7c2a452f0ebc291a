"""Student batches: the :class:`StudentTargets` of B samples collated (:func:`collate`) into one
:class:`StudentBatch` whose flat target rows (:class:`KdRows`, :class:`IvaRows`, :class:`TpaRows`,
:class:`SaliencyRows`) are ready for ``stage2_student.losses``; :func:`packed` puts a batch's
tensors in one buffer for the trip from a DataLoader worker to the trainer.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import numpy as np
import torch

from pipeline.data import EncodedSample
from pipeline.data.encode import IGNORE_INDEX
from pipeline.modeling.batching import collate_model_inputs
from pipeline.modeling.branches import pad_branches
from pipeline.modeling.probe import sample_indices
from stage2_student.data.remap import StudentTargets
from stage2_student.losses import PAD_ID


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
    sampled_ids: torch.Tensor | None = None  # int64 [P, m], -1 padded  (sampled_iva_term)
    sampled_counts: torch.Tensor | None = None  # float32 [P, m], 0 padded (fractional on pooled cells)


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
    sampled_ids: torch.Tensor | None = None  # int64 [M, m], -1 padded  (sampled_tpa_term)
    sampled_counts: torch.Tensor | None = None  # float32 [M, m], 0 padded


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
    filler: bool = False  # a rank's stand-in past an epoch's last batch (StoreDataset pad_ranks): weigh it 0


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

    def sampled_rows(ids_name: str, counts_name: str, counts_dtype) -> dict:
        """``sampled_ids`` / ``sampled_counts`` of one row kind, padded to the batch's widest row (none
        when the store has no sampled target for it)."""
        if getattr(targets[0], ids_name) is None:
            return {}
        return {"sampled_ids": t(_pad_rows([getattr(tg, ids_name) for tg in targets], PAD_ID, np.int64)),
                "sampled_counts": t(_pad_rows([getattr(tg, counts_name) for tg in targets], 0, counts_dtype))}

    kd = KdRows(
        batch=batch_index([len(tg.resp_pos) for tg in targets]),
        pos=t(np.concatenate([tg.resp_pos for tg in targets])),
        ids=t(np.concatenate([tg.resp_ids for tg in targets])),
        logprobs=t(np.concatenate([tg.resp_logprobs for tg in targets])),
        **sampled_rows("sample_ids", "sample_counts", np.int64),
    )
    iva = IvaRows(
        batch=batch_index([len(tg.vis_pos) for tg in targets]),
        pos=t(np.concatenate([tg.vis_pos for tg in targets])),
        ids=t(np.concatenate([tg.vis_ids for tg in targets])),
        logprobs=t(np.concatenate([tg.vis_logprobs for tg in targets])),
        weights=t(np.concatenate([tg.vis_weight for tg in targets])),
        **sampled_rows("vis_sample_ids", "vis_sample_counts", np.float32),
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
            **sampled_rows("tpa_sample_ids", "tpa_sample_counts", np.float32),
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
