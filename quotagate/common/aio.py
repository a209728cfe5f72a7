"""Background loops and cancellation."""

from __future__ import annotations

import asyncio


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
