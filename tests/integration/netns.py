"""A network namespace of the test's own: created with `ip netns add`, entered by this thread
(setns, so subprocesses started from the test inherit it), left and deleted afterwards. All traffic
of a test in it stays in it."""

from __future__ import annotations

import ctypes
import itertools
import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()


def _setns(fd: int) -> None:
    if _libc.setns(fd, CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, os.strerror(errno))


def ip(*args: str) -> None:
    subprocess.run(["ip", *args], check=True, capture_output=True, timeout=20)


@contextmanager
def inside_new_netns() -> Iterator[str]:
    """Enter a fresh namespace with lo up; yields its name."""
    name = f"st-{os.getpid()}-{next(_counter)}"
    ip("netns", "add", name)
    original = os.open("/proc/self/ns/net", os.O_RDONLY)
    try:
        target = os.open(f"/run/netns/{name}", os.O_RDONLY)
        try:
            _setns(target)
        finally:
            os.close(target)
        ip("link", "set", "lo", "up")
        yield name
    finally:
        _setns(original)
        os.close(original)
        subprocess.run(["ip", "netns", "delete", name], capture_output=True, timeout=20)
