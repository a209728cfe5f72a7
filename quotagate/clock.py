"""The one injectable clock. Calendar logic (cycles, packs, promos, expiry) reads it.

In production the decision script uses the store's own clock (``StoreClock`` passes 0), so all
gateway instances agree whatever their clocks say; tests inject a ``ManualClock`` to run any
date without sleeping. QPS always uses the store's clock.
"""

from __future__ import annotations

import datetime as dt
import time
from typing import Protocol


class Clock(Protocol):
    def now_ms(self) -> int:
        """Epoch milliseconds, or 0 for "the store's clock"."""
        ...

    def wall_ms(self) -> int:
        """Epoch milliseconds as this process sees them (never 0)."""
        ...


class StoreClock:
    def now_ms(self) -> int:
        return 0

    def wall_ms(self) -> int:
        return int(time.time() * 1000)


class ManualClock:
    """A clock a test sets and moves."""

    def __init__(self, at: dt.datetime):
        self.set(at)

    def set(self, at: dt.datetime) -> None:
        if at.tzinfo is None:
            raise ValueError("ManualClock needs an aware datetime")
        self._ms = int(at.timestamp() * 1000)

    def advance(self, **delta: float) -> None:
        self._ms += int(dt.timedelta(**delta).total_seconds() * 1000)

    def now_ms(self) -> int:
        return self._ms

    def wall_ms(self) -> int:
        return self._ms
