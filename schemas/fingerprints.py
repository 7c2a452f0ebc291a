"""Identities recorded in a store's manifest and compared by Stage 2 (DESIGN.md §5, §5.1).

Each fingerprint is the sha256 of a canonical JSON (sorted keys) of exactly what defines the
thing: equal fingerprints mean the same token ids, the same rendered prompts, the same pixels.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from schemas.store import file_sha256, fingerprint


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


def config_fingerprint(model_dir: str | Path) -> str:
    return fingerprint(json.loads((Path(model_dir) / "config.json").read_text()))


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
