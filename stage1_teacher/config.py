"""Configuration of ``pipeline run teacher-dump`` (DESIGN.md §3, §5, §6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import ConfigError, check
from pipeline.data import DataConfig
from schemas.signals import SAMPLED_ROWS


@dataclass
class TeacherConfig:
    path: str
    """Hugging Face checkpoint directory of the teacher VLM (config.json, safetensors, processor files)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and compute dtype; `auto` is bfloat16 on GPU and float32 on CPU. Log-probs are always computed in float32."""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where each worker runs the teacher; `auto` uses the worker's GPU when it has one."""

    def __post_init__(self):
        check(bool(self.path), "path", "must name the teacher checkpoint directory")


@dataclass
class SampledConfig:
    enabled: bool = False
    """Also store the unbiased sampled target (ids drawn from p_T with replacement, unique ids with counts)."""
    draws: int = 50
    """Draws per row (about 12 unique ids at 50)."""
    rows: list[str] = field(default_factory=lambda: ["response"])
    """Which stored rows get a sampled target: `response` (KD), `visual` (the stored visual rows, IVA),
    `transitions` (the branch rows, TPA; needs transitions enabled). Each kind draws from its own seed stream."""

    def __post_init__(self):
        check(1 <= self.draws <= 32767, "draws", f"must be in [1, 32767], got {self.draws}")
        unknown = [r for r in self.rows if r not in SAMPLED_ROWS]
        check(not unknown, "rows", f"unknown row kind(s) {unknown}; valid: {', '.join(SAMPLED_ROWS)}")
        check(len(set(self.rows)) == len(self.rows), "rows", f"names a row kind twice: {self.rows}")
        check(bool(self.rows) or not self.enabled, "rows", "must name at least one row kind when sampled targets are enabled")

    def kinds(self) -> list[str]:
        """The row kinds that get sampled targets: none unless enabled, in the store's order."""
        return [r for r in SAMPLED_ROWS if self.enabled and r in self.rows]


@dataclass
class TransitionsConfig:
    enabled: bool = True
    """Store transition statistics for TPA (branch rows after plausible alternative tokens)."""
    candidates: int = 4
    """K: alternative tokens per selected position (the teacher's top tokens other than the gold one)."""
    top_k: int = 16
    """k': token ids (with exact log-probs) kept of each candidate's transition distribution."""
    min_prob: float = 0.01
    """p_min: a candidate needs at least this probability under the model that proposes it (the teacher's own, or the student's)."""
    min_alt_mass: float = 0.05
    """epsilon: a position is selected only if 1 - p_T(gold) is at least this."""
    max_positions: int = 64
    """M: at most this many positions per sample, highest alternative mass first."""
    candidates_from: str | None = None
    """A student checkpoint that proposes the candidates (its top-K, or K draws, at each response
    position of the gold conversation; the teacher scores them). None: the teacher's own top-K."""
    candidate_choice: Literal["top", "sample"] = "top"
    """With candidates_from: the student's K most probable tokens, or K draws without replacement."""
    selection_mass: Literal["teacher", "student"] = "teacher"
    """With candidates_from: whose alternative mass 1 - p(gold) selects the positions (epsilon, M)."""

    def __post_init__(self):
        if self.candidates_from is None:
            check(self.candidate_choice == "top" and self.selection_mass == "teacher", "candidates_from",
                  "candidate_choice and selection_mass apply to student candidates only: name the student")
        else:
            check(bool(self.candidates_from), "candidates_from", "must name a student checkpoint directory")
        check(self.candidates >= 1, "candidates", f"must be >= 1, got {self.candidates}")
        check(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        check(0.0 <= self.min_prob < 1.0, "min_prob", f"must be in [0, 1), got {self.min_prob}")
        check(0.0 <= self.min_alt_mass < 1.0, "min_alt_mass", f"must be in [0, 1), got {self.min_alt_mass}")
        check(self.max_positions >= 1, "max_positions", f"must be >= 1, got {self.max_positions}")


@dataclass
class CodecConfig:
    profile: Literal["exact", "compact"] = "exact"
    """How the sparse distributions are stored: `exact` (int32 ids, float32 log-probs, k per row) or `compact`
    (per row the fewest ids within `max_kl` of the exact top-k row, bit-packed, log-probs quantised, the tail
    mass exact; schemas/codecs.py). Readers decode either to the same arrays."""
    max_kl: float = 1e-3
    """compact: a row keeps the fewest ids whose decoded row is within this KL (nats) of the exact top-k row, the
    ids it drops charged as if spread over the vocabulary (0: off; with max_dropped 0 too, every id is kept)."""
    logprob_step: float = 0.0625
    """compact: quantisation step of the log-probs (nats, relative to the row's most probable id; 8 bits)."""
    max_dropped: float = 0.0
    """compact: also keep enough ids that those dropped carry at most this much of the row's mass (0: off).
    With `max_kl: 0` it is the only rule: a coverage rule, whose loss shows only on the kept buckets."""

    def __post_init__(self):
        check(self.max_kl >= 0, "max_kl", f"must be >= 0, got {self.max_kl}")
        check(0 <= self.max_dropped < 1, "max_dropped", f"must be in [0, 1), got {self.max_dropped}")
        check(0 < self.logprob_step <= 1, "logprob_step", f"must be in (0, 1], got {self.logprob_step}")


@dataclass
class SignalsConfig:
    top_k: int = 64
    """k: token ids (with exact log-probs from the full-vocabulary log-softmax) kept per response and visual position."""
    temperature: float = 1.0
    """tau_dump: temperature of every stored distribution; Stage 2 refuses to train at another one."""
    saliency_layers: Literal["auto"] | list[int] = "auto"
    """Text layers whose instruction-to-visual attention forms the saliency maps; `auto` picks argmax IRS from calibration."""
    calibration_samples: int = 256
    """Samples (from the start of the data) used to compute the per-layer IRS table."""
    visual_fraction: float = 0.25
    """rho: store visual-position distributions for this most-salient fraction of visual tokens."""
    sampled: SampledConfig = field(default_factory=SampledConfig)
    """The optional sampled targets (response rows by default; visual and branch rows on request)."""
    transitions: TransitionsConfig = field(default_factory=TransitionsConfig)
    """Transition statistics for TPA."""
    codec: CodecConfig = field(default_factory=CodecConfig)
    """How the signals are stored (the store's profile)."""

    def __post_init__(self):
        check(self.top_k >= 1, "top_k", f"must be >= 1, got {self.top_k}")
        check(self.codec.profile == "exact" or max(self.top_k, self.transitions.top_k) <= 255, "top_k",
              f"the compact profile stores at most 255 ids per row, got {max(self.top_k, self.transitions.top_k)}")
        check(self.temperature > 0, "temperature", f"must be > 0, got {self.temperature}")
        check(0.0 <= self.visual_fraction <= 1.0, "visual_fraction", f"must be in [0, 1], got {self.visual_fraction}")
        check(self.calibration_samples >= 1, "calibration_samples", f"must be >= 1, got {self.calibration_samples}")
        check(not (self.sampled.enabled and "transitions" in self.sampled.rows) or self.transitions.enabled,
              "sampled.rows", "names `transitions` but transitions are disabled (signals.transitions.enabled: false)")
        if isinstance(self.saliency_layers, list):
            check(bool(self.saliency_layers), "saliency_layers", "must be `auto` or a non-empty list of layer indices")
            check(all(x >= 0 for x in self.saliency_layers), "saliency_layers", "layer indices must be >= 0")

    def check_vocabulary(self, size: int, teacher: str) -> None:
        """Refuse top-k sizes the vocabulary of ``teacher`` (``size`` real tokens) cannot fill.

        The size is known only once the tokenizer is loaded, so the dump calls this before it
        writes anything; without it every sample failed alone, as a ``teacher_error``."""
        limits = [("top_k", self.top_k, size)]
        if self.transitions.enabled:
            # the K candidates exclude the gold token; each transition keeps k' of all tokens
            limits += [("transitions.candidates", self.transitions.candidates, size - 1),
                       ("transitions.top_k", self.transitions.top_k, size)]
        for key, value, most in limits:
            if value > most:
                raise ConfigError(f"signals.{key}", f"must be <= {most}: the vocabulary of the teacher {teacher} "
                                                    f"has {size} tokens, got {value}")


@dataclass
class OutputConfig:
    dir: str
    """The store directory (created if absent). A re-run resumes: complete shards are kept, partial ones redone."""
    shard_size: int = 256
    """Samples per shard; a shard is the unit of work of one worker and of resume."""

    def __post_init__(self):
        check(bool(self.dir), "dir", "must name the store directory")
        check(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")


@dataclass
class DumpConfig:
    teacher: TeacherConfig
    """The teacher model."""
    data: DataConfig
    """The conversations to run the teacher on."""
    output: OutputConfig
    """Where the store goes."""
    signals: SignalsConfig = field(default_factory=SignalsConfig)
    """What is computed and stored."""
    workers: int = 0
    """Ray actors (one per GPU when GPUs exist, else CPU actors); 0 runs in this process without Ray."""
    batch_size: int = 4
    """Samples per teacher forward (right-padded)."""
    seed: int = 0
    """Seed of the sampled target's draws (each sample's draws depend only on this seed and its id)."""
    shard_retries: int = 2
    """With Ray workers: how many times a shard whose actor died (a crashed process, a lost node) is
    retried on a fresh actor before the dump stops, naming the shard (complete shards are kept)."""

    def __post_init__(self):
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
        check(self.shard_retries >= 0, "shard_retries", f"must be >= 0, got {self.shard_retries}")
        check(self.batch_size >= 1, "batch_size", f"must be >= 1, got {self.batch_size}")
