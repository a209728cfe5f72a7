"""The one notion of now (SPEC §14), and the injectable clock tests replace it with.

In production every instance and every part of it — decisions, settle, leases, control plane,
lifecycle, ingestion, bills, usage reports — runs on **the store's clock** (its ``TIME``), so
gateway instances and the control plane agree whatever the hosts' clocks say:

- a script is passed ``STORE_TIME`` and reads ``TIME`` itself, exactly, inside the atomic call;
- everything else reads ``now_ms()``: the store's ``TIME`` as last sampled (``sync``, every
  ``SYNC_INTERVAL_S``, lowest round trip of a few samples), carried forward by this process's
  monotonic clock. Until the first sample (store unreachable at start) it is the wall clock,
  and ``synced`` says so (``/readyz`` is not ready until then).

``STORE_TIME`` is not a number: "ask the store" can never be read as a timestamp (the bug
this replaces: a clock that returned 0 for "the store's", which the control plane took for
1970-01-01). Tests inject a ``ManualClock`` to run any date without sleeping.
"""

from __future__ import annotations

import datetime as dt
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Final, Protocol, final

log = logging.getLogger("quotagate.clock")

#: How often a serving process samples the store's TIME again (clock drift is ppm: this only
#: follows a store whose clock was stepped, or a failover to a host with another clock).
SYNC_INTERVAL_S = 30.0
#: Samples per sync; the one with the shortest round trip is kept.
SYNC_SAMPLES = 3


@final
class StoreTime:
    """The store's own clock, read by the script inside its atomic call. Not a timestamp: it
    has no value to do arithmetic or dates with."""

    __slots__ = ()

    def __repr__(self) -> str:
        return "STORE_TIME"


STORE_TIME: Final = StoreTime()

#: What a script is told the time is: an instant (epoch ms, tests and write-back of usage that
#: passed while the store was down) or STORE_TIME.
ScriptTime = int | StoreTime


def script_arg(at: ScriptTime) -> str:
    """ARGV form of a script time: epoch ms, or "0" (the scripts read TIME themselves)."""
    if isinstance(at, StoreTime):
        return "0"
    if at <= 0:
        raise ValueError(f"not an instant: {at}")
    return str(at)


class Clock(Protocol):
    def now_ms(self) -> int:
        """Epoch milliseconds now: a real instant, always."""
        ...

    def script_time(self) -> ScriptTime:
        """What a decision / settle / renew script is told the time is."""
        ...


class StoreClock:
    """Production: the store's TIME (see the module doc)."""

    def __init__(self, monotonic: Callable[[], float] = time.monotonic,
                 wall: Callable[[], float] = time.time):
        self._monotonic = monotonic
        self._wall = wall
        #: store epoch ms minus this process's monotonic ms, from the best last sample
        self._offset_ms: float | None = None
        #: host wall clock minus the store's, at the last sample (a metric)
        self.skew_ms = 0.0

    @property
    def synced(self) -> bool:
        return self._offset_ms is not None

    def script_time(self) -> ScriptTime:
        return STORE_TIME

    def now_ms(self) -> int:
        if self._offset_ms is None:
            return int(self._wall() * 1000)
        return int(self._monotonic() * 1000 + self._offset_ms)

    def observe(self, store_ms: int, sent: float, received: float) -> None:
        """One sample: the store said ``store_ms`` between monotonic ``sent`` and
        ``received`` (seconds); it is taken to have said it half-way."""
        self._offset_ms = store_ms - (sent + received) / 2 * 1000
        self.skew_ms = self._wall() * 1000 - self.now_ms()

    async def sync(self, store_time: Callable[[], Awaitable[tuple[int, int]]]) -> None:
        """Sample the store's clock; ``store_time`` returns its ``TIME`` reply
        (seconds, microseconds). Raises what ``store_time`` raises."""
        best: tuple[float, int, float, float] | None = None
        for _ in range(SYNC_SAMPLES):
            sent = self._monotonic()
            seconds, micros = await store_time()
            received = self._monotonic()
            sample = (received - sent, seconds * 1000 + micros // 1000, sent, received)
            if best is None or sample[0] < best[0]:
                best = sample
        assert best is not None
        first = not self.synced
        self.observe(best[1], best[2], best[3])
        if first or abs(self.skew_ms) > 1000:
            log.log(logging.WARNING if abs(self.skew_ms) > 1000 else logging.INFO,
                    "store clock sampled: this host's clock is %+.0f ms from the store's "
                    "(dates follow the store's)", self.skew_ms)


class ManualClock:
    """A clock a test sets and moves. Scripts are told its time too (no store clock)."""

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

    def script_time(self) -> ScriptTime:
        return self._ms
