"""Students: an HF VLM checkpoint, or a language model + a vision encoder + a new projector.

Composition is how a 0.5B–2B student is usually born: a small causal LM that shares the teacher's
tokenizer, a CLIP/SigLIP vision tower, and a randomly initialised LLaVA-style MLP projector. The
result is a stock ``LlavaForConditionalGeneration`` with a stock ``LlavaProcessor``, so the trained
student loads with ``from_pretrained`` and needs no code of ours; it is saved in the weight layout
that vLLM loads too (``pipeline.vllm_layout``).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoTokenizer,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)

from pipeline.errors import PipelineError
from pipeline.processors import load_processor
from pipeline.vllm_layout import to_vllm_layout
from schemas.fingerprints import read_model_config
from stage2_student.config import StudentConfig

IMAGE_TOKEN = "<image>"


def load_student(cfg: StudentConfig, chat_template: str, seed: int = 0):
    """(model, processor) of the student, in float32 on CPU (the trainer moves and casts it)."""
    # Read each config.json first: a missing or corrupt one is then refused naming the file, where
    # transformers would raise from deep inside from_pretrained.
    for directory in (cfg.path, cfg.language_model, cfg.vision_model):
        if directory is not None:
            read_model_config(directory)
    if cfg.path is not None:
        model = AutoModelForImageTextToText.from_pretrained(cfg.path, dtype=torch.float32, trust_remote_code=False)
        return model, load_processor(cfg.path)
    return compose_student(cfg.language_model, cfg.vision_model, chat_template, cfg.vision_feature_layer, seed)


def _vision_tower(vision_dir: str):
    """The vision encoder (a CLIP/SigLIP vision-only checkpoint, or the vision half of a full one)."""
    from transformers import CLIPVisionModel, SiglipVisionModel

    config = AutoConfig.from_pretrained(vision_dir)
    kind = getattr(config, "vision_config", config).model_type
    classes = {"clip_vision_model": CLIPVisionModel, "siglip_vision_model": SiglipVisionModel}
    if kind not in classes:
        raise PipelineError(f"{vision_dir}: vision model type {kind!r} cannot be composed (CLIP or SigLIP vision towers)")
    model = classes[kind].from_pretrained(vision_dir, dtype=torch.float32, trust_remote_code=False)
    return model, model.config


def compose_student(language_model: str, vision_model: str, chat_template: str, feature_layer: int = -1, seed: int = 0):
    """A LLaVA student from a causal LM directory and a vision encoder directory, projector new."""
    lm = AutoModelForCausalLM.from_pretrained(language_model, dtype=torch.float32, trust_remote_code=False)
    tokenizer = AutoTokenizer.from_pretrained(language_model, trust_remote_code=False)
    image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    if image_token_id is None or image_token_id == tokenizer.unk_token_id:
        raise PipelineError(f"{language_model}: the tokenizer has no {IMAGE_TOKEN} token for image placeholders")
    vision, vision_config = _vision_tower(vision_model)
    image_processor = AutoImageProcessor.from_pretrained(vision_model)
    side = vision_config.image_size // vision_config.patch_size
    strategy = "default" if vision_config.model_type == "clip_vision_model" else "full"  # CLIP has a CLS token
    config = LlavaConfig(
        vision_config=vision_config.to_dict(),
        text_config=lm.config.to_dict(),
        image_token_index=image_token_id,
        image_seq_length=side * side,
        vision_feature_layer=feature_layer,
        vision_feature_select_strategy=strategy,
    )
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config)
    # Pretrained parts in; only the projector keeps its fresh initialisation.
    model.model.language_model.load_state_dict(lm.get_decoder().state_dict())
    model.lm_head.load_state_dict(lm.get_output_embeddings().state_dict())
    model.model.vision_tower.load_state_dict(vision.state_dict())
    processor = LlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=vision_config.patch_size,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1 if strategy == "default" else 0,
        image_token=IMAGE_TOKEN,
        chat_template=chat_template,
    )
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    return model, processor


def freeze(model, prefixes: list[str]) -> int:
    """Stop gradients to every parameter under one of ``prefixes`` (module paths); the count frozen.

    Raises PipelineError naming a prefix under which there is no parameter, with the top-level
    modules that exist, so that a misspelt path does not silently train everything.
    """
    names = [name for name, _ in model.named_parameters()]
    frozen = 0
    for prefix in prefixes:
        hits = [n for n in names if n == prefix or n.startswith(prefix.rstrip(".") + ".")]
        if not hits:
            tops = sorted({".".join(n.split(".")[:2]) for n in names})
            raise PipelineError(f"train.freeze: no parameter under {prefix!r}; modules here: {', '.join(tops)}")
        for n in hits:
            param = model.get_parameter(n)
            frozen += param.numel() if param.requires_grad else 0
            param.requires_grad_(False)
    return frozen


def text_layers(model) -> int:
    return int(model.config.get_text_config().num_hidden_layers)


def map_layer(teacher_layer: int, teacher_layers: int, student_layers: int) -> int:
    """The student layer at the same relative depth as ``teacher_layer``."""
    return min(student_layers - 1, max(0, math.floor((teacher_layer + 0.5) * student_layers / teacher_layers)))


def save_student(model, processor, out_dir: Path, provenance: dict) -> Path:
    """``save_pretrained`` for model and processor, and provenance.json beside them.

    The weights are then renamed where vLLM expects other names than transformers writes
    (``pipeline.vllm_layout``), so the student loads in both; transformers reads either name.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir, safe_serialization=True)
    processor.save_pretrained(out_dir)
    to_vllm_layout(out_dir)
    (out_dir / "provenance.json").write_text(json.dumps(provenance, indent=2, sort_keys=True))
    return out_dir


def student_at_checkpoint(run_dir: Path, checkpoint: Path, out_dir: Path) -> Path:
    """A loadable student (like ``final/``) with the weights of one of the run's checkpoints, for
    evaluating a run along the way (learning curves). Needs the run's ``final/`` for the model's
    config and processor; the weights must fit it exactly."""
    from stage2_student.checkpoint import load_weights

    final = Path(run_dir) / "final"
    if not (final / "config.json").is_file():
        raise PipelineError(f"{final}: no final student; a checkpoint is exported with the run's config and processor")
    model = AutoModelForImageTextToText.from_pretrained(final, dtype=torch.float32, trust_remote_code=False)
    load_weights(checkpoint, model, str(final))
    provenance = json.loads((final / "provenance.json").read_text()) if (final / "provenance.json").is_file() else {}
    state = json.loads((Path(checkpoint) / "state.json").read_text())
    provenance.update({"checkpoint": str(Path(checkpoint).resolve()), "steps": state.get("step")})
    return save_student(model, load_processor(str(final)), Path(out_dir), provenance)
