"""Run claims for experiments that several processes share one output folder for.

A process claims a run by creating ``<run file>.lock`` (``O_EXCL``) holding its pid, and removes
it when the run is written or has failed. A lock whose pid is no longer alive on this machine was
left by a process that was killed: the next claim takes the run over instead of waiting for it
forever. (Pids say nothing across machines: processes sharing a folder must share a machine.)
"""

from __future__ import annotations

import os
import time

__all__ = ["claim", "release"]


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def _lock_pid(lock: str) -> int:
    try:
        with open(lock) as fh:
            return int(fh.read().strip() or 0)
    except (OSError, ValueError):
        return 0


def claim(path: str) -> bool:
    """Create ``path + '.lock'`` for this process. False when a live process holds it; a lock left
    by a dead process is removed and claimed."""
    lock = path + ".lock"
    os.makedirs(os.path.dirname(lock) or ".", exist_ok=True)
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            pid = _lock_pid(lock)
            if pid == 0:
                # Created but not written yet by its owner (or unreadable): look again, since only
                # a process killed between its open and its write leaves it empty.
                time.sleep(0.2)
                pid = _lock_pid(lock)
            if _pid_alive(pid):
                return False
            try:
                os.remove(lock)  # left behind by a process that died: take the run over
            except FileNotFoundError:
                pass
            continue
        with os.fdopen(fd, "w") as fh:
            fh.write(str(os.getpid()))
        return True
    return False


def release(path: str) -> None:
    """Remove this process's claim on ``path`` (no error if it is gone)."""
    try:
        os.remove(path + ".lock")
    except FileNotFoundError:
        pass
