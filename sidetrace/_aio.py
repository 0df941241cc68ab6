"""asyncio waits that never swallow a cancellation.

``asyncio.wait_for`` before Python 3.12 loses a cancellation that lands in the same tick as the
awaited thing completing (the caller carries on as if never cancelled), which made reloads and
shutdowns hang on Python 3.10 and 3.11. These helpers are built on ``asyncio.wait``, which always
lets the caller's cancellation through, and are what the agent uses instead.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def within(awaitable: Awaitable[T], timeout: float) -> T:
    """Await ``awaitable`` for at most ``timeout`` seconds; raise TimeoutError (after cancelling it) past that."""
    task = asyncio.ensure_future(awaitable)
    try:
        done, _ = await asyncio.wait({task}, timeout=max(0.0, timeout))
    except asyncio.CancelledError:
        task.cancel()
        raise
    if not done:
        task.cancel()
        await asyncio.wait({task})
        raise TimeoutError(f"not done within {timeout:g} s")
    return task.result()


async def wait_event(event: asyncio.Event, timeout: float) -> bool:
    """Wait until ``event`` is set or ``timeout`` passes; return whether it is set."""
    if event.is_set():
        return True
    waiter = asyncio.ensure_future(event.wait())
    try:
        await asyncio.wait({waiter}, timeout=max(0.0, timeout))
    finally:
        waiter.cancel()
    return event.is_set()


async def finish(task: asyncio.Task, timeout: float) -> bool:
    """Cancel ``task`` and wait up to ``timeout`` seconds for it to end; return whether it ended.

    The cancellation is repeated while the task runs, so a task that swallowed one (in a library's
    ``wait_for``, say) is still stopped.
    """
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not task.done():
        task.cancel()
        remaining = deadline - loop.time()
        if remaining <= 0:
            return False
        await asyncio.wait({task}, timeout=min(0.1, remaining))
    return True
