"""The teacher: one model, one forward per batch, every signal of DESIGN.md §3.

Per batch (right-padded): one forward on SDPA over the sequences, with

* the saliency probe on the layers L* (only the instruction-to-visual block is materialised),
* the output head running on no row (``logits.hidden_at``): the forward yields the final hidden
  states at the response positions and at every visual position (d floats a row, cheap),
* the KV cache kept when transitions are on.

The saliency maps then choose the visual rows to store (the most salient fraction ρ), and only
then does the head run, in row chunks over the whole batch (``topk.HeadRows``, cut to the real
vocabulary), on the rows that are stored: every response row and the chosen visual rows. One
float32 log-softmax per row gives everything the row stores (``topk.row_statistics``: top-k,
gold log-prob, TPA candidates, sampled target). Results reach the host once per group of rows,
not once per sample.

Candidates for TPA are the teacher's own top tokens at t, known only after that forward. Their
branch rows (token c at position pos(t)+1, attending to x_0..x_t and itself) therefore run as a
continuation of the same forward from its KV cache: they cost exactly the branch tokens, and no
sequence token is computed twice; the head again runs only on the real branch rows
(``branches.branch_hidden_from_cache``). (Stage 2 knows the candidates in advance and runs
sequence and branches as one forward.)

The sampled targets' draws come from uniforms of a CPU generator seeded by (seed, sample id) and
the row kind's stream (:func:`sample_seed`: none for the response rows, "visual" for the stored
visual rows, "transitions" for the branch rows), one row of uniforms per stored row of that kind in
stored order, so they depend neither on the batch, nor on the chunking, nor on the device. Each
kind's draws come from the same float32 log-softmax as its top-k (``row_statistics(uniforms=...)``).
"""

from __future__ import annotations

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
    branch_hidden_from_cache,
    pad_branches,
    placeholder_ids,
    sequence_lengths,
    sequence_position_ids,
)
from stage1_teacher.config import SignalsConfig, TeacherConfig
from pipeline.modeling.logits import hidden_at, output_head, real_vocab_size
from pipeline.modeling.probe import (
    IrsItem,
    capture,
    irs_table,
    sample_indices,
    text_decoder,
    turn_saliency,
    turns_see_image,
)
from stage1_teacher.proposer import Proposal, StudentProposer
from stage1_teacher.topk import (
    SAMPLED_STREAMS,
    HeadRows,
    Transitions,
    choose_transitions,
    row_statistics,
    sample_seed,
    sample_uniforms,
)

log = logging.getLogger("stage1.teacher")


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
        # The head the teacher applies itself, to the stored rows only; its padded rows are no token.
        weight, bias = output_head(self.model)
        self.head = (weight[: self.vocab_size], None if bias is None else bias[: self.vocab_size])
        tc = signals.transitions
        self.proposer = None
        if tc.enabled and tc.candidates_from is not None:
            self.proposer = StudentProposer(
                tc.candidates_from, self.processor, candidates=tc.candidates, choice=tc.candidate_choice,
                temperature=signals.temperature, seed=seed, device=cfg.device, dtype=cfg.dtype,
            )

    def check_layers(self, layers: list[int]) -> None:
        bad = [x for x in layers if not 0 <= x < self.n_layers]
        if bad:
            raise PipelineError(f"signals.saliency_layers {bad} out of range: the teacher has {self.n_layers} text layers")

    def _inputs(self, batch: list[EncodedSample]) -> dict:
        inputs = collate_model_inputs([e.model_inputs for e in batch], self.pad_id)
        return {k: v.to(self.device) for k, v in inputs.items()}

    def head_rows(self, hidden: torch.Tensor) -> HeadRows:
        """``hidden`` [N, d] final hidden states as rows of logits over the real vocabulary."""
        return HeadRows(hidden, *self.head)

    @torch.inference_mode()
    def signals(self, batch: list[EncodedSample], layers: list[int],
                student: dict[str, EncodedSample] | None = None) -> list[SampleSignals]:
        """Every stored signal of each sample in ``batch`` (one forward + one branch continuation).

        With a proposer (``signals.transitions.candidates_from``), ``student`` holds each sample's
        encoding by the student's processor (``self.proposer.encode``), keyed by sample id."""
        cfg = self.signals_cfg
        self.check_layers(layers)
        proposals = None
        if cfg.transitions.enabled and self.proposer is not None:
            if student is None or any(e.sample_id not in student for e in batch):
                raise PipelineError("signals.transitions.candidates_from: the student's encoding of every sample is needed")
            proposals = self.proposer.propose([student[e.sample_id] for e in batch], batch, exclude=self.no_candidates)
        inputs = self._inputs(batch)
        position_ids = sequence_position_ids(self.model, inputs)
        indices = [sample_indices(e) for e in batch]
        resp = [np.asarray(e.response_positions, np.int64) for e in batch]
        vis = [np.asarray(e.visual_positions, np.int64) for e in batch]
        n_resp = np.array([len(r) for r in resp], np.int64)
        n_vis = np.array([len(v) for v in vis], np.int64)
        # Hidden rows: every response position, then every visual position, sample by sample.
        owner = np.concatenate([np.repeat(np.arange(len(batch)), n_resp), np.repeat(np.arange(len(batch)), n_vis)])
        where = np.concatenate(resp + vis)
        want_branches = cfg.transitions.enabled
        with (
            capture(self.model, layers, [i[0] for i in indices], [i[1] for i in indices]) as probe,
            hidden_at(self.model, self._device_long(owner), self._device_long(where)) as hidden,
        ):
            out = self.model(**inputs, position_ids=position_ids, use_cache=want_branches)
            blocks = [probe.block(b) for b in range(len(batch))]
        total_resp = int(n_resp.sum())
        resp_hidden, vis_hidden = hidden.rows[:total_resp], hidden.rows[total_resp:]

        # The stored visual rows, chosen from the saliency maps before the head runs.
        maps = self._saliency_maps(blocks, indices, n_vis)
        chosen = [_most_salient(m, len(v), cfg.visual_fraction) for m, v in zip(maps, vis)]
        vis_start = np.concatenate([[0], np.cumsum(n_vis)[:-1]])
        vis_rows = np.concatenate([start + order for start, (order, _) in zip(vis_start, chosen)])
        sampled = cfg.sampled.kinds()
        vis_uniforms = self._uniforms(batch, [len(order) for order, _ in chosen], "visual") if "visual" in sampled else None
        vis_stats = row_statistics(self.head_rows(vis_hidden[self._device_long(vis_rows)]), cfg.top_k,
                                   temperature=cfg.temperature, uniforms=vis_uniforms)

        # Every response row: top-k, and from the same log-softmax the TPA candidates and the draws.
        gold = np.concatenate([e.input_ids[r + 1] for e, r in zip(batch, resp)])
        uniforms = self._uniforms(batch, [len(r) for r in resp], "response") if "response" in sampled else None
        own_candidates = want_branches and proposals is None
        resp_stats = row_statistics(
            self.head_rows(resp_hidden), cfg.top_k, temperature=cfg.temperature,
            gold=self._device_long(gold) if want_branches else None,
            candidates=cfg.transitions.candidates if own_candidates else 0,
            exclude_ids=self.no_candidates, uniforms=uniforms,
            # the student's candidates: the teacher's exact log-probs of them, from the same pass
            at_ids=None if proposals is None else self._device_long(np.concatenate([p.ids for p in proposals])),
        )
        host = _to_host(vars(resp_stats) | {f"vis_{k}": v for k, v in vars(vis_stats).items()})

        resp_split = np.cumsum(n_resp)[:-1]
        per_sample = {name: np.split(arr, resp_split) for name, arr in host.items() if not name.startswith("vis_")}
        vis_split = np.cumsum([len(order) for order, _ in chosen])[:-1]
        vis_ids, vis_lp = np.split(host["vis_top_ids"], vis_split), np.split(host["vis_top_logprobs"], vis_split)
        if vis_uniforms is not None:
            vis_sampled = list(zip(np.split(host["vis_sample_ids"], vis_split), np.split(host["vis_sample_counts"], vis_split)))
        results, branches = [], []
        for b, enc in enumerate(batch):
            order, weight = chosen[b]
            sig = SampleSignals(
                sample_id=enc.sample_id,
                input_ids=enc.input_ids,
                visual_blocks=[
                    {"image_index": v.image_index, "start": v.start, "length": v.length, "grid": list(v.grid)}
                    for v in enc.visual_blocks
                ],
                turns=[{"instruction": t.instruction.tolist(), "response": t.response.tolist()} for t in enc.turns],
                image_hashes=enc.image_hashes,
                resp_pos=enc.response_positions,
                resp_ids=per_sample["top_ids"][b],
                resp_logprobs=per_sample["top_logprobs"][b],
                saliency=maps[b].numpy(),
                vis_pos=vis[b][order],
                vis_weight=weight,
                vis_ids=vis_ids[b],
                vis_logprobs=vis_lp[b],
            )
            if uniforms is not None:
                sig.sample_ids, sig.sample_counts = _trim(per_sample["sample_ids"][b], per_sample["sample_counts"][b])
            if vis_uniforms is not None:
                sig.vis_sample_ids, sig.vis_sample_counts = _trim(*vis_sampled[b])
            if want_branches:
                tr = self._choose(per_sample, b, resp[b], None if proposals is None else proposals[b])
                sig.tpa_pos = tr.cand_positions.numpy()
                sig.tpa_cand = tr.cand_ids.numpy()
                sig.tpa_cand_logprob = tr.cand_logprobs.numpy()
                branches.append((tr.cand_positions, tr.cand_ids))
            results.append(sig)

        if want_branches:
            self._transitions(results, branches, out.past_key_values, position_ids, inputs)
        return results

    def _choose(self, per_sample: dict, b: int, resp: np.ndarray, proposal: Proposal | None) -> Transitions:
        """Sample ``b``'s branch positions and candidates: the teacher's own top-K, or the student's
        proposal scored by the teacher (its log-probs stored; the student's gate ``min_prob``; the
        positions selected by the mass ``selection_mass`` names)."""
        tc = self.signals_cfg.transitions
        gate = dict(min_prob=tc.min_prob, min_alt_mass=tc.min_alt_mass, max_positions=tc.max_positions)
        teacher_gold = torch.from_numpy(per_sample["gold_logprob"][b])
        if proposal is None:
            return choose_transitions(teacher_gold, torch.from_numpy(per_sample["cand_ids"][b]),
                                      torch.from_numpy(per_sample["cand_logprobs"][b]), torch.from_numpy(resp), **gate)
        gold = teacher_gold if tc.selection_mass == "teacher" else torch.from_numpy(proposal.gold_logprob)
        return choose_transitions(gold, torch.from_numpy(proposal.ids), torch.from_numpy(per_sample["at_logprobs"][b]),
                                  torch.from_numpy(resp), proposer_logprobs=torch.from_numpy(proposal.logprobs), **gate)

    def _transitions(self, results: list[SampleSignals], branches, cache, position_ids, inputs) -> None:
        """Each sample's ``tpa_ids`` / ``tpa_logprobs``: the top-k' of its branch rows, run as a
        continuation of the batch's forward from its KV cache, the head on the real rows only."""
        k2 = self.signals_cfg.transitions.top_k
        pos, tok = pad_branches(branches)
        hidden = branch_hidden_from_cache(self.model, cache, position_ids, pos.to(self.device), tok.to(self.device),
                                          sequence_lengths(inputs))
        n_rows = [len(sig.tpa_pos) for sig in results]
        uniforms = self._uniforms(results, n_rows, "transitions") if "transitions" in self.signals_cfg.sampled.kinds() else None
        stats = row_statistics(self.head_rows(hidden), k2, temperature=self.signals_cfg.temperature, uniforms=uniforms)
        host = _to_host({"ids": stats.top_ids, "logprobs": stats.top_logprobs,
                         "sample_ids": stats.sample_ids, "sample_counts": stats.sample_counts})
        split = np.cumsum(n_rows)[:-1]
        per_sample = {name: np.split(arr, split) for name, arr in host.items()}
        for b, sig in enumerate(results):
            sig.tpa_ids, sig.tpa_logprobs = per_sample["ids"][b], per_sample["logprobs"][b]
            if uniforms is not None:
                sig.tpa_sample_ids, sig.tpa_sample_counts = _trim(per_sample["sample_ids"][b], per_sample["sample_counts"][b])

    def _uniforms(self, samples, n_rows: list[int], kind: str) -> torch.Tensor:
        """The uniforms [sum n_rows, draws] of the row ``kind``'s sampled targets: ``n_rows[b]`` rows
        for sample ``b`` (anything with a ``sample_id``), from its own generator for the kind's
        stream (:data:`SAMPLED_STREAMS`, :func:`sample_seed`), so a sample's draws depend on
        (seed, sample id, kind) and its stored rows only."""
        draws, stream = self.signals_cfg.sampled.draws, SAMPLED_STREAMS[kind]
        return torch.cat([
            sample_uniforms(n, draws, torch.Generator().manual_seed(sample_seed(self.seed, s.sample_id, stream)))
            for s, n in zip(samples, n_rows)
        ])

    def _device_long(self, values: np.ndarray) -> torch.Tensor:
        return torch.as_tensor(np.asarray(values, np.int64), device=self.device)

    def _saliency_maps(self, blocks, indices, n_vis) -> list[torch.Tensor]:
        """Per sample, the turn saliency maps [n_turns, |V|] on the host (one copy for the batch);
        [0, 0] for a sample without visual positions."""
        maps = [turn_saliency(block, index[2]) if n else None for block, index, n in zip(blocks, indices, n_vis)]
        flat = _to_host({"maps": torch.cat([m.reshape(-1) for m in maps if m is not None] or
                                           [torch.zeros(0, device=self.device)])})["maps"]
        out, start = [], 0
        for m in maps:
            if m is None:
                out.append(torch.zeros((0, 0), dtype=torch.float32))
                continue
            out.append(torch.from_numpy(flat[start : start + m.numel()]).reshape(m.shape))
            start += m.numel()
        return out

    @torch.inference_mode()
    def layer_turn_maps(self, records, max_length: int, batch_size: int = 4, layers: list[int] | None = None,
                        desc: str = "saliency per layer"):
        """Per record that encodes, ``(encoded, {layer: [n_turns, |V|] turn maps}, sees)``: the saliency
        of each layer kept apart (``sees[j]``: turn j can see the image, so its map is defined).
        Records that do not encode are logged and skipped. For IRS and for grounding studies."""
        encoded = []
        for rec in records:
            try:
                encoded.append(encode(rec, self.processor, max_length))
            except SampleError as e:
                log.info("skipping %s: %s", e.sample_id, e.reason)
        layers = list(range(self.n_layers)) if layers is None else list(layers)
        self.check_layers(layers)
        batches = [encoded[i : i + batch_size] for i in range(0, len(encoded), batch_size)]
        for batch in progress(batches, desc=desc, unit="batch"):
            inputs = self._inputs(batch)
            indices = [sample_indices(e) for e in batch]
            with capture(self.model, layers, [i[0] for i in indices], [i[1] for i in indices]) as probe:
                self.model(**inputs, use_cache=False, logits_to_keep=1)
                for b, enc in enumerate(batch):
                    maps = {layer: m.cpu() for layer, m in probe.layer_maps(b, indices[b][2]).items()}
                    yield enc, maps, turns_see_image(*indices[b])

    def calibrate(self, records, max_length: int, batch_size: int = 4) -> dict[int, float]:
        """IRS of every text layer (DESIGN.md §3.2) on ``records``; turns of a sample are the pairs."""
        layers = list(range(self.n_layers))
        items: dict[int, list[IrsItem]] = {layer: [] for layer in layers}
        n = 0
        for enc, maps, sees in self.layer_turn_maps(records, max_length, batch_size, layers, desc="calibrating IRS"):
            n += 1
            key = "|".join(enc.image_hashes)
            grid = tuple(tuple(v.grid) for v in enc.visual_blocks)
            for j, turn in enumerate(enc.turns):
                if not sees[j]:  # no map, whatever the layer: not an IRS item
                    continue
                instruction = ",".join(map(str, enc.input_ids[turn.instruction].tolist()))
                for layer in layers:
                    items[layer].append(IrsItem(key, grid, maps[layer][j], instruction))
        try:
            return irs_table(items)
        except ValueError as e:  # no pair to compare: a property of the calibration data
            raise PipelineError(
                f"signals.saliency_layers=auto: cannot calibrate on {n} sample(s): {e}. Name the layers "
                "(signals.saliency_layers=[...]) or give more samples (signals.calibration_samples)"
            ) from e


def _most_salient(maps: torch.Tensor, n_vis: int, fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """(indices into the visual positions, their turn-mean saliency) of the ``ceil(fraction × n_vis)``
    most salient visual positions, in position order; ties: the earlier position. Turns without
    a map carry no weight; with no map at all (or no visual position) nothing is chosen."""
    empty = np.zeros(0, np.int64), np.zeros(0, np.float32)
    if n_vis == 0:
        return empty
    with_map = maps.sum(1) > 0
    if not bool(with_map.any()):  # no turn can see the image: nothing says where to look
        return empty
    mean_map = maps[with_map].mean(0)
    n_keep = min(n_vis, math.ceil(fraction * n_vis))
    # Most salient first (ties: earlier position), then back to position order.
    order = torch.sort(-mean_map, stable=True).indices[:n_keep].sort().values
    return order.numpy(), mean_map[order].numpy()


def _trim(ids: np.ndarray, counts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """One sample's sampled target (unique ids and counts, as wide as the draws) cut to its widest row."""
    width = int((counts > 0).sum(1).max()) if len(counts) else 0
    return ids[:, :width], counts[:, :width]


def _to_host(tensors: dict[str, torch.Tensor | None]) -> dict[str, np.ndarray]:
    """The given tensors as numpy arrays, with one device synchronisation for all of them (copies
    issued non-blocking into pinned memory, then one wait), not one per tensor or per sample."""
    tensors = {k: v for k, v in tensors.items() if v is not None}
    on_cuda = [v.device for v in tensors.values() if v.device.type == "cuda"]
    host = {k: v.to("cpu", non_blocking=v.device.type == "cuda") for k, v in tensors.items()}
    if on_cuda:
        torch.cuda.synchronize(on_cuda[0])
    return {k: v.numpy() for k, v in host.items()}
