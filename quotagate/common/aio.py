"""Background loops and cancellation."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")


def cancelling() -> bool:
    """Whether the running task was asked to stop. A loop that catches broad exceptions checks
    it in its handler: a library may turn the CancelledError it was interrupted with into an
    error of its own (a redis connection error, say), and a loop that logged that and went on
    would never stop — nor let a shutdown finish."""
    task = asyncio.current_task()
    return task is not None and task.cancelling() > 0


def stop_if_cancelling(exc: BaseException | None = None) -> None:
    """Re-raise a cancellation that was lost on the way: one ``exc`` hid (call it first in a
    broad ``except``), or, with no argument (at the top of a background loop's round), one a
    library swallowed. On Python 3.11 ``asyncio.wait_for`` returns the result of an awaitable
    that finished as the cancel came (CPython gh-86296, fixed in 3.12), and redis-py wraps
    each socket write in it: a loop whose stop was asked during a store call would carry on,
    and a shutdown would wait out its interval."""
    if cancelling():
        raise asyncio.CancelledError() from exc


async def pause(seconds: float) -> None:
    """``asyncio.sleep`` for a background loop: it does not start when the task was asked to
    stop (see ``stop_if_cancelling``)."""
    stop_if_cancelling()
    await asyncio.sleep(seconds)


#: While CPU-bound work runs in a thread beside the event loop, the interpreter lock changes
#: hands this often (seconds); Python's default is 5 ms.
THREAD_SWITCH_INTERVAL_S = 0.0005
_threads_running = 0
_switch_interval_before = 0.0


async def off_loop(fn: Callable[..., T], *args: Any) -> T:
    """``fn(*args)`` in a thread (CPU-bound work: a big config file parsed, 10^5 snapshots
    built), the event loop answering requests meanwhile.

    A thread alone is not enough: each time the loop's thread gives the interpreter lock up
    for a system call (every socket read and write), the other thread takes it for up to the
    switch interval, so a loop round of ten calls waits ~50 ms (measured: blocks of 20-53 ms
    over a whole reload of 10^5 environments). While any such thread runs, the interval is
    0.5 ms: the loop gets the lock back ten times sooner (no block of 20 ms logged)."""
    global _threads_running, _switch_interval_before
    if _threads_running == 0:
        _switch_interval_before = sys.getswitchinterval()
        sys.setswitchinterval(min(_switch_interval_before, THREAD_SWITCH_INTERVAL_S))
    _threads_running += 1
    try:
        return await asyncio.to_thread(fn, *args)
    finally:
        _threads_running -= 1
        if _threads_running == 0:
            sys.setswitchinterval(_switch_interval_before)
