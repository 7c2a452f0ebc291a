"""One writer per output directory (DESIGN.md §6): the exclusive lock every writing job takes
(``teacher-dump`` and ``distill``; ``generate`` when it comes) before it touches its directory.

How: ``fcntl.flock(LOCK_EX | LOCK_NB)`` on ``<dir>/.pipeline.lock``. The kernel releases a flock
when the last descriptor of its holder closes, however the holder ends (SIGKILL and the OOM killer
included), so a dead run never blocks the next one, no process id is ever guessed to be alive or
dead (ids are reused), and two runs that find the same leftover file cannot both take it. That is
why flock and not ``os.open(O_CREAT | O_EXCL)``, which needs exactly those guesses to recover from a
killed holder. The file's content (job, pid, host, start time) serves the messages only: the
refusal names the holder, and a file left behind by a holder that did not end cleanly is taken over
with a warning naming it. A clean exit removes the file.

Scope: local filesystems. flock across hosts on NFS, Lustre or other network filesystems is
unreliable or not supported at all; locking an output directory there is out of scope (the lock
then at best excludes runs on one host).

Distributed runs (``torchrun``/``accelerate launch``, which set ``RANK``): every rank of one run
writes to the same output directory, so only global rank 0 takes the lock, and the other ranks
share it (``output_lock(..., distributed=True)``). The rule for a job: its other ranks write to the
directory only after a collective (a barrier) that rank 0 reaches holding the lock, and a rank
that finds itself outside rank 0's process group (its launcher set ``RANK`` but no group formed)
refuses to run. A second run's rank 0 is refused and exits; its other ranks then wait at that
barrier until the launcher, seeing a failed rank, ends them, having written nothing. A holder
ended by SIGTERM (the launcher's way) leaves its file behind: the next run takes it over.
"""

from __future__ import annotations

import contextlib
import datetime
import errno
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Iterator

from pipeline.errors import PipelineError

log = logging.getLogger("pipeline.locks")

LOCK_NAME = ".pipeline.lock"

# Lock descriptors this process holds. A forked child (a DataLoader worker) closes its copies, so
# that only the holder keeps the lock: a killed holder's workers must not hold it on after it.
_HELD: set[int] = set()


def _close_held_in_child() -> None:
    for fd in _HELD:
        with contextlib.suppress(OSError):
            os.close(fd)
    _HELD.clear()


os.register_at_fork(after_in_child=_close_held_in_child)


class OutputLockedError(PipelineError):
    """Another run holds the output directory's lock."""


def launch_rank() -> int:
    """This process's global rank under ``torchrun``/``accelerate launch`` (``RANK``); 0 otherwise."""
    rank = os.environ.get("RANK", "0")
    try:
        return int(rank)
    except ValueError:
        raise PipelineError(f"environment variable RANK={rank!r} is not a process rank (an integer)") from None


def _describe(holder: dict) -> str:
    if not holder:
        return "a run whose details are not readable"
    return (f"{holder.get('job', 'a job')} (pid {holder.get('pid', '?')} on host {holder.get('host', '?')}, "
            f"started {holder.get('started', '?')})")


def _read_holder(fd: int) -> dict:
    """The holder's record in an open lock file; {} if empty or not a record."""
    try:
        text = os.pread(fd, 4096, 0).decode()
        holder = json.loads(text) if text.strip() else {}
    except (OSError, UnicodeDecodeError, ValueError):
        return {}
    return holder if isinstance(holder, dict) else {}


def _acquire(directory: Path, job: str) -> int:
    """Take the lock of ``directory`` (created if missing); return its descriptor."""
    path = directory / LOCK_NAME
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # under a regular file, read-only, full: named, not a traceback
        raise PipelineError(f"output directory {directory} cannot be created: {e}") from e
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            if e.errno not in (errno.EAGAIN, errno.EACCES):
                os.close(fd)
                raise PipelineError(f"{directory}: cannot lock {path}: {e}") from e
            holder = _read_holder(fd)
            for _ in range(10):  # the holder writes its record right after it takes the lock
                if holder:
                    break
                time.sleep(0.05)
                holder = _read_holder(fd)
            os.close(fd)
            raise OutputLockedError(
                f"{directory} is in use by another run: {_describe(holder)} holds its lock {path}. "
                "One directory has one writer at a time: wait for that run to end, or use another "
                "output directory") from None
        # A holder removes the file before it lets go, so the file locked may no longer be the one
        # at `path` (another run may have made a new one since): then try again on the new file.
        try:
            same = os.path.samestat(os.fstat(fd), os.stat(path))
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    previous = _read_holder(fd)
    if previous:  # written by a holder that never removed it: killed, or its machine went down
        log.warning("%s: taking over the lock left by %s, which is gone", directory, _describe(previous))
    started = datetime.datetime.now().astimezone()
    record = {"job": job, "pid": os.getpid(), "host": socket.gethostname(),
              "started": started.isoformat(timespec="seconds"), "started_unix": started.timestamp()}
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, (json.dumps(record) + "\n").encode(), 0)
    except OSError as e:
        os.close(fd)
        raise PipelineError(f"{directory}: cannot write the lock file {path}: {e}") from e
    _HELD.add(fd)
    return fd


def _release(directory: Path, fd: int) -> None:
    # Remove the file while still holding the lock, then let go: a run that opened the old file
    # meanwhile sees it is no longer the one at the path and starts over on a new one.
    _HELD.discard(fd)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(directory / LOCK_NAME)
    os.close(fd)


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike, job: str, distributed: bool = False) -> Iterator[None]:
    """Hold the exclusive lock of ``directory`` (created if missing) for the ``with`` block; released
    on every way out of it. Refused with :class:`OutputLockedError`, naming the directory and the
    holder, while another process holds it.

    ``distributed``: the job runs as several ranks sharing ``directory``; only rank 0 (``RANK``)
    takes the lock (see the module's note for the rule the job's other ranks follow).
    """
    directory = Path(directory)
    if distributed and launch_rank() != 0:
        yield
        return
    # A run refused before it wrote anything leaves no trace: a directory made only to hold the
    # lock is removed again if it is still empty when the lock is let go.
    created = not directory.exists()
    fd = _acquire(directory, job)
    owner = os.getpid()
    try:
        yield
    finally:
        if os.getpid() == owner:  # a forked child leaving the block has no lock to release
            _release(directory, fd)
            if created:
                with contextlib.suppress(OSError):
                    directory.rmdir()
