"""Student-proposed TPA candidates (DESIGN.md §3.4, ``signals.transitions.candidates_from``).

The paper samples TPA candidates from the *student*: the transitions it aligns are those the student
would take. Offline, a student checkpoint proposes them: at each response position ``t`` of the gold
conversation, its top-``K`` tokens (``choice: top``) or ``K`` draws without replacement
(``choice: sample``) from ``p_S(·|x≤t)``, never the gold token ``x_{t+1}`` nor a vision placeholder.
The teacher then scores each candidate exactly as it scores its own (``stage1_teacher.teacher``):
``p_T(c|x≤t)`` for the TPA weight and the transition row ``p_T(·|x≤t, c)``.

The student reads the same record through its own processor, so its sequence may differ from the
teacher's in its visual tokens (another grid, a pooled one); its text tokens are the same (the
tokenizer and chat template must equal the teacher's, as for Stage 2, DESIGN.md §5.1), so the j-th
response position of one is the j-th of the other. :meth:`StudentProposer.propose` checks that
their gold tokens agree.

Like the teacher, the student's output head runs only at the response rows, in row chunks
(``pipeline.modeling.logits.hidden_at``), one float32 log-softmax per row at the dump temperature.
Draws (``choice: sample``) are Gumbel-top-K with one generator per sample seeded by (seed, sample
id): a function of the sample alone, whatever the batch.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from transformers import AutoModelForImageTextToText

from pipeline.data import EncodedSample, encode
from pipeline.devices import resolve_device, resolve_dtype
from pipeline.errors import PipelineError
from pipeline.modeling.batching import collate_model_inputs, pad_token_id
from pipeline.modeling.branches import placeholder_ids
from pipeline.modeling.logits import hidden_at, output_head, real_vocab_size
from pipeline.processors import load_processor
from schemas.fingerprints import ModelIdentity, chat_template_fingerprint, tokenizer_fingerprint

CHUNK_ROWS = 256


@dataclass
class Proposal:
    """One sample's proposed candidates at its response positions (in response-position order).

    ``ids`` [n, K] int64 (-1 where a row has fewer than K allowed tokens), ``logprobs`` [n, K] float32:
    the student's log p_S(c|x≤t) (-inf at -1), ``gold_logprob`` [n] float32: the student's
    log p_S(x_{t+1}|x≤t)."""

    ids: np.ndarray
    logprobs: np.ndarray
    gold_logprob: np.ndarray


def propose_from_logprobs(
    logprobs: torch.Tensor,
    gold: torch.Tensor,
    k: int,
    exclude: torch.Tensor,
    choice: str = "top",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Candidates from normalised log-probs ``logprobs`` [n, V] (any row count, float32).

    ``gold`` [n]: the token each row must not propose; ``exclude`` [e]: tokens no row may propose.
    ``choice="top"``: the ``k`` most probable allowed tokens, by decreasing probability (ties: as
    ``torch.topk`` orders them); ``"sample"``: ``k`` draws without replacement from the allowed
    tokens' renormalised distribution (Gumbel-top-k; ``generator`` required), in draw order.
    Returns ``ids`` [n, k] (-1 where fewer than k tokens are allowed), their ``logprobs`` [n, k]
    (-inf there) and the gold token's log-prob [n].
    """
    n, vocab = logprobs.shape
    gold_lp = logprobs.gather(1, gold[:, None]).squeeze(1)
    if choice == "top":
        # The k best allowed tokens are among the k + 1 + |exclude| best tokens: no [n, V] mask needed.
        width = min(vocab, k + 1 + exclude.numel())
        lp, ids = torch.topk(logprobs, width, dim=1)
        banned = (ids == gold[:, None]) | torch.isin(ids, exclude)
        order = torch.sort(banned.to(torch.int8), dim=1, stable=True).indices[:, :k]  # allowed first, in rank order
        ids, lp, banned = ids.gather(1, order), lp.gather(1, order), banned.gather(1, order)
    elif choice == "sample":
        if generator is None:
            raise ValueError("choice='sample' needs a generator")
        u = torch.rand(logprobs.shape, generator=generator, device=logprobs.device, dtype=logprobs.dtype)
        scores = logprobs - torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))  # + Gumbel(0, 1)
        scores[torch.arange(n, device=logprobs.device), gold] = -torch.inf
        scores[:, exclude] = -torch.inf
        top, ids = torch.topk(scores, min(k, vocab), dim=1)
        lp = logprobs.gather(1, ids)
        banned = ~torch.isfinite(top) | ~torch.isfinite(lp)
    else:
        raise ValueError(f"choice must be 'top' or 'sample', got {choice!r}")
    if ids.shape[1] < k:  # a vocabulary smaller than k + 1
        pad = k - ids.shape[1]
        ids, lp = F.pad(ids, (0, pad), value=-1), F.pad(lp, (0, pad), value=-torch.inf)
        banned = F.pad(banned, (0, pad), value=True)
    ids = torch.where(banned, -1, ids)
    lp = torch.where(banned, -torch.inf, lp)
    return ids, lp, gold_lp


def _sample_seed(seed: int, sample_id: str) -> int:
    return int.from_bytes(hashlib.sha256(f"proposer:{seed}:{sample_id}".encode()).digest()[:7], "big")


class StudentProposer:
    """A student checkpoint that proposes TPA candidates for the teacher to score."""

    def __init__(self, path: str, teacher_processor, *, candidates: int, choice: str, temperature: float,
                 seed: int, device: str = "auto", dtype: str = "auto"):
        self.path = path
        self.device = resolve_device(device, "signals.transitions.candidates_from")
        self.identity = ModelIdentity.read(path)
        self.processor = load_processor(path, self.identity.model_type)
        theirs, ours = self.processor, teacher_processor
        if tokenizer_fingerprint(theirs.tokenizer) != tokenizer_fingerprint(ours.tokenizer):
            raise PipelineError(
                f"signals.transitions.candidates_from: the student {path} has another tokenizer than the teacher; "
                "its candidates would be other tokens"
            )
        if chat_template_fingerprint(theirs) != chat_template_fingerprint(ours):
            raise PipelineError(
                f"signals.transitions.candidates_from: the student {path} has another chat template than the teacher; "
                "its response positions would not be the teacher's"
            )
        self.model = AutoModelForImageTextToText.from_pretrained(
            path, dtype=resolve_dtype(dtype, self.device), attn_implementation="sdpa", trust_remote_code=False
        ).to(self.device).eval()
        self.pad_id = pad_token_id(self.processor.tokenizer)
        self.vocab_size = real_vocab_size(self.processor.tokenizer, self.model.get_output_embeddings().weight.shape[0],
                                          f"student {path}")
        self.exclude = torch.tensor(placeholder_ids(self.model), dtype=torch.long, device=self.device)
        self.candidates, self.choice, self.temperature, self.seed = candidates, choice, temperature, seed

    def provenance(self) -> dict:
        """What the store records of where its candidates came from."""
        return {
            "source": "student",
            "path": self.path,
            "model_type": self.identity.model_type,
            "config_fingerprint": self.identity.config_fingerprint,
            "weights_fingerprint": self.identity.weights_fingerprint(),
            "engine": "transformers",
            "choice": self.choice,
        }

    def encode(self, record, max_length: int) -> EncodedSample:
        """The record through the student's own processor (raises ``SampleError`` like the teacher's)."""
        return encode(record, self.processor, max_length)

    @torch.inference_mode()
    def propose(self, batch: list[EncodedSample], teacher_batch: list[EncodedSample],
                exclude: torch.Tensor | None = None) -> list[Proposal]:
        """Candidates at each response position of each sample: ``batch`` is the student's encoding of
        the samples ``teacher_batch`` holds (same order); ``exclude``: more tokens no row may propose
        (the teacher's vision placeholders)."""
        for mine, theirs in zip(batch, teacher_batch, strict=True):
            a = mine.input_ids[mine.response_positions + 1]
            b = theirs.input_ids[theirs.response_positions + 1]
            if mine.sample_id != theirs.sample_id or not np.array_equal(a, b):
                raise PipelineError(
                    f"sample {theirs.sample_id}: the student {self.path} reads other response tokens than the teacher "
                    f"({len(a)} vs {len(b)}); the two cannot share candidates"
                )
        banned = self.exclude if exclude is None else torch.unique(torch.cat([self.exclude, exclude.to(self.device)]))
        inputs = collate_model_inputs([e.model_inputs for e in batch], self.pad_id)
        inputs = {k: v.to(self.device) for k, v in inputs.items()}
        counts = [len(e.response_positions) for e in batch]
        rows_b = torch.as_tensor(np.repeat(np.arange(len(batch)), counts), device=self.device)
        rows_t = torch.as_tensor(np.concatenate([e.response_positions for e in batch]), device=self.device)
        with hidden_at(self.model, rows_b, rows_t) as captured:
            self.model(**inputs, use_cache=False)
        weight, bias = output_head(self.model)
        weight = weight[: self.vocab_size]
        bias = None if bias is None else bias[: self.vocab_size]
        gold = torch.as_tensor(np.concatenate([e.input_ids[e.response_positions + 1] for e in batch]), device=self.device)
        out_ids, out_lp, out_gold = [], [], []
        start = 0
        for e, n in zip(batch, counts):
            gen = None
            if self.choice == "sample":
                gen = torch.Generator(device=self.device).manual_seed(_sample_seed(self.seed, e.sample_id))
            for lo in range(start, start + n, CHUNK_ROWS):  # one sample's rows, in chunks: draws depend on it alone
                hi = min(lo + CHUNK_ROWS, start + n)
                logits = F.linear(captured.rows[lo:hi], weight, bias).float()
                lp = torch.log_softmax(logits / self.temperature if self.temperature != 1.0 else logits, dim=-1)
                ids, clp, glp = propose_from_logprobs(lp, gold[lo:hi], self.candidates, banned, self.choice, gen)
                out_ids.append(ids), out_lp.append(clp), out_gold.append(glp)
            start += n
        k = self.candidates
        ids = torch.cat(out_ids).cpu().numpy() if out_ids else np.zeros((0, k), np.int64)
        lps = torch.cat(out_lp).cpu().numpy() if out_lp else np.zeros((0, k), np.float32)
        golds = torch.cat(out_gold).cpu().numpy() if out_gold else np.zeros(0, np.float32)
        bounds = np.cumsum([0] + counts)
        return [Proposal(ids[a:b], lps[a:b], golds[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
