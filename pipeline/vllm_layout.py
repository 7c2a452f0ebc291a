"""Checkpoints in the layout vLLM loads: the weights renamed where transformers and vLLM disagree.

A LLaVA checkpoint saved by transformers 5.19 names its vision tower's weights
``vision_tower.embeddings.*``, ``vision_tower.encoder.*`` (its CLIP/SigLIP vision model has no
``vision_model`` level any more, and ``save_pretrained`` writes the legacy top-level prefixes without
adding it back). vLLM 0.32 expects the legacy names in full, ``vision_tower.vision_model.*``, and
refuses the checkpoint: "There is no module or parameter named 'vision_tower.embeddings'". Stock
``LlavaForConditionalGeneration.save_pretrained`` writes the same names, so the mismatch is between
the two libraries, not ours. transformers reads both names (its CLIP vision model drops a
``vision_model.`` prefix on load), so a checkpoint in vLLM's layout serves both: ``tests/on_vllm``
checks that an exported checkpoint gives transformers identical logits and vLLM the same log-probs.

Families without a rule (Qwen2-VL and the other Qwen-VL families) keep their names; their
processors' missing video config is written by ``pipeline.processors`` on save, and by an export of
an older checkpoint here.

``to_vllm_layout(dir)`` rewrites a checkpoint in place (what ``save_student`` does to ``final/``);
``export_for_vllm(src, dst)`` writes a renamed copy (``pipeline export-vllm``), e.g. of a teacher
that Stage 0 is to serve.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

from safetensors import safe_open
from safetensors.torch import load_file, save_file

from pipeline.errors import PipelineError
from schemas.fingerprints import read_model_config
from schemas.io import atomic_write_text, writing

INDEX_NAME = "model.safetensors.index.json"

# model_type -> (pattern, replacement) applied to every weight name, in order. The LLaVA rule puts
# ``vision_model.`` under the vision tower where it is missing (top-level legacy names or the
# ``model.``-prefixed ones a later transformers may write); vLLM maps ``model.vision_tower.`` itself.
KEY_RULES: dict[str, list[tuple[re.Pattern, str]]] = {
    "llava": [(re.compile(r"^((?:model\.)?vision_tower\.)(?!vision_model\.)"), r"\1vision_model.")],
}


def vllm_key(model_type: str, key: str) -> str:
    """The name vLLM loads the weight ``key`` of a ``model_type`` checkpoint under."""
    for pattern, replacement in KEY_RULES.get(model_type, []):
        key = pattern.sub(replacement, key)
    return key


def _rename_file(path: Path, model_type: str) -> dict[str, str]:
    """Rewrite one safetensors file with vLLM's names (atomically: a temporary, then a rename);
    the old -> new names it changed."""
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
        keys = list(f.keys())
    renamed = {k: vllm_key(model_type, k) for k in keys if vllm_key(model_type, k) != k}
    if not renamed:
        return {}
    targets = [vllm_key(model_type, k) for k in keys]
    clashes = sorted({t for t in targets if targets.count(t) > 1})
    if clashes:
        raise PipelineError(f"{path}: renaming for vLLM would give two weights one name: {clashes[:3]}")
    tensors = load_file(str(path))
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with writing(str(path)):
        save_file({vllm_key(model_type, k): v for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, path)
    return renamed


def _write_video_config(directory: Path, model_type: str) -> bool:
    """Write the video processor config a family's stock processor needs, when it is missing (a
    checkpoint saved before ``pipeline.processors`` wrote it); whether it wrote one."""
    from transformers.utils import VIDEO_PROCESSOR_NAME

    from pipeline.processors import IMAGE_ONLY_PROCESSORS, load_processor, video_processor_config

    cls = IMAGE_ONLY_PROCESSORS.get(model_type)
    if cls is None or (directory / VIDEO_PROCESSOR_NAME).is_file():
        return False
    config = video_processor_config(load_processor(directory, model_type).image_processor, cls.video_processor_type)
    atomic_write_text(directory / VIDEO_PROCESSOR_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
    return True


def to_vllm_layout(directory: str | Path) -> dict:
    """Rewrite the checkpoint in ``directory`` in place so that vLLM loads it; idempotent.

    Returns what changed: ``{"renamed": n weights, "video_config": written or not}``. Raises
    PipelineError for a directory without ``config.json`` or ``*.safetensors`` weights.
    """
    directory = Path(directory)
    model_type = read_model_config(directory)["model_type"]
    files = sorted(directory.glob("*.safetensors"))
    if not files:
        raise PipelineError(f"{directory}: no *.safetensors weights to export")
    renamed: dict[str, str] = {}
    for path in files:
        renamed.update(_rename_file(path, model_type))
    index = directory / INDEX_NAME
    if renamed and index.is_file():
        doc = json.loads(index.read_text(encoding="utf-8"))
        doc["weight_map"] = {renamed.get(k, k): v for k, v in doc["weight_map"].items()}
        atomic_write_text(index, json.dumps(doc, indent=2, sort_keys=True) + "\n")
    return {"renamed": len(renamed), "video_config": _write_video_config(directory, model_type)}


def export_for_vllm(src: str | Path, dst: str | Path) -> Path:
    """A copy of checkpoint ``src`` in ``dst``, in the layout vLLM loads (see :func:`to_vllm_layout`).

    The copy is built in ``<dst>.partial`` and renamed when complete, so an interrupted export
    leaves no half checkpoint under ``dst``. Refuses an existing ``dst`` and ``src == dst``.
    """
    src, dst = Path(src), Path(dst)
    read_model_config(src)  # a missing or corrupt config.json is named before anything is copied
    if dst.exists():
        raise PipelineError(f"{dst} exists; export-vllm writes a new directory (to rewrite in place, use to_vllm_layout)")
    partial = dst.with_name(dst.name + ".partial")
    with writing(str(dst)):
        if partial.exists():
            shutil.rmtree(partial)
        shutil.copytree(src, partial)
        to_vllm_layout(partial)
        partial.rename(dst)
    return dst
