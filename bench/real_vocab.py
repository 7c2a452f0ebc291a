"""Stage 1 and Stage 2 at a real vocabulary (151,936 output rows): dump vs forward, Align-TI vs SFT.

The other benchmarks use the tiny 512-token tokenizer, where the LM head is free. With Qwen2's
vocabulary the head is the largest matmul of a small model, so what each stage spends on it decides
its cost. Everything is built here from configs, random-init, no hub:

* tokenizer  the tiny byte-level BPE (``pipeline.tools.tiny``) extended in memory to 151,665 entries
             (Qwen2.5's ``len(tokenizer)``) by appending generated tokens that no merge produces; the
             models have 151,936 output rows, 271 padded rows above the tokenizer as Qwen2.5 has, so
             both stages must cut the padding off (``compute_losses(..., vocab_size=len(tokenizer))``).
* teacher    LLaVA layout: CLIP ViT at 336 px, patch 14 (576 visual tokens; a 1-layer, 64-wide tower,
             the text model is what is measured) + projector + Qwen2 text model, hidden 896, 4 layers,
             14 heads / 2 KV heads, MLP 4864. Its LM head is scaled so that its logits have standard
             deviation ``--logit-std`` (``head_scale``): its next-token distributions are then peaked as
             a trained model's are (median top-1 ~0.6, ~7 ids >= 0.01) rather than near-uniform over
             151,936 ids, and transitions run at the design defaults (p_min 0.01, epsilon 0.05). The
             gold token is still rarely the teacher's top choice, so nearly every response position
             has the alternative mass and the branch rows are at their cap (M = 64 positions x K = 4
             per sample, printed): an upper bound of what a trained teacher selects.
* students   the same layout, tokenizer and image geometry; ``--shape small``: hidden 512, 2 layers;
             ``--shape qwen2.5-0.5b``: hidden 896, 24 layers, 14/2 heads, MLP 4864, tied embeddings
             (for a GPU).
* data       one image and two question/answer turns per sample, words of the tiny corpus: ~80
             question and ~115 answer tokens per turn, ~1,000 tokens per sample of which 576 visual
             and ~230 response.

Measured, modes interleaved batch by batch (``common.interleaved``), one run:

1. Stage 1: ``Teacher.signals`` (transitions on) against a bare ``model(**inputs, use_cache=False)``
   (full logits) on the same pre-encoded, pre-collated batches: throughput ratio, target >= 0.95.
2. Stage 2 at batch 2 and 4: a training step (forward + backward + clip + AdamW) of the Align-TI
   recipe against the SFT recipe (the loss weights of ``configs/distill.align-ti.yaml`` and
   ``configs/distill.sft.yaml``), both through ``stage2_student.distill.compute_losses``, on the same
   ``StoreDataset`` batches of a store dumped by the teacher. One student and one optimiser serve
   both modes in turn (a step's cost does not depend on the weights' values; one copy halves the
   memory). Peak memory per mode in a fresh subprocess each: peak RSS on CPU, ``max_memory_allocated``
   on CUDA, from the first timed step on (after one step that creates the optimiser state). Targets:
   time ratio <= 1.1 x the FLOP ratio below; peak memory ratio <= 1.25.
3. The FLOP ratio of the two recipes, from the rows each reads (``step_work``, ``step_flops``):

       F = 3 [ n_layers (2 P_lin N_body + 4 n_heads d_head A) + 2 d V N_head ]

   3 = forward + backward (the backward's two matmuls per forward matmul); P_lin the decoder
   layer's matmul weights, d (n_heads + 2 n_kv) d_head (q, k, v) + n_heads d_head d (o) + 3 d d_ff
   (gate, up, down); N_body the tokens through the decoder; A the (query, key) pairs attended
   (QK^T and PV, 2 FLOPs per head dimension each); V the head's rows (151,936, padding included:
   the head computes them); N_head the rows through the head.
       SFT:      N_body = sum_b L_b,           A = sum_b L_b (L_b + 1) / 2,            N_head = labelled rows.
       Align-TI: N_body = sum_b (L_b + R_b),   A = the same + sum of (branch position + 1) over branch rows,
                 N_head = |response rows u stored visual (IVA) rows| + sum_b R_b.
   L_b: sample b's sequence tokens, R_b: its TPA branch rows. Not counted: the vision tower and
   projector, embeddings, norms, softmaxes and losses, gradient clipping, the AdamW step and the
   dense embedding gradient. They cost both modes the same, so they pull the measured ratio below
   the FLOP ratio; the printed quotient measured / FLOP should stay <= 1.1.

What these figures are: "before" figures while the teacher's head still runs on every visual
position and the student's head + loss are not chunked; rerun after those changes. On CPU, one
torch thread by default (``--threads``): with other work on the 2 shared cores, two OpenMP threads
stall on each other (see ``distill_step.py``); one thread runs the large head matmul at full speed.

    python bench/real_vocab.py [--quick] [--device cuda --dtype bfloat16 --shape qwen2.5-0.5b --samples 32]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from common import (
    ROOT,
    Workdir,
    base_parser,
    check_device,
    chunks,
    dump_config,
    encode_file,
    environment,
    fmt_quartiles,
    fmt_spread,
    interleaved,
    load_average,
    peak_rss_kb,
    per_rep_ratio,
    reset_peak_rss,
    round_sums,
    rss_kb,
    stats,
    sync,
    table,
    unit_ratio,
    write_results,
)

import numpy as np  # noqa: E402  (after common: it sets up sys.path and offline mode)
import torch  # noqa: E402
from PIL import Image  # noqa: E402
from tokenizers import Tokenizer  # noqa: E402
from transformers import (  # noqa: E402
    CLIPImageProcessorPil,
    CLIPVisionConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
    PreTrainedTokenizerFast,
    Qwen2Config,
)

from pipeline.data.encode import IGNORE_INDEX  # noqa: E402
from pipeline.tools.tiny import BOS_TURN, EOS_TURN, LLAVA_IMAGE, PAD, build_tokenizer, chat_template  # noqa: E402

QWEN2_TOKENS = 151_665  # len(tokenizer) of Qwen2.5
QWEN2_ROWS = 151_936  # its output rows (vocab_size in config.json): 271 padded rows
TARGET_DUMP_OVER_BARE = 0.95
TARGET_TIME_OVER_FLOPS = 1.1
TARGET_MEMORY = 1.25
BATCH_SIZES = (2, 4)
RECIPES = {"align_ti": ROOT / "configs" / "distill.align-ti.yaml", "sft": ROOT / "configs" / "distill.sft.yaml"}
# Words of the tiny corpus: each is one or two tokens of the tiny BPE, so token counts are easy to hit.
WORDS = (
    "red green blue yellow purple orange black white circle square triangle star shape top bottom left "
    "right center middle row column corner grid cell what which where how many is are there the of in "
    "at on and or not yes no colour count number one two three four five above below next image"
).split()


# ----------------------------------------------------------------------------------------------
# shapes


@dataclass(frozen=True)
class TextShape:
    """A Qwen2-style decoder (the text model of the LLaVA layout)."""

    hidden: int
    layers: int
    heads: int
    kv_heads: int
    intermediate: int
    tie: bool = False

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads


@dataclass(frozen=True)
class VisionShape:
    """The CLIP tower: ``(image_size / patch)^2`` visual tokens. Kept small: it is not what is measured."""

    image_size: int = 336
    patch: int = 14
    hidden: int = 64
    layers: int = 1
    heads: int = 2

    @property
    def tokens(self) -> int:
        return (self.image_size // self.patch) ** 2


@dataclass(frozen=True)
class DataShape:
    """Per sample: one image, ``turns`` question/answer turns of about these many tokens each."""

    turns: int = 2
    question_tokens: int = 80
    answer_tokens: int = 115


TEACHER = TextShape(hidden=896, layers=4, heads=14, kv_heads=2, intermediate=4864)
STUDENTS = {
    "small": TextShape(hidden=512, layers=2, heads=8, kv_heads=2, intermediate=2752),
    "qwen2.5-0.5b": TextShape(hidden=896, layers=24, heads=14, kv_heads=2, intermediate=4864, tie=True),
}
# --quick: everything smaller except the vocabulary.
QUICK_TEACHER = TextShape(hidden=256, layers=2, heads=4, kv_heads=2, intermediate=1376)
QUICK_STUDENT = TextShape(hidden=128, layers=2, heads=4, kv_heads=2, intermediate=688)
QUICK_VISION = VisionShape(image_size=112)  # 64 visual tokens
QUICK_DATA = DataShape(turns=2, question_tokens=16, answer_tokens=24)


# ----------------------------------------------------------------------------------------------
# tokenizer, models, data


def real_vocab_tokenizer(n_tokens: int = QWEN2_TOKENS) -> PreTrainedTokenizerFast:
    """The tiny byte-level BPE (512 tokens) with generated tokens ``##000512``.. appended up to
    ``n_tokens`` entries. No merge produces them, so text encodes exactly as with the tiny tokenizer,
    but the tokenizer, and the head built for it, has a real vocabulary's size."""
    base = build_tokenizer(512)
    if n_tokens < len(base):
        raise ValueError(f"n_tokens {n_tokens} is below the base tokenizer's {len(base)} tokens")
    spec = json.loads(base.backend_tokenizer.to_str())
    vocab = spec["model"]["vocab"]
    first = len(vocab)
    if sorted(vocab.values()) != list(range(first)):
        raise RuntimeError("the base tokenizer's ids are not 0..n-1; cannot append generated tokens")
    vocab.update({f"##{i:06d}": i for i in range(first, n_tokens)})
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer.from_str(json.dumps(spec)), eos_token=EOS_TURN, pad_token=PAD, model_max_length=4096
    )
    tok.padding_side = "right"
    if len(tok) != n_tokens:
        raise RuntimeError(f"built a tokenizer of {len(tok)} tokens, wanted {n_tokens}")
    return tok


def build_vlm(text: TextShape, vision: VisionShape, tok: PreTrainedTokenizerFast, rows: int, seed: int = 0,
              logit_scale: float = 1.0):
    """(model, processor): LLaVA layout with a Qwen2 text model of ``rows`` output rows, random init.
    ``logit_scale`` multiplies the LM head (untied models only: a tied head is the embedding)."""
    if rows < len(tok):
        raise ValueError(f"{rows} output rows < {len(tok)} tokens")
    if vision.image_size % vision.patch:
        raise ValueError(f"image_size {vision.image_size} is not a multiple of patch {vision.patch}")
    if logit_scale != 1.0 and text.tie:
        raise ValueError("logit_scale needs an untied head (scaling a tied head scales the embeddings too)")
    ids = {name: tok.convert_tokens_to_ids(t) for name, t in
           (("bos_token_id", BOS_TURN), ("eos_token_id", EOS_TURN), ("pad_token_id", PAD))}
    text_cfg = Qwen2Config(
        hidden_size=text.hidden,
        intermediate_size=text.intermediate,
        num_hidden_layers=text.layers,
        num_attention_heads=text.heads,
        num_key_value_heads=text.kv_heads,
        max_position_embeddings=4096,
        vocab_size=rows,
        tie_word_embeddings=text.tie,
        **ids,
    )
    vision_cfg = CLIPVisionConfig(
        hidden_size=vision.hidden,
        intermediate_size=2 * vision.hidden,
        num_hidden_layers=vision.layers,
        num_attention_heads=vision.heads,
        image_size=vision.image_size,
        patch_size=vision.patch,
    )
    config = LlavaConfig(
        vision_config=vision_cfg,
        text_config=text_cfg,
        image_token_index=tok.convert_tokens_to_ids(LLAVA_IMAGE),
        image_seq_length=vision.tokens,
        vision_feature_layer=-1,
        vision_feature_select_strategy="default",
        tie_word_embeddings=text.tie,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    tied = model.get_output_embeddings().weight.data_ptr() == model.get_input_embeddings().weight.data_ptr()
    if tied != text.tie:
        raise RuntimeError(f"built a model with tied={tied}, wanted tie={text.tie}")
    if logit_scale != 1.0:
        with torch.no_grad():
            model.get_output_embeddings().weight.mul_(logit_scale)
    processor = LlavaProcessor(
        image_processor=CLIPImageProcessorPil(
            size={"shortest_edge": vision.image_size},
            crop_size={"height": vision.image_size, "width": vision.image_size},
        ),
        tokenizer=tok,
        patch_size=vision.patch,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        image_token=LLAVA_IMAGE,
        chat_template=chat_template(LLAVA_IMAGE),
    )
    return model, processor


def head_scale(text: TextShape, logit_std: float, init_std: float = 0.02) -> float:
    """The LM-head factor that gives logits of standard deviation ``logit_std``: the final RMSNorm
    leaves hidden states of unit RMS, so a head initialised N(0, init_std^2) gives logits of standard
    deviation init_std * sqrt(hidden). Over 151,936 ids a distribution is peaked (a few ids hold most
    of the mass) once the std exceeds sqrt(2 ln V) ~ 4.9. At 8 (measured on both teachers' shapes,
    200 positions) the top id holds 0.28 / 0.57 / 0.95 (p10 / median / p90) and ~7 ids hold >= 0.01;
    unscaled (std ~0.6 at hidden 896) every id holds ~1/V."""
    return logit_std / (init_std * math.sqrt(text.hidden))


def save_vlm(out: Path, *args, **kwargs) -> Path:
    """``build_vlm`` saved as a checkpoint directory (model + processor)."""
    model, processor = build_vlm(*args, **kwargs)
    model.save_pretrained(out)
    processor.save_pretrained(out)
    return out


def words_of_tokens(tok, rng: random.Random, n_tokens: int) -> str:
    """Random words of ``WORDS`` until the text is at least ``n_tokens`` tokens long."""
    words: list[str] = []
    while len(tok(" ".join(words), add_special_tokens=False).input_ids) < n_tokens:
        words.append(rng.choice(WORDS))
    return " ".join(words)


def write_records(out: Path, n: int, tok, image_size: int, shape: DataShape, seed: int = 0) -> Path:
    """``n`` LLaVA-format records (noise images of ``image_size`` px) at ``out/train.json``."""
    rng = random.Random(seed)
    images = np.random.default_rng(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    records = []
    for i in range(n):
        rel = f"images/{i:05d}.png"
        Image.fromarray(images.integers(0, 255, (image_size, image_size, 3), dtype=np.uint8)).save(out / rel)
        conversations = []
        for j in range(shape.turns):
            question = words_of_tokens(tok, rng, shape.question_tokens) + "?"
            conversations.append({"from": "human", "value": ("<image>\n" if j == 0 else "") + question})
            conversations.append({"from": "gpt", "value": words_of_tokens(tok, rng, shape.answer_tokens) + "."})
        records.append({"id": f"rv-{i:05d}", "image": rel, "conversations": conversations})
    path = out / "train.json"
    path.write_text(json.dumps(records))
    return path


# ----------------------------------------------------------------------------------------------
# FLOP accounting (the formula is in the module docstring)


@dataclass(frozen=True)
class StepWork:
    """What one training step's forward computes: tokens through the decoder, (query, key) pairs
    attended, rows through the LM head."""

    body_tokens: int
    attention_pairs: int
    head_rows: int

    def __add__(self, other: StepWork) -> StepWork:
        return StepWork(self.body_tokens + other.body_tokens, self.attention_pairs + other.attention_pairs,
                        self.head_rows + other.head_rows)


def linear_weights_per_layer(text: TextShape) -> int:
    """P_lin: matmul weights of one decoder layer (q, k, v, o projections; gate, up, down)."""
    d, hd = text.hidden, text.head_dim
    return d * (text.heads + 2 * text.kv_heads) * hd + text.heads * hd * d + 3 * d * text.intermediate


def step_flops(text: TextShape, rows: int, work: StepWork) -> float:
    """Matmul FLOPs of forward + backward (3x the forward) for ``work`` on ``text`` with a head of ``rows`` rows."""
    body = text.layers * (2 * linear_weights_per_layer(text) * work.body_tokens
                          + 4 * text.heads * text.head_dim * work.attention_pairs)
    head = 2 * text.hidden * rows * work.head_rows
    return 3.0 * (body + head)


def step_work(batch, loss) -> StepWork:
    """The rows a recipe (``loss``: a LossConfig) reads of a StudentBatch: sequence tokens through the
    body, plus the branch rows when TPA is on; head rows: the union of the (sample, position) rows
    its SFT / KD / IVA terms read, plus the branch rows."""
    lengths = batch.model_inputs["attention_mask"].sum(1).tolist()
    body = sum(lengths)
    pairs = sum(n * (n + 1) // 2 for n in lengths)
    rows: set[tuple[int, int]] = set()
    if loss.sft > 0:
        b, t = torch.nonzero(batch.labels[:, 1:] != IGNORE_INDEX, as_tuple=True)  # label at t+1 is read at t
        rows.update(zip(b.tolist(), t.tolist()))
    if loss.kd > 0:
        rows.update(zip(batch.kd.batch.tolist(), batch.kd.pos.tolist()))
    if loss.iva > 0:
        rows.update(zip(batch.iva.batch.tolist(), batch.iva.pos.tolist()))
    head = len(rows)
    if loss.tpa > 0 and batch.tpa is not None:
        branch_pos = batch.tpa.branch_pos[batch.tpa.branch_pos >= 0]
        body += int(branch_pos.numel())
        pairs += int((branch_pos + 1).sum())  # a branch row at pos(t)+1 attends to x_0..x_t and itself
        head += int(branch_pos.numel())
    return StepWork(body, pairs, head)


# ----------------------------------------------------------------------------------------------
# command line


def parse_args(argv=None):
    p = base_parser(__doc__.splitlines()[0])
    p.add_argument("--shape", default="small", choices=sorted(STUDENTS), help="the student")
    p.add_argument("--samples", type=int, default=4, help="records (each stage uses all of them)")
    p.add_argument("--reps", type=int, default=3, help="timed rounds per mode (interleaved)")
    p.add_argument("--dump-batch-size", type=int, default=2, help="Stage 1 batch size")
    p.add_argument("--logit-std", type=float, default=8.0,
                   help="the teacher's logit standard deviation, set by scaling its LM head (see the module docstring)")
    p.add_argument("--min-prob", type=float, default=0.01, help="transitions p_min")
    p.add_argument("--min-alt-mass", type=float, default=0.05, help="transitions epsilon")
    p.add_argument("--tokens", type=int, default=QWEN2_TOKENS, help="len(tokenizer)")
    p.add_argument("--rows", type=int, default=QWEN2_ROWS, help="output rows of every model (>= --tokens)")
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads, 0 for torch's default")
    p.add_argument("--skip-stage1", action="store_true", help="Stage 2 only (the store is still dumped)")
    p.add_argument("--skip-memory", action="store_true", help="no peak-memory subprocesses")
    # internal: one memory measurement in a fresh process
    p.add_argument("--child", choices=sorted(RECIPES), help=argparse.SUPPRESS)
    p.add_argument("--child-batch", type=int, help=argparse.SUPPRESS)
    p.add_argument("--student", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--store", type=Path, help=argparse.SUPPRESS)
    p.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.reps = min(args.reps, 1)
    if args.rows < args.tokens:
        p.error(f"--rows {args.rows} < --tokens {args.tokens}")
    return args


def shapes(args) -> tuple[TextShape, TextShape, VisionShape, DataShape]:
    """(teacher, student, vision, data) of this run."""
    if args.quick:
        return QUICK_TEACHER, QUICK_STUDENT, QUICK_VISION, QUICK_DATA
    return TEACHER, STUDENTS[args.shape], VisionShape(), DataShape()


def recipes() -> dict:
    """The loss sections of the shipped recipes, loaded as the distill job loads them."""
    from pipeline.config import load_config
    from stage2_student.config import DistillConfig

    return {name: load_config(DistillConfig, str(path), []) for name, path in RECIPES.items()}


# ----------------------------------------------------------------------------------------------
# Stage 1


def stage1(args, teacher_dir: Path, data: Path, layer: int) -> dict:
    """Bare forward vs ``Teacher.signals`` (transitions on), interleaved batch by batch."""
    from pipeline.modeling.batching import collate_model_inputs
    from stage1_teacher.config import SignalsConfig, TeacherConfig, TransitionsConfig
    from stage1_teacher.teacher import Teacher

    signals_cfg = SignalsConfig(
        saliency_layers=[layer], transitions=TransitionsConfig(min_prob=args.min_prob, min_alt_mass=args.min_alt_mass)
    )
    teacher = Teacher(TeacherConfig(str(teacher_dir), dtype=args.dtype, device=args.device), signals_cfg, seed=0)
    encoded = encode_file(data, teacher.processor, 4096)
    batches = chunks(encoded, args.dump_batch_size)
    collated = [
        {k: v.to(teacher.device) for k, v in collate_model_inputs([e.model_inputs for e in b], teacher.pad_id).items()}
        for b in batches
    ]

    @torch.inference_mode()
    def bare(i: int) -> None:
        teacher.model(**collated[i], use_cache=False)

    signals: dict[int, list] = {}

    def dump(i: int) -> None:
        signals[i] = teacher.signals(batches[i], [layer])

    seq = sum(e.length for e in encoded)
    resp = sum(len(e.response_positions) for e in encoded)
    vis = sum(len(e.visual_positions) for e in encoded)
    print(f"stage 1: {len(encoded)} samples, {seq / len(encoded):.0f} tokens/sample ({vis / len(encoded):.0f} visual, "
          f"{resp / len(encoded):.0f} response), {len(batches)} batches of {args.dump_batch_size}; "
          f"{args.reps} rounds of bare/dump", flush=True)
    unit_times = interleaved({"bare": bare, "dump": dump}, args.reps, args.device, units=len(batches))
    # What the dump selected (the last round's signals): branch rows, and how peaked the teacher is.
    out = [s for i in range(len(batches)) for s in signals[i]]
    branch_rows = sum(len(s.tpa_pos) for s in out)
    top1 = np.concatenate([np.exp(s.resp_logprobs.max(1)) for s in out])
    times = {m: round_sums(t) for m, t in unit_times.items()}
    return {
        "samples": len(encoded),
        "sequence_tokens": seq,
        "response_tokens": resp,
        "visual_tokens": vis,
        "branch_rows": branch_rows,
        "branch_rows_per_response_token": branch_rows / resp,
        "teacher_top1_prob_quantiles": dict(zip(("p10", "p25", "p50", "p75", "p90"),
                                                np.quantile(top1, [0.1, 0.25, 0.5, 0.75, 0.9]).tolist())),
        "seconds_per_pass": {m: stats(t) for m, t in times.items()},
        "unit_seconds": unit_times,
        "throughput_ratio_dump_over_bare": per_rep_ratio(times["bare"], times["dump"]),
        "per_batch_throughput_ratio_dump_over_bare": unit_ratio(unit_times["bare"], unit_times["dump"]),
    }


# ----------------------------------------------------------------------------------------------
# Stage 2


def student_batches(store: Path, student_dir: Path, batch_size: int, device) -> list:
    from pipeline.processors import load_processor
    from stage2_student.data import StoreDataset

    dataset = StoreDataset(store, load_processor(student_dir), batch_size=batch_size, seed=0, with_saliency=False)
    return [b.to(device) for b in dataset]


def load_student(student_dir: Path, device):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(student_dir, dtype=torch.float32).to(device).train()


def make_step(student, optim, cfg, vocab_size: int, device: torch.device, dtype: str):
    """One training step on a batch: forward + backward + clip + AdamW, as distill runs it."""
    from stage2_student.distill import compute_losses

    amp = getattr(torch, dtype)

    def step(batch) -> dict:
        with torch.autocast(device.type, dtype=amp, enabled=dtype != "float32"):
            loss, terms = compute_losses(student, batch, cfg, None, vocab_size=vocab_size)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(student.parameters(), 1.0)
        optim.step()
        optim.zero_grad(set_to_none=True)
        return terms

    return step


def memory_child(args) -> None:
    """Peak memory of the training steps of one recipe at one batch size, in this fresh process."""
    from pipeline.processors import load_processor

    device = torch.device(args.device)
    cfg = recipes()[args.child]
    student = load_student(args.student, device)
    vocab = len(load_processor(args.student).tokenizer)
    batches = student_batches(args.store, args.student, args.child_batch, device)
    step = make_step(student, torch.optim.AdamW(student.parameters(), lr=args.lr), cfg, vocab, device, args.dtype)
    step(batches[0])  # creates the optimiser state, which then stays
    sync(args.device)
    cuda = args.device == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
    else:
        if not reset_peak_rss():
            raise SystemExit("cannot reset the peak RSS (/proc/self/clear_refs not writable)")
        before = rss_kb() * 1024
    for b in batches:
        step(b)
    sync(args.device)
    peak = torch.cuda.max_memory_allocated() if cuda else peak_rss_kb() * 1024
    args.result.write_text(json.dumps({"before_bytes": before, "peak_bytes": peak, "peak_delta_bytes": peak - before}))


def stage2_memory(args, work: Path, student_dir: Path, store: Path) -> dict:
    """Per batch size and recipe: one fresh subprocess, alternating the recipes' order."""
    out: dict = {}
    for n, bs in enumerate(BATCH_SIZES):
        names = list(RECIPES) if n % 2 == 0 else list(RECIPES)[::-1]
        for name in names:
            result = work / f"memory-{name}-{bs}.json"
            cmd = [sys.executable, __file__, "--child", name, "--child-batch", str(bs), "--student", str(student_dir),
                   "--store", str(store), "--result", str(result), "--device", args.device, "--dtype", args.dtype,
                   "--threads", str(args.threads), "--lr", str(args.lr)]
            print(f"memory: {name} at batch {bs} in a fresh process", flush=True)
            subprocess.run(cmd, check=True)
            out.setdefault(bs, {})[name] = json.loads(result.read_text())
        r = out[bs]
        r["peak_ratio"] = r["align_ti"]["peak_bytes"] / r["sft"]["peak_bytes"]
        r["peak_delta_ratio"] = r["align_ti"]["peak_delta_bytes"] / max(1, r["sft"]["peak_delta_bytes"])
    return out


def stage2_time(args, student_dir: Path, store: Path, student_shape: TextShape) -> dict:
    """Align-TI vs SFT steps interleaved over the same batches, at each batch size."""
    from pipeline.processors import load_processor

    device = torch.device(args.device)
    cfgs = recipes()
    student = load_student(student_dir, device)
    vocab = len(load_processor(student_dir).tokenizer)
    rows = student.get_output_embeddings().weight.shape[0]
    optim = torch.optim.AdamW(student.parameters(), lr=args.lr)
    steps = {name: make_step(student, optim, cfg, vocab, device, args.dtype) for name, cfg in cfgs.items()}
    out: dict = {}
    for bs in BATCH_SIZES:
        batches = student_batches(store, student_dir, bs, device)
        work = {name: sum((step_work(b, cfgs[name].loss) for b in batches), StepWork(0, 0, 0)) for name in cfgs}
        flops = {name: step_flops(student_shape, rows, w) for name, w in work.items()}
        terms: dict = {}

        def mode(name: str):
            def run(i: int) -> None:
                terms[name] = steps[name](batches[i])

            return run

        print(f"stage 2 at batch {bs}: {args.reps} rounds of {list(cfgs)} over {len(batches)} batches", flush=True)
        unit_times = interleaved({name: mode(name) for name in cfgs}, args.reps, args.device, units=len(batches))
        times = {m: round_sums(t) for m, t in unit_times.items()}
        flop_ratio = flops["align_ti"] / flops["sft"]
        step_ratio = unit_ratio(unit_times["align_ti"], unit_times["sft"])
        padded = sum(int(b.model_inputs["input_ids"].numel()) for b in batches)
        out[bs] = {
            "batches": len(batches),
            "padded_tokens": padded,
            "work": {m: asdict(w) for m, w in work.items()},
            "flops": flops,
            "flop_ratio": flop_ratio,
            "step_ms": {m: stats([1000 * x for row in t for x in row]) for m, t in unit_times.items()},
            "seconds_per_pass": {m: stats(t) for m, t in times.items()},
            "unit_seconds": unit_times,
            "step_ratio": step_ratio,
            "pass_ratio": per_rep_ratio(times["align_ti"], times["sft"]),
            "step_ratio_over_flop_ratio": step_ratio["median"] / flop_ratio,
            "last_loss_terms": {m: {k: float(v) for k, v in t.items() if v is not None} for m, t in terms.items()},
        }
    return out


# ----------------------------------------------------------------------------------------------
# main


def main(argv=None) -> Path | None:
    """Run the benchmark; the results' path (None in a memory child)."""
    args = parse_args(argv)
    check_device(args.device)
    if args.threads and args.device == "cpu":
        torch.set_num_threads(args.threads)
    if args.child:
        memory_child(args)
        return None
    teacher_shape, student_shape, vision, data_shape = shapes(args)
    layer = teacher_shape.layers // 2
    from stage1_teacher.dump import run as dump_run

    with Workdir(args.workdir, "real-vocab") as work:
        t0 = time.perf_counter()
        tok = real_vocab_tokenizer(args.tokens)
        scale = head_scale(teacher_shape, args.logit_std)
        teacher_dir = save_vlm(work / "teacher", teacher_shape, vision, tok, args.rows, seed=0, logit_scale=scale)
        student_dir = save_vlm(work / "student", student_shape, vision, tok, args.rows, seed=1)
        data = write_records(work / "data", args.samples, tok, vision.image_size, data_shape)
        print(f"built tokenizer ({len(tok)} tokens), teacher and student ({args.rows} output rows) and "
              f"{args.samples} records in {time.perf_counter() - t0:.1f} s under {work}", flush=True)

        s1 = None if args.skip_stage1 else stage1(args, teacher_dir, data, layer)

        store = work / "store"
        t0 = time.perf_counter()
        dump_run(dump_config(teacher_dir, data, store, {
            "teacher.device": args.device,
            "teacher.dtype": args.dtype,
            "data.max_length": 4096,
            "signals.saliency_layers": [layer],
            "signals.transitions.min_prob": args.min_prob,
            "signals.transitions.min_alt_mass": args.min_alt_mass,
            "batch_size": args.dump_batch_size,
            "workers": 0,
        }))
        dump_s = time.perf_counter() - t0
        memory = None if args.skip_memory else stage2_memory(args, work, student_dir, store)
        load_before = load_average()
        s2 = stage2_time(args, student_dir, store, student_shape)
        load_after = load_average()

    report(args, student_shape, s1, s2, memory, load_before, load_after)
    return write_results(
        "real_vocab" + ("_quick" if args.quick else ""),
        {
            "env": environment(args.device, args.dtype),
            "args": vars(args),
            "teacher_shape": asdict(teacher_shape),
            "teacher_head_scale": scale,
            "student_shape": asdict(student_shape),
            "vision_shape": asdict(vision),
            "data_shape": asdict(data_shape),
            "tokenizer_tokens": args.tokens,
            "output_rows": args.rows,
            "stage1": s1,
            "store_dump_s": dump_s,
            "stage2": s2,
            "stage2_memory": memory,
            "targets": {"dump_over_bare": TARGET_DUMP_OVER_BARE, "time_over_flops": TARGET_TIME_OVER_FLOPS,
                        "memory": TARGET_MEMORY},
            "load_average_before_after_stage2_timing": [load_before, load_after],
        },
        args.out,
    )


def verdict(ok: bool) -> str:
    return "meets" if ok else "MISSES"


def report(args, student: TextShape, s1, s2, memory, load_before, load_after) -> None:
    print()
    print(f"vocabulary: {args.tokens} tokens, {args.rows} output rows; {args.device} {args.dtype}, "
          f"torch threads {torch.get_num_threads()}; load average {load_before[0]:.2f} -> {load_after[0]:.2f}")
    if s1:
        r = s1["per_batch_throughput_ratio_dump_over_bare"]
        print(f"stage 1: {s1['branch_rows']} branch rows = {s1['branch_rows_per_response_token']:.2f} per response token; "
              "teacher top-1 probability "
              + " ".join(f"{k} {v:.2f}" for k, v in s1["teacher_top1_prob_quantiles"].items()))
        print(table(["mode", "s/pass median [min..max]"],
                    [[m, fmt_spread(v)] for m, v in s1["seconds_per_pass"].items()]))
        print(f"dump / bare throughput: {fmt_quartiles(r)} per batch, "
              f"{fmt_spread(s1['throughput_ratio_dump_over_bare'])} per round: "
              f"{verdict(r['median'] >= TARGET_DUMP_OVER_BARE)} the >= {TARGET_DUMP_OVER_BARE} target")
    rows = []
    for bs, r in s2.items():
        w = r["work"]
        mem = memory[bs] if memory else None
        rows.append([
            bs,
            f"{fmt_spread(r['step_ms']['align_ti'], 0)} / {fmt_spread(r['step_ms']['sft'], 0)}",
            fmt_quartiles(r["step_ratio"]),
            f"{w['align_ti']['head_rows']} / {w['sft']['head_rows']}",
            f"{w['align_ti']['body_tokens']} / {w['sft']['body_tokens']}",
            f"{r['flop_ratio']:.3f}",
            f"{r['step_ratio_over_flop_ratio']:.3f} ({verdict(r['step_ratio_over_flop_ratio'] <= TARGET_TIME_OVER_FLOPS)})",
            "-" if mem is None else f"{mem['align_ti']['peak_bytes'] / 2**20:.0f} / {mem['sft']['peak_bytes'] / 2**20:.0f}",
            "-" if mem is None else f"{mem['peak_ratio']:.3f} ({verdict(mem['peak_ratio'] <= TARGET_MEMORY)})",
            "-" if mem is None else
            f"{mem['align_ti']['peak_delta_bytes'] / 2**20:.0f} / {mem['sft']['peak_delta_bytes'] / 2**20:.0f}",
        ])
    print(f"stage 2, Align-TI (A) / SFT (S), student hidden {student.hidden}, "
          f"{student.layers} layers, {'tied' if student.tie else 'untied'} head; rows and tokens per pass over the "
          "store's samples; memory: peak RSS (CPU) or max_memory_allocated (CUDA) of each in a fresh process:")
    print(table(["batch", "step ms A / S", "time ratio [p25..p75]", "head rows A / S", "body tokens A / S",
                 "FLOP ratio", f"time / FLOP (<= {TARGET_TIME_OVER_FLOPS})", "peak MiB A / S",
                 f"peak ratio (<= {TARGET_MEMORY})",
                 "step peak over resident MiB A / S"], rows))


if __name__ == "__main__":
    path = main()
    if path is not None:
        print(f"results: {path}")
