"""Resumable training checkpoints without pickle.

``checkpoints/step-000100/`` holds ``model.safetensors`` (the student's state dict),
``optimizer.safetensors`` (every tensor of the optimizer state, keyed ``<param index>.<name>``),
and ``state.json`` (optimizer param groups, scheduler state, step, data position, config
fingerprint). ``checkpoints/latest`` names the newest complete checkpoint and is written last,
atomically, so a crash while saving leaves the previous checkpoint in charge.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from pipeline.errors import PipelineError
from schemas.io import atomic_write_text

LATEST = "latest"


def _optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    sd = optimizer.state_dict()
    tensors, scalars = {}, {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            if torch.is_tensor(value):
                tensors[f"{idx}.{name}"] = value.detach().cpu().contiguous()
            else:
                scalars[f"{idx}.{name}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def save_checkpoint(run_dir: Path, step: int, model, optimizer, scheduler, state: dict) -> Path:
    ckpt_root = run_dir / "checkpoints"
    final = ckpt_root / f"step-{step:06d}"
    tmp = ckpt_root / f".step-{step:06d}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    weights = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(_dedupe_shared(weights), str(tmp / "model.safetensors"))
    opt_tensors, opt_json = _optimizer_tensors(optimizer)
    save_file(opt_tensors, str(tmp / "optimizer.safetensors"))
    payload = {**state, "step": step, "optimizer": opt_json, "scheduler": scheduler.state_dict()}
    (tmp / "state.json").write_text(json.dumps(payload, indent=2, sort_keys=True, default=_jsonable))
    if final.exists():
        shutil.rmtree(final)
    tmp.rename(final)
    atomic_write_text(ckpt_root / LATEST, final.name)
    return final


def _jsonable(obj):
    if isinstance(obj, tuple):
        return list(obj)
    raise TypeError(f"not JSON-serialisable in a checkpoint: {type(obj).__name__}")


def _dedupe_shared(weights: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """safetensors refuses tensors that share memory (tied embeddings): clone the duplicates."""
    seen: dict[int, str] = {}
    out = {}
    for k, v in weights.items():
        ptr = v.data_ptr()
        out[k] = v.clone() if ptr in seen else v
        seen.setdefault(ptr, k)
    return out


def latest_checkpoint(run_dir: Path) -> Path | None:
    pointer = run_dir / "checkpoints" / LATEST
    if not pointer.is_file():
        return None
    path = pointer.parent / pointer.read_text().strip()
    if not (path / "state.json").is_file():
        raise PipelineError(f"{pointer} names {path.name}, which is incomplete; delete it to restart from the one before")
    return path


def load_weights(path: Path, model, what: str = "the student") -> None:
    """A checkpoint's ``model.safetensors`` into ``model`` in place; PipelineError naming the
    checkpoint when its names do not fit the model exactly (none missing, none unexpected)."""
    missing, unexpected = model.load_state_dict(load_file(str(Path(path) / "model.safetensors")), strict=False)
    if unexpected or missing:
        raise PipelineError(f"{path}: checkpoint does not fit {what} (missing {missing[:5]}, unexpected {unexpected[:5]})")


def load_checkpoint(path: Path, model, optimizer, scheduler) -> dict:
    """Restore model, optimizer and scheduler in place; return the saved state (step, data position, ...)."""
    state = json.loads((path / "state.json").read_text())
    load_weights(path, model)
    opt_tensors = load_file(str(path / "optimizer.safetensors"))
    opt_json = state["optimizer"]
    per_param: dict[int, dict] = {}
    for key, value in opt_tensors.items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    for key, value in opt_json["scalars"].items():
        idx, name = key.split(".", 1)
        per_param.setdefault(int(idx), {})[name] = value
    optimizer.load_state_dict({"state": per_param, "param_groups": opt_json["param_groups"]})
    scheduler.load_state_dict(state["scheduler"])
    return state
