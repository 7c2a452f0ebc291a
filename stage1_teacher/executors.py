"""Where shards run: in this process (``workers=0``) or on Ray actors (one per GPU, else per CPU).

Both executors expose the same two calls, ``calibrate(records)`` and ``run_shards(todo, ...)``, and
both run :func:`stage1_teacher.shards.dump_shard`, so a shard's contents never depend on which
one ran it. Ray actors own whole shards: the driver hands each idle actor the next shard, and a
shard is never given to two actors.
"""

from __future__ import annotations

import logging
from contextlib import AbstractContextManager

from pipeline.logs import ThroughputBar
from stage1_teacher.config import DumpConfig
from stage1_teacher.shards import dump_shard

log = logging.getLogger("stage1.executors")


def make_executor(cfg: DumpConfig, processor=None) -> AbstractContextManager:
    """``processor``: the teacher's, already loaded by the caller; the in-process teacher reuses it."""
    return InProcessExecutor(cfg, processor) if cfg.workers == 0 else RayExecutor(cfg)


class InProcessExecutor(AbstractContextManager):
    """One teacher in this process; shards run one after another (debuggable, no Ray)."""

    def __init__(self, cfg: DumpConfig, processor=None):
        from stage1_teacher.teacher import Teacher

        self.cfg = cfg
        self.teacher = Teacher(cfg.teacher, cfg.signals, cfg.seed, processor)

    def calibrate(self, records) -> dict[int, float]:
        return self.teacher.calibrate(records, self.cfg.data.max_length, self.cfg.batch_size)

    def run_shards(self, todo: dict, specs, layers: list[int], n_samples: int) -> None:
        self.teacher.check_layers(layers)
        bar = ThroughputBar(n_samples, "teacher-dump")
        try:
            for name, records in todo.items():
                dump_shard(
                    self.teacher, self.cfg.output.dir, name, records, specs,
                    self.cfg.data.max_length, self.cfg.batch_size, layers, progress=bar.update,
                )
        finally:
            bar.close()

    def __exit__(self, *exc) -> None:
        return None


class DumpWorker:
    """The body of a Ray actor: one teacher, any number of shards, progress pushed to a queue."""

    def __init__(self, cfg: DumpConfig, queue):
        from stage1_teacher.teacher import Teacher

        self.cfg, self.queue = cfg, queue
        self.teacher = Teacher(cfg.teacher, cfg.signals, cfg.seed)

    def calibrate(self, records) -> dict[int, float]:
        return self.teacher.calibrate(records, self.cfg.data.max_length, self.cfg.batch_size)

    def run_shard(self, name: str, records, specs, layers: list[int]) -> str:
        dump_shard(
            self.teacher, self.cfg.output.dir, name, records, specs,
            self.cfg.data.max_length, self.cfg.batch_size, layers,
            progress=lambda s, t: self.queue.put((s, t)),
        )
        return name


class RayExecutor(AbstractContextManager):
    """``cfg.workers`` Ray actors; each takes one GPU when the cluster has GPUs, else one CPU."""

    def __init__(self, cfg: DumpConfig):
        import ray
        from ray.util.queue import Queue

        self.cfg = cfg
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
        gpus = int(ray.cluster_resources().get("GPU", 0))
        per_actor = {"num_gpus": 1} if gpus else {"num_cpus": 1}
        if gpus and cfg.workers > gpus:
            log.warning("workers=%d but the cluster has %d GPU(s); actors will wait for GPUs", cfg.workers, gpus)
        self.queue = Queue()
        actor = ray.remote(**per_actor)(DumpWorker)
        self.actors = [actor.remote(cfg, self.queue) for _ in range(cfg.workers)]
        log.info("started %d Ray actor(s) with %s each", len(self.actors), per_actor)

    def calibrate(self, records) -> dict[int, float]:
        import ray

        return ray.get(self.actors[0].calibrate.remote(records))

    def run_shards(self, todo: dict, specs, layers: list[int], n_samples: int) -> None:
        import ray

        queue_items = list(todo.items())
        running: dict = {}  # object ref -> (actor, shard name)
        idle = list(self.actors)
        bar = ThroughputBar(n_samples, "teacher-dump")
        try:
            while queue_items or running:
                while idle and queue_items:
                    actor = idle.pop()
                    name, records = queue_items.pop(0)
                    running[actor.run_shard.remote(name, records, specs, layers)] = actor
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                self._drain(bar)
                for ref in ready:
                    actor = running.pop(ref)
                    ray.get(ref)  # re-raises a worker's error here, naming the shard in its traceback
                    idle.append(actor)
            self._drain(bar)
        finally:
            bar.close()

    def _drain(self, bar: ThroughputBar) -> None:
        while not self.queue.empty():
            samples, tokens = self.queue.get_nowait()
            bar.update(samples, tokens)

    def __exit__(self, *exc) -> None:
        import ray

        for a in self.actors:
            ray.kill(a)
        self.queue.shutdown()
        if self._started_ray:
            ray.shutdown()
