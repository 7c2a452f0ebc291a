"""Configuration of ``pipeline run generate`` (Stage 0)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pipeline.config import check
from pipeline.data import DataConfig


@dataclass
class ModelConfig:
    path: str
    """Hugging Face checkpoint directory of the model that answers (a teacher, or a student's `final/`); it must load in vLLM (see `pipeline export-vllm`)."""
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    """Weights and compute dtype in vLLM; `auto` takes the checkpoint's."""
    tensor_parallel_size: int = 1
    """GPUs one engine spans (vLLM's tensor parallelism), for a model that does not fit on one; each Ray worker then takes this many GPUs."""
    gpu_memory_utilization: float = 0.9
    """Share of a GPU's memory vLLM may take (weights + KV cache). On CPU, vLLM sizes its KV cache from VLLM_CPU_KVCACHE_SPACE (GiB) instead, when set."""
    max_images_per_prompt: int = 4
    """Images one prompt may carry (vLLM's limit_mm_per_prompt); a record with more is reported as bad."""
    enforce_eager: bool = False
    """Run without CUDA graphs (slower decoding, faster start)."""

    def __post_init__(self):
        check(bool(self.path), "path", "must name the model checkpoint directory")
        check(self.tensor_parallel_size >= 1, "tensor_parallel_size", f"must be >= 1, got {self.tensor_parallel_size}")
        check(0 < self.gpu_memory_utilization <= 1, "gpu_memory_utilization", f"must be in (0, 1], got {self.gpu_memory_utilization}")
        check(self.max_images_per_prompt >= 1, "max_images_per_prompt", f"must be >= 1, got {self.max_images_per_prompt}")


@dataclass
class SamplingConfig:
    n: int = 1
    """Answers per record: each input record becomes `n` output records (ids `<id>#<k>` when n > 1), each its own conversation."""
    temperature: float = 1.0
    """Sampling temperature; 0 is greedy (then every one of the `n` answers is the same)."""
    top_p: float = 1.0
    """Nucleus sampling: the smallest set of tokens with this much probability."""
    max_new_tokens: int = 256
    """Longest answer per turn, in tokens; a longer one is cut (its finish reason says `length`)."""
    history: Literal["gold", "own"] = "gold"
    """Earlier turns of a multi-turn record: `gold` keeps the dataset's answers (each turn answered on its own), `own` feeds the model's own earlier answers (a self-consistent conversation)."""

    def __post_init__(self):
        check(self.n >= 1, "n", f"must be >= 1, got {self.n}")
        check(self.temperature >= 0, "temperature", f"must be >= 0, got {self.temperature}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1], got {self.top_p}")
        check(self.max_new_tokens >= 1, "max_new_tokens", f"must be >= 1, got {self.max_new_tokens}")


@dataclass
class OutputConfig:
    dir: str
    """The output directory (created if absent): `generated.jsonl`, `skipped.jsonl`, `provenance.json`. A re-run resumes: complete shards are kept."""
    shard_size: int = 256
    """Input records per shard; a shard is the unit of work of one worker and of resume."""

    def __post_init__(self):
        check(bool(self.dir), "dir", "must name the output directory")
        check(self.shard_size >= 1, "shard_size", f"must be >= 1, got {self.shard_size}")


@dataclass
class GenerateConfig:
    model: ModelConfig
    """The model that answers."""
    data: DataConfig
    """The LLaVA-format JSON/JSONL file whose human turns are answered; data.max_length is the engine's context length (prompt + answer)."""
    output: OutputConfig
    """Where the answers go."""
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    """How answers are drawn."""
    seed: int = 0
    """Every answer's draws depend only on this seed, the record's id, the answer's index and the turn: a resumed run, or one on other workers, writes the same answers."""
    workers: int = 0
    """Ray actors, one engine each (one per `model.tensor_parallel_size` GPUs when GPUs exist, else CPU actors); 0 runs one engine in this process without Ray."""

    def __post_init__(self):
        check(self.workers >= 0, "workers", f"must be >= 0, got {self.workers}")
