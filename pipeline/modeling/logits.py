"""Logits at chosen rows only: with a real vocabulary the ``[B, T, V]`` logits of a plain forward
are most of a forward's memory, and the head's matmul much of its time, so both stages run the
output head only where a distribution is read.

* :func:`kept_rows` — for HF's ``logits_to_keep``: the union of the positions a batch reads, and
  each position's row in the kept logits (the evaluator's agreement).
* :func:`logits_at` — a forward pre-hook on the output head: logits at given (sample, position)
  pairs (Stage 2's losses, and the sequence rows of ``branches.forward_with_branches``).
* :func:`hidden_at` — the same pre-hook, but the head runs on no row: the forward yields the final
  hidden states at the pairs, and the caller applies the head itself, in row chunks
  (``stage1_teacher.teacher``; ``stage2_student.losses.fused_head_loss``), so no ``[N, V]`` logits
  tensor is ever whole in memory. :func:`output_head` gives the head's weight and bias for that.
* :func:`real_vocab_size` — the columns that are tokens: checkpoints carry padded output rows
  (Qwen2: 152,064 rows for 151,646 tokens); both stages cut the logits to ``len(tokenizer)``
  columns before any log-softmax (DESIGN.md §3.1), so both sides share one support.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch

from pipeline.errors import PipelineError


def real_vocab_size(tokenizer, head_rows: int, where: str) -> int:
    """``len(tokenizer)``, the number of real tokens (the logits' columns below it). A tokenizer with
    more tokens than the model has output rows is refused: its extra tokens could never be predicted."""
    n = len(tokenizer)
    if n > head_rows:
        raise PipelineError(
            f"{where}: the tokenizer has {n} tokens but the model's output head only {head_rows} rows; "
            "the tokenizer does not belong to this model"
        )
    return n


def kept_rows(positions: list[np.ndarray], seq_len: int) -> tuple[np.ndarray, np.ndarray]:
    """``(keep, column)`` for a batch whose sample ``b`` reads logits at ``positions[b]``.

    ``keep``: the sorted union of the positions (pass it as ``logits_to_keep``: the logits come out
    ``[B, len(keep), V]``); ``column`` [seq_len]: the row of each position in those logits, -1 where
    it is not kept. Sample ``b``'s rows are then ``logits[b, column[positions[b]]]``.
    """
    keep = np.unique(np.concatenate(positions)) if positions else np.zeros(0, np.int64)
    column = np.full(seq_len, -1, dtype=np.int64)
    column[keep] = np.arange(len(keep))
    return keep, column


@contextlib.contextmanager
def _head_pre_hook(model: torch.nn.Module, pick):
    """Run ``pick(hidden)`` on the output head's input during one forward inside the block; refuse
    (RuntimeError) a forward in which the head did not run exactly once."""
    inner = getattr(model, "module", model)  # DDP and similar wrappers
    head = inner.get_output_embeddings()
    if head is None:
        raise RuntimeError(f"{type(inner).__name__} has no output embedding to pick logit rows for")
    calls = []

    def hook(module, args):
        (hidden,) = args
        calls.append(hidden.shape)
        return (pick(hidden),)

    handle = head.register_forward_pre_hook(hook)
    try:
        yield
    finally:
        handle.remove()
    if len(calls) != 1:
        raise RuntimeError(f"expected one call of the output head of {type(inner).__name__} in the block, saw {len(calls)}")


@contextlib.contextmanager
def logits_at(model: torch.nn.Module, batch: torch.Tensor, pos: torch.Tensor):
    """For one forward inside the block, the output head sees only the final hidden states at
    ``(batch[i], pos[i])``: the model's logits come out as ``[1, N, V]``, row i for pair i.

    A forward pre-hook on the output embedding, so the call still goes through the model's own
    (possibly DDP-wrapped) forward. Losses that read few positions save the head's matmul and the
    ``[B, T, V]`` logits (1.2 GB in fp32 for 2048 positions of a 152k vocabulary, per sample, and as
    much again for its gradient). Refuses (RuntimeError) a forward in which the head did not run
    exactly once, where the rows could not be trusted to be the final hidden states'.
    """
    with _head_pre_hook(model, lambda hidden: hidden[batch, pos].unsqueeze(0)):
        yield


class HiddenRows:
    """Filled by :func:`hidden_at`: ``rows`` [N, d], the final hidden states at the pairs (with
    their graph when the forward has one)."""

    rows: torch.Tensor | None = None


@contextlib.contextmanager
def hidden_at(model: torch.nn.Module, batch: torch.Tensor, pos: torch.Tensor):
    """For one forward inside the block, capture the final hidden states at ``(batch[i], pos[i])``
    (yielded :class:`HiddenRows`, filled when the head runs) and let the head run on no row: the
    model's logits come out ``[B, 0, V]``. The caller applies :func:`output_head` to the rows it
    needs, chunk by chunk. Refuses a forward in which the head did not run exactly once."""
    captured = HiddenRows()

    def pick(hidden):
        captured.rows = hidden[batch, pos]
        return hidden[:, :0]

    with _head_pre_hook(model, pick):
        yield captured


# Config attributes by which some architectures transform logits after the head (Gemma 2's soft
# cap, Cohere's scale, Granite's divisor): applying the bare head to hidden rows would be wrong.
_LOGIT_TRANSFORMS = {"final_logit_softcapping": None, "logit_scale": 1.0, "logits_scaling": 1.0}


def output_head(model: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(weight [V_rows, d], bias [V_rows] | None)`` of the model's output head, for callers of
    :func:`hidden_at` that apply it themselves: ``logits = hidden @ weight.T + bias``.

    Refuses (PipelineError) a head that is not a linear layer, or a model that transforms its
    logits after the head (a soft cap, a scale), where that product would not be the model's logits.
    """
    inner = getattr(model, "module", model)
    head = inner.get_output_embeddings()
    if not isinstance(head, torch.nn.Linear):
        raise PipelineError(f"{type(inner).__name__}: the output head is a {type(head).__name__}, not a linear layer")
    text = inner.config.get_text_config()
    for name, neutral in _LOGIT_TRANSFORMS.items():
        value = getattr(text, name, neutral)
        if value is not None and value != neutral:
            raise PipelineError(
                f"{type(inner).__name__}: {name}={value} transforms the logits after the head; "
                "the row-chunked head does not support it"
            )
    return head.weight, head.bias
