"""The teacher: one model, one forward per batch, every signal of DESIGN.md §3.

Per batch (right-padded): one forward on SDPA over the sequences, with

* the saliency probe on the layers L* (only the instruction-to-visual block is materialised),
* logits kept only at response and visual positions (``logits_to_keep``), the union over the batch,
* the KV cache kept when transitions are on.

Candidates for TPA are the teacher's own top tokens at t, known only after that forward. Their
branch rows (token c at position pos(t)+1, attending to x_0..x_t and itself) therefore run as a
continuation of the same forward from its KV cache: they cost exactly the branch tokens, and no
sequence token is computed twice. (Stage 2 knows the candidates in advance and runs sequence and
branches as one forward.)
"""

from __future__ import annotations

import hashlib
import logging
import math

import numpy as np
import torch
from transformers import AutoModelForImageTextToText

from pipeline.data import EncodedSample, SampleError, encode
from pipeline.devices import resolve_device, resolve_dtype
from pipeline.errors import PipelineError
from pipeline.logs import progress
from pipeline.processors import load_processor
from schemas.signals import SampleSignals
from pipeline.modeling.batching import collate_model_inputs, pad_token_id
from pipeline.modeling.branches import (
    forward_branches_from_cache,
    pad_branches,
    placeholder_ids,
    sequence_lengths,
    sequence_position_ids,
)
from stage1_teacher.config import SignalsConfig, TeacherConfig
from pipeline.modeling.logits import kept_rows, real_vocab_size
from pipeline.modeling.probe import (
    IrsItem,
    capture,
    irs_table,
    sample_indices,
    text_decoder,
    turn_saliency,
    turns_see_image,
)
from stage1_teacher.topk import sample_counts, select_transitions, topk_logprobs

log = logging.getLogger("stage1.teacher")


def sample_seed(seed: int, sample_id: str) -> int:
    """A per-sample RNG seed that depends only on (seed, sample id): stable across workers and resumes."""
    return int.from_bytes(hashlib.sha256(f"{seed}:{sample_id}".encode()).digest()[:7], "big")


class Teacher:
    def __init__(self, cfg: TeacherConfig, signals: SignalsConfig, seed: int = 0, processor=None):
        """``processor``: the checkpoint's, when the caller has loaded it already (else loaded here)."""
        self.device = resolve_device(cfg.device, "teacher.device")
        self.dtype = resolve_dtype(cfg.dtype, self.device)
        self.model = AutoModelForImageTextToText.from_pretrained(
            cfg.path, dtype=self.dtype, attn_implementation="sdpa", trust_remote_code=False
        ).to(self.device).eval()
        self.processor = load_processor(cfg.path) if processor is None else processor
        tok = self.processor.tokenizer
        self.pad_id = pad_token_id(tok)
        # Every distribution is over the tokenizer's tokens only (DESIGN.md §3.1): output rows at or
        # above len(tokenizer) are padding (Qwen2: 152,064 rows for 151,646 tokens) and are cut off
        # the logits before any log-softmax, top-k, sampled target or candidate choice.
        self.vocab_size = real_vocab_size(tok, self.model.get_output_embeddings().weight.shape[0], cfg.path)
        self.signals_cfg = signals
        self.seed = seed
        self.n_layers = len(text_decoder(self.model).layers)
        self.no_candidates = torch.tensor(placeholder_ids(self.model), device=self.device)

    def check_layers(self, layers: list[int]) -> None:
        bad = [x for x in layers if not 0 <= x < self.n_layers]
        if bad:
            raise PipelineError(f"signals.saliency_layers {bad} out of range: the teacher has {self.n_layers} text layers")

    def _inputs(self, batch: list[EncodedSample]) -> dict:
        inputs = collate_model_inputs([e.model_inputs for e in batch], self.pad_id)
        return {k: v.to(self.device) for k, v in inputs.items()}

    @torch.inference_mode()
    def signals(self, batch: list[EncodedSample], layers: list[int]) -> list[SampleSignals]:
        """Every stored signal of each sample in ``batch`` (one forward + one branch continuation)."""
        cfg = self.signals_cfg
        self.check_layers(layers)
        inputs = self._inputs(batch)
        position_ids = sequence_position_ids(self.model, inputs)
        indices = [sample_indices(e) for e in batch]
        # Logits only where a distribution is stored: response and visual positions, union over the batch.
        keep, column = kept_rows([np.concatenate([e.response_positions, e.visual_positions]) for e in batch],
                                 inputs["input_ids"].shape[1])
        want_branches = cfg.transitions.enabled
        with capture(self.model, layers, [i[0] for i in indices], [i[1] for i in indices]) as probe:
            out = self.model(
                **inputs,
                position_ids=position_ids,
                use_cache=want_branches,
                logits_to_keep=torch.as_tensor(keep, device=self.device),
            )
            blocks = [probe.block(b) for b in range(len(batch))]
        logits = out.logits[..., : self.vocab_size]  # [B, len(keep), V]: the real tokens' rows

        results, branches = [], []
        for b, enc in enumerate(batch):
            resp = enc.response_positions
            resp_logits = logits[b, torch.as_tensor(column[resp], device=self.device)]
            resp_ids, resp_lp = topk_logprobs(resp_logits, cfg.top_k, cfg.temperature)
            saliency, vis_pos, vis_weight, vis_ids, vis_lp = self._visual(enc, blocks[b], indices[b], logits[b], column)
            sig = SampleSignals(
                sample_id=enc.sample_id,
                input_ids=enc.input_ids,
                visual_blocks=[
                    {"image_index": v.image_index, "start": v.start, "length": v.length, "grid": list(v.grid)}
                    for v in enc.visual_blocks
                ],
                turns=[{"instruction": t.instruction.tolist(), "response": t.response.tolist()} for t in enc.turns],
                image_hashes=enc.image_hashes,
                resp_pos=resp,
                resp_ids=resp_ids.cpu().numpy(),
                resp_logprobs=resp_lp.cpu().numpy(),
                saliency=saliency,
                vis_pos=vis_pos,
                vis_weight=vis_weight,
                vis_ids=vis_ids,
                vis_logprobs=vis_lp,
            )
            if cfg.sampled.enabled:
                gen = torch.Generator(device=self.device).manual_seed(sample_seed(self.seed, enc.sample_id))
                s_ids, s_counts = sample_counts(resp_logits, cfg.sampled.draws, gen, cfg.temperature)
                sig.sample_ids, sig.sample_counts = s_ids.cpu().numpy(), s_counts.cpu().numpy()
            if want_branches:
                gold = torch.as_tensor(enc.input_ids[resp + 1], device=self.device)
                tr = select_transitions(
                    resp_logits,
                    gold,
                    torch.as_tensor(resp, device=self.device),
                    candidates=cfg.transitions.candidates,
                    min_prob=cfg.transitions.min_prob,
                    min_alt_mass=cfg.transitions.min_alt_mass,
                    max_positions=cfg.transitions.max_positions,
                    temperature=cfg.temperature,
                    exclude_ids=self.no_candidates,
                )
                sig.tpa_pos = tr.cand_positions.cpu().numpy()
                sig.tpa_cand = tr.cand_ids.cpu().numpy()
                sig.tpa_cand_logprob = tr.cand_logprobs.cpu().numpy()
                branches.append((tr.cand_positions.cpu(), tr.cand_ids.cpu()))
            results.append(sig)

        if want_branches:
            pos, tok = pad_branches(branches)
            k2 = cfg.transitions.top_k
            if pos.shape[1] == 0:
                for sig in results:
                    sig.tpa_ids = np.zeros((0, k2), np.int64)
                    sig.tpa_logprobs = np.zeros((0, k2), np.float32)
            else:
                branch_logits = forward_branches_from_cache(
                    self.model, out.past_key_values, position_ids, pos.to(self.device), tok.to(self.device),
                    sequence_lengths(inputs),
                )[..., : self.vocab_size]
                for b, sig in enumerate(results):
                    n = len(sig.tpa_pos)
                    ids, lp = topk_logprobs(branch_logits[b, :n], k2, cfg.temperature)
                    sig.tpa_ids, sig.tpa_logprobs = ids.cpu().numpy(), lp.cpu().numpy()
        return results

    def _visual(self, enc: EncodedSample, block, index, logits_b, column):
        """Turn saliency maps, and top-k distributions at the most salient fraction of visual positions."""
        cfg = self.signals_cfg
        k = cfg.top_k
        rows, cols, turn_rows = index
        n_vis = len(cols)
        if n_vis == 0:
            empty_i, empty_f = np.zeros(0, np.int64), np.zeros(0, np.float32)
            return np.zeros((0, 0), np.float32), empty_i, empty_f, np.zeros((0, k), np.int64), np.zeros((0, k), np.float32)
        maps = turn_saliency(block, turn_rows)  # [n_turns, |V|]: rows sum to 1, or 0 for a turn without a map
        with_map = maps.sum(1) > 0
        if not bool(with_map.any()):  # no turn can see the image: nothing says where to look
            return (maps.cpu().numpy(), np.zeros(0, np.int64), np.zeros(0, np.float32),
                    np.zeros((0, k), np.int64), np.zeros((0, k), np.float32))
        mean_map = maps[with_map].mean(0)  # turns without a map carry no IVA weight
        n_keep = min(n_vis, math.ceil(cfg.visual_fraction * n_vis))
        # Most salient first (ties: earlier position), then back to position order.
        order = torch.sort(-mean_map, stable=True).indices[:n_keep].sort().values
        vis_pos = cols[order.cpu()].numpy()
        ids, lp = topk_logprobs(logits_b[torch.as_tensor(column[vis_pos], device=self.device)], k, cfg.temperature)
        return (
            maps.cpu().numpy(),
            vis_pos,
            mean_map[order].cpu().numpy(),
            ids.cpu().numpy(),
            lp.cpu().numpy(),
        )

    @torch.inference_mode()
    def calibrate(self, records, max_length: int, batch_size: int = 4) -> dict[int, float]:
        """IRS of every text layer (DESIGN.md §3.2) on ``records``; turns of a sample are the pairs."""
        encoded = []
        for rec in records:
            try:
                encoded.append(encode(rec, self.processor, max_length))
            except SampleError as e:
                log.info("calibration skips %s: %s", e.sample_id, e.reason)
        layers = list(range(self.n_layers))
        items: dict[int, list[IrsItem]] = {layer: [] for layer in layers}
        batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
        for batch in progress(batches, desc="calibrating IRS", unit="batch"):
            inputs = self._inputs(batch)
            indices = [sample_indices(e) for e in batch]
            with capture(self.model, layers, [i[0] for i in indices], [i[1] for i in indices]) as probe:
                self.model(**inputs, use_cache=False, logits_to_keep=1)
                for b, enc in enumerate(batch):
                    maps = probe.layer_maps(b, indices[b][2])
                    key = "|".join(enc.image_hashes)
                    grid = tuple(tuple(v.grid) for v in enc.visual_blocks)
                    sees = turns_see_image(*indices[b])
                    for j, turn in enumerate(enc.turns):
                        if not sees[j]:  # no map, whatever the layer: not an IRS item
                            continue
                        instruction = ",".join(map(str, enc.input_ids[turn.instruction].tolist()))
                        for layer in layers:
                            items[layer].append(IrsItem(key, grid, maps[layer][j].cpu(), instruction))
        try:
            return irs_table(items)
        except ValueError as e:  # no pair to compare: a property of the calibration data
            raise PipelineError(
                f"signals.saliency_layers=auto: cannot calibrate on {len(encoded)} sample(s): {e}. Name the layers "
                "(signals.saliency_layers=[...]) or give more samples (signals.calibration_samples)"
            ) from e
