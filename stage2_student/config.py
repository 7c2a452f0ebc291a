"""Configuration of ``pipeline run distill`` (DESIGN.md §4, §5.1, §6)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import check

DIVERGENCE = Literal["forward_kl", "reverse_kl", "jsd", "skew_forward_kl", "skew_reverse_kl", "tvd"]


@dataclass
class StudentConfig:
    path: str | None = None
    """An HF VLM checkpoint directory (model + processor). Or leave null and give language_model + vision_model."""
    language_model: str | None = None
    """An HF causal-LM checkpoint directory (with the teacher's tokenizer); composed with vision_model and a new projector."""
    vision_model: str | None = None
    """An HF vision-encoder checkpoint directory (CLIP or SigLIP vision model + image processor)."""
    vision_feature_layer: int = -1
    """Which vision-encoder layer feeds the projector when composing (-2 is the LLaVA-1.5 choice for real CLIP towers)."""

    def __post_init__(self):
        composed = self.language_model is not None or self.vision_model is not None
        check(
            (self.path is not None) != composed,
            "path",
            "give either student.path, or student.language_model and student.vision_model",
        )
        if composed:
            check(self.language_model is not None, "language_model", "needed together with student.vision_model")
            check(self.vision_model is not None, "vision_model", "needed together with student.language_model")


@dataclass
class StoreConfig:
    dir: str
    """The teacher store written by `pipeline run teacher-dump`."""
    verify_checksums: bool = False
    """Check every shard file's checksum before training (reads the whole store once)."""

    def __post_init__(self):
        check(bool(self.dir), "dir", "must name the store directory")


@dataclass
class DistillDataConfig:
    path: str | None = None
    """The conversations (LLaVA JSON/JSONL or HF dataset); null uses the path recorded in the store."""
    image_root: str | None = None
    """Where the images are; null uses the image root recorded in the store."""
    max_length: int = 2048
    """Longest student sequence (after image expansion)."""
    num_workers: int = 2
    """DataLoader worker processes that read and collate ahead of the training step (0: in the main process)."""
    length_group: int = 0
    """Sort runs of this many batches by sequence length, longest first, so each batch pads less
    (LLaVA-style length grouping, local to the run; 0 or 1: off). Changes which samples share a
    batch, so it is part of the run's settings."""
    image_cache_mb: float = 256
    """Per data process (each worker, or the main process with 0 workers): bound of the cache of
    images preprocessed for the student, by image sha256 (0: preprocess every time)."""
    read_cache_mb: float = 128
    """Per data process: bound of the cache of decoded store chunks (about 1 MB each; 0: every block read decodes)."""
    pixel_cache_dir: str | None = None
    """A directory for images preprocessed for the student, kept on disk after their first use, so
    later epochs read no image file and run no image processor (for data larger than
    image_cache_mb). Off by default: the tensors (float32 from LLaVA and Qwen2-VL processors) are
    far larger than the image files (a 336x336 LLaVA image is 1.35 MB), and one directory serves
    every run and student with the same processor settings (a subdirectory per settings
    fingerprint), which a default inside output.dir would not. Safe with any num_workers. A damaged
    entry is rebuilt with a warning naming its file."""
    pixel_cache_max_gb: float | None = None
    """Bound of the pixel cache for this student's processor settings (null: no bound); past it, new images are not written."""

    def __post_init__(self):
        check(self.max_length >= 8, "max_length", f"must be >= 8, got {self.max_length}")
        check(self.num_workers >= 0, "num_workers", f"must be >= 0, got {self.num_workers}")
        check(self.length_group >= 0, "length_group", f"must be >= 0 batches, got {self.length_group}")
        check(self.image_cache_mb >= 0, "image_cache_mb", f"must be >= 0, got {self.image_cache_mb}")
        check(self.read_cache_mb >= 0, "read_cache_mb", f"must be >= 0, got {self.read_cache_mb}")
        check(self.pixel_cache_dir is None or bool(self.pixel_cache_dir), "pixel_cache_dir", "must name a directory or be null")
        check(self.pixel_cache_max_gb is None or self.pixel_cache_max_gb > 0, "pixel_cache_max_gb",
              f"must be > 0 or null, got {self.pixel_cache_max_gb}")


@dataclass
class TrainConfig:
    steps: int = 1000
    """Optimizer steps."""
    batch_size: int = 8
    """Samples per micro-batch (per device)."""
    grad_accum: int = 1
    """Micro-batches per optimizer step."""
    lr: float = 1e-4
    """Peak learning rate (AdamW)."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    warmup_steps: int = 0
    """Linear warm-up steps before the schedule."""
    schedule: Literal["cosine", "linear", "constant"] = "cosine"
    """Learning-rate decay after warm-up (to 0 at `steps`)."""
    max_grad_norm: float = 1.0
    """Gradient clipping norm; 0 disables clipping."""
    precision: Literal["auto", "no", "bf16"] = "auto"
    """Mixed precision: `auto` is bf16 on GPU, full float32 on CPU."""
    checkpoint_every: int = 0
    """Save a resumable checkpoint every N steps (0: only at the end)."""
    log_every: int = 1
    """Write loss terms every N steps (JSONL and TensorBoard)."""
    freeze: list[str] = field(default_factory=list)
    """Parameters kept at their loaded values, by name prefix (a module path such as
    `model.vision_tower`, as in LLaVA's fine-tuning, which leaves the vision encoder as it is).
    A prefix that names no parameter is an error."""

    def __post_init__(self):
        check(all(isinstance(p, str) and p for p in self.freeze), "freeze", "must be a list of parameter-name prefixes")
        for key in ("steps", "batch_size", "grad_accum", "log_every"):
            check(getattr(self, key) >= 1, key, f"must be >= 1, got {getattr(self, key)}")
        check(self.lr > 0, "lr", f"must be > 0, got {self.lr}")
        check(self.warmup_steps >= 0, "warmup_steps", f"must be >= 0, got {self.warmup_steps}")
        check(self.checkpoint_every >= 0, "checkpoint_every", f"must be >= 0, got {self.checkpoint_every}")
        check(self.max_grad_norm >= 0, "max_grad_norm", f"must be >= 0, got {self.max_grad_norm}")


@dataclass
class LossConfig:
    sft: float = 1.0
    """Weight of the cross-entropy on response tokens."""
    kd: float = 0.0
    """alpha_KD: weight of the sparse KD divergence at response positions (0 switches it off)."""
    iva: float = 0.0
    """lambda_IVA: weight of the saliency-weighted divergence at the stored visual positions."""
    tpa: float = 0.0
    """lambda_TPA: weight of the transition divergence on branch rows."""
    iva_attention: float = 0.0
    """Weight of the optional IVA attention variant: KL(teacher saliency || student instruction-to-visual attention)."""
    iva_attention_layer: int | None = None
    """Student layer for the attention variant; null maps the teacher's saliency layer proportionally by depth."""
    divergence: DIVERGENCE = "forward_kl"
    """D for KD, IVA and TPA against the top-k targets. Sampled targets always use forward KL."""
    beta: float = 0.5
    """JSD's beta (0 -> forward KL, 1 -> reverse KL)."""
    alpha: float = 0.1
    """Skew KLs' alpha."""
    temperature: float | None = None
    """Training temperature; must equal the store's dump temperature (null: take the store's)."""
    target: Literal["topk", "sampled"] = "topk"
    """KD target: the stored top-k, or the unbiased sampled target (the store must have been dumped with it)."""
    iva_target: Literal["topk", "sampled"] = "topk"
    """IVA target at the stored visual positions: the top-k, or the sampled target (forward KL; the store must
    have been dumped with `signals.sampled.rows` naming `visual`)."""
    tpa_target: Literal["topk", "sampled"] = "topk"
    """TPA target on the branch rows: the top-k', or the sampled target (forward KL; the store must have been
    dumped with `signals.sampled.rows` naming `transitions`)."""

    def __post_init__(self):
        for key in ("sft", "kd", "iva", "tpa", "iva_attention"):
            check(getattr(self, key) >= 0, key, f"must be >= 0, got {getattr(self, key)}")
        check(any(getattr(self, k) > 0 for k in ("sft", "kd", "iva", "tpa", "iva_attention")), "sft", "every loss weight is 0")
        check(0.0 <= self.beta <= 1.0, "beta", f"must be in [0, 1], got {self.beta}")
        check(0.0 <= self.alpha < 1.0, "alpha", f"must be in [0, 1), got {self.alpha}")
        check(self.temperature is None or self.temperature > 0, "temperature", "must be > 0")


@dataclass
class DistillOutputConfig:
    dir: str
    """Run directory: checkpoints, the final student (final/), losses.jsonl, TensorBoard events, config."""

    def __post_init__(self):
        check(bool(self.dir), "dir", "must name the output directory")


@dataclass
class DistillConfig:
    student: StudentConfig
    """The student model."""
    store: StoreConfig
    """The teacher store."""
    output: DistillOutputConfig
    """Where the run goes; re-running the same command resumes from its latest checkpoint."""
    data: DistillDataConfig = field(default_factory=DistillDataConfig)
    """Conversations and images (defaults: those recorded in the store)."""
    train: TrainConfig = field(default_factory=TrainConfig)
    """Optimisation."""
    loss: LossConfig = field(default_factory=LossConfig)
    """Loss terms: SFT-only, vanilla KD and Align-TI are this one recipe with different weights."""
    seed: int = 0
    """Seed of the data order and of new weights (the projector of a composed student)."""
