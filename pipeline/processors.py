"""Loading a VLM checkpoint's processor, image-only.

The pipeline never feeds video. Qwen2-VL's and InternVL's stock processors insist on a video processor, and in
transformers 5.x every video processor needs torchvision, which must not be installed next to the
CPU build of torch (it breaks transformers imports). So for the families listed in
``IMAGE_ONLY_PROCESSORS`` we always load an image-only subclass: same tokenizer, same image
processor, same chat template, same token expansion, no video processor. It is used whether or not
torchvision is present, so a store's processor fingerprint never depends on the environment. What
it saves is read by the stock ``AutoProcessor`` too (``processor_class`` stays the stock name).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import re

from transformers import AutoProcessor
from transformers.models.internvl.processing_internvl import InternVLProcessor
from transformers.models.qwen2_vl.processing_qwen2_vl import Qwen2VLProcessor
from transformers.processing_utils import ProcessorMixin

from schemas.fingerprints import read_model_config


class ImageOnlyQwen2VLProcessor(Qwen2VLProcessor):
    """Qwen2-VL processor without the video processor (see module docstring)."""

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


class ImageOnlyInternVLProcessor(InternVLProcessor):
    """InternVL processor without the video processor (see module docstring)."""

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


IMAGE_ONLY_PROCESSORS = {"qwen2_vl": ImageOnlyQwen2VLProcessor, "internvl": ImageOnlyInternVLProcessor}


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
