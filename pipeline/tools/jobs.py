"""Run many configured jobs (``pipeline run <job> --config FILE``) side by side, in dependency order.

A task is a list of steps run one after the other (e.g. train a student, then evaluate it); a task
starts once the tasks it needs are done. With ``workers = 1`` every step runs in this process;
with more, each step is its own ``python -m pipeline.tools.cli run`` process with ``threads``
torch threads (tiny models train faster as two one-thread processes than as one two-thread one),
its output in ``logs/<task>.log``. A task whose ``done`` check passes is skipped, so a demo that
stopped (a crash, Ctrl-C) resumes where it was; a failing task lets the running ones finish, starts
no new one, and raises naming the task and its log.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.tools.jobs")


@dataclass
class Task:
    name: str
    steps: list[tuple[str, Path]]  # (job name of `pipeline run`, config file), in order
    needs: tuple[str, ...] = ()
    done: Callable[[], bool] = field(default=lambda: False)
    after: Callable[[], None] | None = None  # in this process, once the steps succeeded (e.g. collect a report)


def _in_process(job: str, config: Path, log_file: Path) -> None:
    from pipeline.config import load_config
    from pipeline.tools.cli import RUN_JOBS, resolve

    spec = RUN_JOBS[job]
    resolve(spec.function)(load_config(resolve(spec.config), config))


def _subprocess(threads: int) -> Callable[[str, Path, Path], None]:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "TQDM_MININTERVAL": "30"}

    def run(job: str, config: Path, log_file: Path) -> None:
        log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(log_file, "a") as out:
            out.write(f"\n$ pipeline run {job} --config {config}\n")
            out.flush()
            rc = subprocess.run([sys.executable, "-m", "pipeline.tools.cli", "run", job, "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT, env=env).returncode
        if rc != 0:
            raise PipelineError(f"`pipeline run {job} --config {config}` exited with {rc}; see {log_file}")

    return run


def run_tasks(tasks: Sequence[Task], workers: int, log_dir: Path, threads: int = 1,
              runner: Callable[[str, Path, Path], None] | None = None) -> dict[str, float]:
    """Run ``tasks`` (see the module docstring); return each run task's wall seconds (skipped: 0)."""
    names = [t.name for t in tasks]
    if len(set(names)) != len(names):
        raise ValueError(f"task names repeat: {sorted(n for n in set(names) if names.count(n) > 1)}")
    unknown = sorted({n for t in tasks for n in t.needs} - set(names))
    if unknown:
        raise ValueError(f"tasks need unknown tasks {unknown}")
    if runner is None:
        runner = _in_process if workers == 1 else _subprocess(threads)
    pending = list(tasks)
    finished: set[str] = set()
    seconds: dict[str, float] = {}
    failures: list[str] = []
    lock = threading.Lock()

    def execute(task: Task) -> None:
        t0 = time.time()
        for job, config in task.steps:
            runner(job, config, log_dir / f"{task.name}.log")
        if task.after is not None:
            with lock:
                task.after()
        seconds[task.name] = time.time() - t0

    running: dict[Future, Task] = {}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        while pending or running:
            if not failures:
                for task in [t for t in pending if all(n in finished for n in t.needs)]:
                    if len(running) >= workers:
                        break
                    pending.remove(task)
                    if task.done():
                        log.info("%s: done before, skipped", task.name)
                        if task.after is not None:
                            task.after()
                        seconds[task.name] = 0.0
                        finished.add(task.name)
                        continue
                    running[pool.submit(execute, task)] = task
            if not running:
                if failures or not pending:
                    break
                continue  # tasks were skipped: look again for ready ones
            complete, _ = wait(running, return_when=FIRST_COMPLETED)
            for fut in complete:
                task = running.pop(fut)
                try:
                    fut.result()
                except Exception as e:  # noqa: BLE001 - reported with the task's name below
                    failures.append(f"{task.name}: {e}")
                    log.error("%s failed: %s", task.name, e)
                    continue
                finished.add(task.name)
                log.info("[%d/%d] %s done in %.0f s", len(finished), len(tasks), task.name, seconds[task.name])
    if failures:
        not_run = [t.name for t in pending]
        raise PipelineError(f"{len(failures)} task(s) failed: {'; '.join(failures)}"
                            + (f"; not started: {', '.join(not_run)}" if not_run else "")
                            + ". Run the same command again to resume.")
    return seconds
