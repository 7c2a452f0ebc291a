"""What the tests under tests/on_vllm share: a vLLM engine on CPU for a tiny checkpoint.

These tests run in the vLLM venv (`make test` runs them there; `make vllm-setup` builds it). In
the main venv, `import vllm` fails on purpose: they are never skipped silently.
"""

from __future__ import annotations

import os

import vllm  # noqa: F401  (a missing vLLM fails the collection here, naming the module)

# vLLM on CPU reserves 92% of the machine's memory for its KV cache unless told otherwise, and
# refuses to start when other processes hold part of it; 1 GiB holds every tiny test sequence.
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

MAX_MODEL_LEN = 512


def start_engine(model_dir, max_logprobs: int = 8, images: int = 2):
    """A float32 engine on ``model_dir`` (eager: CUDA graphs do not exist on CPU)."""
    from vllm import LLM

    return LLM(model=str(model_dir), dtype="float32", max_model_len=MAX_MODEL_LEN, max_logprobs=max_logprobs,
               enforce_eager=True, limit_mm_per_prompt={"image": images}, seed=0)


def prompt_topk(output, k: int) -> tuple[list[list[int]], list[list[float]]]:
    """(ids, log-probs) of the top ``k`` by rank at every prompt position after the first, from
    vLLM's ``prompt_logprobs`` (each position's dict also holds the prompt's own token, at its rank)."""
    ids, logprobs = [], []
    for position in output.prompt_logprobs[1:]:
        top = sorted((lp.rank, tid, lp.logprob) for tid, lp in position.items() if lp.rank <= k)
        ids.append([tid for _, tid, _ in top])
        logprobs.append([lp for _, _, lp in top])
    return ids, logprobs
