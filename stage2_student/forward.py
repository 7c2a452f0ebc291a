"""The student's training forward: logits only at the rows a loss reads, causal masking alone.

Two savings on ``distill``'s forward, neither of which changes a loss or a gradient:

* **Logits at the read rows.** A causal LM's head turns every position's final hidden state into
  ``V`` logits, ``[B, T, V]`` in all. The losses read few of those rows: SFT the positions whose
  next token is labelled, KD the teacher's response positions, IVA its visual-query positions (and
  TPA its branch rows). In a multi-turn sample with an image most positions (image, instructions,
  template) are read by none, and with a real vocabulary that tensor dominates the activation
  memory (2048 positions × 152k entries in fp32 is 1.2 GB per sample, and its gradient as much
  again). :func:`row_index` lists the distinct read pairs, ``pipeline.modeling.logits.hidden_at``
  captures the final hidden states there (the model's own head runs on no row), and
  :class:`SequenceLogits` finds each term's rows among them. The head itself is then applied with
  the losses, chunk by chunk (``stage2_student.losses.fused_head_loss``), so not even the read rows'
  ``[N, V]`` logits exist at once: ~1,400 read rows of a 2,048-token sample at a 152k vocabulary
  would be 0.85 GB in fp32, and as much again for their gradient.
* **No padding mask for right-padded batches** (the forward without branch rows). With right
  padding, the keys a real token may see under the causal mask are real tokens already; the
  padding mask changes only the outputs of pad queries, which no loss reads. Passing it makes
  transformers build a ``[B, 1, T, T]`` mask and keeps SDPA kernels from skipping the blocks above
  the diagonal. :func:`causal_inputs` drops it when the batch is right-padded
  (``collate_model_inputs`` always is) and keeps it otherwise.

Checked against a plain forward (full logits under the padding mask; SFT by
``torch.nn.functional.cross_entropy``), loss terms and gradients, for every family, in
``tests/test_forward.py``; measured in ``bench/distill_step.py``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


def causal_inputs(inputs: dict) -> dict:
    """``inputs`` without ``attention_mask`` when every row is right-padded (ones, then zeros, at least
    one token), where the causal mask alone gives each real token the same keys; else unchanged."""
    mask = inputs.get("attention_mask")
    if mask is None or mask.dim() != 2 or mask.shape[1] == 0:
        return inputs
    right_padded = bool(mask[:, 0].all()) and bool((mask[:, 1:] <= mask[:, :-1]).all())
    return {k: v for k, v in inputs.items() if k != "attention_mask"} if right_padded else inputs


@dataclass
class SequenceLogits:
    """The logits of one forward at the read ``(sample, position)`` pairs: ``rows`` [N, V], with
    ``index[b, t]`` the row of pair ``(b, t)`` and -1 for a pair that was not computed."""

    rows: torch.Tensor
    index: torch.Tensor

    def at(self, batch: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """Logits ``[n, V]`` of the pairs ``(batch[i], pos[i])``."""
        picked = self.index[batch, pos]
        if bool((picked < 0).any()):
            i = int((picked < 0).nonzero()[0, 0])
            raise RuntimeError(f"logits at (sample {int(batch[i])}, position {int(pos[i])}) were not computed")
        return self.rows[picked]


def row_index(pairs: list[tuple[torch.Tensor, torch.Tensor]], shape: tuple[int, int],
              device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The distinct pairs of ``pairs`` (a list of (batch, pos) index tensors) in row-major order, as
    ``(batch, pos, index)`` with ``index`` ``[B, T]`` mapping each pair to its row, -1 elsewhere."""
    n_batch, length = shape
    flat = [b.to(device).long() * length + t.to(device).long() for b, t in pairs]
    flat = torch.unique(torch.cat(flat)) if flat else torch.zeros(0, dtype=torch.long, device=device)
    index = torch.full((n_batch * length,), -1, dtype=torch.long, device=device)
    index[flat] = torch.arange(flat.numel(), device=device)
    return flat // length, flat % length, index.view(n_batch, length)
