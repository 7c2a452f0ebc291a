"""``pipeline run distill``: train a student against a teacher store, no teacher in memory.

Top to bottom: load the store's manifest and the student, refuse an incompatible pair, build the
optimiser and the deterministic data stream, resume from the run's latest checkpoint if there is
one, train with per-term loss logging, save the student in HF format with its provenance.

The data order is a pure function of (seed, epoch, shard sizes), so resume state is the step and
the data position; a resumed run sees the same batches and reproduces the same losses.

Under torchrun or accelerate launch (DDP), N processes at batch B train as one process at batch
N·B: each step's N·B samples are split between the processes ([order note], ``pad_ranks``), every
loss term is normalised over all of them (:func:`global_scales`, [ddp note] in ``losses``), and
process 0 alone writes logs, checkpoints and ``final/``.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.utils import DistributedDataParallelKwargs, DistributedType
from torch.utils.data import DataLoader

from pipeline import __version__
from pipeline.config import save_config, to_dict
from pipeline.data.encode import IGNORE_INDEX
from pipeline.errors import PipelineError
from pipeline.locks import launch_rank, output_lock
from pipeline.logs import progress
from schemas.io import fingerprint
from pipeline.modeling.branches import forward_with_branches
from pipeline.modeling.logits import hidden_at, output_head, real_vocab_size
from pipeline.modeling.probe import capture
from stage2_student import losses as L
from stage2_student.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from schemas.compat import check_compatible, open_store
from stage2_student.config import DistillConfig
from stage2_student.data import StoreDataset, StudentBatch
from stage2_student.forward import SequenceLogits, causal_inputs, row_index
from stage2_student.student import freeze, load_student, map_layer, save_student, text_layers

log = logging.getLogger("stage2.distill")


def lr_lambda(cfg):
    t = cfg.train

    def factor(step: int) -> float:
        if step < t.warmup_steps:
            return (step + 1) / t.warmup_steps
        if t.schedule == "constant":
            return 1.0
        progress = (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps)
        if t.schedule == "linear":
            return max(0.0, 1.0 - progress)
        return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))

    return factor


def run_fingerprint(cfg: DistillConfig) -> str:
    """What must not change between a run and its resume (steps may grow; logging may change)."""
    d = to_dict(cfg)
    d["train"] = {k: v for k, v in d["train"].items() if k not in ("steps", "checkpoint_every", "log_every")}
    caches = ("num_workers", "image_cache_mb", "read_cache_mb", "pixel_cache_dir", "pixel_cache_max_gb")
    d["data"] = {k: v for k, v in d["data"].items() if k not in caches}
    # targets added later: at their default a run fingerprints as before they existed, so it resumes
    d["loss"] = {k: v for k, v in d["loss"].items() if not (k in ("iva_target", "tpa_target") and v == "topk")}
    return fingerprint(d)


class LossLog:
    """Per-step loss terms: JSONL (machine-readable) and TensorBoard (offline event files)."""

    def __init__(self, run_dir: Path, start_step: int = 0):
        """Appends from ``start_step`` on: the JSONL was cut there (``_truncate_log``), and
        TensorBoard is told to drop the events of later steps an earlier attempt wrote."""
        from torch.utils.tensorboard import SummaryWriter

        self.jsonl = (run_dir / "losses.jsonl").open("a")
        self.tb = SummaryWriter(str(run_dir / "tensorboard"), purge_step=start_step + 1)

    def write(self, step: int, terms: dict[str, float], lr: float) -> None:
        rec = {"step": step, "lr": lr, **terms}
        self.jsonl.write(json.dumps(rec) + "\n")
        self.jsonl.flush()
        for k, v in terms.items():
            self.tb.add_scalar(f"loss/{k}", v, step)
        self.tb.add_scalar("lr", lr, step)

    def close(self) -> None:
        self.jsonl.close()
        self.tb.close()


def _truncate_log(run_dir: Path, step: int) -> None:
    """Drop log lines past ``step`` (written after the checkpoint a resume starts from)."""
    path = run_dir / "losses.jsonl"
    if path.is_file():
        keep = [line for line in path.read_text().splitlines() if line and json.loads(line)["step"] <= step]
        path.write_text("".join(line + "\n" for line in keep))


def attention_term(blocks: list[torch.Tensor], saliency, like: torch.Tensor) -> tuple[torch.Tensor, int]:
    """The IVA attention variant: per turn, the student's instruction-mean attention over V against
    the teacher's map s_j; turns of different samples have different |V|, so rows are padded and
    masked. Returns the term and the turns its mean divides by ([ddp note] in ``losses``)."""
    student_maps, teacher_maps = [], []
    for b, block in enumerate(blocks):
        for j, turn_rows in enumerate(saliency.turn_rows[b]):
            # A turn without a teacher map (all zeros: it cannot see the image) has nothing to align.
            if len(turn_rows) and block.shape[1] and bool(saliency.maps[b][j].sum() > 0):
                student_maps.append(block[turn_rows].mean(0))
                teacher_maps.append(saliency.maps[b][j])
    if not student_maps:
        return like.sum() * 0.0, 0  # no image in this batch: a zero that keeps the graph
    width = max(m.shape[0] for m in student_maps)

    def padded(rows: list[torch.Tensor]) -> torch.Tensor:
        return torch.stack([torch.nn.functional.pad(r, (0, width - r.shape[0])) for r in rows])

    mask = torch.stack([torch.arange(width, device=like.device) < m.shape[0] for m in student_maps])
    student, teacher = padded(student_maps), padded(teacher_maps)
    return L.attention_kl(student, teacher, mask), L.attention_count(student, teacher, mask)


def sft_pairs(labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(sample, position) of the logits that predict a labelled token (the label at position + 1)."""
    return (labels[:, 1:] != IGNORE_INDEX).nonzero(as_tuple=True)


def loss_pairs(batch: StudentBatch, cfg: DistillConfig) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per active sequence term, the (sample, position) pairs whose logits it reads: SFT the
    positions whose next token is labelled, KD and IVA their rows of the store."""
    lc, pairs = cfg.loss, {}
    if lc.sft > 0:
        pairs["sft"] = sft_pairs(batch.labels)
    if lc.kd > 0:
        pairs["kd"] = (batch.kd.batch, batch.kd.pos)
    if lc.iva > 0:
        pairs["iva"] = (batch.iva.batch, batch.iva.pos)
    return pairs


def compute_losses(model, batch: StudentBatch, cfg: DistillConfig, attn_layer: int | None,
                   accelerator: Accelerator | None = None, vocab_size: int | None = None) -> tuple[torch.Tensor, dict[str, float]]:
    """One micro-batch: one student forward (sequence + TPA branch rows), every active loss term.

    The forward yields final hidden states at the rows the terms read (and the TPA branch rows);
    the output head and the sparse terms then run together in row chunks
    (``losses.fused_head_loss``: no ``[N, V]`` logits tensor is ever whole). A forward without
    branch rows runs under the causal mask alone (``stage2_student.forward``).

    With ``accelerator``, this micro-batch is this process's share of a global one (one per process,
    [ddp note]): the loss returned is this share's part of the global batch's loss, so that DDP's
    mean of the gradients over processes is the gradient of the global batch's loss, and the log is
    the global batch's (every process returns the same). ``vocab_size``: the real tokens; the
    head's padded rows above it are no column of any distribution, so the student's distributions
    have the teacher's support (DESIGN.md §3.1; None: every row)."""
    lc = cfg.loss
    inputs = batch.model_inputs
    tpa = batch.tpa if lc.tpa > 0 else None
    ids = inputs["input_ids"]
    pairs = loss_pairs(batch, cfg)
    b, t, index = row_index(list(pairs.values()), tuple(ids.shape), ids.device)
    rows = SequenceLogits(torch.arange(len(b), device=ids.device), index)  # pair -> its hidden row

    # Each term as a row term on the hidden rows, with the rows or groups its mean divides by.
    terms: dict[str, tuple[L.RowTerm, torch.Tensor]] = {}
    counts: dict[str, int] = {}  # [ddp note]
    kw = dict(divergence=lc.divergence, beta=lc.beta, alpha=lc.alpha)
    if lc.sft > 0:
        sb, st = pairs["sft"]
        labels = batch.labels[sb, st + 1]
        terms["sft"] = (L.sft_term(labels), rows.at(sb, st))
        counts["sft"] = L.sft_count(labels)
    if lc.kd > 0:
        kd = batch.kd
        if lc.target == "sampled":
            terms["kd"] = (L.sampled_kd_term(kd.sampled_ids, kd.sampled_counts), rows.at(*pairs["kd"]))
            counts["kd"] = L.sampled_kd_count(kd.sampled_ids, kd.sampled_counts)
        else:
            terms["kd"] = (L.kd_term(kd.ids, kd.logprobs, **kw), rows.at(*pairs["kd"]))
            counts["kd"] = L.kd_count(kd.ids)
    if lc.iva > 0:
        iva = batch.iva
        if lc.iva_target == "sampled":
            terms["iva"] = (L.sampled_iva_term(iva.sampled_ids, iva.sampled_counts, iva.weights, group=iva.batch),
                            rows.at(*pairs["iva"]))
            counts["iva"] = L.sampled_iva_count(iva.sampled_ids, iva.sampled_counts, iva.weights, iva.batch)
        else:
            terms["iva"] = (L.iva_term(iva.ids, iva.logprobs, iva.weights, group=iva.batch, **kw), rows.at(*pairs["iva"]))
            counts["iva"] = L.iva_count(iva.ids, iva.weights, iva.batch)
    with_branches = tpa is not None and tpa.branch_pos.numel() > 0
    if tpa is not None:
        counts["tpa"] = _tpa_count(tpa, lc.tpa_target) if with_branches else 0

    attn = None
    probe = (
        capture(getattr(model, "module", model), [attn_layer], batch.saliency.rows, batch.saliency.cols)
        if lc.iva_attention > 0
        else contextlib.nullcontext()
    )
    with probe as p:
        if with_branches:
            seq_hidden, branch_hidden = forward_with_branches(
                model, inputs, tpa.branch_pos, tpa.branch_tok, seq_rows=(b, t), hidden=True)
            branch_hidden = branch_hidden[tpa.batch, tpa.row]
            terms["tpa"] = (_tpa_term(tpa, lc.tpa_target, kw), len(b) + torch.arange(len(tpa.batch), device=ids.device))
            hidden = torch.cat([seq_hidden, branch_hidden])
        else:
            with hidden_at(model, b, t) as captured:
                model(**causal_inputs(inputs))
            hidden = captured.rows
        if p is not None:
            attn = [p.block(i) for i in range(ids.shape[0])]
    attention = None
    if attn is not None:
        attention, counts["iva_attention"] = attention_term(attn, batch.saliency, hidden)

    weights = {"sft": lc.sft, "kd": lc.kd, "iva": lc.iva, "tpa": lc.tpa, "iva_attention": lc.iva_attention}
    active = [k for k, w in weights.items() if w > 0]
    if not active:
        raise ValueError(f"every loss weight is zero: {weights}")
    if accelerator is None:
        scales = {k: weights[k] for k in active}
    else:
        if batch.filler:  # a rank's stand-in at an epoch's end (StoreDataset pad_ranks): it weighs nothing
            counts = dict.fromkeys(counts, 0)
        scales, global_counts = global_scales(counts, weights, accelerator)
    head = [k for k in active if k in terms]
    weight, bias = output_head(model)
    loss, values = L.fused_head_loss(hidden, weight, bias, [L.HeadTerm(*terms[k], scales[k]) for k in head], vocab_size)
    local = {k: float(v) for k, v in zip(head, values.tolist())}
    local.update({k: 0.0 for k in active if k not in terms and k != "iva_attention"})  # a term without rows here
    if attention is not None:
        loss = loss + scales["iva_attention"] * attention
        local["iva_attention"] = float(attention.detach())
    if accelerator is None:
        log = {k: local[k] for k in active}
        log["total"] = sum(weights[k] * log[k] for k in active)
        return loss, log
    return loss, global_log(local, counts, global_counts, weights, accelerator)


def _tpa_term(tpa, target: str, kw: dict) -> L.RowTerm:
    """The TPA row term against the branch rows' top-k' or their sampled target (``loss.tpa_target``)."""
    if target == "sampled":
        return L.sampled_tpa_term(tpa.sampled_ids, tpa.sampled_counts, tpa.candidate_logprob, tpa.group)
    return L.tpa_term(tpa.ids, tpa.logprobs, tpa.candidate_logprob, tpa.group, **kw)


def _tpa_count(tpa, target: str) -> int:
    """The positions `_tpa_term`'s mean divides by ([ddp note] in ``losses``)."""
    if target == "sampled":
        return L.sampled_tpa_count(tpa.sampled_ids, tpa.sampled_counts, tpa.candidate_logprob, tpa.group)
    return L.tpa_count(tpa.ids, tpa.candidate_logprob, tpa.group)


def check_sampled_targets(cfg: DistillConfig, manifest) -> None:
    """Refuse a recipe that asks for sampled targets of rows the store has none for, naming the key,
    the store and the dump setting that would have stored them."""
    lc, have = cfg.loss, manifest.sampled_rows
    wanted = [("loss.target", lc.target, "response"), ("loss.iva_target", lc.iva_target, "visual"),
              ("loss.tpa_target", lc.tpa_target, "transitions")]
    for key, target, kind in wanted:
        if target == "sampled" and kind not in have:
            raise PipelineError(
                f"{key}=sampled but the store {cfg.store.dir} has no sampled targets for its {kind} rows "
                f"(it was dumped with signals.sampled.rows {have or 'off'}); dump with signals.sampled.enabled "
                f"and `{kind}` in signals.sampled.rows, or use {key}=topk")


def global_scales(counts: dict[str, int], weights: dict[str, float],
                  accelerator: Accelerator) -> tuple[dict[str, float], dict[str, float]]:
    """Each active term's weight in this process's share of the global batch's loss, and the global
    counts N_k ([ddp note]).

    Term k is a mean over this process's n_k rows; the global batch's is sum_r n_k,r mean_k,r / N_k
    with N_k = sum_r n_k,r. DDP averages gradients over the W processes, so this process
    contributes weight_k * mean_k * n_k * W / N_k: the average of those is the global mean's
    gradient, whatever the split (one process with the whole batch gets a factor of exactly 1).
    The counts depend on the batch alone, so one all-reduce before the forward gives them."""
    names = [k for k, w in weights.items() if w > 0]
    local = torch.tensor([float(counts[k]) for k in names], dtype=torch.float64)
    total = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
    world = accelerator.num_processes
    n_all = {k: float(total[i]) for i, k in enumerate(names)}
    # A term no process has rows for is 0 everywhere (masks are safe when empty): weigh it 0.
    scales = {k: weights[k] * (counts[k] * world / n_all[k] if n_all[k] > 0 else 0.0) for k in names}
    return scales, n_all


def global_log(values: dict[str, float], counts: dict[str, int], n_all: dict[str, float],
               weights: dict[str, float], accelerator: Accelerator) -> dict[str, float]:
    """The global batch's per-term values (sum_r n_k,r mean_k,r / N_k) and total: one all-reduce."""
    names = [k for k, w in weights.items() if w > 0]
    local = torch.tensor([counts[k] * values[k] for k in names], dtype=torch.float64)
    total = accelerator.reduce(local.to(accelerator.device), reduction="sum").cpu()
    log = {k: float(total[i]) / n_all[k] if n_all[k] > 0 else 0.0 for i, k in enumerate(names)}
    log["total"] = sum(weights[k] * log[k] for k in names)
    return log


def run(cfg: DistillConfig) -> dict:
    # One run per output directory; under DDP rank 0 holds the lock for all ranks (pipeline.locks).
    with output_lock(cfg.output.dir, "distill", distributed=True):
        return _run(cfg)


def _run(cfg: DistillConfig) -> dict:
    t0 = time.time()
    run_dir = Path(cfg.output.dir)  # made by rank 0's output lock; other ranks write only past the barrier
    # The store is opened once: format version and checksums here, compatibility with the student
    # once it is loaded (its chat template may come from the store).
    reader = open_store(cfg.store.dir, verify_checksums=cfg.store.verify_checksums,
                        cache_bytes=int(cfg.data.read_cache_mb * 2**20))
    manifest = reader.manifest
    torch.manual_seed(cfg.seed)
    model, processor = load_student(cfg.student, manifest.chat_template, cfg.seed)
    temperature = cfg.loss.temperature if cfg.loss.temperature is not None else manifest.temperature
    check_compatible(manifest, processor, temperature)
    vocab_size = real_vocab_size(processor.tokenizer, model.get_output_embeddings().weight.shape[0],
                                 f"student {cfg.student.path or cfg.student.language_model}")
    if cfg.loss.tpa > 0 and not manifest.has_transitions:
        raise PipelineError(f"loss.tpa > 0 but the store {cfg.store.dir} has no transition statistics")
    check_sampled_targets(cfg, manifest)

    attn_layer = None
    if cfg.loss.iva_attention > 0:
        t_layer = manifest.saliency_layers[0]
        t_layers = manifest.teacher_text_layers
        attn_layer = cfg.loss.iva_attention_layer
        if attn_layer is None:
            attn_layer = map_layer(t_layer, t_layers, text_layers(model))

    precision = cfg.train.precision
    if precision == "auto":
        precision = "bf16" if torch.cuda.is_available() else "no"
    # Under torchrun (WORLD_SIZE > 1) on a machine without an accelerator device, accelerate sets up
    # gloo only when told cpu=True; otherwise every process would train alone on the whole data,
    # all of them writing one run directory.
    launched = int(os.environ.get("WORLD_SIZE", "1"))
    # find_unused_parameters: a VLM has parameters no loss reaches (LLaVA reads the vision tower's
    # hidden states before its post_layernorm) or that one rank's batch leaves unused (no image in
    # it); DDP refuses both otherwise. Parameters unused on every rank keep no gradient, as in one process.
    accelerator = Accelerator(cpu=launched > 1 and not torch.accelerator.is_available(),
                              mixed_precision=precision, gradient_accumulation_steps=cfg.train.grad_accum,
                              kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)])
    if accelerator.num_processes != launched:
        raise PipelineError(
            f"launched as {launched} processes (WORLD_SIZE) but accelerate set up {accelerator.num_processes} "
            f"({accelerator.distributed_type}); launch with torchrun or accelerate launch on a supported device"
        )
    # FSDP and DeepSpeed shard weights and optimizer state; checkpoint.py writes whole state dicts
    # from process 0, so such a launch is refused rather than checkpointed wrong. (On CPU accelerate
    # ignores ACCELERATE_USE_FSDP and would silently run DDP: refused too, since FSDP was asked for.)
    sharded = (DistributedType.FSDP, DistributedType.DEEPSPEED, DistributedType.MEGATRON_LM)
    if accelerator.distributed_type in sharded or any(
        os.environ.get(f"ACCELERATE_USE_{k}", "").lower() in ("1", "true") for k in ("FSDP", "DEEPSPEED")
    ):
        raise PipelineError(
            f"distill runs on one process or on DDP (torchrun, accelerate launch --multi_gpu); "
            f"{accelerator.distributed_type} / ACCELERATE_USE_FSDP / ACCELERATE_USE_DEEPSPEED are not supported: "
            "its checkpoints hold whole, unsharded weights and optimizer state"
        )
    # Only rank 0 took the output lock, for every rank of its process group: a rank outside it
    # would train alone into run_dir, unlocked. The other ranks write to run_dir only past the
    # barrier, which rank 0 reaches holding the lock: a second run refused there writes nothing.
    if accelerator.process_index != launch_rank():
        raise PipelineError(
            f"launched as rank {launch_rank()} (RANK) but accelerate runs this process as {accelerator.process_index} of "
            f"{accelerator.num_processes}: the ranks formed no process group, and each would train into {run_dir} alone"
        )
    accelerator.wait_for_everyone()
    if cfg.train.freeze:
        n = freeze(model, cfg.train.freeze)
        log.info("frozen: %s (%d parameters)", ", ".join(cfg.train.freeze), n)
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda(cfg))

    step, epoch, batch_in_epoch = 0, 0, 0
    fp = run_fingerprint(cfg)
    ckpt = latest_checkpoint(run_dir)
    if ckpt is not None:
        state = json.loads((ckpt / "state.json").read_text())
        if state["run_fingerprint"] != fp:
            raise PipelineError(
                f"{run_dir} holds a run with other settings (checkpoint {ckpt.name}); use another output.dir "
                "or delete it to start over"
            )
        # The global batch (processes x train.batch_size) and the data position depend on the process count.
        if state.get("world_size", 1) != accelerator.num_processes:
            raise PipelineError(
                f"{ckpt / 'state.json'}: the run was checkpointed with world_size {state.get('world_size', 1)} processes, "
                f"this launch has {accelerator.num_processes}; resume with {state.get('world_size', 1)}"
            )
        state = load_checkpoint(ckpt, model, optimizer, scheduler)
        step, epoch, batch_in_epoch = state["step"], state["epoch"], state["batch_in_epoch"]
        rng = state["rng"]  # one state per process; a flat list in checkpoints written before that
        rng = rng if rng and isinstance(rng[0], list) else [rng]
        torch.set_rng_state(torch.tensor(rng[accelerator.process_index], dtype=torch.uint8))
        log.info("resuming %s from %s (step %d, epoch %d, batch %d)", run_dir, ckpt.name, step, epoch, batch_in_epoch)
    if accelerator.is_main_process:
        # The log keeps the steps up to where this run starts: after the checkpoint, or none at all
        # when a run killed before its first checkpoint (or with checkpoint_every 0) starts over.
        _truncate_log(run_dir, step)
        save_config(cfg, run_dir / "config.yaml")

    dataset = StoreDataset(
        store_dir=cfg.store.dir,
        processor=processor,
        max_length=cfg.data.max_length,
        batch_size=cfg.train.batch_size,
        seed=cfg.seed,
        data_path=cfg.data.path,
        image_root=cfg.data.image_root,
        start=(epoch, batch_in_epoch),
        # runs of length_group global batches (processes x batch_size samples), as in one process
        length_group=cfg.data.length_group * (accelerator.num_processes if cfg.data.length_group > 1 else 1),
        verify_checksums=cfg.store.verify_checksums,
        with_saliency=cfg.loss.iva_attention > 0,
        temperature=temperature,
        rank=accelerator.process_index,
        world_size=accelerator.num_processes,
        pad_ranks=True,
        image_cache_mb=cfg.data.image_cache_mb,
        read_cache_mb=cfg.data.read_cache_mb,
        pixel_cache_dir=cfg.data.pixel_cache_dir,
        pixel_cache_max_gb=cfg.data.pixel_cache_max_gb,
        reader=reader,
    )
    if dataset.batches_this_rank == 0:
        raise PipelineError(f"store {cfg.store.dir} has no samples to train on")
    # The scheduler stays unprepared: accelerate's wrapper steps it once per process at each
    # optimizer step (it assumes a per-process loader over a W times longer epoch), which would run
    # the schedule W times too fast here, where a step is one global batch.
    model, optimizer = accelerator.prepare(model, optimizer)
    model.train()
    logger = LossLog(run_dir, step) if accelerator.is_main_process else None
    stream = batch_stream(dataset, epoch, batch_in_epoch, cfg.data.num_workers)
    last_terms: dict[str, float] = {}
    try:
        steps = range(step, cfg.train.steps)
        if accelerator.is_main_process:  # one progress bar per run
            steps = progress(steps, total=cfg.train.steps - step, desc="distill", unit="step")
        for step_index in steps:
            accumulated: dict[str, float] = {}
            for _ in range(cfg.train.grad_accum):
                epoch, batch_in_epoch, batch = next(stream)
                batch = batch.to(accelerator.device)
                with accelerator.accumulate(model):
                    loss, terms = compute_losses(model, batch, cfg, attn_layer, accelerator, vocab_size)
                    accelerator.backward(loss)
                    if accelerator.sync_gradients and cfg.train.max_grad_norm > 0:
                        accelerator.clip_grad_norm_(trainable, cfg.train.max_grad_norm)
                    optimizer.step()
                    if accelerator.sync_gradients:
                        scheduler.step()
                    optimizer.zero_grad()
                for k, v in terms.items():
                    accumulated[k] = accumulated.get(k, 0.0) + v / cfg.train.grad_accum
            step = step_index + 1
            last_terms = accumulated
            if logger is not None and (step % cfg.train.log_every == 0 or step == cfg.train.steps):
                logger.write(step, accumulated, scheduler.get_last_lr()[0])
            if cfg.train.checkpoint_every and step % cfg.train.checkpoint_every == 0 and step < cfg.train.steps:
                _checkpoint(accelerator, run_dir, step, model, optimizer, scheduler, fp, epoch, batch_in_epoch)
    finally:
        if logger is not None:
            logger.close()

    _checkpoint(accelerator, run_dir, step, model, optimizer, scheduler, fp, epoch, batch_in_epoch)
    final = run_dir / "final"
    if accelerator.is_main_process:  # the processes hold the same weights: one writes them
        save_student(
            accelerator.unwrap_model(model),
            processor,
            final,
            {
                "pipeline_version": __version__,
                "config": to_dict(cfg),
                "store": {
                    "dir": str(Path(cfg.store.dir).resolve()),
                    "manifest_sha256": fingerprint(manifest),
                    "teacher": manifest.teacher,
                    "tokenizer_fingerprint": manifest.tokenizer_fingerprint,
                },
                "steps": step,
                "final_loss": last_terms,
                "world_size": accelerator.num_processes,
            },
        )
        log.info("student saved to %s (%d steps, %.1f s)", final, step, time.time() - t0)
    accelerator.wait_for_everyone()  # no process returns before final/ is complete
    return {"final": str(final), "steps": step, "last": last_terms}


def batch_stream(dataset, epoch: int, batch_in_epoch: int, num_workers: int):
    """Yield (epoch, batches done in that epoch, batch) forever, from a data position on.

    One DataLoader for the whole run over the endlessly repeating dataset: its workers start once,
    keep their caches (decoded store chunks, preprocessed images) from epoch
    to epoch, and read and collate ahead of the training step across epoch boundaries. The order is
    the dataset's, a pure function of (seed, epoch, shard sizes) whatever the worker count."""
    dataset.start = (epoch, batch_in_epoch)
    dataset.repeat = True
    loader = DataLoader(dataset, batch_size=None, num_workers=num_workers,
                        prefetch_factor=4 if num_workers else None)
    for batch in loader:
        if batch.position[0] != epoch:
            epoch, batch_in_epoch = batch.position[0], 0
        batch_in_epoch += 1
        yield epoch, batch_in_epoch, batch


def _checkpoint(accelerator, run_dir, step, model, optimizer, scheduler, fp, epoch, batch_in_epoch):
    """Process 0 writes the checkpoint (every process holds the same weights and optimizer state);
    every process calls this, for the gather of their RNG states (each resumes its own)."""
    rng = accelerator.gather(torch.get_rng_state().to(accelerator.device)).cpu()
    if not accelerator.is_main_process:
        return
    save_checkpoint(
        run_dir, step, accelerator.unwrap_model(model), optimizer, scheduler,
        {"run_fingerprint": fp, "epoch": epoch, "batch_in_epoch": batch_in_epoch,
         "world_size": accelerator.num_processes, "rng": rng.view(accelerator.num_processes, -1).tolist()},
    )
