"""Bandwidth shaping: an environment's response bytes, through every instance together, kept to
its gateway version's rate by delaying them, never by cutting them (SPEC §15).

The store keeps one timeline per environment (bandwidth.lua): a lease of B bytes is the slot
[start, start + B / rate) after the last slot anyone leased. Each instance leases slots for the
environments it is sending for, and sends inside them, paced: a piece of n bytes goes at the
pacer's cursor, which then moves n / rate on. Slots of different instances never overlap, so
together they send at most ``rate`` bytes a second, and while they all have bytes to send the
timeline has no gaps, so they send at the rate.

- **Store calls**: one per slot, not per chunk. A slot lasts ``lease_s`` (adaptive: 0.05 s to
  1 s, doubled while slots are used up, halved while they go mostly unused), so an instance
  with demand makes 1 to 20 calls a second per environment whatever the rate (measured: 12 per
  MB at 1 Mbps, 0.6 at 20 Mbps). The next slot is leased when half of the current one (and at
  least two round trips) is left, so sending does not wait for the store; a slot lasts at
  least four round trips, and one that came back late is no reason to lease shorter ones.
- **Pieces**: a chunk goes out in pieces of at most 10 ms of the rate (at least 1,024 bytes),
  each at its time, so a 1 s window never holds more than the rate plus about one piece.
  Pieces are booked at most 20 ms ahead of now, so an event loop that stalls (a busy core)
  sends at most 20 ms of the rate late and at once; a stall longer than that is time lost.
- **Under- and overshoot**: time in a slot that nothing was sent in is lost, not saved up (no
  burst after idling): with demand that stops and starts, the rate can only be lower. Unused
  time at the end of the last slot is given back when the last response of the environment
  on this instance ends, if nobody leased after it. A piece that starts at the end of a slot
  and runs past it is owed by the instance's next slot, which starts that much later (up to
  20 ms). Instance clocks do not matter:
  slot times are the store's, turned into this process's monotonic clock by the lease with
  the shortest round trip of the last 10 s (a reply read late does not shift the slots).
- **The store away**: fail-open, the instance paces alone at the rate a decision last told
  it, or that ``environments.yaml`` gives an environment it declares (the control plane sets
  those at start, on each reload and sync and every 30 s: an instance started while the store
  is away shapes them too); an API-owned environment no decision told a rate of here is not
  shaped (N instances may send up to N times the rate until the store is back); fail-closed,
  ``BandwidthUnavailable`` (the response is cut, as a request would be refused).
- **Realtime frames** go whole once their bytes' time has come, so a 1 s window can hold the
  rate plus one frame.
- **Store clocks**: an environment's slots all come from its node's clock, turned into each
  instance's by an offset kept per environment, so nodes of a cluster need not agree.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from quotagate.common import metrics
from quotagate.common.clock import STORE_TIME, ScriptTime, script_arg
from quotagate.limiter import keys
from quotagate.limiter.calls import ScriptCalls
from quotagate.limiter.errors import StoreError, StoreUnavailable, count_store_error
from quotagate.limiter.scripts import BANDWIDTH

LEASE_MIN_S, LEASE_START_S, LEASE_MAX_S = 0.05, 0.25, 1.0
PIECE_S = 0.01
HORIZON_S = 0.02
OFFSET_KEEP_S = 10.0
#: Beyond what two samples' round trips explain, a difference of offsets this large is the
#: store's clock stepping, not a reply read late (clock_offset).
STEP_SLACK_S = 0.005
MIN_PIECE = 1024


class BandwidthUnavailable(StoreUnavailable):
    """No slot could be leased and the failure policy is closed."""


@dataclass
class Slot:
    start: float  # this process's monotonic clock
    end: float
    #: The slot's end as the store wrote it (for a give-back); "" for a local slot.
    end_key: str
    used: float = 0.0  # seconds of it spent
    arrived: float = 0.0  # when its lease came back


class Pacer:
    """One environment's shaping on this instance, shared by all its responses here."""

    def __init__(self, owner: Bandwidth, env: str, rate: int):
        self.owner, self.env = owner, env
        self.set_rate(rate)
        self.slots: deque[Slot] = deque()
        self.cursor = 0.0
        self.lease_s = LEASE_START_S
        self.users = 0
        self.rtt = 0.0  # the last lease's round trip
        self._debt = 0.0
        self._lock = asyncio.Lock()
        self._fetch: asyncio.Task[None] | None = None

    def set_rate(self, rate: int) -> None:
        """The rate in force now (a decision told it, or the store at a lease): every
        response being sent follows it from its next piece; 0: not shaped any more."""
        self.rate = rate
        self.piece = max(MIN_PIECE, int(rate * PIECE_S)) if rate else 64 * 1024

    async def take(self, n: int) -> None:
        """Wait until ``n`` bytes (at most ``piece``) may go."""
        while True:
            if not self.rate:  # the version is no longer in force: sent as it comes
                return
            async with self._lock:
                at = await self._book(n)
            if at is not None:
                break
            # Pieces are booked at most HORIZON_S ahead (checked under the lock, so however
            # many responses wait): an event loop that stalls sends what was booked late, all
            # at once, and this bounds how much that can be.
            await asyncio.sleep(max(self.cursor - time.monotonic() - HORIZON_S, 0.001))
        delay = at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)

    async def _book(self, n: int) -> float | None:
        """Book ``n`` bytes; when they may go, or None if the bookings reach too far ahead."""
        while True:
            now = time.monotonic()
            if self.cursor - now > HORIZON_S:
                return None
            while self.slots and max(self.cursor, now) >= self.slots[0].end:
                done = self.slots.popleft()
                # A piece that ran past the slot's end is owed by the next slot.
                self._debt = max(0.0, min(self.cursor - done.end, PIECE_S * 2))
                self._spent(done)
            if not self.slots:
                await self._next_slot()
                if not self.rate:  # the lease said no version is in force any more
                    return time.monotonic()
                continue
            slot = self.slots[0]
            at = max(self.cursor, slot.start + self._debt, now)
            self._debt = 0.0
            step = n / self.rate
            self.cursor = at + step
            slot.used += step
            # The next slot is asked for in time: half a slot ahead, and at least two round
            # trips (a slow store must not leave us without one).
            if self._fetch is None and self._ahead(now) < max(self.lease_s / 2, 2 * self.rtt):
                self._start_fetch()
            return at

    def _ahead(self, now: float) -> float:
        """Leased time not spent yet."""
        from_ = max(self.cursor, now)
        return sum(s.end - max(s.start, from_) for s in self.slots if s.end > from_)

    def _spent(self, slot: Slot) -> None:
        """A slot is behind us: lease longer ones while they are used up, shorter while they
        go mostly unused. Only the part of a slot that was still ahead when its lease came
        back counts (a slow store is no lack of demand), and a slot lasts at least four round
        trips."""
        usable = slot.end - max(slot.start, slot.arrived)
        # One that came too late to be used is no reason to lease shorter ones.
        share = 1.0 if usable <= 0 else slot.used / usable
        if share > 0.9:
            self.lease_s = min(LEASE_MAX_S, self.lease_s * 2)
        elif share < 0.5:
            self.lease_s = max(LEASE_MIN_S, self.lease_s / 2)
        self.lease_s = min(LEASE_MAX_S, max(self.lease_s, 4 * self.rtt))

    def _start_fetch(self) -> asyncio.Task[None]:
        fetch = self._fetch = asyncio.get_running_loop().create_task(self._lease())
        # A prefetch nobody awaits may fail (fail-closed): the next take leases again and
        # raises then; this one's exception is only looked at. Shutdown waits for it.
        fetch.add_done_callback(lambda t: t.cancelled() or t.exception())
        self.owner.track(fetch)
        return fetch

    async def _next_slot(self) -> None:
        fetch = self._fetch or self._start_fetch()
        await asyncio.shield(fetch)

    async def _lease(self) -> None:
        try:
            if not self.rate:  # not shaped now: nothing to lease
                return
            want = max(self.piece, int(self.rate * self.lease_s))
            sent = time.monotonic()
            try:
                reply = await self.owner.calls.run(
                    BANDWIDTH, self.env, [keys.bandwidth(self.env), keys.entitlements(self.env)],
                    [self.rate, want, "", self.owner.mode(), script_arg(self.owner.script_time())])
            except StoreError as exc:
                count_store_error(exc)
                if self.owner.policy() == "closed":
                    raise BandwidthUnavailable(f"no bandwidth lease: {exc}") from exc
                metrics.BANDWIDTH_LEASES.labels("local").inc()
                now = time.monotonic()  # alone at the rate until the store is back
                start = max(now, self.slots[-1].end if self.slots else now)
                self.slots.append(Slot(start, start + want / self.rate, "", arrived=now))
                return
            back = time.monotonic()
            self.rtt = back - sent
            start_us, end_us, now_us, rate = (int(x) for x in reply)
            if rate != self.rate:  # a version changed, expired or renewed: from now on
                self.owner.rate_changed(self, rate)
            if not rate:
                return
            offset = self.owner.clock_offset(self.env, now_us / 1e6, sent, back)
            metrics.BANDWIDTH_LEASES.labels("leased").inc()
            slot = Slot(start_us / 1e6 - offset, end_us / 1e6 - offset,
                        reply[1].decode() if isinstance(reply[1], bytes) else str(reply[1]),
                        arrived=back)
            self.slots.append(slot)
            if self.users == 0:  # the last response ended while this was on its way
                self.give_back()
        finally:
            self._fetch = None
            if self.users == 0:
                self.owner.forget(self)

    def give_back(self) -> None:
        """Nobody here sends for this environment now: what is left of the last slot goes
        back to the timeline (if nobody leased after it); the rest is let go."""
        if not self.slots:
            return
        last = self.slots[-1]
        now = time.monotonic()
        unused = last.end - max(last.start, self.cursor, now)
        self.slots.clear()
        if last.end_key and unused > 0:
            amount = int(unused * self.rate)
            if amount > 0:
                self.owner.give_back(self.env, self.rate, amount, last.end_key)


class Bandwidth:
    """The pacers of this instance, by environment and rate."""

    def __init__(self, calls: ScriptCalls, on_failure: Callable[[], str] = lambda: "open",
                 mode: Callable[[], str] = lambda: "enforce",
                 script_time: Callable[[], ScriptTime] = lambda: STORE_TIME):
        self.calls = calls
        #: The failure policy now ("open" / "closed"; it may change at a reload).
        self.policy = on_failure
        #: The instance's enforcement mode and the time the scripts are told (the limiter's):
        #: a lease reads the rate in force from the environment's snapshot, as a decision does.
        self.mode = mode
        self.script_time = script_time
        #: One pacer per environment, shared by all its responses here, at the rate in force.
        self.pacers: dict[str, Pacer] = {}
        #: Each environment's rate (used while the store is away): the last a decision told,
        #: or what environments.yaml gives one it declares (control/runtime.py).
        self.rates: dict[str, int] = {}
        #: Per environment (its slots come from one store node, whose clock this is): the
        #: store's clock minus this process's monotonic one (seconds), from the lease with the
        #: shortest round trip lately, with that round trip and when it was taken.
        self._offsets: dict[str, tuple[float, float, float]] = {}
        self._background: set[asyncio.Task[None]] = set()

    def clock_offset(self, env: str, store_now: float, sent: float, back: float) -> float:
        """Slots are in the store's time; sending is in ours. A reply read late (a busy
        event loop) would shift a slot by the delay, so the sample with the shortest round
        trip of the last OFFSET_KEEP_S wins (the two clocks run at the same pace) — unless
        the store's clock stepped (NTP, a failover to a node whose clock differs): a sample
        further from the kept one than both round trips can explain (each is off by at most
        half its own) replaces it at once, so a step costs at most the slot in flight."""
        rtt = back - sent
        sample = store_now - (sent + back) / 2
        best = self._offsets.get(env)
        if (best is None or rtt <= best[1] or back - best[2] > OFFSET_KEEP_S
                or abs(sample - best[0]) > (rtt + best[1]) / 2 + STEP_SLACK_S):
            self._offsets[env] = best = (sample, rtt, back)
        return best[0]

    def rate_of(self, env: str, told: int, bypassed: bool) -> int:
        """The rate to shape ``env`` at: the decision's; a bypassed one (the store away)
        knows none, so the last one known (told, or declared by the file)."""
        if bypassed:
            return self.rates.get(env, 0)
        if told:
            self.rates[env] = told
        else:
            self.rates.pop(env, None)
        return told

    def rate_changed(self, pacer: Pacer, rate: int) -> None:
        """The store leased at another rate than the pacer's (or none): a change reached it."""
        pacer.set_rate(rate)
        if rate:
            self.rates[pacer.env] = rate
        else:
            self.rates.pop(pacer.env, None)

    @contextlib.asynccontextmanager
    async def shaping(self, env: str, rate: int) -> AsyncIterator[Pacer]:
        """The environment's pacer, at ``rate`` (what a decision just told: every response
        of the environment here follows it)."""
        pacer = self.pacers.get(env)
        if pacer is None:
            pacer = self.pacers[env] = Pacer(self, env, rate)
        elif pacer.rate != rate:
            pacer.set_rate(rate)
        pacer.users += 1
        try:
            yield pacer
        finally:
            pacer.users -= 1
            if pacer.users == 0:
                pacer.give_back()
                if pacer._fetch is None:
                    self.forget(pacer)

    def forget(self, pacer: Pacer) -> None:
        if self.pacers.get(pacer.env) is pacer:
            del self.pacers[pacer.env]

    def give_back(self, env: str, rate: int, amount: int, end_key: str) -> None:
        async def send() -> None:
            try:
                given = await self.calls.run(BANDWIDTH, env, [keys.bandwidth(env)],
                                             [rate, -amount, end_key])
            except StoreError as exc:
                count_store_error(exc)
                return
            if given == 1:
                metrics.BANDWIDTH_LEASES.labels("given_back").inc()

        self.track(asyncio.get_running_loop().create_task(send()))

    def track(self, task: asyncio.Task[None]) -> None:
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def close(self) -> None:
        """Wait for leases on their way and then for the give-backs they start."""
        while self._background:
            await asyncio.gather(*self._background, return_exceptions=True)


async def wait_for(pacer: Pacer, n: int) -> None:
    """Until ``n`` bytes may have gone, piece by piece (for a frame sent whole after)."""
    piece, left = pacer.piece, n
    while left > 0:
        part = min(left, piece)
        await pacer.take(part)
        left -= part
    metrics.BANDWIDTH_BYTES.inc(n)


async def send_shaped(pacer: Pacer, data: bytes,
                      write: Callable[[bytes | memoryview], Awaitable[object]]) -> None:
    """``data`` through ``pacer``, piece by piece, each written with ``await write(piece)``
    (a view of ``data``: nothing is copied)."""
    piece = pacer.piece
    view = memoryview(data)
    for i in range(0, len(data), piece):
        part = view[i:i + piece]
        await pacer.take(len(part))
        await write(part)
    metrics.BANDWIDTH_BYTES.inc(len(data))
