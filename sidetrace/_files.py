"""The agent's state directory: created private, and owned by one agent at a time."""

from __future__ import annotations

import contextlib
import fcntl
import os
from pathlib import Path

LOCK_FILE = "sidetrace.lock"


def make_private_dirs(path: Path) -> None:
    """Create ``path`` and every missing parent with mode 0700 (``Path.mkdir(parents=True)`` gives parents 0777
    less the umask). Directories that already exist are left as they are."""
    missing = []
    for directory in (path, *path.parents):
        if directory.is_dir():
            break
        missing.append(directory)
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=0o700)
        os.chmod(directory, 0o700)  # mkdir's mode is filtered by the umask


class DataDirInUse(Exception):
    """Another agent holds the state directory's lock."""


def in_use_message(directory: Path, holder: str) -> str:
    """The one line that says ``directory`` is held by the agent of pid ``holder`` (run and check-config)."""
    return f"{directory} is in use by another sidetrace agent (pid {holder}); give each agent its own agent.data_dir"


class DataDirLock:
    """An exclusive ``flock`` on ``<data_dir>/sidetrace.lock``, holding the owner's pid.

    Two agents on one data_dir would interleave writes to the same spool; the second one is refused
    at start with the first one's pid. The kernel drops the lock when the process dies, so a killed
    agent never leaves a stale lock behind.
    """

    def __init__(self, directory: Path) -> None:
        self.path = directory / LOCK_FILE
        self._fd: int | None = None

    def acquire(self) -> None:
        """Take the lock; raise DataDirInUse naming the holder, or OSError when the file cannot be opened."""
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise DataDirInUse(in_use_message(self.path.parent, holder)) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd

    def holder(self) -> str | None:
        """The pid (as text) of the agent holding the lock, or None when none does; takes and drops a shared lock
        for a moment, so the check itself leaves nothing behind (and never creates the lock file)."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
        except OSError:
            return None  # no lock file: no agent has run here (one that holds the lock has the file open)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        finally:
            os.close(fd)  # drops the shared lock, when taken
        return None

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
