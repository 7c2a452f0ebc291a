"""Data layer: conversation records in, model inputs with position sets out."""

from __future__ import annotations

from itertools import islice
from typing import Iterator

from pipeline.data.config import DataConfig
from pipeline.data.encode import EncodedSample, TemplateError, VisualBlock, encode
from pipeline.data.records import BadRecord, DataSourceError, ImagePolicy, Record, SampleError, read_records

__all__ = [
    "BadRecord",
    "DataConfig",
    "DataSourceError",
    "EncodedSample",
    "ImagePolicy",
    "Record",
    "SampleError",
    "TemplateError",
    "VisualBlock",
    "encode",
    "iter_records",
    "iter_encoded",
    "read_records",
]


def iter_records(cfg: DataConfig) -> Iterator[Record | BadRecord]:
    """The records of ``cfg.path`` in order, at most ``cfg.limit`` of them."""
    return islice(read_records(cfg.path, cfg.image_root, cfg.split, ImagePolicy.from_settings(vars(cfg))), cfg.limit)


def iter_encoded(cfg: DataConfig, processor) -> Iterator[EncodedSample | SampleError]:
    """Encode every record; a bad sample is yielded as its SampleError, never dropped."""
    for rec in iter_records(cfg):
        if isinstance(rec, BadRecord):
            yield rec.error
            continue
        try:
            yield encode(rec, processor, cfg.max_length)
        except SampleError as e:
            yield e
