"""One run per run directory (flowgen/cli/run_lock.py): refused while held, taken over when its owner is gone."""

from __future__ import annotations

import errno
import fcntl
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from flowgen.cli import run_lock
from flowgen.cli.run_lock import LOCK_FILE, RunDirectoryInUse, RunLock

REPO = Path(__file__).resolve().parents[1]


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _write_owner(run_dir, **owner):
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / LOCK_FILE).write_text(json.dumps({"started": "2026-01-01T00:00:00+00:00", **owner}) + "\n")


def test_a_held_lock_refuses_a_second_owner_naming_the_first(tmp_path):
    with RunLock(tmp_path / "run") as first:
        owner = json.loads((tmp_path / "run" / LOCK_FILE).read_text())
        assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
        with pytest.raises(RunDirectoryInUse) as refused:
            RunLock(tmp_path / "run").acquire()
        message = str(refused.value)
        assert f"PID {os.getpid()} on {socket.gethostname()}, started {owner['started']}" in message
        assert "\n" not in message and first.taken_over is None
    assert not (tmp_path / "run" / LOCK_FILE).exists()  # released: the file goes with it
    with RunLock(tmp_path / "run"):
        pass


def test_a_lock_held_by_another_process_is_refused_until_it_ends(tmp_path):
    # the module alone (not the flowgen.cli package, which imports torch): the holder starts in a blink
    holder = subprocess.Popen([sys.executable, "-c", (
        "import importlib.util, time; "
        f"spec = importlib.util.spec_from_file_location('run_lock', {run_lock.__file__!r}); "
        "module = importlib.util.module_from_spec(spec); spec.loader.exec_module(module); "
        f"module.RunLock({str(tmp_path / 'run')!r}).acquire(); print('held', flush=True); time.sleep(60)")],
        stdout=subprocess.PIPE, text=True, cwd=REPO)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirectoryInUse, match=f"PID {holder.pid} on"):
            RunLock(tmp_path / "run").acquire()
    finally:
        holder.kill()  # like kill -9: no clean-up runs, the lock file stays behind
        holder.wait()
    assert (tmp_path / "run" / LOCK_FILE).exists()
    lock = RunLock(tmp_path / "run")
    lock.acquire()  # the kernel dropped the dead process's lock
    assert lock.taken_over["pid"] == holder.pid
    lock.release()


def test_a_lock_file_of_another_host_with_a_fresh_heartbeat_is_respected(tmp_path):
    # a nolock NFS mount: the kernel lock succeeds on this node although the owner runs on another one
    _write_owner(tmp_path / "run", pid=123, host="other-node")
    with pytest.raises(RunDirectoryInUse, match="PID 123 on other-node"):
        RunLock(tmp_path / "run").acquire()
    stale = time.time() - 3600
    os.utime(tmp_path / "run" / LOCK_FILE, (stale, stale))  # no heartbeat for an hour: the node died
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    assert lock.taken_over["host"] == "other-node"
    lock.release()


def test_the_heartbeat_keeps_the_lock_file_fresh(tmp_path):
    with RunLock(tmp_path / "run", heartbeat_s=0.05):
        path = tmp_path / "run" / LOCK_FILE
        old = time.time() - 3600
        os.utime(path, (old, old))
        time.sleep(0.3)
        assert time.time() - path.stat().st_mtime < 5


@pytest.fixture
def no_kernel_locks(monkeypatch):
    """A file system without flock (Lustre without -o flock, some NFS set-ups): ENOLCK."""
    def refuse(fd, operation):
        raise OSError(errno.ENOLCK, "No locks available")
    monkeypatch.setattr(fcntl, "flock", refuse)


def test_without_kernel_locks_a_live_owner_on_this_host_is_respected(tmp_path, no_kernel_locks):
    _write_owner(tmp_path / "run", pid=os.getppid(), host=socket.gethostname())
    with pytest.raises(RunDirectoryInUse, match=f"PID {os.getppid()}"):
        RunLock(tmp_path / "run").acquire()


def test_without_kernel_locks_a_dead_owner_on_this_host_is_taken_over(tmp_path, no_kernel_locks):
    pid = _dead_pid()
    _write_owner(tmp_path / "run", pid=pid, host=socket.gethostname())
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    assert lock.taken_over["pid"] == pid
    assert json.loads((tmp_path / "run" / LOCK_FILE).read_text())["pid"] == os.getpid()
    lock.release()


def test_with_kernel_locks_a_reused_pid_does_not_keep_a_dead_run_locked(tmp_path):
    # the previous owner died; its PID now belongs to an unrelated live process (here: our parent)
    _write_owner(tmp_path / "run", pid=os.getppid(), host=socket.gethostname())
    lock = RunLock(tmp_path / "run")
    lock.acquire()
    assert lock.taken_over["pid"] == os.getppid()
    lock.release()
