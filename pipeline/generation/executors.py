"""Where Stage 0's shards run: in this process (``workers=0``) or on Ray actors, one engine each.

Both run :func:`pipeline.generation.shards.generate_shard`, so a shard's answers never depend on which
one ran it. Ray actors each hold one engine for the whole run (an engine takes a minute to start);
each takes ``model.tensor_parallel_size`` GPUs when the cluster has GPUs (vLLM spreads the model
over them), else one CPU. Ray's ``ActorPool`` hands each idle actor the next shard.
"""

from __future__ import annotations

import contextlib
import logging
from contextlib import AbstractContextManager

from pipeline.errors import PipelineError
from pipeline.processors import load_processor
from pipeline.generation.config import GenerateConfig
from pipeline.generation.shards import generate_shard

log = logging.getLogger("stage0.executors")


def make_executor(cfg: GenerateConfig, engine=None) -> AbstractContextManager:
    """``engine``: one already started on ``cfg.model`` for the in-process executor to use (and
    leave running); by default it starts its own."""
    return InProcessExecutor(cfg, engine) if cfg.workers == 0 else RayExecutor(cfg)


def _log_shard(done: dict) -> None:
    rate = done["generated_tokens"] / done["engine_seconds"] if done["engine_seconds"] else 0.0
    log.info("%s: %d record(s) written, %d skipped, %d tokens generated (%.1f tokens/s)",
             done["name"], done["records"], done["skipped"], done["generated_tokens"], rate)


class InProcessExecutor(AbstractContextManager):
    """One engine in this process; shards run one after another (debuggable, no Ray)."""

    def __init__(self, cfg: GenerateConfig, engine=None):
        from pipeline.generation.engine import Engine

        self.cfg = cfg
        self.processor = load_processor(cfg.model.path)
        self.own_engine = engine is None
        self.engine = Engine(cfg) if engine is None else engine

    def run_shards(self, todo: dict, identity: dict) -> None:
        for name, items in todo.items():
            _log_shard(generate_shard(self.engine, self.processor, self.cfg, name, items, identity))

    def __exit__(self, *exc) -> None:
        if self.own_engine:
            self.engine.close()


class GenerateWorker:
    """The body of a Ray actor: one engine, any number of shards."""

    def __init__(self, cfg: GenerateConfig):
        from pipeline.generation.engine import Engine

        self.cfg = cfg
        self.processor = load_processor(cfg.model.path)
        self.engine = Engine(cfg)

    def run_shard(self, name: str, items: list, identity: dict) -> dict:
        return generate_shard(self.engine, self.processor, self.cfg, name, items, identity)


class RayExecutor(AbstractContextManager):
    """``cfg.workers`` Ray actors, one engine each. A failed shard stops the run, naming it;
    complete shards are kept, so the same command resumes."""

    def __init__(self, cfg: GenerateConfig):
        import ray

        self.cfg = cfg
        self.actors: list = []
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
        try:
            gpus = int(ray.cluster_resources().get("GPU", 0))
            tp = cfg.model.tensor_parallel_size
            per_actor = {"num_gpus": tp} if gpus else {"num_cpus": 1}
            if gpus and cfg.workers * tp > gpus:
                log.warning("workers=%d x tensor_parallel_size=%d but the cluster has %d GPU(s); actors will wait for GPUs",
                            cfg.workers, tp, gpus)
            if not gpus and tp > 1:
                raise PipelineError(f"model.tensor_parallel_size={tp} needs GPUs; the Ray cluster has none")
            actor_class = ray.remote(**per_actor)(GenerateWorker)
            self.actors = [actor_class.remote(cfg) for _ in range(cfg.workers)]
            log.info("started %d Ray actor(s) with %s each", len(self.actors), per_actor)
        except BaseException:
            self.__exit__()
            raise

    def run_shards(self, todo: dict, identity: dict) -> None:
        from ray.exceptions import RayActorError, RayTaskError
        from ray.util import ActorPool

        pool = ActorPool(self.actors)
        work = list(todo.items())
        try:
            for done in pool.map_unordered(lambda actor, item: actor.run_shard.remote(item[0], item[1], identity), work):
                _log_shard(done)
        except RayTaskError as e:
            cause = getattr(e, "cause", None)
            if isinstance(cause, PipelineError):
                raise PipelineError(str(cause)) from e
            raise
        except RayActorError as e:
            raise PipelineError(f"a Ray actor died: {e}. Complete shards are kept: re-run the same command to resume") from e

    def __exit__(self, *exc) -> None:
        import ray

        try:
            for actor in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(actor)
        finally:
            if self._started_ray:
                ray.shutdown()
