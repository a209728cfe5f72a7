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


def stop_if_cancelling(exc: BaseException) -> None:
    """Re-raise the cancellation ``exc`` hid (call it first in a broad ``except``)."""
    if cancelling():
        raise asyncio.CancelledError() from exc
