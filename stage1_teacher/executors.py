"""Where shards run: in this process (``workers=0``) or on Ray actors (one per GPU, else per CPU).

Both executors expose the same two calls, ``calibrate(records)`` and ``run_shards(todo, ...)``, and
both run :func:`stage1_teacher.shards.dump_shard`, so a shard's contents never depend on which
one ran it. Ray actors own whole shards: the driver hands each idle actor the next shard, and a
shard is never given to two actors at once (a retry, after its actor died, goes to a fresh one).
"""

from __future__ import annotations

import contextlib
import logging
import signal
import sys
import threading
from contextlib import AbstractContextManager
from typing import NoReturn

from pipeline.errors import PipelineError
from pipeline.logs import ThroughputBar
from schemas.errors import StoreFormatError
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

    def run_shards(self, todo: dict, specs, layers: list[int], n_samples: int, codecs=None) -> None:
        self.teacher.check_layers(layers)
        bar = ThroughputBar(n_samples, "teacher-dump")
        try:
            for name, records in todo.items():
                dump_shard(
                    self.teacher, self.cfg.output.dir, name, records, specs,
                    self.cfg.data.max_length, self.cfg.batch_size, layers, progress=bar.update, codecs=codecs,
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

    def run_shard(self, name: str, records, specs, layers: list[int], codecs=None) -> str:
        dump_shard(
            self.teacher, self.cfg.output.dir, name, records, specs,
            self.cfg.data.max_length, self.cfg.batch_size, layers,
            progress=lambda s, t: self.queue.put((s, t)), codecs=codecs,
        )
        return name


class RayExecutor(AbstractContextManager):
    """``cfg.workers`` Ray actors; each takes one GPU when the cluster has GPUs, else one CPU.

    A shard whose actor dies (a crashed process, a lost node) is retried on a fresh actor, at most
    ``cfg.shard_retries`` times. Ray is shut down on every way out: an exception, Ctrl-C, SIGTERM.
    """

    def __init__(self, cfg: DumpConfig):
        import ray
        from ray.util.queue import Queue

        self.cfg = cfg
        self.actors: list = []
        self.queue = None
        self._previous_sigterm = None
        self._started_ray = not ray.is_initialized()
        if self._started_ray:
            ray.init(include_dashboard=False, log_to_driver=True, configure_logging=False)
        try:
            self._previous_sigterm = _interrupt_on_sigterm()
            gpus = int(ray.cluster_resources().get("GPU", 0))
            per_actor = {"num_gpus": 1} if gpus else {"num_cpus": 1}
            if gpus and cfg.workers > gpus:
                log.warning("workers=%d but the cluster has %d GPU(s); actors will wait for GPUs", cfg.workers, gpus)
            self.queue = Queue()
            self._actor_class = ray.remote(**per_actor)(DumpWorker)
            self.actors = [self._actor_class.remote(cfg, self.queue) for _ in range(cfg.workers)]
            log.info("started %d Ray actor(s) with %s each", len(self.actors), per_actor)
        except BaseException:
            self.__exit__(*sys.exc_info())  # a with block never entered would leave Ray running
            raise

    def _replace(self, actor, task: str, attempts: int, error) -> object:
        """A fresh actor in place of ``actor``, which died running ``task`` (its ``attempts``-th
        try); the dump stops, naming the task, once the retries are spent."""
        import ray
        from ray.exceptions import ActorDiedError

        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        retries = self.cfg.shard_retries
        # Only a dead process is retried: an actor that could not load the teacher would fail
        # alike, and one merely unreachable might still be writing the shard.
        if error.actor_init_failed or not isinstance(error, ActorDiedError):
            raise PipelineError(f"{task}: the Ray actor failed: {error}") from error
        if attempts > retries:
            raise PipelineError(
                f"{task}: its Ray actor died on each of {attempts} attempt(s) (shard_retries={retries}); last: "
                f"{first_line}. Complete shards are kept: re-run the same command to resume"
            ) from error
        log.warning("%s: its Ray actor died (%s); retrying on a fresh actor (retry %d of %d)",
                    task, first_line, attempts, retries)
        with contextlib.suppress(Exception):
            ray.kill(actor)
        fresh = self._actor_class.remote(self.cfg, self.queue)
        self.actors[self.actors.index(actor)] = fresh
        return fresh

    def calibrate(self, records) -> dict[int, float]:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        attempts = 0
        while True:
            attempts += 1
            try:
                return ray.get(self.actors[0].calibrate.remote(records))
            except RayActorError as e:
                self._replace(self.actors[0], "calibration", attempts, e)
            except RayTaskError as e:
                _raise_named("calibration", e)

    def run_shards(self, todo: dict, specs, layers: list[int], n_samples: int, codecs=None) -> None:
        import ray
        from ray.exceptions import RayActorError, RayTaskError

        queue_items = list(todo.items())
        attempts = dict.fromkeys(todo, 0)
        running: dict = {}  # object ref -> (actor, shard name, records)
        idle = list(self.actors)
        bar = ThroughputBar(n_samples, "teacher-dump")
        try:
            while queue_items or running:
                while idle and queue_items:
                    actor = idle.pop()
                    name, records = queue_items.pop(0)
                    attempts[name] += 1
                    running[actor.run_shard.remote(name, records, specs, layers, codecs)] = (actor, name, records)
                ready, _ = ray.wait(list(running), num_returns=1, timeout=0.5)
                self._drain(bar)
                for ref in ready:
                    actor, name, records = running.pop(ref)
                    try:
                        ray.get(ref)
                    except RayActorError as e:  # the process died: redo the shard on a fresh actor
                        idle.append(self._replace(actor, f"shard {name}", attempts[name], e))
                        queue_items.insert(0, (name, records))
                        continue
                    except RayTaskError as e:  # the shard's own code raised: no retry
                        _raise_named(f"shard {name}", e)
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

        try:
            # Each step may fail (a dead actor, a half-started run); none may skip the shutdown.
            for a in self.actors:
                with contextlib.suppress(Exception):
                    ray.kill(a)
            if self.queue is not None:
                with contextlib.suppress(Exception):
                    self.queue.shutdown()
        finally:
            if self._started_ray:
                ray.shutdown()
            _restore_sigterm(self._previous_sigterm)


def _raise_named(task: str, error) -> NoReturn:
    """Raise a Ray task's error named by its task: a user error stays one (printed without a
    traceback); anything else keeps its traceback, with a note naming the task."""
    cause = getattr(error, "cause", None)
    if isinstance(cause, (PipelineError, StoreFormatError)):
        message = str(cause) if task in str(cause) else f"{task}: {cause}"
        raise PipelineError(message) from error
    error.add_note(f"while running {task} on a Ray actor")
    raise error


def _interrupt_on_sigterm():
    """Make SIGTERM unwind the driver like Ctrl-C, so ``__exit__`` shuts Ray down (Ray's own
    handler aborts the process, skipping every cleanup). Returns the handler it replaced; only the
    main thread can set one (elsewhere nothing changes)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    previous = signal.getsignal(signal.SIGTERM)
    previous = signal.SIG_DFL if previous is None else previous  # None: set outside Python

    def interrupt(signum, frame):
        _restore_sigterm(previous)  # a second SIGTERM during the cleanup is not gentle
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, interrupt)
    return previous


def _restore_sigterm(previous) -> None:
    if previous is not None and threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, previous)
