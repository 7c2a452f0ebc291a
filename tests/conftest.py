"""Shared fixtures: tiny models built from configs, small images, LLaVA files. No network."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

FAMILIES = ("llava", "qwen2_vl")


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, family) -> Path:
    from pipeline.tiny import save_tiny_vlm

    return save_tiny_vlm(tmp_path_factory.mktemp(f"{family}-teacher"), family, "teacher")


@pytest.fixture(scope="session")
def processor(tiny_teacher_dir):
    from pipeline.processors import load_processor

    return load_processor(tiny_teacher_dir)


def write_image(path: Path, h: int = 32, w: int = 32, seed: int = 0) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).save(path)
    return path


def write_json(path: Path, records: list, jsonl: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if jsonl:
        path.write_text("".join(json.dumps(r) + "\n" for r in records))
    else:
        path.write_text(json.dumps(records))
    return path
