"""Identities recorded in a store's manifest and compared by Stage 2 (DESIGN.md §5, §5.1).

Each fingerprint is the sha256 of a canonical JSON (sorted keys) of exactly what defines the
thing: equal fingerprints mean the same token ids, the same rendered prompts, the same pixels.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from schemas.errors import PipelineError
from schemas.io import file_sha256, fingerprint


def tokenizer_fingerprint(tokenizer) -> str:
    """Vocabulary, merges and added/special tokens (not padding rows of the embedding)."""
    backend = json.loads(tokenizer.backend_tokenizer.to_str())
    model = backend.get("model", {})
    return fingerprint(
        {
            "vocab": tokenizer.get_vocab(),
            "merges": model.get("merges"),
            "model_type": model.get("type"),
            "added_tokens": sorted((t["id"], t["content"], t["special"]) for t in backend.get("added_tokens", [])),
            "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        }
    )


def chat_template_fingerprint(processor) -> str:
    return hashlib.sha256((processor.chat_template or "").encode()).hexdigest()


def processor_fingerprint(processor) -> str:
    """The image processor's settings (resizing, normalisation, patching)."""
    return fingerprint(processor.image_processor.to_dict())


def read_model_config(model_dir: str | Path) -> dict:
    """A checkpoint directory's ``config.json`` as a dict; a missing or unreadable file is named."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{model_dir}: not a model checkpoint directory (no config.json)")
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise PipelineError(f"{path}: unreadable model config: {e}") from e
    if not isinstance(config, dict) or not isinstance(config.get("model_type"), str):
        raise PipelineError(f"{path}: not a model config (a JSON object with a 'model_type' string)")
    return config


@dataclasses.dataclass(frozen=True)
class ModelIdentity:
    """What a manifest records of a checkpoint, from one read of its ``config.json``."""

    path: str
    """The checkpoint directory, resolved."""
    config: dict
    """``config.json`` as read."""

    @classmethod
    def read(cls, model_dir: str | Path) -> "ModelIdentity":
        return cls(str(Path(model_dir).resolve()), read_model_config(model_dir))

    @property
    def model_type(self) -> str:
        return self.config["model_type"]

    @property
    def text_layers(self) -> int:
        """Decoder layers of the language model (``text_config`` of a composite config)."""
        return int(self.config.get("text_config", self.config)["num_hidden_layers"])

    @property
    def head_rows(self) -> int:
        """Rows of the output head (``vocab_size`` of the language model's config), padding included."""
        return int(self.config.get("text_config", self.config)["vocab_size"])

    @property
    def config_fingerprint(self) -> str:
        return fingerprint(self.config)

    def weights_fingerprint(self) -> str:
        return weights_fingerprint(self.path)


def weights_fingerprint(model_dir: str | Path) -> str:
    """sha256 over the sha256 of every safetensors file (sorted by name)."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{model_dir}: no *.safetensors weights (pickled .bin weights are not loaded)")
    return fingerprint({f.name: file_sha256(f) for f in files})


def dataset_fingerprint(path: str | Path) -> str:
    """The data file's bytes, or every file of a dataset directory (names and bytes). Images are hashed per sample."""
    p = Path(path)
    if p.is_file():
        return file_sha256(p)
    return fingerprint({str(f.relative_to(p)): file_sha256(f) for f in sorted(p.rglob("*")) if f.is_file()})
