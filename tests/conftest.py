"""Shared fixtures: tiny models built from configs, small images, LLaVA files. No network."""

from __future__ import annotations

import importlib.util
import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# tests/on_vllm need vLLM, which lives in its own venv (`make test` runs them there). In a venv
# without it they are not collected, and the report header says so (pytest_report_header).
HAS_VLLM = importlib.util.find_spec("vllm") is not None
collect_ignore = [] if HAS_VLLM else ["on_vllm"]


def pytest_report_header(config):
    if not HAS_VLLM:
        return "tests/on_vllm not collected: vLLM is not installed in this venv (make test runs them in .venv-vllm)"
    return None

FAMILIES = ("llava", "qwen2_vl", "qwen2_5_vl", "qwen3_vl", "idefics3", "internvl")
# Visual blocks per test image (32x32 or 32x48 px): tiled families give one per tile plus the
# global image / thumbnail (idefics3: 2x2 tiles + global; internvl: 2 tiles + thumbnail).
BLOCKS_PER_IMAGE = {"llava": 1, "qwen2_vl": 1, "qwen2_5_vl": 1, "qwen3_vl": 1, "idefics3": 5, "internvl": 3}


@pytest.fixture(scope="session", params=FAMILIES)
def family(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def tiny_teacher_dir(tmp_path_factory, family) -> Path:
    from pipeline.tools.tiny import save_tiny_vlm

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


@pytest.fixture(scope="module")
def teacher(family):
    """(model, processor) of the tiny teacher of ``family``, built in memory."""
    from pipeline.tools.tiny import build_tiny_vlm

    return build_tiny_vlm(family, "teacher", seed=0)


def two_image_record(directory: Path, sample_id: str = "mm"):
    """A system prompt and two turns; the second image stands inside the second instruction."""
    from pipeline.data.records import Record, Turn

    a = write_image(directory / "a.png", 32, 32, seed=1)
    b = write_image(directory / "b.png", 32, 48, seed=2)
    return Record(
        sample_id,
        [
            Turn("system", "You are a helpful assistant."),
            Turn("user", "<image>\nWhat colour is the shape at the top left?"),
            Turn("assistant", "red"),
            Turn("user", "Now compare with <image> this one: which is bigger?"),
            Turn("assistant", "the first one"),
        ],
        [a, b],
    )


def corrupt_chunk(store: Path, shard: str, array: str) -> Path:
    """Flip one byte in the middle of a chunk file of ``array`` in ``shard``; return the file."""
    chunk = next(
        p
        for p in sorted((store / "shards" / shard / "arrays.zarr" / array).rglob("*"))
        if p.is_file() and p.name != "zarr.json"
    )
    data = bytearray(chunk.read_bytes())
    data[len(data) // 2] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return chunk
