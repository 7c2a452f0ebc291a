"""The ``data`` section shared by every command that reads conversations."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import check


@dataclass
class DataConfig:
    path: str
    """LLaVA-format JSON/JSONL file, or a local Hugging Face dataset directory (save_to_disk output or an imagefolder with metadata.jsonl)."""
    image_root: str | None = None
    """Directory that image paths are relative to; default: the data file's directory."""
    split: str = "train"
    """Split to read when `path` is a dataset with several splits."""
    max_length: int = 2048
    """Longest token sequence (after image expansion) a sample may have; longer samples are skipped as over_length."""
    limit: int | None = None
    """Read only the first N records (for quick trials); null reads all."""

    def __post_init__(self):
        check(bool(self.path), "path", "must name a data file or dataset directory")
        check(self.max_length >= 8, "max_length", f"must be >= 8, got {self.max_length}")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 or null, got {self.limit}")
