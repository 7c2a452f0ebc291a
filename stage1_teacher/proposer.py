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
(``pipeline.modeling.logits.hidden_at``), one float32 log-softmax per row at the dump temperature;
its top-K is the teacher's own candidate rule (``topk.row_statistics``).
Draws (``choice: sample``) are Gumbel-top-K with one generator per sample seeded by (seed, sample
id): a function of the sample alone, whatever the batch.
"""

from __future__ import annotations

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
from stage1_teacher.topk import HeadRows, log_softmax_f32, row_statistics, sample_seed

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


def draw_candidates(
    logprobs: torch.Tensor, gold: torch.Tensor, k: int, exclude: torch.Tensor, generator: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """``k`` draws without replacement per row from the distribution ``exp(logprobs)`` [n, V]
    restricted to the allowed tokens (neither ``gold`` [n] nor in ``exclude``) and renormalised:
    Gumbel-top-k (the k largest of ``logprobs + Gumbel noise`` are such draws, in draw order).
    Returns ``ids`` [n, k] (-1 where fewer than k tokens of nonzero mass are allowed) and their
    log-probs [n, k] (-inf there)."""
    n, vocab = logprobs.shape
    u = torch.rand(logprobs.shape, generator=generator, device=logprobs.device, dtype=logprobs.dtype)
    scores = logprobs - torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))  # + Gumbel(0, 1)
    scores[torch.arange(n, device=logprobs.device), gold] = -torch.inf
    scores[:, exclude] = -torch.inf
    top, ids = torch.topk(scores, min(k, vocab), dim=1)
    lp = logprobs.gather(1, ids)
    missing = ~torch.isfinite(top) | ~torch.isfinite(lp)
    if ids.shape[1] < k:  # a vocabulary smaller than k
        pad = k - ids.shape[1]
        ids, lp = F.pad(ids, (0, pad), value=-1), F.pad(lp, (0, pad), value=-torch.inf)
        missing = F.pad(missing, (0, pad), value=True)
    return ids.masked_fill(missing, -1), lp.masked_fill(missing, -torch.inf)


def candidates_provenance(transitions) -> dict:
    """What a store records of where its TPA candidates came from (``TransitionsConfig``)."""
    if transitions.candidates_from is None:
        return {"source": "teacher"}
    student = ModelIdentity.read(transitions.candidates_from)
    return {
        "source": "student",
        "path": student.path,
        "model_type": student.model_type,
        "config_fingerprint": student.config_fingerprint,
        "weights_fingerprint": student.weights_fingerprint(),
        "engine": "transformers",
        "choice": transitions.candidate_choice,
        "selection_mass": transitions.selection_mass,
    }


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
        if self.choice == "top":  # the whole batch's rows at once, as the teacher's own candidates
            stats = row_statistics(HeadRows(captured.rows, weight, bias), 0, temperature=self.temperature,
                                   gold=gold, candidates=self.candidates, exclude_ids=banned)
            out_ids, out_lp, out_gold = [stats.cand_ids], [stats.cand_logprobs], [stats.gold_logprob]
        else:
            start = 0
            for e, n in zip(batch, counts):  # one sample's rows, in chunks: its draws depend on it alone
                gen = torch.Generator(device=self.device).manual_seed(sample_seed(self.seed, e.sample_id, stream="proposer"))
                for lo in range(start, start + n, CHUNK_ROWS):
                    hi = min(lo + CHUNK_ROWS, start + n)
                    lp = log_softmax_f32(HeadRows(captured.rows[lo:hi], weight, bias), self.temperature)
                    ids, clp = draw_candidates(lp, gold[lo:hi], self.candidates, banned, gen)
                    out_ids.append(ids), out_lp.append(clp)
                    out_gold.append(lp.gather(1, gold[lo:hi, None]).squeeze(1))
                start += n
        k = self.candidates
        ids = torch.cat(out_ids).cpu().numpy() if out_ids else np.zeros((0, k), np.int64)
        lps = torch.cat(out_lp).cpu().numpy() if out_lp else np.zeros((0, k), np.float32)
        golds = torch.cat(out_gold).cpu().numpy() if out_gold else np.zeros(0, np.float32)
        bounds = np.cumsum([0] + counts)
        return [Proposal(ids[a:b], lps[a:b], golds[a:b]) for a, b in zip(bounds[:-1], bounds[1:])]
