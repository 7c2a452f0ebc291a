"""The output-directory lock (pipeline.locks) between real processes: refused while held (naming
the directory and the holder), free again after a clean exit, taken over after a SIGKILL or from a
file naming a dead process, not kept by a killed holder's forked children, rank 0 only under DDP."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pipeline.locks import LOCK_NAME, OutputLockedError, output_lock

# Takes the lock of argv[1] as job "teacher-dump", says so in argv[2], optionally forks a child that
# sleeps (argv[4] == "fork", the child's pid written to argv[2] + ".child"), then holds the lock
# until the file argv[3] appears and leaves the block cleanly.
_HOLDER = """
import os, sys, time
from pathlib import Path
from pipeline.locks import output_lock
with output_lock(sys.argv[1], "teacher-dump"):
    if len(sys.argv) > 4 and sys.argv[4] == "fork":
        child = os.fork()
        if child == 0:
            time.sleep(120)
            os._exit(0)
        Path(sys.argv[2] + ".child").write_text(str(child))
    Path(sys.argv[2]).write_text("held")
    while not Path(sys.argv[3]).exists():
        time.sleep(0.05)
"""


def start_holder(tmp_path: Path, directory: Path, *extra: str) -> tuple[subprocess.Popen, Path]:
    ready, release = tmp_path / "ready", tmp_path / "release"
    proc = subprocess.Popen([sys.executable, "-c", _HOLDER, str(directory), str(ready), str(release), *extra],
                            stderr=subprocess.PIPE, start_new_session=True)
    deadline = time.time() + 60
    while not ready.exists():
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the holder never took the lock"
        time.sleep(0.05)
    return proc, release


def test_refused_while_another_process_holds_it_then_free(tmp_path):
    out = tmp_path / "out"
    proc, release = start_holder(tmp_path, out)
    try:
        with pytest.raises(OutputLockedError) as e:
            with output_lock(out, "distill"):
                pytest.fail("the lock was taken twice")
        msg = str(e.value)
        assert str(out) in msg and f"teacher-dump (pid {proc.pid} on host" in msg, msg
        release.write_text("")
        assert proc.wait(timeout=30) == 0, proc.stderr.read().decode()[-2000:]
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    assert not (out / LOCK_NAME).exists()  # a clean exit removes its file
    with output_lock(out, "distill"):
        holder = json.loads((out / LOCK_NAME).read_text())
        assert holder["job"] == "distill" and holder["pid"] == os.getpid()
    assert not (out / LOCK_NAME).exists()


def test_a_sigkilled_holders_lock_is_taken_over_with_a_warning(tmp_path, caplog):
    out = tmp_path / "out"
    proc, _ = start_holder(tmp_path, out)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert json.loads((out / LOCK_NAME).read_text())["pid"] == proc.pid  # left behind
    with caplog.at_level(logging.WARNING, logger="pipeline.locks"):
        with output_lock(out, "teacher-dump"):
            assert json.loads((out / LOCK_NAME).read_text())["pid"] == os.getpid()
    assert f"taking over the lock left by teacher-dump (pid {proc.pid}" in caplog.text


def test_a_lock_file_naming_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    out = tmp_path / "out"
    out.mkdir()
    (out / LOCK_NAME).write_text(json.dumps({"job": "distill", "pid": pid, "host": "h", "started": "t"}))
    with caplog.at_level(logging.WARNING, logger="pipeline.locks"):
        with output_lock(out, "distill"):
            pass
    assert f"taking over the lock left by distill (pid {pid} on host h, started t)" in caplog.text
    assert not (out / LOCK_NAME).exists()


def test_released_when_the_block_raises(tmp_path):
    out = tmp_path / "out"
    with pytest.raises(RuntimeError):
        with output_lock(out, "distill"):
            raise RuntimeError("boom")
    assert not (out / LOCK_NAME).exists()
    with output_lock(out, "distill"):
        pass


def test_a_killed_holders_forked_children_do_not_keep_it(tmp_path):
    """A forked worker (a DataLoader's) inherits the holder's descriptor; it must not hold the lock
    on once the holder is killed."""
    out = tmp_path / "out"
    proc, _ = start_holder(tmp_path, out, "fork")
    child = int((tmp_path / "ready.child").read_text())
    try:
        os.kill(proc.pid, signal.SIGKILL)  # the holder only: its child lives on
        proc.wait()
        os.kill(child, 0)  # still running
        with output_lock(out, "distill"):
            pass
    finally:
        os.killpg(proc.pid, signal.SIGKILL)


def test_under_ddp_only_rank_0_takes_it(tmp_path):
    """The ranks of one run share its directory: rank 0 takes the lock, the others do not, so a
    rank 1 passes while another process holds the lock and a rank 0 is refused."""
    out = tmp_path / "out"
    proc, release = start_holder(tmp_path, out)
    code = "import sys; from pipeline.locks import output_lock\nwith output_lock(sys.argv[1], 'distill', distributed=True): pass"
    try:
        for rank, rc in (("1", 0), ("0", 1)):
            env = {**os.environ, "RANK": rank}
            ran = subprocess.run([sys.executable, "-c", code, str(out)], env=env, capture_output=True, text=True)
            assert ran.returncode == rc, (rank, ran.stderr[-2000:])
        assert "OutputLockedError" in ran.stderr and f"pid {proc.pid}" in ran.stderr
        release.write_text("")
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
