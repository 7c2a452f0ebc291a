"""The demo's task runner (``pipeline.tools.jobs``): dependency order, resume, failures, subprocesses."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from pipeline.config import save_config
from pipeline.errors import PipelineError
from pipeline.tools.data_check import DataCheckConfig
from pipeline.tools.jobs import Task, run_tasks
from pipeline.tools.synthetic import generate
from pipeline.tools.tiny import save_tiny_vlm


class Recorder:
    """A runner that records (task log name, job) with start/end times, and fails on request."""

    def __init__(self, fail: set[str] = frozenset(), sleep: float = 0.0):
        self.calls, self.fail, self.sleep = [], fail, sleep
        self.active, self.most_active = 0, 0
        self.lock = threading.Lock()

    def __call__(self, job: str, config: Path, log_file: Path) -> None:
        with self.lock:
            self.active += 1
            self.most_active = max(self.most_active, self.active)
        time.sleep(self.sleep)
        with self.lock:
            self.active -= 1
            self.calls.append((log_file.stem, job, str(config)))
        if log_file.stem in self.fail:
            raise RuntimeError(f"{log_file.stem} broke")


@pytest.mark.parametrize("workers", [1, 2])
def test_tasks_run_after_what_they_need_and_done_tasks_are_skipped_but_collected(tmp_path, workers):
    collected = []
    rec = Recorder(sleep=0.05)
    tasks = [
        Task("b", [("distill", Path("b.yaml")), ("eval", Path("b-eval.yaml"))], needs=("a",),
             after=lambda: collected.append("b")),
        Task("a", [("distill", Path("a.yaml"))], after=lambda: collected.append("a")),
        Task("c", [("distill", Path("c.yaml"))], done=lambda: True, after=lambda: collected.append("c")),
        Task("d", [("eval", Path("d.yaml"))], needs=("c",)),
    ]
    seconds = run_tasks(tasks, workers, tmp_path, runner=rec)
    names = [c[0] for c in rec.calls]
    assert sorted(names) == ["a", "b", "b", "d"]  # c was done before: not run
    assert names.index("a") < names.index("b")
    assert [c[1] for c in rec.calls if c[0] == "b"] == ["distill", "eval"]  # a task's steps in order
    assert sorted(collected) == ["a", "b", "c"]  # a skipped task's results are still collected
    assert seconds["c"] == 0.0 and seconds["b"] > 0
    assert rec.most_active <= workers


def test_two_workers_run_independent_tasks_side_by_side(tmp_path):
    rec = Recorder(sleep=0.3)
    run_tasks([Task(n, [("eval", Path(f"{n}.yaml"))]) for n in "abcd"], 2, tmp_path, runner=rec)
    assert rec.most_active == 2


def test_a_failing_task_stops_new_ones_and_is_named_with_what_was_not_started(tmp_path):
    rec = Recorder(fail={"a"})
    tasks = [Task("a", [("distill", Path("a.yaml"))]), Task("b", [("eval", Path("b.yaml"))], needs=("a",))]
    with pytest.raises(PipelineError, match=r"a: a broke.*not started: b.*again to resume"):
        run_tasks(tasks, 1, tmp_path, runner=rec)
    assert [c[0] for c in rec.calls] == ["a"]


def test_task_lists_with_repeated_or_unknown_names_are_refused(tmp_path):
    with pytest.raises(ValueError, match="repeat"):
        run_tasks([Task("a", []), Task("a", [])], 1, tmp_path, runner=Recorder())
    with pytest.raises(ValueError, match=r"unknown tasks \['z'\]"):
        run_tasks([Task("a", [], needs=("z",))], 1, tmp_path, runner=Recorder())


def test_subprocess_steps_run_the_cli_and_a_failure_names_the_log(tmp_path):
    data = generate(tmp_path / "data", seed=0, n_train=3, n_val=1, n_test=1, grid=2, n_colours=4, n_shapes=4)
    model = save_tiny_vlm(tmp_path / "model", "llava", "teacher", seed=0)
    good = tmp_path / "good.yaml"
    report = tmp_path / "report.json"
    save_config(DataCheckConfig(model=str(model), data={"path": str(data["train"])}, report=str(report)), good)
    bad = tmp_path / "bad.yaml"
    bad.write_text(f"model: {model}\ndata: {{path: {tmp_path / 'missing.json'}}}\n")
    run_tasks([Task("check", [("data-check", good)])], 2, tmp_path / "logs")
    assert json.loads(report.read_text())["samples_ok"] == 3
    assert "pipeline run data-check" in (tmp_path / "logs" / "check.log").read_text()
    with pytest.raises(PipelineError, match=r"broken: .*exited with [1-9]; see .*broken\.log"):
        run_tasks([Task("broken", [("data-check", bad)])], 2, tmp_path / "logs")
    assert "missing.json" in (tmp_path / "logs" / "broken.log").read_text()
