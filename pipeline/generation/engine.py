"""One vLLM engine (``vllm.LLM``, offline) on the model that answers: the only module that imports vLLM.

vLLM is installed in its own venv (README "The vLLM environment"), so it is imported when an
engine is built, never when the package is.
"""

from __future__ import annotations

import sys

from pipeline.errors import PipelineError
from pipeline.generation.config import GenerateConfig
from pipeline.generation.prompts import Answer, Request


def engine_version() -> str:
    """vLLM's version, recorded with every output: another version may draw other answers."""
    try:
        import vllm
    except ImportError as e:
        raise PipelineError(f"generate needs vLLM, which this Python ({sys.executable}) lacks ({e}); build its venv "
                            "with `make vllm-setup` and run `.venv-vllm/bin/pipeline run generate ...`") from e
    return vllm.__version__


class Engine:
    """``vllm.LLM`` on ``cfg.model``; :meth:`answer` draws one answer per request with its own seed.

    The engine's context is ``data.max_length`` tokens (prompt + answer). Sampling settings come
    from ``cfg.sampling`` only: each request's ``SamplingParams`` are explicit, so the checkpoint's
    generation defaults never apply (its end-of-turn tokens still stop an answer).
    """

    def __init__(self, cfg: GenerateConfig):
        from vllm import LLM

        self.sampling = cfg.sampling
        self.llm = LLM(
            model=cfg.model.path,
            dtype=cfg.model.dtype,
            tensor_parallel_size=cfg.model.tensor_parallel_size,
            gpu_memory_utilization=cfg.model.gpu_memory_utilization,
            enforce_eager=cfg.model.enforce_eager,
            max_model_len=cfg.data.max_length,
            limit_mm_per_prompt={"image": cfg.model.max_images_per_prompt},
            seed=cfg.seed,
            trust_remote_code=False,
        )

    def answer(self, requests: list[Request]) -> list[Answer]:
        """One answer per request, in order (one ``generate`` call: vLLM batches them)."""
        from vllm import SamplingParams

        if not requests:
            return []
        s = self.sampling
        prompts = [{"prompt": r.text, "multi_modal_data": {"image": r.images}} if r.images else {"prompt": r.text}
                   for r in requests]
        params = [SamplingParams(n=1, temperature=s.temperature, top_p=s.top_p, max_tokens=s.max_new_tokens, seed=r.seed)
                  for r in requests]
        outputs = self.llm.generate(prompts, params, use_tqdm=False)
        return [Answer(o.outputs[0].text, o.outputs[0].finish_reason, len(o.outputs[0].token_ids)) for o in outputs]

    def close(self) -> None:
        """Stop the engine's processes now (else they stop when the engine is collected)."""
        self.llm.llm_engine.engine_core.shutdown()
