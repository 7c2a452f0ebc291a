"""The ``data`` section shared by every command that reads conversations."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.config import check
from pipeline.data.records import ImagePolicy


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
    max_image_pixels: int = ImagePolicy.max_image_pixels
    """Largest image, in pixels (width x height, read from the file's header before decoding); a larger one is skipped as image_too_large."""
    max_image_bytes: int = ImagePolicy.max_image_bytes
    """Largest image file, in bytes (64 MiB); a larger one is skipped as image_too_large. Only regular files are read: a device, FIFO or directory is skipped as missing_image."""
    allow_outside_root: bool = ImagePolicy.allow_outside_root
    """Read image paths that leave image_root (absolute paths, `..`, symlinks pointing out); by default such a sample is skipped as image_outside_root."""

    def __post_init__(self):
        check(bool(self.path), "path", "must name a data file or dataset directory")
        check(self.max_length >= 8, "max_length", f"must be >= 8, got {self.max_length}")
        check(self.limit is None or self.limit >= 1, "limit", f"must be >= 1 or null, got {self.limit}")
        check(self.max_image_pixels >= 1, "max_image_pixels", f"must be >= 1, got {self.max_image_pixels}")
        check(self.max_image_bytes >= 1, "max_image_bytes", f"must be >= 1, got {self.max_image_bytes}")
