"""Loading a VLM checkpoint's processor, image-only.

The pipeline never feeds video. The stock processors of Qwen2-VL, Qwen2.5-VL, Qwen3-VL and InternVL insist
on a video processor, and in transformers 5.x every video processor needs torchvision, which must
not be installed next to the CPU build of torch (it breaks transformers imports). So for the
families listed in ``IMAGE_ONLY_PROCESSORS`` we always load an image-only subclass: same tokenizer,
same image processor, same chat template, same token expansion, no video processor. It is used
whether or not torchvision is present, so a store's processor fingerprint never depends on the
environment. What it saves is read by the stock ``AutoProcessor`` too (``processor_class`` stays
the stock name).

The stock ``AutoProcessor`` of these families, once torchvision is installed (as it is beside vLLM,
which serves every VLM through it), refuses a checkpoint without a video processor config ("Can't
load video processor"). So saving writes ``video_preprocessor_config.json`` too: the stock video
processor's type with the image processor's resizing, normalisation and patching, written as JSON
because building a video processor needs torchvision. The pipeline never reads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from transformers import AutoProcessor
from transformers.models.qwen2_5_vl.processing_qwen2_5_vl import Qwen2_5_VLProcessor
from transformers.models.internvl.processing_internvl import InternVLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.processing_utils import ProcessorMixin
from transformers.utils import VIDEO_PROCESSOR_NAME

from schemas.fingerprints import read_model_config
from schemas.io import atomic_write_text

# The image processor's settings a stock video processor of these families shares (resizing,
# normalisation, patching); its frame sampling keeps the class defaults.
VIDEO_SHARED_KEYS = (
    "do_resize", "size", "resample", "do_rescale", "rescale_factor", "do_normalize", "image_mean", "image_std",
    "do_convert_rgb", "patch_size", "temporal_patch_size", "merge_size", "crop_to_patches", "min_patches",
    "max_patches",
)


def video_processor_config(image_processor, video_processor_type: str) -> dict:
    """The stock video processor's config: ``video_processor_type`` with ``image_processor``'s
    shared settings (``VIDEO_SHARED_KEYS``)."""
    settings = image_processor.to_dict()
    return {"video_processor_type": video_processor_type, **{k: settings[k] for k in VIDEO_SHARED_KEYS if k in settings}}


class _SavesVideoConfig:
    """Mixin: ``save_pretrained`` also writes the stock video processor's config (module docstring)."""

    video_processor_type: str

    def save_pretrained(self, save_directory, *args, **kwargs):
        out = super().save_pretrained(save_directory, *args, **kwargs)
        config = video_processor_config(self.image_processor, self.video_processor_type)
        atomic_write_text(Path(save_directory) / VIDEO_PROCESSOR_NAME, json.dumps(config, indent=2, sort_keys=True) + "\n")
        return out


class ImageOnlyQwen2VLProcessor(_SavesVideoConfig, Qwen2VLProcessor):
    """Qwen2-VL processor without the video processor (see module docstring)."""

    video_processor_type = "Qwen2VLVideoProcessor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        # Same token attributes as the stock __init__, then the mixin with two sub-processors.
        self.image_token = getattr(tokenizer, "image_token", None) or "<|image_pad|>"
        self.video_token = getattr(tokenizer, "video_token", None) or "<|video_pad|>"
        self.image_token_id = tokenizer.convert_tokens_to_ids(self.image_token)
        self.video_token_id = tokenizer.convert_tokens_to_ids(self.video_token)
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = "Qwen2VLProcessor"
        return out


class ImageOnlyQwen2_5_VLProcessor(_SavesVideoConfig, Qwen2_5_VLProcessor):
    """Qwen2.5-VL processor without the video processor (see module docstring).

    The stock ``__init__`` runs with ``video_processor=None``: ``ProcessorMixin`` takes its
    sub-processors from this signature (image processor and tokenizer), so the ``None`` is dropped.
    """

    video_processor_type = "Qwen2VLVideoProcessor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = "Qwen2_5_VLProcessor"
        return out


class ImageOnlyQwen3VLProcessor(_SavesVideoConfig, Qwen3VLProcessor):
    """Qwen3-VL processor without the video processor (as :class:`ImageOnlyQwen2_5_VLProcessor`)."""

    video_processor_type = "Qwen3VLVideoProcessor"

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, None, chat_template=chat_template, **kwargs)

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = "Qwen3VLProcessor"
        return out


class ImageOnlyInternVLProcessor(_SavesVideoConfig, InternVLProcessor):
    """InternVL processor without the video processor (see module docstring)."""

    video_processor_type = "InternVLVideoProcessor"

    def __init__(self, image_processor=None, tokenizer=None, image_seq_length: int = 256, chat_template=None, **kwargs):
        # The stock __init__'s attributes, from the tokenizer's named tokens, with two sub-processors.
        ProcessorMixin.__init__(self, image_processor, tokenizer, chat_template=chat_template, **kwargs)
        self.image_seq_length = image_seq_length
        self.start_image_token = tokenizer.start_image_token
        self.end_image_token = tokenizer.end_image_token
        self.start_image_token_id = tokenizer.start_image_token_id
        self.end_image_token_id = tokenizer.end_image_token_id
        self.image_token = tokenizer.context_image_token
        self.video_token = tokenizer.video_token
        self.image_token_id = tokenizer.context_image_token_id
        self.multimodal_pattern = re.compile(
            f"(?P<image>{re.escape(self.image_token)})|(?P<video>{re.escape(self.video_token)})"
        )

    def to_dict(self) -> dict[str, Any]:
        out = super().to_dict()
        out["processor_class"] = "InternVLProcessor"
        return out


IMAGE_ONLY_PROCESSORS = {
    "qwen2_vl": ImageOnlyQwen2VLProcessor,
    "qwen2_5_vl": ImageOnlyQwen2_5_VLProcessor,
    "qwen3_vl": ImageOnlyQwen3VLProcessor,
    "internvl": ImageOnlyInternVLProcessor,
}


def load_processor(path: str | Path, model_type: str | None = None):
    """The processor saved in checkpoint directory ``path`` (offline, no remote code).

    ``model_type``: the checkpoint's, when the caller has read its config already.
    """
    if model_type is None:
        model_type = read_model_config(path)["model_type"]
    cls = IMAGE_ONLY_PROCESSORS.get(model_type)
    if cls is not None:
        return cls.from_pretrained(str(path))
    return AutoProcessor.from_pretrained(str(path), trust_remote_code=False)
