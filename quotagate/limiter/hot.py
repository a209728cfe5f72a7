"""Hot environments: decided in memory from budgets leased from the store (lease.lua).

An environment this instance sees more than ``HOT_RATE`` requests a second of (or that the store
says others lease: decide.lua's flag ``Flag.HOT``) is leased: one store call every
``PERIOD_S`` commits what was admitted under the lease and takes the next period's budget —

- a **share of the environment's QPS**, fair (max-min) over the instances that lease it:
  requests are admitted here by a GCRA at that share (``LOCAL_BURST_S`` of tolerance), so the
  instances together stay within the limit (per-request decisions get what the shares leave);
- **calls held** through the waterfall (plan -> packs; pay-as-you-go with overage on): admitted
  here until this instance's count reaches what was granted. With a hard stop at most half of
  what is free is held, split over the leases, and near the end none: then every request is
  decided by the store, exactly, as for a cold environment.

Requests that take a concurrency slot, SMS, requests passing while isolated and requests whose
needed meter the last lease found used up are always decided by the store; so is anything while
no lease is valid (being taken, ended, the store away: then the failure policy applies). A
request the share has no room for goes to the store (which decides it against what the shares
leave) unless the lease was capped — the environment is at its QPS — and is then refused here.

What was admitted is counted in this process's lease journal (``LeaseJournal``): a memory-mapped
file, written on every admission (a store to memory, no system call), which survives the
process being killed; a gateway that starts claims the journals of stopped ones and tells the
store what their leases admitted (``recover``), once. A lease whose instance went silent is
charged whole by the store when it ends (nothing over-admitted), and what it did not use is
given back when its journal is read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import mmap
import os
import struct
import time
from collections.abc import Callable
from pathlib import Path

from quotagate.common import metrics
from quotagate.common.clock import ScriptTime, script_arg
from quotagate.common.envids import ENV_ID
from quotagate.limiter import keys
from quotagate.limiter.calls import ScriptCalls
from quotagate.limiter.codes import Flag, Outcome
from quotagate.limiter.decision import Decision
from quotagate.limiter.errors import StoreError, count_store_error
from quotagate.limiter.scripts import LEASE

log = logging.getLogger("quotagate.limiter")

#: Requests a second, on this instance, from which an environment is leased (two periods in a
#: row; ``gateway.hot_rate``).
HOT_RATE = 2_000
#: How often a lease is renewed (and demand measured); a lease holds LEASE_MS without one.
PERIOD_S = 0.1
LEASE_MS = 500
#: GCRA tolerance of the local share: requests arriving together up to this much ahead.
LOCAL_BURST_S = 0.01
#: The share asked for: demand times this (room to grow before the next renewal), at least
#: MIN_WANT requests/s; calls asked for: the share for this long.
HEADROOM = 1.25
MIN_WANT = 50.0
CALLS_FOR_S = 2 * PERIOD_S
MIN_CALLS = 64
#: Periods with demand below a quarter of HOT_RATE before a lease is ended.
IDLE_PERIODS = 10
#: After the store said "not leasable" (a boundary, the quota near its end, shadow mode):
#: decided per request for this long before asking again.
COOL_S = 0.2
#: lease.lua's flag: plan and packs used up, no calls granted.
SPENT = 32
#: Kinds a database promo makes free (decide.lua).
_FREE_KINDS = frozenset({"database", "realtime"})

# ------------------------------------------------------------------------------ journal

#: One record: state (1 live), the count admitted, the lease's id, the env id's length, the id.
_RECORD = struct.Struct("<BQQB64s")
_USED = struct.Struct("<Q")
RECORDS = 4096
SUFFIX = ".leases"


class LeaseJournal:
    """What this process admitted under each of its leases, in a memory-mapped file (or in
    memory only, when the gateway keeps no journal): a record per lease, its count written on
    every admission."""

    def __init__(self, path: Path | None = None):
        self.path = path
        size = _RECORD.size * RECORDS
        if path is None:
            self._map = mmap.mmap(-1, size)
        else:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
            try:
                os.ftruncate(fd, size)
                self._map = mmap.mmap(fd, size)
            finally:
                os.close(fd)
        self._free = list(range(RECORDS - 1, -1, -1))

    def open(self, env: str, lease_id: int) -> int:
        """A record for a new lease (its offset); -1 when all are taken (then the lease is
        not taken: the environment is decided per request)."""
        if not self._free:
            return -1
        at = self._free.pop() * _RECORD.size
        _RECORD.pack_into(self._map, at, 1, 0, lease_id, len(env), env.encode())
        return at

    def close_record(self, at: int) -> None:
        self._map[at] = 0
        self._free.append(at // _RECORD.size)

    def close(self, remove: bool = False) -> None:
        with contextlib.suppress(ValueError, BufferError):
            self._map.close()
        if remove and self.path is not None:
            self.path.unlink(missing_ok=True)


def read_journal(path: Path) -> list[tuple[str, int, int]]:
    """The live records of a lease journal: (env, lease id, count admitted). Records that are
    not well formed (a torn file, a hand's edit) are skipped and logged."""
    data = path.read_bytes()
    found = []
    for at in range(0, len(data) - _RECORD.size + 1, _RECORD.size):
        state, used, lease_id, n, raw = _RECORD.unpack_from(data, at)
        if state != 1:
            continue
        env = raw[:n].decode("ascii", "replace")
        if n > 64 or not ENV_ID.fullmatch(env) or used >= 2 ** 53:
            log.error("lease journal %s: record %d is not well formed: skipped", path.name,
                      at // _RECORD.size)
            continue
        found.append((env, lease_id, used))
    return found


async def recover(calls: ScriptCalls, path: Path, instance: str) -> int:
    """Tell the store what a stopped instance's leases admitted (lease.lua "recover"): each
    lease's count is charged, once, and what it held beyond is given back. Returns the leases
    told. Raises StoreError when the store cannot take them (the file is then kept)."""
    told = 0
    for env, lease_id, used in read_journal(path):
        await calls.run(LEASE, env, keys.decision_keys(env),
                        [0, instance, "recover", lease_id, used])
        told += 1
    return told


# ------------------------------------------------------------------------------ leases


class HotEnv:
    """This instance's lease of one environment, and its local GCRA."""

    __slots__ = (
        "asked",
        "bandwidth",
        "capped",
        "db_free",
        "demand",
        "ending",
        "env",
        "first_rate",
        "granted",
        "idle",
        "interval",
        "lease_id",
        "leased",
        "map",
        "needs",
        "qps_by",
        "qps_limit",
        "quota",
        "record",
        "remaining",
        "reset_at",
        "sent",
        "share",
        "since_ms",
        "spent",
        "task",
        "tat",
        "used",
        "used_up",
        "valid_until",
        "wake",
        "window_s",
    )

    def __init__(self, env: str, lease_id: int, record: int, journal: mmap.mmap,
                 since_ms: int):
        self.env = env
        #: When (the limiter's clock, epoch ms) this instance began leasing it: calls charged
        #: before that were decided by the store, and a refund of them goes there.
        self.since_ms = since_ms
        #: The lease journal's map: the count is written at ``record`` + 1 per admission.
        self.map = journal
        self.lease_id = lease_id
        self.record = record
        self.share = 0.0
        self.capped = False
        self.interval = math.inf
        self.tat = 0.0
        #: Calls this lease may admit (cumulative), admitted, and the count last sent.
        self.granted = 0
        self.used = 0
        self.sent = 0
        #: Until when (monotonic) the lease holds; 0: none yet.
        self.valid_until = 0.0
        self.qps_limit = 0
        self.quota = 0
        self.remaining = 0
        self.reset_at = 0.0
        self.window_s = 0
        self.used_up: frozenset[str] = frozenset()
        self.bandwidth = 0
        self.qps_by = False
        self.db_free = False
        #: Plan and packs used up (hard stop): quota refused here until a renewal finds room.
        self.spent = False
        #: Requests seen this period (admitted or not), periods with little demand.
        self.demand = 0
        self.idle = 0
        #: Requests/s seen before the lease began: what its first lease asks for.
        self.first_rate = 0.0
        self.ending = False
        self.leased = False
        #: Set to renew before the period ends (the share or the calls used up).
        self.wake = asyncio.Event()
        self.task: asyncio.Task[None] | None = None
        #: Meters requests of this environment here need (told to the store at each lease),
        #: and those the last lease answered for (``used_up`` says which are used up).
        self.needs: set[str] = set()
        self.asked: frozenset[str] = frozenset()

    def decide(self, kind: str, cost: int, needs: str) -> Decision | None:
        """Decide in memory, or None: ask the store."""
        self.demand += 1
        now = time.monotonic()
        if now >= self.valid_until or self.ending:
            return None
        tat = self.tat if self.tat > now else now
        if tat - now > LOCAL_BURST_S or self.share <= 0:
            if not self.capped:
                self.wake.set()
                return None
            # (no share at all: the others hold the whole limit until their next renewal)
            retry = math.ceil((tat - LOCAL_BURST_S - now) * 1000) if self.share > 0 else 100
            return Decision(Outcome.QPS_EXCEEDED, Flag.LEASED, self.qps_limit, 0,
                            max(retry, math.ceil((tat - now) * 1000)), self.quota,
                            self.remaining - (self.used - self.sent),
                            max(0, int((self.reset_at - now) * 1000)), retry, self.window_s,
                            "qps", 0, 0, self.qps_by, self.bandwidth)
        free = self.db_free and kind in _FREE_KINDS
        charge = 0 if free else cost
        refused = "calls" if self.spent and charge else ""
        if needs:
            for need in needs.split(","):
                if need not in self.asked:  # not asked about yet: the store, then ask
                    if need not in self.needs:
                        self.needs.add(need)
                        self.wake.set()
                    return None
                if need in self.used_up and not refused:
                    refused = need
        if refused:  # as decide.lua: a quota refusal, nothing counted (not even the QPS)
            return Decision(Outcome.QUOTA_EXCEEDED, Flag.LEASED, self.qps_limit,
                            int((LOCAL_BURST_S - (tat - now)) * self.share),
                            math.ceil((tat - now) * 1000), self.quota,
                            0 if refused == "calls" else self.remaining - (self.used - self.sent),
                            max(0, int((self.reset_at - now) * 1000)),
                            max(0, int((self.reset_at - now) * 1000)), self.window_s, refused,
                            0, 0, self.qps_by, self.bandwidth)
        used = self.used + charge
        if used > self.granted:
            self.wake.set()
            return None
        new_tat = tat + self.interval
        self.tat = new_tat
        if charge:
            self.used = used
            _USED.pack_into(self.map, self.record + 1, used)
        left = (LOCAL_BURST_S - (new_tat - now)) * self.share
        return Decision(Outcome.ADMITTED, Flag.LEASED | (Flag.DATABASE_FREE if free else 0),
                        self.qps_limit, int(left) + 1 if left >= 0 else 0,
                        math.ceil((new_tat - now) * 1000), self.quota,
                        self.remaining - (used - self.sent),
                        max(0, int((self.reset_at - now) * 1000)), 0, self.window_s, "", 0, 0,
                        self.qps_by, self.bandwidth)


class Hot:
    """The hot environments of this instance: which are, their leases and their renewal."""

    def __init__(self, calls: ScriptCalls, instance: str, mode: Callable[[], str],
                 script_time: Callable[[], ScriptTime], on_events: Callable[[str], None],
                 on_missing: Callable[[str], None], now_ms: Callable[[], int]):
        self.calls = calls
        self.now_ms = now_ms
        self.instance = instance
        self.mode = mode
        self.script_time = script_time
        self.on_events = on_events
        self.on_missing = on_missing
        self.envs: dict[str, HotEnv] = {}
        self.journal = LeaseJournal()
        #: Requests per environment this period (cold ones: the candidates).
        self._counts: dict[str, int] = {}
        self._period_end = 0.0
        self._cool: dict[str, float] = {}
        self._lease_ids = 0
        self._stopping = False
        #: A lease could not be ended at shutdown: its journal record is kept.
        self._kept = False
        #: Every lease task (those ending too), and environments whose end is on its way.
        self._tasks: set[asyncio.Task[None]] = set()
        self._ending: set[str] = set()
        #: Store calls made for leases (what tests and benchmarks read).
        self.lease_calls = 0
        #: Requests/s from which an environment is leased; 0: never (``gateway.hot_rate``).
        self.rate = HOT_RATE
        #: Environments over the rate in the period before.
        self._warm: set[str] = set()

    def open_journal(self, directory: Path) -> None:
        """Count admissions in ``<instance>.leases`` under ``directory`` (kept across a kill)."""
        if self.envs:
            raise RuntimeError("the lease journal is opened before any lease is taken")
        self.journal.close()
        self.journal = LeaseJournal(directory / f"{self.instance}{SUFFIX}")

    def note(self, env: str, joined: bool = False) -> None:
        """A request of a cold environment (``joined``: the store said others lease it)."""
        if not self.rate or self._stopping:
            return
        counts = self._counts
        counts[env] = counts.get(env, 0) + 1
        now = time.monotonic()
        if now >= self._period_end:
            length = now - self._period_end + PERIOD_S
            need = self.rate * length
            self._period_end = now + PERIOD_S
            warm = {e: n / length for e, n in counts.items() if n >= need}
            counts.clear()
            for e in warm.keys() & self._warm:
                self.start(e, warm[e])
            self._warm = set(warm)
        if joined:
            self.start(env)

    def start(self, env: str, rate: float = 0.0) -> None:
        """Lease ``env``: its first lease asks for ``rate`` (requests/s seen here in the
        period before), or for ``gateway.hot_rate`` when none was measured (the store said
        others lease it)."""
        if env in self.envs or self._stopping or not self.rate:
            return
        if env in self._ending:  # its last lease's end not taken yet: not a new one
            return
        cool = self._cool.get(env)
        if cool is not None:
            if time.monotonic() < cool:
                return
            del self._cool[env]
        self._lease_ids += 1
        record = self.journal.open(env, self._lease_ids)
        if record < 0:
            return
        h = self.envs[env] = HotEnv(env, self._lease_ids, record, self.journal._map,
                                        self.now_ms())
        h.first_rate = rate or self.rate
        metrics.HOT_ENVIRONMENTS.set(len(self.envs))
        h.task = task = asyncio.get_running_loop().create_task(self._run(h))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, h: HotEnv) -> None:
        """Lease, renew every period (or sooner when woken), end when idle or refused."""
        try:
            await self._renewing(h)
        except Exception:
            log.exception("lease of %s: renewal failed; the lease ends", h.env)
        finally:
            await self._end(h)

    async def _renewing(self, h: HotEnv) -> None:
        """Every period (or sooner when woken) until idle or refused."""
        last = time.monotonic()
        while not self._stopping and self.rate:
            started = time.monotonic()
            demand, h.demand = h.demand, 0
            rate = demand / max(started - last, 0.001)
            last = started
            if h.leased and rate < self.rate / 4:
                h.idle += 1
                if h.idle >= IDLE_PERIODS:
                    break
            else:
                h.idle = 0
            if not h.leased:  # (nothing measured since the start: what was seen before it)
                rate = max(rate, h.first_rate)
            if not await self._lease(h, max(MIN_WANT, rate * HEADROOM)):
                break
            h.wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(h.wake.wait(),
                                       PERIOD_S - (time.monotonic() - started))
            if time.monotonic() - started < PERIOD_S / 4:
                # (woken early: at most a few renewals a period)
                await asyncio.sleep(PERIOD_S / 4)

    async def _lease(self, h: HotEnv, want_qps: float) -> bool:
        """One renewal; False when the lease is to end."""
        sent_at = time.monotonic()
        used = h.used
        asked = frozenset(h.needs)
        self.lease_calls += 1
        try:
            r = await self.calls.run(LEASE, h.env, keys.decision_keys(h.env), [
                script_arg(self.script_time()), self.instance, "lease", h.lease_id, used,
                f"{want_qps:.3f}", max(MIN_CALLS, math.ceil(want_qps * CALLS_FOR_S)), LEASE_MS,
                self.mode(), ",".join(sorted(asked))])
        except StoreError as exc:
            count_store_error(exc)
            metrics.HOT_LEASE_CALLS.labels("error").inc()
            # (It may have run: the store's count may be `used` now, so refunds never take
            # the count below it.)
            h.sent = max(h.sent, used)
            return time.monotonic() < h.valid_until  # holds until its end, then ends
        code, flags = int(r[0]), int(r[1])
        if flags & Flag.EVENTS:
            self.on_events(h.env)
        if code != 0:
            metrics.HOT_LEASE_CALLS.labels("ended").inc()
            if code == Outcome.NOT_FOUND:
                self.on_missing(h.env)
            self._cool[h.env] = time.monotonic() + COOL_S
            return False
        h.sent = used
        h.granted = int(r[3])
        share = float(r[2])
        if share != h.share:
            # A smaller share applies at once; the TAT keeps what was admitted ahead.
            h.share = share
            h.interval = 1 / share if share > 0 else math.inf
        h.capped = int(r[13]) == 1
        h.qps_limit, h.quota, h.remaining = int(r[4]), int(r[5]), int(r[6])
        back = time.monotonic()
        h.reset_at = back + int(r[7]) / 1000
        h.window_s = int(r[8])
        h.used_up = frozenset(r[10].decode().split(",")) if r[10] else frozenset()
        h.asked = asked
        h.bandwidth, h.qps_by = int(r[11]), int(r[12]) == 1
        h.db_free = bool(flags & Flag.DATABASE_FREE)
        h.spent = bool(flags & SPENT)
        metrics.HOT_LEASE_CALLS.labels("spent" if h.spent else "leased").inc()
        h.valid_until = sent_at + int(r[9]) / 1000
        h.leased = True
        return True

    async def _end(self, h: HotEnv) -> None:
        """No more local decisions; tell the store the last count and give back the rest
        (tried until it is taken or the process stops: the journal then tells it)."""
        h.ending = True
        if self.envs.get(h.env) is h:
            del self.envs[h.env]
            metrics.HOT_ENVIRONMENTS.set(len(self.envs))
        self._ending.add(h.env)
        try:
            await self._send_end(h)
        finally:
            self._ending.discard(h.env)

    async def _send_end(self, h: HotEnv) -> None:
        delay = 0.05
        while True:
            try:
                await self.calls.run(LEASE, h.env, keys.decision_keys(h.env), [
                    script_arg(self.script_time()), self.instance, "end", h.lease_id, h.used])
                self.lease_calls += 1
                break
            except StoreError as exc:
                count_store_error(exc)
                if self._stopping:
                    self._kept = True
                    log.warning("lease of %s not ended (%s): the store charges what it held "
                                "when it expires, the journal tells what was used", h.env, exc)
                    return  # the record stays in the journal
                await asyncio.sleep(delay)
                delay = min(delay * 2, 2.0)
        self.journal.close_record(h.record)

    def refund(self, env: str, amount: int, charged_at_ms: int) -> bool:
        """Give back ``amount`` calls admitted here and not yet told to the store. False
        (the store's refund applies, with its day check) for calls charged before this
        instance leased the environment: they were the store's, perhaps of another day."""
        h = self.envs.get(env)
        if (h is None or h.ending or charged_at_ms < h.since_ms
                or h.used - amount < h.sent):
            return False
        h.used -= amount
        _USED.pack_into(h.map, h.record + 1, h.used)
        return True

    async def stop(self) -> None:
        """End every lease (a clean shutdown): counts told, what is held given back."""
        self._stopping = True
        for h in self.envs.values():
            h.wake.set()
        while self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)

    def close(self) -> None:
        """The journal's file goes unless a lease could not be ended (the next start tells
        the store what it admitted)."""
        self.journal.close(remove=not self._kept)
