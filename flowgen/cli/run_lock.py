"""One run per run directory: an exclusive lock held for the life of the training process.

``<run dir>/run.lock`` holds who owns the directory (PID, host, start time, command) and is
locked with ``flock``. The kernel drops the lock when its process ends, however it ends
(``kill -9`` included), so a lock file left behind by a dead process is simply locked again
by the next run, which says whose lock it took over.

Network file systems. On Linux, ``flock`` on NFS is carried out as a POSIX lock by the NFS
lock protocol (NLM for NFSv3, the protocol itself for NFSv4), so it also excludes a process
on another node; when the owning node dies, the server frees its locks once the client's
lease expires (about 90 s on NFSv4). Two set-ups do not give cross-node locks: mounts with
``nolock`` / ``local_lock=all`` (the lock is then local to each node) and file systems
without locking (Lustre without ``flock``: ``flock`` fails with ENOLCK/EOPNOTSUPP). For
those the lock file itself is the fallback: the owner refreshes its modification time every
``HEARTBEAT_S`` seconds, and a run refuses a directory whose lock file names a process on
another host with a heartbeat younger than ``STALE_AFTER_S``; on the same host it asks the
kernel whether that PID is still alive. A crashed node's lock is therefore taken over
``STALE_AFTER_S`` after its last heartbeat.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import socket
import sys
import threading
import time
from datetime import datetime
from pathlib import Path

from flowgen.errors import UserError

LOCK_FILE = "run.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 180.0
_NO_LOCKS = (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL)


class RunDirectoryInUse(UserError):
    """Another live process owns the run directory."""


class RunLock:
    """``with RunLock(run_dir):`` owns ``run_dir`` until the block ends (or the process dies)."""

    def __init__(self, run_dir: Path, heartbeat_s: float = HEARTBEAT_S, stale_after_s: float = STALE_AFTER_S):
        self.run_dir = Path(run_dir)
        self.path = self.run_dir / LOCK_FILE
        self.heartbeat_s, self.stale_after_s = heartbeat_s, stale_after_s
        self._fd: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.taken_over: dict | None = None  # the owner a stale lock file named, when one was taken over

    def __enter__(self) -> RunLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()

    def acquire(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        while True:  # the lock file may be removed by its owner between our open and our flock: retry
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            previous = _read_owner(fd)
            kernel_locked = True
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise RunDirectoryInUse(_in_use_message(self.run_dir, previous)) from None
            except OSError as exc:
                if exc.errno not in _NO_LOCKS:
                    os.close(fd)
                    raise
                kernel_locked = False  # no locks on this file system: the owner's PID or heartbeat decides
            if _same_file(fd, self.path):
                break
            os.close(fd)
        if previous and self._alive(previous, kernel_locked):
            os.close(fd)  # kernel locks that do not reach the other node (nolock mounts), or none at all
            raise RunDirectoryInUse(_in_use_message(self.run_dir, previous))
        self.taken_over = previous or None
        self._fd = fd
        self._write_owner()
        self._thread = threading.Thread(target=self._beat, name="run-lock-heartbeat", daemon=True)
        self._thread.start()

    def release(self) -> None:
        if self._fd is None:
            return
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self.path.unlink()  # before unlocking: a waiting process then re-opens a fresh file
        os.close(self._fd)
        self._fd = None

    def _alive(self, owner: dict, kernel_locked: bool) -> bool:
        """Whether the process a lock file names still runs. On this host the kernel's lock, once
        taken, says it does not (a PID may have been reused since); without kernel locks, whether
        that PID exists. On another host, whether its heartbeat is recent (``nolock`` mounts)."""
        if owner.get("host") == socket.gethostname():
            return not kernel_locked and owner.get("pid") != os.getpid() and _pid_alive(owner.get("pid"))
        try:
            age = time.time() - self.path.stat().st_mtime
        except OSError:
            return False
        return age < self.stale_after_s

    def _write_owner(self) -> None:
        owner = {"pid": os.getpid(), "host": socket.gethostname(),
                 "started": datetime.now().astimezone().isoformat(timespec="seconds"),
                 "command": " ".join(sys.argv)}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, (json.dumps(owner) + "\n").encode(), 0)
        os.fsync(self._fd)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            with contextlib.suppress(OSError):
                os.utime(self.path)


def _read_owner(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0).decode() or "{}")
    except (OSError, ValueError):
        return {}


def _same_file(fd: int, path: Path) -> bool:
    try:
        return os.fstat(fd).st_ino == path.stat().st_ino
    except FileNotFoundError:
        return False


def _pid_alive(pid) -> bool:
    if not isinstance(pid, int) or pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by another user
        return True
    return True


def _in_use_message(run_dir: Path, owner: dict) -> str:
    who = describe_owner(owner) if owner else "another process"
    return (f"run directory {run_dir} is in use by {who}: wait for it to end or stop it, "
            "or start a separate run with another run_name")


def describe_owner(owner: dict) -> str:
    """'PID 123 on host, started <time>' for messages."""
    return f"PID {owner.get('pid', '?')} on {owner.get('host', '?')}, started {owner.get('started', '?')}"
