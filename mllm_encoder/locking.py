"""Exclusive locks on a run directory or an output file: one writer at a time, the holder named.

A lock is a file created atomically (``O_CREAT | O_EXCL``, which also holds on NFS) holding JSON with the
holder's pid, host, process start time and command line. A second writer is refused with a ``LockError``
naming the holder. A lock whose holder is gone (same host, pid not running, or the pid reused by another
process) is stale and taken over; a lock held on another host is never broken automatically: the message
says which file to delete once that process is known to be gone.

``filelock`` is not used: its ``FileLock`` (``flock``) records no holder, so a refusal cannot name it, and
``flock`` is unreliable on some cluster file systems; its ``SoftFileLock`` detects stale locks only in
recent versions, and its timeout message does not name the holder either.
"""

import contextlib
import json
import logging
import os
import secrets
import socket
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterator, Optional

from mllm_encoder.atomic import PathLike, pid_alive

logger = logging.getLogger(__name__)

DIRECTORY_LOCK_NAME = ".lock"
TAKEOVER_TIMEOUT_S = 30.0  # a takeover marker older than this was left by a killed process


class LockError(RuntimeError):
    """Another process holds the lock (the message names it and the lock file)."""


@dataclass(frozen=True)
class LockHolder:
    """Who holds a lock: what the lock file records."""

    pid: int
    host: str
    started: Optional[str]
    command: str
    token: str

    def describe(self) -> str:
        return f"pid {self.pid} on host {self.host} ({self.command!r})"


def _process_start(pid: int) -> Optional[str]:
    """The start time of a process in clock ticks since boot (Linux), to tell a reused pid apart."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as handle:
            return handle.read().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _this_holder() -> LockHolder:
    command = " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]) if sys.argv and sys.argv[0] else "python"
    pid = os.getpid()
    return LockHolder(pid, socket.gethostname(), _process_start(pid), command[:200], secrets.token_hex(8))


def _read_holder(path: Path) -> Optional[LockHolder]:
    """The holder recorded in ``path``; None when the file is gone, being written or not ours."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        return LockHolder(**{key: data[key] for key in ("pid", "host", "started", "command", "token")})
    except (OSError, ValueError, KeyError, TypeError):  # gone, being written, or not a lock of ours
        return None


def is_stale(holder: LockHolder) -> bool:
    """Whether ``holder`` is a process of this host that no longer runs (or whose pid was reused)."""
    if holder.host != socket.gethostname():
        return False
    if not pid_alive(holder.pid):
        return True
    current = _process_start(holder.pid)
    return holder.started is not None and current is not None and current != holder.started


class ExclusiveLock:
    """An exclusive lock held through the file ``lock_path``; ``what`` names the protected thing in errors.

    Use as a context manager, or :meth:`acquire` / :meth:`release`. Not re-entrant.
    """

    def __init__(self, lock_path: PathLike, what: str) -> None:
        self.path, self.what = Path(lock_path), what
        self.holder: Optional[LockHolder] = None

    def acquire(self) -> "ExclusiveLock":
        """Take the lock, taking over a stale one; raise ``LockError`` naming a live holder."""
        assert self.holder is None, f"{self.path}: acquired twice"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        me = _this_holder()
        for _ in range(100):
            try:
                handle = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = _read_holder(self.path)
                if holder is None:
                    self._remove_unreadable()
                elif is_stale(holder):
                    self._take_over(holder)
                else:
                    raise LockError(
                        f"{self.what} is in use by {holder.describe()} (lock file {self.path}); wait for it to "
                        f"finish, or delete {self.path} if that process is gone"
                    ) from None
                continue
            with os.fdopen(handle, "w", encoding="utf-8") as stream:
                json.dump(asdict(me), stream)
                stream.flush()
                os.fsync(stream.fileno())
            self.holder = me
            return self
        raise LockError(f"{self.what}: could not take the lock {self.path} (it keeps changing hands)")

    def _remove_unreadable(self) -> None:
        """A lock file without a readable holder: being written right now, or left half-written by a kill."""
        try:
            age = time.time() - self.path.stat().st_mtime
        except FileNotFoundError:
            return
        if age < TAKEOVER_TIMEOUT_S:
            time.sleep(0.05)
            return
        logger.warning("%s: removing a lock file without a readable holder (%.0f s old)", self.path, age)
        self._take_over(None)

    def _take_over(self, stale: Optional[LockHolder]) -> None:
        """Remove the lock file if it still records ``stale``; one process at a time (a takeover marker)."""
        marker = self.path.with_name(self.path.name + ".takeover")
        try:
            os.close(os.open(marker, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666))
        except FileExistsError:
            with contextlib.suppress(FileNotFoundError):
                if time.time() - marker.stat().st_mtime > TAKEOVER_TIMEOUT_S:
                    marker.unlink()
            time.sleep(0.05)
            return
        try:
            if _read_holder(self.path) == stale:
                if stale is not None:
                    logger.warning("%s: taking over the stale lock of %s", self.path, stale.describe())
                self.path.unlink(missing_ok=True)
        finally:
            marker.unlink(missing_ok=True)

    def release(self) -> None:
        """Release the lock (the file is removed only while it still records this holder)."""
        if self.holder is None:
            return
        if _read_holder(self.path) == self.holder:
            self.path.unlink(missing_ok=True)
        else:
            logger.warning("%s: the lock was taken from this process before it was released", self.path)
        self.holder = None

    def __enter__(self) -> "ExclusiveLock":
        return self.acquire()

    def __exit__(self, *exc_info) -> None:
        self.release()


def directory_lock(directory: PathLike, what: str = "run directory") -> ExclusiveLock:
    """The lock of a directory (``DIR/.lock``)."""
    directory = Path(directory)
    return ExclusiveLock(directory / DIRECTORY_LOCK_NAME, f"{what} {directory}")


def file_lock(path: PathLike, what: str = "file") -> ExclusiveLock:
    """The lock of a file (``FILE.lock`` beside it)."""
    path = Path(path)
    return ExclusiveLock(path.with_name(path.name + ".lock"), f"{what} {path}")


@contextlib.contextmanager
def hold(lock: ExclusiveLock, enabled: bool = True) -> Iterator[Optional[ExclusiveLock]]:
    """Hold ``lock`` for the block when ``enabled`` (e.g. only on the main process of a multi-process run)."""
    if not enabled:
        yield None
        return
    with lock:
        yield lock
